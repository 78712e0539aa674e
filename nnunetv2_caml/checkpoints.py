"""Crash-safe CAML checkpoints.

A CAML checkpoint is nnU-Net's checkpoint (``network_weights`` = the main network, so ``nnUNetv2_predict`` and
``--val`` use it unchanged) plus CAML's state under the keys below. It is written once, complete, to a hidden
temporary file beside its final name and then renamed over it (:func:`save_atomically`): whenever a run is killed,
the folder holds the complete previous or the complete new checkpoint, never a partial one.
"""
import hashlib
import os
from typing import Dict, Iterable, Sequence, Tuple

import torch

from nnunetv2_caml.errors import CAMLError

#: checkpoint keys of CAML's extra state
CHECKPOINT_AUXILIARY_NETWORK = "caml_auxiliary_network_weights"
CHECKPOINT_OCC_HEADS = "caml_occ_heads"
CHECKPOINT_MEMORY_BANK = "caml_memory_bank"
CHECKPOINT_SETTINGS = "caml_settings"
#: what a checkpoint needs to resume CAML (the settings are only reported: older checkpoints lack them)
CAML_STATE_KEYS = (CHECKPOINT_AUXILIARY_NETWORK, CHECKPOINT_OCC_HEADS, CHECKPOINT_MEMORY_BANK)


class CAMLCheckpointError(CAMLError):
    """A checkpoint cannot be read, or cannot be resumed by CAML."""


def temporary_name(filename: str) -> str:
    """The hidden file a checkpoint is written to before it is renamed to ``filename``."""
    folder, name = os.path.split(os.path.abspath(filename))
    return os.path.join(folder, f".{name}.partial")


def save_atomically(checkpoint: dict, filename: str) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed to ``filename``."""
    temporary = temporary_name(filename)
    with open(temporary, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, filename)
    try:  # make the rename itself durable (POSIX; not possible on Windows)
        folder = os.open(os.path.dirname(temporary), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)


def read_checkpoint(filename: str, map_location) -> dict:
    """Load a checkpoint, turning an unreadable (truncated, empty, corrupt) file into a one-line error."""
    try:
        checkpoint = torch.load(filename, map_location=map_location, weights_only=False)
    except Exception as e:  # EOFError (empty), RuntimeError (truncated zip), UnpicklingError (garbage), ...
        reason = f"{type(e).__name__}: {e}".replace("\n", " ")
        raise CAMLCheckpointError(
            f"cannot read checkpoint {filename} ({reason}): the file is truncated or corrupt; move it away and rerun "
            f"(--c then resumes from the next checkpoint nnU-Net finds: checkpoint_final, _latest, _best)") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise CAMLCheckpointError(f"{filename} is not an nnU-Net checkpoint (no 'network_weights'): move it away")
    return checkpoint


def has_caml_state(checkpoint: dict) -> bool:
    return all(k in checkpoint for k in CAML_STATE_KEYS)


def tensors_digest(named_tensors: Iterable[Tuple[str, Sequence[torch.Tensor]]]) -> str:
    """Short hash of named groups of tensors (names, dtypes, shapes and bytes): equal digests mean bit-identical
    tensors."""
    digest = hashlib.sha1()
    for name, tensors in named_tensors:
        digest.update(name.encode())
        for t in tensors:
            t = t.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def weights_digest(weights: Dict[str, torch.Tensor]) -> str:
    """:func:`tensors_digest` of a ``state_dict``."""
    return tensors_digest((key, [weights[key]]) for key in sorted(weights))


def caml_state_digest(auxiliary_network_weights: Dict[str, torch.Tensor], occ_heads: Dict[str, torch.Tensor],
                      memory_bank: dict) -> str:
    """Short hash of CAML's state (auxiliary network, OCC heads, memory bank entries), as the trainer logs it after a
    resume: equal digests mean bit-identical state."""
    return tensors_digest([*((key, [weights[key]]) for weights in (auxiliary_network_weights, occ_heads)
                             for key in sorted(weights)),
                           *((case, memory_bank["entries"][case]) for case in sorted(memory_bank["entries"]))])
