"""What the dataset converters share: command line, checks, splits, writing cases, dataset.json.

A converter script only knows its dataset: which layout it reads (a function returning ``Case`` objects) and
how its training/test split is defined. Everything else lives here:

- ``make_parser`` / ``add_split_arguments`` / ``run``: the common command line and the one-line
  ``ERROR: ...`` exit (status 1, no traceback) for wrong or incomplete input;
- ``check_arguments``: dataset ID, ``--labeled``, ``nnUNet_raw``, an existing ``DatasetXXX_*`` with that ID;
- ``find_root``: locate the folder holding the expected layout (SOURCE_DIR or one folder below it);
- splits: ``seeded_split``, ``read_id_list``, ``read_split_file`` (json / txt / csv / xlsx),
  ``split_from_lists``, ``split_from_arguments``;
- ``convert``: checks every volume's header first, then writes all cases into a hidden temporary folder next
  to the target, writes ``dataset.json`` (nnU-Net's ``generate_dataset_json``) and ``conversion.json``, and
  renames the folder into place. Any error before the rename removes the temporary folder: nothing is written.

Cases are re-written through SimpleITK (spacing, origin and direction kept); labels become uint8 with every
nonzero voxel set to 1 (all four datasets are binary). Labels of unlabeled cases are never read or copied.
"""
import argparse
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

FILE_ENDING = ".nii.gz"
UNLABELED_FOLDER = "imagesTrUnlabeled"  # nnunetv2_caml.unlabeled.UNLABELED_IMAGES_FOLDER
CONVERSION_RECORD = "conversion.json"
IGNORED_NAMES = ("__MACOSX",)
# headers that name the case id column of a split table (compared lower-case)
ID_HEADERS = ("filename", "file name", "file", "id", "case", "case_id", "case id", "caseid", "name", "image",
              "patient", "patient_id", "subject")
SPLIT_HEADER = re.compile(r"(split|fold|set|subset|partition)([ _-]?\d+)?")
SPLIT_VALUES = {"train": "train", "training": "train", "tr": "train",
                "val": "validation", "valid": "validation", "validation": "validation",
                "test": "test", "testing": "test", "ts": "test"}
_ID_SUFFIXES = (".img.nii.gz", ".label.nii.gz", ".nii.gz", ".nii", ".nrrd", ".h5")


class ConversionError(Exception):
    """Wrong or incomplete input; the message is one line that says what is wrong and what to do."""


# ------------------------------------------------------------------------------------------------
# what a converter hands over
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Volume:
    """Where one volume comes from: a file SimpleITK reads (NIfTI, NRRD, ...) or a dataset in an HDF5 file.

    HDF5 arrays carry no geometry: they are read as (x, y, z) arrays (index 0 = x, the fastest axis of the
    NIfTI written) and get ``spacing`` (x, y, z, mm), origin 0 and identity direction."""
    path: str
    h5_dataset: Optional[str] = None
    spacing: Optional[Tuple[float, float, float]] = None

    def describe(self) -> str:
        return f"{self.path} [{self.h5_dataset}]" if self.h5_dataset else self.path


@dataclass(frozen=True)
class Case:
    source_id: str
    image: Volume
    label: Volume  # every source case has one; it is only read for labeled and test cases


@dataclass(frozen=True)
class DatasetInfo:
    name: str  # suffix of DatasetXXX_<name>
    channel_names: Dict[str, str]
    labels: Dict[str, int]
    description: str
    reference: str
    licence: str


