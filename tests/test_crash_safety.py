"""Nothing lost, nothing silent: kills during training, unreadable and stock checkpoints, stale unlabeled data and
non-finite steps, each through ``nnUNetv2_train`` in a subprocess on the tiny dataset of ``conftest.py``.

The test trainers (``tests/trainers``) are the package's CAML trainer with a test-sized schedule.
"""
import json
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

from conftest import BIN, EXT_TRAINERS_WITH_TESTS, run_cli
from nnunetv2_caml.checkpoints import CAML_STATE_KEYS, caml_state_digest, temporary_name

KILL_TRAINER = "nnUNetTrainerCAML_killTest"
# the 20 kills get through 10 or 11 epochs on 2 CPU cores (on a faster machine killed_run stops its random kills at
# the last epoch at the latest); the last run trains the rest
KILL_EPOCHS = 14
KILLS = 20
EPOCH_BEGINS = re.compile(r": Epoch (\d+)$", re.MULTILINE)  # the line nnU-Net prints as an epoch begins
CHECKPOINT_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")  # as nnU-Net's --c


@pytest.fixture(scope="module")
def env(caml_dataset):
    """The dataset's environment with the test trainers findable and unbuffered output (kills lose nothing)."""
    return {**caml_dataset["env"], "PYTHONUNBUFFERED": "1",
            "nnUNet_extTrainer": EXT_TRAINERS_WITH_TESTS}


def _output(d, trainer, configuration=None):
    return (d["root"] / "nnUNet_results" / d["dataset_name"] /
            f"{trainer}__nnUNetPlans__{configuration or d['configuration']}" / "fold_all")


def _train(d, env, trainer, *flags, configuration=None, check=False):
    return run_cli(["nnUNetv2_train", d["dataset_id"], configuration or d["configuration"], "all", "-tr", trainer,
                    "-device", "cpu", *flags], env, check=check)


def _one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines and lines[-1].startswith("ERROR: "), result.stderr[-3000:]
    return lines[-1]


def _newest_checkpoint(output: Path):
    """(name, epoch, CAML state digest) of the checkpoint ``--c`` resumes from, read completely; None if none."""
    for name in CHECKPOINT_ORDER:
        if (output / name).is_file():
            checkpoint = torch.load(output / name, map_location="cpu", weights_only=False)  # must be complete
            return name, checkpoint["current_epoch"], caml_state_digest(*(checkpoint[k] for k in CAML_STATE_KEYS))
    return None


def _partials(output: Path) -> dict:
    """{temporary checkpoint file: mtime} of the saves in progress (or left by a kill)."""
    files = [Path(temporary_name(str(output / name))) for name in CHECKPOINT_ORDER]
    return {f: f.stat().st_mtime_ns for f in files if f.exists()}


@pytest.fixture(scope="module")
def killed_run(caml_dataset, env, tmp_path_factory):
    """Train with --c from the start, SIGKILLing the process KILLS times: every other time after a random delay (at
    the latest when the last epoch begins, so that however fast the machine, no killing round finishes the run),
    otherwise the moment it starts writing a checkpoint. Then let the last run finish. The random delays are 0.6 to
    2.4 times the last start-up measured (launch to first epoch, about 5 s on 2 CPU cores), so that on a slower or
    busier machine, too, some kills come after a checkpoint was written."""
    d = caml_dataset
    output = _output(d, KILL_TRAINER)
    logs = tmp_path_factory.mktemp("kill_logs")
    rng = random.Random(0)
    start_up = 5.0
    rounds = []
    while True:
        expected = _newest_checkpoint(output) if output.exists() else None
        log = logs / f"round_{len(rounds):02d}.txt"
        killing = len(rounds) < KILLS
        inside_save = killing and len(rounds) % 2 == 1
        with open(log, "w") as stdout, open(log) as reader:
            launched = time.monotonic()
            process = subprocess.Popen([str(BIN / "nnUNetv2_train"), str(d["dataset_id"]), d["configuration"], "all",
                                        "-tr", KILL_TRAINER, "-device", "cpu", "--c"], env=env, stdout=stdout,
                                       stderr=subprocess.STDOUT)
            partials_before = _partials(output) if output.exists() else {}
            deadline = launched + (120 if inside_save else rng.uniform(0.6, 2.4) * start_up if killing else 600)
            printed, epochs = "", []
            while process.poll() is None and time.monotonic() < deadline:
                if inside_save and output.exists() and any(
                        partials_before.get(f) != m for f, m in _partials(output).items()):
                    break  # a save has begun: kill it in the middle
                new = reader.read()
                if new:
                    printed += new
                    found = EPOCH_BEGINS.findall(printed)
                    if found and not epochs:
                        start_up = time.monotonic() - launched  # this round's
                    epochs = found
                    if killing and not inside_save and str(KILL_EPOCHS - 1) in epochs:
                        break  # the last epoch began: only the last round may finish the run
                time.sleep(0.002 if inside_save else 0.05)
            killed = process.poll() is None
            if killed:
                process.kill()
            process.wait()
        rounds.append({"expected": expected, "killed": killed, "returncode": process.returncode,
                       "in_save": killed and any(partials_before.get(f) != m for f, m in _partials(output).items()),
                       "log": log.read_text()})
        if not killed:
            return {"rounds": rounds, "output": output}
        assert len(rounds) < KILLS + 5, "the run did not finish"


