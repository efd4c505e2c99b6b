"""Host memory given back: with runtime.return_freed_memory (every command sets it through pick_device), the
large blocks a step frees leave the process, even when small allocations made between them pin glibc's heap;
with glibc's default they stay resident (the fragments that put sample.py's peak at 4.12 GiB, docs/benchmarks.md)."""
import ctypes.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 20 blocks of 12 MiB, each followed by a small tensor that stays; then the blocks are freed: MiB given back
FREE_BLOCKS = """
import sys, torch, runtime
def rss_mib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024
if sys.argv[1] == "set":
    assert runtime.return_freed_memory()
torch.ones(16 * 2**20, dtype=torch.uint8)  # freed at once: glibc's default then raises its threshold to 16 MiB
blocks, small = [], []
for _ in range(20):
    blocks.append(torch.ones(12 * 2**20, dtype=torch.uint8))
    small.append(torch.ones(2**16))
before = rss_mib()
del blocks
print(before - rss_mib())
"""


def given_back_mib(mode):
    done = subprocess.run([sys.executable, "-c", FREE_BLOCKS, mode], capture_output=True, text=True, cwd=HERE,
                          env={**os.environ, "PYTHONPATH": HERE})
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or "libc.so" not in str(ctypes.util.find_library("c")),
                    reason="mallopt is glibc's")
def test_freed_blocks_leave_the_process():
    assert given_back_mib("set") > 0.9 * 240  # all of the 240 MiB freed
    assert given_back_mib("default") < 0.5 * 240  # glibc's default keeps most of it in its heap
