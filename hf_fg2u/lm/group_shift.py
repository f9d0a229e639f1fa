"""The meta gradient with the directions removed along which θ only shifts which group (which answer) is preferred.

For grouped row weights (``ExampleWeights(num_groups=G)``) and meta rows that carry their group. The meta batch is
split by group and each part differentiated once: their sum is the meta gradient, and the differences of their
means, ∇_θ (mean meta loss of group g − that of the first group present), are the shift directions. So the
directions cost no pass of their own (taken on the unroll's rows, they cost 1.24 plain epochs of those rows per
outer step). ``hf_fg2u.hypergrad.projection`` removes them, so a row is credited for what it teaches beyond its
group's share (docs/group_shift.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._pytree import tree_map

from hf_fg2u.hypergrad.projection import project_out


def _rows(batch: dict, rows: torch.Tensor) -> dict:
    """The batch restricted to ``rows`` (every tensor column is per row)."""
    return {key: value[rows] for key, value in batch.items()}


def _check_range(groups: torch.Tensor, num_groups: int, what: str) -> None:
    if bool(((groups < -1) | (groups >= num_groups)).any()):
        raise ValueError(f"{what} must lie in [-1, {num_groups}): got {sorted(set(groups.tolist()))}.")


def group_parts(groups: torch.Tensor, num_groups: int) -> list[tuple[int, torch.Tensor]]:
    """(group, its rows) for every group present among ``groups`` ([B], -1 = a row of no known group), in group
    order, the rows of no group last."""
    _check_range(groups, num_groups, "Meta rows' groups")
    present = [g for g in range(num_groups) if bool((groups == g).any())]
    parts = [(g, (groups == g).nonzero().reshape(-1)) for g in present]
    unknown = (groups < 0).nonzero().reshape(-1)
    return parts + ([(-1, unknown)] if unknown.numel() else [])


def grouped_meta_gradient(losses: Callable, groups_of: Callable, num_groups: int) -> Callable:
    """``meta_gradient(params, outer, batch) -> ((∇_θ f', ∇_φ f), f)`` for ``estimate_hypergradient``: f the mean
    per-row loss (``losses(params, outer, batch) -> [B]``) of the meta batch, ∇_θ f' its θ-gradient less its
    projection on the shift directions between the groups present (none when fewer than two are). ``groups_of(batch)``
    gives each meta row's group in [0, num_groups), or -1 for a row whose group is not known (it counts in f, not
    in the directions). Every process holds the same meta batch, so all find the same directions."""
    gradient = torch.func.grad_and_value(lambda params, outer, part, size: losses(params, outer, part).sum() / size,
                                         argnums=(0, 1))  # fmt: skip

    def meta_gradient(params, outer, batch):
        groups = groups_of(batch).to(torch.long).reshape(-1)
        size = groups.numel()
        parts = group_parts(groups.cpu(), num_groups)
        by_group, outer_grads, value = {}, [], 0.0
        for group, rows in parts:
            (grad_params, grad_outer), part_value = gradient(params, outer, _rows(batch, rows.to(groups.device)), size)
            # in float32 at least: with the shift dominating, what is left after the projection is a small
            # remainder of large parts, below bf16's resolution
            by_group[group] = tree_map(lambda t: t.detach().to(torch.promote_types(t.dtype, torch.float32)),
                                       grad_params)  # fmt: skip
            outer_grads.append(grad_outer)
            value = value + part_value
        total, total_outer = (tree_map(lambda *leaves: sum(leaves[1:], leaves[0]), *trees)
                              for trees in (list(by_group.values()), outer_grads))  # fmt: skip
        counts = {group: rows.numel() for group, rows in parts}
        known = [group for group, _ in parts if group >= 0]
        # ∇ mean_g = (size / n_g) · ∇(Σ_{i in g} ℓ_i / size): each part's gradient rescaled to its group's mean
        first = by_group[known[0]] if known else None
        directions = [
            tree_map(lambda a, b, g=g: a * (size / counts[g]) - b * (size / counts[known[0]]), by_group[g], first)
            for g in known[1:]
        ]
        dtypes = tree_map(lambda t: t.dtype, params)
        projected = tree_map(lambda t, dtype: t.to(dtype), project_out(total, directions), dtypes)
        return (projected, total_outer), value

    return meta_gradient


def check_meta_groups(meta, column: str, num_groups: int, meta_batch_size: int | None = None) -> list[int]:
    """Each meta row's group; refused, before training, where they cannot give a shift direction: no ``column``, a
    group outside [-1, num_groups), fewer than two groups among them, or meta batches too small to hold a row of
    every group present (``with_every_group`` then could not leave a group's shift out of no batch)."""
    if column not in meta.column_names:
        raise ValueError(
            f"project_group_shift takes the answer-shift directions on the meta rows, so the meta dataset needs a "
            f"{column!r} column: each meta row's group in [0, {num_groups}) (-1 where unknown), numbered as the train "
            "rows' groups (hf-fg2u train --balance_column adds it). Or set project_group_shift=False."
        )
    values = meta[column]
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        raise ValueError(f"The meta column {column!r} must hold integers (a group, or -1), got "
                         f"{sorted({type(value).__name__ for value in values})}.")  # fmt: skip
    groups = torch.as_tensor(values, dtype=torch.long)
    _check_range(groups, num_groups, f"The groups of the meta column {column!r}")
    present = sorted(set(groups.tolist()) - {-1})
    if len(present) < 2:
        raise ValueError(
            f"The meta rows hold {len(present)} of the {num_groups} groups ({column!r}: {present}), so no "
            "answer-shift direction can be taken on them: give the meta set rows of at least two answers, or set "
            "project_group_shift=False."
        )
    if meta_batch_size is not None and meta_batch_size < len(present):
        raise ValueError(
            f"project_group_shift takes the shift directions on each meta batch, which then needs a row of each of "
            f"the {len(present)} groups of the meta rows ({present}): meta_batch_size={meta_batch_size} is too "
            f"small. Set meta_batch_size >= {len(present)}, or project_group_shift=False."
        )
    return groups.tolist()


def with_every_group(rows: list[int], order: list[int], groups: list[int]) -> list[int]:
    """A meta batch's rows (the first of a seeded ``order`` of the meta rows) that hold every known group of the meta
    rows: where the draw lacks one, its last replaceable rows (of no group, or of a group held twice) give way to the
    next rows of ``order`` of a group it lacks. A group missing from the batch gives no shift direction, and its step
    would credit that group's shift in full. Unchanged where the draw already holds every group (``check_meta_groups``
    made sure that ``len(rows)`` is at least the number of groups, so a replaceable row is always left)."""
    rows = list(rows)
    wanted = set(groups) - {-1}
    known = {groups[i] for i in rows} - {-1}
    for candidate in order[len(rows) :]:
        if known >= wanted:
            break
        if groups[candidate] == -1 or groups[candidate] in known:
            continue
        counts = Counter(groups[i] for i in rows)
        slot = max(k for k, i in enumerate(rows) if groups[i] == -1 or counts[groups[i]] > 1)
        rows[slot] = candidate
        known.add(groups[candidate])
    return rows
