"""Unlabeled images for CAML: where they live, how they are preprocessed, how the trainer finds them.

Raw (the user's):
    $nnUNet_raw/DatasetXXX_Name/imagesTrUnlabeled/CASE_0000.nii.gz, CASE_0001.nii.gz, ...
    (same channel naming and file ending as imagesTr, not listed in dataset.json)
Preprocessed (written by ``nnUNetv2_caml_preprocess_unlabeled``):
    $nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>_unlabeled/CASE.b2nd, CASE_seg.b2nd, CASE.pkl

Each case is preprocessed by the configuration's own nnU-Net preprocessor, exactly as a labeled
case would be, and saved in the format nnU-Net's ``nnUNetDatasetBlosc2`` / ``nnUNetDataLoader`` read.
Unlabeled cases have no label: their seg array is the crop-to-nonzero mask (0 inside, -1 outside)
and ``properties['class_locations']`` is empty.

Unlabeled images are checked the way ``--verify_dataset_integrity`` checks labeled ones (see
:func:`check_unlabeled_image`), and every preprocessed case records what it was made with
(``properties['caml_preprocessing']``, see :func:`preprocessing_fingerprint`): cases made with other
settings are refused by the command (without ``--overwrite``) and by the trainer.
"""
import argparse
import gzip
import json
import multiprocessing
import os
import re
import shutil
import tempfile
from time import sleep
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import (isdir, isfile, join, load_json, load_pickle,
                                                                    maybe_mkdir_p, subfiles)
from tqdm import tqdm

from nnunetv2.configuration import default_num_processes
from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

from nnunetv2_caml.errors import CAMLError, run_resumable_command

UNLABELED_IMAGES_FOLDER = "imagesTrUnlabeled"
# Cases are written here first, then renamed into the output folder. nnU-Net's dataset class only
# looks at the files directly in the output folder, never into this subfolder.
TEMPORARY_FOLDER = ".unfinished"
# The files of one case in the order they are moved into place: the data file comes last because
# its presence is what makes nnU-Net's dataset class (and us) see the case.
CASE_FILE_SUFFIXES = ("_seg.b2nd", ".pkl", ".b2nd")
#: key in each preprocessed case's properties holding :func:`preprocessing_fingerprint` of its plans
FINGERPRINT_KEY = "caml_preprocessing"
#: what fingerprints of earlier versions stored that does not decide a case's content (see preprocessing_fingerprint)
FINGERPRINT_KEYS_NO_LONGER_COMPARED = ("plans_name",)
#: an unlabeled image's spacing may differ from the labeled images' median by at most this factor per axis
MAX_SPACING_RATIO = 10.0


class UnlabeledDataError(CAMLError):
    """A problem with the unlabeled data that the user must fix; the message is one line saying how."""


def preprocessing_fingerprint(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                              dataset_json: dict) -> dict:
    """Everything in the plans that decides what a preprocessed case contains: the reader and axis order, the
    configuration's preprocessor, spacing, normalisation and resampling, the channels, and (for CT normalisation) the
    intensity statistics. Not the plans' name: plans that share a data identifier share the unlabeled data, as nnU-Net
    shares the labeled data (its ResEnc presets use the default plans' 2d and 3d_fullres data). Plain JSON values, so
    it compares equal with what a case stored."""
    configuration = configuration_manager.configuration
    plans = plans_manager.plans
    fingerprint = {"image_reader_writer": plans.get("image_reader_writer"),
                   "transpose_forward": plans.get("transpose_forward"),
                   **{k: configuration.get(k) for k in ("preprocessor_name", "spacing", "normalization_schemes",
                                                        "use_mask_for_norm", "resampling_fn_data",
                                                        "resampling_fn_data_kwargs")},
                   "channel_names": dataset_json.get("channel_names", dataset_json.get("modality"))}
    if any("CT" in scheme for scheme in configuration.get("normalization_schemes", [])):
        fingerprint["foreground_intensity_properties_per_channel"] = \
            plans.get("foreground_intensity_properties_per_channel")
    return json.loads(json.dumps(fingerprint))


def fingerprint_differences(stored: Union[dict, None], expected: dict) -> str:
    """What differs between a case's stored fingerprint and the plans', in words (empty if nothing)."""
    if stored is None:
        return "made by a version without fingerprints"
    keys = [k for k in expected if stored.get(k) != expected[k]] + \
        [k for k in stored if k not in expected and k not in FINGERPRINT_KEYS_NO_LONGER_COMPARED]
    return "; ".join(f"{k} {stored.get(k)} -> {expected.get(k)}" for k in keys)


