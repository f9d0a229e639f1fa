"""RGU and truncated RGU: exact reverse-mode differentiation of the unrolled inner loop, storing only the
trajectory.

The forward unroll keeps (θ_t, s_t) — the inner variables and the optimizer state, adapter-sized for LoRA — and
no autograd graph. Going backwards from t = T−1 to 0, one step is recomputed at a time and its VJP taken with
respect to (θ_t, s_t, φ) (Maclaurin et al. 2015; Franceschi et al. 2017), so only one step's activations are ever
alive. Memory ≈ one step + T·|θ, s|; time ≈ 4× T plain steps (a primal forward, then per step a recomputed
gradient and its double-backward VJP). ``checkpoint_every=k`` keeps every k-th state and recomputes each segment
forward before its backward sweep: memory ≈ (T/k + k)·|θ, s| for one more primal step per step.
``offload_trajectory=True`` keeps the stored states in CPU memory (accelerator runs). TRGU differentiates only
the last K steps and treats θ_{T-K} as a constant: biased. ``keep_step_graphs=True`` trades memory for time the
other way: the forward unroll keeps every differentiated step's autograd graph, so the sweep only runs the double
backward (time ≈ 3× T plain steps; memory ≈ T steps' activations — for adapters and short unrolls).
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from hf_fg2u.hypergrad.unroll import Unroll, detach_tree, meta_gradient_and_value, primal_step, run_inner_loop, step_rng


def reverse_hypergradient(
    unroll: Unroll,
    truncation: int | None = None,
    checkpoint_every: int = 1,
    offload_trajectory: bool = False,
    keep_step_graphs: bool = False,
):
    """Return (∇h, h, θ_T, s_T, inner losses); only the last ``truncation`` steps are differentiated.

    ``unroll.reduce_gradients`` (a mean over data-parallel processes) is applied to every step's inner gradient in the
    forward unroll and to the local VJP of that gradient in the backward sweep, so every process carries the
    same adjoint: the hypergradient of the unroll on the mean of the processes' inner losses.
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 1 (1 = keep every inner step's state).")
    u = unroll
    inner_loss, optimizer, outer, seeds = u.inner_loss, u.optimizer, u.outer, u.seeds
    inner_batches, reduce_gradients, progress = u.inner_batches, u.reduce_gradients, u.progress
    reduce = reduce_gradients or (lambda tree: tree)
    total = len(inner_batches)
    keep = total if truncation is None else min(truncation, total)
    params, state, losses = run_inner_loop(
        inner_loss, optimizer, u.params, u.state, outer, inner_batches[: total - keep], seeds[: total - keep],
        progress, reduce_gradients=reduce_gradients,
    )  # fmt: skip
    steps = list(zip(inner_batches[total - keep :], seeds[total - keep :], strict=True))
    device = next(iter(params.values())).device
    store = (lambda tree: tree_map(lambda t: t.to("cpu"), tree)) if offload_trajectory else (lambda tree: tree)
    fetch = (lambda tree: tree_map(lambda t: t.to(device), tree)) if offload_trajectory else (lambda tree: tree)

    stored = []  # (θ_t, s_t) at t = 0, k, 2k, ... of the differentiated steps
    kept = []  # with keep_step_graphs: each step's (θ_t, s_t, reduced ∇L, pullback of ∇L)
    differentiated_losses = []  # read once after the loop: no device sync at every inner step
    for t, (batch, seed) in enumerate(steps):
        if keep_step_graphs:
            grads, grads_vjp, loss = _differentiable_gradient(inner_loss, params, outer, batch, seed, t > 0)
            grads = reduce(detach_tree(grads))
            kept.append((params, state, grads, grads_vjp))
            params, state = (detach_tree(tree) for tree in optimizer.update(grads, state, params))
        else:
            if t % checkpoint_every == 0:
                stored.append(store((params, state)))
            params, state, loss = primal_step(inner_loss, optimizer, params, state, outer, batch, seed, reduce)
        differentiated_losses.append(loss.detach())
        if progress is not None:
            progress.update(1)

    (adjoint_params, grad_outer), value = meta_gradient_and_value(u, params)
    adjoint_params, grad_outer = detach_tree(adjoint_params), detach_tree(grad_outer)
    losses += torch.stack(differentiated_losses).tolist() if differentiated_losses else []
    adjoint_state = tree_map(torch.zeros_like, state)
    while kept:  # popped, so each step's graph is freed once it has been pulled back through
        p, s, grads, grads_vjp = kept.pop()
        adjoint_params, adjoint_state, step_outer = _pull_back(
            optimizer, p, s, grads, grads_vjp, adjoint_params, adjoint_state, reduce
        )
        grad_outer = {k: grad_outer[k] + step_outer[k] for k in grad_outer}
    for segment in reversed(range(len(stored))):
        first = segment * checkpoint_every
        segment_steps = steps[first : first + checkpoint_every]
        trajectory = [fetch(stored[segment])]
        for batch, seed in segment_steps[:-1]:  # recompute the segment's states forward
            p, s, _ = primal_step(inner_loss, optimizer, *trajectory[-1], outer, batch, seed, reduce)
            trajectory.append((p, s))
        for i in reversed(range(len(segment_steps))):
            (p, s), (batch, seed) = trajectory[i], segment_steps[i]
            adjoint_params, adjoint_state, step_outer = _step_vjp(
                inner_loss, optimizer, p, s, outer, batch, seed, adjoint_params, adjoint_state, reduce, first + i > 0
            )
            grad_outer = {k: grad_outer[k] + step_outer[k] for k in grad_outer}
    return grad_outer, float(value), params, state, losses


def _differentiable_gradient(inner_loss, params, outer, batch, seed, wrt_params: bool = True):
    """(∇_θ L(θ_t, φ, batch), its pullback with respect to (θ_t, φ), L) under the step's seed: one forward and
    backward whose graph is kept for the double backward. ``wrt_params=False`` (the first differentiated step,
    whose λ_θ nobody reads): the pullback with respect to φ only, returning {} for θ — the double backward then
    skips the second-order terms through the forward pass (the same φ part, in less time)."""
    with step_rng(seed):
        if wrt_params:
            return torch.func.vjp(
                lambda p, o: torch.func.grad_and_value(inner_loss)(p, o, batch), params, outer, has_aux=True
            )
        grads, outer_vjp, loss = torch.func.vjp(
            lambda o: torch.func.grad_and_value(inner_loss)(params, o, batch), outer, has_aux=True
        )
    return grads, (lambda cotangent: ({}, *outer_vjp(cotangent))), loss


def _step_vjp(
    inner_loss, optimizer, params, state, outer, batch, seed, adjoint_params, adjoint_state, reduce, wrt_params=True
):
    """Recompute step t's inner gradient with its graph, then pull (λ_θ, λ_s) at t+1 back through it."""
    grads, grads_vjp, _ = _differentiable_gradient(inner_loss, params, outer, batch, seed, wrt_params)
    grads = reduce(detach_tree(grads))
    return _pull_back(optimizer, params, state, grads, grads_vjp, adjoint_params, adjoint_state, reduce)


def _pull_back(optimizer, params, state, grads, grads_vjp, adjoint_params, adjoint_state, reduce):
    """Pull (λ_θ, λ_s) at step t+1 back through (θ_t, s_t, φ) ↦ update(∇_θL(θ_t, φ, batch), s_t, θ_t).

    Two VJPs with the reduction between (collectives are outside any transform): the optimizer update's, with
    respect to (g, s, θ), then the inner gradient's, with respect to (θ, φ) (a double backward); ``grads`` is the
    gradient already reduced over processes, ``grads_vjp`` the local gradient's pullback."""
    _, update_vjp = torch.func.vjp(optimizer.update, grads, state, params)
    adjoint_grads, previous_state, previous_params = update_vjp((adjoint_params, adjoint_state))
    through_params, through_outer = grads_vjp(adjoint_grads)
    through = reduce({**_prefixed("theta:", through_params), **_prefixed("phi:", through_outer)})
    if through_params:  # {} at the first differentiated step (pulled back through φ only): λ_θ is not read
        previous_params = {k: previous_params[k] + through[f"theta:{k}"] for k in previous_params}
    step_outer = {k: through[f"phi:{k}"] for k in through_outer}
    return detach_tree(previous_params), detach_tree(previous_state), detach_tree(step_outer)


def _prefixed(prefix: str, tree: dict) -> dict:
    return {prefix + key: value for key, value in tree.items()}
