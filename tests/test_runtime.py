"""tune_host_malloc (ffsd.training.runtime): glibc keeps freed tensor memory; no page faults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ffsd.training import runtime
from ffsd.training.runtime import MALLOPT_MAX_MB, has_glibc_malloc, tune_host_malloc

# Allocates, fills and frees a 64 MB tensor (larger than glibc's largest dynamic mmap threshold)
# over and over, as a training step does its activations. Prints what was applied, the minor
# page faults of five cycles after a warm-up, and the growth of the resident set (MB) over the
# twenty cycles after those.
CYCLES = """
import resource, sys
import torch
from ffsd.training.runtime import tune_host_malloc

arg = lambda v: None if v == "null" else int(v)
print(tune_host_malloc(arg(sys.argv[1]), arg(sys.argv[2])))

def cycle():
    t = torch.empty(64 << 20, dtype=torch.uint8)
    t.fill_(1)
    del t

def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() >> 20

# The heap settles within a few cycles (at most 9 seen): the allocator asks for 64-byte aligned
# blocks, so a freed block is a little too small for the next request until neighbours merge.
for _ in range(16):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
rss = resident_mb()
for _ in range(20):
    cycle()
print(resident_mb() - rss)
"""
PAGES = 5 * (64 << 20) // 4096


def faults_of_cycles(mmap_mb: str, trim_mb: str) -> tuple[str, int, int]:
    res = subprocess.run(
        [sys.executable, "-c", CYCLES, mmap_mb, trim_mb],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert res.returncode == 0, res.stderr[-2000:]
    applied, faults, growth = res.stdout.strip().splitlines()[-3:]
    return applied, int(faults), int(growth)


def thp_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not has_glibc_malloc(), reason="mallopt is glibc's")
def test_tuned_malloc_reuses_freed_tensor_memory_instead_of_faulting_it_in_again():
    applied, tuned, growth = faults_of_cycles("1024", "1024")
    assert applied == "{'mmap_threshold_mb': 1024, 'trim_threshold_mb': 1024}"
    assert tuned < 0.01 * PAGES, f"{tuned} minor faults for {PAGES} pages already touched once"
    assert growth <= 1, f"the heap kept growing: +{growth} MB over 20 more cycles"
    applied, default, _ = faults_of_cycles("null", "null")
    assert applied == "{}"
    if not thp_always():  # with huge pages everywhere a fault maps 512 pages at once
        assert default > 0.5 * PAGES, "glibc's defaults should fault each cycle's pages in again"


def test_null_leaves_the_c_library_alone(monkeypatch):
    def no_libc(*args, **kwargs):
        raise AssertionError("the C library should not be touched")

    monkeypatch.setattr(runtime.ctypes, "CDLL", no_libc)
    assert tune_host_malloc(None, None) == {}


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda *a, **k: pytest.fail("called mallopt"))
    assert tune_host_malloc(1024, 1024) == {}


@pytest.mark.parametrize(
    ("mmap_mb", "trim_mb", "key", "value"),
    [
        (0, None, "mmap_threshold_mb", "0"),
        (None, MALLOPT_MAX_MB + 1, "trim_threshold_mb", str(MALLOPT_MAX_MB + 1)),
        ("512", None, "mmap_threshold_mb", "'512'"),
        (None, True, "trim_threshold_mb", "True"),
    ],
)
def test_bad_values_name_the_key_the_value_and_the_range(mmap_mb, trim_mb, key, value):
    with pytest.raises(ValueError) as err:
        tune_host_malloc(mmap_mb, trim_mb)
    assert f"trainer.host_malloc.{key}={value}" in str(err.value)
    assert f"from 1 to {MALLOPT_MAX_MB}" in str(err.value) and "null" in str(err.value)
