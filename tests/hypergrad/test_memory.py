"""A light regression check of the memory claims, with the benchmark's own worker (docs/benchmarks.md has the full
run): on LoRA inner variables fg2u's and trajectory rgu's peak memory growth stay flat in the unroll length T while
the graph-retaining reverse unroll grows linearly; on full-parameter inner variables rgu stores T·|θ, s| and
fg2u does not, so fg2u needs less memory at long unrolls."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_unroll.py"
SIZES = ["--hidden", "64", "--layers", "2", "--vocab", "256", "--batch-size", "4", "--seq-len", "48"]


def growth_mb(method: str, steps: int, inner: str = "lora") -> float:
    # glibc returns freed blocks at once with a low mmap threshold, so RSS shows live memory, not heap drift.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(SCRIPT), "--worker", "--methods", method, "--steps", str(steps), "--threads", "1"]
    command += ["--inner", inner, "--inner-optimizer", "adam"]
    done = subprocess.run(command + SIZES, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["growth_mb"]


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def test_on_lora_fg2u_and_trajectory_rgu_are_flat_in_the_unroll_length_and_the_graph_is_not():
    fg2u_short, fg2u_long = growth_mb("fg2u", 2), growth_mb("fg2u", 16)
    rgu_short, rgu_long, graph_long = growth_mb("rgu", 2), growth_mb("rgu", 16), growth_mb("graph_rgu", 16)
    assert fg2u_long <= 1.1 * fg2u_short + 1.0, (fg2u_short, fg2u_long)
    assert rgu_long <= 1.5 * rgu_short + 1.0, (rgu_short, rgu_long)
    assert rgu_long <= graph_long / 4, (rgu_long, graph_long)


def test_on_full_parameters_rgu_grows_with_the_trajectory_and_fg2u_does_not():
    """Every weight is θ: rgu keeps 16 copies of (θ, Adam's two moments) (~28 MB at this size), fg2u one tangent."""
    fg2u_long, rgu_short, rgu_long = (
        growth_mb("fg2u", 16, "full"),
        growth_mb("rgu", 2, "full"),
        growth_mb("rgu", 16, "full"),
    )
    assert rgu_long >= rgu_short + 15.0, (rgu_short, rgu_long)
    assert fg2u_long < rgu_long, (fg2u_long, rgu_long)
