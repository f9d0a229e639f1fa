"""Raw datasets in TRL's formats, tokenized by BilevelTrainer itself; rows checked at construction."""

import pytest
import torch
from datasets import Dataset

from hf_fg2u import BilevelConfig, BilevelTrainer, ExampleWeights, WeightNet
from hf_fg2u.lm.formats import encode_example
from hf_fg2u.lm.toy_data import make_char_tokenizer
from tests.helpers.tiny import CHAT_TEMPLATE, config, lora, tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = make_char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def lm_rows(tokenizer, texts):
    """Pre-tokenized, numbered rows built here, independently of the code under test: every token trained, then
    <eos>."""
    rows = []
    for index, text in enumerate(texts):
        input_ids = ids(tokenizer, text) + [tokenizer.eos_token_id]
        rows.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": list(input_ids),
                     "example_id": index})  # fmt: skip
    return rows


def trained_text(tokenizer, row):
    """The tokens a row's loss predicts (never the first: logits[:-1] predict labels[1:])."""
    return tokenizer.decode([t for t in row["labels"][1:] if t != -100])


def facts(count=16):
    return [(f"f{i:02d}=", str(10 + i)) for i in range(count)]


def build(tmp_path, tokenizer, train, meta, outer=None, **overrides):
    values = dict(max_steps=2, per_device_train_batch_size=4, num_directions=2, directions="rademacher")
    values.update(overrides)
    return BilevelTrainer(
        tiny_llama(), config(tmp_path, **values), train_dataset=train, meta_dataset=meta,
        outer=outer or ExampleWeights(len(train)), peft_config=lora(), processing_class=tokenizer,
    )  # fmt: skip


# -- the three formats, one example each -------------------------------------------------------------------------
def test_text_rows_train_on_every_token_and_end_with_eos(tokenizer):
    row = encode_example({"text": "ab c"}, tokenizer, "language_modeling")  # <bos> from the tokenizer, as Llama's
    assert row["input_ids"] == [tokenizer.bos_token_id, *ids(tokenizer, "ab c"), tokenizer.eos_token_id]
    assert row["labels"] == row["input_ids"] and row["attention_mask"] == [1] * 6


def test_prompt_completion_rows_train_on_the_completion_only(tokenizer):
    row = encode_example({"prompt": "kqzt is ", "completion": "42"}, tokenizer, "prompt_completion")
    assert row["input_ids"] == [tokenizer.bos_token_id, *ids(tokenizer, "kqzt is 42"), tokenizer.eos_token_id]
    assert row["labels"] == [-100] * 9 + ids(tokenizer, "42") + [tokenizer.eos_token_id]


def test_messages_rows_train_on_the_assistant_turns_only(tokenizer):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "and"},
        {"role": "assistant", "content": "ok"},
    ]
    row = encode_example({"messages": messages}, tokenizer, "conversational")
    rendered = "user: hi\nassistant: yo\nuser: and\nassistant: ok\n"
    assert tokenizer.decode(row["input_ids"]) == rendered
    assert trained_text(tokenizer, row) == "yo\nok\n"
    assert sum(t != -100 for t in row["labels"]) == 6


