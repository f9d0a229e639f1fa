"""Pure loss functions of a causal LM for the bilevel problem: per-example token losses, the weighted inner
loss and the meta loss, as ``(params, outer, batch) -> scalar`` functions that ``estimate_hypergradient``
takes."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from hf_fg2u.lm.params import functional_forward, preflight, unwrap_model

WeightFn = Callable[[dict[str, torch.Tensor], dict, torch.Tensor], torch.Tensor | None]
PrefixFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
MODEL_INPUTS = ("input_ids", "attention_mask")


def token_labels(batch: dict) -> torch.Tensor:
    """The batch's ``labels``, or its ``input_ids`` with padding (attention_mask 0) marked as -100."""
    if "labels" in batch:
        return batch["labels"]
    labels = batch["input_ids"]
    if "attention_mask" in batch:
        labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    return labels


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy at every position [B, L-1] (0 where unlabelled) and the mask of labelled positions
    [B, L-1], from logits [B, L, V] and labels [B, L] (see :func:`aligned_token_losses`)."""
    return aligned_token_losses(logits[:, :-1], labels[:, 1:])


def aligned_token_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each ``targets`` token [B, K] under the logits that predict it [B, K, V] (0 where the target
    is -100), and the mask of labelled targets.

    Targets labelled -100 are excluded by an explicit mask (``ignore_index`` misbehaves under vmap), and
    ``torch.where`` keeps NaN in a padded position's logits from reaching the loss.
    """
    mask = targets != -100
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets))
    log_probs = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    token_nll = -log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, token_nll, torch.zeros_like(token_nll)), mask


def predicting_positions(labels: torch.Tensor) -> torch.Tensor | None:
    """The positions [K] whose logits predict a labelled token in some row (labels[:, t + 1] != -100), or None when
    that is every position. A loss reads the logits there only; where answers are short beside their prompts,
    projecting the other positions on the vocabulary (a fifth of SmolLM2-135M's forward pass) is wasted."""
    positions = (labels[:, 1:] != -100).any(0).nonzero().reshape(-1)
    return None if positions.numel() == labels.shape[1] - 1 else positions


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs do; a peft wrapper passes it
    on to the model it wraps)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def causal_lm_outputs(call: Callable, inputs: dict, labels: torch.Tensor, keep: bool) -> tuple:
    """(``call(**inputs)``, the positions its logits are at or None for all): the logits only at the positions that
    predict a labelled token when ``keep`` (the model takes ``logits_to_keep``)."""
    positions = predicting_positions(labels) if keep else None
    extra = {} if positions is None else {"logits_to_keep": positions}
    return call(**inputs, **extra), positions


