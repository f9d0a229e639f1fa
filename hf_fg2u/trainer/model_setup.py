"""Turning a base model into the inner problem's model: a GGUF-loaded base made trainable, a peft adapter seeded
apart from loading, and a record of how to load the base back."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, set_seed
from transformers.utils import logging

from hf_fg2u.hub.base_model import save_base_model_record
from hf_fg2u.lm.params import select_inner_parameters, trainable_parameters
from hf_fg2u.outer import OuterModule
from hf_fg2u.trainer.run_folder import check_output_dir

logger = logging.get_logger(__name__)


def gguf_file_of(model) -> str | None:
    """The GGUF file ``model`` was loaded from (``from_pretrained(folder, gguf_file=...)`` leaves it on
    ``config.quantization_config``; :func:`trainable_base` moves it to ``config.gguf_file``), else None."""
    config = getattr(model, "config", None)
    quantization = getattr(config, "quantization_config", None)
    marked = quantization is not None and _is_gguf(quantization)
    return (_field(quantization, "gguf_file") if marked else None) or getattr(config, "gguf_file", None)


def _field(quantization, name: str):
    return quantization.get(name) if isinstance(quantization, dict) else getattr(quantization, name, None)


def _is_gguf(quantization) -> bool:
    method = _field(quantization, "quant_method")
    return str(getattr(method, "value", method)) == "gguf"


def trainable_base(model):
    """``model`` as one the Trainer trains and saves. ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``
    dequantises every weight to a dense tensor but leaves the model marked quantised, which the Trainer refuses to
    train and ``save_pretrained`` to save: such a model is rebuilt from its config without the mark, on the same
    parameter tensors (no copy of the weights), with the GGUF file kept in ``config.gguf_file`` for the base-model
    record. Any other model is returned as it is."""
    config = getattr(model, "config", None)
    quantization = getattr(config, "quantization_config", None)
    if quantization is None or not _is_gguf(quantization):
        return model
    if hasattr(model, "peft_config"):
        raise ValueError(
            "The model is a peft adapter on a GGUF-loaded base, which the Trainer refuses to train. Pass the base "
            "model itself with peft_config=..., or wrap hf_fg2u.trainer.model_setup.trainable_base(base) instead."
        )
    packed = [name for name, module in model.named_modules() if type(module).__name__.startswith("Gguf")]
    if packed:
        raise ValueError(
            f"The GGUF model keeps {len(packed)} modules packed in GGUF blocks (e.g. {packed[0]}), which cannot be "
            "trained. Load it dequantised: from_pretrained(..., gguf_file=..., "
            "quantization_config=transformers.GgufConfig(dequantize=True))."
        )
    config = copy.deepcopy(config)
    del config.quantization_config
    config.gguf_file = gguf_file_of(model)
    with init_empty_weights(include_buffers=False):  # the weights come from the GGUF load: allocate none here
        fresh = AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation)
    fresh.load_state_dict(model.state_dict(keep_vars=True), assign=True)
    fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh.train(model.training)


def write_base_model_file(output_dir: str | Path, model, name: str | None = None) -> None:
    """Record the GGUF file a base model was loaded from: the adapter config names only the folder, from which
    ``from_pretrained`` alone cannot load it. ``name``: the base's folder, by default its config's."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    save_base_model_record(output_dir, name, gguf_file_of(model))


def wrap_with_peft(model, peft_config, seed: int | None = None):
    """Wrap ``model`` in a peft adapter; a config that matches no module is an error that names the modules. With
    ``seed`` the adapter's random initial weights come from it, not from whatever ran before in the process: the
    same command gives the same run, and fresh adapters compared start alike."""
    from peft import get_peft_model

    if seed is not None:
        set_seed(seed)
    try:
        with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return get_peft_model(model, peft_config)
    except ValueError as error:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
        raise ValueError(
            f"The peft config targets nothing in this model ({error}). target_modules="
            f"{getattr(peft_config, 'target_modules', None)}; module names here include {names[:20]}."
        ) from error


