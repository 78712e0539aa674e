"""Time per training step and peak GPU memory of CAML trainers against stock ``nnUNetTrainer`` on the same plans.

    python benchmarks/step_time.py -d 501 -c 3d_cpu [-f all] [-p nnUNetPlans] [-n 20] [--warmup 3]
        [-device cpu|cuda] [-tr nnUNetTrainer nnUNetTrainerCAML nnUNetTrainerCAML_noCMA nnUNetTrainerCAML_noOCC]
        [--profile N]

Needs a planned dataset with preprocessed unlabeled data (``nnUNetv2_caml_preprocess_unlabeled``) and
``nnUNet_extTrainer`` pointing at this repository's ``trainers/``. Each trainer is built the way ``nnUNetv2_train``
builds it (same plans, same labeled batch; on CUDA compiled unless ``nnUNet_compile=f``, as nnU-Net decides). Data
loading is excluded for every trainer alike: the labeled batches (and CAML's unlabeled ones) are loaded and augmented
before the clock starts, the augmentation workers are then shut down (so that refilling their queues takes no CPU
time from the steps), and each timed step is ``train_step(batch)`` followed by a device synchronisation. On the CPU,
glibc's malloc thresholds are fixed first (:func:`steady_cpu_allocator`), so that no trainer's time depends on which
trainers ran before it in the process. The trainers write their logs into a temporary ``nnUNet_results``, never into
yours, removed at exit.

Prints, per trainer: median and mean s/step, the ratio to the first trainer (stock), the ratio to the two-network
floor (4 x the first trainer's step: two networks on a doubled batch), the FLOPs of the step's networks (forward and
backward, counted on the meta device) against the first trainer's, the time ratio over that FLOP ratio (the FLOP
floor: CAML's auxiliary network has about 1.43 x the main network's FLOPs, so its networks alone are 4.9 x stock's
work) and the peak GPU memory of a step: allocated by tensors (the trainer's own; what earlier trainers in the process
left allocated is not counted) and reserved by PyTorch's caching allocator (what the card must hold, without the CUDA
context). A trainer that runs out of GPU memory is reported as such. ``--profile N`` then runs N more steps per
trainer under torch.profiler and prints where the time goes: the top operations, CAML's named parts of the step
(networks, losses, OCC, backward, optimizer) and how busy the device was.

Compilation happens in the warm-up steps: their wall time is printed per trainer, with how many of the graphs inductor
compiled came from its on-disk cache (``TORCHINDUCTOR_CACHE_DIR``). ``--fallback_random`` compiles with inductor's
``fallback_random``, as ``benchmarks/compile_check.py`` does for its eager/compiled comparison, so that a step time
run after a compile check on the same plans takes both networks' graphs from the cache instead of compiling them again
(``benchmarks/gpu_check.sh`` relies on it). It changes only how CAML's random ops are drawn (the dropouts of CMA, at
one small stage of the auxiliary network: eager's generator instead of random numbers drawn inside inductor's kernels).
"""
import argparse
import atexit
import copy
import ctypes
import gc
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import torch._inductor.config


