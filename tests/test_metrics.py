"""Metrics of ``nnunetv2_caml.metrics``: hand-computed values, agreement with medpy (the independent reference the
LA papers use), clDice, empty masks, multi-class layout and the ``nnUNetv2_caml_evaluate`` command."""
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from nnunetv2_caml.metrics import (MetricsError, case_metrics, centerline_dice, evaluate_folders,
                                   format_table)

medpy_binary = pytest.importorskip("medpy.metric.binary")
EVALUATE = Path(sys.executable).parent / "nnUNetv2_caml_evaluate"


def cube(shape, start, size):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def blobs(rng, shape, threshold=0.15):
    """Random smooth blobs (several components, some touching the image border)."""
    return gaussian_filter(rng.standard_normal(shape), 2.0) > threshold


def write_label(path: Path, array: np.ndarray, spacing_xyz=(1.0, 1.0, 1.0)) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing_xyz)
    sitk.WriteImage(image, str(path))


# ----------------------------------------------------------------------------- hand-computed values
def test_shifted_cubes_dice_and_jaccard():
    reference = cube((20, 20, 20), (5, 5, 5), 5)           # 125 voxels
    prediction = cube((20, 20, 20), (7, 5, 5), 5)          # shifted by 2 along z: overlap 3 x 5 x 5 = 75
    m = case_metrics(reference, prediction, voxel_units=True)
    assert m["dice"] == pytest.approx(2 * 75 / 250)         # 0.6
    assert m["jaccard"] == pytest.approx(75 / 175)          # 3 / 7
    assert "note" not in m


def test_single_voxels_distance_in_voxels_and_mm():
    reference, prediction = np.zeros((10, 10, 10), bool), np.zeros((10, 10, 10), bool)
    reference[2, 2, 5] = True
    prediction[5, 6, 5] = True                              # offset (3, 4, 0) voxels
    m = case_metrics(reference, prediction, voxel_units=True)
    assert m["dice"] == 0 and m["jaccard"] == 0
    assert m["hd95"] == pytest.approx(5.0) and m["asd"] == pytest.approx(5.0) and m["assd"] == pytest.approx(5.0)
    m = case_metrics(reference, prediction, spacing=(2.0, 0.5, 1.0))      # (z, y, x) mm
    assert m["hd95"] == pytest.approx(math.sqrt(6.0 ** 2 + 2.0 ** 2))
    assert m["asd"] == pytest.approx(math.sqrt(40.0))


def concentric_cube_distances(spacing):
    """Analytic surface distances of a 5-cube (prediction) centred in a 9-cube (reference), 2 voxels in on each side.

    Prediction surface voxel p in [0, 4]^3 -> nearest face of the reference box [-2, 6]^3 (perpendicular foot).
    Reference surface voxel q -> the prediction box's nearest point is q clamped to [0, 4]^3 (on its surface).
    """
    s = np.asarray(spacing, float)
    pred_to_ref, ref_to_pred = [], []
    for p in itertools.product(range(0, 5), repeat=3):
        if any(c in (0, 4) for c in p):
            pred_to_ref.append(min(min(c + 2, 6 - c) * si for c, si in zip(p, s)))
    for q in itertools.product(range(-2, 7), repeat=3):
        if any(c in (-2, 6) for c in q):
            excess = np.array([max(0, -c, c - 4) for c in q], float)
            ref_to_pred.append(float(np.sqrt(np.sum((excess * s) ** 2))))
    return np.array(pred_to_ref), np.array(ref_to_pred)


@pytest.mark.parametrize("spacing", [None, (2.0, 0.5, 1.25)])
def test_concentric_cubes_hand_computed(spacing):
    reference = cube((15, 15, 15), (3, 3, 3), 9)
    prediction = cube((15, 15, 15), (5, 5, 5), 5)
    m = case_metrics(reference, prediction, spacing, voxel_units=spacing is None)
    pred_to_ref, ref_to_pred = concentric_cube_distances((1.0, 1.0, 1.0) if spacing is None else spacing)
    assert len(pred_to_ref) == 125 - 27 and len(ref_to_pred) == 729 - 343
    if spacing is None:
        assert np.all(pred_to_ref == 2.0)                   # every surface voxel of the small cube is 2 voxels in
    assert m["dice"] == pytest.approx(2 * 125 / (125 + 729))
    assert m["jaccard"] == pytest.approx(125 / 729)
    assert m["asd"] == pytest.approx(pred_to_ref.mean())
    assert m["assd"] == pytest.approx(np.concatenate([pred_to_ref, ref_to_pred]).mean())
    assert m["hd95"] == pytest.approx(np.percentile(np.concatenate([pred_to_ref, ref_to_pred]), 95))


