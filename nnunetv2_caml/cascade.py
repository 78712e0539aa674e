"""CAML in nnU-Net's cascade: the previous stage's segmentations of the unlabeled cases.

nnU-Net's cascade (``3d_lowres`` then ``3d_cascade_fullres``) feeds the full-resolution network the low-resolution
stage's segmentation as extra input channels (one-hot, after the images). For the labeled cases nnU-Net writes them
while it validates the low-resolution stage:
    $nnUNet_results/DatasetXXX/<trainer>__<plans>__3d_lowres/predicted_next_stage/3d_cascade_fullres/CASE.b2nd
Unlabeled cases are never validated, so ``nnUNetv2_caml_predict_next_stage`` writes theirs beside them:
    $nnUNet_results/DatasetXXX/<trainer>__<plans>__3d_lowres/predicted_next_stage_unlabeled/3d_cascade_fullres/CASE.b2nd
the same way: the trained low-resolution stage (the folds given, averaged as ``nnUNetv2_predict`` does) predicts each
preprocessed unlabeled case, and nnU-Net's ``resample_and_save`` resamples the prediction to the case's shape in the
next stage and saves its segmentation. The cascade's CAML trainer then reads them with the unlabeled cases, and
nnU-Net's cascade augmentation turns them into input channels as it does for the labeled ones.

Each output folder records the model that predicted it (``predicted_by.json``: folds, checkpoint and each checkpoint
file's SHA-256); a rerun skips finished cases of the same model and refuses, without ``--overwrite``, cases of another.
"""
import argparse
import hashlib
import os
import shutil
from typing import List, Sequence, Union

import blosc2
import torch
from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json, maybe_mkdir_p, save_json
from tqdm import tqdm

from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.export_prediction import resample_and_save
from nnunetv2.paths import nnUNet_results
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from nnunetv2_caml.errors import run_resumable_command
from nnunetv2_caml.unlabeled import (TEMPORARY_FOLDER, UnlabeledDataError, _dataset_id, _load_plans,
                                     _resolve_dataset_name, assert_unlabeled_data_ready, preprocessing_fingerprint,
                                     unlabeled_case_identifiers)

#: the record of the model that predicted an output folder
PREDICTED_BY_FILE = "predicted_by.json"
DEFAULT_TRAINER = "nnUNetTrainerCAML"


def unlabeled_previous_stage_folder(dataset_name: str, trainer_name: str, plans_identifier: str,
                                    previous_stage: str, configuration: str) -> str:
    """Where the segmentations of the unlabeled cases by ``previous_stage`` (trained with ``trainer_name``) for the
    cascade stage ``configuration`` live: beside nnU-Net's ``predicted_next_stage`` folder of the labeled cases."""
    return join(nnUNet_results, dataset_name, f"{trainer_name}__{plans_identifier}__{previous_stage}",
                "predicted_next_stage_unlabeled", configuration)


def predict_next_stage_command(dataset_name: str, previous_stage: str, trainer_name: str,
                               plans_identifier: str) -> str:
    """The command that writes the previous stage's segmentations of the unlabeled cases."""
    command = f"nnUNetv2_caml_predict_next_stage -d {_dataset_id(dataset_name)} -c {previous_stage}"
    if trainer_name != DEFAULT_TRAINER:
        command += f" -tr {trainer_name}"
    return command if plans_identifier == "nnUNetPlans" else f"{command} -p {plans_identifier}"


def _image_shape(unlabeled_folder: str, case_id: str) -> tuple:
    """The spatial shape of a preprocessed unlabeled case (``unlabeled.py`` writes them with nnUNetDatasetBlosc2), read
    from the file's header."""
    return blosc2.open(join(unlabeled_folder, case_id + ".b2nd"), mode="r").shape[1:]


