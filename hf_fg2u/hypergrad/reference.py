"""A graph-retaining reverse unroll: the textbook RGU that higher- and Betty-style libraries run.

Every inner step's autograd graph (activations included) is kept until one backward pass at the end, so its
memory grows with T × activations. It is not a method of this library — ``rgu`` stores only the trajectory
(``reverse.py``) and gives the same numbers. It stays as the independent reference of the exactness tests and as
the baseline the benchmarks label "graph rgu".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_fg2u.hypergrad.inner_optimizers import InnerOptimizer
from hf_fg2u.hypergrad.unroll import LossFn, detach_tree, step_rng


def graph_reverse_hypergradient(
    inner_loss: LossFn,
    outer_loss: LossFn,
    optimizer: InnerOptimizer,
    params,
    state,
    outer,
    inner_batches: Sequence,
    meta_batch,
    seeds: Sequence[int | None],
    meta_seed: int | None = 0,
):
    """Return (∇h, h, θ_T) by ``torch.func.grad`` of the whole unrolled map φ ↦ f(θ_T(φ), φ); the meta loss's
    dropout masks from ``meta_seed``, as the methods draw them from their call's ``seed``."""

    def unrolled(phi):
        p, s = params, state
        for batch, seed in zip(inner_batches, seeds, strict=True):
            with step_rng(seed):
                grads = torch.func.grad(inner_loss)(p, phi, batch)
            p, s = optimizer.update(grads, s, p)
        with step_rng(meta_seed):
            return outer_loss(p, phi, meta_batch), p

    grad, (value, final_params) = torch.func.grad_and_value(unrolled, has_aux=True)(outer)
    return detach_tree(grad), float(value), detach_tree(final_params)
