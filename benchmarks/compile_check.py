"""Does a CAML trainer compile like nnU-Net? Checks ``torch.compile`` of both networks on real plans and data.

    python benchmarks/compile_check.py -d 612 -c 3d_fullres [-f all] [-tr nnUNetTrainerCAML] [-n 20]
        [-device cuda] [--backend inductor]

Needs what ``benchmarks/step_time.py`` needs (a planned dataset, preprocessed unlabeled data, ``nnUNet_extTrainer``).
Each trainer is built the way ``nnUNetv2_train`` builds it; nnU-Net's own ``_do_i_compile`` decides, so on CUDA the
default is compiled and ``nnUNet_compile=f`` gives the eager reference. The trainers log into a temporary
``nnUNet_results``, removed at exit. Checks, each printed with its numbers:

1. the compiled trainer compiled both the main and the auxiliary network, the eager one neither;
2. one training step of each, from the same weights on the same batch with the same seed, gives the same loss terms
   within AMP tolerance (inductor's random ops are switched to eager's generator, ``fallback_random``, so CMA's
   dropout draws the same masks). Compared: both networks' supervised losses (every deep supervision output) and
   the mutual consistency loss (both full-resolution outputs). The OCC term is printed, not compared: it depends on
   the predictions through discrete choices (the top-k most confident voxels, the correctly classified voxels whose
   random subset enters the memory bank), so a rounding difference in one voxel changes which voxels and memory
   entries it uses;
3. over ``-n`` compiled steps: no graph break inside either network, and no new graph after the first ``--warmup``
   steps (no recompilation);
4. the compiled trainer's checkpoint loads into the eager trainer (state dicts without ``torch.compile``'s prefix).

Inductor compiles with ``fallback_random`` here; ``benchmarks/step_time.py --fallback_random`` compiles with the same
settings and so takes the graphs this check compiled from inductor's on-disk cache (``benchmarks/gpu_check.sh`` runs
the two in turn on the same plans). Exits with status 1 when a check fails. ``--backend aot_eager`` traces with dynamo
and AOTAutograd but runs eager kernels: what the CPU test uses, since nnU-Net itself never compiles on the CPU.
"""
import argparse
import atexit
import functools
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
import torch._inductor.config
from torch._dynamo.eval_frame import OptimizedModule
from torch._dynamo.utils import counters

from nnunetv2_caml.networks import unwrapped

#: loss terms compared between the eager and the compiled step (continuous in both networks' outputs)
COMPARED = ("caml_loss_sup_main", "caml_loss_sup_aux", "caml_loss_consistency")
#: printed only (OCC's discrete choices of voxels and memory entries, see the module doc)
PRINTED = ("caml_loss_occ", "loss")


def build_trainer(trainer_name: str, dataset: str, configuration: str, fold, device: torch.device, compiled: bool):
    from nnunetv2.run.run_training import get_trainer_from_args

    os.environ["nnUNet_compile"] = "t" if compiled else "f"
    trainer = get_trainer_from_args(dataset, configuration, fold, trainer_name, device=device)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    return trainer


