"""Convert the CAS 2023 data (MICCAI 2023 cerebral artery segmentation challenge) for CAML.

Expects data/<id>.nii.gz (images) and mask/<id>.nii.gz (labels, any value > 0 -> 1) in SOURCE_DIR or one
folder below it. Every image needs its mask and every mask its image.

Writes $nnUNet_raw/DatasetXXX_CAS2023/ with imagesTr/labelsTr (the N labeled training cases),
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
    name="CAS2023",
    channel_names={"0": "MRA"},
    labels={"background": 0, "cerebral_artery": 1},
    description="Cerebral arteries in TOF-MRA, CAS 2023 challenge (MICCAI 2023); semi-supervised split for CAML "
                "(imagesTrUnlabeled holds the unlabeled training images)",
    reference="Cerebral Artery Segmentation Challenge (CAS 2023), MICCAI 2023",
    licence="see the challenge's data terms",
)
LAYOUT = "data/<id>.nii.gz and mask/<id>.nii.gz"


def find_cases(source: str) -> Dict[str, Case]:
    root = common.find_root(source, lambda d: all(os.path.isdir(os.path.join(d, s)) for s in ("data", "mask")),
                            LAYOUT)
    data, mask = os.path.join(root, "data"), os.path.join(root, "mask")
    images, labels = common.nifti_stems(data), common.nifti_stems(mask)
    if not images:
        raise ConversionError(f"no image in {data}: expected {LAYOUT}")
    for case_id in images:
        if case_id not in labels:
            raise ConversionError(f"case {case_id} has no label: {os.path.join(mask, case_id)}.nii.gz not found")
    for case_id in labels:
        if case_id not in images:
            raise ConversionError(f"label {os.path.join(mask, case_id)}.nii.gz has no image in {data}")
    return {c: Case(c, Volume(common.image_file(data, c)), Volume(common.image_file(mask, c))) for c in images}


def main(argv: Optional[Sequence[str]] = None) -> str:
    return common.convert_paired_dataset(__doc__, INFO, find_cases, f"folder holding {LAYOUT}",
                                         "dataset_conversion/cas2023.py", argv)


def cli() -> None:
    """Console script ``nnUNetv2_caml_convert_cas2023``."""
    common.run(main)


if __name__ == "__main__":
    cli()