def stale_unlabeled_cases(folder: str, case_ids: Sequence[str], expected: dict) -> Dict[str, str]:
    """{case id: what differs} for the preprocessed cases whose fingerprint differs from ``expected``."""
    stale = {}
    for case in case_ids:
        difference = fingerprint_differences(load_pickle(join(folder, case + ".pkl")).get(FINGERPRINT_KEY), expected)
        if difference:
            stale[case] = difference
    return stale


def _describe_stale(stale: Dict[str, str], total: int) -> str:
    first = next(iter(stale))
    return f"{len(stale)} of {total} case(s) were preprocessed with other settings (e.g. {first}: {stale[first]})"


def _describe_orphans(orphans: Sequence[str], total: int, raw_images: str) -> str:
    return (f"{len(orphans)} of {total} preprocessed case(s) have no image in {raw_images} any more (e.g. "
            f"{orphans[0]})")


def _remove_case(folder: str, case_id: str) -> None:
    """Delete a finished case's files in the reverse order of CASE_FILE_SUFFIXES: the data file first."""
    for suffix in reversed(CASE_FILE_SUFFIXES):
        if isfile(join(folder, case_id + suffix)):
            os.remove(join(folder, case_id + suffix))


def unlabeled_preprocessed_folder(preprocessed_dataset_folder: str) -> str:
    """Map nnU-Net's labeled folder ``.../DatasetXXX/<data_identifier>`` to its sibling
    ``.../DatasetXXX/<data_identifier>_unlabeled``."""
    return os.fspath(preprocessed_dataset_folder).rstrip("/" + os.sep) + "_unlabeled"


def unlabeled_case_identifiers(folder: str) -> List[str]:
    """Sorted ids of the finished cases in ``folder`` (all three files of the case present).
    A missing folder has none."""
    if not isdir(folder):
        return []
    names = set(os.listdir(folder))
    return sorted(n[:-len(".b2nd")] for n in names
                  if n.endswith(".b2nd") and not n.endswith("_seg.b2nd")
                  and all(n[:-len(".b2nd")] + s in names for s in CASE_FILE_SUFFIXES))


def _dataset_id(dataset_name: str) -> str:
    """``Dataset004_Hippocampus`` -> ``4`` (for the commands we print); other names unchanged."""
    try:
        return str(int(dataset_name[len("Dataset"):len("Dataset") + 3]))
    except ValueError:
        return dataset_name


def _preprocess_command(dataset_name: str, configurations: Sequence[str], plans_identifier: str) -> str:
    """The exact command that preprocesses the unlabeled images of a dataset."""
    command = f"nnUNetv2_caml_preprocess_unlabeled -d {_dataset_id(dataset_name)} -c {' '.join(configurations)}"
    return command if plans_identifier == "nnUNetPlans" else f"{command} -plans_name {plans_identifier}"


def _visible_files(folder: str) -> List[str]:
    """Names of the files in ``folder`` that are not hidden (``.DS_Store``); none if there is no folder."""
    return [f for f in subfiles(folder, join=False) if not f.startswith(".")] if isdir(folder) else []


def _resolve_dataset_name(dataset_name_or_id: Union[int, str]) -> str:
    """Dataset name for an id or name, as nnU-Net finds it, checking that its raw folder exists."""
    for variable in (nnUNet_raw, nnUNet_preprocessed):
        if not variable.is_set():
            raise UnlabeledDataError(f"environment variable {variable.env_var_name} is not set: export it "
                                     f"(see nnU-Net's documentation/setting_up_paths.md)")
    name = str(dataset_name_or_id)
    if not name.startswith("Dataset"):
        try:
            candidates = list(find_candidate_datasets(int(name)))
        except ValueError:
            raise UnlabeledDataError(f"-d {name!r} is neither a dataset ID (e.g. 4) nor a dataset name "
                                     f"(e.g. Dataset004_Hippocampus)") from None
        if len(candidates) != 1:
            raise UnlabeledDataError(
                f"dataset ID {name} not found in nnUNet_raw={nnUNet_raw.get()} or nnUNet_preprocessed="
                f"{nnUNet_preprocessed.get()}: check -d and these environment variables" if not candidates else
                f"several datasets have ID {name} ({', '.join(candidates)}): rename all but one")
        name = candidates[0]
    if not isdir(join(nnUNet_raw, name)):
        raise UnlabeledDataError(f"raw dataset folder {join(nnUNet_raw, name)} not found: check -d and nnUNet_raw")
    return name


