"""Trainers used only by the tests: the package's CAML trainer with a test-sized schedule.

The tests put this folder on ``nnUNet_extTrainer`` beside the repository's ``trainers/`` folder, so nnU-Net's own
trainer search finds these classes. Nothing here changes how CAML trains; ``nnUNetTrainerCAML_ddpOnCPU`` changes how
nnU-Net places it (on the CPU under a process group, see there), ``nnUNetTrainerCAML_smallGPU`` how much GPU memory it
may use. Trainers whose tests check training, not nnU-Net's final validation, skip that validation
(``_NoFinalValidation``).
"""
import os

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2_caml.trainer import nnUNetTrainerCAML
from nnunetv2_caml.variants import (nnUNetTrainerCAML_demo, nnUNetTrainerCAML_lambdaS1_ceConsistency,
                                    nnUNetTrainerCAML_paper, nnUNetTrainerCAML_tiny)


class _NoFinalValidation:
    """Skips nnU-Net's final validation, which ``nnUNetv2_train`` runs after training: on the tiny dataset it takes
    about 10 s (predicting and exporting the 4 labeled cases), half of a short test run. The tests of these trainers
    check training; the final validation of a CAML run is checked in ``tests/test_training_integration.py`` and
    ``tests/test_crash_safety.py``."""

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("final validation skipped (test trainer)")


class nnUNetTrainerCAML_killTest(nnUNetTrainerCAML):
    """Checkpoints every epoch, so that kills land between and inside saves."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 14  # KILL_EPOCHS of tests/test_crash_safety.py
        self.num_iterations_per_epoch = 1
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1


class nnUNetTrainerCAML_tinyNoValidation(_NoFinalValidation, nnUNetTrainerCAML_tiny):
    """The package's tiny schedule (2 epochs of 2 steps) without the final validation."""


class nnUNetTrainerCAML_nanTest(_NoFinalValidation, nnUNetTrainerCAML):
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


def _consistency_test_schedule(trainer: nnUNetTrainerCAML) -> None:
    """One epoch of 3 steps with the consistency at full weight from the first step (ramp-up 0)."""
    trainer.num_epochs = 1
    trainer.num_iterations_per_epoch = 3
    trainer.num_val_iterations_per_epoch = 1
    trainer.rampup_fraction = 0.0


class nnUNetTrainerCAML_ceTest(_NoFinalValidation, nnUNetTrainerCAML_lambdaS1_ceConsistency):
    """The cross-entropy consistency variant on the consistency tests' schedule."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _consistency_test_schedule(self)


class nnUNetTrainerCAML_demoTest(_NoFinalValidation, nnUNetTrainerCAML_demo):
    """The demo's trainer (the default CAML: Dice + CE consistency, perturbed view, local-contrast view; seeded) on
    the consistency tests' schedule."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _consistency_test_schedule(self)


class nnUNetTrainerCAML_paperTest(_NoFinalValidation, nnUNetTrainerCAML_paper):
    """The paper's loss on the consistency tests' schedule."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _consistency_test_schedule(self)


class nnUNetTrainerCAML_lr0Test(_NoFinalValidation, nnUNetTrainerCAML):
    """One step at learning rate 0: its checkpoint_final holds the weights training starts from (nnU-Net cannot run
    zero epochs: its poly schedule divides by their number)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 0.0
        self.num_epochs = 1
        self.num_iterations_per_epoch = 1
        self.num_val_iterations_per_epoch = 1


class nnUNetTrainerCAML_compileOnCPU(nnUNetTrainerCAML):
    """Compiles as nnU-Net does on CUDA (``nnUNet_compile`` unset or true), on the CPU as well, where nnU-Net never
    compiles: lets ``benchmarks/compile_check.py`` check dynamo's capture of both networks without a GPU."""

    def _do_i_compile(self):
        return os.environ.get("nnUNet_compile", "t").lower() in ("true", "1", "t")


class nnUNetTrainerCAML_smallGPU(_NoFinalValidation, nnUNetTrainerCAML):
    """CUDA only: once the networks and the optimizer are on the GPU, PyTorch's allocator may take 16 MiB more
    (``torch.cuda.set_per_process_memory_fraction``), far less than a CAML step needs (on the tests' 32x40x40 plans its
    tensors saved for the backward pass alone are 281 MiB in float32): a GPU too small for these plans, so that the
    first step runs out of memory for real. Should it not, the run ends after 2 steps."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1

    def on_train_start(self):
        super().on_train_start()
        total = torch.cuda.get_device_properties(self.device).total_memory
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(self.device) + 16 * 2 ** 20) / total,
                                                   self.device)


class nnUNetTrainerCAML_envEpochs(nnUNetTrainerCAML):
    """``CAML_TEST_EPOCHS`` epochs (default 1) of 3 steps, so that runs of different world sizes can resume and extend
    one output folder (``tests/test_ddp.py``, ``benchmarks/ddp_check.sh``)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("CAML_TEST_EPOCHS", "1"))
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 1


class nnUNetTrainerCAML_ddpOnCPU(nnUNetTrainerCAML_envEpochs):
    """nnU-Net's multi-GPU (DDP) training of CAML on the CPU, for ``tests/ddp_on_cpu.py`` (gloo backend).

    nnU-Net's DDP path is CUDA-only in two places, and only those are undone here: ``__init__`` moves a trainer inside
    a process group to ``cuda:<rank>`` (with a CUDA GradScaler), and ``initialize`` wraps the main network as
    ``DDP(network, device_ids=[rank])``, which only CUDA modules accept. Here the trainer stays on the CPU, and
    ``initialize`` runs nnU-Net's and CAML's set-up with nnU-Net's DDP switch off, then does what that switch does in
    nnU-Net's ``initialize``: the per-rank batch split, SyncBatchNorm conversion and DDP wrap of the main network
    (without ``device_ids``) and the DDP loss. So CAML's own set-up sees an unwrapped main network (on CUDA it sees the
    DDP wrapper) and does not convert the auxiliary network's BatchNorm (these plans have none; SyncBatchNorm is
    CUDA-only). Each step records the labeled cases it drew and its outputs for the test. Outside a process group
    nnU-Net's final validation is skipped: ``tests/test_training_integration.py`` covers it, and here it would double
    the test's time; under DDP it runs.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.device = torch.device("cpu")
        self.grad_scaler = None
        self.recorded_steps = []  # (labeled case ids, train_step's outputs) of every step of this process

    def initialize(self):
        if not self.is_ddp:
            return super().initialize()
        self.is_ddp = False
        try:
            super().initialize()
        finally:
            self.is_ddp = True
        self._set_batch_size_and_oversample()
        self.network = DDP(nn.SyncBatchNorm.convert_sync_batchnorm(self.network))
        self.loss = self._build_loss()

    def train_step(self, batch: dict) -> dict:
        outputs = super().train_step(batch)
        self.recorded_steps.append((list(batch["keys"]), outputs))
        return outputs

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.is_ddp:
            super().perform_actual_validation(save_probabilities)
