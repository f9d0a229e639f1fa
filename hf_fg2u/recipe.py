"""The recipes behind ``hf-fg2u train`` (TRL-style: script, training and model arguments, YAML + CLI).

    hf-fg2u train --recipe noisy_reweighting                  # the packaged YAML: offline default
    hf-fg2u train --recipe noisy_reweighting --max_steps 10   # CLI flags override the YAML
    hf-fg2u train --config my_run.yaml                        # your own YAML (typed values, an env: block)
    hf-fg2u train --recipe noisy_reweighting --model_name_or_path HuggingFaceTB/SmolLM2-135M \\
        --data_files train=train.jsonl meta=meta.jsonl eval=eval.jsonl   # your model and your files

Recipes: ``noisy_reweighting`` (ExampleWeights or WeightNet on data with a corrupted subset),
``domain_mixture`` (DomainWeights, meta data from one target domain), ``soft_prompt`` (SoftPrompt outer,
LoRA inner). Without ``--model_name_or_path`` a tiny Llama is built from config; without ``--dataset_name`` or
``--data_files`` the package generates data with known structure (``hf_fg2u.data``). Your data may be in any
format ``BilevelTrainer`` tokenizes (``text``, ``prompt`` + ``completion``, ``messages``; see ``hf_fg2u.formats``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import DatasetDict, load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback

from . import data as builtin_data
from .config import BilevelConfig
from .launch import add_launch_arguments
from .model_card import WEIGHTED_DATASET_FILE
from .outer import DomainWeights, ExampleWeights, SoftPrompt, WeightNet
from .parsing import ConfigParser, _pop_config
from .trainer import BilevelTrainer, auroc

RECIPES_DIR = Path(__file__).parent / "recipes"  # the YAML configs and accelerate configs, shipped as package data


@dataclass(frozen=True)
class Recipe:
    """A registered recipe: its packaged YAML (``hf_fg2u/recipes/NAME.yaml``), the built-in data it generates
    when the user gives none, the outer module it learns, and whether that is one weight per train row (then the
    run writes the weighted dataset and may train a final adapter on it)."""

    builtin_data: Callable[[ScriptArguments], DatasetDict]
    make_outer: Callable
    weights_rows: bool = False

    @staticmethod
    def yaml(name: str) -> Path:
        return RECIPES_DIR / f"{name}.yaml"


RECIPES: dict[str, Recipe] = {}  # filled by register_recipe below; every packaged YAML is one of them


def register_recipe(name: str, recipe: Recipe) -> None:
    """Make ``--recipe name`` load ``hf_fg2u/recipes/name.yaml`` and build its data and outer module with
    ``recipe``."""
    if not Recipe.yaml(name).is_file():
        raise ValueError(f"recipe {name!r} has no packaged YAML {Recipe.yaml(name)}; add it beside the others.")
    RECIPES[name] = recipe


@dataclass
class ScriptArguments:
    """What to learn and on which data."""

    _argument_group_name = "recipe: what to learn and on which data"

    recipe: str = field(
        default="noisy_reweighting",
        metadata={"help": "A packaged recipe (hf_fg2u/recipes/NAME.yaml): noisy_reweighting, noisy_reweighting_real, "
                  "domain_mixture, soft_prompt."},
    )  # fmt: skip
    outer: str = field(
        default="example_weights",
        metadata={"help": "noisy_reweighting only: 'example_weights' (a weight per example) or 'weight_net'."},
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
                  "its share of the loss and the weights rank rows within it (docs/value.md measures why)."},
    )  # fmt: skip
    domain_column: str = field(default="domain", metadata={"help": "domain_mixture: column naming the domain."})
    target_domain: str = field(default="facts_a", metadata={"help": "domain_mixture: domain of the meta data."})
    answer_only: bool = field(
        default=True, metadata={"help": "Built-in data only: train on the answer after '=' or '>', not the prompt."}
    )
    num_facts: int = field(default=12, metadata={"help": "Built-in data: facts (per domain)."})
    copies: int = field(default=8, metadata={"help": "Built-in data: training rows per fact."})
    corrupted_fraction: float = field(default=0.4, metadata={"help": "Built-in data: fraction of wrong rows."})
    num_domains: int = field(default=3, metadata={"help": "Built-in domain_mixture data: number of domains."})
    generation_seed: int = field(default=0, metadata={"help": "Seed of the built-in data."})
    num_virtual_tokens: int = field(default=4, metadata={"help": "soft_prompt: virtual tokens."})
    weight_net_hidden_size: int = field(default=8, metadata={"help": "weight_net: hidden units."})
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
        description="Learn outer variables (data weights, a soft prompt) by bilevel meta-tuning. Without --config, "
        "the packaged YAML of --recipe gives the defaults.",
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


def recipe_config(name: str) -> Path:
    """The packaged YAML of recipe ``name`` (shipped inside the package, so it works from any directory)."""
    check_recipe(name)
    return Recipe.yaml(name)


def check_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"recipe={name!r} is not known; use one of {sorted(RECIPES)}.")
    return RECIPES[name]


def parse_args(argv: list[str] | None = None):
    """(script_args, training_args, model_args) from ``--config FILE`` or else the packaged YAML of ``--recipe``
    (default noisy_reweighting), overridden by the CLI flags. The YAML's ``builtin_data:`` options (toy sizes, a
    short ``max_length``) hold only when the run generates its data: with ``--dataset_name``/``--data_files`` the
    documented defaults stand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    config = None
    if not any(arg == "--config" or arg.startswith("--config=") for arg in argv):
        early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        early.add_argument("--recipe", default=ScriptArguments.recipe)
        named, _ = early.parse_known_args(argv)
        config = recipe_config(named.recipe)
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


