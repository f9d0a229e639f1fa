"""A functional bridge to Hugging Face models: inner parameters as a dict, stateless calls, write-back, and
the preflight that turns known-incompatible setups into clear errors before any transform runs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

HIGHER_ORDER_ATTENTION = ("eager", "sdpa")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DistributedDataParallel / DataParallel wrappers, which break ``jvp``; refuse FSDP, whose
    sharded parameters cannot be called functionally. The caller reduces the estimate itself."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
        model = model.module
    if type(model).__name__ in ("FullyShardedDataParallel", "FSDPModule") or hasattr(model, "_fsdp_wrapped_module"):
        raise ValueError(
            "The model is wrapped in FSDP, whose sharded parameters cannot be called with torch.func. Use plain "
            "data parallelism over directions (no FSDP), or a first-order method (method='hessian_free' or "
            "'fg2u_zo')."
        )
    return model


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """θ: detached copies of the parameters that require grad (a peft model's LoRA weights), by name."""
    params = {n: p.detach().clone() for n, p in unwrap_model(model).named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            "The model has no trainable parameters (requires_grad=True): nothing for the inner loop to train. "
            "Wrap it with a peft LoraConfig whose target_modules match the model, or unfreeze some parameters."
        )
    return params


def select_inner_parameters(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Make θ the parameters whose names match any regular expression of ``patterns`` (``re.search``) among
    those that require grad now, and freeze the rest; returns the selected names. A pattern that matches nothing
    is an error that names some parameters, so a typo cannot silently train nothing or everything."""
    import re

    named = {n: p for n, p in unwrap_model(model).named_parameters() if p.requires_grad}
    selected = set()
    for pattern in patterns:
        try:
            matches = {name for name in named if re.search(pattern, name)}
        except re.error as error:
            raise ValueError(f"inner_parameters: {pattern!r} is not a regular expression ({error}).") from error
        if not matches:
            raise ValueError(
                f"inner_parameters: {pattern!r} matches none of the trainable parameters; their names include "
                f"{list(named)[:8]}."
            )
        selected |= matches
    for name, parameter in named.items():
        parameter.requires_grad_(name in selected)
    return sorted(selected)


@torch.no_grad()
def load_parameters(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Write θ back into the model's parameters in place (after an outer step, before saving)."""
    named = dict(unwrap_model(model).named_parameters())
    missing = set(params) - set(named)
    if missing:
        raise KeyError(f"Parameters {sorted(missing)[:3]}... are not in the model; was it re-wrapped?")
    for name, value in params.items():
        named[name].copy_(value)


def functional_forward(model: torch.nn.Module, params: dict[str, torch.Tensor], **inputs):
    """Call ``model(**inputs)`` with ``params`` substituted for its parameters (no state modified)."""
    return torch.func.functional_call(model, params, args=(), kwargs=inputs)


def attention_implementation(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or "eager"


def gradient_checkpointing(model: torch.nn.Module) -> bool:
    """Whether any layer of ``model`` checkpoints activations (what transformers' ``is_activation_checkpointing``
    computes; its old name ``is_gradient_checkpointing`` warns, and a peft wrapper forwards to it)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def preflight(model: torch.nn.Module, second_order: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """Check that ``model`` can be differentiated as the chosen method needs, and return a factory of the
    context the loss functions run under: SDPA models are switched to the math kernel, the only SDPA kernel with forward
    AD and double backward. Raises ``ValueError`` naming the fix otherwise."""
    model = unwrap_model(model)
    if gradient_checkpointing(model):
        raise ValueError(
            "Gradient checkpointing does not compose with torch.func transforms. Disable it "
            "(model.gradient_checkpointing_disable(), or gradient_checkpointing=False in the config); the "
            "forward-mode methods do not need it, as their memory does not grow with the unroll."
        )
    implementation = attention_implementation(model)
    if implementation == "sdpa":
        return lambda: sdpa_kernel(SDPBackend.MATH)
    if second_order and implementation not in HIGHER_ORDER_ATTENTION:
        raise ValueError(
            f"attn_implementation={implementation!r} has no forward-mode AD or double backward, which this "
            "method needs. Load the model with attn_implementation='eager' (or 'sdpa'), or keep the kernel "
            "and use jvp='finite_difference' (or method='fg2u_zo' / 'hessian_free')."
        )
    return contextlib.nullcontext
