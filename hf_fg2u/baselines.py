"""Is learning the weights worth it? The simple filters a curator would try instead, and the fair comparison.

Heuristic scores of each train row:

- ``base_model_losses``: the row's mean next-token loss under the base model; the loss filter drops the
  highest-loss rows;
- ``gradient_alignment_scores``: the cosine of the row's LoRA gradient with the meta set's (one-step gradient
  alignment, as TracIn scores data), after ``warm_up`` trained the adapter a few steps; with the warm-up's Adam
  optimizer as ``preconditioner`` the row's gradient is first turned into the Adam update it would cause, as LESS
  (arXiv 2402.04333) scores data; the rows least aligned with the meta data are dropped.

``compare_selections`` then trains a fresh adapter for the same steps on each selection — uniform weights, the
learned weights, the rows each heuristic keeps — and evaluates each on held-out data the selection never saw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch
from transformers import TrainingArguments

from hf_fg2u.lm.collator import PaddingCollator
from hf_fg2u.lm.evaluation import auroc
from hf_fg2u.lm.losses import per_example_token_loss, token_labels, token_losses
from hf_fg2u.lm.params import functional_forward
from hf_fg2u.trainer.weighted_loss import train_final_adapter

CLEAN = "clean"


def _batches(model, dataset, collator: PaddingCollator, batch_size: int):
    device = next(model.parameters()).device
    view = dataset.select_columns([c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names])
    for start in range(0, len(view), batch_size):
        rows = [view[i] for i in range(start, min(start + batch_size, len(view)))]
        yield {key: value.to(device) for key, value in collator(rows).items()}


def _row_losses(model, batch) -> torch.Tensor:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return per_example_token_loss(model(**inputs).logits, token_labels(batch))


@torch.no_grad()
def base_model_losses(model, dataset, collator: PaddingCollator, batch_size: int = 16) -> torch.Tensor:
    """Mean next-token loss of every row of a tokenized ``dataset`` under ``model`` [num_rows]."""
    model.eval()
    return torch.cat([_row_losses(model, batch).cpu() for batch in _batches(model, dataset, collator, batch_size)])


@torch.no_grad()
def last_token_losses(model, dataset, collator: PaddingCollator, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per row of a tokenized ``dataset``: the next-token loss at its last labelled token (the end-of-text token,
    for a row the tokenizer closed and nothing cut), the mean loss over its other labelled tokens, and how many
    labelled tokens it has — how much of a row's loss is learning where it ends. ``{"last", "rest", "tokens"}``,
    each [num_rows]; the row's mean loss is (last + rest · (tokens - 1)) / tokens."""
    model.eval()
    found = {"last": [], "rest": [], "tokens": []}
    for batch in _batches(model, dataset, collator, batch_size):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, mask = token_losses(logits, token_labels(batch))
        tokens = mask.sum(-1)
        if (tokens < 2).any():
            raise ValueError("last_token_losses needs rows with at least two labelled tokens.")
        last_position = mask.shape[1] - 1 - mask.flip(-1).int().argmax(-1)  # the last labelled position of each row
        last = nll.gather(-1, last_position.unsqueeze(-1)).squeeze(-1)
        found["last"].append(last.cpu())
        found["rest"].append(((nll.sum(-1) - last) / (tokens - 1)).cpu())
        found["tokens"].append(tokens.cpu())
    return {key: torch.cat(parts) for key, parts in found.items()}


def adam_direction(gradient: torch.Tensor, optimizer: torch.optim.Adam, params: list) -> torch.Tensor:
    """The (flat) update direction Adam would take for ``gradient`` from ``optimizer``'s moments of ``params``:
    m̂ / (√v̂ + eps) after one more step, LESS's gradient feature of a training row."""
    group = optimizer.param_groups[0]
    (beta1, beta2), eps = group["betas"], group["eps"]
    states = [optimizer.state[p] for p in params]
    if not all(states):
        raise ValueError("The preconditioner has no Adam state: warm the adapter up first (warm_up's optimizer).")
    m = torch.cat([state["exp_avg"].flatten() for state in states])
    v = torch.cat([state["exp_avg_sq"].flatten() for state in states])
    step = float(states[0]["step"]) + 1
    m = (beta1 * m + (1 - beta1) * gradient) / (1 - beta1**step)
    v = (beta2 * v + (1 - beta2) * gradient.square()) / (1 - beta2**step)
    return m / (v.sqrt() + eps)


def _flat_gradient(loss: torch.Tensor, params: list) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params, strict=True)])


def _trainable(model, caller: str) -> list:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{caller} needs a model with trainable (e.g. LoRA) parameters.")
    return params


