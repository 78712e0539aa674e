"""The auxiliary network's local-contrast view: what it keeps, what it drops, and where it sits in each network."""
import pytest
import torch

from nnunetv2_caml.local_contrast import LocalContrastInput, gaussian_blur, gaussian_kernel_1d, local_contrast
from nnunetv2_caml.networks import build_auxiliary_network
from nnunetv2_caml.variants import nnUNetTrainer_localContrast
from test_networks import configuration


@pytest.mark.parametrize("dim", [3, 2])
def test_blur_keeps_constant_images_and_smooths_noise(dim):
    constant = torch.full((1, 2) + (12,) * dim, 4.0)
    assert torch.allclose(gaussian_blur(constant, gaussian_kernel_1d(2.0)), constant)
    x = torch.randn((2, 1) + (16,) * dim)
    blurred = gaussian_blur(x, gaussian_kernel_1d(1.5))
    assert blurred.shape == x.shape and blurred.std() < 0.5 * x.std()


def test_view_drops_offset_scale_and_slow_shading_but_keeps_local_structure():
    torch.manual_seed(0)
    image = torch.randn(1, 1, 24, 24, 24)
    image[..., 10:13, 10:13, :] += 6  # a bright tube
    view = local_contrast(image, 3.0, eps=1e-6)
    assert torch.allclose(local_contrast(image + 250.0, 3.0, eps=1e-6), view, atol=1e-3)
    assert torch.allclose(local_contrast(7.0 * image, 3.0, eps=1e-6), view, atol=1e-3)
    # a slow intensity ramp (shading) barely changes it; the tube stays brighter than its surroundings
    ramp = torch.linspace(0, 3, 24).view(1, 1, 24, 1, 1).expand_as(image)
    assert (local_contrast(image + ramp, 3.0, eps=1e-6) - view).abs().mean() < 0.1 * ramp.mean()
    assert view[..., 10:13, 10:13, :].mean() > 1 > view[..., :6, :6, :].abs().mean()


def test_view_is_computed_in_float32_under_autocast():
    image = 100 + torch.randn(1, 1, 16, 16, 16)  # float16 would cancel the variance of such values away
    with torch.autocast("cpu", dtype=torch.bfloat16):
        view = local_contrast(image.bfloat16(), 3.0)
    assert view.dtype == torch.float32 and view.std() > 0.5
    # on the meta device, where benchmarks/step_time.py counts FLOPs, there is no autocast to turn off
    assert local_contrast(torch.empty(2, 1, 8, 8, 8, device="meta"), 3.0).shape == (2, 1, 8, 8, 8)


@pytest.mark.parametrize("dim,residual", [(3, False), (2, False), (3, True)])
def test_auxiliary_network_sees_the_view_and_the_main_network_does_not(dim, residual):
    torch.manual_seed(0)
    config = configuration(dim, residual)
    auxiliary = build_auxiliary_network(config, 1, 2, use_cma=False, local_contrast_sigma=3.0).eval()
    plain = build_auxiliary_network(config, 1, 2, use_cma=False).eval()
    first = auxiliary.encoder.stem if residual else auxiliary.encoder.stages[0]
    assert isinstance(first, LocalContrastInput) and first.sigma == 3.0
    assert not any(isinstance(m, LocalContrastInput) for m in plain.modules())
    x = torch.randn((2, 1) + (16,) * dim)
    with torch.no_grad():  # an intensity offset reaches the plain network, not the one with the view
        assert torch.allclose(auxiliary(x)[0], auxiliary(x + 50)[0], atol=1e-4)
        assert not torch.allclose(plain(x)[0], plain(x + 50)[0], atol=1e-2)


def test_labeled_only_control_predicts_through_the_view():
    """``nnUNetTrainer_localContrast`` builds the view into the network nnUNetv2_predict builds from it too."""
    network = nnUNetTrainer_localContrast.build_network_architecture(None, configuration(3), 1, 2, False).eval()
    assert isinstance(network.encoder.stages[0], LocalContrastInput)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(network(x), network(x + 50), atol=1e-4)


def test_cascade_view_changes_the_images_and_passes_the_previous_stage_channels_unchanged():
    """In nnU-Net's cascade the previous stage's one-hot segmentation follows the images: only the images get the
    view."""
    torch.manual_seed(0)
    seen = []
    stage = LocalContrastInput(torch.nn.Identity(), 3.0, num_image_channels=2)
    stage.stage.register_forward_hook(lambda module, args, output: seen.append(output))
    images = 100 + 5 * torch.randn(2, 2, 12, 12, 12)
    one_hot = (torch.rand(2, 1, 12, 12, 12) > 0.5).float()
    stage(torch.cat((images, one_hot), dim=1))
    assert torch.equal(seen[0][:, 2:], one_hot)
    assert torch.allclose(seen[0][:, :2], local_contrast(images, 3.0))
    network = build_auxiliary_network(configuration(3), 3, 2, use_cma=False, local_contrast_sigma=3.0,
                                      num_image_channels=2)
    assert network.encoder.stages[0].num_image_channels == 2