def check_trainer_inputs(args, outer) -> None:
    """The config and outer module ``BilevelTrainer`` was given, before anything is loaded."""
    from hf_fg2u.trainer.config import BilevelConfig

    if not isinstance(args, BilevelConfig):
        raise TypeError(f"args must be a BilevelConfig, got {type(args).__name__}.")
    check_output_dir(args.output_dir, args.overwrite_output_dir)
    if outer is None or not isinstance(outer, OuterModule):
        raise TypeError(
            "outer must be an OuterModule (ExampleWeights, DomainWeights, WeightNet or SoftPrompt), got "
            f"{type(outer).__name__}."
        )


def prepare_model(model, args, peft_config):
    """(model, its name): loaded when given by name, wrapped in a fresh adapter when ``peft_config`` is given,
    with the inner parameters selected; a clear error when nothing is left to train."""
    if isinstance(model, str):
        name = model
        model = AutoModelForCausalLM.from_pretrained(model, **(args.model_init_kwargs or {}))
    else:
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    model = trainable_base(model)
    if peft_config is not None:
        if hasattr(model, "peft_config"):
            raise ValueError(
                "The model already has a peft adapter and peft_config was given too. Drop peft_config to train "
                "the existing adapter (load it with is_trainable=True), or pass the base model."
            )
        model = wrap_with_peft(model, peft_config, args.seed)
    if args.inner_parameters:
        select_inner_parameters(model, args.inner_parameters)
    theta = trainable_parameters(model)  # raises a clear error when nothing is trainable
    refuse_float16_full_theta(model, theta)
    warn_if_adam_eps_below_half_precision(model, args)
    return model, name


def refuse_float16_full_theta(model, theta: dict[str, torch.Tensor]) -> None:
    """A θ of the model's own weights (no peft adapter) in float16: its hypergradients overflow to inf/NaN
    (docs/low_precision.md), and every step would then be skipped or stop the run as if it diverged. fp16 LoRA
    stays close to float64 there, and bf16 has float32's range."""
    half = [name for name, value in theta.items() if value.dtype == torch.float16]
    if half and not hasattr(model, "peft_config"):
        raise ValueError(
            f"θ holds {len(half)} float16 weights of the model itself (e.g. {half[0]!r}), with no peft adapter: a "
            "full-parameter θ in float16 gives non-finite hypergradients (its range overflows; docs/low_precision.md). "
            'Load the model in bfloat16 or float32 (model_init_kwargs=\'{"dtype": "bfloat16"}\'), or train a LoRA '
            "adapter on the float16 model (peft_config)."
        )


HALF_PRECISION_INNER_EPS = 1e-4  # docs/low_precision.md: cosine >= 0.99 to the float64 hypergradient (0.33 at 1e-8)


def warn_if_adam_eps_below_half_precision(model, args) -> None:
    """Adam's step divides by √v + ε, so its Jacobian (what every method carries back) weighs a coordinate by
    about 1/|gradient|: the smallest gradients dominate the hypergradient, and on a bf16/fp16 model they are
    mostly rounding."""
    half = sorted({str(p.dtype) for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)})
    if args.inner_optimizer == "adam" and half and args.inner_eps < HALF_PRECISION_INNER_EPS:
        warnings.warn(
            f"The model computes in {', '.join(half)} and the inner optimizer is Adam with inner_eps="
            f"{args.inner_eps:g}: the hypergradient is then dominated by the coordinates with the smallest "
            f"gradients, which {half[0]} cannot resolve (docs/low_precision.md: cosine 0.33 to the float64 "
            f"hypergradient). Set inner_eps={HALF_PRECISION_INNER_EPS:g} or more (cosine >= 0.99), or "
            "inner_optimizer='sgd'/'momentum'.",
            stacklevel=3,
        )


def check_datasets(train_dataset, meta_dataset) -> None:
    if meta_dataset is None or len(meta_dataset) == 0:
        raise ValueError(
            "meta_dataset is missing or empty: the outer objective needs held-out examples (e.g. clean or "
            "target-domain data), tokenized like the train dataset."
        )
    if train_dataset is None or len(train_dataset) == 0:
        raise ValueError("train_dataset is missing or empty: the inner loop needs training examples.")
