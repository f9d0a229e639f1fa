"""Safeguards of the outer step: a non-finite hypergradient or update skips the step (or stops the run)
and puts φ, the outer optimizer, θ and the inner optimizer back as they were."""

from __future__ import annotations

import warnings

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from transformers import TrainerCallback
from transformers.utils import logging

from hf_fg2u.hypergrad import NonFiniteHypergradientError
from hf_fg2u.lm.params import load_parameters

logger = logging.get_logger(__name__)


class OuterUpdateGuard(TrainerCallback):
    """Checks φ right after the outer optimizer's step (before the scheduler, logging and saving see it)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._check_outer_update()


class OuterStepSafeguards:
    """The outer step's safeguards, a part of ``BilevelTrainer`` (reads its ``args``, ``outer``, ``optimizer``)."""

    def _snapshot_outer(self) -> tuple[dict, dict | None]:
        """φ and the outer optimizer state as they are before the update, copied into buffers kept from the last
        step (no allocation, no deep copy of the state per step; new buffers only when the layout changes)."""
        live = (dict(self.outer.state_dict()), self.optimizer.state_dict() if self.optimizer is not None else None)
        leaves, spec = tree_flatten(live)
        buffers = self._outer_buffers
        same = buffers is not None and len(buffers) == len(leaves) and all(
            torch.is_tensor(b) == torch.is_tensor(v) and (not torch.is_tensor(v) or (
                b.shape == v.shape and b.dtype == v.dtype and b.device == v.device))
            for b, v in zip(buffers, leaves, strict=True)
        )  # fmt: skip
        if same:
            buffers = [b.copy_(v) if torch.is_tensor(v) else v for b, v in zip(buffers, leaves, strict=True)]
        else:
            buffers = [v.detach().clone() if torch.is_tensor(v) else v for v in leaves]
        self._outer_buffers = buffers
        return tree_unflatten(buffers, spec)

    def _skip_step(self, step: int, reason: str) -> torch.Tensor:
        """Skip the outer update of ``step`` (nonfinite_policy='skip') or raise ('stop')."""
        if self.args.nonfinite_policy == "stop":
            raise NonFiniteHypergradientError(f"Outer step {step}: {reason}")
        warnings.warn(f"Outer step {step} skipped (nonfinite_policy='skip'): {reason}", stacklevel=3)
        for parameter in self.outer.parameters():
            parameter.grad = None
        self._metrics["skipped_steps"].append(1.0)
        self._steps_skipped += 1
        return torch.tensor(float("nan"), device=self.args.device)

    def _check_outer_update(self) -> None:
        """After the outer optimizer's step: a non-finite φ (an overflowing learning rate or moment) is put back
        as it was before the step, with the optimizer state, θ and the inner optimizer state (the unroll that
        advanced them belongs to the step that did not happen), and the step counts as skipped; a finite one is
        projected onto its feasible set (``OuterModule.project_``)."""
        before, self._outer_before = self._outer_before, None
        inner_before, self._inner_before = self._inner_before, None
        if before is None:
            return
        bad = [name for name, value in self.outer.state_dict().items() if not torch.isfinite(value).all()]
        if not bad:
            self.outer.project_()
            self._steps_run += 1
            self._meta_loss_sum += self._metrics["meta_loss"][-1]
            return
        self.outer.load_state_dict(before[0])
        if before[1] is not None:
            self.optimizer.load_state_dict(before[1])
            self._outer_buffers = None  # the optimizer's state may now be these buffers: take new ones next step
        self._restore_inner(inner_before)
        self._metrics["meta_loss"].pop()  # that step's update did not happen
        self._skip_step(
            self.state.global_step, f"the outer update made {bad} non-finite (learning_rate="
            f"{self.args.learning_rate:g}, optim={self.args.optim!r}); φ, θ and the inner optimizer state were "
            "restored. Lower learning_rate."
        )  # fmt: skip

    def _restore_inner(self, before: tuple) -> None:
        """θ (in the model too), the inner optimizer state and the reset policy's counters as before the step."""
        self._inner_params, self._inner_state, resets = before
        self._resets.load_state_dict(resets)
        load_parameters(self.model, self._inner_params)
