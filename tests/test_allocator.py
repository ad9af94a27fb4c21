"""glibc malloc tuning: freed large buffers are reused instead of faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlvr_lightning.allocator import keep_freed_memory

# Allocate, touch and free a 64 MiB tensor 25 times (as a training loop does with its logits):
# print the page faults of the last 20 rounds. glibc settles on reusing the block after a few
# rounds (how many varies with the machine), so the first 5 are not counted.
PROBE = """
import resource, sys, torch
from rlvr_lightning.allocator import keep_freed_memory
applied = keep_freed_memory(int(sys.argv[1])) if sys.argv[1] != "none" else False
for _ in range(5):
    torch.ones(2**24).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(2**24).sum()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_allocation_faults(threshold: str) -> tuple[str, int]:
    result = subprocess.run([sys.executable, "-c", PROBE, threshold], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    applied, faults = result.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc is Linux-only")
def test_raised_threshold_reuses_freed_buffers_without_page_faults() -> None:
    applied, tuned = _second_allocation_faults("1024")
    _, default = _second_allocation_faults("none")
    assert applied == "True"
    # 64 MiB is 16384 pages of 4 KiB: glibc's default unmaps them and faults them in every round.
    assert default > 20 * 16384 * 0.9
    assert tuned < default / 3


def test_null_leaves_malloc_alone_and_bad_values_are_named() -> None:
    assert keep_freed_memory(None) is False
    with pytest.raises(ValueError, match="malloc_threshold_mib=0 must be in \\[1, 2047\\]"):
        keep_freed_memory(0)