# -- model and data ---------------------------------------------------------------------------------------------
def load_model_and_tokenizer(model_args: ModelArguments, seed: int, init_kwargs: dict | None = None):
    """The model and tokenizer of ``model_args`` (``init_kwargs``: BilevelConfig.model_init_kwargs), or the
    built-in tiny Llama and character tokenizer without ``model_name_or_path``."""
    if model_args.model_name_or_path is None:
        tokenizer = builtin_data.make_char_tokenizer()
        torch.manual_seed(seed)
        # initializer_range 0.2: behind RMSNorm a frozen lm_head drawn with 0.02 caps a 32-wide model's logits
        # near ±0.6, and no adapter could fit anything.
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=model_args.tiny_hidden_size,
            intermediate_size=2 * model_args.tiny_hidden_size, num_hidden_layers=model_args.tiny_num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            attn_implementation=model_args.attn_implementation, initializer_range=0.2,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        return LlamaForCausalLM(config), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, **tokenizer_kwargs(model_args))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = from_pretrained_kwargs(model_args, init_kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    if model_args.gguf_file:
        model = dequantized_copy(model, kwargs["dtype"])
        model.config.gguf_file = model_args.gguf_file  # saved with the run, so that load_run finds the base again
    return model, tokenizer


def tokenizer_kwargs(model_args: ModelArguments) -> dict:
    kwargs = {"revision": model_args.model_revision, "trust_remote_code": model_args.trust_remote_code}
    return kwargs | ({"gguf_file": model_args.gguf_file} if model_args.gguf_file else {})


def from_pretrained_kwargs(model_args: ModelArguments, init_kwargs: dict | None = None) -> dict:
    """``from_pretrained``'s keyword arguments from TRL's ``ModelConfig`` names; ``--model_init_kwargs`` win."""
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    kwargs = tokenizer_kwargs(model_args) | {"attn_implementation": model_args.attn_implementation, "dtype": dtype}
    return kwargs | dict(init_kwargs or {})


def dequantized_copy(model, dtype=torch.float32):
    """A GGUF-loaded model is already dequantised to fp32 but still marked quantized, which the Trainer refuses
    to train and save; rebuild the architecture from its config without the mark and load the weights."""
    config = model.config
    config.quantization_config = None
    delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation)
    fresh.load_state_dict(model.state_dict())
    return fresh.to(torch.float32 if dtype == "auto" else dtype)


def builtin_splits(script_args: ScriptArguments) -> DatasetDict:
    splits = RECIPES[script_args.recipe].builtin_data(script_args)
    return DatasetDict({"train": splits["train"], "meta": splits["meta"]})  # their "eval" is the meta set again


def _facts(s: ScriptArguments) -> DatasetDict:
    return builtin_data.make_fact_splits(s.num_facts, s.copies, s.generation_seed, s.corrupted_fraction)


def _clean_facts(s: ScriptArguments) -> DatasetDict:
    return builtin_data.make_fact_splits(s.num_facts, s.copies, s.generation_seed, 0.0)


