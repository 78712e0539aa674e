"""nnU-Net's multi-GPU launcher on the CPU: ``run_training(num_gpus=N)`` and ``run_ddp`` with the gloo backend.

    python tests/ddp_on_cpu.py DATASET CONFIGURATION FOLD -tr TRAINER -num_ranks N [--c] --report FOLDER

nnU-Net 2.8.1's ``run_ddp`` hard-codes the nccl backend and ``torch.cuda.set_device``; everything else here is what it
does, with nnU-Net's own functions: spawn N processes (``torch.multiprocessing.spawn``, a free port on localhost),
join one process group per rank, ``get_trainer_from_args``, ``maybe_load_checkpoint``, ``run_training``,
``perform_actual_validation``. The trainer must run on the CPU under a process group (``nnUNetTrainerCAML_ddpOnCPU``).

Afterwards each rank saves ``FOLDER/rank_<r>.pt`` for the tests: its main and auxiliary network, OCC heads and memory
bank, its log, the steps it recorded, and three unlabeled batches it draws after training.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_rank(rank: int, world_size: int, args: argparse.Namespace) -> None:
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    from nnunetv2_caml.networks import unwrapped

    # the ranks share one stdout pipe, block-buffered by default: a flush in mid-line would splice one rank's line into
    # the other's. Line-buffered, each line is one write, and writes under PIPE_BUF (4 KiB) reach a pipe whole
    sys.stdout.reconfigure(line_buffering=True)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    trainer = get_trainer_from_args(args.dataset, args.configuration, args.fold, args.tr, "nnUNetPlans", args.c,
                                    device=torch.device("cpu"))
    maybe_load_checkpoint(trainer, args.c, False)
    trainer.run_training()
    trainer.perform_actual_validation(False)
    unlabeled = [next(trainer.dataloader_unlabeled) for _ in range(3)]
    torch.save({
        "main_network": unwrapped(trainer.network).state_dict(),
        **trainer._caml_state(),
        "logging": trainer.logger.get_checkpoint(),
        "recorded_steps": trainer.recorded_steps,
        "labeled_batch_size": trainer.batch_size,
        "unlabeled": [(list(u["keys"]), u["data"]) for u in unlabeled],
    }, os.path.join(args.report, f"rank_{rank}.pt"))
    dist.destroy_process_group()


def main() -> None:
    from nnunetv2.run.run_training import find_free_network_port

    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    parser.add_argument("configuration")
    parser.add_argument("fold")
    parser.add_argument("-tr", required=True)
    parser.add_argument("-num_ranks", type=int, default=2)
    parser.add_argument("--c", action="store_true")
    parser.add_argument("--report", required=True)
    args = parser.parse_args()
    args.fold = args.fold if args.fold == "all" else int(args.fold)
    os.makedirs(args.report, exist_ok=True)
    os.environ["MASTER_ADDR"] = "localhost"
    os.environ.setdefault("MASTER_PORT", str(find_free_network_port()))
    mp.spawn(run_rank, args=(args.num_ranks, args), nprocs=args.num_ranks, join=True)


if __name__ == "__main__":
    sys.exit(main())
