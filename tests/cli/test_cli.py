"""The hf-fg2u CLI and recipes: YAML + CLI overrides, clear errors, each recipe's offline default runs."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_fg2u.cli import arguments, parsing, recipe_run, registry
from hf_fg2u.cli import main as cli

RECIPES = registry.RECIPES_DIR


def test_cli_flags_override_yaml_values(tmp_path):
    script, training, model = arguments.parse_args(
        ["--config", str(RECIPES / "noisy_reweighting.yaml"), "--max_steps", "3", "--lora_r", "2"]
    )
    assert training.max_steps == 3 and model.lora_r == 2
    assert script.recipe == "noisy_reweighting" and training.unroll_steps == 2 and training.directions == "orthogonal"
    assert training.inner_lr == pytest.approx(0.005)


def test_demo_arguments_match_the_noisy_recipe_yaml():
    parsed_demo = arguments.parse_args(cli.DEMO_ARGS)
    parsed_yaml = arguments.parse_args(
        [
            "--config",
            str(RECIPES / "noisy_reweighting.yaml"),
            "--output_dir",
            "outputs/demo",
            "--compare_uniform",
            "true",
        ]
    )
    for demo, from_yaml in zip(parsed_demo, parsed_yaml, strict=True):
        assert demo == from_yaml


@pytest.mark.parametrize(
    "content, message",
    [
        ("recipe: noisy_reweighting\nlearning_rat: 0.1\n", "unknown key"),
        ("- just\n- a list\n", "mapping"),
        ("max_steps: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_yaml_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        arguments.parse_args(["--config", str(path)])


def test_missing_file_unknown_recipe_and_wrong_type(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        arguments.parse_args(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ValueError, match="recipe='magic'"):
        arguments.parse_args(["--recipe", "magic"])
    with pytest.raises(SystemExit):
        arguments.parse_args(["--max_steps", "many"])
    assert "invalid int value: 'many'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown command 'fly'"):
        cli.main(["fly"])
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["train", "--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("name", ["noisy_reweighting", "domain_mixture", "soft_prompt"])
def test_each_recipe_runs_its_offline_default(tmp_path, name):
    out = tmp_path / name
    args = ["--config", str(RECIPES / f"{name}.yaml"), "--max_steps", "2", "--output_dir", str(out)]
    args += ["--num_directions", "2", "--directions", "rademacher", "--plot", "false", "--compare_uniform", "true"]
    results = cli.run_train(args)
    assert json.loads((out / "results.json").read_text()) == results
    assert results["bilevel_meta_loss"] > 0 and results["uniform_meta_loss"] > 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "outer_model.safetensors").is_file()
    if name == "noisy_reweighting":
        assert 0.0 <= results["auroc_corrupted"] <= 1.0
        final = cli.run_train(args + ["--final_stage_steps", "2", "--output_dir", str(tmp_path / "final")])
        assert final["final_adapter_meta_loss"] > 0
        assert (tmp_path / "final" / "final_adapter" / "adapter_model.safetensors").is_file()
        text = cli.run_weights([str(out), "--top", "3"])
        assert "auroc" in text.lower() and (out / "weights_histogram.png").is_file()
    if name == "domain_mixture":
        assert set(results["domain_weights"]) == {"facts_a", "facts_b", "facts_c"}
    # every outer module that weighs rows (per row or per domain) writes the rows with their weights, for finetune
    assert (out / "weighted_dataset.parquet").is_file() == (name != "soft_prompt")


def test_recipe_yaml_files_parse():
    for path in RECIPES.glob("*.yaml"):
        values = yaml.safe_load(path.read_text())
        assert values["recipe"] in registry.RECIPES
        arguments.parse_args(["--config", str(path)])


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text("recipe: noisy_reweighting\n" + text)
    return str(path)


@pytest.mark.parametrize(
    "line, message",
    [  # issue 13: each error names the file, the key and the expected type
        ('max_steps: "ten"', r"config.yaml: max_steps expects an int, got str 'ten'"),
        ("max_steps: [1, 2]", r"config.yaml: max_steps takes a single value \(an int\), got the list \[1, 2\]"),
        ("inner_lr: fast", r"inner_lr expects a float, got str 'fast'"),
        ("plot: maybe", r"plot expects a boolean \(true/false\), got str 'maybe'"),
        ("directions: [rademacher]", r"directions takes a single value \(a string\)"),
        ("save_strategy: sometimes", r"save_strategy is 'sometimes'; use one of \['no', 'steps', 'epoch', 'best'\]"),
        ("env: [A, B]", r"env must be a mapping of NAME: value, got list"),
    ],
)
def test_yaml_value_of_the_wrong_type_names_the_key(tmp_path, line, message):
    with pytest.raises(ValueError, match=message):
        arguments.parse_args(["--config", write_yaml(tmp_path, line + "\n")])


def test_yaml_values_are_typed_yaml_12_and_cli_flags_override_them(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_FG2U_TEST_VAR", raising=False)
    config = write_yaml(
        tmp_path,
        "save_strategy: no\nplot: no\nmax_steps: 7\ninner_lr: 1e-3\nlora_target_modules: q_proj\n"
        "env:\n  HF_FG2U_TEST_VAR: 3\n",
    )
    script, training, model = arguments.parse_args(["--config", config])
    assert training.save_strategy == "no" and script.plot is False  # `no` is the string "no", read per field
    assert training.max_steps == 7 and training.inner_lr == pytest.approx(1e-3)
    assert model.lora_target_modules == ["q_proj"]
    assert os.environ["HF_FG2U_TEST_VAR"] == "3"
    overrides = ["--max_steps", "2", "--lora_target_modules", "a", "b"]
    _, training, model = arguments.parse_args([f"--config={config}", *overrides])
    assert training.max_steps == 2 and model.lora_target_modules == ["a", "b"]


@pytest.mark.parametrize("name", ["HF_TOKEN", "PYTHONPATH", "LD_PRELOAD", "NCCL_NET_PLUGIN", "HUGGING_FACE_HUB_TOKEN"])
def test_yaml_env_may_not_set_credentials_paths_or_loaders(tmp_path, monkeypatch, name):
    """Issue 25 item 1: a shared YAML's env: block is refused for a token, a path or a preload, and sets nothing."""
    monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HF_FG2U_TEST_VAR", raising=False)
    config = write_yaml(tmp_path, f"max_steps: 2\nenv:\n  HF_FG2U_TEST_VAR: 1\n  {name}: planted\n")
    with pytest.raises(ValueError, match=rf"env may not set \['{name}'\]"):
        arguments.parse_args(["--config", config])
    assert name not in os.environ and "HF_FG2U_TEST_VAR" not in os.environ


