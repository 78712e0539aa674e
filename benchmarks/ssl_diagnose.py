"""Why a gain benchmark run scores what it scores: CAML's two networks against the truth and against each other.

    python benchmarks/ssl_diagnose.py --workdir DIR [--tasks vessel] [--arms caml labeled_only] [--seeds 0]

For every finished run of ``benchmarks/ssl_gain.py`` in the work folder (the arms and seeds asked for), this loads
``checkpoint_final.pth`` through nnU-Net's trainer, as ``nnUNetv2_train --val`` does, and segments two sets of
images with ``nnUNetPredictor`` (no test-time augmentation, as the benchmark scores):

* the **test** images, which no arm trains on;
* the **unlabeled** training images, whose labels the synthetic generator kept (``labelsTr``): how good the
  predictions are on the very images CAML's consistency terms train on.

A CAML run is segmented three times: by its main network (what ``nnUNetv2_predict`` uses), by its auxiliary network
and by the mean of both networks' probabilities; a stock run by its network. Per run, image set and group of
acquisition protocols (those the benchmark's labeled cases have, those they lack, all) it reports the foreground Dice
of each, the main network's precision and recall, and the **agreement** of the two networks (the Dice between their
segmentations). Where the agreement is far above either network's Dice, the two make the same mistakes, and mutual
consistency cannot correct what both get wrong. For scale, with two or more seeds of an arm it also reports how well
runs of different seeds agree (the Dice between their main networks' test segmentations, from the benchmark's
``predictions``): two networks trained apart on the same labels.

Each run's numbers land in its folder (``diagnose.json``, kept on a rerun); the table (``ssl_diagnose.md``, also
printed) in the work folder.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ssl_gain  # noqa: E402  (the benchmark whose runs this reads: its folders, settings and nnU-Net set-up)

#: the columns of a row, in table order; ``aux``, ``mean_of_both`` and ``agreement`` only for CAML runs
COLUMNS = ("main", "aux", "mean_of_both", "agreement", "precision", "recall")


def _foreground_dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def diagnose_run(workdir: Path, folder: Path) -> dict:
    """Segment the run's test and unlabeled training images with its networks and score them, per case. Runs in its
    own process, whose environment names the run's nnUNet_results (nnU-Net reads its paths when imported)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunetv2_caml.networks import unwrapped
    from nnunetv2_caml.trainer import nnUNetTrainerCAML

    run = json.loads((folder / "run.json").read_text())
    device = torch.device(run["device"])
    raw = Path(nnUNet_raw) / run["dataset"]
    trainer = get_trainer_from_args(run["dataset"], ssl_gain.CONFIGURATION, run["fold"], run["trainer"],
                                    device=device)
    trainer.initialize()
    trainer.load_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    networks = {"main": trainer.network}
    if isinstance(trainer, nnUNetTrainerCAML):
        networks["aux"] = trainer.auxiliary_network
    predictors = {}
    for name, network in networks.items():
        network.eval()
        unwrapped(network).decoder.deep_supervision = False  # one full-resolution output, as in inference
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager,
                                        [unwrapped(network).state_dict()], trainer.dataset_json, run["trainer"],
                                        trainer.inference_allowed_mirroring_axes)
        predictors[name] = predictor

    protocols = json.loads((raw / "dataset.json").read_text())["synthetic"]["protocols"]
    # the protocols of the benchmark's labeled cases, for every arm (the ceiling trained on all of them)
    seen = ssl_gain.seen_protocols(protocols, json.loads((workdir / "benchmark.json").read_text())["labeled"])
    suffix = "_0000" + trainer.dataset_json["file_ending"]  # one channel: the synthetic tasks' images
    ending = trainer.dataset_json["file_ending"]
    test_cases = sorted(p.name[:-len(suffix)] for p in (raw / "imagesTs").glob("*" + suffix))
    # the unlabeled pool holds copies of training images as unl_<case>; their labels are labelsTr/<case>
    unlabeled_cases = sorted(p.name[len("unl_"):-len(suffix)] for p in (raw / "imagesTrUnlabeled").glob("unl_*"))
    reader = trainer.plans_manager.image_reader_writer_class()
    cases = {}
    for image_set, images, labels, ids in (("test", "imagesTs", "labelsTs", test_cases),
                                           ("unlabeled", "imagesTr", "labelsTr", unlabeled_cases)):
        for case in ids:
            data, properties = reader.read_images([str(raw / images / f"{case}{suffix}")])
            reference = reader.read_seg(str(raw / labels / f"{case}{ending}"))[0][0] > 0
            probabilities = {name: predictor.predict_single_npy_array(data, properties, None, None, True)[1]
                             for name, predictor in predictors.items()}
            foreground = {name: p.argmax(0) > 0 for name, p in probabilities.items()}
            row = {"images": image_set, "protocol": protocols[case], "seen": protocols[case] in seen,
                   "main": _foreground_dice(foreground["main"], reference)}
            if "aux" in foreground:
                row["aux"] = _foreground_dice(foreground["aux"], reference)
                row["mean_of_both"] = _foreground_dice((probabilities["main"] + probabilities["aux"]).argmax(0) > 0,
                                                       reference)
                row["agreement"] = _foreground_dice(foreground["main"], foreground["aux"])
            hits = int(np.logical_and(foreground["main"], reference).sum())
            row["precision"] = hits / max(1, int(foreground["main"].sum()))
            row["recall"] = hits / max(1, int(reference.sum()))
            cases[case if image_set == "test" else f"unl_{case}"] = row
    return {k: run[k] for k in ("task", "arm", "seed", "trainer")} | {"cases": cases}


