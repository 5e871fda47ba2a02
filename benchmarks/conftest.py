"""pytest-benchmark front end of the suite: ``pytest benchmarks/ --benchmark-only``.

Every (case, pass, contender) of the selected ops is one benchmark; the baseline of a case and pass runs first,
and every other contender records its ``speedup`` vs it in ``extra_info`` (``--benchmark-json`` keeps it).
Options (defaults: a light run): ``--t3d-ops ttl,dense_block,model``, ``--t3d-passes``, ``--t3d-batches 1``,
``--t3d-shape OP:SPEC`` (repeatable), ``--t3d-paper``, ``--t3d-rounds 3``, ``--t3d-device``, ``--t3d-no-compile``,
``--t3d-threads``.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch

from .allocator import pin_malloc
from .harness import PASSES, BenchConfig, Skip


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("t3d", "t3d-kernels benchmarks")
    group.addoption("--t3d-ops", default="ttl,dense_block,model", help="comma-separated ops")
    group.addoption("--t3d-passes", default=",".join(PASSES), help="forward,backward,train")
    group.addoption("--t3d-batches", default="1", help="batch sizes of the default shapes")
    group.addoption("--t3d-shape", action="append", default=[], help="OP:SPEC as t3d-bench --shape")
    group.addoption("--t3d-paper", action="store_true", help="the paper's 32x224x224 shapes")
    group.addoption("--t3d-rounds", type=int, default=3, help="timed rounds per benchmark")
    group.addoption("--t3d-device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.addoption("--t3d-dtype", default="float32")
    group.addoption("--t3d-no-compile", action="store_true", help="leave out torch.compile contenders")
    group.addoption("--t3d-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")


def pytest_configure(config: pytest.Config) -> None:
    pin_malloc()  # as t3d-bench does (--malloc pinned): the same allocator rules in every process
    threads = config.getoption("--t3d-threads", default=0)
    if threads:
        torch.set_num_threads(threads)


def _config(config: pytest.Config) -> BenchConfig:
    return BenchConfig(
        device=config.getoption("--t3d-device"),
        dtype=config.getoption("--t3d-dtype"),
        passes=tuple(p for p in config.getoption("--t3d-passes").split(",") if p),
        repeats=config.getoption("--t3d-rounds"),
        batches=tuple(int(b) for b in config.getoption("--t3d-batches").split(",") if b),
        paper=config.getoption("--t3d-paper"),
        compile=not config.getoption("--t3d-no-compile"),
        compile_batches=None,
    )


def _collect(config: pytest.Config) -> list[Any]:
    """pytest params (case, pass, contender name), baseline first within each case and pass."""
    from .cli import OP_MODULES, shapes_by_op

    cfg = _config(config)
    specs = shapes_by_op(config.getoption("--t3d-shape"))
    ops = [op for op in config.getoption("--t3d-ops").split(",") if op and (not specs or op in specs)]
    params = []
    for op in ops:
        try:
            cases = importlib.import_module(OP_MODULES[op], __package__).cases(cfg, specs.get(op))
        except (ModuleNotFoundError, Skip) as exc:
            params.append(pytest.param(None, None, None, id=f"{op}-skipped", marks=pytest.mark.skip(reason=str(exc))))
            continue
        for case in cases:
            try:
                # built once here only for the contender names; the test rebuilds the case (see _CaseCache)
                contenders = sorted(case.build(), key=lambda c: c.kind != "baseline")
            except Skip as exc:
                params.append(
                    pytest.param(case, None, None, id=f"{op}-{case.label}", marks=pytest.mark.skip(reason=str(exc)))
                )
                continue
            for pass_ in cfg.passes:
                for c in contenders:
                    if c.passes is None or pass_ in c.passes:
                        params.append(pytest.param(case, pass_, c.name, id=f"{op}-{case.label}-{pass_}-{c.name}"))
            del contenders
    return params


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "t3d_case" in metafunc.fixturenames:
        metafunc.config._t3d_cfg = _config(metafunc.config)
        metafunc.parametrize(("t3d_case", "t3d_pass", "t3d_contender"), _collect(metafunc.config))


class _CaseCache:
    """The contenders of the case now running (only one case's tensors are alive at a time), the output
    gradients shared by its contenders, and the baselines' medians for the speed-ups."""

    def __init__(self) -> None:
        self.case: Any = None
        self.contenders: dict[str, Any] = {}
        self.grad_out: dict[str, torch.Tensor] = {}
        self.baseline_s: dict[tuple[str, str, str], float] = {}

    def get(self, case: Any, name: str) -> Any:
        if case is not self.case:
            self.case, self.contenders, self.grad_out = case, {}, {}
            torch.manual_seed(0)
            self.contenders = {c.name: c for c in case.build()}
        return self.contenders[name]


@pytest.fixture(scope="session")
def t3d_cache() -> _CaseCache:
    return _CaseCache()


@pytest.fixture(scope="session")
def t3d_config(request: pytest.FixtureRequest) -> BenchConfig:
    return _config(request.config)