def _load_plans(dataset_name: str, plans_identifier: str) -> Tuple[PlansManager, dict]:
    """PlansManager and dataset.json from nnUNet_preprocessed, as nnU-Net's preprocessing reads them."""
    plans_file = join(nnUNet_preprocessed, dataset_name, plans_identifier + ".json")
    dataset_json_file = join(nnUNet_preprocessed, dataset_name, "dataset.json")
    for f in (plans_file, dataset_json_file):
        if not isfile(f):
            hint = "" if plans_identifier == "nnUNetPlans" else f" (with the planner that writes {plans_identifier})"
            raise UnlabeledDataError(f"{f} not found: run `nnUNetv2_plan_and_preprocess -d "
                                     f"{_dataset_id(dataset_name)}`{hint} first")
    return PlansManager(plans_file), load_json(dataset_json_file)


def _configuration_managers(plans_manager: PlansManager, configurations: Sequence[str],
                            plans_identifier: str) -> Dict[str, ConfigurationManager]:
    """Configuration managers for the requested configurations, refusing unknown ones. A cascade stage (e.g.
    3d_cascade_fullres) preprocesses the images as the configuration it inherits from and shares its data, as in
    nnU-Net; the previous stage's segmentations of the unlabeled cases come from nnUNetv2_caml_predict_next_stage."""
    available = plans_manager.available_configurations
    managers = {}
    for c in configurations:
        if c not in available:
            raise UnlabeledDataError(f"configuration {c!r} is not in {plans_identifier}.json: "
                                     f"use one of {', '.join(available)}")
        managers[c] = plans_manager.get_configuration(c)
        if managers[c].preprocessor_class is None:
            raise UnlabeledDataError(f"preprocessor {managers[c].preprocessor_name} of configuration {c} not "
                                     f"found in nnunetv2.preprocessing: fix preprocessor_name in the plans")
    return managers


def _labeled_identifiers(raw_dataset_folder: str, dataset_json: dict) -> set:
    """Ids of the labeled training cases (imagesTr, or dataset.json's 'dataset' entries)."""
    ids = set(dataset_json.get("dataset", {}).keys())
    images_tr = join(raw_dataset_folder, "imagesTr")
    if isdir(images_tr):
        ids.update(get_identifiers_from_splitted_dataset_folder(images_tr, dataset_json["file_ending"]))
    return ids


def _image_name_pattern(file_ending: str) -> re.Pattern:
    """nnU-Net's image file name, CASE_XXXX<file_ending>: group 1 the case id, group 2 the channel index."""
    return re.compile(r"(.+)_(\d{4})" + re.escape(file_ending))


def find_unlabeled_cases(raw_dataset_folder: str, dataset_json: dict) -> Dict[str, List[str]]:
    """Validate ``imagesTrUnlabeled`` of a raw dataset and return {case id: [channel files in order]}.

    Raises UnlabeledDataError if the folder is missing or empty, a file has the wrong ending or
    name, a case lacks a channel file or has too many, a case id ends in _seg or also exists in imagesTr.
    Hidden files (``.DS_Store``) are ignored."""
    folder = join(raw_dataset_folder, UNLABELED_IMAGES_FOLDER)
    ending = dataset_json["file_ending"]
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    files = _visible_files(folder)
    if not files:
        raise UnlabeledDataError(f"no unlabeled images: put them in {folder} (named like imagesTr: "
                                 f"CASE_0000{ending})")
    name_pattern = _image_name_pattern(ending)
    found: Dict[str, set] = {}
    for f in files:
        if not f.endswith(ending):
            raise UnlabeledDataError(f"{join(folder, f)} does not end with {ending} (file_ending in dataset.json): "
                                     f"convert, rename or remove it")
        match = name_pattern.fullmatch(f)
        if match is None:
            raise UnlabeledDataError(f"{join(folder, f)} is not named CASE_XXXX{ending} (XXXX = 4-digit channel "
                                     f"index): rename it")
        if match.group(1).endswith("_seg"):
            raise UnlabeledDataError(f"{join(folder, f)}: case id {match.group(1)} ends in _seg, which nnU-Net "
                                     f"reserves for segmentations (CASE_seg.b2nd): rename the case")
        found.setdefault(match.group(1), set()).add(int(match.group(2)))
    expected = list(range(len(channels)))
    for case, indices in sorted(found.items()):
        if sorted(indices) != expected:
            have = ", ".join(f"{case}_{i:04d}{ending}" for i in sorted(indices))
            want = ", ".join(f"{case}_{i:04d}{ending}" for i in expected)
            raise UnlabeledDataError(f"unlabeled case {case} has {have} but dataset.json lists {len(expected)} "
                                     f"channel(s): {folder} must hold exactly {want}")
    clashes = sorted(set(found) & _labeled_identifiers(raw_dataset_folder, dataset_json))
    if clashes:
        raise UnlabeledDataError(f"unlabeled case id(s) {', '.join(clashes)} also exist in imagesTr: rename them "
                                 f"in {folder} (case ids must be unique)")
    return {case: [join(folder, f"{case}_{i:04d}{ending}") for i in expected] for case in sorted(found)}


