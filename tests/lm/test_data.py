"""The built-in offline data and the character tokenizer: determinism, exact corruption, correct answers, and the
rows tokenized by the product's own path (the loss on the answer only)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_fg2u.lm.formats import tokenize_dataset
from hf_fg2u.lm.toy_data import CHARACTERS, make_char_tokenizer, make_fact_domain_splits, make_fact_splits


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
    assert tokenizer("A", add_special_tokens=False)["input_ids"] == [3]  # capitals are not in the vocabulary
    assert tokenizer("ab")["input_ids"] == [1, *tokenizer("ab", add_special_tokens=False)["input_ids"]]  # <bos>


def test_tokenizer_round_trip_and_save_load(tokenizer, tmp_path):
    texts = [CHARACTERS, "12+7=19", "reverse: abc>cba", "two  spaces,\nnew line (ok)? yes! it's 3*4<5;"]
    rows = make_fact_splits(3, 2, seed=0)["train"]
    texts += [p + c for p, c in zip(rows["prompt"], rows["completion"], strict=True)]
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


# ------------------------------------------------------------------------------------------------ facts


def test_fact_splits_are_seeded_and_corrupt_exactly_the_asked_fraction():
    splits = make_fact_splits(3, 4, seed=0, corrupted_fraction=0.5)
    assert {name: len(split) for name, split in splits.items()} == {"train": 12, "meta": 3, "eval": 3}
    train, truth = splits["train"], dict(zip(splits["meta"]["prompt"], splits["meta"]["completion"], strict=True))
    assert train.column_names == ["prompt", "completion", "example_id", "is_corrupted", "domain"]
    assert sum(train["is_corrupted"]) == 6 and train["example_id"] == list(range(12))
    for row in train:
        assert (row["completion"] != truth[row["prompt"]]) == row["is_corrupted"]
    assert make_fact_splits(3, 4, seed=0, corrupted_fraction=0.5)["train"].to_list() == train.to_list()
    assert make_fact_splits(3, 4, seed=1, corrupted_fraction=0.5)["train"]["prompt"] != train["prompt"]


def test_fact_domains_put_the_target_facts_in_meta():
    splits = make_fact_domain_splits(3, 4, 2, seed=0, target_domain="facts_b")
    assert sorted(set(splits["train"]["domain"])) == ["facts_a", "facts_b", "facts_c"]
    assert set(splits["meta"]["domain"]) == {"facts_b"}
    target = {r["prompt"] for r in splits["train"] if r["domain"] == "facts_b"}
    assert set(splits["meta"]["prompt"]) == target and splits["train"]["example_id"] == list(range(24))


def test_fact_rows_through_the_product_path_are_labelled_on_the_answer_only(tokenizer):
    """<bos> kqzt= | 42 <eos>: the prompt and <bos> carry no loss; the answer and <eos> do (as the toy path before
    the move to formats did, so the demo's numbers hold)."""
    splits = make_fact_splits(2, 2, seed=0, corrupted_fraction=0.5)
    row, raw = tokenize_dataset(splits["train"], tokenizer, 32, "train")[0], splits["train"][0]
    prompt = tokenizer(raw["prompt"], add_special_tokens=False)["input_ids"]
    answer = tokenizer(raw["completion"], add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == [1, *prompt, *answer, 2] and row["attention_mask"] == [1] * (len(prompt) + 4)
    assert row["labels"] == [-100] * (1 + len(prompt)) + answer + [2]


def test_tokenized_batch_runs_through_a_tiny_model_sized_by_the_tokenizer(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    rows = tokenize_dataset(make_fact_splits(2, 4, seed=0, corrupted_fraction=0.5)["train"], tokenizer, 32, "train")
    batch = rows.with_format("torch")[:8]
    assert batch["input_ids"].shape == (8, 9)  # <bos> + 4 letters + '=' + 2 digits + <eos>: all the same length
    with torch.no_grad():
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    # An untrained model predicts close to uniform over the 57 tokens: loss ≈ log 57 ≈ 4.04.
    assert abs(loss.item() - torch.log(torch.tensor(57.0)).item()) < 0.3