def _domain_facts(s: ScriptArguments) -> DatasetDict:
    return builtin_data.make_fact_domain_splits(
        s.num_domains, s.num_facts, s.copies, s.generation_seed, s.target_domain
    )


DATA_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def uses_own_data(script_args: ScriptArguments) -> bool:
    return bool(script_args.dataset_name or script_args.data_files)


def parse_data_files(entries: list[str]) -> dict[str, list[str]]:
    """``["train=a.jsonl", "meta=b.jsonl", "c.jsonl"]`` -> ``{"train": ["a.jsonl", "c.jsonl"], "meta": [...]}``."""
    files: dict[str, list[str]] = {}
    for entry in entries:
        split, sep, path = entry.partition("=")
        if not sep:
            split, path = "train", entry
        if not re.fullmatch(r"\w+", split) or not path:
            raise ValueError(f"--data_files entry {entry!r} is not SPLIT=PATH (e.g. meta=meta.jsonl) or a path.")
        files.setdefault(split, []).append(path)
    return files


def folder_data_files(folder: Path) -> dict[str, list[str]]:
    """The data files of a folder by split, the split being the file name's first word (``meta.jsonl``,
    ``train-00000-of-00002.parquet``)."""
    files: dict[str, list[str]] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in DATA_BUILDERS:
            files.setdefault(re.match(r"[A-Za-z0-9_]*", path.name).group() or "train", []).append(str(path))
    if not files:
        raise ValueError(f"{folder} holds no data file ({', '.join(DATA_BUILDERS)}).")
    return files


def builder_of(files: dict[str, list[str]]) -> str:
    builders = {DATA_BUILDERS.get(Path(f).suffix.lower()) for paths in files.values() for f in paths}
    if len(builders) != 1 or None in builders:
        raise ValueError(
            f"Cannot tell how to read {files}: use files of one kind ({', '.join(DATA_BUILDERS)}), or name the "
            "builder with --dataset_name json|csv|parquet."
        )
    return builders.pop()


def load_data(name: str | None, config: str | None, data_files: list[str] | None) -> DatasetDict:
    """A Hub dataset, a local folder (its files by split), a local file (split "train"), or files by split
    (``--data_files``). Local files are read one split at a time, so the splits' columns may differ (a train file
    with ``is_corrupted``, a meta file without)."""
    files = parse_data_files(data_files) if data_files else None
    if name is not None and Path(name).is_dir():
        folder = Path(name)
        if files:
            files = {k: [p if Path(p).exists() else str(folder / p) for p in v] for k, v in files.items()}
        else:
            files = folder_data_files(folder)
        return load_files(files)
    if name is not None and Path(name).is_file():  # one local file: its rows are the "train" split
        return load_files({"train": [name]})
    if name is None:
        if not files:
            raise ValueError("No data: pass --dataset_name or --data_files train=FILE meta=FILE.")
        return load_files(files)
    if files and name in DATA_BUILDERS.values():  # --dataset_name json --data_files ...
        return load_files(files, builder=name)
    return load_dataset(name, config, data_files=files)


def load_files(files: dict[str, list[str]], builder: str | None = None) -> DatasetDict:
    """Local files by split, one ``load_dataset`` call per split (one call for all would cast every split to the
    first one's columns)."""
    return DatasetDict(
        {
            split: load_dataset(builder or builder_of({split: paths}), data_files={split: paths}, split=split)
            for split, paths in files.items()
        }
    )


def _split(loaded: DatasetDict, name: str, source: str, flag: str):
    if name not in loaded:
        raise ValueError(f"{source} has no split {name!r} (splits: {list(loaded)}). Set {flag}.")
    return loaded[name]


