"""`hf-fg2u finetune`: weighted rows in, a fine-tuned model, its scores and card out; forced-choice accuracy checked
against log-likelihoods computed by hand."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from hf_fg2u.cli.finetune import balance_weights, effective_rows
from hf_fg2u.cli.main import main
from hf_fg2u.lm.evaluation import answer_choices, choice_accuracy, completion_log_likelihoods
from hf_fg2u.lm.toy_data import make_char_tokenizer

WORDS = ["good", "bad", "nice", "sad", "glad", "mad", "kind", "mean", "fine", "poor", "fair", "foul"]


def rows(words, weight=None):
    out = []
    for index, word in enumerate(words):
        row = {"prompt": f"is {word}:", "completion": " yes" if index % 2 == 0 else " no"}
        out.append(row if weight is None else {**row, "weight": weight(index)})
    return out


def write(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return str(path)


def finetune(tiny_model, source, out, *extra):
    main(["finetune", source, "--model_name_or_path", tiny_model, "--output_dir", str(out), "--num_train_epochs",
          "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--lora_target_modules", "q_proj",
          "v_proj", "--disable_tqdm", "true", "--seed", "3", *extra])  # fmt: skip
    return json.loads((out / "finetune_results.json").read_text())


def adapter(out):
    return load_file(str(out / "adapter_model.safetensors"))


def test_weights_scale_rows_and_zero_weight_rows_are_left_out(tiny_model, tmp_path):
    """Weight 0 is the same as the row being absent, and scaling every weight changes nothing (Σw normalises)."""
    weighted = write(tmp_path / "w.jsonl", rows(WORDS, lambda i: 0.0 if i % 3 == 0 else 1.0))
    kept = write(tmp_path / "k.jsonl", rows([w for i, w in enumerate(WORDS) if i % 3], lambda i: 3.0))
    first = finetune(tiny_model, weighted, tmp_path / "a")
    second = finetune(tiny_model, kept, tmp_path / "b")
    assert first["rows"] == second["rows"] == 8
    assert first["effective_rows"] == pytest.approx(8.0)
    # the kept file's rows alternate yes/no differently, so compare against the same rows in the same order
    same = write(tmp_path / "s.jsonl", [r for i, r in enumerate(rows(WORDS, lambda i: 5.0)) if i % 3])
    third = finetune(tiny_model, same, tmp_path / "c")
    for name, tensor in adapter(tmp_path / "a").items():
        torch.testing.assert_close(tensor, adapter(tmp_path / "c")[name], rtol=1e-5, atol=1e-7)
    assert third["train_loss"] == pytest.approx(first["train_loss"], rel=1e-5)
    uniform = finetune(tiny_model, weighted, tmp_path / "u", "--uniform", "true")
    assert uniform["rows"] == len(WORDS) and uniform["effective_rows"] == pytest.approx(len(WORDS))


def test_balance_column_keeps_each_answers_share_and_the_ranking_within_it(tiny_model, tmp_path):
    """Weights that favour the " no" rows 3:1 keep, balanced over completion, the data's 50/50 answer mix and each
    answer's own ratios; the fine-tune on them is the fine-tune on those weights written by hand."""
    weights = [3.0 * (1 + i % 4) if i % 2 else 1.0 + i % 3 for i in range(len(WORDS))]
    assert balance_weights([2.0, 6.0, 1.0, 1.0], ["a", "b", "b", "b"]) == pytest.approx([2.5, 5.625, 0.9375, 0.9375])
    balanced = balance_weights(weights, [r["completion"] for r in rows(WORDS)])
    yes, no = sum(balanced[0::2]), sum(balanced[1::2])
    assert yes == pytest.approx(no) and yes + no == pytest.approx(sum(weights))
    assert balanced[1] / balanced[3] == pytest.approx(weights[1] / weights[3])  # the ranking within an answer
    source = write(tmp_path / "w.jsonl", rows(WORDS, lambda i: weights[i]))
    by_hand = write(tmp_path / "b.jsonl", rows(WORDS, lambda i: balanced[i]))
    first = finetune(tiny_model, source, tmp_path / "a", "--balance_column", "completion")
    second = finetune(tiny_model, by_hand, tmp_path / "b")
    assert first["balance_column"] == "completion" and first["train_loss"] == pytest.approx(second["train_loss"])
    with pytest.raises(SystemExit, match="'answer' is not a column"):
        finetune(tiny_model, source, tmp_path / "c", "--balance_column", "answer")
    with pytest.raises(ValueError, match=r"Every row of \[' no'\] has weight 0"):
        balance_weights([1.0, 0.0], [" yes", " no"])