# ----------------------------------------------------------------------------- agreement with medpy
@pytest.mark.parametrize("shape, spacing", [((36, 44, 40), None), ((36, 44, 40), (2.5, 0.7, 0.9)),
                                            ((70, 90), None), ((70, 90), (0.4, 1.3))])
def test_matches_medpy_on_random_blobs(shape, spacing):
    rng = np.random.default_rng(sum(shape))
    for _ in range(4):
        reference, prediction = blobs(rng, shape), blobs(rng, shape)
        m = case_metrics(reference, prediction, spacing, voxel_units=spacing is None)
        expected = {"dice": medpy_binary.dc(prediction, reference), "jaccard": medpy_binary.jc(prediction, reference),
                    "hd95": medpy_binary.hd95(prediction, reference, voxelspacing=spacing),
                    "asd": medpy_binary.asd(prediction, reference, voxelspacing=spacing),
                    "assd": medpy_binary.assd(prediction, reference, voxelspacing=spacing)}
        for key, value in expected.items():
            assert m[key] == pytest.approx(value, rel=1e-6), key


def test_matches_medpy_for_small_far_apart_objects():
    """Distances are computed on a cropped box; objects far apart and at the image border must not change them."""
    reference, prediction = np.zeros((30, 60, 50), bool), np.zeros((30, 60, 50), bool)
    reference[0:4, 0:6, 10:13] = True                       # touches the image border
    prediction[20:27, 40:60, 30:49] = True                  # touches the opposite border
    prediction[2, 3, 11] = True                             # a stray voxel inside the reference
    for spacing in (None, (3.0, 0.8, 0.8)):
        m = case_metrics(reference, prediction, spacing, voxel_units=spacing is None)
        assert m["hd95"] == pytest.approx(medpy_binary.hd95(prediction, reference, spacing), rel=1e-6)
        assert m["asd"] == pytest.approx(medpy_binary.asd(prediction, reference, spacing), rel=1e-6)


# ----------------------------------------------------------------------------- clDice
def tube(length_axis_slice=slice(5, 55), radius=4):
    volume = np.zeros((30, 30, 60), bool)
    yy, xx = np.mgrid[:30, :30]
    volume[..., length_axis_slice] = (((yy - 15) ** 2 + (xx - 15) ** 2) <= radius ** 2)[..., None]
    return volume


def test_cldice_on_a_tube():
    reference = tube()
    assert centerline_dice(reference, reference) == pytest.approx(1.0)
    broken = reference.copy()
    broken[..., 28:34] = False                              # a gap in the middle of the vessel
    value = centerline_dice(reference, broken)
    assert 0.5 < value < 0.99
    # thinner but complete tube: its centre line lies in the reference and vice versa -> still 1
    assert centerline_dice(reference, tube(radius=2)) == pytest.approx(1.0)
    m = case_metrics(reference, broken, voxel_units=True, cldice=True)
    assert m["cldice"] == pytest.approx(value)
    assert "cldice" not in case_metrics(reference, broken, voxel_units=True)


@pytest.mark.parametrize("shape", [(30, 36, 32), (60, 70)])
def test_cldice_matches_its_definition_on_blobs(shape):
    """The cropped computation equals the formula applied to skeletons of the whole images."""
    from skimage.morphology import skeletonize

    rng = np.random.default_rng(3)
    for _ in range(2):
        reference, prediction = blobs(rng, shape, 0.1), blobs(rng, shape, 0.1)
        assert reference.any() and prediction.any()
        skeleton_pred, skeleton_ref = skeletonize(prediction), skeletonize(reference)
        precision = np.count_nonzero(skeleton_pred & reference) / np.count_nonzero(skeleton_pred)
        sensitivity = np.count_nonzero(skeleton_ref & prediction) / np.count_nonzero(skeleton_ref)
        assert centerline_dice(reference, prediction) == pytest.approx(
            2 * precision * sensitivity / (precision + sensitivity), rel=1e-9)


def test_cldice_2d_line():
    reference = np.zeros((40, 40), bool)
    reference[18:23, 5:35] = True
    prediction = reference.copy()
    prediction[:, 15:25] = False
    assert centerline_dice(reference, reference) == pytest.approx(1.0)
    assert centerline_dice(reference, prediction) < 1.0


