"""Checkpoint I/O of the bilevel state that the Trainer's own checkpoint lacks: θ_start and its optimizer state
(where resets return), the inner optimizer state, and a JSON description that says which configs may resume
from it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers.trainer_utils import rotate_checkpoints

from hf_fg2u.lm.params import unwrap_model
from hf_fg2u.outer.example_weights import META_GROUP

STATE_NAME = "bilevel_state.safetensors"
STATE_CONFIG_NAME = "bilevel_state.json"
PARTIAL_PREFIX = "_partial-"  # a checkpoint being written: never matched by `checkpoint-N` nor pushed ("_*")
EARLIER = "The checkpoint is corrupt or incomplete; resume from an earlier checkpoint."


def compatibility_fields(outer, args, model, train_dataset=None, meta_dataset=None) -> dict:
    """What a checkpoint must share with a trainer to resume: the outer type, the inner optimizer (its state's
    layout), the names and shapes of the inner parameters (a LoRA rank) and the data the outer variables index."""
    params = {name: p for name, p in unwrap_model(model).named_parameters() if p.requires_grad}  # no copy of θ
    fields = {
        "outer_type": type(outer).__name__,
        "inner_optimizer": args.inner_optimizer,
        "inner_parameters": sorted(params),
        "inner_parameter_shapes": {name: list(value.shape) for name, value in sorted(params.items())},
    }
    for role, dataset in (("train", train_dataset), ("meta", meta_dataset)):
        if dataset is not None:
            fields[f"{role}_data"] = data_fingerprint(dataset)
    # where each outer step reads its rows: another value would resume at another data position (the rows of an
    # inner step over all processes count, not how they are split: 2 processes of 4 rows resume as 1 of 8)
    rows = args.per_device_train_batch_size * args.world_size
    fields["rows_per_outer_step"] = {"unroll_steps": args.unroll_steps, "rows_per_inner_step": rows}
    return fields


def run_settings(args, model) -> dict:
    """What a resumed run may change but then does not continue as the uninterrupted run would: every bilevel
    option (credentials redacted), the outer learning rate, the seed and the adapter's scaling and dropout."""
    settings = {**args.bilevel_fields(), "learning_rate": args.learning_rate, "seed": args.seed}
    peft = getattr(unwrap_model(model), "peft_config", None)
    adapter = next(iter(peft.values()), None) if isinstance(peft, dict) else None
    for name in ("lora_alpha", "lora_dropout"):
        if hasattr(adapter, name):
            settings[name] = getattr(adapter, name)
    return json.loads(json.dumps(settings, default=str))  # as read back from the checkpoint's JSON


def warn_changed_settings(directory: Path, mine: dict) -> None:
    """Name every setting that differs from the checkpoint's (checkpoints written before settings were recorded
    have none to compare)."""
    description = read_json(directory / STATE_CONFIG_NAME)
    saved = description.get("settings", description.get("bilevel_config", {}))
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in mine.items() if k in saved and saved[k] != v]
    if changed:
        warnings.warn(
            f"Resuming from {directory} with changed settings ({'; '.join(changed)}): the run goes on from the "
            "checkpoint's state with these, so it does not continue as the uninterrupted run would.",
            stacklevel=3,
        )


def data_fingerprint(dataset) -> str:
    """Rows, columns and a hash of the token ids of up to 64 rows spread over ``dataset``: changes when the
    data change between save and resume, cheap for any size. The meta rows' groups (``meta_group``, there only
    while ``project_group_shift`` is on, a setting a resume may change) are not part of it."""
    rows = sorted({round(i * (len(dataset) - 1) / 63) for i in range(64)}) if len(dataset) else []
    columns = sorted(set(dataset.column_names) - {META_GROUP})
    digest = hashlib.sha256(json.dumps([len(dataset), columns]).encode())
    for row in dataset.with_format(None).select(rows)["input_ids"]:
        digest.update(json.dumps(list(row)).encode())
    return f"{len(dataset)} rows, sha256 {digest.hexdigest()[:16]}"


def save_bilevel_state(directory: Path, states: dict[str, dict | None], description: dict) -> None:
    """Write the inner states (safetensors: θ_start, s_start, the inner optimizer state, see
    :data:`INNER_STATES`) and ``description`` (JSON) into ``directory``."""
    tensors = {}
    for name, state in states.items():
        for key, value in flatten_state(state or {}).items():
            tensors[f"{name}/{key}"] = value
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / STATE_NAME))
    (directory / STATE_CONFIG_NAME).write_text(json.dumps(description, indent=2, default=str))


def publish_checkpoint(written: Path, final: Path) -> Path:
    """Rename a completely written checkpoint to its final name (atomic on one filesystem) and remove its
    staging folder; a checkpoint of the same step written before is replaced whole, and deleted only after
    the new one is in place (it is put back if the rename fails)."""
    replace_path(written, final, aside=written.parent / f"replaced-{final.name}")
    shutil.rmtree(written.parent, ignore_errors=True)
    return final


def publish_files(staging: Path, final: Path) -> None:
    """Move every file and folder of a completely written ``staging`` folder into ``final``, each replacing its
    namesake atomically (a folder: see :func:`replace_path`); other files of ``final`` are left alone."""
    final.mkdir(parents=True, exist_ok=True)
    for entry in sorted(staging.iterdir()):
        replace_path(entry, final / entry.name, aside=staging / f"{PARTIAL_PREFIX}replaced-{entry.name}")