def test_eval_file_keeps_the_best_epoch_and_test_file_is_scored(tiny_model, tmp_path):
    source = write(tmp_path / "train.jsonl", rows(WORDS, lambda i: 1.0))
    held = write(tmp_path / "held.jsonl", rows(["warm", "cold", "calm", "wild"]))
    results = finetune(tiny_model, source, tmp_path / "out", "--eval_file", held, "--test_file", held)
    assert results["best_epoch"] in (1.0, 2.0)
    assert 0.0 <= results["test_accuracy"] <= 1.0 and results["test_loss"] > 0
    assert results["eval_loss"] == pytest.approx(results["test_loss"], rel=1e-6)  # the same rows, the kept model
    card = (tmp_path / "out" / "README.md").read_text()
    assert "hf-fg2u finetune" in card and "test_accuracy" in card
    assert "base_model:" not in card  # a local folder is not Hub metadata


@pytest.mark.parametrize(
    ("content", "message"),
    [([{"prompt": "is a:", "completion": " no", "weight": -1.0}], "non-negative"),
     ([{"prompt": "is a:", "completion": " no"}], "no 'weight' column"),
     # round 3 F14 and F13: weights that float32 makes 0 (trained nothing, said done) or inf (NaN in the results)
     ([{"prompt": "is a:", "completion": " no", "weight": 1e-320}] * 2, r"up to [0-9.e-]+, outside the float32.*as 0"),
     ([{"prompt": "is a:", "completion": " no", "weight": w} for w in (1.0, 1e300)], r"up to 1e\+300, .* inf"),
     ([{"prompt": "is a:", "completion": " no", "weight": "high"}], r"must hold numbers; got str values such as"),
    ],
    ids=["negative", "missing", "below_float32", "above_float32", "strings"],  # round 3 F10: "strings"
)  # fmt: skip
def test_bad_weights_are_refused_before_training(tiny_model, tmp_path, content, message):
    source = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(SystemExit, match=message):
        finetune(tiny_model, source, tmp_path / "out")
    assert not (tmp_path / "out" / "finetune_results.json").exists()


def test_a_balance_column_of_mostly_distinct_values_is_refused_as_train_refuses_it(tiny_model, tmp_path):
    """Issue 36 review: --balance_column prompt (every row its own value) silently made every weight equal."""
    source = write(tmp_path / "w.jsonl", rows(WORDS, lambda i: 0.5 + i))
    with pytest.raises(
        SystemExit, match=r"--balance_column 'prompt' has 12 values over 12 rows, some held by a single"
    ):
        finetune(tiny_model, source, tmp_path / "out", "--balance_column", "prompt")
    assert not (tmp_path / "out").exists()


def test_the_hub_token_is_in_no_file_written_or_pushed(tiny_model, tmp_path, hub):
    """Issue 36 case 4: training_args.bin of the model, of each epoch's checkpoint and of the pushed repo held
    --hub_token in clear (train redacted it, finetune did not)."""
    source = write(tmp_path / "train.jsonl", rows(WORDS, lambda i: 1.0))
    held = write(tmp_path / "held.jsonl", rows(["warm", "cold", "calm", "wild"]))
    out = tmp_path / "out"
    finetune(tiny_model, source, out, "--eval_file", held, "--push_to_hub", "true", "--hub_model_id", "tester/ft",
             "--hub_token", "hf_fake")  # fmt: skip
    written = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert "training_args.bin" in {path.name for path in written} and "training_args.bin" in hub.repos["tester/ft"]
    assert [path for path, data in written.items() if b"hf_fake" in data] == []
    assert [path for path, data in hub.repos["tester/ft"].items() if b"hf_fake" in data] == []
    saved = torch.load(out / "training_args.bin", weights_only=False)
    assert type(saved).__name__ == "TrainingArguments" and saved.hub_token is None and saved.seed == 3


def test_output_dir_of_a_run_another_folder_or_a_live_run_is_refused_and_left_alone(tiny_model, tmp_path):
    """Issue 36 case 5: finetune replaced a bilevel run's adapter and card (its state stayed: a run folder with a
    foreign adapter), the files of any folder, and wrote beside a live run holding the folder's lock."""
    import os

    source = write(tmp_path / "train.jsonl", rows(WORDS, lambda i: 1.0))
    run, other, busy = tmp_path / "run", tmp_path / "other", tmp_path / "busy"
    for folder, name in ((run, "bilevel_state.json"), (other, "notes.txt"), (busy, "_hf_fg2u.lock")):
        folder.mkdir()
        (folder / name).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    refusals = {
        run: r"holds a bilevel run \(bilevel_state.json\).*Choose another output_dir",
        other: r"is not empty and holds no earlier fine-tune \(no finetune_results.json\).*--overwrite_output_dir true",
        busy: r"Another run \(process \d+ on .*\) is writing to",
    }
    for folder, refused in refusals.items():
        with pytest.raises(SystemExit, match=refused):
            finetune(tiny_model, source, folder)
    with pytest.raises(SystemExit, match="holds a bilevel run"):  # asking to overwrite does not make it a fine-tune's
        finetune(tiny_model, source, run, "--overwrite_output_dir", "true")
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before
    first = finetune(tiny_model, source, other, "--overwrite_output_dir", "true")
    with pytest.warns(UserWarning, match="holds an earlier fine-tune: it is replaced"):
        again = finetune(tiny_model, source, other, "--learning_rate", "1e-3")
    assert again["train_loss"] != first["train_loss"] and not (other / "_hf_fg2u.lock").exists()


