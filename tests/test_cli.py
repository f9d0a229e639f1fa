"""The hf-fg2u CLI and recipes: YAML + CLI overrides, clear errors, each recipe's offline default runs."""

import json
from pathlib import Path

import pytest
import yaml

from hf_fg2u import cli, recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_cli_flags_override_yaml_values(tmp_path):
    script, training, model = recipe.parse_args(
        ["--config", str(RECIPES / "noisy_reweighting.yaml"), "--max_steps", "3", "--lora_r", "2"]
    )
    assert training.max_steps == 3 and model.lora_r == 2
    assert script.recipe == "noisy_reweighting" and training.unroll_steps == 2 and training.directions == "orthogonal"
    assert training.inner_lr == pytest.approx(0.005)


def test_demo_arguments_match_the_noisy_recipe_yaml():
    parsed_demo = recipe.parse_args(cli.DEMO_ARGS)
    parsed_yaml = recipe.parse_args(
        ["--config", str(RECIPES / "noisy_reweighting.yaml"), "--output_dir", "outputs/demo"]
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
        recipe.parse_args(["--config", str(path)])


def test_missing_file_unknown_recipe_and_wrong_type(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        recipe.parse_args(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ValueError, match="recipe='magic'"):
        recipe.parse_args(["--recipe", "magic"])
    with pytest.raises(SystemExit):
        recipe.parse_args(["--max_steps", "many"])
    assert "invalid int value: 'many'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown command 'fly'"):
        cli.main(["fly"])
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["train", "--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("name", ["noisy_reweighting", "domain_mixture", "soft_prompt"])
def test_each_recipe_runs_its_offline_default(tmp_path, name):
    out = tmp_path / name
    args = ["--config", str(RECIPES / f"{name}.yaml"), "--max_steps", "2", "--output_dir", str(out)]
    args += ["--num_directions", "2", "--directions", "rademacher", "--plot", "false"]
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


def test_recipe_yaml_files_parse():
    for path in RECIPES.glob("*.yaml"):
        values = yaml.safe_load(path.read_text())
        assert values["recipe"] in recipe.RECIPES
        recipe.parse_args(["--config", str(path)])
