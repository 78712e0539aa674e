"""Convert the Parse 2022 data (MICCAI 2022 pulmonary artery segmentation challenge) for CAML.

Expects one folder per case, <case>/image/<case>.nii.gz and <case>/label/<case>.nii.gz (labels: any value
> 0 -> 1), in SOURCE_DIR or one folder below it (e.g. 'train/'). A case folder is a folder holding image/
or label/; if image/ or label/ holds a single NIfTI file under another name, that file is used.

Writes $nnUNet_raw/DatasetXXX_Parse2022/ with imagesTr/labelsTr (the N labeled training cases),
imagesTrUnlabeled (the other training cases, images only), imagesTs/labelsTs (the test split),
dataset.json (numTraining = N) and conversion.json (split, case ids).

Split: the sorted case ids shuffled with --seed, 90 % training / 10 % test (--test-fraction), labeled =
the first N shuffled training ids; or --split-file to follow a paper's protocol.
"""
import os
import sys
from typing import Dict, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the dataset_conversion package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset_conversion import common  # noqa: E402
from dataset_conversion.common import Case, ConversionError, Volume  # noqa: E402

INFO = common.DatasetInfo(
    name="Parse2022",
    channel_names={"0": "CT"},
    labels={"background": 0, "pulmonary_artery": 1},
    description="Pulmonary artery in CTPA, Parse 2022 challenge (MICCAI 2022); semi-supervised split for CAML "
                "(imagesTrUnlabeled holds the unlabeled training images)",
    reference="Luo et al., Efficient automatic segmentation for multi-level pulmonary arteries: the PARSE "
              "challenge, 2023 (arXiv 2304.03708)",
    licence="see the challenge's data terms (parse2022.grand-challenge.org)",
)
LAYOUT = "<case>/image/<case>.nii.gz and <case>/label/<case>.nii.gz"


def _case_folders(folder: str):
    return [d for d in common._visible_subfolders(folder)
            if os.path.isdir(os.path.join(d, "image")) or os.path.isdir(os.path.join(d, "label"))]


def _volume_file(case_folder: str, kind: str) -> Optional[str]:
    """<case>/<kind>/<case>.nii.gz, else the only NIfTI file in <case>/<kind>/."""
    case_id, folder = os.path.basename(case_folder), os.path.join(case_folder, kind)
    if not os.path.isdir(folder):
        return None
    exact = common.image_file(folder, case_id)
    if exact is not None:
        return exact
    stems = common.nifti_stems(folder)
    return common.image_file(folder, stems[0]) if len(stems) == 1 else None


def find_cases(source: str) -> Dict[str, Case]:
    root = common.find_root(source, lambda d: bool(_case_folders(d)), LAYOUT)
    cases = {}
    for folder in _case_folders(root):
        case_id = os.path.basename(folder)
        image, label = _volume_file(folder, "image"), _volume_file(folder, "label")
        if image is None:
            raise ConversionError(f"case {case_id} has no image: expected {folder}/image/{case_id}.nii.gz")
        if label is None:
            raise ConversionError(f"case {case_id} has no label: expected {folder}/label/{case_id}.nii.gz")
        cases[case_id] = Case(case_id, Volume(image), Volume(label))
    return cases


def main(argv: Optional[Sequence[str]] = None) -> str:
    return common.convert_paired_dataset(__doc__, INFO, find_cases, f"folder holding {LAYOUT}",
                                         "dataset_conversion/parse2022.py", argv)


def cli() -> None:
    """Console script ``nnUNetv2_caml_convert_parse2022``."""
    common.run(main)


if __name__ == "__main__":
    cli()
