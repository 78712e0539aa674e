"""The cross-entropy form of the mutual consistency loss, trained through ``nnUNetv2_train`` on the tiny dataset."""

import numpy as np
import torch

from conftest import EXT_TRAINERS_WITH_TESTS, run_cli


def test_cross_entropy_consistency_trains_and_is_recorded(caml_dataset):
    d = caml_dataset
    env = {**d["env"], "nnUNet_extTrainer": EXT_TRAINERS_WITH_TESTS}
    trainer = "nnUNetTrainerCAML_ceTest"
    result = run_cli(["nnUNetv2_train", d["dataset_id"], d["configuration"], "all", "-tr", trainer, "-device", "cpu"],
                     env)
    assert "consistency_distance=ce" in result.stdout and "detach_sharpened_targets=True" in result.stdout
    output = (d["root"] / "nnUNet_results" / d["dataset_name"] / f"{trainer}__nnUNetPlans__{d['configuration']}" /
              "fold_all")
    checkpoint = torch.load(output / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    settings = checkpoint["caml_settings"]
    assert settings["consistency_distance"] == "ce" and settings["lambda_s"] == 1.0
    consistency = np.asarray(checkpoint["logging"]["caml_loss_consistency"])
    lambda_c = np.asarray(checkpoint["logging"]["caml_lambda_c"])
    # ramp-up 0: at full weight from the first step
    assert np.allclose(lambda_c, 1.0) and np.all(np.isfinite(consistency)) and np.all(consistency > 0)