@dataclass
class Split:
    train: List[str]  # source ids in protocol order: the first N are the labeled cases
    test: List[str]
    protocol: str  # one line: how the split was made
    not_converted: List[str] = field(default_factory=list)  # source cases outside the split


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 1 (argparse's default: usage + exit 2)
        self.exit(1, f"ERROR: {message} (see {self.prog} --help)\n")


def default_num_processes() -> int:
    try:
        return max(1, int(os.environ["nnUNet_def_n_proc"]))
    except (KeyError, ValueError):
        return min(4, os.cpu_count() or 1)


def make_parser(doc: str, info: DatasetInfo, source_help: str) -> argparse.ArgumentParser:
    """Parser with the options every converter has; ``doc`` is the script's module docstring."""
    parser = _Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", dest="source", required=True, metavar="SOURCE_DIR", help=source_help)
    parser.add_argument("-d", dest="dataset_id", type=int, required=True, metavar="DATASET_ID",
                        help=f"nnU-Net dataset ID (1-999); writes $nnUNet_raw/DatasetXXX_{info.name}")
    parser.add_argument("--labeled", type=int, required=True, metavar="N",
                        help="number of labeled training cases: the first N of the training split, in the split's "
                             "order (imagesTr/labelsTr); the other training cases go to imagesTrUnlabeled without "
                             "their labels")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of every random choice (split, shuffling). Default: 0")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing $nnUNet_raw/DatasetXXX_* with the same ID (only after the new one "
                             "is complete)")
    parser.add_argument("-np", dest="num_processes", type=int, default=default_num_processes(),
                        help="worker processes for re-writing the volumes. Default: $nnUNet_def_n_proc or "
                             "min(4, CPU count)")
    return parser


def add_split_arguments(parser: argparse.ArgumentParser, test_fraction: float) -> None:
    """Options of datasets without an official split: a seeded split or an explicit split file."""
    group = parser.add_argument_group("split (default: seeded shuffle of the sorted case ids)")
    group.add_argument("--test-fraction", type=float, default=test_fraction,
                       help=f"fraction of the cases in the test split of the seeded split (rounded, at least one "
                            f"case on each side). Default: {test_fraction}")
    group.add_argument("--split-file", metavar="FILE",
                       help="explicit split instead of the seeded one: .json {\"train\": [...], \"test\": [...]}; "
                            ".txt with a 'train:' and a 'test:' section; or a table (.csv, .xlsx) with an id column "
                            "(FileName/id/case) and a split column (values train(ing)/test(ing)/validation). "
                            "Labeled = the first N training ids in file order (see --shuffle-train)")
    group.add_argument("--split-column", metavar="NAME",
                       help="split column of a .csv/.xlsx table. Default: 'Split-1' if present, else the first "
                            "column named split/fold/set/subset/partition (optionally numbered)")
    group.add_argument("--split-sheet", metavar="NAME",
                       help="sheet of an .xlsx file. Default: 'v2-latest' if present (ImageCAS's workbook), else "
                            "the first sheet with an id and a split column")
    group.add_argument("--validation-to", choices=("train", "test", "skip"), default="train",
                       help="where rows marked validation in a split table go. Default: train (the training pool; "
                            "nnU-Net makes its own validation folds)")
    group.add_argument("--shuffle-train", action="store_true",
                       help="with --split-file: shuffle the training ids with --seed before taking the first N as "
                            "labeled (use it when the file lists them in id order, like ImageCAS's workbook)")


