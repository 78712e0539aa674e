"""The perturbed (strong) view of the unlabeled patches (``nnunetv2_caml.perturbed_views``)."""
import numpy as np
import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunetv2_caml.perturbed_views import UnlabeledDataLoaderWithPerturbedView, strong_intensity_transforms
from nnunetv2_caml.unlabeled import unlabeled_case_identifiers


def _blocks_image() -> torch.Tensor:
    """``[1, 16, 16, 16]``: a dark background with two bright blocks, z-scored like nnU-Net's data."""
    image = torch.zeros(1, 16, 16, 16)
    image[:, 2:6, 2:6, 2:6] = 3.0
    image[:, 9:14, 8:12, 10:15] = 2.0
    return (image - image.mean()) / image.std()


def test_strong_view_changes_intensities_and_keeps_positions():
    torch.manual_seed(0)
    image = _blocks_image()
    inside = image[0] > 0
    for _ in range(20):
        perturbed = strong_intensity_transforms()(image=image.clone())["image"]
        assert perturbed.shape == image.shape and torch.isfinite(perturbed).all()
        assert (perturbed - image).abs().mean() > 1e-3  # every patch is perturbed
        # no voxel moves: gamma, brightness and contrast are per-voxel maps that keep the order of intensities
        # (a gamma on the inverted image too), blur and noise are small, so the blocks stay where they were
        separation = perturbed[0][inside].mean() - perturbed[0][~inside].mean()
        assert separation > 0.5 * perturbed.std()


def test_strong_view_draws_new_parameters_for_every_patch():
    torch.manual_seed(0)
    image = _blocks_image()
    transforms = strong_intensity_transforms()
    views = [transforms(image=image.clone())["image"] for _ in range(4)]
    assert all((views[0] - v).abs().mean() > 1e-3 for v in views[1:])


def test_loader_returns_nnunet_view_and_perturbed_view_of_the_same_patches(caml_dataset):
    folder = caml_dataset["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled"
    dataset = infer_dataset_class(str(folder))(str(folder), unlabeled_case_identifiers(str(folder)))
    label_manager = LabelManager({"background": 0, "left_atrium": 1}, regions_class_order=None)
    torch.manual_seed(0)
    np.random.seed(0)
    loader = UnlabeledDataLoaderWithPerturbedView(dataset, 2, (16, 20, 20), (16, 20, 20), label_manager,
                                                  oversample_foreground_percent=0.0)
    batch = next(loader)
    data, perturbed = batch["data"], batch["data_perturbed"]
    assert perturbed.shape == data.shape == (2, 1, 16, 20, 20)
    for weak, strong in zip(data, perturbed):
        assert (weak - strong).abs().mean() > 1e-3
        # the same crop, differently lit: voxel intensities stay strongly correlated
        assert np.corrcoef(weak.flatten().numpy(), strong.flatten().numpy())[0, 1] > 0.7


def test_cascade_perturbs_only_the_images_not_the_previous_stage_channels(caml_dataset):
    """In nnU-Net's cascade the previous stage's one-hot segmentation follows the images in ``data``: the strong view
    perturbs the images and keeps those channels as they are."""
    folder = caml_dataset["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled"
    dataset = infer_dataset_class(str(folder))(str(folder), unlabeled_case_identifiers(str(folder)))
    label_manager = LabelManager({"background": 0, "left_atrium": 1}, regions_class_order=None)
    def one_hot(image, segmentation):  # as nnU-Net's cascade augmentation ends: an image, then a one-hot channel
        return {"image": torch.cat((image, (image > 0).float())), "segmentation": segmentation}

    torch.manual_seed(0)
    np.random.seed(0)
    loader = UnlabeledDataLoaderWithPerturbedView(dataset, 2, (16, 20, 20), (16, 20, 20), label_manager,
                                                  oversample_foreground_percent=0.0, transforms=one_hot,
                                                  num_image_channels=1)
    batch = next(loader)
    data, perturbed = batch["data"], batch["data_perturbed"]
    assert perturbed.shape == data.shape == (2, 2, 16, 20, 20)
    assert torch.equal(perturbed[:, 1], data[:, 1])
    assert all((weak - strong).abs().mean() > 1e-3 for weak, strong in zip(data[:, 0], perturbed[:, 0]))
