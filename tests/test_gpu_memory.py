"""CAML's GPU memory: the plans it proposes for a card are made by nnU-Net's own commands as proposed, and a step that
runs out of GPU memory stops with one line naming them (CUDA)."""
import json
import shlex
import shutil

import pytest
import torch

from conftest import EXT_TRAINERS_WITH_TESTS, nnunet_env, run_cli
from nnunetv2_caml.gpu_memory import memory_target_for_card, out_of_memory_message, plans_for_card

GIB = 2 ** 30


def test_memory_target_for_cards_of_common_sizes():
    # what torch reports as total memory for 8, 24, 40, 80 and 141 GB cards: 6 GB plans for 24 GB (as the README's
    # measurement: 18.7 GiB reserved on the vessel plans made for 6 GB), nnU-Net's default 8 GB plans for 32 GB and up
    assert [memory_target_for_card(int(g * GIB)) for g in (7.8, 23.6, 31.7, 39.4, 79.6, 139.8)] == [1, 6, 8, 10, 21, 37]
    assert memory_target_for_card(int(3.6 * GIB)) == 0


def test_proposed_plans_go_below_the_plans_that_did_not_fit():
    # nnU-Net's default plans (8 GB) on an 80 GB card that another process fills: 7, not 21
    assert plans_for_card(int(79.6 * GIB), "Dataset101_LA", "nnUNetPlans", "ExperimentPlanner", "3d_fullres",
                          "nnUNetPlans_3d_fullres")[0] == "nnUNetPlans_7_GB"
    # plans made for 6 GB by name: 5
    assert plans_for_card(int(23.6 * GIB), "Dataset101_LA", "nnUNetPlans_6_GB", "ExperimentPlanner", "3d_fullres",
                          "nnUNetPlans_6_GB_3d_fullres")[0] == "nnUNetPlans_5_GB"
    # ResEnc L (24 GB) on an 80 GB card: 21
    assert plans_for_card(int(79.6 * GIB), "Dataset101_LA", "nnUNetResEncUNetLPlans", "nnUNetPlannerResEncL",
                          "3d_fullres", "nnUNetPlans_3d_fullres")[0] == "nnUNetResEncUNetLPlans_21_GB"
    message = out_of_memory_message("a small GPU", int(3.6 * GIB), "Dataset101_LA", "nnUNetPlans",
                                    "ExperimentPlanner", "3d_fullres", "nnUNetPlans_3d_fullres", [96, 160, 160], 2, 2)
    assert "more than this card holds" in message and "\n" not in message


def _copy_of_dataset(d, root):
    """The tests' dataset, raw and preprocessed, in a folder of its own (new plans must not touch the shared one)."""
    env = nnunet_env(root)
    shutil.copytree(d["raw"], f"{env['nnUNet_raw']}/{d['dataset_name']}")
    shutil.copytree(d["preprocessed"], f"{env['nnUNet_preprocessed']}/{d['dataset_name']}")
    return {**env, "nnUNet_n_proc_DA": "1"}  # nnU-Net's planner needs a positive value


def test_proposed_commands_make_the_plans_and_their_data(caml_dataset, tmp_path):
    d = caml_dataset
    env = _copy_of_dataset(d, tmp_path)
    preprocessed = tmp_path / "nnUNet_preprocessed" / d["dataset_name"]
    # the default plans, whose 3d_fullres data is their own: plans, data and unlabeled data for a 24 GB card
    new_plans, commands = plans_for_card(int(23.6 * GIB), d["dataset_name"], "nnUNetPlans", "ExperimentPlanner",
                                         "3d_fullres", "nnUNetPlans_3d_fullres")
    assert new_plans == "nnUNetPlans_6_GB" and len(commands) == 2
    for command in commands:
        run_cli([*shlex.split(command), "-np", "1"], env)
    plans = json.loads((preprocessed / "nnUNetPlans_6_GB.json").read_text())
    assert plans["configurations"]["3d_fullres"]["data_identifier"] == "nnUNetPlans_6_GB_3d_fullres"
    assert len(list((preprocessed / "nnUNetPlans_6_GB_3d_fullres").glob("*.pkl"))) == 4
    assert len(list((preprocessed / "nnUNetPlans_6_GB_3d_fullres_unlabeled").glob("*.pkl"))) == 4

    # a ResEnc preset reads the default plans' data: planning alone, and the new plans read that data too
    run_cli(["nnUNetv2_plan_experiment", "-d", d["dataset_id"], "-pl", "nnUNetPlannerResEncL"], env)
    resenc = json.loads((preprocessed / "nnUNetResEncUNetLPlans.json").read_text())["configurations"]["3d_fullres"]
    new_plans, commands = plans_for_card(int(79.6 * GIB), d["dataset_name"], "nnUNetResEncUNetLPlans",
                                         "nnUNetPlannerResEncL", "3d_fullres", resenc["data_identifier"])
    assert new_plans == "nnUNetResEncUNetLPlans_21_GB" and len(commands) == 1
    assert commands[0].startswith("nnUNetv2_plan_experiment")
    run_cli(shlex.split(commands[0]), env)
    plans = json.loads((preprocessed / "nnUNetResEncUNetLPlans_21_GB.json").read_text())
    assert plans["experiment_planner_used"] == "nnUNetPlannerResEncL"
    assert plans["configurations"]["3d_fullres"]["data_identifier"] == "nnUNetPlans_3d_fullres"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a step that runs out of GPU memory")
def test_step_out_of_gpu_memory_stops_with_one_line_naming_the_plans_to_make_on_cuda(caml_dataset):
    d = caml_dataset
    env = {**d["env"], "nnUNet_extTrainer": EXT_TRAINERS_WITH_TESTS}
    result = run_cli(["nnUNetv2_train", d["dataset_id"], d["configuration"], "all", "-tr",
                      "nnUNetTrainerCAML_smallGPU", "-device", "cuda"], env, check=False, timeout=600)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[-1].startswith("ERROR: CAML ran out of GPU memory on "), result.stderr[-3000:]
    assert "-gpu_memory_target" in lines[-1] and "then train with -p nnUNetPlans_" in lines[-1], lines[-1]
