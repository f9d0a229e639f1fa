"""Careless or hostile inputs (issue 25, second round): each is a clear error at the start naming what is wrong
and the fix, or a counted warning, not a raw exception from deep inside a library or a silent wrong run."""

import json

import pytest
import torch
from datasets import Dataset
from safetensors.torch import save_file

from hf_fg2u import BilevelConfig, ExampleWeights, OuterModule
from hf_fg2u.cli.arguments import ModelArguments
from hf_fg2u.cli.data_loading import load_files
from hf_fg2u.cli.models import lora_config
from hf_fg2u.cli.parsing import load_yaml_config
from hf_fg2u.lm.formats import tokenize_dataset
from hf_fg2u.lm.toy_data import make_char_tokenizer
from tests.helpers.tiny import fact_data, trainer_for

TOKENIZER = make_char_tokenizer()


def test_a_yaml_key_given_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: noisy_reweighting\nmax_steps: 3\nlearning_rate: 0.1\nmax_steps: 300\n")
    with pytest.raises(ValueError, match=r"key 'max_steps' appears twice \(lines 2 and 4\); keep one"):
        load_yaml_config(path)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ({"prompt": ["a=", "b="], "completion": ["1", None]}, r"Row 1 .* null in column 'completion'.*a string"),
        ({"text": [1, 2]}, r"Row 0 .* int 1 in column 'text', which must be a string"),
        ({"prompt": [[{"role": "user", "content": "x"}]], "completion": ["y"]}, r"both text or both messages"),
        ({"messages": ["hello"]}, r"Row 0 .* str 'hello' in column 'messages', which must be a list of messages"),
    ],
    ids=["null_completion", "int_text", "chat_prompt_string_completion", "messages_as_string"],
)
def test_raw_values_of_the_wrong_type_name_the_row_and_column(rows, message):
    with pytest.raises(ValueError, match=message):
        tokenize_dataset(Dataset.from_dict(rows), TOKENIZER, 32, "train")


def test_a_broken_jsonl_line_and_an_empty_file_name_the_file_and_line(tmp_path):
    broken = tmp_path / "train.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n{"prompt": "d"}\n')
    with pytest.raises(ValueError, match=r"train.jsonl line 2 is not a JSON object"):
        load_files({"train": [str(broken)]})
    empty = tmp_path / "meta.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"meta.jsonl is empty"):
        load_files({"meta": [str(empty)]})