def row_gradients(model, dataset, collator: PaddingCollator, batch_size: int = 16):
    """(∇θ ℓ_i flattened over the trainable parameters, ℓ_i) of each row of a tokenized ``dataset``, in order.

    ``batch_size`` rows share one forward and backward: the per-row gradients are vmapped over the batch's rows
    (each row alone, its padding masked), 2.7x faster than one row at a time on SmolLM2 and equal to it up to
    float rounding; nothing is kept beyond one batch (a caller that needs them all stacks them)."""
    model.eval()
    _trainable(model, "row_gradients")
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def row_loss(params, input_ids, attention_mask, labels):
        batch = {"input_ids": input_ids[None], "attention_mask": attention_mask[None], "labels": labels[None]}
        logits = functional_forward(model, params, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = per_example_token_loss(logits.logits, token_labels(batch)).sum()
        return loss, loss

    per_row = torch.func.vmap(torch.func.grad(row_loss, has_aux=True), in_dims=(None, 0, 0, 0))
    for batch in _batches(model, dataset, collator, batch_size):
        labels = token_labels(batch)
        grads, losses = per_row(params, batch["input_ids"], batch["attention_mask"], labels)
        flat = torch.cat([grads[name].flatten(1) for name in names], dim=1)
        yield from zip(flat, losses.detach(), strict=True)


def gradient_alignment_scores(
    model, dataset, meta_dataset, collator: PaddingCollator, preconditioner: torch.optim.Adam | None = None
) -> torch.Tensor:
    """cos(∇θ ℓ_i, ∇θ mean meta loss) of every row of ``dataset`` [num_rows], θ the trainable (LoRA) parameters
    of ``model`` where they are now; with an Adam ``preconditioner`` the row's side is its Adam update direction
    (LESS). With peft's lora_B = 0 only the B matrices have a gradient; they carry it."""
    model.eval()
    params = _trainable(model, "gradient_alignment_scores")
    meta_gradient = sum(
        _flat_gradient(_row_losses(model, batch).sum(), params) for batch in _batches(model, meta_dataset, collator, 8)
    ) / len(meta_dataset)
    scores = []
    for row_gradient, _ in row_gradients(model, dataset, collator):
        if preconditioner is not None:
            row_gradient = adam_direction(row_gradient, preconditioner, params)
        scores.append(torch.nn.functional.cosine_similarity(row_gradient, meta_gradient, dim=0).item())
    return torch.tensor(scores)


def warm_up(
    model, dataset, collator: PaddingCollator, steps: int, learning_rate: float, batch_size: int, seed: int = 0
):
    """Train ``model``'s trainable (LoRA) parameters in place for ``steps`` plain Adam steps on uniformly drawn
    rows of a tokenized ``dataset``: the warm-up LESS runs before scoring, so that the scores see a trained
    adapter (at peft's initial lora_B = 0 only the B matrices have a gradient, and every row looks alike).
    Returns the Adam optimizer, whose moments precondition LESS's gradient features."""
    if steps < 0 or batch_size < 1:
        raise ValueError(f"warm_up needs steps >= 0 and batch_size >= 1, got steps={steps}, batch_size={batch_size}.")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        rows = torch.randperm(len(dataset), generator=generator)[:batch_size].tolist()
        batch = next(_batches(model, dataset.select(rows), collator, batch_size))
        optimizer.zero_grad()
        _row_losses(model, batch).mean().backward()
        optimizer.step()
    model.eval()
    return optimizer


def keep_top(scores: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """0/1 weights keeping the ``keep_fraction`` of rows with the highest ``scores`` (at least one row)."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction={keep_fraction} must lie in (0, 1].")
    keep = max(1, round(keep_fraction * len(scores)))
    weights = torch.zeros(len(scores))
    weights[torch.argsort(torch.as_tensor(scores), descending=True)[:keep]] = 1.0
    return weights


def auroc_by_kind(suspicion, kinds: Sequence[str], clean: str = CLEAN) -> dict[str, float]:
    """AUROC of ``suspicion`` (higher = more likely corrupted) for each corruption kind against the clean rows:
    one number per kind, so a kind the score misses is not hidden by one it finds."""
    suspicion = torch.as_tensor(suspicion, dtype=torch.float64)
    kinds = list(kinds)
    is_clean = torch.tensor([k == clean for k in kinds])
    result = {}
    for kind in sorted(set(kinds) - {clean}):
        is_kind = torch.tensor([k == kind for k in kinds])
        rows = is_kind | is_clean
        result[kind] = auroc(suspicion[rows], is_kind[rows])
    return result


def compare_selections(
    make_model: Callable[[], torch.nn.Module],
    train_dataset,
    eval_dataset,
    selections: Mapping[str, torch.Tensor],
    peft_config,
    args: TrainingArguments,
    processing_class=None,
    stop_on=None,
) -> dict[str, float]:
    """Held-out loss of a fresh adapter trained for ``args.max_steps`` steps on each selection of a tokenized
    ``train_dataset``: ``{name: weights}``, rows of weight 0 dropped, the others weighted (``make_model()``
    builds the same base model each time; every run has the same seed, steps and learning rate).

    With ``stop_on``, each adapter is also scored on it every ``args.eval_steps`` steps and its held-out loss is
    read at the step where that loss was lowest. Use clean rows that no selection was fit on: early-stopped on the
    meta split, the learned weights (fit to it) stop where their meta loss is lowest, not their held-out loss.
    Without it, a selection that drops rows runs more epochs over fewer rows in the same steps and is judged
    after it has overfit them, which says more about the step count than about the selection."""
    losses = {}
    for name, weights in selections.items():
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if len(weights) != len(train_dataset):
            raise ValueError(f"Selection {name!r} has {len(weights)} weights for {len(train_dataset)} rows.")
        kept = torch.nonzero(weights > 0).flatten().tolist()
        rows = train_dataset.select(kept).add_column("weight", weights[kept].tolist())
        run_args = dataclasses.replace(args, output_dir=f"{args.output_dir}/{name}")
        if stop_on is None:
            trainer = train_final_adapter(make_model(), rows, peft_config, run_args, processing_class, eval_dataset)
            losses[name] = trainer.evaluate()["eval_loss"]
            continue
        every = args.eval_steps or args.max_steps
        run_args = dataclasses.replace(
            run_args, eval_strategy="steps", eval_steps=every, save_strategy="steps", save_steps=every,
            load_best_model_at_end=True, metric_for_best_model="eval_stop_loss", greater_is_better=False,
            save_total_limit=1,
        )  # fmt: skip
        trainer = train_final_adapter(make_model(), rows, peft_config, run_args, processing_class, {"stop": stop_on})
        losses[name] = trainer.evaluate(eval_dataset=eval_dataset)["eval_loss"]  # the best stop step's adapter
    return losses


def plot_weights_by_kind(weights, kinds: Sequence[str], path, title: str = "Learned weight of each train row"):
    """A strip plot of ``weights`` grouped by corruption kind (clean first), as a PNG at ``path``."""
    from hf_fg2u.hub.report import _agg_figure, _save

    weights = torch.as_tensor(weights, dtype=torch.float64)
    order = [CLEAN] + sorted(set(kinds) - {CLEAN})
    figure = _agg_figure(6.0, 3.5)
    axes = figure.add_subplot()
    generator = torch.Generator().manual_seed(0)
    for position, kind in enumerate(order):
        values = weights[torch.tensor([k == kind for k in kinds])]
        jitter = (torch.rand(len(values), generator=generator) - 0.5) * 0.3
        color = "tab:blue" if kind == CLEAN else "tab:red"
        axes.scatter(position + jitter, values, s=14, alpha=0.7, color=color)
    axes.axhline(1.0, color="black", linestyle="--", linewidth=1, label="uniform weight (1)")
    axes.set_xticks(range(len(order)), [f"{k}\n(n={sum(x == k for x in kinds)})" for k in order])
    axes.set_ylabel("weight (mean 1)")
    axes.set_title(title)
    axes.legend()
    return _save(figure, path)


def plot_heldout_losses(losses: Mapping[str, float], path, title: str = "Held-out loss of a fresh adapter"):
    """A bar plot of ``{selection: held-out loss}`` as a PNG at ``path``, the lowest bar highlighted."""
    from hf_fg2u.hub.report import _agg_figure, _save

    names, values = list(losses), [float(v) for v in losses.values()]
    figure = _agg_figure(6.0, 3.5)
    axes = figure.add_subplot()
    best = min(range(len(values)), key=values.__getitem__)
    colors = ["tab:green" if i == best else "tab:gray" for i in range(len(values))]
    bars = axes.bar(range(len(names)), values, color=colors)
    axes.bar_label(bars, fmt="%.4f", fontsize=8)
    axes.set_xticks(range(len(names)), names, fontsize=8)
    span = max(values) - min(values)
    axes.set_ylim(min(values) - max(span, 1e-3), max(values) + 0.5 * max(span, 1e-3))
    axes.set_ylabel("held-out loss")
    axes.set_title(title)
    return _save(figure, path)
