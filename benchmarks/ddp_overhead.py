"""What multi-GPU CAML communicates per training step beyond nnU-Net's own DDP, and how long it takes.

    python benchmarks/ddp_overhead.py -d DATASET -c CONFIGURATION [-p PLANS] [--backend gloo|nccl] [-n 20]

Spawns 2 ranks (gloo on the CPU, or nccl on 2 GPUs) and times, with the very functions the trainer calls each step,
on tensors of the sizes the plans give (auxiliary network and OCC heads built from them with the default settings,
the plans' batch split over the ranks):

* ``every_rank(keys)``: the labeled case ids of every rank (the snapshot a non-finite step restores);
* ``on_every_rank(finite)``: whether every rank's loss is finite;
* ``store_from_every_rank``: the memory bank exchange, at its largest (every labeled patch sends
  ``memory_entries_per_case`` entries of every class);
* ``average_gradients``: the auxiliary network's and OCC heads' gradients (one all-reduce);
* ``average_buffers``: the OCC heads' BatchNorm statistics.

Prints the payload each rank contributes per step and the median time of each part over ``-n`` steps. nnU-Net's own
DDP all-reduce of the main network's gradients (in the backward pass) is not timed; its payload is printed beside.
"""
import argparse
import os
import pickle
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _size(size: int) -> str:
    return f"{size / 1e6:.3f} MB" if size >= 1000 else f"{size} bytes"


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, all ranks starting together."""
    times = []
    for _ in range(repeats + 2):  # 2 warm-up calls
        dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times[2:]))


def worker(rank: int, world_size: int, args: argparse.Namespace) -> None:
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_caml.distributed import (average_buffers, average_gradients, every_rank, on_every_rank,
                                           split_batch)
    from nnunetv2_caml.networks import build_auxiliary_network, build_plans_unet, feature_channels
    from nnunetv2_caml.occ import OmniCorrelationConsistency

    dist.init_process_group(args.backend, rank=rank, world_size=world_size)
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    folder = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(args.d))
    plans = PlansManager(join(folder, f"{args.p}.json"))
    dataset_json = load_json(join(folder, "dataset.json"))
    configuration = plans.get_configuration(args.c)
    num_classes = plans.get_label_manager(dataset_json).num_segmentation_heads
    num_input_channels = determine_num_input_channels(plans, configuration, dataset_json)
    network = build_auxiliary_network(configuration, num_input_channels, num_classes).to(device)
    main_network = build_plans_unet(configuration, num_input_channels, num_classes)
    main_parameters = sum(p.numel() for p in main_network.parameters())
    occ = OmniCorrelationConsistency(feature_channels(network), num_classes, device=device).to(device)  # defaults
    parameters = [*network.parameters(), *occ.parameters()]
    for p in parameters:  # as after a backward pass (what travels does not depend on the values)
        p.grad = torch.randn_like(p)
    labeled = split_batch(configuration.batch_size, world_size, rank)
    bank = occ.memory_bank
    updates = [(f"case_{rank}_{i}", torch.randn(num_classes * bank.entries_per_case, bank.embedding_dim, device=device),
                torch.arange(num_classes, device=device).repeat_interleave(bank.entries_per_case))
               for i in range(labeled)]
    keys = [case for case, _, _ in updates]
    buffers = list(occ.buffers())
    parts = {
        "case ids of every rank": (lambda: every_rank(keys), len(pickle.dumps(keys))),
        "finite on every rank": (lambda: on_every_rank(True, device), 4),
        "memory bank exchange": (lambda: bank.store_from_every_rank(updates),
                                 sum(e.shape[0] for _, e, _ in updates) * (bank.embedding_dim + 1) * 4),
        "auxiliary network + OCC heads gradients": (lambda: average_gradients(parameters),
                                                    sum(p.numel() + 1 for p in parameters) * 4),
        "OCC heads BatchNorm statistics": (lambda: average_buffers(buffers),
                                           sum(b.numel() * b.element_size() for b in buffers)),
    }
    results = {name: (_timed(fn, device, args.n), size) for name, (fn, size) in parts.items()}
    if rank == 0:
        print(f"{world_size} ranks, {args.backend} on {device.type}; {args.p} {args.c}: plans batch "
              f"{configuration.batch_size} ({labeled} labeled patch(es) on rank 0), {num_classes} classes, auxiliary "
              f"network + heads {sum(p.numel() for p in parameters) / 1e6:.2f} M parameters")
        print(f"{'per step':42s} {'payload per rank':>18s} {'median time':>12s}")
        for name, (seconds, size) in results.items():
            print(f"{name:42s} {_size(size):>18s} {seconds * 1e3:9.2f} ms")
        total_time = sum(t for t, _ in results.values())
        total_size = sum(s for _, s in results.values())
        print(f"{'total':42s} {_size(total_size):>18s} {total_time * 1e3:9.2f} ms")
        print(f"for comparison, nnU-Net's own DDP all-reduces the main network's gradients: "
              f"{_size(main_parameters * 4)} per step ({main_parameters / 1e6:.2f} M parameters)")
    dist.destroy_process_group()


def main() -> None:
    from nnunetv2.run.run_training import find_free_network_port

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True, help="dataset name or id (its plans are read from nnUNet_preprocessed)")
    parser.add_argument("-c", required=True, help="configuration")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"), help="gloo: CPU; nccl: 2 GPUs")
    parser.add_argument("-n", type=int, default=20, help="timed steps (default: 20)")
    args = parser.parse_args()
    os.environ["MASTER_ADDR"] = "localhost"
    os.environ.setdefault("MASTER_PORT", str(find_free_network_port()))
    mp.spawn(worker, args=(2, args), nprocs=2, join=True)


if __name__ == "__main__":
    sys.exit(main())