def test_conversational_prompt_completion_trains_on_the_completion_turn(tokenizer):
    example = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    row = encode_example(example, tokenizer, "prompt_completion")
    assert tokenizer.decode(row["input_ids"]) == "user: hi\nassistant: yo\n"
    assert trained_text(tokenizer, row) == "yo\n"


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE like SmolLM2's (trained here, offline): "Answer: " is [Answer, :, Ġ], and the joined
    "Answer: Paris" is [Answer, :, ĠParis]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator(["Answer: Paris", "Answer: Rome"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")


def test_prompt_and_completion_are_tokenized_as_the_joined_text(bpe_tokenizer, tmp_path):
    """Issue 24 item 5: the pieces were tokenized apart ([Ġ] + [Paris]), a sequence the model never reads at
    inference; now the joined text's tokens, the straddling ĠParis trained as the answer, and a counted warning."""
    tokens = bpe_tokenizer.convert_ids_to_tokens
    row = encode_example({"prompt": "Answer: ", "completion": "Paris"}, bpe_tokenizer, "prompt_completion")
    assert tokens(row["input_ids"]) == ["Answer", ":", "ĠParis", "<eos>"]
    assert tokens([t for t in row["labels"] if t != -100]) == ["ĠParis", "<eos>"] and row["boundary_merged"]
    clean = encode_example({"prompt": "Answer:", "completion": " Paris"}, bpe_tokenizer, "prompt_completion")
    assert clean["input_ids"] == row["input_ids"] and clean["labels"] == row["labels"]
    assert not clean["boundary_merged"]
    from hf_fg2u.lm.formats import tokenize_dataset

    rows = Dataset.from_dict({"prompt": ["Answer: ", "Answer:"], "completion": ["Rome", " Rome"]})
    with pytest.warns(UserWarning, match=r"1 of 2 rows of the train dataset have a token that spans the end"):
        tokenized = tokenize_dataset(rows, bpe_tokenizer, 16, "train")
    assert tokenized["input_ids"][0] == tokenized["input_ids"][1] and "boundary_merged" not in tokenized.column_names


@pytest.mark.parametrize("kind", ["text", "prompt_completion", "messages"])
def test_trainer_tokenizes_each_raw_format_and_trains(tmp_path, tokenizer, kind):
    pairs = facts()
    if kind == "text":
        rows = {"text": [p + a for p, a in pairs]}
    elif kind == "prompt_completion":
        rows = {"prompt": [p for p, _ in pairs], "completion": [a for _, a in pairs]}
    else:
        rows = {"messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": a}] for p, a in pairs]}
    train = Dataset.from_dict({**rows, "source": ["mine"] * 16})
    trainer = build(tmp_path, tokenizer, train, train.select(range(4)))
    first = trainer.train_dataset[0]
    expected = {"text": "f00=10<eos>", "prompt_completion": "10<eos>", "messages": "10\n"}[kind]
    assert trained_text(tokenizer, first) == expected
    assert first["example_id"] == 0 and trainer.train_dataset["example_id"] == list(range(16))  # added
    trainer.train()
    meta_losses = [entry["meta_loss"] for entry in trainer.state.log_history if "meta_loss" in entry]
    assert len(meta_losses) == 1 and meta_losses[0] > 0.5  # logged at the last step although logging_steps=8
    exported = trainer.export_weights()
    assert exported.column_names == [*rows, "source", "scored", "weight"]  # no token ids, no added id
    assert torch.tensor(exported["weight"]).mean().item() == pytest.approx(1.0, rel=1e-5)


def test_pre_tokenized_data_still_works_and_is_not_tokenized_again(tmp_path, tokenizer):
    rows = lm_rows(tokenizer, [p + a for p, a in facts()])
    train = Dataset.from_list([{**row, "example_id": i} for i, row in enumerate(rows)])
    trainer = build(tmp_path, tokenizer, train, train.select(range(4)))
    assert trainer.train_dataset["input_ids"] == train["input_ids"]


def test_truncated_rows_are_counted_in_a_warning(tmp_path, tokenizer):
    train = Dataset.from_dict({"text": ["abcdefgh"] * 12 + ["ab"] * 4})
    with pytest.warns(UserWarning, match=r"12 of 16 rows of the train dataset are longer than max_length=5 tokens"):
        trainer = build(tmp_path, tokenizer, train, train.select([12, 13]), max_length=5)
    assert max(len(row) for row in trainer.train_dataset["input_ids"]) == 5


def test_keep_end_cuts_a_long_prompt_from_the_start_and_keeps_the_completion(tokenizer):
    """A long prompt with truncation_mode='keep_end': the completion and <eos> survive, the prompt's start goes."""
    from hf_fg2u.lm.formats import tokenize_dataset

    rows = Dataset.from_dict({"prompt": ["a long prompt here f00="], "completion": ["10"]})
    with pytest.warns(UserWarning, match=r"1 of 1 rows .* were cut at the start \(the completion kept\)"):
        row = tokenize_dataset(rows, tokenizer, 8, "train", truncation_mode="keep_end")[0]
    assert row["input_ids"] == ids(tokenizer, " f00=10") + [tokenizer.eos_token_id]  # the last 8 tokens
    assert trained_text(tokenizer, row) == "10" + tokenizer.eos_token
    with pytest.raises(ValueError, match=r"truncation_mode='keep_middle' is not known; use one of"):
        tokenize_dataset(rows, tokenizer, 8, "train", truncation_mode="keep_middle")