def user_splits(script_args: ScriptArguments) -> DatasetDict:
    """The user's train, meta and (optional) held-out eval data, raw: ``BilevelTrainer`` tokenizes them."""
    s = script_args
    source = s.dataset_name or f"--data_files {' '.join(s.data_files)}"
    loaded = load_data(s.dataset_name, s.dataset_config, s.data_files)
    splits = {"train": _split(loaded, s.dataset_train_split, source, "--dataset_train_split")}
    meta_name = None
    if s.meta_dataset_name:
        meta = load_data(s.meta_dataset_name, s.meta_dataset_config, None)
        splits["meta"] = _split(meta, s.meta_dataset_split, s.meta_dataset_name, "--meta_dataset_split")
    else:
        meta_name = s.dataset_meta_split or next((n for n in ("meta", "validation") if n in loaded), None)
        if meta_name is None:
            raise ValueError(
                f"{source} has no meta data (splits: {list(loaded)}). Add a meta split (--data_files meta=FILE, a "
                "meta.jsonl in the folder), name one with --dataset_meta_split, or pass --meta_dataset_name."
            )
        splits["meta"] = _split(loaded, meta_name, source, "--dataset_meta_split")
    eval_name = s.dataset_eval_split or next((n for n in ("eval", "test") if n in loaded and n != meta_name), None)
    used = {s.dataset_train_split: "train", meta_name: "meta"}
    for role, name in (("meta", meta_name), ("eval", eval_name)):
        if name is not None and (name == s.dataset_train_split or (role == "eval" and name == meta_name)):
            raise ValueError(
                f"The {role} split {name!r} is also the {used[name]} split; held-out data must be distinct. Name "
                f"another split (--dataset_{role}_split) or pass its own file (--data_files {role}=FILE)."
            )
    if eval_name is not None:
        splits["eval"] = _split(loaded, eval_name, source, "--dataset_eval_split")
    return DatasetDict(splits)


def make_outer(script_args: ScriptArguments, splits: DatasetDict, model):
    return RECIPES[script_args.recipe].make_outer(script_args, splits, model)


def _row_weights(s: ScriptArguments, splits: DatasetDict, model):
    if s.outer not in ("example_weights", "weight_net"):
        raise ValueError(f"outer={s.outer!r} is not known for {s.recipe}; use example_weights or weight_net.")
    if s.outer == "weight_net" or s.balance_column is None:
        if s.outer == "weight_net" and s.balance_column is not None:
            raise ValueError("--balance_column applies to outer=example_weights only (a weight per row).")
        if s.outer == "weight_net":
            return WeightNet(hidden_size=s.weight_net_hidden_size)
        return ExampleWeights(
            len(splits["train"]), parametrization=s.weight_parametrization, max_logit=s.weight_max_logit
        )
    return _grouped_weights(s, splits["train"])


def _grouped_weights(s: ScriptArguments, train) -> ExampleWeights:
    """ExampleWeights measured within the groups of ``--balance_column``; refused where the groups are too small
    to rank rows in (a free-text column would put every row alone, and every weight would stay 1)."""
    if s.balance_column not in train.column_names:
        raise ValueError(f"--balance_column {s.balance_column!r} is not a column of the train data: "
                         f"{train.column_names}.")  # fmt: skip
    values = [str(value) for value in train[s.balance_column]]
    names = sorted(set(values))
    smallest = min(values.count(name) for name in names)
    if smallest < 2:
        raise ValueError(
            f"--balance_column {s.balance_column!r} has {len(names)} values over {len(values)} rows, some held by a "
            "single row, whose weight could then never move: balance on a column of a few labels, or drop it."
        )
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


def _domain_weights(s: ScriptArguments, splits: DatasetDict, model):
    return DomainWeights(sorted(splits["train"].unique(s.domain_column)), domain_column=s.domain_column)


def _soft_prompt(s: ScriptArguments, splits: DatasetDict, model):
    hidden = model.get_input_embeddings().weight.shape[1]
    return SoftPrompt(s.num_virtual_tokens, hidden, init_std=0.5)


register_recipe("noisy_reweighting", Recipe(_facts, _row_weights, weights_rows=True))
register_recipe("noisy_reweighting_real", Recipe(_facts, _row_weights, weights_rows=True))
register_recipe("domain_mixture", Recipe(_domain_facts, _domain_weights))
register_recipe("soft_prompt", Recipe(_clean_facts, _soft_prompt))


