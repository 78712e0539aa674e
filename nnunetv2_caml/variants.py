"""nnU-Net-style variants of ``nnUNetTrainerCAML``: each changes one thing, and its name is the experiment's name.

``nnUNetTrainerCAML_paper`` has the paper's loss exactly; the variants named after a loss change (``_lambdaS1``,
``_ceConsistency``, ...) start from it and record the way from the paper's loss to the default (README, gain
benchmark). The ablations (``_noCMA``, ``_noOCC``, ``_noPerturbedView``, ``_noLocalContrast``, ...) and the schedules
start from the default. ``nnUNetTrainer_strongIntensityAug`` and ``nnUNetTrainer_localContrast`` are stock nnU-Net,
labeled-only controls for the gain benchmark.
"""
import random

import numpy as np
import torch
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunetv2_caml.local_contrast import DEFAULT_SIGMA
from nnunetv2_caml.networks import with_local_contrast_input
from nnunetv2_caml.perturbed_views import strong_intensity_transforms
from nnunetv2_caml.trainer import nnUNetTrainerCAML


# ----------------------------------------------------------------------------- ablations of the default (paper, Table 3)
class nnUNetTrainerCAML_noCMA(nnUNetTrainerCAML):
    """No Cross-sample Mutual Attention in the auxiliary encoder."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_cma = False


class nnUNetTrainerCAML_noOCC(nnUNetTrainerCAML):
    """No Omni-Correlation Consistency loss (and no memory bank)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_occ = False


class nnUNetTrainerCAML_noCMA_noOCC(nnUNetTrainerCAML):
    """Mutual consistency only: two differently upsampling U-Nets, no CMA, no OCC."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_cma = False
        self.use_occ = False


class nnUNetTrainerCAML_noPerturbedView(nnUNetTrainerCAML):
    """Both networks see the same unlabeled patches, as in the paper (no ``perturbed_view``)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.perturbed_view = False


class nnUNetTrainerCAML_noLocalContrast(nnUNetTrainerCAML):
    """The auxiliary network sees nnU-Net's input, as in the paper (no local-contrast view): the default before it."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.auxiliary_local_contrast = None


# ----------------------------------------------------------------------------- a cheaper auxiliary network
class nnUNetTrainerCAML_pointwiseUpsampling(nnUNetTrainerCAML):
    """The auxiliary decoder's convolution after interpolation is 1x1x1 instead of the plans' 3x3x3: it costs what
    the main decoder's transposed convolution costs, so the two networks' FLOPs drop from about 4.9 x a stock step's
    to 4.0 x on real plans (README, step cost; its Dice on the gain benchmark equalled the default's before the
    local-contrast view)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.auxiliary_upsampling_kernel_size = 1


# ----------------------------------------------------------------------------- the paper's loss, and the way from it
class nnUNetTrainerCAML_paper(nnUNetTrainerCAML):
    """The paper's loss exactly: each network's supervised loss at weight 0.5, the mutual consistency as the MSE to
    the other network's sharpened prediction with gradients through that target (as the paper's code), both networks
    on nnU-Net's input and the same unlabeled patches. Everything else (CMA, OCC, ramp-up, nnU-Net's pipeline) as the
    default."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lambda_s = 0.5
        self.consistency_distance = "mse"
        self.detach_sharpened_targets = False
        self.perturbed_view = False
        self.auxiliary_local_contrast = None


class nnUNetTrainerCAML_detachTargets(nnUNetTrainerCAML_paper):
    """The paper's loss with stop-gradient on the sharpened targets."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.detach_sharpened_targets = True


class nnUNetTrainerCAML_lambdaS1(nnUNetTrainerCAML_paper):
    """The paper's loss with each network's supervised loss at full weight (``lambda_s = 1``, as stock nnU-Net
    trains it); paper: 0.5."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lambda_s = 1.0


class nnUNetTrainerCAML_lambdaS1_lambdaC10(nnUNetTrainerCAML_lambdaS1):
    """``_lambdaS1`` and a mutual consistency weight ``lambda_c = 10`` (paper: 1): the MSE ``L_c`` is about 0.02 under
    nnU-Net's Dice+CE, so at weight 1 it barely moves either network."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lambda_c = 10.0


class nnUNetTrainerCAML_ceConsistency(nnUNetTrainerCAML_paper):
    """The paper's loss with the mutual consistency as the cross-entropy of each network against the other's
    sharpened prediction, targets detached (soft pseudo-labels; paper: MSE with gradients through the targets). On
    the scale of nnU-Net's own CE, and its gradient does not vanish where a network is confidently wrong."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.consistency_distance = "ce"
        self.detach_sharpened_targets = True


class nnUNetTrainerCAML_lambdaS1_ceConsistency(nnUNetTrainerCAML_ceConsistency):
    """``lambda_s = 1`` and the cross-entropy mutual consistency of ``_ceConsistency``."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lambda_s = 1.0


class nnUNetTrainerCAML_lambdaS1_diceCEConsistency(nnUNetTrainerCAML_lambdaS1_ceConsistency):
    """``_lambdaS1_ceConsistency`` with nnU-Net's Dice + cross-entropy as the consistency distance: each network is
    trained on the other's sharpened prediction as nnU-Net trains on a label (soft Dice over the foreground plus CE).
    The same settings as ``_noPerturbedView``."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.consistency_distance = "dice_ce"


class nnUNetTrainerCAML_lambdaS1_diceCEConsistency_perturbedView(nnUNetTrainerCAML_lambdaS1_diceCEConsistency):
    """``_lambdaS1_diceCEConsistency`` with the perturbed view: the default's settings, reached from the paper's."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.perturbed_view = True


