"""Weights for rows the bilevel loop never saw: the pool table of `make rater` (docs/rater.md).

Task (scripts/pool_task.py): `make value`'s words task grown to a pool of 6000 rows (40% wrong answers), the same
clean meta, stop and test rows; the rater learns on a random sample of 600 pool rows. Per data seed, everything
through the user's commands:

1. `hf-fg2u train --recipe data_rater --balance_column completion` on the sample (the rater, and its adapter);
   `hf-fg2u score` weighs the whole pool with it.
2. The comparisons on the same pool: uniform; the clean-rows oracle; the pool and the meta rows; the sample alone
   (a random sample of the pool's size 600); per-row online weights learned on the sample (`--recipe
   noisy_reweighting_real`), fine-tuned on the sample alone; and what the rater reduces to, the small-loss rule at
   the rater run's adapter applied to the pool, once told the noise rate (keeping 60%) and once with the threshold
   chosen on the meta rows (the largest loss of a meta row), each answer keeping its share.
3. `hf-fg2u finetune` of a fresh LoRA adapter per selection, all with the same budget (--steps optimizer steps of 16
   rows, the best of the stop-row evaluations every --steps/3 steps kept); forced-choice accuracy on the test words.

Prints and writes OUT/table.json; `--report docs/rater.md` writes the markdown generated from it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

from value_table import (
    CLI,
    FINETUNE,
    HERE,
    IN_PROCESS,
    read_rows,
    resumed,
    run,
    run_tasks,
    timed_once,
    write_between_markers,
    write_rows,
)

# value_table's fine-tune, with a step budget in place of its 3 epochs: every selection sees as many rows.
POOL_FINETUNE = [arg for arg in FINETUNE if arg not in ("--num_train_epochs", "3")]
BALANCE = ["--balance_column", "completion"]
TOLD = {"oracle_clean_only": "which rows", "small_loss_told_rate": "how many"}
DOWNSTREAM = ["uniform", "rater", "oracle_clean_only"]  # the rows another model is fine-tuned on
ROWS = ["uniform", "pool_and_meta", "random_sample", "sample_online_weights", "small_loss_meta_threshold",
        "small_loss_told_rate", "rater", "oracle_clean_only"]  # fmt: skip


def loss_filters(model: str, adapter: Path, data: Path, work: Path) -> dict:
    """The small-loss rule at ``adapter`` on the pool: keep the 60% of each answer's rows with the lowest loss
    (told the rate), and keep the rows below the largest loss of a meta row (not told); their AUROC and seconds."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_fg2u.baselines import base_model_losses, keep_top
    from hf_fg2u.lm.collator import PaddingCollator
    from hf_fg2u.lm.evaluation import auroc
    from hf_fg2u.lm.formats import prepare_split

    pool, meta = read_rows(data / "pool.jsonl"), read_rows(data / "meta.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(model)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="eager")
    adapted = PeftModel.from_pretrained(base, str(adapter))
    collator = PaddingCollator(pad_token_id=tokenizer.pad_token_id)

    def losses(rows):
        split = prepare_split(Dataset.from_list(rows).select_columns(["prompt", "completion"]), "rows", tokenizer, 32)
        with torch.no_grad():
            return base_model_losses(adapted, split, collator)

    start = time.perf_counter()
    pool_losses, meta_losses = losses(pool), losses(meta)
    seconds = time.perf_counter() - start
    corrupted = torch.tensor([row["is_corrupted"] for row in pool])
    answers = [row["completion"] for row in pool]
    told = torch.zeros(len(pool), dtype=torch.float64)
    for answer in set(answers):  # each answer keeps its share: the rate within it
        index = torch.tensor([i for i, a in enumerate(answers) if a == answer])
        told[index] = keep_top(-pool_losses[index], 1.0 - corrupted.double().mean().item()).double()
    threshold = float(meta_losses.max())
    below = (pool_losses <= threshold).double()
    for name, weights in (("small_loss_told_rate", told), ("small_loss_meta_threshold", below)):
        write_rows(work / f"{name}.jsonl", [{**row, "weight": float(w)} for row, w in zip(pool, weights, strict=True)])
    found = {"auroc": auroc(pool_losses.double(), corrupted), "seconds": seconds, "meta_threshold": threshold,
             "kept_below_threshold": float(below.mean())}  # fmt: skip
    (work / "loss_filters.json").write_text(json.dumps(found, indent=2))
    return found


def selections(data: Path, runs: Path, work: Path) -> dict[str, list[str]]:
    """Name -> (source, extra finetune options) of every fine-tune of one data seed."""
    pool, meta = read_rows(data / "pool.jsonl"), read_rows(data / "meta.jsonl")
    clean = write_rows(work / "clean.jsonl", [row for row in pool if not row["is_corrupted"]])
    both = write_rows(work / "pool_and_meta.jsonl", pool + [{**row, "is_corrupted": False} for row in meta])
    return {
        "uniform": [str(data / "pool.jsonl"), "--uniform", "true"],
        "pool_and_meta": [both, "--uniform", "true"],
        "random_sample": [str(data / "sample.jsonl"), "--uniform", "true"],
        "sample_online_weights": [str(runs / "sample_online" / "weighted_dataset.parquet")],
        "small_loss_meta_threshold": [str(work / "small_loss_meta_threshold.jsonl"), *BALANCE],
        "small_loss_told_rate": [str(work / "small_loss_told_rate.jsonl")],
        "rater": [str(runs / "pool_scored")],
        "oracle_clean_only": [clean, "--uniform", "true"],
    }


def finetune(args, data: Path, work: Path, chosen: dict, name: str, downstream: bool = False) -> tuple[float, dict]:
    """`hf-fg2u finetune` of a fresh adapter on selection ``name`` with the table's step budget (of
    ``--downstream_model`` when ``downstream``: the rows and weights as they are, another model)."""
    source, *extra = chosen[name]
    out = work / ("finetune_downstream" if downstream else "finetune") / name
    every = str(max(1, args.steps // 3))
    model = args.downstream_model if downstream else args.model
    command = [*CLI, "finetune", source, "--model_name_or_path", model, "--output_dir", str(out),
               "--eval_file", str(data / "stop.jsonl"), "--test_file", str(data / "test.jsonl"), "--seed", "0",
               "--max_steps", str(args.steps), "--eval_strategy", "steps", "--eval_steps", every, "--use_cpu", "true",
               *POOL_FINETUNE, *extra]  # fmt: skip
    done = out / "finetune_results.json"
    threads = None if args.jobs == 1 else max(1, (os.cpu_count() or 1) // args.jobs)
    seconds = resumed(out.with_suffix(".seconds")) if done.is_file() else timed_once(command, out, threads)
    found = json.loads(done.read_text())
    label = f"{name} on {Path(model).name}" if downstream else name
    print(f"{data.parent.name} {label}: accuracy {found['test_accuracy']:.3f} ({seconds:.0f} s)", flush=True)
    return seconds, found


def learn_and_score(args, data: Path, runs: Path) -> dict:
    """The rater on the sample, the pool scored with it, and the per-row online weights of the sample: seconds,
    epochs and AUROC of each (every command resumes where its output exists)."""
    common = ["--model_name_or_path", args.model, "--max_length", "32", "--disable_tqdm", "true", *BALANCE,
              "--data_files", f"train={data / 'sample.jsonl'}", f"meta={data / 'meta.jsonl'}",
              f"eval={data / 'stop.jsonl'}", "--eval_strategy", "epoch"]  # fmt: skip
    commands = {
        "rater": [*CLI, "train", "--recipe", "data_rater", "--output_dir", str(runs / "rater"), *common],
        "pool_scored": [*CLI, "score", str(runs / "rater"), "--data_files", str(data / "pool.jsonl"), "--output_dir",
                        str(runs / "pool_scored"), "--max_length", "32", "--disable_tqdm", "--bf16"],
        "sample_online": [*CLI, "train", "--recipe", "noisy_reweighting_real", "--output_dir",
                          str(runs / "sample_online"), *common],
    }  # fmt: skip
    if "sample_online_weights" not in args.selections:
        del commands["sample_online"]
    found = {}
    for name, command in commands.items():
        record = runs / name / ("score_results.json" if name == "pool_scored" else "epochs.json")
        seconds = resumed(runs / f"{name}.seconds") if record.is_file() else timed_once(command, runs / name)
        found[name] = {"seconds": seconds, "record": json.loads(record.read_text())}
        print(f"{data.parent.name} {name}: {seconds:.0f} s", flush=True)
    return found


def one_data_seed(args, seed: int) -> dict:
    root = args.out / f"seed{seed}"
    data, runs, work = root / "data", root / "runs", root / "work"
    for folder in (runs, work):
        folder.mkdir(parents=True, exist_ok=True)
    run([sys.executable, str(HERE / "pool_task.py"), "--lexicon", str(args.lexicon), "--out", str(data),
         "--data_seed", str(seed), "--pool_rows", str(args.pool_rows), "--sample_rows", str(args.sample_rows)],
        work / "data.log")  # fmt: skip
    learned = learn_and_score(args, data, runs)
    chosen = {name: value for name, value in selections(data, runs, work).items() if name in args.selections}

    def filters():
        cached = work / "loss_filters.json"
        if not cached.is_file():
            with IN_PROCESS:
                loss_filters(args.model, runs / "rater", data, work)
        return json.loads(cached.read_text())

    needs_filters = {"small_loss_told_rate", "small_loss_meta_threshold"}
    tasks = [("filters", filters, [])] + [
        (name, partial(finetune, args, data, work, chosen, name), ["filters"] if name in needs_filters else [])
        for name in chosen
    ]
    downstream = [name for name in DOWNSTREAM if name in chosen] if args.downstream_model else []
    tasks += [
        ((name, "downstream"), partial(finetune, args, data, work, chosen, name, True), []) for name in downstream
    ]
    done = run_tasks(tasks, args.jobs)
    return {"learned": learned, "filters": done["filters"],
            "finetune": {name: {"seconds": done[name][0], **done[name][1]} for name in chosen},
            "downstream": {name: {"model": args.downstream_model, "seconds": done[(name, "downstream")][0],
                                  **done[(name, "downstream")][1]} for name in downstream}}  # fmt: skip


def gap_cells(results: list[dict], kind: str, name: str) -> tuple[list[float], list[float]]:
    """Accuracies of ``name`` per data seed and the share of the uniform -> oracle gap each recovers."""
    found = [r[kind] for r in results]
    accuracies = [f[name]["test_accuracy"] for f in found]
    gaps = [(f[name]["test_accuracy"] - f["uniform"]["test_accuracy"])
            / (f["oracle_clean_only"]["test_accuracy"] - f["uniform"]["test_accuracy"]) for f in found]  # fmt: skip
    return accuracies, gaps


def table_row(name: str, told: str, rows, accuracies: list[float], gaps: list[float]) -> str:
    spread = f" ({min(gaps):.0%} to {max(gaps):.0%})" if len(gaps) > 1 else ""
    cells = " | ".join(f"{a:.3f}" for a in accuracies)
    mean, gap = statistics.mean(accuracies), statistics.mean(gaps)
    return f"| {name} | {told} | {rows} | {cells} | {mean:.3f} | {gap:.0%}{spread} |"


def downstream_table(seeds: list[str], results: list[dict]) -> list[str]:
    """The rows another model was fine-tuned on, where it was."""
    if not all(r.get("downstream") for r in results):
        return []
    model = Path(results[0]["downstream"]["uniform"]["model"]).name
    lines = ["", f"## Another model downstream: {model} fine-tuned on the rows the SmolLM2 rater weighed", "",
             "| selection | told about the wrong rows | rows | " + " | ".join(f"data seed {s}" for s in seeds)
             + " | mean | gap recovered |", "|---|---|---|" + "---|" * len(seeds) + "---|---|"]  # fmt: skip
    for name in DOWNSTREAM:
        accuracies, gaps = gap_cells(results, "downstream", name)
        rows = results[0]["downstream"][name]["rows"]
        lines.append(table_row(name, TOLD.get(name, "nothing"), rows, accuracies, gaps))
    return lines


def report(table: dict) -> str:
    """The markdown of docs/rater.md, generated from table.json."""
    seeds = sorted(table["seeds"], key=int)
    results = [table["seeds"][s] for s in seeds]
    lines = [
        "# A data rater: weights for rows the bilevel loop never saw",
        "",
        "Generated by `scripts/rater_table.py` (`make rater`, `make rater-quick`); do not edit by hand. The rater",
        f"learns on {table['sample_rows']} rows sampled from a pool of {table['pool_rows']} (40% wrong answers;",
        "`make value`'s words task in three phrasings, its clean meta, stop and test rows), then scores the whole",
        "pool; a fresh LoRA adapter (r=8, q/v) of SmolLM2-135M-Instruct per selection, "
        f"{table['steps']} steps of 16 rows",
        "under bf16 autocast (the best of three evaluations on the stop rows kept). Forced-choice accuracy on the 300",
        "test words; gap recovered = (selection − uniform) / (oracle − uniform), mean over the data seeds (range).",
        "",
        "| selection | told about the wrong rows | rows | " + " | ".join(f"data seed {s}" for s in seeds)
        + " | mean | gap recovered |",
        "|---|---|---|" + "---|" * len(seeds) + "---|---|",
    ]  # fmt: skip
    for name in [n for n in ROWS if all(n in r["finetune"] for r in results)]:
        accuracies, gaps = gap_cells(results, "finetune", name)
        rows = results[0]["finetune"][name]["rows"]
        lines.append(table_row(name, TOLD.get(name, "nothing"), rows, accuracies, gaps))
    lines += downstream_table(seeds, results)
    lines += ["", "## How well the weights separate wrong rows from right ones (AUROC) on rows never trained on", "",
              "| weights | " + " | ".join(f"data seed {s}" for s in seeds) + " | mean |", "|---|" + "---|" * len(seeds)
              + "---|"]  # fmt: skip
    rater = [r["learned"]["pool_scored"]["record"]["auroc_corrupted"] for r in results]
    loss = [r["filters"]["auroc"] for r in results]
    for label, values in (("the rater, on the pool", rater), ("the loss at the rater's adapter, on the pool", loss)):
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {statistics.mean(values):.3f} |")
    sample = [r["learned"]["rater"]["record"][-1]["auroc_corrupted"] for r in results]
    lines.append("| the loop's per-row weights on the sample (what the rater is fitted to) | "
                 + " | ".join(f"{v:.3f}" for v in sample)
                 + f" | {statistics.mean(sample):.3f} |")  # fmt: skip
    lines += [
        "",
        "## Cost (wall-clock as each ran; compare seconds only from a table made with nothing else running)",
        "",
        "| step | " + " | ".join(f"data seed {s}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for label, key in (("learn the rater on the sample", "rater"), ("score the pool", "pool_scored"),
                       ("per-row online weights of the sample", "sample_online")):  # fmt: skip
        if all(key in r["learned"] for r in results):
            lines.append(f"| {label} | " + " | ".join(f"{r['learned'][key]['seconds']:.0f} s" for r in results) + " |")
    throughput = [r["learned"]["pool_scored"]["record"]["rows_per_second"] for r in results]
    lines.append("| scoring throughput | " + " | ".join(f"{v:.0f} rows/s" for v in throughput) + " |")
    timings = ", ".join(f"{item['seconds'] / 60:.0f} min" for item in table.get("runs", []))
    if timings:
        lines += ["", f"The commands that made this table took {timings}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lexicon", type=Path, required=True)
    parser.add_argument("--model", required=True, help="A folder (or Hub name) of SmolLM2-135M-Instruct.")
    parser.add_argument("--out", type=Path, default=Path("outputs/rater"))
    parser.add_argument("--data_seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--selections", nargs="+", default=ROWS, choices=ROWS)
    parser.add_argument("--downstream_model", help="Also fine-tune this model (another family) on the same rows: "
                        "uniform, the rater's weights, the oracle.")  # fmt: skip
    parser.add_argument("--pool_rows", type=int, default=6000)
    parser.add_argument("--sample_rows", type=int, default=600)
    parser.add_argument("--steps", type=int, default=150, help="Optimizer steps of 16 rows of every fine-tune.")
    parser.add_argument("--jobs", type=int, default=2, help="Fine-tunes side by side, each on cores/jobs threads.")
    parser.add_argument("--report", type=Path, help="Also write the markdown here (e.g. docs/rater.md).")
    parser.add_argument("--readme", type=Path, help="Also write the tables into this README's rater markers.")
    parser.add_argument("--report_only", action="store_true", help="Only write the report from OUT/table.json.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    table_path = args.out / "table.json"
    table = json.loads(table_path.read_text()) if table_path.is_file() else {"seeds": {}}
    table.update(pool_rows=args.pool_rows, sample_rows=args.sample_rows, steps=args.steps)
    start = time.perf_counter()
    for seed in [] if args.report_only else args.data_seeds:
        table["seeds"][str(seed)] = one_data_seed(args, seed)
        args.out.mkdir(parents=True, exist_ok=True)
        table_path.write_text(json.dumps(table, indent=2))  # after every seed: nothing lost to a later failure
    if not args.report_only:
        table["runs"] = [*table.get("runs", []), {"argv": sys.argv[1:], "seconds": time.perf_counter() - start}]
        table_path.write_text(json.dumps(table, indent=2))
    text = report(table)
    print(text)
    if args.report:
        args.report.write_text(text)
    if args.readme:  # the tables, without the title and the paragraph that repeats the README's
        write_between_markers(args.readme, text.split("\n\n", 2)[2].strip(), "rater", "rater_table.py")


if __name__ == "__main__":
    main()
