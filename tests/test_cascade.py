"""CAML in nnU-Net's cascade, through the real command-line tools: the first stage trains, its segmentations of the
unlabeled cases are written by ``nnUNetv2_caml_predict_next_stage``, and the cascade stage trains on them."""
import json
import shutil

import blosc2
import numpy as np
import pytest
import torch

from conftest import add_small_configuration, run_cli
from nnunetv2_caml.cascade import PREDICTED_BY_FILE, assert_previous_stage_ready, predict_next_stage_unlabeled
from nnunetv2_caml.unlabeled import UnlabeledDataError
from test_training_integration import TRAINER, _load, _train_error

LOWRES, CASCADE = "3d_cpu_lowres", "3d_cpu_cascade"


@pytest.fixture
def cascade_dataset(caml_dataset):
    """The shared dataset with a first stage at half the resolution (its own data) and a cascade stage above
    ``3d_cpu``, as nnU-Net plans 3d_lowres and 3d_cascade_fullres; the plans are restored afterwards."""
    d = caml_dataset
    plans_file = d["preprocessed"] / "nnUNetPlans.json"
    original = plans_file.read_text()
    _add_cascade_configurations(d)
    yield d
    plans_file.write_text(original)


def _add_cascade_configurations(d) -> None:
    add_small_configuration(d["env"], d["dataset_id"], LOWRES, patch_size=(16, 24, 24))
    plans_file = d["preprocessed"] / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    full = plans["configurations"]["3d_fullres"]
    plans["configurations"][LOWRES].update(
        data_identifier=f"nnUNetPlans_{LOWRES}", spacing=[2 * s for s in full["spacing"]],
        median_image_size_in_voxels=[m / 2 for m in full["median_image_size_in_voxels"]], next_stage=CASCADE)
    plans["configurations"][CASCADE] = {"inherits_from": d["configuration"], "previous_stage": LOWRES}
    plans_file.write_text(json.dumps(plans, indent=2))


def test_cascade_trains_on_the_first_stages_segmentations_of_the_unlabeled_cases(cascade_dataset, monkeypatch, capsys):
    d = cascade_dataset
    env, dataset_id = d["env"], d["dataset_id"]
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(k, env[k])  # for the calls in this process (nnunetv2.paths reads them when asked)
    run_cli(["nnUNetv2_preprocess", "-d", dataset_id, "-c", LOWRES, "-np", "1"], env)
    result = run_cli(["nnUNetv2_caml_preprocess_unlabeled", "-d", dataset_id, "-c", LOWRES, CASCADE, "-np", "1"], env)
    assert f"{CASCADE}: 4 unlabeled case(s)" in result.stdout and "0 to preprocess" in result.stdout  # 3d_fullres's
    run_cli(["nnUNetv2_train", dataset_id, LOWRES, "all", "-tr", TRAINER, "-device", "cpu"], env)
    lowres = d["root"] / "nnUNet_results" / d["dataset_name"] / f"{TRAINER}__nnUNetPlans__{LOWRES}"

    # the cascade stage refuses to start without the first stage's segmentations of the unlabeled cases
    message = _train_error(d, CASCADE)
    assert f"nnUNetv2_caml_predict_next_stage -d {dataset_id} -c {LOWRES} -tr {TRAINER}`" in message
    assert "4 of 4 unlabeled case(s)" in message

    predict = ["nnUNetv2_caml_predict_next_stage", "-d", dataset_id, "-c", LOWRES, "-tr", TRAINER, "-f", "all",
               "-device", "cpu", "--disable_tta"]
    assert "4 to predict" in run_cli(predict, env).stdout
    written = lowres / "predicted_next_stage_unlabeled" / CASCADE
    labeled = next((lowres / "predicted_next_stage" / CASCADE).glob("*.b2nd"))  # nnU-Net's, of a labeled case
    reference = blosc2.open(str(labeled), mode="r")[:]
    unlabeled_data = d["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled"
    for case in ("unl_000", "unl_001", "unl_002", "unl_003"):
        segmentation = blosc2.open(str(written / f"{case}.b2nd"), mode="r")[:]
        # as nnU-Net writes the labeled cases': a label map at the case's shape in the cascade stage
        assert segmentation.dtype == reference.dtype and segmentation.ndim == reference.ndim == 3
        assert segmentation.shape == blosc2.open(str(unlabeled_data / f"{case}.b2nd"), mode="r").shape[1:]
        assert set(np.unique(segmentation)) <= {0, 1}
    # a rerun (here in this process) keeps them
    predict_next_stage_unlabeled(dataset_id, LOWRES, TRAINER, folds=["all"], device=torch.device("cpu"),
                                 use_mirroring=False)
    assert "0 to predict, 4 already finished" in capsys.readouterr().out

    run_cli(["nnUNetv2_train", dataset_id, CASCADE, "all", "-tr", TRAINER, "-device", "cpu"], env)
    output = d["root"] / "nnUNet_results" / d["dataset_name"] / f"{TRAINER}__nnUNetPlans__{CASCADE}" / "fold_all"
    checkpoint = _load(output / "checkpoint_final.pth")
    # both networks take the image and the first stage's one-hot foreground; every CAML term was computed
    for weights in (checkpoint["network_weights"], checkpoint["caml_auxiliary_network_weights"]):
        assert next(w for w in weights.values() if w.ndim == 5).shape[1] == 2
    for key in ("caml_loss_consistency", "caml_loss_occ"):
        assert all(np.isfinite(checkpoint["logging"][key])) and checkpoint["logging"][key][-1] > 0, key
    log = sorted(output.glob("training_log_*.txt"))[-1].read_text()  # the last run's (the refused one wrote one too)
    assert "and 4 unlabeled case(s)" in log and f"previous stage's segmentations from {written}" in log

    # a segmentation that no longer fits its preprocessed image (preprocessed again since) is refused, naming the fix
    moved = d["root"] / "previous_stage_of_other_shape"
    shutil.copytree(written, moved)
    blosc2.asarray(np.zeros((4, 4, 4), np.uint8), urlpath=str(moved / "unl_002.b2nd"), mode="w")
    with pytest.raises(UnlabeledDataError, match="unl_002 .* has shape \\[4, 4, 4\\].*--overwrite"):
        assert_previous_stage_ready(str(moved), str(unlabeled_data), "nnUNetv2_caml_predict_next_stage ...")
    assert_previous_stage_ready(str(written), str(unlabeled_data), "")

    # segmentations of another model are not mixed in: a retrained first stage needs --overwrite
    final = lowres / "fold_all" / "checkpoint_final.pth"
    retrained = _load(final)
    retrained["current_epoch"] += 1
    torch.save(retrained, final)
    record = json.loads((written / PREDICTED_BY_FILE).read_text())
    before = {f.name: f.stat().st_mtime_ns for f in written.iterdir()}
    refused = run_cli(predict, env, check=False)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].startswith("ERROR: ")
    assert "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    assert {f.name: f.stat().st_mtime_ns for f in written.iterdir()} == before
    predict_next_stage_unlabeled(dataset_id, LOWRES, TRAINER, folds=["all"], device=torch.device("cpu"),
                                 use_mirroring=False, overwrite=True)
    assert "4 to predict" in capsys.readouterr().out
    assert json.loads((written / PREDICTED_BY_FILE).read_text())["sha256"]["fold_all"] != record["sha256"]["fold_all"]
