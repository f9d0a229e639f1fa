"""Shared pieces of every method: pytree helpers, the primal inner step, per-step RNG and inner-gradient
tangents (the three ``jvp`` modes)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_leaves, tree_map

from hf_fg2u.hypergrad.inner_optimizers import InnerOptimizer

LossFn = Callable[[dict, dict, object], torch.Tensor]
JVP_MODES = ("forward", "double_backward", "finite_difference")


@dataclass
class Unroll:
    """The data of one hypergradient call: the problem, θ_0 and s_0, φ, the batches, and per-call context."""

    inner_loss: Callable
    outer_loss: Callable
    optimizer: InnerOptimizer
    params: dict
    state: dict
    outer: dict
    inner_batches: Sequence
    meta_batch: object
    seeds: list
    seed: int = 0
    direction_slice: slice | None = None
    active_coordinates: dict | None = None
    reduce_gradients: Callable | None = None
    progress: object = None
    meta_gradient: Callable | None = None


def tree_dot(a, b) -> torch.Tensor:
    """Σ ⟨a_leaf, b_leaf⟩ over matching pytrees (leading vmap dims are handled by vmap itself)."""
    return sum((x * y).sum() for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True))


def tree_axpy(alpha, x, y):
    """alpha·x + y, leafwise."""
    return tree_map(lambda a, b: alpha * a + b, x, y)


def tree_zeros_like(tree, leading: tuple[int, ...] = ()):
    return tree_map(lambda t: torch.zeros(*leading, *t.shape, dtype=t.dtype, device=t.device), tree)


def detach_tree(tree):
    return tree_map(lambda t: t.detach(), tree)


def clone_tree(tree):
    """A detached copy of every tensor of ``tree``; None (no state yet) stays None."""
    return None if tree is None else tree_map(lambda t: t.detach().clone(), tree)


def _rng_devices() -> list[int]:
    """The accelerator whose RNG a step's dropout draws from, beside the CPU's."""
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


@contextlib.contextmanager
def step_rng(seed: int | None):
    """Fix the global RNG for one inner step, so every pass over it (primal, each tangent chunk) sees the
    same dropout masks: all directions differentiate the same function."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=_rng_devices()):
        torch.manual_seed(seed)
        yield


def same_randomness(*calls: Callable) -> list:
    """Run each call from the same RNG state: evaluations that must differ only in their inputs (the two sides of
    a finite difference) see the same dropout masks, or the difference measures the masks, not the function."""
    results = []
    for call in calls:  # fork_rng puts the state back after each call: the next starts where this one did
        with torch.random.fork_rng(devices=_rng_devices()):
            results.append(call())
    return results


def finite_difference_epsilon(params: dict, fd_epsilon: float | None) -> float:
    """The step of a central difference in θ: ``fd_epsilon``, else 1e-5 in float64 and 1e-2 in float32. Refused in
    bf16/fp16, where a step spread over θ's coordinates is below the format's resolution (relative error 6.5
    measured in bf16): use an exact method (jvp='forward', method='rgu' or 'fg2u') or a float32 θ."""
    dtype = next(iter(tree_leaves(params))).dtype
    if dtype in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"Finite differences of the inner gradient need θ in float32 or float64, and θ is {dtype}: the step is "
            "below its resolution. Use jvp='forward' (or method='rgu'/'fg2u') for a half-precision θ, or keep the "
            "trained parameters in float32 (LoRA adapters are, by default)."
        )
    if fd_epsilon is not None:
        return fd_epsilon
    return 1e-5 if dtype == torch.float64 else 1e-2


def meta_gradient_and_value(u: Unroll, params):
    """((∇_θ f, ∇_φ f), f) at θ = ``params``, under the call's seed: every method and every evaluation of the meta
    loss sees the same dropout masks. ``u.meta_gradient(θ, φ, meta_batch)``, when set, computes them instead (e.g.
    with directions removed from ∇_θ f) before any method carries ∇_θ f back through the unroll."""
    compute = u.meta_gradient or torch.func.grad_and_value(u.outer_loss, argnums=(0, 1))
    with step_rng(u.seed):
        (grad_params, grad_outer), value = compute(params, u.outer, u.meta_batch)
    return (grad_params, grad_outer), value


