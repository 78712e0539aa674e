"""End-to-end tests of ``nnunetv2_caml.unlabeled`` on a tiny real dataset, with nnU-Net's own CLIs.

The module fixture plans and preprocesses a 5-case labeled dataset once with
``nnUNetv2_plan_and_preprocess``, then preprocesses its 3 unlabeled images with
``nnUNetv2_caml_preprocess_unlabeled``; the tests read the result with nnU-Net's dataset class and
data loader, rerun the command, and feed it broken inputs.
"""
import json
import os
import shutil
import subprocess
import sys
from os.path import join

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class, nnUNetDatasetBlosc2
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_caml.unlabeled import (FINGERPRINT_KEY, TEMPORARY_FOLDER, UNLABELED_IMAGES_FOLDER, UnlabeledDataError,
                                     assert_unlabeled_data_ready, fingerprint_differences, preprocessing_fingerprint,
                                     preprocess_unlabeled_entry, unlabeled_case_identifiers,
                                     unlabeled_preprocessed_folder)

DATASET_ID = 987
DATASET = "Dataset987_CamlUnlabeledTest"
BROKEN_ID = 988
BROKEN = "Dataset988_CamlUnlabeledBroken"
ENDING = ".nii.gz"
SHAPE = (24, 32, 32)
BIN = os.path.dirname(sys.executable)
UNLABELED_IDS = ["unl_000", "unl_001", "unl_002"]


def _write(path, array):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, path)


def _make_case(rng):
    """Noisy image with a bright ball (label 1) and a zero corner (outside the nonzero mask)."""
    z, y, x = np.indices(SHAPE)
    centre = rng.integers([8, 10, 10], [16, 22, 22])
    label = (((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) < 25).astype(np.uint8)
    image = rng.normal(100, 10, SHAPE).astype(np.float32) + 100 * label
    image[:4, :6, :6] = 0
    return image, label


def _build_raw_dataset(raw):
    folder = join(raw, DATASET)
    for sub in ("imagesTr", "labelsTr", UNLABELED_IMAGES_FOLDER):
        os.makedirs(join(folder, sub))
    rng = np.random.default_rng(0)
    for i in range(5):
        image, label = _make_case(rng)
        _write(join(folder, "imagesTr", f"case_{i:03d}_0000{ENDING}"), image)
        _write(join(folder, "labelsTr", f"case_{i:03d}{ENDING}"), label)
    # unl_000 is a copy of a labeled image, so its preprocessed data must equal nnU-Net's for case_000
    shutil.copy(join(folder, "imagesTr", f"case_000_0000{ENDING}"),
                join(folder, UNLABELED_IMAGES_FOLDER, f"unl_000_0000{ENDING}"))
    for case in UNLABELED_IDS[1:]:
        _write(join(folder, UNLABELED_IMAGES_FOLDER, f"{case}_0000{ENDING}"), _make_case(rng)[0])
    with open(join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "ball": 1},
                   "numTraining": 5, "file_ending": ENDING}, f)


