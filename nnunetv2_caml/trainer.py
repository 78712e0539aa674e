"""``nnUNetTrainerCAML``: CAML semi-supervised training inside nnU-Net's own training loop.

Each step feeds one batch ``[labeled; unlabeled]`` through both networks and minimises

    L = lambda_s * (L_sup(main) + L_sup(aux)) + lambda_c(t) * L_c + lambda_o(t) * L_o

with ``L_sup`` nnU-Net's Dice + CE with deep supervision (labeled patches only), ``L_c`` the mutual consistency loss
and ``L_o`` the omni-correlation consistency loss (full-resolution outputs, all patches / unlabeled patches).

Everything else is nnU-Net's: plans, preprocessing, patch sampling, augmentation (unlabeled patches get the same
training augmentation), SGD with poly learning rate, validation on the main network, checkpoints whose
``network_weights`` hold the main network only (so ``nnUNetv2_predict -tr nnUNetTrainerCAML`` works unchanged).
"""
import os
from typing import List

import numpy as np
import torch
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

from nnunetv2_caml.losses import mutual_consistency_loss, sigmoid_rampup
from nnunetv2_caml.networks import DecoderFeatures, build_auxiliary_network, feature_channels
from nnunetv2_caml.occ import OmniCorrelationConsistency
from nnunetv2_caml.progress import CAML_LOSS_KEYS, CAML_MEMORY_KEY, CAMLLocalLogger
from nnunetv2_caml.unlabeled import assert_unlabeled_data_ready, unlabeled_case_identifiers

#: checkpoint keys of CAML's extra state (``network_weights`` stays nnU-Net's: the main network)
CHECKPOINT_AUXILIARY_NETWORK = "caml_auxiliary_network_weights"
CHECKPOINT_OCC_HEADS = "caml_occ_heads"
CHECKPOINT_MEMORY_BANK = "caml_memory_bank"


class CAMLConfigurationError(RuntimeError):
    """The dataset, plans or environment cannot be trained with CAML."""


