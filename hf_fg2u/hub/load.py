"""``load_run``: a finished run (base model + LoRA adapter + outer variables) in one call, from a folder or a
Hub repo id, like transformers' ``Auto*`` classes; an ``hf-fg2u finetune`` output (base model + adapter) too.
The pieces stay loadable on their own: the adapter with plain peft, the outer variables with
``OuterModule.from_pretrained``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hf_fg2u.hub.base_model import BASE_MODEL_FILE, load_base_model_record
from hf_fg2u.outer import OuterModule
from hf_fg2u.outer.base import resolve_folder

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
OUTER_FILES = ("outer_config.json", "outer_model.safetensors")  # absent from an hf-fg2u finetune output
RUN_FILES = (*ADAPTER_FILES, *OUTER_FILES)
# What the Trainer's save writes of the tokenizer (processing_class.save_pretrained), fetched when present.
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "chat_template*", "*.model")


@dataclass
class BilevelRun:
    """What ``load_run`` returns: the base model with the trained adapter, the outer variables (None for an
    ``hf-fg2u finetune`` output), their folder, and the tokenizer the run was trained with (None when the run saved
    none)."""

    model: PeftModel
    outer: OuterModule | None
    folder: Path
    tokenizer: PreTrainedTokenizerBase | None = None


def load_run(
    name_or_path: str | Path, *, base_model: str | PreTrainedModel | None = None, revision: str | None = None,
    token: str | None = None, cache_dir: str | Path | None = None, **model_kwargs,
) -> BilevelRun:  # fmt: skip
    """Load a run saved by ``BilevelTrainer.save_model`` or pushed by ``push_to_hub``, or an adapter saved by
    ``hf-fg2u finetune`` / ``train_final_adapter`` (then ``outer`` is None).

    ``base_model`` defaults to the adapter's ``base_model_name_or_path``; pass a model (or a name) when that is
    not loadable here, e.g. a model built from config. ``model_kwargs`` go to ``from_pretrained`` of the base.
    The tokenizer is the one the Trainer saved beside the adapter (``processing_class``), else None. A base
    loaded from a GGUF file is loaded from it again (``base_model.json`` names the file).
    """
    if Path(name_or_path).is_dir():
        folder = Path(name_or_path)
    else:
        resolve_folder(name_or_path, ADAPTER_FILES, revision, token, cache_dir)  # a clear error when files are missing
        patterns = [*RUN_FILES, *TOKENIZER_FILES, "README.md", "prompt_adapter/*", BASE_MODEL_FILE]
        folder = Path(snapshot_download(str(name_or_path), revision=revision, token=token, cache_dir=cache_dir,
                                        allow_patterns=patterns))  # fmt: skip
    if not (folder / ADAPTER_FILES[0]).is_file():
        raise ValueError(
            f"{name_or_path} holds no adapter ({ADAPTER_FILES[0]}). A full fine-tune (hf-fg2u finetune "
            "--full_finetune true) is a whole model: load it with AutoModelForCausalLM.from_pretrained(folder)."
        )
    outer = OuterModule.from_pretrained(folder) if (folder / OUTER_FILES[0]).is_file() else None
    recorded = load_base_model_record(folder)
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
