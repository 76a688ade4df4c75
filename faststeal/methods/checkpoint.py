"""Per-epoch training checkpoints for :meth:`faststeal.methods.base.Method.fit`.

``fit(..., checkpoint=PATH)`` writes, after every finished epoch, one ``torch.save`` file holding
everything the rest of the training depends on: the weights, the optimizer state, the data-order
generator, torch's global RNG state(s) inside the fit's seeded block (CPU, and the CUDA device's
when training on one), the epoch and iteration counters, the trace so far, the latest loss, the
per-member index pool (bootstrap), the method's own mid-training state
(:meth:`Method._checkpoint_state`, e.g. SWAG's moments) and a *fingerprint* of the fit: method,
architecture, seed, hyperparameters, the fit arguments, the device type, and exact digests of the
data, the probe set and the initial weights. The file is written to a temporary name and moved
into place with :func:`os.replace`, so a kill never leaves a half-written checkpoint.

A later ``fit`` with the same ``checkpoint`` and the same arguments restores that state and goes
on with the next epoch; the result is bit-identical to an uninterrupted fit. A checkpoint written
by a different fit raises :class:`CheckpointError` (a ``ValueError``) naming the file and what
differs; an unreadable one raises it too. The file is NOT deleted when ``fit`` returns (the
caller removes it once the result is stored safely: :func:`faststeal.runs.run_comparison`
does so after the cell's row is committed).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from ..files import atomic_write

FORMAT = "faststeal-fit-checkpoint"
#: 2: zoo surrogates are stacked by faststeal.stack (state names of the plain zoo model); a
#: version-1 checkpoint of a zoo surrogate holds the old hand-built stack's state
VERSION = 2

#: at most this many evenly strided elements of a tensor enter its digest (cheap on big data)
DIGEST_ELEMENTS = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, or written by a different fit."""


def as_path(checkpoint: Any) -> Optional[str]:
    """Validate the ``checkpoint`` argument of ``fit``: None, or a str / os.PathLike file path."""
    if checkpoint is None:
        return None
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a str, an os.PathLike or None, got "
                        f"{type(checkpoint).__name__} ({checkpoint!r})")
    path = os.fspath(checkpoint)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError("checkpoint must be a non-empty file path")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a directory; give a file path")
    return path


def digest(t: Optional[Tensor]) -> Optional[str]:
    """Exact SHA-256 of a tensor's shape, dtype and an evenly strided sample of its elements.

    At most :data:`DIGEST_ELEMENTS` elements are hashed (every element of small tensors), so the
    cost stays small for a whole training set while any reordering, resampling or different data
    almost surely changes it. Bytes, not sums: the digest does not depend on thread counts.
    """
    if t is None:
        return None
    flat = t.detach().reshape(-1)
    step = max(1, -(-flat.numel() // DIGEST_ELEMENTS))
    sample = flat[::step].contiguous().cpu()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|{step}".encode())
    h.update(sample.view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def state_digest(state: Mapping[str, Tensor]) -> str:
    """One digest of a module ``state_dict`` (every entry, in key order)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(f"{key}={digest(state[key])};".encode())
    return "sha256:" + h.hexdigest()


def save(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file in the same folder + os.replace)."""
    atomic_write(path, lambda fh: torch.save({"format": FORMAT, "version": VERSION, **payload},
                                             fh))


def load(path: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save` (tensors on the CPU); CheckpointError if bad."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, unpickling refused, ...
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {exc}); delete it "
            f"to train from the start") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a faststeal fit checkpoint; delete it "
                              f"to train from the start")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state.get('version')!r}, "
                              f"this faststeal reads version {VERSION}; delete it to train from "
                              f"the start")
    return state


def check_fingerprint(path: str, saved: Any, current: dict[str, Any]) -> None:
    """Raise CheckpointError naming ``path`` and every entry where ``saved`` != ``current``."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path} has no fit fingerprint; delete it to train "
                              f"from the start")
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if isinstance(a, str) and isinstance(b, str) and a.startswith("sha256:") \
                and b.startswith("sha256:"):
            diffs.append(f"{key} (contents differ)")
        elif key == "hparams" and isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            diffs.append("hparams (" + ", ".join(
                f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in keys) + ")")
        else:
            diffs.append(f"{key} (checkpoint {a!r}, now {b!r})")
    if diffs:
        raise CheckpointError(f"checkpoint {path} was written by a different fit: "
                              f"{'; '.join(diffs)}. Delete it, or pass another checkpoint path, "
                              f"to train from the start")
