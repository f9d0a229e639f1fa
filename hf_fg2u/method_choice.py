"""``method="auto"``: exact trajectory reverse (``rgu``) when its stored trajectory fits in memory, else ``fg2u``.

Trajectory rgu stores the inner state (θ_t, s_t) of every step — T × (|θ| + optimizer slots) × bytes — plus a few
θ-sized working buffers for the backward sweep (adjoints of θ and s, the recomputed gradient). For a LoRA adapter
that is a few MB and rgu is exact, and faster than fg2u with several directions (docs/benchmarks.md); for full
fine-tuning of a large model it is T copies of the model and optimizer state, which fg2u never stores. The
activations of one step are needed by every method and are not part of the comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OPTIMIZER_SLOTS = {"sgd": 0, "momentum": 1, "adam": 2}
WORKING_BUFFERS = 3  # θ-sized: the adjoint of θ, the recomputed inner gradient and its adjoint
SHARE_OF_FREE_MEMORY = 0.5  # the rest stays for activations, which every method needs


@dataclass(frozen=True)
class MethodChoice:
    """What ``auto`` picked and why (sizes in MB)."""

    method: str
    checkpoint_every: int
    trajectory_mb: float
    checkpointed_mb: float
    available_mb: float
    source: str

    def message(self) -> str:
        if self.method == "rgu" and self.checkpoint_every == 1:
            verdict = f"picked 'rgu' (exact): the stored trajectory needs {self.trajectory_mb:.1f} MB"
        elif self.method == "rgu":
            verdict = (
                f"picked 'rgu' with checkpoint_every={self.checkpoint_every} (exact): the whole trajectory "
                f"({self.trajectory_mb:.1f} MB) does not fit, every {self.checkpoint_every}-th state does "
                f"({self.checkpointed_mb:.1f} MB)"
            )
        else:
            verdict = (
                f"picked 'fg2u': trajectory reverse would store {self.trajectory_mb:.1f} MB "
                f"({self.checkpointed_mb:.1f} MB with checkpointing)"
            )
        return f"method='auto' {verdict}; {self.available_mb:.1f} MB available ({self.source})."


def trajectory_megabytes(params: dict[str, torch.Tensor], optimizer: str, steps: int, checkpoint_every: int = 1):
    """Memory of trajectory rgu beyond one step's activations: ⌈T/k⌉ stored states, the k−1 states of one
    recomputed segment, and the working buffers, each state |θ| × (1 + optimizer slots)."""
    theta_bytes = sum(p.numel() * p.element_size() for p in params.values())
    state_bytes = theta_bytes * (1 + OPTIMIZER_SLOTS[optimizer])
    stored = math.ceil(steps / checkpoint_every) + (checkpoint_every - 1)
    return (stored * state_bytes + WORKING_BUFFERS * theta_bytes) / 2**20


def available_megabytes(budget_mb: float | None, device: torch.device) -> tuple[float, str]:
    """The memory ``auto`` may plan with: ``memory_budget_mb`` when given, else half of what is free on the
    accelerator after the model was placed there, or half of the system's available memory on CPU."""
    if budget_mb is not None:
        return float(budget_mb), "memory_budget_mb"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return SHARE_OF_FREE_MEMORY * free / 2**20, f"half of the free memory of {device}"
    import psutil

    return SHARE_OF_FREE_MEMORY * psutil.virtual_memory().available / 2**20, "half of the available system memory"


def choose_method(
    params: dict[str, torch.Tensor], optimizer: str, steps: int, budget_mb: float | None, device: torch.device
) -> MethodChoice:
    """rgu when the whole trajectory fits; else rgu keeping every ⌈√T⌉-th state when that fits; else fg2u."""
    available, source = available_megabytes(budget_mb, device)
    whole = trajectory_megabytes(params, optimizer, steps)
    every = max(1, math.ceil(math.sqrt(steps)))
    checkpointed = trajectory_megabytes(params, optimizer, steps, every)
    if whole <= available:
        method, every = "rgu", 1
    elif checkpointed <= available:
        method = "rgu"
    else:
        method, every = "fg2u", 1
    return MethodChoice(method, every, whole, checkpointed, available, source)
