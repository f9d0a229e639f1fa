"""(FG)²U across processes: 2 CPU ranks (gloo) started by ``accelerate launch`` with the repository's
2-process CPU config. Split by directions (one all-reduce per outer step) or by data (inner gradients and
their tangents averaged at every inner step)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_fg2u.hypergrad import estimate_hypergradient
from hf_fg2u.trainer.processes import ProcessPolicy, balanced_share
from tests.helpers.tiny import Quadratic

HERE = Path(__file__).resolve().parents[1] / "helpers"  # the scripts each rank runs
CPU_2PROC = HERE.parents[1] / "hf_fg2u" / "recipes" / "accelerate_configs" / "cpu_2proc.yaml"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC)]

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")


def launch(script: str, processes: int, arguments: list[str]) -> None:
    command = (LAUNCH if processes > 1 else [sys.executable]) + [str(HERE / script), *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def run(tmp_path: Path, name: str, processes: int, batch: int, steps: int = 2, resume: str | None = None,
        perturb: bool = False, process_split: str = "directions") -> dict:  # fmt: skip
    result = tmp_path / f"{name}.json"
    arguments = ["--output", str(tmp_path / name), "--result", str(result), "--batch", str(batch)]
    arguments += ["--steps", str(steps), "--process_split", process_split]
    if resume:
        arguments += ["--resume", resume]
    if perturb:
        arguments += ["--perturb"]
    launch("distributed_run.py", processes, arguments)
    return json.loads(result.read_text())


def checkpoints(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("checkpoint"))


def test_two_processes_equal_one_process_with_the_union_of_directions(tmp_path):
    two = run(tmp_path, "two", processes=2, batch=4, perturb=True)
    one = run(tmp_path, "one", processes=1, batch=8)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["resyncs"] == 1  # rank 1 drifted after step 1 and was resynchronised from rank 0
    torch.testing.assert_close(torch.tensor(two["logits"]), torch.tensor(one["logits"]), rtol=0, atol=1e-6)
    assert torch.tensor(two["logits"]).abs().max() > 0  # the outer variables did move
    assert checkpoints(tmp_path / "two" / "run") == ["checkpoint-2"]
    # A 2-process checkpoint resumes on 1 process and continues as the 1-process run does.
    resumed = run(tmp_path, "resumed", processes=1, batch=8, steps=4,
                  resume=str(tmp_path / "two" / "run" / "checkpoint-2"))  # fmt: skip
    straight = run(tmp_path, "straight", processes=1, batch=8, steps=4)
    torch.testing.assert_close(torch.tensor(resumed["logits"]), torch.tensor(straight["logits"]), rtol=0, atol=1e-6)


def test_data_parallel_inner_loop_equals_one_process_on_the_mean_loss(tmp_path):
    """Each rank holds half of every inner batch; averaging gradients and tangents each step gives the
    hypergradient of the mean of the halves' losses, as one process computes it (fg2u and rgu)."""
    result = tmp_path / "data_parallel.json"
    launch("data_parallel_run.py", 2, ["--result", str(result)])
    grads = {k: torch.tensor(v) for k, v in json.loads(result.read_text()).items() if k != "world_size"}
    torch.testing.assert_close(grads["parallel"], grads["single"], rtol=0, atol=1e-10)
    # float64 model, but Llama's RMSNorm computes in float32: forward vs reverse agree to ~1e-7 only.
    assert float((grads["parallel"] - grads["rgu"]).norm() / grads["rgu"].norm()) < 1e-5
    assert float((grads["parallel_rgu"] - grads["rgu"]).norm() / grads["rgu"].norm()) < 1e-5
    assert float(grads["rgu"].norm()) > 1e-3


def test_data_parallel_trainer_keeps_ranks_in_step(tmp_path):
    parallel = run(tmp_path, "data", processes=2, batch=4, process_split="data")
    assert parallel["world_size"] == 2 and parallel["resyncs"] == 0
    first, second = parallel["theta_checksums"]
    assert first == second
    first, second = parallel["outer_checksums"]  # same directions on every rank, hence the same estimate
    assert first == second
    logits = torch.tensor(parallel["logits"])
    assert torch.isfinite(logits).all() and logits.abs().max() > 0
    assert checkpoints(tmp_path / "data" / "run") == ["checkpoint-2"]


