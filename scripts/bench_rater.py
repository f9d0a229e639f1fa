"""The cost of a data rater against a plain LoRA epoch over the pool (`make bench-rater`, docs/bench/rater.json).

Each command runs alone, one after the other, in a process of its own, on one data seed of `make rater`'s task:

- a plain LoRA epoch over the pool (`hf-fg2u finetune POOL --uniform true --num_train_epochs 1`, the fine-tune
  settings of the table, no evaluation);
- learning the rater on the sample (`hf-fg2u train --recipe data_rater`);
- scoring the pool with it (`hf-fg2u score`); and (--parts memory, valid beside other work) the peak memory of
  scoring the pool and the pool repeated 10 times (flat in the rows).

Writes the seconds and the peak resident memory of each command (the largest child process, getrusage), and the
ratio (learn + score) / plain epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rater_table import BALANCE, POOL_FINETUNE
from value_table import CLI, HERE, read_rows, write_rows


def measured(command: list[str], log: Path) -> dict:
    """Seconds and peak RSS (MB) of ``command`` run in a fresh process that starts it as its only child."""
    probe = ("import resource, subprocess, sys, time; s = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:]).returncode; "
             "print(time.perf_counter() - s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r)")  # fmt: skip
    with log.open("w") as err:
        done = subprocess.run([sys.executable, "-c", probe, *command], stdout=subprocess.PIPE, stderr=err, text=True)
    seconds, peak_kb, code = done.stdout.split()[-3:]
    if int(code):
        sys.exit(f"failed: {' '.join(command)}; see {log}")
    return {"seconds": float(seconds), "peak_mb": int(peak_kb) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lexicon", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--work", type=Path, default=Path("outputs/bench_rater"))
    parser.add_argument("--out", type=Path, default=Path("docs/bench/rater.json"))
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=10, help="The pool repeated this many times for the memory run.")
    parser.add_argument("--parts", nargs="+", default=["timing", "memory"], choices=["timing", "memory"],
                        help="timing: each command alone (nothing else may run); memory: peak RSS of scoring the pool "
                        "and the pool repeated (valid beside other work).")  # fmt: skip
    parser.add_argument("--rater", type=Path, help="memory: score with this rater run (default: the timing part's).")
    parser.add_argument("--memory_base", default="pool", choices=["pool", "tenth"],
                        help="memory: score the pool and 10x it, or a tenth of it and the pool.")  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data, runs = args.work / "data", args.work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(HERE / "pool_task.py"), "--lexicon", str(args.lexicon), "--out", str(data),
                    "--data_seed", str(args.data_seed)], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    rater = args.rater or runs / "rater"
    score = [*CLI, "score", str(rater), "--max_length", "32", "--disable_tqdm", "--bf16", "--overwrite_output_dir"]
    commands = {}
    if "timing" in args.parts:
        commands.update({
            "plain_lora_epoch_over_pool": [*CLI, "finetune", str(data / "pool.jsonl"), "--uniform", "true",
                                           "--model_name_or_path", args.model, "--num_train_epochs", "1",
                                           "--output_dir", str(runs / "plain_epoch"), "--overwrite_output_dir", "true",
                                           "--use_cpu", "true", *POOL_FINETUNE],
            "learn_rater": [*CLI, "train", "--recipe", "data_rater", "--model_name_or_path", args.model, "--max_length",
                            "32", "--disable_tqdm", "true", *BALANCE, "--output_dir", str(runs / "rater"),
                            "--overwrite_output_dir", "true", "--data_files", f"train={data / 'sample.jsonl'}",
                            f"meta={data / 'meta.jsonl'}"],
            "score_pool": [*score, "--data_files", str(data / "pool.jsonl"), "--output_dir", str(runs / "scored")],
        })  # fmt: skip
    if "memory" in args.parts:  # the base: the pool, or its first tenth (10x fewer rows to stream, same ratio)
        pool = read_rows(data / "pool.jsonl")
        base = pool if args.memory_base == "pool" else pool[: len(pool) // 10]
        small = write_rows(args.work / "memory_base.jsonl", base)
        big = write_rows(args.work / "memory_x10.jsonl", base * args.repeat)
        commands.update({
            "memory_score_pool": [*score, "--data_files", small, "--output_dir", str(runs / "memory_scored")],
            "memory_score_pool_x10": [*score, "--data_files", big, "--output_dir", str(runs / "memory_scored_x10")],
        })  # fmt: skip
    found = json.loads(args.out.read_text()) if args.out.is_file() else {}
    found["machine"] = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    for name, command in commands.items():
        found[name] = measured(command, runs / f"{name}.log")
        print(name, found[name], flush=True)
    folders = {
        "score_pool": "scored",
        "memory_score_pool": "memory_scored",
        "memory_score_pool_x10": "memory_scored_x10",
    }
    for name, folder in folders.items():
        if name in commands:
            found[name].update(json.loads((runs / folder / "score_results.json").read_text()))
    if "timing" in args.parts:
        rater_seconds = found["learn_rater"]["seconds"] + found["score_pool"]["seconds"]
        found["learn_plus_score_over_plain_epoch"] = rater_seconds / found["plain_lora_epoch_over_pool"]["seconds"]
    if "memory" in args.parts:
        found["peak_memory_x10_over_x1"] = (
            found["memory_score_pool_x10"]["peak_mb"] / found["memory_score_pool"]["peak_mb"]
        )
    print(json.dumps({k: v for k, v in found.items() if not isinstance(v, dict)}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(found, indent=2))


if __name__ == "__main__":
    main()