def run(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> None:
    """Run a converter's ``main``; wrong input ends with one ``ERROR: ...`` line on stderr and exit status 1."""
    try:
        main(argv)
    except ConversionError as e:
        print("ERROR: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("ERROR: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)


# ------------------------------------------------------------------------------------------------
# checks before anything else
# ------------------------------------------------------------------------------------------------
def nnunet_raw() -> str:
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise ConversionError("environment variable nnUNet_raw is not set: export it (see nnU-Net's "
                              "documentation/setting_up_paths.md)")
    return os.path.abspath(raw)


def existing_datasets(raw: str, dataset_id: int) -> List[str]:
    """Folders in ``raw`` that nnU-Net would take for this ID (``DatasetXXX_*``)."""
    if not os.path.isdir(raw):
        return []
    prefix = f"Dataset{dataset_id:03d}_"
    return sorted(os.path.join(raw, d) for d in os.listdir(raw)
                  if d.startswith(prefix) and os.path.isdir(os.path.join(raw, d)))


def _is_within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def check_arguments(args: argparse.Namespace) -> None:
    """Checks that need no look at the source data (run them first)."""
    if not 1 <= args.dataset_id <= 999:
        raise ConversionError(f"-d {args.dataset_id}: nnU-Net dataset IDs are 1 to 999")
    if args.labeled < 1:
        raise ConversionError(f"--labeled {args.labeled}: need at least 1 labeled case")
    if args.num_processes < 1:
        raise ConversionError(f"-np {args.num_processes}: need at least 1 process")
    if not 0 < getattr(args, "test_fraction", 0.5) < 1:
        raise ConversionError(f"--test-fraction {args.test_fraction}: must lie between 0 and 1")
    if not os.path.isdir(args.source):
        raise ConversionError(f"source folder {args.source} not found (-i)")
    raw = nnunet_raw()
    existing = existing_datasets(raw, args.dataset_id)
    if existing and not args.overwrite:
        raise ConversionError(f"{', '.join(existing)} already exists for dataset ID {args.dataset_id}: pass "
                              f"--overwrite to replace it, or choose another -d")
    for e in existing:
        if _is_within(args.source, e):
            raise ConversionError(f"the source folder {args.source} lies inside {e}, which --overwrite would "
                                  f"replace: move the source elsewhere or choose another -d")


def _visible_subfolders(folder: str) -> List[str]:
    return sorted(os.path.join(folder, d) for d in os.listdir(folder)
                  if not d.startswith(".") and d not in IGNORED_NAMES and os.path.isdir(os.path.join(folder, d)))


def find_root(source: str, is_root: Callable[[str], bool], expected: str) -> str:
    """``source`` if it holds the expected layout, else its only subfolder that does."""
    if is_root(source):
        return source
    candidates = [d for d in _visible_subfolders(source) if is_root(d)]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise ConversionError(f"several folders in {source} hold the expected layout ({', '.join(candidates)}): "
                              f"pass the one to convert with -i")
    raise ConversionError(f"unknown layout in {source}: expected {expected} (in SOURCE_DIR or one folder below it)")


# ------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------
def id_key(value) -> str:
    """Key that matches an id written in a list or table to a case id: file endings are dropped and numbers
    compare as numbers (``1``, ``0001``, ``1.0`` and ``1.img.nii.gz`` are the same case)."""
    text = str(value).strip()
    for suffix in _ID_SUFFIXES:
        if text.lower().endswith(suffix):
            text = text[:-len(suffix)]
            break
    if re.fullmatch(r"\d+(\.0*)?", text):
        return str(int(text.split(".")[0]))
    return text


def case_name(source_id: str) -> str:
    """nnU-Net case identifier for a source id: numbers are zero-padded to 4 digits (ImageCAS ``1`` -> ``0001``,
    so that files sort in case order), characters other than letters, digits, ``.-_`` become ``_``."""
    if source_id.isdigit():
        return f"{int(source_id):04d}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", source_id).lstrip(".") or "case"


def seeded_split(ids: Iterable[str], test_fraction: float, seed: int) -> Split:
    """Sorted ids shuffled with ``seed`` (numpy RandomState, stable across versions); the last
    round(test_fraction * n) of the shuffled order form the test split, the others (in shuffled order) the
    training split."""
    ids = sorted(ids)
    if len(ids) < 2:
        raise ConversionError(f"found {len(ids)} case(s): a training/test split needs at least 2")
    order = [ids[i] for i in np.random.RandomState(seed).permutation(len(ids))]
    n_test = min(max(math.floor(test_fraction * len(ids) + 0.5), 1), len(ids) - 1)
    return Split(train=order[:-n_test], test=sorted(order[-n_test:]),
                 protocol=f"seeded split: sorted case ids shuffled with seed {seed}, {len(ids) - n_test} training / "
                          f"{n_test} test cases; labeled = the first N of the shuffled training ids")


