"""The transfer's product: the student's weights as a file that ``t3d train --init`` fine-tunes."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..checkpoint import load_checkpoint, save_checkpoint
from ..models import T3D
from .matching import TransferModel

__all__ = ["EXPORT_FORMAT", "export_student", "export_from_checkpoint"]

EXPORT_FORMAT = "t3d-transfer-student"


def export_student(model: TransferModel | T3D, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> str:
    """Write the student's weights (without its unused classifier) atomically to ``path`` as
    ``{"format": EXPORT_FORMAT, "version": 1, "student": state_dict, "meta": meta}``; ``t3d train --init`` loads
    it (the fine-tune classifier starts fresh). Returns the path."""
    student = model.student if isinstance(model, TransferModel) else model
    state = {k: v.detach().cpu() for k, v in student.state_dict().items() if not k.startswith("classifier.")}
    return save_checkpoint({"format": EXPORT_FORMAT, "version": 1, "student": state, "meta": dict(meta or {})}, path)


def export_from_checkpoint(checkpoint: str | os.PathLike, path: str | os.PathLike) -> str:
    """Export the student of a ``t3d transfer`` training checkpoint (e.g. ``runs/x/last.pt``) to ``path``."""
    ckpt = load_checkpoint(checkpoint)
    model_state = ckpt.get("model")
    if not isinstance(model_state, Mapping) or not any(k.startswith("student.") for k in model_state):
        raise ValueError(
            f"checkpoint: expected a t3d transfer checkpoint (keys 'student.*'), got {os.fspath(checkpoint)!r}"
        )
    state = {
        k.removeprefix("student."): v
        for k, v in model_state.items()
        if k.startswith("student.") and not k.startswith("student.classifier.")
    }
    meta = dict(ckpt.get("meta") or {})
    return save_checkpoint({"format": EXPORT_FORMAT, "version": 1, "student": state, "meta": meta}, path)