def _read_unlabeled_image(case_id: str, image_files: List[str], plans_manager: PlansManager) -> Tuple[np.ndarray, dict]:
    """Read a case with the plans' reader, refusing files the reader would silently misread."""
    for f in image_files:
        if f.endswith(".gz"):  # SimpleITK reads a truncated .nii.gz as zeros past the cut: check the stream first
            try:
                with gzip.open(f, "rb") as stream:
                    while stream.read(1 << 24):
                        pass
            except (OSError, EOFError) as e:
                raise UnlabeledDataError(f"{f} is truncated or not a valid gzip file ({e}): copy or convert it "
                                         f"again, or remove case {case_id}") from None
    try:
        return plans_manager.image_reader_writer_class().read_images(image_files)
    except Exception as e:
        message = f"{type(e).__name__}: {e}".replace("\n", " ")
        raise UnlabeledDataError(f"cannot read unlabeled case {case_id} ({image_files[0]}): {message}; fix or remove "
                                 f"its files") from None


def _looks_2d(spacing: Sequence[float]) -> bool:
    """nnU-Net's readers give a 2D image a dummy first axis with 999 times the largest spacing."""
    return max(spacing) >= 998 * min(spacing)


def check_unlabeled_image(case_id: str, image_files: List[str], data: np.ndarray, properties: dict,
                          plans_manager: PlansManager, dataset_json: dict) -> None:
    """Refuse an unlabeled image that would train wrong, in one line naming the file and the fix.

    Checked: channels per case (a 4D file counts its volumes), dimensionality and spacing against the labeled images
    (the plans' median spacing), finite values, and constant channels: an all-constant image carries nothing to
    learn from and usually means a broken conversion, so it is refused, not skipped."""
    expected_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    if data.shape[0] != expected_channels:
        raise UnlabeledDataError(f"{', '.join(image_files)} hold(s) {data.shape[0]} channel(s) but dataset.json lists "
                                 f"{expected_channels}: store one channel per file (CASE_0000, CASE_0001, ...)")
    spacing = [float(s) for s in properties["spacing"]]
    median = [float(s) for s in plans_manager.plans["original_median_spacing_after_transp"]]
    where = image_files[0]
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise UnlabeledDataError(f"{where} has spacing {spacing}: fix its header (spacings must be positive)")
    if _looks_2d(spacing) != _looks_2d(median):
        kind, dataset_kind = ("2D", "3D") if _looks_2d(spacing) else ("3D", "2D")
        raise UnlabeledDataError(f"{where} is a {kind} image but the dataset's images are {dataset_kind}: convert or "
                                 f"remove case {case_id}")
    transposed = [spacing[i] for i in plans_manager.transpose_forward]
    if not _looks_2d(spacing) and any(max(s / m, m / s) > MAX_SPACING_RATIO for s, m in zip(transposed, median)):
        median = [median[i] for i in plans_manager.transpose_backward]  # in the image's axis order
        raise UnlabeledDataError(f"{where} has spacing {spacing}, more than {MAX_SPACING_RATIO:g}x away from the "
                                 f"labeled images' median {median} on an axis: fix its header or remove case {case_id}")
    finite = np.isfinite(data)
    if not finite.all():
        raise UnlabeledDataError(f"case {case_id} ({where}) has {int((~finite).sum())} NaN/inf voxel(s): replace them "
                                 f"(e.g. by the background value) or remove the case")
    for c in range(data.shape[0]):
        if data[c].min() == data[c].max():
            raise UnlabeledDataError(f"{image_files[min(c, len(image_files) - 1)]} is constant ({data[c].flat[0]:g} "
                                     f"everywhere): it has nothing to learn from; remove case {case_id}")