def read_id_list(path: str) -> List[str]:
    """Ids of a list file: one per line, blank lines and ``#`` comments ignored."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"cannot read list file {path}: {e}") from None
    ids = [line.split("#", 1)[0].strip() for line in lines]
    ids = [i for i in ids if i]
    if not ids:
        raise ConversionError(f"list file {path} holds no ids")
    return ids


def _read_split_json(path: str) -> Tuple[List[str], List[str]]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            content = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read split file {path}: {e}") from None
    if not isinstance(content, dict) or set(content) != {"train", "test"} or \
            not all(isinstance(v, list) for v in content.values()):
        raise ConversionError(f"split file {path} must hold exactly {{\"train\": [ids...], \"test\": [ids...]}}")
    return [str(i) for i in content["train"]], [str(i) for i in content["test"]]


def _read_split_txt(path: str) -> Tuple[List[str], List[str]]:
    """Sections started by a line ``train:`` or ``test:`` (ids may follow on the same line); ids separated by
    whitespace or commas; ``#`` comments."""
    lists: Dict[str, List[str]] = {"train": [], "test": []}
    current = None
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"cannot read split file {path}: {e}") from None
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        match = re.match(r"(train|test)\s*:(.*)", line, flags=re.IGNORECASE)
        if match:
            current = match.group(1).lower()
            line = match.group(2)
        tokens = [t for t in re.split(r"[\s,]+", line) if t]
        if tokens and current is None:
            raise ConversionError(f"split file {path} line {number}: ids before the first 'train:' or 'test:' line")
        lists.setdefault(current, []).extend(tokens)
    return lists["train"], lists["test"]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _table_rows(path: str, sheet: Optional[str], column: Optional[str]) -> Tuple[List[List[str]], str]:
    """Rows of a .csv/.tsv or .xlsx table as strings, and where they came from (for messages)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".csv", ".tsv"):
        import csv
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                dialect = "excel-tab" if suffix == ".tsv" else "excel"
                return [[_cell(c) for c in row] for row in csv.reader(f, dialect)], path
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise ConversionError(f"cannot read split file {path}: {e}") from None
    try:
        import openpyxl
    except ImportError:
        raise ConversionError(f"reading {path} needs openpyxl: pip install openpyxl (or save the sheet as .csv)") \
            from None
    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises many kinds for a broken file
        raise ConversionError(f"cannot read split file {path}: {type(e).__name__}: {e}") from None
    try:
        names = workbook.sheetnames
        if sheet is not None:
            if sheet not in names:
                raise ConversionError(f"{path} has no sheet {sheet!r} (sheets: {', '.join(names)})")
            order = [sheet]
        else:
            order = (["v2-latest"] if "v2-latest" in names else []) + [n for n in names if n != "v2-latest"]
        tables = [([[_cell(c) for c in row] for row in workbook[n].iter_rows(values_only=True)], f"{path} [{n}]")
                  for n in order]
    finally:
        workbook.close()
    for rows, where in tables:  # the first sheet with a header row
        if sheet is not None or _find_header(rows, column) is not None:
            return rows, where
    return tables[0] if tables else ([], path)


def _find_header(rows: List[List[str]], column: Optional[str]) -> Optional[Tuple[int, int, int]]:
    """(header row, id column, split column) of the first row among the first 50 with both columns."""
    for r, row in enumerate(rows[:50]):
        headers = [c.lower() for c in row]
        id_columns = [i for i, h in enumerate(headers) if h in ID_HEADERS]
        if not id_columns:
            continue
        if column is not None:
            split_columns = [i for i, h in enumerate(headers) if h == column.lower()]
        else:
            split_columns = [i for i, h in enumerate(headers) if h == "split-1"] or \
                            [i for i, h in enumerate(headers) if SPLIT_HEADER.fullmatch(h)]
        if split_columns:
            return r, id_columns[0], split_columns[0]
    return None


def _read_split_table(path: str, column: Optional[str], sheet: Optional[str],
                      validation_to: str) -> Tuple[List[str], List[str], str]:
    rows, where = _table_rows(path, sheet, column)
    header = _find_header(rows, column)
    if header is None:
        wanted = f"a column {column!r}" if column else "a split column (Split-1, split, fold, set, ...)"
        raise ConversionError(f"no header row in {where} with an id column ({'/'.join(ID_HEADERS[:4])}, ...) and "
                              f"{wanted}: fix the table or pass --split-column/--split-sheet")
    r, id_column, split_column = header
    lists: Dict[str, List[str]] = {"train": [], "test": [], "validation": []}
    for number, row in enumerate(rows[r + 1:], r + 2):
        case = row[id_column] if id_column < len(row) else ""
        value = row[split_column].lower() if split_column < len(row) else ""
        if not case and not value:
            continue
        if not case or value not in SPLIT_VALUES:
            raise ConversionError(f"{where} row {number}: expected an id and one of train(ing)/test(ing)/"
                                  f"validation, found {case!r} / {value!r}")
        lists[SPLIT_VALUES[value]].append(case)
    if validation_to != "skip":
        lists[validation_to].extend(lists["validation"])
    note = f" ({len(lists['validation'])} validation rows -> {validation_to})" if lists["validation"] else ""
    return lists["train"], lists["test"], f"{where}, column {rows[r][split_column]!r}{note}"


def read_split_file(path: str, column: Optional[str] = None, sheet: Optional[str] = None,
                    validation_to: str = "train") -> Tuple[List[str], List[str], str]:
    """(training ids in file order, test ids, description) of a split file; see ``add_split_arguments``."""
    if not os.path.isfile(path):
        raise ConversionError(f"split file {path} not found")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".json":
        return (*_read_split_json(path), path)
    if suffix in (".txt", ".list"):
        return (*_read_split_txt(path), path)
    if suffix in (".csv", ".tsv", ".xlsx", ".xlsm"):
        return _read_split_table(path, column, sheet, validation_to)
    raise ConversionError(f"split file {path}: unknown format {suffix or '(no ending)'}; use .json, .txt, .csv or "
                          f".xlsx (see --help)")


def split_from_lists(case_ids: Iterable[str], train_ids: Sequence[str], test_ids: Sequence[str],
                     protocol: str, where: str) -> Split:
    """Split from explicit id lists; every listed id must match one of ``case_ids`` (see ``id_key``)."""
    cases = sorted(case_ids)
    by_key = {id_key(s): s for s in cases}
    seen: Dict[str, str] = {}
    resolved: Dict[str, List[str]] = {"train": [], "test": []}
    unknown = []
    for part, ids in (("train", train_ids), ("test", test_ids)):
        for i in ids:
            key = id_key(i)
            if key not in by_key:
                unknown.append(str(i))
                continue
            if key in seen:
                raise ConversionError(f"case {i} is listed twice in {where} ({seen[key]} and {part})")
            seen[key] = part
            resolved[part].append(by_key[key])
    if unknown:
        raise ConversionError(f"{len(unknown)} id(s) of {where} are not among the {len(cases)} cases found in the "
                              f"source: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    for part in ("train", "test"):
        if not resolved[part]:
            raise ConversionError(f"{where} lists no {part} case")
    listed = set(resolved["train"]) | set(resolved["test"])
    return Split(train=resolved["train"], test=resolved["test"], protocol=protocol,
                 not_converted=sorted(s for s in cases if s not in listed))


def split_from_arguments(args: argparse.Namespace, cases: Dict[str, Case]) -> Split:
    """The split of a dataset without an official one: ``--split-file`` or the seeded split."""
    if args.split_file is None:
        return seeded_split(cases, args.test_fraction, args.seed)
    train, test, where = read_split_file(args.split_file, args.split_column, args.split_sheet, args.validation_to)
    protocol = f"split file {where}; labeled = the first N training ids in file order"
    if args.shuffle_train:
        train = [train[i] for i in np.random.RandomState(args.seed).permutation(len(train))]
        protocol = f"split file {where}; training ids shuffled with seed {args.seed}, labeled = the first N"
    return split_from_lists(cases, train, test, protocol, f"split file {args.split_file}")


# ------------------------------------------------------------------------------------------------
# reading and writing volumes (also run in worker processes)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Header:
    size: Tuple[int, ...]
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]
    components: int


def _h5_array(volume: Volume, header_only: bool = False):
    try:
        import h5py
    except ImportError:
        raise ConversionError("reading .h5 files needs h5py: pip install h5py") from None
    try:
        with h5py.File(volume.path, "r") as f:
            if volume.h5_dataset not in f:
                raise ConversionError(f"{volume.path} has no dataset {volume.h5_dataset!r} (has: "
                                      f"{', '.join(f.keys())})")
            data = f[volume.h5_dataset]
            return data.shape if header_only else data[()]
    except OSError as e:
        raise ConversionError(f"cannot read {volume.path}: {e}") from None


def _nifti_data_end(header: bytes) -> Optional[int]:
    """Byte offset where a NIfTI-1/2 file's voxel data end (vox_offset + voxels * bytes), None if not NIfTI."""
    import struct
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dim = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
        elif len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dim = struct.unpack(endian + "8q", header[16:80])
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
        else:
            continue
        if not 1 <= dim[0] <= 7:
            return None
        return vox_offset + int(np.prod([max(d, 1) for d in dim[1:dim[0] + 1]], dtype=np.int64)) * bitpix // 8
    return None


