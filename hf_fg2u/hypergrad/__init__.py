"""One entry point for every hypergradient method: :func:`estimate_hypergradient`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..optim import InnerOptimizer, make_inner_optimizer
from .directions import DIRECTIONS, OuterSpace, sample_directions
from .forward import forward_directional_derivatives, split_directions
from .implicit import implicit_hypergradient
from .reverse import reverse_hypergradient
from .unroll import JVP_MODES, detach_tree
from .zeroth_order import zeroth_order_directional_derivatives

METHODS = ("fg2u", "fg2u_zo", "rgu", "trgu", "neumann", "cg", "hessian_free")
DEFAULT_JVP = "double_backward"

__all__ = [
    "DEFAULT_JVP",
    "DIRECTIONS",
    "JVP_MODES",
    "METHODS",
    "HypergradientResult",
    "NonFiniteHypergradientError",
    "estimate_hypergradient",
    "needs_second_order",
]


class NonFiniteHypergradientError(FloatingPointError):
    """The hypergradient or the outer loss is NaN or infinite."""


@dataclass
class HypergradientResult:
    """What one call of :func:`estimate_hypergradient` returns.

    grad: estimate of ∇h, a dict shaped like ``outer``. outer_loss: h(φ). params / optimizer_state: θ_T and
    the inner optimizer state after the unroll (for warm starts). inner_losses: the inner loss before each
    step. directional_derivatives: ⟨∇h, v_i⟩ per direction [b] for fg2u / fg2u_zo, else None.
    """

    grad: dict[str, torch.Tensor]
    outer_loss: float
    params: dict[str, torch.Tensor]
    optimizer_state: dict
    inner_losses: list[float] = field(default_factory=list)
    directional_derivatives: torch.Tensor | None = None
    method: str = "fg2u"
    num_directions: int = 0

    @property
    def grad_norm(self) -> float:
        return math.sqrt(sum(float(g.double().pow(2).sum()) for g in self.grad.values()))


def needs_second_order(method: str, jvp: str) -> bool:
    """Whether ``method`` differentiates through an inner gradient (needs forward AD or double backward)."""
    if method in ("fg2u_zo", "hessian_free"):
        return False
    if method in ("rgu", "trgu"):
        return True
    return jvp != "finite_difference"


def estimate_hypergradient(
    inner_loss: Callable,
    outer_loss: Callable,
    params: dict[str, torch.Tensor],
    outer: dict[str, torch.Tensor],
    inner_batches: Sequence,
    meta_batch,
    method: str = "fg2u",
    inner_optimizer: str | InnerOptimizer = "sgd",
    inner_lr: float = 1e-2,
    num_directions: int = 8,
    directions: str = "rademacher",
    seed: int = 0,
    *,
    inner_optimizer_kwargs: dict | None = None,
    optimizer_state: dict | None = None,
    jvp: str = DEFAULT_JVP,
    directions_per_pass: int | None = 8,
    direction_slice: slice | None = None,
    active_coordinates: dict[str, torch.Tensor | None] | None = None,
    fd_epsilon: float | None = None,
    truncation: int | None = None,
    zo_epsilon: float = 1e-3,
    zo_scheme: str = "central",
    implicit_steps: int = 10,
    neumann_lr: float | None = None,
    cg_damping: float = 0.0,
    implicit_batches: str = "all",
    step_seeds: Sequence[int | None] | None = None,
    reduce_gradients: Callable | None = None,
    progress: bool = False,
) -> HypergradientResult:
    """Estimate ∇_φ h(φ), h(φ) = outer_loss(θ_T(φ), φ, meta_batch), θ_T from T inner optimizer steps.

    inner_loss / outer_loss: pure functions ``(params, outer, batch) -> scalar``. params: θ_0. outer: φ.
    inner_batches: the T batches of the unroll, one per step. Methods: "fg2u", "fg2u_zo", "rgu", "trgu",
    "neumann", "cg", "hessian_free" (see the module docstrings of ``hf_fg2u.hypergrad``).

    Further keywords:
      inner_optimizer_kwargs: hyperparameters of the inner optimizer (``momentum``: beta, nesterov,
        weight_decay; ``adam``: betas, eps, eps_root, weight_decay).
      optimizer_state: inner optimizer state to start from (warm start); default: a fresh ``init``.
      jvp: how each step's tangent is computed (fg2u, neumann, cg): "forward", "double_backward",
        "finite_difference". The default, "double_backward", used less memory and time than "forward" on
        every model we measured (docs/benchmarks.md).
      directions_per_pass: directions batched in one vmap call (memory grows with it); None = all.
      direction_slice: compute only these of the b directions (a process's share); the estimate keeps the
        1/b scaling of all b, so the shares sum to the full estimate.
      active_coordinates: per outer key, a boolean mask of the coordinates that can affect h; directions are
        drawn on those only (N_eff). The exact direct term ∇_φ f is still added on every coordinate.
      fd_epsilon: perturbation norm of jvp="finite_difference" (default 1e-2, or 1e-5 in float64).
      truncation: K, the differentiated steps of "trgu".
      zo_epsilon, zo_scheme: step μ and "central"/"forward" differences of "fg2u_zo".
      implicit_steps, neumann_lr, cg_damping: iterations, Neumann step α (default ``inner_lr``), CG damping.
      implicit_batches: "all" (default) or "last": the inner batches whose mean loss defines the Hessians of
        "neumann", "cg" and "hessian_free".
      step_seeds: the RNG seed of each inner step (dropout masks); default derived from ``seed``.
      reduce_gradients: "fg2u" only: a function applied to each step's inner gradient and its tangents (a dict
        of tensors, tangents with a leading direction axis), e.g. a mean over data-parallel processes.
      progress: show a progress bar over the inner steps.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not known; use one of {METHODS}.")
    if jvp not in JVP_MODES:
        raise ValueError(f"jvp={jvp!r} is not known; use one of {JVP_MODES}.")
    if len(inner_batches) == 0:
        raise ValueError("inner_batches is empty: the unroll needs at least one inner batch (T >= 1).")
    if method == "trgu" and (truncation is None or truncation < 1):
        raise ValueError(f"method='trgu' needs truncation=K >= 1 (the differentiated last steps), got {truncation}.")
    if not params:
        raise ValueError("params is empty: the inner problem has no trainable parameters.")
    if reduce_gradients is not None and method != "fg2u":
        raise ValueError(f"reduce_gradients (a data-parallel inner loop) is only supported by 'fg2u', not {method!r}.")
    optimizer = make_inner_optimizer(inner_optimizer, inner_lr, **(inner_optimizer_kwargs or {}))
    params, outer = detach_tree(dict(params)), detach_tree(dict(outer))
    state = optimizer.init(params) if optimizer_state is None else detach_tree(optimizer_state)
    if step_seeds is None:
        step_seeds = [seed * 100_003 + t for t in range(len(inner_batches))]
    common = dict(seeds=list(step_seeds))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(inner_batches), desc=f"{method} unroll", leave=False)
    try:
        result = _dispatch(
            method, inner_loss, outer_loss, optimizer, params, state, outer, inner_batches, meta_batch, common,
            bar, inner_lr=inner_lr, num_directions=num_directions, directions=directions, seed=seed, jvp=jvp,
            directions_per_pass=directions_per_pass, direction_slice=direction_slice,
            active_coordinates=active_coordinates, fd_epsilon=fd_epsilon, truncation=truncation,
            zo_epsilon=zo_epsilon, zo_scheme=zo_scheme, implicit_steps=implicit_steps, neumann_lr=neumann_lr,
            cg_damping=cg_damping, implicit_batches=implicit_batches, reduce_gradients=reduce_gradients,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    check_finite(result)
    return result


def _dispatch(method, inner_loss, outer_loss, optimizer, params, state, outer, inner_batches, meta_batch,
              common, bar, *, inner_lr, num_directions, directions, seed, jvp, directions_per_pass,
              direction_slice, active_coordinates, fd_epsilon, truncation, zo_epsilon, zo_scheme,
              implicit_steps, neumann_lr, cg_damping, implicit_batches,
              reduce_gradients) -> HypergradientResult:  # fmt: skip
    if method in ("rgu", "trgu"):
        grad, value, params, state, losses = reverse_hypergradient(
            inner_loss, outer_loss, optimizer, params, state, outer, inner_batches, meta_batch,
            truncation=truncation if method == "trgu" else None, progress=bar, **common,
        )  # fmt: skip
        return HypergradientResult(grad, value, params, state, losses, method=method)
    if method in ("neumann", "cg", "hessian_free"):
        grad, value, params, state, losses = implicit_hypergradient(
            inner_loss, outer_loss, optimizer, params, state, outer, inner_batches, meta_batch, method=method,
            inner_lr=inner_lr, implicit_steps=implicit_steps, neumann_lr=neumann_lr, cg_damping=cg_damping,
            implicit_batches=implicit_batches, jvp=jvp, fd_epsilon=fd_epsilon, progress=bar, **common,
        )  # fmt: skip
        return HypergradientResult(grad, value, params, state, losses, method=method)

    if directions not in DIRECTIONS:
        raise ValueError(f"directions={directions!r} is not known; use one of {DIRECTIONS}.")
    space = OuterSpace(outer, active_coordinates)
    first = next(iter(outer.values()))
    matrix, scale = sample_directions(directions, num_directions, space.size, seed, first.dtype, first.device)
    if direction_slice is not None:
        matrix = matrix[direction_slice]
    per_pass = directions_per_pass or max(1, matrix.shape[0])
    chunks = split_directions(space.to_dict(matrix, outer), per_pass) if matrix.shape[0] else []

    if method == "fg2u":
        through_params, direct, value, params, state, losses = forward_directional_derivatives(
            inner_loss, outer_loss, optimizer, params, state, outer, inner_batches, meta_batch, chunks,
            jvp=jvp, fd_epsilon=fd_epsilon, progress=bar, reduce_gradients=reduce_gradients, **common,
        )  # fmt: skip
        estimate = space.to_dict(scale * (matrix.T @ through_params.to(matrix.dtype)), outer)
        share = 1.0 if direction_slice is None else matrix.shape[0] / num_directions
        grad = {k: estimate[k] + share * direct[k] for k in outer}
        derivatives = through_params + (matrix @ space.to_flat(direct).to(matrix.dtype))
    else:
        derivatives, value, params, state, losses = zeroth_order_directional_derivatives(
            inner_loss, outer_loss, optimizer, params, state, outer, inner_batches, meta_batch, chunks,
            zo_epsilon=zo_epsilon, zo_scheme=zo_scheme, progress=bar, **common,
        )  # fmt: skip
        grad = space.to_dict(scale * (matrix.T @ derivatives.to(matrix.dtype)), outer)
    return HypergradientResult(
        grad, value, params, state, losses, derivatives.detach(), method=method, num_directions=num_directions
    )


def check_finite(result: HypergradientResult) -> None:
    """Raise :class:`NonFiniteHypergradientError` naming what is NaN/inf; never hand back a silent NaN."""
    bad = [k for k, g in result.grad.items() if not torch.isfinite(g).all()]
    if not math.isfinite(result.outer_loss) or bad or any(not math.isfinite(x) for x in result.inner_losses):
        raise NonFiniteHypergradientError(
            f"{result.method}: non-finite values (outer loss {result.outer_loss}, last inner losses "
            f"{result.inner_losses[-3:]}, non-finite grad keys {bad}). The inner loop probably diverged: lower "
            "inner_lr or the unroll length, check the data for empty/NaN examples, or use a float32 model."
        )
