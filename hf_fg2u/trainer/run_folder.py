"""Safety of the output folder: refuse a folder that belongs to something else, find an unwritable one before
the compute, and keep two runs from writing one folder at the same time."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import warnings
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_fg2u.trainer.checkpointing import PARTIAL_PREFIX, STATE_CONFIG_NAME

LOCK_NAME = "_hf_fg2u.lock"  # "_*" files are never uploaded by push_to_hub


def holds_bilevel_run(directory: Path) -> bool:
    """Whether ``directory`` holds what a BilevelTrainer saves: a state at the top or one level down (a
    checkpoint, a recipe's uniform run) or a partial checkpoint."""
    markers = [STATE_CONFIG_NAME, f"*/{STATE_CONFIG_NAME}", f"{PARTIAL_PREFIX}*"]
    return any(next(directory.glob(pattern), None) is not None for pattern in markers)


def is_run_folder(directory: Path) -> bool:
    """Whether ``directory`` was written by a BilevelTrainer: its saved state (``holds_bilevel_run``) or a run
    lock."""
    return holds_bilevel_run(directory) or (directory / LOCK_NAME).exists()


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Raise a ValueError, before any compute, for an output_dir that is a file, is not writable, or is a
    non-empty folder of something else (its README.md, adapter or results would be replaced)."""
    directory = Path(output_dir)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"output_dir={output_dir!r} is a file, not a folder. Choose another output_dir.")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite and not is_run_folder(directory):
        raise ValueError(
            f"output_dir={output_dir!r} is not empty and holds no hf_fg2u run (no {STATE_CONFIG_NAME}); its files "
            "would be replaced. Choose a new or empty output_dir, or pass --overwrite_output_dir to allow it."
        )
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(
            f"output_dir={output_dir!r} is not writable ({error}); checkpoints and the model would be lost at the "
            "first save. Choose a writable output_dir."
        ) from error


def checkpoint_folders(directory: Path) -> list[Path]:
    """The ``checkpoint-N`` folders of ``directory``, by step."""
    pattern = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
    found = [path for path in directory.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if pattern.fullmatch(path.name)]
    return sorted((path for path in found if path.is_dir()), key=lambda path: int(path.name.rsplit("-", 1)[1]))


def check_new_run(output_dir: str, overwrite: bool) -> None:
    """Refuse a new run (not a resumed one) into a folder that holds a finished run, or the checkpoints of a run
    that did not finish: it would replace some of them and keep the others, and a later resume would continue the
    other run. ``overwrite`` allows it (``clear_checkpoints`` then removes the old checkpoints)."""
    directory = Path(output_dir)
    if overwrite or not directory.is_dir():
        return
    fixes = (
        "Resume it (--resume_from_checkpoint true for the latest checkpoint, or a checkpoint-N folder), pass "
        "--overwrite_output_dir true to replace it (its checkpoints are deleted), or choose another output_dir."
    )
    if (directory / STATE_CONFIG_NAME).is_file():
        raise ValueError(
            f"output_dir={output_dir!r} holds a finished run; a new run would replace its model and results and mix "
            f"them with its checkpoints. {fixes}"
        )
    checkpoints = checkpoint_folders(directory)
    if checkpoints:
        raise ValueError(
            f"output_dir={output_dir!r} holds checkpoints of a run that did not finish ({checkpoints[-1].name} is "
            f"the latest); a new run would replace some of them and keep the others, and a later resume would "
            f"continue the other run. {fixes}"
        )


def clear_checkpoints(output_dir: str) -> None:
    """Delete the ``checkpoint-N`` folders a run started with ``overwrite_output_dir`` replaces, so that no resume
    can continue the run it replaced."""
    for checkpoint in checkpoint_folders(Path(output_dir)):
        shutil.rmtree(checkpoint)


class RunLock:
    """``output_dir/_hf_fg2u.lock`` while a run trains: a second run on the same folder is refused, a lock
    left by a run that died (its process is gone) is taken over with a warning."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / LOCK_NAME
        self.mine = {"pid": os.getpid(), "host": socket.gethostname()}

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                with open(self.path, "x") as file:
                    json.dump(self.mine, file)
                return self
            except FileExistsError:
                self._take_over_if_stale()

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            holder = {}
        alive = holder.get("host") != self.mine["host"] or _process_alive(holder.get("pid"))
        if holder and alive:
            raise ValueError(
                f"Another run (process {holder.get('pid')} on {holder.get('host')}) is writing to "
                f"{self.path.parent}: two runs in one output_dir would overwrite each other's checkpoints. Wait "
                f"for it, or choose another output_dir (if that run is dead, delete {self.path})."
            )
        warnings.warn(f"Taking over {self.path}, left by a run that is no longer running ({holder}).", stacklevel=3)
        self.path.unlink(missing_ok=True)


def _process_alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