def check_nifti_complete(path: str) -> None:
    """Stop on a truncated NIfTI file (an interrupted download or unpacking): SimpleITK reads those without an
    error and fills the missing voxels with zeros. Cheap for .nii.gz: the size in the gzip trailer is compared
    first; only when it disagrees (or for multi-member gzip files) is the file decompressed to count."""
    import gzip
    import zlib
    compressed = path.endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            end = _nifti_data_end(f.read(544))
        if end is None:
            return
        if not compressed:
            size = os.path.getsize(path)
        else:
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                size = int.from_bytes(f.read(4), "little")
            if size != end % 2 ** 32:
                size = 0
                with gzip.open(path, "rb") as f:
                    while True:
                        block = f.read(1 << 24)
                        if not block:
                            break
                        size += len(block)
    except (OSError, EOFError, zlib.error) as e:
        raise ConversionError(f"{path} is damaged or truncated ({type(e).__name__}: {e}): download or unpack it "
                              f"again") from None
    if size < end:
        raise ConversionError(f"{path} is truncated ({size} of {end} bytes): download or unpack it again")


def read_header(volume: Volume) -> _Header:
    if volume.h5_dataset is not None:
        shape = tuple(int(s) for s in _h5_array(volume, header_only=True))
        n = len(shape)
        return _Header(shape, tuple(volume.spacing), (0.0,) * n, tuple(np.eye(n).ravel()), 1)
    if volume.path.endswith((".nii", ".nii.gz")):
        check_nifti_complete(volume.path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(volume.path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ConversionError(f"cannot read {volume.path}: {str(e).strip().splitlines()[-1]}") from None
    return _Header(tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()),
                   tuple(reader.GetDirection()), reader.GetNumberOfComponents())


def read_volume(volume: Volume) -> sitk.Image:
    if volume.h5_dataset is not None:
        array = np.asarray(_h5_array(volume))
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(tuple(range(array.ndim))[::-1])))
        image.SetSpacing(tuple(float(s) for s in volume.spacing))
        return image
    try:
        return sitk.ReadImage(volume.path)
    except RuntimeError as e:
        raise ConversionError(f"cannot read {volume.path}: {str(e).strip().splitlines()[-1]}") from None