def replace_path(new: Path, final: Path, aside: Path) -> None:
    """``new`` takes the place of ``final``. A file is replaced atomically (``os.replace``). A folder cannot be
    renamed over a non-empty one: the old folder is first renamed to ``aside``, put back if the rename of
    ``new`` fails, and deleted only once ``new`` is in place."""
    if not final.is_dir() or final.is_symlink():
        os.replace(new, final)
        return
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(final, aside)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def rotate_checkpoints_by_step(run_dir: str, save_total_limit: int | None, best_checkpoint: str | None) -> None:
    """Delete the oldest ``checkpoint-N`` folders beyond ``save_total_limit``, oldest by step N (modification
    times tie within a second on many filesystems, and a tie could delete the newest); the best one is kept."""
    rotate_checkpoints(run_dir, save_total_limit, best_checkpoint, use_mtime=False)


def check_resume_compatible(directory: Path, mine: dict) -> None:
    """Raise a ValueError naming every field in which the checkpoint's description differs from ``mine``."""
    path = directory / STATE_CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{directory} is not a BilevelTrainer checkpoint: {STATE_CONFIG_NAME} is missing.")
    saved = read_json(path)
    # Fields added after a checkpoint was written are compared only where the checkpoint has them.
    wrong = [key for key, value in mine.items() if saved.get(key, value if key in OPTIONAL else None) != value]
    if wrong:
        details = "; ".join(f"{k}: {_difference(saved.get(k), mine[k])}" for k in wrong)
        raise ValueError(
            f"Checkpoint {directory} comes from an incompatible config ({details}). Resume with the config it "
            "was written with, or start a new run in another output_dir."
        )


def _difference(saved, mine) -> str:
    if isinstance(saved, dict) and isinstance(mine, dict):
        keys = [k for k in sorted({*saved, *mine}) if saved.get(k) != mine.get(k)]
        return f"{len(keys)} differ, e.g. {keys[0]}: checkpoint {saved.get(keys[0])} vs now {mine.get(keys[0])}"
    return f"checkpoint {saved!r:.120} vs now {mine!r:.120}"


OPTIONAL = ("inner_parameter_shapes", "train_data", "meta_data", "rows_per_outer_step")


def read_json(path: Path) -> dict:
    """A JSON file of a checkpoint; a truncated one is an error naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"Could not read {path}: {error}. {EARLIER}") from error


def check_steps_left(directory: Path, max_steps: int) -> None:
    """Refuse a checkpoint past ``max_steps`` (of a longer run: the Trainer would train no step, and report the
    checkpoint's step count as this run's); one at ``max_steps`` is warned about: nothing is left to train, which is
    what a recipe resumed after its finished bilevel run (stopped in its uniform baseline) expects."""
    step = read_json(directory / "trainer_state.json").get("global_step", 0)
    if max_steps <= 0 or not isinstance(step, int) or step < max_steps:
        return
    if step > max_steps:
        raise ValueError(
            f"Checkpoint {directory} is at outer step {step}, past max_steps={max_steps}: resuming would train no "
            f"step. Pass --max_steps above {step} to train on, or an earlier checkpoint."
        )
    warnings.warn(
        f"Checkpoint {directory} is at outer step {step} = max_steps: no outer step is left to train. Pass "
        f"--max_steps above {step} to train on.",
        stacklevel=3,
    )


def verify_checkpoint(directory: Path) -> None:
    """Read every file of a checkpoint before resuming from it, so that a truncated or missing file is an
    error that names it rather than a raw library error halfway through loading."""
    if not directory.is_dir():
        raise ValueError(f"Checkpoint {directory} does not exist. Pass an existing checkpoint-N folder.")
    if not (directory / STATE_CONFIG_NAME).is_file():
        raise ValueError(f"{directory} is not a BilevelTrainer checkpoint: {STATE_CONFIG_NAME} is missing.")
    read_json(directory / "trainer_state.json")
    read_json(directory / STATE_CONFIG_NAME)
    for name in ("adapter_model.safetensors", "outer_model.safetensors", STATE_NAME):
        path = directory / name
        if not path.is_file():
            continue
        try:
            with safe_open(str(path), framework="pt") as file:
                names = file.keys()
                bad = [key for key in names if not torch.isfinite(file.get_tensor(key)).all()]
        except (SafetensorError, OSError) as error:
            raise ValueError(f"Could not read {path}: {error}. {EARLIER}") from error
        if bad:
            raise ValueError(f"{path} holds NaN or inf values ({bad[:3]}). {EARLIER}")
    for name in ("optimizer.pt", "scheduler.pt"):
        path = directory / name
        if path.is_file():
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError...
                raise ValueError(f"Could not read {path}: {error}. {EARLIER}") from error


INNER_STATES = ("initial", "initial_state", "inner_state")  # θ_start, its optimizer state, the current one


def load_bilevel_state(directory: Path, device) -> dict[str, dict | None]:
    """The inner states saved by :func:`save_bilevel_state`, on ``device``: {name: state or None where absent}."""
    try:
        tensors = load_file(str(directory / STATE_NAME))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"Could not read {directory / STATE_NAME}: {error}. {EARLIER}") from error
    states = {}
    for name in INNER_STATES:
        flat = {k.removeprefix(f"{name}/"): v.to(device) for k, v in tensors.items() if k.startswith(f"{name}/")}
        states[name] = (flat if name == "initial" else unflatten_state(flat)) if flat else None
    return states


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
