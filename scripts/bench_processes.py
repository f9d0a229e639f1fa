"""Time per outer step at b directions with 1 vs 2 processes, side by side in one run, for both ways of
splitting an outer step (``process_split``): by directions (every process runs the same unroll and takes b/P
of the directions; one all-reduce per outer step) and by data (every process keeps its own rows and all b
directions; inner gradients and tangents are averaged at every inner step).

    .venv/bin/python scripts/bench_processes.py                  # CPU: 1 vs 2 processes, one thread each
    .venv/bin/python scripts/bench_processes.py --gpu --processes 1 2 4 8 --hidden 1024 --layers 8 \\
        --seq-len 256 --batch 32 --out /tmp/bench_processes_gpu.md   # the GPU variant, a process per GPU
    .venv/bin/python scripts/bench_processes.py --worker ...     # one measurement (what the parent launches)

Processes are started by ``accelerate launch`` with hf_fg2u/recipes/accelerate_configs/cpu_2proc.yaml (CPU) or
``--multi_gpu`` (GPU). The data is the facts table padded to --seq-len tokens; the model a Llama from config.
The inner batch (--batch rows) is the same for every process count: with P processes each reads batch/P rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = REPO / "hf_fg2u" / "recipes" / "accelerate_configs" / "cpu_2proc.yaml"


def worker(args) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_fg2u import ExampleWeights
    from hf_fg2u.lm.toy_data import make_fact_splits
    from tests.helpers.tiny import TOKENIZER, tokenized, trainer_for

    if not args.gpu:
        torch.set_num_threads(1)
    data = tokenized(make_fact_splits(8, 8, seed=0), max_length=args.seq_len, pad_to=args.seq_len)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(TOKENIZER), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=args.seq_len, attn_implementation="eager", initializer_range=0.2,
        pad_token_id=TOKENIZER.pad_token_id,
    )  # fmt: skip
    trainer = trainer_for(
        Path(args.scratch) / f"{args.split}-p{world}", ExampleWeights(len(data["train"])), data,
        model=LlamaForCausalLM(config), max_steps=args.steps + 1, per_device_train_batch_size=args.batch // world,
        num_directions=args.directions, directions="rademacher", directions_per_pass=args.directions,
        process_split=args.split, logging_steps=1, disable_tqdm=True, use_cpu=not args.gpu,
    )  # fmt: skip
    trainer.train()
    seconds = [e["outer_step_seconds"] for e in trainer.state.log_history if "outer_step_seconds" in e][1:]
    if trainer.accelerator.is_main_process:
        print(json.dumps({"processes": world, "seconds_per_step": statistics.median(seconds)}))
    trainer.accelerator.end_training()


def measure(processes: int, split: str, args) -> float:
    command = [str(Path(__file__).resolve()), "--worker", "--split", split]
    for flag in ("directions", "steps", "scratch", "hidden", "layers", "seq_len", "batch"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.gpu:
        command.append("--gpu")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        command = [sys.executable, *command]
    elif args.gpu:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), *command]  # fmt: skip
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG), *command]
    if not args.gpu:
        env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])["seconds_per_step"]


def measure_all(args) -> dict[tuple[str, int], list[float]]:
    """Seconds per outer step of every (split, processes) cell, ``--repeats`` times, interleaved so that slow
    phases of a shared machine spread over all cells. With one process the split changes nothing: it is
    measured once per repeat and counts for every split."""
    runs: dict[tuple[str, int], list[float]] = {(s, p): [] for s in args.splits for p in args.processes}
    for _ in range(args.repeats):
        for p in args.processes:
            for index, split in enumerate(args.splits):
                value = measure(p, split, args) if p > 1 or index == 0 else runs[args.splits[0], p][-1]
                runs[split, p].append(value)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--directions", type=int, default=8)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--splits", nargs="+", default=["directions", "data"], choices=["directions", "data"])
    parser.add_argument("--steps", type=int, default=6, help="timed outer steps (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of every cell, interleaved")
    parser.add_argument("--scratch", default="/tmp/hf_fg2u_bench_processes")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the Llama built from config")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per row (the facts padded to this length)")
    parser.add_argument("--batch", type=int, default=8, help="inner batch rows per step, over all processes")
    parser.add_argument("--gpu", action="store_true", help="one process per GPU (accelerate --multi_gpu)")
    parser.add_argument("--split", default="directions", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "docs" / "bench" / "bench_processes.md"), help="also .json")
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    start = time.time()
    runs = measure_all(args)
    seconds = {cell: statistics.median(values) for cell, values in runs.items()}
    base = args.processes[0]
    rows = [
        f"| {split} | {p} | {seconds[split, p]:.3f} | {' / '.join(f'{v:.2f}' for v in runs[split, p])} | "
        f"{seconds[split, base] / seconds[split, p]:.2f}× |"
        for split in args.splits
        for p in args.processes
    ]
    command = "python scripts/bench_processes.py " + " ".join(sys.argv[1:])
    device = "GPU, one process per GPU" if args.gpu else "CPU, one thread per process"
    table = (
        f"# Processes, b={args.directions}\n\n`{command.strip()}` ({device}; Llama from config with hidden "
        f"{args.hidden} and {args.layers} layers, LoRA r=8, T=2, {args.batch} rows of {args.seq_len} tokens per "
        f"inner step in all; a run's time is the median of its {args.steps} timed outer steps, a cell's the "
        f"median of {args.repeats} runs, interleaved)\n\n"
        f"| process_split | processes | seconds per outer step | runs | speed-up vs {base} |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nmeasured in {time.time() - start:.0f} s\n"
    )
    out = Path(args.out)
    out.write_text(table)
    records = [
        {"process_split": split, "processes": p, "seconds_per_step": seconds[split, p], "runs": runs[split, p]}
        for split, p in seconds
    ]
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "records": records}, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
