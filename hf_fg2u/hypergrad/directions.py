"""Random directions over the outer coordinates that can affect h, and the map to and from dicts.

Only coordinates that can change h(φ) get a direction (per-example weights: the examples of this unroll),
so the estimator's variance scales with N_eff, not with the dataset size.
"""

from __future__ import annotations

import math

import torch

DIRECTIONS = ("rademacher", "gaussian", "orthogonal", "basis")


class OuterSpace:
    """The active coordinates of an outer dict, flattened to one vector of length ``size``.

    ``active`` maps a key of ``outer`` to a boolean mask of the tensor's shape (or of its flattened size);
    keys left out are active everywhere, and a mask may be ``None`` for "all".
    """

    def __init__(self, outer: dict[str, torch.Tensor], active: dict[str, torch.Tensor | None] | None = None):
        active = active or {}
        unknown = set(active) - set(outer)
        if unknown:
            raise ValueError(
                f"active_coordinates names {sorted(unknown)}, which are not keys of outer {sorted(outer)}."
            )
        self.shapes = {k: v.shape for k, v in outer.items()}
        self.indices: dict[str, torch.Tensor] = {}
        for key, value in outer.items():
            mask = active.get(key)
            if mask is None:
                index = torch.arange(value.numel(), device=value.device)
            else:
                mask = torch.as_tensor(mask, device=value.device).reshape(-1)
                if mask.numel() != value.numel():
                    raise ValueError(
                        f"active_coordinates[{key!r}] has {mask.numel()} entries but outer[{key!r}] has "
                        f"{value.numel()}; pass a boolean mask of shape {tuple(value.shape)}."
                    )
                index = mask.nonzero().reshape(-1)
            self.indices[key] = index
        self.size = sum(i.numel() for i in self.indices.values())
        if self.size == 0:
            raise ValueError("No active outer coordinate: h(φ) cannot depend on φ. Check active_coordinates.")

    def to_dict(self, flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scatter ``flat`` of shape [..., size] into tensors shaped like ``like`` (zeros off the active set)."""
        lead = flat.shape[:-1]
        out, start = {}, 0
        for key, index in self.indices.items():
            n = index.numel()
            chunk = flat[..., start : start + n].to(like[key].dtype)
            full = torch.zeros(*lead, like[key].numel(), dtype=like[key].dtype, device=like[key].device)
            full = full.index_copy(len(lead), index, chunk)
            out[key] = full.reshape(*lead, *self.shapes[key])
            start += n
        return out

    def to_flat(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Gather the active coordinates of a dict shaped like ``outer`` into a vector of length ``size``."""
        return torch.cat([tensors[k].reshape(-1)[i] for k, i in self.indices.items()])


def sample_directions(
    kind: str, num_directions: int, size: int, seed: int, dtype=torch.float32, device=None
) -> tuple[torch.Tensor, float]:
    """Draw ``num_directions`` directions of length ``size``; returns (V [b, size], scale).

    The estimate is ``scale * Vᵀ (V ∇h)``, unbiased for ∇h. For "basis" the b rows are distinct unit
    vectors and ``scale = size / b``: with b = size the estimate is the exact gradient.
    """
    if num_directions < 1:
        raise ValueError(f"num_directions must be >= 1, got {num_directions}.")
    gen = torch.Generator().manual_seed(int(seed))
    b, n = num_directions, size
    if kind == "rademacher":
        v = torch.randint(0, 2, (b, n), generator=gen, dtype=torch.float64) * 2 - 1
        scale = 1.0 / b
    elif kind == "gaussian":
        v = torch.randn(b, n, generator=gen, dtype=torch.float64)
        scale = 1.0 / b
    elif kind == "orthogonal":
        blocks = []
        for start in range(0, b, n):
            k = min(n, b - start)
            q, r = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
            q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
            blocks.append(math.sqrt(n) * q.T)
        v = torch.cat(blocks)
        scale = 1.0 / b
    elif kind == "basis":
        if b > n:
            raise ValueError(
                f"directions='basis' needs num_directions <= {n} (the number of active outer coordinates), "
                f"got {b}; num_directions={n} gives the exact gradient."
            )
        index = torch.randperm(n, generator=gen)[:b] if b < n else torch.arange(n)
        v = torch.zeros(b, n, dtype=torch.float64)
        v[torch.arange(b), index] = 1.0
        scale = n / b
    else:
        raise ValueError(f"directions={kind!r} is not known; use one of {DIRECTIONS}.")
    return v.to(dtype=dtype, device=device), scale