def _preprocess_case(case_id: str, image_files: List[str], output_folder: str, preprocessor,
                     plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                     dataset_json: dict, fingerprint: dict) -> None:
    """Check and preprocess one unlabeled case with nnU-Net's preprocessor and save it like ``run_case_save``
    does, but atomically: written to a temporary folder, then renamed into ``output_folder``."""
    data, properties = _read_unlabeled_image(case_id, image_files, plans_manager)
    check_unlabeled_image(case_id, image_files, data, properties, plans_manager, dataset_json)
    try:
        data, seg, properties = preprocessor.run_case_npy(data, None, properties, plans_manager,
                                                          configuration_manager, dataset_json)
    except Exception as e:
        message = f"{type(e).__name__}: {e}".replace("\n", " ")
        raise UnlabeledDataError(f"could not preprocess unlabeled case {case_id} ({image_files[0]}): {message}; "
                                 f"fix or remove its files") from None
    if not np.isfinite(data).all():
        raise UnlabeledDataError(f"preprocessing case {case_id} ({image_files[0]}) gave NaN/inf values (intensities "
                                 f"too large for float32?): rescale or remove the image")
    properties[FINGERPRINT_KEY] = fingerprint
    properties["class_locations"] = {}  # no labels; nnUNetDataLoader reads this key
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)  # crop mask: 0 inside, -1 outside the nonzero region
    patch_size = tuple(configuration_manager.patch_size)
    blocks, chunks = comp_blosc2_params(data.shape, patch_size, data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch_size, seg.itemsize)

    temporary = tempfile.mkdtemp(prefix=case_id + "_", dir=join(output_folder, TEMPORARY_FOLDER))
    try:
        nnUNetDatasetBlosc2.save_case(data, seg, properties, join(temporary, case_id), chunks=chunks, blocks=blocks,
                                      chunks_seg=chunks_seg, blocks_seg=blocks_seg)
        final = join(output_folder, case_id)
        if isfile(final + ".b2nd"):  # redoing a finished case: mark it unfinished before replacing its files
            os.remove(final + ".b2nd")
        for suffix in CASE_FILE_SUFFIXES:
            os.replace(join(temporary, case_id + suffix), final + suffix)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _run_in_pool(jobs: List[tuple], num_processes: int, description: str) -> None:
    """Run ``_preprocess_case`` for each job in a spawn pool with a progress bar, like nnU-Net's
    ``DefaultPreprocessor.run``; re-raises the first worker error."""
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
        workers = list(pool._pool)  # a killed worker is silently replaced and its job lost: watch the originals
        remaining = [pool.apply_async(_preprocess_case, job) for job in jobs]
        with tqdm(desc=description, total=len(jobs)) as progress:
            while remaining:
                if not all(w.is_alive() for w in workers):
                    raise UnlabeledDataError("a preprocessing worker died (often out of RAM): rerun with a smaller "
                                             "-np; finished cases are kept")
                done = [r for r in remaining if r.ready()]
                for r in done:
                    r.get()
                    progress.update()
                remaining = [r for r in remaining if r not in done]
                sleep(0.1)


