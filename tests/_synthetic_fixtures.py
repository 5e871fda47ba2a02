"""Helpers shared by the data / training / distributed tests (tiny synthetic videos; no fixtures registered here)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import numpy as np
import torch

from t3d.data import write_video
from t3d.synthetic import make_synthetic, render_motion_clip

# 2 classes (MoveRight / MoveLeft, time-reversal twins), 16 train + 8 test videos per class, 20 frames of 40x40
SYNTHETIC = dict(num_classes=2, train_per_class=16, test_per_class=8, frames=20, size=40, seed=0)
CLIP = "16x32x32"


def make_dataset(root: str, **overrides) -> str:
    make_synthetic(root, **{**SYNTHETIC, **overrides})
    return root


def write_motion_video(path: str, frames: int = 20, size: int = 40, seed: int = 0) -> np.ndarray:
    video = render_motion_clip((0, 1), frames, size, np.random.default_rng(seed))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_video(path, video)
    return video


@contextlib.contextmanager
def keep_threads():
    """`t3d train --threads 1` sets torch's global thread count: restore it for the rest of the test session."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


def torchrun(cmd: list[str], env: dict[str, str], timeout: float = 400) -> subprocess.CompletedProcess:
    """Run a torchrun command; once more if a process aborted in gloo's teardown after the run was done (torch 2.13
    sometimes aborts at interpreter exit with "terminate called without an active exception", after the final
    barrier and checkpoint: see t3d.distributed.cleanup). Any other failure is returned as it is."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and "done: step" in proc.stdout and "terminate called without an active" in proc.stderr:
        shutil.rmtree(cmd[cmd.index("--out") + 1])  # a fresh run, not a second log line
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc
