"""The built-in offline data of ``hf-fg2u demo`` and the recipes without ``--data_files``: noisy "facts" with a
known fraction of wrong answers, fact tables as domains, and a character-level tokenizer for tiny models from config.

Everything is built from a seed with numpy's ``default_rng``, never the global RNG, and nothing is downloaded, so
tests and demos run anywhere. Every example's text is ``prompt + answer``; the prompt ends with an answer separator
(``=``), e.g. ``"kqzt=42"``; ``tokenize_for_causal_lm`` uses the separator to put labels on the answer only, where
corrupted examples differ from clean ones.
"""

from __future__ import annotations

import string
import warnings
from collections.abc import Sequence

import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PUNCTUATION = "+-=*,.:;?!'()><"
CHARACTERS = string.digits + string.ascii_lowercase + " \n" + PUNCTUATION
ANSWER_SEPARATORS = ("=", ">")
IGNORE_INDEX = -100

# Independent RNG streams per split, so that meta and eval never share draws with train.
_TRAIN_STREAM, _META_STREAM, _EVAL_STREAM = 0, 1, 2


# ---------------------------------------------------------------------------------------------- tokenizer


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ``CHARACTERS`` with ``<pad>`` = 0, ``<bos>``, ``<eos>``, ``<unk>``.

    Built locally so tests and demos need no Hub access; its vocabulary (57 tokens) fits the tiny models built
    from config with ``vocab_size=len(tokenizer)``. It adds no special tokens itself: ``tokenize_for_causal_lm``
    adds ``<bos>``/``<eos>`` explicitly, as it does for any tokenizer. Characters outside the vocabulary
    (e.g. capitals) become ``<unk>``.
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # One piece per character, newline included; Fuse joins them back without inserting spaces.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    pad, bos, eos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------------------------------------- validation


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}.")


