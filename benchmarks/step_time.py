"""Time per training step (and peak GPU memory) of CAML trainers against stock ``nnUNetTrainer`` on the same plans.

    python benchmarks/step_time.py -d 501 -c 3d_cpu [-f all] [-n 20] [--warmup 3] [-device cpu|cuda]
        [-tr nnUNetTrainer nnUNetTrainerCAML nnUNetTrainerCAML_noOCC]

Needs a planned dataset with preprocessed unlabeled data (``nnUNetv2_caml_preprocess_unlabeled``) and
``nnUNet_extTrainer`` pointing at this repository's ``trainers/``. Each trainer is built the way ``nnUNetv2_train``
builds it; a step is ``train_step(next(dataloader))`` (data loading included, as in training). The trainers write
their logs into a temporary ``nnUNet_results``, never into yours. Prints one row per trainer and the ratio to the
first one.
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch


def time_trainer(trainer_name: str, dataset: str, configuration: str, fold, device: torch.device, steps: int,
                 warmup: int) -> dict:
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(dataset, configuration, fold, trainer_name, device=device)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    for _ in range(warmup):
        trainer.train_step(next(trainer.dataloader_train))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step(next(trainer.dataloader_train))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    trainer.on_train_end()
    return {"trainer": trainer_name, "median_s": float(np.median(times)), "mean_s": float(np.mean(times)),
            "peak_gib": peak, "batch": trainer.configuration_manager.batch_size,
            "patch": trainer.configuration_manager.patch_size}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-c", required=True, help="configuration")
    parser.add_argument("-f", default="all", help="fold (default: all)")
    parser.add_argument("-tr", nargs="+", default=["nnUNetTrainer", "nnUNetTrainerCAML"])
    parser.add_argument("-n", type=int, default=20, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("-device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="caml_step_time_")
    fold = args.f if args.f == "all" else int(args.f)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = [time_trainer(t, args.d, args.c, fold, device, args.n, args.warmup) for t in args.tr]
    print(f"\ndevice {device}, batch {rows[0]['batch']} (+ as many unlabeled for CAML), patch {rows[0]['patch']}, "
          f"{args.n} timed steps after {args.warmup} warm-up")
    print(f"{'trainer':36s} {'median s/step':>14s} {'mean s/step':>12s} {'ratio':>7s} {'peak GiB':>9s}")
    for row in rows:
        print(f"{row['trainer']:36s} {row['median_s']:14.3f} {row['mean_s']:12.3f} "
              f"{row['median_s'] / rows[0]['median_s']:7.2f} {row['peak_gib']:9.2f}")


if __name__ == "__main__":
    main()
