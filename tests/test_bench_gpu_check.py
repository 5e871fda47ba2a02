"""benchmarks/gpu_check.sh in its dry run (no CUDA here): every part runs its CPU-sized subset and writes the log,
JSON, CSV, Markdown and PNG; the GPU rows' code paths (bf16 autocast, the largest-batch rows) run on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_output(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    # a short test selection: the point is the script, not the op tests (they run in this suite anyway)
    tests = "tests/test_bench_honesty.py -k interleaved"
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run", "--tests", tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = (out / "gpu_check.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "DRY RUN on CPU" in log and "every part passed" in log and "== build: skipped in a dry run" in log
    for part in ("ops", "model"):
        for suffix in ("json", "csv", "md", "png"):
            assert (out / part / f"latest.{suffix}").stat().st_size > 0, (part, suffix)
    ops = json.loads((out / "ops" / "latest.json").read_text())
    assert {r["precision"] for r in ops["rows"]} == {"float32", "bf16-autocast"}
    assert {r["op"] for r in ops["rows"]} == {"ttl", "dense_block"}
    model = json.loads((out / "model" / "latest.json").read_text())
    assert model["meta"]["complete"] is True
    fit = [r for r in model["rows"] if r["pass"] == "fit"]
    assert [r["contender"] for r in fit] == ["eager", "fused"]
    assert all(r["status"].startswith("skipped: the largest batch that fits is measured on CUDA only") for r in fit)
    assert "largest training batch that fits" in (out / "model" / "latest.md").read_text()