def preprocess_unlabeled(dataset_name_or_id: Union[int, str], configurations: Sequence[str] = ("3d_fullres",),
                         plans_identifier: str = "nnUNetPlans",
                         num_processes: Union[int, Sequence[int]] = default_num_processes,
                         overwrite: bool = False, verbose: bool = False) -> List[str]:
    """Preprocess ``imagesTrUnlabeled`` of a planned dataset for each configuration; return the output folders.

    ``num_processes``: as ``nnUNetv2_preprocess -np``, one number (alone or in a sequence) for all configurations,
    or one per configuration.
    Everything is validated before anything is written. Finished cases are skipped unless
    ``overwrite``; configurations sharing a data_identifier are done once."""
    processes = [num_processes] if isinstance(num_processes, int) else list(num_processes)
    if len(processes) == 1:
        processes *= len(configurations)
    if len(processes) != len(configurations):
        raise UnlabeledDataError(f"-np takes one number, or one per configuration (as nnUNetv2_preprocess): got "
                                 f"{len(processes)} for {len(configurations)} configuration(s) "
                                 f"{' '.join(configurations)}")
    if min(processes) < 1:
        raise UnlabeledDataError(f"-np must be at least 1, got {' '.join(map(str, processes))}")
    processes_of = dict(zip(configurations, processes))
    dataset_name = _resolve_dataset_name(dataset_name_or_id)
    plans_manager, dataset_json = _load_plans(dataset_name, plans_identifier)
    managers = _configuration_managers(plans_manager, configurations, plans_identifier)
    cases = find_unlabeled_cases(join(nnUNet_raw, dataset_name), dataset_json)
    raw_images = join(nnUNet_raw, dataset_name, UNLABELED_IMAGES_FOLDER)

    done_by: Dict[str, str] = {}  # output folder -> configuration that produced it
    for c, configuration_manager in managers.items():
        output_folder = unlabeled_preprocessed_folder(
            join(nnUNet_preprocessed, dataset_name, configuration_manager.data_identifier))
        if output_folder in done_by:
            print(f"{c}: same preprocessed data as {done_by[output_folder]} ({output_folder}), nothing to do")
            continue
        done_by[output_folder] = c
        fingerprint = preprocessing_fingerprint(plans_manager, configuration_manager, dataset_json)
        present = unlabeled_case_identifiers(output_folder)
        orphans = [k for k in present if k not in cases]  # their images were removed from imagesTrUnlabeled
        if orphans and not overwrite:
            raise UnlabeledDataError(f"{output_folder}: {_describe_orphans(orphans, len(present), raw_images)}, and "
                                     f"training would still use them: put the images back, or add --overwrite to "
                                     f"remove those cases and redo the others")
        if orphans:
            for k in orphans:
                _remove_case(output_folder, k)
            print(f"{c}: removed {len(orphans)} preprocessed case(s) whose images are no longer in {raw_images}")
        finished = set() if overwrite else set(present)
        stale = stale_unlabeled_cases(output_folder, sorted(finished), fingerprint)
        if stale:
            raise UnlabeledDataError(f"{output_folder}: {_describe_stale(stale, len(finished))}, e.g. after nnU-Net's "
                                     f"preprocessing was rerun with new plans: add --overwrite to redo them all")
        todo = [k for k in cases if k not in finished]
        print(f"{c}: {len(cases)} unlabeled case(s) -> {output_folder}: {len(todo)} to preprocess, "
              f"{len(finished)} already finished and skipped" + (" (--overwrite redoes them)" if finished else ""))
        if not todo:
            continue
        temporary = join(output_folder, TEMPORARY_FOLDER)
        shutil.rmtree(temporary, ignore_errors=True)  # leftovers of an interrupted run
        maybe_mkdir_p(temporary)
        preprocessor = configuration_manager.preprocessor_class(verbose=verbose)
        jobs = [(k, cases[k], output_folder, preprocessor, plans_manager, configuration_manager, dataset_json,
                 fingerprint) for k in todo]
        try:
            _run_in_pool(jobs, processes_of[c], f"Preprocessing unlabeled cases ({c})")
        finally:  # the pool's workers are gone by now
            shutil.rmtree(temporary, ignore_errors=True)
    return list(done_by)


