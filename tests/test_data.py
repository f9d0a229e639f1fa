"""Offline toy datasets and the character tokenizer: determinism, exact corruption, correct answers, masking."""

from __future__ import annotations

import re

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_fg2u.data import (
    CHARACTERS,
    DOMAINS,
    make_arithmetic,
    make_char_tokenizer,
    make_domain_mixture,
    make_domain_splits,
    make_noisy_reweighting_splits,
    reference_answer,
    split_prompt_answer,
    tokenize_for_causal_lm,
)

ARITHMETIC = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)$")
LETTERS = re.compile(r"^(reverse|copy|sort): ([a-z]+)>([a-z]+)$")


def parse_arithmetic(text: str) -> tuple[int, int]:
    """(claimed answer, true answer) of ``"a op b = c"``, computed independently of the module."""
    match = ARITHMETIC.match(text)
    assert match, text
    a, op, b, claimed = int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4))
    return claimed, {"+": a + b, "-": a - b, "*": a * b}[op]


def is_correct(text: str, domain: str) -> bool:
    if domain == "arithmetic":
        claimed, truth = parse_arithmetic(text)
        return claimed == truth
    match = LETTERS.match(text)
    assert match and match.group(1) == domain, text
    letters, answer = match.group(2), match.group(3)
    return answer == {"reverse": letters[::-1], "copy": letters, "sort": "".join(sorted(letters))}[domain]


def prompts(dataset: Dataset) -> set[str]:
    return {split_prompt_answer(text)[0] for text in dataset["text"]}


@pytest.fixture(scope="module")
def tokenizer():
    return make_char_tokenizer()


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_vocabulary(tokenizer):
    assert len(tokenizer) == 57
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert tokenizer.padding_side == "right"
    assert tokenizer("A")["input_ids"] == [3]  # capitals are not in the vocabulary


def test_tokenizer_round_trip_and_save_load(tokenizer, tmp_path):
    texts = [CHARACTERS, "12+7=19", "reverse: abc>cba", "two  spaces,\nnew line (ok)? yes! it's 3*4<5;"]
    texts += make_domain_mixture(5, seed=0)["text"]
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == 57
    assert loaded.padding_side == "right"
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert 3 not in ids
        assert tokenizer.decode(ids) == text
        assert loaded(text, add_special_tokens=False)["input_ids"] == ids
        assert loaded.decode(ids) == text


# ------------------------------------------------------------------------------------------------ arithmetic


def test_arithmetic_is_deterministic_by_seed():
    first = make_arithmetic(200, seed=7, corrupted_fraction=0.3)
    assert first.to_dict() == make_arithmetic(200, seed=7, corrupted_fraction=0.3).to_dict()
    other = make_arithmetic(200, seed=8, corrupted_fraction=0.3)
    assert sum(a != b for a, b in zip(first["text"], other["text"], strict=True)) > 190
    assert first.column_names == ["text", "example_id", "is_corrupted", "domain"]
    assert first["example_id"] == list(range(200))
    assert set(first["domain"]) == {"arithmetic"}


@pytest.mark.parametrize(
    "num_examples, fraction, expected",
    [(100, 0.4, 40), (10, 0.25, 2), (7, 0.5, 4), (50, 0.0, 0), (30, 1.0, 30), (0, 0.4, 0)],
)
def test_exact_corrupted_count(num_examples, fraction, expected):
    dataset = make_arithmetic(num_examples, seed=1, corrupted_fraction=fraction)
    assert len(dataset) == num_examples
    assert sum(dataset["is_corrupted"]) == expected  # round() of Python: 2.5 -> 2, 3.5 -> 4


@pytest.mark.parametrize("corruption", ["random", "off_by_one"])
def test_clean_answers_are_right_and_corrupted_ones_wrong(corruption):
    dataset = make_arithmetic(500, seed=3, corrupted_fraction=0.4, max_operand=50, corruption=corruption)
    errors = []
    for text, corrupted in zip(dataset["text"], dataset["is_corrupted"], strict=True):
        claimed, truth = parse_arithmetic(text)
        assert (claimed != truth) == corrupted, text
        if corrupted:
            errors.append(abs(claimed - truth))
            assert 0 <= claimed <= 100, text  # inside the range of a + b with a, b <= 50
    assert len(errors) == 200
    if corruption == "off_by_one":
        assert set(errors) == {1}
    else:
        assert sum(error > 1 for error in errors) >= 180  # random answers are far off, not near misses


