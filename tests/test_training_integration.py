"""nnUNetTrainerCAML through nnU-Net's real command-line tools: train, predict, resume, and fail loudly."""
import json
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import EXT_TRAINERS_WITH_TESTS, add_small_configuration, run_cli

TRAINER = "nnUNetTrainerCAML_tiny"


@pytest.fixture(scope="module")
def trained(caml_dataset):
    """One tiny CAML training run (2 epochs of 2 steps) of fold 'all' on the CPU configuration."""
    d = caml_dataset
    result = run_cli(["nnUNetv2_train", d["dataset_id"], d["configuration"], "all", "-tr", TRAINER,
                      "-device", "cpu"], d["env"])
    output = (d["root"] / "nnUNet_results" / d["dataset_name"] /
              f"{TRAINER}__nnUNetPlans__{d['configuration']}" / "fold_all")
    return {**d, "output": output, "stdout": result.stdout}


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_caml_checkpoint(output, trainer, configuration, raw) -> dict:
    """The final checkpoint of a 2-epoch CAML run in ``output``: both networks, heads, bank and every term logged."""
    checkpoint = _load(output / "checkpoint_final.pth")
    assert checkpoint["trainer_name"] == trainer
    for key in ("caml_auxiliary_network_weights", "caml_occ_heads", "caml_memory_bank"):
        assert key in checkpoint
    # network_weights is the main network only: it loads strictly into the stock architecture of the plans
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = PlansManager(str(output.parent / "plans.json"))
    network = nnUNetTrainer.build_network_architecture(plans, plans.get_configuration(configuration), 1, 2,
                                                       enable_deep_supervision=False)
    network.load_state_dict(checkpoint["network_weights"], strict=True)
    assert not any("cma" in k for k in checkpoint["network_weights"])
    assert any(".cma." in k for k in checkpoint["caml_auxiliary_network_weights"])
    # the memory bank holds labeled cases only
    bank = checkpoint["caml_memory_bank"]
    labeled = {p.name[:-len(".nii.gz")] for p in (raw / "labelsTr").iterdir()}
    assert bank["entries"] and set(bank["entries"]) <= labeled
    # every CAML term, both ramp-up weights and the bank fill are logged once per epoch
    log = checkpoint["logging"]
    for key in ("caml_loss_sup_main", "caml_loss_sup_aux", "caml_loss_consistency", "caml_loss_occ",
                "caml_lambda_c", "caml_lambda_o", "caml_memory_bank_fill"):
        assert len(log[key]) == 2, key
        assert all(np.isfinite(v) for v in log[key]), key
    assert log["caml_lambda_c"][1] > log["caml_lambda_c"][0] > 0  # ramping up
    assert log["caml_memory_bank_fill"][-1] > 0
    assert log["caml_loss_occ"][-1] > 0  # OCC was active (bank filled, unlabeled voxels agreed)
    assert (output / "progress.png").stat().st_size > 0
    return checkpoint


def test_training_writes_caml_checkpoint_and_progress(trained):
    _assert_caml_checkpoint(trained["output"], TRAINER, trained["configuration"], trained["raw"])
    # nnU-Net's final validation ran on the main network
    summary = json.loads((trained["output"] / "validation" / "summary.json").read_text())
    assert "foreground_mean" in summary
    assert "pretrained weights" not in trained["stdout"]  # a run from scratch starts both networks at random


