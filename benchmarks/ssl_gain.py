"""The semi-supervised gain, measured: labeled-only nnU-Net against CAML (and its ablations) against all-labeled.

    python benchmarks/ssl_gain.py --workdir DIR [--tasks atrium vessel] [--seeds 0 1 2]
        [--arms labeled_only labeled_only_localContrast caml noCMA noOCC noCMA_noOCC noPerturbedView noLocalContrast
                all_labeled] [--arm NAME=TRAINER ...]
        [--steps 2000] [--calibrate 2 8 16] [--device cpu|cuda] [--parallel N]

For each task the package's synthetic generator writes one dataset whose ``imagesTr`` holds every training case with
its label (``--labeled`` + ``--unlabeled`` of them) and whose ``imagesTrUnlabeled`` holds copies of the images of
all but the first ``--labeled`` cases. nnU-Net checks (``--verify_dataset_integrity``), plans and preprocesses it
once, so every arm trains on the same plans; ``splits_final.json`` has one fold per labeled count (fold = the first
N training cases), so:

* ``labeled_only``: stock ``nnUNetTrainer`` on the first ``--labeled`` cases;
* ``labeled_only_localContrast``: the same, its network on the local-contrast view that CAML's auxiliary network
  sees (``nnUNetTrainer_localContrast``): what the view alone gives without unlabeled images;
* ``caml`` (and its ablations ``noCMA``, ``noOCC``, ``noCMA_noOCC``, ``noPerturbedView``, ``noLocalContrast``): CAML
  on the same labeled cases plus the unlabeled images;
* ``all_labeled``: stock ``nnUNetTrainer`` with every training case labeled (the ceiling);
* ``labeled_N`` (``--calibrate N ...``): stock ``nnUNetTrainer`` on the first N cases;
* ``NAME=TRAINER`` (``--arm``): any trainer nnU-Net can find, on the labeled fold (CAML-style trainers use the
  unlabeled images).

Every arm runs the same number of optimiser steps (``--steps``, as epochs of ``--iterations-per-epoch``) through
nnU-Net's own training loop (``get_trainer_from_args`` + ``run_training``, as ``nnUNetv2_train`` does), with the
seed set before the networks are built; then ``nnUNetPredictor`` (main network, ``checkpoint_final.pth``, no
test-time augmentation) segments the test images, which no arm ever trains on, and Dice is computed per case.

Each (task, arm, seed) runs in its own process and writes ``result.json`` when done. A rerun keeps finished arms
and resumes unfinished ones from their latest checkpoint, so a long benchmark survives interruptions. With CUDA the
arms run side by side on the GPU (``--parallel``, default: all at once); on the CPU ``--parallel N`` runs N at a time
with the cores split between them (default: one run on every core). The table (``ssl_gain.md``, also printed),
the raw numbers (``ssl_gain.json``) and a plot (``ssl_gain.png``) land in the work folder. A second table splits
the test Dice by the acquisition protocol the generator drew for each test case, with the gap closed on each: where
the labeled cases lack a protocol, and where the unlabeled images close its gap, or do not.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from nnunetv2_caml.nnunet_trainers import trainers_folder

DATASET_IDS = {"atrium": 611, "vessel": 612}
CONFIGURATION = "3d_bench"
#: arm name -> (trainer class, uses every training label)
DEFAULT_ARMS = {
    "labeled_only": ("nnUNetTrainer", False),
    "labeled_only_localContrast": ("nnUNetTrainer_localContrast", False),
    "caml": ("nnUNetTrainerCAML", False),
    "noCMA": ("nnUNetTrainerCAML_noCMA", False),
    "noOCC": ("nnUNetTrainerCAML_noOCC", False),
    "noCMA_noOCC": ("nnUNetTrainerCAML_noCMA_noOCC", False),
    "noPerturbedView": ("nnUNetTrainerCAML_noPerturbedView", False),
    "noLocalContrast": ("nnUNetTrainerCAML_noLocalContrast", False),
    "all_labeled": ("nnUNetTrainer", True),
}
#: settings that must not change inside one work folder (results would not be comparable)
FIXED_SETTINGS = ("labeled", "unlabeled", "test", "shape", "patch", "features", "batch_size", "steps",
                  "iterations_per_epoch", "data_seed", "protocols")


class BenchmarkError(RuntimeError):
    """A problem the user must fix; the message is one line saying how."""


# --------------------------------------------------------------------------------------------- data set-up
def _nnunet_env(workdir: Path, results: Path = None) -> dict:
    env = dict(os.environ)
    ext = [trainers_folder()] + [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    env.update({"nnUNet_raw": str(workdir / "nnUNet_raw"), "nnUNet_preprocessed": str(workdir / "nnUNet_preprocessed"),
                "nnUNet_results": str(results or workdir / "nnUNet_results"),
                "nnUNet_extTrainer": os.pathsep.join(dict.fromkeys(ext))})
    env.setdefault("nnUNet_def_n_proc", "2")
    return env


def fold_of(labeled: int) -> int:
    """``splits_final.json`` has one fold per labeled count: fold ``n - 1`` trains on the first ``n`` cases."""
    return labeled - 1


def prepare_task(workdir: Path, task: str, settings: dict, log_file: Path) -> str:
    """Generate, plan and preprocess the task's dataset and write its splits, once; return the dataset name."""
    from nnunetv2_caml.demo.run import _run, planning_env
    from nnunetv2_caml.demo.small_configuration import add_small_configuration
    from nnunetv2_caml.demo.synthetic import dataset_name, generate_dataset

    dataset_id = DATASET_IDS[task]
    name = dataset_name(dataset_id, task)
    env = _nnunet_env(workdir)
    preprocessed = workdir / "nnUNet_preprocessed" / name
    total = settings["labeled"] + settings["unlabeled"]
    if not (preprocessed / ".prepared").is_file():
        print(f"[ssl-gain] {task}: generating {total} training and {settings['test']} test volumes", flush=True)
        raw = Path(generate_dataset(env["nnUNet_raw"], dataset_id, task, num_labeled=total, num_unlabeled=0,
                                    num_test=settings["test"], shape=settings["shape"], seed=settings["data_seed"],
                                    overwrite=True, protocols=settings["protocols"]))
        # the unlabeled pool: images of every training case but the first --labeled, under ids of their own
        unlabeled = raw / "imagesTrUnlabeled"
        unlabeled.mkdir(exist_ok=True)
        for i in range(settings["labeled"], total):
            shutil.copy(raw / "imagesTr" / f"lab_{i:03d}_0000.nii.gz", unlabeled / f"unl_lab_{i:03d}_0000.nii.gz")
        shutil.rmtree(preprocessed, ignore_errors=True)
        _run(f"{task}: plan and preprocess", ["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres",
                                              "-np", "2", "--verify_dataset_integrity"], planning_env(env), log_file)
        _run(f"{task}: preprocess unlabeled", ["nnUNetv2_caml_preprocess_unlabeled", "-d", dataset_id, "-c",
                                               "3d_fullres", "-np", "2"], env, log_file)
        add_small_configuration(dataset_id, CONFIGURATION, features_per_stage=settings["features"],
                                patch_size=settings["patch"], batch_size=settings["batch_size"])
        cases = [f"lab_{i:03d}" for i in range(total)]
        # nnU-Net needs validation cases for its per-epoch pseudo Dice; the benchmark scores on the test set instead
        splits = [{"train": cases[:n], "val": cases[:min(n, 2)]} for n in range(1, total + 1)]
        (preprocessed / "splits_final.json").write_text(json.dumps(splits, indent=1))
        (preprocessed / ".prepared").write_text(json.dumps(settings))
    return name


