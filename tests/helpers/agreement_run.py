"""Decisions that every rank must take alike, for tests/test_distributed.py: run it with ``torchrun --standalone
--nproc_per_node N`` (2 or 3 CPU ranks). Each scenario makes one rank see something the others do not (an empty
share of the directions, less free memory, a non-finite share, a refused run lock, a failed checkpoint write);
before the ranks agreed by construction, each of them hung or crashed one rank. Rank 0 writes every rank's
outcome of every scenario to --result."""

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import torch
import torch.distributed as dist
from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import hf_fg2u.trainer.bilevel as trainer_module  # noqa: E402
import hf_fg2u.trainer.saving as saving_module  # noqa: E402
from hf_fg2u import ExampleWeights  # noqa: E402
from hf_fg2u.hypergrad import NonFiniteHypergradientError  # noqa: E402
from tests.helpers.tiny import fact_data, trainer_for  # noqa: E402

SCENARIOS = ("empty_share", "auto", "nonfinite", "lock", "save", "config")
ON_CUDA = {"use_cpu": True}  # --cuda (scripts/gpu_check.sh on a machine with several GPUs): NCCL ranks


def make_trainer(output: Path, **overrides):
    _, data = fact_data(num_facts=4, copies=4)
    values = dict(max_steps=1, per_device_train_batch_size=2, num_directions=4, directions="rademacher",
                  logging_steps=1, save_strategy="no", meta_batch_size=4)  # fmt: skip
    values.update(ON_CUDA, **overrides)
    return trainer_for(output, ExampleWeights(len(data["train"])), data, **values)


def phi_checksum(trainer) -> float:
    return float((trainer.outer.logits.detach().double() * torch.arange(1, trainer.outer.logits.numel() + 1)).sum())


def empty_share(output: Path, rank: int, world: int) -> dict:
    """b = world − 1 directions: the last rank gets none (b=8 on 9 ranks, or 5–7 ranks with ⌈b/W⌉ shares)."""
    trainer = make_trainer(output, num_directions=world - 1)
    trainer.train()
    return {"phi": phi_checksum(trainer), "norm": trainer.state.log_history[0]["hypergrad_norm"]}


def auto(output: Path, rank: int, world: int) -> dict:
    """Rank 1 sees almost no free memory, rank 0 plenty: one method for all, from the least."""
    free = 1e15 if rank == 0 else 1e4
    psutil.virtual_memory = lambda: SimpleNamespace(available=free)
    trainer = make_trainer(output, method="auto", memory_budget_mb=None, inner_optimizer="adam")
    trainer.train()
    args = trainer.args
    return {"method": args.method, "checkpoint_every": args.checkpoint_every, "phi": phi_checksum(trainer)}


def nonfinite(output: Path, rank: int, world: int) -> dict:
    """The last rank's share of outer step 0 is non-finite; the others' are finite."""
    original = trainer_module.estimate_hypergradient

    def estimate(*args, seed, **kwargs):
        if rank == world - 1 and seed % 1_000_003 == 0:  # outer step 0
            raise NonFiniteHypergradientError("fg2u: non-finite values (injected on one rank)")
        return original(*args, seed=seed, **kwargs)

    trainer_module.estimate_hypergradient = estimate
    try:
        trainer = make_trainer(output, max_steps=2, nonfinite_policy="skip")
        trainer.train()
    finally:
        trainer_module.estimate_hypergradient = original
    return {"skipped": trainer._steps_skipped, "run": trainer._steps_run, "phi": phi_checksum(trainer)}


def lock(output: Path, rank: int, world: int) -> dict:
    """Another live run (here the launcher) holds output_dir's lock: every rank must refuse."""
    (output / "run").mkdir(parents=True, exist_ok=True)
    if rank == 0:
        holder = {"pid": os.getppid(), "host": socket.gethostname()}
        (output / "run" / "_hf_fg2u.lock").write_text(json.dumps(holder))
    trainer = make_trainer(output)
    dist.barrier()  # the lock is in place before any rank trains
    try:
        trainer.train()
    except Exception as error:
        return {"raised": type(error).__name__, "message": str(error)[:200]}
    return {"raised": None}


def save(output: Path, rank: int, world: int) -> dict:
    """Rank 0's checkpoint write fails (a full disk): every rank must raise, and no checkpoint is left."""
    original = saving_module.save_bilevel_state

    def failing(*args, **kwargs):
        raise OSError("No space left on device (injected)")

    if rank == 0:
        saving_module.save_bilevel_state = failing
    trainer = make_trainer(output, save_strategy="steps", save_steps=1)
    try:
        trainer.train()
    except Exception as error:
        outcome = {"raised": type(error).__name__, "message": str(error)[:200]}
    else:
        outcome = {"raised": None}
    finally:
        saving_module.save_bilevel_state = original
    dist.barrier()
    outcome["left"] = sorted(p.name for p in (output / "run").iterdir() if "checkpoint" in p.name)
    return outcome


def config(output: Path, rank: int, world: int) -> dict:
    """The last rank was started with another unroll_steps (before: SIGABRT and a gloo reset mid-run)."""
    try:
        make_trainer(output, unroll_steps=1 if rank == world - 1 else 2)
    except Exception as error:
        return {"raised": type(error).__name__, "message": str(error)[:300]}
    return {"raised": None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--result", required=True, type=Path)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--cuda", action="store_true", help="one GPU per rank (NCCL) instead of CPU ranks (gloo)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ON_CUDA["use_cpu"] = not args.cuda
    state = PartialState(cpu=not args.cuda)  # the trainers' process group
    rank, world = dist.get_rank(), dist.get_world_size()
    outcomes = {}
    for name in args.scenarios:
        outcomes[name] = globals()[name](args.output / name, rank, world)
    everyone = [None] * world
    dist.all_gather_object(everyone, outcomes)
    if rank == 0:
        args.result.write_text(json.dumps({"world_size": world, "ranks": everyone}))
    state.wait_for_everyone()
    state.destroy_process_group()
    # The results are written and the group destroyed; skip the interpreter's teardown, where a gloo thread still
    # being torn down aborts a rank now and then ("terminate called without an active exception", SIGABRT).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
