"""Multi-process training: ``torchrun --nproc_per_node 2 -m t3d train`` on CPU (gloo) equals one process with the
same global batch.

BatchNorm: with DDP each process normalizes with the statistics of its own half of the global batch, and
SyncBatchNorm cannot reach the BN inside the fused TTL / dense-block ops. So the comparison uses ``--freeze-bn``
(BN uses its running statistics, identical in every process): then the gradient of the global batch is exactly the
mean of the two halves' gradients, and

- one process with batch 4 x 2 accumulation steps does the same arithmetic as DDP (each half's mean loss / 2,
  summed; DDP: all-reduce sum / 2): the weights must be *bitwise* equal;
- one process with batch 8 differs only in the order of the float32 sums of the batch mean: equal to a tolerance
  of float32 rounding (observed: 6e-8 absolute on weights of magnitude ~1).
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
from _synthetic_fixtures import CLIP, keep_threads, make_dataset, torchrun

from t3d.checkpoint import load_checkpoint
from t3d.cli import main as cli_main
from t3d.distributed import DistContext, all_reduce_sum, init_distributed
from t3d.models import build_model
from t3d.training import seed_everything
from t3d_kernels import DenseBlock3d, TemporalTransition, backends
from t3d_kernels.backends import resolve

ARGS = [
    "--model",
    "t3d_tiny",
    "--backend",
    "reference",
    "--clip",
    CLIP,
    "--epochs",
    "1",
    "--lr",
    "0.05",
    "--freeze-bn",
    "--no-progress",
    "--threads",
    "1",
    "--workers",
    "0",
]


def _params(path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)["model"]
    return {k: v for k, v in state.items() if v.is_floating_point()}


def test_single_process_context(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed, ctx.backend) == (0, 1, True, False, None)
    x = torch.arange(3.0)
    assert all_reduce_sum(x, DistContext()) is x
    with pytest.raises(ValueError, match="--device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        init_distributed("tpu-ish:x")


@pytest.mark.slow
def test_two_process_gloo_equals_one_process_same_global_batch(tmp_path):
    data = make_dataset(str(tmp_path / "syn"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "t3d",
        "train",
        data,
        "--out",
        str(tmp_path / "ddp"),
        *ARGS,
        "--batch-size",
        "4",
    ]
    proc = torchrun(cmd, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "global batch 8 (2 process(es)" in proc.stdout
    with keep_threads(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main(["train", data, "--out", str(tmp_path / "one"), *ARGS, "--batch-size", "8"]) == 0
        assert (
            cli_main(
                ["train", data, "--out", str(tmp_path / "accum"), *ARGS, "--batch-size", "4", "--accum-steps", "2"]
            )
            == 0
        )
    # rank 0 alone writes: one checkpoint, one log line per epoch
    assert sorted(os.listdir(tmp_path / "ddp")) == ["last.pt", "log.jsonl"]
    assert len((tmp_path / "ddp" / "log.jsonl").read_text().splitlines()) == 1
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ckpt["meta"]["world_size"] == 2 and ckpt["step"] == 4
    ddp, one, accum = (
        _params(tmp_path / "ddp" / "last.pt"),
        _params(tmp_path / "one" / "last.pt"),
        _params(tmp_path / "accum" / "last.pt"),
    )
    initial = _params_after_zero_steps(data, tmp_path)
    moved = max((ddp[k] - initial[k]).abs().max().item() for k in ddp)
    assert moved > 1e-3  # training really happened
    eps = torch.finfo(torch.float32).eps
    for k in ddp:
        assert torch.equal(ddp[k], accum[k]), k
        # float32 summation order of the batch mean only: within 8 ulps of the weights' magnitude per step
        tol = 8 * eps * ckpt["step"] * one[k].abs().max().item()
        assert (ddp[k] - one[k]).abs().max().item() <= tol, k


def _params_after_zero_steps(data, tmp_path) -> dict[str, torch.Tensor]:
    """The initial weights of the runs above (same seed): a run stopped before its first step."""
    seed_everything(0)
    model = build_model("t3d_tiny", 2, "reference")
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


SYNC_ARGS = ["--clip", CLIP, "--epochs", "1", "--lr", "0.05", "--no-progress", "--threads", "1", "--workers", "0"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,backend,stats", [("frame2d", "auto", 3), ("t3d_tiny", "composite", 17), ("t3d_tiny", "auto", 17)]
)
def test_sync_bn_two_processes_equal_one_process_with_the_whole_batch(tmp_path, model, backend, stats):
    """--sync-bn WITHOUT --freeze-bn: 2 gloo processes x batch 4 normalise with the statistics of all 8 clips, so
    the trained weights and the BN running statistics equal 1 process x batch 8 up to float32 summation order
    (measured: weights <= 5e-6, running stats <= 1.5e-4 relative; without --sync-bn the frame2d runs differ by up
    to 8e-3, running stats by 4e-2).
    frame2d: plain BN modules only (t3d.training.SyncBatchNorm); t3d_tiny on the composite backend and on auto (the
    compiled cpu kernels, where built): the fused TTLs and dense blocks synchronise inside their ops
    (t3d_kernels.convert_sync_batchnorm), the stem and final BN through SyncBatchNorm. (The reference backend
    refuses a process group: below.)"""
    data = make_dataset(str(tmp_path / "syn"))
    args = ["--model", model, "--backend", backend, *SYNC_ARGS]
    if model == "t3d_tiny" and backend == "auto":  # auto picks the compiled kernels under --sync-bn where built
        expected = {op: "cpu" if "cpu" in backends(op) else "composite" for op in ("ttl", "dense_block")}
        for name, m in build_model(model, 2, backend).named_modules():
            if isinstance(m, (TemporalTransition, DenseBlock3d)):
                assert resolve(m._op, m.backend, torch.device("cpu"), group=True) == expected[m._op], name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "t3d"]
    cmd += ["train", data, "--out", str(tmp_path / "sync"), *args, "--batch-size", "4", "--sync-bn"]
    proc = torchrun(cmd, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with keep_threads():
        assert cli_main(["train", data, "--out", str(tmp_path / "one"), *args, "--batch-size", "8"]) == 0
    sync, one = load_checkpoint(tmp_path / "sync" / "last.pt"), load_checkpoint(tmp_path / "one" / "last.pt")
    assert sync["step"] == one["step"] == 4 and sync["meta"]["train_config"]["sync_bn"] is True
    assert sync["model"].keys() == one["model"].keys()  # the converted modules keep BatchNorm's state_dict keys
    assert len([k for k in one["model"] if k.endswith("running_var")]) == stats
    for k, v in one["model"].items():
        if v.is_floating_point():
            # float32 summation order, amplified by 4 steps of batch-statistics BN (measured: weights <= 5e-6,
            # T3D's stem running mean 5e-5); 1e-4 is still 1/80 of frame2d's unsynchronised weight difference and
            # 1/400 of its running-statistics one. Relative for the large stem running variances.
            tol = 1e-4 * max(1.0, v.abs().max().item())
            assert (sync["model"][k] - v).abs().max().item() <= tol, k
        else:
            assert torch.equal(sync["model"][k], v), k  # num_batches_tracked


@pytest.mark.parametrize("backend", ["reference"])
def test_sync_bn_refuses_backends_that_cannot_synchronise(tmp_path, capsys, backend):
    """A fused backend without process-group support is a clear --sync-bn error before training, not a silently
    per-process BN or a traceback at the first step."""
    data = make_dataset(str(tmp_path / "syn"), num_classes=2, train_per_class=2, test_per_class=1)
    argv = ["train", data, "--out", str(tmp_path / "x"), "--model", "t3d_tiny", "--backend", backend, *SYNC_ARGS]
    with keep_threads():
        assert cli_main([*argv, "--batch-size", "2", "--sync-bn"]) == 2
    assert f"--sync-bn: features.denseblock1: backend: '{backend}'" in capsys.readouterr().err
