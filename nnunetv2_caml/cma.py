"""Cross-sample Mutual Attention (CMA), the block CAML inserts into the auxiliary network's encoder.

Two transformer encoder layers in sequence (PyTorch ``TransformerEncoderLayer``: post-norm, ReLU, feed-forward
width 4x channels, dropout 0.5):

1. *intra-sample*: the tokens are the voxels of one sample, attention runs within each sample;
2. *inter-sample*: the tokens are the samples of the batch at one voxel position, attention runs across the batch,
   separately for each position. This is what carries knowledge from labeled to unlabeled samples in a mixed batch.

CMA is active only in training mode; in eval mode it is the identity.

The layers are PyTorch's ``TransformerEncoderLayer`` with one change of implementation, not of maths: self-attention
runs through :func:`self_attention` (``scaled_dot_product_attention``, with fused dropout on CUDA). On the CPU, where no
fused kernel takes dropout, the dropout mask on the attention weights is drawn with ``rand_like`` instead of
``bernoulli_``, several times faster for the ``[B, heads, N, N]`` weights of the intra-sample layer.
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
        weights = torch.softmax((q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1), dim=-1)
        out = (weights * (torch.rand_like(weights) >= p)) @ v * (1.0 / (1.0 - p))
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    return attention.out_proj(out.transpose(1, 2).reshape(n, length, channels))


class _TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` (same parameters, same maths) whose self-attention is :func:`self_attention`."""

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):
        if attn_mask is not None or key_padding_mask is not None:
            raise ValueError("CMA's transformer layers take no attention or padding mask")
        return self.dropout1(self_attention(x, self.self_attn, self.training))


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
