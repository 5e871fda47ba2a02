"""Deployment exports of a trained model and ``t3d export CHECKPOINT --format pt2|onnx --out FILE``.

- ``pt2``: :func:`torch.export.export` of the fused model (eval mode) with a dynamic batch dimension; the custom ops
  ``t3d::ttl`` / ``t3d::dense_block`` stay in the graph (their fake kernels trace them), so loading it needs
  ``import t3d_kernels``: ``torch.export.load(path).module()(clips)``.
- ``onnx``: standard ONNX operators only, with the **pool-first algebra kept** (DESIGN.md 2.1, 7): every TTL becomes
  BN folded to a per-channel scale and shift, ReLU, zero Pad, the 2x2x2 box filter (AveragePool of stride 1), then
  each branch a Conv of stride 2 on its slice of the one filtered tensor, and a Concat, so an ONNX runtime also does
  8x fewer TTL FLOPs than on a naive export (pool after the full-resolution convs). Dense blocks become per-layer
  scale/shift, ReLU, Conv 1x1x1, scale/shift, ReLU, Conv 3x3x3, Concat. These are onnxscript translations of the
  custom ops, given to ``torch.onnx.export`` as its ``custom_translation_table``.

The ONNX model's input is ``clips`` (N, 3, T, H, W) float32 (normalised as in training), its output ``logits``
(N, classes), N dynamic; T, H, W are the clip the model was trained on.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["export_pt2", "export_onnx", "onnx_translation_table", "add_parser"]

ONNX_OPSET = 18


def _example(clip: Sequence[int], batch: int = 2) -> torch.Tensor:
    # batch 2: an example batch of 1 would be specialised to a constant by torch.export
    return torch.randn(batch, 3, *(int(v) for v in clip))


def export_pt2(model: nn.Module, clip: Sequence[int], path: str) -> torch.export.ExportedProgram:
    """``torch.export`` the model (put in eval mode) on clips (N, 3, *clip), N dynamic; saved to ``path``."""
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (_example(clip),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return program


# ------------------------------------------------------------------------------------------ ONNX translations
def _temporal_padding(depth: int) -> tuple[int, int]:
    # the op's "same" temporal padding (DESIGN.md 1): front (d-1)//2, back the rest
    return (depth - 1) // 2, depth - 1 - (depth - 1) // 2


def _ints(op, values: Sequence[int]):
    return op.Constant(value_ints=[int(v) for v in values])


def _scale_shift(op, weight, bias, mean, var, eps: float):
    """BN in eval folded to y = x * scale + shift, both shaped (1, C, 1, 1, 1) (constants: the runtime folds them)."""
    scale = op.Div(weight, op.Sqrt(op.Add(var, op.Constant(value_float=float(eps)))))
    shift = op.Sub(bias, op.Mul(mean, scale))
    view = _ints(op, (1, -1, 1, 1, 1))
    return op.Reshape(scale, view), op.Reshape(shift, view)


def _require_eval(training: bool, what: str) -> None:
    if training:
        raise ValueError(f"{what}: the ONNX export is for inference; expected the model in eval mode, got training")


def _ttl_onnx(x, bn_weight, bn_bias, running_mean, running_var, weights, pool, training, eps, backend, group=""):
    """t3d::ttl -> BN scale/shift, ReLU, Pad, AveragePool(2, stride 1), a stride-2 Conv per branch, Concat."""
    from onnxscript import opset18 as op

    _require_eval(training, "t3d::ttl")
    t, h, w = (int(d) for d in x.shape[2:])
    shapes = [tuple(int(d) for d in wt.shape) for wt in weights]
    pads = [_temporal_padding(s[2]) for s in shapes]
    front, back = max(p[0] for p in pads), max(p[1] for p in pads)
    sh, sw = max(s[3] // 2 for s in shapes), max(s[4] // 2 for s in shapes)
    scale, shift = _scale_shift(op, bn_weight, bn_bias, running_mean, running_var, eps)
    z = op.Relu(op.Add(op.Mul(x, scale), shift))
    extra, stride = (1, 2) if pool else (0, 1)
    # one zero padding for the deepest branch (+1 at the end of each axis for the box filter's forward window; an
    # AveragePool's own pads must be smaller than its kernel in onnxruntime)
    z = op.Pad(z, _ints(op, (0, 0, front, sh, sw, 0, 0, back + extra, sh + extra, sw + extra)))
    if pool:
        # box(z)[v] = mean of z[v + a], a in {0,1}^3: avgpool2(conv_W(z)) == conv_W(box(z), stride 2), W the original
        z = op.AveragePool(z, kernel_shape=[2, 2, 2], strides=[1, 1, 1])
    t_out, h_out, w_out = (t // 2, h // 2, w // 2) if pool else (t, h, w)
    outs = []
    for wt, shape, (f, _) in zip(weights, shapes, pads):
        depth, kh, kw = shape[2:]
        t0, h0, w0 = front - f, sh - kh // 2, sw - kw // 2  # the branch's offset into the shared padded tensor
        ends = (t0 + stride * (t_out - 1) + depth, h0 + stride * (h_out - 1) + kh, w0 + stride * (w_out - 1) + kw)
        view = op.Slice(z, _ints(op, (t0, h0, w0)), _ints(op, ends), _ints(op, (2, 3, 4)))
        outs.append(op.Conv(view, wt, strides=[stride] * 3))
    return op.Concat(*outs, axis=1), op.Identity(running_mean), op.Identity(running_var)


def _dense_block_onnx(
    x, bn1_weight, bn1_bias, bn1_mean, bn1_var, conv1_weight, bn2_weight, bn2_bias, bn2_mean, bn2_var, conv2_weight,
    training, eps, backend, group="",
):  # fmt: skip
    """t3d::dense_block -> per layer: scale/shift, ReLU, Conv 1x1x1, scale/shift, ReLU, Conv 3x3x3 (same), Concat."""
    from onnxscript import opset18 as op

    _require_eval(training, "t3d::dense_block")
    features = x
    for i in range(len(conv2_weight)):
        z1 = op.BatchNormalization(features, bn1_weight[i], bn1_bias[i], bn1_mean[i], bn1_var[i], epsilon=eps)
        hidden = op.Conv(op.Relu(z1), conv1_weight[i])
        z2 = op.BatchNormalization(hidden, bn2_weight[i], bn2_bias[i], bn2_mean[i], bn2_var[i], epsilon=eps)
        k = [int(d) // 2 for d in conv2_weight[i].shape[2:]]
        new = op.Conv(op.Relu(z2), conv2_weight[i], pads=k + k)
        features = op.Concat(features, new, axis=1)
    # eval: the statistics the op returns are the running ones, concatenated layer after layer
    return (
        features,
        op.Concat(*bn1_mean, axis=0),
        op.Concat(*bn1_var, axis=0),
        op.Concat(*bn2_mean, axis=0),
        op.Concat(*bn2_var, axis=0),
        op.Constant(value_floats=[]),  # saved_h: empty in eval
    )


def _bn_relu_maxpool_onnx(
    x, bn_weight, bn_bias, running_mean, running_var, kernel_size, stride, padding, training, eps, save_indices,
    backend, group="",
):  # fmt: skip
    """t3d::bn_relu_maxpool (the fused stem) -> BatchNormalization, ReLU, MaxPool; the op's (empty) indices output
    is not used in inference."""
    from onnxscript import opset18 as op

    _require_eval(training, "t3d::bn_relu_maxpool")
    z = op.Relu(op.BatchNormalization(x, bn_weight, bn_bias, running_mean, running_var, epsilon=eps))
    pads = [int(p) for p in padding]
    y = op.MaxPool(z, kernel_shape=[int(k) for k in kernel_size], strides=[int(v) for v in stride], pads=pads + pads)
    empty = op.Constant(value_ints=[])
    return y, op.Identity(running_mean), op.Identity(running_var), op.Cast(empty, to=6)  # 6: int32


def onnx_translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export``: the fused ops as standard ONNX (pool-first TTL)."""
    import t3d_kernels  # noqa: F401 - registers the ops

    return {
        torch.ops.t3d.ttl.default: _ttl_onnx,
        torch.ops.t3d.dense_block.default: _dense_block_onnx,
        torch.ops.t3d.bn_relu_maxpool.default: _bn_relu_maxpool_onnx,
    }


