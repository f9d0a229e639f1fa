"""What a hypergradient call returns, and the check that it is finite."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


class NonFiniteHypergradientError(FloatingPointError):
    """The hypergradient or the outer loss is NaN or infinite."""


@dataclass
class HypergradientResult:
    """What one call of :func:`estimate_hypergradient` returns.

    grad: estimate of ∇h, a dict shaped like ``outer``. outer_loss: h(φ). params / optimizer_state: θ_T and
    the inner optimizer state after the unroll (for warm starts). inner_losses: the inner loss before each
    step. directional_derivatives: ⟨∇h, v_i⟩ per direction [b] for fg2u / fg2u_zo, else None.
    """

    grad: dict[str, torch.Tensor]
    outer_loss: float
    params: dict[str, torch.Tensor]
    optimizer_state: dict
    inner_losses: list[float] = field(default_factory=list)
    directional_derivatives: torch.Tensor | None = None
    method: str = "fg2u"
    num_directions: int = 0

    @property
    def grad_norm(self) -> float:
        return math.sqrt(sum(float(g.double().pow(2).sum()) for g in self.grad.values()))


def check_finite(result: HypergradientResult) -> None:
    """Raise :class:`NonFiniteHypergradientError` naming what is NaN/inf; never hand back a silent NaN."""
    bad = [k for k, g in result.grad.items() if not torch.isfinite(g).all()]
    if not math.isfinite(result.outer_loss) or bad or any(not math.isfinite(x) for x in result.inner_losses):
        raise NonFiniteHypergradientError(
            f"{result.method}: non-finite values (outer loss {result.outer_loss}, last inner losses "
            f"{result.inner_losses[-3:]}, non-finite grad keys {bad}). The inner loop probably diverged: lower "
            "inner_lr or the unroll length, check the data for empty/NaN examples, or use a float32 model."
        )