def test_batch_size_zero_and_lora_rank_zero_are_refused_at_the_start():
    with pytest.raises(ValueError, match=r"per_device_train_batch_size=0 must be >= 1"):
        BilevelConfig(output_dir="unused", per_device_train_batch_size=0)
    with pytest.raises(ValueError, match=r"lora_r=0 must be >= 1"):
        lora_config(ModelArguments(lora_r=0))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_examples": 10**12}, r"declares tensors \{'logits': \(1000000000000,\), 'scored'.* but .* holds"),
        ({"num_examples": 7}, r"declares tensors \{'logits': \(7,\), 'scored': \(7,\)\}"),
        ({"num_examples": -3}, r"num_examples >= 1"),
    ],
    ids=["declared_size_far_too_large", "declared_size_other", "negative_size"],
)
def test_outer_files_that_do_not_match_are_refused_before_allocating(tmp_path, change, message):
    ExampleWeights(5).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "outer_config.json").read_text())
    (tmp_path / "outer_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        OuterModule.from_pretrained(tmp_path)


def test_outer_files_with_nan_values_are_refused(tmp_path):
    ExampleWeights(5).save_pretrained(tmp_path)
    save_file({"logits": torch.tensor([0.0, float("nan"), 0.0, 0.0, 0.0])}, str(tmp_path / "outer_model.safetensors"))
    with pytest.raises(ValueError, match=r"\['logits'\] hold NaN or inf"):
        OuterModule.from_pretrained(tmp_path)


def test_weights_that_collapse_onto_a_few_rows_are_warned_about(tmp_path):
    """Softmax weights and a large outer step: nearly all weight lands on a few rows; the run says so at the end."""
    _, data = fact_data(num_facts=8, copies=4)
    trainer = trainer_for(tmp_path, ExampleWeights(32), data, max_steps=4, num_directions=2, method="rgu",
                          optim="sgd", learning_rate=200.0, normalize_hypergradient=True)  # fmt: skip
    with pytest.warns(UserWarning, match=r"The learned weights collapsed: their normalized entropy is -?0\.[0-4]"):
        trainer.train()


def token_rows(count=16, **columns):
    """Pre-tokenized rows of the character vocabulary, with per-row overrides: column -> {row: value}."""
    rows = []
    for index in range(count):
        ids = [5 + index % 20, 6, 7, 8]
        rows.append({"input_ids": ids, "attention_mask": [1] * 4, "labels": list(ids), "example_id": index})
    for column, changes in columns.items():
        for row, value in changes.items():
            rows[row][column] = value
    return Dataset.from_list(rows)


def build_on(tmp_path, train, **overrides):
    data = {"train": train, "meta": token_rows(4), "eval": None}
    return trainer_for(tmp_path, ExampleWeights(len(train)), data, max_steps=1, per_device_train_batch_size=4,
                       meta_batch_size=4, **overrides)  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"input_ids": {3: [5.0, 6.0, 7.0, 8.0]}}, r"16 of 16 rows .* not integer token ids"),  # the column: float
        ({"labels": {2: [5, 6]}}, r"1 of 16 rows .* of different lengths: rows \[2\]"),
        ({"attention_mask": {5: [1, 1]}}, r"1 of 16 rows .* of different lengths: rows \[5\]"),
        ({"input_ids": {1: [5 + i % 40 for i in range(75)]}, "attention_mask": {1: [1] * 75},
          "labels": {1: [5 + i % 40 for i in range(75)]}},
         r"1 of 16 rows .* longer than the model's 64 positions .*longest: 75 tokens.*max_length <= 64"),
    ],
    ids=["float_input_ids", "short_labels", "short_attention_mask", "longer_than_positions"],
)  # fmt: skip
def test_token_rows_that_would_fail_inside_a_step_are_refused_at_the_start(tmp_path, changes, message):
    """Before: a float id raised deep in the embedding, short labels or masks were padded silently, a row past
    the position limit was an IndexError (learned positions) or silently out of range (rotary)."""
    with pytest.raises(ValueError, match=message):
        build_on(tmp_path, token_rows(**changes))


@pytest.mark.parametrize("bad_id", [2.5, "7"], ids=["float", "string"])
def test_example_ids_that_are_not_integers_are_refused(tmp_path, bad_id):
    ids = [bad_id if index == 0 else float(index) if isinstance(bad_id, float) else str(index) for index in range(16)]
    with pytest.raises(ValueError, match=r"Column 'example_id' of the train dataset holds .* not integer row ids"):
        build_on(tmp_path, token_rows(example_id=dict(enumerate(ids))))


def test_meta_rows_that_are_train_rows_and_eval_rows_that_are_meta_rows_are_warned_about(tmp_path):
    """Compared by content, not by split name: a copy of the train file given as meta is caught."""
    train = token_rows()
    with pytest.warns(UserWarning, match=r"Every one of the 4 rows of the meta dataset is also a row of the train"):
        trainer_for(tmp_path, ExampleWeights(16), {"train": train, "meta": train.select(range(4)), "eval": None},
                    max_steps=1, per_device_train_batch_size=4, meta_batch_size=4)  # fmt: skip
    meta = token_rows(4, input_ids={i: [30 + i, 31, 32, 33] for i in range(4)},
                      labels={i: [30 + i, 31, 32, 33] for i in range(4)})  # fmt: skip
    with pytest.warns(UserWarning, match=r"Every one of the 4 rows of the eval dataset is also a row of the meta"):
        trainer_for(tmp_path, ExampleWeights(16), {"train": train, "meta": meta, "eval": meta},
                    max_steps=1, per_device_train_batch_size=4, meta_batch_size=4)  # fmt: skip


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("https://example.com/train.jsonl", r"is a URL; files are read from this machine. Download it first"),
        ("FOLDER", r"is a folder. Pass the folder as --dataset_name"),
        ("missing.jsonl", r"train=.*missing.jsonl: no such file"),
    ],
    ids=["url", "folder", "missing"],
)
def test_data_files_that_are_urls_folders_or_missing_say_what_to_pass(tmp_path, path, message):
    """Before: a raw aiohttp ImportError (URL), 'cannot tell how to read' (folder), the loader's own error."""
    path = str(tmp_path) if path == "FOLDER" else path if path.startswith("http") else str(tmp_path / path)
    with pytest.raises(ValueError, match=message):
        load_files({"train": [path]})


