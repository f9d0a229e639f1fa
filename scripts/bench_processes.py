"""Time per outer step at b directions with 1 vs 2 processes (one thread each), side by side in one run.

    .venv/bin/python scripts/bench_processes.py                # b=8, writes docs/bench_processes.md
    .venv/bin/python scripts/bench_processes.py --worker ...   # one measurement (launched by the parent)

Each process runs the same unroll and takes b/P of the directions; the estimates meet in one all-reduce.
The data is the tests' fact table; the model a Llama from config of --hidden size and --layers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_fg2u import ExampleWeights
    from tests.test_trainer import TOKENIZER, fact_data, trainer_for

    torch.set_num_threads(1)
    _, data = fact_data(num_facts=8, copies=8)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(TOKENIZER), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager", initializer_range=0.2, pad_token_id=TOKENIZER.pad_token_id,
    )  # fmt: skip
    trainer = trainer_for(
        Path(args.scratch) / f"p{world}", ExampleWeights(64), data, model=LlamaForCausalLM(config),
        max_steps=args.steps + 1,
        per_device_train_batch_size=8 // world, num_directions=args.directions, directions="rademacher",
        directions_per_pass=args.directions, logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    trainer.train()
    seconds = [e["outer_step_seconds"] for e in trainer.state.log_history if "outer_step_seconds" in e][1:]
    if trainer.accelerator.is_main_process:
        print(json.dumps({"processes": world, "seconds_per_step": sum(seconds) / len(seconds)}))


def measure(processes: int, args) -> dict:
    command = [str(Path(__file__).resolve()), "--worker", "--directions", str(args.directions)]
    command += ["--steps", str(args.steps), "--scratch", args.scratch, "--hidden", str(args.hidden)]
    command += ["--layers", str(args.layers)]
    if processes > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
        ] + command
    else:
        command = [sys.executable] + command
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--directions", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed outer steps (after one warm-up step)")
    parser.add_argument("--scratch", default="/tmp/hf_fg2u_bench_processes")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the Llama built from config")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", default=str(REPO / "docs" / "bench_processes.md"))
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    start = time.time()
    one, two = measure(1, args), measure(2, args)
    speedup = one["seconds_per_step"] / two["seconds_per_step"]
    table = (
        f"# 1 vs 2 processes, b={args.directions}\n\n`python scripts/bench_processes.py --directions "
        f"{args.directions} --hidden {args.hidden} --layers {args.layers}` (CPU, one thread per process, Llama from "
        f"config with hidden {args.hidden} and {args.layers} layers, LoRA r=8, T=2, 8 rows of 10 tokens per inner "
        "step)\n\n"
        "| processes | seconds per outer step |\n|---|---|\n"
        f"| 1 | {one['seconds_per_step']:.3f} |\n| 2 | {two['seconds_per_step']:.3f} |\n\n"
        f"speed-up 2 vs 1: **{speedup:.2f}×** (measured in {time.time() - start:.0f} s)\n"
    )
    Path(args.out).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
