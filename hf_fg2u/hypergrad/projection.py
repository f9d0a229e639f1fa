"""Removing directions from the meta gradient ∇_θ f(θ_T) before it is carried back through the unroll.

Why: some directions of θ the outer problem should be indifferent to. With weights measured within groups (one
group per answer), moving θ along "prefer this answer" changes the meta loss a lot, yet no row should be credited
for it: the groups' shares are fixed by design. Left in, that term ranks the rows of an answer by how far the model
is from them, with a sign set by which answer the meta batch wanted more of at that step -- within one answer it
put wrong rows above right ones (docs/value.md measures both).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils._pytree import tree_leaves, tree_map


def _dot(a, b) -> torch.Tensor:
    """Σ ⟨a_leaf, b_leaf⟩ accumulated in float32 at least (bf16 sums of many products lose the projection)."""
    dtype = torch.promote_types(next(iter(tree_leaves(a))).dtype, torch.float32)
    return sum((x.to(dtype) * y.to(dtype)).sum() for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True))


def _minus(tree, coefficient: torch.Tensor, direction):
    return tree_map(lambda t, d: t - coefficient.to(t.dtype) * d.to(t.dtype), tree, direction)


def orthonormal_basis(directions: Sequence, tolerance: float = 1e-6) -> list:
    """Gram-Schmidt over pytrees; a direction whose remainder is below ``tolerance`` × its own norm (dependent on
    the ones before it, or zero) is skipped."""
    basis = []
    for direction in directions:
        norm = _dot(direction, direction).sqrt()
        for unit in basis:
            direction = _minus(direction, _dot(unit, direction), unit)
        remainder = _dot(direction, direction).sqrt()
        if not norm > 0 or not remainder > tolerance * norm:
            continue
        basis.append(tree_map(lambda t, r=remainder: t / r.to(t.dtype), direction))
    return basis


def project_out(tree, directions: Sequence, tolerance: float = 1e-6):
    """``tree`` minus its orthogonal projection on the span of ``directions`` (pytrees shaped like it)."""
    for unit in orthonormal_basis(directions, tolerance):
        tree = _minus(tree, _dot(unit, tree), unit)
    return tree
