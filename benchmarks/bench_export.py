"""ONNX export benchmark (``--ops export``): onnxruntime on the pool-first export of T3D-121 (``t3d export --format
onnx``: each TTL as BN-ReLU, Pad, a stride-1 2x2x2 AveragePool and stride-2 Convs) against onnxruntime on the naive
export of the same weights (the reference modules: full-resolution Convs, Concat, AvgPool), inference on one clip.

Both sessions run on the CPU execution provider with as many intra-op threads as torch has (``--threads``), all
graph optimisations on. Default clip 1x3x32x112x112; ``--shape export:[121|169|tiny:]N,T,H,W`` for others.
Exporting takes a minute per model on a 2-core CPU (in the case's build, not timed).
"""

from __future__ import annotations

import functools
import os
import tempfile

import torch

from .harness import BenchConfig, Case, Contender, Skip

OP = "export"
ARCHS = {"121": "t3d_densenet121", "169": "t3d_densenet169", "tiny": "t3d_tiny"}


def _session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _contenders(arch: str, clip: tuple[int, int, int, int], cfg: BenchConfig) -> list[Contender]:
    from t3d import models
    from t3d.export import export_onnx

    torch.manual_seed(cfg.seed)
    fused = getattr(models, ARCHS[arch])(backend="auto").eval()
    naive = getattr(models, ARCHS[arch])(backend="reference").eval()
    naive.load_state_dict(fused.state_dict())
    n, t, h, w = clip
    x = torch.randn(n, 3, t, h, w, generator=torch.Generator().manual_seed(cfg.seed))
    folder = tempfile.mkdtemp(prefix="t3d-bench-export-")
    sessions = {}
    for name, model in (("naive", naive), ("pool-first", fused)):
        path = os.path.join(folder, f"{name}.onnx")
        export_onnx(model, (t, h, w), path)
        sessions[name] = _session(path)
        os.unlink(path)  # the session holds the model
    os.rmdir(folder)
    feed = {"clips": x.numpy()}

    def run(name: str, training: bool) -> torch.Tensor:
        return torch.from_numpy(sessions[name].run(None, feed)[0])

    def eager(training: bool) -> torch.Tensor:
        return fused(x)

    return [
        Contender("onnxruntime naive", functools.partial(run, "naive"), kind="baseline", passes=("forward",)),
        Contender("onnxruntime pool-first", functools.partial(run, "pool-first"), kind="fused", passes=("forward",)),
        Contender("torch fused (eager)", eager, kind="other", passes=("forward",)),
    ]


def parse_spec(spec: str) -> tuple[str, tuple[int, int, int, int]]:
    from .bench_model import parse_spec as model_spec

    try:
        return model_spec(spec)
    except ValueError:
        raise ValueError(
            f"--shape: expected export:[121|169|tiny:]N,T,H,W (e.g. export:1,32,112,112), got {spec!r}"
        ) from None


def cases(cfg: BenchConfig, specs: list[str] | None) -> list[Case]:
    """T3D-121 on one clip 32x112x112 (--paper: 32x224x224), or ``specs``."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise Skip(
            f"the export benchmark needs onnx, onnxscript and onnxruntime (pip install t3d-kernels[export]): {exc}"
        ) from None
    if cfg.device != "cpu":
        raise Skip(f"onnxruntime runs on the CPU execution provider here, got --device {cfg.device}")
    from .bench_model import model_flops

    shapes = (
        [parse_spec(s) for s in specs] if specs else [("121", (1, 32, 224, 224) if cfg.paper else (1, 32, 112, 112))]
    )
    return [
        Case(
            op=OP,
            label=f"T3D-{arch} {clip[0]}x3x{'x'.join(map(str, clip[1:]))} onnx",
            flops=model_flops(arch, clip)[0],
            build=functools.partial(_contenders, arch, clip, cfg),
            roof_gemm=(4096, 128 * 27, 128),
            info={"arch": arch, "clip": list(clip)},
        )
        for arch, clip in shapes
    ]