def test_resenc_preset_in_2d_trains_on_the_default_plans_unlabeled_data(caml_dataset):
    """nnU-Net's ResEnc preset, planned after the unlabeled data was preprocessed, in 2D: a small configuration of its
    2d plans (ResidualEncoderUNet, whose stem the local-contrast view wraps; CMA over 10x10 positions) trains on
    slices of the unlabeled cases preprocessed for the default plans' 2d, which it shares as nnU-Net shares the
    labeled ones."""
    d, trainer, plans = caml_dataset, "nnUNetTrainerCAML_tinyNoValidation", "nnUNetResEncUNetMPlans"
    run_cli(["nnUNetv2_plan_experiment", "-d", d["dataset_id"], "-pl", "nnUNetPlannerResEncM"],
            {**d["env"], "nnUNet_n_proc_DA": "1"})  # nnU-Net's planner: torch.set_num_threads(nnUNet_n_proc_DA)
    add_small_configuration(d["env"], d["dataset_id"], "2d_cpu", parent="2d", patch_size=(40, 40), batch_size=4,
                            plans_identifier=plans)
    result = run_cli(["nnUNetv2_train", d["dataset_id"], "2d_cpu", "all", "-tr", trainer, "-p", plans,
                      "-device", "cpu"], {**d["env"], "nnUNet_extTrainer": EXT_TRAINERS_WITH_TESTS})
    assert f"4 unlabeled case(s) from {d['preprocessed'] / 'nnUNetPlans_2d_unlabeled'}" in result.stdout
    output = d["root"] / "nnUNet_results" / d["dataset_name"] / f"{trainer}__{plans}__2d_cpu" / "fold_all"
    auxiliary = _assert_caml_checkpoint(output, trainer, "2d_cpu", d["raw"])["caml_auxiliary_network_weights"]
    assert any(k.startswith("encoder.stem.stage.") for k in auxiliary)  # the stem, behind the local-contrast view
    assert any(".skip." in k for k in auxiliary)  # residual blocks' projection shortcuts
    # its convolutions (encoder, decoder, those after each interpolation) are 2D: [out, in, x, y]
    convolutions = {k: v for k, v in auxiliary.items() if k.endswith(".conv.weight")}
    assert any(".transpconvs." in k for k in convolutions) and all(v.dim() == 4 for v in convolutions.values())


def test_pretrained_weights_start_both_networks(trained):
    """``-pretrained_weights`` (nnU-Net loads them into the main network) starts the auxiliary network from the same
    weights wherever it has the main network's modules."""
    trainer = "nnUNetTrainerCAML_lr0Test"  # tests/trainers: checkpoint_final holds the weights training starts from
    pretrained = trained["output"] / "checkpoint_final.pth"
    result = run_cli(["nnUNetv2_train", trained["dataset_id"], trained["configuration"], "all", "-tr", trainer,
                      "-device", "cpu", "-pretrained_weights", pretrained],
                     {**trained["env"], "nnUNet_extTrainer": EXT_TRAINERS_WITH_TESTS})
    start = _load(trained["output"].parent.parent / f"{trainer}__nnUNetPlans__{trained['configuration']}" / "fold_all"
                  / "checkpoint_final.pth")
    source = _load(pretrained)["network_weights"]
    main, auxiliary = start["network_weights"], start["caml_auxiliary_network_weights"]
    # nnU-Net's part: all but the segmentation layers (of which the trained full-resolution one differs from both
    # networks' random ones; the lowest deep-supervision layer has loss weight 0 and kept its zero bias)
    head = max((k for k in source if ".seg_layers." in k), key=lambda k: int(k.split(".")[2]))
    assert all(torch.equal(main[k], v) for k, v in source.items() if ".seg_layers." not in k)
    assert not torch.equal(main[head], source[head]) and not torch.equal(auxiliary[head], source[head])
    # the auxiliary network: every tensor of a module the main network has (CMA and the local-contrast view wrap
    # encoder stages as `.stage`) except the segmentation layers; not CMA, not the interpolation upsampling
    plans_keys = {k: re.sub(r"\.stage(?=\.)", "", k) for k in auxiliary}
    copied = {k for k, v in auxiliary.items() if ".seg_layers." not in k and plans_keys[k] in source
              and torch.equal(v, source[plans_keys[k]])}
    expected = {k for k in auxiliary if not any(s in k for s in (".seg_layers.", ".cma.", ".transpconvs."))}
    assert copied == expected and any(".stage." in k for k in copied) and any("decoder.stages" in k for k in copied)
    assert f"the auxiliary network takes them where it has the same modules: {len(expected)} of {len(auxiliary)}" \
           in result.stdout