def assert_previous_stage_ready(folder: str, unlabeled_folder: str, command: str) -> None:
    """Refuse a cascade training run when an unlabeled case of ``unlabeled_folder`` has no segmentation of the
    previous stage in ``folder``, or one of another shape (the unlabeled cases were preprocessed again since)."""
    case_ids = unlabeled_case_identifiers(unlabeled_folder)
    missing = [k for k in case_ids if not isfile(join(folder, k + ".b2nd"))]
    if missing:
        raise UnlabeledDataError(
            f"{len(missing)} of {len(case_ids)} unlabeled case(s) have no segmentation of the previous stage in "
            f"{folder} (e.g. {missing[0]}), which the cascade needs as input: train the previous stage with the same "
            f"trainer, then run `{command}`")
    for k in case_ids:
        shape, expected = blosc2.open(join(folder, k + ".b2nd"), mode="r").shape, _image_shape(unlabeled_folder, k)
        if tuple(shape) != tuple(expected):
            raise UnlabeledDataError(
                f"the previous stage's segmentation of unlabeled case {k} in {folder} has shape {list(shape)}, its "
                f"preprocessed image {list(expected)} (preprocessed again since?): run `{command} --overwrite`")


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_record(model_folder: str, folds: Sequence[Union[int, str]], checkpoint_name: str,
                  use_mirroring: bool) -> dict:
    """What identifies the predictions of a folder: the model (folds, checkpoint files' contents) and the mirroring."""
    files = {}
    for f in folds:
        checkpoint = join(model_folder, f"fold_{f}", checkpoint_name)
        if not isfile(checkpoint):
            raise UnlabeledDataError(f"{checkpoint} not found: train fold {f} of the previous stage first, or name "
                                     f"the trained folds with -f (and the checkpoint with -chk)")
        files[f"fold_{f}"] = _file_digest(checkpoint)
    return {"checkpoint": checkpoint_name, "sha256": files, "use_mirroring": use_mirroring}


def predict_next_stage_unlabeled(dataset_name_or_id: Union[int, str], configuration: str = "3d_lowres",
                                 trainer_name: str = DEFAULT_TRAINER, plans_identifier: str = "nnUNetPlans",
                                 folds: Sequence[Union[int, str]] = (0, 1, 2, 3, 4),
                                 checkpoint_name: str = "checkpoint_final.pth", device: torch.device = None,
                                 use_mirroring: bool = True, overwrite: bool = False) -> List[str]:
    """Write the segmentations of the unlabeled cases by the trained stage ``configuration`` for each of its next
    stages; return the output folders. Finished cases of the same model are skipped unless ``overwrite``."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    if not nnUNet_results.is_set():
        raise UnlabeledDataError("environment variable nnUNet_results is not set: export it")
    dataset_name = _resolve_dataset_name(dataset_name_or_id)
    plans_manager, dataset_json = _load_plans(dataset_name, plans_identifier)
    if configuration not in plans_manager.available_configurations:
        raise UnlabeledDataError(f"configuration {configuration!r} is not in {plans_identifier}.json: use one of "
                                 f"{', '.join(plans_manager.available_configurations)}")
    manager = plans_manager.get_configuration(configuration)
    next_stages = manager.next_stage_names or []
    if not next_stages:
        raise UnlabeledDataError(f"configuration {configuration} has no next stage in {plans_identifier}.json: "
                                 f"-c takes the first stage of a cascade (e.g. 3d_lowres)")
    if manager.previous_stage_name is not None:
        raise UnlabeledDataError(f"configuration {configuration} is itself a cascade stage: predicting its "
                                 f"unlabeled cases would need the segmentations of {manager.previous_stage_name}")
    model_folder = join(nnUNet_results, dataset_name, f"{trainer_name}__{plans_identifier}__{configuration}")
    if not isdir(model_folder):
        raise UnlabeledDataError(f"{model_folder} not found: train `nnUNetv2_train {_dataset_id(dataset_name)} "
                                 f"{configuration} FOLD -tr {trainer_name}` first")
    record = _model_record(model_folder, folds, checkpoint_name, use_mirroring)

    def unlabeled_folder(c: str) -> str:
        m = plans_manager.get_configuration(c)
        return assert_unlabeled_data_ready(dataset_name, m.data_identifier, c, plans_identifier,
                                           preprocessing_fingerprint(plans_manager, m, dataset_json), dataset_json)

    source = unlabeled_folder(configuration)
    case_ids = unlabeled_case_identifiers(source)
    targets = {n: unlabeled_folder(n) for n in next_stages}
    outputs = {n: unlabeled_previous_stage_folder(dataset_name, trainer_name, plans_identifier, configuration, n)
               for n in next_stages}
    for out in outputs.values():
        if isfile(join(out, PREDICTED_BY_FILE)) and not overwrite and load_json(join(out, PREDICTED_BY_FILE)) != record:
            raise UnlabeledDataError(f"{out} holds segmentations by another model or checkpoint (see its "
                                     f"{PREDICTED_BY_FILE}): add --overwrite to replace them")
    for out in outputs.values():
        if overwrite and isdir(out):  # before the new record: an interrupted rerun must not mix in the old cases
            for name in os.listdir(out):
                if name.endswith(".b2nd"):
                    os.remove(join(out, name))
        maybe_mkdir_p(out)
        save_json(record, join(out, PREDICTED_BY_FILE), sort_keys=False)
    todo = [k for k in case_ids if not all(isfile(join(out, k + ".b2nd")) for out in outputs.values())]
    print(f"{configuration} -> {', '.join(next_stages)}: {len(case_ids)} unlabeled case(s), {len(todo)} to predict, "
          f"{len(case_ids) - len(todo)} already finished and skipped")
    if not todo:
        return list(outputs.values())
    for out in outputs.values():
        shutil.rmtree(join(out, TEMPORARY_FOLDER), ignore_errors=True)  # leftovers of an interrupted run
        maybe_mkdir_p(join(out, TEMPORARY_FOLDER))

    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, tuple(folds), checkpoint_name)
    source_dataset = nnUNetDatasetBlosc2(source, todo)
    for k in tqdm(todo, desc=f"Predicting the unlabeled cases with {configuration}"):
        data, _, _, properties = source_dataset.load_case(k)
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data[:])).cpu()
        for n in next_stages:
            temporary = join(outputs[n], TEMPORARY_FOLDER, k)
            resample_and_save(logits, _image_shape(targets[n], k), temporary, plans_manager, manager, properties,
                              dataset_json, default_num_processes, nnUNetDatasetBlosc2)
            os.replace(temporary + ".b2nd", join(outputs[n], k + ".b2nd"))
    for out in outputs.values():
        shutil.rmtree(join(out, TEMPORARY_FOLDER), ignore_errors=True)
    return list(outputs.values())


def _fold(value: str) -> Union[int, str]:
    """A fold as nnUNetv2_predict's -f takes it: a number or 'all'."""
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is no fold: give numbers or 'all'") from None


