"""The directions along which θ only shifts how much each group of rows (each answer) is learned.

For grouped row weights (``ExampleWeights(num_groups=G)``): the gradients of the differences between the groups'
mean losses, taken on the unroll's own rows. The trainer removes them from the meta gradient
(``hf_fg2u.hypergrad.projection``), so a row is credited for what it teaches beyond its group's share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def group_shift_directions(
    losses: Callable, params: dict, outer: dict, batches: Sequence, groups: Sequence[torch.Tensor], num_groups: int,
    reduce: Callable | None = None,
) -> list[dict]:  # fmt: skip
    """∇_θ (mean loss of group g − mean loss of the first group present), one per further group present among
    the rows of ``batches`` (``groups``: each batch's row groups, in [0, num_groups)); [] when fewer than two groups
    are present. ``reduce`` (a mean over data-parallel processes, whose rows differ) is applied to the row counts
    first, so every process decides on the same groups and runs the same collectives, and then to each direction,
    so every process projects along the same ones."""
    every = torch.cat([g.reshape(-1).cpu() for g in groups])
    counts = torch.bincount(every, minlength=num_groups).to(torch.float64)  # per process; the mean over them below
    if reduce is not None:
        device = next(iter(params.values())).device
        counts = reduce({"counts": counts.to(device)})["counts"].cpu()
    present = [g for g in range(num_groups) if counts[g] > 0]
    if len(present) < 2:
        return []
    first = present[0]

    def contrast(params, group: int):
        total = 0.0
        for batch, row_groups in zip(batches, groups, strict=True):
            per_row = losses(params, outer, batch)
            row_groups = row_groups.to(per_row.device)
            signs = (row_groups == group).to(per_row.dtype) / float(counts[group])
            signs = signs - (row_groups == first).to(per_row.dtype) / float(counts[first])
            total = total + (signs * per_row).sum()
        return total

    directions = []
    for group in present[1:]:
        direction = {k: v.detach() for k, v in torch.func.grad(contrast)(params, group).items()}
        directions.append(direction if reduce is None else reduce(direction))
    return directions
