"""The labeled memory bank of CAML's Omni-Correlation Consistency (OCC).

Each labeled case contributes the embeddings of the voxels that both networks classified correctly, stored by case
and class. Every update of a case replaces what that case stored before, so the bank always reflects the networks'
current embedding of each labeled case. The bank lives on the training device.

Difference to the paper's code: the paper keeps *every* correctly classified voxel of the last patch of a case (on
the CPU). nnU-Net's patches are far larger (up to millions of voxels), so here each case keeps a uniform random
subset of at most ``entries_per_case`` voxels per class. Sampling from the bank stays uniform over stored entries.
"""
from typing import Dict, List, Optional

import torch


class LabeledMemoryBank:
    """Per-case, per-class store of labeled voxel embeddings.

    Args:
        num_classes: number of classes (including background).
        embedding_dim: length ``D`` of each embedding.
        entries_per_case: at most this many embeddings are kept per case and class.
        device: where the entries live (the training device).
    """

    def __init__(self, num_classes: int, embedding_dim: int, entries_per_case: int = 4096,
                 device: torch.device = torch.device("cpu")):
        if num_classes < 1 or embedding_dim < 1 or entries_per_case < 1:
            raise ValueError("num_classes, embedding_dim and entries_per_case must be positive")
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.entries_per_case = entries_per_case
        self.device = torch.device(device)
        self._entries: Dict[str, List[torch.Tensor]] = {}

    def update(self, case_id: str, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Replace what ``case_id`` stored with ``embeddings`` ``[N, D]`` of classes ``labels`` ``[N]``."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"expected embeddings of shape [N, {self.embedding_dim}], got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match embeddings {tuple(embeddings.shape)}")
        keep = self.indices_to_store(labels)
        embeddings = embeddings.detach()[keep].to(self.device, torch.float32)
        labels = labels[keep].to(self.device)
        self._entries[str(case_id)] = [embeddings[labels == c] for c in range(self.num_classes)]

    def indices_to_store(self, labels: torch.Tensor) -> torch.Tensor:
        """Which of the voxels with classes ``labels`` ``[N]`` a case keeps: a uniform random subset of at most
        ``entries_per_case`` per class (labels outside ``0..num_classes-1`` are dropped)."""
        kept = []
        for c in range(self.num_classes):
            of_class = torch.nonzero(labels == c, as_tuple=True)[0]
            kept.append(of_class[torch.randperm(of_class.numel(), device=labels.device)[:self.entries_per_case]])
        return torch.cat(kept)

    def sample(self, num_per_class: int) -> List[Optional[torch.Tensor]]:
        """Draw ``num_per_class`` entries per class uniformly without replacement from all stored entries.

        A class with fewer stored entries contributes all it has; a class with fewer than 2 entries is ``None``.
        """
        sampled: List[Optional[torch.Tensor]] = []
        for c in range(self.num_classes):
            stored = [per_class[c] for per_class in self._entries.values() if per_class[c].shape[0] > 0]
            if not stored:
                sampled.append(None)
                continue
            pool = torch.cat(stored, dim=0)
            if pool.shape[0] < 2:
                sampled.append(None)
            elif pool.shape[0] > num_per_class:
                sampled.append(pool[torch.randperm(pool.shape[0], device=self.device)[:num_per_class]])
            else:
                sampled.append(pool)
        return sampled

    def fill(self) -> List[int]:
        """Number of stored entries per class."""
        return [sum(int(per_class[c].shape[0]) for per_class in self._entries.values())
                for c in range(self.num_classes)]

    @property
    def case_ids(self) -> List[str]:
        return sorted(self._entries)

    def state_dict(self) -> dict:
        """Everything needed to restore the bank, on the CPU (for checkpoints)."""
        return {
            "num_classes": self.num_classes,
            "embedding_dim": self.embedding_dim,
            "entries_per_case": self.entries_per_case,
            "entries": {k: [t.cpu() for t in v] for k, v in self._entries.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a bank saved by :meth:`state_dict`; its shape must match this bank's."""
        for key in ("num_classes", "embedding_dim"):
            if state[key] != getattr(self, key):
                raise ValueError(f"memory bank in checkpoint has {key}={state[key]}, this trainer uses "
                                 f"{getattr(self, key)}")
        self.entries_per_case = state["entries_per_case"]
        self._entries = {k: [t.to(self.device) for t in v] for k, v in state["entries"].items()}