def seeded_step(trainer, batch: dict, unlabeled: dict, seed: int) -> dict:
    """One ``train_step`` on ``batch`` with ``unlabeled`` as CAML's unlabeled batch, random generators seeded."""
    loader, trainer.dataloader_unlabeled = trainer.dataloader_unlabeled, iter([unlabeled])
    torch.manual_seed(seed)
    try:
        return trainer.train_step(batch)
    finally:
        trainer.dataloader_unlabeled = loader


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-c", required=True, help="configuration")
    parser.add_argument("-f", default="all", help="fold (default: all)")
    parser.add_argument("-tr", default="nnUNetTrainerCAML", help="CAML trainer (default: nnUNetTrainerCAML)")
    parser.add_argument("-n", type=int, default=20, help="compiled steps watched for graph breaks and recompiles")
    parser.add_argument("--warmup", type=int, default=2, help="steps after which no new graph may appear")
    parser.add_argument("-device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default: nnU-Net's, inductor)")
    parser.add_argument("--rtol", type=float, default=2e-2, help="relative tolerance of the eager/compiled losses")
    parser.add_argument("--atol", type=float, default=2e-3, help="absolute tolerance of the eager/compiled losses")
    args = parser.parse_args()

    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="caml_compile_check_")
    # removed at exit, with the checkpoint of both networks the check writes there
    atexit.register(shutil.rmtree, os.environ["nnUNet_results"], ignore_errors=True)
    if args.backend != "inductor":  # the trainers call torch.compile(module) as nnU-Net does
        torch.compile = functools.partial(torch.compile, backend=args.backend)
    torch._inductor.config.fallback_random = True
    fold = args.f if args.f == "all" else int(args.f)
    device = torch.device(args.device)
    failures = []

    eager = build_trainer(args.tr, args.d, args.c, fold, device, compiled=False)
    compiled = build_trainer(args.tr, args.d, args.c, fold, device, compiled=True)
    modules = {"eager": eager, "compiled": compiled}
    for name, trainer in modules.items():
        kinds = {net: isinstance(getattr(trainer, net), OptimizedModule) for net in ("network", "auxiliary_network")}
        print(f"{name} trainer: main network compiled {kinds['network']}, auxiliary network compiled "
              f"{kinds['auxiliary_network']}")
        if any(kinds.values()) != (name == "compiled") or len(set(kinds.values())) != 1:
            failures.append(f"the {name} trainer compiled main {kinds['network']}, auxiliary "
                            f"{kinds['auxiliary_network']}")
    unwrapped(compiled.network).load_state_dict(eager.network.state_dict())
    unwrapped(compiled.auxiliary_network).load_state_dict(eager.auxiliary_network.state_dict())
    compiled.occ.load_state_dict(eager.occ.state_dict())

    steps = [(next(eager.dataloader_train), next(eager.dataloader_unlabeled)) for _ in range(args.n)]
    reference = seeded_step(eager, *steps[0], seed=0)
    result = seeded_step(compiled, *steps[0], seed=0)
    print(f"{'loss term':26s} {'eager':>12s} {'compiled':>12s} {'|difference|':>13s}")
    for key in (*COMPARED, *PRINTED):
        a, b = float(reference[key]), float(result[key])
        print(f"{key:26s} {a:12.6f} {b:12.6f} {abs(a - b):13.2e}" + ("" if key in COMPARED else "  (not compared)"))
        if key in COMPARED and not np.isclose(b, a, rtol=args.rtol, atol=args.atol):
            failures.append(f"{key}: eager {a:.6f}, compiled {b:.6f} (rtol {args.rtol}, atol {args.atol})")

    graphs = [counters["stats"]["unique_graphs"]]  # after each compiled step
    for i, (batch, unlabeled) in enumerate(steps[1:], start=2):
        out = seeded_step(compiled, batch, unlabeled, seed=i)
        if not np.isfinite(float(out["loss"])):
            failures.append(f"compiled step {i}: loss {float(out['loss'])}")
        graphs.append(counters["stats"]["unique_graphs"])
    breaks = dict(counters["graph_break"])
    print(f"{args.n} compiled steps: graphs after each step {graphs}; graph breaks {sum(breaks.values())}")
    if breaks:
        failures.append("graph breaks: " + "; ".join(f"{k} ({v}x)" for k, v in breaks.items()))
    if len(graphs) > args.warmup and graphs[-1] != graphs[args.warmup - 1]:
        failures.append(f"recompilation: {graphs[args.warmup - 1]} graphs after step {args.warmup}, "
                        f"{graphs[-1]} after step {args.n}")
    # 4. what the compiled trainer saves loads into the eager one (nnUNetv2_predict, --c without compilation)
    checkpoint = os.path.join(os.environ["nnUNet_results"], "compiled_checkpoint.pth")
    compiled.save_checkpoint(checkpoint)
    try:
        eager.load_checkpoint(checkpoint)
        print("the compiled trainer's checkpoint loads into the eager trainer")
    except Exception as error:  # any failure to load is the finding
        failures.append(f"the compiled trainer's checkpoint does not load into the eager one: {error}")
    for trainer in modules.values():
        trainer.on_train_end()
    for failure in failures:
        print("FAILED:", failure)
    print("compile check " + ("failed" if failures else "passed") + f" ({args.tr}, {device}, backend {args.backend})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