def test_rows_with_both_text_and_prompt_completion_say_which_is_used():
    rows = Dataset.from_dict({"text": ["a=1"], "prompt": ["a="], "completion": ["1"]})
    with pytest.warns(UserWarning, match=r"both prompt/completion and 'text' columns: the prompt_completion format"):
        tokenize_dataset(rows, TOKENIZER, 32, "train")


def test_more_directions_than_outer_coordinates_are_refused(tmp_path):
    """Before: num_directions=10**9 was accepted and ran with no bound and no progress."""
    _, data = fact_data(num_facts=4, copies=4)
    with pytest.raises(ValueError, match=r"num_directions=1000000000 exceeds the 16 coordinates .* at most 16"):
        trainer_for(tmp_path, ExampleWeights(len(data["train"])), data, max_steps=1, method="fg2u",
                    num_directions=10**9)  # fmt: skip


def test_a_users_config_starts_from_the_recipe_it_names(tmp_path):
    """Before: `--config mine.yaml` naming a recipe started from the bare defaults (max_length 512 on the toy data:
    40 s per step instead of 0.1 s); now as `--recipe`: the recipe's values, then the user's, then the flags."""
    from hf_fg2u.cli.arguments import parse_args

    mine = tmp_path / "mine.yaml"
    mine.write_text("recipe: noisy_reweighting\nmax_steps: 3\n")
    script, training, _ = parse_args(["--config", str(mine), "--inner_lr", "0.01"])
    assert training.max_steps == 3 and training.inner_lr == 0.01  # the user's config, then the flag
    assert training.learning_rate == 0.5 and training.num_directions == 16  # the recipe's
    assert training.max_length == 10 and script.recipe == "noisy_reweighting"  # its built-in data options too


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("topic", ["a", "b"], r"no 'domain' column, which names each row's domain .* --domain_column"),
        ("domain", ["a", None], r"1 train rows have no domain in column 'domain' \(null or empty; rows \[1\]\)"),
    ],
    ids=["missing_column", "null_domain"],
)
def test_domain_mixture_names_a_missing_or_null_domain(column, values, message):
    """Before: a raw KeyError from datasets (no column) or a TypeError sorting None with text (null)."""
    from datasets import DatasetDict

    from hf_fg2u.cli.arguments import ScriptArguments
    from hf_fg2u.cli.registry import make_outer

    train = Dataset.from_dict({"text": ["x", "y"], column: values})
    with pytest.raises(ValueError, match=message):
        make_outer(ScriptArguments(recipe="domain_mixture", outer="domain_weights"), DatasetDict(train=train), None)


def test_hessian_free_with_a_preconditioned_inner_optimizer_is_warned_about(tmp_path):
    """Issue 24 item 6: hessian_free scales by inner_lr·H even under Adam; now said at the start."""
    _, data = fact_data(num_facts=4, copies=4)
    with pytest.warns(UserWarning, match=r"hessian_free takes each inner step's Jacobian as -inner_lr·H, SGD's step"):
        trainer_for(tmp_path, ExampleWeights(len(data["train"])), data, max_steps=1, method="hessian_free",
                    inner_optimizer="adam")  # fmt: skip


