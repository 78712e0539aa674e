"""The consistency variants (cross-entropy; Dice + cross-entropy with the perturbed view), trained through
``nnUNetv2_train`` on the tiny dataset."""

import numpy as np
import pytest
import torch

from conftest import EXT_TRAINERS_WITH_TESTS, run_cli


@pytest.mark.parametrize("trainer, distance, perturbed_view", [
    ("nnUNetTrainerCAML_ceTest", "ce", False),
    ("nnUNetTrainerCAML_perturbedViewTest", "dice_ce", True),
])
def test_consistency_variant_trains_and_is_recorded(caml_dataset, trainer, distance, perturbed_view):
    d = caml_dataset
    env = {**d["env"], "nnUNet_extTrainer": EXT_TRAINERS_WITH_TESTS}
    result = run_cli(["nnUNetv2_train", d["dataset_id"], d["configuration"], "all", "-tr", trainer, "-device", "cpu"],
                     env)
    assert (f"consistency_distance={distance}" in result.stdout and "detach_sharpened_targets=True" in result.stdout
            and f"perturbed_view={perturbed_view}" in result.stdout)
    output = (d["root"] / "nnUNet_results" / d["dataset_name"] / f"{trainer}__nnUNetPlans__{d['configuration']}" /
              "fold_all")
    checkpoint = torch.load(output / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    settings = checkpoint["caml_settings"]
    assert settings["consistency_distance"] == distance and settings["lambda_s"] == 1.0
    assert settings["perturbed_view"] is perturbed_view
    consistency = np.asarray(checkpoint["logging"]["caml_loss_consistency"])
    lambda_c = np.asarray(checkpoint["logging"]["caml_lambda_c"])
    # ramp-up 0: at full weight from the first step
    assert np.allclose(lambda_c, 1.0) and np.all(np.isfinite(consistency)) and np.all(consistency > 0)
