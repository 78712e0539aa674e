"""``nnUNetv2_caml_demo``: the whole CAML pipeline on a small synthetic dataset, through nnU-Net's own tools.

Steps (each one a real command-line tool in a subprocess):
  1. generate a synthetic semi-supervised dataset (labeled, unlabeled and test volumes) into ``DIR/nnUNet_raw``;
  2. ``nnUNetv2_plan_and_preprocess``; 3. ``nnUNetv2_caml_preprocess_unlabeled``;
  4. add a CPU-sized configuration ``3d_cpu`` to the plans (the gain benchmark's network and patch) and
     ``nnUNetv2_train ... -tr nnUNetTrainerCAML_demo`` (the default CAML on a 600-step schedule, seeded);
  5. ``nnUNetv2_predict`` on the test images (main network, no test-time mirroring, as the gain benchmark scores);
  6. ``nnUNetv2_evaluate_simple`` against the test labels;
  7. steps 4-6 again for stock nnU-Net on the labeled cases alone, same plans and schedule
     (``nnUNetTrainer_CAMLdemo``; ``--no-baseline`` skips it);
then prints per-case and mean Dice of both side by side and writes ``DIR/caml_demo.png`` (image / ground truth /
CAML's prediction / the baseline's). The dataset's sizes are the gain benchmark's (4 labeled, 32 unlabeled, 12 test
cases of 36x48x48 voxels). On the CPU augmentation runs in the training process (``nnUNet_n_proc_DA=0``, unless the
environment sets it), so with the trainers' fixed seed the demo repeats exactly.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from nnunetv2_caml.nnunet_trainers import trainers_folder
from nnunetv2_caml.demo.synthetic import dataset_name, generate_dataset

DEMO_DATASET_IDS = {"atrium": 501, "vessel": 502}
DEMO_TRAINER = "nnUNetTrainerCAML_demo"
BASELINE_TRAINER = "nnUNetTrainer_CAMLdemo"  # stock nnU-Net, labeled cases only, same schedule
DEMO_CONFIGURATION = "3d_cpu"
DEMO_SHAPE = (36, 48, 48)  # the gain benchmark's volumes, network and patch (benchmarks/ssl_gain.py)


def _tool(name: str) -> str:
    """A command-line tool installed beside this Python interpreter (the same environment), else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def _run(step: str, args: List[str], env: dict, log_file: Path) -> None:
    print(f"[caml-demo] {step}: {' '.join(str(a) for a in args)}", flush=True)
    start = time.time()
    with open(log_file, "a") as log:
        log.write(f"\n### {step}\n")
        log.flush()
        result = subprocess.run([_tool(args[0]), *map(str, args[1:])], env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"ERROR: {step} failed (exit code {result.returncode}); see {log_file}")
    print(f"[caml-demo]   done in {time.time() - start:.0f} s", flush=True)


def planning_env(env: dict) -> dict:
    """``env`` for nnU-Net's planning and preprocessing: its planner calls ``torch.set_num_threads`` with
    ``nnUNet_n_proc_DA``, which must be at least 1 (training may run with 0)."""
    return {**env, "nnUNet_n_proc_DA": str(max(1, int(env.get("nnUNet_n_proc_DA", "1"))))}


