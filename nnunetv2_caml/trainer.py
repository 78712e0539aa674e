"""``nnUNetTrainerCAML``: CAML semi-supervised training inside nnU-Net's own training loop.

Each step feeds one batch ``[labeled; unlabeled]`` through both networks and minimises

    L = lambda_s * (L_sup(main) + L_sup(aux)) + lambda_c(t) * L_c + lambda_o(t) * L_o

with ``L_sup`` nnU-Net's Dice + CE with deep supervision (labeled patches only), ``L_c`` the mutual consistency loss
and ``L_o`` the omni-correlation consistency loss (full-resolution outputs, all patches / unlabeled patches).

Everything else is nnU-Net's: plans, preprocessing, patch sampling, augmentation (unlabeled patches get the same
training augmentation), SGD with poly learning rate, validation on the main network, checkpoints whose
``network_weights`` hold the main network only (so ``nnUNetv2_predict -tr nnUNetTrainerCAML`` works unchanged).

What CAML adds to make a run fail loudly rather than train wrong: checkpoints are written atomically
(:mod:`nnunetv2_caml.checkpoints`), the unlabeled data must match the plans it is trained with, a step whose loss is
not finite is skipped (no optimizer step, no memory bank write) and many in a row stop the run, and every refusal is
one line (:mod:`nnunetv2_caml.errors`).

Multi-GPU (``-num_gpus N``) follows nnU-Net's DDP: nnU-Net wraps the main network; the auxiliary network and the OCC
heads are averaged across ranks after each backward pass, the memory bank applies every rank's update on every rank,
and the unlabeled batch is split across ranks like the labeled one (:mod:`nnunetv2_caml.distributed`).
"""
import io
from typing import List

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from torch import autocast, nn
from torch.profiler import record_function

from nnunetv2_caml.cascade import (assert_previous_stage_ready, predict_next_stage_command,
                                   unlabeled_previous_stage_folder)
from nnunetv2_caml.checkpoints import (CHECKPOINT_AUXILIARY_NETWORK, CHECKPOINT_MEMORY_BANK, CHECKPOINT_OCC_HEADS,
                                       CHECKPOINT_SETTINGS, CAMLCheckpointError, caml_state_digest, has_caml_state,
                                       read_checkpoint, save_atomically, weights_digest)
from nnunetv2_caml.distributed import (average_buffers, average_gradients, broadcast_from_rank_zero, every_rank,
                                       on_every_rank, rank_seeds, split_batch)
from nnunetv2_caml.errors import CAMLError, install_one_line_errors
from nnunetv2_caml.gpu_memory import CAMLOutOfMemoryError, out_of_memory_message
from nnunetv2_caml.local_contrast import DEFAULT_SIGMA
from nnunetv2_caml.losses import (CONSISTENCY_DISTANCES, CONSISTENCY_DISTANCES_TEXT, mutual_consistency_loss,
                                  sigmoid_rampup)
from nnunetv2_caml.networks import (DecoderFeatures, build_auxiliary_network, copy_plans_unet_weights,
                                    feature_channels, unwrapped)
from nnunetv2_caml.occ import OmniCorrelationConsistency
from nnunetv2_caml.perturbed_views import UnlabeledDataLoaderWithPerturbedView
from nnunetv2_caml.progress import CAML_LOSS_KEYS, CAML_MEMORY_KEY, CAMLLocalLogger
from nnunetv2_caml.unlabeled import assert_unlabeled_data_ready, preprocessing_fingerprint, unlabeled_case_identifiers

install_one_line_errors()  # nnUNetv2_train imports this module: its CAML refusals print as one line

#: the trainer attributes that make up CAML's settings (logged at the start, after --c, stored in checkpoints)
CAML_SETTINGS = ("lambda_s", "lambda_c", "lambda_o", "rampup_fraction", "sharpen_temperature",
                 "consistency_distance", "detach_sharpened_targets", "use_cma", "cma_stage", "cma_num_heads",
                 "auxiliary_upsampling_kernel_size", "auxiliary_local_contrast", "auxiliary_from_pretrained",
                 "use_occ", "occ_embedding_dim", "occ_temperature", "occ_top_k", "memory_per_class",
                 "memory_entries_per_case", "unlabeled_batch_size", "perturbed_view", "max_consecutive_nonfinite_steps")
