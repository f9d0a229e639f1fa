"""Implicit hypergradients at θ_T: Neumann series, conjugate gradient, and the Hessian-free (identity
inverse-Hessian, SAMA/DARTS-style, first-order) approximation.

Neumann and CG assume θ_T is near a stationary point of the inner loss averaged over the unroll's batches
(L̄), so dθ*/dφ = −H̄_θθ⁻¹ H̄_θφ and ∇h = ∇_φ f − H̄_φθ q with q ≈ H̄_θθ⁻¹ ∇_θ f. The optimizer path that led
to θ_T does not enter: these are the references for a converged inner problem, not for the unroll.
Hessian-free treats every factor (I − αH_θθ) of the unrolled Jacobian as the identity:
dθ_T/dφ ≈ −α Σ_t ∂_φ∇_θL(θ_{t-1}, batch_t), so ∇h ≈ ∇_φ f − α Σ_t H_φθ(θ_{t-1}) ∇_θ f(θ_T): first-order
(central differences of ∇_φL, DARTS/SAMA-style), it keeps the T inner iterates (adapter-sized), and it is
exact for one SGD step.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils._pytree import tree_map

from hf_fg2u.hypergrad.unroll import (
    Unroll,
    detach_tree,
    finite_difference_epsilon,
    make_grad_tangent,
    meta_gradient_and_value,
    run_inner_loop,
    same_randomness,
    step_rng,
    tree_axpy,
    tree_dot,
)


def implicit_hypergradient(unroll: Unroll, method: str, options):
    """Return (∇h estimate, h, θ_T, s_T, inner losses) for method "neumann", "cg" or "hessian_free"; ``options``:
    an ``ImplicitOptions`` (implicit_steps, neumann_lr, cg_damping, implicit_batches, jvp, fd_epsilon)."""
    if method == "hessian_free":
        return hessian_free_hypergradient(unroll, options.fd_epsilon)
    u, o = unroll, options
    inner_loss, optimizer, outer = u.inner_loss, u.optimizer, u.outer
    inner_batches, seeds, implicit_batches = u.inner_batches, u.seeds, o.implicit_batches
    params, state, losses = run_inner_loop(
        inner_loss, optimizer, u.params, u.state, outer, inner_batches, seeds, u.progress
    )
    if implicit_batches == "last":  # "all" or "last": ImplicitOptions validated it
        inner_batches, seeds = inner_batches[-1:], seeds[-1:]
    pairs = list(zip(inner_batches, seeds, strict=True))
    (meta_params, meta_outer), value = meta_gradient_and_value(u, params)
    zero_outer = tree_map(torch.zeros_like, outer)
    grad_tangent = make_grad_tangent(inner_loss, o.jvp, o.fd_epsilon)

    def hvp(vector):
        products = []
        for batch, seed in pairs:
            with step_rng(seed):
                products.append(detach_tree(grad_tangent(params, outer, batch, vector, zero_outer)[0]))
        return tree_map(lambda *leaves: sum(leaves) / len(leaves), *products)

    if method == "neumann":
        alpha = u.optimizer.lr if o.neumann_lr is None else o.neumann_lr
        term, total = meta_params, meta_params
        for _ in range(o.implicit_steps):
            term = tree_axpy(-alpha, hvp(term), term)
            total = tree_map(torch.add, total, term)
        solution = tree_map(lambda t: alpha * t, total)
    elif method == "cg":
        solution = conjugate_gradient(hvp, meta_params, o.implicit_steps, o.cg_damping)
    else:
        raise ValueError(f"implicit method {method!r} is not known.")

    mixed = []
    for batch, seed in pairs:
        with step_rng(seed):
            mixed.append(mixed_product(inner_loss, params, outer, batch, solution, o.jvp, o.fd_epsilon, False))
    mean_mixed = tree_map(lambda *leaves: sum(leaves) / len(leaves), *mixed)
    grad = tree_map(lambda direct, m: (direct - m).detach(), meta_outer, mean_mixed)
    return grad, float(value), params, state, losses


def hessian_free_hypergradient(unroll: Unroll, fd_epsilon: float | None):
    """∇_φ f − α Σ_t H_φθ(θ_{t-1}, batch_t) ∇_θ f(θ_T), with only first derivatives."""
    u = unroll
    inner_loss, outer, params, state = u.inner_loss, u.outer, u.params, u.state
    iterates, losses = [], []
    for batch, seed in zip(u.inner_batches, u.seeds, strict=True):
        iterates.append(params)
        params, state, step_losses = run_inner_loop(
            inner_loss, u.optimizer, params, state, outer, [batch], [seed], u.progress
        )
        losses += step_losses
    (meta_params, meta_outer), value = meta_gradient_and_value(u, params)
    grad = tree_map(torch.Tensor.detach, meta_outer)
    for iterate, batch, seed in zip(iterates, u.inner_batches, u.seeds, strict=True):
        with step_rng(seed):
            mixed = mixed_product(inner_loss, iterate, outer, batch, meta_params, "finite_difference", fd_epsilon, True)
        grad = tree_map(lambda g, m: (g - u.optimizer.lr * m).detach(), grad, mixed)
    return grad, float(value), params, state, losses


def conjugate_gradient(hvp, rhs, steps: int, damping: float = 0.0):
    """Solve (H + damping·I) x = rhs from x = 0 with ``steps`` CG iterations; H must be positive definite.
    At a direction of non-positive curvature CG has no meaningful step: stop there with a warning (the
    iterate so far is kept) instead of returning a solution that may point the wrong way."""
    x = tree_map(torch.zeros_like, rhs)
    residual, direction = rhs, rhs
    rr = tree_dot(residual, residual)
    for iteration in range(steps):
        if float(rr) == 0.0:
            break
        product = tree_axpy(damping, direction, hvp(direction))
        curvature = tree_dot(direction, product)
        if float(curvature) <= 0.0:
            warnings.warn(
                f"cg: non-positive curvature {float(curvature):.3g} at iteration {iteration + 1}: the inner Hessian at "
                "θ_T is not positive definite (θ_T is not near a minimum of the inner loss). Stopped there. Raise "
                "cg_damping, unroll further before using an implicit method, or use method='fg2u' or 'neumann'.",
                stacklevel=2,
            )
            break
        alpha = rr / curvature
        x = tree_axpy(alpha, direction, x)
        residual = tree_axpy(-alpha, product, residual)
        rr_new = tree_dot(residual, residual)
        direction = tree_axpy(rr_new / rr, direction, residual)
        rr = rr_new
    return x


def mixed_product(inner_loss, params, outer, batch, vector, jvp: str, fd_epsilon, first_order: bool):
    """H_φθ·vector = ∇_φ⟨∇_θL, vector⟩: by reverse-over-reverse, or by a central difference of ∇_φL along
    ``vector`` when only first-order derivatives are allowed."""
    if first_order or jvp == "finite_difference":
        grad_outer = torch.func.grad(inner_loss, argnums=1)
        step = finite_difference_epsilon(params, fd_epsilon) / torch.sqrt(tree_dot(vector, vector)).clamp_min(1e-30)
        plus, minus = same_randomness(
            lambda: grad_outer(tree_axpy(step, vector, params), outer, batch),
            lambda: grad_outer(tree_axpy(-step, vector, params), outer, batch),
        )
        return tree_map(lambda a, b: (a - b) / (2 * step), plus, minus)
    grad_params = torch.func.grad(inner_loss, argnums=0)
    return torch.func.grad(lambda o: tree_dot(grad_params(params, o, batch), vector))(outer)