# --------------------------------------------------------------------------------------------- one arm
def train_and_score(run: dict) -> dict:
    """Train one arm with nnU-Net's training loop (resuming from its latest checkpoint), predict the test images
    with the main network and score them. Runs in its own process (its env names its own nnUNet_results)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    from nnunetv2_caml.metrics import evaluate_folders
    from nnunetv2_caml.variants import seed_everything

    device = torch.device(run["device"])
    if device.type == "cpu":
        torch.set_num_threads(run.get("threads") or max(1, os.cpu_count() or 1))
    seed_everything(run["seed"])
    trainer = get_trainer_from_args(run["dataset"], CONFIGURATION, run["fold"], run["trainer"], device=device)
    trainer.num_epochs = run["steps"] // run["iterations_per_epoch"]
    trainer.num_iterations_per_epoch = run["iterations_per_epoch"]
    trainer.num_val_iterations_per_epoch = 1
    trainer.save_every = max(1, trainer.num_epochs // 10)  # resumable every tenth of the run
    final = Path(trainer.output_folder) / "checkpoint_final.pth"
    if not final.is_file():
        maybe_load_checkpoint(trainer, continue_training=True, validation_only=False)
        trainer.run_training()
    # training time from nnU-Net's own epoch timestamps (they survive resuming); an epoch includes its validation
    log = torch.load(final, map_location="cpu", weights_only=False)["logging"]
    epoch_seconds = np.subtract(log["epoch_end_timestamps"], log["epoch_start_timestamps"])

    predictions = Path(run["folder"]) / "predictions"
    predictions.mkdir(exist_ok=True)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(Path(trainer.output_folder).parent), (run["fold"],),
                                                   "checkpoint_final.pth")
    predictor.predict_from_files_sequential(run["test_images"], str(predictions), overwrite=True)
    summary = evaluate_folders(run["test_labels"], str(predictions))
    result = {**{k: run[k] for k in ("task", "arm", "seed", "trainer", "fold", "labeled", "steps")},
              "dice": {case: values["dice"] for case, values in summary["cases"].items()},
              "hd95": {case: values["hd95"] for case, values in summary["cases"].items()},
              "mean_dice": summary["mean"]["dice"], "train_seconds": float(epoch_seconds.sum()),
              "seconds_per_step": float(np.median(epoch_seconds)) / run["iterations_per_epoch"]}
    (Path(run["folder"]) / "result.json").write_text(json.dumps(result, indent=1))
    return result


# --------------------------------------------------------------------------------------------- many arms
def _launch(run: dict, env: dict) -> subprocess.Popen:
    folder = Path(run["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps(run, indent=1))
    log = open(folder / "train.log", "a")
    return subprocess.Popen([sys.executable, __file__, "--worker", str(folder / "run.json")], env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def run_all(runs: List[dict], workdir: Path, parallel: int) -> None:
    """Run the unfinished runs, ``parallel`` at a time, printing each one's start and result."""
    from tqdm import tqdm

    todo = [r for r in runs if not (Path(r["folder"]) / "result.json").is_file()]
    print(f"[ssl-gain] {len(runs) - len(todo)} of {len(runs)} runs already finished (kept); {len(todo)} to run",
          flush=True)
    running: Dict[subprocess.Popen, dict] = {}
    failed = []
    with tqdm(total=len(todo), desc="runs", unit="run") as progress:
        while todo or running:
            while todo and len(running) < parallel:
                run = todo.pop(0)
                env = _nnunet_env(workdir, Path(run["folder"]) / "nnUNet_results")
                env.setdefault("nnUNet_n_proc_DA", "0" if run["device"] == "cpu" else
                               str(max(1, (os.cpu_count() or 2) // parallel - 1)))
                tqdm.write(f"[ssl-gain] start {run['task']} {run['arm']} seed {run['seed']} ({run['trainer']}, "
                           f"{run['labeled']} labeled)  log: {Path(run['folder']) / 'train.log'}")
                running[_launch(run, env)] = run
            time.sleep(1.0)
            for process in [p for p in running if p.poll() is not None]:
                run = running.pop(process)
                progress.update()
                result_file = Path(run["folder"]) / "result.json"
                if process.returncode == 0 and result_file.is_file():
                    result = json.loads(result_file.read_text())
                    tqdm.write(f"[ssl-gain] done  {run['task']} {run['arm']} seed {run['seed']}: mean test Dice "
                               f"{result['mean_dice']:.4f} ({result['train_seconds']:.0f} s training)")
                else:
                    failed.append(run)
                    tqdm.write(f"[ssl-gain] FAILED {run['task']} {run['arm']} seed {run['seed']} (exit code "
                               f"{process.returncode}); see {Path(run['folder']) / 'train.log'}")
    if failed:
        raise BenchmarkError(f"{len(failed)} run(s) failed (first: {failed[0]['folder']}/train.log); rerun the same "
                             f"command to retry them, finished runs are kept")


# --------------------------------------------------------------------------------------------- the table
def seen_protocols(protocols: Dict[str, str], labeled: int) -> set:
    """The acquisition protocols of the first ``labeled`` training cases (``protocols``: case id -> protocol, as the
    generator records them in dataset.json)."""
    return {protocols.get(f"lab_{i:03d}") for i in range(labeled)}


def case_protocols(workdir: Path, task: str) -> Dict[str, str]:
    """Case id -> acquisition protocol of every case, as the generator records them in dataset.json."""
    from nnunetv2_caml.demo.synthetic import dataset_name

    dataset_json = json.loads((workdir / "nnUNet_raw" / dataset_name(DATASET_IDS[task], task) / "dataset.json")
                              .read_text())
    return dataset_json["synthetic"].get("protocols", {})


def unseen_protocol_cases(protocols: Dict[str, str], labeled: int) -> set:
    """Test cases whose acquisition protocol none of the first ``labeled`` training cases has (``protocols``: case id
    -> protocol, :func:`case_protocols`)."""
    seen = seen_protocols(protocols, labeled)
    return {case for case, protocol in protocols.items() if case.startswith("ts_") and protocol not in seen}


def finished_results(workdir: Path, tasks: List[str], arms: List[str]) -> tuple:
    """Every finished run of ``tasks`` in the work folder (also arms and seeds of earlier invocations, so a rerun
    with a few arms still tabulates them against the rest), and the arms in table order: the default arms, the
    requested ones, then any others by name."""
    results = [json.loads(f.read_text()) for task in tasks
               for f in sorted((workdir / "runs" / task).glob("*/seed_*/result.json"))]
    found = {r["arm"] for r in results}

    def by_name(arm):  # labeled_8 before labeled_16
        stem = arm.rstrip("0123456789")
        return stem, int(arm[len(stem):] or 0)
    order = [*DEFAULT_ARMS, *arms, *sorted(found, key=by_name)]
    return results, [a for i, a in enumerate(order) if a in found and a not in order[:i]]


def summarise(results: List[dict], arms: List[str], unseen: Dict[str, set] = None) -> Dict[str, Dict[str, dict]]:
    """Per task and arm: mean over seeds of the mean test Dice, its spread, the worst seed and the worst case, and
    the fraction of the labeled-only to all-labeled gap the arm closes: its mean gain over labeled_only on the seeds
    both share (also per seed), over the mean gap on those of them that have all_labeled (on every seed that has
    both ends, if none of them does). ``unseen``
    (task -> test case ids whose acquisition protocol no labeled case has) adds the mean Dice on those cases and on the
    others."""
    table: Dict[str, Dict[str, dict]] = {}
    for task in sorted({r["task"] for r in results}):
        by_arm = {a: {r["seed"]: r for r in results if r["task"] == task and r["arm"] == a} for a in arms}
        low, high = by_arm.get("labeled_only", {}), by_arm.get("all_labeled", {})
        table[task] = {}
        for arm in arms:
            runs = by_arm[arm]
            if not runs:
                continue
            means = np.array([runs[s]["mean_dice"] for s in sorted(runs)])
            row = {"seeds": sorted(runs), "per_seed": [float(m) for m in means], "mean": float(means.mean()),
                   "std": float(means.std(ddof=1)) if len(means) > 1 else 0.0, "worst_seed": float(means.min()),
                   "worst_case": float(min(min(r["dice"].values()) for r in runs.values()))}
            cases = set(next(iter(runs.values()))["dice"])
            if unseen and cases & unseen.get(task, set()) and cases - unseen[task]:
                for key, subset in (("seen_protocols", cases - unseen[task]),
                                    ("unseen_protocols", cases & unseen[task])):
                    row[key] = float(np.mean([np.mean([r["dice"][c] for c in subset]) for r in runs.values()]))
            closed = gap_closed(*({s: r["mean_dice"] for s, r in runs_.items()} for runs_ in (runs, low, high)))
            if closed is not None:
                row["gap_closed"], row["gain_per_seed"] = closed
            table[task][arm] = row
    return table


def gap_closed(arm: Dict[int, float], low: Dict[int, float], high: Dict[int, float]) -> Optional[tuple]:
    """``(fraction of the gap closed, gain per seed)`` of an arm's per-seed scores against labeled_only's (``low``)
    and all_labeled's (``high``), or None without a seed to compare on. Gains on every seed the arm shares with
    labeled_only; the gap on those of them that have both ends (on every seed with both ends where none of them has:
    gaps differ by seed, so the seeds must match)."""
    paired = sorted(set(arm) & set(low))
    ends = sorted(set(paired) & set(high)) or sorted(set(low) & set(high))
    if not (paired and ends):
        return None
    gap = np.mean([high[s] - low[s] for s in ends])
    gains = [float(arm[s] - low[s]) for s in paired]
    return (float(np.mean(gains) / gap) if gap > 0 else float("nan")), gains


def summarise_protocols(results: List[dict], arms: List[str], protocols: Dict[str, Dict[str, str]]) -> dict:
    """Per task, arm and acquisition protocol of the test cases (``protocols``: task -> case id -> protocol): the mean
    over seeds of the mean test Dice on that protocol's cases, and the fraction of the gap closed on them."""
    table: Dict[str, Dict[str, dict]] = {}
    for task in sorted({r["task"] for r in results}):
        by_arm = {a: {r["seed"]: r for r in results if r["task"] == task and r["arm"] == a} for a in arms}
        cases = sorted(set.union(*(set(r["dice"]) for r in results if r["task"] == task)))
        groups: Dict[str, List[str]] = {}
        for case in cases:
            if case in protocols.get(task, {}):
                groups.setdefault(protocols[task][case], []).append(case)
        if not groups:
            continue

        def per_seed(arm, group):
            return {s: float(np.mean([r["dice"][c] for c in groups[group]])) for s, r in by_arm.get(arm, {}).items()}
        table[task] = {}
        for arm in arms:
            if not by_arm[arm]:
                continue
            table[task][arm] = {}
            for group in sorted(groups):
                scores = per_seed(arm, group)
                cell = {"cases": len(groups[group]), "mean": float(np.mean(list(scores.values())))}
                closed = gap_closed(scores, per_seed("labeled_only", group), per_seed("all_labeled", group))
                if closed is not None:
                    cell["gap_closed"] = closed[0]
                table[task][arm][group] = cell
    return table


#: a protocol whose test cases all_labeled scores less than this above labeled_only gets no gap closed in the table
#: (a fraction of a gap within one run's noise means nothing)
MIN_PROTOCOL_GAP = 0.02


def format_protocol_table(table: dict, seen: Dict[str, set]) -> str:
    """Per task: each arm's test Dice and gap closed per acquisition protocol; the header names each protocol's test
    cases, whether the labeled cases have it (``seen``: task -> protocols), and its gap (all_labeled - labeled_only)."""
    lines = []
    for task, rows in table.items():
        first = next(iter(rows.values()))
        both_ends = {"labeled_only", "all_labeled"} <= set(rows)
        gaps = {g: rows["all_labeled"][g]["mean"] - rows["labeled_only"][g]["mean"] if both_ends else None
                for g in first}
        header = [f"{g} ({c['cases']} case{'s' * (c['cases'] > 1)}, {'seen' if g in seen.get(task, ()) else 'unseen'}"
                  + (f", gap {gaps[g]:.3f})" if both_ends else ")") for g, c in first.items()]
        lines += [f"**{task}**: test Dice per acquisition protocol (mean over seeds; in brackets the gap closed on "
                  f"that protocol's cases, where its gap is at least {MIN_PROTOCOL_GAP})", "",
                  "| arm | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
        for arm, cells in rows.items():
            values = [f"{c['mean']:.3f}" + (f" ({100 * c['gap_closed']:.0f} %)" if "gap_closed" in c and
                                            gaps[g] is not None and gaps[g] >= MIN_PROTOCOL_GAP else "")
                      for g, c in cells.items()]
            lines.append(f"| {arm} | " + " | ".join(values) + " |")
        lines.append("")
    return "\n".join(lines)


def format_table(table: Dict[str, Dict[str, dict]], header: str) -> str:
    lines = [header, ""]
    for task, rows in table.items():
        lines += [f"**{task}** (mean test Dice over seeds)", "",
                  "| arm | mean ± std | per seed | worst seed | worst case | gap closed | gain per seed "
                  "| seen / unseen protocols |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm, row in rows.items():
            gap = f"{100 * row['gap_closed']:.0f} %" if "gap_closed" in row else "—"
            gains = " ".join(f"{g:+.3f}" for g in row["gain_per_seed"]) if "gain_per_seed" in row else "—"
            protocols = (f"{row['seen_protocols']:.3f} / {row['unseen_protocols']:.3f}" if "unseen_protocols" in row
                         else "—")
            lines.append(f"| {arm} | {row['mean']:.3f} ± {row['std']:.3f} | "
                         f"{' '.join(f'{v:.3f}' for v in row['per_seed'])} | {row['worst_seed']:.3f} | "
                         f"{row['worst_case']:.3f} | {gap} | {gains} | {protocols} |")
        lines.append("")
    return "\n".join(lines)


def plot(table: Dict[str, Dict[str, dict]], output_file: Path) -> None:
    """Per task: each arm's per-seed mean test Dice (dots) and the mean over seeds (bar)."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(6 * len(table), 4.5), squeeze=False)
    for ax, (task, rows) in zip(axes[0], table.items()):
        names = list(rows)
        ax.bar(range(len(names)), [rows[n]["mean"] for n in names], color="lightsteelblue")
        for i, n in enumerate(names):
            ax.plot([i] * len(rows[n]["per_seed"]), rows[n]["per_seed"], "k.", markersize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        low = min(min(r["per_seed"]) for r in rows.values())
        ax.set_ylim(max(0.0, low - 0.05), 1.0)
        ax.set_ylabel("mean test Dice")
        ax.set_title(task)
    plt.tight_layout()
    fig.savefig(output_file, dpi=100)
    plt.close(fig)


def device_description(device: str) -> str:
    import torch
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {model}, {os.cpu_count()} cores, torch {torch.__version__}"


# --------------------------------------------------------------------------------------------- command line
def _check_settings(workdir: Path, settings: dict, overwrite: bool) -> None:
    """One work folder holds one benchmark: refuse to mix runs made with other settings."""
    file = workdir / "benchmark.json"
    if file.is_file() and not overwrite:
        before = json.loads(file.read_text())
        changed = [k for k in FIXED_SETTINGS if before.get(k) != settings[k]]
        if changed:
            raise BenchmarkError(f"{workdir} holds runs made with {', '.join(f'{k}={before.get(k)}' for k in changed)}"
                                 f"; use another --workdir or pass --overwrite to start over")
    elif file.is_file():
        for sub in ("nnUNet_raw", "nnUNet_preprocessed", "runs"):
            shutil.rmtree(workdir / sub, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(settings, indent=1))


def parse_arms(names: List[str], extra: List[str], calibrate: List[int], settings: dict) -> Dict[str, tuple]:
    arms = {}
    for name in names:
        if name not in DEFAULT_ARMS:
            raise BenchmarkError(f"unknown arm {name!r}: choose from {', '.join(DEFAULT_ARMS)} or add one with "
                                 f"--arm NAME=TRAINER")
        trainer, all_labels = DEFAULT_ARMS[name]
        arms[name] = (trainer, settings["labeled"] + settings["unlabeled"] if all_labels else settings["labeled"])
    for spec in extra:
        name, _, trainer = spec.partition("=")
        if not name or not trainer:
            raise BenchmarkError(f"--arm {spec!r} is not NAME=TRAINER (e.g. --arm caml_paper=nnUNetTrainerCAML_paper)")
        arms[name] = (trainer, settings["labeled"])
    for n in calibrate:
        arms[f"labeled_{n}"] = ("nnUNetTrainer", n)
    return arms


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="folder for data, runs and the table (reruns resume here)")
    parser.add_argument("--tasks", nargs="+", default=["atrium", "vessel"], choices=sorted(DATASET_IDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--arms", nargs="*", default=list(DEFAULT_ARMS), help="arms to run (default: all nine)")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=TRAINER",
                        help="an extra arm: any trainer on the labeled fold (repeatable)")
    parser.add_argument("--calibrate", nargs="*", type=int, default=[], metavar="N",
                        help="also train labeled-only stock nnU-Net on the first N cases (arms labeled_N)")
    parser.add_argument("--labeled", type=int, default=4)
    parser.add_argument("--unlabeled", type=int, default=32)
    parser.add_argument("--test", type=int, default=12)
    parser.add_argument("--shape", nargs=3, type=int, default=[36, 48, 48], help="volume shape (z y x)")
    parser.add_argument("--patch", nargs=3, type=int, default=[24, 32, 32])
    parser.add_argument("--features", nargs="+", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000, help="optimiser steps of every arm")
    parser.add_argument("--iterations-per-epoch", type=int, default=50)
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--protocols", nargs="+", default=None, metavar="NAME",
                        help="acquisition protocols the synthetic cases draw from (default: all of the task's; "
                             "e.g. arterial-CT for the vessel task, bright-blood for the atrium task)")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--parallel", type=int, default=None,
                        help="runs at a time (default: 1 on the CPU, every arm of a seed at once on CUDA)")
    parser.add_argument("--overwrite", action="store_true", help="delete the work folder's data and runs first")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        train_and_score(json.loads(Path(args.worker).read_text()))
        return
    if not args.workdir:
        raise BenchmarkError("--workdir is required: the folder for data, runs and the table")

    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    workdir = Path(args.workdir).resolve()
    # nnunetv2.paths reads these when it is first imported (the data set-up imports it)
    os.environ.update({k: v for k, v in _nnunet_env(workdir).items() if k.startswith("nnUNet_")})
    settings = {"labeled": args.labeled, "unlabeled": args.unlabeled, "test": args.test, "shape": args.shape,
                "patch": args.patch, "features": args.features, "batch_size": args.batch_size, "steps": args.steps,
                "iterations_per_epoch": args.iterations_per_epoch, "data_seed": args.data_seed,
                "protocols": args.protocols}
    if args.steps % args.iterations_per_epoch:
        raise BenchmarkError(f"--steps {args.steps} must be a multiple of --iterations-per-epoch "
                             f"{args.iterations_per_epoch}")
    if any(not 1 <= n <= args.labeled + args.unlabeled for n in args.calibrate):
        raise BenchmarkError(f"--calibrate counts must lie in 1..{args.labeled + args.unlabeled}")
    arms = parse_arms(args.arms, args.arm, args.calibrate, settings)
    from nnunetv2_caml.demo.synthetic import TASKS
    for task in args.tasks:
        try:
            TASKS[task].protocol_table(args.protocols)
        except ValueError as e:
            raise BenchmarkError(f"--protocols: {e}") from None
    _check_settings(workdir, settings, args.overwrite)
    parallel = args.parallel or (len(arms) if device == "cuda" else 1)
    log_file = workdir / "ssl_gain.log"

    runs = []
    for task in args.tasks:
        name = prepare_task(workdir, task, settings, log_file)
        raw = workdir / "nnUNet_raw" / name
        for seed in args.seeds:
            for arm, (trainer, labeled) in arms.items():
                runs.append({"task": task, "arm": arm, "seed": seed, "trainer": trainer, "labeled": labeled,
                             "fold": fold_of(labeled), "dataset": name, "steps": args.steps,
                             "iterations_per_epoch": args.iterations_per_epoch, "device": device,
                             "threads": max(1, (os.cpu_count() or 1) // parallel),  # CPU: cores shared by runs
                             "folder": str(workdir / "runs" / task / arm / f"seed_{seed}"),
                             "test_images": str(raw / "imagesTs"), "test_labels": str(raw / "labelsTs")})
    run_all(runs, workdir, parallel)

    results, table_arms = finished_results(workdir, args.tasks, list(arms))
    if not results:  # e.g. `--arms` with no arm: the data is prepared, nothing is trained yet
        print(f"[ssl-gain] no finished run in {workdir} yet: data prepared under {workdir / 'nnUNet_preprocessed'}")
        return
    protocols = {task: case_protocols(workdir, task) for task in args.tasks}  # read once, for both tables
    table = summarise(results, table_arms, {task: unseen_protocol_cases(protocols[task], settings["labeled"])
                                            for task in args.tasks})
    per_protocol = summarise_protocols(results, table_arms, protocols)
    header = (f"Device: {device_description(device)}. Command: `python benchmarks/ssl_gain.py "
              f"{' '.join(sys.argv[1:] if argv is None else argv)}`. {args.labeled} labeled + {args.unlabeled} "
              f"unlabeled training cases, {args.test} test cases of {'x'.join(map(str, args.shape))} voxels "
              f"({'protocols ' + ', '.join(args.protocols) if args.protocols else 'every acquisition protocol'}), "
              f"patch {'x'.join(map(str, args.patch))}, features {args.features}, batch {args.batch_size}, "
              f"{args.steps} optimiser steps per arm, no test-time augmentation. Gap closed = mean over seeds of "
              f"(arm - labeled_only), seeds paired, / mean (all_labeled - labeled_only) on the same seeds "
              f"(on every seed that has both, where the arm's seeds lack all_labeled). "
              f"Every finished run in the work folder is tabulated.")
    text = format_table(table, header) + "\n" + format_protocol_table(
        per_protocol, {task: seen_protocols(protocols[task], settings["labeled"]) for task in args.tasks})
    print("\n" + text)
    (workdir / "ssl_gain.md").write_text(text + "\n")
    (workdir / "ssl_gain.json").write_text(json.dumps({"settings": settings, "table": table,
                                                       "per_protocol": per_protocol, "runs": results}, indent=1))
    plot(table, workdir / "ssl_gain.png")
    print(f"[ssl-gain] table: {workdir / 'ssl_gain.md'}, plot: {workdir / 'ssl_gain.png'}")


if __name__ == "__main__":
    try:
        main()
    except BenchmarkError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(1)
