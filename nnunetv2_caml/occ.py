"""Omni-Correlation Consistency (OCC): heads, memory bank and the loss ``L_o`` for a pair of networks.

Per network a projection head and a prediction head (``Linear - BatchNorm1d - ReLU - Linear``) turn voxel features
into embeddings. Labeled voxels that both networks classify correctly feed the :class:`LabeledMemoryBank` (mean of the
two projections, heads in eval mode, no gradient). Unlabeled voxels on which both networks agree become rows of each
network's omni-correlation matrix against entries sampled from the bank; ``L_o`` asks the main network's matrix to
match the auxiliary network's.

Difference to the paper's code: the paper projects *every* agreeing unlabeled voxel and then keeps the ``top_k`` most
confident per class. Here the ``top_k`` are chosen first (the choice depends only on the predictions) and only they
are projected, which keeps the heads' cost independent of nnU-Net's patch size. The heads' BatchNorm therefore sees
the selected voxels rather than all agreeing ones.

Multi-GPU: each rank selects its ``top_k`` from its own unlabeled patches, and the heads' BatchNorm normalises them
with that rank's batch statistics; not ``SyncBatchNorm``, which needs every rank to run the heads in every step,
while a rank whose unlabeled patches hold no agreeing voxel skips them. The trainer
averages the heads' gradients and running statistics over the ranks after each step
(:mod:`nnunetv2_caml.distributed`), so the eval-mode heads that embed the bank's entries are the same on every rank.
"""
from typing import Sequence

import torch
from torch import nn

from nnunetv2_caml.losses import correlation_columns, most_confident_per_class, omni_correlation_consistency
from nnunetv2_caml.memory_bank import LabeledMemoryBank


def embedding_head(in_features: int, embedding_dim: int) -> nn.Sequential:
    """``Linear(F, D) - BatchNorm1d(D) - ReLU - Linear(D, D)``: the shape of both the projection and prediction head."""
    return nn.Sequential(nn.Linear(in_features, embedding_dim), nn.BatchNorm1d(embedding_dim), nn.ReLU(inplace=True),
                         nn.Linear(embedding_dim, embedding_dim))


def gather_voxels(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of the ``[B * prod(spatial), F]`` voxel matrix (batch-major) of ``features`` ``[B, F, *spatial]``,
    as ``[len(index), F]``: gathered in place, without copying every voxel's features first (on real nnU-Net patches
    that copy is hundreds of MB per network)."""
    per_sample = features[0, 0].numel()
    return features.flatten(2)[index // per_sample, :, index % per_sample]


class OmniCorrelationConsistency(nn.Module):
    """OCC for the main and the auxiliary network.

    Args:
        feature_channels: channels ``F`` of the features that feed each network's segmentation head.
        num_classes: number of segmentation classes (including background).
        embedding_dim: embedding size ``D`` (paper: 32).
        temperature: ``tau`` of the correlation softmax (paper: 0.1).
        top_k: unlabeled voxels per class (paper: 12800).
        memory_per_class: memory entries sampled per class and step (paper: 256).
        memory_entries_per_case: stored embeddings per labeled case and class (see :mod:`nnunetv2_caml.memory_bank`).
    """

    def __init__(self, feature_channels: int, num_classes: int, embedding_dim: int = 32, temperature: float = 0.1,
                 top_k: int = 12800, memory_per_class: int = 256, memory_entries_per_case: int = 4096,
                 device: torch.device = torch.device("cpu")):
        super().__init__()
        self.num_classes = num_classes
        self.temperature = temperature
        self.top_k = top_k
        self.memory_per_class = memory_per_class
        self.projection_main = embedding_head(feature_channels, embedding_dim)
        self.prediction_main = embedding_head(embedding_dim, embedding_dim)
        self.projection_aux = embedding_head(feature_channels, embedding_dim)
        self.prediction_aux = embedding_head(embedding_dim, embedding_dim)
        self.memory_bank = LabeledMemoryBank(num_classes, embedding_dim, memory_entries_per_case, device)

    @torch.no_grad()
    def update_memory(self, features_main: torch.Tensor, features_aux: torch.Tensor, pred_main: torch.Tensor,
                      pred_aux: torch.Tensor, target: torch.Tensor, case_ids: Sequence[str]) -> None:
        """Store, per labeled case, embeddings of the voxels both networks got right; in a multi-GPU run every rank's
        cases, on every rank (:meth:`LabeledMemoryBank.store_from_every_rank`).

        ``features_*``: ``[B_l, F, *spatial]``; ``pred_*`` and ``target``: ``[B_l, *spatial]`` class indices
        (target voxels outside ``0..num_classes-1``, e.g. nnU-Net's ignore label, are never stored).
        """
        heads_were_training = self.training
        self.projection_main.eval()
        self.projection_aux.eval()
        updates = []
        for i, case_id in enumerate(case_ids):
            correct = (pred_main[i] == target[i]) & (pred_aux[i] == target[i]) & (target[i] < self.num_classes)
            correct = torch.nonzero(correct.flatten(), as_tuple=True)[0]
            labels = target[i].flatten()[correct]
            # choose what the bank will keep before projecting: eval-mode heads act per voxel, so this gives the
            # same embeddings as projecting every correct voxel first
            keep = self.memory_bank.indices_to_store(labels)
            f_main = gather_voxels(features_main[i:i + 1], correct[keep]).float()
            f_aux = gather_voxels(features_aux[i:i + 1], correct[keep]).float()
            embeddings = (self.projection_main(f_main) + self.projection_aux(f_aux)) / 2
            updates.append((case_id, embeddings, labels[keep]))
        self.memory_bank.store_from_every_rank(updates)  # multi-GPU: every rank's cases reach every rank's bank
        self.train(heads_were_training)

    def forward(self, features_main: torch.Tensor, features_aux: torch.Tensor, probs_main: torch.Tensor,
                probs_aux: torch.Tensor) -> torch.Tensor:
        """``L_o`` on unlabeled voxels: ``features_*`` ``[B_u, F, *spatial]``, ``probs_*`` ``[B_u, C, *spatial]``.

        Zero when no voxel or no memory class is available.
        """
        confidence, label_main = probs_main.detach().max(1)
        label_aux = probs_aux.detach().max(1).indices  # argmax over dim 1 is ~25x slower than max on the CPU
        agree = (label_main == label_aux).flatten()
        confidence, pseudo_label = confidence.flatten()[agree], label_main.flatten()[agree]
        rows = most_confident_per_class(confidence, pseudo_label, self.num_classes, self.top_k)
        memory = correlation_columns(self.memory_bank.sample(self.memory_per_class))
        if rows.numel() == 0 or memory is None:
            return features_main.new_zeros(())
        # the rows of both networks' omni-correlation matrices: the selected voxels (their order does not matter)
        selected = torch.nonzero(agree, as_tuple=True)[0][rows]
        embeddings_main, embeddings_aux = (
            prediction(projection(gather_voxels(features, selected).float()))
            for features, projection, prediction in ((features_main, self.projection_main, self.prediction_main),
                                                     (features_aux, self.projection_aux, self.prediction_aux)))
        # the auxiliary network's matrix is the target, the main network's the prediction
        return omni_correlation_consistency(embeddings_aux, embeddings_main, memory, self.temperature)
