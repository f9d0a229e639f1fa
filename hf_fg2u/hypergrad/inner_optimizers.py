"""Pure, differentiable inner optimizers.

Each optimizer is an ``init(params) -> state`` / ``update(grads, state, params) -> (params, state)`` pair
over dicts of tensors (optax style). Nothing is modified in place, so the whole inner step can be handed to
``torch.func.jvp``, ``grad`` or ``vmap`` and its state (momentum, moments) carries tangents like the
parameters do. The step counter lives in the state as a float tensor so that the state stays a pytree of
floating tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from hf_fg2u.registry import Registry

Params = dict[str, torch.Tensor]
State = dict[str, dict[str, torch.Tensor] | torch.Tensor]


class InnerOptimizer(NamedTuple):
    """A pure optimizer: ``init(params) -> state`` and ``update(grads, state, params) -> (params, state)``.

    ``lr`` is the step size baked into ``update``, kept beside it so that the implicit methods (whose Neumann
    step defaults to it) read the same number the unroll used: one source, never a second copy to disagree."""

    name: str
    lr: float
    init: Callable[[Params], State]
    update: Callable[[Params, State, Params], tuple[Params, State]]


def sgd(lr: float, weight_decay: float = 0.0) -> InnerOptimizer:
    """Plain gradient descent: θ ← θ − lr·(g + wd·θ)."""

    def init(params: Params) -> State:
        return {}

    def update(grads: Params, state: State, params: Params) -> tuple[Params, State]:
        new = {k: p - lr * (grads[k] + weight_decay * p) for k, p in params.items()}
        return new, {}

    return InnerOptimizer("sgd", lr, init, update)


def momentum(lr: float, beta: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0) -> InnerOptimizer:
    """Heavy-ball SGD (PyTorch convention): m ← β·m + g; θ ← θ − lr·m (or lr·(g + β·m) with Nesterov)."""

    def init(params: Params) -> State:
        return {"momentum": {k: torch.zeros_like(p) for k, p in params.items()}}

    def update(grads: Params, state: State, params: Params) -> tuple[Params, State]:
        new_params, new_m = {}, {}
        for k, p in params.items():
            g = grads[k] + weight_decay * p
            m = beta * state["momentum"][k] + g
            step = g + beta * m if nesterov else m
            new_params[k] = p - lr * step
            new_m[k] = m
        return new_params, {"momentum": new_m}

    return InnerOptimizer("momentum", lr, init, update)


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """Adam's counter and moments in fp32 when θ is bf16/fp16: in bf16 0.999**1 rounds to 1 (the bias correction
    divides by 0), the counter stops at 256 (2048 in fp16) and eps_root underflows in fp16."""
    return torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype


def adam(
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    eps_root: float = 1e-16,
    weight_decay: float = 0.0,
) -> InnerOptimizer:
    """Adam, or AdamW when ``weight_decay`` > 0 (decoupled decay).

    ``eps_root`` is added inside the square root: at a coordinate whose gradient is exactly zero (peft's
    ``lora_A`` while ``lora_B = 0``) the derivative of ``sqrt(v)`` is infinite and the tangent would be NaN.
    """
    beta1, beta2 = betas

    def init(params: Params) -> State:
        zeros = {k: torch.zeros_like(p, dtype=state_dtype(p)) for k, p in params.items()}
        first = next(iter(params.values()))
        step = torch.zeros((), dtype=state_dtype(first), device=first.device)
        return {"exp_avg": zeros, "exp_avg_sq": dict(zeros), "step": step}

    def update(grads: Params, state: State, params: Params) -> tuple[Params, State]:
        step = state["step"] + 1
        bias1 = 1 - beta1**step
        bias2 = 1 - beta2**step
        new_params, new_m, new_v = {}, {}, {}
        for k, p in params.items():
            dtype = state_dtype(p)  # the step in the state's precision, the result back in θ's
            g = grads[k].to(dtype)
            m = beta1 * state["exp_avg"][k] + (1 - beta1) * g
            v = beta2 * state["exp_avg_sq"][k] + (1 - beta2) * g * g
            denom = torch.sqrt(v / bias2 + eps_root) + eps
            new_params[k] = (p.to(dtype) * (1 - lr * weight_decay) - lr * (m / bias1) / denom).to(p.dtype)
            new_m[k], new_v[k] = m, v
        return new_params, {"exp_avg": new_m, "exp_avg_sq": new_v, "step": step}

    return InnerOptimizer("adam", lr, init, update)


INNER_OPTIMIZERS: Registry[Callable[..., InnerOptimizer]] = Registry("inner_optimizer")
for _factory in (sgd, momentum, adam):
    INNER_OPTIMIZERS.register(_factory.__name__, _factory)


DEFAULT_INNER_LR = 1e-2


def make_inner_optimizer(name: str | InnerOptimizer, lr: float | None = None, **hyperparameters) -> InnerOptimizer:
    """Build an inner optimizer by name ("sgd", "momentum", "adam"; ``lr`` default 1e-2). A built
    ``InnerOptimizer`` passes through with its own lr: a different ``lr`` or extra hyperparameters beside it are
    an error, not silently dropped."""
    if isinstance(name, InnerOptimizer):
        if (lr is not None and lr != name.lr) or hyperparameters:
            raise ValueError(
                f"The inner optimizer {name.name!r} is already built with lr={name.lr}; lr={lr} and "
                f"{sorted(hyperparameters)} beside it would not be used. Pass its name to build it, or drop them."
            )
        return name
    return INNER_OPTIMIZERS.get(name)(DEFAULT_INNER_LR if lr is None else lr, **hyperparameters)