def network_flops(trainer, patches: int, sample: torch.Tensor) -> float:
    """Forward and backward FLOPs of the networks a training step runs (the main network, and CAML's auxiliary one),
    each on ``patches`` patches shaped like ``sample``: counted on the meta device (shapes only, nothing computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    from nnunetv2_caml.networks import unwrapped

    total = 0
    for network in (trainer.network, getattr(trainer, "auxiliary_network", None)):
        if network is None:
            continue
        meta = copy.deepcopy(unwrapped(network)).to("meta").train()
        with FlopCounterMode(display=False) as counter:
            outputs = meta(torch.empty(patches, *sample.shape, device="meta"))
            sum(o.sum() for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])).backward()
        total += counter.get_total_flops()
    return float(total)


def profile_steps(trainer, batches: list, cuda: bool) -> str:
    """``train_step`` on ``batches`` under torch.profiler: the top operations by own time, then each part of the step
    the trainer names with ``record_function`` (CAML's: networks, losses, OCC, backward, optimizer) with its host and
    device time per step, and how much of the profiled wall time the device spent in kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for batch in batches:
            trainer.train_step(batch)
        if cuda:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / len(batches)
    averages = prof.key_averages()
    own = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines = [averages.table(sort_by=own, row_limit=25)]
    n = len(batches)
    regions = sorted((e for e in averages if e.key.startswith("CAML ")), key=lambda e: -e.cpu_time_total)
    if regions:
        lines.append(f"{'part of the step':28s} {'host ms/step':>13s}" + (f" {'device ms/step':>15s}" if cuda else ""))
        lines += [f"{e.key:28s} {e.cpu_time_total / 1e3 / n:13.2f}" +
                  (f" {getattr(e, 'device_time_total', 0) / 1e3 / n:15.2f}" if cuda else "") for e in regions]
    if cuda:
        kernels_ms = sum(getattr(e, own, 0) for e in averages) / 1e3 / n
        lines.append(f"device kernels {kernels_ms:.1f} ms per step of {wall_ms:.1f} ms profiled wall time "
                     f"({kernels_ms / wall_ms:.0%} busy; the rest is the device waiting for the host)")
    return "\n".join(lines)


def inductor_cache_counts() -> tuple:
    """Graphs inductor took from its on-disk cache and graphs it compiled, so far in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def steady_cpu_allocator() -> bool:
    """On the CPU with glibc: fix malloc's thresholds (trim at 1 GiB, mmap above 32 MiB) so that every trainer in the
    process allocates in the same regime; returns whether it could. By default glibc raises them as large blocks are
    freed, so a trainer timed after CAML (larger tensors) gets its memory from the heap, while one timed first keeps
    handing pages back to the system and faulting them in again: on 2 CPU cores stock's step took about 16 % longer
    timed first than after CAML (0.138 against 0.117 s at ``3d_cpu``), which made the ratios depend on the order."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    trim_threshold, mmap_threshold = -1, -3  # mallopt's parameter numbers (malloc.h)
    return bool(libc.mallopt(trim_threshold, 2 ** 30)) and bool(libc.mallopt(mmap_threshold, 32 * 2 ** 20))


def stop_augmentation_workers(trainer) -> int:
    """Shut down the augmentation worker processes of the trainer's data loaders (labeled, validation and CAML's
    unlabeled) once the batches are loaded; returns how many there were. Left running they refill their queues during
    the timed steps and take CPU time from them: on 2 CPU cores that made CAML's step, with two loaders, 15 to 20 %
    slower and its ratio to stock depend on the worker count. ``on_train_end`` then finds nothing left to stop."""
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

    stopped = 0
    for name in ("dataloader_train", "dataloader_val", "dataloader_unlabeled"):
        loader = getattr(trainer, name, None)
        if isinstance(loader, (MultiThreadedAugmenter, NonDetMultiThreadedAugmenter)):
            stopped += len(loader._processes)
            loader._finish()
    return stopped


def time_trainer(trainer_name: str, dataset: str, configuration: str, fold, device: torch.device, steps: int,
                 warmup: int, plans: str = "nnUNetPlans", profile: int = 0) -> dict:
    from nnunetv2.run.run_training import get_trainer_from_args

    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    allocated_before = torch.cuda.memory_allocated() if cuda else 0
    trainer = get_trainer_from_args(dataset, configuration, fold, trainer_name, plans, device=device)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    batches = [next(trainer.dataloader_train) for _ in range(warmup + steps + profile)]
    unlabeled = getattr(trainer, "dataloader_unlabeled", None)
    patches = batches[0]["data"].shape[0]
    if unlabeled is not None:  # CAML draws its unlabeled batch inside train_step: load those beforehand as well
        unlabeled_batches = [next(unlabeled) for _ in range(len(batches))]
        patches += unlabeled_batches[0]["data"].shape[0]
    workers_stopped = stop_augmentation_workers(trainer)
    if unlabeled is not None:
        trainer.dataloader_unlabeled = iter(unlabeled_batches)
    flops = network_flops(trainer, patches, batches[0]["data"][0])
    times, out_of_memory, report = [], False, None
    peak = reserved = torch.cuda.max_memory_allocated() if cuda else 0
    cache_before = inductor_cache_counts()
    warmup_s, warmup_start = float("nan"), time.perf_counter()
    try:
        for batch in batches[:warmup]:
            trainer.train_step(batch)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        warmup_s = time.perf_counter() - warmup_start
        for batch in batches[warmup:warmup + steps]:
            start = time.perf_counter()
            trainer.train_step(batch)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        reserved = torch.cuda.max_memory_reserved() if cuda else 0
        report = profile_steps(trainer, batches[warmup + steps:], cuda) if profile else None
    except torch.OutOfMemoryError:  # a finding for these plans, not a failure of the benchmark
        out_of_memory = True
    cached, compiled = (after - before for after, before in zip(inductor_cache_counts(), cache_before))
    row = {"trainer": trainer_name, "warmup_s": warmup_s, "graphs_cached": cached, "graphs_compiled": compiled,
           "median_s": float(np.median(times)) if times else float("nan"),
           "mean_s": float(np.mean(times)) if times else float("nan"), "out_of_memory": out_of_memory,
           "peak_gib": (peak - allocated_before) / 2 ** 30 if cuda else float("nan"),
           "reserved_gib": reserved / 2 ** 30 if cuda else float("nan"), "profile": report, "flops": flops,
           "workers_stopped": workers_stopped, "batch": trainer.configuration_manager.batch_size,
           "patch": trainer.configuration_manager.patch_size}
    if out_of_memory:
        trainer.optimizer.zero_grad(set_to_none=True)
    trainer.on_train_end()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-c", required=True, help="configuration")
    parser.add_argument("-f", default="all", help="fold (default: all)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-tr", nargs="+", default=["nnUNetTrainer", "nnUNetTrainerCAML", "nnUNetTrainerCAML_noCMA",
                                                   "nnUNetTrainerCAML_noOCC"],
                        help="trainers; the first is the reference (default: stock, CAML, noCMA, noOCC)")
    parser.add_argument("-n", type=int, default=20, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("-device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the timed steps, run N more under torch.profiler and print, per trainer, the top "
                             "operations and the time of each named part of the step (default: 0, no profile)")
    parser.add_argument("--fallback_random", action="store_true",
                        help="compile with inductor's fallback_random, as compile_check.py does, to reuse its cached "
                             "graphs (only CMA's dropouts draw differently; default: nnU-Net's settings)")
    args = parser.parse_args()
    torch._inductor.config.fallback_random = args.fallback_random
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="caml_step_time_")
    atexit.register(shutil.rmtree, os.environ["nnUNet_results"], ignore_errors=True)
    fold = args.f if args.f == "all" else int(args.f)
    device = torch.device(args.device)
    steady_allocator = False
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        steady_allocator = steady_cpu_allocator()
    rows = [time_trainer(t, args.d, args.c, fold, device, args.n, args.warmup, args.p, args.profile) for t in args.tr]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"\ndevice {device} ({name}), torch {torch.__version__}, plans {args.p} {args.c}, batch {rows[0]['batch']} "
          f"(+ as many unlabeled for CAML), patch {rows[0]['patch']}, {args.n} timed steps after {args.warmup} "
          f"warm-up, data loading excluded (batches loaded first, then the augmentation workers stopped: "
          f"{' '.join(str(row['workers_stopped']) for row in rows)} processes)"
          + ("; glibc's malloc thresholds fixed for all trainers alike" if steady_allocator else ""))
    print(f"{'trainer':36s} {'median s/step':>14s} {'mean s/step':>12s} {'x first':>8s} {'x 4-floor':>10s} "
          f"{'net FLOPs x first':>18s} {'x FLOP floor':>13s} {'peak GiB':>9s} {'reserved GiB':>13s}")
    for row in rows:
        memory = (f"{'out of memory':>23s}" if row["out_of_memory"] else
                  f"{row['peak_gib']:9.2f} {row['reserved_gib']:13.2f}")
        vs_first, flops_vs_first = row["median_s"] / rows[0]["median_s"], row["flops"] / rows[0]["flops"]
        print(f"{row['trainer']:36s} {row['median_s']:14.3f} {row['mean_s']:12.3f} {vs_first:8.2f} "
              f"{vs_first / 4:10.2f} {flops_vs_first:18.2f} {vs_first / flops_vs_first:13.2f} {memory}")
    print("x 4-floor: against two networks like the first on twice its patches; net FLOPs: forward and backward of "
          "the step's networks (CAML's auxiliary network, with its interpolation upsampling and CMA, has more than "
          "the main one); x FLOP floor: s/step ratio / FLOP ratio, what the step costs beyond its networks' work")
    print("\nthe warm-up steps' seconds (compilation included), the graphs inductor took from its cache / compiled:")
    for row in rows:
        print(f"warm-up {row['trainer']:36s} {row['warmup_s']:6.1f}  {row['graphs_cached']} / {row['graphs_compiled']}")

    for row in rows:
        if row["profile"]:
            print(f"\n== profile of {row['trainer']}, {args.profile} steps (the profiler's own overhead included)\n"
                  f"{row['profile']}")


if __name__ == "__main__":
    main()