def write_overview_png(images_folder: Path, labels_folder: Path, predictions: Dict[str, Path], output_file: Path,
                       dice: Dict[str, dict]) -> None:
    """One row per test case: image, ground truth and each trainer's prediction on the axial slice with the most
    foreground. ``predictions`` and ``dice`` are keyed by the name shown in the column titles."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    def read(path: Path) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

    cases = sorted(p.name[:-len(".nii.gz")] for p in labels_folder.glob("*.nii.gz"))
    columns = 2 + len(predictions)
    fig, axes = plt.subplots(len(cases), columns, figsize=(3 * columns, 3 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases):
        image = read(images_folder / f"{case}_0000.nii.gz")
        label = read(labels_folder / f"{case}.nii.gz")
        z = int(np.argmax(label.reshape(label.shape[0], -1).sum(1)))
        panels = [(None, "image"), (label, "ground truth")] + [
            (read(folder / f"{case}.nii.gz"), f"{name} (Dice {dice[name].get(case, np.nan):.3f})")
            for name, folder in predictions.items()]
        for ax, (overlay, title) in zip(row, panels):
            ax.imshow(image[z], cmap="gray")
            if overlay is not None:
                ax.imshow(np.ma.masked_equal(overlay[z], 0), cmap="autumn", alpha=0.6, vmin=0, vmax=1)
            ax.set_title(f"{case} z={z}: {title}", fontsize=8)
            ax.axis("off")
    plt.tight_layout()
    fig.savefig(output_file, dpi=100)
    plt.close(fig)


def _train_predict_evaluate(trainer: str, dataset_id: int, fold: str, raw: Path, workdir: Path, device: str,
                            env: dict, log_file: Path) -> Tuple[Path, dict, float]:
    """``nnUNetv2_train``, ``nnUNetv2_predict`` on the test images and ``nnUNetv2_evaluate_simple`` for one trainer;
    returns the predictions folder, Dice per test case and mean Dice."""
    _run(f"train {trainer} (fold {fold})", ["nnUNetv2_train", dataset_id, DEMO_CONFIGURATION, fold, "-tr", trainer,
                                            "-device", device], env, log_file)
    predictions = workdir / "predictions" / trainer
    _run(f"predict test images with {trainer}", [
        "nnUNetv2_predict", "-i", raw / "imagesTs", "-o", predictions, "-d", dataset_id, "-c", DEMO_CONFIGURATION,
        "-f", fold, "-tr", trainer, "-chk", "checkpoint_final.pth", "-device", device, "-npp", "1", "-nps", "1",
        "--disable_tta"],
        env, log_file)
    summary_file = predictions / "summary.json"
    _run(f"evaluate {trainer}", ["nnUNetv2_evaluate_simple", raw / "labelsTs", predictions, "-l", "1", "-o",
                                 summary_file], env, log_file)
    summary = json.loads(summary_file.read_text())
    dice = {Path(c["reference_file"]).name[:-len(".nii.gz")]: c["metrics"]["1"]["Dice"]
            for c in summary["metric_per_case"]}
    return predictions, dice, summary["foreground_mean"]["Dice"]


def run_demo(workdir: str, task: str = "vessel", device: str = "auto", overwrite: bool = False,
             num_labeled: int = 4, num_unlabeled: int = 32, num_test: int = 12, baseline: bool = True) -> dict:
    """Run the demo in ``workdir``; returns ``{"dice": {case: dice}, "mean_dice": float, "baseline_dice": ...,
    "baseline_mean_dice": ..., ...}`` (the baseline's entries are None with ``baseline=False``)."""
    from nnunetv2_caml.demo.small_configuration import add_small_configuration

    workdir = Path(workdir).resolve()
    if task not in DEMO_DATASET_IDS:
        raise SystemExit(f"ERROR: unknown task {task!r}; choose one of {sorted(DEMO_DATASET_IDS)}")
    dataset_id = DEMO_DATASET_IDS[task]
    name = dataset_name(dataset_id, task)
    results = workdir / "nnUNet_results" / name
    if results.exists() and not overwrite:
        raise SystemExit(f"ERROR: {results} already holds a demo run; pass --overwrite to replace it or choose "
                         f"another --workdir")
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"

    env = dict(os.environ)
    env.update({"nnUNet_raw": str(workdir / "nnUNet_raw"),
                "nnUNet_preprocessed": str(workdir / "nnUNet_preprocessed"),
                "nnUNet_results": str(workdir / "nnUNet_results"),
                "nnUNet_extTrainer": trainers_folder()})
    # augmentation workers on the GPU; on the CPU in the training process, which keeps a seeded run repeatable
    env.setdefault("nnUNet_n_proc_DA", "2" if device == "cuda" else "0")
    env.setdefault("nnUNet_def_n_proc", "2")  # nnU-Net's export pools would spawn 8 workers
    preprocessing_env = planning_env(env)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = workdir / "caml_demo.log"
    start = time.time()

    print(f"[caml-demo] generating synthetic '{task}' data: {num_labeled} labeled, {num_unlabeled} unlabeled, "
          f"{num_test} test volumes", flush=True)
    raw = Path(generate_dataset(env["nnUNet_raw"], dataset_id, task, num_labeled, num_unlabeled, num_test,
                                shape=DEMO_SHAPE, overwrite=overwrite))
    _run("plan and preprocess", ["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres", "-np", "2",
                                 "--verify_dataset_integrity"], preprocessing_env, log_file)
    _run("preprocess unlabeled", ["nnUNetv2_caml_preprocess_unlabeled", "-d", dataset_id, "-c", "3d_fullres",
                                  "-np", "2", "--overwrite"], preprocessing_env, log_file)
    add_small_configuration(dataset_id, DEMO_CONFIGURATION, features_per_stage=(8, 16, 32, 64),
                            patch_size=(24, 32, 32), batch_size=2)
    fold = "all" if num_labeled < 5 else "0"
    trainers = {"CAML": DEMO_TRAINER, **({"labeled-only nnU-Net": BASELINE_TRAINER} if baseline else {})}
    predictions, dice, mean_dice = {}, {}, {}
    for name, trainer in trainers.items():
        predictions[name], dice[name], mean_dice[name] = _train_predict_evaluate(
            trainer, dataset_id, fold, raw, workdir, device, env, log_file)

    print(f"\n[caml-demo] test-set Dice ({num_labeled} labeled cases; main network, nnUNetv2_predict):")
    print("  " + f"{'case':10s}" + "".join(f"{name:>22s}" for name in trainers))
    for case in sorted(dice["CAML"]):
        print("  " + f"{case:10s}" + "".join(f"{dice[name][case]:22.4f}" for name in trainers))
    print("  " + f"{'mean':10s}" + "".join(f"{mean_dice[name]:22.4f}" for name in trainers))
    png = workdir / "caml_demo.png"
    write_overview_png(raw / "imagesTs", raw / "labelsTs", predictions, png, dice)
    training_folder = results / f"{DEMO_TRAINER}__nnUNetPlans__{DEMO_CONFIGURATION}" / f"fold_{fold}"
    print(f"[caml-demo] slices: {png}\n[caml-demo] training curves: {training_folder / 'progress.png'}\n"
          f"[caml-demo] log: {log_file}\n[caml-demo] total time {time.time() - start:.0f} s")
    return {"dice": dice["CAML"], "mean_dice": mean_dice["CAML"], "baseline_dice": dice.get("labeled-only nnU-Net"),
            "baseline_mean_dice": mean_dice.get("labeled-only nnU-Net"), "png": str(png),
            "training_folder": str(training_folder)}


def demo_entry():
    parser = argparse.ArgumentParser(description="Run CAML end to end on a synthetic dataset with nnU-Net's tools.")
    parser.add_argument("--workdir", default="caml_demo",
                        help="folder for nnUNet_raw, nnUNet_preprocessed, nnUNet_results (default: ./caml_demo)")
    parser.add_argument("--task", default="vessel", choices=sorted(DEMO_DATASET_IDS),
                        help="a vessel-like tree (default; the task on which labeled cases are scarce) or atrium-like "
                             "blobs")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in --workdir")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip training stock nnU-Net on the labeled cases alone (saves about 2 minutes on "
                             "2 CPU cores)")
    args = parser.parse_args()
    run_demo(args.workdir, args.task, args.device, args.overwrite, baseline=not args.no_baseline)


if __name__ == "__main__":
    demo_entry()
