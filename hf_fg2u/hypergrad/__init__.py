"""One entry point for every hypergradient method: :func:`estimate_hypergradient`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hf_fg2u.hypergrad.directions import DIRECTIONS
from hf_fg2u.hypergrad.inner_optimizers import InnerOptimizer, make_inner_optimizer
from hf_fg2u.hypergrad.methods import (
    DEFAULT_JVP,
    METHOD_SPECS,
    METHODS,
    HypergradientMethod,
    Unroll,
    make_method,
    method_from_config,
    needs_second_order,
)
from hf_fg2u.hypergrad.result import HypergradientResult, NonFiniteHypergradientError, check_finite
from hf_fg2u.hypergrad.unroll import JVP_MODES, detach_tree

# Inner step t of an unroll seeded ``seed`` draws its randomness (dropout) from seed * STEP_SEED_STRIDE + t.
STEP_SEED_STRIDE = 100_003

__all__ = [
    "DEFAULT_JVP",
    "DIRECTIONS",
    "JVP_MODES",
    "METHODS",
    "METHOD_SPECS",
    "HypergradientMethod",
    "HypergradientResult",
    "NonFiniteHypergradientError",
    "estimate_hypergradient",
    "make_method",
    "method_from_config",
    "needs_second_order",
]


def estimate_hypergradient(
    inner_loss: Callable,
    outer_loss: Callable,
    params: dict[str, torch.Tensor],
    outer: dict[str, torch.Tensor],
    inner_batches: Sequence,
    meta_batch,
    method: str | HypergradientMethod = "fg2u",
    inner_optimizer: str | InnerOptimizer = "sgd",
    inner_lr: float | None = None,
    seed: int = 0,
    *,
    inner_optimizer_kwargs: dict | None = None,
    optimizer_state: dict | None = None,
    direction_slice: slice | None = None,
    active_coordinates: dict[str, torch.Tensor | None] | None = None,
    step_seeds: Sequence[int | None] | None = None,
    reduce_gradients: Callable | None = None,
    meta_gradient: Callable | None = None,
    progress: bool = False,
    **method_options,
) -> HypergradientResult:
    """Estimate ∇_φ h(φ), h(φ) = outer_loss(θ_T(φ), φ, meta_batch), θ_T from T inner optimizer steps.

    inner_loss / outer_loss: pure functions ``(params, outer, batch) -> scalar``. params: θ_0. outer: φ.
    inner_batches: the T batches of the unroll, one per step. method: a name in :data:`METHODS` ("fg2u",
    "fg2u_zo", "rgu", "trgu", "neumann", "cg", "hessian_free"; see ``hf_fg2u.hypergrad.methods``), or a
    :class:`HypergradientMethod` built once with :func:`make_method` / :func:`method_from_config` — then its own
    options are used, and passing method keywords as well is a TypeError. inner_optimizer: a name ("sgd",
    "momentum", "adam", built with ``inner_lr``, default 1e-2) or a built :class:`InnerOptimizer`, which carries
    its own learning rate (then ``inner_lr`` may only repeat it).

    Method keywords (``**method_options``; those only other methods read are ignored, unknown ones are a TypeError):
      num_directions, directions, directions_per_pass: b, the kind of directions, and how many are batched in one
        vmap call (memory grows with it; None = all) — fg2u, fg2u_zo.
      jvp: how each step's tangent is computed (fg2u, neumann, cg): "forward", "double_backward",
        "finite_difference". The default, "double_backward", used less memory and time than "forward" on
        every model we measured (docs/benchmarks.md). fd_epsilon: its perturbation norm (default 1e-2, 1e-5 in
        float64).
      truncation: K, the differentiated steps of "trgu". checkpoint_every: rgu/trgu keep every k-th inner state
        and recompute the rest (memory ≈ (T/k + k)·|θ, s|). offload_trajectory: rgu/trgu keep the stored states in
        CPU memory. keep_step_graphs: rgu/trgu keep each step's autograd graph from the forward unroll instead of
        recomputing it in the backward sweep (less time, T steps' activations in memory).
      zo_epsilon, zo_scheme: step μ and "central"/"forward" differences of "fg2u_zo".
      implicit_steps, neumann_lr, cg_damping: iterations, Neumann step α (default: the inner optimizer's lr),
        CG damping.
      implicit_batches: "all" (default) or "last": the inner batches whose mean loss defines the Hessians of
        "neumann", "cg" and "hessian_free".

    Per-call keywords:
      inner_optimizer_kwargs: hyperparameters of the inner optimizer (``momentum``: beta, nesterov,
        weight_decay; ``adam``: betas, eps, eps_root, weight_decay).
      optimizer_state: inner optimizer state to start from (warm start); default: a fresh ``init``.
      direction_slice: compute only these of the b directions (a process's share); the estimate keeps the
        1/b scaling of all b, so the shares sum to the full estimate.
      active_coordinates: per outer key, a boolean mask of the coordinates that can affect h; directions are
        drawn on those only (N_eff). The exact direct term ∇_φ f is still added on every coordinate.
      step_seeds: the RNG seed of each inner step (dropout masks); default derived from ``seed``.
      reduce_gradients: fg2u, rgu and trgu: a function applied to each step's inner gradient and to its
        tangents (fg2u) or its VJP (rgu), e.g. a mean over data-parallel processes.
      meta_gradient: ``(θ_T, φ, meta_batch) -> ((∇_θ f', ∇_φ f), f)``, computed instead of the outer loss's plain
        gradient, e.g. with directions the outer problem should not credit removed (``projection.project_out``,
        ``hf_fg2u.lm.group_shift``); ∇_θ f' is what the method carries back. Not for "fg2u_zo".
      progress: show a progress bar over the inner steps.
    """
    method = make_method(method, **method_options)
    if len(inner_batches) == 0:
        raise ValueError("inner_batches is empty: the unroll needs at least one inner batch (T >= 1).")
    if not params:
        raise ValueError("params is empty: the inner problem has no trainable parameters.")
    optimizer = make_inner_optimizer(inner_optimizer, inner_lr, **(inner_optimizer_kwargs or {}))
    params, outer = detach_tree(dict(params)), detach_tree(dict(outer))
    state = optimizer.init(params) if optimizer_state is None else detach_tree(optimizer_state)
    if step_seeds is None:
        step_seeds = [seed * STEP_SEED_STRIDE + t for t in range(len(inner_batches))]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(inner_batches), desc=f"{method.name} unroll", leave=False)
    unroll = Unroll(
        inner_loss, outer_loss, optimizer, params, state, outer, inner_batches, meta_batch,
        list(step_seeds), seed=seed, direction_slice=direction_slice, active_coordinates=active_coordinates,
        reduce_gradients=reduce_gradients, progress=bar,
        meta_gradient=meta_gradient,
    )  # fmt: skip
    try:
        result = method.estimate(unroll)
    finally:
        if bar is not None:
            bar.close()
    check_finite(result)
    return result