#: the settings that shape the auxiliary network's modules: a checkpoint resumes only into the same auxiliary network
AUXILIARY_NETWORK_SETTINGS = ("use_cma", "cma_stage", "cma_num_heads", "auxiliary_upsampling_kernel_size",
                              "auxiliary_local_contrast")
#: what a checkpoint written before a setting existed was trained with (the local-contrast view came last)
SETTINGS_OF_OLDER_CHECKPOINTS = {"auxiliary_local_contrast": None}


class CAMLConfigurationError(CAMLError):
    """The dataset, plans or environment cannot be trained with CAML."""


class CAMLTrainingError(CAMLError):
    """Training cannot go on (e.g. the loss stays non-finite)."""


class nnUNetTrainerCAML(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # --- CAML's settings: the paper's (Gao et al., MICCAI 2023) except where marked; nnUNetTrainerCAML_paper has
        # the paper's loss exactly. docs/method.md lists each with its meaning and why it differs.
        self.lambda_s = 1.0                     # weight of the supervised loss of each network (paper: 0.5)
        self.lambda_c = 1.0                     # max weight of the mutual consistency loss
        self.lambda_o = 0.05                    # max weight of the omni-correlation consistency loss
        self.rampup_fraction = 0.2              # ramp-up length as a fraction of all training iterations (nnU-Net)
        self.sharpen_temperature = 0.1          # T of the sharpening
        self.consistency_distance = "dice_ce"   # L_c's distance: nnU-Net's Dice + CE (paper: "mse"; also "ce")
        self.detach_sharpened_targets = True    # sharpened targets as pseudo-labels (the paper's code: False)
        self.use_cma = True                     # Cross-sample Mutual Attention in the auxiliary encoder
        self.cma_stage = -2                     # encoder stage whose output CMA attends (-2: above the bottleneck)
        self.cma_num_heads = 4
        self.auxiliary_upsampling_kernel_size = None  # conv after the aux decoder's interpolation: None 3x3x3, or 1
        self.auxiliary_local_contrast = DEFAULT_SIGMA  # the aux network sees the local-contrast view (sigma, voxels)
                                                # (local_contrast.py; paper: None, nnU-Net's input)
        self.auxiliary_from_pretrained = True   # with -pretrained_weights the aux network starts from them too
        self.use_occ = True                     # Omni-Correlation Consistency
        self.occ_embedding_dim = 32
        self.occ_temperature = 0.1
        self.occ_top_k = 12800                  # most confident unlabeled voxels per class
        self.memory_per_class = 256             # memory entries sampled per class and step
        self.memory_entries_per_case = 4096     # stored per labeled case and class (nnU-Net patches are large)
        self.unlabeled_batch_size = None        # None: as many unlabeled as labeled patches (nnU-Net); all GPUs' total
        self.perturbed_view = True              # the main network sees a perturbed copy of the unlabeled patches (paper: no)
        self.max_consecutive_nonfinite_steps = 10  # skipped NaN/inf steps in a row that stop the run

        self.auxiliary_network = None
        self.occ = None
        self.dataloader_unlabeled = None
        self._features_main = self._features_aux = None
        self._iterations_this_epoch = 0
        self._nonfinite_in_a_row = 0
        self._resumed_without_caml_state = None  # the checkpoint loaded, when it held only the main network
        self._main_network_at_initialization = None  # digest of its weights, until a checkpoint is loaded
        self.logger.local_logger = CAMLLocalLogger()

        if self.label_manager.has_regions:
            raise CAMLConfigurationError("CAML needs softmax (class) labels; this dataset uses region-based training "
                                         "('regions_class_order' in dataset.json), which CAML does not support.")

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        # a subclass's setting, checked before any work is done
        if self.consistency_distance not in CONSISTENCY_DISTANCES:
            raise CAMLConfigurationError(f"{self.__class__.__name__}.consistency_distance must be "
                                         f"{CONSISTENCY_DISTANCES_TEXT}, got {self.consistency_distance!r}")
        # the auxiliary network and OCC must exist before nnU-Net builds the optimizer (configure_optimizers)
        num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                          self.dataset_json)
        num_classes = self.label_manager.num_segmentation_heads
        self.auxiliary_network = build_auxiliary_network(
            self.configuration_manager, num_input_channels, num_classes, self.use_cma, self.cma_stage,
            self.cma_num_heads, self.auxiliary_upsampling_kernel_size, self.auxiliary_local_contrast,
            self._num_image_channels()).to(self.device)
        if self.is_ddp:  # as nnU-Net converts the main network (a no-op for the usual InstanceNorm plans)
            self.auxiliary_network = nn.SyncBatchNorm.convert_sync_batchnorm(self.auxiliary_network)
        self.occ = OmniCorrelationConsistency(
            feature_channels(self.auxiliary_network), num_classes, self.occ_embedding_dim, self.occ_temperature,
            self.occ_top_k, self.memory_per_class, self.memory_entries_per_case, self.device).to(self.device)
        # multi-GPU: every rank starts from rank 0's auxiliary network and heads, as DDP does for the main network
        broadcast_from_rank_zero([*self.auxiliary_network.state_dict().values(), *self.occ.state_dict().values()])
        super().initialize()  # nnU-Net builds the main network here and compiles it when _do_i_compile() says so
        if self._do_i_compile():
            self.print_to_log_file("CAML: using torch.compile for the auxiliary network as well")
            self.auxiliary_network = torch.compile(self.auxiliary_network)
        # forward hooks on the last decoder stage: dynamo traces them into each network's graph (no graph break)
        self._features_main = DecoderFeatures(unwrapped(self.network))
        self._features_aux = DecoderFeatures(unwrapped(self.auxiliary_network))
        self._main_network_at_initialization = weights_digest(unwrapped(self.network).state_dict())
        self.print_to_log_file("CAML settings: " + ", ".join(f"{k}={v}" for k, v in self.caml_settings().items()))

    def _num_image_channels(self) -> int:
        """The input's image channels: all of them, except in a cascade stage, where the previous stage's one-hot
        segmentation (one channel per foreground label) follows them."""
        num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                          self.dataset_json)
        return num_input_channels - (len(self.label_manager.foreground_labels) if self.is_cascaded else 0)

    def caml_settings(self) -> dict:
        """CAML's settings in force (``unlabeled_batch_size`` resolved to the number of patches)."""
        return {**{k: getattr(self, k) for k in CAML_SETTINGS}, "unlabeled_batch_size": self._unlabeled_batch_size()}

    def configure_optimizers(self):
        optimizer, lr_scheduler = super().configure_optimizers()
        # one SGD over both networks and the OCC heads; nnU-Net's poly schedule sets the lr of every group
        optimizer.add_param_group({"params": self._caml_parameters()})
        return optimizer, lr_scheduler

    def _caml_parameters(self) -> List[nn.Parameter]:
        """The auxiliary network's and the OCC heads' parameters (what DDP does not average for CAML)."""
        return [*self.auxiliary_network.parameters(), *self.occ.parameters()]

    def _unlabeled_batch_size(self) -> int:
        """Unlabeled patches per step over all GPUs."""
        return self.unlabeled_batch_size or self.configuration_manager.batch_size

    def _unlabeled_batch_size_this_rank(self) -> int:
        """This rank's share of the unlabeled batch, split as nnU-Net splits the labeled one."""
        if not self.is_ddp:
            return self._unlabeled_batch_size()
        world_size, rank = dist.get_world_size(), dist.get_rank()
        if self._unlabeled_batch_size() < world_size:
            raise CAMLConfigurationError(
                f"{self._unlabeled_batch_size()} unlabeled patch(es) per step cannot be split over {world_size} GPUs: "
                f"set unlabeled_batch_size to at least {world_size} in a subclass, or train on fewer GPUs")
        return split_batch(self._unlabeled_batch_size(), world_size, rank)

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        self._num_labeled_cases = len(dataset_tr.identifiers)
        return dataset_tr, dataset_val

    def get_dataloaders(self):
        fingerprint = preprocessing_fingerprint(self.plans_manager, self.configuration_manager, self.dataset_json)
        unlabeled_folder = assert_unlabeled_data_ready(self.plans_manager.dataset_name,
                                                       self.configuration_manager.data_identifier,
                                                       self.configuration_name, self.plans_manager.plans_name,
                                                       fingerprint, self.dataset_json)
        previous_stage_folder = self._unlabeled_previous_stage_folder(unlabeled_folder) if self.is_cascaded else None
        dataloader_train, dataloader_val = super().get_dataloaders()
        self.dataloader_unlabeled = self._get_unlabeled_dataloader(unlabeled_folder, previous_stage_folder)
        self.print_to_log_file(f"CAML: training on {self._num_labeled_cases} labeled case(s) of fold {self.fold} and "
                               f"{len(unlabeled_case_identifiers(unlabeled_folder))} unlabeled case(s) from "
                               f"{unlabeled_folder}" + (f", with the previous stage's segmentations from "
                                                        f"{previous_stage_folder}" if self.is_cascaded else ""))
        if self.is_ddp:
            self.print_to_log_file(
                f"CAML: rank {self.local_rank} of {dist.get_world_size()} draws {self.batch_size} labeled and "
                f"{self._unlabeled_batch_size_this_rank()} unlabeled patch(es) per step; the auxiliary network and OCC "
                f"heads are averaged over the ranks, the memory bank holds every rank's cases")
        return dataloader_train, dataloader_val

    def _unlabeled_previous_stage_folder(self, unlabeled_folder: str) -> str:
        """Cascade: the previous stage's segmentations of the unlabeled cases (nnunetv2_caml/cascade.py), checked."""
        previous_stage = self.configuration_manager.previous_stage_name
        folder = unlabeled_previous_stage_folder(self.plans_manager.dataset_name, self.__class__.__name__,
                                                 self.plans_manager.plans_name, previous_stage, self.configuration_name)
        assert_previous_stage_ready(folder, unlabeled_folder, predict_next_stage_command(
            self.plans_manager.dataset_name, previous_stage, self.__class__.__name__, self.plans_manager.plans_name))
        return folder

    def _get_unlabeled_dataloader(self, unlabeled_folder: str, previous_stage_folder: str = None):
        """Unlabeled patches: random crops with nnU-Net's training augmentation, like the labeled ones (in a cascade
        stage with the previous stage's segmentation as input channels, as nnU-Net adds them). In a multi-GPU run each
        rank draws its share of the batch from all unlabeled cases, as nnU-Net's labeled loader does, with
        augmentation workers seeded apart from every other rank's."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, self._get_deep_supervision_scales(), mirror_axes,
            dummy_2d, use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=None,
            ignore_label=self.label_manager.ignore_label)
        dataset = infer_dataset_class(unlabeled_folder)(unlabeled_folder, unlabeled_case_identifiers(unlabeled_folder),
                                                        folder_with_segs_from_previous_stage=previous_stage_folder)
        if self.perturbed_view:  # only the images are perturbed, not the previous stage's one-hot channels
            loader_class, extra = UnlabeledDataLoaderWithPerturbedView, {"num_image_channels": self._num_image_channels()}
        else:
            loader_class, extra = nnUNetDataLoader, {}
        loader = loader_class(dataset, self._unlabeled_batch_size_this_rank(), initial_patch_size,
                              self.configuration_manager.patch_size, self.label_manager,
                              oversample_foreground_percent=0.0, transforms=transforms, **extra)
        loader.has_ignore = False  # unlabeled cases have no annotated-voxel locations: always crop at random
        num_processes = get_allowed_n_proc_DA()
        if num_processes == 0:
            return SingleThreadedAugmenter(loader, None)  # draws from this process's (this rank's) generators
        seeds = rank_seeds(num_processes, self.local_rank) if self.is_ddp else None
        return NonDetMultiThreadedAugmenter(loader, None, num_processes, max(6, num_processes // 2), seeds,
                                            pin_memory=self.device.type == "cuda", wait_time=0.002)

    def on_train_start(self):
        if self._resumed_without_caml_state is not None:
            filename, trainer_name = self._resumed_without_caml_state
            raise CAMLCheckpointError(
                f"{filename} was written by {trainer_name} and holds only the main network (no auxiliary network, "
                f"OCC heads or memory bank): CAML cannot resume it with --c. --val still validates it; to train CAML, "
                f"move {self.output_folder} away and start without --c")
        # multi-GPU: decided on all ranks together (each loaded the same file), so that they keep one auxiliary network
        if self.auxiliary_from_pretrained and on_every_rank(self._main_network_was_given_pretrained_weights(),
                                                            self.device):
            self._initialize_auxiliary_network_from_main()
        super().on_train_start()

    def _main_network_was_given_pretrained_weights(self) -> bool:
        """True when the main network's weights changed after :meth:`initialize` without a checkpoint being loaded:
        what nnU-Net's ``-pretrained_weights`` does (``nnUNetv2_train`` loads them into ``self.network`` only)."""
        return self._main_network_at_initialization is not None and \
            weights_digest(unwrapped(self.network).state_dict()) != self._main_network_at_initialization

    def _initialize_auxiliary_network_from_main(self) -> None:
        """Start the auxiliary network from the main network's pretrained weights where the two share a module."""
        auxiliary = unwrapped(self.auxiliary_network)
        copied = copy_plans_unet_weights(unwrapped(self.network), auxiliary)
        self.print_to_log_file(
            f"CAML: the main network starts from pretrained weights (-pretrained_weights); the auxiliary network takes "
            f"them where it has the same modules: {len(copied)} of {len(auxiliary.state_dict())} tensors (encoder, "
            f"decoder stages); the others (its segmentation layers and the modules the main network lacks) keep their "
            f"random initialisation (auxiliary_from_pretrained=False keeps all of it)")

    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_unlabeled, NonDetMultiThreadedAugmenter):
            self.dataloader_unlabeled._finish()

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.auxiliary_network.train()
        self.occ.train()
        self._iterations_this_epoch = 0

    def rampup_weights(self) -> tuple:
        """``(lambda_c(t), lambda_o(t))`` at the current training iteration (sigmoid ramp-up)."""
        iteration = self.current_epoch * self.num_iterations_per_epoch + self._iterations_this_epoch
        length = self.rampup_fraction * self.num_epochs * self.num_iterations_per_epoch
        ramp = sigmoid_rampup(iteration, length)
        return self.lambda_c * ramp, self.lambda_o * ramp

    def train_step(self, batch: dict) -> dict:
        try:
            return self._caml_train_step(batch)
        except torch.OutOfMemoryError as error:
            if self.device.type != "cuda":
                raise
            raise CAMLOutOfMemoryError(self._out_of_memory_message()) from error

    def _out_of_memory_message(self) -> str:
        """The one line of a step that ran out of GPU memory, with the commands that make plans for this card."""
        return out_of_memory_message(
            torch.cuda.get_device_name(self.device), torch.cuda.get_device_properties(self.device).total_memory,
            self.plans_manager.dataset_name, self.plans_manager.plans_name,
            self.plans_manager.experiment_planner_name, self.configuration_name,
            self.configuration_manager.data_identifier, self.configuration_manager.patch_size, self.batch_size,
            self._unlabeled_batch_size_this_rank())

    def _caml_train_step(self, batch: dict) -> dict:
        unlabeled = next(self.dataloader_unlabeled)
        num_labeled = batch["data"].shape[0]
        data = torch.cat((batch["data"], unlabeled["data"])).to(self.device, non_blocking=True)
        # the main network's input: the same, or with the unlabeled patches' perturbed view (perturbed_views.py)
        data_main = torch.cat((batch["data"], unlabeled["data_perturbed"])).to(self.device, non_blocking=True) \
            if self.perturbed_view else data
        target = [t.to(self.device, non_blocking=True) for t in batch["target"]] \
            if isinstance(batch["target"], list) else batch["target"].to(self.device, non_blocking=True)
        lambda_c, lambda_o = self.rampup_weights()
        # what a non-finite step must not change besides the weights: norm buffers and the memory bank's rows (those
        # of every rank's cases: the bank stores them all)
        buffers = [b.clone() for b in self._buffers()]
        bank = self.occ.memory_bank.snapshot([k for keys in every_rank(list(batch["keys"])) for k in keys]) \
            if self.use_occ else None

        self.optimizer.zero_grad(set_to_none=True)
        # record_function names the parts of a step in a torch.profiler trace (benchmarks/step_time.py --profile)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            with record_function("CAML main network"):
                output_main = self.network(data_main)
                features_main = self._features_main.pop()
            with record_function("CAML auxiliary network"):
                output_aux = self.auxiliary_network(data)
                features_aux = self._features_aux.pop()
            with record_function("CAML supervised loss"):
                loss_sup_main = self.loss(_labeled(output_main, num_labeled), target)
                loss_sup_aux = self.loss(_labeled(output_aux, num_labeled), target)
        # the semi-supervised terms are computed in float32 (sharpening with T=0.1 and tau=0.1 overflow fp16)
        with record_function("CAML mutual consistency"):
            probs_main = torch.softmax(_full_resolution(output_main).float(), 1)
            probs_aux = torch.softmax(_full_resolution(output_aux).float(), 1)
            loss_consistency = mutual_consistency_loss(probs_main, probs_aux, self.sharpen_temperature,
                                                       self.detach_sharpened_targets, self.consistency_distance,
                                                       self.configuration_manager.batch_dice)
        with record_function("CAML OCC"):
            loss_occ = self.omni_correlation_consistency(features_main, features_aux, probs_main, probs_aux,
                                                         _full_resolution(target)[:, 0], num_labeled, batch["keys"])
        loss = self.lambda_s * (loss_sup_main + loss_sup_aux) + lambda_c * loss_consistency + lambda_o * loss_occ
        terms = {"loss": loss, "caml_loss_sup_main": loss_sup_main, "caml_loss_sup_aux": loss_sup_aux,
                 "caml_loss_consistency": loss_consistency, "caml_loss_occ": loss_occ}
        values = torch.stack([t.detach().float() for t in terms.values()]).cpu().numpy()  # one copy to the host
        self._iterations_this_epoch += 1
        step = {**dict(zip(terms, values)), "caml_lambda_c": np.float64(lambda_c),
                "caml_lambda_o": np.float64(lambda_o)}

        # multi-GPU: a step is skipped on every rank or on none (DDP's backward is a collective)
        if not on_every_rank(bool(np.isfinite(values).all()), self.device):
            return self._skip_nonfinite_step(step, buffers, bank)
        self._nonfinite_in_a_row = 0
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        with record_function("CAML backward"):
            (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()
        with record_function("CAML optimizer step"):
            # DDP averaged the main network's gradients during backward; CAML's own parts are averaged here (multi-GPU)
            average_gradients(self._caml_parameters())
            average_buffers(list(self.occ.buffers()))
            if self.grad_scaler is not None:
                self.grad_scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(parameters, 12)
                self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()
            else:
                torch.nn.utils.clip_grad_norm_(parameters, 12)
                self.optimizer.step()
        return {**step, "caml_nonfinite_step": False}

    def _buffers(self) -> List[torch.Tensor]:
        """The buffers a forward pass may write (norm statistics) of both networks and the OCC heads, in one order."""
        return [b for m in (self.network, self.auxiliary_network, self.occ) for b in m.buffers()]

    def _skip_nonfinite_step(self, step: dict, buffers: List[torch.Tensor], bank) -> dict:
        """No optimizer step; undo the forward pass's writes (norm buffers, memory bank); stop after too many."""
        for saved, current in zip(buffers, self._buffers()):
            current.copy_(saved)
        if bank is not None:
            self.occ.memory_bank.restore(bank)
        self._nonfinite_in_a_row += 1
        terms = ", ".join(f"{k.removeprefix('caml_')} {step[k]:.4g}" for k in ("loss", *CAML_LOSS_KEYS))
        self.print_to_log_file(f"CAML: skipped step {self._iterations_this_epoch} of epoch {self.current_epoch}: "
                               f"non-finite loss ({terms})")
        if self._nonfinite_in_a_row >= self.max_consecutive_nonfinite_steps:
            raise CAMLTrainingError(
                f"{self._nonfinite_in_a_row} training steps in a row had a non-finite loss ({terms}): the data "
                f"holds NaN/inf or training diverged. Check the images (nnUNetv2_plan_and_preprocess "
                f"--verify_dataset_integrity, nnUNetv2_caml_preprocess_unlabeled --overwrite); the checkpoints in "
                f"{self.output_folder} are intact")
        return {**step, "caml_nonfinite_step": True}

    def omni_correlation_consistency(self, features_main, features_aux, probs_main, probs_aux, target,
                                     num_labeled: int, labeled_case_ids: List[str]) -> torch.Tensor:
        """Update the labeled memory bank from the labeled patches, then ``L_o`` on the unlabeled patches."""
        if not self.use_occ:
            return probs_main.new_zeros(())
        with torch.autocast(self.device.type, enabled=False):
            self.occ.update_memory(features_main[:num_labeled], features_aux[:num_labeled],
                                   probs_main[:num_labeled].max(1).indices, probs_aux[:num_labeled].max(1).indices,
                                   target.long(), labeled_case_ids)
            return self.occ(features_main[num_labeled:], features_aux[num_labeled:], probs_main[num_labeled:],
                            probs_aux[num_labeled:])

    def on_train_epoch_end(self, train_outputs: List[dict]):
        finite = [o for o in train_outputs if not o["caml_nonfinite_step"]]
        skipped = len(train_outputs) - len(finite)  # the same on every rank: steps are skipped on all or none
        outputs = collate_outputs(finite or train_outputs)  # an epoch of skipped steps logs NaN
        super().on_train_epoch_end(finite or train_outputs)  # nnU-Net gathers its loss from every rank
        keys = (*CAML_LOSS_KEYS, "caml_lambda_c", "caml_lambda_o")
        # the mean over every rank's steps, gathered as nnU-Net gathers its own loss
        per_rank = every_rank({k: outputs[k] for k in keys})
        means = {k: float(np.mean([v for rank in per_rank for v in rank[k]])) for k in keys}
        for key in keys:
            self.logger.log(key, means[key], self.current_epoch)
        fill = self.occ.memory_bank.fill()
        self.logger.log(CAML_MEMORY_KEY, int(sum(fill)), self.current_epoch)
        self.print_to_log_file(
            "CAML: " + ", ".join(f"{k[5:]} {means[k]:.4f}" for k in CAML_LOSS_KEYS) +
            f", lambda_c {means['caml_lambda_c']:.4f}, lambda_o {means['caml_lambda_o']:.4f}, "
            f"memory bank per class {fill}" + (f", {skipped} non-finite step(s) skipped" if skipped else ""))

    # ------------------------------------------------------------------ checkpoints
    def _caml_state(self) -> dict:
        return {CHECKPOINT_AUXILIARY_NETWORK: unwrapped(self.auxiliary_network).state_dict(),
                CHECKPOINT_OCC_HEADS: self.occ.state_dict(),
                CHECKPOINT_MEMORY_BANK: self.occ.memory_bank.state_dict()}

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus CAML's state, written once and moved into place atomically; in a multi-GPU run by
        rank 0 (every rank holds the same CAML state)."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)  # nnU-Net logs that checkpointing is disabled
        nnunet_checkpoint = io.BytesIO()
        super().save_checkpoint(nnunet_checkpoint)  # nnU-Net's keys, whatever its version writes
        nnunet_checkpoint.seek(0)
        checkpoint = torch.load(nnunet_checkpoint, map_location="cpu", weights_only=False)
        checkpoint.update(self._caml_state())
        checkpoint[CHECKPOINT_SETTINGS] = self.caml_settings()
        save_atomically(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """Load a CAML checkpoint fully, or a checkpoint holding only the main network for validation (``--val``);
        resuming such one is refused in :meth:`on_train_start`. Unreadable files are refused in one line."""
        if not isinstance(filename_or_checkpoint, str):
            raise TypeError("nnUNetTrainerCAML.load_checkpoint takes the checkpoint's file name")
        filename = filename_or_checkpoint
        checkpoint = read_checkpoint(filename, self.device)
        if not has_caml_state(checkpoint):
            self._load_main_network_only(checkpoint)
            self._main_network_at_initialization = None  # a checkpoint's weights are not pretrained weights
            trainer_name = checkpoint.get("trainer_name", "an unknown trainer")
            self._resumed_without_caml_state = (filename, trainer_name)
            self.print_to_log_file(f"CAML: {filename} (written by {trainer_name}) holds only the main network: "
                                   f"loaded for validation/prediction; it cannot be resumed with --c")
            return
        stored = checkpoint.get(CHECKPOINT_SETTINGS, {})
        stored_shape = {k: stored.get(k, SETTINGS_OF_OLDER_CHECKPOINTS.get(k)) for k in AUXILIARY_NETWORK_SETTINGS}
        differing = [f"{k}={v} (this trainer: {getattr(self, k)})" for k, v in stored_shape.items()
                     if v != getattr(self, k)]
        if differing:
            raise CAMLCheckpointError(
                f"{filename} holds an auxiliary network of another shape ({', '.join(differing)}): resume it with a "
                f"trainer of those settings (nnUNetTrainerCAML_noLocalContrast for auxiliary_local_contrast=None, as in "
                f"checkpoints written before the local-contrast view) or start over without --c")
        super().load_checkpoint(filename)  # initializes the trainer first when needed
        self._main_network_at_initialization = None  # a checkpoint's weights are not pretrained weights
        self._resumed_without_caml_state = None
        unwrapped(self.auxiliary_network).load_state_dict(checkpoint[CHECKPOINT_AUXILIARY_NETWORK])
        self.occ.load_state_dict(checkpoint[CHECKPOINT_OCC_HEADS])
        self.occ.memory_bank.load_state_dict(checkpoint[CHECKPOINT_MEMORY_BANK])
        settings = self.caml_settings()
        changed = [f"{k} {stored[k]} -> {v}" for k, v in settings.items() if k in stored and stored[k] != v]
        state = self._caml_state()
        self.print_to_log_file(
            f"CAML: loaded {filename} at epoch {self.current_epoch}: auxiliary network, OCC heads and memory bank "
            f"({len(self.occ.memory_bank.case_ids)} cases, {sum(self.occ.memory_bank.fill())} entries) restored, "
            f"state digest {caml_state_digest(*state.values())}")
        self.print_to_log_file("CAML settings in force: " + ", ".join(f"{k}={v}" for k, v in settings.items()) +
                               (f" (changed since the checkpoint: {', '.join(changed)})" if changed else ""))

    def _load_main_network_only(self, checkpoint: dict) -> None:
        """What validation needs from a checkpoint without CAML's state (e.g. stock nnU-Net's, whose optimizer has
        one parameter group where CAML's has two): the main network's weights and the mirroring axes."""
        if not self.was_initialized:
            self.initialize()
        network = unwrapped(self.network)
        own = network.state_dict().keys()
        network.load_state_dict({k[len("module."):] if k not in own and k.startswith("module.") else k: v
                                 for k, v in checkpoint["network_weights"].items()})
        self.current_epoch = checkpoint.get("current_epoch", self.current_epoch)
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)


def _labeled(output, num_labeled: int):
    """The labeled part of a network output (a tensor, or a list of them with deep supervision)."""
    if isinstance(output, (list, tuple)):
        return [o[:num_labeled] for o in output]
    return output[:num_labeled]


def _full_resolution(output) -> torch.Tensor:
    """The full-resolution output (the first one with deep supervision)."""
    return output[0] if isinstance(output, (list, tuple)) else output