# -- main ---------------------------------------------------------------------------------------------------------
def main(script_args: ScriptArguments, training_args: BilevelConfig, model_args: ModelArguments, callbacks=()) -> dict:
    """Run one recipe; returns (and writes to ``output_dir/results.json``) its headline numbers. ``callbacks``
    (``TrainerCallback``s) are added to the bilevel run's trainer."""
    output_dir = Path(training_args.output_dir)
    quiet_replicas(training_args.process_index)
    resume = resume_target(training_args.resume_from_checkpoint)
    raw = user_splits(script_args) if uses_own_data(script_args) else builtin_splits(script_args)
    results, runs = {}, {}
    for name in ("bilevel", "uniform") if script_args.compare_uniform else ("bilevel",):
        args = training_args
        if name == "uniform":  # the same budget with φ frozen: what plain fine-tuning would give
            frozen = {"learning_rate": 0.0, "method": "hessian_free", "phase1_method": None, "phase1_steps": 0}
            args = clone_config(training_args, output_dir=str(output_dir / "uniform"), push_to_hub=False, **frozen)
        trainer = build_trainer(script_args, args, model_args, raw)
        if script_args.time_budget_s is not None:
            trainer.add_callback(TimeBudget(script_args.time_budget_s))
        for callback in callbacks if name == "bilevel" else ():
            trainer.add_callback(callback)
        if name == "bilevel" and RECIPES[script_args.recipe].weights_rows:
            trainer.add_callback(EpochWeights(trainer))
        if trainer.is_world_process_zero():
            print(run_banner(script_args, args, name, trainer))
        trainer.train(resume_from_checkpoint=resume if name == "bilevel" else None)
        # "final_meta": the per-step train logs already use meta_loss; one tag per meaning
        final = trainer.evaluate(trainer.meta_dataset, metric_key_prefix="final_meta")
        results[f"{name}_meta_loss"] = final["final_meta_loss"]
        results[f"{name}_outer_steps"] = trainer.state.global_step
        if "eval" in raw:  # held out: neither trained on nor used by the outer objective
            results[f"{name}_eval_loss"] = trainer.evaluate()["eval_loss"]
        runs[name] = trainer
    trainer = runs["bilevel"]
    results.update(summarize(script_args, raw, trainer, results, output_dir))
    if script_args.plot and trainer.args.should_save:
        from .report import meta_loss_history, plot_meta_loss_curves

        curves = {name: meta_loss_history(run.state.log_history) for name, run in runs.items()}
        if any(curves.values()):  # nothing is logged with logging_strategy="no"
            results["meta_loss_plot"] = str(plot_meta_loss_curves(curves, output_dir / "meta_loss.png"))
    trainer.save_model()  # after the plots: the card shows them and push_to_hub (if set) uploads them
    if script_args.final_stage_steps and RECIPES[script_args.recipe].weights_rows:
        results.update(final_stage(script_args, training_args, model_args, trainer))
    if trainer.args.should_save:
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    trainer.accelerator.end_training()  # under several processes: destroy the process group before exit
    return results


def resume_target(value: str | None) -> str | bool | None:
    """``--resume_from_checkpoint``: ``true`` for the output_dir's latest checkpoint, or a checkpoint folder that
    must exist (checked before the model loads); the Trainer reads every file of it before resuming."""
    if value is None or str(value).lower() == "false":
        return None
    if str(value).lower() == "true":
        return True
    if not Path(value).is_dir():
        raise ValueError(f"--resume_from_checkpoint {value!r} is not a folder. Pass a checkpoint-N folder of the "
                         "run, or true for the output_dir's latest one.")  # fmt: skip
    return str(value)


def quiet_replicas(process_index: int) -> None:
    """Ranks other than the first print no Python warnings or progress bars of datasets: every rank sees the same
    data and settings, so they would repeat the first one's word for word (the Trainer's log_level_replica does the
    same for its logs)."""
    if process_index > 0:
        import datasets

        warnings.simplefilter("ignore")
        datasets.disable_progress_bars()  # the tokenization's "Map" bars


def run_banner(script_args, args: BilevelConfig, name: str, trainer) -> str:
    """The first lines of a run: processes and backend, what runs, and whether a uniform run follows."""
    lines = []
    if name == "bilevel":
        backend = trainer.accelerator.state.backend or "none"
        lines.append(
            f"[hf_fg2u] {args.world_size} process{'es' if args.world_size > 1 else ''}, backend {backend}, "
            f"device {args.device.type}"
        )
    steps = f"{args.max_steps} outer steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"
    line = f"[hf_fg2u] {script_args.recipe}: {name} run ({steps}, method {args.method})"
    if name == "bilevel":
        line += (
            "; then the same budget on uniform weights (compare_uniform true: twice the time)"
            if script_args.compare_uniform
            else "; no uniform-weights baseline (--compare_uniform true adds one)"
        )
    return "\n".join(lines + [line])


