"""Checkpoint I/O of the bilevel state that the Trainer's own checkpoint lacks: θ_0 (for ``inner_reset_every``),
the inner optimizer state, and a JSON description that says which configs may resume from it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .functional import trainable_parameters

STATE_NAME = "bilevel_state.safetensors"
STATE_CONFIG_NAME = "bilevel_state.json"


def compatibility_fields(outer, args, model) -> dict:
    """What a checkpoint must share with a trainer to resume: the outer type, the inner optimizer (its state's
    layout) and the names of the inner parameters."""
    return {
        "outer_type": type(outer).__name__,
        "inner_optimizer": args.inner_optimizer,
        "inner_parameters": sorted(trainable_parameters(model)),
    }


def save_bilevel_state(
    directory: Path,
    initial_params: dict[str, torch.Tensor] | None,
    inner_state: dict | None,
    description: dict,
) -> None:
    """Write θ_0 and the inner optimizer state (safetensors) and ``description`` (JSON) into ``directory``."""
    tensors = {}
    if initial_params is not None:
        tensors.update({f"initial/{k}": v for k, v in initial_params.items()})
    for key, value in flatten_state(inner_state or {}).items():
        tensors[f"inner_state/{key}"] = value
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / STATE_NAME))
    (directory / STATE_CONFIG_NAME).write_text(json.dumps(description, indent=2, default=str))


def check_resume_compatible(directory: Path, mine: dict) -> None:
    """Raise a ValueError naming every field in which the checkpoint's description differs from ``mine``."""
    path = directory / STATE_CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{directory} is not a BilevelTrainer checkpoint: {STATE_CONFIG_NAME} is missing.")
    saved = json.loads(path.read_text())
    wrong = [key for key, value in mine.items() if saved.get(key) != value]
    if wrong:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r:.120} vs now {mine[k]!r:.120}" for k in wrong)
        raise ValueError(
            f"Checkpoint {directory} comes from an incompatible config ({details}). Resume with the config it "
            "was written with, or start a new run in another output_dir."
        )


def load_bilevel_state(directory: Path, device) -> tuple[dict[str, torch.Tensor] | None, dict | None]:
    """(θ_0, inner optimizer state) saved by :func:`save_bilevel_state`, on ``device`` (None where absent)."""
    try:
        tensors = load_file(str(directory / STATE_NAME))
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"Could not read {directory / STATE_NAME}: {error}. The checkpoint is corrupt or incomplete; "
            "resume from an earlier checkpoint."
        ) from error
    initial = {k.removeprefix("initial/"): v.to(device) for k, v in tensors.items() if k.startswith("initial/")}
    state = {k.removeprefix("inner_state/"): v.to(device) for k, v in tensors.items() if k.startswith("inner_state/")}
    return initial or None, unflatten_state(state) if state else None


def flatten_state(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """{'exp_avg': {'w': t}, 'step': s} -> {'exp_avg/w': t, 'step': s}."""
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update(flatten_state(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten_state(flat: dict[str, torch.Tensor]) -> dict:
    """Inverse of :func:`flatten_state` (parameter names never start with a state key, so one split suffices)."""
    state: dict = {}
    for key, value in flat.items():
        head, _, rest = key.partition("/")
        if rest:
            state.setdefault(head, {})[rest] = value
        else:
            state[head] = value
    return state