def test_forced_choice_accuracy_matches_log_likelihoods_by_hand(tiny_model):
    from datasets import Dataset

    tokenizer = make_char_tokenizer()
    model = LlamaForCausalLM.from_pretrained(tiny_model)
    data = Dataset.from_list(rows(WORDS[:6]))
    assert answer_choices(data) == [" no", " yes"]

    def log_likelihood(prompt, answer):  # the answer's characters after <bos> and the prompt's, summed
        ids = tokenizer(prompt + answer)["input_ids"]
        start = len(tokenizer(prompt)["input_ids"])
        logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        return sum(logits[i - 1, ids[i]].item() for i in range(start, len(ids)))

    by_hand = [log_likelihood(prompt, " yes") for prompt in data["prompt"]]
    asked = []
    model.register_forward_pre_hook(lambda _, __, kwargs: asked.append(kwargs.get("logits_to_keep")), with_kwargs=True)
    scores = completion_log_likelihoods(model, tokenizer, data["prompt"], " yes", batch_size=4)
    assert scores.tolist() == pytest.approx(by_hand, abs=1e-5)

    def predicting(prompt):  # the positions whose logits predict an answer character
        return set(range(len(tokenizer(prompt)["input_ids"]) - 1, len(tokenizer(prompt + " yes")["input_ids"]) - 1))

    batches = [data["prompt"][start : start + 4] for start in range(0, len(data), 4)]
    assert [kept.tolist() for kept in asked] == [sorted(set().union(*map(predicting, b))) for b in batches]
    right = [max([" no", " yes"], key=lambda a: log_likelihood(row["prompt"], a)) == row["completion"] for row in data]
    assert choice_accuracy(model, tokenizer, data, batch_size=4) == pytest.approx(sum(right) / len(right), abs=1e-12)
    with pytest.raises(ValueError, match="2 to 20 distinct"):
        choice_accuracy(model, tokenizer, Dataset.from_list([{"prompt": "a", "completion": " b"}]))


def test_effective_rows():
    assert effective_rows(torch.ones(5, dtype=torch.float64)) == pytest.approx(5.0)
    assert effective_rows(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)) == pytest.approx(2.0)


def test_train_final_adapter_takes_raw_rows_like_tokenized_ones(tiny_model, tmp_path):
    """Raw prompt/completion rows are tokenized as the bilevel run tokenizes them: the same adapter as from rows
    tokenized by hand with the product's tokenize_dataset."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainingArguments

    from hf_fg2u import train_final_adapter
    from hf_fg2u.lm.formats import tokenize_dataset

    tokenizer = make_char_tokenizer()
    raw = Dataset.from_list(rows(WORDS, lambda i: 1.0 + i % 2))
    adapters = []
    for name, data in (("raw", raw), ("tokenized", tokenize_dataset(raw, tokenizer, 512, "train"))):
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to=[], save_strategy="no", disable_tqdm=True)  # fmt: skip
        trainer = train_final_adapter(LlamaForCausalLM.from_pretrained(tiny_model), data,
                                      LoraConfig(target_modules=["q_proj", "v_proj"]), args, tokenizer)  # fmt: skip
        adapters.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(tensor, adapters[1][name], rtol=0, atol=0)


def test_finetune_settings_that_train_nothing_or_a_missing_model_are_refused_before_loading(tmp_path):
    """Round 3 F20, F03: --num_train_epochs 0 fine-tuned 0 steps and said done; a missing model folder was a raw
    OSError."""
    from hf_fg2u.cli.finetune import finetune as run_finetune
    from hf_fg2u.cli.finetune import parse_finetune_args

    source = tmp_path / "rows.jsonl"
    write(source, rows(WORDS[:4], weight=lambda index: 1.0))
    with pytest.raises(ValueError, match=r"num_train_epochs=0.0 with max_steps=-1 trains no step"):
        parse_finetune_args([str(source), "--num_train_epochs", "0"])
    out = tmp_path / "out"
    missing = str(tmp_path / "nope")
    parsed = parse_finetune_args([str(source), "--model_name_or_path", missing, "--output_dir", str(out)])
    with pytest.raises(FileNotFoundError, match=r"--model_name_or_path '.*nope': no such folder"):
        run_finetune(*parsed)
    assert not out.exists()


def test_rows_whose_answer_max_length_cut_off_are_refused_as_train_refuses_them(tiny_model, tmp_path):
    """A row cut before its answer would add loss 0 while its weight still counts in the normaliser."""
    source = write(tmp_path / "w.jsonl", rows(WORDS, lambda i: 1.0))
    with pytest.raises(SystemExit, match=r"have no token to learn from.*max_length"):
        finetune(tiny_model, source, tmp_path / "out", "--max_length", "6")
    assert not (tmp_path / "out" / "finetune_results.json").exists()