STANDARD_DOMAINS = ("", "ai.onnx")


def export_onnx(model: nn.Module, clip: Sequence[int], path: str) -> Any:
    """ONNX (opset 18) of the model (put in eval mode) on clips (N, 3, *clip), N dynamic, saved to ``path``; returns
    the ``onnx.ModelProto``. A model on the fused backends exports with the pool-first TTL; on the "reference"
    backend its plain PyTorch ops are exported as they are (the naive export)."""
    import onnx

    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model,
        (_example(clip),),
        dynamo=True,
        custom_translation_table=onnx_translation_table(),
        dynamic_shapes=({0: batch},),
        input_names=["clips"],
        output_names=["logits"],
        opset_version=ONNX_OPSET,
        optimize=True,
        verbose=False,
    )
    proto = program.model_proto
    custom = sorted({n.domain + "::" + n.op_type for n in proto.graph.node if n.domain not in STANDARD_DOMAINS})
    if custom or proto.functions:
        raise RuntimeError(f"ONNX export: expected standard ONNX operators only, got {custom or proto.functions}")
    onnx.save_model(proto, path)
    return proto


# ------------------------------------------------------------------------------------------------------ CLI
def run(args: argparse.Namespace) -> int:
    from .predict import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu", backend=args.backend)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.format == "pt2":
        export_pt2(predictor.model, predictor.clip, args.out)
    else:
        export_onnx(predictor.model, predictor.clip, args.out)
    t, h, w = predictor.clip
    print(
        f"wrote {args.out} ({args.format}, {os.path.getsize(args.out) / 2**20:.1f} MiB): {predictor.meta['model']}, "
        f"input clips (N, 3, {t}, {h}, {w}) float32 normalised with mean {list(predictor.mean)} and std "
        f"{list(predictor.std)} (N dynamic), output logits (N, {len(predictor.classes)})"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained checkpoint for deployment (torch.export .pt2, or ONNX with the pool-first TTL)",
        description="pt2: torch.export of the fused model (load with torch.export.load after import t3d_kernels). "
        "onnx: standard ONNX operators, the TTLs exported with the pool-first algebra (8x fewer TTL FLOPs in any "
        "ONNX runtime). Both take clips (N, 3, T, H, W) with a dynamic batch N and return logits.",
    )
    p.add_argument("checkpoint", help="a checkpoint written by t3d train (e.g. OUT/last.pt)")
    p.add_argument("--format", required=True, choices=("pt2", "onnx"))
    p.add_argument("--out", required=True, help="output file (.pt2 or .onnx)")
    p.add_argument("--backend", default="auto", help="backend of the exported ops (default auto: fused)")
    p.set_defaults(func=run)
