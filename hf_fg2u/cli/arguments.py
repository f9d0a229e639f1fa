"""The options of ``hf-fg2u train``: what to learn and on which data (``ScriptArguments``), which model
(``ModelArguments``), and the parser that reads them with ``BilevelConfig`` from a recipe's YAML and the CLI."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from hf_fg2u.cli.data_loading import uses_own_data
from hf_fg2u.cli.launch import add_launch_arguments
from hf_fg2u.cli.parsing import ConfigParser, _pop_config, find_config, load_yaml_config
from hf_fg2u.cli.registry import check_recipe, recipe_config
from hf_fg2u.trainer.config import BilevelConfig


@dataclass
class ScriptArguments:
    """What to learn and on which data."""

    _argument_group_name = "recipe: what to learn and on which data"

    recipe: str = field(
        default="noisy_reweighting",
        metadata={"help": "A packaged recipe (hf_fg2u/recipes/NAME.yaml): noisy_reweighting, noisy_reweighting_real, "
                  "domain_mixture, soft_prompt, data_rater."},
    )  # fmt: skip
    outer: str = field(
        default="example_weights",
        metadata={"help": "'example_weights' (a weight per row), 'weight_net', 'data_rater' (for hf-fg2u score)."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hub dataset, a local folder of JSON/JSONL/CSV/Parquet files (each file's name gives "
                  "its split: train.jsonl, meta.jsonl, eval.jsonl), or a builder (json, csv, parquet) for "
                  "--data_files. Default: built-in data."},
    )  # fmt: skip
    dataset_config: str | None = field(default=None, metadata={"help": "The dataset's config name."})
    data_files: list[str] | None = field(
        default=None,
        metadata={"help": "Files by split, as in datasets: train=a.jsonl meta=b.jsonl [eval=c.jsonl] (a path alone "
                  "goes to train). The builder follows the extension (.json/.jsonl, .csv, .parquet, .txt)."},
    )  # fmt: skip
    dataset_train_split: str = field(default="train", metadata={"help": "Split for the inner (training) data."})
    dataset_meta_split: str | None = field(
        default=None, metadata={"help": "Split for the meta (outer) data; default 'meta' or 'validation'."}
    )
    dataset_eval_split: str | None = field(
        default=None,
        metadata={"help": "Held-out split for evaluation, distinct from the meta split; default 'eval' or 'test' "
                  "when present (else only the meta loss is reported)."},
    )  # fmt: skip
    meta_dataset_name: str | None = field(
        default=None, metadata={"help": "Meta data from another dataset, folder or file (instead of a split)."}
    )
    meta_dataset_config: str | None = field(default=None, metadata={"help": "The meta dataset's config name."})
    meta_dataset_split: str = field(default="train", metadata={"help": "The split of --meta_dataset_name."})
    weight_parametrization: str = field(
        default="softmax",
        metadata={"help": "outer=example_weights: how a logit becomes a row's weight, 'softmax' (unbounded) or "
                  "'sigmoid' (a keep-probability: rows can be dropped but none outweighs a row kept in full)."},
    )  # fmt: skip
    weight_max_logit: float | None = field(
        default=None,
        metadata={"help": "outer=example_weights: cap the logits here after every outer step (they start at 0): "
                  "0 lets a row be pushed down but never above where every row started."},
    )  # fmt: skip
    balance_column: str | None = field(
        default=None,
        metadata={"help": "outer=example_weights: measure each row's weight against the mean of the rows with its "
                  "value in this column (e.g. completion, where the answers are a few labels), so every value keeps "
                  "its share of the loss and the weights rank rows within it (docs/value.md measures why). "
                  "outer=data_rater: the rater also reads each row's value here (a threshold per value)."},
    )  # fmt: skip
    domain_column: str = field(default="domain", metadata={"help": "domain_mixture: column naming the domain."})
    target_domain: str = field(default="facts_a", metadata={"help": "domain_mixture: domain of the meta data."})
    answer_only: bool = field(
        default=True, metadata={"help": "Built-in data only: train on the completion, not the prompt."}
    )
    num_facts: int = field(default=12, metadata={"help": "Built-in data: facts (per domain)."})
    copies: int = field(default=8, metadata={"help": "Built-in data: training rows per fact."})
    corrupted_fraction: float = field(default=0.4, metadata={"help": "Built-in data: fraction of wrong rows."})
    num_domains: int = field(default=3, metadata={"help": "Built-in domain_mixture data: number of domains."})
    generation_seed: int = field(default=0, metadata={"help": "Seed of the built-in data."})
    num_virtual_tokens: int = field(default=4, metadata={"help": "soft_prompt: virtual tokens."})
    weight_net_hidden_size: int = field(default=8, metadata={"help": "weight_net: hidden units."})
    rater_hidden_size: int = field(default=0, metadata={"help": "data_rater: hidden units (0: logistic)."})
    compare_uniform: bool = field(
        default=False,
        metadata={"help": "Also run the same budget with the outer variables frozen, and compare (twice the time)."},
    )
    plot: bool = field(default=True, metadata={"help": "Write PNG plots into output_dir."})
    time_budget_s: float | None = field(
        default=None,
        metadata={"help": "Stop the bilevel run after the outer step that passes this many seconds (max_steps still "
                  "bounds it); it then saves and reports as at max_steps. For a job's time limit, or methods "
                  "compared at equal wall-clock."},
    )  # fmt: skip
    final_stage_steps: int = field(
        default=0,
        metadata={"help": "noisy_reweighting: then train a fresh adapter for this many steps with the learned "
                  "weights as a plain weighted loss (no bilevel), saved in output_dir/final_adapter. With an eval "
                  "split, a second one on uniform weights is trained and both are scored there."},
    )  # fmt: skip

    def __post_init__(self):
        if self.final_stage_steps < 0:
            raise ValueError(
                f"final_stage_steps={self.final_stage_steps}: pass a number of steps >= 1 for the final stage, or 0 "
                "(the default) for none."
            )


@dataclass
class ModelArguments:
    """Which model, and its LoRA adapter."""

    _argument_group_name = "model and its LoRA adapter"

    model_name_or_path: str | None = field(default=None, metadata={"help": "Default: a tiny Llama from config."})
    model_revision: str = field(default="main", metadata={"help": "The model's revision: a branch, tag or commit."})
    dtype: str = field(
        default="float32",
        metadata={"help": "The dtype the model is loaded in ('auto': the checkpoint's own).",
                  "choices": ["auto", "bfloat16", "float16", "float32"]},
    )  # fmt: skip
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model repository's own code."})
    gguf_file: str | None = field(default=None, metadata={"help": "A GGUF file inside model_name_or_path."})
    attn_implementation: str = field(default="eager", metadata={"help": "eager, sdpa (math kernel is used)."})
    tiny_hidden_size: int = field(default=32, metadata={"help": "Built-in tiny model: hidden size."})
    tiny_num_layers: int = field(default=2, metadata={"help": "Built-in tiny model: layers."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        metadata={"help": "Modules that get LoRA adapters."},
    )
    lora_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Only these decoder layers get adapters (peft's layers_to_transform), e.g. the top few: "
                  "backward passes stop there (SmolLM2-135M, top 8 of 30 layers: a LoRA step 25%% cheaper)."},
    )  # fmt: skip


# Options of the built-in toy data and tiny model: they do nothing with --dataset_name/--data_files and a model of
# the user's, so --help lists them in a group of their own, last.
BUILTIN_OPTIONS = (
    "answer_only", "num_facts", "copies", "corrupted_fraction", "num_domains", "target_domain", "generation_seed",
    "tiny_hidden_size", "tiny_num_layers",
)  # fmt: skip


BUILTIN_GROUP = "built-in toy data and tiny model (without --dataset_name/--data_files/--model_name_or_path)"


def make_parser() -> ConfigParser:
    """The ``hf-fg2u train`` parser: recipe options, bilevel options, model/LoRA, the Trainer's, then the toy
    data's."""
    parser = ConfigParser(
        (ScriptArguments, BilevelConfig, ModelArguments), prog="hf-fg2u train",
        usage="hf-fg2u train [--recipe NAME | --config FILE] [--num_processes N] [--OPTION VALUE ...]",
        description="Learn outer variables (data weights, a soft prompt) by bilevel meta-tuning. The packaged YAML "
        "of --recipe (or of --config's recipe:) gives the defaults.",
    )  # fmt: skip
    add_launch_arguments(parser.run_group)
    parser.set_defaults(output_dir="outputs/hf_fg2u")
    move_to_last_group(parser, BUILTIN_OPTIONS, BUILTIN_GROUP)
    hide_rare_trainer_options(parser)
    return parser