def labelled_token_losses(
    logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token cross-entropy and the mask of labelled tokens (see :func:`aligned_token_losses`), from logits
    [B, L, V] and labels [B, L]; with ``positions`` [K], logits [B, K, V] at those positions only."""
    if positions is None:
        return token_losses(logits, labels)
    if logits.shape[1] != positions.numel():
        raise ValueError(
            f"The model returned logits at {logits.shape[1]} positions when asked for {positions.numel()} "
            "(logits_to_keep as a tensor of positions): its forward takes only a count. Load it with a "
            "transformers class whose forward slices by positions."
        )
    return aligned_token_losses(logits, labels[:, positions + 1])


def per_example_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy per example [B] (see :func:`labelled_token_losses`)."""
    token_nll, mask = labelled_token_losses(logits, labels, positions)
    return token_nll.sum(-1) / mask.sum(-1).clamp_min(1)


def weighted_row_loss(losses: torch.Tensor, weights: torch.Tensor, normalizer: float) -> torch.Tensor:
    """Σ_i (w_i / normalizer) ℓ_i / B over a batch's B rows: each row's loss scaled by its weight against a fixed,
    dataset-level ``normalizer`` (the dataset's mean weight), then the batch mean the Trainer expects.

    Why not Σ w_i ℓ_i / Σ w_i: that divides by the batch's own weights, so at one row per batch it is w·ℓ/w = ℓ and
    the weights are ignored, and a row's share of the objective depends on its batch-mates. With a fixed normaliser,
    batch 1 × 8 accumulation steps (or 8 processes) trains on the same objective as batch 8."""
    if not normalizer > 0:
        raise ValueError(f"The weight normaliser must be a positive number (the mean weight), got {normalizer!r}.")
    return (weights.to(losses.dtype) * losses).sum() / (normalizer * losses.numel())


def input_embedding_name(model: torch.nn.Module) -> str:
    embedding = model.get_input_embeddings()
    for name, parameter in model.named_parameters():
        if parameter is embedding.weight:
            return name
    raise ValueError("Could not find the input embedding weight among the model's parameters.")


def per_example_lm_loss(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    batch: dict,
    prefix: torch.Tensor | None = None,
    keep_logits: bool = False,
) -> torch.Tensor:
    """Per-example loss [B] of ``model`` with parameters ``params`` substituted.

    ``prefix`` [P, H] (a soft prompt) is prepended to every example's input embeddings; the attention mask
    grows by P ones and the labels by P ignored positions. ``keep_logits``: the model takes ``logits_to_keep``, and
    only the logits that predict a labelled token are computed.
    """
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    labels = token_labels(batch)

    def call(**kwargs):
        return functional_forward(model, params, **kwargs)

    if prefix is not None:
        input_ids = inputs.pop("input_ids")
        name = input_embedding_name(model)
        weight = params.get(name, dict(model.named_parameters())[name])
        embeds = torch.nn.functional.embedding(input_ids, weight)
        size = input_ids.shape[0]
        inputs["inputs_embeds"] = torch.cat([prefix.to(embeds.dtype).unsqueeze(0).expand(size, -1, -1), embeds], 1)
        ones = torch.ones(size, prefix.shape[0], dtype=torch.long, device=input_ids.device)
        mask = inputs.get("attention_mask", torch.ones_like(input_ids))
        inputs["attention_mask"] = torch.cat([ones, mask], dim=1)
        labels = torch.cat([torch.full_like(ones, -100), labels], dim=1)
    outputs, positions = causal_lm_outputs(call, inputs, labels, keep_logits)
    return per_example_token_loss(outputs.logits, labels, positions)


def make_lm_losses(model: torch.nn.Module, prefix: PrefixFn | None = None, second_order: bool = True) -> Callable:
    """Build ``losses(params, outer, batch) -> [B]``, the per-example loss with ``prefix(φ)`` prepended, run
    under the attention context the preflight chose. ``second_order`` says whether the chosen method
    differentiates through inner gradients."""
    model = unwrap_model(model)
    attention_context = preflight(model, second_order)
    keep_logits = takes_logits_to_keep(model)

    def losses(params, outer, batch):
        with attention_context():
            return per_example_lm_loss(model, params, batch, None if prefix is None else prefix(outer), keep_logits)

    return losses


def losses_to_problem(losses: Callable, example_weights: WeightFn | None = None) -> tuple[Callable, Callable]:
    """(inner_loss, outer_loss) from per-example ``losses``: inner_loss = Σ_i w_i(φ, batch, ℓ.detach()) ℓ_i(θ)
    with ``example_weights`` (None, or weights None: the mean); outer_loss = mean_i ℓ_i(θ) on the meta batch."""

    def inner_loss(params, outer, batch):
        per_example = losses(params, outer, batch)
        weights = None if example_weights is None else example_weights(outer, batch, per_example.detach())
        if weights is None:
            return per_example.mean()
        return (weights.to(per_example.dtype) * per_example).sum()

    def outer_loss(params, outer, batch):
        return losses(params, outer, batch).mean()

    return inner_loss, outer_loss


def make_lm_problem(
    model: torch.nn.Module,
    example_weights: WeightFn | None = None,
    prefix: PrefixFn | None = None,
    second_order: bool = True,
) -> tuple[Callable, Callable]:
    """Build (inner_loss, outer_loss) for a causal LM (see :func:`losses_to_problem`); ``prefix(φ)`` is a soft
    prompt used by both. ``second_order`` says whether the chosen method differentiates through inner
    gradients (preflight)."""
    return losses_to_problem(make_lm_losses(model, prefix, second_order), example_weights)


def batch_softmax_weights(key: str = "example_logits", id_column: str = "example_id") -> WeightFn:
    """Per-example weights: a logit per training example, softmax-normalised within the batch."""

    def weights(outer, batch, losses=None):
        return torch.softmax(outer[key][batch[id_column]], dim=0)

    return weights
