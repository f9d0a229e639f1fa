"""(FG)²U-ZO: ⟨∇h, v⟩ from finite differences of h itself, for inner loops that cannot be differentiated.

Each direction costs one (forward scheme) or two (central scheme) extra primal unrolls at φ ± μv; a chunk
of directions runs as one batched unroll under ``torch.func.vmap``.
"""

from __future__ import annotations

import torch

from hf_fg2u.hypergrad.unroll import Unroll, primal_step, run_inner_loop, step_rng

ZO_SCHEMES = ("central", "forward")


def zeroth_order_directional_derivatives(
    unroll: Unroll, direction_dicts: list[dict[str, torch.Tensor]], zo_epsilon: float = 1e-3, zo_scheme: str = "central"
):
    """Return (⟨∇h, v⟩ estimates [b], h, θ_T, s_T, inner losses); ``ZerothOrderOptions`` validated the scheme."""
    u = unroll
    if u.meta_gradient is not None:
        raise ValueError(
            "fg2u_zo never forms the meta gradient, so a meta_gradient of its own cannot apply to it: use fg2u or "
            "rgu, or leave it out (BilevelConfig.project_group_shift=False)."
        )
    inner_loss, outer_loss, optimizer, outer, meta_batch = (
        u.inner_loss,
        u.outer_loss,
        u.optimizer,
        u.outer,
        u.meta_batch,
    )

    def unrolled_value(phi):
        p, s = u.params, u.state
        for batch, seed in zip(u.inner_batches, u.seeds, strict=True):
            p, s, _ = primal_step(inner_loss, optimizer, p, s, phi, batch, seed)
        with step_rng(u.seed):  # every evaluation of h sees the same dropout masks in the meta loss
            return outer_loss(p, phi, meta_batch)

    batched_value = torch.func.vmap(unrolled_value, randomness="same")
    final_params, final_state, losses = run_inner_loop(
        inner_loss, optimizer, u.params, u.state, outer, u.inner_batches, u.seeds, u.progress
    )
    with step_rng(u.seed):
        base = outer_loss(final_params, outer, meta_batch).detach()
    estimates = []
    for chunk in direction_dicts:
        shifted_up = {k: outer[k] + zo_epsilon * chunk[k] for k in outer}
        up = batched_value(shifted_up).detach()
        if zo_scheme == "central":
            shifted_down = {k: outer[k] - zo_epsilon * chunk[k] for k in outer}
            estimates.append((up - batched_value(shifted_down).detach()) / (2 * zo_epsilon))
        else:
            estimates.append((up - base) / zo_epsilon)
    return torch.cat(estimates), float(base), final_params, final_state, losses
