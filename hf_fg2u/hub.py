"""``load_run``: a finished run (base model + LoRA adapter + outer variables) in one call, from a folder or a
Hub repo id, like transformers' ``Auto*`` classes. The pieces stay loadable on their own: the adapter with
plain peft, the outer variables with ``OuterModule.from_pretrained``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

from .outer import OuterModule
from .outer.base import resolve_folder

RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "outer_config.json", "outer_model.safetensors")


@dataclass
class BilevelRun:
    """What ``load_run`` returns: the base model with the trained adapter, the outer variables, their folder."""

    model: PeftModel
    outer: OuterModule
    folder: Path


def load_run(
    name_or_path: str | Path, *, base_model: str | PreTrainedModel | None = None, revision: str | None = None,
    token: str | None = None, cache_dir: str | Path | None = None, **model_kwargs,
) -> BilevelRun:  # fmt: skip
    """Load a run saved by ``BilevelTrainer.save_model`` or pushed by ``push_to_hub``.

    ``base_model`` defaults to the adapter's ``base_model_name_or_path``; pass a model (or a name) when that is
    not loadable here, e.g. a model built from config. ``model_kwargs`` go to ``from_pretrained`` of the base.
    """
    if Path(name_or_path).is_dir():
        folder = Path(name_or_path)
    else:
        resolve_folder(name_or_path, RUN_FILES, revision, token, cache_dir)  # a clear error when files are missing
        patterns = [*RUN_FILES, "README.md", "prompt_adapter/*"]
        folder = Path(snapshot_download(str(name_or_path), revision=revision, token=token, cache_dir=cache_dir,
                                        allow_patterns=patterns))  # fmt: skip
    outer = OuterModule.from_pretrained(folder)
    if not isinstance(base_model, PreTrainedModel):
        name = base_model or PeftConfig.from_pretrained(folder).base_model_name_or_path
        if not name:
            raise ValueError(
                f"The adapter in {name_or_path} names no base model (adapter_config.json has no "
                "base_model_name_or_path). Pass load_run(..., base_model=<model or name>)."
            )
        base_model = AutoModelForCausalLM.from_pretrained(name, **model_kwargs)
    return BilevelRun(PeftModel.from_pretrained(base_model, folder), outer, folder)