def test_operands_and_operations():
    dataset = make_arithmetic(400, seed=0, max_operand=9, operations=("+", "-", "*"))
    matches = [ARITHMETIC.match(text) for text in dataset["text"]]
    assert {m.group(2) for m in matches} == {"+", "-", "*"}
    assert all(0 <= int(m.group(1)) <= 9 and 0 <= int(m.group(3)) <= 9 for m in matches)
    assert all(int(m.group(1)) >= int(m.group(3)) for m in matches if m.group(2) == "-")  # answers stay >= 0
    assert all(is_correct(text, "arithmetic") for text in dataset["text"])


@pytest.mark.parametrize(
    "prompt, answer", [("12+7=", "19"), ("7-7=", "0"), ("9*8=", "72"), ("reverse: abc>", "cba"), ("sort: cab>", "abc")]
)
def test_reference_answer(prompt, answer):
    assert reference_answer(prompt) == answer
    assert split_prompt_answer(prompt + answer) == (prompt, answer)


# ------------------------------------------------------------------------------------------------ domains


def test_domain_mixture():
    dataset = make_domain_mixture(25, seed=2)
    assert dataset.to_dict() == make_domain_mixture(25, seed=2).to_dict()
    assert len(dataset) == 100
    assert dataset["example_id"] == list(range(100))
    assert {d: dataset["domain"].count(d) for d in DOMAINS} == dict.fromkeys(DOMAINS, 25)
    assert all(DOMAINS[i] == d for i, d in zip(dataset["domain_id"], dataset["domain"], strict=True))
    assert all(is_correct(t, d) for t, d in zip(dataset["text"], dataset["domain"], strict=True))
    assert dataset["domain"][:20] != sorted(dataset["domain"][:20])  # shuffled, not blocks of one domain
    assert sum(dataset["is_corrupted"]) == 0
    assert max(len(text) for text in dataset["text"]) <= 22  # "reverse: " + 6 + ">" + 6 fits max_length=32


def test_noisy_reweighting_splits():
    splits = make_noisy_reweighting_splits(300, 60, 80, seed=5, corrupted_fraction=0.4)
    assert {name: len(split) for name, split in splits.items()} == {"train": 300, "meta": 60, "eval": 80}
    assert splits["train"].to_dict() == make_arithmetic(300, seed=5, corrupted_fraction=0.4).to_dict()
    assert sum(splits["train"]["is_corrupted"]) == 120
    for name in ("meta", "eval"):
        assert sum(splits[name]["is_corrupted"]) == 0
        assert all(is_correct(text, "arithmetic") for text in splits[name]["text"])
    train, meta, eval_ = (prompts(splits[name]) for name in ("train", "meta", "eval"))
    assert not train & meta and not train & eval_ and not meta & eval_


