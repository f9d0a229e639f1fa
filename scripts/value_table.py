"""Do learned weights pay off where wrong answers do harm? The table of `make value` (docs/value.md).

Task (scripts/sentiment_task.py): is a word positive or negative, 600 train rows with 40% of the answers flipped,
a clean meta set of 64, a clean stop set of 100 (early stopping of every fine-tune), 300 held-out test words.
Model: SmolLM2-135M-Instruct. Metric: forced-choice accuracy on the test words.

Per data seed, everything through the user's commands:

1. `hf-fg2u train --recipe noisy_reweighting_real --data_files ...` in the recipe's default mode, `online` (θ
   trained on the weighted rows between outer steps, several epochs); `make value-ablations` adds `one_shot` (θ back
   to θ_w before every outer step, one epoch: each row's weight fixed by one unrolled hypergradient at uniform
   weights) and `online_unprojected` (the answer-shift directions left in the meta gradient).
2. The baselines' weights: the loss filter (keep the rows the base model finds least surprising), LESS
   (Adam-preconditioned LoRA gradient alignment with the meta set after a warm-up) and the small-loss rule under an
   adapter trained on every row or alongside the weights; they keep the true clean fraction, an advantage the
   learned weights do not get.
3. `hf-fg2u finetune` of a fresh LoRA adapter per selection: uniform; train ∪ meta; meta only; the filters; the
   learned weights after the online mode's first and last epoch; the clean-rows oracle. The gap's two ends and the
   default on every adapter seed, the rest on the first; two fine-tunes side by side (``--jobs``).

Prints and writes OUT/table.json; `--report docs/value.md` writes the markdown generated from it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "hf_fg2u.cli.main"]
LORA = ["--lora_r", "8", "--lora_alpha", "16", "--lora_target_modules", "q_proj", "v_proj"]
# One fine-tune recipe for every selection: 3 epochs of constant-lr Adam, the best epoch on the stop rows kept, under
# bf16 autocast (LoRA weights and Adam in float32): 1.6x faster than float32 on this CPU (it has AVX512-BF16), and
# the same stop-rows loss after one epoch of the uniform selection (0.3398 vs 0.3402).
FINETUNE = ["--num_train_epochs", "3", "--learning_rate", "3e-4", "--lr_scheduler_type", "constant",
            "--per_device_train_batch_size", "16", "--max_length", "32", "--disable_tqdm", "true", "--bf16", "true",
            *LORA]  # fmt: skip
# `make value`: the baselines the issue names, the strongest filters, the recipe's default after its first and last
# epoch, and the oracle; `make value-ablations` adds the other modes and variants to the same table.
SELECTIONS = ["uniform", "train_and_meta", "meta_only", "loss_filter", "less", "uniform_model_filter",
              "online_loss_filter", "learned_online", "oracle_clean_only"]  # fmt: skip
ABLATIONS = ["meta_model_filter", "meta_model_filter_balanced", "learned_one_shot", "learned_unprojected",
             "learned_balanced_and_meta"]  # fmt: skip
# The rows whose spread over adapter seeds the verdict rests on: the gap's two ends and the default.
EVERY_ADAPTER_SEED = ["uniform", "oracle_clean_only", "learned_online_last"]
# The answers are two labels, so the weights are measured within each answer (--balance_column completion): each
# answer keeps its share of the loss, as a user with label-like completions is told to do.
BALANCE = ["--balance_column", "completion"]
MODES = {
    "online": [*BALANCE],  # the recipe's default mode
    # the same without removing the answer-shift directions from the meta gradient (the ablation of that step)
    "online_unprojected": [*BALANCE, "--project_group_shift", "false"],
    "one_shot": [
        *BALANCE,
        "--inner_reset_every",
        "1",
        "--num_train_epochs",
        "1",
        "--inner_lr",
        "0.003",
        "--learning_rate",
        "8",
    ],
}
# What a selection is told about the wrong rows: the oracle which ones, the filters how many (they keep that fraction).
TOLD = {
    "oracle_clean_only": "which rows",
    "loss_filter": "how many",
    "less": "how many",
    "meta_model_filter": "how many",
    "meta_model_filter_balanced": "how many",
    "online_loss_filter": "how many",
    "uniform_model_filter": "how many",
}


def run(command: list[str], log: Path, threads: int | None = None) -> float:
    """Run a command, its output in ``log``; the seconds it took. A failure shows the log's end. ``threads`` caps
    the command's intra-op threads (for jobs run side by side)."""
    start = time.perf_counter()
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False, env=env)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def timed_once(command: list[str], out: Path, threads: int | None = None) -> float:
    """Run a command whose output folder is ``out``; its seconds, kept beside it so that a rerun of the table
    resumes after the last finished run instead of repeating it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds = run(command, out.with_suffix(".log"), threads)
    out.with_suffix(".seconds").write_text(f"{seconds}\n")
    return seconds


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resumed(path: Path) -> float:
    return float(path.read_text())


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def heuristic_weights(model_path: str, data: Path, out: Path) -> dict:
    """0/1 weight files of the loss filter and of LESS, keeping the clean fraction; their scores' AUROC."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_fg2u.baselines import base_model_losses, gradient_alignment_scores, keep_top, warm_up
    from hf_fg2u.lm.collator import PaddingCollator
    from hf_fg2u.lm.evaluation import auroc
    from hf_fg2u.lm.formats import prepare_split
    from hf_fg2u.trainer.model_setup import wrap_with_peft

    train_rows = read_rows(data / "train.jsonl")
    corrupted = torch.tensor([row["is_corrupted"] for row in train_rows])
    keep = 1.0 - corrupted.double().mean().item()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager")
    train = prepare_split(Dataset.from_list(train_rows).remove_columns("is_corrupted"), "train", tokenizer, 32)
    meta = prepare_split(Dataset.from_list(read_rows(data / "meta.jsonl")), "meta", tokenizer, 32)
    collator = PaddingCollator(pad_token_id=tokenizer.pad_token_id)
    start = time.perf_counter()
    with torch.no_grad():
        losses = base_model_losses(model, train, collator)
    found = {"loss_filter": {"scores": -losses, "seconds": time.perf_counter() - start}}
    start = time.perf_counter()
    torch.manual_seed(0)
    adapter = wrap_with_peft(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    # LESS warms up on 5% of the rows for 4 epochs; here 8 Adam steps of 16 rows at the fine-tune's learning rate.
    optimizer = warm_up(adapter, train, collator, steps=8, learning_rate=3e-4, batch_size=16)
    scores = gradient_alignment_scores(adapter, train, meta, collator, preconditioner=optimizer)
    found["less"] = {"scores": scores, "seconds": time.perf_counter() - start}
    summary = {}
    for name, item in found.items():
        weights = keep_top(item["scores"], keep)
        write_rows(
            out / f"{name}.jsonl", [{**row, "weight": float(w)} for row, w in zip(train_rows, weights, strict=True)]
        )
        summary[name] = {"auroc": auroc(-item["scores"], corrupted), "seconds": item["seconds"]}
    return summary


def adapter_loss_filter(model_path: str, adapter: Path, data: Path, out: Path, name: str) -> dict:
    """Keep the train rows an adapter finds most likely (the clean fraction); OUT/NAME.jsonl and the AUROC.

    meta_model_filter: the filter a strong engineer tries first with a clean meta set (the adapter fine-tuned on
    the meta rows alone). uniform_model_filter: train on everything, drop the rows the trained model finds least
    likely, train again (the uniform selection's adapter). online_loss_filter: the simpler thing the online mode
    could reduce to, the small-loss rule at the θ trained alongside the weights (the recipe run's own adapter)."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_fg2u.baselines import base_model_losses, keep_top
    from hf_fg2u.lm.collator import PaddingCollator
    from hf_fg2u.lm.evaluation import auroc
    from hf_fg2u.lm.formats import prepare_split

    train_rows = read_rows(data / "train.jsonl")
    corrupted = torch.tensor([row["is_corrupted"] for row in train_rows])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, str(adapter))
    train = prepare_split(Dataset.from_list(train_rows).remove_columns("is_corrupted"), "train", tokenizer, 32)
    start = time.perf_counter()
    with torch.no_grad():
        scores = -base_model_losses(model, train, PaddingCollator(pad_token_id=tokenizer.pad_token_id))
    weights = keep_top(scores, 1.0 - corrupted.double().mean().item())
    write_rows(out / f"{name}.jsonl", [{**r, "weight": float(w)} for r, w in zip(train_rows, weights, strict=True)])
    return {"auroc": auroc(-scores, corrupted), "seconds": time.perf_counter() - start}


def epoch_weights(run: Path, epoch: int) -> Path:
    """Epoch ``epoch``'s weights of ``run``: in its epochs/ folder, or at its top in a run of an older version."""
    from hf_fg2u.cli.recipe_run import epoch_weights_file

    kept = run / epoch_weights_file(epoch)
    return kept if kept.is_file() else run / Path(epoch_weights_file(epoch)).name


def selections(data: Path, runs: Path, work: Path) -> dict[str, list[str]]:
    """Name -> (source, extra finetune options) of every fine-tune of one data seed."""
    from datasets import Dataset

    train = read_rows(data / "train.jsonl")
    meta = read_rows(data / "meta.jsonl")
    clean = write_rows(work / "clean.jsonl", [row for row in train if not row["is_corrupted"]])
    both = write_rows(work / "train_and_meta.jsonl", train + [{**row, "is_corrupted": False} for row in meta])
    record = runs / "online" / "epochs.json"
    online_epochs = len(json.loads(record.read_text())) if record.is_file() else 0
    learned = runs / "online" / "weighted_dataset.parquet"
    if learned.is_file():  # what a user with the meta rows in hand fine-tunes on: the weighted rows and the meta rows
        weighted = Dataset.from_parquet(str(learned)).to_list()
        meta_rows = [{**row, "is_corrupted": False, "weight": 1.0} for row in meta]  # 1 = the mean learned weight
        write_rows(work / "learned_and_meta.jsonl", [{k: row[k] for k in meta_rows[0]} for row in weighted] + meta_rows)
    return {
        "uniform": [str(data / "train.jsonl"), "--uniform", "true"],
        "train_and_meta": [both, "--uniform", "true"],
        "meta_only": [str(data / "meta.jsonl"), "--uniform", "true"],
        "loss_filter": [str(work / "loss_filter.jsonl")],
        "less": [str(work / "less.jsonl")],
        "meta_model_filter": [str(work / "meta_model_filter.jsonl")],
        "meta_model_filter_balanced": [str(work / "meta_model_filter.jsonl"), "--balance_column", "completion"],
        "online_loss_filter": [str(work / "online_loss_filter.jsonl"), "--balance_column", "completion"],
        "uniform_model_filter": [str(work / "uniform_model_filter.jsonl"), "--balance_column", "completion"],
        "learned_one_shot": [str(runs / "one_shot" / "weighted_dataset.parquet")],
        "learned_online_epoch1": [str(epoch_weights(runs / "online", 1))],
        f"learned_online_epoch{online_epochs}": [str(runs / "online" / "weighted_dataset.parquet")],
        f"learned_unprojected_epoch{online_epochs}": [str(runs / "online_unprojected" / "weighted_dataset.parquet")],
        "learned_balanced_and_meta": [str(work / "learned_and_meta.jsonl"), "--balance_column", "completion"],
        "oracle_clean_only": [clean, "--uniform", "true"],
    }


def finetune(args, data: Path, work: Path, chosen: dict, name: str, adapter_seed: int) -> tuple[float, dict]:
    """`hf-fg2u finetune` of a fresh adapter on selection ``name``: (seconds, finetune_results.json); a finished
    one is read back. With ``--jobs`` above 1 each runs on cores / jobs threads."""
    source, *extra = chosen[name]
    out = work / "finetune" / f"{name}_a{adapter_seed}"
    command = [*CLI, "finetune", source, "--model_name_or_path", args.model, "--output_dir", str(out),
               "--eval_file", str(data / "stop.jsonl"), "--test_file", str(data / "test.jsonl"),
               "--seed", str(adapter_seed), *FINETUNE, *extra]  # fmt: skip
    if not torch_cuda_available():  # bf16 autocast on the CPU
        command += ["--use_cpu", "true"]
    done = out / "finetune_results.json"
    threads = None if args.jobs == 1 else max(1, (os.cpu_count() or 1) // args.jobs)
    seconds = resumed(out.with_suffix(".seconds")) if done.is_file() else timed_once(command, out, threads)
    found = json.loads(done.read_text())
    print(f"{data.parent.name} {name} adapter {adapter_seed}: accuracy {found['test_accuracy']:.3f} "
          f"(best epoch {found.get('best_epoch')}, {seconds:.0f} s)", flush=True)  # fmt: skip
    return seconds, found


# Scorings run in this process one at a time: two transformers model loads in threads of one process
# corrupted each other's models (every score equal, AUROC 0.5), while fine-tunes run in processes of their own.
IN_PROCESS = threading.Lock()
# The scoring tasks and the weight files each writes in the work folder.
SCORE_FILES = {"score heuristics": ["loss_filter", "less"], "score online_loss_filter": ["online_loss_filter"],
               "score uniform_model_filter": ["uniform_model_filter"],
               "score meta_model_filter": ["meta_model_filter"]}  # fmt: skip


def scoring_tasks(args, data: Path, runs: Path, work: Path, sources: set[str], fine_tunes: list) -> tuple[list, list]:
    """The tasks that write the weight files the chosen selections read (``sources``: their file stems; the
    ``fine_tunes`` (selection, adapter seed) of this run), as
    (key, function, the keys of the tasks it waits for): (those that wait for no fine-tune, those that do).
    The adapters whose losses score the model filters: the recipe run's own, and the first adapter seed's of the
    uniform and meta_only selections."""
    first = args.adapter_seeds[0]

    def heuristics():
        cached = work / "heuristics.json"
        if not cached.is_file():
            with IN_PROCESS:
                cached.write_text(json.dumps(heuristic_weights(args.model, data, work)))
        return json.loads(cached.read_text())

    def scored(name, adapter):
        def score():
            with IN_PROCESS:
                return adapter_loss_filter(args.model, adapter, data, work, name)

        return score

    adapters = {"online_loss_filter": (runs / "online", None),
                "uniform_model_filter": (work / "finetune" / f"uniform_a{first}", ("uniform", first)),
                "meta_model_filter": (work / "finetune" / f"meta_only_a{first}", ("meta_only", first))}  # fmt: skip
    first_tasks = [("score heuristics", heuristics, [])] if {"loss_filter", "less"} & sources else []
    later_tasks = []
    for name, (adapter, fine_tune) in adapters.items():
        if name not in sources:
            continue
        if fine_tune in fine_tunes:  # trained in this run: scored once it is
            later_tasks.append((f"score {name}", scored(name, adapter), [fine_tune]))
        elif fine_tune is None or (adapter / "finetune_results.json").is_file():  # trained before
            first_tasks.append((f"score {name}", scored(name, adapter), []))
        else:
            raise ValueError(f"{name} scores the rows with the adapter of {fine_tune[0]} (adapter seed {first}): "
                             f"add {fine_tune[0]} to --selections.")  # fmt: skip
    return first_tasks, later_tasks


def run_tasks(tasks: list, jobs: int) -> dict:
    """Run (key, function, keys it waits for) tasks on ``jobs`` threads in list order, each after the tasks it
    waits for (which must come earlier in the list, so no lane waits on a task that has not started); their results
    by key. A failure is raised here."""
    futures = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for key, function, waits_for in tasks:
            missing = [k for k in waits_for if k not in futures]
            if missing:
                raise ValueError(f"{key} waits for {missing}, which no earlier task produces (add it to --selections).")
            futures[key] = pool.submit(_after, [futures[k] for k in waits_for], function)
    return {key: future.result() for key, future in futures.items()}


def _after(earlier: list, function):
    for future in earlier:
        future.result()  # raises the earlier task's failure
    return function()


def one_data_seed(args, seed: int) -> dict:
    root = args.out / f"seed{seed}"
    data, runs, work = root / "data", root / "runs", root / "work"
    for folder in (runs, work):
        folder.mkdir(parents=True, exist_ok=True)
    run([sys.executable, str(HERE / "sentiment_task.py"), "--lexicon", str(args.lexicon), "--out", str(data),
         "--data_seed", str(seed), "--test_rows", str(args.test_rows)], work / "data.log")  # fmt: skip
    result = {"bilevel": {}, "finetune": {}}
    for mode in args.modes:
        command = [*CLI, "train", "--recipe", "noisy_reweighting_real", "--model_name_or_path", args.model,
                   "--data_files", f"train={data / 'train.jsonl'}", f"meta={data / 'meta.jsonl'}",
                   f"eval={data / 'stop.jsonl'}", "--max_length", "32", "--eval_strategy", "epoch",
                   "--output_dir", str(runs / mode), "--disable_tqdm", "true", *MODES[mode]]  # fmt: skip
        if mode == "online" and args.online_epochs:
            command += ["--num_train_epochs", str(args.online_epochs)]
        record = runs / mode / "epochs.json"
        seconds = resumed(runs / f"{mode}.seconds") if record.is_file() else timed_once(command, runs / mode)
        epochs = json.loads(record.read_text())
        result["bilevel"][mode] = {"seconds": seconds, "epochs": epochs}
        print(f"seed {seed} {mode}: {seconds:.0f} s, AUROC by epoch {[round(e['auroc_corrupted'], 3) for e in epochs]}",
              flush=True)  # fmt: skip
    every = selections(data, runs, work)
    last_online = [name for name in every if name.startswith("learned_online_epoch")][-1:]
    chosen = {name: value for name, value in every.items() if name in args.selections
              or (name.startswith("learned_online_epoch") and "learned_online" in args.selections)
              or (name in last_online and "learned_online_last" in args.selections)
              or (name.startswith("learned_unprojected") and "learned_unprojected" in args.selections)}  # fmt: skip
    every_seed = {n for n in chosen if n in args.every_adapter_seed or (n in last_online
                  and "learned_online_last" in args.every_adapter_seed)}  # fmt: skip
    fine_tunes = [(n, a) for n in chosen for a in (args.adapter_seeds if n in every_seed else args.adapter_seeds[:1])]
    sources = {Path(source).stem for source, *_ in chosen.values()}
    first_scores, later_scores = scoring_tasks(args, data, runs, work, sources, fine_tunes)
    writers = {name: key for key, _, _ in first_scores + later_scores for name in SCORE_FILES[key]}
    stems = {job: Path(chosen[job[0]][0]).stem for job in fine_tunes}
    fine_tune_tasks = [(job, partial(finetune, args, data, work, chosen, *job), [writers[stems[job]]]
                        if stems[job] in writers else []) for job in fine_tunes]  # fmt: skip
    # Every task runs once its inputs exist, side by side, so no lane waits for a wave's last job; the scorings
    # that need no fine-tune run after the first fine-tunes start, those that do just before the fine-tunes they feed.
    free = [t for t in fine_tune_tasks if not t[2]]
    first = [t for t in first_scores if t[0] == "score heuristics"]
    rest = [t for t in first_scores if t[0] != "score heuristics"]
    done = run_tasks([*first, *free[: args.jobs], *rest, *free[args.jobs :], *later_scores,
                      *(t for t in fine_tune_tasks if t[2])], args.jobs)  # fmt: skip
    result["heuristics"] = {}
    for key, _, _ in first_scores + later_scores:
        found = done[key]
        result["heuristics"].update(found if key == "score heuristics" else {key.removeprefix("score "): found})
    for name, adapter_seed in fine_tunes:
        seconds, found = done[(name, adapter_seed)]
        result["finetune"].setdefault(name, []).append({"adapter_seed": adapter_seed, "seconds": seconds, **found})
    return result


LEGEND = """The selections: `uniform` every train row; `train_and_meta` the train and meta rows; `meta_only` the 64 meta
rows; `loss_filter`, `less`, `meta_model_filter` keep the train rows their scores rank cleanest (the base model's
loss; LESS's Adam-preconditioned gradient alignment with the meta rows; the loss under an adapter fine-tuned on
the meta rows; `_balanced`: each answer keeping its share of the weight); `online_loss_filter` the small-loss rule
at the θ the online mode trained alongside its weights (the simpler thing it could reduce to), balanced;
`uniform_model_filter` the same rule at the uniform selection's adapter (train on everything, drop, retrain);
`learned_online_epoch{k}` the weights of `hf-fg2u train --recipe noisy_reweighting_real --balance_column
completion` after epoch k: each row weighed against the mean of the rows with its answer, and the directions that
only shift which answer is preferred removed from the meta gradient, so a row is credited for what it teaches
beyond its answer's share; `learned_unprojected_epoch{k}` the same without that removal (`--project_group_shift
false`, the ablation); `learned_one_shot` the one-shot mode (θ back to θ_w before every outer step, one epoch: an
unrolled influence score); `learned_balanced_and_meta` the online weights with the meta rows added at the mean
weight, balanced; `oracle_clean_only` the right rows only. Seconds are wall-clock as each job ran: compare them
only from a table made with nothing else running."""


def merged(previous: dict, new: dict) -> dict:
    """A data seed's results: this run's, and the fine-tunes and scores of earlier runs it did not redo (a second
    adapter seed run for some selections keeps the others' first)."""
    return {
        "bilevel": {**previous.get("bilevel", {}), **new["bilevel"]},
        "heuristics": {**previous.get("heuristics", {}), **new["heuristics"]},
        "finetune": {**previous.get("finetune", {}), **new["finetune"]},
    }


def adapter_seed_count(table: dict, seeds: list[str], name: str) -> str:
    """How many adapter seeds a selection's cells average (a range where data seeds differ)."""
    counts = sorted({len(table["seeds"][s]["finetune"].get(name, [])) for s in seeds} - {0})
    return f"{counts[0]}–{counts[-1]}" if len(counts) > 1 else str(counts[0])


def mean_accuracy(result: dict, name: str) -> float | None:
    scores = result["finetune"].get(name)
    return statistics.mean(s["test_accuracy"] for s in scores) if scores else None


def verdict(gaps: dict) -> str:
    """One generated sentence: the recipe's default against the best selection of each kind of knowledge."""
    default = [name for name in gaps if re.fullmatch(r"learned_online_epoch\d+", name)][-1:]
    if not default or gaps[default[0]] is None:
        return "The recipe's default mode was not run."
    others = {told: max(((gaps[n], n) for n in gaps if n not in ("oracle_clean_only", "uniform")
                         and not n.startswith("learned_online_epoch")  # the default itself, at another epoch
                         and TOLD.get(n, "nothing") == told and gaps[n] is not None), default=None)
              for told in ("nothing", "how many")}  # fmt: skip
    parts = [f"`{n}` {g:.0%}" + (" (told how many rows are wrong)" if told == "how many" else "")
             for told, best in others.items() if best for g, n in [best]]  # fmt: skip
    others_text = f"; the best other selections: {'; '.join(parts)}" if parts else ""
    return (
        f"The recipe's default, `{default[0]}`, recovers {gaps[default[0]]:.0%} of the uniform → oracle gap on "
        f"the mean over data seeds{others_text}."
    )


ROW_ORDER = ["uniform", "train_and_meta", "meta_only", "loss_filter", "less", "meta_model_filter",
             "meta_model_filter_balanced", "uniform_model_filter", "online_loss_filter", "learned_one_shot",
             "learned_online_epoch", "learned_unprojected_epoch", "learned_balanced_and_meta",
             "oracle_clean_only"]  # fmt: skip


def row_order(name: str) -> tuple[int, int]:
    """The table's rows: baselines, filters, learned weights (by epoch), the oracle last."""
    base = re.sub(r"\d+$", "", name)
    epoch = int(name[len(base) :] or 0)
    return (ROW_ORDER.index(base) if base in ROW_ORDER else len(ROW_ORDER), epoch)


def report(table: dict) -> str:
    """The markdown of docs/value.md, generated from table.json."""
    seeds = sorted(table["seeds"], key=int)
    names = sorted(dict.fromkeys(name for s in seeds for name in table["seeds"][s]["finetune"]), key=row_order)
    lines = [
        "# Learned weights on a task where wrong answers do harm",
        "",
        "Generated by `scripts/value_table.py` (`make value`); do not edit by hand. Task: is a word positive or",
        "negative (VADER lexicon words), 600 train rows of which 40% have the wrong answer, 64 clean meta rows, 100",
        "clean stop rows, 300 held-out test words; SmolLM2-135M-Instruct, a fresh LoRA adapter (r=8, q/v) per",
        "selection, 3 epochs under bf16 autocast, best epoch on the stop rows. Forced-choice accuracy on the test",
        "words, mean over the adapter seeds each row ran (column 'adapters', 0 and 1 where 2); gap recovered =",
        "(selection − uniform) / (oracle − uniform), mean over the data seeds; – = not run on that seed (the mean is",
        "then over the seeds that ran it).",
        "",
        "| selection | told about the wrong rows | adapters | "
        + " | ".join(f"data seed {s}" for s in seeds)
        + " | mean | gap recovered |",
        "|---|---|---|" + "---|" * len(seeds) + "---|---|",
    ]
    gaps = {}
    for name in names:
        accuracies = [mean_accuracy(table["seeds"][s], name) for s in seeds]
        recovered = []
        for s, accuracy in zip(seeds, accuracies, strict=True):
            uniform, oracle = (mean_accuracy(table["seeds"][s], key) for key in ("uniform", "oracle_clean_only"))
            if None not in (accuracy, uniform, oracle) and oracle > uniform:
                recovered.append((accuracy - uniform) / (oracle - uniform))
        gaps[name] = statistics.mean(recovered) if recovered else None
        cells = " | ".join("–" if a is None else f"{a:.3f}" for a in accuracies)
        mean = statistics.mean(a for a in accuracies if a is not None)  # over the seeds that ran it
        gap = "–" if gaps[name] is None else f"{gaps[name]:.0%}"
        adapters = adapter_seed_count(table, seeds, name)
        lines.append(f"| {name} | {TOLD.get(name, 'nothing')} | {adapters} | {cells} | {mean:.3f} | {gap} |")
    harm = [mean_accuracy(table["seeds"][s], "oracle_clean_only") - mean_accuracy(table["seeds"][s], "uniform")
            for s in seeds]  # fmt: skip
    lines += ["", "Harm (oracle − uniform accuracy) by data seed: " + ", ".join(
        f"{s}: {h:+.3f}" for s, h in zip(seeds, harm, strict=True))]  # fmt: skip
    lines += ["", verdict(gaps)]
    lines += [f"\n{note}" for note in table.get("notes", [])]
    timings = ", ".join(f"{run['seconds'] / 60:.0f} min" for run in table.get("runs", []))
    if timings:
        lines += ["", f"The commands that made this table took {timings} (each timed from start to end; a resumed "
                  "one counts only what it ran)."]  # fmt: skip
    lines += ["", LEGEND]
    lines += ["", "## The weights themselves", "", "AUROC of the scores, wrong rows against right ones (1 = perfectly "
              "apart), and the seconds each took:", "", "| scores | " + " | ".join(f"data seed {s}" for s in seeds)
              + " |", "|---|" + "---|" * len(seeds)]  # fmt: skip
    scored = {kind: list(dict.fromkeys(n for s in seeds for n in table["seeds"][s].get(kind, {})))
              for kind in ("heuristics", "bilevel")}  # fmt: skip
    for kind, name in [("heuristics", n) for n in scored["heuristics"]] + [("bilevel", n) for n in scored["bilevel"]]:
        cells = []
        for s in seeds:
            found = table["seeds"][s].get(kind, {}).get(name)
            score = (
                None
                if found is None
                else found["auroc"]
                if kind == "heuristics"
                else found["epochs"][-1]["auroc_corrupted"]
            )
            cells.append("–" if found is None else f"{score:.3f} ({found['seconds']:.0f} s)")
        label = name if kind == "heuristics" else f"learned, {name}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## The weights epoch by epoch", ""]
    lines += [
        "| mode | data seed | epoch | AUROC | mean meta loss | eval (stop rows) loss |",
        "|---|---|---|---|---|---|",
    ]
    for mode in scored["bilevel"]:
        for s in seeds:
            for e in table["seeds"][s]["bilevel"].get(mode, {}).get("epochs", []):
                lines.append(f"| {mode} | {s} | {e['epoch']} | {e['auroc_corrupted']:.3f} | {e['meta_loss']:.4f} | "
                             f"{e.get('eval_loss', float('nan')):.4f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lexicon", type=Path, required=True)
    parser.add_argument("--model", required=True, help="A folder (or Hub name) of SmolLM2-135M-Instruct.")
    parser.add_argument("--out", type=Path, default=Path("outputs/value"))
    parser.add_argument("--data_seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--adapter_seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--modes", nargs="+", default=["online"], choices=list(MODES))
    parser.add_argument(
        "--selections", nargs="+", default=SELECTIONS, choices=[*SELECTIONS, *ABLATIONS, "learned_online_last"]
    )
    parser.add_argument("--every_adapter_seed", nargs="+", default=EVERY_ADAPTER_SEED,
                        help="Selections fine-tuned with every --adapter_seeds (the rest: the first only); "
                        "learned_online_last = the default mode's last epoch.")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2, help="Fine-tunes run side by side, each on cores/jobs "
                        "threads (on 2 cores about as fast as one job on both: ~200 s each, 2 at once).")  # fmt: skip
    parser.add_argument("--test_rows", type=int, default=300)
    parser.add_argument("--online_epochs", type=int, help="Epochs of the online mode (default: the recipe's).")
    parser.add_argument("--report", type=Path, help="Also write the markdown table here (e.g. docs/value.md).")
    parser.add_argument("--readme", type=Path, help="Also write the accuracy table into this README's markers.")
    parser.add_argument("--report_only", action="store_true", help="Only write the report from OUT/table.json.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    table_path = args.out / "table.json"
    table = json.loads(table_path.read_text()) if table_path.is_file() else {"seeds": {}}
    start = time.perf_counter()
    for seed in [] if args.report_only else args.data_seeds:
        table["seeds"][str(seed)] = merged(table["seeds"].get(str(seed), {}), one_data_seed(args, seed))
        args.out.mkdir(parents=True, exist_ok=True)
        table_path.write_text(json.dumps(table, indent=2))  # after every seed: nothing lost to a later failure
    seconds = time.perf_counter() - start
    print(f"total {seconds:.0f} s")
    if not args.report_only:  # how long this table's command took, for the report (a resumed run: only its part)
        table["runs"] = [*table.get("runs", []), {"argv": sys.argv[1:], "seconds": seconds, "jobs": args.jobs}]
        table_path.write_text(json.dumps(table, indent=2))
    text = report(table)
    print(text)
    if args.report:
        args.report.write_text(text)
    if args.readme:
        write_between_markers(args.readme, text.split("\n## ")[0].split("\n\n", 1)[1].strip())


def write_between_markers(readme: Path, block: str, name: str = "value", script: str = "value_table.py") -> None:
    """Put ``block`` between the README's ``<!-- name:begin -->`` and ``<!-- name:end -->`` lines."""
    text = readme.read_text()
    begin, end = f"<!-- {name}:begin (written by scripts/{script}) -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        sys.exit(f"{readme} has no {begin} ... {end} markers.")
    head, rest = text.split(begin, 1)
    readme.write_text(f"{head}{begin}\n{block}\n{end}{rest.split(end, 1)[1]}")


if __name__ == "__main__":
    main()
