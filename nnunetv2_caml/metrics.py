"""Segmentation metrics as the semi-supervised papers report them: Dice, Jaccard, 95HD, ASD (and clDice for vessels).

``nnUNetv2_caml_evaluate -ref LABELS_DIR -pred PRED_DIR`` compares two folders of label maps and prints and saves
per-case and mean values. The Python API is :func:`case_metrics` (two binary masks) and :func:`evaluate_folders`.

Definitions (binary masks ``P`` = prediction, ``R`` = reference; every non-zero voxel is foreground):

- ``dice`` = 2 |P ∩ R| / (|P| + |R|);  ``jaccard`` = |P ∩ R| / |P ∪ R|.
- Surfaces as in ``medpy.metric.binary``: a mask's surface is the mask minus its erosion by the connectivity-1
  structuring element (voxels outside the image count as background). ``d(P->R)`` = for each surface voxel of P the
  Euclidean distance to the nearest surface voxel of R (``scipy.ndimage.distance_transform_edt`` with the spacing).
- ``hd95`` = 95th percentile of ``d(P->R)`` and ``d(R->P)`` pooled (= ``medpy.metric.binary.hd95(P, R)``).
- ``asd`` = mean of ``d(P->R)``: the *directed* average surface distance of ``medpy.metric.binary.asd(P, R)``, which
  is what the LA papers (UA-MT, MC-Net, CAML, ...) call "ASD" — despite the name, medpy's ``asd`` is not symmetric.
- ``assd`` = mean of ``d(P->R)`` and ``d(R->P)`` pooled (= ``medpy.metric.binary.assd(P, R)``), the symmetric one.
- ``cldice`` (only when asked for; Shit et al., CVPR 2021) = 2 Tprec Tsens / (Tprec + Tsens) with
  Tprec = |S(P) ∩ R| / |S(P)|, Tsens = |S(R) ∩ P| / |S(R)|, ``S`` = ``skimage.morphology.skeletonize`` (Lee's
  method in 3D, Zhang's in 2D). A non-empty mask whose skeleton comes out empty is its own skeleton.

Distances are in mm from the image spacing (read with SimpleITK; numpy arrays are z, y, x, so the spacing is
reversed) or, with ``voxel_units=True``, in voxels (medpy with ``voxelspacing=None``; what the LA papers report).
Distances are computed on the bounding box of ``P ∪ R`` padded by one voxel, which gives exactly the values of the
full image.

Empty masks (medpy raises; here every case gets a result):

- both empty: dice = jaccard = cldice = 1, hd95 = asd = assd = 0, ``note`` = "reference and prediction empty";
- one empty: dice = jaccard = cldice = 0, hd95 = asd = assd = NaN (``null`` in JSON),
  ``note`` = "prediction empty" or "reference empty".

Means skip NaN; each mean reports ``n_cases`` and ``n_excluded`` (per metric, the cases left out as NaN). A mean
over nothing but NaN is NaN.

Result layout of :func:`evaluate_folders` (fractions in [0, 1] for dice/jaccard/cldice)::

    {"mean":  {...}, "cases": {"<case id>": {...}, ...},
     "labels": [1], "units": "voxel" | "mm", "metrics": ["dice", "jaccard", "hd95", "asd", "assd"(, "cldice")],
     "reference_folder": ..., "prediction_folder": ..., "unmatched_predictions": [...], "warnings": [...]}

- one foreground label evaluated (binary): flat, ``cases[id] = {"dice": .., "jaccard": .., "hd95": .., "asd": ..,
  "assd": .., ("cldice": ..,) ("note": ..)}`` and ``mean = {"dice": .., ..., "n_cases": N, "n_excluded": {...}}``;
- several labels: one entry per label (as a string) plus ``"foreground_mean"``:
  ``cases[id] = {"1": {...}, "2": {...}, "foreground_mean": {metric: mean over labels, NaN skipped}}`` (the
  per-case foreground mean gets a ``note`` naming the labels whose NaN it skipped),
  ``mean = {"1": {..., "n_cases", "n_excluded"}, "2": {...}, "foreground_mean": {metric: mean of the label
  means}}``.

Labels: ``labels=None`` evaluates every non-zero value that occurs in any reference or prediction (a label absent
from both masks of a case counts as "both empty" there); pass ``labels=[1]`` to force the binary layout.
"""
import argparse
import json
import math
import multiprocessing
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

