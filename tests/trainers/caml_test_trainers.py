"""Trainers used only by the tests: the package's CAML trainer with a test-sized schedule.

The tests put this folder on ``nnUNet_extTrainer`` beside the repository's ``trainers/`` folder, so nnU-Net's own
trainer search finds these classes. Nothing here changes how CAML trains.
"""
import os

import torch

from nnunetv2_caml.trainer import nnUNetTrainerCAML
from nnunetv2_caml.variants import nnUNetTrainerCAML_lambdaS1_ceConsistency


class nnUNetTrainerCAML_killTest(nnUNetTrainerCAML):
    """Checkpoints every epoch, so that kills land between and inside saves."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 30
        self.num_iterations_per_epoch = 1
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1


class nnUNetTrainerCAML_nanTest(nnUNetTrainerCAML):
    """16 steps, and more skipped steps in a row tolerated than there are steps."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 8
        self.num_val_iterations_per_epoch = 1
        self.max_consecutive_nonfinite_steps = 20


class nnUNetTrainerCAML_nanStopTest(nnUNetTrainerCAML):
    """More steps than the default number of skipped steps in a row that stops a run."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 3
        self.num_iterations_per_epoch = 6
        self.num_val_iterations_per_epoch = 1


class nnUNetTrainerCAML_ceTest(nnUNetTrainerCAML_lambdaS1_ceConsistency):
    """The cross-entropy consistency variant on a 2 x 4-step schedule."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 4
        self.num_val_iterations_per_epoch = 1
        self.rampup_fraction = 0.0  # consistency at full weight from the first step


class nnUNetTrainerCAML_compileOnCPU(nnUNetTrainerCAML):
    """Compiles as nnU-Net does on CUDA (``nnUNet_compile`` unset or true), on the CPU as well, where nnU-Net never
    compiles: lets ``benchmarks/compile_check.py`` check dynamo's capture of both networks without a GPU."""

    def _do_i_compile(self):
        return os.environ.get("nnUNet_compile", "t").lower() in ("true", "1", "t")
