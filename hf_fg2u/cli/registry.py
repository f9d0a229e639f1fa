"""The recipe registry: every packaged YAML (``hf_fg2u/recipes/NAME.yaml``) is a recipe, registered here with how
it builds its built-in data and its outer module."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hf_fg2u.cli.arguments import ScriptArguments

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datasets import DatasetDict

from hf_fg2u.lm import toy_data as builtin_data
from hf_fg2u.lm.formats import dataset_format
from hf_fg2u.outer import DataRater, DomainWeights, ExampleWeights, SoftPrompt, WeightNet
from hf_fg2u.outer.example_weights import META_GROUP
from hf_fg2u.registry import Registry

RECIPES_DIR = Path(__file__).parents[1] / "recipes"  # the YAML configs and accelerate configs, shipped as package data


@dataclass(frozen=True)
class Recipe:
    """A registered recipe: its packaged YAML (``hf_fg2u/recipes/NAME.yaml``), the built-in data it generates
    when the user gives none, and the outer module it learns (whose ``weighs_rows`` says whether the run writes a
    weighted dataset and may train a final adapter on it)."""

    builtin_data: Callable[[ScriptArguments], DatasetDict]
    make_outer: Callable
    # after the bilevel run: (script_args, raw splits, trainer) -> numbers for results.json (data_rater: the fit)
    after_training: Callable | None = None

    @staticmethod
    def yaml(name: str) -> Path:
        return RECIPES_DIR / f"{name}.yaml"


RECIPES: Registry[Recipe] = Registry("recipe")  # filled by register_recipe below; every packaged YAML is one of them


def register_recipe(name: str, recipe: Recipe) -> None:
    """Make ``--recipe name`` load ``hf_fg2u/recipes/name.yaml`` and build its data and outer module with
    ``recipe``."""
    if not Recipe.yaml(name).is_file():
        raise ValueError(f"recipe {name!r} has no packaged YAML {Recipe.yaml(name)}; add it beside the others.")
    RECIPES.register(name, recipe)


def recipe_config(name: str) -> Path:
    """The packaged YAML of recipe ``name`` (shipped inside the package, so it works from any directory)."""
    check_recipe(name)
    return Recipe.yaml(name)


def check_recipe(name: str) -> Recipe:
    return RECIPES.get(name)


def builtin_splits(script_args: ScriptArguments) -> DatasetDict:
    """The recipe's built-in prompt/completion rows, raw (the trainer tokenizes them as it does the user's);
    ``answer_only=False``: as text rows, trained on every token."""
    splits = RECIPES[script_args.recipe].builtin_data(script_args)
    splits = DatasetDict({"train": splits["train"], "meta": splits["meta"]})  # their "eval" is the meta set again
    if script_args.answer_only:
        return splits
    return splits.map(lambda row: {"text": row["prompt"] + row["completion"]}, remove_columns=["prompt", "completion"])


def _facts(s: ScriptArguments) -> DatasetDict:
    return builtin_data.make_fact_splits(s.num_facts, s.copies, s.generation_seed, s.corrupted_fraction)


def _clean_facts(s: ScriptArguments) -> DatasetDict:
    return builtin_data.make_fact_splits(s.num_facts, s.copies, s.generation_seed, 0.0)


def _domain_facts(s: ScriptArguments) -> DatasetDict:
    return builtin_data.make_fact_domain_splits(
        s.num_domains, s.num_facts, s.copies, s.generation_seed, s.target_domain
    )


def make_outer(script_args: ScriptArguments, splits: DatasetDict, model):
    return RECIPES[script_args.recipe].make_outer(script_args, splits, model)


def _row_weights(s: ScriptArguments, splits: DatasetDict, model):
    if s.outer == "weight_net":
        if s.balance_column is not None:
            raise ValueError("--balance_column applies to outer=example_weights only (a weight per row).")
        return WeightNet(hidden_size=s.weight_net_hidden_size)
    if s.outer == "data_rater":
        return _data_rater(s, splits["train"])
    if s.outer != "example_weights":
        raise ValueError(
            f"outer={s.outer!r} is not known for {s.recipe}; use example_weights, weight_net or data_rater."
        )
    if s.balance_column is not None:
        return _grouped_weights(s, splits["train"])
    return ExampleWeights(len(splits["train"]), parametrization=s.weight_parametrization, max_logit=s.weight_max_logit)


def _data_rater(s: ScriptArguments, train) -> DataRater:
    """A rater reading each row's loss, and its ``--balance_column`` value when given; it records the rows' format."""
    groups = None if s.balance_column is None else _balance_groups(s, train)
    return DataRater(
        hidden_size=s.rater_hidden_size, group_column=s.balance_column, groups=groups,
        row_format=dataset_format(train.column_names),
    )  # fmt: skip


def _balance_groups(s: ScriptArguments, train) -> list[str]:
    """The values of ``--balance_column`` over the train rows; refused where the groups are too small to rank rows
    in (a free-text column would put every row alone, and every weight would stay 1)."""
    if s.balance_column not in train.column_names:
        raise ValueError(f"--balance_column {s.balance_column!r} is not a column of the train data: "
                         f"{train.column_names}.")  # fmt: skip
    values = [str(value) for value in train[s.balance_column]]
    names = group_names(train, s.balance_column)
    check_balance_groups(s.balance_column, values)
    return names


def _grouped_weights(s: ScriptArguments, train) -> ExampleWeights:
    """ExampleWeights measured within the groups of ``--balance_column``."""
    names = _balance_groups(s, train)
    values = [str(value) for value in train[s.balance_column]]
    outer = ExampleWeights(
        len(train), parametrization=s.weight_parametrization, max_logit=s.weight_max_logit, num_groups=len(names)
    )
    index = {name: i for i, name in enumerate(names)}
    ids = train["example_id"] if "example_id" in train.column_names else range(len(train))
    groups = [0] * len(train)
    for row_id, value in zip(ids, values, strict=True):
        groups[row_id] = index[value]
    outer.set_groups(groups)
    return outer


def check_balance_groups(column: str, values: list) -> None:
    """Refuse a ``--balance_column`` with a value held by a single row: balancing fixes such a row's weight (its
    group's share is its own), so a column of mostly distinct values (free text, ids) would make every weight
    equal, silently."""
    counts = Counter(str(value) for value in values)
    if min(counts.values()) < 2:
        raise ValueError(
            f"--balance_column {column!r} has {len(counts)} values over {len(values)} rows, some held by a single "
            "row, whose weight could then never move: balance on a column of a few labels, or drop it."
        )


def group_names(train, column: str) -> list[str]:
    """The groups of ``--balance_column``: its values over the train rows, sorted (group i is the i-th)."""
    return sorted({str(value) for value in train[column]})


def with_meta_groups(s: ScriptArguments, splits: DatasetDict, project_group_shift: bool) -> DatasetDict:
    """With ``--balance_column`` and ``project_group_shift``: each meta row's group in a ``meta_group`` column (the
    train rows' numbering, -1 for a value no train row has), where the trainer takes the answer-shift directions.
    Refused when the meta rows lack the balance column."""
    if s.balance_column is None or s.outer != "example_weights" or not project_group_shift:
        return splits
    meta = splits["meta"]
    if s.balance_column not in meta.column_names:
        raise ValueError(
            f"--balance_column {s.balance_column!r} is not a column of the meta data ({meta.column_names}): the "
            "directions that only shift which answer is preferred are taken on the meta rows' answers. Use meta "
            "rows of the train rows' format, or pass --project_group_shift false."
        )
    index = {name: i for i, name in enumerate(group_names(splits["train"], s.balance_column))}
    groups = [-1 if value is None else index.get(str(value), -1) for value in meta[s.balance_column]]
    return DatasetDict({**splits, "meta": meta.add_column(META_GROUP, groups)})


def _domain_weights(s: ScriptArguments, splits: DatasetDict, model):
    train = splits["train"]
    if s.domain_column not in train.column_names:
        raise ValueError(
            f"The train data has no {s.domain_column!r} column, which names each row's domain for domain_mixture "
            f"(columns: {train.column_names}). Name your column with --domain_column."
        )
    missing = [row for row, value in enumerate(train[s.domain_column]) if value is None or value == ""]
    if missing:
        raise ValueError(
            f"{len(missing)} train rows have no domain in column {s.domain_column!r} (null or empty; rows "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}). Give every row a domain, or drop those rows."
        )
    return DomainWeights(sorted(train.unique(s.domain_column)), domain_column=s.domain_column)


def _soft_prompt(s: ScriptArguments, splits: DatasetDict, model):
    hidden = model.get_input_embeddings().weight.shape[1]
    return SoftPrompt(s.num_virtual_tokens, hidden, init_std=0.5)


register_recipe("noisy_reweighting", Recipe(_facts, _row_weights))


register_recipe("noisy_reweighting_real", Recipe(_facts, _row_weights))


register_recipe("domain_mixture", Recipe(_domain_facts, _domain_weights))


register_recipe("soft_prompt", Recipe(_clean_facts, _soft_prompt))


def _fit_data_rater(s: ScriptArguments, splits: DatasetDict, trainer) -> dict:
    """The rater fitted to the per-row weights the run learned (nothing to fit when it learned a rater itself)."""
    from hf_fg2u.trainer.rater_fit import fit_rater

    return fit_rater(trainer, _data_rater(s, splits["train"])) if isinstance(trainer.outer, ExampleWeights) else {}


register_recipe("data_rater", Recipe(_facts, _row_weights, after_training=_fit_data_rater))
