"""Tests for the synthetic semi-supervised dataset generator (nnunetv2_caml.demo.synthetic).

nnU-Net's ``--verify_dataset_integrity``, planner and preprocessing take both of its tasks: the atrium task in the
dataset of ``conftest.py``, the vessel task in ``tests/test_ssl_gain_benchmark.py``."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from nnunetv2_caml.demo.synthetic import dataset_name, generate_dataset, make_case

SMALL = dict(num_labeled=3, num_unlabeled=2, num_test=2, shape=(32, 40, 40), spacing=(1.5, 1.0, 1.0))


def _read(path):
    itk = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(itk), itk.GetSpacing()


def _files(folder, sub):
    d = os.path.join(folder, sub)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def _best_threshold_dice(image, label):
    label = label.astype(bool)
    n_label = label.sum()
    best = 0.0
    for t in np.quantile(image, np.linspace(0.5, 0.999, 250)):
        pred = image >= t
        best = max(best, 2 * np.count_nonzero(pred & label) / (pred.sum() + n_label))
    return best


@pytest.fixture(scope="module", params=["atrium", "vessel"])
def dataset(request, tmp_path_factory):
    raw = tmp_path_factory.mktemp(f"raw_{request.param}")
    folder = generate_dataset(str(raw), 612, task=request.param, seed=3, **SMALL)
    return request.param, folder


def test_layout_and_counts(dataset):
    task, folder = dataset
    assert os.path.basename(folder) == dataset_name(612, task)
    assert os.path.basename(folder) == {"atrium": "Dataset612_CAMLSyntheticAtrium",
                                        "vessel": "Dataset612_CAMLSyntheticVessel"}[task]
    assert sorted(os.listdir(folder)) == ["dataset.json", "imagesTr", "imagesTrUnlabeled", "imagesTs",
                                          "labelsTr", "labelsTs"]
    assert _files(folder, "imagesTr") == ["lab_000_0000.nii.gz", "lab_001_0000.nii.gz", "lab_002_0000.nii.gz"]
    assert _files(folder, "labelsTr") == ["lab_000.nii.gz", "lab_001.nii.gz", "lab_002.nii.gz"]
    assert _files(folder, "imagesTrUnlabeled") == ["unl_000_0000.nii.gz", "unl_001_0000.nii.gz"]
    assert _files(folder, "imagesTs") == ["ts_000_0000.nii.gz", "ts_001_0000.nii.gz"]
    assert _files(folder, "labelsTs") == ["ts_000.nii.gz", "ts_001.nii.gz"]


def test_dataset_json(dataset):
    task, folder = dataset
    with open(os.path.join(folder, "dataset.json")) as f:
        dj = json.load(f)
    assert dj["channel_names"] == {"0": "MRI" if task == "atrium" else "CT"}
    assert dj["labels"]["background"] == 0
    assert sorted(dj["labels"].values()) == [0, 1]
    assert dj["numTraining"] == SMALL["num_labeled"]
    assert dj["file_ending"] == ".nii.gz"


def test_images_labels_geometry_and_values(dataset):
    _, folder = dataset
    for sub, case in [("imagesTr", "lab_000"), ("imagesTrUnlabeled", "unl_001"), ("imagesTs", "ts_001")]:
        image, spacing = _read(os.path.join(folder, sub, f"{case}_0000.nii.gz"))
        assert image.dtype == np.float32
        assert image.shape == SMALL["shape"]  # numpy (z, y, x)
        assert spacing == tuple(SMALL["spacing"][::-1])  # SimpleITK (x, y, z)
        assert np.isfinite(image).all() and image.std() > 0
    for sub in ["labelsTr", "labelsTs"]:
        for name in _files(folder, sub):
            label, spacing = _read(os.path.join(folder, sub, name))
            assert label.dtype == np.uint8
            assert label.shape == SMALL["shape"] and spacing == tuple(SMALL["spacing"][::-1])
            assert set(np.unique(label).tolist()) == {0, 1}


def test_unlabeled_cases_have_no_label_anywhere(dataset):
    _, folder = dataset
    unlabeled_ids = {n[: -len("_0000.nii.gz")] for n in _files(folder, "imagesTrUnlabeled")}
    labeled_ids = {n[: -len(".nii.gz")] for n in _files(folder, "labelsTr") + _files(folder, "labelsTs")}
    assert unlabeled_ids and not unlabeled_ids & labeled_ids
    for root, _, names in os.walk(folder):
        for name in names:
            if any(name.startswith(u) for u in unlabeled_ids):
                assert os.path.basename(root) == "imagesTrUnlabeled" and name.endswith("_0000.nii.gz")
    # case ids are distinct across the three groups
    image_ids = [n[: -len("_0000.nii.gz")] for s in ("imagesTr", "imagesTrUnlabeled", "imagesTs")
                 for n in _files(folder, s)]
    assert len(image_ids) == len(set(image_ids)) == 7


def test_stored_case_equals_make_case(dataset):
    task, folder = dataset
    image, _ = _read(os.path.join(folder, "imagesTrUnlabeled", "unl_001_0000.nii.gz"))
    label, _ = _read(os.path.join(folder, "labelsTs", "ts_000.nii.gz"))
    ref_image, _ = make_case(task, "unlabeled", 1, 3, SMALL["shape"], SMALL["spacing"])
    _, ref_label = make_case(task, "test", 0, 3, SMALL["shape"], SMALL["spacing"])
    np.testing.assert_array_equal(image, ref_image)
    np.testing.assert_array_equal(label, ref_label)


@pytest.mark.parametrize("task", ["atrium", "vessel"])
def test_deterministic_per_case(task, tmp_path):
    a = make_case(task, "labeled", 2, seed=7, shape=(24, 32, 32))
    b = make_case(task, "labeled", 2, seed=7, shape=(24, 32, 32))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    other_seed = make_case(task, "labeled", 2, seed=8, shape=(24, 32, 32))
    assert not np.array_equal(a[0], other_seed[0]) and not np.array_equal(a[1], other_seed[1])
    other_group = make_case(task, "test", 2, seed=7, shape=(24, 32, 32))
    assert not np.array_equal(a[1], other_group[1])

    # case i does not depend on how many cases the other groups hold
    d1 = generate_dataset(str(tmp_path / "r1"), 5, task, 1, 0, 2, shape=(24, 32, 32), seed=7)
    d2 = generate_dataset(str(tmp_path / "r2"), 5, task, 3, 2, 1, shape=(24, 32, 32), seed=7)
    for sub, name in [("imagesTr", "lab_000_0000.nii.gz"), ("labelsTs", "ts_000.nii.gz")]:
        np.testing.assert_array_equal(_read(os.path.join(d1, sub, name))[0], _read(os.path.join(d2, sub, name))[0])


@pytest.mark.parametrize("task", ["atrium", "vessel"])
def test_foreground_fraction_and_not_thresholdable(task):
    dices = []
    for i in range(3):
        image, label = make_case(task, "test", i, seed=0, shape=(32, 40, 40))
        lab = label.astype(bool)
        assert 0.01 <= lab.mean() <= 0.25, f"{task} case {i}: foreground {lab.mean():.3f}"
        # look-alikes: many voxels as bright as the structure lie outside the label
        smooth = gaussian_filter(image, 1.0)
        bright = smooth >= np.percentile(smooth[lab], 50)
        outside = np.count_nonzero(bright & ~lab) / np.count_nonzero(bright)
        assert outside >= 0.3, f"{task} case {i}: only {outside:.2f} of the bright voxels are distractors"
        dices.append(_best_threshold_dice(image, label))
    assert max(dices) < 0.8, f"{task}: a global threshold reaches Dice {max(dices):.2f}"


def test_existing_folder_and_overwrite(tmp_path):
    raw = str(tmp_path)
    kw = dict(num_labeled=1, num_unlabeled=1, num_test=0, shape=(16, 24, 24))
    folder = generate_dataset(raw, 42, "atrium", **kw)
    sentinel = os.path.join(folder, "keep.txt")
    open(sentinel, "w").close()

    with pytest.raises(FileExistsError, match="overwrite") as err:
        generate_dataset(raw, 42, "atrium", **kw)
    assert "Dataset042_CAMLSyntheticAtrium" in str(err.value) and "\n" not in str(err.value)
    # another task with the same id counts as the same dataset id
    with pytest.raises(FileExistsError, match="Dataset042_CAMLSyntheticAtrium"):
        generate_dataset(raw, 42, "vessel", **kw)
    assert os.path.isfile(sentinel)

    assert generate_dataset(raw, 42, "atrium", overwrite=True, **kw) == folder
    assert not os.path.exists(sentinel)
    vessel = generate_dataset(raw, 42, "vessel", overwrite=True, **kw)
    assert sorted(os.listdir(raw)) == ["Dataset042_CAMLSyntheticVessel"] and os.path.isdir(vessel)

    # a dataset this module did not make is never deleted, not even with overwrite
    foreign = tmp_path / "Dataset043_Heart"
    foreign.mkdir()
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="Dataset043_Heart"):
            generate_dataset(raw, 43, "vessel", overwrite=overwrite, **kw)
    assert foreign.is_dir() and not any(n.startswith("Dataset043_CAML") for n in os.listdir(raw))
    assert not any(n.startswith(".") for n in os.listdir(raw))  # no temporary folder left behind


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="task"):
        generate_dataset(str(tmp_path), 1, task="liver")
    with pytest.raises(ValueError):
        generate_dataset(str(tmp_path), 1, num_labeled=0)
    with pytest.raises(ValueError, match="unknown vessel protocol.*PET.*choose from arterial-CT, venous-CT"):
        generate_dataset(str(tmp_path), 1, task="vessel", protocols=["arterial-CT", "PET"])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("task, protocol", [("atrium", "bright-blood"), ("vessel", "arterial-CT")])
def test_protocol_subset(task, protocol, tmp_path):
    """``protocols`` restricts every group to the named protocols; without it, all protocols occur (and the cases are
    those of the default generator)."""
    folder = generate_dataset(str(tmp_path), 7, task, 4, 4, 4, shape=(24, 32, 32), seed=1, protocols=[protocol])
    drawn = json.loads(open(os.path.join(folder, "dataset.json")).read())["synthetic"]["protocols"]
    assert len(drawn) == 12 and set(drawn.values()) == {protocol}
    image, _ = _read(os.path.join(folder, "imagesTs", "ts_001_0000.nii.gz"))
    np.testing.assert_array_equal(image, make_case(task, "test", 1, 1, (24, 32, 32), protocols=[protocol])[0])
    everything = generate_dataset(str(tmp_path / "all"), 7, task, 4, 4, 4, shape=(24, 32, 32), seed=1)
    assert len(set(json.loads(open(os.path.join(everything, "dataset.json")).read())["synthetic"]["protocols"]
                   .values())) > 1