def _run(env, command, *args):
    return subprocess.run([join(BIN, command), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)


def _snapshot(folder):
    """{path: (size, mtime_ns)} of every file under folder."""
    return {join(d, f): (os.stat(join(d, f)).st_size, os.stat(join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(folder) for f in files}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    paths = {k: str(root / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in paths.values():
        os.makedirs(p)
    _build_raw_dataset(paths["nnUNet_raw"])
    # nnUNet_n_proc_DA=0 would break planning (torch.set_num_threads(0) in the VRAM estimate)
    environment = {**os.environ, **paths, "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1",
                   "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = _run(environment, "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres",
                  "-np", 1, "-npfp", 1, "--no_pbar")
    assert result.returncode == 0, result.stdout + result.stderr
    # extra configurations sharing 3d_fullres's data: a smaller batch, and a cascade stage above 3d_fullres
    plans_file = join(paths["nnUNet_preprocessed"], DATASET, "nnUNetPlans.json")
    with open(plans_file) as f:
        plans = json.load(f)
    plans["configurations"]["3d_small"] = {"inherits_from": "3d_fullres", "batch_size": 1}
    plans["configurations"]["3d_fake_cascade"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_fullres"}
    with open(plans_file, "w") as f:
        json.dump(plans, f, indent=2)
    return environment


@pytest.fixture(scope="module")
def first_run(env):
    """The first unlabeled preprocessing run (three configurations sharing one data folder, one of them a cascade
    stage; -np per configuration, as nnUNetv2_preprocess takes it)."""
    result = _run(env, "nnUNetv2_caml_preprocess_unlabeled", "-d", DATASET_ID, "-c", "3d_fullres", "3d_small",
                  "3d_fake_cascade", "-np", 2, 1, 1)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture
def nnunet_paths(env, monkeypatch):
    """Point nnunetv2.paths (read lazily from os.environ) at the test folders in this process."""
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    return env


def _plans(env):
    pm = PlansManager(join(env["nnUNet_preprocessed"], DATASET, "nnUNetPlans.json"))
    with open(join(env["nnUNet_preprocessed"], DATASET, "dataset.json")) as f:
        return pm, pm.get_configuration("3d_fullres"), json.load(f)


def _output_folder(env):
    return join(env["nnUNet_preprocessed"], DATASET, "nnUNetPlans_3d_fullres_unlabeled")


def test_folder_naming():
    assert unlabeled_preprocessed_folder("/p/Dataset1_A/nnUNetPlans_3d_fullres/") == \
        "/p/Dataset1_A/nnUNetPlans_3d_fullres_unlabeled"


def test_layout_and_shared_configuration(env, first_run):
    folder = _output_folder(env)
    assert sorted(os.listdir(folder)) == sorted(f"{k}{s}" for k in UNLABELED_IDS for s in (".b2nd", "_seg.b2nd", ".pkl"))
    assert unlabeled_case_identifiers(folder) == UNLABELED_IDS
    assert "3d_small: same preprocessed data as 3d_fullres" in first_run.stdout
    assert "3d_fake_cascade: same preprocessed data as 3d_fullres" in first_run.stdout
    # nnU-Net's labeled folder is untouched and holds only labeled cases
    labeled = join(env["nnUNet_preprocessed"], DATASET, "nnUNetPlans_3d_fullres")
    assert nnUNetDatasetBlosc2.get_identifiers(labeled) and not any(
        i.startswith("unl") for i in nnUNetDatasetBlosc2.get_identifiers(labeled))


def test_loads_with_nnunet_dataset_and_dataloader(env, first_run):
    pm, cm, dataset_json = _plans(env)
    folder = _output_folder(env)
    assert infer_dataset_class(folder) is nnUNetDatasetBlosc2
    dataset = nnUNetDatasetBlosc2(folder)
    assert dataset.identifiers == UNLABELED_IDS

    data, seg, seg_prev, properties = dataset.load_case("unl_000")
    assert properties["class_locations"] == {} and seg_prev is None
    assert properties[FINGERPRINT_KEY] == preprocessing_fingerprint(pm, cm, dataset_json)  # what made the case
    assert set(np.unique(seg[:])) == {-1, 0}  # crop mask: the zero corner is outside
    # same image as labeled case_000 -> same data as nnU-Net's own preprocessing wrote for it
    labeled = nnUNetDatasetBlosc2(join(env["nnUNet_preprocessed"], DATASET, "nnUNetPlans_3d_fullres"))
    np.testing.assert_array_equal(data[:], labeled.load_case("case_000")[0][:])
    # and the same as running the configuration's preprocessor directly
    image = join(env["nnUNet_raw"], DATASET, UNLABELED_IMAGES_FOLDER, f"unl_001_0000{ENDING}")
    expected, _, _ = DefaultPreprocessor(verbose=False).run_case([image], None, pm, cm, dataset_json)
    actual = dataset.load_case("unl_001")[0][:]
    np.testing.assert_array_equal(actual, expected)
    assert abs(actual.mean()) < 1e-3 and abs(actual.std() - 1) < 1e-3  # ZScore applied

    for oversample in (0.0, 1.0):  # empty class_locations also survive forced-foreground sampling
        loader = nnUNetDataLoader(dataset, 2, cm.patch_size, cm.patch_size, pm.get_label_manager(dataset_json),
                                  oversample_foreground_percent=oversample)
        batch = next(loader)
        assert tuple(batch["data"].shape) == (2, 1, *cm.patch_size)
        assert tuple(batch["target"].shape) == (2, 1, *cm.patch_size)
        assert set(batch["target"].unique().tolist()) <= {-1, 0}


def test_rerun_skips_and_overwrite_redoes(env, first_run):
    folder = _output_folder(env)
    before = _snapshot(folder)
    again = _run(env, "nnUNetv2_caml_preprocess_unlabeled", "-d", DATASET_ID, "-c", "3d_fullres", "-np", 1)
    assert again.returncode == 0, again.stderr
    assert "0 to preprocess, 3 already finished and skipped" in again.stdout
    assert _snapshot(folder) == before

    redo = _run(env, "nnUNetv2_caml_preprocess_unlabeled", "-d", DATASET_ID, "-c", "3d_fullres", "-np", 2,
                "--overwrite")
    assert redo.returncode == 0, redo.stderr
    assert "3 to preprocess" in redo.stdout
    after = _snapshot(folder)
    assert after.keys() == before.keys()
    assert all(after[f][1] != before[f][1] for f in before)
    assert unlabeled_case_identifiers(folder) == UNLABELED_IDS


def test_np_is_one_number_or_one_per_configuration(env, first_run):
    folder = _output_folder(env)
    before = _snapshot(folder)
    result = _run(env, "nnUNetv2_caml_preprocess_unlabeled", "-d", DATASET_ID, "-c", "3d_fullres", "3d_small",
                  "-np", 1, 1, 1)
    assert result.returncode == 1 and result.stderr.strip() == (
        "ERROR: -np takes one number, or one per configuration (as nnUNetv2_preprocess): got 3 for 2 "
        "configuration(s) 3d_fullres 3d_small"), result.stderr
    assert _snapshot(folder) == before


def test_plans_sharing_nnunets_data_share_the_unlabeled_cases(nnunet_paths, first_run):
    """Plans of another name with the same data identifier (as nnU-Net's ResEnc presets write for 3d_fullres) use the
    unlabeled cases already made: the command skips them, the trainer's check accepts them."""
    env = nnunet_paths
    plans_file = join(env["nnUNet_preprocessed"], DATASET, "nnUNetSharedDataPlans.json")
    with open(join(env["nnUNet_preprocessed"], DATASET, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    plans["plans_name"] = "nnUNetSharedDataPlans"
    assert plans["configurations"]["3d_fullres"]["data_identifier"] == "nnUNetPlans_3d_fullres"
    with open(plans_file, "w") as f:
        json.dump(plans, f)
    try:
        before = _snapshot(_output_folder(env))
        result = _run(env, "nnUNetv2_caml_preprocess_unlabeled", "-d", DATASET_ID, "-c", "3d_fullres", "-plans_name",
                      "nnUNetSharedDataPlans", "-np", 1)
        assert result.returncode == 0 and "0 to preprocess, 3 already finished and skipped" in result.stdout, \
            result.stdout + result.stderr
        assert _snapshot(_output_folder(env)) == before
        pm = PlansManager(plans_file)
        with open(join(env["nnUNet_preprocessed"], DATASET, "dataset.json")) as f:
            fingerprint = preprocessing_fingerprint(pm, pm.get_configuration("3d_fullres"), json.load(f))
        assert assert_unlabeled_data_ready(DATASET, "nnUNetPlans_3d_fullres", "3d_fullres", "nnUNetSharedDataPlans",
                                           fingerprint) == _output_folder(env)
    finally:
        os.remove(plans_file)
    # cases made by earlier versions, whose fingerprints held the plans' name, are not stale for it
    assert fingerprint_differences({**fingerprint, "plans_name": "nnUNetPlans"}, fingerprint) == ""
    assert "added" in fingerprint_differences({**fingerprint, "added": 1}, fingerprint)


def test_interrupted_case_is_redone(env, first_run):
    folder = _output_folder(env)
    # interrupted between renames: seg and pkl in place, data file missing; plus a stale temporary folder
    os.remove(join(folder, "unl_001.b2nd"))
    stale = join(folder, TEMPORARY_FOLDER, "unl_002_x")
    os.makedirs(stale)
    with open(join(stale, "unl_002.b2nd"), "wb") as f:
        f.write(b"half written")
    assert unlabeled_case_identifiers(folder) == ["unl_000", "unl_002"]
    assert "unl_001" not in nnUNetDatasetBlosc2.get_identifiers(folder)
    kept = {f: s for f, s in _snapshot(folder).items() if "unl_001" not in f and TEMPORARY_FOLDER not in f}

    result = _run(env, "nnUNetv2_caml_preprocess_unlabeled", "-d", DATASET_ID, "-c", "3d_fullres", "-np", 1)
    assert result.returncode == 0, result.stderr
    assert "1 to preprocess, 2 already finished and skipped" in result.stdout
    assert unlabeled_case_identifiers(folder) == UNLABELED_IDS
    assert not os.path.exists(join(folder, TEMPORARY_FOLDER))
    assert all(_snapshot(folder)[f] == s for f, s in kept.items())
    nnUNetDatasetBlosc2(folder).load_case("unl_001")[0][:]


def _copy_as_broken(env):
    """Copy the finished dataset (raw and preprocessed, unlabeled output included) to BROKEN."""
    for root in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(join(env[root], DATASET), join(env[root], BROKEN))
    return join(env["nnUNet_raw"], BROKEN, UNLABELED_IMAGES_FOLDER)


def _extra_channel(unlabeled):
    shutil.copy(join(unlabeled, f"unl_001_0000{ENDING}"), join(unlabeled, f"unl_001_0001{ENDING}"))


def _clashing_id(unlabeled):
    shutil.copy(join(unlabeled, f"unl_001_0000{ENDING}"), join(unlabeled, f"case_003_0000{ENDING}"))


def _new_case(unlabeled, array, spacing=(1.0, 1.0, 1.0), name="unl_003"):
    """Add an unlabeled case (one file) holding ``array``."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[:image.GetDimension()])
    sitk.WriteImage(image, join(unlabeled, f"{name}_0000{ENDING}"))


def _with(value, where=(slice(2, 4),)):
    array = _make_case(np.random.default_rng(5))[0]
    array[where] = value
    return array


def _non_finite(unlabeled, env, value):
    """A case with NaN/inf voxels, read by NibabelIO (SimpleITK's NIfTI reader turns them into 0, NibabelIO keeps
    them) as the only unlabeled case: the reader is part of the plans, so the finished cases made with SimpleITKIO
    are removed first."""
    for f in os.listdir(unlabeled):
        os.remove(join(unlabeled, f))
    shutil.rmtree(join(env["nnUNet_preprocessed"], BROKEN, "nnUNetPlans_3d_fullres_unlabeled"))
    plans_file = join(env["nnUNet_preprocessed"], BROKEN, "nnUNetPlans.json")
    with open(plans_file) as f:
        plans = json.load(f)
    plans["image_reader_writer"] = "NibabelIO"
    with open(plans_file, "w") as f:
        json.dump(plans, f)
    _new_case(unlabeled, _with(value))


def _truncated(unlabeled):
    _new_case(unlabeled, _make_case(np.random.default_rng(5))[0])
    path = join(unlabeled, f"unl_003_0000{ENDING}")
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[:len(content) // 2])


BAD_INPUTS = {
    # name: (break the copy, command arguments, words the message must contain)
    "unknown_dataset": (None, ["-d", 999], ["999", "not found", "nnUNet_raw"]),
    "missing_plans": (lambda u, env: shutil.rmtree(join(env["nnUNet_preprocessed"], BROKEN)), ["-d", BROKEN_ID],
                      ["nnUNetPlans.json not found", f"nnUNetv2_plan_and_preprocess -d {BROKEN_ID}"]),
    "no_unlabeled_folder": (lambda u, env: shutil.rmtree(u), ["-d", BROKEN_ID], ["no unlabeled images", "imagesTrUnlabeled"]),
    "empty_unlabeled_folder": (lambda u, env: [os.remove(join(u, f)) for f in os.listdir(u)], ["-d", BROKEN_ID],
                               ["no unlabeled images", "imagesTrUnlabeled"]),
    "wrong_file_ending": (lambda u, env: open(join(u, "unl_003_0000.nrrd"), "wb").close(), ["-d", BROKEN_ID],
                          ["unl_003_0000.nrrd", f"does not end with {ENDING}"]),
    "wrong_channel_count": (lambda u, env: _extra_channel(u), ["-d", BROKEN_ID],
                            ["unl_001", "1 channel(s)", f"exactly unl_001_0000{ENDING}"]),
    "unknown_configuration": (None, ["-d", BROKEN_ID, "-c", "3d_fullres", "3d_nope"],
                              ["3d_nope", "use one of", "3d_fullres"]),
    "id_also_in_imagesTr": (lambda u, env: _clashing_id(u), ["-d", BROKEN_ID], ["case_003", "imagesTr"]),
    "id_ending_in_seg": (lambda u, env: _new_case(u, _with(1.0), name="unl_003_seg"), ["-d", BROKEN_ID],
                         ["unl_003_seg_0000", "_seg", "rename"]),
    # the file checks below run on a case that is not preprocessed yet; the finished ones must stay untouched
    "nan_voxels": (lambda u, env: _non_finite(u, env, np.nan), ["-d", BROKEN_ID], ["unl_003", "NaN/inf", "replace"]),
    "inf_voxels": (lambda u, env: _non_finite(u, env, np.inf), ["-d", BROKEN_ID], ["unl_003", "NaN/inf"]),
    "2d_image": (lambda u, env: _new_case(u, _make_case(np.random.default_rng(5))[0][12]), ["-d", BROKEN_ID],
                 ["unl_003_0000", "2D image", "3D"]),
    "two_channels_in_one_file": (lambda u, env: _new_case(u, np.stack([_with(1.0)] * 2)), ["-d", BROKEN_ID],
                                 ["unl_003_0000", "2 channel(s)", "lists 1"]),
    "truncated_file": (lambda u, env: _truncated(u), ["-d", BROKEN_ID], ["unl_003_0000", "truncated"]),
    "implausible_spacing": (lambda u, env: _new_case(u, _with(1.0), spacing=(1.0, 1.0, 50.0)), ["-d", BROKEN_ID],
                            ["unl_003_0000", "spacing", "median"]),
    "constant_image": (lambda u, env: _new_case(u, np.full(SHAPE, 7.0, np.float32)), ["-d", BROKEN_ID],
                       ["unl_003_0000", "constant", "remove"]),
}


@pytest.fixture
def broken(env, first_run):
    unlabeled = _copy_as_broken(env)
    yield unlabeled
    for root in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.rmtree(join(env[root], BROKEN), ignore_errors=True)


def _run_entry_in_process(monkeypatch, capsys, env, *args) -> subprocess.CompletedProcess:
    """``nnUNetv2_caml_preprocess_unlabeled ARGS`` through its entry point in this process, with ``env``'s variables
    (what the installed command runs, without a new interpreter's start-up: the many bad-input cases stay cheap)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_caml_preprocess_unlabeled", *map(str, args)])
    capsys.readouterr()
    try:
        preprocess_unlabeled_entry()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_fails_with_one_line(env, broken, name, monkeypatch, capsys):
    breaker, arguments, words = BAD_INPUTS[name]
    if breaker is not None:
        breaker(broken, env)
    before = _snapshot(env["nnUNet_preprocessed"])
    result = _run_entry_in_process(monkeypatch, capsys, env, *arguments, "-np", 1)
    assert result.returncode == 1
    # the progress bar (tqdm, on stderr like nnU-Net's) may stand before the error; the error is one line
    lines = [line for line in result.stderr.strip().splitlines() if "Preprocessing unlabeled" not in line]
    assert len(lines) == 1 and lines[0].startswith("ERROR: ") and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert _snapshot(env["nnUNet_preprocessed"]) == before


def test_plans_changed_after_preprocessing(nnunet_paths, broken):
    """New plans (here: another spacing) make the finished cases stale: the command refuses without --overwrite,
    the trainer's check refuses and names the command, --overwrite redoes every case."""
    env = nnunet_paths
    plans_file = join(env["nnUNet_preprocessed"], BROKEN, "nnUNetPlans.json")
    with open(plans_file) as f:
        plans = json.load(f)
    plans["configurations"]["3d_fullres"]["spacing"] = [1.5, 1.5, 1.5]
    with open(plans_file, "w") as f:
        json.dump(plans, f)
    before = _snapshot(env["nnUNet_preprocessed"])
    result = _run(env, "nnUNetv2_caml_preprocess_unlabeled", "-d", BROKEN_ID, "-np", 1)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "3 of 3 case(s)" in lines[0] and "spacing [1.0, 1.0, 1.0] -> [1.5, 1.5, 1.5]" in lines[0]
    assert "--overwrite" in lines[0]
    assert _snapshot(env["nnUNet_preprocessed"]) == before

    pm = PlansManager(plans_file)
    with open(join(env["nnUNet_preprocessed"], BROKEN, "dataset.json")) as f:
        fingerprint = preprocessing_fingerprint(pm, pm.get_configuration("3d_fullres"), json.load(f))
    with pytest.raises(UnlabeledDataError) as error:
        assert_unlabeled_data_ready(BROKEN, "nnUNetPlans_3d_fullres", "3d_fullres", fingerprint=fingerprint)
    assert f"`nnUNetv2_caml_preprocess_unlabeled -d {BROKEN_ID} -c 3d_fullres --overwrite`" in str(error.value)

    redo = _run(env, "nnUNetv2_caml_preprocess_unlabeled", "-d", BROKEN_ID, "-np", 1, "--overwrite")
    assert redo.returncode == 0 and "3 to preprocess" in redo.stdout, redo.stderr
    folder = assert_unlabeled_data_ready(BROKEN, "nnUNetPlans_3d_fullres", "3d_fullres", fingerprint=fingerprint)
    assert nnUNetDatasetBlosc2(folder).load_case("unl_001")[3][FINGERPRINT_KEY]["spacing"] == [1.5, 1.5, 1.5]


def test_images_added_or_removed_after_preprocessing(nnunet_paths, broken):
    """The preprocessed cases must be the images in imagesTrUnlabeled: an image added since (or left unfinished) would
    be left out of training, a removed one still used. The trainer's check refuses both and names the command; the
    command preprocesses the added one, and removes the other only with --overwrite. Without the raw images (only
    nnUNet_preprocessed copied to the training machine) there is nothing to compare."""
    env = nnunet_paths
    command = f"nnUNetv2_caml_preprocess_unlabeled -d {BROKEN_ID} -c 3d_fullres"
    _new_case(broken, _make_case(np.random.default_rng(5))[0])
    with pytest.raises(UnlabeledDataError) as error:
        assert_unlabeled_data_ready(BROKEN, "nnUNetPlans_3d_fullres", "3d_fullres")
    message = str(error.value)
    assert "1 of 4 unlabeled case(s)" in message and "unl_003" in message and f"`{command}`" in message, message
    added = _run(env, "nnUNetv2_caml_preprocess_unlabeled", "-d", BROKEN_ID, "-np", 1)
    assert added.returncode == 0 and "1 to preprocess, 3 already finished" in added.stdout, added.stderr
    folder = assert_unlabeled_data_ready(BROKEN, "nnUNetPlans_3d_fullres", "3d_fullres")

    os.remove(join(broken, f"unl_001_0000{ENDING}"))
    with pytest.raises(UnlabeledDataError) as error:
        assert_unlabeled_data_ready(BROKEN, "nnUNetPlans_3d_fullres", "3d_fullres")
    message = str(error.value)
    assert "1 of 4 preprocessed case(s) have no image" in message and "unl_001" in message, message
    assert f"`{command} --overwrite`" in message
    before = _snapshot(env["nnUNet_preprocessed"])
    refused = _run(env, "nnUNetv2_caml_preprocess_unlabeled", "-d", BROKEN_ID, "-np", 1)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(lines) == 1 and "unl_001" in lines[0] and "--overwrite" in lines[0], \
        refused.stderr
    assert _snapshot(env["nnUNet_preprocessed"]) == before
    redo = _run(env, "nnUNetv2_caml_preprocess_unlabeled", "-d", BROKEN_ID, "-np", 1, "--overwrite")
    assert redo.returncode == 0 and "removed 1 preprocessed case(s)" in redo.stdout, redo.stdout + redo.stderr
    assert unlabeled_case_identifiers(folder) == ["unl_000", "unl_002", "unl_003"]
    assert not any(f.startswith("unl_001") for f in os.listdir(folder))
    assert assert_unlabeled_data_ready(BROKEN, "nnUNetPlans_3d_fullres", "3d_fullres") == folder

    shutil.rmtree(broken)
    assert assert_unlabeled_data_ready(BROKEN, "nnUNetPlans_3d_fullres", "3d_fullres") == folder


def test_ready_returns_folder(nnunet_paths, first_run):
    assert assert_unlabeled_data_ready(DATASET, "nnUNetPlans_3d_fullres", "3d_fullres") == _output_folder(nnunet_paths)


def test_ready_not_preprocessed_names_command(nnunet_paths, first_run):
    with pytest.raises(UnlabeledDataError) as error:
        assert_unlabeled_data_ready(DATASET, "nnUNetPlans_2d", "2d")
    message = str(error.value)
    assert "\n" not in message and "not preprocessed for configuration 2d" in message
    assert f"`nnUNetv2_caml_preprocess_unlabeled -d {DATASET_ID} -c 2d`" in message


def test_ready_without_unlabeled_images(nnunet_paths, monkeypatch):
    name = "Dataset989_NoUnlabeled"
    with pytest.raises(UnlabeledDataError) as error:
        assert_unlabeled_data_ready(name, "nnUNetPlans_3d_fullres", "3d_fullres")
    message = str(error.value)
    assert "\n" not in message and "CAML needs unlabeled images" in message
    assert join(nnunet_paths["nnUNet_raw"], name, UNLABELED_IMAGES_FOLDER) in message
    assert "`nnUNetv2_caml_preprocess_unlabeled -d 989 -c 3d_fullres`" in message

    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(UnlabeledDataError, match="nnUNet_raw is not set"):
        assert_unlabeled_data_ready(name, "nnUNetPlans_3d_fullres", "3d_fullres")