def _rng(seed: int, stream: int) -> np.random.Generator:
    """A generator for one split: the same (seed, stream) always gives the same draws."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    return np.random.default_rng([int(seed), stream])


# ---------------------------------------------------------------------------------------------- tasks


def _random_letters(rng: np.random.Generator, size: int) -> str:
    """``size`` lowercase letters drawn with replacement."""
    return "".join(string.ascii_lowercase[i] for i in rng.integers(0, 26, size=size))


def split_prompt_answer(text: str, separators: Sequence[str] = ANSWER_SEPARATORS) -> tuple[str, str]:
    """Split at the first answer separator: ``"12+7=19"`` -> ``("12+7=", "19")``; the prompt keeps it."""
    positions = [text.find(sep) for sep in separators if sep in text]
    if not positions:
        raise ValueError(
            f"Text {text!r} has no answer separator {tuple(separators)}. Labels on the answer only need one; "
            "pass answer_only=False to train on every token."
        )
    end = min(positions) + 1
    return text[:end], text[end:]


def _to_dataset(
    prompts: Sequence[str], answers: Sequence[str], corrupted: Sequence[bool], domains: Sequence[str]
) -> Dataset:
    return Dataset.from_dict(
        {
            "text": [p + a for p, a in zip(prompts, answers, strict=True)],
            "example_id": list(range(len(prompts))),
            "is_corrupted": [bool(c) for c in corrupted],
            "domain": list(domains),
        }
    )


# ---------------------------------------------------------------------------------------------- generators


# ---------------------------------------------------------------------------------------------- tokenization


def encode_for_causal_lm(
    text: str, tokenizer: PreTrainedTokenizerBase, max_length: int = 32, answer_only: bool = True
) -> dict[str, list[int]]:
    """One text -> ``input_ids``, ``attention_mask``, ``labels`` of length ``max_length``.

    The sequence is ``<bos> prompt answer <eos>`` (either special token skipped if the tokenizer has none),
    right-padded or truncated at the end. ``labels`` equal ``input_ids`` except -100 at padding and, with
    ``answer_only``, at ``<bos>`` and the prompt up to and including its separator (the label at position 0
    is never predicted anyway: losses compare logits[:, :-1] with labels[:, 1:]). Prompt and answer are
    tokenized separately so that the boundary is exact for any tokenizer, not only character-level ones.
    """
    if answer_only:
        prompt, answer = split_prompt_answer(text)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        answer, prompt_ids = text, []
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    head = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    tail = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    input_ids = (head + prompt_ids + answer_ids + tail)[:max_length]
    unlabelled = [IGNORE_INDEX] * (len(head) + len(prompt_ids)) if answer_only else head
    labels = (unlabelled + answer_ids + tail)[:max_length]
    padding = max_length - len(input_ids)
    return {
        "input_ids": input_ids + [tokenizer.pad_token_id] * padding,
        "attention_mask": [1] * len(input_ids) + [0] * padding,
        "labels": labels + [IGNORE_INDEX] * padding,
    }


def tokenize_for_causal_lm(
    dataset: Dataset | DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 32,
    text_column: str = "text",
    answer_only: bool = True,
) -> Dataset | DatasetDict:
    """Tokenize ``dataset[text_column]`` for a causal LM with fixed-length rows (see ``encode_for_causal_lm``).

    Adds ``input_ids``, ``attention_mask`` and ``labels``, drops ``text_column`` and keeps every other column
    (``example_id``, ``domain``, ``is_corrupted``, ...) so that batches still say which example and domain
    each row is. Fixed length keeps every inner batch the same shape, which the unrolled hypergradient needs.
    A ``DatasetDict`` (e.g. from ``make_noisy_reweighting_splits``) is tokenized split by split.
    """
    if isinstance(dataset, DatasetDict):
        return DatasetDict(
            {
                name: tokenize_for_causal_lm(split, tokenizer, max_length, text_column, answer_only)
                for name, split in dataset.items()
            }
        )
    if text_column not in dataset.column_names:
        raise ValueError(
            f"Column {text_column!r} not found; the dataset has columns {dataset.column_names}. "
            "Pass text_column= the name of the column that holds the text."
        )
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (room for <bos> and one token), got {max_length!r}.")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "The tokenizer has no pad token. Set one (e.g. tokenizer.pad_token = tokenizer.eos_token) "
            "or use make_char_tokenizer()."
        )
    clashes = [c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names]
    if clashes:
        raise ValueError(f"The dataset already has columns {clashes}; remove them before tokenizing.")

    def encode_batch(batch: dict) -> dict[str, list[list[int]]]:
        rows = [encode_for_causal_lm(text, tokenizer, max_length, answer_only) for text in batch[text_column]]
        return {key: [row[key] for row in rows] for key in ("input_ids", "attention_mask", "labels")}

    extra = (tokenizer.bos_token_id is not None) + (tokenizer.eos_token_id is not None)
    lengths = [len(ids) + extra for ids in tokenizer(list(dataset[text_column]), add_special_tokens=False)["input_ids"]]
    cut = sum(length > max_length for length in lengths)
    if cut:
        warnings.warn(
            f"{cut} of {len(lengths)} rows are longer than max_length={max_length} tokens (longest: {max(lengths)}) "
            "and were cut at the end. Raise max_length if the cut part matters.",
            stacklevel=2,
        )
    return dataset.map(encode_batch, batched=True, remove_columns=[text_column])


def make_fact_splits(
    num_facts: int, copies: int, seed: int, corrupted_fraction: float = 0.4, name_length: int = 4
) -> DatasetDict:
    """Noisy "facts" for per-example reweighting: each of ``num_facts`` random names has one true number
    ("kqzt=42"). "train" holds ``copies`` rows per fact, a ``corrupted_fraction`` of them with a wrong number;
    "meta" (the trusted set) and "eval" state every fact once, correctly.

    Unlike arithmetic, a fact cannot be inferred from other facts, so a tiny model from config learns them in
    a few steps, and a corrupted row contradicts the meta row of the same name: the hypergradient of its
    weight is clearly positive from the first step (training on it raises the meta loss).
    """
    _check_count("num_facts", num_facts)
    _check_count("copies", copies)
    if not 0.0 <= corrupted_fraction < 1.0:
        raise ValueError(f"corrupted_fraction must be in [0, 1), got {corrupted_fraction}.")
    rng = _rng(seed, _TRAIN_STREAM)
    names: list[str] = []
    while len(names) < num_facts:
        name = _random_letters(rng, name_length)
        if name not in names:
            names.append(name)
    values = [int(v) for v in rng.integers(10, 100, size=num_facts)]
    rows = [(i, copy) for i in range(num_facts) for copy in range(copies)]
    order = rng.permutation(len(rows))
    num_corrupted = round(corrupted_fraction * len(rows))
    corrupted = set(order[:num_corrupted].tolist())
    prompts, answers, flags = [], [], []
    for row, (fact, _) in enumerate(rows):
        value = values[fact]
        if row in corrupted:
            wrong = int(rng.integers(10, 99))
            value = wrong if wrong < value else wrong + 1
        prompts.append(f"{names[fact]}=")
        answers.append(str(value))
        flags.append(row in corrupted)
    train = _to_dataset(prompts, answers, flags, ["facts"] * len(rows))
    clean = [f"{name}=" for name in names], [str(v) for v in values]
    meta = _to_dataset(*clean, [False] * num_facts, ["facts"] * num_facts)
    return DatasetDict({"train": train, "meta": meta, "eval": meta})


def make_fact_domain_splits(
    num_domains: int, num_facts: int, copies: int, seed: int, target_domain: str = "facts_a"
) -> DatasetDict:
    """Several fact tables as domains ("facts_a", "facts_b", ...), clean; "meta" and "eval" state the facts
    of ``target_domain`` only, so a learned mixture should move its mass there."""
    if num_domains < 2:
        raise ValueError(f"num_domains must be >= 2, got {num_domains}.")
    names = [f"facts_{chr(ord('a') + i)}" for i in range(num_domains)]
    if target_domain not in names:
        raise ValueError(f"target_domain={target_domain!r} is not one of the generated domains {names}.")
    parts, meta = [], None
    for offset, name in enumerate(names):
        splits = make_fact_splits(num_facts, copies, seed * 1000 + offset, corrupted_fraction=0.0)
        parts.append(splits["train"].map(lambda row, name=name: {"domain": name}))
        if name == target_domain:
            meta = splits["meta"].map(lambda row, name=name: {"domain": name})
    train = concatenate_datasets(parts)
    train = train.map(lambda _, i: {"example_id": i}, with_indices=True)
    return DatasetDict({"train": train, "meta": meta, "eval": meta})
