"""Add a small (CPU-sized) configuration to a dataset's nnU-Net plans.

nnU-Net reads any configuration in ``nnUNetPlans.json`` that names ``inherits_from``; one that keeps the parent's
spacing and normalisation shares its preprocessed data. This adds such a configuration with a small U-Net and
patch, for the demo and the tests (``nnUNetv2_train ID 3d_cpu all -tr nnUNetTrainerCAML``).
"""
import copy
from typing import Sequence

from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, save_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name


def add_small_configuration(dataset_name_or_id, name: str = "3d_cpu", parent: str = "3d_fullres",
                            features_per_stage: Sequence[int] = (8, 16, 32, 64),
                            patch_size: Sequence[int] = (32, 40, 40), batch_size: int = 2,
                            plans_identifier: str = "nnUNetPlans") -> str:
    """Add (or replace) configuration ``name`` inheriting from ``parent``; returns the plans file.

    The U-Net has ``len(features_per_stage)`` stages, 3x3(x3) kernels and stride 2 on every axis below the first
    stage, so each patch axis must be divisible by ``2 ** (stages - 1)``.
    """
    plans_file = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(dataset_name_or_id),
                      plans_identifier + ".json")
    if not isfile(plans_file):
        raise FileNotFoundError(f"no plans at {plans_file}: run nnUNetv2_plan_and_preprocess -d "
                                f"{dataset_name_or_id} first")
    plans = load_json(plans_file)
    if parent not in plans["configurations"]:
        raise ValueError(f"configuration '{parent}' is not in {plans_file}")
    n_stages = len(features_per_stage)
    if any(p % 2 ** (n_stages - 1) for p in patch_size):
        raise ValueError(f"patch size {list(patch_size)} must be divisible by {2 ** (n_stages - 1)} on every axis "
                         f"for {n_stages} stages")
    architecture = copy.deepcopy(plans["configurations"][parent]["architecture"])
    dim = len(patch_size)
    architecture["arch_kwargs"].update({
        "n_stages": n_stages,
        "features_per_stage": list(features_per_stage),
        "kernel_sizes": [[3] * dim] * n_stages,
        "strides": [[1] * dim] + [[2] * dim] * (n_stages - 1),
        "n_conv_per_stage": [2] * n_stages,
        "n_conv_per_stage_decoder": [2] * (n_stages - 1),
    })
    if "n_blocks_per_stage" in architecture["arch_kwargs"]:  # residual encoder plans
        architecture["arch_kwargs"]["n_blocks_per_stage"] = [1] * n_stages
        del architecture["arch_kwargs"]["n_conv_per_stage"]
    plans["configurations"][name] = {"inherits_from": parent, "batch_size": batch_size,
                                     "patch_size": list(patch_size), "architecture": architecture}
    save_json(plans, plans_file, sort_keys=False)
    return plans_file
