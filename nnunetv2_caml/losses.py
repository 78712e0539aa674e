"""The CAML loss terms, as pure functions of tensors.

Names follow the paper (Gao et al., MICCAI 2023):

* :func:`sharpen` and :func:`mutual_consistency_loss` -- the mutual consistency loss ``L_c`` (the paper's MSE, a
  cross-entropy form, or nnU-Net's Dice + cross-entropy form);
* :func:`omni_correlation_matrix` and :func:`omni_correlation_consistency_loss` -- the
  Omni-Correlation Consistency loss ``L_o`` as the paper writes it; :func:`omni_correlation_consistency` computes the
  same ``L_o`` and gradients block by block, the form training uses;
* :func:`sigmoid_rampup` -- the ramp-up of ``lambda_c`` and ``lambda_o``.
"""
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sharpen class probabilities ``[B, C, ...]`` over dim 1: ``p_c^(1/T) / sum_j p_j^(1/T)``.

    Computed in log space (``softmax(log p / T)``), so a tiny temperature cannot overflow. For two classes this
    equals the paper's ``p^(1/T) / (p^(1/T) + (1 - p)^(1/T))``.
    """
    if temperature <= 0:
        raise ValueError(f"sharpening temperature must be > 0, got {temperature}")
    return torch.softmax(torch.log(probs.clamp_min(1e-12)) / temperature, dim=1)


#: the distances :func:`mutual_consistency_loss` offers
CONSISTENCY_DISTANCES = ("mse", "ce", "dice_ce")
CONSISTENCY_DISTANCES_TEXT = " or ".join(map(repr, CONSISTENCY_DISTANCES))  # "'mse' or 'ce' or ...", for messages


def mutual_consistency_loss(probs_main: torch.Tensor, probs_aux: torch.Tensor, temperature: float = 0.1,
                            detach_targets: bool = False, distance: str = "mse",
                            batch_dice: bool = False) -> torch.Tensor:
    """``L_c = d(p_main, sharpen(p_aux)) + d(p_aux, sharpen(p_main))``, averaged over voxels.

    ``distance="mse"`` (the paper): the mean squared error over all elements. ``distance="ce"``: the cross-entropy
    ``-sum_c t_c log p_c`` per voxel, on the scale of nnU-Net's own CE; its gradient on the logits is ``p - t``, so
    unlike the MSE through the softmax it does not vanish on voxels a network is confidently wrong about.
    ``distance="dice_ce"``: that cross-entropy plus nnU-Net's soft Dice loss over the foreground classes
    (:func:`soft_dice_loss`, per sample or, with ``batch_dice``, over the batch as the plans say), the form of
    nnU-Net's supervised loss with the sharpened prediction as a soft label; the Dice term weighs the rare foreground
    voxels as much as the background, which the voxel-averaged cross-entropy does not.
    The paper's code lets gradients flow through the sharpened targets; ``detach_targets=True`` stops them.
    """
    if distance not in CONSISTENCY_DISTANCES:
        raise ValueError(f"mutual consistency distance must be {CONSISTENCY_DISTANCES_TEXT}, got {distance!r}")
    target_for_main = sharpen(probs_aux, temperature)
    target_for_aux = sharpen(probs_main, temperature)
    if detach_targets:
        target_for_main, target_for_aux = target_for_main.detach(), target_for_aux.detach()
    pairs = ((probs_main, target_for_main), (probs_aux, target_for_aux))
    if distance == "mse":
        return sum(F.mse_loss(probs, target) for probs, target in pairs)
    if distance == "ce":
        return sum(_soft_cross_entropy(probs, target) for probs, target in pairs)
    return sum(_soft_cross_entropy(probs, target) + soft_dice_loss(probs, target, batch_dice)
               for probs, target in pairs)


def _soft_cross_entropy(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean over voxels of -sum_c target_c log probs_c`` for ``[B, C, ...]`` tensors."""
    return -(target * torch.log(probs.clamp_min(1e-8))).sum(1).mean()


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, batch_dice: bool = False,
                   smooth: float = 1e-5) -> torch.Tensor:
    """``1 - mean over foreground classes of (2 sum p t + smooth) / (sum p + sum t + smooth)`` for ``[B, C, ...]``
    probabilities and soft (or one-hot) targets: nnU-Net's soft Dice (``do_bg=False``, ``smooth=1e-5``), shifted by
    1 so that it is 0 for equal one-hot maps. Per sample, then averaged, or with ``batch_dice`` over the whole batch.
    Class 0 is the background; with a single class the Dice is taken over it."""
    axes = (0, *range(2, probs.ndim)) if batch_dice else tuple(range(2, probs.ndim))
    intersection = (probs * target).sum(axes)
    total = probs.sum(axes) + target.sum(axes)
    dice = (2 * intersection + smooth) / (total + smooth).clamp_min(1e-8)
    foreground = dice[..., 1:] if dice.shape[-1] > 1 else dice
    return 1 - foreground.mean()


