"""Perturbed views of the unlabeled patches: weak-to-strong mutual consistency (an addition to CAML, on by default).

In CAML both networks see the same unlabeled patch, so after nnU-Net's augmentation they can agree simply by
making the same mistakes. With ``perturbed_view`` on, the main network sees a photometrically perturbed copy of each
unlabeled patch (the *strong* view) while the auxiliary network sees nnU-Net's usual one (the *weak* view); the
mutual consistency loss then asks the main network to predict on the strong view what the auxiliary network predicts
on the weak one (the weak-to-strong consistency of FixMatch and UniMatch), and the other way round.

The perturbation is nnU-Net's own intensity augmentation (:func:`strong_intensity_transforms`), every transform
applied to every unlabeled patch instead of to a few, with wider ranges. It changes no voxel's position, so the two
views' predictions compare voxel by voxel. :class:`UnlabeledDataLoaderWithPerturbedView` makes the strong view in the
augmentation workers, next to nnU-Net's view, as ``batch["data_perturbed"]``.
"""
from typing import Optional

import torch
from batchgeneratorsv2.helpers.scalar_type import RandomScalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


def strong_intensity_transforms(contrast: RandomScalar = (0.5, 1.5), gamma: RandomScalar = (0.5, 2.0),
                                noise_variance: RandomScalar = (0.0, 0.1)) -> ComposeTransforms:
    """nnU-Net's intensity augmentations (``nnUNetTrainer.get_training_transforms``), each on every patch (blur on
    half of them), with wider ranges: brightness and contrast ``contrast``, gamma ``gamma`` on the image or on its
    inverse with equal odds, Gaussian noise of variance ``noise_variance``."""
    return ComposeTransforms([
        MultiplicativeBrightnessTransform(multiplier_range=BGContrast(contrast), synchronize_channels=False,
                                          p_per_channel=1),
        ContrastTransform(contrast_range=BGContrast(contrast), preserve_range=True, synchronize_channels=False,
                          p_per_channel=1),
        GammaTransform(gamma=BGContrast(gamma), p_invert_image=0.5, synchronize_channels=False, p_per_channel=1,
                       p_retain_stats=1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=1, benchmark=False),
                        apply_probability=0.5),
        GaussianNoiseTransform(noise_variance=noise_variance, p_per_channel=1, synchronize_channels=True),
    ])


class UnlabeledDataLoaderWithPerturbedView(nnUNetDataLoader):
    """nnU-Net's data loader for unlabeled patches that also returns, as ``"data_perturbed"``, each patch after
    ``perturbation`` (applied to a copy of nnU-Net's augmented patch, so both views share every voxel's position).
    Only the first ``num_image_channels`` channels (None: all) are perturbed: in nnU-Net's cascade the previous stage's
    one-hot segmentation follows the images and stays as it is."""

    def __init__(self, *args, perturbation: BasicTransform = None, num_image_channels: Optional[int] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.perturbation = perturbation if perturbation is not None else strong_intensity_transforms()
        self.num_image_channels = num_image_channels

    def generate_train_batch(self):
        batch = super().generate_train_batch()
        n = self.num_image_channels
        with torch.no_grad():
            perturbed = batch["data"].clone()
            for patch in perturbed:
                patch[:n] = self.perturbation(image=patch[:n])["image"]
            batch["data_perturbed"] = perturbed
        return batch
