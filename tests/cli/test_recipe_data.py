"""Your data in the recipes: files by split, local folders, a separate meta dataset, a held-out eval split, and
results in the data's own terms."""

import json

import pytest
import torch
from datasets import Dataset

from hf_fg2u.cli import arguments, data_loading, recipe_run
from hf_fg2u.cli import main as cli
from hf_fg2u.hub.report import load_weighted_dataset


def pairs(count: int, start: int = 0, wrong: bool = False) -> list[dict]:
    """Prompt/completion rows in the character tokenizer's alphabet; ``wrong`` rows state another number."""
    return [
        {"prompt": f"fact {i:02d} is ", "completion": str(60 + i if wrong else 10 + i), "is_corrupted": wrong}
        for i in range(start, start + count)
    ]


def write(path, rows: list[dict]):
    kind = path.suffix
    dataset = Dataset.from_list(rows)
    if kind in (".json", ".jsonl"):
        dataset.to_json(str(path))
    elif kind == ".csv":
        dataset.to_csv(str(path), index=False)
    else:
        dataset.to_parquet(str(path))
    return path


def args_for(**values) -> arguments.ScriptArguments:
    return arguments.ScriptArguments(**values)


def test_data_files_by_split(tmp_path):
    train = write(tmp_path / "a.jsonl", pairs(12) + pairs(4, wrong=True))
    meta = write(tmp_path / "b.jsonl", pairs(4, start=20))
    held = write(tmp_path / "c.jsonl", pairs(6, start=30))
    splits = data_loading.user_splits(args_for(data_files=[f"train={train}", f"meta={meta}", f"eval={held}"]))
    assert {name: len(split) for name, split in splits.items()} == {"train": 16, "meta": 4, "eval": 6}
    assert splits["meta"][0]["prompt"] == "fact 20 is " and splits["eval"][0]["completion"] == "40"
    assert splits["train"].column_names == ["prompt", "completion", "is_corrupted"]  # no ids added here


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_folder_splits_by_file_name(tmp_path, suffix):
    write(tmp_path / f"train{suffix}", pairs(8))
    write(tmp_path / f"meta{suffix}", pairs(3, start=20))
    splits = data_loading.user_splits(args_for(dataset_name=str(tmp_path)))
    assert {name: len(split) for name, split in splits.items()} == {"train": 8, "meta": 3}


def test_meta_from_another_dataset(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "trusted").mkdir()
    write(tmp_path / "mine" / "train.jsonl", pairs(8))
    write(tmp_path / "trusted" / "clean.jsonl", pairs(5, start=20))
    s = args_for(dataset_name=str(tmp_path / "mine"), meta_dataset_name=str(tmp_path / "trusted"),
                 meta_dataset_split="clean")  # fmt: skip
    splits = data_loading.user_splits(s)
    assert len(splits["meta"]) == 5 and splits["meta"][0]["prompt"] == "fact 20 is "
    one_file = args_for(
        dataset_name=str(tmp_path / "mine"), meta_dataset_name=str(tmp_path / "trusted" / "clean.jsonl")
    )
    assert len(data_loading.user_splits(one_file)["meta"]) == 5  # a single file is its own "train" split


def test_missing_meta_and_an_eval_split_that_is_the_meta_split_are_clear_errors(tmp_path):
    train = write(tmp_path / "train.jsonl", pairs(8))
    with pytest.raises(ValueError, match=r"has no meta data \(splits: \['train'\]\).*--data_files meta=FILE"):
        data_loading.user_splits(args_for(data_files=[str(train)]))
    meta = write(tmp_path / "meta.jsonl", pairs(3, start=20))
    files = [f"train={train}", f"meta={meta}"]
    with pytest.raises(ValueError, match="The eval split 'meta' is also the meta split"):
        data_loading.user_splits(args_for(data_files=files, dataset_eval_split="meta"))
    with pytest.raises(ValueError, match="not SPLIT=PATH"):
        data_loading.user_splits(args_for(data_files=[f"my split={train}"]))


