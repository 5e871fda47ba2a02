"""Whole-model benchmark: T3D-121 per clip, fused (``t3d_kernels.fuse``) vs eager (``backend="reference"``) vs
torch.compile of the eager model.

Passes: ``forward`` is inference (eval mode, no grad), ``train`` a training step without the optimizer (train
mode: batch statistics; forward + backward of every parameter); the backward alone is not run for the whole model
(it is train minus forward). torch.compile runs the forward only, unless ``--compile-model-train``: compiling
T3D-121's training graph takes several minutes on a 2-core CPU.

Default shapes: on CPU one clip 1x3x32x112x112 (``--paper``: 32x224x224); on CUDA the GPU suite, clips 32x112x112
and 32x224x224 at batch 8, 16 and 32 (``--model-batches``). ``--shape model:N,T,H,W``, ``model:169:N,T,H,W``
(T3D-169) or ``model:tiny:N,T,H,W`` (the tiny test network) for any other. ``--max-batch`` adds the largest
training batch that fits on the GPU, eager vs fused (:func:`max_batch_rows`).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch

from .harness import COLUMNS, BenchConfig, Case, Contender, Skip, compiled, count_flops, fused_backends, parse_ints

OP = "model"
ARCHS = {"121": "t3d_densenet121", "169": "t3d_densenet169", "tiny": "t3d_tiny"}
MODEL_PASSES = ("forward", "train")
GPU_CLIPS = ((32, 112, 112), (32, 224, 224))
GPU_BATCHES = (8, 16, 32)


def parse_spec(spec: str) -> tuple[str, tuple[int, int, int, int]]:
    """``"N,T,H,W"`` or ``"ARCH:N,T,H,W"`` (ARCH 121, 169 or tiny) -> (arch, (N, T, H, W))."""
    arch, _, dims = spec.rpartition(":")
    arch = arch or "121"
    if arch not in ARCHS:
        raise ValueError(
            f"--shape: expected model:[121|169|tiny:]N,T,H,W (e.g. model:1,32,112,112), got model:{spec!r}"
        )
    clip = parse_ints(dims, "--shape model N,T,H,W")
    if len(clip) != 4:
        raise ValueError(f"--shape: expected 4 sizes N,T,H,W for the model's clip, got {dims!r}")
    return arch, clip  # type: ignore[return-value]


def default_shapes(cfg: BenchConfig) -> list[tuple[str, tuple[int, int, int, int]]]:
    """T3D-121 on one clip on CPU (32x112x112, ``--paper`` 32x224x224, batch ``cfg.model_batches`` or 1); on
    CUDA both clips at batch 8, 16 and 32 (or ``cfg.model_batches``)."""
    if cfg.torch_device.type == "cuda":
        batches = cfg.model_batches or GPU_BATCHES
        return [("121", (n, *clip)) for clip in GPU_CLIPS for n in batches]
    clip = (32, 224, 224) if cfg.paper else (32, 112, 112)
    return [("121", (n, *clip)) for n in cfg.model_batches or (1,)]


def _build_model(arch: str, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    from t3d import models

    torch.manual_seed(seed)
    return getattr(models, ARCHS[arch])(backend="reference").to(device, dtype)


def model_flops(arch: str, clip: tuple[int, int, int, int]) -> tuple[float, float]:
    """Forward FLOPs of the model on one clip batch: (eager, fused). The eager count is torch's FlopCounterMode on
    meta tensors (convolutions and the classifier; BN, pooling and ReLU are not counted); the fused model does the
    same but evaluates each pooling TTL's convolutions only at its pooled output positions (the pool-first algebra),
    1/8 of their positions."""
    from t3d_kernels.nn import TemporalTransition

    model = _build_model(arch, torch.device("meta"), torch.float32, 0).eval()
    n, t, h, w = clip
    x = torch.empty(n, 3, t, h, w, device="meta")
    skipped = []

    def skipped_flops(module: TemporalTransition, inputs: tuple[torch.Tensor, ...]) -> None:
        if module.pool:
            n_, _, t_, h_, w_ = inputs[0].shape
            saved = n_ * t_ * h_ * w_ - n_ * (t_ // 2) * (h_ // 2) * (w_ // 2)
            skipped.extend(2.0 * saved * b.weight.numel() for b in module.branches)

    hooks = [m.register_forward_pre_hook(skipped_flops) for m in model.modules() if isinstance(m, TemporalTransition)]
    with torch.no_grad():
        eager = count_flops(lambda: model(x))
    for hook in hooks:
        hook.remove()
    return eager, eager - sum(skipped)


def _mode_fn(model: torch.nn.Module, x: torch.Tensor, call=None):
    call = model if call is None else call  # not `call or model`: a module's truth value would call len()

    def fn(training: bool) -> torch.Tensor:
        model.train(training)
        return call(x)

    return fn


def _contenders(arch: str, clip: tuple[int, int, int, int], cfg: BenchConfig, fused_flops: float) -> list[Contender]:
    import t3d_kernels
    from t3d_kernels.backends import BackendError

    device, dtype = cfg.torch_device, cfg.torch_dtype
    eager = _build_model(arch, device, dtype, cfg.seed)
    n, t, h, w = clip
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    x = torch.randn(n, 3, t, h, w, generator=gen).to(device, dtype).requires_grad_()
    state = copy.deepcopy(eager.state_dict())

    def params(model: torch.nn.Module) -> list[torch.Tensor]:
        return [x, *model.parameters()]

    contenders = [Contender("eager", _mode_fn(eager, x), params(eager), "baseline", MODEL_PASSES)]
    if cfg.compile:
        # compiled from its own copy so the eager model stays uncompiled
        twin = _build_model(arch, device, dtype, cfg.seed)
        twin.load_state_dict(state)
        passes = MODEL_PASSES if cfg.compile_model_train else ("forward",)
        compiled_model = compiled(twin)
        contenders.append(Contender("compile", _mode_fn(twin, x, compiled_model), params(twin), "compile", passes))
    names = list(cfg.backends) if cfg.backends is not None else ["auto"]
    for name in names:
        fused = _build_model(arch, device, dtype, cfg.seed)
        fused.load_state_dict(state)
        try:
            t3d_kernels.fuse(fused, name)
        except BackendError:  # e.g. a TTL-only backend asked for: the dense blocks have no such backend
            continue
        label = "fused" if name == "auto" else f"fused[{name}]"
        contenders.append(Contender(label, _mode_fn(fused, x), params(fused), "fused", MODEL_PASSES, fused_flops))
    if len(contenders) == (2 if cfg.compile else 1) and cfg.backends is not None:
        raise Skip(f"no fused model for backends {list(cfg.backends)}")
    return contenders


def cases(cfg: BenchConfig, specs: list[str] | None) -> list[Case]:
    """The model cases: ``specs`` (``[ARCH:]N,T,H,W``) or T3D-121 on one clip (32x112x112; --paper 32x224x224)."""
    try:
        import t3d.models  # noqa: F401
        import t3d_kernels  # noqa: F401
    except ImportError as exc:
        raise Skip(f"t3d.models is not importable ({exc})") from None
    shapes = [parse_spec(s) for s in specs] if specs else default_shapes(cfg)
    # what "auto" resolves to for each op on this device, recorded with the case
    from t3d_kernels.backends import resolve

    resolved = {op: resolve(op, "auto", cfg.torch_device) for op in ("ttl", "dense_block")}
    result = []
    for arch, clip in shapes:
        from t3d.models.densenet import clip_stage_shapes

        clip_stage_shapes(clip[1:])  # a clip too small for the network is a clear error here
        n, t, h, w = clip
        eager_flops, fused_flops = model_flops(arch, clip)
        result.append(
            Case(
                op=OP,
                label=f"T3D-{arch} {n}x3x{t}x{h}x{w}",
                flops=eager_flops,
                build=functools.partial(_contenders, arch, clip, cfg, fused_flops),
                # a dense layer's 3x3x3 conv as a GEMM: positions x 128*27 x 32 channels (rows capped)
                roof_gemm=(4096, 128 * 27, 128),
                # and the vendor's rate on the first dense block's 3x3x3 conv (most of the model's FLOPs)
                roof_conv=(128, 32, 3, *clip_stage_shapes(clip[1:])[1][1]),
                info={
                    "arch": arch,
                    "clip": list(clip),
                    "auto_backends": resolved,
                    "ttl_fused": fused_backends("ttl", cfg),
                },
            )
        )
    return result


def largest_batch(fits: Any, start: int, limit: int) -> tuple[int, bool]:
    """The largest batch ``b <= limit`` with ``fits(b)``: doubling from ``start`` until a batch does not fit, then
    bisecting down to 1/16 of the batch. Returns (batch, whether the limit stopped the search); 0 when even
    ``start`` does not fit."""
    good, bad, b = 0, None, start
    while b <= limit:
        if not fits(b):
            bad = b
            break
        good, b = b, b * 2
    if bad is None:
        if good < limit and fits(limit):
            return limit, True
        return good, good >= limit
    while bad - good > max(1, good // 16):
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good, False


def _fits(model: torch.nn.Module, clip: tuple[int, int, int], cfg: BenchConfig, batch: int) -> bool:
    """Whether one training step (forward in train mode + backward of every parameter) of ``batch`` clips runs
    without running out of GPU memory."""
    x = None
    try:
        x = torch.randn(batch, 3, *clip, device=cfg.torch_device, dtype=cfg.torch_dtype)
        model.train()
        with cfg.autocast():
            y = model(x)
        torch.autograd.grad(y.float().sum(), list(model.parameters()))
        torch.cuda.synchronize(cfg.torch_device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del x
        torch.cuda.empty_cache()


def max_batch_rows(cfg: BenchConfig, cases: list[Case], limit: int = 1024) -> list[dict[str, Any]]:
    """The largest training batch that fits on the GPU for eager vs fused, per model and clip of ``cases``:
    rows of pass "fit" whose ``max_batch`` is the batch (the fused row's ``speedup`` column is left empty; the
    memory saving is the ratio of the two batches). CUDA only: elsewhere a "skipped" row says so."""
    import t3d_kernels

    clips = dict.fromkeys((c.info["arch"], tuple(c.info["clip"][1:])) for c in cases if c.op == OP)
    rows = []
    for arch, clip in clips:
        label = f"T3D-{arch} 3x{clip[0]}x{clip[1]}x{clip[2]}"
        for name, kind in (("eager", "baseline"), ("fused", "fused")):
            row = {c: None for c in COLUMNS} | {"op": OP, "shape": label, "pass": "fit", "contender": name}
            row.update(kind=kind, device=cfg.device, dtype=cfg.dtype, precision=cfg.precision_label)
            if cfg.torch_device.type != "cuda":
                rows.append(row | {"status": "skipped: the largest batch that fits is measured on CUDA only"})
                continue
            try:
                model = _build_model(arch, cfg.torch_device, cfg.torch_dtype, cfg.seed)
                if name == "fused":
                    t3d_kernels.fuse(model)
                start = max(c.info["clip"][0] for c in cases if c.op == OP)
                batch, limited = largest_batch(functools.partial(_fits, model, clip, cfg), start, limit)
                row.update(status="ok", max_batch=batch, batch=batch, max_batch_limited=limited)
                del model
            except Exception as exc:  # noqa: BLE001 - a failed search is a row, not the end of the run
                row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            rows.append(row)
            torch.cuda.empty_cache()
    return rows
