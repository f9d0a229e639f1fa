"""What each outer step records and how the Trainer's logs show it."""

from __future__ import annotations

import math

from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)


class LogLastStep(TrainerCallback):
    """Log at the last step whatever ``logging_steps`` is, so that a run shorter than ``logging_steps`` still
    records its meta loss and bilevel metrics."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and args.logging_strategy != "no":
            control.should_log = True
        return control


class MetricsMixin:
    """What each outer step records and how the logs show it, a part of ``BilevelTrainer``."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the bilevel metrics gathered since the last log (means) and the outer variables' summary."""
        if "loss" in logs:
            # The Trainer counts a skipped step's loss as 0 or as a past mean: report the steps that ran only.
            logs.pop("loss")
            for key, values in self._metrics.items():
                if values:
                    logs[key] = sum(values) if key in ("skipped_steps", "theta_resyncs") else sum(values) / len(values)
            if "meta_loss" in logs:
                logs["loss"] = logs["meta_loss"]
            logs.update(self.outer.summary())
            self._metrics.clear()
        if "train_loss" in logs:  # the run's summary: totals over every outer step of this train()
            logs["train_loss"] = self._meta_loss_sum / self._steps_run if self._steps_run else math.nan
            logs["skipped_steps"] = float(self._steps_skipped)
            logs["outer_steps_run"] = float(self._steps_run)
        super().log(logs, start_time)

    def _record(self, result, method: str, step: int, seconds: float, grad_norm: float) -> None:
        metrics = self._metrics
        metrics["meta_loss"].append(result.outer_loss)
        metrics["inner_loss"].append(sum(result.inner_losses) / len(result.inner_losses))
        metrics["hypergrad_norm"].append(grad_norm)  # of the whole estimate, not of this process's share
        self._largest_hypergrad = max(self._largest_hypergrad, grad_norm)
        if self.args.phase1_method is not None:  # a two-phase schedule: which phase this step was in
            metrics["phase"].append(1.0 if method != self.args.method or step < self.args.phase1_steps else 2.0)
        metrics["outer_step_seconds"].append(seconds)
        if result.num_directions:
            metrics["directions_per_second"].append(result.num_directions / max(seconds, 1e-9))
