"""use_huge_pages: large CPU tensors are faulted in by the 2 MB page, not the 4 KB page (in fresh processes)."""

import subprocess
import sys

import pytest

from gigadiff.heap import huge_pages_available

PROBE = """
import os, resource, sys
os.environ.pop("THP_MEM_ALLOC_ENABLE", None)
from gigadiff.heap import use_huge_pages
on = use_huge_pages() if sys.argv[1] == "on" else False
import torch
x = torch.ones(1, 8, 1024, 1024)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # what a whole-buffer decode step does: large temporaries, made and freed
    y = torch.nn.functional.interpolate(x, scale_factor=2.0)  # 128 MB
    z = y * 2
    del y, z
print(int(on), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[bool, int]:
    """Whether huge pages were asked for, and the page faults of making and freeing 20 buffers of 128 MB."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    on, count = out.split()
    return on == "1", int(count)


@pytest.mark.skipif(not huge_pages_available(), reason="the kernel grants no transparent huge pages")
def test_large_buffers_are_faulted_in_by_the_huge_page():
    pages = 20 * (128 << 20) // 4096
    applied, huge = faults("on")
    _, small = faults("off")
    assert applied
    assert small > 0.95 * pages  # by default every new buffer is faulted in again, 4 KB at a time
    assert huge < 0.1 * small  # measured: 1/56


def test_the_users_own_choice_is_kept(monkeypatch):
    from gigadiff import heap

    monkeypatch.setattr(heap, "huge_pages_available", lambda: True)
    monkeypatch.setenv(heap.ENV, "0")
    assert not heap.use_huge_pages()
    monkeypatch.delenv(heap.ENV)
    assert heap.use_huge_pages()
