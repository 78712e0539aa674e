"""Tests of the dataset converters in ``dataset_conversion/``.

Each converter runs as a script in a subprocess (``python dataset_conversion/x.py ...``, from another working
directory) on a tiny fake source tree in the dataset's real layout: a few volumes of 16 x 20 x 24 voxels with
spacing (0.8, 0.6, 1.5) and a non-trivial origin and direction. The tests check the output tree and counts,
that labels of unlabeled cases are copied nowhere, that labels are binarised and the geometry is kept, the
split protocols, nnU-Net's dataset verification (``nnUNetv2_plan_and_preprocess --verify_dataset_integrity`` for
the LA h5 output, ``verify_dataset_integrity`` in-process for the others), and that wrong input ends with one
``ERROR:`` line, exit status 1 and nothing written.

Needs h5py (LA h5 form), nibabel (fake ImageCAS files: SimpleITK cannot write ``.img.nii.gz`` names) and
openpyxl (ImageCAS's .xlsx split file).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from dataset_conversion import common  # noqa: E402

SCRIPTS = REPO / "dataset_conversion"
BIN = Path(sys.executable).parent
SIZE = (16, 20, 24)  # SimpleITK (x, y, z); numpy arrays are (z, y, x)
SPACING = (0.8, 0.6, 1.5)
ORIGIN = (10.0, -5.0, 3.0)
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
LA_IDS = ["K3Q9", "A1B2", "ZZ01", "M7X4", "B0C1", "Q5R6", "T8U9", "C2D3"]  # train.list order: not sorted
LA_TRAIN, LA_TEST = LA_IDS[:6], LA_IDS[6:]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def make_arrays(seed, label_value=1):
    """(image, label) numpy arrays in (z, y, x) order: noise plus a bright ball labelled ``label_value``."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(SIZE[::-1])
    centre = rng.integers([8, 7, 5], [16, 13, 11])
    ball = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) < 16
    label = np.where(ball, label_value, 0).astype(np.uint8)
    image = (rng.normal(100, 10, SIZE[::-1]) + 80 * ball).astype(np.float32)
    return image, label


def write_sitk(path, array):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sitk.WriteImage(image, str(path), True)


