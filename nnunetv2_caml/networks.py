"""CAML's two networks, built from nnU-Net's plans.

* The **main** network is exactly what the plans describe (``nnUNetTrainer.build_network_architecture``); it is the
  only network saved as ``network_weights`` and used by ``nnUNetv2_predict``.
* The **auxiliary** network is the same U-Net family built from the same plans, changed in two places so that the
  two models disagree in useful ways: a :class:`~nnunetv2_caml.cma.CrossSampleMutualAttention` block on the output of
  one encoder stage (default: the stage just above the bottleneck), and interpolation upsampling
  (:class:`InterpolationUpsampling`) instead of transposed convolutions in the decoder; by default it also sees its
  input through :func:`~nnunetv2_caml.local_contrast.local_contrast` (:class:`LocalContrastInput`).

:class:`DecoderFeatures` reads, for either network, the feature map that feeds the segmentation head (the output of
the last decoder stage, full resolution): the voxel embeddings used by OCC.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nnunetv2_caml.cma import CrossSampleMutualAttention
from nnunetv2_caml.local_contrast import LocalContrastInput


def _require_unet(network: nn.Module, architecture_name: str) -> None:
    if not (isinstance(getattr(network, "decoder", None), UNetDecoder) and hasattr(network.encoder, "stages")):
        raise ValueError(f"CAML needs a U-Net with nnU-Net's UNetDecoder (PlainConvUNet, ResidualEncoderUNet); the "
                         f"plans ask for {architecture_name}. Use a U-Net configuration or nnU-Net ResEnc plans.")


class InterpolationUpsampling(nn.Module):
    """The auxiliary decoder's upsampling: (bi/tri)linear interpolation by the stage's stride, then conv-norm-nonlin.

    Replaces the transposed convolution of nnU-Net's decoder; same input and output shapes.
    """

    def __init__(self, encoder: nn.Module, input_channels: int, output_channels: int, scale_factor: Sequence[int],
                 kernel_size: Sequence[int]):
        super().__init__()
        self.scale_factor = tuple(float(s) for s in scale_factor)
        self.mode = "trilinear" if len(self.scale_factor) == 3 else "bilinear"
        self.conv = ConvDropoutNormReLU(encoder.conv_op, input_channels, output_channels, kernel_size, 1,
                                        encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs, None, None,
                                        encoder.nonlin, encoder.nonlin_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, align_corners=False))


class EncoderStageWithCMA(nn.Module):
    """An encoder stage followed by CMA: CMA acts on the stage's output (the skip and the next stage's input)."""

    def __init__(self, stage: nn.Module, cma: CrossSampleMutualAttention):
        super().__init__()
        self.stage = stage
        self.cma = cma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cma(self.stage(x))


def build_plans_unet(configuration_manager: ConfigurationManager, num_input_channels: int,
                       num_output_channels: int, deep_supervision: bool = True) -> nn.Module:
    """The plans' own network (what nnU-Net builds for training and inference)."""
    network = get_network_from_plans(configuration_manager.network_arch_class_name,
                                     configuration_manager.network_arch_init_kwargs,
                                     configuration_manager.network_arch_init_kwargs_req_import,
                                     num_input_channels, num_output_channels, allow_init=True,
                                     deep_supervision=deep_supervision)
    _require_unet(network, configuration_manager.network_arch_class_name)
    return network