def assert_unlabeled_data_ready(dataset_name: str, data_identifier: str, configuration_name: str,
                                plans_identifier: str = "nnUNetPlans", fingerprint: Union[dict, None] = None,
                                dataset_json: Union[dict, None] = None) -> str:
    """Return the unlabeled preprocessed folder for a training run if it holds a finished case (and, given the
    plans' ``fingerprint``, every case was made with those plans, and, where ``imagesTrUnlabeled`` holds images, the
    folder holds exactly those cases); otherwise raise UnlabeledDataError saying what to do. Cheap: three directory
    listings and one small pickle per case. ``dataset_json`` (for the images' file ending) defaults to the one nnU-Net
    copied into nnUNet_preprocessed."""
    if not nnUNet_preprocessed.is_set():
        raise UnlabeledDataError("environment variable nnUNet_preprocessed is not set: export it")
    folder = unlabeled_preprocessed_folder(join(nnUNet_preprocessed, dataset_name, data_identifier))
    command = _preprocess_command(dataset_name, [configuration_name], plans_identifier)
    case_ids = unlabeled_case_identifiers(folder)
    raw_images = join(nnUNet_raw.get(), dataset_name, UNLABELED_IMAGES_FOLDER) if nnUNet_raw.is_set() else None
    if case_ids:
        stale = stale_unlabeled_cases(folder, case_ids, fingerprint) if fingerprint is not None else {}
        if stale:
            raise UnlabeledDataError(f"the unlabeled data in {folder} does not match the plans of configuration "
                                     f"{configuration_name}: {_describe_stale(stale, len(case_ids))}: run "
                                     f"`{command} --overwrite`")
        _assert_cases_match_raw_images(folder, case_ids, raw_images, dataset_name, dataset_json, configuration_name,
                                       command)
        return folder
    if raw_images is None or not _visible_files(raw_images):
        where = raw_images or f"$nnUNet_raw/{dataset_name}/{UNLABELED_IMAGES_FOLDER} (nnUNet_raw is not set)"
        raise UnlabeledDataError(f"CAML needs unlabeled images: put them in {where} (named like imagesTr), "
                                 f"then run `{command}`")
    raise UnlabeledDataError(f"the unlabeled images in {raw_images} are not preprocessed for configuration "
                             f"{configuration_name} (no finished case in {folder}): run `{command}`")


def _assert_cases_match_raw_images(folder: str, case_ids: Sequence[str], raw_images: Union[str, None],
                                   dataset_name: str, dataset_json: Union[dict, None], configuration_name: str,
                                   command: str) -> None:
    """Refuse preprocessed unlabeled cases that differ from the images in ``raw_images``: images added (or left
    unfinished by an interrupted run) that training would silently leave out, or images removed that it would still
    use. Where the raw images are not there (e.g. only nnUNet_preprocessed was copied to the training machine), there
    is nothing to compare."""
    visible_names = _visible_files(raw_images) if raw_images is not None else []
    if not visible_names:
        return
    if dataset_json is None:
        dataset_json_file = join(nnUNet_preprocessed, dataset_name, "dataset.json")
        if not isfile(dataset_json_file):
            return
        dataset_json = load_json(dataset_json_file)
    name_pattern = _image_name_pattern(dataset_json["file_ending"])
    raw_ids = {match.group(1) for match in map(name_pattern.fullmatch, visible_names) if match is not None}
    missing = sorted(raw_ids - set(case_ids))
    if missing:
        raise UnlabeledDataError(f"{len(missing)} of {len(raw_ids)} unlabeled case(s) in {raw_images} are not "
                                 f"preprocessed for configuration {configuration_name} (e.g. {missing[0]}; added "
                                 f"since, or the preprocessing was interrupted), so training would leave them out: "
                                 f"run `{command}`")
    orphans = sorted(set(case_ids) - raw_ids)
    if orphans:
        raise UnlabeledDataError(f"{folder}: {_describe_orphans(orphans, len(case_ids), raw_images)}, and training "
                                 f"would still use them: put the images back, or run `{command} --overwrite`")


def preprocess_unlabeled_entry() -> None:
    """``nnUNetv2_caml_preprocess_unlabeled``: command-line wrapper around ``preprocess_unlabeled``."""
    parser = argparse.ArgumentParser(
        description=f"Preprocess the unlabeled images in $nnUNet_raw/DatasetXXX/{UNLABELED_IMAGES_FOLDER} for CAML, "
                    f"with the plans of `nnUNetv2_plan_and_preprocess` (run that first).")
    parser.add_argument("-d", nargs="+", required=True, help="dataset ID(s) or name(s)")
    parser.add_argument("-c", nargs="+", default=["3d_fullres"], help="configuration(s). Default: 3d_fullres")
    parser.add_argument("-plans_name", default="nnUNetPlans", help="plans identifier. Default: nnUNetPlans")
    parser.add_argument("-np", type=int, nargs="+", default=[default_num_processes],
                        help=f"number of worker processes: one number for all configurations, or one per "
                             f"configuration (as nnUNetv2_preprocess). Default: {default_num_processes}")
    parser.add_argument("--overwrite", action="store_true", help="redo cases that are already finished")
    parser.add_argument("--verbose", action="store_true", help="print the preprocessor's per-case output")
    args = parser.parse_args()
    run_resumable_command(lambda: [preprocess_unlabeled(d, args.c, args.plans_name, args.np, args.overwrite,
                                                        args.verbose) for d in args.d])
