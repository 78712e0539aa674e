"""Convert the 2018 Atrial Segmentation Challenge data (LA) into an nnU-Net raw dataset for CAML.

Writes $nnUNet_raw/DatasetXXX_LA2018/ with imagesTr/labelsTr (the N labeled training cases),
imagesTrUnlabeled (the other training cases, images only), imagesTs/labelsTs (the test split),
dataset.json (numTraining = N) and conversion.json (split, case ids).

Two public forms, detected automatically (--form to force one):

h5    the form used by UA-MT, SSL4MIS and CAML: one folder per case holding mri_norm2.h5 with the
      datasets 'image' (float32, z-scored, cropped around the atrium) and 'label' (uint8 0/1), in
      '2018LA_Seg_Training Set/' (SOURCE_DIR itself or one folder below it), and the lists train.list
      (80 ids) and test.list (20 ids) in the case folder's parent, SOURCE_DIR or SOURCE_DIR's parent
      (or --train-list/--test-list). Labeled = the first N ids of train.list in file order, as in the
      papers. The arrays are read in the order they are stored, (x, y, z) as UA-MT's preprocessing
      wrote them from the NRRD files; they become NIfTI volumes of size (x, y, z) with 0.625 mm isotropic
      spacing, origin 0 and identity direction (the h5 files store no geometry).
nrrd  the challenge's raw form: <case>/lgemri.nrrd (image) and <case>/laendo.nrrd (label, 255 -> 1),
      geometry as SimpleITK reads it from the NRRD headers. With train.list/test.list (found as above
      or given) the split is theirs; without them, a seeded split: the sorted case ids shuffled with
      --seed, 80 % training / 20 % test (--test-fraction), labeled = the first N shuffled training ids.

If the case folders hold both forms, the h5 form (the papers' protocol) is used.
"""
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the dataset_conversion package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset_conversion import common  # noqa: E402
from dataset_conversion.common import Case, ConversionError, Volume  # noqa: E402

INFO = common.DatasetInfo(
    name="LA2018",
    channel_names={"0": "MRI"},
    labels={"background": 0, "left_atrium": 1},
    description="Left atrium in LGE-MRI, 2018 Atrial Segmentation Challenge; semi-supervised split for CAML "
                "(imagesTrUnlabeled holds the unlabeled training images)",
    reference="Xiong et al., A global benchmark of algorithms for segmenting the left atrium from late "
              "gadolinium-enhanced cardiac MRI, Medical Image Analysis 2021",
    licence="see the challenge's data terms (cardiacatlas.org, 2018 Atrial Segmentation Challenge)",
)
H5_FILE = "mri_norm2.h5"
NRRD_IMAGE = "lgemri.nrrd"
NRRD_LABEL = "laendo.nrrd"
LA_FILES = (H5_FILE, NRRD_IMAGE, NRRD_LABEL)
H5_SPACING = (0.625, 0.625, 0.625)
LAYOUT = (f"one folder per case holding {H5_FILE} (h5 form) or {NRRD_IMAGE} + {NRRD_LABEL} (nrrd form), e.g. "
          f"'2018LA_Seg_Training Set/<case>/{H5_FILE}'")


def _has_la_files(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in LA_FILES)


def case_folders(root: str) -> Dict[str, str]:
    """{case id: folder} of the subfolders of ``root`` holding any of the LA files."""
    return {os.path.basename(d): d for d in common._visible_subfolders(root) if _has_la_files(d)}


def find_case_root(source: str) -> str:
    return common.find_root(source, lambda d: bool(case_folders(d)), LAYOUT)


def detect_form(folders: Dict[str, str], forced: Optional[str]) -> str:
    if forced is not None:
        return forced
    if any(os.path.isfile(os.path.join(d, H5_FILE)) for d in folders.values()):
        return "h5"
    return "nrrd"


def find_lists(args, root: str) -> Optional[Tuple[str, str]]:
    """(train.list, test.list): the overrides, else the first folder among the case root, its parent,
    SOURCE_DIR and SOURCE_DIR's parent that holds train.list or test.list."""
    if args.train_list or args.test_list:
        if not (args.train_list and args.test_list):
            raise ConversionError("give both --train-list and --test-list (or neither, to use train.list and "
                                  "test.list next to the data)")
        for f in (args.train_list, args.test_list):
            if not os.path.isfile(f):
                raise ConversionError(f"list file {f} not found")
        return args.train_list, args.test_list
    source = os.path.abspath(args.source)
    folders: List[str] = []
    for f in (root, os.path.dirname(root), source, os.path.dirname(source)):
        if f not in folders:
            folders.append(f)
    for folder in folders:
        train, test = os.path.join(folder, "train.list"), os.path.join(folder, "test.list")
        if os.path.isfile(train) or os.path.isfile(test):
            if not (os.path.isfile(train) and os.path.isfile(test)):
                found, missing = (train, test) if os.path.isfile(train) else (test, train)
                raise ConversionError(f"found {found} but not {missing}: give both lists (or --train-list and "
                                      f"--test-list)")
            return train, test
    return None