def test_drop_leaves_long_rows_out_and_the_export_returns_the_kept_rows(tmp_path, tokenizer):
    """truncation_mode='drop' at the trainer: the long rows are neither trained nor exported, each kept row keeps its
    own weight, and the warning counts the dropped ones."""
    pairs = facts()
    prompts = [("a long prompt here " if i % 4 == 0 else "") + p for i, (p, _) in enumerate(pairs)]
    train = Dataset.from_dict({"prompt": prompts, "completion": [a for _, a in pairs]})
    with pytest.warns(
        UserWarning, match=r"4 of 16 rows of the train dataset .* were dropped \(truncation_mode='drop'\)"
    ):
        trainer = build(tmp_path, tokenizer, train, train.select([1, 2]), max_length=12, truncation_mode="drop")
    assert len(trainer.train_dataset) == 12
    # ids stay the rows' positions before the drop: a weight (or group) built per row still names its row
    assert trainer.train_dataset["example_id"] == [i for i in range(16) if i % 4]
    exported = trainer.export_weights()
    assert exported["prompt"] == [p for i, p in enumerate(prompts) if i % 4]
    assert len(exported["weight"]) == 12


def test_default_max_length_suits_real_text():
    assert BilevelConfig(output_dir="x", report_to=[]).max_length == 512


def test_export_weights_of_a_raw_dataset_tokenizes_it_like_the_train_data(tmp_path, tokenizer):
    pairs = facts()
    train = Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [a for _, a in pairs]})
    trainer = build(tmp_path, tokenizer, train, train.select(range(4)), outer=WeightNet(hidden_size=4))
    exported = trainer.export_weights(train.select(range(8)))
    assert exported.column_names == ["prompt", "completion", "scored", "weight"] and len(exported) == 8
    own = trainer.export_weights()["weight"]
    # WeightNet weights depend on each row's loss: the same rows, tokenized the same way, get the same weights
    # up to the mean-1 normalisation over the rows given.
    scale = sum(own[:8]) / 8
    assert exported["weight"] == pytest.approx([w / scale for w in own[:8]], rel=1e-4)


# -- rows that cannot train are refused at construction ----------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*longer than max_length")
def test_rows_whose_labels_are_all_masked_are_refused_with_the_count(tmp_path, tokenizer):
    pairs = facts()
    long_prompt = {"prompt": ["a long prompt here " + p for p, _ in pairs], "completion": [a for _, a in pairs]}
    train = Dataset.from_dict(long_prompt)
    with pytest.raises(ValueError, match=r"16 of 16 rows of the train dataset have no token to learn from.*max_len"):
        build(tmp_path, tokenizer, train, train, max_length=12)
    with pytest.raises(ValueError, match=r"set truncation_mode='keep_end' \(cut the prompt's start instead\)"):
        build(tmp_path, tokenizer, train, train, max_length=12)
    good = Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [a for _, a in pairs]})
    meta = Dataset.from_dict({"prompt": ["f00=", "a prompt longer than max_length"], "completion": ["10", "11"]})
    with pytest.raises(ValueError, match=r"1 of 2 rows of the meta dataset have no token to learn from.*\[1\]"):
        build(tmp_path, tokenizer, good, meta, max_length=12)


def test_pre_tokenized_meta_rows_with_labels_all_minus_100_are_refused(tmp_path, tokenizer):
    rows = lm_rows(tokenizer, [p + a for p, a in facts()])
    train = Dataset.from_list(rows)
    masked = Dataset.from_list([{**row, "labels": [-100] * len(row["labels"])} for row in rows[:4]])
    with pytest.raises(ValueError, match=r"4 of 4 rows of the meta dataset have no token to learn from"):
        build(tmp_path, tokenizer, train, masked)
    with pytest.raises(ValueError, match=r"4 of 16 rows of the train dataset have no token to learn from"):
        build(tmp_path, tokenizer, Dataset.from_list(list(masked) + rows[4:]), train)