@pytest.mark.slow
def test_checkpoints_survive_repeated_kills(killed_run):
    rounds = killed_run["rounds"]
    killed = [r for r in rounds if r["killed"]]
    assert len(killed) >= KILLS, f"the run finished after {len(killed)} kills"
    assert sum(r["in_save"] for r in killed) >= 5, "too few kills landed inside a save"
    assert rounds[-1]["returncode"] == 0, rounds[-1]["log"][-3000:]
    resumed = 0
    for r in rounds:
        assert "Traceback" not in r["log"] and "ERROR" not in r["log"], r["log"][-3000:]
        if r["expected"] is None or "CAML: loaded" not in r["log"]:
            continue  # killed before a checkpoint existed, or before loading it
        name, epoch, digest = r["expected"]
        # the resume took the newest complete checkpoint, at its epoch, and restored CAML's state bit for bit
        assert f"CAML: loaded {killed_run['output'] / name} at epoch {epoch}:" in r["log"]
        assert f"state digest {digest}" in r["log"]
        resumed += 1
    assert resumed >= KILLS // 2
    final = torch.load(killed_run["output"] / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == KILL_EPOCHS
    # every epoch was logged exactly once across all the resumes
    for key in ("train_losses", "caml_loss_consistency", "caml_memory_bank_fill"):
        assert len(final["logging"][key]) == KILL_EPOCHS and np.all(np.isfinite(final["logging"][key])), key
    assert (killed_run["output"] / "validation" / "summary.json").is_file()


@pytest.fixture
def finished_copy(killed_run, tmp_path):
    """The finished run's checkpoints, put back after the test."""
    output = killed_run["output"]
    saved = {name: shutil.copy(output / name, tmp_path / name) for name in ("checkpoint_final.pth",
                                                                            "checkpoint_best.pth")}
    yield output
    for name, copy in saved.items():
        shutil.copy(copy, output / name)


@pytest.mark.parametrize("cut", [0, 0.5])
def test_unreadable_checkpoint_is_refused_in_one_line(caml_dataset, env, finished_copy, cut):
    final = finished_copy / "checkpoint_final.pth"
    content = final.read_bytes()
    final.write_bytes(content[:int(len(content) * cut)])
    message = _one_line_error(_train(caml_dataset, env, KILL_TRAINER, "--c"))
    assert str(final) in message and "truncated or corrupt" in message and "move it away" in message


def _strip_caml_state(path: Path) -> None:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    for key in CAML_STATE_KEYS:
        del checkpoint[key]
    checkpoint["trainer_name"] = "nnUNetTrainer"
    torch.save(checkpoint, path)


def test_checkpoint_of_main_network_only_validates_but_does_not_resume(caml_dataset, env, finished_copy):
    for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
        _strip_caml_state(finished_copy / name)
    summary = finished_copy / "validation" / "summary.json"
    summary.unlink()
    result = _train(caml_dataset, env, KILL_TRAINER, "--val", "--val_best")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "holds only the main network: loaded for validation" in result.stdout
    assert "foreground_mean" in json.loads(summary.read_text())
    message = _one_line_error(_train(caml_dataset, env, KILL_TRAINER, "--c"))
    assert "written by nnUNetTrainer and holds only the main network" in message and "--val" in message


def test_checkpoint_of_another_auxiliary_network_is_refused_in_one_line(caml_dataset, env, finished_copy):
    """A checkpoint written before the local-contrast view (its settings lack the key) holds an auxiliary network
    without it: --c names the setting and the trainer that resumes it, before anything is loaded."""
    final = finished_copy / "checkpoint_final.pth"
    checkpoint = torch.load(final, map_location="cpu", weights_only=False)
    del checkpoint["caml_settings"]["auxiliary_local_contrast"]
    torch.save(checkpoint, final)
    message = _one_line_error(_train(caml_dataset, env, KILL_TRAINER, "--c"))
    assert str(final) in message and "auxiliary_local_contrast=None (this trainer: 3.0)" in message
    assert "nnUNetTrainerCAML_noLocalContrast" in message


def test_resume_logs_the_settings_in_force(killed_run):
    resumed = [r["log"] for r in killed_run["rounds"] if "CAML: loaded" in r["log"] and "in force" in r["log"]]
    assert resumed
    assert "CAML settings in force: lambda_s=1.0" in resumed[-1] and "max_consecutive_nonfinite_steps=10" in resumed[-1]


# ---------------------------------------------------------------- stale unlabeled data
def test_training_refuses_unlabeled_data_of_other_plans(caml_dataset, env):
    d = caml_dataset
    plans_file = d["preprocessed"] / "nnUNetPlans.json"
    original = plans_file.read_text()
    plans = json.loads(original)
    plans["configurations"]["3d_fullres"]["spacing"] = [2.0, 2.0, 2.0]  # as if re-planned after the unlabeled run
    plans_file.write_text(json.dumps(plans))
    try:
        message = _one_line_error(_train(d, env, "nnUNetTrainerCAML_tiny"))
    finally:
        plans_file.write_text(original)
    assert "does not match the plans" in message and "spacing" in message
    assert f"`nnUNetv2_caml_preprocess_unlabeled -d {d['dataset_id']} -c {d['configuration']} --overwrite`" in message


# ---------------------------------------------------------------- non-finite steps
@pytest.fixture(scope="module")
def nan_configurations(caml_dataset):
    """Configurations like the tiny one whose unlabeled data holds one (``3d_nan_one``) or only (``3d_nan_all``)
    cases with NaN voxels, as data preprocessed by other means could; the command itself refuses such images."""
    d = caml_dataset
    plans_file = d["preprocessed"] / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    labeled = d["preprocessed"] / "nnUNetPlans_3d_fullres"
    for name, poisoned in (("3d_nan_one", 1), ("3d_nan_all", None)):
        identifier = f"nnUNetPlans_{name}"
        plans["configurations"][name] = {"inherits_from": d["configuration"], "data_identifier": identifier}
        shutil.copytree(labeled, d["preprocessed"] / identifier, dirs_exist_ok=True)
        unlabeled = d["preprocessed"] / f"{identifier}_unlabeled"
        shutil.copytree(labeled.with_name(labeled.name + "_unlabeled"), unlabeled, dirs_exist_ok=True)
        dataset = nnUNetDatasetBlosc2(str(unlabeled))
        for case in dataset.identifiers[:poisoned]:
            data, seg, _, properties = dataset.load_case(case)
            data, seg = np.array(data[:]), np.array(seg[:])
            data[:, ::2] = np.nan
            for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
                (unlabeled / (case + suffix)).unlink()
            chunks = {f"{k}{suffix}": v for suffix, a in (("", data), ("_seg", seg))
                      for k, v in zip(("blocks", "chunks"), comp_blosc2_params(a.shape, (32, 40, 40), a.itemsize))}
            nnUNetDatasetBlosc2.save_case(data, seg, properties, str(unlabeled / case), **chunks)
    plans_file.write_text(json.dumps(plans, indent=2))
    return d


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_non_finite_steps_are_skipped(nan_configurations, env):
    d = nan_configurations
    result = _train(d, env, "nnUNetTrainerCAML_nanTest", configuration="3d_nan_one", check=True)
    skipped = result.stdout.count("non-finite loss (")
    assert 0 < skipped < 16, result.stdout[-3000:]
    assert "non-finite step(s) skipped" in result.stdout
    checkpoint = torch.load(_output(d, "nnUNetTrainerCAML_nanTest", "3d_nan_one") / "checkpoint_final.pth",
                            map_location="cpu", weights_only=False)
    # no NaN reached the weights, the OCC heads' batch-norm statistics or the memory bank
    for key in ("network_weights", "caml_auxiliary_network_weights", "caml_occ_heads"):
        assert _all_finite(checkpoint[key]), key
    assert all(torch.isfinite(e).all() for per_class in checkpoint["caml_memory_bank"]["entries"].values()
               for e in per_class)
    assert np.all(np.isfinite(checkpoint["logging"]["train_losses"]))


def test_many_non_finite_steps_in_a_row_stop_the_run(nan_configurations, env):
    message = _one_line_error(_train(nan_configurations, env, "nnUNetTrainerCAML_nanStopTest",
                                     configuration="3d_nan_all"))
    assert "10 training steps in a row had a non-finite loss" in message and "are intact" in message
