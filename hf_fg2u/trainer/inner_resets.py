"""When the inner θ goes back to its start: every k outer steps, or once the meta loss stops improving.

Warm-started (online) bilevel training keeps θ between outer steps. While θ still generalises, the hypergradient
tells the rows that help the meta loss from those that hurt it; once θ memorises the train rows (the meta loss
rises again) it no longer does, and on a real model it can even invert. A reset returns θ and the inner
optimizer state to their start (the state after ``inner_warmup_steps``), so the outer variables keep learning
from informative hypergradients for as many outer steps as the run has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class ResetPolicy:
    """``every``: reset once θ has run k outer steps since its start or last reset (0 = never). ``patience``: reset
    when the meta loss has not gone below its best since the last reset for this many outer steps (0 = never).
    Together: a cycle ends when the meta loss stalls, and lasts at most ``every`` steps."""

    every: int = 0
    patience: int = 0
    best_meta_loss: float = math.inf
    steps_since_best: int = 0
    steps_since_reset: int = 0

    def due(self) -> bool:
        """Whether θ goes back to its start before the next outer step."""
        periodic = self.every > 0 and self.steps_since_reset >= self.every
        stalled = self.patience > 0 and self.steps_since_best >= self.patience
        return periodic or stalled

    def observe(self, meta_loss: float) -> None:
        """Record the meta loss after an outer step's unroll."""
        self.steps_since_reset += 1
        if meta_loss < self.best_meta_loss:
            self.best_meta_loss, self.steps_since_best = meta_loss, 0
        else:
            self.steps_since_best += 1

    def restarted(self) -> None:
        """θ went back to its start: the next cycle's meta losses are compared among themselves."""
        self.best_meta_loss, self.steps_since_best, self.steps_since_reset = math.inf, 0, 0

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in ("best_meta_loss", "steps_since_best", "steps_since_reset")}

    def load_state_dict(self, state: dict) -> None:
        self.best_meta_loss = float(state.get("best_meta_loss", math.inf))
        self.steps_since_best = int(state.get("steps_since_best", 0))
        self.steps_since_reset = int(state.get("steps_since_reset", 0))
