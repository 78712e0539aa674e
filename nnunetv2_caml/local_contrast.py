"""The auxiliary network's local-contrast view (an addition to CAML, on by default).

Mutual learning can only correct what the two networks do not both get wrong. With the same input, CAML's two
networks learned the same mistakes (docs/gain_history.md, "Why it stops short of half the gap"): on images whose
contrast is unlike every labeled case's, both followed the intensities they were taught and agreed on the wrong
answer. With ``auxiliary_local_contrast`` on, the auxiliary network sees each patch through :func:`local_contrast`:
every voxel minus the Gaussian-weighted mean of its neighbourhood, divided by the neighbourhood's standard deviation.
That view keeps where a structure is brighter or darker than its surroundings and drops the absolute intensity levels
and slow shading that differ between scanners and protocols, so that the auxiliary network can be right where the
main network is wrong, and the mutual consistency on the unlabeled images passes that on to the main network
(co-training's two views; README, gain benchmark: 65 % of the gap closed on the vessel task against 36 % without the
view). The main network, the one ``nnUNetv2_predict`` uses, keeps nnU-Net's input unchanged.
"""
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

#: the Gaussian's sigma in voxels of the default view (``nnUNetTrainerCAML.auxiliary_local_contrast`` and the
#: labeled-only control ``nnUNetTrainer_localContrast``)
DEFAULT_SIGMA = 3.0


def gaussian_kernel_1d(sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian of standard deviation ``sigma`` voxels, cut at 3 sigma."""
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return kernel / kernel.sum()


def gaussian_blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Each channel of ``x`` (N, C, *spatial, 2-D or 3-D) blurred by the separable ``kernel`` along every spatial axis,
    the border replicated (so a constant image stays constant)."""
    channels, dims, radius = x.shape[1], x.ndim - 2, (kernel.numel() - 1) // 2
    conv = F.conv3d if dims == 3 else F.conv2d
    for axis in range(dims):
        shape = [1] * (dims + 2)
        shape[2 + axis] = kernel.numel()
        weight = kernel.to(x.device, x.dtype).view(shape).expand(channels, *shape[1:])
        pad = [0] * (2 * dims)  # F.pad lists the last axis first
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = radius
        x = conv(F.pad(x, pad, mode="replicate"), weight, groups=channels)
    return x


def local_contrast(x: torch.Tensor, sigma: float = DEFAULT_SIGMA, eps: float = 1e-2) -> torch.Tensor:
    """``(x - local mean) / sqrt(local variance + eps)``, mean and variance Gaussian-weighted with ``sigma`` voxels,
    per channel. Computed in float32 after removing each image's mean (the variance is a difference of two means,
    which float16, or float32 far from zero, would cancel away).
    Unchanged by ``a * x + b`` for ``a > 0`` up to ``eps``; ``eps`` keeps flat regions at noise level."""
    # autocast off where it can be on (nnU-Net uses it on CUDA); other devices (e.g. "meta", where FLOPs are counted)
    # have no autocast to turn off
    no_autocast = torch.autocast(device_type=x.device.type, enabled=False) if x.device.type in ("cuda", "cpu") \
        else nullcontext()
    with no_autocast:
        x = x.float()
        x = x - x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)  # the same view; keeps x * x small
        kernel = gaussian_kernel_1d(sigma)
        mean = gaussian_blur(x, kernel)
        variance = (gaussian_blur(x * x, kernel) - mean * mean).clamp_min(0)
        return (x - mean) / torch.sqrt(variance + eps)


class LocalContrastInput(nn.Module):
    """A U-Net's first encoder stage fed with the :func:`local_contrast` view of the network's input: of its first
    ``num_image_channels`` channels (None: all), the images; the channels after them (the previous stage's one-hot
    segmentation in nnU-Net's cascade) pass unchanged."""

    def __init__(self, stage: nn.Module, sigma: float, num_image_channels: Optional[int] = None):
        super().__init__()
        self.stage = stage
        self.sigma = sigma
        self.num_image_channels = num_image_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.num_image_channels
        if n is None or n == x.shape[1]:
            return self.stage(local_contrast(x, self.sigma))
        view = local_contrast(x[:, :n], self.sigma)
        return self.stage(torch.cat((view, x[:, n:].to(view.dtype)), dim=1))

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}" + ("" if self.num_image_channels is None else
                                        f", num_image_channels={self.num_image_channels}")