class EpochWeights(TrainerCallback):
    """What every epoch of a run that weights rows did, in ``epochs.json``: the mean meta loss of its outer steps,
    the eval loss after it (with ``eval_strategy="epoch"``), and, when the train rows carry ``is_corrupted``, the
    weights' AUROC (also logged as ``auroc_corrupted``). The weights after epoch k go to
    ``weighted_dataset_epoch{k}.parquet``: a fine-tune can start from any epoch's."""

    def __init__(self, trainer: BilevelTrainer):
        self.trainer, self.epochs = trainer, []

    def on_epoch_end(self, args, state, control, **kwargs):
        epoch = round(state.epoch)
        start = self.epochs[-1]["step"] if self.epochs else 0
        meta = [log["meta_loss"] for log in state.log_history if "meta_loss" in log and log["step"] > start]
        record = {"epoch": epoch, "step": state.global_step, "meta_loss": sum(meta) / len(meta) if meta else None}
        weighted = self.trainer.export_weights()
        if args.should_save:
            weighted.to_parquet(str(Path(args.output_dir) / f"weighted_dataset_epoch{epoch}.parquet"))
        if "is_corrupted" in weighted.column_names:
            record["auroc_corrupted"] = auroc(-torch.tensor(weighted["weight"]), torch.tensor(weighted["is_corrupted"]))
            self.trainer.log({"auroc_corrupted": record["auroc_corrupted"]})
        self.epochs.append(record)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.epochs and self.epochs[-1]["step"] == state.global_step and "eval_loss" in (metrics or {}):
            self.epochs[-1]["eval_loss"] = metrics["eval_loss"]

    def on_train_end(self, args, state, control, **kwargs):
        if args.should_save and self.epochs:
            (Path(args.output_dir) / "epochs.json").write_text(json.dumps(self.epochs, indent=2))


class TimeBudget(TrainerCallback):
    """Ends training after the step during which ``seconds`` of training have passed. Under several processes
    rank 0's clock decides for all: ranks that stopped at different steps would wait on each other's collectives
    for ever."""

    def __init__(self, seconds: float):
        if not seconds > 0:
            raise ValueError(f"time_budget_s={seconds} must be > 0 seconds.")
        self.seconds, self.start = seconds, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        over = torch.tensor([float(time.perf_counter() - self.start >= self.seconds)], device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(over, src=0)
        if over.item():
            if state.is_world_process_zero:
                print(f"[hf_fg2u] time budget of {self.seconds:g} s reached after {state.global_step} outer steps")
            control.should_training_stop = True
            control.should_log = args.logging_strategy != "no"  # the last step's metrics, as at max_steps


def build_trainer(script_args, training_args: BilevelConfig, model_args: ModelArguments, raw: DatasetDict):
    """A BilevelTrainer for a recipe's raw splits: model, tokenizer, tokenized splits, outer module, LoRA."""
    model, tokenizer = load_model_and_tokenizer(model_args, training_args.seed, training_args.model_init_kwargs)
    splits = raw if uses_own_data(script_args) else tokenize_builtin(raw, tokenizer, script_args, training_args)
    trainer = BilevelTrainer(
        model, training_args, train_dataset=splits["train"], meta_dataset=splits["meta"],
        eval_dataset=splits.get("eval", splits["meta"]), outer=make_outer(script_args, raw, model),
        processing_class=tokenizer, peft_config=lora_config(model_args),
    )  # fmt: skip
    # The card's `datasets` metadata (Hub names only; local files and folders are left out there).
    trainer.card_datasets = [name for name in (script_args.dataset_name, script_args.meta_dataset_name) if name]
    return trainer


def tokenize_builtin(raw: DatasetDict, tokenizer, script_args, training_args: BilevelConfig) -> DatasetDict:
    """The built-in toy data, labelled after its '='/'>' answer separator, its train rows keeping their text (the
    weighted dataset shows it)."""
    splits = builtin_data.tokenize_for_causal_lm(
        raw, tokenizer, max_length=training_args.max_length, answer_only=script_args.answer_only
    )
    splits["train"] = splits["train"].add_column("text", raw["train"]["text"])
    return splits


def lora_config(model_args: ModelArguments) -> LoraConfig:
    """The LoRA adapter of the model arguments (the bilevel run's and the final stage's)."""
    return LoraConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules, layers_to_transform=model_args.lora_layers,
    )  # fmt: skip