SURFACE_METRICS = ("hd95", "asd", "assd")
OVERLAP_METRICS = ("dice", "jaccard")
IMAGE_FILE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
DEFAULT_OUTPUT_NAME = "summary_caml.json"
FOREGROUND_MEAN = "foreground_mean"
NOTE_BOTH_EMPTY = "reference and prediction empty"
NOTE_PREDICTION_EMPTY = "prediction empty"
NOTE_REFERENCE_EMPTY = "reference empty"


class MetricsError(RuntimeError):
    """A problem with the folders to compare that the user must fix; the message is one line naming the case."""


def metric_names(cldice: bool = False) -> List[str]:
    """The metric keys of one result, in table order."""
    return [*OVERLAP_METRICS, *SURFACE_METRICS] + (["cldice"] if cldice else [])


# ----------------------------------------------------------------------------- one pair of binary masks
def _padded_bbox(mask: np.ndarray, pad: int = 1) -> Tuple[slice, ...]:
    """Slices of the bounding box of a non-empty mask, grown by ``pad`` voxels and clipped to the image."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other)) if other else np.flatnonzero(mask)
        box.append(slice(max(int(hits[0]) - pad, 0), min(int(hits[-1]) + 1 + pad, mask.shape[axis])))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    """The one-voxel border of a mask, as medpy defines it (mask XOR its connectivity-1 erosion)."""
    footprint = generate_binary_structure(mask.ndim, 1)
    return mask ^ binary_erosion(mask, structure=footprint, iterations=1)


def surface_distances(source: np.ndarray, target: np.ndarray,
                      spacing: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Directed surface distances ``(d(source->target), d(target->source))`` of two non-empty boolean masks.

    ``spacing`` in the arrays' axis order, or None for voxels. Equals medpy's private ``__surface_distances`` in both
    directions; computed on the padded bounding box of the union, which changes no value.
    """
    box = _padded_bbox(source | target)
    source, target = source[box], target[box]
    sampling = None if spacing is None else np.asarray(spacing, dtype=np.float64)
    source_border, target_border = _surface(source), _surface(target)
    to_target = distance_transform_edt(~target_border, sampling=sampling)[source_border]
    to_source = distance_transform_edt(~source_border, sampling=sampling)[target_border]
    return to_target, to_source


def _skeleton(mask: np.ndarray) -> np.ndarray:
    from skimage.morphology import skeletonize

    skeleton = skeletonize(mask).astype(bool)
    return skeleton if skeleton.any() else mask