def torchrun(script: str, processes: int, arguments: list[str], timeout: float = 120) -> None:
    """``torchrun --standalone`` (its rendezvous binds a free port itself: no port races between tests); a run
    that hangs is killed with its whole process group and fails the test."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([*command, str(HERE / script), *arguments], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{script} on {processes} ranks hung (killed after {timeout} s):\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]


@pytest.mark.parametrize("processes", [2, 3])
def test_ranks_take_every_decision_alike(tmp_path, processes):
    """Each scenario of tests/agreement_run.py shows one rank something the others do not; on main before the
    fix the empty share and the refused lock crashed, the non-finite share and the failed save hung, and
    `auto` picked rgu on one rank and fg2u on the others."""
    result = tmp_path / "agreement.json"
    torchrun("agreement_run.py", processes, ["--output", str(tmp_path), "--result", str(result)])
    report = json.loads(result.read_text())
    assert report["world_size"] == processes
    ranks = report["ranks"]
    # b = W − 1 directions: one rank has none, adds zeros to the sum; φ moved, and alike everywhere.
    assert len({r["empty_share"]["phi"] for r in ranks}) == 1
    assert all(r["empty_share"]["norm"] > 0 for r in ranks)
    # auto: one choice, from the least free memory (rank 1's: nothing fits, the smaller need wins).
    assert len({(r["auto"]["method"], r["auto"]["checkpoint_every"], r["auto"]["phi"]) for r in ranks}) == 1
    # The last rank's non-finite share skips step 0 on every rank; step 1 runs everywhere.
    assert [(r["nonfinite"]["skipped"], r["nonfinite"]["run"]) for r in ranks] == [(1, 1)] * processes
    assert len({r["nonfinite"]["phi"] for r in ranks}) == 1
    # The refused lock and rank 0's failed save raise on every rank, and leave no checkpoint.
    assert ranks[0]["lock"]["raised"] == "ValueError" and "Another run" in ranks[0]["lock"]["message"]
    assert ranks[0]["save"]["raised"] == "OSError"
    for r in ranks[1:]:
        assert r["lock"]["raised"] == "RuntimeError" and "failed on process 0" in r["lock"]["message"]
        assert r["save"]["raised"] == "RuntimeError"
        assert "Saving checkpoint-1 failed on process 0" in r["save"]["message"]
    assert all(r["save"]["left"] == [] for r in ranks)
    # Ranks started with different settings refuse at construction, all of them, naming the setting.
    assert all(r["config"]["raised"] == "ValueError" and "unroll_steps: rank 0 2" in r["config"]["message"]
               for r in ranks)  # fmt: skip


@pytest.mark.parametrize("world", [5, 7, 16])
def test_direction_shares_of_any_world_size_sum_to_the_full_estimate(world):
    """b=8 on 5, 7 or 16 ranks (the shares one process computes in turn): no share is empty when b >= W, and
    with b < W the empty shares add exactly zero (before, ⌈b/W⌉ shares left ranks empty and torch.cat([]) raised)."""
    problem = Quadratic()
    common = dict(inner_lr=0.1, num_directions=8, directions="rademacher", seed=3, directions_per_pass=2)
    batches = [None] * 3
    full = estimate_hypergradient(problem.inner_loss, problem.outer_loss, problem.params, problem.outer, batches,
                                  None, **common)  # fmt: skip
    shares = [balanced_share(8, world, rank) for rank in range(world)]
    assert sum(s.stop - s.start for s in shares) == 8 and (world > 8 or all(s.stop > s.start for s in shares))
    total = torch.zeros_like(full.grad["phi"])
    for share in shares:
        part = estimate_hypergradient(problem.inner_loss, problem.outer_loss, problem.params, problem.outer, batches,
                                      None, direction_slice=share, **common)  # fmt: skip
        total += part.grad["phi"]
    torch.testing.assert_close(total, full.grad["phi"], rtol=0, atol=1e-12)


def test_fg2u_zo_with_fewer_directions_than_processes_is_refused_at_start():
    from types import SimpleNamespace

    from hf_fg2u.hypergrad import make_method

    policy = ProcessPolicy(SimpleNamespace(num_processes=16, process_index=0),
                           SimpleNamespace(num_directions=8, process_split="directions"))  # fmt: skip
    policy.check_direction_shares({"fg2u": make_method("fg2u")})  # fg2u runs an empty share
    with pytest.raises(ValueError, match=r"num_directions=8 < 16 processes: 8 processes would get no direction"):
        policy.check_direction_shares({"fg2u_zo": make_method("fg2u_zo")})


@pytest.mark.parametrize(
    ("methods", "fix"),
    [
        (["rgu"], r"Set process_split='data'"),
        (["fg2u", "hessian_free"], r"Run it on one process, or .*\['fg2u', 'rgu'"),
    ],
)
def test_a_method_without_directions_split_by_directions_is_warned_about(methods, fix):
    """Issue 36: rgu under process_split='directions' ran the whole unroll on every rank without a word."""
    import re
    import warnings
    from types import SimpleNamespace

    from hf_fg2u.hypergrad import make_method

    def policy(world, split="directions"):
        return ProcessPolicy(SimpleNamespace(num_processes=world, process_index=0),
                             SimpleNamespace(num_directions=8, process_split=split))  # fmt: skip

    built = {name: make_method(name) for name in methods}
    repeated = [name for name in methods if name != "fg2u"]
    seen = re.escape(f"Method {repeated} draws no directions, so process_split='directions' gives each of the 2")
    with pytest.warns(UserWarning, match=rf"{seen} processes .*{fix}"):
        policy(2).warn_if_unroll_repeated(built)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy(1).warn_if_unroll_repeated(built)  # one process: nothing repeated
        policy(2, "data").warn_if_unroll_repeated(built)  # rows split
        policy(2).warn_if_unroll_repeated({"fg2u": make_method("fg2u")})  # directions split