def final_stage(script_args, training_args, model_args, trainer) -> dict[str, float]:
    """Train a fresh adapter on the train data weighted by the learned weights (saved in final_adapter/); returns
    its losses by split (``final_adapter_meta_loss``, ...). With a held-out eval split, a second fresh adapter on
    uniform weights gets the same budget and both are scored there: the check, on data the outer loop never saw,
    that the learned weights are worth having (they are not when they fitted the meta split's noise)."""
    from transformers import TrainingArguments

    from .final_stage import train_final_adapter

    output_dir = Path(training_args.output_dir) / "final_adapter"
    tokenized, meta, heldout = trainer.train_dataset, trainer.meta_dataset, trainer.eval_dataset  # same tokenizer
    learned = trainer.dataset_weights(tokenized).tolist()
    selections = {"final_adapter": learned}
    if heldout is not None:
        selections["uniform_adapter"] = [1.0] * len(learned)
    if trainer.is_world_process_zero():  # under several processes the ranks train this adapter together (DDP)
        also = " (and one on uniform weights, both scored on the eval split)" if heldout is not None else ""
        print(f"[hf_fg2u] final stage: a fresh adapter, {script_args.final_stage_steps} steps of weighted loss{also}")
    splits = {"meta": meta} | ({"eval": heldout} if heldout is not None else {})
    results = {}
    for name, weights in selections.items():
        model, tokenizer = load_model_and_tokenizer(model_args, training_args.seed, training_args.model_init_kwargs)
        args = TrainingArguments(
            output_dir=str(output_dir if name == "final_adapter" else output_dir / name),
            max_steps=script_args.final_stage_steps, learning_rate=training_args.inner_lr,
            per_device_train_batch_size=training_args.per_device_train_batch_size, report_to=[], save_strategy="no",
            logging_steps=training_args.logging_steps, seed=training_args.seed, use_cpu=training_args.use_cpu,
            disable_tqdm=training_args.disable_tqdm, dataloader_pin_memory=training_args.dataloader_pin_memory,
        )  # fmt: skip
        final = train_final_adapter(
            model, tokenized.add_column("weight", weights), lora_config(model_args), args, processing_class=tokenizer,
            eval_dataset=splits,
        )  # fmt: skip
        if name == "final_adapter":
            final.save_model()
        scores = final.evaluate()
        results.update({f"{name}_{split}_loss": scores[f"eval_{split}_loss"] for split in splits})
    if heldout is not None and results["final_adapter_eval_loss"] >= results["uniform_adapter_eval_loss"]:
        warnings.warn(
            f"The fresh adapter on the learned weights has no lower eval loss than one on uniform weights "
            f"({results['final_adapter_eval_loss']:.4f} vs {results['uniform_adapter_eval_loss']:.4f}): the weights "
            "did not generalise beyond the meta split. Use more meta rows, or train on uniform weights: the train "
            "data may hold nothing that the meta split tells apart.",
            stacklevel=2,
        )
    return results


def summarize(script_args, raw, trainer, results, output_dir: Path) -> dict:
    """Headline numbers and the weighted dataset / plots of the run. Every process gets the numbers; only the
    main one writes files (several processes share output_dir)."""
    out = {"output_dir": str(output_dir.resolve())}
    writes = trainer.args.should_save
    if "uniform_meta_loss" in results:
        out["meta_loss_reduction"] = 1.0 - results["bilevel_meta_loss"] / results["uniform_meta_loss"]
    if RECIPES[script_args.recipe].weights_rows:
        weighted = trainer.export_weights()  # the user's columns and a weight, no token ids
        if writes:
            output_dir.mkdir(parents=True, exist_ok=True)  # one copy: the file push_to_hub uploads too
            weighted.to_parquet(str(output_dir / WEIGHTED_DATASET_FILE))
        if "is_corrupted" in weighted.column_names:
            corrupted = torch.tensor(weighted["is_corrupted"])
            out["auroc_corrupted"] = auroc(-torch.tensor(weighted["weight"]), corrupted)
            if script_args.plot and writes:
                from .report import plot_weight_histogram

                path = plot_weight_histogram(
                    weighted["weight"], weighted["is_corrupted"], output_dir / "weights_histogram.png"
                )
                out["histogram"] = str(path)
    if isinstance(trainer.outer, DomainWeights):
        out["domain_weights"] = trainer.outer.probabilities()
    return out


def clone_config(config: BilevelConfig, **changes) -> BilevelConfig:
    """A copy of ``config`` with ``changes``, validated again by ``__post_init__``."""
    return dataclasses.replace(config, **changes)
