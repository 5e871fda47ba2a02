"""The CPU kernels' instruction-set paths (csrc/common/cpu_features.h): AVX-512, AVX2 and the generic loops.

A machine runs only the best path it has, so the others are run here in subprocesses under the T3D_CPU_ISA cap:
each path's TTL, dense block and stem ops within PyTorch's own float32 error of the float64 reference (the op tests'
rule); the AVX2 tiles of the TTL, the AVX2 Winograd conv and the stem conv's AVX2 input gradient giving the same bits
as the AVX-512 ones (the same summation order by design) where the CPU has both; a cap the library does not know is
refused with a clear error.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from t3d_kernels import _ext

HERE = os.path.dirname(__file__)
needs_extension = pytest.mark.skipif(_ext.load() is None, reason=f"extension not built: {_ext.load_error()}")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


FLAGS = _cpu_flags()
HAS_AVX2 = {"avx2", "fma"} <= FLAGS


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """What each cap computed: {"native" | "avx2" | "generic": {"failures": [...], "results": {desc: {...}}}}."""
    out = {}
    for isa in ("native", "avx2", "generic"):
        path = tmp_path_factory.mktemp(isa) / "run.pt"
        env = {**os.environ, "T3D_CPU_ISA": isa}
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "_isa_worker.py"), str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, f"T3D_CPU_ISA={isa}: worker failed\n{proc.stdout}\n{proc.stderr}"
        out[isa] = torch.load(path, weights_only=True)
    return out


@needs_extension
@pytest.mark.parametrize("isa", ["native", "avx2", "generic"])
def test_each_path_within_torch_error(runs, isa):
    assert runs[isa]["results"], "the worker ran no cases"
    assert not runs[isa]["failures"], f"T3D_CPU_ISA={isa}:\n" + "\n".join(runs[isa]["failures"])


@needs_extension
@pytest.mark.skipif(not HAS_AVX2, reason="the CPU has no AVX2+FMA: the avx2 cap runs the generic loops")
def test_avx2_ttl_tiles_give_the_avx512_bits(runs):
    """On an AVX-512 CPU "native" runs the AVX-512 tiles, on an AVX2 one the AVX2 tiles: either way the same bits as
    the avx2 cap (the glue is the same code in both processes)."""
    native, avx2 = runs["native"]["results"], runs["avx2"]["results"]
    ttl = [d for d in native if d.startswith("ttl")]
    assert ttl
    for desc in ttl:
        for name, value in native[desc].items():
            assert torch.equal(value, avx2[desc][name]), f"{desc} {name}: AVX2 and native TTL tiles differ"


@needs_extension
@pytest.mark.skipif(not HAS_AVX2, reason="the CPU has no AVX2+FMA: no Winograd conv under any cap")
def test_avx2_winograd_gives_the_avx512_bits(runs):
    """The AVX2 Winograd kernels (csrc/cpu/winograd_avx2.h) compute every valid lane as the AVX-512 ones do: the
    same bits for the conv and its weight gradient; the generic loops have no Winograd conv."""
    native, avx2 = runs["native"]["winograd"], runs["avx2"]["winograd"]
    assert native and native.keys() == avx2.keys()
    for name, value in native.items():
        assert torch.equal(value, avx2[name]), f"Winograd {name}: AVX2 and native kernels differ"
    assert not runs["generic"]["winograd"]


@needs_extension
@pytest.mark.skipif(not HAS_AVX2, reason="the CPU has no AVX2+FMA: the avx2 cap runs the scalar loops")
def test_avx2_stem_conv_input_grad_gives_the_avx512_bits(runs):
    """The stem conv's AVX2 input-gradient rows sum each element as the AVX-512 rows do (blocks of 4 output
    channels, the same tap order): the same bits; the scalar form (generic) sums in double and rounds once."""
    native, avx2 = runs["native"]["stem_grad"], runs["avx2"]["stem_grad"]
    assert native and native.keys() == avx2.keys()
    for name, value in native.items():
        assert torch.equal(value, avx2[name]), f"stem conv input grad {name}: AVX2 and native rows differ"
    assert any(not torch.equal(v, runs["generic"]["stem_grad"][n]) for n, v in native.items())


def _differ(a: dict, b: dict, prefix: str) -> bool:
    return any(not torch.equal(v, b[d][n]) for d in a if d.startswith(prefix) for n, v in a[d].items())


@needs_extension
@pytest.mark.skipif(not HAS_AVX2, reason="without AVX2 the native path is the generic one")
def test_the_caps_take_effect(runs):
    """A cap that did nothing would make the comparisons above trivial: each process reports the path its cap
    allows, and the generic loops (baseline x86-64, no FMA contraction) round differently from the vector tiles."""
    assert runs["native"]["isa"] == ("avx512" if {"avx512f", "fma"} <= FLAGS else "avx2")
    assert runs["avx2"]["isa"] == "avx2" and runs["generic"]["isa"] == "generic"
    native = runs["native"]["results"]
    assert _differ(native, runs["generic"]["results"], "ttl"), "T3D_CPU_ISA=generic left the TTL tiles as they were"


def test_unknown_cap_is_refused():
    env = {**os.environ, "T3D_CPU_ISA": "sse9"}
    code = "from t3d_kernels import _ext; _ext.load()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "T3D_CPU_ISA: expected one of native, avx2, generic (or unset), got 'sse9'" in proc.stderr