def test_domain_splits_hold_only_the_target_domain_in_meta_and_eval():
    domains = ("reverse", "copy", "sort")
    splits = make_domain_splits(20, 15, 10, seed=4, target_domain="sort", domains=domains)
    assert {name: len(split) for name, split in splits.items()} == {"train": 60, "meta": 15, "eval": 10}
    assert {d: splits["train"]["domain"].count(d) for d in domains} == dict.fromkeys(domains, 20)
    for name in ("meta", "eval"):
        assert set(splits[name]["domain"]) == {"sort"}
        assert set(splits[name]["domain_id"]) == {2}
        assert all(is_correct(text, "sort") for text in splits[name]["text"])
    train, meta, eval_ = (prompts(splits[name]) for name in ("train", "meta", "eval"))
    assert not train & meta and not train & eval_ and not meta & eval_


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: make_arithmetic(10, 0, corrupted_fraction=1.5), "corrupted_fraction"),
        (lambda: make_arithmetic(10, 0, corruption="shuffle"), "corruption must be one of"),
        (lambda: make_arithmetic(10, 0, operations=("/",)), "operations"),
        (lambda: make_arithmetic(10, -1), "seed"),
        (lambda: make_domain_mixture(5, 0, domains=("reverse", "upper")), "domains must be"),
        (lambda: make_domain_splits(5, 5, 5, 0, target_domain="copy", domains=("sort",)), "target_domain"),
        (lambda: make_noisy_reweighting_splits(50, 50, 50, 0, max_operand=1), "Raise max_operand"),
    ],
)
def test_invalid_arguments_name_the_fix(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ------------------------------------------------------------------------------------------------ tokenization


def toy_dataset() -> Dataset:
    return Dataset.from_dict(
        {
            "text": ["12+7=19", "reverse: abc>cba"],
            "example_id": [0, 1],
            "is_corrupted": [False, True],
            "domain": ["arithmetic", "reverse"],
        }
    )


def test_tokenize_all_tokens_masks_exactly_the_padding(tokenizer):
    tokenized = tokenize_for_causal_lm(toy_dataset(), tokenizer, max_length=20, answer_only=False)
    assert tokenized.column_names == ["example_id", "is_corrupted", "domain", "input_ids", "attention_mask", "labels"]
    assert tokenized["example_id"] == [0, 1] and tokenized["is_corrupted"] == [False, True]
    for row, text in zip(tokenized, ["12+7=19", "reverse: abc>cba"], strict=True):
        length = len(text) + 2
        chars = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == [1] + chars + [2] + [0] * (20 - length)
        assert row["attention_mask"] == [1] * length + [0] * (20 - length)
        assert row["labels"] == row["input_ids"][:length] + [-100] * (20 - length)


def test_tokenize_answer_only_masks_the_prompt(tokenizer):
    tokenized = tokenize_for_causal_lm(toy_dataset(), tokenizer, max_length=20)
    first = tokenized[0]  # <bos> 1 2 + 7 = | 1 9 <eos> | 11 pads
    assert first["labels"] == [-100] * 6 + first["input_ids"][6:9] + [-100] * 11
    assert first["input_ids"][6:9] == tokenizer("19", add_special_tokens=False)["input_ids"] + [2]
    second = tokenized[1]  # <bos> "reverse: abc>" (13) | c b a <eos> | 2 pads
    assert second["labels"] == [-100] * 14 + second["input_ids"][14:18] + [-100] * 2
    assert tokenizer.decode(second["input_ids"][14:17]) == "cba"
    assert sum(label != -100 for row in tokenized["labels"] for label in row) == 7


def test_tokenize_splits_keeps_every_split(tokenizer):
    splits = tokenize_for_causal_lm(make_noisy_reweighting_splits(12, 4, 4, seed=0, corrupted_fraction=0.5), tokenizer)
    assert {name: len(split) for name, split in splits.items()} == {"train": 12, "meta": 4, "eval": 4}
    assert sum(splits["train"]["is_corrupted"]) == 6
    assert all(len(row) == 32 for split in splits.values() for row in split["labels"])


def test_tokenize_truncates_at_the_end(tokenizer):
    with pytest.warns(UserWarning, match=r"2 of 2 rows are longer than max_length=7 tokens \(longest: 18\)"):
        row = tokenize_for_causal_lm(toy_dataset(), tokenizer, max_length=7)[0]
    assert tokenizer.decode(row["input_ids"]) == "<bos>12+7=1"
    assert row["attention_mask"] == [1] * 7
    assert row["labels"] == [-100] * 6 + [row["input_ids"][6]]


def test_tokenize_missing_column_lists_the_columns(tokenizer):
    with pytest.raises(ValueError, match=r"'prompt' not found.*\['text', 'example_id', 'is_corrupted', 'domain'\]"):
        tokenize_for_causal_lm(toy_dataset(), tokenizer, text_column="prompt")


def test_tokenize_answer_only_needs_a_separator(tokenizer):
    dataset = Dataset.from_dict({"text": ["no separator here"]})
    with pytest.raises(ValueError, match="answer_only=False"):
        tokenize_for_causal_lm(dataset, tokenizer)
    assert len(tokenize_for_causal_lm(dataset, tokenizer, answer_only=False)[0]["input_ids"]) == 32


def test_tokenized_batch_runs_through_a_tiny_model_sized_by_the_tokenizer(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    dataset = tokenize_for_causal_lm(make_arithmetic(8, seed=0, corrupted_fraction=0.5), tokenizer)
    batch = dataset.with_format("torch")[:8]
    assert batch["input_ids"].shape == (8, 32)
    with torch.no_grad():
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    # An untrained model predicts close to uniform over the 57 tokens: loss ≈ log 57 ≈ 4.04.
    assert abs(loss.item() - torch.log(torch.tensor(57.0)).item()) < 0.3