def test_nnunetv2_predict_uses_caml_checkpoint(trained, tmp_path):
    output = tmp_path / "predictions"
    run_cli(["nnUNetv2_predict", "-i", trained["raw"] / "imagesTs", "-o", output, "-d", trained["dataset_id"],
             "-c", trained["configuration"], "-f", "all", "-tr", TRAINER, "-chk", "checkpoint_final.pth",
             "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], trained["env"])
    for label_file in (trained["raw"] / "labelsTs").iterdir():
        prediction = sitk.ReadImage(str(output / label_file.name))
        reference = sitk.ReadImage(str(label_file))
        assert prediction.GetSize() == reference.GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1}


def test_continue_restores_auxiliary_network_heads_and_memory_bank(trained):
    final = trained["output"] / "checkpoint_final.pth"
    before = _load(final)
    # --c on a finished run loads checkpoint_final, trains no further epoch and saves it again: whatever CAML state
    # was not restored would come back freshly initialised (auxiliary network, heads) or empty (memory bank)
    run_cli(["nnUNetv2_train", trained["dataset_id"], trained["configuration"], "all", "-tr", TRAINER,
             "-device", "cpu", "--c"], trained["env"])
    after = _load(final)
    for key in ("caml_auxiliary_network_weights", "caml_occ_heads"):
        assert before[key].keys() == after[key].keys()
        for name, tensor in before[key].items():
            assert torch.equal(tensor, after[key][name]), f"{key}.{name} changed"
    assert before["caml_memory_bank"]["entries"].keys() == after["caml_memory_bank"]["entries"].keys()
    for case_id, per_class in before["caml_memory_bank"]["entries"].items():
        for a, b in zip(per_class, after["caml_memory_bank"]["entries"][case_id]):
            assert torch.equal(a, b)
    for name, tensor in before["network_weights"].items():
        assert torch.equal(tensor, after["network_weights"][name])


def _train_error(d, configuration=None) -> str:
    result = run_cli(["nnUNetv2_train", d["dataset_id"], configuration or d["configuration"], "all", "-tr",
                      TRAINER, "-device", "cpu"], d["env"], check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("ERROR: "), result.stderr[-3000:]  # the refusal is one line
    return line


def test_training_without_unlabeled_preprocessing_names_the_command(caml_dataset):
    d = caml_dataset
    folder = d["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled"
    moved = folder.with_name("moved_away")
    shutil.move(folder, moved)
    try:
        message = _train_error(d)
    finally:
        shutil.move(moved, folder)
    assert "not preprocessed" in message
    assert f"nnUNetv2_caml_preprocess_unlabeled -d {d['dataset_id']} -c {d['configuration']}" in message


def test_training_with_an_unlabeled_image_added_since_preprocessing_names_the_command(caml_dataset):
    d = caml_dataset
    raw_unlabeled = d["raw"] / "imagesTrUnlabeled"
    added = raw_unlabeled / "unl_added_0000.nii.gz"
    shutil.copy(next(raw_unlabeled.glob("*_0000.nii.gz")), added)
    try:
        message = _train_error(d)
    finally:
        added.unlink()
    assert "unl_added" in message and "not preprocessed" in message, message
    assert f"nnUNetv2_caml_preprocess_unlabeled -d {d['dataset_id']} -c {d['configuration']}`" in message


def test_training_without_imagesTrUnlabeled_says_where_to_put_them(caml_dataset):
    d = caml_dataset
    folder = d["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled"
    raw_unlabeled = d["raw"] / "imagesTrUnlabeled"
    moved, moved_raw = folder.with_name("moved_away"), raw_unlabeled.with_name("moved_away")
    shutil.move(folder, moved)
    shutil.move(raw_unlabeled, moved_raw)
    try:
        message = _train_error(d)
    finally:
        shutil.move(moved, folder)
        shutil.move(moved_raw, raw_unlabeled)
    assert "imagesTrUnlabeled" in message
