"""The learned weights of a dataset's rows, as a column beside the user's own."""

from __future__ import annotations

import torch
from transformers.utils import logging

from hf_fg2u.hub.report import SCORED_COLUMN
from hf_fg2u.lm.data_checks import ModelLimits, prepare_dataset
from hf_fg2u.lm.formats import MODEL_INPUT_COLUMNS
from hf_fg2u.lm.params import unwrap_model

logger = logging.get_logger(__name__)


class WeightExportMixin:
    """The learned weights of a dataset's rows, a part of ``BilevelTrainer``."""

    def export_weights(self, dataset=None, column: str = "weight"):
        """``dataset`` (default: the train dataset as given to the trainer) with every column it has except
        token ids, plus a ``weight`` column from the learned outer variables (mean 1; a ``weight`` column the
        dataset had is replaced), ready for ``push_to_hub``, and a ``scored`` column: False for a row that never
        entered an unroll, whose weight is its starting one, not a learned one. A raw dataset is tokenized like the
        train dataset; rows without an id column are numbered 0..n-1 in order. A plain ``Trainer`` or TRL's
        ``SFTTrainer`` drops the ``weight`` column and trains unweighted: train with
        :class:`~hf_fg2u.trainer.weighted_mixin.WeightedLossMixin` or ``hf-fg2u finetune``
        (``check_keeps_weights(trainer)`` warns)."""
        if dataset is None:
            dataset, tokenized = self.user_train_dataset, self.train_dataset
        else:
            limits = ModelLimits.of(unwrap_model(self.model))
            tokenized = prepare_dataset(dataset, "exported", self.outer, self.processing_class, self.args, limits)
        weights = self.dataset_weights(tokenized)
        scored = self.outer.scored_rows(tokenized)
        keep = [c for c in dataset.column_names if c not in (*MODEL_INPUT_COLUMNS, column, SCORED_COLUMN)]
        exported = dataset.select_columns(keep)
        exported = exported.add_column(SCORED_COLUMN, [True] * len(exported) if scored is None else scored)
        return exported.add_column(column, weights.tolist())

    @torch.no_grad()
    def dataset_weights(self, dataset) -> torch.Tensor:
        """Per-example weight of every row of ``dataset`` (mean 1), from the current θ and φ."""
        outer, chunks = self.outer.outer_dict(), []
        for batch, losses in self._row_batches(dataset):
            weights = self.outer.row_weights(outer, batch, losses)
            chunks.append(torch.ones_like(losses) if weights is None else weights)
        weights = torch.cat(chunks).double().cpu()
        return (weights / weights.mean()).float()

    @torch.no_grad()
    def dataset_losses(self, dataset) -> torch.Tensor:
        """Each row's loss [N] under the current θ (and φ's soft prompt, where there is one)."""
        return torch.cat([losses.cpu() for _, losses in self._row_batches(dataset, need_losses=True)])

    def _row_batches(self, dataset, need_losses: bool = False):
        """(batch, per-row losses) for every 64 rows of ``dataset``; zeros for losses where the outer module reads
        none (weights of ids or domains need no forward pass over the dataset)."""
        model = unwrap_model(self.model)
        outer = self.outer.outer_dict()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        columns = [c for c in (*MODEL_INPUT_COLUMNS, *self.outer.required_columns) if c in dataset.column_names]
        view = dataset.select_columns(columns)
        _, _, per_example_losses = self._problem(model, self.args.method)
        for start in range(0, len(view), 64):
            rows = [view[i] for i in range(start, min(start + 64, len(view)))]
            batch = self._prepare_inputs(self.data_collator(rows))
            if need_losses or self.outer.reads_losses:
                yield batch, per_example_losses(params, outer, batch)
            else:
                yield batch, torch.zeros(len(rows), device=batch["input_ids"].device)
