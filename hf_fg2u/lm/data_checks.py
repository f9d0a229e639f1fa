"""The datasets of ``BilevelTrainer``, prepared and checked at construction: raw data is tokenized, and data that
would train on nothing, crash deep inside an unroll, or silently change the unroll is refused before any compute,
with the count of rows and the fix.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from dataclasses import dataclass

from hf_fg2u.lm.formats import IGNORE_INDEX, is_raw, prepare_split, raw_format
from hf_fg2u.outer import OuterModule
from hf_fg2u.trainer.config import BilevelConfig

SHOWN = 5  # row indices quoted in an error
ROW_COLUMN = "_hf_fg2u_source_row"  # a raw row's position, carried through tokenizing to see which rows were kept


def _rows(indices: list[int]) -> str:
    more = f" and {len(indices) - SHOWN} more" if len(indices) > SHOWN else ""
    return f"{indices[:SHOWN]}{more}"


def prepare_datasets(train, meta, eval_, outer: OuterModule, tokenizer, args: BilevelConfig, limits: ModelLimits):
    """(train, meta, eval) ready for the bilevel losses (see :func:`prepare_dataset`); ``eval_`` may be None or a
    dict of datasets, as the Trainer allows."""

    if limits.max_positions is not None and outer.prefix_length:  # the soft prompt takes positions too
        limits = dataclasses.replace(limits, max_positions=limits.max_positions - outer.prefix_length)

    def prepare(dataset, role):
        return prepare_dataset(dataset, role, outer, tokenizer, args, limits)

    train, meta = prepare(train, "train"), prepare(meta, "meta")
    if isinstance(eval_, dict):
        eval_ = {name: prepare(dataset, f"eval {name!r}") for name, dataset in eval_.items()}
    elif eval_ is not None:
        eval_ = prepare(eval_, "eval")
    check_unroll_fits(len(train), args.per_device_train_batch_size, args.unroll_steps, args.world_size)
    warn_if_contained(meta, train, "meta", "train", "the meta loss then rewards fitting train rows, wrong ones too",
                      MetaInTrainWarning)  # fmt: skip
    for name, split in (eval_ if isinstance(eval_, dict) else {"eval": eval_}).items():
        if split is not None:
            warn_if_contained(split, meta, name, "meta", "its loss is not held out from what the weights learned from",
                              EvalInMetaWarning)  # fmt: skip
    return train, meta, eval_


class MetaInTrainWarning(UserWarning):
    """Every meta row is also a train row (a script's own toy data may be built so: it filters this one out)."""


class EvalInMetaWarning(UserWarning):
    """Every eval row is also a meta row (a script that evaluates on the meta rows by choice filters this one out)."""


def warn_if_contained(dataset, other, name: str, other_name: str, consequence: str, category=UserWarning) -> None:
    """Warn when every row of ``dataset`` is also a row of ``other`` (by tokens, not by split name)."""
    rows = {tuple(ids) for ids in other["input_ids"]}
    shared = sum(tuple(ids) in rows for ids in dataset["input_ids"])
    if len(dataset) and shared == len(dataset):
        warnings.warn(
            f"Every one of the {len(dataset)} rows of the {name} dataset is also a row of the {other_name} "
            f"dataset: {consequence}. Use rows of their own.",
            category,
            stacklevel=4,
        )


def drop_long_train_rows(train, tokenizer, args: BilevelConfig, id_column: str | None = None):
    """(the raw rows kept, them tokenized) under ``truncation_mode='drop'``: both without the rows longer than
    max_length, so that export_weights() returns the rows that were trained, each with its own weight. Rows
    without ``id_column`` are numbered by their position before the drop, so that an id still names the row the
    outer variables were built for (a group per row, a weight per row). Other truncations and tokenized data pass
    through as (train, train)."""
    if args.truncation_mode != "drop" or not is_raw(train):
        return train, train
    positions = list(range(len(train)))
    numbered = train.add_column(ROW_COLUMN, positions)
    if id_column is not None and id_column not in train.column_names:
        numbered = numbered.add_column(id_column, positions)
    tokenized = prepare_split(numbered, "train", tokenizer, args.max_length, args.dataset_text_field, "drop")
    return train.select(tokenized[ROW_COLUMN]), tokenized.remove_columns(ROW_COLUMN)


def prepare_dataset(dataset, role: str, outer: OuterModule, tokenizer, args: BilevelConfig, limits: ModelLimits):
    """A split ready for the bilevel losses: train rows numbered when ``ExampleWeights`` needs ids and there are
    none, the outer module's columns added (before tokenizing, which replaces the format's columns a module may
    read, e.g. a rater's ``completion`` groups), tokenized when raw (see ``hf_fg2u.lm.formats``), every row checked."""
    if is_raw(dataset):
        raw_format(dataset, role, args.dataset_text_field)  # an unknown format is named before columns are added
    train = role in ("train", "exported")
    if train and outer.id_column is not None:
        if outer.id_column not in dataset.column_names:
            dataset = dataset.map(lambda _, i: {outer.id_column: i}, with_indices=True)
        check_unique_ids(dataset, outer.id_column, role)
    dataset = outer.prepare_dataset(dataset, "train" if train else role)
    dataset = prepare_split(dataset, role, tokenizer, args.max_length, args.dataset_text_field, args.truncation_mode)
    check_model_columns(dataset, role)
    check_token_rows(dataset, role, limits)
    return dataset


def check_model_columns(dataset, role: str) -> None:
    if "input_ids" not in dataset.column_names:
        raise ValueError(
            f"The {role} dataset has no 'input_ids' column (columns: {dataset.column_names}). Pass raw "
            "rows (text, prompt/completion or messages) with a tokenizer, or tokenize them first with "
            "hf_fg2u.lm.formats.tokenize_dataset(dataset, tokenizer, max_length, role)."
        )


@dataclass(frozen=True)
class ModelLimits:
    """What a row's tokens must fit: ids in [0, vocab_size), at most ``max_positions`` tokens (None: no limit)."""

    vocab_size: int
    max_positions: int | None = None

    @classmethod
    def of(cls, model) -> ModelLimits:
        config = getattr(model, "config", None)
        return cls(model.get_input_embeddings().weight.shape[0], getattr(config, "max_position_embeddings", None))


def check_token_rows(dataset, role: str, limits: ModelLimits) -> None:
    """Refuse rows that would fail deep inside a step or train on nothing: ids that are not integers, columns of
    different lengths, empty rows, token ids outside the vocabulary, rows longer than the model's positions, and
    rows with no token to learn from.

    A row's loss compares logits[:-1] with labels[1:], so a row whose labels are all -100 past position 0
    contributes nothing: its loss is 0, its hypergradient 0, and a split made only of such rows "trains" on
    nothing while reporting loss 0.
    """
    present = [c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names]
    found, longest = _classify_token_rows({column: list(dataset[column]) for column in present}, limits)
    total = len(dataset)
    fixes = {
        "not_integer": f"hold values that are not integer token ids in {present} (e.g. 1.0 or text): rows {{rows}}. "
        "Token ids, attention masks and labels are integers; tokenize with the model's tokenizer, or cast the "
        "columns (dataset.cast_column).",
        "length": f"have {present} of different lengths: rows {{rows}}. Each row's attention_mask and labels have "
        "one entry per input id (they would otherwise be padded or cut silently).",
        "empty": "are empty (no token, or attention_mask all 0): rows {rows}. Remove them, e.g. "
        "dataset.filter(lambda row: sum(row['attention_mask']) > 0).",
        "out_of_range": f"hold token ids outside the model's vocabulary [0, {limits.vocab_size}): rows {{rows}}. "
        "Tokenize with the model's own tokenizer (or resize the model's embeddings to the tokenizer).",
        "too_long": f"are longer than the model's {limits.max_positions} positions (max_position_embeddings; "
        f"longest: {longest} tokens): rows {{rows}}. Set max_length <= {limits.max_positions} (raw rows are cut or "
        "dropped by truncation_mode), or shorten them.",
        "unlearnable": "have no token to learn from: every label after the first is -100 (rows {rows}), so they "
        "add loss 0 and hypergradient 0. Usually max_length cut off the answer or completion: raise max_length, "
        "or set truncation_mode='keep_end' (cut the prompt's start instead) or truncation_mode='drop' (leave such "
        "rows out).",
    }
    for kind, fix in fixes.items():
        if found[kind]:
            rows = _rows(found[kind])
            raise ValueError(f"{len(found[kind])} of {total} rows of the {role} dataset " + fix.format(rows=rows))


def _classify_token_rows(values: dict[str, list], limits: ModelLimits) -> tuple[dict[str, list[int]], int]:
    """The rows of each fault (a row with a type or length fault is not checked further), and the longest row
    past the position limit."""
    ids_of, masks, labels = values["input_ids"], values.get("attention_mask"), values.get("labels")
    found = {kind: [] for kind in ("not_integer", "length", "empty", "out_of_range", "too_long", "unlearnable")}
    vocab_size, longest = limits.vocab_size, 0
    for index, ids in enumerate(ids_of):
        row = [column[index] for column in values.values()]
        if any(not isinstance(t, int) for part in row for t in part):
            found["not_integer"].append(index)
            continue
        if len({len(part) for part in row}) > 1:
            found["length"].append(index)
            continue
        mask = masks[index] if masks is not None else [1] * len(ids)
        if not any(mask):
            found["empty"].append(index)
            continue
        targets = (
            labels[index] if labels is not None else [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
        )
        if any(not 0 <= t < vocab_size for t in ids) or any(
            t != IGNORE_INDEX and not 0 <= t < vocab_size for t in targets
        ):
            found["out_of_range"].append(index)
        if limits.max_positions is not None and len(ids) > limits.max_positions:
            found["too_long"].append(index)
            longest = max(longest, len(ids))
        if all(t == IGNORE_INDEX for t in targets[1:]):
            found["unlearnable"].append(index)
    return found, longest


def check_unique_ids(dataset, column: str, role: str = "train") -> None:
    """Refuse ids that are not integers (a float or text id cannot index a weight) and repeated ids (rows sharing
    an id would share one learned weight)."""
    ids = dataset[column]
    odd = [row for row, value in enumerate(ids) if isinstance(value, bool) or not isinstance(value, int)]
    if odd:
        raise ValueError(
            f"Column {column!r} of the {role} dataset holds {type(ids[odd[0]]).__name__} values, not integer row "
            f"ids (rows {_rows(odd)}, e.g. {ids[odd[0]]!r}). Number the rows 0..n-1: "
            "dataset.map(lambda _, i: {'" + column + "': i}, with_indices=True), or drop the column."
        )
    counts = Counter(ids)
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
