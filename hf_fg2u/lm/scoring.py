"""A learned rater applied outside any training loop: the keep-probability of every row of a raw dataset, chunk by
chunk, from the row's loss under the rater's adapter (see :class:`hf_fg2u.outer.DataRater`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hf_fg2u.lm.collator import PaddingCollator
from hf_fg2u.lm.formats import MODEL_INPUT_COLUMNS, dataset_format, tokenize_dataset
from hf_fg2u.lm.losses import per_example_lm_loss, takes_logits_to_keep
from hf_fg2u.lm.params import unwrap_model
from hf_fg2u.outer.data_rater import DataRater


@dataclass
class RowScorer:
    """Scores raw rows with ``rater`` reading losses under ``model`` (the base model with the rater's adapter).

    ``max_length``: longer rows keep their end (the completion, which the loss reads). ``batch_size``: rows per
    forward pass; ``chunk_size``: rows tokenized at a time, so memory stays flat in the number of rows.
    """

    model: torch.nn.Module
    rater: DataRater
    tokenizer: object
    max_length: int = 512
    batch_size: int = 64
    chunk_size: int = 1024

    def __post_init__(self):
        if not isinstance(self.rater, DataRater):
            raise ValueError(
                "Rows are scored by a DataRater (hf-fg2u train --recipe data_rater); this run learned "
                + (
                    "no outer variables (a fine-tune's output)."
                    if self.rater is None
                    else f"{type(self.rater).__name__}, whose weights belong to its own rows (hf-fg2u weights)."
                )
            )
        self.model.eval()
        self._collate = PaddingCollator.for_tokenizer(self.tokenizer, self.model)
        self._keep_logits = takes_logits_to_keep(unwrap_model(self.model))

    def check_format(self, column_names, source: str) -> None:
        """Refuse rows of another format than the rater was learned on (its losses would be of other tokens)."""
        found = dataset_format(column_names)
        expected = self.rater.config.row_format
        if expected is not None and found != expected:
            raise ValueError(
                f"{source} holds {found} rows, but the rater was learned on {expected} rows: its features are the "
                f"losses of {expected} rows' answers. Convert the rows to {expected}, or learn a rater on rows like "
                "these."
            )

    def chunks(self, dataset) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, keep-probabilities [n] in float64) for every ``chunk_size`` rows of the raw ``dataset``, in
        order; NaN where a row has no answer to score (an empty completion, or one max_length cut off)."""
        for start in range(0, len(dataset), self.chunk_size):
            rows = dataset.select(range(start, min(start + self.chunk_size, len(dataset))))
            yield start, self.keep_probabilities(rows)

    @torch.no_grad()
    def keep_probabilities(self, rows) -> torch.Tensor:
        empty = torch.tensor(empty_answers(rows), dtype=torch.bool)
        rows = self.rater.prepare_dataset(rows, "scored")  # its group column, before tokenizing replaces it
        tokenized = tokenize_dataset(rows, self.tokenizer, self.max_length, "scored", truncation_mode="keep_end")
        columns = [c for c in (*MODEL_INPUT_COLUMNS, *self.rater.required_columns) if c in tokenized.column_names]
        view, outer, out = tokenized.select_columns(columns), self.rater.outer_dict(), []
        params = dict(unwrap_model(self.model).named_parameters())
        device = next(self.model.parameters()).device
        for start in range(0, len(view), self.batch_size):
            batch = self._collate([view[i] for i in range(start, min(start + self.batch_size, len(view)))])
            batch = {key: value.to(device) for key, value in batch.items()}
            losses = per_example_lm_loss(unwrap_model(self.model), params, batch, keep_logits=self._keep_logits)
            keep = self.rater.keep_probabilities(outer, batch, losses.float()).double()
            scored = (batch["labels"][:, 1:] != -100).any(-1)
            out.append(torch.where(scored, keep, torch.full_like(keep, float("nan"))).cpu())
        keep = torch.cat(out)
        return torch.where(empty, torch.full_like(keep, float("nan")), keep)


def empty_answers(rows) -> list[bool]:
    """Rows whose answer is empty text (a blank completion, or a blank last message): their only labelled token would
    be the end-of-text the tokenization appends, no answer to judge."""
    kind = dataset_format(rows.column_names)
    if kind == "prompt_completion":
        return [isinstance(value, str) and not value.strip() for value in rows["completion"]]
    if kind == "conversational":
        return [not messages or not str(messages[-1].get("content") or "").strip() for messages in rows["messages"]]
    return [not str(text or "").strip() for text in rows["text"]]
