"""How the cost of learning weights grows with rows: one epoch of the online bilevel loop of noisy_reweighting_real
against one plain LoRA epoch (`hf-fg2u finetune`, the same rows, model, adapter and batch size) at N = 250, 1000,
4000 rows of the sentiment task (words repeat past the lexicon's ~3000; every row has the same template and length).

Each run is a fresh process timed from outside, with its peak resident memory (GNU time's %M); run nothing else
meanwhile. Writes docs/bench/rows.json, which scripts/bench_report.py turns into the table of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sentiment_task import make_splits, read_lexicon  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "hf_fg2u" / "recipes"
CLI = [sys.executable, "-m", "hf_fg2u.cli.main"]
LORA = ["--lora_r", "8", "--lora_alpha", "16", "--lora_target_modules", "q_proj", "v_proj", "--max_length", "32"]


def machine_speed() -> dict:
    """The machine the ratios were measured on: the date, the CPU and the float32 matmul rate on its 2 threads
    (the same code measured 4.4x on one machine and 3.5x on a slower one: the ratio is a property of both)."""
    import platform

    import torch

    torch.set_num_threads(2)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(50):
        a @ b
    gflops = 2 * 1024**3 * 50 / (time.perf_counter() - start) / 1e9
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    return {"date": time.strftime("%Y-%m-%d"), "cpu": model, "matmul_gflops": round(gflops, 1)}


def timed(command: list[str], log: Path) -> dict:
    """Seconds and peak resident memory (MB) of ``command`` in a fresh process."""
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB=%M", *command], stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    text = log.read_text()
    if done.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{text[-3000:]}")
    return {"seconds": seconds, "peak_mb": int(re.findall(r"PEAK_KB=(\d+)", text)[-1]) / 1024}


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lexicon", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[250, 1000, 4000])
    parser.add_argument("--work", type=Path, default=Path("outputs/bench_rows"))
    parser.add_argument("--out", type=Path, default=Path("docs/bench/rows.json"))
    parser.add_argument("--balance_column", help="Learn the weights within this column's groups (e.g. completion).")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    machine = machine_speed()
    words = read_lexicon(args.lexicon)
    splits = make_splits(words, 0, 2000, 64, 0, 0, 0.4)
    meta = write(args.work / "meta.jsonl", splits["meta"])
    balance = ["--balance_column", args.balance_column] if args.balance_column else []
    results = []
    for n in args.rows:
        rows = [splits["train"][i % len(splits["train"])] for i in range(n)]
        train = write(args.work / f"train_{n}.jsonl", rows)
        weighted = write(args.work / f"weighted_{n}.jsonl", [{**row, "weight": 1.0} for row in rows])
        bilevel = timed([*CLI, "train", "--recipe", "noisy_reweighting_real", "--model_name_or_path", args.model,
                         "--data_files", f"train={train}", f"meta={meta}", "--inner_reset_every", "0",
                         "--num_train_epochs", "1", "--output_dir", str(args.work / f"run_{n}"), "--disable_tqdm",
                         "true", "--max_length", "32", *balance], args.work / f"bilevel_{n}.log")  # fmt: skip
        plain = timed([*CLI, "finetune", weighted, "--model_name_or_path", args.model, "--num_train_epochs", "1",
                       "--per_device_train_batch_size", "8", "--output_dir", str(args.work / f"plain_{n}"),
                       "--disable_tqdm", "true", *LORA], args.work / f"plain_{n}.log")  # fmt: skip
        record = {"rows": n, "bilevel": bilevel, "plain": plain,
                  "bilevel_per_row_ms": 1000 * bilevel["seconds"] / n, "plain_per_row_ms": 1000 * plain["seconds"] / n,
                  "ratio": bilevel["seconds"] / plain["seconds"]}  # fmt: skip
        results.append(record)
        print(json.dumps(record), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load((RECIPES / "noisy_reweighting_real.yaml").read_text())
    settings = {"keep_step_graphs": recipe.get("keep_step_graphs", False)}
    record = {"model": args.model, **settings, "machine": machine, "results": results}
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
