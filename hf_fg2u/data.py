"""Offline, deterministic toy datasets with learnable structure, and a character-level tokenizer.

Bilevel data reweighting needs data where the right weights are known: arithmetic with a chosen fraction of
wrong answers (the meta loss should push their weights down) and a mixture of string tasks where one target
domain is measured (the meta loss should favour that domain). Everything is built from a seed with numpy's
``default_rng``, never the global RNG, and nothing is downloaded, so tests and recipes run anywhere.

Every example's text is ``prompt + answer``; the prompt ends with an answer separator (``=`` or ``>``), e.g.
``"12+7=19"`` or ``"reverse: abc>cba"``. ``tokenize_for_causal_lm`` uses the separator to put labels on the
answer only, where corrupted examples differ from clean ones.
"""

from __future__ import annotations

import re
import string
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PUNCTUATION = "+-=*,.:;?!'()><"
CHARACTERS = string.digits + string.ascii_lowercase + " \n" + PUNCTUATION
DOMAINS = ("arithmetic", "reverse", "copy", "sort")
ANSWER_SEPARATORS = ("=", ">")
OPERATIONS = ("+", "-", "*")
CORRUPTIONS = ("random", "off_by_one", "letters")
IGNORE_INDEX = -100

# Independent RNG streams per split, so that meta and eval never share draws with train.
_TRAIN_STREAM, _META_STREAM, _EVAL_STREAM = 0, 1, 2
_ARITHMETIC = re.compile(r"^(\d+)([+\-*])(\d+)=$")


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


def _check_arithmetic_args(max_operand: int, operations: Sequence[str]) -> None:
    if isinstance(max_operand, bool) or not isinstance(max_operand, (int, np.integer)) or max_operand < 1:
        raise ValueError(f"max_operand must be an int >= 1 (so that a wrong answer exists), got {max_operand!r}.")
    unknown = [op for op in operations if op not in OPERATIONS]
    if not operations or unknown:
        raise ValueError(f"operations must be a non-empty subset of {OPERATIONS}, got {tuple(operations)!r}.")


def _check_domains(domains: Sequence[str]) -> tuple[str, ...]:
    domains = tuple(domains)
    unknown = [d for d in domains if d not in DOMAINS]
    if not domains or unknown or len(set(domains)) != len(domains):
        raise ValueError(f"domains must be distinct names from {DOMAINS}, got {domains!r}.")
    return domains


# ---------------------------------------------------------------------------------------------- tasks


def _arithmetic_prompt(rng: np.random.Generator, max_operand: int, operations: Sequence[str]) -> str:
    """``"a+b="``, ``"a-b="`` (a >= b, so answers stay non-negative) or ``"a*b="``."""
    a, b = (int(x) for x in rng.integers(0, max_operand + 1, size=2))
    op = operations[int(rng.integers(len(operations)))]
    if op == "-" and a < b:
        a, b = b, a
    return f"{a}{op}{b}="


def _random_letters(rng: np.random.Generator, size: int) -> str:
    """``size`` lowercase letters drawn with replacement."""
    return "".join(string.ascii_lowercase[i] for i in rng.integers(0, 26, size=size))


def _letters_prompt(rng: np.random.Generator, task: str, min_letters: int, max_letters: int) -> str:
    """``"task: letters>"`` with ``min_letters``..``max_letters`` lowercase letters drawn with replacement."""
    return f"{task}: {_random_letters(rng, int(rng.integers(min_letters, max_letters + 1)))}>"


_LETTER_TASKS = {
    "reverse": lambda letters: letters[::-1],
    "copy": lambda letters: letters,
    "sort": lambda letters: "".join(sorted(letters)),
}


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


def reference_answer(prompt: str) -> str:
    """The correct answer to any prompt these generators make, e.g. to score a model's generations."""
    match = _ARITHMETIC.match(prompt)
    if match:
        a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
        return str(a + b if op == "+" else a - b if op == "-" else a * b)
    task, _, rest = prompt.partition(": ")
    if task in _LETTER_TASKS and rest.endswith(">"):
        return _LETTER_TASKS[task](rest[:-1])
    raise ValueError(f"Prompt {prompt!r} is not one of this module's tasks ({DOMAINS}).")


