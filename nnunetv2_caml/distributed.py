"""What CAML adds to nnU-Net's multi-GPU training (``nnUNetv2_train ... -num_gpus N``).

nnU-Net runs one process per GPU in one ``torch.distributed`` process group, splits the plans' batch across the ranks
and wraps its network in ``DistributedDataParallel``, which averages the main network's gradients during the
backward pass. CAML's own parts are synchronised here, with explicit collectives at fixed points of every step, so
that every rank takes part in the same collectives in the same order whatever its data:

* every rank starts from rank 0's auxiliary network and OCC heads (:func:`broadcast_from_rank_zero`), as DDP starts
  every rank from rank 0's main network;
* the auxiliary network's and the OCC heads' gradients are averaged after the backward pass
  (:func:`average_gradients`); the heads' BatchNorm running statistics are averaged too (:func:`average_buffers`);
* the labeled memory bank applies every rank's update on every rank (``LabeledMemoryBank.store_from_every_rank``,
  built on :func:`gather_rows`);
* a step is skipped on every rank when its loss is not finite on any rank (:func:`on_every_rank`);
* CAML's loss terms are gathered for the log (:func:`every_rank`), as nnU-Net gathers its own loss.

Every function here is also correct without a process group (one process): it then leaves everything as it is.
"""
from typing import Any, List, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether this process is one rank of a process group (nnU-Net's own test for DDP)."""
    return dist.is_available() and dist.is_initialized()


def every_rank(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects; ``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def on_every_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (``device``: where the backend communicates, CUDA under nccl)."""
    if not is_distributed():
        return flag
    flags = torch.tensor(int(flag), device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return bool(flags.item())


def broadcast_from_rank_zero(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite ``tensors`` (e.g. a ``state_dict``'s values) in place with rank 0's."""
    if is_distributed():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def gather_rows(rows: torch.Tensor, info: Any) -> List[Tuple[torch.Tensor, Any]]:
    """Every rank's ``(rows, info)`` in rank order, on every rank: ``rows`` ``[N_r, K]`` (``N_r`` may differ between
    ranks; the tensor itself travels, bit for bit) and a small picklable ``info`` describing it."""
    if not is_distributed():
        return [(rows, info)]
    sizes_and_info = every_rank((rows.shape[0], info))
    longest = max(n for n, _ in sizes_and_info)
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[:rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in sizes_and_info]
    dist.all_gather(gathered, padded)
    return [(g[:n], i) for g, (n, i) in zip(gathered, sizes_and_info)]


def _all_reduce_flat(tensors: Sequence[torch.Tensor], op) -> List[torch.Tensor]:
    """All-reduce ``tensors`` (one dtype and device) as one flat buffer; the reduced tensors, shaped as the inputs."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=op)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def average_gradients(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over the ranks, as DDP does (one all-reduce).

    A parameter that got no gradient on a rank (e.g. the OCC heads when that rank had no unlabeled voxel to project)
    counts as zero there; one that got no gradient on any rank keeps none, so the optimiser skips it as it would on
    one GPU (DDP's rule for globally unused parameters).
    """
    parameters = [p for p in parameters if p.requires_grad]
    if not is_distributed() or not parameters:
        return
    used = torch.tensor([p.grad is not None for p in parameters], dtype=parameters[0].dtype,
                        device=parameters[0].device)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    used, *grads = _all_reduce_flat([used, *grads], dist.ReduceOp.SUM)
    for p, grad, used_somewhere in zip(parameters, grads, used.tolist()):
        if used_somewhere:
            p.grad = grad.div_(dist.get_world_size())


def average_buffers(buffers: Sequence[torch.Tensor]) -> None:
    """Make buffers equal on every rank: floating ones (BatchNorm running statistics) become their mean over the
    ranks, integer ones (``num_batches_tracked``) their maximum."""
    if not is_distributed():
        return
    floating = [b for b in buffers if b.is_floating_point()]
    integer = [b for b in buffers if not b.is_floating_point()]
    for group, op in ((floating, dist.ReduceOp.SUM), (integer, dist.ReduceOp.MAX)):
        if group:
            for buffer, reduced in zip(group, _all_reduce_flat(group, op)):
                buffer.copy_(reduced / dist.get_world_size() if op == dist.ReduceOp.SUM else reduced)


def split_batch(global_batch_size: int, world_size: int, rank: int) -> int:
    """This rank's share of a global batch, split as nnU-Net splits the labeled batch (the first
    ``global % world`` ranks take one patch more)."""
    return global_batch_size // world_size + int(rank < global_batch_size % world_size)


def rank_seeds(num_workers: int, rank: int) -> List[int]:
    """Seeds for a rank's data-augmentation workers, distinct from every other rank's even when all ranks' numpy
    generators were seeded alike: a draw from this process's generator, spread with the rank by ``SeedSequence``."""
    return np.random.SeedSequence([int(np.random.randint(2 ** 31)), rank]).generate_state(num_workers).tolist()