def build_auxiliary_network(configuration_manager: ConfigurationManager, num_input_channels: int,
                            num_output_channels: int, use_cma: bool = True, cma_stage: int = -2,
                            cma_num_heads: int = 4, upsampling_kernel_size: Optional[int] = None,
                            local_contrast_sigma: Optional[float] = None,
                            num_image_channels: Optional[int] = None) -> nn.Module:
    """The auxiliary network: the plans' U-Net with CMA in the encoder and interpolation upsampling in the decoder.

    ``cma_stage`` indexes the encoder stages (negative counts from the bottleneck: -2 is the stage just above it).
    ``upsampling_kernel_size`` is the kernel of the convolution after each interpolation: None takes the plans' kernel
    of the stage it feeds (3x3x3, like the paper's upsampling block); 1 costs what the transposed convolution costs.
    ``local_contrast_sigma`` (voxels), unless None, feeds the encoder the local-contrast view of the input
    (:func:`with_local_contrast_input`) of its first ``num_image_channels`` channels (None: all; in nnU-Net's cascade
    the previous stage's segmentation follows the images).
    Deep supervision is always on: the auxiliary network is only used for training.
    """
    network = build_plans_unet(configuration_manager, num_input_channels, num_output_channels, True)
    encoder, decoder = network.encoder, network.decoder
    new_modules = []
    for s in range(len(decoder.transpconvs)):
        upsampling = InterpolationUpsampling(encoder, encoder.output_channels[-(s + 1)],
                                             encoder.output_channels[-(s + 2)], encoder.strides[-(s + 1)],
                                             encoder.kernel_sizes[-(s + 2)] if upsampling_kernel_size is None
                                             else [upsampling_kernel_size] * len(encoder.strides[0]))
        decoder.transpconvs[s] = upsampling
        new_modules.append(upsampling)
    if use_cma:
        n_stages = len(encoder.stages)
        if not -n_stages <= cma_stage < n_stages:
            raise ValueError(f"cma_stage={cma_stage} does not exist: the encoder has {n_stages} stages")
        stage = cma_stage % n_stages
        encoder.stages[stage] = EncoderStageWithCMA(encoder.stages[stage],
                                                    CrossSampleMutualAttention(encoder.output_channels[stage],
                                                                               cma_num_heads))
    if local_contrast_sigma is not None:
        with_local_contrast_input(network, local_contrast_sigma, num_image_channels)
    for module in new_modules:
        module.apply(InitWeights_He(1e-2))
    return network


def with_local_contrast_input(network: nn.Module, sigma: float, num_image_channels: Optional[int] = None) -> nn.Module:
    """``network`` (a U-Net) changed in place to see the local-contrast view of its input (of its first
    ``num_image_channels`` channels; None: all): :class:`LocalContrastInput` around the encoder's first module (the
    stem where it has one, else the first stage)."""
    encoder = network.encoder
    if getattr(encoder, "stem", None) is not None:
        encoder.stem = LocalContrastInput(encoder.stem, sigma, num_image_channels)
    else:
        encoder.stages[0] = LocalContrastInput(encoder.stages[0], sigma, num_image_channels)
    return network


def copy_plans_unet_weights(plans_unet: nn.Module, auxiliary: nn.Module) -> List[str]:
    """Copy the plans' U-Net's weights into the auxiliary network wherever the two share a module: the encoder (stem,
    stages) and the decoder's stages, seen through CMA's and the local-contrast view's wrappers. The segmentation
    layers are not copied (nnU-Net's rule for pretrained weights), nor what only the auxiliary network has (CMA, the
    interpolation upsampling). Returns the auxiliary network's ``state_dict`` keys that were copied."""
    # a wrapper at `name` holds the plans' module as `name.stage`; innermost (longest name) first, for nested ones
    wrappers = sorted((name for name, module in auxiliary.named_modules(remove_duplicate=False)
                       if isinstance(module, (EncoderStageWithCMA, LocalContrastInput))), key=len, reverse=True)
    source, target = plans_unet.state_dict(), auxiliary.state_dict()
    copied = {}
    for key, tensor in target.items():
        plans_key = key
        for name in wrappers:
            if plans_key.startswith(name + ".stage."):
                plans_key = name + plans_key[len(name) + len(".stage"):]
        if ".seg_layers." not in key and plans_key in source and source[plans_key].shape == tensor.shape:
            copied[key] = source[plans_key]
    auxiliary.load_state_dict({**target, **copied})
    return list(copied)


class DecoderFeatures:
    """Keeps the output of a U-Net's last decoder stage from its latest forward pass (via a forward hook).

    That output is the feature map the segmentation head turns into logits, so the network itself stays the stock
    nnU-Net module (its ``state_dict`` is unchanged and loads in ``nnUNetv2_predict``).
    """

    def __init__(self, network: nn.Module):
        self.latest: Optional[torch.Tensor] = None
        self._handle = network.decoder.stages[-1].register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.latest = output

    def pop(self) -> torch.Tensor:
        """The features of the latest forward pass; each forward's features can be taken once."""
        if self.latest is None:
            raise RuntimeError("no decoder features were recorded: run the network's forward pass first")
        features, self.latest = self.latest, None
        return features


def unwrapped(network: nn.Module) -> nn.Module:
    """The module itself behind DistributedDataParallel's and ``torch.compile``'s wrappers (whose ``state_dict`` keys
    carry ``module.`` and ``_orig_mod.``), as nnU-Net unwraps its network for checkpoints."""
    if isinstance(network, DistributedDataParallel):
        network = network.module
    return getattr(network, "_orig_mod", network)


def feature_channels(network: nn.Module) -> int:
    """Channels of the feature map that feeds the segmentation head."""
    return network.encoder.output_channels[0]