# ----------------------------------------------------------------------------- empty masks, errors
def test_empty_masks():
    empty, full = np.zeros((8, 8, 8), bool), cube((8, 8, 8), (2, 2, 2), 3)
    both = case_metrics(empty, empty, voxel_units=True, cldice=True)
    assert both == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "assd": 0.0, "cldice": 1.0,
                    "note": "reference and prediction empty"}
    no_prediction = case_metrics(full, empty, (1.0, 1.0, 1.0), cldice=True)
    assert no_prediction["dice"] == 0 and no_prediction["jaccard"] == 0 and no_prediction["cldice"] == 0
    assert all(math.isnan(no_prediction[k]) for k in ("hd95", "asd", "assd"))
    assert no_prediction["note"] == "prediction empty"
    assert case_metrics(empty, full, voxel_units=True)["note"] == "reference empty"


def test_case_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        case_metrics(np.ones((4, 4, 4)), np.ones((4, 4, 5)), voxel_units=True)
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(np.ones((4, 4, 4)), np.ones((4, 4, 4)))


# ----------------------------------------------------------------------------- folders
@pytest.fixture
def binary_folders(tmp_path):
    """Three cases with anisotropic spacing; case c is an empty prediction."""
    rng = np.random.default_rng(7)
    ref, pred = tmp_path / "labelsTs", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    spacing_xyz = (0.8, 0.6, 2.0)
    arrays = {}
    for case in ("a", "b", "c"):
        reference, prediction = blobs(rng, (20, 32, 28)), blobs(rng, (20, 32, 28))
        if case == "c":
            prediction[:] = False
        write_label(ref / f"{case}.nii.gz", reference, spacing_xyz)
        write_label(pred / f"{case}.nii.gz", prediction, spacing_xyz)
        arrays[case] = (reference, prediction)
    (pred / "dataset.json").write_text("{}")                # nnU-Net writes these beside predictions
    write_label(pred / "extra.nii.gz", arrays["a"][1], spacing_xyz)
    return ref, pred, arrays, spacing_xyz[::-1]


def test_evaluate_folders_binary(binary_folders):
    ref, pred, arrays, spacing_zyx = binary_folders
    summary = evaluate_folders(str(ref), str(pred))
    assert summary["labels"] == [1] and summary["units"] == "mm"
    assert set(summary["cases"]) == {"a", "b", "c"}
    assert summary["unmatched_predictions"] == ["extra"]
    for case in ("a", "b"):
        reference, prediction = arrays[case]
        assert summary["cases"][case]["hd95"] == pytest.approx(
            medpy_binary.hd95(prediction, reference, voxelspacing=spacing_zyx), rel=1e-6)
        assert summary["cases"][case]["asd"] == pytest.approx(
            medpy_binary.asd(prediction, reference, voxelspacing=spacing_zyx), rel=1e-6)
    assert summary["cases"]["c"]["note"] == "prediction empty" and math.isnan(summary["cases"]["c"]["hd95"])
    mean = summary["mean"]
    assert mean["dice"] == pytest.approx(np.mean([summary["cases"][c]["dice"] for c in "abc"]))
    assert mean["hd95"] == pytest.approx(np.mean([summary["cases"][c]["hd95"] for c in "ab"]))
    assert mean["n_cases"] == 3 and mean["n_excluded"] == {"dice": 0, "jaccard": 0, "hd95": 1, "asd": 1, "assd": 1}
    voxels = evaluate_folders(str(ref), str(pred), voxel_units=True, num_processes=2)
    reference, prediction = arrays["a"]
    assert voxels["units"] == "voxel"
    assert voxels["cases"]["a"]["hd95"] == pytest.approx(medpy_binary.hd95(prediction, reference), rel=1e-6)
    assert voxels["cases"]["a"]["dice"] == summary["cases"]["a"]["dice"]