def test_own_jsonl_end_to_end_short_run_writes_results_in_the_users_terms(tmp_path):
    train = write(tmp_path / "train.jsonl", pairs(12) + pairs(4, start=12, wrong=True))
    meta = write(tmp_path / "meta.jsonl", pairs(4, start=20))
    held = write(tmp_path / "eval.jsonl", pairs(4, start=30))
    out = tmp_path / "run"
    results = cli.run_train([
        "--data_files", f"train={train}", f"meta={meta}", f"eval={held}", "--output_dir", str(out),
        "--max_steps", "1", "--logging_steps", "10", "--per_device_train_batch_size", "4", "--unroll_steps", "2",
        "--num_directions", "2", "--max_length", "32", "--report_to", "none", "--save_strategy", "no",
    ])  # fmt: skip
    # max_steps < logging_steps: the run still logs, plots and writes results.json.
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "meta_loss.png").is_file()
    assert results["bilevel_eval_loss"] > 0 and results["bilevel_eval_loss"] != results["bilevel_meta_loss"]
    weighted = load_weighted_dataset(out)
    assert weighted.column_names == ["prompt", "completion", "is_corrupted", "scored", "weight"]
    assert 0.0 <= results["auroc_corrupted"] <= 1.0
    text = cli.run_weights([str(out), "--top", "2"])
    lowest, highest = (min(weighted, key=lambda r: r["weight"]), max(weighted, key=lambda r: r["weight"]))
    assert "2 most down-weighted examples" in text and "2 most up-weighted examples" in text
    assert f"{lowest['prompt']} → {lowest['completion']}" in text
    assert f"{highest['prompt']} → {highest['completion']}" in text


def test_built_in_recipe_shorter_than_logging_steps_finishes_and_writes_results(tmp_path):
    out = tmp_path / "short"
    results = cli.run_train([
        "--recipe", "noisy_reweighting", "--max_steps", "1", "--logging_steps", "10",
        "--num_directions", "2", "--directions", "rademacher", "--output_dir", str(out),
    ])  # fmt: skip
    assert (out / "results.json").is_file() and (out / "meta_loss.png").is_file()
    assert "bilevel_eval_loss" not in results  # the built-in data has no held-out split beyond its meta set
    weighted = load_weighted_dataset(out)
    assert weighted.column_names == ["prompt", "completion", "example_id", "is_corrupted", "domain", "scored", "weight"]


def test_time_budget_stops_the_run_after_the_step_that_passes_it_and_still_reports(tmp_path, capsys):
    out = tmp_path / "budget"
    results = cli.run_train([
        "--recipe", "noisy_reweighting", "--max_steps", "50", "--logging_steps", "10", "--time_budget_s", "1e-6",
        "--num_directions", "2", "--directions", "rademacher", "--output_dir", str(out),
    ])  # fmt: skip
    assert capsys.readouterr().out.count("time budget of 1e-06 s reached after 1 outer steps") == 1  # no uniform run
    assert (out / "results.json").is_file() and (out / "meta_loss.png").is_file()  # the step was logged
    assert results["bilevel_meta_loss"] > 0


def test_time_budget_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match=r"time_budget_s=0.0 must be > 0"):
        cli.run_train(["--recipe", "noisy_reweighting", "--max_steps", "1", "--time_budget_s", "0",
                       "--output_dir", str(tmp_path / "zero")])  # fmt: skip


