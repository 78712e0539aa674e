"""benchmarks/ssl_gain.py: the table's arithmetic, and a tiny real benchmark that keeps finished arms on a rerun."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "ssl_gain.py"
TASK = "vessel"  # the atrium task goes through nnU-Net's planner in conftest.py's dataset


def _module():
    spec = importlib.util.spec_from_file_location("ssl_gain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(arm, seed, dice):
    return {"task": "atrium", "arm": arm, "seed": seed, "mean_dice": sum(dice) / len(dice),
            "dice": {f"ts_{i}": d for i, d in enumerate(dice)}}


def test_summary_gap_closed_spread_and_worst_case():
    ssl_gain = _module()
    results = [_result("labeled_only", 0, [0.6, 0.8]), _result("labeled_only", 1, [0.5, 0.7]),
               _result("caml", 0, [0.8, 0.8]), _result("caml", 1, [0.6, 0.72]),
               _result("all_labeled", 0, [0.9, 0.9]), _result("all_labeled", 1, [0.8, 0.8])]
    # test case ts_1's acquisition protocol is not among the labeled cases'
    table = ssl_gain.summarise(results, ["labeled_only", "caml", "all_labeled"], {"atrium": {"ts_1"}})["atrium"]
    assert table["labeled_only"]["mean"] == pytest.approx(0.65)
    assert table["caml"]["per_seed"] == pytest.approx([0.8, 0.66])
    assert table["caml"]["std"] == pytest.approx(0.09899, abs=1e-4)
    assert table["caml"]["worst_seed"] == pytest.approx(0.66)
    assert table["caml"]["worst_case"] == pytest.approx(0.6)
    # gap: all_labeled - labeled_only = (0.2 + 0.2) / 2; gain: (0.1 + 0.06) / 2 -> 40 % closed
    assert table["caml"]["gap_closed"] == pytest.approx(0.4)
    assert table["caml"]["gain_per_seed"] == pytest.approx([0.1, 0.06])
    assert table["labeled_only"]["gap_closed"] == pytest.approx(0.0)
    assert table["all_labeled"]["gap_closed"] == pytest.approx(1.0)
    assert table["caml"]["seen_protocols"] == pytest.approx((0.8 + 0.6) / 2)
    assert table["caml"]["unseen_protocols"] == pytest.approx((0.8 + 0.72) / 2)
    # a seed without the ceiling still counts for the gain; the gap comes from the seeds that have both ends
    results += [_result("labeled_only", 2, [0.6, 0.6]), _result("caml", 2, [0.7, 0.7])]
    three = ssl_gain.summarise(results, ["labeled_only", "caml", "all_labeled"])["atrium"]
    assert three["caml"]["gain_per_seed"] == pytest.approx([0.1, 0.06, 0.1])
    assert three["caml"]["gap_closed"] == pytest.approx((0.26 / 3) / 0.2)
    # an arm run on fewer seeds is measured against the gap on its own seeds, not on all of them
    results += [_result("all_labeled", 2, [0.7, 0.7]), _result("noOCC", 0, [0.75, 0.75])]
    four = ssl_gain.summarise(results, ["labeled_only", "noOCC", "all_labeled"])["atrium"]
    assert four["noOCC"]["gap_closed"] == pytest.approx((0.75 - 0.7) / 0.2)
    text = ssl_gain.format_table({"atrium": table}, "header")
    assert ("| caml | 0.730 ± 0.099 | 0.800 0.660 | 0.660 | 0.600 | 40 % | +0.100 +0.060 | 0.700 / 0.760 |"
            in text.splitlines())


def test_protocol_table_scores_each_protocol_and_its_gap_closed():
    ssl_gain = _module()
    results = [_result("labeled_only", 0, [0.6, 0.8, 0.5]), _result("labeled_only", 1, [0.5, 0.7, 0.5]),
               _result("caml", 0, [0.8, 0.8, 0.6]), _result("caml", 1, [0.6, 0.72, 0.5]),
               _result("all_labeled", 0, [0.9, 0.9, 0.9]), _result("all_labeled", 1, [0.8, 0.8, 0.8])]
    protocols = {"atrium": {"ts_0": "A", "ts_1": "B", "ts_2": "A", "lab_000": "A"}}
    table = ssl_gain.summarise_protocols(results, ["labeled_only", "caml", "all_labeled"], protocols)["atrium"]
    assert table["caml"]["A"]["cases"] == 2 and table["caml"]["B"]["cases"] == 1
    assert table["caml"]["A"]["mean"] == pytest.approx((0.7 + 0.55) / 2)
    # A: gains (0.15, 0.05) over gaps (0.35, 0.3); B: gains (0, 0.02) over gaps (0.1, 0.1)
    assert table["caml"]["A"]["gap_closed"] == pytest.approx(0.1 / 0.325)
    assert table["caml"]["B"]["gap_closed"] == pytest.approx(0.1)
    text = ssl_gain.format_protocol_table({"atrium": table}, {"atrium": {"A"}})
    assert "| arm | A (2 cases, seen, gap 0.325) | B (1 case, unseen, gap 0.100) |" in text.splitlines()
    assert "| caml | 0.625 (31 %) | 0.760 (10 %) |" in text.splitlines()
    # a protocol that all labels barely improve gets no fraction of its gap
    results = [r for r in results if r["arm"] != "all_labeled"] + [
        _result("all_labeled", 0, [0.9, 0.81, 0.9]), _result("all_labeled", 1, [0.8, 0.71, 0.8])]
    table = ssl_gain.summarise_protocols(results, ["labeled_only", "caml", "all_labeled"], protocols)["atrium"]
    assert "| caml | 0.625 (31 %) | 0.760 |" in ssl_gain.format_protocol_table({"atrium": table}, {}).splitlines()


def _benchmark(workdir, *extra):
    # two runs at a time: most of a 4-step run is Python and nnU-Net starting up
    return subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(workdir), "--tasks", TASK, "--seeds", "0",
                           "--labeled", "2", "--unlabeled", "2", "--test", "2", "--shape", "32", "40", "40",
                           "--features", "8", "16", "32", "64", "--steps", "4", "--iterations-per-epoch", "2",
                           "--device", "cpu", "--parallel", "2", *extra], capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "2"})


@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ssl_gain")
    result = _benchmark(workdir, "--arms", "labeled_only", "caml", "all_labeled")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir, result


def test_benchmark_trains_scores_and_tabulates_every_arm(benchmark_run):
    workdir, result = benchmark_run
    assert "3 to run" in result.stdout
    # nnU-Net's integrity check accepted the generated dataset, and its preprocessing took the labeled training cases
    # of imagesTr, not the images of imagesTrUnlabeled
    assert "verify_dataset_integrity Done" in (workdir / "ssl_gain.log").read_text()
    preprocessed = next((workdir / "nnUNet_preprocessed").iterdir())
    assert (preprocessed / "dataset_fingerprint.json").is_file()
    assert sorted(f.stem for f in (preprocessed / "nnUNetPlans_3d_fullres").glob("*.pkl")) == [
        f"lab_{i:03d}" for i in range(4)]
    for arm, trainer, labeled in (("labeled_only", "nnUNetTrainer", 2), ("caml", "nnUNetTrainerCAML", 2),
                                  ("all_labeled", "nnUNetTrainer", 4)):
        run = json.loads((workdir / "runs" / TASK / arm / "seed_0" / "result.json").read_text())
        assert run["trainer"] == trainer and run["labeled"] == labeled and run["steps"] == 4
        assert sorted(run["dice"]) == ["ts_000", "ts_001"]  # the test cases, never trained on
        assert 0 <= run["mean_dice"] <= 1
    # the labeled arms trained on the first 2 cases, the ceiling on all 4 (nnU-Net's log of the split)
    log = (workdir / "runs" / TASK / "caml" / "seed_0" / "train.log").read_text()
    assert "This split has 2 training" in log
    log = (workdir / "runs" / TASK / "all_labeled" / "seed_0" / "train.log").read_text()
    assert "This split has 4 training" in log
    table = (workdir / "ssl_gain.md").read_text()
    for arm in ("labeled_only", "caml", "all_labeled"):
        assert f"| {arm} |" in table
    assert "Device: CPU" in table and "--steps 4" in table
    assert (workdir / "ssl_gain.png").stat().st_size > 0
    assert f"**{TASK}**: test Dice per acquisition protocol" in table
    summary = json.loads((workdir / "ssl_gain.json").read_text())
    per_protocol = summary["per_protocol"][TASK]  # the 2 test cases, grouped by the protocol the generator drew
    assert list(per_protocol) == ["labeled_only", "caml", "all_labeled"]
    assert sum(cell["cases"] for cell in per_protocol["caml"].values()) == 2
    table = summary["table"][TASK]
    gap = table["all_labeled"]["mean"] - table["labeled_only"]["mean"]
    # after 4 steps both arms may predict the same; the gap closed is defined only for a positive gap
    if gap > 0:
        assert table["all_labeled"]["gap_closed"] == pytest.approx(1.0)
    else:
        assert math.isnan(table["all_labeled"]["gap_closed"])


def test_rerun_keeps_finished_arms_and_adds_new_ones(benchmark_run):
    workdir, _ = benchmark_run
    caml_log = workdir / "runs" / TASK / "caml" / "seed_0" / "train.log"
    before = caml_log.read_text()
    # an arm that trained but was not scored yet (e.g. killed during prediction) is scored without training again
    (workdir / "runs" / TASK / "caml" / "seed_0" / "result.json").unlink()
    result = _benchmark(workdir, "--arms", "caml", "--calibrate", "3")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "0 of 2 runs already finished (kept); 2 to run" in result.stdout
    assert caml_log.read_text()[len(before):].count("Epoch 0") == 0
    assert (workdir / "runs" / TASK / "caml" / "seed_0" / "result.json").is_file()
    run = json.loads((workdir / "runs" / TASK / "labeled_3" / "seed_0" / "result.json").read_text())
    assert run["labeled"] == 3
    # both tables also hold the arms finished by the first invocation, in the default arms' order
    for table in (workdir / "ssl_gain.md").read_text().split("test Dice per acquisition protocol"):
        rows = [line.split("|")[1].strip() for line in table.splitlines()
                if line.startswith("| ") and not line.startswith("| arm")]
        assert rows == ["labeled_only", "caml", "all_labeled", "labeled_3"]


def test_changed_settings_in_the_same_workdir_are_refused(benchmark_run):
    workdir, _ = benchmark_run
    result = _benchmark(workdir, "--arms", "labeled_only", "--steps", "6")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"ERROR: {workdir} holds runs made with steps=4; use another --workdir or pass --overwrite to start over"]


def test_diagnosis_scores_both_networks_on_test_and_unlabeled_images(benchmark_run):
    workdir, _ = benchmark_run
    diagnose = [sys.executable, str(REPO / "benchmarks" / "ssl_diagnose.py"), "--workdir", str(workdir), "--tasks",
                TASK]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([*diagnose, "--arms", "caml", "labeled_only"], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for arm in ("caml", "labeled_only"):
        folder = workdir / "runs" / TASK / arm / "seed_0"
        cases = json.loads((folder / "diagnose.json").read_text())["cases"]
        # the test cases and the unlabeled training images (labels kept by the generator), nothing else
        assert sorted(cases) == ["ts_000", "ts_001", "unl_lab_002", "unl_lab_003"]
        assert ("aux" in cases["ts_000"]) == (arm == "caml")
        # the main network's test Dice is the benchmark's own score of the same checkpoint
        scored = json.loads((folder / "result.json").read_text())["dice"]
        for case in ("ts_000", "ts_001"):
            if not math.isnan(scored[case]):
                assert cases[case]["main"] == pytest.approx(scored[case], abs=1e-6)
        for row in cases.values():
            assert all(0 <= v <= 1 for k, v in row.items() if k in ("main", "aux", "agreement", "recall"))
    table = (workdir / "ssl_diagnose.md").read_text()
    assert f"| {TASK} | caml | 0 | unlabeled | all | 2 |" in table
    # a run the benchmark has not finished is refused in one line
    result = subprocess.run([*diagnose, "--arms", "noOCC"], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "noOCC/seed_0" in result.stderr