class nnUNetTrainerCAML_lambdaS1_ceConsistency_noCMA(nnUNetTrainerCAML_lambdaS1_ceConsistency):
    """``_lambdaS1_ceConsistency`` without Cross-sample Mutual Attention (its ablation)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_cma = False


class nnUNetTrainerCAML_lambdaS1_ceConsistency_noOCC(nnUNetTrainerCAML_lambdaS1_ceConsistency):
    """``_lambdaS1_ceConsistency`` without Omni-Correlation Consistency (its ablation)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_occ = False


# ----------------------------------------------------------------------------- ramp-up (paper: R per labeled count)
class nnUNetTrainerCAML_rampup40(nnUNetTrainerCAML):
    """Ramp-up over 40 % of training: the paper's setting for 4 labeled LA scans (R = 40 of 100 ramp steps)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.rampup_fraction = 0.4


class nnUNetTrainerCAML_rampup15(nnUNetTrainerCAML):
    """Ramp-up over 15 % of training: the paper's setting for 16 labeled LA scans (8 labeled: the default 0.2)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.rampup_fraction = 0.15


# ----------------------------------------------------------------------------- sharpening
class nnUNetTrainerCAML_noSharpening(nnUNetTrainerCAML):
    """Mutual consistency against the other network's unsharpened prediction (T = 1; default and paper: T = 0.1):
    soft targets where the other network is unsure. On the gain benchmark it scored 0.647 against the default's
    0.642 (mean of four seeds, one machine, before the local-contrast view; docs/gain_history.md), within what one
    run moves on its own."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.sharpen_temperature = 1.0


# ----------------------------------------------------------------------------- training length
class nnUNetTrainerCAML_1epoch(nnUNetTrainerCAML):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1


class nnUNetTrainerCAML_5epochs(nnUNetTrainerCAML):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class nnUNetTrainerCAML_50epochs(nnUNetTrainerCAML):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 50


class nnUNetTrainerCAML_100epochs(nnUNetTrainerCAML):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 100


class nnUNetTrainerCAML_250epochs(nnUNetTrainerCAML):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 250


class nnUNetTrainerCAML_500epochs(nnUNetTrainerCAML):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 500


class nnUNetTrainerCAML_tiny(nnUNetTrainerCAML):
    """A few seconds of training (2 epochs of 2 steps, 1 validation step): for tests of the pipeline, not results."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1


#: the seed of the demo's trainers (the gain benchmark's seed 0)
DEMO_SEED = 0


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch before a trainer builds anything: the gain benchmark seeds every run with it, the
    demo's trainers with ``DEMO_SEED``. With augmentation in the training process (``nnUNet_n_proc_DA=0``, the demo's
    setting on the CPU) a seeded run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _demo_schedule(trainer: nnUNetTrainer) -> None:
    """The schedule of ``nnUNetv2_caml_demo``: a few minutes on 2 CPU cores with the demo's small configuration."""
    trainer.num_epochs = 12
    trainer.num_iterations_per_epoch = 50
    trainer.num_val_iterations_per_epoch = 2


class nnUNetTrainerCAML_demo(nnUNetTrainerCAML):
    """CAML on the demo's schedule, seeded."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        seed_everything(DEMO_SEED)
        super().__init__(plans, configuration, fold, dataset_json, device)
        _demo_schedule(self)


class nnUNetTrainer_CAMLdemo(nnUNetTrainer):
    """Stock nnU-Net (labeled cases only) on the schedule of ``nnUNetTrainerCAML_demo``, seeded the same: the demo's
    baseline."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        seed_everything(DEMO_SEED)
        super().__init__(plans, configuration, fold, dataset_json, device)
        _demo_schedule(self)


# ----------------------------------------------------------------------------- labeled-only controls (stock nnU-Net)
class nnUNetTrainer_strongIntensityAug(nnUNetTrainer):
    """Stock nnU-Net on the labeled cases whose patches also get, with probability 0.5, the perturbation of
    ``perturbed_view`` (:func:`~nnunetv2_caml.perturbed_views.strong_intensity_transforms`) after nnU-Net's own
    augmentation: the labeled-only control that tells a gain from the perturbed view's unlabeled patches apart from
    one of the stronger intensity augmentation alone."""

    @staticmethod
    def get_training_transforms(*args, **kwargs):
        transforms = nnUNetTrainer.get_training_transforms(*args, **kwargs)
        return ComposeTransforms([transforms, RandomTransform(strong_intensity_transforms(), apply_probability=0.5)])


class nnUNetTrainer_localContrast(nnUNetTrainer):
    """Stock nnU-Net on the labeled cases whose network sees the local-contrast view
    (:func:`~nnunetv2_caml.local_contrast.local_contrast`, ``DEFAULT_SIGMA``) that CAML's auxiliary network sees by
    default, in training and in ``nnUNetv2_predict``: the labeled-only control that tells a gain of the unlabeled
    images apart from one of the view alone."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return with_local_contrast_input(nnUNetTrainer.build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision),
            DEFAULT_SIGMA)
