"""The labeled memory bank of CAML's Omni-Correlation Consistency (OCC).

Each labeled case contributes the embeddings of the voxels that both networks classified correctly, stored by case
and class. Every update of a case replaces what that case stored before, so the bank always reflects the networks'
current embedding of each labeled case. The bank lives on the training device.

Difference to the paper's code: the paper keeps *every* correctly classified voxel of the last patch of a case (on
the CPU). nnU-Net's patches are far larger (up to millions of voxels), so here each case keeps a uniform random
subset of at most ``entries_per_case`` voxels per class. Sampling from the bank stays uniform over stored entries.

Multi-GPU (``-num_gpus N``): each rank sees other labeled cases, yet OCC on every rank must correlate against every
labeled case seen anywhere. :meth:`LabeledMemoryBank.store_from_every_rank` therefore applies every rank's update on
every rank, in rank order, with the very tensors the rank chose (nothing is drawn again after the exchange), so the
banks stay bitwise identical.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from nnunetv2_caml.distributed import gather_rows


class LabeledMemoryBank:
    """Per-case, per-class store of labeled voxel embeddings.

    Storage is one preallocated tensor ``[classes, cases, entries_per_case, D]`` plus the number of entries each case
    holds per class, so updating a case overwrites its slots and sampling indexes the stored entries in place (no
    concatenation of the bank per step). Room for more cases is added by doubling when a new case id arrives.

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
        self.device = torch.device(device)
        self._allocate(entries_per_case)

    def _allocate(self, entries_per_case: int, capacity: int = 0) -> None:
        self.entries_per_case = entries_per_case
        self._rows: Dict[str, int] = {}  # case id -> its row in the storage
        self._embeddings = torch.zeros(self.num_classes, capacity, entries_per_case, self.embedding_dim,
                                       device=self.device)
        self._counts = torch.zeros(self.num_classes, capacity, dtype=torch.long, device=self.device)

    def _row(self, case_id: str) -> int:
        """The storage row of ``case_id``, adding one (and doubling the room when full) for a new case."""
        if case_id not in self._rows:
            capacity = self._counts.shape[1]
            if len(self._rows) == capacity:
                grow = max(capacity, 8)
                self._embeddings = torch.cat((self._embeddings, self._embeddings.new_zeros(
                    self.num_classes, grow, self.entries_per_case, self.embedding_dim)), dim=1)
                self._counts = torch.cat((self._counts, self._counts.new_zeros(self.num_classes, grow)), dim=1)
            self._rows[case_id] = len(self._rows)
        return self._rows[case_id]

    def update(self, case_id: str, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Replace what ``case_id`` stored with a uniform random subset (see :meth:`indices_to_store`) of
        ``embeddings`` ``[N, D]`` of classes ``labels`` ``[N]``."""
        self._check_entries(embeddings, labels)
        keep = self.indices_to_store(labels)
        self.store(case_id, embeddings[keep], labels[keep])

    def store(self, case_id: str, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Replace what ``case_id`` stored with exactly ``embeddings`` ``[N, D]`` of classes ``labels`` ``[N]``, in
        their order: at most ``entries_per_case`` per class (what :meth:`indices_to_store` keeps); labels outside
        ``0..num_classes-1`` are dropped."""
        self._check_entries(embeddings, labels)
        embeddings = embeddings.detach().to(self.device, torch.float32)
        labels = labels.to(self.device)
        of_class = [embeddings[labels == c] for c in range(self.num_classes)]
        if max(e.shape[0] for e in of_class) > self.entries_per_case:
            raise ValueError(f"case {case_id}: more than entries_per_case={self.entries_per_case} entries of a class; "
                             f"choose them with indices_to_store (or use update)")
        row = self._row(str(case_id))
        for c, entries in enumerate(of_class):
            self._embeddings[c, row, :entries.shape[0]] = entries
            self._counts[c, row] = entries.shape[0]

    def store_from_every_rank(self, updates: Sequence[Tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        """:meth:`store` each ``(case_id, embeddings, labels)`` of ``updates`` and, in a multi-GPU run, every other
        rank's too: all ranks' updates are gathered and applied in rank order on every rank, so every bank ends up
        bitwise identical. Without a process group this stores ``updates`` in their order."""
        rows = torch.cat([torch.cat((e.detach().float(), l.to(e.device, torch.float32)[:, None]), 1)
                          for _, e, l in updates]) if updates else \
            torch.zeros(0, self.embedding_dim + 1, device=self.device)
        # one [N, D + 1] tensor per rank: the embeddings with their class as a last column (small integers are exact
        # in float32), and which rows belong to which case
        info = [(str(case_id), e.shape[0]) for case_id, e, _ in updates]
        for rank_rows, rank_info in gather_rows(rows, info):
            for (case_id, _), entries in zip(rank_info, rank_rows.split([n for _, n in rank_info])):
                self.store(case_id, entries[:, :-1], entries[:, -1].long())

    def _check_entries(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"expected embeddings of shape [N, {self.embedding_dim}], got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match embeddings {tuple(embeddings.shape)}")

    def snapshot(self, case_ids: Sequence[str]) -> tuple:
        """What :meth:`update` of ``case_ids`` can change, for :meth:`restore` (e.g. after a non-finite step)."""
        rows = sorted({self._rows[str(c)] for c in case_ids if str(c) in self._rows})
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        return dict(self._rows), index, self._embeddings[:, index].clone(), self._counts[:, index].clone()

    def restore(self, snapshot: tuple) -> None:
        """Undo every :meth:`update` since :meth:`snapshot` of the same cases (cases added since are forgotten)."""
        rows, index, embeddings, counts = snapshot
        for case in set(self._rows) - set(rows):
            self._counts[:, self._rows[case]] = 0
        self._rows = dict(rows)
        self._embeddings[:, index] = embeddings
        self._counts[:, index] = counts

    def indices_to_store(self, labels: torch.Tensor) -> torch.Tensor:
        """Which of the voxels with classes ``labels`` ``[N]`` a case keeps: a uniform random subset of at most
        ``entries_per_case`` per class (labels outside ``0..num_classes-1`` are dropped)."""
        kept = []
        for c in range(self.num_classes):
            of_class = torch.nonzero(labels == c, as_tuple=True)[0]
            kept.append(of_class[torch.randperm(of_class.numel(), device=labels.device)[:self.entries_per_case]])
        return torch.cat(kept)

    def _stored(self, c: int) -> torch.Tensor:
        """Flat indices into ``self._embeddings[c].view(-1, D)`` of every entry stored for class ``c``."""
        counts = self._counts[c, :len(self._rows)]
        slots = torch.arange(self.entries_per_case, device=self.device)
        return torch.nonzero((slots[None] < counts[:, None]).flatten(), as_tuple=True)[0]

    def sample(self, num_per_class: int) -> List[Optional[torch.Tensor]]:
        """Draw ``num_per_class`` entries per class uniformly without replacement from all stored entries.

        A class with fewer stored entries contributes all it has; a class with fewer than 2 entries is ``None``.
        """
        sampled: List[Optional[torch.Tensor]] = []
        for c in range(self.num_classes):
            stored = self._stored(c)
            if stored.numel() < 2:
                sampled.append(None)
                continue
            if stored.numel() > num_per_class:
                stored = stored[torch.randperm(stored.numel(), device=self.device)[:num_per_class]]
            sampled.append(self._embeddings[c].view(-1, self.embedding_dim)[stored])
        return sampled

    def fill(self) -> List[int]:
        """Number of stored entries per class."""
        return self._counts.sum(1).tolist()

    @property
    def case_ids(self) -> List[str]:
        return sorted(self._rows)

    def state_dict(self) -> dict:
        """Everything needed to restore the bank, on the CPU (for checkpoints)."""
        counts = self._counts.cpu()
        embeddings = self._embeddings.cpu()
        return {
            "num_classes": self.num_classes,
            "embedding_dim": self.embedding_dim,
            "entries_per_case": self.entries_per_case,
            "entries": {case: [embeddings[c, row, :counts[c, row]].clone() for c in range(self.num_classes)]
                        for case, row in self._rows.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a bank saved by :meth:`state_dict`; classes and embedding size must match this bank's. The bank
        keeps its own ``entries_per_case``: a case that stored more keeps a uniform random subset, the same one on
        every rank."""
        for key in ("num_classes", "embedding_dim"):
            if state[key] != getattr(self, key):
                raise ValueError(f"memory bank in checkpoint has {key}={state[key]}, this trainer uses "
                                 f"{getattr(self, key)}")
        self._allocate(self.entries_per_case, len(state["entries"]))
        subsets = torch.Generator().manual_seed(0)  # the same subsets on every rank of a multi-GPU run
        for case, per_class in state["entries"].items():
            row = self._row(case)
            for c, entries in enumerate(per_class):
                if entries.shape[0] > self.entries_per_case:
                    entries = entries[torch.randperm(entries.shape[0], generator=subsets)[:self.entries_per_case]]
                self._embeddings[c, row, :entries.shape[0]] = entries.to(self.device)
                self._counts[c, row] = entries.shape[0]
