"""``load_run``: a finished run (base model + LoRA adapter + outer variables) in one call, from a folder or a
Hub repo id, like transformers' ``Auto*`` classes. The pieces stay loadable on their own: the adapter with
plain peft, the outer variables with ``OuterModule.from_pretrained``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hf_fg2u.outer import OuterModule
from hf_fg2u.outer.base import resolve_folder
from hf_fg2u.trainer.model_setup import BASE_MODEL_FILE

RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "outer_config.json", "outer_model.safetensors")
# What the Trainer's save writes of the tokenizer (processing_class.save_pretrained), fetched when present.
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "chat_template*", "*.model")


@dataclass
class BilevelRun:
    """What ``load_run`` returns: the base model with the trained adapter, the outer variables, their folder, and
    the tokenizer the run was trained with (None when the run saved none)."""

    model: PeftModel
    outer: OuterModule
    folder: Path
    tokenizer: PreTrainedTokenizerBase | None = None


def load_run(
    name_or_path: str | Path, *, base_model: str | PreTrainedModel | None = None, revision: str | None = None,
    token: str | None = None, cache_dir: str | Path | None = None, **model_kwargs,
) -> BilevelRun:  # fmt: skip
    """Load a run saved by ``BilevelTrainer.save_model`` or pushed by ``push_to_hub``.

    ``base_model`` defaults to the adapter's ``base_model_name_or_path``; pass a model (or a name) when that is
    not loadable here, e.g. a model built from config. ``model_kwargs`` go to ``from_pretrained`` of the base.
    The tokenizer is the one the Trainer saved beside the adapter (``processing_class``), else None.
    """
    if Path(name_or_path).is_dir():
        folder = Path(name_or_path)
    else:
        resolve_folder(name_or_path, RUN_FILES, revision, token, cache_dir)  # a clear error when files are missing
        patterns = [*RUN_FILES, *TOKENIZER_FILES, "README.md", "prompt_adapter/*", BASE_MODEL_FILE]
        folder = Path(snapshot_download(str(name_or_path), revision=revision, token=token, cache_dir=cache_dir,
                                        allow_patterns=patterns))  # fmt: skip
    outer = OuterModule.from_pretrained(folder)
    recorded = json.loads((folder / BASE_MODEL_FILE).read_text()) if (folder / BASE_MODEL_FILE).is_file() else {}
    if recorded.get("gguf_file") and base_model is None:  # a GGUF base: the folder's name alone does not load it
        model_kwargs.setdefault("gguf_file", recorded["gguf_file"])
    if not isinstance(base_model, PreTrainedModel):
        name = base_model or PeftConfig.from_pretrained(folder).base_model_name_or_path
        if not name:
            raise ValueError(
                f"The adapter in {name_or_path} names no base model (adapter_config.json has no "
                "base_model_name_or_path). Pass load_run(..., base_model=<model or name>)."
            )
        base_model = AutoModelForCausalLM.from_pretrained(name, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    return BilevelRun(PeftModel.from_pretrained(base_model, folder), outer, folder, tokenizer)