def _wrong_answer(rng: np.random.Generator, prompt: str, max_operand: int, corruption: str) -> str:
    """A wrong answer that is never the true one, so training on it can only hurt.

    ``random``: uniform over the other values the operation can produce (pure label noise);
    ``off_by_one``: the true answer ±1 (a consistent, plausible-looking error);
    ``letters``: lowercase letters in place of the number (garbage a weak model can already tell apart).
    """
    if corruption == "letters":
        return _random_letters(rng, len(reference_answer(prompt)))
    truth = int(reference_answer(prompt))
    if corruption == "off_by_one":
        return str(truth + 1 if truth == 0 or rng.integers(2) else truth - 1)
    op = _ARITHMETIC.match(prompt).group(2)
    largest = {"+": 2 * max_operand, "-": max_operand, "*": max_operand**2}[op]
    value = int(rng.integers(0, largest))  # one of `largest` values other than truth, in [0, largest]
    return str(value if value < truth else value + 1)


def _draw_prompts(count: int, draw: Callable[[], str], exclude: set[str], capacity_hint: str) -> list[str]:
    """``count`` prompts from ``draw`` that are not in ``exclude`` (duplicates among them are allowed)."""
    prompts, attempts = [], 0
    while len(prompts) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise ValueError(
                f"Could not draw {count} prompts outside the {len(exclude)} already used by other splits; "
                f"the task has too few distinct prompts. {capacity_hint}"
            )
        prompt = draw()
        if prompt not in exclude:
            prompts.append(prompt)
    return prompts


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


def _arithmetic(
    num_examples: int,
    rng: np.random.Generator,
    corrupted_fraction: float,
    max_operand: int,
    operations: Sequence[str],
    corruption: str,
    exclude: set[str],
) -> Dataset:
    _check_count("num_examples", num_examples)
    _check_arithmetic_args(max_operand, operations)
    if not 0.0 <= corrupted_fraction <= 1.0:
        raise ValueError(f"corrupted_fraction must lie in [0, 1], got {corrupted_fraction!r}.")
    if corruption not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {corruption!r}.")
    prompts = _draw_prompts(
        num_examples, lambda: _arithmetic_prompt(rng, max_operand, operations), exclude, "Raise max_operand."
    )
    num_corrupted = round(corrupted_fraction * num_examples)
    corrupted = np.zeros(num_examples, dtype=bool)
    corrupted[rng.choice(num_examples, size=num_corrupted, replace=False)] = True
    answers = [
        _wrong_answer(rng, prompt, max_operand, corruption) if is_corrupted else reference_answer(prompt)
        for prompt, is_corrupted in zip(prompts, corrupted, strict=True)
    ]
    return _to_dataset(prompts, answers, corrupted, ["arithmetic"] * num_examples)


def make_arithmetic(
    num_examples: int,
    seed: int,
    corrupted_fraction: float = 0.0,
    max_operand: int = 50,
    operations: Sequence[str] = ("+", "-"),
    corruption: str = "random",
) -> Dataset:
    """Arithmetic such as ``"12+7=19"`` and ``"31-4=27"``, operands in ``[0, max_operand]``.

    Exactly ``round(corrupted_fraction * num_examples)`` examples (Python rounding), chosen with the seed, get
    a wrong answer (see ``CORRUPTIONS``) and ``is_corrupted=True``: the ground truth a data-reweighting method
    should recover. Columns: ``text``, ``example_id`` (0..n-1), ``is_corrupted``, ``domain`` ("arithmetic").
    """
    rng = _rng(seed, _TRAIN_STREAM)
    return _arithmetic(num_examples, rng, corrupted_fraction, max_operand, operations, corruption, set())


def _domain_examples(
    domain: str,
    count: int,
    rng: np.random.Generator,
    exclude: set[str],
    max_operand: int,
    min_letters: int,
    max_letters: int,
) -> tuple[list[str], list[str]]:
    if domain == "arithmetic":
        draw = lambda: _arithmetic_prompt(rng, max_operand, ("+", "-"))
        hint = "Raise max_operand."
    else:
        draw = lambda: _letters_prompt(rng, domain, min_letters, max_letters)
        hint = "Raise max_letters."
    prompts = _draw_prompts(count, draw, exclude, hint)
    return prompts, [reference_answer(p) for p in prompts]


def _mixture(
    num_examples_per_domain: int,
    rng: np.random.Generator,
    domains: tuple[str, ...],
    max_operand: int,
    min_letters: int,
    max_letters: int,
) -> Dataset:
    prompts, answers, names = [], [], []
    for domain in domains:
        p, a = _domain_examples(domain, num_examples_per_domain, rng, set(), max_operand, min_letters, max_letters)
        prompts, answers, names = prompts + p, answers + a, names + [domain] * len(p)
    order = rng.permutation(len(prompts))
    dataset = _to_dataset(
        [prompts[i] for i in order], [answers[i] for i in order], [False] * len(order), [names[i] for i in order]
    )
    return dataset.add_column("domain_id", [domains.index(names[i]) for i in order])


