"""The auxiliary network built from nnU-Net plans, and the decoder feature tap, for 2D and 3D, plain and residual."""
import re

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunetv2_caml.cma import CrossSampleMutualAttention
from nnunetv2_caml.networks import (DecoderFeatures, EncoderStageWithCMA, InterpolationUpsampling,
                                    build_auxiliary_network, copy_plans_unet_weights, feature_channels)


def configuration(dim: int, residual: bool = False) -> ConfigurationManager:
    conv, norm = ("Conv3d", "InstanceNorm3d") if dim == 3 else ("Conv2d", "InstanceNorm2d")
    kwargs = {"n_stages": 4, "features_per_stage": [8, 16, 32, 64], "conv_op": f"torch.nn.modules.conv.{conv}",
              "kernel_sizes": [[3] * dim] * 4, "strides": [[1] * dim] + [[2] * dim] * 3,
              "n_conv_per_stage_decoder": [1, 1, 1], "conv_bias": True,
              "norm_op": f"torch.nn.modules.instancenorm.{norm}", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
              "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
              "nonlin_kwargs": {"inplace": True}}
    if residual:
        kwargs["n_blocks_per_stage"] = [1, 1, 1, 1]
        name = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    else:
        kwargs["n_conv_per_stage"] = [1, 1, 1, 1]
        name = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    return ConfigurationManager({
        "data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [16] * dim, "spacing": [1.0] * dim, "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False], "batch_dice": False,
        "architecture": {"network_class_name": name, "arch_kwargs": kwargs,
                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}})


@pytest.mark.parametrize("dim,residual", [(3, False), (2, False), (3, True)])
def test_auxiliary_network_has_cma_and_interpolation_and_matches_shapes(dim, residual):
    torch.manual_seed(0)
    config = configuration(dim, residual)
    auxiliary = build_auxiliary_network(config, 1, 3)
    main = nnUNetTrainer.build_network_architecture(None, config, 1, 3, True)
    # CMA sits on the stage above the bottleneck; every transposed convolution became interpolation upsampling
    assert isinstance(auxiliary.encoder.stages[2], EncoderStageWithCMA)
    assert isinstance(auxiliary.encoder.stages[2].cma, CrossSampleMutualAttention)
    assert sum(isinstance(m, CrossSampleMutualAttention) for m in auxiliary.modules()) == 1
    assert all(isinstance(t, InterpolationUpsampling) for t in auxiliary.decoder.transpconvs)
    assert not any(isinstance(m, (torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)) for m in auxiliary.modules())
    assert type(auxiliary) is type(main)

    x = torch.randn(4, 1, *[16] * dim)
    tap_main, tap_aux = DecoderFeatures(main), DecoderFeatures(auxiliary)
    out_main, out_aux = main(x), auxiliary(x)
    assert [o.shape for o in out_main] == [o.shape for o in out_aux]  # same deep supervision outputs
    assert out_aux[0].shape == (4, 3, *[16] * dim)
    features = tap_aux.pop()
    assert features.shape == (4, feature_channels(auxiliary), *[16] * dim) == tap_main.pop().shape
    # the tap gives exactly what the segmentation head sees
    assert torch.allclose(auxiliary.decoder.seg_layers[-1](features), out_aux[0])
    with pytest.raises(RuntimeError):
        tap_aux.pop()  # features of one forward are taken once


def test_cma_stage_is_configurable_and_checked():
    config = configuration(3)
    network = build_auxiliary_network(config, 1, 2, cma_stage=1)
    assert isinstance(network.encoder.stages[1], EncoderStageWithCMA)
    assert not isinstance(network.encoder.stages[2], EncoderStageWithCMA)
    assert not any(isinstance(m, CrossSampleMutualAttention)
                   for m in build_auxiliary_network(config, 1, 2, use_cma=False).modules())
    with pytest.raises(ValueError, match="cma_stage"):
        build_auxiliary_network(config, 1, 2, cma_stage=7)


def test_cma_makes_training_outputs_depend_on_other_samples_but_not_in_eval():
    torch.manual_seed(0)
    network = build_auxiliary_network(configuration(3), 1, 2)
    x = torch.randn(2, 1, 16, 16, 16)
    y = x.clone()
    y[1] += torch.randn_like(y[1])  # only the second sample changes
    for module in network.modules():  # deterministic training-mode forward
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    network.train()
    assert not torch.allclose(network(x)[0][0], network(y)[0][0])  # sample 0 sees sample 1 through CMA
    network.eval()
    assert torch.allclose(network(x)[0][0], network(y)[0][0])


def test_non_unet_architecture_is_refused_with_a_clear_message():
    config = configuration(3)
    config.configuration["architecture"]["network_class_name"] = \
        "dynamic_network_architectures.architectures.unet.ResidualUNet"
    config.configuration["architecture"]["arch_kwargs"]["n_blocks_per_stage"] = [1, 1, 1, 1]
    config.configuration["architecture"]["arch_kwargs"]["n_conv_per_stage_decoder"] = [1, 1, 1]
    del config.configuration["architecture"]["arch_kwargs"]["n_conv_per_stage"]
    with pytest.raises(ValueError, match="UNetDecoder"):
        build_auxiliary_network(config, 1, 2)


@pytest.mark.parametrize("dim", [3, 2])
def test_pointwise_upsampling_costs_what_transposed_convolutions_cost(dim):
    from torch.utils.flop_counter import FlopCounterMode

    def flops(network):
        with FlopCounterMode(display=False) as counter:
            sum(o.sum() for o in network(torch.randn(2, 1, *[16] * dim))).backward()
        return counter.get_total_flops()

    config = configuration(dim)
    main = nnUNetTrainer.build_network_architecture(None, config, 1, 3, True)
    paper = build_auxiliary_network(config, 1, 3, use_cma=False)
    pointwise = build_auxiliary_network(config, 1, 3, use_cma=False, upsampling_kernel_size=1)
    assert all(t.conv.conv.kernel_size == (1,) * dim for t in pointwise.decoder.transpconvs)
    assert all(t.conv.conv.kernel_size == (3,) * dim for t in paper.decoder.transpconvs)
    assert [o.shape for o in pointwise(torch.randn(2, 1, *[16] * dim))] == \
        [o.shape for o in main(torch.randn(2, 1, *[16] * dim))]
    # a 1x1 convolution after interpolation has the multiply-adds of the 2x2 transposed convolution it replaces
    assert flops(pointwise) == flops(main) < flops(paper)


@pytest.mark.parametrize("residual", [False, True])
def test_plans_unet_weights_reach_the_auxiliary_network_through_its_wrappers(residual):
    torch.manual_seed(0)
    config = configuration(3, residual)
    # CMA on the first stage, inside the local-contrast view's wrapper (of the stem where there is one): nested
    auxiliary = build_auxiliary_network(config, 1, 3, cma_stage=0, local_contrast_sigma=2.0)
    main = nnUNetTrainer.build_network_architecture(None, config, 1, 3, True)
    before = {k: v.clone() for k, v in auxiliary.state_dict().items()}
    copied = set(copy_plans_unet_weights(main, auxiliary))
    source, after = main.state_dict(), auxiliary.state_dict()
    assert copied == {k for k in after if not any(s in k for s in (".seg_layers.", ".cma.", ".transpconvs."))}
    for key, tensor in after.items():
        if key in copied:
            assert torch.equal(tensor, source[re.sub(r"\.stage(?=\.)", "", key)]), key
        else:
            assert torch.equal(tensor, before[key]), key
    assert any(k.startswith("encoder.stem.stage." if residual else "encoder.stages.0.stage.stage.") for k in copied)