# The Trainer's options --help lists; --help_all lists its ~100 others (all are accepted either way).
COMMON_TRAINER_OPTIONS = (
    "output_dir", "per_device_train_batch_size", "num_train_epochs", "max_steps", "learning_rate",
    "lr_scheduler_type", "optim", "bf16", "logging_steps", "report_to", "eval_strategy", "save_strategy",
    "save_steps", "push_to_hub", "hub_model_id", "hub_token", "seed", "use_cpu", "resume_from_checkpoint",
)  # fmt: skip


class _FullHelp(argparse.Action):
    """``--help_all``: the help with every option of the Trainer, then exit."""

    def __init__(self, option_strings, dest, **kwargs):
        kwargs.update(dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0)
        super().__init__(option_strings, help="Show every option, the Trainer's ~100 others too, and exit.", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        for action, text in parser.hidden_help.items():
            action.help = text
        parser.print_help()
        parser.exit()


def hide_rare_trainer_options(parser: ConfigParser) -> None:
    """Keep ``--help`` to the options a run usually sets; ``--help_all`` shows the Trainer's others."""
    group = parser._trainer_group
    group.description = "The common ones; every TrainingArguments option is accepted (--help_all lists them)."
    parser.hidden_help = {}
    for action in group._group_actions:
        if action.dest not in COMMON_TRAINER_OPTIONS:
            parser.hidden_help[action] = action.help
            action.help = argparse.SUPPRESS
    parser.add_argument("--help_all", action=_FullHelp)


def move_to_last_group(parser: argparse.ArgumentParser, dests: tuple[str, ...], title: str) -> None:
    """List the options of ``dests`` under a help group ``title`` placed last (parsing is unchanged)."""
    group = parser.add_argument_group(title)
    for old in parser._action_groups:
        if old is not group:
            moved = [action for action in old._group_actions if action.dest in dests]
            old._group_actions[:] = [action for action in old._group_actions if action.dest not in dests]
            group._group_actions.extend(moved)


def config_recipe(config, flag: str | None):
    """The recipe whose packaged YAML a user's ``config`` starts from: the one its ``recipe:`` names, else
    ``--recipe`` (default noisy_reweighting), as without ``--config``. A ``--recipe`` naming another is refused:
    one of the two would be silently ignored."""
    named = load_yaml_config(config).get("recipe")
    if named is None:
        return flag or ScriptArguments.recipe
    if flag is not None and named != flag:
        raise ValueError(
            f"{config} says recipe: {named}, but --recipe {flag} was given: the run would mix one recipe's defaults "
            f"with the other's code. Drop --recipe, or make the two agree."
        )
    return named


def parse_args(argv: list[str] | None = None):
    """(script_args, training_args, model_args) from ``--config FILE`` or else the packaged YAML of ``--recipe``
    (default noisy_reweighting), overridden by the CLI flags. The YAML's ``builtin_data:`` options (toy sizes, a
    short ``max_length``) hold only when the run generates its data: with ``--dataset_name``/``--data_files`` the
    documented defaults stand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    config = None
    own_config, _ = _pop_config(argv)
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--recipe")
    flag = early.parse_known_args(argv)[0].recipe
    if own_config is None:
        config = recipe_config(flag or ScriptArguments.recipe)
    else:  # a user's config starts from the packaged recipe it names, as --recipe does, then overrides it
        named = config_recipe(own_config, flag)
        if isinstance(named, str) and find_config(own_config).resolve() != recipe_config(named).resolve():
            parser.set_defaults(**parser.typed_config(recipe_config(named)))
    parsed = parser.parse_args_and_config(argv, config=config)
    if parser.builtin_data_defaults and not uses_own_data(parsed[0]):
        parser.set_defaults(**parser.builtin_data_defaults)
        parsed = parser.parse_args_into_dataclasses(args=_pop_config(argv)[1])
    script_args, training_args, model_args, *launch_options = parsed
    if launch_options:
        raise ValueError(
            f"{sorted(vars(launch_options[0]))} start processes under `hf-fg2u train` only; with recipes/train.py "
            "use `accelerate launch --config_file ... recipes/train.py ...`."
        )
    check_recipe(script_args.recipe)
    return script_args, training_args, model_args
