"""The shared benchmark harness, one import for op files: this module re-exports the pieces, which live by
concern in :mod:`.api` (cases, contenders, config), :mod:`.timing` (timers, warm-up, interleaving, memory),
:mod:`.roof` (sgemm roof, FLOP counts), :mod:`.runner` (the measured rows), :mod:`.machine` (versions) and
:mod:`.output` (JSON / CSV / Markdown / PNG / terminal table).

An op's benchmark file (``benchmarks/bench_<op>.py``) only declares shapes and contenders; this module runs them.

The API of an op file (see ``bench_ttl.py`` for a complete example)::

    from .harness import BenchConfig, Case, Contender, Skip

    OP = "my_op"                                  # the name used by ``--ops`` and ``--shape my_op:...``

    def cases(cfg: BenchConfig, specs: list[str] | None) -> list[Case]:
        # specs: the ``--shape`` strings given for this op (prefix "my_op:" removed), or None for the default
        # shapes (cfg.paper: the paper's 32x224x224 clip shapes). Raise Skip("why") to skip the whole op
        # (e.g. its module is missing); bad specs raise ValueError naming the spec.
        return [Case(op=OP, label="...", flops=..., build=lambda: [...contenders...], roof_gemm=(m, k, n))]

``Case.build()`` is called only when the case runs (so a case's tensors live only while it runs) and returns
the contenders, all closing over the *same* inputs. A :class:`Contender` is ``fn(training: bool) -> Tensor``
plus the tensors its gradients are taken for (``grad_tensors``: the input and the parameters). The harness
runs every pass of ``cfg.passes`` for every contender:

- ``forward``: ``fn(False)`` under ``torch.no_grad()`` (inference).
- ``backward``: ``y = fn(True)`` once, in the untimed first call, then ``torch.autograd.grad(y, grad_tensors,
  dy, retain_graph=True)`` timed alone, repeated over the retained graph ("compile" contenders, whose compiled
  backward refuses retain_graph: a fresh forward before every call, outside the timed region).
- ``train``: ``fn(True)`` then the same ``torch.autograd.grad``, timed together (a training step minus the
  optimizer).

How a row is measured so that a busy machine cannot make it lie (warm-up until stable, contenders interleaved,
re-measured when noisy, no ratio from a noisy row or from an output beyond the tolerance) is in :mod:`.runner`.

Exactly one contender per case has ``kind="baseline"`` (the eager reference: oneDNN on CPU, cuDNN on GPU);
every row's ``speedup`` is baseline ms / contender ms of the same case and pass, measured in the same run.
Keep an op's default cases to about a minute on a 2-core CPU (``make bench`` runs every op's defaults and
must finish in ~10 minutes); heavier shapes go behind ``cfg.paper`` or ``--shape``.
``kind="fused"`` marks the contenders that ``--fail-if-slower`` checks. ``Case.flops`` is the *reference's*
forward FLOP count (backward = 2x, train = 3x): the effective GFLOP/s of every contender uses it, so a
contender that does less arithmetic (the pool-first algebra) can exceed the sgemm roof.
"""

from .api import (
    COLUMNS,
    CONTENDER_KINDS,
    PASS_FLOP_FACTOR,
    PASSES,
    PRECISIONS,
    TIMERS,
    TOLERANCE,
    BenchConfig,
    Case,
    Contender,
    Skip,
    clip_shapes,
    compiled,
    fused_backends,
    parse_ints,
)
from .machine import machine_info
from .output import markdown_table, print_table, write_csv, write_json, write_markdown, write_plot
from .roof import count_flops, sgemm_gflops
from .runner import check_fail_if_slower, pass_runner, rel_err, run_cases
from .timing import Timer, Timing, interleaved, make_timer, saved_tensor_bytes, time_callable, warm_up

__all__ = [
    "COLUMNS",
    "CONTENDER_KINDS",
    "PASSES",
    "PASS_FLOP_FACTOR",
    "PRECISIONS",
    "TIMERS",
    "TOLERANCE",
    "BenchConfig",
    "Case",
    "Contender",
    "Skip",
    "Timer",
    "Timing",
    "clip_shapes",
    "check_fail_if_slower",
    "compiled",
    "count_flops",
    "fused_backends",
    "interleaved",
    "machine_info",
    "make_timer",
    "markdown_table",
    "parse_ints",
    "pass_runner",
    "print_table",
    "rel_err",
    "run_cases",
    "saved_tensor_bytes",
    "sgemm_gflops",
    "time_callable",
    "warm_up",
    "write_csv",
    "write_json",
    "write_markdown",
    "write_plot",
]
