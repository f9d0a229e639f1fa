"""``ConfigParser``: ``HfArgumentParser`` plus a typed YAML ``--config`` (TRL's ``TrlParser`` pattern).

The YAML's values become the parser's defaults, so CLI flags override them and argparse still reports the
CLI's errors. YAML values keep their types (``max_steps: 10`` is an int, never the string "10"), are checked
against each option's type and choices here, with errors naming the file and the key, and are read as YAML 1.2
(only ``true``/``false`` are booleans: ``save_strategy: no`` means "no", not ``False``). An ``env:`` mapping is
exported to ``os.environ`` before anything is built, for the variables of ``YAML_ENV_ALLOWED`` only (a shared
YAML must not carry credentials, library paths or preloads), never over a value the user set. A
``builtin_data:`` mapping is kept apart for the script (``builtin_data_defaults``: options of the built-in toy
data, e.g. a short ``max_length``). A ``TrainingArguments`` subclass gets two help groups: its own fields right
after ``--config``, the Trainer's own fields last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import reprlib
import warnings
from pathlib import Path
from typing import get_type_hints

from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import string_to_bool

from hf_fg2u.cli.launch import SECRET_ARGS_ENV
from hf_fg2u.recipe_yaml import PACKAGED_CONFIGS, Yaml12Loader, find_config, load_yaml_config  # noqa: F401
from hf_fg2u.trainer.redaction import redact

TRAINER_GROUP = "transformers.TrainingArguments (the outer optimizer, logging, saving, the Hub)"
BUILTIN_DATA = "builtin_data"  # a YAML section of options that apply only to a script's built-in data


class ConfigParser(HfArgumentParser):
    """Parse dataclasses from ``--config FILE`` (optional) and CLI flags, CLI winning."""

    def __init__(self, dataclass_types, **kwargs):
        # No abbreviations: `--hub_tok` must not reach an option that `--hub_token` names (the launcher decides by
        # the full name what stays out of argv), and a prefix may silently change meaning when an option is added.
        kwargs.setdefault("allow_abbrev", False)
        self._own_group = self._trainer_group = None
        self.builtin_data_defaults: dict = {}
        super().__init__(dataclass_types, **kwargs)
        self.run_group = self.add_argument_group("run")
        self._config_action = self.run_group.add_argument(
            "--config", metavar="FILE", default=argparse.SUPPRESS,
            help="A YAML file of option: value (and an optional env: mapping); flags on the command line override it.",
        )  # fmt: skip
        # --help order: --config, the TrainingArguments subclass's own options, the other dataclasses, and the
        # Trainer's ~100 options last.
        first = [group for group in (self.run_group, self._own_group) if group is not None]
        last = [self._trainer_group] if self._trainer_group is not None else []
        middle = [group for group in self._action_groups[2:] if group not in first + last]
        self._action_groups[2:] = first + middle + last

    def _add_dataclass_arguments(self, dtype):
        if not (isinstance(dtype, type) and issubclass(dtype, TrainingArguments) and dtype is not TrainingArguments):
            return super()._add_dataclass_arguments(dtype)
        own = self._own_group = self.add_argument_group(
            getattr(dtype, "_argument_group_name", f"{dtype.__name__}: bilevel meta-tuning")
        )
        self._trainer_group = self.add_argument_group(TRAINER_GROUP)
        trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        hints = get_type_hints(dtype)
        for field in dataclasses.fields(dtype):
            if field.init:
                field.type = hints[field.name]
                self._parse_dataclass_field(self._trainer_group if field.name in trainer_fields else own, field)

    def parse_args_and_config(self, args: list[str], config: str | Path | None = None) -> tuple:
        """The dataclasses from ``config`` (also ``--config`` inside ``args``) overridden by ``args``."""
        known, args = _pop_config(list(args))
        path = known or config
        if path is not None:
            self.set_defaults(**self.typed_config(path))
        return self.parse_args_into_dataclasses(args=args)

    def parse_args_into_dataclasses(self, args=None, return_remaining_strings=False, **kwargs):
        """The Trainer's parse; an option it does not know is an error naming the option, never its value (a
        mistyped ``--hub_tokn`` is followed by a token)."""
        *parsed, remaining = super().parse_args_into_dataclasses(args, return_remaining_strings=True, **kwargs)
        if return_remaining_strings:
            return (*parsed, remaining)
        if remaining:
            names = [arg.partition("=")[0] for arg in remaining if arg.startswith("-")]
            raise ValueError(
                f"Unknown option(s) {names or '(values that follow no option)'}: write each option's full name "
                f"(abbreviations are not accepted); `{self.prog} --help` lists them."
            )
        return tuple(parsed)

    @staticmethod
    def _builtin_data_section(path, values: dict) -> dict:
        """The ``builtin_data:`` mapping popped from ``values``: options (toy data sizes, a short ``max_length``)
        that hold only when the script runs on its built-in data; the script applies them (``builtin_data_defaults``),
        not the parser."""
        section = values.pop(BUILTIN_DATA, None) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{path}: {BUILTIN_DATA} must be a mapping of option: value, got {_shown(section)}.")
        return section

    def typed_config(self, path: str | Path) -> dict:
        """The YAML's options checked against the parser's; exports its ``env:`` mapping."""
        values = load_yaml_config(path)
        section = self._builtin_data_section(path, values)
        env = values.pop("env", None) or {}
        if not isinstance(env, dict):
            raise ValueError(f"{path}: env must be a mapping of NAME: value, got {type(env).__name__} {_shown(env)}.")
        actions = {}
        for action in self._actions:  # the first action of a dest: --plot, not its complement --no_plot
            if action is not self._config_action:
                actions.setdefault(action.dest, action)
        unknown = sorted((set(values) | set(section)) - set(actions))
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}. Run `{self.prog} --help` for the options.")
        typed = {key: typed_value(f"{path}: {key}", value, actions[key]) for key, value in values.items()}
        self.builtin_data_defaults = {  # over those of a config read before (the recipe a user's config names)
            **self.builtin_data_defaults,
            **{
                key: typed_value(f"{path}: {BUILTIN_DATA}: {key}", value, actions[key])
                for key, value in section.items()
            },
        }
        export_yaml_env(path, env)
        return typed


# What a YAML's env: block may set: threads, offline switches, allocator and collective diagnostics, logging
# names. Not tokens (HF_TOKEN…), paths or loaders (PYTHONPATH, LD_PRELOAD, NCCL_NET_PLUGIN…): a recipe someone
# shared would otherwise push with their token or run their code.
YAML_ENV_ALLOWED = frozenset({
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM", "CUDA_VISIBLE_DEVICES",
    "PYTORCH_CUDA_ALLOC_CONF", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_PROGRESS_BARS", "NCCL_DEBUG", "NCCL_P2P_DISABLE", "NCCL_IB_DISABLE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_DISTRIBUTED_DEBUG", "WANDB_PROJECT", "WANDB_MODE", "WANDB_RUN_GROUP",
})  # fmt: skip
YAML_ENV_PREFIX = "HF_FG2U_"
# HF_FG2U_* variables that hf_fg2u itself reads to carry arguments: one set by a YAML would hand every rank options
# the command line does not show (a model with remote code, another output_dir).
YAML_ENV_RESERVED = frozenset({SECRET_ARGS_ENV})


def export_yaml_env(path: str | Path, env: dict) -> None:
    """Set the YAML's ``env:`` variables that are allowed and unset; refuse the rest before anything is set."""
    reserved = sorted(str(name).strip() for name in env if str(name).strip() in YAML_ENV_RESERVED)
    if reserved:
        raise ValueError(
            f"{path}: env may not set {reserved}: hf_fg2u reads it to pass options to the ranks of --num_processes, "
            "so a YAML setting it would run them with options the command line does not show. Remove it from the "
            "env: block; put options in the YAML itself or on the command line."
        )
    refused = sorted(str(name) for name in env if str(name) not in YAML_ENV_ALLOWED
                     and not str(name).startswith(YAML_ENV_PREFIX))  # fmt: skip
    if refused:
        raise ValueError(
            f"{path}: env may not set {refused}: a YAML's env: block sets only {sorted(YAML_ENV_ALLOWED)} and "
            f"{YAML_ENV_PREFIX}* (no tokens, paths or loaders). Set the others in your shell if you mean them."
        )
    odd = sorted(str(name) for name, value in env.items()
                 if isinstance(value, dict | list) or "\0" in str(value))  # fmt: skip
    if odd:
        raise ValueError(
            f"{path}: env values of {odd} are lists, mappings or hold a NUL byte; an environment variable is one "
            "line of text. Write each as a plain string."
        )
    for name, value in env.items():
        name, value = str(name), str(value)
        if os.environ.get(name, value) != value:
            warnings.warn(f"{path}: env sets {name}={value!r}, but your environment has {name}={os.environ[name]!r}: "
                          "yours is kept.", stacklevel=3)  # fmt: skip
            continue
        os.environ[name] = value