def test_one_file_mixing_formats_is_named_as_mixing(tmp_path):
    """Before: 'Row 1 has null in column prompt' — true, but the cause (a text row among prompt/completion rows,
    merged by the JSON loader with nulls in the gaps) was left for the user to find."""
    mixed = tmp_path / "train.jsonl"
    mixed.write_text('{"prompt": "a=", "completion": "1"}\n{"text": "b=2"}\n{"prompt": "c=", "completion": "3"}\n')
    rows = load_files({"train": [str(mixed)]})["train"]
    with pytest.raises(ValueError, match=r"mixes formats: row 1 is a language_modeling row \('text'\) among "
                                         r"prompt_completion rows\. Use one format per file"):  # fmt: skip
        tokenize_dataset(rows, TOKENIZER, 32, "train")


def test_a_missing_answer_in_rows_that_also_carry_text_is_not_called_mixing():
    rows = Dataset.from_dict({"prompt": ["a=", "b="], "completion": ["1", None], "text": ["a=1", "b=2"]})
    with pytest.raises(ValueError, match=r"Row 1 .* null in column 'completion'"):
        tokenize_dataset(rows, TOKENIZER, 32, "train")


def test_parquet_with_a_numeric_answer_column_names_the_row_column_and_stored_type(tmp_path):
    path = tmp_path / "train.parquet"
    Dataset.from_dict({"prompt": ["a=", "b="], "completion": [1, 2]}).to_parquet(str(path))
    rows = load_files({"train": [str(path)]})["train"]
    with pytest.raises(ValueError, match=r"Row 0 .* int 1 in column 'completion', which must be a string "
                                         r"\(the prompt_completion format.*stores the column as int64\)"):  # fmt: skip
        tokenize_dataset(rows, TOKENIZER, 32, "train")


def test_train_and_meta_files_in_different_formats_train_together(tmp_path):
    """The README says the splits' files may differ in format: prompt/completion JSONL train rows, plain-text CSV
    meta rows, a Parquet eval file; each split is tokenized by its own format and a run finishes."""
    from hf_fg2u.cli import main as cli

    facts = [(f"fact {i:02d} is ", str(10 + i)) for i in range(24)]
    train, meta, held = tmp_path / "train.jsonl", tmp_path / "meta.csv", tmp_path / "eval.parquet"
    Dataset.from_list([{"prompt": p, "completion": c} for p, c in facts[:16]]).to_json(str(train))
    Dataset.from_list([{"text": p + c} for p, c in facts[16:20]]).to_csv(str(meta), index=False)
    Dataset.from_list([{"prompt": p, "completion": c} for p, c in facts[20:]]).to_parquet(str(held))
    out = tmp_path / "run"
    results = cli.run_train([
        "--data_files", f"train={train}", f"meta={meta}", f"eval={held}", "--output_dir", str(out),
        "--max_steps", "1", "--per_device_train_batch_size", "4", "--unroll_steps", "2", "--num_directions", "2",
        "--max_length", "32", "--report_to", "none", "--save_strategy", "no",
    ])  # fmt: skip
    assert results["bilevel_meta_loss"] > 0 and results["bilevel_eval_loss"] > 0
    assert results["bilevel_meta_loss"] != results["bilevel_eval_loss"]


def write_fact_files(tmp_path, **train_columns):
    """train.jsonl (16 fact rows, plus ``train_columns``: column -> a value per row) and meta.jsonl (4 rows)."""
    facts = [(f"fact {i:02d} is ", str(10 + i)) for i in range(20)]
    rows = [{"prompt": p, "completion": c} for p, c in facts[:16]]
    for column, values in train_columns.items():
        rows = [{**row, column: value} for row, value in zip(rows, values, strict=True)]
    train, meta = tmp_path / "train.jsonl", tmp_path / "meta.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    Dataset.from_list([{"prompt": p, "completion": c} for p, c in facts[16:]]).to_json(str(meta))
    return ["--data_files", f"train={train}", f"meta={meta}", "--output_dir", str(tmp_path / "run"), "--max_steps",
            "1", "--per_device_train_batch_size", "4", "--unroll_steps", "2", "--num_directions", "2",
            "--max_length", "32", "--report_to", "none", "--save_strategy", "no", "--plot", "false"]  # fmt: skip