def summarise(diagnosis: dict) -> List[dict]:
    """Mean of every column per image set and protocol group (``seen``, ``unseen``, ``all``)."""
    rows = []
    for image_set in ("test", "unlabeled"):
        cases = [c for c in diagnosis["cases"].values() if c["images"] == image_set]
        groups = (("seen", [c for c in cases if c["seen"]]), ("unseen", [c for c in cases if not c["seen"]]),
                  ("all", cases))
        for group, members in groups:
            if not members:
                continue
            row = {"task": diagnosis["task"], "arm": diagnosis["arm"], "seed": diagnosis["seed"], "images": image_set,
                   "protocols": group, "cases": len(members)}
            row.update({k: float(np.mean([c[k] for c in members])) for k in COLUMNS if k in members[0]})
            rows.append(row)
    return rows


def format_table(rows: List[dict]) -> str:
    lines = ["| task | arm | seed | images | protocols | cases | main Dice | aux Dice | mean-of-both Dice | "
             "agreement | main precision | main recall |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        values = " | ".join(f"{r[k]:.3f}" if k in r else "—" for k in COLUMNS)
        lines.append(f"| {r['task']} | {r['arm']} | {r['seed']} | {r['images']} | {r['protocols']} | {r['cases']} | "
                     f"{values} |")
    return "\n".join(lines)


def cross_seed_agreement(workdir: Path, task: str, arm: str, seeds: List[int]) -> float:
    """Mean over test cases and pairs of seeds of the Dice between the runs' test segmentations (main networks)."""
    from nnunetv2_caml.metrics import _image_files, _read

    folders = [workdir / "runs" / task / arm / f"seed_{s}" / "predictions" for s in seeds]
    masks = [{case: _read(str(folder / name))[0] > 0 for case, name in _image_files(str(folder)).items()}
             for folder in folders]
    values = [_foreground_dice(a[case], b[case]) for i, a in enumerate(masks) for b in masks[i + 1:] for case in a]
    return float(np.mean(values))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the work folder of benchmarks/ssl_gain.py")
    parser.add_argument("--tasks", nargs="+", default=["vessel"], choices=sorted(ssl_gain.DATASET_IDS))
    parser.add_argument("--arms", nargs="+", default=["caml"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: diagnose one run folder in this process
    args = parser.parse_args(argv)
    if args.run:
        folder = Path(args.run)
        (folder / "diagnose.json").write_text(json.dumps(diagnose_run(Path(args.workdir), folder), indent=1))
        return
    workdir = Path(args.workdir).resolve()
    folders = [workdir / "runs" / task / arm / f"seed_{seed}" for task in args.tasks for arm in args.arms
               for seed in args.seeds]
    unfinished = [str(f) for f in folders if not (f / "result.json").is_file()]
    if unfinished:
        raise SystemExit(f"ERROR: no finished benchmark run in {unfinished[0]}; run benchmarks/ssl_gain.py with "
                         f"--workdir {args.workdir} and these arms and seeds first")
    rows: List[dict] = []
    for folder in folders:
        if not (folder / "diagnose.json").is_file():
            print(f"[ssl-diagnose] segmenting with {folder.relative_to(workdir)}", flush=True)
            env: Dict[str, str] = ssl_gain._nnunet_env(workdir, folder / "nnUNet_results")
            result = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--run", str(folder)],
                                    env=env, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"ERROR: diagnosing {folder} failed: {result.stderr.strip().splitlines()[-1]}")
        rows += summarise(json.loads((folder / "diagnose.json").read_text()))
    table = format_table(rows)
    if len(args.seeds) > 1:
        table += ("\n\n| task | arm | seeds | cross-seed agreement (test) |\n|---|---|---|---|\n" +
                  "\n".join(f"| {task} | {arm} | {' '.join(map(str, args.seeds))} | "
                            f"{cross_seed_agreement(workdir, task, arm, args.seeds):.3f} |"
                            for task in args.tasks for arm in args.arms))
    (workdir / "ssl_diagnose.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
