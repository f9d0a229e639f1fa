"""(FG)²U: forward gradient unrolling with forward gradients (Shen et al., NeurIPS 2024, arXiv 2406.14095).

The primal inner loop runs once. Beside it, every direction v carries a tangent (dθ_t, ds_t) of the inner
state, pushed through each step: dg = H_θθ dθ + H_θφ v (the inner gradient's tangent, see ``jvp``), then
the optimizer update's own JVP. Tangents of a chunk of directions are batched with ``torch.func.vmap``.
Nothing is kept across steps, so memory does not grow with T. At the end ⟨∇h, v⟩ = ⟨∇_θ f, dθ_T⟩ + ⟨∇_φ f, v⟩.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils._pytree import tree_map

from hf_fg2u.hypergrad.unroll import (
    Unroll,
    detach_tree,
    make_grad_tangent,
    meta_gradient_and_value,
    step_rng,
    tree_dot,
    tree_zeros_like,
)


def forward_directional_derivatives(
    unroll: Unroll,
    direction_dicts: list[dict[str, torch.Tensor]],
    jvp: str = "forward",
    fd_epsilon: float | None = None,
):
    """Push each chunk of directions (dicts of tensors with a leading direction axis) through the unroll.

    Returns (⟨∇_θ f, dθ_T⟩ for every direction [b], ∇_φ f, h, θ_T, s_T, inner losses). The direct term ∇_φ f
    is returned whole so callers can add it exactly instead of estimating it. ``unroll.reduce_gradients`` (a function
    of a dict of tensors, e.g. a mean over processes) is applied to every step's inner gradient and to each
    chunk's tangents of it before the optimizer update: the data-parallel inner loop. Collectives cannot run
    inside ``vmap``, so the tangent pass and the optimizer's JVP are two vmapped calls with the reduction between.
    """
    inner_loss, optimizer, params, state, outer = (
        unroll.inner_loss,
        unroll.optimizer,
        unroll.params,
        unroll.state,
        unroll.outer,
    )
    grad_tangent = make_grad_tangent(inner_loss, jvp, fd_epsilon)
    reduce = unroll.reduce_gradients or (lambda tree: tree)

    def update_tangent(grads, d_grads, d_state, d_params, state, params):
        _, tangents = torch.func.jvp(optimizer.update, (grads, state, params), (d_grads, d_state, d_params))
        return tangents

    batched_update = torch.func.vmap(update_tangent, in_dims=(None, 0, 0, 0, None, None))
    chunks = []
    for d_outer in direction_dicts:
        size = next(iter(d_outer.values())).shape[0]
        chunks.append((tree_zeros_like(params, (size,)), tree_zeros_like(state, (size,)), d_outer))
    losses = []
    for batch, seed in zip(unroll.inner_batches, unroll.seeds, strict=True):
        # The primal gradient does not depend on the direction: the first chunk's tangent pass returns it
        # unbatched. Finite differences give none, and a process with no direction has no pass: compute it.
        grads = loss = None
        if jvp == "finite_difference" or not chunks:
            with step_rng(seed):
                grads, loss = torch.func.grad_and_value(inner_loss)(params, outer, batch)
            grads = reduce(detach_tree(grads))
        batched_grad_tangent = torch.func.vmap(
            partial(grad_tangent, params, outer, batch), randomness="same", out_dims=(0, None, None)
        )
        new_chunks = []
        for d_params, d_state, d_outer in chunks:  # chunk by chunk: one chunk's d_grads alive at a time
            with step_rng(seed):
                d_grads, chunk_grads, chunk_loss = batched_grad_tangent(d_params, d_outer)
            if grads is None:
                grads, loss = reduce(detach_tree(chunk_grads)), chunk_loss
            d_grads = reduce(detach_tree(d_grads))
            d_params, d_state = detach_tree(batched_update(grads, d_grads, d_state, d_params, state, params))
            new_chunks.append((d_params, d_state, d_outer))
        chunks = new_chunks
        params, state = detach_tree(optimizer.update(grads, state, params))
        losses.append(loss.detach())  # read once after the loop: no device sync at every inner step
        if unroll.progress is not None:
            unroll.progress.update(1)

    (meta_grad_params, meta_grad_outer), meta_value = meta_gradient_and_value(unroll, params)
    pair = torch.func.vmap(lambda d: tree_dot(meta_grad_params, d))
    # A process whose share of the directions is empty contributes no derivative (and zeros to the sum).
    directional = torch.cat([pair(d_params) for d_params, _, _ in chunks]) if chunks else meta_value.new_zeros(0)
    losses = torch.stack(losses).tolist()
    return directional, tree_map(torch.Tensor.detach, meta_grad_outer), float(meta_value), params, state, losses


def split_directions(directions: dict[str, torch.Tensor], per_pass: int) -> list[dict[str, torch.Tensor]]:
    """Split dicts with a leading direction axis into chunks of at most ``per_pass`` directions."""
    total = next(iter(directions.values())).shape[0]
    return [{k: v[i : i + per_pass] for k, v in directions.items()} for i in range(0, total, per_pass)]
