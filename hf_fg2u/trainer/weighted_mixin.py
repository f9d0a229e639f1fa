"""Per-row weights in a trainer of your own: a plain ``transformers.Trainer``, TRL's ``SFTTrainer``, or a subclass.

Either drops a ``weight`` column silently (``remove_unused_columns``; TRL's collator reads only the token columns)
and trains unweighted. :class:`WeightedLossMixin` keeps the column, takes it out of the model's inputs, and trains
on the loss of ``hf-fg2u finetune`` (:func:`hf_fg2u.lm.losses.weighted_row_loss`)::

    class WeightedSFTTrainer(WeightedLossMixin, SFTTrainer): ...

    trainer = WeightedSFTTrainer(model=model, args=SFTConfig(...), train_dataset=rows_with_a_weight_column)

Why a mixin and not ``compute_loss_func``: the Trainer hands that function the model's outputs and labels only,
never the batch's other columns, and TRL's ``SFTTrainer`` passes every input but the labels to the model.
:func:`check_keeps_weights` says whether a trainer you built would train on the weights.
"""

from __future__ import annotations

import math
import warnings

import torch

from hf_fg2u.lm.losses import (
    causal_lm_outputs,
    per_example_token_loss,
    takes_logits_to_keep,
    token_labels,
    weighted_row_loss,
)

WEIGHT_HINT = (
    "Add the learned weights with BilevelTrainer.export_weights(), or pass weight_column= the column that holds them."
)


def check_weight_column(dataset, weight_column: str = "weight") -> float | None:
    """The mean of ``dataset[weight_column]`` (None for no rows); ``ValueError`` unless it holds finite, non-negative
    weights, not all zero."""
    if weight_column not in dataset.column_names:
        raise ValueError(
            f"The train dataset has no {weight_column!r} column (columns: {dataset.column_names}). {WEIGHT_HINT}"
        )
    values = list(dataset[weight_column])
    try:
        weights = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError):
        odd = next((value for value in values if not isinstance(value, int | float)), values[0])
        raise ValueError(
            f"Column {weight_column!r} must hold numbers; got {type(odd).__name__} values such as {odd!r}. Write "
            "the weights as numbers (not quoted)."
        ) from None
    if weights.numel() and not torch.isfinite(weights).all():
        raise ValueError(f"Column {weight_column!r} holds NaN or infinite weights; export the weights again.")
    if weights.numel() and (weights.min() < 0 or weights.sum() <= 0):
        raise ValueError(
            f"Column {weight_column!r} must hold non-negative weights, not all zero; got min {float(weights.min())}, "
            f"sum {float(weights.sum())}."
        )
    check_float32_range(weights, weight_column)
    return float(weights.mean()) if weights.numel() else None


def check_float32_range(weights: torch.Tensor, weight_column: str) -> None:
    """Refuse weights that the float32 loss turns into 0 (all below its smallest normal number: the run trains
    nothing) or inf (one above its largest: the loss is NaN)."""
    tiny, huge = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    largest = float(weights.max()) if weights.numel() else 1.0
    if not tiny <= largest <= huge:
        raise ValueError(
            f"Column {weight_column!r} holds weights up to {largest:g}, outside the float32 range [{tiny:g}, "
            f"{huge:g}] the loss is computed in: they would train as {'0' if largest < tiny else 'inf'}. Divide "
            "the weights by their mean (only their ratios matter)."
        )


class WeightCollator:
    """Wraps a collator: each row's ``column`` is taken out before ``collator`` sees the rows (TRL's and
    transformers' collators drop or choke on unknown columns) and put back as a float tensor [B]."""

    def __init__(self, collator, column: str = "weight"):
        self.collator, self.column = collator, column

    def __call__(self, features: list[dict]) -> dict:
        if not features or self.column not in features[0]:
            return self.collator(features)
        weights = [float(feature[self.column]) for feature in features]
        batch = self.collator([{k: v for k, v in feature.items() if k != self.column} for feature in features])
        batch[self.column] = torch.tensor(weights, dtype=torch.float32)
        return batch


def _mean_weight(dataset, column: str) -> float | None:
    """The mean of ``dataset[column]``, checked (:func:`check_weight_column`); None for a dataset without
    ``column_names`` (an iterable dataset: pass ``weight_normalizer=``)."""
    if dataset is None or not hasattr(dataset, "column_names"):
        return None
    return check_weight_column(dataset, column)