def test_time_budget_follows_rank_0_under_several_processes(monkeypatch):
    """A rank whose own clock is within the budget stops when rank 0's is past it (and goes on when it is not)."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    rank_0_over = {"value": 1.0}

    def broadcast(tensor, src):
        assert src == 0
        tensor.fill_(rank_0_over["value"])

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "broadcast", broadcast)
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    budget = recipe_run.TimeBudget(3600.0)  # this rank's clock is far from the budget
    budget.on_train_begin(args, TrainerState(), TrainerControl())
    control = TrainerControl()
    budget.on_step_end(args, TrainerState(), control)
    assert control.should_training_stop
    rank_0_over["value"] = 0.0
    budget.start -= 7200.0  # now this rank's clock is past it, rank 0's is not
    control = TrainerControl()
    budget.on_step_end(args, TrainerState(), control)
    assert not control.should_training_stop


def test_final_stage_scores_learned_and_uniform_weights_on_the_eval_split_and_warns_when_no_better(tmp_path):
    train = write(tmp_path / "train.jsonl", pairs(12) + pairs(4, start=12, wrong=True))
    meta = write(tmp_path / "meta.jsonl", pairs(4, start=20))
    held = write(tmp_path / "eval.jsonl", pairs(4, start=30))
    out = tmp_path / "run"
    argv = [
        "--data_files", f"train={train}", f"meta={meta}", f"eval={held}", "--output_dir", str(out),
        "--max_steps", "1", "--per_device_train_batch_size", "4", "--unroll_steps", "2", "--num_directions", "2",
        "--max_length", "32", "--report_to", "none", "--save_strategy", "no", "--final_stage_steps", "2",
        "--learning_rate", "0", "--plot", "false",
    ]  # fmt: skip
    with pytest.warns(UserWarning, match=r"no lower eval loss than one on uniform weights"):
        results = cli.run_train(argv)  # an outer step of 0 leaves the weights uniform: the two adapters tie
    assert results["final_adapter_eval_loss"] == pytest.approx(results["uniform_adapter_eval_loss"], abs=1e-6)
    assert results["final_adapter_meta_loss"] > 0 and results["final_adapter_eval_loss"] > 0
    assert results["final_adapter_eval_loss"] != results["final_adapter_meta_loss"]
    assert (out / "final_adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "final_adapter" / "uniform_adapter" / "adapter_model.safetensors").exists()  # only scored


@pytest.mark.parametrize("order", ["meta_first", "train_first", "folder"])
def test_splits_may_have_different_columns_in_any_file_order(tmp_path, order):
    """Issue 23 item 4: train rows carry is_corrupted, meta rows do not; one load_dataset call per split."""
    train = write(tmp_path / "train.jsonl", pairs(6) + pairs(2, wrong=True))
    meta = write(tmp_path / "meta.jsonl", [{"prompt": r["prompt"], "completion": r["completion"]} for r in pairs(3)])
    files = [f"meta={meta}", f"train={train}"] if order == "meta_first" else [f"train={train}", f"meta={meta}"]
    s = args_for(dataset_name=str(tmp_path)) if order == "folder" else args_for(data_files=files)
    splits = data_loading.user_splits(s)
    assert splits["train"].column_names == ["prompt", "completion", "is_corrupted"]
    assert splits["meta"].column_names == ["prompt", "completion"]
    assert sum(splits["train"]["is_corrupted"]) == 2 and len(splits["meta"]) == 3


def test_toy_max_length_applies_to_the_builtin_data_only(tmp_path):
    """Issue 23 item 3: the packaged recipe's max_length 10 is for its toy rows; the user's data gets the
    documented default (512) unless the user sets one."""
    from hf_fg2u.trainer.config import BilevelConfig

    train = write(tmp_path / "train.jsonl", pairs(4))
    meta = write(tmp_path / "meta.jsonl", pairs(2))
    own = ["--data_files", f"train={train}", f"meta={meta}"]
    documented = BilevelConfig.__dataclass_fields__["max_length"].default
    assert documented == 512
    for name in ("noisy_reweighting", "domain_mixture", "soft_prompt"):
        script, training, _ = arguments.parse_args(["--recipe", name])
        assert training.max_length == 10 and script.num_facts in (8, 12)
        assert arguments.parse_args(["--recipe", name, *own])[1].max_length == documented
        assert arguments.parse_args(["--recipe", name, *own, "--max_length", "64"])[1].max_length == 64
        assert arguments.parse_args(["--recipe", name, "--max_length", "12"])[1].max_length == 12
    config = tmp_path / "mine.yaml"  # the user's own YAML naming their data: its toy section is not applied
    config.write_text(f"data_files: [train={train}, meta={meta}]\nbuiltin_data:\n  max_length: 9\n")
    assert arguments.parse_args(["--config", str(config)])[1].max_length == documented
    config.write_text("builtin_data:\n  max_length: 9\n  num_facts: 3\n")
    script, training, _ = arguments.parse_args(["--config", str(config)])
    assert training.max_length == 9 and script.num_facts == 3