@pytest.mark.parametrize(
    "bad, shown", [(float("nan"), "(null|float nan)"), (None, "null"), ("yes", "str 'yes'"), (0.5, "float 0.5")]
)
def test_a_bad_is_corrupted_value_is_refused_before_training_naming_the_row(tmp_path, bad, shown):
    """Issue 36 case 7: NaN, null or "yes" in one row of is_corrupted trained the run, then the epoch-end AUROC
    raised and nothing was saved."""
    from hf_fg2u.cli import main as cli

    flags = [bad if row == 2 else row % 4 == 0 for row in range(16)]
    argv = write_fact_files(tmp_path, is_corrupted=flags)
    refused = rf"Row 2 of the train data \(--data_files train=.*\) has {shown} in column 'is_corrupted'.*Fix that row"
    with pytest.raises(ValueError, match=refused):
        cli.run_train(argv)
    assert not (tmp_path / "run").exists()  # nothing written


def test_train_rows_with_a_weight_column_train_and_get_the_learned_weights_in_its_place(tmp_path):
    """Issue 36 case 8: a train file with a weight column (a run's weighted_dataset.parquet fed back) crashed at
    the first epoch end ("duplicated columns") and saved nothing."""
    import pandas

    from hf_fg2u.cli import main as cli

    argv = write_fact_files(tmp_path, weight=[9.0] * 16, is_corrupted=[row % 4 == 0 for row in range(16)])
    with pytest.warns(UserWarning, match=r"has a 'weight' column \(an earlier run's weights\?\); it is left out"):
        results = cli.run_train(argv)
    saved = pandas.read_parquet(tmp_path / "run" / "weighted_dataset.parquet")
    assert list(saved.columns) == ["prompt", "completion", "is_corrupted", "scored", "weight"]
    assert saved["weight"].mean() == pytest.approx(1.0, abs=1e-5) and 0.0 <= results["auroc_corrupted"] <= 1.0


def test_settings_that_train_nothing_are_refused_at_the_start():
    """Round 3 C71, C16: lora_alpha 0 (an adapter scaled by 0) and num_train_epochs 0 without max_steps ran, trained
    nothing and reported done."""
    with pytest.raises(ValueError, match=r"lora_alpha=0 .*Set --lora_alpha > 0"):
        lora_config(ModelArguments(lora_alpha=0))
    with pytest.raises(ValueError, match=r"num_train_epochs=0 with max_steps=-1 trains no step.*--max_steps > 0"):
        BilevelConfig(output_dir="unused", num_train_epochs=0, max_steps=-1)
    BilevelConfig(output_dir="unused", num_train_epochs=0, max_steps=2)  # max_steps decides: fine


def test_a_missing_model_folder_or_gguf_file_is_named_before_anything_loads(tmp_path, monkeypatch):
    """Round 3 C82, C83, F03: a missing model folder or GGUF file was a raw OSError from transformers."""
    from hf_fg2u.cli.models import check_model_arguments

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "model.gguf").write_bytes(b"")
    for name in ("/nope", "models/nope", "./nope"):
        with pytest.raises(FileNotFoundError, match=rf"--model_name_or_path '{name}': no such folder.*Hub id"):
            check_model_arguments(ModelArguments(model_name_or_path=name))
    with pytest.raises(FileNotFoundError, match=r"--gguf_file 'nope.gguf': no such file in models/tiny.*model.gguf"):
        check_model_arguments(ModelArguments(model_name_or_path="models/tiny", gguf_file="nope.gguf"))
    check_model_arguments(ModelArguments(model_name_or_path="models/tiny", gguf_file="model.gguf"))
    check_model_arguments(ModelArguments(model_name_or_path="HuggingFaceTB/SmolLM2-135M"))  # a Hub id: not checked


