"""glibc's allocator, set so that a head trainer's per-step buffers are reused, not re-mapped.

The head trainer allocates the same few MB-sized tensors at every optimiser step. glibc serves
blocks above its mmap threshold with a fresh ``mmap`` (page faults on first touch, ``munmap`` on
free), and gives the heap's free top back to the OS above its trim threshold. Dask starts every
worker with ``MALLOC_TRIM_THRESHOLD_=65536``, which also freezes the mmap threshold at 128 KiB: each
step's buffers were then mapped and unmapped anew, and a demo-sized analysis task took 2.5x the
CPU time it takes in a plain process (benchmarks/README.md, "Allocator in Dask workers").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and are reused; glibc accepts at most 32 MiB here
# on 64-bit. Larger blocks (a whole split's features) are still mapped and returned on free.
MMAP_THRESHOLD = 32 << 20
# Free heap top kept for reuse before it is returned to the OS: a few steps' worth of buffers.
TRIM_THRESHOLD = 64 << 20

_done = False


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds in this process (once; idempotent).

    Returns:
        True when both thresholds were set; False off glibc (macOS, musl, Windows), where the
        default allocator is left as it is.
    """
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError) as err:  # no loadable libc: keep the defaults
        log.debug("mallopt unavailable: %s", err)
        return False
    _done = ok
    return ok