def run(script, args, raw, cwd):
    """Run a converter script from another working directory with nnUNet_raw set."""
    env = {**os.environ, "nnUNet_raw": str(raw)}
    return subprocess.run([sys.executable, str(SCRIPTS / f"{script}.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_converted(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def assert_error(result, *fragments):
    """Exit status 1, one ``ERROR:`` line on stderr naming ``fragments``, no traceback."""
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def snapshot(folder):
    """Every path below ``folder`` with its size and modification time."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def cases_in(folder, ending=".nii.gz", channel=True):
    suffix = "_0000" + ending if channel else ending
    return sorted(f[:-len(suffix)] for f in os.listdir(folder) if f.endswith(suffix))


def check_dataset(folder, labeled, unlabeled, test, source_labels, source_images=None, spacing=SPACING):
    """Tree, counts, dataset.json, binarised labels, kept geometry, unlabeled labels copied nowhere.

    ``source_labels`` / ``source_images``: {case name: SimpleITK image of the source} (all cases)."""
    folder = Path(folder)
    assert sorted(os.listdir(folder)) == sorted(["dataset.json", "conversion.json", "imagesTr", "labelsTr",
                                                 "imagesTrUnlabeled", "imagesTs", "labelsTs"])
    assert cases_in(folder / "imagesTr") == sorted(labeled)
    assert cases_in(folder / "labelsTr", channel=False) == sorted(labeled)
    assert cases_in(folder / "imagesTrUnlabeled") == sorted(unlabeled)
    assert cases_in(folder / "imagesTs") == sorted(test)
    assert cases_in(folder / "labelsTs", channel=False) == sorted(test)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["numTraining"] == len(labeled)
    assert dataset_json["file_ending"] == ".nii.gz"
    assert dataset_json["labels"]["background"] == 0 and len(dataset_json["labels"]) == 2
    record = json.loads((folder / "conversion.json").read_text())
    assert (record["labeled"], record["unlabeled"], sorted(record["test"])) == (labeled, unlabeled, sorted(test))

    label_files = sorted(folder.rglob("*.nii.gz"))
    written_labels = [p for p in label_files if not p.name.endswith("_0000.nii.gz")]
    assert len(written_labels) == len(labeled) + len(test)
    for u in unlabeled:  # no file of an unlabeled case other than its image, no copy of its label anywhere
        assert [p.relative_to(folder) for p in label_files if p.name.startswith(u + "_") or p.name == u + ".nii.gz"] \
            == [Path("imagesTrUnlabeled") / f"{u}_0000.nii.gz"]
        unlabeled_truth = sitk.GetArrayFromImage(source_labels[u]) > 0
        for p in written_labels:
            assert not np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(p))) > 0, unlabeled_truth), p

    for name, sub in [(c, "Tr") for c in labeled] + [(c, "Ts") for c in test]:
        label = sitk.ReadImage(str(folder / f"labels{sub}" / f"{name}.nii.gz"))
        image = sitk.ReadImage(str(folder / f"images{sub}" / f"{name}_0000.nii.gz"))
        array = sitk.GetArrayFromImage(label)
        assert label.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(array)) <= {0, 1} and array.any()
        np.testing.assert_array_equal(array, sitk.GetArrayFromImage(source_labels[name]) > 0)
        for written in (image, label):
            assert written.GetSize() == source_labels[name].GetSize()
            np.testing.assert_allclose(written.GetSpacing(), spacing, rtol=1e-6)
            np.testing.assert_allclose(written.GetOrigin(), source_labels[name].GetOrigin(), atol=1e-5)
            np.testing.assert_allclose(written.GetDirection(), source_labels[name].GetDirection(), atol=1e-6)
        if source_images is not None:
            np.testing.assert_allclose(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source_images[name]))
    for u in unlabeled:
        image = sitk.ReadImage(str(folder / "imagesTrUnlabeled" / f"{u}_0000.nii.gz"))
        np.testing.assert_allclose(image.GetSpacing(), spacing, rtol=1e-6)
        if source_images is not None:
            np.testing.assert_allclose(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source_images[u]))


def verify_in_process(folder):
    """nnU-Net's own dataset check (raises on a problem)."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(folder), num_processes=1)


# ------------------------------------------------------------------------------------------------
# fake source trees
# ------------------------------------------------------------------------------------------------
def make_la_h5(root):
    """UA-MT/SSL4MIS layout: data/2018LA_Seg_Training Set/<id>/mri_norm2.h5 + data/train.list, data/test.list.
    Returns {id: (image, label)} as stored, i.e. (x, y, z) arrays."""
    h5py = pytest.importorskip("h5py")
    arrays = {}
    for n, case_id in enumerate(LA_IDS):
        image, label = make_arrays(n)
        image, label = image.transpose(2, 1, 0), label.transpose(2, 1, 0)  # stored as (x, y, z)
        folder = root / "data" / "2018LA_Seg_Training Set" / case_id
        folder.mkdir(parents=True)
        with h5py.File(folder / "mri_norm2.h5", "w") as f:
            f.create_dataset("image", data=image)
            f.create_dataset("label", data=label)
        arrays[case_id] = (image, label)
    (root / "data" / "train.list").write_text("\n".join(LA_TRAIN) + "\n")
    (root / "data" / "test.list").write_text("\n".join(LA_TEST) + "\n")
    return arrays


def make_la_nrrd(root, n=5):
    ids = [f"CASE{i:02d}" for i in range(n)]
    for i, case_id in enumerate(ids):
        image, label = make_arrays(20 + i, label_value=255)
        write_sitk(root / "Training Set" / case_id / "lgemri.nrrd", image)
        write_sitk(root / "Training Set" / case_id / "laendo.nrrd", label)
    return ids


def make_cas(root, n=6):
    ids = [f"{i:03d}" for i in range(1, n + 1)]
    for i, case_id in enumerate(ids):
        image, label = make_arrays(40 + i, label_value=1 + i % 2)  # some masks hold 2: binarised to 1
        write_sitk(root / "data" / f"{case_id}.nii.gz", image)
        write_sitk(root / "mask" / f"{case_id}.nii.gz", label)
    return ids


def make_parse(root, n=6):
    ids = [f"PA{i:06d}" for i in range(n)]
    for i, case_id in enumerate(ids):
        image, label = make_arrays(60 + i)
        write_sitk(root / "train" / case_id / "image" / f"{case_id}.nii.gz", image.astype(np.int16))
        write_sitk(root / "train" / case_id / "label" / f"{case_id}.nii.gz", label)
    return ids


def make_imagecas(root, n=6):
    """<id>.img.nii.gz / <id>.label.nii.gz in 1-200/, written with nibabel, plus browser duplicates."""
    nib = pytest.importorskip("nibabel")
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = ORIGIN
    for i in range(1, n + 1):
        image, label = make_arrays(80 + i)
        for array, kind in ((image, "img"), (label, "label")):
            path = root / "1-200" / f"{i}.{kind}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array.transpose(2, 1, 0), affine), str(path))
    shutil.copytree(root / "1-200", root / "1-200 (1)")  # duplicate folder: skipped
    shutil.copy(root / "1-200" / "1.img.nii.gz", root / "1-200" / "1.img(1).nii.gz")  # duplicate file: skipped
    return [str(i) for i in range(1, n + 1)]


def read_sources(paths):
    return {name: sitk.ReadImage(str(p)) for name, p in paths.items()}


# ------------------------------------------------------------------------------------------------
# la2018
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def la_h5(tmp_path_factory):
    root = tmp_path_factory.mktemp("la_h5")
    arrays = make_la_h5(root / "src")
    raw = root / "raw"
    result = run("la2018", ["-i", root / "src" / "data" / "2018LA_Seg_Training Set", "-d", 501, "--labeled", 2,
                            "-np", 1], raw, cwd=root)
    assert_converted(result)
    return {"root": root, "raw": raw, "folder": raw / "Dataset501_LA2018", "arrays": arrays, "result": result}


def test_la2018_h5_labeled_are_first_n_of_train_list(la_h5):
    """Labeled = the first N ids of train.list in file order; unlabeled = the rest; test = test.list."""
    sources = {}
    for case_id, (image, label) in la_h5["arrays"].items():
        source = sitk.GetImageFromArray(label.transpose(2, 1, 0))
        source.SetSpacing((0.625,) * 3)
        sources[case_id] = source
    images = {k: sitk.GetImageFromArray(v[0].transpose(2, 1, 0)) for k, v in la_h5["arrays"].items()}
    check_dataset(la_h5["folder"], LA_TRAIN[:2], LA_TRAIN[2:], LA_TEST, sources, images, spacing=(0.625,) * 3)
    assert "first N ids of the training list" in json.loads((la_h5["folder"] / "dataset.json").read_text())[
        "split_protocol"]


def test_la2018_h5_axis_convention(la_h5):
    """h5 arrays are (x, y, z): NIfTI size = array shape, voxel [x, y, z] = array[x, y, z]."""
    image = sitk.ReadImage(str(la_h5["folder"] / "imagesTr" / f"{LA_TRAIN[0]}_0000.nii.gz"))
    stored = la_h5["arrays"][LA_TRAIN[0]][0]
    assert image.GetSize() == stored.shape
    assert image.GetPixel(3, 5, 7) == pytest.approx(float(stored[3, 5, 7]))
    np.testing.assert_allclose(image.GetOrigin(), (0, 0, 0))
    np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel())


def test_la2018_h5_plan_and_preprocess(la_h5):
    """nnU-Net's planning with dataset verification accepts the output (the one real planning run here)."""
    env = {**os.environ, "nnUNet_raw": str(la_h5["raw"]), "nnUNet_preprocessed": str(la_h5["root"] / "pre"),
           "nnUNet_results": str(la_h5["root"] / "res"), "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "501", "-c", "3d_fullres", "-np", "1",
                             "-npfp", "1", "--verify_dataset_integrity"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "verify_dataset_integrity Done" in result.stdout
    assert (la_h5["root"] / "pre" / "Dataset501_LA2018" / "nnUNetPlans.json").is_file()


def test_la2018_h5_errors(la_h5, tmp_path):
    src = la_h5["root"] / "src"
    raw = tmp_path / "raw"
    # lists missing
    bare = tmp_path / "bare"
    shutil.copytree(src / "data" / "2018LA_Seg_Training Set", bare / "cases")
    assert_error(run("la2018", ["-i", bare, "-d", 502, "--labeled", 2], raw, tmp_path), "train.list")
    # a list id without a case folder
    (tmp_path / "train.list").write_text("\n".join(LA_TRAIN + ["NOPE"]) + "\n")
    (tmp_path / "test.list").write_text("\n".join(LA_TEST) + "\n")
    assert_error(run("la2018", ["-i", bare, "-d", 502, "--labeled", 2, "--train-list", tmp_path / "train.list",
                                "--test-list", tmp_path / "test.list"], raw, tmp_path), "NOPE")
    # N larger than train.list
    assert_error(run("la2018", ["-i", src / "data", "-d", 502, "--labeled", 7], raw, tmp_path), "--labeled 7",
                 "6 cases")
    # an h5 file without its label
    h5py = pytest.importorskip("h5py")
    with h5py.File(bare / "cases" / LA_TRAIN[4] / "mri_norm2.h5", "a") as f:
        del f["label"]
    assert_error(run("la2018", ["-i", bare, "-d", 502, "--labeled", 2, "--train-list", src / "data" / "train.list",
                                "--test-list", src / "data" / "test.list"], raw, tmp_path), "missing label",
                 LA_TRAIN[4])
    assert not raw.exists() or os.listdir(raw) == []


def test_la2018_nrrd_seeded_split(tmp_path):
    """Raw challenge form: labels 255 -> 1, geometry kept, seeded 80/20 split reproducible from --seed."""
    ids = make_la_nrrd(tmp_path / "src")
    raw = tmp_path / "raw"
    assert_converted(run("la2018", ["-i", tmp_path / "src", "-d", 503, "--labeled", 2, "--seed", 3, "-np", 1], raw,
                         tmp_path))
    split = common.seeded_split(ids, 0.2, 3)
    assert (len(split.train), len(split.test)) == (4, 1)
    folder = raw / "Dataset503_LA2018"
    sources = read_sources({c: tmp_path / "src" / "Training Set" / c / "laendo.nrrd" for c in ids})
    images = read_sources({c: tmp_path / "src" / "Training Set" / c / "lgemri.nrrd" for c in ids})
    check_dataset(folder, split.train[:2], split.train[2:], split.test, sources, images)
    assert json.loads((folder / "conversion.json").read_text())["form"] == "nrrd"
    verify_in_process(folder)


# ------------------------------------------------------------------------------------------------
# cas2023
# ------------------------------------------------------------------------------------------------
def test_cas2023_seeded_split(tmp_path):
    ids = make_cas(tmp_path / "src")
    raw = tmp_path / "raw"
    result = run("cas2023", ["-i", tmp_path / "src", "-d", 511, "--labeled", 2, "-np", 1], raw, tmp_path)
    assert_converted(result)
    split = common.seeded_split(ids, 0.1, 0)  # 6 cases: 5 training, 1 test
    names = {c: common.case_name(c) for c in ids}
    folder = raw / "Dataset511_CAS2023"
    sources = read_sources({names[c]: tmp_path / "src" / "mask" / f"{c}.nii.gz" for c in ids})
    images = read_sources({names[c]: tmp_path / "src" / "data" / f"{c}.nii.gz" for c in ids})
    check_dataset(folder, [names[c] for c in split.train[:2]], [names[c] for c in split.train[2:]],
                  [names[c] for c in split.test], sources, images)
    assert "values other than 0/1" in result.stdout  # the masks holding 2 were binarised
    verify_in_process(folder)


def test_cas2023_errors(tmp_path):
    make_cas(tmp_path / "src")
    raw = tmp_path / "raw"
    # unknown layout: says what was expected
    (tmp_path / "wrong" / "images").mkdir(parents=True)
    assert_error(run("cas2023", ["-i", tmp_path / "wrong", "-d", 512, "--labeled", 2], raw, tmp_path),
                 "unknown layout", "data/<id>.nii.gz and mask/<id>.nii.gz")
    # N < 1, N larger than the training split (5), bad command line
    assert_error(run("cas2023", ["-i", tmp_path / "src", "-d", 512, "--labeled", 0], raw, tmp_path), "--labeled 0")
    assert_error(run("cas2023", ["-i", tmp_path / "src", "-d", 512, "--labeled", 6], raw, tmp_path),
                 "--labeled 6", "5 cases")
    assert_error(run("cas2023", ["-i", tmp_path / "src", "--labeled", 2], raw, tmp_path), "-d")
    # a missing label
    os.remove(tmp_path / "src" / "mask" / "004.nii.gz")
    assert_error(run("cas2023", ["-i", tmp_path / "src", "-d", 512, "--labeled", 2], raw, tmp_path),
                 "case 004 has no label")
    assert not raw.exists() or os.listdir(raw) == []


def test_existing_dataset_untouched_then_overwritten(tmp_path):
    """Any DatasetXXX_* with the ID stops the conversion (untouched) unless --overwrite, which replaces it."""
    make_cas(tmp_path / "src", n=4)
    raw = tmp_path / "raw"
    existing = raw / "Dataset513_Other"
    (existing / "imagesTr").mkdir(parents=True)
    (existing / "imagesTr" / "keep_0000.nii.gz").write_bytes(b"x")
    before = snapshot(raw)
    assert_error(run("cas2023", ["-i", tmp_path / "src", "-d", 513, "--labeled", 2], raw, tmp_path),
                 "Dataset513_Other", "--overwrite")
    assert snapshot(raw) == before
    assert_converted(run("cas2023", ["-i", tmp_path / "src", "-d", 513, "--labeled", 2, "--overwrite", "-np", 1],
                         raw, tmp_path))
    assert sorted(os.listdir(raw)) == ["Dataset513_CAS2023"]


def test_label_geometry(tmp_path):
    """Labels whose origin differs from the image's are written on the image's grid with a warning (as nnU-Net
    would use them); a label with another spacing stops the conversion. Also runs with 2 worker processes."""
    ids = make_cas(tmp_path / "src", n=4)
    for c in ids:
        path = str(tmp_path / "src" / "mask" / f"{c}.nii.gz")
        mask = sitk.ReadImage(path)
        mask.SetOrigin((12.0, -5.0, 3.0))
        sitk.WriteImage(mask, path, True)
    raw = tmp_path / "raw"
    result = run("cas2023", ["-i", tmp_path / "src", "-d", 516, "--labeled", 1, "-np", 2], raw, tmp_path)
    assert_converted(result)
    assert "WARNING: image and label origin/direction differ in 2 case(s)" in result.stderr
    folder = raw / "Dataset516_CAS2023"
    for path in list((folder / "labelsTr").iterdir()) + list((folder / "labelsTs").iterdir()):
        np.testing.assert_allclose(sitk.ReadImage(str(path)).GetOrigin(), ORIGIN)
    for c in ids:
        path = str(tmp_path / "src" / "mask" / f"{c}.nii.gz")
        mask = sitk.ReadImage(path)
        mask.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(mask, path, True)
    assert_error(run("cas2023", ["-i", tmp_path / "src", "-d", 517, "--labeled", 1], raw, tmp_path),
                 "label spacing")
    assert sorted(os.listdir(raw)) == ["Dataset516_CAS2023"]


def test_truncated_file_stops_before_writing(tmp_path):
    """A truncated .nii.gz (SimpleITK would read it, zero-filled) stops the conversion before anything is written."""
    ids = make_cas(tmp_path / "src", n=4)
    path = tmp_path / "src" / "data" / f"{ids[1]}.nii.gz"
    path.write_bytes(path.read_bytes()[:-300])
    raw = tmp_path / "raw"
    assert_error(run("cas2023", ["-i", tmp_path / "src", "-d", 514, "--labeled", 1], raw, tmp_path),
                 f"{ids[1]}.nii.gz", "truncated")
    assert not raw.exists() or os.listdir(raw) == []


def test_crash_while_writing_leaves_nothing(tmp_path):
    """A volume that fails only when its voxels are read (h5 data in a missing external file) stops the
    conversion half-way, with one ERROR line; the temporary folder is removed, nnUNet_raw holds nothing."""
    make_la_h5(tmp_path / "src")
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "src" / "data" / "2018LA_Seg_Training Set" / LA_TEST[-1] / "mri_norm2.h5"
    with h5py.File(path, "a") as f:
        del f["image"]
        f.create_dataset("image", shape=SIZE, dtype="float32", external=[("gone.bin", 0, h5py.h5f.UNLIMITED)])
    raw = tmp_path / "raw"
    raw.mkdir()
    result = run("la2018", ["-i", tmp_path / "src" / "data", "-d", 515, "--labeled", 2, "-np", 1], raw, tmp_path)
    assert_error(result, "mri_norm2.h5", LA_TEST[-1])
    assert "[7/8]" in result.stdout  # it failed while writing, after the other cases
    assert os.listdir(raw) == []


# ------------------------------------------------------------------------------------------------
# parse2022
# ------------------------------------------------------------------------------------------------
def test_parse2022_split_file(tmp_path):
    """--split-file json: labeled = the first N training ids in file order."""
    ids = make_parse(tmp_path / "src")
    train, test = [ids[3], ids[0], ids[5], ids[1]], [ids[2], ids[4]]
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": train, "test": test}))
    raw = tmp_path / "raw"
    # SOURCE_DIR is the folder above train/, run as a module from the repository root
    env = {**os.environ, "nnUNet_raw": str(raw)}
    result = subprocess.run([sys.executable, "-m", "dataset_conversion.parse2022", "-i", str(tmp_path / "src"), "-d",
                             "521", "--labeled", "2", "--split-file", str(split_file), "-np", "1"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert_converted(result)
    folder = raw / "Dataset521_Parse2022"
    sources = read_sources({c: tmp_path / "src" / "train" / c / "label" / f"{c}.nii.gz" for c in ids})
    images = read_sources({c: tmp_path / "src" / "train" / c / "image" / f"{c}.nii.gz" for c in ids})
    check_dataset(folder, train[:2], train[2:], test, sources, images)
    assert sitk.ReadImage(str(folder / "imagesTr" / f"{train[0]}_0000.nii.gz")).GetPixelID() == sitk.sitkInt16
    verify_in_process(folder)


def test_parse2022_errors(tmp_path):
    ids = make_parse(tmp_path / "src")
    raw = tmp_path / "raw"
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": ids[:4] + ["PA999999"], "test": ids[4:]}))
    assert_error(run("parse2022", ["-i", tmp_path / "src", "-d", 522, "--labeled", 2, "--split-file", split_file],
                     raw, tmp_path), "PA999999")
    shutil.rmtree(tmp_path / "src" / "train" / ids[2] / "label")
    os.mkdir(tmp_path / "src" / "train" / ids[2] / "label")
    assert_error(run("parse2022", ["-i", tmp_path / "src", "-d", 522, "--labeled", 2], raw, tmp_path),
                 f"case {ids[2]} has no label")
    assert not raw.exists() or os.listdir(raw) == []


# ------------------------------------------------------------------------------------------------
# imagecas
# ------------------------------------------------------------------------------------------------
def write_imagecas_workbook(path, train, validation, test):
    """Like the official imageCAS_data_split.xlsx: an old sheet 'v1', the sheet 'v2-latest' with a title row above
    the header (FileName, Split-1, Split-2)."""
    openpyxl = pytest.importorskip("openpyxl")
    workbook = openpyxl.Workbook()
    old = workbook.active
    old.title = "v1"
    old.append(["FileName", "Split-1"])
    old.append([10016975, "Training"])
    sheet = workbook.create_sheet("v2-latest")
    sheet.append(["ImageCAS data split"])
    sheet.append(["FileName", "Split-1", "Split-2"])
    for ids, value in ((train, "Training"), (validation, "Validation"), (test, "Testing")):
        for i in ids:
            sheet.append([int(i), value, "Testing"])
    workbook.save(path)


def test_imagecas_official_workbook(tmp_path):
    """Recursive search, duplicates '(1)' skipped, ids zero-padded, .xlsx split (validation rows -> training)."""
    ids = make_imagecas(tmp_path / "src")
    workbook = tmp_path / "imageCAS_data_split.xlsx"
    write_imagecas_workbook(workbook, train=["1", "2", "4"], validation=["6"], test=["3", "5"])
    raw = tmp_path / "raw"
    result = run("imagecas", ["-i", tmp_path / "src", "-d", 531, "--labeled", 2, "--split-file", workbook, "-np", 1],
                 raw, tmp_path)
    assert_converted(result)
    assert "Skipped 2 duplicate" in result.stdout
    folder = raw / "Dataset531_ImageCAS"
    sources = read_sources({f"{int(c):04d}": tmp_path / "src" / "1-200" / f"{c}.label.nii.gz" for c in ids})
    images = read_sources({f"{int(c):04d}": tmp_path / "src" / "1-200" / f"{c}.img.nii.gz" for c in ids})
    check_dataset(folder, ["0001", "0002"], ["0004", "0006"], ["0003", "0005"], sources, images)
    assert json.loads((folder / "conversion.json").read_text())["source_ids"]["0001"] == "1"
    verify_in_process(folder)


def test_imagecas_errors(tmp_path):
    make_imagecas(tmp_path / "src", n=4)
    raw = tmp_path / "raw"
    assert_error(run("imagecas", ["-i", tmp_path / "src", "-d", 532, "--labeled", 4], raw, tmp_path),
                 "--labeled 4", "3 cases")
    shutil.copy(tmp_path / "src" / "1-200" / "2.img.nii.gz", tmp_path / "src" / "2.img.nii.gz")
    assert_error(run("imagecas", ["-i", tmp_path / "src", "-d", 532, "--labeled", 1], raw, tmp_path),
                 "case 2 found twice")
    os.remove(tmp_path / "src" / "2.img.nii.gz")
    os.remove(tmp_path / "src" / "1-200" / "3.label.nii.gz")
    assert_error(run("imagecas", ["-i", tmp_path / "src", "-d", 532, "--labeled", 1], raw, tmp_path),
                 "case 3 has no label")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_error(run("imagecas", ["-i", empty, "-d", 532, "--labeled", 1], raw, tmp_path), "unknown layout",
                 "<id>.img.nii.gz")
    assert not raw.exists() or os.listdir(raw) == []


# ------------------------------------------------------------------------------------------------
# split files and helpers (in-process, cheap)
# ------------------------------------------------------------------------------------------------
def test_split_file_formats(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"train": ["b", "a"], "test": ["c"]}))
    (tmp_path / "s.txt").write_text("# protocol\ntrain: b, a\n\ntest:\nc  # held out\n")
    (tmp_path / "s.csv").write_text("id,split\nb,train\na,training\nc,test\nd,validation\n")
    for name in ("s.json", "s.txt"):
        train, test, _ = common.read_split_file(str(tmp_path / name))
        assert (train, test) == (["b", "a"], ["c"])
    train, test, where = common.read_split_file(str(tmp_path / "s.csv"))
    assert (train, test) == (["b", "a", "d"], ["c"]) and "validation" in where
    train, test, _ = common.read_split_file(str(tmp_path / "s.csv"), validation_to="skip")
    assert (train, test) == (["b", "a"], ["c"])
    write_imagecas_workbook(tmp_path / "w.xlsx", ["1"], [], ["2"])
    assert common.read_split_file(str(tmp_path / "w.xlsx"))[:2] == (["1"], ["2"])
    assert common.read_split_file(str(tmp_path / "w.xlsx"), column="Split-2")[:2] == ([], ["1", "2"])
    for bad, message in ((tmp_path / "s.yaml", "not found"), (tmp_path / "s.csv", "'nope'")):
        with pytest.raises(common.ConversionError, match=message):
            common.read_split_file(str(bad), column="nope")
    (tmp_path / "bad.json").write_text(json.dumps({"train": ["a"]}))
    with pytest.raises(common.ConversionError, match="exactly"):
        common.read_split_file(str(tmp_path / "bad.json"))


def test_seeded_split_and_names():
    ids = [str(i) for i in range(1, 21)]
    split = common.seeded_split(ids, 0.1, 0)
    assert (len(split.train), len(split.test)) == (18, 2)
    assert sorted(split.train + split.test) == sorted(ids)
    assert common.seeded_split(ids, 0.1, 0).train == split.train != common.seeded_split(ids, 0.1, 1).train
    assert [common.id_key(i) for i in ("0001", "1.img.nii.gz", 1.0, " 1 ")] == ["1"] * 4
    assert (common.case_name("7"), common.case_name("PA000005"), common.case_name("a b")) == ("0007", "PA000005",
                                                                                               "a_b")
    with pytest.raises(common.ConversionError, match="listed twice"):
        common.split_from_lists(["a", "b", "c"], ["a", "b"], ["a"], "p", "the file")


def test_help_from_any_directory(tmp_path):
    for script in ("la2018", "cas2023", "parse2022", "imagecas"):
        result = subprocess.run([sys.executable, str(SCRIPTS / f"{script}.py"), "--help"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "--labeled" in result.stdout and "Writes" in result.stdout, result.stderr