def _write(image: sitk.Image, path: str) -> None:
    try:
        sitk.WriteImage(image, path, True)
    except RuntimeError as e:
        raise ConversionError(f"cannot write {path}: {str(e).strip().splitlines()[-1]}") from None


def write_case(image: Volume, label: Optional[Volume], image_out: str, label_out: Optional[str]) -> List[int]:
    """Re-write one case; the label (if any) as uint8 0/1 on the image's grid. Returns the label values other
    than 0 and 1 that were set to 1 (at most 5)."""
    image_sitk = read_volume(image)
    _write(image_sitk, image_out)
    if label is None:
        return []
    label_array = sitk.GetArrayFromImage(read_volume(label))
    other = label_array[(label_array != 0) & (label_array != 1)]
    binary = sitk.GetImageFromArray((label_array > 0).astype(np.uint8))
    binary.CopyInformation(image_sitk)  # same size checked before; origin/direction within tolerance or warned
    _write(binary, label_out)
    return [v.item() for v in np.unique(other)[:5]] if other.size else []


# ------------------------------------------------------------------------------------------------
# the conversion
# ------------------------------------------------------------------------------------------------
def _check_pair(case: Case, with_label: bool) -> Optional[str]:
    """Check a case's headers; return a warning (origin/direction differ) or None. Raises on real problems."""
    image = read_header(case.image)
    if image.components != 1 or len(image.size) != 3:
        raise ConversionError(f"{case.image.describe()}: expected a 3D single-channel volume, found size "
                              f"{image.size} with {image.components} component(s)")
    if not with_label:
        return None
    label = read_header(case.label)
    if label.size != image.size:
        raise ConversionError(f"case {case.source_id}: label size {label.size} differs from image size {image.size} "
                              f"({case.label.describe()})")
    if not np.allclose(label.spacing, image.spacing, rtol=1e-4, atol=1e-4):
        raise ConversionError(f"case {case.source_id}: label spacing {label.spacing} differs from image spacing "
                              f"{image.spacing} ({case.label.describe()})")
    if not (np.allclose(label.origin, image.origin, atol=1e-3) and
            np.allclose(label.direction, image.direction, atol=1e-4)):
        return case.source_id
    return None