def test_yaml_env_may_not_set_the_variable_that_carries_arguments_to_the_ranks(tmp_path, monkeypatch):
    """Issue 36 case 1: HF_FG2U_SECRET_ARGS in a YAML's env: block was appended to every rank's argv after the
    user's flags (a model's remote code ran, another output_dir was written); now refused before anything runs."""
    monkeypatch.delenv("HF_FG2U_SECRET_ARGS", raising=False)
    monkeypatch.delenv("HF_FG2U_TEST_VAR", raising=False)
    hidden = json.dumps(["--trust_remote_code", "true", "--output_dir", str(tmp_path / "hidden")])
    config = write_yaml(tmp_path, f"max_steps: 2\nenv:\n  HF_FG2U_TEST_VAR: 1\n  HF_FG2U_SECRET_ARGS: '{hidden}'\n")
    monkeypatch.setattr(cli.subprocess, "run", lambda *args, **kwargs: pytest.fail("a rank was started"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"env may not set \['HF_FG2U_SECRET_ARGS'\]: hf_fg2u reads it"):
        cli.run_train(["--config", config, "--num_processes", "2", "--output_dir", str(tmp_path / "user")])
    assert "HF_FG2U_SECRET_ARGS" not in os.environ and "HF_FG2U_TEST_VAR" not in os.environ
    assert not (tmp_path / "hidden").exists() and not (tmp_path / "user").exists()


def test_yaml_env_keeps_what_the_user_set_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    config = write_yaml(tmp_path, "max_steps: 2\nenv:\n  OMP_NUM_THREADS: 1\n")
    with pytest.warns(UserWarning, match=r"env sets OMP_NUM_THREADS='1', but your environment has .*'7'.*kept"):
        arguments.parse_args(["--config", config])
    assert os.environ["OMP_NUM_THREADS"] == "7"


def test_recipe_name_loads_the_packaged_yaml_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script, training, _ = arguments.parse_args(["--recipe", "domain_mixture", "--max_steps", "2"])
    packaged = yaml.safe_load((RECIPES / "domain_mixture.yaml").read_text())
    assert script.recipe == "domain_mixture" and training.max_steps == 2
    assert training.learning_rate == pytest.approx(packaged["learning_rate"])
    assert training.output_dir == packaged["output_dir"]
    assert sorted(p.name for p in (RECIPES / "accelerate_configs").glob("*.yaml")) == [
        "cpu_2proc.yaml", "multi_gpu.yaml", "multi_node.yaml", "single_gpu.yaml",
    ]  # fmt: skip


def test_help_is_grouped_with_bilevel_options_first(capsys):
    with pytest.raises(SystemExit):
        arguments.parse_args(["--help"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("usage: hf-fg2u train ")
    titles = [line for line in lines if line and not line.startswith(" ") and line.endswith(":")]
    assert titles == [
        "options:", "run:", "BilevelConfig: bilevel meta-tuning:", "recipe: what to learn and on which data:",
        "model and its LoRA adapter:", f"{parsing.TRAINER_GROUP}:", f"{arguments.BUILTIN_GROUP}:",
    ]  # fmt: skip
    assert len(lines) < 400 and "--ignore_data_skip" not in "\n".join(lines)  # issue 23 item 10: was 771 lines
    with pytest.raises(SystemExit):
        arguments.parse_args(["--help_all"])
    assert "--ignore_data_skip" in capsys.readouterr().out
    first80 = "\n".join(lines[:80])
    assert "--config FILE" in first80 and "--num_processes N" in first80
    assert (
        "--method {fg2u,fg2u_zo,rgu,trgu,neumann,cg,hessian_free,auto}" in first80
        and "--num_directions" in first80
        and "--inner_optimizer" in first80
    )
    assert "--learning_rate" not in first80


def test_num_processes_launches_the_cli_through_accelerate(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(command, check, env=None):
        calls.append(command)
        (tmp_path / "results.json").write_text('{"bilevel_meta_loss": 1.5}')
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--recipe", "soft_prompt", "--max_steps", "2", "--output_dir", str(tmp_path)]
    results = cli.run_train([*argv, "--num_processes", "2", "--accelerate_config", "cpu_2proc"])
    assert results == {"bilevel_meta_loss": 1.5}
    config = str(RECIPES / "accelerate_configs" / "cpu_2proc.yaml")
    assert calls == [
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file", config,
         "-m", "hf_fg2u.cli.main", "train", *argv],
    ]  # fmt: skip
    cli.run_train([*argv, "--num_processes=3"])
    assert calls[-1][4:7] == ["3", "--multi_gpu", "--num_machines"]
    with pytest.raises(SystemExit, match="--accelerate_config 'nope' is neither a file nor one of"):
        cli.main(["train", *argv, "--num_processes", "2", "--accelerate_config", "nope"])
    with pytest.raises(SystemExit):  # checked before any rank starts
        cli.main(["train", "--num_processes", "2", "--max_steps", "x"])
    assert "argument --max_steps/--max-steps: invalid int value: 'x'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"\['num_processes'\] start processes under `hf-fg2u train` only"):
        arguments.parse_args([*argv, "--num_processes", "2"])
    assert len(calls) == 2


def test_recipe_push_uploads_the_bilevel_run_without_its_uniform_baseline(tmp_path, hub):
    """compare_uniform trains the same budget with frozen weights in output_dir/uniform, for the results table;
    the repo gets the bilevel run (adapter, outer variables, tokenizer, weighted data), not that baseline."""
    out = tmp_path / "run"
    args = ["--config", str(RECIPES / "noisy_reweighting.yaml"), "--max_steps", "1", "--output_dir", str(out)]
    args += ["--num_directions", "2", "--plot", "false", "--push_to_hub", "true", "--hub_model_id", "tester/run"]
    token = "hf_fake"  # the stand-in Hub's token (tests/conftest.py)
    args += ["--hub_token", token, "--hub_strategy", "end", "--compare_uniform", "true"]
    results = cli.run_train(args)
    # Issue 26 item 6: the token is in no pushed file and in no file of the output tree (checkpoints, the
    # uniform baseline, training_args.bin as pickled bytes included).
    leaked = [path for path, data in hub.repos["tester/run"].items() if token.encode() in data]
    leaked += [str(path) for path in out.rglob("*") if path.is_file() and token.encode() in path.read_bytes()]
    assert not leaked, leaked
    assert sum(1 for path in out.rglob("*") if path.is_file()) > 10  # the scan saw the run's files
    assert results["uniform_meta_loss"] > 0 and (out / "uniform").is_dir()
    pushed = set(hub.repos["tester/run"])
    assert {
        "adapter_model.safetensors",
        "outer_model.safetensors",
        "tokenizer.json",
        "weighted_dataset.parquet",
    } <= pushed
    assert not [path for path in pushed if "uniform" in path], sorted(pushed)
    assert not [path for path in pushed if path.startswith("weighted_dataset/")]  # one copy: the parquet file


def test_only_the_main_process_writes_the_run_summary_files(tmp_path):
    """Ranks share output_dir: every rank gets the headline numbers, only the one that saves writes the weighted
    dataset and the histogram (two ranks writing one Arrow file at once can leave it broken)."""
    from types import SimpleNamespace

    from datasets import Dataset

    weighted = Dataset.from_dict(
        {"text": ["a", "b", "c"], "is_corrupted": [False, True, False], "weight": [1.5, 0.1, 1.4]}
    )
    script = arguments.ScriptArguments(recipe="noisy_reweighting", plot=True)
    for rank, saves in ((1, False), (0, True)):
        trainer = SimpleNamespace(args=SimpleNamespace(should_save=saves), export_weights=lambda: weighted,
                                  outer=SimpleNamespace(weighs_rows=True))  # fmt: skip
        out = recipe_run.summarize(script, None, trainer, {}, tmp_path / str(rank))
        assert out["auroc_corrupted"] == 1.0
        assert (tmp_path / str(rank) / "weighted_dataset.parquet").is_file() == saves
        assert (tmp_path / str(rank) / "weights_histogram.png").is_file() == saves


def test_every_packaged_yaml_is_a_recipe_name_and_a_config_name(tmp_path, monkeypatch):
    """Issue 23 item 2: --recipe NAME and --config NAME reach every packaged YAML from any directory, and a
    missing config's error does not send the user to --recipe for a name that --recipe refuses."""
    monkeypatch.chdir(tmp_path)
    names = sorted(path.stem for path in RECIPES.glob("*.yaml"))
    assert "noisy_reweighting_real" in names and sorted(registry.RECIPES) == names
    for name in names:
        packaged = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
        for argv in (["--recipe", name], ["--config", name], ["--config", f"hf_fg2u/recipes/{name}.yaml"]):
            script, training, _ = arguments.parse_args(argv)
            assert script.recipe == name and training.output_dir == packaged["output_dir"], argv
    script, training, model = arguments.parse_args(["--recipe", "noisy_reweighting_real"])
    assert script.weight_parametrization == "sigmoid" and training.method == "rgu" and model.lora_r == 8
    with pytest.raises(FileNotFoundError) as error:
        arguments.parse_args(["--config", "nope.yaml"])
    assert "--recipe" not in str(error.value) and "noisy_reweighting_real" in str(error.value)
    with pytest.raises(ValueError, match=r"recipe='nope' is not known; use one of \['data_rater', 'domain_mixture'"):
        arguments.parse_args(["--recipe", "nope"])


def test_noisy_reweighting_real_runs_by_name_on_the_builtin_data(tmp_path):
    out = tmp_path / "real"
    argv = ["--recipe", "noisy_reweighting_real", "--max_steps", "1", "--output_dir", str(out), "--plot", "false"]
    results = cli.run_train([*argv, "--max_length", "10"])
    assert results["bilevel_meta_loss"] > 0 and (out / "weighted_dataset.parquet").is_file()
    assert 0.0 <= results["auroc_corrupted"] <= 1.0


def test_toy_options_sit_in_their_own_help_group_last(capsys):
    with pytest.raises(SystemExit):
        arguments.parse_args(["--help"])
    text = capsys.readouterr().out
    last = text.split(f"\n{arguments.BUILTIN_GROUP}:\n")
    assert len(last) == 2, "the toy group is missing"
    for option in ("--num_facts", "--copies", "--tiny_hidden_size", "--corrupted_fraction"):
        assert option in last[1] and option not in last[0], option
    assert not [line for line in last[1].splitlines() if line.endswith(":") and not line.startswith(" ")]


def weighted_run(folder: Path) -> Path:
    """A run folder holding only what `hf-fg2u weights` reads: the weighted dataset."""
    from datasets import Dataset

    rows = {"text": [f"row {i}" for i in range(8)], "is_corrupted": [i % 4 == 0 for i in range(8)]}
    rows["weight"] = [0.1, 1.2, 1.1, 1.3, 0.2, 0.9, 1.0, 1.4]
    folder.mkdir(parents=True)
    Dataset.from_dict(rows).to_parquet(str(folder / "weighted_dataset.parquet"))
    return folder


def test_export_filtered_never_drops_an_unscored_row_silently(tmp_path, capsys):
    """Rows that never entered an unroll keep their starting weight: `weights` counts them, filtered keeps them all
    whatever their weight and ranks the scored rows only, and only --drop_unscored leaves them out, saying so."""
    from datasets import Dataset, load_dataset

    folder = tmp_path / "run"
    rows = {"text": [f"row {i}" for i in range(8)], "weight": [0.1, 1.2, 1.1, 1.3, 0.2, 0.9, 1.0, 1.4]}
    rows["scored"] = [True, True, False, True, False, True, True, True]  # rows 2 and 4 at their starting weight
    folder.mkdir()
    Dataset.from_dict(rows).to_parquet(str(folder / "weighted_dataset.parquet"))
    cli.run_weights([str(folder), "--export", "filtered", "--output_dir", str(tmp_path / "f")])
    out = capsys.readouterr().out
    assert "Never scored: 2 of 8 rows" in out and "2 never-scored rows kept" in out
    kept = load_dataset(str(tmp_path / "f"), split="train")
    assert kept.column_names == ["text"]  # neither weight nor scored
    # scored rows at or above their mean weight (0.9833: rows 1, 3, 6, 7), and both unscored rows (2, and 4 at 0.2)
    assert kept["text"] == ["row 1", "row 2", "row 3", "row 4", "row 6", "row 7"]
    cli.run_weights([str(folder), "--export", "filtered", "--drop_unscored", "--output_dir", str(tmp_path / "d")])
    assert "2 never-scored rows left out" in capsys.readouterr().out
    assert load_dataset(str(tmp_path / "d"), split="train")["text"] == ["row 1", "row 3", "row 6", "row 7"]
    argv = [str(folder), "--export", "resampled", "--drop_unscored", "--num_rows", "200"]
    cli.run_weights([*argv, "--output_dir", str(tmp_path / "r")])
    drawn = set(load_dataset(str(tmp_path / "r"), split="train")["text"])
    assert not drawn & {"row 2", "row 4"}


def test_weights_export_filtered_and_resampled_rows_without_weights(tmp_path):
    """Issue 23 item 1 (export): plain rows that `trl sft --dataset_name DIR` trains on as the weights say."""
    from datasets import load_dataset

    run = weighted_run(tmp_path / "run")
    cli.run_weights([str(run), "--export", "filtered", "--output_dir", str(tmp_path / "f")])
    kept = load_dataset(str(tmp_path / "f"), split="train")
    assert kept.column_names == ["text", "is_corrupted"]  # no weight column
    assert kept["text"] == ["row 1", "row 2", "row 3", "row 5", "row 6", "row 7"]  # weight >= mean (0.9)
    cli.run_weights([str(run), "--export", "filtered", "--keep_fraction", "0.25", "--output_dir", str(tmp_path / "q")])
    assert load_dataset(str(tmp_path / "q"), split="train")["text"] == ["row 3", "row 7"]  # the top 2 of 8
    cli.run_weights([str(run), "--export", "filtered", "--threshold", "1.15", "--output_dir", str(tmp_path / "t")])
    assert load_dataset(str(tmp_path / "t"), split="train")["text"] == ["row 1", "row 3", "row 7"]
    argv = [str(run), "--export", "resampled", "--num_rows", "4000", "--seed", "3"]
    cli.run_weights([*argv, "--output_dir", str(tmp_path / "r")])
    drawn = load_dataset(str(tmp_path / "r"), split="train")
    assert drawn.column_names == ["text", "is_corrupted"] and len(drawn) == 4000
    share = drawn["text"].count("row 7") / 4000  # probability 1.4 / 7.2 = 0.194; 3 sigma of 4000 draws is 0.019
    assert share == pytest.approx(1.4 / 7.2, abs=0.019)
    cli.run_weights([*argv, "--output_dir", str(tmp_path / "r2")])  # seeded: the same draw again
    assert load_dataset(str(tmp_path / "r2"), split="train")["text"] == drawn["text"]
    with pytest.raises(ValueError, match="lower --threshold"):
        cli.run_weights([str(run), "--export", "filtered", "--threshold", "9"])


def test_weights_export_never_replaces_an_existing_file_unless_asked(tmp_path, capsys):
    """Issue 36 case 6: `hf-fg2u weights RUN --export filtered --output_dir exp` replaced the user's
    exp/train.jsonl with the exported rows, silently."""
    from datasets import load_dataset

    run, exp = weighted_run(tmp_path / "run"), tmp_path / "exp"
    exp.mkdir()
    (exp / "train.jsonl").write_text('{"text": "my own data"}\n')
    argv = [str(run), "--export", "filtered", "--output_dir", str(exp)]
    with pytest.raises(ValueError, match=rf"{exp / 'train.jsonl'} exists.*--overwrite_output_dir true"):
        cli.run_weights(argv)
    assert (exp / "train.jsonl").read_text() == '{"text": "my own data"}\n' and capsys.readouterr().out == ""
    cli.run_weights([*argv, "--overwrite_output_dir", "true"])
    assert len(load_dataset(str(exp), split="train")) == 6  # the rows of weight >= the mean (0.9)


def test_weights_push_to_hub_uploads_the_weighted_dataset(tmp_path, hub, monkeypatch):
    """Issue 23 item 10: `hf-fg2u weights RUN --push_to_hub` against the stand-in Hub."""
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    run = weighted_run(tmp_path / "run")
    cli.run_weights([str(run), "--push_to_hub", "tester/weights"])
    files = hub.repos["tester/weights"]
    parquet = [path for path in files if path.endswith(".parquet")]
    assert len(parquet) == 1, sorted(files)
    import io

    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(files[parquet[0]]))
    assert table.column("weight").to_pylist() == pytest.approx([0.1, 1.2, 1.1, 1.3, 0.2, 0.9, 1.0, 1.4])


def test_resume_from_checkpoint_on_the_command_line_continues_and_a_finished_run_is_not_replaced(tmp_path, capsys):
    """Issue 25 items 4 and 5: --resume_from_checkpoint was accepted and ignored (the run started at step 0), and a
    second run into a finished run's folder replaced its results silently."""
    out = tmp_path / "run"
    base = ["--recipe", "noisy_reweighting", "--output_dir", str(out), "--plot", "false", "--logging_steps", "1",
            "--save_strategy", "steps", "--save_steps", "2"]  # fmt: skip
    cli.run_train([*base, "--max_steps", "4"])
    first = json.loads((out / "results.json").read_text())
    with pytest.raises(ValueError, match="holds a finished run"):
        cli.run_train([*base, "--max_steps", "4", "--seed", "1"])
    assert json.loads((out / "results.json").read_text()) == first  # nothing replaced
    with pytest.raises(ValueError, match="is not a folder"):
        cli.run_train([*base, "--max_steps", "6", "--resume_from_checkpoint", str(out / "checkpoint-9")])
    from transformers import TrainerCallback

    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            self.history = state.log_history

    keep, monkey_main = Keep(), recipe_run.main
    try:
        recipe_run.main = lambda *args: monkey_main(*args, callbacks=[keep])
        cli.run_train([*base, "--max_steps", "6", "--resume_from_checkpoint", "true"])
    finally:
        recipe_run.main = monkey_main
    ran = [entry["outer_steps_run"] for entry in keep.history if "outer_steps_run" in entry]
    assert ran == [2]  # 2 more steps from checkpoint-4, not 6 from the start
    assert [entry["step"] for entry in keep.history if "meta_loss" in entry] == [1, 2, 3, 4, 5, 6]
    cli.run_train([*base, "--max_steps", "2", "--overwrite_output_dir", "true"])  # replacing it is asked for
    assert json.loads((out / "results.json").read_text())["bilevel_outer_steps"] == 2
    # issue 36 (e5): the replaced run's checkpoint-4 and -6 are gone, so a resume cannot continue that run
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_resuming_a_run_stopped_in_its_uniform_baseline_trains_the_baseline_again(tmp_path):
    """Issue 36 case 3: a new run into a folder with checkpoints of an unfinished run is refused, but a resumed
    recipe run trains its uniform baseline from the start over the checkpoints the stopped baseline left."""
    import shutil

    out = tmp_path / "run"
    base = ["--recipe", "noisy_reweighting", "--output_dir", str(out), "--plot", "false", "--max_steps", "2",
            "--save_strategy", "steps", "--save_steps", "1", "--compare_uniform", "true"]  # fmt: skip
    cli.run_train(base)
    for path in out.iterdir():  # as if stopped in the baseline: no finished run at the top, uniform/ unfinished
        if path.is_file():
            path.unlink()
    for path in (out / "uniform").iterdir():
        if path.name != "checkpoint-1":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(ValueError, match="holds checkpoints of a run that did not finish"):
        cli.run_train(base)
    results = cli.run_train([*base, "--resume_from_checkpoint", "true"])
    assert results["uniform_outer_steps"] == 2 and (out / "uniform" / "checkpoint-2").is_dir()


def test_train_ends_with_a_summary_states_the_baseline_and_logs_each_tag_once(tmp_path, capsys, recwarn):
    """Issue 23 items 8 and 9: a summary with the folder, numbers and next command; no uniform run unless asked
    (said in the first lines); the final meta evaluation under its own tag; no known third-party warning."""
    from transformers import TrainerCallback

    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            self.state = state

    keep, out = Keep(), tmp_path / "run"
    argv = ["--recipe", "noisy_reweighting", "--max_steps", "2", "--logging_steps", "1", "--output_dir", str(out)]
    monkey_main = recipe_run.main
    try:
        recipe_run.main = lambda *args: monkey_main(*args, callbacks=[keep])
        results = cli.run_train([*argv, "--plot", "false"])
    finally:
        recipe_run.main = monkey_main
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[hf_fg2u] 1 process, backend none, device cpu"
    assert "no uniform-weights baseline (--compare_uniform true adds one)" in lines[1]
    assert "uniform_meta_loss" not in results and not (out / "uniform").exists()
    summary = "\n".join(lines[lines.index("") :])
    assert f"Output folder: {out.resolve()}" in summary and f"next: hf-fg2u weights {out.resolve()}" in summary
    assert f"{results['bilevel_meta_loss']:.4g}" in summary and "AUROC" in summary
    history = keep.state.log_history
    steps_of = [entry["step"] for entry in history if "meta_loss" in entry]
    assert steps_of == [1, 2]  # one meta_loss per step; the final evaluation is final_meta_loss
    assert [entry["final_meta_loss"] for entry in history if "final_meta_loss" in entry] == [
        pytest.approx(results["bilevel_meta_loss"])
    ]
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    documented = set(re.findall(r"`([a-z_*]+)`", readme[readme.index("| name | what it is |") :].split("\n\n")[0]))
    logged = {key for entry in history for key in entry if key != "step"}
    undocumented = {key for key in logged - documented if not any(key.endswith(t.lstrip("*")) for t in documented)}
    assert undocumented == set()
    noisy = [
        str(w.message)
        for w in recwarn
        if "is_gradient_checkpointing" in str(w.message) or "pin_memory" in str(w.message)
    ]
    assert noisy == []


def test_bare_command_prints_plain_text(capsys):
    cli.main([])
    text = capsys.readouterr().out
    assert text.startswith("The hf-fg2u command") and "``" not in text and "hf-fg2u weights" in text


def test_cpu_launch_echoes_the_environment_that_makes_cpu_ranks(tmp_path, monkeypatch, capsys):
    """Issue 23 item 9: on a machine without a GPU, --multi_gpu starts CPU ranks only with ACCELERATE_USE_CPU=1
    (DESIGN.md section 5); the echoed line shows it, and the launcher sets it."""
    seen = {}

    def fake_run(command, check, env=None):
        seen.update(env=env, command=command)
        (tmp_path / "results.json").write_text(json.dumps({"output_dir": str(tmp_path), "bilevel_meta_loss": 1.5}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cli.run_train(["--recipe", "soft_prompt", "--output_dir", str(tmp_path), "--num_processes", "2"])
    echoed = capsys.readouterr().out.splitlines()[0]
    assert echoed.startswith(f"[hf_fg2u] ACCELERATE_USE_CPU=1 {sys.executable} -m accelerate.commands.launch")
    assert "--multi_gpu" in echoed and "# CPU ranks (gloo)" in echoed
    assert seen["env"]["ACCELERATE_USE_CPU"] == "1"
    assert seen["env"]["HF_FG2U_SECRET_ARGS"] == "[]"  # set, empty: never one inherited from elsewhere


def test_launch_keeps_secrets_out_of_the_echo_and_argv_and_the_ranks_get_them(tmp_path, monkeypatch, capsys):
    """Issue 25 item 3: the echoed accelerate command (CI and cluster logs) and the ranks' argv (``ps``) carried
    --hub_token and the token inside --model_init_kwargs; now they travel in the ranks' environment."""
    seen, token, inner = {}, "hf_" + "S" * 30, "hf_" + "T" * 30

    def fake_run(command, check, env=None):
        seen.update(env=env, command=command)
        (tmp_path / "results.json").write_text(json.dumps({"output_dir": str(tmp_path), "bilevel_meta_loss": 1.5}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    kwargs = json.dumps({"token": inner, "revision": "main"})
    argv = ["--recipe", "soft_prompt", "--output_dir", str(tmp_path), "--num_processes", "2", "--hub_token", token,
            f"--model_init_kwargs={kwargs}", "--max_steps", "3"]  # fmt: skip
    cli.run_train(argv)
    printed = capsys.readouterr().out
    assert token not in printed and inner not in printed and "HF_FG2U_SECRET_ARGS" in printed
    assert not [arg for arg in seen["command"] if token in arg or inner in arg]
    assert seen["command"][-2:] == ["--max_steps", "3"]
    secret = json.loads(seen["env"]["HF_FG2U_SECRET_ARGS"])
    assert secret == ["--hub_token", token, f"--model_init_kwargs={kwargs}"]
    # one rank: the secrets come back from the environment into its options
    rank_argv = seen["command"][seen["command"].index("train") + 1 :]
    _, training, _ = arguments.parse_args([*rank_argv, *secret])  # what the rank parses
    assert training.hub_token == token and training.model_init_kwargs["token"] == inner and training.max_steps == 3
    parsed = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("HF_FG2U_SECRET_ARGS", seen["env"]["HF_FG2U_SECRET_ARGS"])
    monkeypatch.setattr(arguments, "parse_args", lambda argv: parsed.append(argv) or (None, None, None))
    monkeypatch.setattr(recipe_run, "main", lambda *args: {})
    cli.run_train(rank_argv)
    assert parsed == [[*rank_argv, *secret]] and "HF_FG2U_SECRET_ARGS" not in os.environ


def test_launch_hides_secrets_by_option_not_by_spelling_and_refuses_abbreviations(tmp_path, monkeypatch, capsys):
    """Issue 36 case 2: --model-init-kwargs (the dash spelling --help lists) and --hub_tok (an abbreviation argparse
    accepted) carried their tokens into the echoed launch line and every rank's argv."""
    seen, token = {}, "hf_" + "D" * 30

    def fake_run(command, check, env=None):
        seen.update(env=env, command=command)
        (tmp_path / "results.json").write_text(json.dumps({"output_dir": str(tmp_path), "bilevel_meta_loss": 1.5}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    kwargs = json.dumps({"token": token})
    base = ["--recipe", "soft_prompt", "--output_dir", str(tmp_path), "--num_processes", "2"]
    cli.run_train([*base, "--model-init-kwargs", kwargs, "--hub-token", token])
    printed = capsys.readouterr().out
    assert token not in printed and not [arg for arg in seen["command"] if token in arg]
    assert json.loads(seen["env"]["HF_FG2U_SECRET_ARGS"]) == ["--model-init-kwargs", kwargs, "--hub-token", token]
    seen.clear()
    for abbreviation in ("--hub_tok", "--model_init_kw"):
        with pytest.raises(
            ValueError, match=rf"Unknown option\(s\) \['{abbreviation}'\]: write each option's full"
        ) as refused:
            cli.run_train([*base, abbreviation, kwargs if "kw" in abbreviation else token])
        assert token not in str(refused.value) and not seen  # refused before any rank starts, value not shown


def test_only_the_first_rank_prints_warnings_and_progress_bars():
    import warnings

    import datasets

    try:
        for rank, expected in ((0, 1), (1, 0)):
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                recipe_run.quiet_replicas(rank)
                warnings.warn("rows were cut at max_length", UserWarning, stacklevel=1)
            assert len(seen) == expected and datasets.is_progress_bar_enabled() == (rank == 0), rank
    finally:
        datasets.enable_progress_bars()


def test_every_epoch_records_auroc_meta_and_eval_losses_and_its_weights(tmp_path):
    """The online mode's epoch-by-epoch record: epochs.json holds each epoch's AUROC (equal to that epoch's saved
    weights' AUROC), mean meta loss and eval loss; the last epoch's weights are the run's final weights."""
    import pandas
    import torch

    from hf_fg2u.lm.evaluation import auroc

    out = tmp_path / "epochs"
    argv = ["--recipe", "noisy_reweighting", "--num_train_epochs", "2", "--inner_reset_every", "0", "--output_dir",
            str(out), "--plot", "false", "--eval_strategy", "epoch", "--num_facts", "4", "--copies", "4",
            "--max_steps", "-1", "--logging_steps", "1"]  # fmt: skip
    cli.run_train(argv)
    epochs = json.loads((out / "epochs.json").read_text())
    assert [e["epoch"] for e in epochs] == [1, 2]
    for record in epochs:
        assert record["weights"] == f"epochs/weighted_dataset_epoch{record['epoch']}.parquet"
        weighted = pandas.read_parquet(out / record["weights"])
        expected = auroc(-torch.tensor(weighted["weight"].values), torch.tensor(weighted["is_corrupted"].values))
        assert record["auroc_corrupted"] == pytest.approx(expected, abs=1e-12)
        assert record["meta_loss"] > 0 and record["eval_loss"] > 0
    last = pandas.read_parquet(out / "epochs" / "weighted_dataset_epoch2.parquet")["weight"]
    final = pandas.read_parquet(out / "weighted_dataset.parquet")["weight"]
    assert (last.values == final.values).all()


def test_the_demo_meets_the_targets_it_prints(tmp_path):
    """`make demo` is the README's first command: its learned weights must separate the corrupted rows (AUROC ≥ 0.9)
    and lower the meta loss by ≥ 5% against the same budget at uniform weights. A weight parametrization that let the
    weights collapse onto a few rows once printed -113% here with no test failing."""
    results = cli.run_demo(["--output_dir", str(tmp_path / "demo"), "--disable_tqdm", "true"])
    assert results["auroc_corrupted"] >= 0.9
    assert results["bilevel_meta_loss"] <= 0.95 * results["uniform_meta_loss"]


def test_the_demo_runs_twice_in_a_row_and_still_refuses_another_run(tmp_path):
    """`make demo` failed the second time: the demo's own earlier folder "holds a finished run". A demo replaces its
    own earlier run (demo_run.json marks it) and still refuses a folder that holds another run."""
    fast = ["--max_steps", "2", "--disable_tqdm", "true"]
    demo = tmp_path / "demo"
    first = cli.run_demo(["--output_dir", str(demo), *fast])
    second = cli.run_demo(["--output_dir", str(demo), *fast])
    assert second["bilevel_outer_steps"] == first["bilevel_outer_steps"] == 2
    assert second["auroc_corrupted"] == pytest.approx(first["auroc_corrupted"], abs=1e-12)
    assert (demo / cli.DEMO_MARKER).is_file()
    (demo / cli.DEMO_MARKER).unlink()  # the same folder, no longer the demo's: refused as hf-fg2u train refuses it
    with pytest.raises(ValueError, match="holds a finished run"):
        cli.run_demo(["--output_dir", str(demo), *fast])


def test_weights_push_to_hub_offline_says_why_and_where_the_rows_stay(tmp_path, monkeypatch, capsys):
    """Issue 25: offline, `hf-fg2u weights RUN --push_to_hub` was a raw traceback."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    run = weighted_run(tmp_path / "run")
    refused = r"(?s)Could not push the weighted dataset to tester/weights: Offline.*Nothing is lost"
    with pytest.raises(SystemExit, match=refused):
        cli.run_weights([str(run), "--push_to_hub", "tester/weights"])
    assert (run / "weighted_dataset.parquet").is_file()


def test_weights_export_into_a_file_or_an_unwritable_folder_is_refused_before_the_report(tmp_path, capsys, monkeypatch):
    """Round 3 W18, W23: --output_dir naming a file, or a read-only folder, was a raw FileExistsError / OSError
    after the report was printed."""
    from hf_fg2u.trainer import run_folder

    run, taken = weighted_run(tmp_path / "run"), tmp_path / "data.jsonl"
    taken.write_text("{}\n")
    with pytest.raises(ValueError, match=r"output_dir='.*data.jsonl' is a file, not a folder"):
        cli.run_weights([str(run), "--export", "filtered", "--output_dir", str(taken)])

    def read_only(*args, **kwargs):  # as a read-only folder answers (chmod does not stop root)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_folder.tempfile, "TemporaryFile", read_only)
    with pytest.raises(ValueError, match=r"output_dir='.*locked' is not writable"):
        cli.run_weights([str(run), "--export", "filtered", "--output_dir", str(tmp_path / "locked")])
    assert capsys.readouterr().out == ""


def test_a_config_naming_another_recipe_than_the_flag_is_refused_and_one_without_starts_from_the_flags(tmp_path):
    """Round 3 C80, Y11: --recipe noisy_reweighting with a config saying recipe: domain_mixture ran one recipe on the
    other's defaults; a config without recipe: ran on the bare dataclass defaults, not any recipe's."""
    other = tmp_path / "other.yaml"
    other.write_text("recipe: domain_mixture\nmax_steps: 3\n")
    with pytest.raises(ValueError, match=r"other.yaml says recipe: domain_mixture, but --recipe noisy_reweighting"):
        arguments.parse_args(["--recipe", "noisy_reweighting", "--config", str(other)])
    bare = tmp_path / "bare.yaml"
    bare.write_text("max_steps: 3\n")
    for flags in ([], ["--recipe", "noisy_reweighting"], ["--recipe", "domain_mixture"]):
        script, training, _ = arguments.parse_args([*flags, "--config", str(bare)])
        expected = arguments.parse_args([*flags, "--max_steps", "3"])
        assert (script, training.to_dict()) == (expected[0], expected[1].to_dict())


def test_a_yaml_value_of_the_wrong_type_is_shown_without_its_credentials_and_cut_short(tmp_path):
    """Round 3 b3, Y02: a model_init_kwargs mapping was refused with its token and proxy password printed, and a
    list of aliases was printed whole (25 MB)."""
    token = "hf_" + "Sekrit" * 5
    config = write_yaml(tmp_path, f"model_init_kwargs: {{token: {token}, proxies: {{https: 'http://u:PW@proxy'}}}}\n")
    with pytest.raises(ValueError, match=r"model_init_kwargs expects a string") as refused:
        arguments.parse_args(["--config", config])
    assert token not in str(refused.value) and "PW" not in str(refused.value)
    config = write_yaml(tmp_path, "lora_target_modules: [[" + ", ".join(["q_proj"] * 1000) + "]]\n")
    with pytest.raises(ValueError, match=r"lora_target_modules expects a string") as refused:
        arguments.parse_args(["--config", config])
    assert len(str(refused.value)) < 400


def test_a_default_run_does_not_warn_about_its_own_split_layout_but_a_users_overlap_is_warned(tmp_path):
    """Round 3 C86: every default run (and every run without an eval split) warned that the meta rows repeat train
    rows and the eval rows are the meta rows: the recipe's own built-in data and its own choice of eval rows."""
    import warnings

    def overlap_warnings(argv):
        script, training, model = arguments.parse_args([*argv, "--output_dir", str(tmp_path / "run")])
        raw = recipe_run.user_splits(script) if recipe_run.uses_own_data(script) else registry.builtin_splits(script)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            recipe_run.build_trainer(script, training, model, raw)
        return [str(w.message).split(":")[0] for w in caught if "Every one of the" in str(w.message)]

    assert overlap_warnings(["--recipe", "noisy_reweighting"]) == []
    rows = [{"prompt": f"fact {i} is", "completion": f" {i % 3}"} for i in range(16)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:4]))
    files = ["--data_files", f"train={tmp_path / 'train.jsonl'}", f"meta={tmp_path / 'meta.jsonl'}"]
    warned = overlap_warnings(["--recipe", "noisy_reweighting", *files])
    assert warned == ["Every one of the 4 rows of the meta dataset is also a row of the train dataset"]


def test_a_long_run_keeps_the_first_and_the_last_epochs_weights_in_their_own_folder(tmp_path):
    """Round 3 Y23: one weighted_dataset_epochN.parquet per epoch at the top of output_dir, without limit (128 files
    in 60 s of a long run). Now in epochs/, epoch 1 and the last KEPT_EPOCHS kept, epochs.json saying which."""
    from types import SimpleNamespace

    from datasets import Dataset

    trainer = SimpleNamespace(export_weights=lambda: Dataset.from_dict({"text": ["a"], "weight": [1.0]}), log=print)
    callback, args = recipe_run.EpochWeights(trainer), SimpleNamespace(should_save=True, output_dir=str(tmp_path))
    for epoch in range(1, 13):
        callback.on_epoch_end(args, SimpleNamespace(epoch=float(epoch), global_step=epoch, log_history=[]), None)
    callback.on_train_end(args, None, None)
    kept = sorted(int(re.findall(r"\d+", path.stem)[0]) for path in (tmp_path / "epochs").iterdir())
    assert kept == [1, *range(13 - recipe_run.KEPT_EPOCHS, 13)] and list(tmp_path.glob("*.parquet")) == []
    records = json.loads((tmp_path / "epochs.json").read_text())
    assert [record["weights"] is not None for record in records] == [epoch in kept for epoch in range(1, 13)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"base: &base\n  max_steps: 3\nrun:\n  <<: *base\n", None),  # Y25: merge keys load
        (b"recipe: noisy_reweighting\nmax_steps: 3 # caf\xe9\n", r"config.yaml is not UTF-8 text .*save it as UTF-8"),
        (b'recipe: noisy_reweighting\nenv:\n  HF_FG2U_X: "a\\0b"\n', r"env values of \['HF_FG2U_X'\] .* NUL byte"),
        (b"recipe: noisy_reweighting\nenv:\n  HF_FG2U_X: [a, b]\n", r"env values of \['HF_FG2U_X'\] are lists"),
    ],
    ids=["merge_key", "latin1", "nul_in_env", "list_in_env"],
)
def test_yaml_merge_keys_load_and_bad_bytes_or_env_values_name_the_file_and_key(tmp_path, content, message):
    """Round 3 Y25, Y26, Y24: merge keys were a cryptic constructor error; invalid UTF-8 and a NUL byte in an env
    value were errors naming neither the file nor the key (a list value was exported as its str())."""
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    if message is None:
        assert parsing.load_yaml_config(path)["run"] == {"max_steps": 3}
        return
    with pytest.raises(ValueError, match=message):
        arguments.parse_args(["--config", str(path)])


def test_a_config_path_that_is_a_folder_says_so(tmp_path):
    """Round 3 Y28: --config pointing at a folder said the file 'does not exist'."""
    with pytest.raises(ValueError, match=r"Config .* is a folder; pass a YAML file"):
        arguments.parse_args(["--config", str(tmp_path)])


def test_weights_on_a_read_only_run_still_prints_the_report(tmp_path, monkeypatch, capsys):
    """Round 3 W24: a run folder on a read-only filesystem crashed writing weights_histogram.png, and the report
    was never printed."""
    from hf_fg2u.hub import report

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(report, "plot_weight_histogram", read_only)
    text = cli.run_weights([str(weighted_run(tmp_path / "run"))])
    assert "most up-weighted" in text and "Histogram skipped:" in text and "Read-only file system" in text


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--top", "0"], r"--top 0: pass how many rows"), (["--top", "-1"], r"--top -1: pass how many rows"),
     (["--export", "resampled", "--num_rows", "0"], r"--num_rows 0: pass how many rows to draw"),
     (["--num_rows", "-1"], r"--num_rows -1: pass how many rows to draw")],
)  # fmt: skip
def test_weights_counts_below_one_are_refused_by_their_flag(tmp_path, flags, message, capsys):
    """Round 3 W01, W02, W09, W10: --top 0 said 'k must be a positive int' (no flag), --num_rows 0 was torch's
    'cannot sample n_sample <= 0 samples'."""
    with pytest.raises(ValueError, match=message):
        cli.run_weights([str(weighted_run(tmp_path / "run")), *flags])
    assert capsys.readouterr().out == ""
