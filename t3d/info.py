"""``t3d info``: per-stage output shapes, parameter count and GFLOPs per clip (like the paper's Table 1)."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from t3d_kernels import DenseBlock3d, TemporalTransition

from .cli_args import parse_clip
from .models import MODELS


def _conv_macs(module: nn.Module, out: torch.Tensor) -> int:
    w = module.weight
    return out.numel() * w[0].numel()


def model_summary(model: nn.Module, clip: tuple[int, int, int], batch: int = 1) -> dict:
    """Run ``model`` on the meta device and collect, per top-level stage: output shape, parameters, GFLOPs.

    GFLOPs count 2 x multiply-adds of convs and linears as the reference computes them; for TTLs also the
    fused count (pool-first algebra: the convs at the pooled positions).
    """
    stages: list[dict] = []
    hooks = []

    def stage_hook(name):
        def hook(module, inputs, output):
            stages.append(
                {"stage": name, "shape": tuple(output.shape), "params": sum(p.numel() for p in module.parameters())}
            )

        return hook

    flops = {}

    def count(name):
        def hook(module, inputs, output):
            if isinstance(module, TemporalTransition):
                pre = inputs[0]
                positions = pre.shape[0] * pre.shape[2] * pre.shape[3] * pre.shape[4]
                per = sum(b.weight.numel() for b in module.branches)
                flops[name] = flops.get(name, 0) + 2 * positions * per
                flops[name + ":fused"] = flops.get(name + ":fused", 0) + 2 * output[:, 0].numel() * per
            elif isinstance(module, DenseBlock3d):  # its convs run through the op, not their modules
                positions = output[:, 0].numel()
                per = sum(layer.conv1.weight.numel() + layer.conv2.weight.numel() for layer in module.layers())
                flops[name] = flops.get(name, 0) + 2 * positions * per
            elif isinstance(module, (nn.Conv3d, nn.Conv2d, nn.Linear)):
                flops[name] = flops.get(name, 0) + 2 * _conv_macs(module, output)

        return hook

    features = model.features
    for name, module in features.named_children():
        hooks.append(module.register_forward_hook(stage_hook(name)))
    owners = [n for n, m in model.named_modules() if isinstance(m, (TemporalTransition, DenseBlock3d))]
    for name, module in model.named_modules():
        inside = any(name.startswith(n + ".") for n in owners)
        if isinstance(module, (TemporalTransition, DenseBlock3d, nn.Conv3d, nn.Conv2d, nn.Linear)) and not inside:
            hooks.append(module.register_forward_hook(count(name)))
    try:
        meta_model = model.to("meta")
        with torch.no_grad():
            logits = meta_model(torch.empty(batch, 3, *clip, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    total = sum(v for k, v in flops.items() if not k.endswith(":fused"))
    ttl_ref = sum(v for k, v in flops.items() if ".transition" in k and not k.endswith(":fused"))
    ttl_fused = sum(v for k, v in flops.items() if k.endswith(":fused"))
    return {
        "stages": stages,
        "logits": tuple(logits.shape),
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": total / 1e9,
        "gflops_ttl": ttl_ref / 1e9,
        "gflops_fused": (total - ttl_ref + ttl_fused) / 1e9,
        "dense_blocks": sum(isinstance(m, DenseBlock3d) for m in model.modules()),
    }


def run(args: argparse.Namespace) -> int:
    clip = parse_clip(args.clip)
    if args.model not in MODELS:
        raise ValueError(f"--model: expected one of {sorted(MODELS)}, got {args.model!r}")
    kwargs = {"num_classes": args.num_classes}
    if args.ttl_channels:
        kwargs["ttl_channels"] = args.ttl_channels
    model = MODELS[args.model](**kwargs)
    s = model_summary(model, clip)
    print(f"{args.model}  clip {clip[0]}x{clip[1]}x{clip[2]}  (output per clip, N C T H W)")
    print(f"{'stage':<14}{'output':<28}{'params':>12}")
    print(f"{'input':<14}{str((1, 3) + clip):<28}{'':>12}")
    for st in s["stages"]:
        print(f"{st['stage']:<14}{str(st['shape']):<28}{st['params']:>12,}")
    head_params = sum(p.numel() for p in model.classifier.parameters())
    print(f"{'classifier':<14}{str(s['logits']):<28}{head_params:>12,}")
    print(f"parameters: {s['params']:,}")
    print(
        f"GFLOPs per clip: {s['gflops']:.2f} (TTLs {s['gflops_ttl']:.2f}); "
        f"with the fused TTL algebra: {s['gflops_fused']:.2f}"
    )
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="per-stage shapes, parameters and GFLOPs of a model")
    p.add_argument("--model", default="t3d121", help=f"one of {sorted(MODELS)}")
    p.add_argument("--clip", default="32x224x224", help="TxHxW (default 32x224x224)")
    p.add_argument("--num-classes", type=int, default=400)
    p.add_argument("--ttl-channels", type=int, default=None, help="channels per TTL branch (default: theta=0.5)")
    p.set_defaults(func=run)