class WeightedLossMixin:
    """Put before a ``Trainer`` class (``class T(WeightedLossMixin, SFTTrainer)``): its training loss becomes
    Σ_i (w_i / w̄) ℓ_i / B per micro-batch, ℓ_i the mean next-token loss of row i over its labelled tokens and w̄ the
    train dataset's mean weight, fixed for the run — the loss of ``hf-fg2u finetune``, so an adapter trained here
    equals one trained there on the same rows.

    Args beyond the trainer's: ``weight_column`` (default ``"weight"``) and ``weight_normalizer`` (default: the
    mean of that column over the train dataset as the trainer prepared it). Any per-device batch, gradient
    accumulation (the Trainer divides each micro-batch's loss by the accumulation steps: ``loss_is_scaled_for_ga``
    is False) and number of processes (DDP averages equal-sized shares) train on the same objective. Padding is
    fine (labels -100 are left out of ℓ_i); packing and padding-free batches are refused, since they merge rows.
    Evaluation batches without weights get the trainer's own loss.
    """

    loss_is_scaled_for_ga = False  # the loss is a per-micro-batch mean: the Trainer divides it by the GA steps

    def __init__(self, *args, weight_column: str = "weight", weight_normalizer: float | None = None, **kwargs):
        if not isinstance(weight_column, str) or not weight_column:
            raise ValueError(f"weight_column must be a non-empty column name, got {weight_column!r}.")
        self.weight_column = weight_column
        super().__init__(*args, **kwargs)
        _refuse_merged_rows(self.args)
        if weight_normalizer is None:
            weight_normalizer = _mean_weight(self.train_dataset, weight_column)
        if weight_normalizer is not None and not (math.isfinite(weight_normalizer) and weight_normalizer > 0):
            raise ValueError(f"weight_normalizer must be a positive number (the mean weight), got {weight_normalizer}.")
        self.weight_normalizer = weight_normalizer
        self.data_collator = WeightCollator(self.data_collator, weight_column)
        self.model_accepts_loss_kwargs = False  # transformers before loss_is_scaled_for_ga divide by GA steps then
        self._keep_logits = takes_logits_to_keep(self.model)

    def _set_signature_columns_if_needed(self):
        # Keep the weight column through remove_unused_columns; compute_loss pops it before the forward pass.
        super()._set_signature_columns_if_needed()
        if self.weight_column not in self._signature_columns:
            self._signature_columns.append(self.weight_column)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Σ_i (w_i / w̄) ℓ_i / B over the batch; ``unweighted_loss`` for an evaluation batch without weights."""
        weights = inputs.pop(self.weight_column, None)
        if weights is None:
            if model.training:
                raise ValueError(
                    f"The training batch has no {self.weight_column!r} column (keys: {sorted(inputs)}). {WEIGHT_HINT}"
                )
            return self.unweighted_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.weight_normalizer is None:
            raise ValueError(
                "The batch carries weights but no weight_normalizer is known (the train dataset has no column_names "
                "to read the mean weight from): pass weight_normalizer=, the mean weight of the train rows."
            )
        losses, outputs = self.row_losses(model, inputs)
        loss = weighted_row_loss(losses, weights, self.weight_normalizer)
        return (loss, outputs) if return_outputs else loss

    def unweighted_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The loss of a batch without weights (evaluation): the trainer's own."""
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def row_losses(self, model, inputs: dict) -> tuple[torch.Tensor, object]:
        """(ℓ_i [B], the model's outputs): each row's mean loss over its labelled tokens, the model given every input
        but the labels and asked only for the logits that predict a labelled token (not under nn.DataParallel, which
        would split the positions between its replicas)."""
        labels = token_labels(inputs)
        model_inputs = {key: value for key, value in inputs.items() if key not in ("labels", "num_items_in_batch")}
        keep = self._keep_logits and not isinstance(model, torch.nn.DataParallel)
        outputs, positions = causal_lm_outputs(model, model_inputs, labels, keep)
        return per_example_token_loss(outputs.logits, labels, positions), outputs


def _refuse_merged_rows(args) -> None:
    """Packing and padding-free batches put several rows in one sequence: a row's loss cannot be weighed."""
    merged = [name for name in ("packing", "padding_free") if getattr(args, name, False)]
    if merged:
        raise ValueError(
            f"{' and '.join(f'{name}=True' for name in merged)} merges rows into one sequence, so a row's weight "
            f"cannot apply to its loss: set {', '.join(f'{name}=False' for name in merged)}."
        )


def check_keeps_weights(trainer, column: str = "weight") -> bool:
    """Whether ``trainer`` trains on ``column`` of its train dataset. A warning, and False, when the dataset has the
    column and the trainer would drop it (any trainer but a :class:`WeightedLossMixin`'s, ``WeightedLossTrainer`` too);
    True when it is a weighted trainer; False without a weight column."""
    columns = getattr(trainer.train_dataset, "column_names", None) or []
    if column not in columns:
        return False
    if isinstance(trainer, WeightedLossMixin):
        return True
    warnings.warn(
        f"The train dataset of this {type(trainer).__name__} has a {column!r} column, which it drops "
        "(remove_unused_columns) and trains as if every row weighed the same. Train with "
        f"`class Weighted(WeightedLossMixin, {type(trainer).__name__})` (hf_fg2u.trainer.weighted_mixin), or "
        "`hf-fg2u finetune`.",
        stacklevel=2,
    )
    return False
