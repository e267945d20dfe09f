"""reuse_freed_memory: freed large CPU buffers are reused instead of faulted in anew (in fresh processes)."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from gigadiff.heap import reuse_freed_memory
on = reuse_freed_memory() if sys.argv[1] == "on" else False
x = torch.ones(1, 8, 1024, 1024)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # what a whole-buffer decode step does: large temporaries, made and freed
    y = torch.nn.functional.interpolate(x, scale_factor=2.0)  # 128 MB
    z = y * 2
    del y, z
print(int(on), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[bool, int]:
    """Whether the setting took, and the page faults of making and freeing 20 buffers of 128 MB."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    on, count = out.split()
    return on == "1", int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_large_buffers_are_reused_instead_of_faulted_in_again():
    pages = 20 * (128 << 20) // 4096
    applied, reused = faults("on")
    _, fresh = faults("off")
    assert applied
    assert fresh > 0.95 * pages  # by default every new buffer is faulted in again, page by page
    assert reused < 0.5 * fresh  # measured: 0.35x
