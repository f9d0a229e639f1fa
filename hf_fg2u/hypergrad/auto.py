"""``method="auto"``: exact trajectory reverse (``rgu``) when its memory fits, else ``fg2u`` — each candidate costed
by one memory model, in units of |θ| (the inner parameters' bytes) and |s| (the inner optimizer state's bytes).

Every method, and the trainer around it, holds: θ_t and s_t (the current state), θ_start and s_start (where
resets return), and during an inner step the gradient, the new (θ, s) beside the old and the optimizer's
intermediates. Beyond that:

- ``rgu`` (checkpoint_every=k) stores ⌈T/k⌉ states (θ_t, s_t) plus the k−1 states of one recomputed segment (on
  the CPU with ``offload_trajectory``), and carries the adjoints of θ and s through the backward sweep, where
  each step's VJP through the optimizer update holds its own intermediates.
- ``fg2u`` carries, for each of ``directions_per_pass`` directions at once, the tangents (dθ, ds), their
  successors beside them during the update, the tangent of the inner gradient and the update's JVP
  intermediates: directions_per_pass × (1 + slots) × |θ| and more, whatever T.

The activations of one step (needed by every method; ``fg2u``'s vmap over directions multiplies them) are not
modelled: plan ``memory_budget_mb`` below the free memory by at least a step's activations. The constants below
were checked against measured peaks (``scripts/check_memory_model.py``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

OPTIMIZER_SLOTS = {"sgd": 0, "momentum": 1, "adam": 2}
SLOT_BYTES = 4  # the inner optimizer's moments are kept in float32 whatever θ's dtype
TRAINER_COPIES = 2  # (θ_t, s_t) and (θ_start, s_start), held by the trainer across outer steps
STEP_BUFFERS = 2  # the inner gradient and the new θ beside the old one, during an inner step (the new s: below)
UPDATE_INTERMEDIATES = {"sgd": 1, "momentum": 2, "adam": 4}  # θ-sized temporaries of one optimizer update
TANGENT_INTERMEDIATES = 2  # θ-sized temporaries per direction of the update's JVP (measured: Adam, vmapped)
SHARE_OF_FREE_MEMORY = 0.5  # the rest stays for activations, which every method needs


@dataclass(frozen=True)
class MemoryModel:
    """Bytes of θ and of the inner optimizer state s, and what each method adds to them (in MB)."""

    theta_bytes: int
    state_bytes: int
    optimizer: str

    @classmethod
    def of(cls, params: dict[str, torch.Tensor], optimizer: str) -> MemoryModel:
        numel = sum(p.numel() for p in params.values())
        theta = sum(p.numel() * p.element_size() for p in params.values())
        return cls(theta, numel * SLOT_BYTES * OPTIMIZER_SLOTS[optimizer], optimizer)

    @property
    def pair(self) -> int:
        """Bytes of one inner state (θ, s)."""
        return self.theta_bytes + self.state_bytes

    def common(self) -> int:
        """What every method holds: the trainer's copies and one inner step's buffers."""
        step = STEP_BUFFERS * self.theta_bytes + self.state_bytes
        return TRAINER_COPIES * self.pair + step + UPDATE_INTERMEDIATES[self.optimizer] * self.theta_bytes

    def rgu_megabytes(self, steps: int, checkpoint_every: int = 1, offloaded: bool = False) -> float:
        """Trajectory rgu: the stored states (none on the device when offloaded), the adjoints of (θ, s) and one
        step's VJP (the recomputed gradient, its adjoint, the update's intermediates)."""
        stored = 0 if offloaded else math.ceil(steps / checkpoint_every) + (checkpoint_every - 1)
        sweep = self.pair + 2 * self.theta_bytes + UPDATE_INTERMEDIATES[self.optimizer] * self.theta_bytes
        return (self.common() + stored * self.pair + sweep) / 2**20

    def fg2u_megabytes(self, directions_per_pass: int) -> float:
        """fg2u: per direction of a pass, the tangents (dθ, ds) and their successors, the inner gradient's tangent
        and the update's JVP intermediates."""
        per_direction = 2 * self.pair + (1 + TANGENT_INTERMEDIATES) * self.theta_bytes
        return (self.common() + directions_per_pass * per_direction) / 2**20


