"""Cross-sample Mutual Attention (CMA), the block CAML inserts into the auxiliary network's encoder.

Two transformer encoder layers in sequence (PyTorch ``TransformerEncoderLayer``: post-norm, ReLU, feed-forward
width 4x channels, dropout 0.5):

1. *intra-sample*: the tokens are the voxels of one sample, attention runs within each sample;
2. *inter-sample*: the tokens are the samples of the batch at one voxel position, attention runs across the batch,
   separately for each position. This is what carries knowledge from labeled to unlabeled samples in a mixed batch.

CMA is active only in training mode; in eval mode it is the identity.

The layers are PyTorch's ``TransformerEncoderLayer`` with one change of implementation, not of maths: self-attention
runs through :func:`self_attention` (``scaled_dot_product_attention``, with fused dropout on CUDA). On the CPU no fused
kernel takes dropout, and the intra-sample layer's ``[B, heads, N, N]`` attention weights (N voxels per sample) are
the largest tensors of the block; :class:`BlockwiseDropoutAttention` computes that attention a block of query rows at
a time, forward and backward, so the weights are never held whole, and keeps the dropout mask as bits; the layers'
other dropouts draw their masks as bits too (:func:`dropout`).
"""
import torch
import torch.nn.functional as F
from torch import nn


def self_attention(x: torch.Tensor, attention: nn.MultiheadAttention, training: bool) -> torch.Tensor:
    """``attention(x, x, x)`` of a batch-first ``nn.MultiheadAttention`` (no masks), with its dropout on the attention
    weights in training mode: the same result distribution as the module's own forward."""
    n, length, channels = x.shape
    heads = attention.num_heads
    q, k, v = F.linear(x, attention.in_proj_weight, attention.in_proj_bias) \
        .view(n, length, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
    p = attention.dropout if training else 0.0
    if p > 0 and x.device.type == "cpu":
        out = BlockwiseDropoutAttention.apply(q, k, v, draw_keep_mask(q.shape[:-1] + (length,), p), p)
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    return attention.out_proj(out.transpose(1, 2).reshape(n, length, channels))


def draw_keep_mask(shape, p: float) -> torch.Tensor:
    """The dropout mask of attention weights of ``shape`` ``[..., rows, columns]``: keep each weight with probability
    ``1 - p``. For p = 0.5 (CMA's default) the mask is stored as random bits, one bit per weight (``uint8``, the last
    axis packed 8 to a byte); for any other p as a ``bool`` tensor of ``shape``."""
    if p == 0.5:
        return torch.randint(0, 256, (*shape[:-1], (shape[-1] + 7) // 8), dtype=torch.uint8)
    return torch.rand(shape) >= p


def keep_mask_rows(keep: torch.Tensor, start: int, stop: int, columns: int, p: float, dtype) -> torch.Tensor:
    """Rows ``start:stop`` of the mask of :func:`draw_keep_mask` as ``dtype``: ``1 / (1 - p)`` where the weight is
    kept, 0 where it is dropped (dropout's rescaling included)."""
    if keep.dtype == torch.bool:
        return keep[..., start:stop, :].to(dtype) * (1.0 / (1.0 - p))
    packed = keep[..., start:stop, :]
    # each byte's 8 bits as 8 values by lookup in a table (row b: the bits of byte b, lowest first, as 0 or
    # 1 / (1 - p)): far faster on the CPU than a boolean mask and torch.where
    table = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(dtype) * (1.0 / (1.0 - p))
    return table.index_select(0, packed.flatten().int()).view(*packed.shape[:-1], -1)[..., :columns]


# query rows per block of BlockwiseDropoutAttention: a block's weights (at 3d_cpu's CMA, 4 samples x 4 heads x 64 x 800
# values, 3 MB) stay in the CPU's cache
_BLOCK_ROWS = 64


class BlockwiseDropoutAttention(torch.autograd.Function):
    """``(softmax(q k^T / sqrt(d)) * mask) @ v`` for ``q, k, v`` ``[batch, heads, N, d]`` and a mask from
    :func:`draw_keep_mask`, computed ``_BLOCK_ROWS`` query rows at a time.

    The forward pass keeps only ``q``, ``k``, ``v`` and the mask; the backward pass recomputes each block's weights.
    The ``[batch, heads, N, N]`` weights, their mask and their product are never held whole, which on the CPU is
    about three times faster than autograd's form once they outgrow the cache (CMA at 32x40x40 patches: N = 800), and
    saves their memory for the backward pass."""

    @staticmethod
    def forward(ctx, q, k, v, keep, p):
        scaled_q = q * (q.shape[-1] ** -0.5)
        k_t = k.transpose(-2, -1)
        columns = k.shape[-2]
        blocks = []
        for start in range(0, q.shape[-2], _BLOCK_ROWS):
            stop = start + _BLOCK_ROWS
            weights = torch.softmax(scaled_q[..., start:stop, :] @ k_t, dim=-1)
            blocks.append(weights.mul_(keep_mask_rows(keep, start, stop, columns, p, q.dtype)) @ v)
        ctx.save_for_backward(scaled_q, k, v, keep)
        ctx.p = p
        return torch.cat(blocks, dim=-2)

    @staticmethod
    def backward(ctx, grad_out):
        scaled_q, k, v, keep = ctx.saved_tensors
        k_t, v_t = k.transpose(-2, -1), v.transpose(-2, -1)
        columns = k.shape[-2]
        grad_k, grad_v, grad_q_blocks = torch.zeros_like(k), torch.zeros_like(v), []
        for start in range(0, scaled_q.shape[-2], _BLOCK_ROWS):
            stop = start + _BLOCK_ROWS
            q_block, grad_block = scaled_q[..., start:stop, :], grad_out[..., start:stop, :]
            weights = torch.softmax(q_block @ k_t, dim=-1)
            mask = keep_mask_rows(keep, start, stop, columns, ctx.p, weights.dtype)
            grad_v += (weights * mask).transpose(-2, -1) @ grad_block
            grad_scores = torch._softmax_backward_data((grad_block @ v_t).mul_(mask), weights, -1, weights.dtype)
            grad_q_blocks.append(grad_scores @ k)
            grad_k += grad_scores.transpose(-2, -1) @ q_block
        grad_q = torch.cat(grad_q_blocks, dim=-2) * (scaled_q.shape[-1] ** -0.5)
        return grad_q, grad_k, grad_v, None, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p, training)``; on the CPU with p = 0.5 the mask is drawn as bits (:func:`draw_keep_mask`),
    several times faster than ``F.dropout``'s ``bernoulli_`` there."""
    if not training or p != 0.5 or x.device.type != "cpu" or x.dim() < 2:
        return F.dropout(x, p, training)
    return x * keep_mask_rows(draw_keep_mask(x.shape, p), 0, x.shape[-2], x.shape[-1], p, x.dtype)


class _TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` (same parameters, same maths) whose self-attention is :func:`self_attention`
    and whose dropouts are :func:`dropout`."""

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):
        if attn_mask is not None or key_padding_mask is not None:
            raise ValueError("CMA's transformer layers take no attention or padding mask")
        return dropout(self_attention(x, self.self_attn, self.training), self.dropout1.p, self.training)

    def _ff_block(self, x):
        x = self.linear2(dropout(self.activation(self.linear1(x)), self.dropout.p, self.training))
        return dropout(x, self.dropout2.p, self.training)


class CrossSampleMutualAttention(nn.Module):
    """CMA for feature maps ``[B, C, *spatial]`` (2D or 3D); returns the same shape."""

    def __init__(self, channels: int, num_heads: int = 4, dropout: float = 0.5, ffn_factor: int = 4):
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"CMA needs channels ({channels}) divisible by num_heads ({num_heads}); change the "
                             f"trainer's cma_num_heads or the CMA stage")
        layer = dict(d_model=channels, nhead=num_heads, dim_feedforward=ffn_factor * channels, dropout=dropout,
                     activation="relu", norm_first=False, batch_first=True)
        self.intra_sample = _TransformerEncoderLayer(**layer)
        self.inter_sample = _TransformerEncoderLayer(**layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        b, c = x.shape[:2]
        spatial = x.shape[2:]
        tokens = x.flatten(2).transpose(1, 2)                  # [B, N, C]: one sequence per sample
        tokens = self.intra_sample(tokens)
        tokens = self.inter_sample(tokens.transpose(0, 1))     # [N, B, C]: one sequence per position
        return tokens.permute(1, 2, 0).reshape(b, c, *spatial)
