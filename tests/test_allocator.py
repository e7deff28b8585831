"""The allocator setting that keeps Dask workers from re-mapping every per-step buffer."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# In a fresh interpreter started as Dask starts its workers (MALLOC_TRIM_THRESHOLD_ set): count
# the page faults of 50 allocate-fill-free rounds of a 4 MB tensor, as a trainer's step does.
PROBE = """
import resource, sys, torch
from iis.analyze.allocator import reuse_freed_memory
if sys.argv[1] == "tuned":
    assert reuse_freed_memory()
torch.ones(1 << 20).sum()  # warm up torch's own first allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    buf = torch.empty(1 << 20)  # 4 MB
    buf.fill_(1.0)
    del buf
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_buffers_are_reused_under_dask_worker_malloc_settings():
    # Untuned, every round maps 1,024 fresh pages; tuned, the freed block is reused.
    untuned, tuned = _faults("default"), _faults("tuned")
    assert untuned > 50 * 1000, untuned
    assert tuned < untuned / 5, (tuned, untuned)
