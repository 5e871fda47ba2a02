"""Fast tests of the benchmark harness and the t3d-bench command (tiny shapes; no timing thresholds)."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from rich.console import Console

import benchmarks.cli as cli
from benchmarks import bench_model, bench_ttl
from benchmarks.harness import (
    COLUMNS,
    BenchConfig,
    Case,
    Contender,
    Skip,
    Timing,
    check_fail_if_slower,
    count_flops,
    print_table,
    run_cases,
    saved_tensor_bytes,
    time_callable,
    write_plot,
)

TINY_TTL = "ttl:1,8,4,6,6:1,3:6"


@pytest.fixture(autouse=True)
def _quiet_machine(monkeypatch):
    """These tests check the outputs, not the measurement: a busy test machine must not turn their rows noisy
    (tests/test_bench_honesty.py checks that with a fake probe)."""
    from benchmarks.timing import CpuContention

    monkeypatch.setattr(CpuContention, "available", staticmethod(lambda: False))


def test_cli_tiny_run_writes_json_csv_png(tmp_path, capsys):
    status = cli.main(
        ["--shape", TINY_TTL, "--passes", "forward,train", "--repeats", "1", "--warmup", "0", "--no-compile"]
        # what is written, not how quiet the machine is: no row of this smoke run is judged by the speed canary
        + ["--max-repeats", "1", "--canary-drop", "0.999", "--out", str(tmp_path)]
    )
    assert status == 0
    result = json.loads((tmp_path / "latest.json").read_text())
    rows = result["rows"]
    assert {"machine", "config", "command", "roofs_gflops", "canary_best_gflops"} <= set(result["meta"])
    assert result["meta"]["canary_best_gflops"] > 0 and result["meta"]["canary_warmup_gflops"]
    assert result["meta"]["complete"] is True
    assert result["meta"]["machine"]["threads"] == torch.get_num_threads()
    assert {(r["pass"], r["contender"]) for r in rows} >= {
        ("forward", "eager"),
        ("forward", "pool-first"),
        ("train", "eager"),
        ("train", "pool-first"),
    }
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert any(r["kind"] == "fused" for r in rows)
    for r in rows:
        assert set(r) == set(COLUMNS)
        assert r["ms"] > 0 and r["ms_q1"] <= r["ms"] <= r["ms_q3"]
        # the pool-first contenders are counted by the work they do: the convs at the pooled positions only
        # (1/8: the output positions of a (4, 6, 6) clip pooled by 2)
        assert r["flops"] == pytest.approx(
            bench_ttl.ttl_flops((1, 8, 4, 6, 6), (1, 3), 6)
            * {"forward": 1, "train": 3}[r["pass"]]
            / (1 if r["kind"] == "baseline" else 8)
        )
        assert r["gflops"] == pytest.approx(r["flops"] / r["ms"] / 1e6)
        if r["kind"] == "baseline":
            assert r["speedup"] == 1.0
        else:
            base = next(b for b in rows if b["kind"] == "baseline" and b["pass"] == r["pass"])
            assert r["speedup"] == pytest.approx(base["ms"] / r["ms"])
    # every contender computes the same TTL: its forward matches the baseline's to float32 rounding
    assert all(r["max_rel_err"] < 1e-4 for r in rows if r["pass"] == "forward" and r["kind"] != "baseline")
    # saved activations are measured for the training passes only
    assert all((r["saved_mb"] is None) == (r["pass"] == "forward") for r in rows)
    with open(tmp_path / "latest.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        assert len(list(reader)) == len(rows)
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "latest.md").read_text().splitlines()
    assert markdown[1].startswith("Command: `t3d-bench --shape " + TINY_TTL)
    assert markdown[3].startswith("| op | shape | pass | contender | ms |")
    assert len([line for line in markdown if line.startswith("| ttl |")]) == len(rows)
    assert len(list(tmp_path.glob("bench-*.json"))) == 1
    out = capsys.readouterr().out
    assert "speed-up" in out and "pool-first" in out


def test_cli_tiny_model_run(tmp_path):
    # the tiny T3D; batch 2: its last stage at 16x32x32 is 1x1x1, and batch norm needs 2 values per channel
    argv = ["--shape", "model:tiny:2,16,32,32", "--repeats", "1", "--warmup", "0", "--no-compile", "--no-plot"]
    argv += ["--max-repeats", "1", "--canary-drop", "0.999"]  # what is measured, not how quiet the machine is
    assert cli.main(argv + ["--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "latest.json").read_text())["rows"]
    assert {(r["pass"], r["contender"]) for r in rows} == {
        ("forward", "eager"),
        ("forward", "fused"),
        ("train", "eager"),
        ("train", "fused"),
    }
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    fused_forward = next(r for r in rows if r["pass"] == "forward" and r["kind"] == "fused")
    assert fused_forward["max_rel_err"] < 1e-4
    assert all(r["saved_mb"] > 0 for r in rows if r["pass"] == "train")


def _fake_rows(speedup: float) -> list[dict]:
    base = {c: None for c in COLUMNS}
    return [
        base
        | {
            "op": "ttl",
            "shape": "s",
            "pass": "forward",
            "contender": "eager",
            "kind": "baseline",
            "status": "ok",
            "ms": 10.0,
            "speedup": 1.0,
        },
        base
        | {
            "op": "ttl",
            "shape": "s",
            "pass": "forward",
            "contender": "fused[cpu]",
            "kind": "fused",
            "status": "ok",
            "ms": 10.0 / speedup,
            "speedup": speedup,
        },
        # slower, but not a fused contender: never counted
        base
        | {
            "op": "ttl",
            "shape": "s",
            "pass": "forward",
            "contender": "compile",
            "kind": "compile",
            "status": "ok",
            "ms": 20.0,
            "speedup": 0.5,
        },
        # failed rows have no speed-up: reported by their status, not by --fail-if-slower
        base
        | {
            "op": "ttl",
            "shape": "s",
            "pass": "forward",
            "contender": "fused[triton]",
            "kind": "fused",
            "status": "error: RuntimeError: x",
        },
    ]


def test_check_fail_if_slower_only_counts_fused_rows():
    assert [r["contender"] for r in check_fail_if_slower(_fake_rows(1.2), 1.5)] == ["fused[cpu]"]
    assert check_fail_if_slower(_fake_rows(1.2), 1.2) == []
    assert check_fail_if_slower(_fake_rows(3.0), 1.5) == []


@pytest.mark.parametrize(("speedup", "ratio", "status"), [(1.2, 1.5, 1), (1.2, 1.0, 0), (3.0, 2.0, 0)])
def test_fail_if_slower_exit_status(tmp_path, capsys, speedup, ratio, status):
    path = tmp_path / "fake.json"
    path.write_text(json.dumps({"meta": {}, "rows": _fake_rows(speedup)}))
    assert cli.main(["--from-json", str(path), "--fail-if-slower", str(ratio)]) == status
    out = capsys.readouterr().out
    assert ("slower than" in out) == (status == 1)
    assert cli.main(["--from-json", str(path)]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shape", "ttl:1,8,4,6:1,3:6"], "--shape"),
        (["--shape", "nope:1"], "--shape"),
        (["--shape", "model:99:1,32,112,112"], "--shape"),
        (["--shape", "model:1,4,8,8"], "clip"),
        (["--repeats", "0"], "--repeats"),
        (["--repeats", "9", "--max-repeats", "5"], "--max-repeats"),
        (["--device", "cpu", "--timer", "kernel"], "--timer"),
        (["--device", "cpu", "--profile"], "--profile"),
        (["--noise", "0"], "--noise"),
        (["--dtype", "float33"], "dtype"),
        (["--from-json", "/nonexistent/x.json"], "--from-json"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(argv, message, capsys):
    assert cli.main(argv + ["--list"]) == 2
    assert message in capsys.readouterr().err


def test_unknown_precision_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--precision", "fp64", "--list"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--precision: expected values from ['fp32', 'bf16', 'fp16']" in err


def test_missing_op_module_is_skipped_not_crashed(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(cli.OP_MODULES, "ghost", ".bench_ghost_op_that_does_not_exist")
    assert cli.main(["--ops", "ghost", "--out", str(tmp_path), "--no-plot"]) == 0
    rows = json.loads((tmp_path / "latest.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["status"].startswith("skipped") and "bench_ghost" in rows[0]["status"]


def test_failing_and_skipped_contenders_get_status_rows():
    x = torch.ones(3, requires_grad=True)

    def broken(training):
        raise RuntimeError("kernel exploded")

    def skipped(training):
        raise Skip("not on this device")

    case = Case(
        op="toy",
        label="t",
        flops=6.0,
        roof_gemm=(8, 8, 8),
        build=lambda: [
            Contender("broken", broken, [x], kind="fused"),
            Contender("eager", lambda training: x * 2, [x], kind="baseline"),
            Contender("skip", skipped, [x], kind="other"),
        ],
    )
    cfg = BenchConfig(passes=("forward", "train"), repeats=1, warmup=0, canary_drop=0.999)  # statuses, not speed
    rows = run_cases([case], cfg)
    by = {(r["pass"], r["contender"]): r for r in rows}
    assert [r["contender"] for r in rows[:3]] == ["eager", "broken", "skip"]  # the baseline runs first
    assert by["forward", "broken"]["status"] == "error: RuntimeError: kernel exploded"
    assert by["train", "skip"]["status"] == "skipped: not on this device"
    assert by["train", "eager"]["status"] == "ok" and by["train", "eager"]["speedup"] == 1.0
    console = Console(file=io.StringIO(), width=200)
    print_table(rows, console)
    text = console.file.getvalue()
    assert "error [1]" in text and "[1] toy t forward broken: error: RuntimeError: kernel exploded" in text
    skipped_case = Case(op="toy", label="u", flops=1.0, build=lambda: (_ for _ in ()).throw(Skip("no kernel")))
    rows = run_cases([skipped_case], cfg)
    assert [r["status"] for r in rows] == ["skipped: no kernel"] * 2
    broken_case = Case(op="toy", label="v", flops=1.0, build=lambda: (_ for _ in ()).throw(MemoryError("big")))
    rows = run_cases([broken_case], cfg)
    assert [r["status"] for r in rows] == ["error: MemoryError: big"] * 2


def test_time_callable_counts_calls():
    calls = {"run": 0, "setup": 0}

    def setup():
        calls["setup"] += 1
        return 3

    def run(arg):
        assert arg == 3
        calls["run"] += 1
        return torch.ones(64).sum()

    timing = time_callable(run, torch.device("cpu"), repeats=5, warmup=2, setup=setup)
    assert len(timing.samples_ms) == 5 and calls == {"run": 8, "setup": 8}  # first + warm-up + repeats


def test_timing_median_and_iqr():
    t = Timing([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median, t.q1, t.q3) == (3.0, 2.0, 4.0)
    assert Timing([7.0]).q1 == Timing([7.0]).q3 == 7.0


def test_saved_tensor_bytes_counts_saved_activations_once_without_inputs():
    x = torch.randn(10, 20, requires_grad=True)
    # exp saves its output (800 bytes); the same storage saved twice counts once
    assert saved_tensor_bytes(lambda: (x * 2).exp(), exclude=[x]) == 10 * 20 * 4
    y = x.exp()
    assert saved_tensor_bytes(lambda: y * y.detach(), exclude=[x]) == 10 * 20 * 4
    # sin saves its input, which is excluded
    assert saved_tensor_bytes(lambda: x.sin(), exclude=[x]) == 0


def test_ttl_flops_match_torch_flop_counter():
    from t3d_kernels import reference

    shape, depths, out = (2, 16, 6, 10, 12), (1, 3, 6), 20
    x = torch.empty(shape, device="meta")
    bn = [torch.empty(16, device="meta") for _ in range(4)]
    weights = []
    for c, d in zip([7, 7, 6], depths, strict=True):
        k = 1 if d == 1 else 3
        weights.append(torch.empty(c, 16, d, k, k, device="meta"))
    counted = count_flops(lambda: reference.ttl(x, *bn, weights))
    assert bench_ttl.ttl_flops(shape, depths, out) == counted
    # the pool-first algebra: the same convs at the pooled positions only (stride 2 over the box-filtered source)
    pool_first = count_flops(lambda: reference.ttl_pool_first(x, *bn, weights))
    assert bench_ttl.pool_first_flops(shape, depths, out) == pool_first == counted * (3 * 5 * 6) / (6 * 10 * 12)
    # T3D-121 TTL 1 at clip 32x112x112 (DESIGN.md: 22.3 GFLOP)
    assert bench_ttl.ttl_flops((1, 256, 16, 28, 28), (1, 3, 6), 128) == pytest.approx(22.3e9, rel=2e-3)


def test_ttl_cases_default_and_paper_shapes():
    cfg = BenchConfig(batches=(1, 4))
    labels = [c.label for c in bench_ttl.cases(cfg, None)]
    assert labels == ["TTL1 b1", "TTL2 b1", "TTL3 b1", "TTL1 b4", "TTL2 b4", "TTL3 b4"]
    paper = bench_ttl.cases(BenchConfig(batches=(1,), paper=True), None)
    assert [c.info["input"] for c in paper] == [[1, 256, 16, 56, 56], [1, 512, 8, 28, 28], [1, 1024, 4, 14, 14]]
    tiny = bench_ttl.cases(BenchConfig(compile=True), ["1,8,4,6,6:1,3:6"])[0]
    kinds = {c.name: c.kind for c in tiny.build()}
    assert kinds["eager"] == "baseline" and kinds["compile"] == "compile" and kinds["pool-first"] == "other"
    assert any(k == "fused" for k in kinds.values())


def test_compile_contenders_only_for_compile_batches():
    def case(batch):
        build = lambda: [  # noqa: E731
            Contender("eager", lambda training: torch.ones(2), kind="baseline"),
            Contender("compile", lambda training: torch.ones(2), kind="compile"),
        ]
        return Case(
            op="toy", label=f"b{batch}", flops=1.0, build=build, roof_gemm=(8, 8, 8), info={"input": [batch, 3]}
        )

    cfg = BenchConfig(passes=("forward",), repeats=1, warmup=0, compile_batches=(1,))
    rows = run_cases([case(1), case(4)], cfg)
    assert [(r["shape"], r["contender"]) for r in rows] == [("b1", "eager"), ("b1", "compile"), ("b4", "eager")]
    cfg.compile_batches = None
    assert len(run_cases([case(4)], cfg)) == 2


def test_model_spec_parsing():
    assert bench_model.parse_spec("1,32,112,112") == ("121", (1, 32, 112, 112))
    assert bench_model.parse_spec("169:2,16,64,64") == ("169", (2, 16, 64, 64))
    assert bench_model.parse_spec("tiny:2,16,32,32") == ("tiny", (2, 16, 32, 32))
    with pytest.raises(ValueError, match="--shape"):
        bench_model.parse_spec("1,32,112")


def test_plot_without_timed_rows_writes_nothing(tmp_path):
    assert write_plot(tmp_path / "p.png", []) is None
    assert not (tmp_path / "p.png").exists()


def test_largest_batch_doubles_then_bisects():
    calls = []

    def fits(batch):
        calls.append(batch)
        return batch <= 100

    assert bench_model.largest_batch(fits, 8, 1024) == (100, False)
    assert calls == [8, 16, 32, 64, 128, 96, 112, 104, 100]
    assert bench_model.largest_batch(lambda b: True, 8, 1024) == (1024, True)
    assert bench_model.largest_batch(lambda b: True, 8, 1000) == (1000, True)
    assert bench_model.largest_batch(lambda b: b <= 5, 8, 1024) == (5, False)


def test_largest_batch_rows_are_skipped_off_cuda():
    cases = bench_model.cases(BenchConfig(), ["tiny:2,16,32,32"])
    rows = bench_model.max_batch_rows(BenchConfig(), cases)
    assert [(r["pass"], r["contender"], r["kind"]) for r in rows] == [
        ("fit", "eager", "baseline"),
        ("fit", "fused", "fused"),
    ]
    assert all(r["status"] == "skipped: the largest batch that fits is measured on CUDA only" for r in rows)


def test_model_default_shapes_per_device():
    assert bench_model.default_shapes(BenchConfig()) == [("121", (1, 32, 112, 112))]
    assert bench_model.default_shapes(BenchConfig(paper=True, model_batches=(2,))) == [("121", (2, 32, 224, 224))]
    gpu = BenchConfig(device="cuda")  # only its device type is read: no CUDA needed
    assert bench_model.default_shapes(gpu) == [("121", (n, 32, s, s)) for s in (112, 224) for n in (8, 16, 32)]


def test_conv_roof_is_taken_when_faster_than_the_sgemm(monkeypatch):
    """A case with ``roof_conv`` is judged against the faster of its sgemm and its vendor conv, both recorded."""
    import benchmarks.runner as runner
    from benchmarks.roof import conv3d_gflops

    monkeypatch.setattr(runner, "sgemm_gflops", lambda m, k, n, device, dtype: 100.0)
    monkeypatch.setattr(runner, "conv3d_gflops", lambda *a, **k: 250.0)
    x = torch.ones(3)
    base = Contender("eager", lambda training: x * 2, [x], kind="baseline")
    case = Case(op="toy", label="c", flops=1e9, build=lambda: [base], roof_gemm=(8, 8, 8), roof_conv=(4, 4, 3, 2, 3, 3))
    cfg = BenchConfig(passes=("forward",), repeats=1, warmup=0, canary_drop=0.999)
    roofs: dict[str, float] = {}
    (row,) = run_cases([case], cfg, roofs=roofs)
    assert row["roof_gflops"] == 250.0 and roofs == {"8x8x8": 100.0, "conv:4x4x3@2x3x3": 250.0}
    plain = Case(op="toy", label="s", flops=1e9, build=lambda: [base], roof_gemm=(8, 8, 8))
    (row,) = run_cases([plain], cfg, roofs={})
    assert row["roof_gflops"] == 100.0
    # the real measurement: a positive rate of the right size of work
    assert 0 < conv3d_gflops(2, 3, 3, (2, 4, 4), torch.device("cpu"), torch.float32, repeats=2) < 1e5