def _names(ids: Sequence[str]) -> Dict[str, str]:
    names: Dict[str, str] = {}
    for s in ids:
        n = case_name(s)
        if n in names.values():
            other = next(k for k, v in names.items() if v == n)
            raise ConversionError(f"case ids {other!r} and {s!r} both become nnU-Net case {n!r}: rename one")
        names[s] = n
    return names


def _run_jobs(jobs: List[tuple], num_processes: int) -> List[tuple]:
    """Run ``write_case`` for every job (tag, *arguments); return (tag, result) pairs in completion order."""
    results = []
    total = len(jobs)
    if num_processes == 1 or total <= 1:
        for n, (tag, *arguments) in enumerate(jobs, 1):
            results.append((tag, write_case(*arguments)))
            print(f"[{n}/{total}] {tag}", flush=True)
        return results
    with ProcessPoolExecutor(min(num_processes, total), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(write_case, *arguments): tag for tag, *arguments in jobs}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    for p in pending:
                        p.cancel()
                    raise f.exception()
                results.append((futures[f], f.result()))
                print(f"[{len(results)}/{total}] {futures[f]}", flush=True)
    return results


def _move_into_place(temporary: str, target: str, existing: List[str]) -> None:
    """Rename the finished temporary folder to ``target``, replacing ``existing`` datasets of the same ID."""
    raw = os.path.dirname(target)
    replaced = []
    try:
        for e in existing:
            aside = tempfile.mkdtemp(prefix=f".{os.path.basename(e)}.replaced-", dir=raw)
            os.rename(e, os.path.join(aside, os.path.basename(e)))
            replaced.append((e, aside))
        os.rename(temporary, target)
    except OSError:
        for e, aside in replaced:  # put the old datasets back
            os.rename(os.path.join(aside, os.path.basename(e)), e)
            os.rmdir(aside)
        raise
    for _, aside in replaced:
        shutil.rmtree(aside, ignore_errors=True)


