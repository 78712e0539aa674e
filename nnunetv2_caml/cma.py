"""Cross-sample Mutual Attention (CMA), the block CAML inserts into the auxiliary network's encoder.

Two transformer encoder layers in sequence (PyTorch ``TransformerEncoderLayer``: post-norm, ReLU, feed-forward
width 4x channels, dropout 0.5):

1. *intra-sample*: the tokens are the voxels of one sample, attention runs within each sample;
2. *inter-sample*: the tokens are the samples of the batch at one voxel position, attention runs across the batch,
   separately for each position. This is what carries knowledge from labeled to unlabeled samples in a mixed batch.

CMA is active only in training mode; in eval mode it is the identity.
"""
import torch
from torch import nn


class CrossSampleMutualAttention(nn.Module):
    """CMA for feature maps ``[B, C, *spatial]`` (2D or 3D); returns the same shape."""

    def __init__(self, channels: int, num_heads: int = 4, dropout: float = 0.5, ffn_factor: int = 4):
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"CMA needs channels ({channels}) divisible by num_heads ({num_heads}); change the "
                             f"trainer's cma_num_heads or the CMA stage")
        layer = dict(d_model=channels, nhead=num_heads, dim_feedforward=ffn_factor * channels, dropout=dropout,
                     activation="relu", norm_first=False, batch_first=True)
        self.intra_sample = nn.TransformerEncoderLayer(**layer)
        self.inter_sample = nn.TransformerEncoderLayer(**layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        b, c = x.shape[:2]
        spatial = x.shape[2:]
        tokens = x.flatten(2).transpose(1, 2)                  # [B, N, C]: one sequence per sample
        tokens = self.intra_sample(tokens)
        tokens = self.inter_sample(tokens.transpose(0, 1))     # [N, B, C]: one sequence per position
        return tokens.permute(1, 2, 0).reshape(b, c, *spatial)
