"""Offline toy datasets and the character tokenizer: determinism, exact corruption, correct answers, masking."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_fg2u.lm.toy_data import (
    CHARACTERS,
    make_char_tokenizer,
    make_fact_splits,
    split_prompt_answer,
    tokenize_for_causal_lm,
)


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
    texts += make_fact_splits(3, 2, seed=0)["train"]["text"]
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


# ------------------------------------------------------------------------------------------------ domains


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
    splits = tokenize_for_causal_lm(make_fact_splits(3, 4, seed=0, corrupted_fraction=0.5), tokenizer)
    assert {name: len(split) for name, split in splits.items()} == {"train": 12, "meta": 3, "eval": 3}
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
    dataset = tokenize_for_causal_lm(make_fact_splits(2, 4, seed=0, corrupted_fraction=0.5)["train"], tokenizer)
    batch = dataset.with_format("torch")[:8]
    assert batch["input_ids"].shape == (8, 32)
    with torch.no_grad():
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    # An untrained model predicts close to uniform over the 57 tokens: loss ≈ log 57 ≈ 4.04.
    assert abs(loss.item() - torch.log(torch.tensor(57.0)).item()) < 0.3
