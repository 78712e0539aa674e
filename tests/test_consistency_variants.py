"""The mutual consistency settings (and the auxiliary network's input) of the default, the cross-entropy variant and
the paper's loss, each trained through ``nnUNetv2_train`` on the tiny dataset and recorded in the log and the
checkpoint."""

import numpy as np
import pytest
import torch

from conftest import EXT_TRAINERS_WITH_TESTS, run_cli


@pytest.mark.parametrize("trainer, expected", [
    ("nnUNetTrainerCAML_consistencyTest",  # the default
     {"lambda_s": 1.0, "consistency_distance": "dice_ce", "detach_sharpened_targets": True, "perturbed_view": True,
      "auxiliary_local_contrast": 3.0}),
    ("nnUNetTrainerCAML_ceTest",
     {"lambda_s": 1.0, "consistency_distance": "ce", "detach_sharpened_targets": True, "perturbed_view": False,
      "auxiliary_local_contrast": None}),
    ("nnUNetTrainerCAML_paperTest",
     {"lambda_s": 0.5, "consistency_distance": "mse", "detach_sharpened_targets": False, "perturbed_view": False,
      "auxiliary_local_contrast": None}),
])
def test_consistency_settings_train_and_are_recorded(caml_dataset, trainer, expected):
    d = caml_dataset
    env = {**d["env"], "nnUNet_extTrainer": EXT_TRAINERS_WITH_TESTS}
    result = run_cli(["nnUNetv2_train", d["dataset_id"], d["configuration"], "all", "-tr", trainer, "-device", "cpu"],
                     env)
    settings_line = next(line for line in result.stdout.splitlines() if "CAML settings:" in line)
    assert all(f"{k}={v}" in settings_line for k, v in expected.items())
    output = (d["root"] / "nnUNet_results" / d["dataset_name"] / f"{trainer}__nnUNetPlans__{d['configuration']}" /
              "fold_all")
    checkpoint = torch.load(output / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert {k: checkpoint["caml_settings"][k] for k in expected} == expected
    consistency = np.asarray(checkpoint["logging"]["caml_loss_consistency"])
    lambda_c = np.asarray(checkpoint["logging"]["caml_lambda_c"])
    # ramp-up 0: at full weight from the first step
    assert np.allclose(lambda_c, 1.0) and np.all(np.isfinite(consistency)) and np.all(consistency > 0)
