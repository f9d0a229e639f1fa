"""The built-in offline data of ``hf-fg2u demo`` and the recipes without ``--data_files``: noisy "facts" with a
known fraction of wrong answers, fact tables as domains, and a character-level tokenizer for tiny models from config.

Everything is built from a seed with numpy's ``default_rng``, never the global RNG, and nothing is downloaded, so
tests and demos run anywhere. The rows are prompt/completion pairs (``"kqzt="`` → ``"42"``), as users bring
theirs, and are tokenized by the same path (``hf_fg2u.lm.formats``): the loss is on the answer, where corrupted
rows differ from clean ones.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PUNCTUATION = "+-=*,.:;?!'()><"
CHARACTERS = string.digits + string.ascii_lowercase + " \n" + PUNCTUATION

# Independent RNG streams per split, so that meta and eval never share draws with train.
_TRAIN_STREAM, _META_STREAM, _EVAL_STREAM = 0, 1, 2


# ---------------------------------------------------------------------------------------------- tokenizer


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ``CHARACTERS`` with ``<pad>`` = 0, ``<bos>``, ``<eos>``, ``<unk>``.

    Built locally so tests and demos need no Hub access; its vocabulary (57 tokens) fits the tiny models built
    from config with ``vocab_size=len(tokenizer)``. Like Llama's, it starts a text with ``<bos>`` (with
    ``add_special_tokens``); the end-of-sequence token is the formats' to add. Characters outside the vocabulary
    (e.g. capitals) become ``<unk>``.
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # One piece per character, newline included; Fuse joins them back without inserting spaces.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    pad, bos, eos, unk = SPECIAL_TOKENS
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
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


def _to_dataset(
    prompts: Sequence[str], answers: Sequence[str], corrupted: Sequence[bool], domains: Sequence[str]
) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": list(prompts),
            "completion": list(answers),
            "example_id": list(range(len(prompts))),
            "is_corrupted": [bool(c) for c in corrupted],
            "domain": list(domains),
        }
    )


# ---------------------------------------------------------------------------------------------- generators


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
