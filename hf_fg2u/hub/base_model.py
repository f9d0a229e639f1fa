"""``base_model.json``: how to load a run's base model where its name alone is not enough (a GGUF file inside a
folder). The trainers write it beside the adapter; ``load_run`` and ``hf-fg2u finetune`` read it."""

from __future__ import annotations

import json
from pathlib import Path

BASE_MODEL_FILE = "base_model.json"


def save_base_model_record(output_dir: str | Path, name: str | None, gguf_file: str | None) -> None:
    """Record the base's folder and GGUF file (nothing is written for a base loaded by its name alone)."""
    if gguf_file:
        record = {"base_model_name_or_path": name, "gguf_file": gguf_file}
        (Path(output_dir) / BASE_MODEL_FILE).write_text(json.dumps(record, indent=2))


def load_base_model_record(folder: str | Path) -> dict:
    """What ``folder`` records about its base model, else ``{}``."""
    path = Path(folder) / BASE_MODEL_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
