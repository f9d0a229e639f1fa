"""Metrics: forced-choice accuracy on prompt/completion rows whose answers come from a small set, and the AUROC
of weights against known-wrong rows.

A row counts as right when, among the distinct completions of the scored rows, the model gives its own completion
the highest log-likelihood after the prompt (summed over the completion's tokens, each candidate tokenized with
the prompt exactly as training tokenizes a row). For single-token answers (" positive" / " negative") this is the
comparison of the two next-token logits.
"""

from __future__ import annotations

import math

import torch

from hf_fg2u.lm.formats import MODEL_INPUT_COLUMNS, encode_example
from hf_fg2u.lm.losses import causal_lm_outputs, labelled_token_losses, takes_logits_to_keep

MAX_CHOICES = 20


def answer_choices(dataset, max_choices: int = MAX_CHOICES) -> list[str]:
    """The distinct completions of a prompt/completion ``dataset``, refused when there are more than
    ``max_choices`` (forced choice would then be a different task from the one trained)."""
    missing = {"prompt", "completion"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"Forced-choice accuracy needs prompt/completion rows; the dataset lacks {sorted(missing)} "
            f"(columns: {dataset.column_names})."
        )
    choices = sorted(set(dataset["completion"]))
    if not 2 <= len(choices) <= max_choices:
        raise ValueError(
            f"Forced-choice accuracy needs 2 to {max_choices} distinct completions; the rows have {len(choices)}. "
            "Score open-ended answers by loss instead."
        )
    return choices


def _padded(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(row["input_ids"]) for row in rows)

    def pad(key, value):
        return torch.tensor([row[key] + [value] * (width - len(row[key])) for row in rows])

    return {"input_ids": pad("input_ids", pad_token_id), "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", -100)}  # fmt: skip


def _answer_row(tokenizer, prompt: str, completion: str) -> dict[str, list[int]]:
    """The row as training tokenizes it, without the end-of-sequence token training appends: the answer alone is
    scored."""
    row = encode_example({"prompt": prompt, "completion": completion}, tokenizer, "prompt_completion")
    cut = tokenizer.eos_token_id is not None and row["input_ids"][-1] == tokenizer.eos_token_id
    return {key: row[key][:-1] if cut else row[key] for key in MODEL_INPUT_COLUMNS}


@torch.no_grad()
def completion_log_likelihoods(model, tokenizer, prompts: list[str], completion: str, batch_size: int = 32):
    """log p(completion | prompt) for every prompt, summed over the completion's tokens: a tensor [len(prompts)].
    The model projects on the vocabulary only the positions that predict an answer token."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keep = takes_logits_to_keep(model)
    scores = []
    for start in range(0, len(prompts), batch_size):
        rows = [_answer_row(tokenizer, prompt, completion) for prompt in prompts[start : start + batch_size]]
        batch = {key: value.to(device) for key, value in _padded(rows, pad).items()}
        labels = batch.pop("labels")
        outputs, positions = causal_lm_outputs(model, batch, labels, keep)
        token_nll, _ = labelled_token_losses(outputs.logits, labels, positions)
        scores.append(-token_nll.sum(dim=1).cpu())
    return torch.cat(scores)


def choice_accuracy(model, tokenizer, dataset, max_choices: int = MAX_CHOICES, batch_size: int = 32) -> float:
    """Forced-choice accuracy of ``model`` on a prompt/completion ``dataset`` (see the module docstring)."""
    choices = answer_choices(dataset, max_choices)
    prompts = list(dataset["prompt"])
    scores = torch.stack([completion_log_likelihoods(model, tokenizer, prompts, c, batch_size) for c in choices], 1)
    truth = torch.tensor([choices.index(c) for c in dataset["completion"]])
    return float((scores.argmax(dim=1) == truth).double().mean())


def auroc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for boolean ``positives`` (ties count one half), by the rank-sum
    (Mann-Whitney U) formula: O(N log N) time and O(N) memory, so it scales to datasets of millions of rows
    without adding scikit-learn as a dependency for one metric."""
    scores, positives = torch.as_tensor(scores).double().flatten(), torch.as_tensor(positives).bool().flatten()
    num_pos, num_neg = int(positives.sum()), int((~positives).sum())
    if num_pos == 0 or num_neg == 0:
        return math.nan
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    average_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based mean rank of each tie group
    rank_sum = average_rank[inverse][positives].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))
