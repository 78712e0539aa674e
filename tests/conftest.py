"""Shared fixtures: one tiny synthetic semi-supervised dataset taken through nnU-Net's real command-line tools."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: nnUNet_extTrainer with the test-only trainers of tests/trainers beside the repository's trainers/
EXT_TRAINERS_WITH_TESTS = os.pathsep.join((str(REPO / "trainers"), str(REPO / "tests" / "trainers")))
DATASET_ID = 987
CONFIGURATION = "3d_cpu"


def nnunet_env(root: Path) -> dict:
    """Environment for nnU-Net subprocesses rooted at ``root`` (CPU-friendly, CAML trainers findable)."""
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(root / "nnUNet_raw"),
        "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
        "nnUNet_results": str(root / "nnUNet_results"),
        "nnUNet_extTrainer": str(REPO / "trainers"),
        "nnUNet_n_proc_DA": "0",
        "nnUNet_def_n_proc": "1",  # nnU-Net's export pools spawn 8 torch-importing workers by default
        "nnUNet_compile": "0",
        "OMP_NUM_THREADS": "2",
    })
    return env


def run_cli(args, env, check=True, timeout=900) -> subprocess.CompletedProcess:
    """Run one of the installed command-line tools (from this interpreter's bin folder)."""
    result = subprocess.run([str(BIN / args[0]), *map(str, args[1:])], env=env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def add_small_configuration(env: dict, dataset_id, name: str, **settings) -> None:
    """The package's ``add_small_configuration`` in a subprocess with ``env``'s nnU-Net folders (``nnunetv2.paths``
    reads them once, when it is first imported)."""
    code = ("from nnunetv2_caml.demo.small_configuration import add_small_configuration as a; "
            f"a({dataset_id!r}, {name!r}, **{settings!r})")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


@pytest.fixture(scope="session")
def caml_dataset(tmp_path_factory):
    """A planned and preprocessed tiny dataset with unlabeled data (``3d_fullres`` and ``2d``) and a CPU-sized
    configuration ``3d_cpu``.

    4 labeled, 4 unlabeled and 2 test cases of 32x40x40 voxels from the package's generator.
    """
    from nnunetv2_caml.demo.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("caml")
    env = nnunet_env(root)
    dataset_folder = Path(generate_dataset(env["nnUNet_raw"], DATASET_ID, task="atrium", num_labeled=4,
                                           num_unlabeled=4, num_test=2, shape=(32, 40, 40), seed=1))
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): it needs a positive value. The 2d data is for
    # the 2D training of tests/test_training_integration.py
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "2d", "-np", "1", "1",
             "--verify_dataset_integrity"], {**env, "nnUNet_n_proc_DA": "1"})
    run_cli(["nnUNetv2_caml_preprocess_unlabeled", "-d", DATASET_ID, "-c", "3d_fullres", "2d", "-np", "1"], env)
    add_small_configuration(env, DATASET_ID, CONFIGURATION, features_per_stage=(8, 16, 32, 64),
                            patch_size=(32, 40, 40))
    return {"root": root, "env": env, "raw": dataset_folder, "dataset_id": DATASET_ID,
            "dataset_name": dataset_folder.name, "configuration": CONFIGURATION,
            "preprocessed": Path(env["nnUNet_preprocessed"]) / dataset_folder.name}
