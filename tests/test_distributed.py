"""(FG)²U across processes: 2 CPU ranks (gloo) split the directions and all-reduce once per outer step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "distributed_run.py"


def run(tmp_path: Path, name: str, processes: int, batch: int, steps: int = 2, resume: str | None = None,
        perturb: bool = False) -> dict:  # fmt: skip
    result = tmp_path / f"{name}.json"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = (launcher if processes > 1 else [sys.executable]) + [str(SCRIPT), "--output", str(tmp_path / name)]
    command += ["--result", str(result), "--batch", str(batch), "--steps", str(steps)]
    if resume:
        command += ["--resume", resume]
    if perturb:
        command += ["--perturb"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(result.read_text())


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_two_processes_equal_one_process_with_the_union_of_directions(tmp_path):
    two = run(tmp_path, "two", processes=2, batch=4, perturb=True)
    one = run(tmp_path, "one", processes=1, batch=8)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["resyncs"] == 1  # rank 1 drifted after step 1 and was resynchronised from rank 0
    torch.testing.assert_close(torch.tensor(two["logits"]), torch.tensor(one["logits"]), rtol=0, atol=1e-6)
    assert torch.tensor(two["logits"]).abs().max() > 0  # the outer variables did move
    checkpoints = sorted(p.name for p in (tmp_path / "two" / "run").iterdir() if p.name.startswith("checkpoint"))
    assert checkpoints == ["checkpoint-2"]
    # A 2-process checkpoint resumes on 1 process and continues as the 1-process run does.
    resumed = run(tmp_path, "resumed", processes=1, batch=8, steps=4,
                  resume=str(tmp_path / "two" / "run" / "checkpoint-2"))  # fmt: skip
    straight = run(tmp_path, "straight", processes=1, batch=8, steps=4)
    torch.testing.assert_close(torch.tensor(resumed["logits"]), torch.tensor(straight["logits"]), rtol=0, atol=1e-6)