def list_ids(path: str) -> List[str]:
    """Case ids of a list file; a line may also be a path to the case folder or its file."""
    ids = []
    for line in common.read_id_list(path):
        parts = [p for p in line.replace("\\", "/").split("/") if p and p != "."]
        if len(parts) > 1 and parts[-1] in LA_FILES:
            parts = parts[:-1]
        ids.append(parts[-1])
    return ids


def make_cases(folders: Dict[str, str], ids: Sequence[str], form: str) -> Dict[str, Case]:
    """Cases of the given ids in the given form; a missing image or label stops the conversion."""
    cases = {}
    for case_id in ids:
        folder = folders[case_id]
        if form == "h5":
            path = os.path.join(folder, H5_FILE)
            if not os.path.isfile(path):
                raise ConversionError(f"case {case_id} has no {H5_FILE} in {folder} (h5 form; --form nrrd converts "
                                      f"{NRRD_IMAGE}/{NRRD_LABEL})")
            _check_h5(path)
            cases[case_id] = Case(case_id, Volume(path, "image", H5_SPACING), Volume(path, "label", H5_SPACING))
        else:
            image, label = os.path.join(folder, NRRD_IMAGE), os.path.join(folder, NRRD_LABEL)
            if not os.path.isfile(image):
                raise ConversionError(f"case {case_id} has no image {image} (nrrd form)")
            if not os.path.isfile(label):
                raise ConversionError(f"case {case_id} has no label {label} (nrrd form)")
            cases[case_id] = Case(case_id, Volume(image), Volume(label))
    return cases


def _check_h5(path: str) -> None:
    """Both datasets present, 3D, same shape (reads the metadata only)."""
    try:
        import h5py
    except ImportError:
        raise ConversionError("the h5 form needs h5py: pip install h5py") from None
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            if missing:
                raise ConversionError(f"{path} has no dataset {missing[0]!r}"
                                      + (" (missing label)" if missing[0] == "label" else ""))
            if f["image"].ndim != 3 or f["image"].shape != f["label"].shape:
                raise ConversionError(f"{path}: 'image' {f['image'].shape} and 'label' {f['label'].shape} must be 3D "
                                      f"arrays of the same shape")
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e}") from None


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = common.make_parser(__doc__, INFO, "folder with the case folders ('2018LA_Seg_Training Set' or the "
                                               "folder above it)")
    parser.add_argument("--form", choices=("h5", "nrrd"), help="force a form instead of detecting it")
    parser.add_argument("--train-list", metavar="FILE", help="list of training ids (default: train.list next to "
                                                             "the data)")
    parser.add_argument("--test-list", metavar="FILE", help="list of test ids (default: test.list next to the data)")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="test fraction of the seeded split (nrrd form without lists). Default: 0.2")
    args = parser.parse_args(argv)
    common.check_arguments(args)

    root = find_case_root(args.source)
    folders = case_folders(root)
    form = detect_form(folders, args.form)
    lists = find_lists(args, root)
    if lists is None:
        if form == "h5":
            raise ConversionError(f"no train.list/test.list found next to {root}: the h5 form's protocol is "
                                  f"defined by these lists (UA-MT/SSL4MIS); put them in SOURCE_DIR or its parent, "
                                  f"or pass --train-list and --test-list")
        split = common.seeded_split(folders, args.test_fraction, args.seed)
    else:
        train, test = list_ids(lists[0]), list_ids(lists[1])
        for path, ids in zip(lists, (train, test)):
            unknown = [i for i in ids if i not in folders]
            if unknown:
                raise ConversionError(f"{len(unknown)} id(s) of {path} have no case folder in {root}: "
                                      f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        split = common.split_from_lists(folders, train, test,
                                        f"{form} form, {os.path.basename(lists[0])}/{os.path.basename(lists[1])} "
                                        f"from {os.path.dirname(os.path.abspath(lists[0]))}; labeled = the first N "
                                        f"ids of the training list in file order", "the lists")
    cases = make_cases(folders, split.train + split.test, form)
    record = {"form": form, "lists": [os.path.abspath(f) for f in lists] if lists else None}
    if form == "h5":
        record["h5_axes"] = "h5 arrays read as (x, y, z); NIfTI size (x, y, z), spacing 0.625 mm, origin 0, identity"
    return common.convert(args, INFO, cases, split, "dataset_conversion/la2018.py", record)


def cli() -> None:
    """Console script ``nnUNetv2_caml_convert_la2018``."""
    common.run(main)


if __name__ == "__main__":
    cli()
