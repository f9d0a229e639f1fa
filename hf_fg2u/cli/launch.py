"""``hf-fg2u train --num_processes N``: the CLI starts its own ranks through ``accelerate launch`` (as TRL's CLI
does), with a packaged accelerate config (``--accelerate_config cpu_2proc``) or a file of the user's."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ACCELERATE_CONFIGS = Path(__file__).parents[1] / "recipes" / "accelerate_configs"


def add_launch_arguments(group) -> None:
    """Document the launcher's options in ``hf-fg2u train --help`` (``split_launch_args`` reads them)."""
    group.add_argument(
        "--num_processes", type=int, default=argparse.SUPPRESS, metavar="N",
        help="hf-fg2u train only: start N processes through accelerate launch (default 1: this process).",
    )  # fmt: skip
    group.add_argument(
        "--accelerate_config", default=argparse.SUPPRESS, metavar="NAME_OR_FILE",
        help=f"hf-fg2u train only: an accelerate config, a file or a packaged one "
        f"({', '.join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob('*.yaml')))}).",
    )  # fmt: skip


def split_launch_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(``num_processes``, ``accelerate_config``) taken out of ``argv``, and the rest of ``argv``."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--accelerate_config", default=None)
    known, rest = parser.parse_known_args(argv)
    if known.num_processes < 1:
        raise ValueError(f"--num_processes must be at least 1, got {known.num_processes}.")
    return known, rest


def accelerate_config_path(name_or_path: str) -> Path:
    """A packaged accelerate config by name, or an existing file."""
    packaged = ACCELERATE_CONFIGS / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    if Path(name_or_path).is_file():
        return Path(name_or_path)
    names = sorted(path.stem for path in ACCELERATE_CONFIGS.glob("*.yaml"))
    raise FileNotFoundError(f"--accelerate_config {name_or_path!r} is neither a file nor one of {names}.")


def launched() -> bool:
    """Whether this process is already one rank of a launched group (then it must not launch again)."""
    return "WORLD_SIZE" in os.environ


def launch_command(
    num_processes: int, accelerate_config: str | None, argv: list[str], subcommand: str = "train"
) -> list[str]:
    """``accelerate launch`` of ``hf-fg2u SUBCOMMAND argv`` on ``num_processes`` ranks. Without a config: the multi-GPU
    launcher, which runs on CPU (gloo) where there is no GPU (``launch_env``); ``--cpu`` would start one process."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if accelerate_config:
        command += ["--config_file", str(accelerate_config_path(accelerate_config))]
    else:
        command += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*command, "-m", "hf_fg2u.cli.main", subcommand, *argv]


SECRET_ARGS_ENV = "HF_FG2U_SECRET_ARGS"


def split_secret_args(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(public, secret) options of ``argv``: ``--hub_token`` and any option whose destination names a token,
    secret, key or password, and a ``--model_init_kwargs`` that holds a credential, go to the ranks through the
    environment — argv is printed and visible to every user of the machine in ``ps``. Secrecy follows the option's
    destination in ``parser`` (which must not accept abbreviations), so ``--model-init-kwargs`` is the same option
    as ``--model_init_kwargs``."""
    from hf_fg2u.trainer.redaction import CREDENTIAL, redact

    def secret(name: str, value: str | None) -> bool:
        action = parser._option_string_actions.get(name)
        dest = action.dest if action is not None else name.lstrip("-").replace("-", "_")
        if dest == "model_init_kwargs" and value is not None:
            try:
                parsed = json.loads(value)
            except ValueError:
                return False
            return redact(parsed) != parsed
        return bool(CREDENTIAL.search(dest))

    public, hidden, index = [], [], 0
    while index < len(argv):
        name, inline, value = argv[index].partition("=")
        takes_next = not inline and index + 1 < len(argv) and not argv[index + 1].startswith("--")
        value = value if inline else (argv[index + 1] if takes_next else None)
        width = 2 if takes_next else 1
        if name.startswith("--") and secret(name, value):
            hidden += argv[index : index + width]
        else:
            public += argv[index : index + width]
        index += width
    return public, hidden


def launch_env(accelerate_config: str | None) -> dict[str, str]:
    """What the launcher's environment adds: without a config on a machine without a GPU, ``ACCELERATE_USE_CPU=1``,
    which makes ``--multi_gpu`` start CPU ranks (gloo); DESIGN.md §5: ``--cpu`` would start one process."""
    import torch

    if accelerate_config is None and not torch.cuda.is_available():
        return {"ACCELERATE_USE_CPU": "1"}
    return {}


def echo_command(command: list[str], env: dict[str, str]) -> str:
    """The launch as a shell line to copy: the environment it adds, then the command, with a comment on CPU."""
    line = " ".join([*(f"{name}={value}" for name, value in env.items()), *command])
    if env.get("ACCELERATE_USE_CPU") == "1":
        line += "   # CPU ranks (gloo): --multi_gpu with ACCELERATE_USE_CPU=1; --cpu would start a single process"
    return line