def test_empty_rows_are_refused(tmp_path, tokenizer):
    train = Dataset.from_list(lm_rows(tokenizer, [p + a for p, a in facts()]))
    rows = lm_rows(tokenizer, ["ab"] * 3)
    empty_meta = Dataset.from_list([{**row, "attention_mask": [0] * len(row["input_ids"])} for row in rows])
    with pytest.raises(ValueError, match=r"3 of 3 rows of the meta dataset are empty.*rows \[0, 1, 2\]"):
        build(tmp_path, tokenizer, train, empty_meta)
    blank = Dataset.from_list([{"input_ids": [], "attention_mask": [], "labels": [], "example_id": 3}] + list(rows))
    with pytest.raises(ValueError, match=r"1 of 4 rows of the meta dataset are empty"):
        build(tmp_path, tokenizer, train, blank)


@pytest.mark.parametrize("bad_id", [-1, 57, 1000])
def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, tokenizer, bad_id):
    rows = lm_rows(tokenizer, [p + a for p, a in facts()])
    rows[5] = {**rows[5], "input_ids": [bad_id] + rows[5]["input_ids"][1:]}
    train = Dataset.from_list(rows)
    with pytest.raises(
        ValueError, match=r"1 of 16 rows of the train dataset hold token ids outside .*\[0, 57\).*\[5\]"
    ):
        build(tmp_path, tokenizer, train, train.select([0, 1]))


def test_duplicate_example_ids_are_refused(tmp_path, tokenizer):
    rows = lm_rows(tokenizer, [p + a for p, a in facts()])
    train = Dataset.from_list([{**row, "example_id": i % 8} for i, row in enumerate(rows)])
    with pytest.raises(ValueError, match=r"repeats ids \[0, 1, 2, 3, 4\] and 3 more \(16 rows share an id\)"):
        build(tmp_path, tokenizer, train, train.select([0]))


def test_fewer_rows_than_one_unroll_are_refused(tmp_path, tokenizer):
    train = Dataset.from_list(lm_rows(tokenizer, [p + a for p, a in facts()]))  # 16 rows; 8 steps x 4 = 32 per unroll
    with pytest.raises(ValueError, match=r"16 rows, fewer than one unroll reads: unroll_steps=8 × .*= 32"):
        build(tmp_path, tokenizer, train, train.select([0]), unroll_steps=8)


def test_an_incomplete_last_unroll_is_dropped_with_a_warning(tmp_path, tokenizer):
    train = Dataset.from_list(lm_rows(tokenizer, [p + a for p, a in facts(20)]))  # 8 rows per unroll: 4 left over
    with pytest.warns(UserWarning, match=r"drops its last incomplete unroll \(4 rows"):
        trainer = build(tmp_path, tokenizer, train, train.select([0]), max_steps=-1, num_train_epochs=1)
    loader = trainer.get_train_dataloader()
    assert [len(batch["input_ids"]) for batch in loader] == [8, 8]
    assert trainer.args.dataloader_drop_last is False  # evaluation keeps its last, short batch
    assert len(list(trainer.get_eval_dataloader(trainer.meta_dataset))) == 1  # 1 row, eval batch size 8


def test_raw_data_without_a_known_column_or_tokenizer_is_a_clear_error(tmp_path, tokenizer):
    train = Dataset.from_dict({"body": ["ab"] * 16})
    with pytest.raises(ValueError, match=r"train dataset has no 'input_ids'.*\['body'\].*dataset_text_field"):
        build(tmp_path, tokenizer, train, train)
    text = Dataset.from_dict({"text": ["ab"] * 16})
    with pytest.raises(ValueError, match="raw language_modeling data, and no tokenizer was given"):
        build(tmp_path, None, text, text)
