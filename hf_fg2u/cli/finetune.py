"""``hf-fg2u finetune``: from learned weights to a fine-tuned model.

The source is a finished run's folder (its ``weighted_dataset.parquet``) or any data file whose rows carry a
weight column (a filter's 0/1 weights, someone else's scores). A fresh LoRA adapter (or, with ``--full_finetune``,
every parameter) is trained with the loss Σ_i (w_i / w̄) ℓ_i / B over each batch of B rows, w̄ the mean weight
(:class:`WeightedLossTrainer`), so the objective is the same at any batch size; rows of weight 0 are left out.
``--eval_file`` rows are scored every epoch and the best epoch's model is kept (the Trainer's
``load_best_model_at_end``); ``--test_file`` rows are scored at the end by loss and, when their
completions are a few answers, by forced-choice accuracy. The model, a card naming the weights' source, and
``finetune_results.json`` go to ``--output_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData
from transformers import HfArgumentParser, TrainingArguments

from hf_fg2u.hub.base_model import BASE_MODEL_FILE
from hf_fg2u.lm.data_checks import ModelLimits, check_token_rows
from hf_fg2u.lm.evaluation import MAX_CHOICES, answer_choices, choice_accuracy
from hf_fg2u.lm.formats import prepare_split
from hf_fg2u.trainer.checkpointing import STATE_CONFIG_NAME
from hf_fg2u.trainer.config import check_deepspeed_installed, check_optimizer_installed, check_trains_a_step
from hf_fg2u.trainer.model_setup import wrap_with_peft
from hf_fg2u.trainer.redaction import PicklesRedacted
from hf_fg2u.trainer.run_folder import LOCK_NAME, RunLock, check_output_dir, clear_checkpoints, holds_bilevel_run
from hf_fg2u.trainer.weighted_loss import WeightedLossTrainer
from hf_fg2u.trainer.weighted_mixin import check_weight_column

RESULTS_FILE = "finetune_results.json"


@dataclass
class FinetuneArguments:
    source: str = field(
        metadata={"help": "A finished run's folder (its weighted_dataset.parquet), or a .parquet/.jsonl/.json/.csv "
                  "file whose rows carry a weight column."}
    )  # fmt: skip
    weight_column: str = field(default="weight", metadata={"help": "The column that holds each row's weight."})
    uniform: bool = field(default=False, metadata={"help": "Ignore the weights: every row counts 1 (the baseline)."})
    eval_file: str | None = field(
        default=None,
        metadata={"help": "Rows scored every epoch; the best epoch's model is kept (early stopping)."},
    )
    test_file: str | None = field(
        default=None,
        metadata={"help": "Rows scored at the end: loss, and forced-choice accuracy when the completions are at "
                  f"most {MAX_CHOICES} distinct answers."},
    )  # fmt: skip
    balance_column: str | None = field(
        default=None,
        metadata={"help": "Keep each value's share of this column (e.g. completion, where the answers are a few "
                  "labels): the weights are rescaled within each value so its share of the total weight is its "
                  "share of the rows; the ranking within a value is kept."},
    )  # fmt: skip
    max_length: int = field(
        default=512, metadata={"help": "Rows longer than this many tokens are cut or dropped (train's default too)."}
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "A row longer than max_length: keep_start cuts its end, keep_end its start (the "
                  "completion kept), drop leaves it out; a warning counts them.",
                  "choices": ["keep_start", "keep_end", "drop"]},
    )  # fmt: skip
    full_finetune: bool = field(default=False, metadata={"help": "Train every parameter instead of a LoRA adapter."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow an output_dir that holds files of something other than an earlier fine-tune (they "
                  "may be replaced). A folder holding a bilevel run is refused either way."},
    )  # fmt: skip


def _read_rows(path: str):
    from hf_fg2u.cli.data_loading import builder_of, load_files

    return load_files({"train": [path]}, builder_of({"train": [path]}))["train"]


def balance_weights(weights: list[float], groups: list) -> list[float]:
    """``weights`` rescaled within each group so that a group's share of Σw is its share of the rows.

    Why: learned weights carry, besides which rows help, which answer the meta set needed more of at the θ where
    they were learned — a skew that a fresh fine-tune would inherit as a bias towards that answer."""
    total, rows, weight_of = sum(weights), Counter(groups), defaultdict(float)
    for group, weight in zip(groups, weights, strict=True):
        weight_of[group] += weight
    empty = sorted(str(group) for group in rows if weight_of[group] <= 0)
    if empty:
        raise ValueError(f"Every row of {empty} has weight 0: their share cannot be kept. Drop the balance column "
                         "or give those rows weight.")  # fmt: skip
    scale = {group: total * count / len(groups) / weight_of[group] for group, count in rows.items()}
    return [weight * scale[group] for weight, group in zip(weights, groups, strict=True)]


def load_weighted_rows(source: str, weight_column: str = "weight", uniform: bool = False, balance_column=None):
    """The rows of ``source`` with their weights in ``weight_column`` (all 1 with ``uniform``), balanced over
    ``balance_column`` when given, rows of weight 0 left out; ``ValueError`` for missing, negative or non-finite
    weights."""
    from hf_fg2u.cli.registry import check_balance_groups
    from hf_fg2u.hub.report import load_weighted_dataset

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"No run folder or data file at {source}.")
    rows = load_weighted_dataset(path) if path.is_dir() else _read_rows(source)
    if uniform:
        rows = rows.remove_columns([c for c in (weight_column,) if c in rows.column_names])
        return rows.add_column(weight_column, [1.0] * len(rows))
    check_weight_column(rows, weight_column)
    if balance_column is not None:
        if balance_column not in rows.column_names:
            raise ValueError(f"--balance_column {balance_column!r} is not a column of {source}: {rows.column_names}.")
        check_balance_groups(balance_column, rows[balance_column])
        balanced = balance_weights(rows[weight_column], rows[balance_column])
        rows = rows.remove_columns(weight_column).add_column(weight_column, balanced)
    return rows.filter(lambda row: row[weight_column] > 0)


def base_model_of(source: str) -> dict:
    """What a run folder records about its base model (``base_model_name_or_path``, a GGUF file), else ``{}``."""
    for name in (BASE_MODEL_FILE, "adapter_config.json"):
        record = Path(source) / name
        if record.is_file():
            return json.loads(record.read_text())
    return {}


class FinetuneTrainingArguments(PicklesRedacted, TrainingArguments):
    """``TrainingArguments`` whose ``training_args.bin`` (every save, checkpoint and push) is a plain
    ``TrainingArguments`` without credentials."""

    pickled_as = TrainingArguments

    def __post_init__(self):
        check_deepspeed_installed(self)
        super().__post_init__()
        check_optimizer_installed(self)
        check_trains_a_step(self)


class FinetuneTrainer(WeightedLossTrainer):
    """The weighted-loss trainer whose model card says where the weights came from and what the model scored."""

    card_text = ""

    def create_model_card(self, *args, **kwargs):
        if self.is_world_process_zero():
            path = Path(self.args.output_dir) / "README.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.card_text)


def effective_rows(weights: torch.Tensor) -> float:
    """(Σw)² / Σw²: how many equally weighted rows carry the same information (n for uniform weights)."""
    return float(weights.sum() ** 2 / weights.pow(2).sum())


def check_finetune_output_dir(output_dir: str, overwrite: bool) -> bool:
    """Refuse, before anything is loaded, a folder holding a bilevel run (always: its adapter, card and
    training_args.bin would be replaced beside its state) and a non-empty folder of something other than an
    earlier fine-tune (unless ``overwrite``), a file or an unwritable folder. Returns whether an earlier fine-tune
    is replaced (warned about)."""
    directory = Path(output_dir)
    if directory.is_dir() and holds_bilevel_run(directory):
        raise ValueError(
            f"output_dir={output_dir!r} holds a bilevel run ({STATE_CONFIG_NAME}): a fine-tune would replace its "
            "adapter, card and training_args.bin and leave a run folder with a foreign adapter. Choose another "
            "output_dir; pass the run folder as the source to fine-tune on its weights."
        )
    earlier = (directory / RESULTS_FILE).is_file()
    others = directory.is_dir() and any(path.name != LOCK_NAME for path in directory.iterdir())
    if others and not earlier and not overwrite:
        raise ValueError(
            f"output_dir={output_dir!r} is not empty and holds no earlier fine-tune (no {RESULTS_FILE}): its files "
            "would be replaced. Choose a new or empty output_dir, or pass --overwrite_output_dir true to allow it."
        )
    check_output_dir(output_dir, overwrite=True)  # a file, or a folder that cannot be written
    if earlier:
        warnings.warn(f"output_dir={output_dir!r} holds an earlier fine-tune: it is replaced.", stacklevel=3)
    return earlier or overwrite


def finetune(args: FinetuneArguments, model_args, training_args: TrainingArguments) -> dict:
    """Train, score and save the fine-tuned model; returns (and writes) the numbers of ``RESULTS_FILE``. The
    output_dir and the rows are checked first, then the folder's run lock is held throughout: a live run writing
    there refuses the fine-tune."""
    from hf_fg2u.cli.models import check_model_arguments

    replaces = check_finetune_output_dir(training_args.output_dir, args.overwrite_output_dir)
    recorded = base_model_of(args.source)
    if model_args.model_name_or_path is None:
        if not recorded.get("base_model_name_or_path"):
            raise ValueError("Pass --model_name_or_path: the model to fine-tune (the source records no base model).")
        model_args.model_name_or_path = recorded["base_model_name_or_path"]
        model_args.gguf_file = model_args.gguf_file or recorded.get("gguf_file")
    check_model_arguments(model_args)
    rows = load_weighted_rows(args.source, args.weight_column, args.uniform, args.balance_column)
    with RunLock(training_args.output_dir):
        if replaces:
            clear_checkpoints(training_args.output_dir)  # an earlier fine-tune's: never the new one's best epoch
        return _train_and_score(args, model_args, training_args, rows)


def _train_and_score(args: FinetuneArguments, model_args, training_args: TrainingArguments, rows) -> dict:
    from hf_fg2u.cli.models import load_model_and_tokenizer, lora_config

    model, tokenizer = load_model_and_tokenizer(model_args, training_args.seed)
    train = prepare_split(rows, "train", tokenizer, args.max_length, truncation_mode=args.truncation_mode)
    check_token_rows(train, "train", ModelLimits.of(model))  # e.g. an answer max_length cut off: loss 0, weight kept
    splits = {
        name: prepare_split(_read_rows(path), name, tokenizer, args.max_length, truncation_mode=args.truncation_mode)
        for name, path in (("eval", args.eval_file), ("test", args.test_file))
        if path
    }
    if "eval" in splits:  # early stopping on the eval rows, by the Trainer's own best-checkpoint logic
        steps = training_args.eval_strategy == "steps"  # every --eval_steps steps (a step budget), else every epoch
        training_args = dataclasses.replace(
            training_args, eval_strategy="steps" if steps else "epoch", save_strategy="steps" if steps else "epoch",
            save_steps=training_args.eval_steps if steps else training_args.save_steps, load_best_model_at_end=True,
            metric_for_best_model="eval_loss", greater_is_better=False, save_total_limit=1,
        )  # fmt: skip
    if not args.full_finetune:
        model = wrap_with_peft(model, lora_config(model_args), training_args.seed)
    trainer = FinetuneTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=splits.get("eval"),
        processing_class=tokenizer, weight_column=args.weight_column,
    )  # fmt: skip
    trained = trainer.train()
    if not math.isfinite(trained.training_loss):
        raise RuntimeError(f"The training loss is {trained.training_loss}; lower --learning_rate.")
    weights = torch.tensor(rows[args.weight_column], dtype=torch.float64)
    results = {
        "source": str(args.source), "output_dir": training_args.output_dir, "model": model_args.model_name_or_path,
        "rows": len(rows), "balance_column": args.balance_column,
        "effective_rows": effective_rows(weights), "uniform": args.uniform, "steps": trainer.state.global_step,
        "train_loss": trained.training_loss,
    }  # fmt: skip
    if "eval" in splits:
        best = trainer.state.best_model_checkpoint
        results["best_epoch"] = _epoch_of(trainer.state.log_history, best)
        results["eval_loss"] = trainer.state.best_metric  # the loaded best epoch's, as the Trainer measured it
    if "test" in splits:
        results["test_loss"] = trainer.evaluate(splits["test"], metric_key_prefix="test")["test_loss"]
        raw = _read_rows(args.test_file)
        if _few_answers(raw):
            results["test_accuracy"] = choice_accuracy(trainer.model, tokenizer, raw)
    trainer.card_text = card_text(args, model_args, results)
    trainer.save_model()
    if trainer.is_world_process_zero():
        Path(training_args.output_dir, RESULTS_FILE).write_text(json.dumps(results, indent=2))
        trainer.create_model_card()
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return results


def _few_answers(raw) -> bool:
    try:
        answer_choices(raw)
    except ValueError:
        return False
    return True


def _epoch_of(log_history: list[dict], checkpoint: str | None) -> float | None:
    """The epoch at which the kept checkpoint was saved (its step, looked up in the evaluation logs)."""
    if not checkpoint:
        return None
    step = int(Path(checkpoint).name.rsplit("-", 1)[-1])
    return next((log["epoch"] for log in log_history if log.get("step") == step and "eval_loss" in log), None)


def card_text(args: FinetuneArguments, model_args, results: dict) -> str:
    """A model card: base model, the weights' source, the numbers; never a local path as Hub metadata."""
    name = model_args.model_name_or_path
    hub_base = name if name and not Path(name).exists() else None
    data = ModelCardData(base_model=hub_base, library_name="transformers" if args.full_finetune else "peft",
                         tags=["hf_fg2u", "weighted-loss", "data-reweighting"])  # fmt: skip
    what = "every parameter" if args.full_finetune else "a fresh LoRA adapter"
    weights = "uniform weights (every row counts 1)" if args.uniform else f"the weights in `{args.weight_column}`"
    lines = [f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |"
             for key, value in results.items() if key not in ("source", "output_dir", "model")]  # fmt: skip
    body = "\n".join([
        "# Fine-tuned on learned data weights",
        "",
        f"{what} of `{name}`, trained by `hf-fg2u finetune` on the rows of `{Path(args.source).name}` with "
        f"{weights}: loss Σ_i (w_i / w̄) ℓ_i / B over each batch of B rows, w̄ the mean weight, rows of weight 0 left "
        "out.",
        "",
        "| result | value |",
        "|---|---|",
        *lines,
    ])  # fmt: skip
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n").content


def parse_finetune_args(argv: list[str]):
    """(FinetuneArguments, ModelArguments, TrainingArguments); the first bare word is the source."""
    from hf_fg2u.cli.arguments import ModelArguments

    if argv and not argv[0].startswith("-"):
        argv = ["--source", argv[0], *argv[1:]]
    parser = HfArgumentParser(
        (FinetuneArguments, ModelArguments, FinetuneTrainingArguments), prog="hf-fg2u finetune", allow_abbrev=False
    )
    defaults = {"output_dir": "outputs/finetune", "report_to": "none", "save_strategy": "no", "logging_steps": 10}
    parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(argv)