class nnUNetTrainerCAML(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # --- the paper's defaults (Gao et al., MICCAI 2023); see docs in caml-method.md ---
        self.lambda_s = 0.5                     # weight of the supervised loss of each network
        self.lambda_c = 1.0                     # max weight of the mutual consistency loss
        self.lambda_o = 0.05                    # max weight of the omni-correlation consistency loss
        self.rampup_fraction = 0.2              # ramp-up length as a fraction of all training iterations (nnU-Net)
        self.sharpen_temperature = 0.1          # T of the sharpening
        self.detach_sharpened_targets = False   # the paper's code lets gradients flow through sharpened targets
        self.use_cma = True                     # Cross-sample Mutual Attention in the auxiliary encoder
        self.cma_stage = -2                     # encoder stage whose output CMA attends (-2: above the bottleneck)
        self.cma_num_heads = 4
        self.use_occ = True                     # Omni-Correlation Consistency
        self.occ_embedding_dim = 32
        self.occ_temperature = 0.1
        self.occ_top_k = 12800                  # most confident unlabeled voxels per class
        self.memory_per_class = 256             # memory entries sampled per class and step
        self.memory_entries_per_case = 4096     # stored per labeled case and class (nnU-Net patches are large)
        self.unlabeled_batch_size = None        # None: as many unlabeled as labeled patches (nnU-Net)

        self.auxiliary_network = None
        self.occ = None
        self.dataloader_unlabeled = None
        self._features_main = self._features_aux = None
        self._iterations_this_epoch = 0
        self.logger.local_logger = CAMLLocalLogger()

        if self.is_cascaded:
            raise CAMLConfigurationError(
                f"CAML does not support cascade configurations ('{configuration}' uses the segmentations of "
                f"'{self.configuration_manager.previous_stage_name}'); train 3d_fullres, 3d_lowres or 2d instead.")
        if self.label_manager.has_regions:
            raise CAMLConfigurationError("CAML needs softmax (class) labels; this dataset uses region-based training "
                                         "('regions_class_order' in dataset.json), which CAML does not support.")
        if self.is_ddp:
            raise CAMLConfigurationError("nnUNetTrainerCAML runs on one GPU; multi-GPU (-num_gpus > 1) is not "
                                         "supported yet.")

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        # the auxiliary network and OCC must exist before nnU-Net builds the optimizer (configure_optimizers)
        num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                          self.dataset_json)
        num_classes = self.label_manager.num_segmentation_heads
        self.auxiliary_network = build_auxiliary_network(
            self.configuration_manager, num_input_channels, num_classes, self.use_cma, self.cma_stage,
            self.cma_num_heads).to(self.device)
        self.occ = OmniCorrelationConsistency(
            feature_channels(self.auxiliary_network), num_classes, self.occ_embedding_dim, self.occ_temperature,
            self.occ_top_k, self.memory_per_class, self.memory_entries_per_case, self.device).to(self.device)
        super().initialize()
        self._features_main = DecoderFeatures(self.network)
        self._features_aux = DecoderFeatures(self.auxiliary_network)
        self.print_to_log_file(
            "CAML: " + ", ".join(f"{k}={getattr(self, k)}" for k in (
                "lambda_s", "lambda_c", "lambda_o", "rampup_fraction", "sharpen_temperature",
                "detach_sharpened_targets", "use_cma", "cma_stage", "cma_num_heads", "use_occ", "occ_embedding_dim",
                "occ_temperature", "occ_top_k", "memory_per_class", "memory_entries_per_case")) +
            f", unlabeled_batch_size={self._unlabeled_batch_size()}")

    def _do_i_compile(self):
        # torch.compile of the main network is only used when asked for explicitly (nnUNet_compile=1): CAML reads
        # the decoder features through a forward hook, which has not been verified under compilation.
        return super()._do_i_compile() and os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t")

    def configure_optimizers(self):
        optimizer, lr_scheduler = super().configure_optimizers()
        # one SGD over both networks and the OCC heads; nnU-Net's poly schedule sets the lr of every group
        optimizer.add_param_group({"params": [*self.auxiliary_network.parameters(), *self.occ.parameters()]})
        return optimizer, lr_scheduler

    def _unlabeled_batch_size(self) -> int:
        return self.unlabeled_batch_size or self.configuration_manager.batch_size

    def get_dataloaders(self):
        unlabeled_folder = assert_unlabeled_data_ready(self.plans_manager.dataset_name,
                                                       self.configuration_manager.data_identifier,
                                                       self.configuration_name, self.plans_manager.plans_name)
        dataloader_train, dataloader_val = super().get_dataloaders()
        self.dataloader_unlabeled = self._get_unlabeled_dataloader(unlabeled_folder)
        return dataloader_train, dataloader_val

    def _get_unlabeled_dataloader(self, unlabeled_folder: str):
        """Unlabeled patches: random crops with nnU-Net's training augmentation, like the labeled ones."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, self._get_deep_supervision_scales(), mirror_axes,
            dummy_2d, use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None,
            ignore_label=self.label_manager.ignore_label)
        dataset = infer_dataset_class(unlabeled_folder)(unlabeled_folder, unlabeled_case_identifiers(unlabeled_folder))
        loader = nnUNetDataLoader(dataset, self._unlabeled_batch_size(), initial_patch_size,
                                  self.configuration_manager.patch_size, self.label_manager,
                                  oversample_foreground_percent=0.0, transforms=transforms)
        loader.has_ignore = False  # unlabeled cases have no annotated-voxel locations: always crop at random
        num_processes = get_allowed_n_proc_DA()
        if num_processes == 0:
            return SingleThreadedAugmenter(loader, None)
        return NonDetMultiThreadedAugmenter(loader, None, num_processes, max(6, num_processes // 2), None,
                                            pin_memory=self.device.type == "cuda", wait_time=0.002)

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
        unlabeled = next(self.dataloader_unlabeled)
        num_labeled = batch["data"].shape[0]
        data = torch.cat((batch["data"], unlabeled["data"])).to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in batch["target"]] \
            if isinstance(batch["target"], list) else batch["target"].to(self.device, non_blocking=True)
        lambda_c, lambda_o = self.rampup_weights()

        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output_main = self.network(data)
            features_main = self._features_main.pop()
            output_aux = self.auxiliary_network(data)
            features_aux = self._features_aux.pop()

            loss_sup_main = self.loss(_labeled(output_main, num_labeled), target)
            loss_sup_aux = self.loss(_labeled(output_aux, num_labeled), target)
        # the semi-supervised terms are computed in float32 (sharpening with T=0.1 and tau=0.1 overflow fp16)
        probs_main = torch.softmax(_full_resolution(output_main).float(), 1)
        probs_aux = torch.softmax(_full_resolution(output_aux).float(), 1)
        loss_consistency = mutual_consistency_loss(probs_main, probs_aux, self.sharpen_temperature,
                                                   self.detach_sharpened_targets)
        loss_occ = self.omni_correlation_consistency(features_main, features_aux, probs_main, probs_aux,
                                                     _full_resolution(target)[:, 0], num_labeled, batch["keys"])
        loss = self.lambda_s * (loss_sup_main + loss_sup_aux) + lambda_c * loss_consistency + lambda_o * loss_occ

        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 12)
            self.optimizer.step()
        self._iterations_this_epoch += 1
        terms = {"loss": loss, "caml_loss_sup_main": loss_sup_main, "caml_loss_sup_aux": loss_sup_aux,
                 "caml_loss_consistency": loss_consistency, "caml_loss_occ": loss_occ}
        values = torch.stack([t.detach().float() for t in terms.values()]).cpu().numpy()  # one copy to the host
        return {**dict(zip(terms, values)), "caml_lambda_c": np.float64(lambda_c), "caml_lambda_o": np.float64(lambda_o)}

    def omni_correlation_consistency(self, features_main, features_aux, probs_main, probs_aux, target,
                                     num_labeled: int, labeled_case_ids: List[str]) -> torch.Tensor:
        """Update the labeled memory bank from the labeled patches, then ``L_o`` on the unlabeled patches."""
        if not self.use_occ:
            return probs_main.new_zeros(())
        with torch.autocast(self.device.type, enabled=False):
            self.occ.update_memory(features_main[:num_labeled], features_aux[:num_labeled],
                                   probs_main[:num_labeled].argmax(1), probs_aux[:num_labeled].argmax(1),
                                   target.long(), labeled_case_ids)
            return self.occ(features_main[num_labeled:], features_aux[num_labeled:], probs_main[num_labeled:],
                            probs_aux[num_labeled:])

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        for key in (*CAML_LOSS_KEYS, "caml_lambda_c", "caml_lambda_o"):
            self.logger.log(key, float(np.mean(outputs[key])), self.current_epoch)
        fill = self.occ.memory_bank.fill()
        self.logger.log(CAML_MEMORY_KEY, int(sum(fill)), self.current_epoch)
        self.print_to_log_file(
            "CAML: " + ", ".join(f"{k[5:]} {np.round(np.mean(outputs[k]), 4)}" for k in CAML_LOSS_KEYS) +
            f", lambda_c {np.round(np.mean(outputs['caml_lambda_c']), 4)}, lambda_o "
            f"{np.round(np.mean(outputs['caml_lambda_o']), 4)}, memory bank per class {fill}")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)  # network_weights = the main network, as nnUNetv2_predict expects
        if self.local_rank == 0 and not self.disable_checkpointing:
            checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
            checkpoint[CHECKPOINT_AUXILIARY_NETWORK] = self.auxiliary_network.state_dict()
            checkpoint[CHECKPOINT_OCC_HEADS] = self.occ.state_dict()
            checkpoint[CHECKPOINT_MEMORY_BANK] = self.occ.memory_bank.state_dict()
            torch.save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = torch.load(checkpoint, map_location=self.device, weights_only=False)
        missing = [k for k in (CHECKPOINT_AUXILIARY_NETWORK, CHECKPOINT_OCC_HEADS, CHECKPOINT_MEMORY_BANK)
                   if k not in checkpoint]
        if missing:
            raise CAMLConfigurationError(f"checkpoint lacks CAML's state {missing}: it was not written by "
                                         f"nnUNetTrainerCAML; resume only CAML runs with --c.")
        super().load_checkpoint(filename_or_checkpoint)
        self.auxiliary_network.load_state_dict(checkpoint[CHECKPOINT_AUXILIARY_NETWORK])
        self.occ.load_state_dict(checkpoint[CHECKPOINT_OCC_HEADS])
        self.occ.memory_bank.load_state_dict(checkpoint[CHECKPOINT_MEMORY_BANK])


def _labeled(output, num_labeled: int):
    """The labeled part of a network output (a tensor, or a list of them with deep supervision)."""
    if isinstance(output, (list, tuple)):
        return [o[:num_labeled] for o in output]
    return output[:num_labeled]


def _full_resolution(output) -> torch.Tensor:
    """The full-resolution output (the first one with deep supervision)."""
    return output[0] if isinstance(output, (list, tuple)) else output