def convert(args: argparse.Namespace, info: DatasetInfo, cases: Dict[str, Case], split: Split,
            converter: str, record: Optional[dict] = None) -> str:
    """Check, then write ``$nnUNet_raw/DatasetXXX_<name>``; return its path. Nothing is written on error."""
    n_train = len(split.train)
    if args.labeled > n_train:
        raise ConversionError(f"--labeled {args.labeled} is larger than the training split ({n_train} cases)")
    labeled, unlabeled, test = split.train[:args.labeled], split.train[args.labeled:], list(split.test)
    names = _names(labeled + unlabeled + test)

    print(f"{info.name}: {len(labeled)} labeled, {len(unlabeled)} unlabeled, {len(test)} test cases "
          f"({split.protocol})" + (f"; {len(split.not_converted)} source case(s) outside the split are not "
                                   f"converted" if split.not_converted else ""), flush=True)
    print("Checking the headers of all volumes ...", flush=True)
    unlabeled_set = set(unlabeled)
    misaligned = [w for w in (_check_pair(cases[s], with_label=s not in unlabeled_set)
                              for s in labeled + unlabeled + test) if w is not None]

    raw = nnunet_raw()
    existing = existing_datasets(raw, args.dataset_id)
    if existing and not args.overwrite:  # appeared since check_arguments
        raise ConversionError(f"{', '.join(existing)} already exists for dataset ID {args.dataset_id}: pass "
                              f"--overwrite to replace it, or choose another -d")
    target = os.path.join(raw, f"Dataset{args.dataset_id:03d}_{info.name}")
    os.makedirs(raw, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=raw)
    try:
        folders = {k: os.path.join(temporary, k) for k in ("imagesTr", "labelsTr", UNLABELED_FOLDER, "imagesTs",
                                                           "labelsTs")}
        for f in folders.values():
            os.makedirs(f)
        jobs = []
        for group, ids, images, labels in (("labeled", labeled, "imagesTr", "labelsTr"),
                                           ("unlabeled", unlabeled, UNLABELED_FOLDER, None),
                                           ("test", test, "imagesTs", "labelsTs")):
            for s in ids:
                n = names[s]
                jobs.append((f"{group} {n} <- {s}", cases[s].image, cases[s].label if labels else None,
                             os.path.join(folders[images], f"{n}_0000{FILE_ENDING}"),
                             os.path.join(folders[labels], n + FILE_ENDING) if labels else None))
        results = _run_jobs(jobs, args.num_processes)

        from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
        generate_dataset_json(temporary, dict(info.channel_names), dict(info.labels), len(labeled), FILE_ENDING,
                              dataset_name=os.path.basename(target), reference=info.reference,
                              license=info.licence, description=info.description,
                              converted_by=f"nnunetv2_caml {converter}", numUnlabeled=len(unlabeled),
                              numTest=len(test), split_protocol=split.protocol)
        conversion = {"converter": converter, "source": os.path.abspath(args.source), "seed": args.seed,
                      "protocol": split.protocol, **(record or {}),
                      "labeled": [names[s] for s in labeled], "unlabeled": [names[s] for s in unlabeled],
                      "test": [names[s] for s in test], "source_ids": {names[s]: s for s in names},
                      "not_converted": split.not_converted}
        with open(os.path.join(temporary, CONVERSION_RECORD), "w") as f:
            json.dump(conversion, f, indent=2)
        _move_into_place(temporary, target, existing)
    except OSError as e:
        shutil.rmtree(temporary, ignore_errors=True)
        raise ConversionError(f"could not write the dataset ({e}); nothing was written") from None
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise

    if misaligned:
        print(f"WARNING: image and label origin/direction differ in {len(misaligned)} case(s) "
              f"({', '.join(misaligned[:5])}{' ...' if len(misaligned) > 5 else ''}); the labels were written on "
              f"their image's grid (same size and spacing), as nnU-Net would use them", file=sys.stderr)
    odd = [(tag, values) for tag, values in results if values]
    if odd:
        print(f"Note: labels of {len(odd)} case(s) held values other than 0/1 (e.g. {odd[0][1]} in "
              f"{odd[0][0].split(' <- ')[-1]}); every nonzero voxel became 1", flush=True)
    for e in existing:
        print(f"Replaced {e} (its nnUNet_preprocessed data, if any, is now stale: plan and preprocess again)")
    print(f"Wrote {target}: imagesTr/labelsTr {len(labeled)}, {UNLABELED_FOLDER} {len(unlabeled)}, "
          f"imagesTs/labelsTs {len(test)}")
    fold = "all" if len(labeled) < 5 else "0"
    print(f"Next: nnUNetv2_plan_and_preprocess -d {args.dataset_id} -c 3d_fullres --verify_dataset_integrity && "
          f"nnUNetv2_caml_preprocess_unlabeled -d {args.dataset_id} -c 3d_fullres && "
          f"nnUNetv2_train {args.dataset_id} 3d_fullres {fold} -tr nnUNetTrainerCAML"
          + (" (fewer than 5 labeled cases: fold 'all' or your own splits_final.json)" if fold == "all" else ""))
    return target


def convert_paired_dataset(doc: str, info: DatasetInfo, find_cases: Callable[[str], Dict[str, Case]],
                           source_help: str, converter: str, argv: Optional[Sequence[str]] = None) -> str:
    """``main`` of a converter for image/label file pairs without an official split (the vessel datasets)."""
    parser = make_parser(doc, info, source_help)
    add_split_arguments(parser, test_fraction=0.1)
    args = parser.parse_args(argv)
    check_arguments(args)
    cases = find_cases(args.source)
    split = split_from_arguments(args, cases)
    return convert(args, info, cases, split, converter)


def image_file(folder: str, stem: str) -> Optional[str]:
    """``folder/stem.nii.gz`` (or ``.nii``) if it exists."""
    for ending in (".nii.gz", ".nii"):
        path = os.path.join(folder, stem + ending)
        if os.path.isfile(path):
            return path
    return None


def nifti_stems(folder: str) -> List[str]:
    """Names without ``.nii.gz``/``.nii`` of the visible NIfTI files in ``folder``."""
    stems = []
    for f in sorted(os.listdir(folder)):
        if f.startswith(".") or not os.path.isfile(os.path.join(folder, f)):
            continue
        for ending in (".nii.gz", ".nii"):
            if f.endswith(ending):
                stems.append(f[:-len(ending)])
                break
    return stems