def test_options_whose_package_is_missing_name_the_option_and_what_to_install(monkeypatch):
    """Round 3 C34, C67, C76: flash-attn, bitsandbytes and deepspeed missing were raw ImportError /
    PackageNotFoundError tracebacks (the model loaded first for flash-attn)."""
    import transformers.integrations
    import transformers.trainer_optimizer

    from hf_fg2u.cli import models

    monkeypatch.setitem(models.FLASH_ATTENTION, "flash_attention_2", lambda: False)
    with pytest.raises(ValueError, match=r"--attn_implementation flash_attention_2 needs the flash-attn.*pip install"):
        models.check_model_arguments(ModelArguments(attn_implementation="flash_attention_2"))
    monkeypatch.setattr(transformers.trainer_optimizer, "is_bitsandbytes_available", lambda: False)
    with pytest.raises(ValueError, match=r"--optim adamw_bnb_8bit needs a package .*bitsandbytes.*another --optim"):
        BilevelConfig(output_dir="unused", optim="adamw_bnb_8bit")
    monkeypatch.setattr(transformers.integrations, "is_deepspeed_available", lambda: False)
    with pytest.raises(ValueError, match=r"--deepspeed 'ds.json' needs the deepspeed package.*pip install deepspeed"):
        BilevelConfig(output_dir="unused", deepspeed="ds.json")


def billion_laughs(levels: int = 9) -> str:
    """A YAML mapping whose last key expands to 9**levels strings through aliases."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 9)}]" for k in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["lora_target_modules: *l8", "env:\n  HF_FG2U_BOMB: *l8"], ids=["option", "env"])
def test_a_yaml_alias_bomb_is_refused_before_it_is_built(tmp_path, where):
    """Round 3 Y02, Y03: a 'billion laughs' config was expanded (a 25 MB error message; ~200 MB exported to
    os.environ) instead of being refused."""
    path = tmp_path / "bomb.yaml"
    path.write_text("recipe: noisy_reweighting\n" + billion_laughs() + where + "\n")
    with pytest.raises(ValueError, match=r"bomb.yaml is not valid YAML: its aliases \(\*name\) expand to \d+ values"):
        load_yaml_config(path)
    path.write_text("base: &base [q_proj, v_proj]\nlora_target_modules: *base\n")  # a few aliases are fine
    assert load_yaml_config(path)["lora_target_modules"] == ["q_proj", "v_proj"]


def test_max_steps_zero_is_refused_naming_both_ways_to_train():
    """Round 3 C01: --max_steps 0 ran one outer step under a banner saying '3 epochs'."""
    with pytest.raises(ValueError, match=r"max_steps=0 trains no step.*or -1 to train num_train_epochs epochs"):
        BilevelConfig(output_dir="unused", max_steps=0)


def test_negative_final_stage_and_implicit_steps_are_refused():
    """Round 3 C29, C52: --final_stage_steps -1 trained a final stage of 3 epochs; --implicit_steps -1 was accepted
    silently."""
    from hf_fg2u.cli.arguments import ScriptArguments

    with pytest.raises(ValueError, match=r"final_stage_steps=-1: pass a number of steps >= 1 .*or 0"):
        ScriptArguments(final_stage_steps=-1)
    with pytest.raises(ValueError, match=r"implicit_steps=-1 must be >= 1"):
        BilevelConfig(output_dir="unused", implicit_steps=-1)


def test_a_meta_split_named_as_the_train_split_is_called_the_train_split(tmp_path):
    """Round 3 C95: --dataset_meta_split train was refused as "The meta split 'train' is also the meta split"."""
    from hf_fg2u.cli.arguments import parse_args
    from hf_fg2u.cli.data_loading import user_splits

    for name in ("train", "meta"):
        (tmp_path / f"{name}.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    script, _, _ = parse_args(["--dataset_name", str(tmp_path), "--dataset_meta_split", "train"])
    with pytest.raises(ValueError, match=r"The meta split 'train' is also the train split"):
        user_splits(script)


def test_a_data_file_url_with_a_password_is_refused_without_printing_it():
    """Round 3 D58: a URL with user:password as a data file was refused with the fix, but the message echoed the
    password."""
    url = "https://bob:PW_SEKRIT@files.example.com/train.jsonl?sv=1&sig=SIG_SEKRIT"
    with pytest.raises(ValueError, match=r"https://<redacted>@files.example.com/train.jsonl\?sv=1&sig=<redacted>") as e:
        load_files({"train": [url]})
    assert "SEKRIT" not in str(e.value)
