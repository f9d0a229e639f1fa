"""Loading the model and tokenizer a recipe runs on (a Hub name, a folder, a GGUF file, or a tiny model from
config), and the LoRA adapter's config."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hf_fg2u.cli.arguments import ModelArguments

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

from hf_fg2u.lm import toy_data as builtin_data
from hf_fg2u.trainer.model_setup import trainable_base

FLASH_ATTENTION = {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available}


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
    kwargs = from_pretrained_kwargs(model_args, init_kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, **tokenizer_kwargs(model_args))
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    except OSError as error:  # not found, offline, gated: transformers says which and what to do
        name = model_args.model_name_or_path
        raise ValueError(f"--model_name_or_path {name!r} could not be loaded: {error}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model_args.gguf_file:  # dequantised but marked quantised: the trainers unmark it, here before the cast
        model = trainable_base(model).to(torch.float32 if kwargs["dtype"] == "auto" else kwargs["dtype"])
    return model, tokenizer


def check_model_arguments(model_args: ModelArguments) -> None:
    """Refuse, before any data or model is loaded, a model folder or GGUF file that does not exist, an attention
    kernel whose package is missing, and a LoRA adapter that would train nothing (``lora_config``)."""
    lora_config(model_args)
    attention = model_args.attn_implementation
    if attention in FLASH_ATTENTION and not FLASH_ATTENTION[attention]():
        raise ValueError(
            f"--attn_implementation {attention} needs the flash-attn package (and a GPU), which is not installed. "
            "Install it (pip install flash-attn), or pass --attn_implementation sdpa or eager."
        )
    name = model_args.model_name_or_path
    if name is None:
        return
    if looks_local(name) and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(
            f"--model_name_or_path {name!r}: no such folder. Pass a model folder (with config.json) or a Hub id "
            "(org/name)."
        )
    gguf = Path(name).expanduser() / model_args.gguf_file if model_args.gguf_file else None
    if gguf is not None and Path(name).expanduser().is_dir() and not gguf.is_file():
        found = sorted(path.name for path in gguf.parent.glob("*.gguf"))
        raise FileNotFoundError(
            f"--gguf_file {model_args.gguf_file!r}: no such file in {name}. Pass one of its GGUF files "
            f"({found or 'it has none'}), a path relative to that folder."
        )


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a local path, not a Hub id: absolute, relative (``./``, ``~``), deeper than
    org/name, or under a folder that exists here (``models/nope``)."""
    path = Path(name).expanduser()
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        return True
    return "/" in name and path.parent.is_dir()


def tokenizer_kwargs(model_args: ModelArguments) -> dict:
    kwargs = {"revision": model_args.model_revision, "trust_remote_code": model_args.trust_remote_code}
    return kwargs | ({"gguf_file": model_args.gguf_file} if model_args.gguf_file else {})


def from_pretrained_kwargs(model_args: ModelArguments, init_kwargs: dict | None = None) -> dict:
    """``from_pretrained``'s keyword arguments from TRL's ``ModelConfig`` names; ``--model_init_kwargs`` win."""
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    kwargs = tokenizer_kwargs(model_args) | {"attn_implementation": model_args.attn_implementation, "dtype": dtype}
    return kwargs | dict(init_kwargs or {})


def lora_config(model_args: ModelArguments) -> LoraConfig:
    """The LoRA adapter of the model arguments (the bilevel run's and the final stage's), a causal LM's."""
    if model_args.lora_r < 1:
        raise ValueError(f"lora_r={model_args.lora_r} must be >= 1 (the adapter's rank; 8 or 16 are common).")
    if not model_args.lora_alpha > 0:
        raise ValueError(
            f"lora_alpha={model_args.lora_alpha} scales the adapter's output by lora_alpha / lora_r = 0 or less: the "
            "run would train nothing. Set --lora_alpha > 0 (as lora_r, or twice it, is common)."
        )
    return LoraConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules, layers_to_transform=model_args.lora_layers,
        task_type="CAUSAL_LM",  # as TRL writes it: peft's AutoPeftModelForCausalLM and the Hub read it
    )  # fmt: skip