def sigmoid_rampup(current: float, length: float) -> float:
    """Sigmoid ramp-up of Laine & Aila: ``exp(-5 (1 - min(current, length) / length)^2)``, 1.0 when length is 0."""
    if length <= 0:
        return 1.0
    phase = 1.0 - float(np.clip(current, 0.0, length)) / length
    return float(np.exp(-5.0 * phase * phase))


def most_confident_per_class(confidence: torch.Tensor, pseudo_label: torch.Tensor, num_classes: int,
                             top_k: int) -> torch.Tensor:
    """Indices of the ``top_k`` most confident voxels of each class (classes ascending, most confident first).

    A class with fewer than 2 voxels contributes none: one voxel cannot form a correlation distribution.
    """
    selected = []
    for c in range(num_classes):
        candidates = torch.nonzero(pseudo_label == c, as_tuple=True)[0]
        if candidates.numel() < 2:
            continue
        order = torch.sort(confidence[candidates], descending=True, stable=True)[1][:top_k]
        selected.append(candidates[order])
    if not selected:
        return torch.zeros(0, dtype=torch.long, device=confidence.device)
    return torch.cat(selected)


def correlation_columns(memory: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """The memory entries that form the omni-correlation matrix's columns, ``[sum M_c, D]`` in ascending class order:
    every class with at least 2 entries (``None`` or a single entry contributes none). ``None`` when no class has."""
    columns = [m for m in memory if m is not None and m.shape[0] >= 2]
    return torch.cat(columns, dim=0) if columns else None


def omni_correlation_matrix(features: torch.Tensor, confidence: torch.Tensor, pseudo_label: torch.Tensor,
                            memory: Sequence[Optional[torch.Tensor]], temperature: float = 0.1,
                            top_k: int = 12800) -> Optional[torch.Tensor]:
    """The omni-correlation matrix between unlabeled voxel embeddings and the labeled memory bank.

    Args:
        features: ``[N, D]`` embeddings of the unlabeled voxels (after projection and prediction heads).
        confidence: ``[N]`` confidence of each voxel's pseudo-label.
        pseudo_label: ``[N]`` integer pseudo-label of each voxel.
        memory: one entry per class, each a ``[M_c, D]`` tensor of labeled embeddings or ``None``.
        temperature: softmax temperature ``tau``.
        top_k: at most this many of the most confident voxels are kept per class.

    Returns:
        ``softmax(f @ m^T / tau)`` row-wise, shape ``[rows, sum M_c]``. Rows are the selected voxels, grouped by
        class in ascending order and, within a class, most confident first. Columns are the memory entries of all
        classes in ascending class order. A class with fewer than 2 candidate voxels contributes no rows, a memory
        class that is ``None`` or has fewer than 2 entries contributes no columns. ``None`` when no row or no
        column is left.
    """
    memory_matrix = correlation_columns(memory)
    if memory_matrix is None:
        return None
    memory_matrix = memory_matrix.to(device=features.device, dtype=features.dtype)
    rows = most_confident_per_class(confidence, pseudo_label, len(memory), top_k)
    if rows.numel() == 0:
        return None
    # dividing the [D, M] memory by tau rather than the [rows, M] logits: same values, a fraction of the work
    return torch.softmax(features[rows] @ (memory_matrix.T / temperature), dim=1)


#: added to the predicted correlations inside ``L_o``'s log (the paper's code), in both forms of ``L_o``
OMNI_CORRELATION_LOG_EPSILON = 1e-8


def omni_correlation_consistency_loss(corr_target: torch.Tensor, corr_pred: torch.Tensor) -> torch.Tensor:
    """``L_o = sum_rows sum_cols(-C_target * log(C_pred + 1e-8)) / rows``: cross-entropy between correlation rows.

    In CAML the auxiliary network's matrix is the target and the main network's the prediction.
    """
    if corr_target.shape != corr_pred.shape:
        raise ValueError(f"correlation matrices differ in shape: {tuple(corr_target.shape)} vs "
                         f"{tuple(corr_pred.shape)}")
    return -torch.sum(corr_target * torch.log(corr_pred + OMNI_CORRELATION_LOG_EPSILON)) / corr_target.shape[0]


def omni_correlation_consistency(embeddings_target: torch.Tensor, embeddings_pred: torch.Tensor,
                                 memory_matrix: torch.Tensor, temperature: float = 0.1,
                                 rows_per_block: Optional[int] = None) -> torch.Tensor:
    """``L_o`` straight from the embeddings: the value and gradients of
    ``omni_correlation_consistency_loss(softmax(e_target @ m^T / tau), softmax(e_pred @ m^T / tau))`` for ``[N, D]``
    embeddings of the same voxels and the ``[M, D]`` memory matrix (:func:`correlation_columns`), gradients to both
    embeddings (none to the memory, which the bank stores without gradient).

    The two ``[N, M]`` correlation matrices are never held whole: blocks of ``rows_per_block`` rows are formed, their
    share of the loss and of both gradients taken, and dropped. The gradients are computed with the loss (CAML always
    back-propagates ``L_o``) and kept as two ``[N, D]`` tensors. On the CPU blocks of 512 rows (for 512 entries) stay
    in the cache, about 3 x faster than the whole matrices; on CUDA one block holds up to 2^24 values.
    """
    if rows_per_block is None:
        values_per_block = 2 ** 24 if embeddings_target.is_cuda else 2 ** 18
        rows_per_block = max(1, values_per_block // max(1, memory_matrix.shape[0]))
    scaled_memory_t = memory_matrix.to(embeddings_pred).T / temperature
    return _BlockwiseOmniCorrelationCrossEntropy.apply(embeddings_target, embeddings_pred, scaled_memory_t,
                                                       rows_per_block)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[r, 1]`` row-wise dot products of two ``[r, M]`` matrices (on the CPU faster than ``bmm`` or ``einsum``)."""
    return (a * b).sum(1, keepdim=True)


class _BlockwiseOmniCorrelationCrossEntropy(torch.autograd.Function):
    """``-sum(C_t * log(C_p + 1e-8)) / N`` with ``C_x = softmax(e_x @ W)``, ``W`` = memory^T / tau, by row blocks.

    Per block, with ``d = C_p + 1e-8``: the gradient on the prediction's logits is ``-C_p (a - <C_p, a>) / N`` with
    ``a = C_t / d`` (softmax backward of ``-C_t / d``); on the target's logits it is
    ``-C_t (log d - <C_t, log d>) / N``. Both go back through ``W`` to the embeddings."""

    @staticmethod
    def forward(ctx, emb_target, emb_pred, scaled_memory_t, rows_per_block):
        need_gradients = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_target = torch.empty_like(emb_target) if need_gradients else None
        grad_pred = torch.empty_like(emb_pred) if need_gradients else None
        total = emb_pred.new_zeros(())
        for start in range(0, emb_target.shape[0], rows_per_block):
            block = slice(start, start + rows_per_block)
            c_target = torch.softmax(emb_target[block] @ scaled_memory_t, 1)
            c_pred = torch.softmax(emb_pred[block] @ scaled_memory_t, 1)
            d = c_pred + OMNI_CORRELATION_LOG_EPSILON
            if need_gradients:
                a = c_target / d
                grad_pred[block] = c_pred.mul_(a.sub_(_row_dot(c_pred, a))) @ scaled_memory_t.T
            log_d = d.log_()
            row_sums = _row_dot(c_target, log_d)  # this block's rows of sum(C_t * log d)
            total += row_sums.sum()
            if need_gradients:
                grad_target[block] = c_target.mul_(log_d.sub_(row_sums)) @ scaled_memory_t.T
        ctx.rows = emb_target.shape[0]
        ctx.save_for_backward(grad_target, grad_pred)
        return -total / ctx.rows

    @staticmethod
    def backward(ctx, grad_output):
        grad_target, grad_pred = ctx.saved_tensors
        scale = -grad_output / ctx.rows
        return grad_target * scale, grad_pred * scale, None, None