def _check_letters(min_letters: int, max_letters: int) -> None:
    if not 1 <= min_letters <= max_letters:
        raise ValueError(f"Need 1 <= min_letters <= max_letters, got min_letters={min_letters}, max={max_letters}.")


def make_domain_mixture(
    num_examples_per_domain: int,
    seed: int,
    domains: Sequence[str] = DOMAINS,
    max_operand: int = 50,
    min_letters: int = 3,
    max_letters: int = 6,
) -> Dataset:
    """Several string tasks, shuffled together: ``"12+7=19"``, ``"reverse: abc>cba"``, ``"copy: abc>abc"``,
    ``"sort: cab>abc"``.

    Each domain is learnable on its own and distinct from the others, so per-domain weights have a right
    answer. Columns: ``text``, ``example_id`` (0..n-1 after shuffling), ``is_corrupted`` (all False, kept so
    every dataset here has the same columns), ``domain`` and ``domain_id`` (index into ``domains``, an int that
    a batch can carry as a tensor).
    """
    domains = _check_domains(domains)
    _check_count("num_examples_per_domain", num_examples_per_domain)
    _check_arithmetic_args(max_operand, ("+", "-"))
    _check_letters(min_letters, max_letters)
    rng = _rng(seed, _TRAIN_STREAM)
    return _mixture(num_examples_per_domain, rng, domains, max_operand, min_letters, max_letters)


def make_noisy_reweighting_splits(
    num_train: int,
    num_meta: int,
    num_eval: int,
    seed: int,
    corrupted_fraction: float = 0.4,
    max_operand: int = 50,
    operations: Sequence[str] = ("+", "-"),
    corruption: str = "random",
) -> DatasetDict:
    """Splits for learning per-example weights on noisy data: "train" with ``corrupted_fraction`` wrong
    answers, clean "meta" (the outer objective) and clean "eval" (the report).

    "train" equals ``make_arithmetic(num_train, seed, corrupted_fraction, ...)``. "meta" and "eval" come from
    their own RNG streams and contain no prompt seen in an earlier split, so that the meta loss cannot be
    lowered by memorising training examples and eval measures what was learned.
    """
    train = make_arithmetic(num_train, seed, corrupted_fraction, max_operand, operations, corruption)
    used = {split_prompt_answer(t)[0] for t in train["text"]}
    meta = _arithmetic(num_meta, _rng(seed, _META_STREAM), 0.0, max_operand, operations, corruption, used)
    used |= {split_prompt_answer(t)[0] for t in meta["text"]}
    eval_ = _arithmetic(num_eval, _rng(seed, _EVAL_STREAM), 0.0, max_operand, operations, corruption, used)
    return DatasetDict({"train": train, "meta": meta, "eval": eval_})


def make_domain_splits(
    num_train_per_domain: int,
    num_meta: int,
    num_eval: int,
    seed: int,
    target_domain: str = "arithmetic",
    domains: Sequence[str] = DOMAINS,
    max_operand: int = 50,
    min_letters: int = 3,
    max_letters: int = 6,
) -> DatasetDict:
    """Splits for learning domain-mixture weights: "train" mixes all ``domains``; "meta" and "eval" hold only
    ``target_domain``, with prompts not seen in an earlier split.

    "train" equals ``make_domain_mixture(num_train_per_domain, seed, domains, ...)``; ``domain_id`` means the
    same in all three splits.
    """
    domains = _check_domains(domains)
    if target_domain not in domains:
        raise ValueError(f"target_domain must be one of domains={domains}, got {target_domain!r}.")
    for name, value in (("num_meta", num_meta), ("num_eval", num_eval)):
        _check_count(name, value)
    train = make_domain_mixture(num_train_per_domain, seed, domains, max_operand, min_letters, max_letters)
    used = {split_prompt_answer(t)[0] for t in train["text"]}
    splits = {"train": train}
    for split, count, stream in (("meta", num_meta, _META_STREAM), ("eval", num_eval, _EVAL_STREAM)):
        rng = _rng(seed, stream)
        prompts, answers = _domain_examples(target_domain, count, rng, used, max_operand, min_letters, max_letters)
        used |= set(prompts)
        dataset = _to_dataset(prompts, answers, [False] * count, [target_domain] * count)
        splits[split] = dataset.add_column("domain_id", [domains.index(target_domain)] * count)
    return DatasetDict(splits)


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