def typed_value(where: str, value, action: argparse.Action):
    """``value`` as the option ``action`` expects it, or a ValueError naming ``where`` and the expected type."""
    if value is None:
        return None
    if action.nargs in ("+", "*"):
        return [_one_value(where, item, action) for item in (value if isinstance(value, list) else [value])]
    if isinstance(value, list):
        raise ValueError(
            f"{where} takes a single value ({_type_name(action)}), got the list {_shown(value)}. Write a single "
            f"value (`{where.rsplit(': ', 1)[-1]}: {_shown(value[0]) if value else '...'}`)."
        )
    return _one_value(where, value, action)


def _one_value(where: str, value, action: argparse.Action):
    kind = action.type
    try:
        if kind is string_to_bool:
            value = value if isinstance(value, bool) else string_to_bool(_as_str(value))
        elif kind is int:
            value = value if isinstance(value, int) and not isinstance(value, bool) else int(_as_str(value))
        elif kind is float:
            number = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if number else float(_as_str(value))
        elif kind is dict:
            value = value if isinstance(value, dict) else json.loads(_as_str(value))
        elif isinstance(value, dict | list | bool):
            raise TypeError
        elif kind is not None:
            value = kind(str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ValueError(
            f"{where} expects {_type_name(action)}, got {type(value).__name__} {_shown(value)}. Write a value of that "
            "type (quote a string that YAML would read otherwise)."
        ) from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{where} is {_shown(value)}; use one of {list(action.choices)}.")
    return value


def _shown(value) -> str:
    """``value`` for an error message: credentials redacted (a ``model_init_kwargs`` mapping with a token), and
    long or deep values cut (a list that YAML aliases expanded)."""
    return _SHOWN.repr(redact(value))


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother = 3, 6, 6, 80, 80


def _as_str(value) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


def _type_name(action: argparse.Action) -> str:
    if action.choices is not None:
        return f"one of {list(action.choices)}"
    kind = action.type
    names = {string_to_bool: "a boolean (true/false)", int: "an int", float: "a float", dict: "a mapping"}
    name = names.get(kind, "a string")
    return f"a list of {name.split(' ', 1)[1]}s" if action.nargs in ("+", "*") and name != "a string" else name


def _pop_config(args: list[str]) -> tuple[str | None, list[str]]:
    """``--config FILE`` (or ``--config=FILE``) taken out of ``args``."""
    for index, arg in enumerate(args):
        if arg == "--config":
            if index + 1 >= len(args):
                raise ValueError("--config needs a file path.")
            return args[index + 1], args[:index] + args[index + 2 :]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], args[:index] + args[index + 1 :]
    return None, args
