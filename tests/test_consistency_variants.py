"""The mutual consistency settings (and the auxiliary network's input) of the default, the cross-entropy variant and
the paper's loss, each trained through ``nnUNetv2_train`` on the tiny dataset and recorded in the log and the
checkpoint; the default through the demo's seeded trainer, twice, which must repeat exactly."""
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import EXT_TRAINERS_WITH_TESTS, run_cli

DEFAULT_SETTINGS = {"lambda_s": 1.0, "consistency_distance": "dice_ce", "detach_sharpened_targets": True,
                    "perturbed_view": True, "auxiliary_local_contrast": 3.0}


def _train_and_check_settings(d: dict, trainer: str, expected: dict, results: Path) -> dict:
    """Train ``trainer`` (fold all) into ``results``, check the settings in the log line and the checkpoint and the
    logged consistency; returns the final checkpoint."""
    env = {**d["env"], "nnUNet_extTrainer": EXT_TRAINERS_WITH_TESTS, "nnUNet_results": str(results)}
    result = run_cli(["nnUNetv2_train", d["dataset_id"], d["configuration"], "all", "-tr", trainer, "-device", "cpu"],
                     env)
    settings_line = next(line for line in result.stdout.splitlines() if "CAML settings:" in line)
    assert all(f"{k}={v}" in settings_line for k, v in expected.items())
    output = results / d["dataset_name"] / f"{trainer}__nnUNetPlans__{d['configuration']}" / "fold_all"
    checkpoint = torch.load(output / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert {k: checkpoint["caml_settings"][k] for k in expected} == expected
    consistency = np.asarray(checkpoint["logging"]["caml_loss_consistency"])
    lambda_c = np.asarray(checkpoint["logging"]["caml_lambda_c"])
    # ramp-up 0: at full weight from the first step
    assert np.allclose(lambda_c, 1.0) and np.all(np.isfinite(consistency)) and np.all(consistency > 0)
    return checkpoint


@pytest.mark.parametrize("trainer, expected", [
    ("nnUNetTrainerCAML_ceTest",
     {"lambda_s": 1.0, "consistency_distance": "ce", "detach_sharpened_targets": True, "perturbed_view": False,
      "auxiliary_local_contrast": None}),
    ("nnUNetTrainerCAML_paperTest",
     {"lambda_s": 0.5, "consistency_distance": "mse", "detach_sharpened_targets": False, "perturbed_view": False,
      "auxiliary_local_contrast": None}),
])
def test_consistency_settings_train_and_are_recorded(caml_dataset, trainer, expected):
    _train_and_check_settings(caml_dataset, trainer, expected, caml_dataset["root"] / "nnUNet_results")


def test_default_settings_and_the_seeded_demo_trainer_repeats_exactly(caml_dataset, tmp_path):
    """The demo's trainer seeds before it builds anything; with augmentation in the training process
    (``nnUNet_n_proc_DA=0``) two runs end with the same weights of both networks and the same losses."""
    first, second = (_train_and_check_settings(caml_dataset, "nnUNetTrainerCAML_demoTest", DEFAULT_SETTINGS,
                                                tmp_path / f"run_{i}") for i in (1, 2))
    for key in ("network_weights", "caml_auxiliary_network_weights"):
        assert first[key].keys() == second[key].keys()
        assert all(torch.equal(first[key][k], second[key][k]) for k in first[key]), key
    for key in ("train_losses", "caml_loss_consistency", "caml_loss_occ"):
        assert first["logging"][key] == second["logging"][key], key
