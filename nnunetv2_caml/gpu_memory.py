"""CAML's GPU memory: which plans fit a card, and the one-line error when a step does not fit.

CAML trains two networks on twice nnU-Net's patches. Measured on one H200 (README, "Memory: which plans for which
card"), a CAML step took 4.1 to 4.3 x stock nnU-Net's memory and reserved 3.1 to 3.5 GiB per GB of the
``-gpu_memory_target`` its plans were made with (27.6 GiB on nnU-Net's default plans, made for 8 GB). A card of
24 GB therefore needs plans made for about 6 GB; nnU-Net makes them without any JSON editing, under a name of their
own. :func:`memory_target_for_card` gives that target for a card, and :func:`out_of_memory_message` the commands.
"""
import re
from typing import List, Optional, Tuple

import torch
from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

from nnunetv2_caml.errors import CAMLError

#: GiB a CAML step reserved per GB of its plans' -gpu_memory_target: the largest of the H200's measurements
RESERVED_GIB_PER_TARGET_GB = 3.5
#: what a training process holds on the card besides PyTorch's allocator (the CUDA context)
CUDA_CONTEXT_GIB = 0.5
#: the share of the card that the plans may fill (the rest: fragmentation of the allocator)
USABLE_SHARE = 0.95

_TARGET_IN_PLANS_NAME = re.compile(r"_(\d+)_GB$")
#: the -gpu_memory_target (GB) nnU-Net's planners use unless told otherwise (nnU-Net 2.8)
DEFAULT_TARGET_OF_PLANNER = {"ExperimentPlanner": 8, "nnUNetPlannerResEncM": 8, "nnUNetPlannerResEncL": 24,
                             "nnUNetPlannerResEncXL": 40}


class CAMLOutOfMemoryError(CAMLError, torch.OutOfMemoryError):
    """A CAML step ran out of GPU memory: one line with the plans to make (still a ``torch.OutOfMemoryError``)."""


def memory_target_for_card(total_bytes: int) -> int:
    """The largest whole ``-gpu_memory_target`` (GB) whose plans a CAML step should fit into on a card with
    ``total_bytes`` of memory (0: none does)."""
    usable_gib = USABLE_SHARE * total_bytes / 2 ** 30 - CUDA_CONTEXT_GIB
    return max(0, int(usable_gib // RESERVED_GIB_PER_TARGET_GB))


def plans_for_card(total_bytes: int, dataset_name: str, plans_name: str, planner_name: str, configuration: str,
                   data_identifier: str) -> Optional[Tuple[str, List[str]]]:
    """Plans for a card with ``total_bytes`` of memory, made like ``plans_name`` (same planner): their name and the
    commands that make them and their data; None where no plans fit the card.

    Plans with preprocessed data of their own (``data_identifier`` is ``<plans_name>_<configuration>``, as nnU-Net's
    default planner makes them) get ``nnUNetv2_plan_and_preprocess`` and ``nnUNetv2_caml_preprocess_unlabeled``;
    plans that read other plans' data (the ResEnc presets read the default plans' ``3d_fullres`` and ``2d``) get
    ``nnUNetv2_plan_experiment`` alone: the new plans read the same data. The new target is below the one the plans
    were made for: N for a name ending in ``_<N>_GB``, else the planner's default."""
    target = memory_target_for_card(total_bytes)
    named_target = _TARGET_IN_PLANS_NAME.search(plans_name)
    made_for = int(named_target.group(1)) if named_target else DEFAULT_TARGET_OF_PLANNER.get(planner_name)
    if made_for is not None:  # those plans did not fit: the new ones are made for less
        target = min(target, made_for - 1)
    if target < 1:
        return None
    dataset_id = convert_dataset_name_to_id(dataset_name)
    new_plans = f"{_TARGET_IN_PLANS_NAME.sub('', plans_name)}_{target}_GB"
    planner = "" if planner_name == "ExperimentPlanner" else f" -pl {planner_name}"
    if data_identifier == f"{plans_name}_{configuration}":
        return new_plans, [f"nnUNetv2_plan_and_preprocess -d {dataset_id} -c {configuration}{planner} "
                           f"-gpu_memory_target {target} -overwrite_plans_name {new_plans}",
                           f"nnUNetv2_caml_preprocess_unlabeled -d {dataset_id} -c {configuration} "
                           f"-plans_name {new_plans}"]
    return new_plans, [f"nnUNetv2_plan_experiment -d {dataset_id}{planner} -gpu_memory_target {target} "
                       f"-overwrite_plans_name {new_plans}"]


def out_of_memory_message(device_name: str, total_bytes: int, dataset_name: str, plans_name: str,
                          planner_name: str, configuration: str, data_identifier: str, patch_size,
                          labeled_batch_size: int, unlabeled_batch_size: int) -> str:
    """One line for a CAML step that ran out of GPU memory: what ran out, and the commands of :func:`plans_for_card`."""
    what = (f"CAML ran out of GPU memory on {device_name} ({total_bytes / 2 ** 30:.1f} GiB) with plans "
            f"'{plans_name}', configuration '{configuration}' (patch {'x'.join(map(str, patch_size))}, batch "
            f"{labeled_batch_size} labeled + {unlabeled_batch_size} unlabeled): two networks on the labeled and "
            f"unlabeled patches need about 4 x the memory of stock nnU-Net's step")
    plans = plans_for_card(total_bytes, dataset_name, plans_name, planner_name, configuration, data_identifier)
    if plans is None:
        return f"{what}, more than this card holds; train CAML on a card with more memory"
    new_plans, commands = plans
    return (f"{what}. Make plans for this card (CAML reserves about {RESERVED_GIB_PER_TARGET_GB:g} GiB per GB of "
            f"-gpu_memory_target): {', then '.join(commands)}; then train with -p {new_plans}")
