"""The C allocator's state, made the same in every benchmark process, and page faults per call.

glibc's malloc moves its mmap threshold at run time: freeing an mmap'ed block raises the threshold to that block's
size, and the heap's trim threshold with it. Whether a tensor of tens of MB comes back from the heap (warm pages)
or from a fresh ``mmap`` (one minor page fault per 4 KB on first touch) then depends on what was freed before, and
by which thread: worker threads get their own arenas, assigned by a race. Measured here (TTL1 forward at batch 1,
2 threads, six fresh processes): the eager baseline took either 0 or ~14,800 page faults per call depending on the
process, and its time and the published speed-up moved with it by up to 30%. :func:`pin_malloc` fixes both
thresholds before anything is timed, so every process starts from the same rules: blocks up to 32 MB are reused
from the heap and freed memory stays there (the steady state of a long training run, like a caching allocator's);
larger blocks are always fresh.
"""

from __future__ import annotations

import ctypes
import platform
import resource
from typing import Any

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30


def pin_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> dict[str, Any]:
    """Fix glibc malloc's mmap and trim thresholds (which also turns off their moving at run time). Returns what
    was done, for the run's ``meta.malloc``; elsewhere (not glibc) nothing changes and it says so."""
    libc_name, version = platform.libc_ver()
    if libc_name != "glibc":
        return {"mode": "system", "why": f"not glibc ({libc_name or 'unknown libc'}): left as is"}
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
    if not ok:
        return {"mode": "system", "why": f"glibc {version} refused mallopt({mmap_threshold}, {trim_threshold})"}
    return {"mode": "pinned", "glibc": version, "mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold}


def minor_faults() -> int:
    """Minor page faults of this process so far (all its threads): a fresh page touched for the first time."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
