"""Convert ImageCAS (coronary arteries in CTA, 1000 cases) into an nnU-Net raw dataset for CAML.

Expects <id>.img.nii.gz (images) and <id>.label.nii.gz (labels, any value > 0 -> 1) anywhere below
SOURCE_DIR (e.g. the unpacked archives 1-200/, 201-400/, ...). Browser duplicates are skipped: folders and
files whose name (without .nii.gz) ends in "(1)", "(2)", ... (e.g. '1-200 (1)/', '1.img(1).nii.gz').
The same id found twice elsewhere stops the conversion. Every image needs its label and every label its image.

Writes $nnUNet_raw/DatasetXXX_ImageCAS/ with imagesTr/labelsTr (the N labeled training cases),
imagesTrUnlabeled (the other training cases, images only), imagesTs/labelsTs (the test split),
dataset.json (numTraining = N) and conversion.json (split, case ids). Case ids are zero-padded: 1 -> 0001.

Split: the sorted case ids shuffled with --seed, 90 % training / 10 % test (--test-fraction), labeled =
the first N shuffled training ids; or --split-file, e.g. the official workbook imageCAS_data_split.xlsx
(sheet 'v2-latest', id column 'FileName', split column 'Split-1' .. 'Split-4' with Training /
Validation / Testing; needs openpyxl, or save the sheet as .csv). Its rows are in id order: add
--shuffle-train to draw the N labeled cases at random (with --seed) instead of taking ids 1..N.
"""
import os
import re
import sys
from typing import Dict, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the dataset_conversion package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset_conversion import common  # noqa: E402
from dataset_conversion.common import Case, ConversionError, Volume  # noqa: E402

INFO = common.DatasetInfo(
    name="ImageCAS",
    channel_names={"0": "CT"},
    labels={"background": 0, "coronary_artery": 1},
    description="Coronary arteries in CTA, ImageCAS; semi-supervised split for CAML (imagesTrUnlabeled holds the "
                "unlabeled training images)",
    reference="Zeng et al., ImageCAS: A large-scale dataset and benchmark for coronary artery segmentation based "
              "on computed tomography angiography images, Computerized Medical Imaging and Graphics 2023",
    licence="see the dataset's terms (kaggle.com/datasets/xiaoweixumedicalai/imagecas)",
)
LAYOUT = "<id>.img.nii.gz and <id>.label.nii.gz files (in SOURCE_DIR or any folder below it)"
DUPLICATE = re.compile(r"\s*\(\d+\)$")
FILE = re.compile(r"(.+)\.(img|label)\.nii\.gz")


def find_cases(source: str) -> Dict[str, Case]:
    found: Dict[str, Dict[str, str]] = {"img": {}, "label": {}}
    skipped = 0
    for folder, subfolders, files in os.walk(source):
        kept = [d for d in subfolders if not d.startswith(".") and d not in common.IGNORED_NAMES
                and not DUPLICATE.search(d)]
        skipped += sum(1 for d in subfolders if DUPLICATE.search(d))
        subfolders[:] = sorted(kept)
        for f in sorted(files):
            if f.startswith("."):
                continue
            if DUPLICATE.search(f[:-len(".nii.gz")] if f.endswith(".nii.gz") else f):
                skipped += 1
                continue
            match = FILE.fullmatch(f)
            if match is None:
                continue
            case_id, kind = match.groups()
            path = os.path.join(folder, f)
            if case_id in found[kind]:
                raise ConversionError(f"case {case_id} found twice: {found[kind][case_id]} and {path}: remove one")
            found[kind][case_id] = path
    images, labels = found["img"], found["label"]
    if not images:
        raise ConversionError(f"unknown layout in {source}: expected {LAYOUT}")
    for case_id in sorted(images):
        if case_id not in labels:
            raise ConversionError(f"case {case_id} has no label: {case_id}.label.nii.gz not found next to "
                                  f"{images[case_id]}")
    for case_id in sorted(labels):
        if case_id not in images:
            raise ConversionError(f"label {labels[case_id]} has no image ({case_id}.img.nii.gz)")
    if skipped:
        print(f"Skipped {skipped} duplicate folder(s)/file(s) named '... (n)'")
    return {c: Case(c, Volume(images[c]), Volume(labels[c])) for c in sorted(images)}


def main(argv: Optional[Sequence[str]] = None) -> str:
    return common.convert_paired_dataset(__doc__, INFO, find_cases, f"folder holding {LAYOUT}",
                                         "dataset_conversion/imagecas.py", argv)


def cli() -> None:
    """Console script ``nnUNetv2_caml_convert_imagecas``."""
    common.run(main)


if __name__ == "__main__":
    cli()
