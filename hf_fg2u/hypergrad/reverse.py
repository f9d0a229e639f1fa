"""RGU and truncated RGU: reverse-mode differentiation through the unrolled inner loop.

Exact for the unrolled objective (RGU) but its memory grows linearly with the number of differentiated
steps, since every step's graph is kept for the backward pass. TRGU differentiates only the last K steps
and treats θ_{T-K} as a constant: biased, memory O(K).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..optim import InnerOptimizer
from .unroll import LossFn, detach_tree, run_inner_loop, step_rng


def reverse_hypergradient(
    inner_loss: LossFn,
    outer_loss: LossFn,
    optimizer: InnerOptimizer,
    params,
    state,
    outer,
    inner_batches: Sequence,
    meta_batch,
    seeds: Sequence[int | None],
    truncation: int | None = None,
    progress=None,
):
    """Return (∇h, h, θ_T, s_T, inner losses); only the last ``truncation`` steps are differentiated."""
    total = len(inner_batches)
    keep = total if truncation is None else min(truncation, total)
    params, state, losses = run_inner_loop(
        inner_loss, optimizer, params, state, outer, inner_batches[: total - keep], seeds[: total - keep], progress
    )
    tail_batches, tail_seeds = inner_batches[total - keep :], seeds[total - keep :]

    def unrolled(phi):
        p, s, tail_losses = params, state, []
        for batch, seed in zip(tail_batches, tail_seeds, strict=True):
            with step_rng(seed):
                grads, loss = torch.func.grad_and_value(inner_loss)(p, phi, batch)
            p, s = optimizer.update(grads, s, p)
            tail_losses.append(loss)
            if progress is not None:
                progress.update(1)
        return outer_loss(p, phi, meta_batch), (p, s, tail_losses)

    grad, (value, (params, state, tail_losses)) = torch.func.grad_and_value(unrolled, has_aux=True)(outer)
    losses += [float(x) for x in tail_losses]
    return detach_tree(grad), float(value), detach_tree(params), detach_tree(state), losses