def primal_step(inner_loss: LossFn, optimizer: InnerOptimizer, params, state, outer, batch, seed, reduce=None):
    """One inner step with nothing differentiated: (θ, s) -> (θ', s'), plus the inner loss before the step.

    ``reduce`` (a mean over data-parallel processes) is applied to the inner gradient before the update."""
    with step_rng(seed):
        grads, loss = torch.func.grad_and_value(inner_loss)(params, outer, batch)
    grads = detach_tree(grads) if reduce is None else reduce(detach_tree(grads))
    new_params, new_state = optimizer.update(grads, state, params)
    return detach_tree(new_params), detach_tree(new_state), loss.detach()


def run_inner_loop(
    inner_loss: LossFn,
    optimizer: InnerOptimizer,
    params,
    state,
    outer,
    batches: Sequence,
    seeds: Sequence[int | None],
    progress=None,
    reduce_gradients: Callable | None = None,
):
    """Run the primal inner loop with nothing differentiated; returns (θ_T, s_T, inner losses)."""
    losses = []
    for batch, seed in zip(batches, seeds, strict=True):
        params, state, loss = primal_step(inner_loss, optimizer, params, state, outer, batch, seed, reduce_gradients)
        losses.append(float(loss))
        if progress is not None:
            progress.update(1)
    return params, state, losses


def make_grad_tangent(inner_loss: LossFn, mode: str, fd_epsilon: float | None) -> Callable:
    """Return ``tangent(params, outer, batch, d_params, d_outer) -> (dg, g, loss)``: dg = H_θθ·d_params +
    H_θφ·d_outer is the directional derivative of g = ∇_θL along (d_params, d_outer); it batches under vmap.
    g and the loss come for free from the same pass ("forward", "double_backward"; None otherwise) and do not
    depend on the direction, so a vmap can return them unbatched.

    - "forward": ``torch.func.jvp`` of ``torch.func.grad`` (forward-over-reverse);
    - "double_backward": ∇_θ(⟨∇_θL, d_params⟩ + ⟨∇_φL, d_outer⟩), reverse-over-reverse;
    - "finite_difference": a central difference of ∇_θL along the direction, first-order only, for
      kernels with neither forward AD nor double backward.
    """
    grad_params = torch.func.grad(inner_loss, argnums=0)

    if mode == "forward":
        grad_and_loss = torch.func.grad_and_value(inner_loss, argnums=0)

        def tangent(params, outer, batch, d_params, d_outer):
            primal, (d_grads, _) = torch.func.jvp(
                lambda p, o: grad_and_loss(p, o, batch), (params, outer), (d_params, d_outer)
            )
            return d_grads, primal[0], primal[1]

    elif mode == "double_backward":
        grad_both = torch.func.grad_and_value(inner_loss, argnums=(0, 1))

        def tangent(params, outer, batch, d_params, d_outer):
            def pairing(p):
                (g_params, g_outer), loss = grad_both(p, outer, batch)
                return tree_dot(g_params, d_params) + tree_dot(g_outer, d_outer), (g_params, loss)

            d_grads, (grads, loss) = torch.func.grad(pairing, has_aux=True)(params)
            return d_grads, grads, loss

    elif mode == "finite_difference":

        def tangent(params, outer, batch, d_params, d_outer):
            eps = finite_difference_epsilon(params, fd_epsilon)
            norm = torch.sqrt(tree_dot(d_params, d_params) + tree_dot(d_outer, d_outer))
            step = eps / norm.clamp_min(1e-30)
            plus, minus = same_randomness(
                lambda: grad_params(tree_axpy(step, d_params, params), tree_axpy(step, d_outer, outer), batch),
                lambda: grad_params(tree_axpy(-step, d_params, params), tree_axpy(-step, d_outer, outer), batch),
            )
            return tree_map(lambda a, b: (a - b) / (2 * step), plus, minus), None, None

    else:
        raise ValueError(f"jvp={mode!r} is not known; use one of {JVP_MODES}.")
    return tangent
