"""The datasets of ``BilevelTrainer``, prepared and checked at construction: raw data is tokenized, and data that
would train on nothing, crash deep inside an unroll, or silently change the unroll is refused before any compute,
with the count of rows and the fix.
"""

from __future__ import annotations

import warnings
from collections import Counter

from hf_fg2u.lm.formats import prepare_split
from hf_fg2u.lm.toy_data import IGNORE_INDEX
from hf_fg2u.outer import OuterModule
from hf_fg2u.trainer.config import BilevelConfig

SHOWN = 5  # row indices quoted in an error


def _rows(indices: list[int]) -> str:
    more = f" and {len(indices) - SHOWN} more" if len(indices) > SHOWN else ""
    return f"{indices[:SHOWN]}{more}"


def prepare_datasets(train, meta, eval_, outer: OuterModule, tokenizer, args: BilevelConfig, vocab_size: int):
    """(train, meta, eval) ready for the bilevel losses (see :func:`prepare_dataset`); ``eval_`` may be None or a
    dict of datasets, as the Trainer allows."""

    def prepare(dataset, role):
        return prepare_dataset(dataset, role, outer, tokenizer, args, vocab_size)

    train, meta = prepare(train, "train"), prepare(meta, "meta")
    if isinstance(eval_, dict):
        eval_ = {name: prepare(dataset, f"eval {name!r}") for name, dataset in eval_.items()}
    elif eval_ is not None:
        eval_ = prepare(eval_, "eval")
    check_unroll_fits(len(train), args.per_device_train_batch_size, args.unroll_steps, args.world_size)
    return train, meta, eval_


def prepare_dataset(dataset, role: str, outer: OuterModule, tokenizer, args: BilevelConfig, vocab_size: int):
    """A split ready for the bilevel losses: tokenized when raw (see ``hf_fg2u.lm.formats``), train rows numbered
    when ``ExampleWeights`` needs ids and there are none, the outer module's columns added, every row checked."""
    dataset = prepare_split(dataset, role, tokenizer, args.max_length, args.dataset_text_field)
    check_model_columns(dataset, role)
    train = role in ("train", "exported")
    if train and outer.id_column is not None:
        if outer.id_column not in dataset.column_names:
            dataset = dataset.map(lambda _, i: {outer.id_column: i}, with_indices=True)
        check_unique_ids(dataset, outer.id_column, role)
    check_token_rows(dataset, role, vocab_size)
    return outer.prepare_dataset(dataset, "train" if train else role)


def check_model_columns(dataset, role: str) -> None:
    if "input_ids" not in dataset.column_names:
        raise ValueError(
            f"The {role} dataset has no 'input_ids' column (columns: {dataset.column_names}). Pass raw "
            "rows (text, prompt/completion or messages) with a tokenizer, or tokenize them first with "
            "hf_fg2u.lm.formats.tokenize_dataset(dataset, tokenizer, max_length, role)."
        )


def check_token_rows(dataset, role: str, vocab_size: int) -> None:
    """Refuse empty rows, token ids outside ``[0, vocab_size)`` and rows with no token to learn from.

    A row's loss compares logits[:-1] with labels[1:], so a row whose labels are all -100 past position 0
    contributes nothing: its loss is 0, its hypergradient 0, and a split made only of such rows "trains" on
    nothing while reporting loss 0.
    """
    columns = dataset.column_names
    masks = list(dataset["attention_mask"]) if "attention_mask" in columns else None
    labels = list(dataset["labels"]) if "labels" in columns else None
    empty, out_of_range, unlearnable = [], [], []
    for index, ids in enumerate(list(dataset["input_ids"])):
        mask = masks[index] if masks is not None else [1] * len(ids)
        if not any(mask):
            empty.append(index)
            continue
        targets = (
            labels[index] if labels is not None else [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
        )
        if any(not 0 <= t < vocab_size for t in ids) or any(
            t != IGNORE_INDEX and not 0 <= t < vocab_size for t in targets
        ):
            out_of_range.append(index)
        if all(t == IGNORE_INDEX for t in targets[1:]):
            unlearnable.append(index)
    total = len(dataset)
    if empty:
        raise ValueError(
            f"{len(empty)} of {total} rows of the {role} dataset are empty (no token, or attention_mask all 0): "
            f"rows {_rows(empty)}. Remove them, e.g. dataset.filter(lambda row: sum(row['attention_mask']) > 0)."
        )
    if out_of_range:
        raise ValueError(
            f"{len(out_of_range)} of {total} rows of the {role} dataset hold token ids outside the model's "
            f"vocabulary [0, {vocab_size}): rows {_rows(out_of_range)}. Tokenize with the model's own tokenizer "
            "(or resize the model's embeddings to the tokenizer)."
        )
    if unlearnable:
        raise ValueError(
            f"{len(unlearnable)} of {total} rows of the {role} dataset have no token to learn from: every label "
            f"after the first is -100 (rows {_rows(unlearnable)}), so they add loss 0 and hypergradient 0. Usually "
            "max_length cut off the answer or completion: raise max_length, or drop these rows."
        )


def check_unique_ids(dataset, column: str, role: str = "train") -> None:
    """Refuse repeated ids: rows sharing an id would share one learned weight."""
    counts = Counter(dataset[column])
    repeated = sorted(i for i, n in counts.items() if n > 1)
    if repeated:
        raise ValueError(
            f"Column {column!r} of the {role} dataset repeats ids {_rows(repeated)} "
            f"({sum(counts[i] for i in repeated)} rows share an id), so those rows would share one weight. Number "
            "the rows 0..n-1: dataset.map(lambda _, i: {'" + column + "': i}, with_indices=True)."
        )


def check_unroll_fits(num_rows: int, batch_size: int, unroll_steps: int, num_processes: int) -> None:
    """One outer step reads ``unroll_steps × batch_size`` rows per process; fewer rows would make a shorter unroll
    than configured. Refuse a dataset without one complete unroll; say how many rows each epoch drops (the train
    dataloader drops an epoch's incomplete last unroll)."""
    per_unroll = batch_size * unroll_steps * num_processes
    if num_rows < per_unroll:
        raise ValueError(
            f"The train dataset has {num_rows} rows, fewer than one unroll reads: unroll_steps={unroll_steps} × "
            f"per_device_train_batch_size={batch_size} × {num_processes} process(es) = {per_unroll}. Every outer "
            f"step would unroll fewer steps than configured. Lower unroll_steps or the batch size, or add rows."
        )
    left = num_rows % per_unroll
    if left:
        warnings.warn(
            f"{num_rows} train rows are not a multiple of the {per_unroll} rows per unroll: each epoch drops its "
            f"last incomplete unroll ({left} rows, different ones each epoch when shuffled), which would unroll "
            f"fewer than unroll_steps={unroll_steps} inner steps. Make the row count a multiple to use every row.",
            stacklevel=3,
        )