@dataclass(frozen=True)
class MethodChoice:
    """What ``auto`` picked and why (sizes in MB)."""

    method: str
    checkpoint_every: int
    trajectory_mb: float
    checkpointed_mb: float
    fg2u_mb: float
    available_mb: float
    source: str

    def message(self) -> str:
        if self.method == "rgu" and self.checkpoint_every == 1:
            verdict = f"picked 'rgu' (exact): it needs {self.trajectory_mb:.1f} MB with the whole trajectory stored"
        elif self.method == "rgu":
            verdict = (
                f"picked 'rgu' with checkpoint_every={self.checkpoint_every} (exact): with the whole trajectory it "
                f"needs {self.trajectory_mb:.1f} MB, which does not fit; keeping every {self.checkpoint_every}-th "
                f"state, {self.checkpointed_mb:.1f} MB"
            )
        else:
            verdict = (
                f"picked 'fg2u' ({self.fg2u_mb:.1f} MB): trajectory reverse would need {self.trajectory_mb:.1f} MB "
                f"({self.checkpointed_mb:.1f} MB with checkpointing)"
            )
        fits = min(self.fg2u_mb, self.checkpointed_mb) <= self.available_mb
        fits = "" if fits else " — nothing fits; this needs the least"
        return f"method='auto' {verdict}; {self.available_mb:.1f} MB available ({self.source}){fits}."


def trajectory_megabytes(params: dict[str, torch.Tensor], optimizer: str, steps: int, checkpoint_every: int = 1):
    """Memory of trajectory rgu (MB), see :meth:`MemoryModel.rgu_megabytes`."""
    return MemoryModel.of(params, optimizer).rgu_megabytes(steps, checkpoint_every)


def local_processes() -> int:
    """Processes started on this machine (torchrun and ``accelerate launch`` set LOCAL_WORLD_SIZE)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def available_megabytes(budget_mb: float | None, device: torch.device) -> tuple[float, str]:
    """The memory ``auto`` may plan with: ``memory_budget_mb`` when given, else half of what is free on the
    accelerator after the model was placed there, or on CPU half of the system's available memory divided among
    the processes of this machine (which share it)."""
    if budget_mb is not None:
        return float(budget_mb), "memory_budget_mb"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return SHARE_OF_FREE_MEMORY * free / 2**20, f"half of the free memory of {device}"
    import psutil

    local = local_processes()
    share = SHARE_OF_FREE_MEMORY * psutil.virtual_memory().available / local / 2**20
    return share, "half of the available system memory" + (f" / {local} processes" if local > 1 else "")


def choose_method(
    params: dict[str, torch.Tensor],
    optimizer: str,
    steps: int,
    available: tuple[float, str],
    directions_per_pass: int = 8,
    offload_trajectory: bool = False,
) -> MethodChoice:
    """rgu when it fits with the whole trajectory; else rgu keeping every ⌈√T⌉-th state when that fits; else
    fg2u (also when nothing fits: it needs the least, whatever T). ``available``: (MB, where the number
    comes from), see :func:`available_megabytes`."""
    available_mb, source = available
    model = MemoryModel.of(params, optimizer)
    offloaded = offload_trajectory and next(iter(params.values())).device.type != "cpu"
    whole = model.rgu_megabytes(steps, 1, offloaded)
    every = max(1, math.ceil(math.sqrt(steps)))
    checkpointed = model.rgu_megabytes(steps, every, offloaded)
    fg2u = model.fg2u_megabytes(directions_per_pass)
    if whole <= available_mb:
        method, every = "rgu", 1
    elif checkpointed <= available_mb:
        method = "rgu"
    elif fg2u <= available_mb or fg2u <= checkpointed:
        method, every = "fg2u", 1
    else:
        method = "rgu"  # neither fits and checkpointed rgu needs less than fg2u
    return MethodChoice(method, every, whole, checkpointed, fg2u, available_mb, source)
