"""A data rater fitted to the per-row weights a bilevel run learned for its sample: what the online loop learned of
each row it unrolled, as a rule on features of a row (:class:`~hf_fg2u.outer.DataRater`) that weighs rows it never
saw. The fit is the last step of ``--recipe data_rater``."""

from __future__ import annotations

import torch

from hf_fg2u.lm.evaluation import auroc
from hf_fg2u.outer import DataRater, ExampleWeights


def fit_rater(trainer, rater: DataRater) -> dict[str, float]:
    """Fit ``rater`` to the keep-probabilities σ(z_i) the trainer's sigmoid ``ExampleWeights`` learned for the rows an
    unroll reached, from each row's loss under the trained θ (and its group, where the rater has groups), then make it
    the trainer's outer module, so the run's save, export and card are the rater's. Returns the fit's numbers."""
    weights = trainer.outer
    if not isinstance(weights, ExampleWeights) or weights.parametrization != "sigmoid":
        raise ValueError(
            "A rater is fitted to per-row keep-probabilities: train outer=example_weights with "
            f"weight_parametrization=sigmoid first (this run learned {type(weights).__name__}"
            f"{'' if not isinstance(weights, ExampleWeights) else ', ' + weights.parametrization})."
        )
    dataset = trainer.train_dataset
    ids = torch.as_tensor(dataset[weights.id_column], dtype=torch.long)
    scored = weights.scored[ids]
    if int(scored.sum()) < 2:
        raise ValueError(f"Only {int(scored.sum())} rows entered an unroll: too few to fit a rater. Train longer.")
    keep = torch.sigmoid(weights.logits.detach()[ids])
    groups = weights.groups[ids] if rater.config.groups else None
    if groups is not None and len(rater.config.groups) != weights.num_groups:
        raise ValueError(f"The rater has {len(rater.config.groups)} groups, the weights {weights.num_groups}.")
    losses = trainer.dataset_losses(dataset)
    cross_entropy = rater.fit_(losses[scored], keep[scored], None if groups is None else groups[scored])
    if groups is not None:  # the rater reads each row's group from its own column
        trainer.train_dataset = dataset.add_column(rater.group_index_column, groups.tolist())
    trainer.outer = rater.to(weights.logits.device)
    found = {"rater_rows": len(dataset), "rater_fit_rows": int(scored.sum()), "rater_fit_cross_entropy": cross_entropy}
    flags = dataset["is_corrupted"] if "is_corrupted" in dataset.column_names else None
    if flags is not None and all(isinstance(flag, bool) for flag in flags) and len(set(flags)) == 2:
        batch = {} if groups is None else {rater.group_index_column: groups.to(losses.device)}
        rated = rater.row_weights(rater.outer_dict(), batch, losses).double().cpu()  # no second forward pass
        found["rater_auroc_corrupted"] = auroc(-rated, torch.tensor(flags))
    rater.learned_on = found  # for the run's model card
    return {**found, **rater.summary()}