def predict_next_stage_entry() -> None:
    """``nnUNetv2_caml_predict_next_stage``: command-line wrapper around :func:`predict_next_stage_unlabeled`."""
    parser = argparse.ArgumentParser(
        description="Segment the preprocessed unlabeled cases with a trained first cascade stage (e.g. 3d_lowres) "
                    "for the cascade's next stage (e.g. 3d_cascade_fullres), as nnU-Net does for the labeled cases "
                    "when it validates that stage.")
    parser.add_argument("-d", required=True, help="dataset ID or name")
    parser.add_argument("-c", default="3d_lowres", help="the trained first stage. Default: 3d_lowres")
    parser.add_argument("-tr", default=DEFAULT_TRAINER,
                        help=f"the trainer of both stages. Default: {DEFAULT_TRAINER}")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier. Default: nnUNetPlans")
    parser.add_argument("-f", nargs="+", type=_fold, default=[0, 1, 2, 3, 4],
                        help="folds whose predictions are averaged, as nnUNetv2_predict. Default: 0 1 2 3 4")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint. Default: checkpoint_final.pth")
    parser.add_argument("-device", choices=("cuda", "cpu", "mps"), default=None,
                        help="Default: cuda when available, else cpu")
    parser.add_argument("--disable_tta", action="store_true", help="no mirroring at test time (faster)")
    parser.add_argument("--overwrite", action="store_true", help="predict finished cases again")
    args = parser.parse_args()
    run_resumable_command(lambda: predict_next_stage_unlabeled(
        args.d, args.c, args.tr, args.p, args.f, args.chk, torch.device(args.device) if args.device else None,
        not args.disable_tta, args.overwrite))
