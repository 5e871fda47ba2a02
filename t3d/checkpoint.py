"""Training checkpoints: atomic writes, ``weights_only=True`` loads, RNG capture and restore.

A checkpoint is a plain dict of tensors and Python primitives, so ``torch.load(..., weights_only=True)`` can read
it (no pickled code runs on load). Layout written by :class:`t3d.training.Trainer` (other writers may add keys)::

    {
        "format": "t3d-checkpoint", "version": 1,
        "model": model.state_dict(),                # unwrapped from DDP ("module." never in keys)
        "optimizer": ..., "scheduler": ..., "scaler": ...,   # state_dicts, or None
        "rng": capture_rng_state(),                 # torch CPU (+ CUDA), numpy, python
        "epoch": int,                               # epoch in progress (0-based)
        "step": int,                                # optimizer steps done since the start of training
        "data": {"seed": int, "epoch": int, "position": int},  # batches of `epoch` already consumed
        "meta": {...},                              # model name, num_classes, clip, class names, args ...
    }

Public API: :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`capture_rng_state`, :func:`restore_rng_state`,
:func:`load_model_weights` (fine-tune init: matching keys, classifier re-initialised when its shape differs).
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "extract_state_dict",
    "load_model_weights",
]

CHECKPOINT_FORMAT = "t3d-checkpoint"


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as weights_only-loadable values.

    numpy's MT19937 state is stored as a tensor (numpy arrays are not allowed by ``weights_only=True``).
    """
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _python_state_to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state_to_lists(state: tuple) -> list:
    version, internal, gauss = state
    return [int(version), [int(v) for v in internal], gauss]


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    # a checkpoint loaded with map_location="cuda" moves these ByteTensors too; the setters need CPU tensors
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].cpu().numpy().astype(np.uint32),
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["cached_gaussian"]),
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> str:
    """Write ``state`` to ``path`` atomically: a temp file in the same directory, fsync, ``os.replace``.

    A crash at any moment leaves either the previous file or the new one, never a truncated file. Returns the
    path written.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # make the rename itself durable (directory entry); not possible on every platform
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; clear errors for a missing or unreadable file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: expected a checkpoint file, got {path!r} (no such file)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file's name
        raise ValueError(f"checkpoint: {path!r} is not a loadable torch checkpoint ({exc})") from exc
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint: expected a dict in {path!r}, got {type(state).__name__}")
    return state


def extract_state_dict(obj: Mapping[str, Any], keys: Iterable[str] = ("model", "student", "state_dict")) -> dict:
    """The model state_dict inside a loaded file: a t3d checkpoint ("model"), a transfer export ("student"),
    a {"state_dict": ...} wrapper or a bare state_dict. "module." prefixes (DDP) are stripped."""
    state: Any = obj
    for key in keys:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            state = obj[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"expected a state_dict (name -> tensor), or a dict holding one under one of {list(keys)}; "
            f"got {type(state).__name__} with keys {list(state)[:8] if isinstance(state, Mapping) else ''}"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_model_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    reinit_prefixes: Iterable[str] = ("classifier.",),
) -> dict[str, list[str]]:
    """Initialise ``model`` from a checkpoint/export file (or a loaded dict) for fine-tuning.

    Every key must match by name and shape, except under ``reinit_prefixes`` (the classifier): those are kept
    as initialised in ``model`` when absent or of another shape (e.g. 400 Kinetics classes -> 101 UCF101
    classes). Anything else that does not match raises a ValueError listing missing keys, unexpected keys and
    wrong shapes. Returns {"loaded": [...], "reinitialized": [...]}.
    """
    name = source if not isinstance(source, Mapping) else "<dict>"
    loaded = load_checkpoint(source) if not isinstance(source, Mapping) else source
    try:
        state = extract_state_dict(loaded)
    except ValueError as exc:
        raise ValueError(f"--init: {name!r}: {exc}") from exc
    prefixes = tuple(reinit_prefixes)
    own = model.state_dict()
    reinit = sorted(k for k in own if k.startswith(prefixes) and (k not in state or state[k].shape != own[k].shape))
    state = {k: v for k, v in state.items() if k not in reinit}
    missing = sorted(set(own) - set(state) - set(reinit))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k}: model {tuple(own[k].shape)}, file {tuple(state[k].shape)}"
        for k in sorted(own)
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(
                f"unexpected keys ({len(unexpected)}): {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
            )
        if wrong:
            parts.append(f"wrong shapes ({len(wrong)}): {wrong[:10]}{' ...' if len(wrong) > 10 else ''}")
        raise ValueError(f"--init: {name!r} does not match {type(model).__name__}: " + "; ".join(parts))
    for k in reinit:
        state[k] = own[k]
    model.load_state_dict(state)
    return {"loaded": sorted(k for k in state if k not in reinit), "reinitialized": reinit}
