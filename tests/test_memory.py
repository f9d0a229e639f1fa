"""A light regression check of the memory claim, with the benchmark's own worker: fg2u's peak memory growth
does not grow with the unroll length T, while rgu's grows linearly (docs/benchmarks.md has the full run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_unroll.py"
SIZES = ["--hidden", "64", "--layers", "2", "--vocab", "256", "--batch-size", "4", "--seq-len", "48"]


def growth_mb(method: str, steps: int) -> float:
    # glibc returns freed blocks at once with a low mmap threshold, so RSS shows live memory, not heap drift.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(SCRIPT), "--worker", "--methods", method, "--steps", str(steps), "--threads", "1"]
    done = subprocess.run(command + SIZES, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["growth_mb"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_fg2u_memory_is_flat_in_the_unroll_length_and_rgu_is_not():
    fg2u_short, fg2u_long, rgu_long = growth_mb("fg2u", 2), growth_mb("fg2u", 16), growth_mb("rgu", 16)
    assert fg2u_long <= 1.1 * fg2u_short + 1.0, (fg2u_short, fg2u_long)
    assert fg2u_long <= rgu_long / 4, (fg2u_long, rgu_long)