def test_evaluate_folders_multiclass(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    reference = np.zeros((12, 16, 16), np.uint8)
    reference[2:6, 2:8, 2:8] = 1
    reference[7:11, 8:14, 8:14] = 2
    prediction = reference.copy()
    prediction[2:6, 2:8, 2:4] = 0                           # class 1 partly missed, class 2 perfect
    write_label(ref / "x.nii.gz", reference)
    write_label(pred / "x.nii.gz", prediction)
    only_one = reference.copy()
    only_one[only_one == 2] = 0                             # case y has no class 2 in either mask
    write_label(ref / "y.nii.gz", only_one)
    write_label(pred / "y.nii.gz", only_one)
    summary = evaluate_folders(str(ref), str(pred), voxel_units=True)
    assert summary["labels"] == [1, 2]
    x = summary["cases"]["x"]
    assert set(x) == {"1", "2", "foreground_mean"}
    assert x["1"]["dice"] == pytest.approx(2 * 96 / (144 + 96))
    assert x["2"]["dice"] == 1.0 and x["2"]["hd95"] == 0.0
    assert x["foreground_mean"]["dice"] == pytest.approx((x["1"]["dice"] + 1.0) / 2)
    assert summary["cases"]["y"]["2"]["note"] == "reference and prediction empty"
    assert "note" not in summary["cases"]["y"]["foreground_mean"]
    assert summary["mean"]["1"]["dice"] == pytest.approx((x["1"]["dice"] + 1.0) / 2)
    assert summary["mean"]["foreground_mean"]["dice"] == pytest.approx(
        (summary["mean"]["1"]["dice"] + summary["mean"]["2"]["dice"]) / 2)
    flat = evaluate_folders(str(ref), str(pred), voxel_units=True, labels=[2])
    assert flat["labels"] == [2] and flat["cases"]["x"]["dice"] == 1.0
    assert "foreground_mean" in format_table(summary)


def test_evaluate_folders_errors(binary_folders, tmp_path):
    ref, pred, _, _ = binary_folders
    (pred / "b.nii.gz").unlink()
    with pytest.raises(MetricsError, match="no prediction for case b"):
        evaluate_folders(str(ref), str(pred))
    write_label(pred / "b.nii.gz", np.zeros((20, 32, 29)), (0.8, 0.6, 2.0))
    with pytest.raises(MetricsError, match="case b: prediction shape"):
        evaluate_folders(str(ref), str(pred))
    with pytest.raises(MetricsError, match="does not exist"):
        evaluate_folders(str(tmp_path / "nowhere"), str(pred))
    write_label(pred / "b.nii.gz", np.zeros((20, 32, 28)), (0.8, 0.6, 2.5))   # right shape, other spacing
    summary = evaluate_folders(str(ref), str(pred))
    assert len(summary["warnings"]) == 1 and summary["warnings"][0].startswith("case b: prediction spacing")


# ----------------------------------------------------------------------------- command line
def run_evaluate(*args):
    return subprocess.run([str(EVALUATE), *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not EVALUATE.exists(), reason="nnUNetv2_caml_evaluate not installed (pip install -e .)")
def test_cli_end_to_end(binary_folders, tmp_path):
    ref, pred, _, _ = binary_folders
    result = run_evaluate("-ref", ref, "-pred", pred, "--voxel-units", "--cldice")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["case", "dice", "jaccard"] and "hd95 (vox)" in lines[0]
    assert [line.split()[0] for line in lines[1:4]] == ["a", "b", "c"]
    assert "prediction empty" in result.stdout and "1 of 3 cases excluded from hd95, asd, assd" in result.stdout
    summary = json.loads((pred / "summary_caml.json").read_text())
    assert {"mean", "cases", "labels", "units", "metrics", "warnings"} <= set(summary)
    assert set(summary["cases"]["a"]) == {"dice", "jaccard", "hd95", "asd", "assd", "cldice"}
    assert summary["cases"]["c"]["hd95"] is None                       # NaN -> null
    assert summary["mean"]["dice"] == pytest.approx(np.mean([summary["cases"][c]["dice"] for c in "abc"]))
    assert any(line.startswith("mean") and f"{summary['mean']['dice']:.4f}" in line for line in lines)

    again = run_evaluate("-ref", ref, "-pred", pred)
    assert again.returncode == 1 and again.stderr.startswith("ERROR:") and "--overwrite" in again.stderr
    assert run_evaluate("-ref", ref, "-pred", pred, "--overwrite").returncode == 0
    assert json.loads((pred / "summary_caml.json").read_text())["units"] == "mm"
    output = tmp_path / "out" / "summary.json"
    assert run_evaluate("-ref", ref, "-pred", pred, "-o", output, "-l", "1").returncode == 0
    assert json.loads(output.read_text())["labels"] == [1]


@pytest.mark.skipif(not EVALUATE.exists(), reason="nnUNetv2_caml_evaluate not installed (pip install -e .)")
def test_cli_errors_are_one_line(binary_folders):
    ref, pred, _, _ = binary_folders
    (pred / "b.nii.gz").unlink()
    result = run_evaluate("-ref", ref, "-pred", pred)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("ERROR: no prediction for case b")
    assert len(result.stderr.strip().splitlines()) == 1
    write_label(pred / "b.nii.gz", np.zeros((21, 32, 28)), (0.8, 0.6, 2.0))
    result = run_evaluate("-ref", ref, "-pred", pred)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("ERROR: case b: prediction shape")
    assert not (pred / "summary_caml.json").exists()