def centerline_dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Centre-line Dice of two binary masks (Shit et al., CVPR 2021); both empty -> 1, one empty -> 0."""
    reference, prediction = reference.astype(bool), prediction.astype(bool)
    if not reference.any() and not prediction.any():
        return 1.0
    if not reference.any() or not prediction.any():
        return 0.0
    box = _padded_bbox(reference | prediction)
    reference, prediction = reference[box], prediction[box]
    skeleton_pred, skeleton_ref = _skeleton(prediction), _skeleton(reference)
    topology_precision = np.count_nonzero(skeleton_pred & reference) / np.count_nonzero(skeleton_pred)
    topology_sensitivity = np.count_nonzero(skeleton_ref & prediction) / np.count_nonzero(skeleton_ref)
    if topology_precision + topology_sensitivity == 0:
        return 0.0
    return float(2 * topology_precision * topology_sensitivity / (topology_precision + topology_sensitivity))


def case_metrics(reference: np.ndarray, prediction: np.ndarray, spacing: Optional[Sequence[float]] = None,
                 voxel_units: bool = False, cldice: bool = False) -> dict:
    """Dice, Jaccard, hd95, asd, assd (and clDice) of one pair of binary masks (non-zero = foreground).

    ``spacing``: voxel size in the arrays' axis order (z, y, x for a SimpleITK array), used for the distances unless
    ``voxel_units`` (then distances are in voxels and ``spacing`` may be None). Empty masks: see the module
    docstring (both empty -> 1/0, one empty -> 0/NaN, with a ``note``).
    """
    reference, prediction = np.asarray(reference).astype(bool), np.asarray(prediction).astype(bool)
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} != prediction shape {prediction.shape}")
    if not voxel_units:
        if spacing is None:
            raise ValueError("spacing is needed for distances in mm (or pass voxel_units=True)")
        if len(spacing) != reference.ndim:
            raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {reference.ndim}D image")
    size_ref, size_pred = np.count_nonzero(reference), np.count_nonzero(prediction)
    result: dict = {}
    if size_ref == 0 or size_pred == 0:
        both = size_ref == 0 and size_pred == 0
        value, distance = (1.0, 0.0) if both else (0.0, math.nan)
        result.update({m: value for m in OVERLAP_METRICS})
        result.update({m: distance for m in SURFACE_METRICS})
        if cldice:
            result["cldice"] = value
        if both:
            result["note"] = NOTE_BOTH_EMPTY
        else:
            result["note"] = NOTE_PREDICTION_EMPTY if size_pred == 0 else NOTE_REFERENCE_EMPTY
        return result
    intersection = np.count_nonzero(reference & prediction)
    result["dice"] = float(2.0 * intersection / (size_ref + size_pred))
    result["jaccard"] = float(intersection / (size_ref + size_pred - intersection))
    pred_to_ref, ref_to_pred = surface_distances(prediction, reference, None if voxel_units else spacing)
    pooled = np.concatenate([pred_to_ref, ref_to_pred])
    result["hd95"] = float(np.percentile(pooled, 95))
    result["asd"] = float(pred_to_ref.mean())
    result["assd"] = float(pooled.mean())
    if cldice:
        result["cldice"] = centerline_dice(reference, prediction)
    return result


# ----------------------------------------------------------------------------- folders
def _image_files(folder: str) -> Dict[str, str]:
    """``{case id: file name}`` of the image files in a folder (known endings only; other files are ignored)."""
    cases = {}
    for name in sorted(os.listdir(folder)):
        ending = next((e for e in IMAGE_FILE_ENDINGS if name.endswith(e)), None)
        if ending is not None and not name.startswith(".") and os.path.isfile(os.path.join(folder, name)):
            cases[name[:-len(ending)]] = name
    return cases


def _read(path: str) -> Tuple[np.ndarray, Tuple[float, ...]]:
    """Label array (numpy axis order) and its spacing in the same order (SimpleITK's x, y, z reversed)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(image), tuple(float(s) for s in reversed(image.GetSpacing()))


def _labels_present(array: np.ndarray) -> set:
    if np.issubdtype(array.dtype, np.integer) and array.size and array.min() >= 0 and array.max() < 2 ** 16:
        return {int(v) for v in np.flatnonzero(np.bincount(array.ravel())) if v != 0}
    return {v.item() for v in np.unique(array) if v != 0}


def _evaluate_case(case: str, reference_file: str, prediction_file: str, labels: Optional[List[int]],
                   voxel_units: bool, want_cldice: bool) -> Tuple[str, Dict[int, dict], Optional[str]]:
    """``(case, {label: case_metrics}, warning or None)`` for one pair of files; ``labels=None``: the labels
    present in either. A spacing that differs between the two files is a warning (the reference's is used)."""
    reference, spacing = _read(reference_file)
    prediction, prediction_spacing = _read(prediction_file)
    if reference.shape != prediction.shape:
        raise MetricsError(f"case {case}: prediction shape {prediction.shape} differs from reference shape "
                           f"{reference.shape} ({prediction_file})")
    warning = None
    if not np.allclose(spacing, prediction_spacing, rtol=1e-4, atol=1e-6):
        warning = (f"case {case}: prediction spacing {prediction_spacing} differs from reference spacing {spacing} "
                   f"(z, y, x); the reference's is used")
    if labels is None:
        labels = sorted(_labels_present(reference) | _labels_present(prediction))
    return case, {label: case_metrics(reference == label, prediction == label, spacing, voxel_units, want_cldice)
                  for label in labels}, warning


def _empty_result(want_cldice: bool) -> dict:
    return case_metrics(np.zeros(1, bool), np.zeros(1, bool), voxel_units=True, cldice=want_cldice)


def _mean(results: List[dict], names: List[str]) -> dict:
    """NaN-skipping mean of each metric, with ``n_cases`` and ``n_excluded`` per metric."""
    summary: dict = {}
    excluded = {}
    for name in names:
        values = np.array([r[name] for r in results], dtype=np.float64)
        finite = values[~np.isnan(values)]
        summary[name] = float(finite.mean()) if finite.size else math.nan
        excluded[name] = int(values.size - finite.size)
    summary["n_cases"] = len(results)
    summary["n_excluded"] = excluded
    return summary


def _nan_mean(values: List[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def evaluate_folders(reference_folder: str, prediction_folder: str, voxel_units: bool = False, cldice: bool = False,
                     labels: Optional[Sequence[int]] = None, num_processes: int = 1) -> dict:
    """Compare every label map in ``reference_folder`` with the file of the same name in ``prediction_folder``.

    Returns ``{"mean": ..., "cases": ..., "labels", "units", "metrics", "reference_folder", "prediction_folder",
    "unmatched_predictions", "warnings"}``; the layout (flat for one label, per label plus ``foreground_mean`` for
    several) and the empty-mask conventions are in the module docstring. Raises :class:`MetricsError` (one line,
    naming the case) for a missing folder, no reference files, a missing prediction or a shape mismatch.
    Predictions without a reference are ignored and listed under ``unmatched_predictions``; a prediction whose
    spacing differs from its reference's is evaluated with the reference's spacing and listed under ``warnings``.
    """
    for role, folder in (("reference", reference_folder), ("prediction", prediction_folder)):
        if not os.path.isdir(folder):
            raise MetricsError(f"{role} folder {folder} does not exist")
    references, predictions = _image_files(reference_folder), _image_files(prediction_folder)
    if not references:
        raise MetricsError(f"no label files ({', '.join(IMAGE_FILE_ENDINGS)}) in reference folder {reference_folder}")
    prediction_names = set(predictions.values())
    missing = [case for case, name in references.items() if name not in prediction_names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MetricsError(f"no prediction for case {missing[0]}{more}: expected "
                           f"{os.path.join(prediction_folder, references[missing[0]])}")
    reference_names = set(references.values())
    unmatched = sorted(case for case, name in predictions.items() if name not in reference_names)
    if labels is not None:
        labels = sorted({int(label) for label in labels})
        if not labels or 0 in labels:
            raise MetricsError(f"labels must be foreground labels (non-zero), got {labels}")

    jobs = [(case, os.path.join(reference_folder, name), os.path.join(prediction_folder, name), labels, voxel_units,
             cldice) for case, name in references.items()]
    if num_processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            outcomes = pool.starmap(_evaluate_case, jobs)
    else:
        outcomes = [_evaluate_case(*job) for job in jobs]
    per_case = {case: results for case, results, _ in outcomes}
    warnings = [warning for _, _, warning in outcomes if warning]

    names = metric_names(cldice)
    evaluated = labels if labels is not None else sorted(set().union(*(r.keys() for r in per_case.values())))
    if not evaluated:
        raise MetricsError(f"no foreground label in any reference or prediction of {reference_folder}; "
                           f"pass the labels to evaluate with -l")
    for results in per_case.values():  # labels found only in other cases: absent from both masks here
        for label in evaluated:
            results.setdefault(label, _empty_result(cldice))

    if len(evaluated) == 1:
        label = evaluated[0]
        cases = {case: per_case[case][label] for case in references}
        mean = _mean(list(cases.values()), names)
    else:
        cases = {}
        for case in references:
            entry = {str(label): per_case[case][label] for label in evaluated}
            entry[FOREGROUND_MEAN] = {n: _nan_mean([entry[str(label)][n] for label in evaluated]) for n in names}
            skipped = [str(label) for label in evaluated if any(math.isnan(entry[str(label)][n]) for n in names)]
            if skipped:
                entry[FOREGROUND_MEAN]["note"] = f"NaN of label(s) {', '.join(skipped)} skipped"
            cases[case] = entry
        mean = {str(label): _mean([per_case[case][label] for case in references], names) for label in evaluated}
        mean[FOREGROUND_MEAN] = {n: _nan_mean([mean[str(label)][n] for label in evaluated]) for n in names}
    return {"mean": mean, "cases": cases, "labels": list(evaluated), "units": "voxel" if voxel_units else "mm",
            "metrics": names, "reference_folder": os.path.abspath(reference_folder),
            "prediction_folder": os.path.abspath(prediction_folder), "unmatched_predictions": unmatched,
            "warnings": warnings}


# ----------------------------------------------------------------------------- output
def to_json_compatible(value):
    """NaN/inf -> None (JSON null), numpy scalars -> Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): to_json_compatible(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_compatible(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def save_summary(summary: dict, output_file: str) -> None:
    with open(output_file, "w") as f:
        json.dump(to_json_compatible(summary), f, indent=2, allow_nan=False)


def format_table(summary: dict) -> str:
    """The per-case and mean table that ``nnUNetv2_caml_evaluate`` prints."""
    names = summary["metrics"]
    unit = "vox" if summary["units"] == "voxel" else "mm"
    headers = [f"{n} ({unit})" if n in SURFACE_METRICS else n for n in names]
    multi = len(summary["labels"]) > 1
    case_width = max([len("mean")] + [len(c) for c in summary["cases"]])
    widths = [max(len(h), 9) for h in headers]

    def number(value) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"

    def row(case: str, label: str, values: dict, note: str = "") -> str:
        cells = [f"{case:<{case_width}}"] + ([f"{label:>{len(FOREGROUND_MEAN)}}"] if multi else [])
        cells += [f"{number(values[n]):>{w}}" for n, w in zip(names, widths)]
        return "  ".join(cells + ([note] if note else [])).rstrip()

    head = [f"{'case':<{case_width}}"] + ([f"{'label':>{len(FOREGROUND_MEAN)}}"] if multi else [])
    lines = ["  ".join(head + [f"{h:>{w}}" for h, w in zip(headers, widths)] + ["note"])]
    keys = [str(label) for label in summary["labels"]] + [FOREGROUND_MEAN] if multi else [None]
    for case, entry in summary["cases"].items():
        for key in keys:
            values = entry if key is None else entry[key]
            lines.append(row(case, key or "", values, values.get("note", "")))
    lines.append("-" * len(lines[0]))
    for key in keys:
        values = summary["mean"] if key is None else summary["mean"][key]
        excluded: Dict[int, List[str]] = {}
        for name, count in values.get("n_excluded", {}).items():
            if count:
                excluded.setdefault(count, []).append(name)
        note = "; ".join(f"{count} of {values['n_cases']} cases excluded from {', '.join(group)} (NaN)"
                         for count, group in excluded.items())
        lines.append(row("mean", key or "", values, note))
    return "\n".join(lines)


def evaluate_entry() -> None:
    """``nnUNetv2_caml_evaluate``: command-line wrapper around :func:`evaluate_folders`."""
    parser = argparse.ArgumentParser(
        description="Dice, Jaccard, 95% Hausdorff distance, average surface distance (and clDice) of the label maps "
                    "in PRED_DIR against those of the same file name in LABELS_DIR. Prints a per-case and mean "
                    "table and writes it as JSON. asd is medpy's directed asd(prediction, reference) as the LA "
                    "papers report it; assd is the symmetric one. One empty mask: dice 0, distances null, excluded "
                    "from the means; both empty: dice 1, distances 0.")
    parser.add_argument("-ref", required=True, metavar="LABELS_DIR", help="folder with the reference label maps")
    parser.add_argument("-pred", required=True, metavar="PRED_DIR", help="folder with the predicted label maps")
    parser.add_argument("-o", metavar="SUMMARY_JSON", default=None,
                        help=f"output JSON file. Default: PRED_DIR/{DEFAULT_OUTPUT_NAME}. An existing file is not "
                             f"overwritten unless --overwrite is given")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output JSON file")
    parser.add_argument("--voxel-units", action="store_true",
                        help="hd95/asd/assd in voxels instead of mm (as the LA papers report them)")
    parser.add_argument("--cldice", action="store_true", help="also compute centre-line Dice (for vessels; slower)")
    parser.add_argument("-l", nargs="+", type=int, default=None, metavar="LABEL",
                        help="foreground labels to evaluate. Default: every non-zero label found in the files; "
                             "one label gives flat per-case keys, several give one entry per label")
    parser.add_argument("-np", type=int, default=1, help="number of worker processes. Default: 1")
    args = parser.parse_args()
    output_file = args.o if args.o is not None else os.path.join(args.pred, DEFAULT_OUTPUT_NAME)
    try:
        if os.path.exists(output_file) and not args.overwrite:
            raise MetricsError(f"{output_file} exists; pass --overwrite to replace it or -o to write elsewhere")
        summary = evaluate_folders(args.ref, args.pred, args.voxel_units, args.cldice, args.l, args.np)
    except MetricsError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(1)
    print(format_table(summary))
    for warning in summary["warnings"]:
        print(f"WARNING: {warning}")
    unmatched = summary["unmatched_predictions"]
    if unmatched:
        print(f"ignored {len(unmatched)} prediction(s) without a reference: {', '.join(unmatched[:5])}"
              f"{' ...' if len(unmatched) > 5 else ''}")
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    save_summary(summary, output_file)
    print(f"wrote {output_file}")


if __name__ == "__main__":
    evaluate_entry()
