"""``ExampleWeights``: a learned logit per training example."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hf_fg2u.outer.base import OuterModule, RestrictedOuter, normalized_entropy, require_columns, softmax_regularizer

PARAMETRIZATIONS = ("softmax", "sigmoid")
# What a batch of a restricted unroll carries (ExampleWeights.restrict): each row's place among the kept logits,
# and the log of the mean share it is measured against, fixed for the outer step.
KEPT_ROW, LOG_MEAN_SHARE = "outer_kept_row", "outer_log_mean_share"
# The meta column of each meta row's group, for grouped weights: where the answer-shift directions are taken.
META_GROUP = "meta_group"


@dataclass(frozen=True)
class ExampleWeightsConfig:
    """``ExampleWeights``' arguments, checked when built."""

    num_examples: int
    id_column: str = "example_id"
    init: float = 0.0
    parametrization: str = "softmax"
    max_logit: float | None = None
    num_groups: int = 1

    def __post_init__(self):
        if self.num_examples < 1:
            raise ValueError(f"ExampleWeights needs num_examples >= 1, got {self.num_examples}.")
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization={self.parametrization!r} is not known; use one of {PARAMETRIZATIONS}.")
        if self.max_logit is not None and not float(self.init) <= self.max_logit < float("inf"):
            raise ValueError(f"max_logit={self.max_logit} must be a finite number >= init ({self.init}), or None.")
        if self.num_groups < 1:
            raise ValueError(f"ExampleWeights needs num_groups >= 1, got {self.num_groups}.")


class ExampleWeights(OuterModule):
    """A logit per training example, read through an id column.

    A row's weight is its share s(z_i) over the mean share of the whole dataset, w_i = s(z_i) / mean_j s(z_j): how
    much its loss counts against the average row (mean weight 1). The dataset-wide mean is held fixed while
    differentiating, so a row's weight and its hypergradient depend on its own logit only, never on the rows it
    was batched with (a per-batch normaliser would push some row of every all-clean batch down). The inner loss
    of a batch of B rows is Σ_i w_i ℓ_i / B.

    ``parametrization`` says how a logit z becomes a row's share:
    ``"softmax"`` (exp z, unbounded) or ``"sigmoid"`` (σ(z) in (0, 1), a soft keep-probability). With sigmoid a
    row can be dropped but never weighs more than a row kept in full, so the weights cannot pile onto the few rows
    that best fit a small meta set (docs/real_demo.md measures that case). ``max_logit`` caps the logits after
    every outer step (``project_``): with ``max_logit=init`` a row can be pushed down but never above where every
    row started, the same bound on softmax's dynamics. Only the examples of the current unroll
    can affect h, so they alone get random directions: the estimator's dimension is T·batch, not the dataset size.
    ``weights()`` reports every row's share of the whole dataset, times num_examples (mean 1).

    With ``num_groups`` > 1 and a group per row (``set_groups``, e.g. one per answer) the mean is taken within each
    group instead: w_i = s(z_i) / mean_{j in g(i)} s(z_j). Every group keeps its share of the loss, and the weights
    rank rows only within their group. Why: where the answers are a few labels, weights learned against one
    dataset-wide mean also carry which answer the meta set needed more of at the current θ, and θ trained on them
    (and a fine-tune after) inherits that as a bias towards the answer (docs/value.md). For the same reason the
    trainer removes the groups' shift directions from the meta gradient (``BilevelConfig.project_group_shift``):
    a row is then credited only for what it teaches beyond its group's share (docs/group_shift.md). The directions
    are taken on the meta rows, so the meta dataset then needs a ``meta_group`` column (each meta row's group, -1
    where unknown; ``hf-fg2u train --balance_column`` adds it).
    """

    config_class = ExampleWeightsConfig
    reads_losses = False
    weighs_rows = True
    per_row_coordinates = True

    def __init__(
        self,
        num_examples: int,
        id_column: str = "example_id",
        init: float = 0.0,
        parametrization: str = "softmax",
        max_logit: float | None = None,
        num_groups: int = 1,
    ):
        super().__init__(ExampleWeightsConfig(num_examples, id_column, init, parametrization, max_logit, num_groups))
        self.id_column = id_column
        self.parametrization = parametrization
        self.max_logit = max_logit
        self.required_columns = (id_column,)
        self.logits = torch.nn.Parameter(torch.full((num_examples,), float(init)))
        self.num_groups = num_groups
        self.meta_group_column = META_GROUP if num_groups > 1 else None
        # saved with the logits only when there are groups, so files from before groups existed still load
        self.register_buffer("groups", torch.zeros(num_examples, dtype=torch.long), persistent=num_groups > 1)
        # which rows entered an unroll: the others keep their starting weight (an export flags them)
        self.register_buffer("scored", torch.zeros(num_examples, dtype=torch.bool))

    optional_state = ("scored",)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Files from before the record of scored rows: every row counts as scored, as exports then assumed.
        state_dict.setdefault(prefix + "scored", torch.ones_like(self.scored))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_groups(self, groups) -> None:
        """Each row's group, an int in [0, num_groups) per example id; every group must have a row."""
        groups = torch.as_tensor(groups, dtype=torch.long, device=self.groups.device)
        if groups.shape != self.groups.shape:
            raise ValueError(
                f"set_groups needs one group per example ({self.groups.numel()}), got {tuple(groups.shape)}."
            )
        counts = _group_counts(groups, self.num_groups)
        if int(groups.min()) < 0 or int(groups.max()) >= self.num_groups or bool((counts == 0).any()):
            raise ValueError(
                f"Groups must lie in [0, {self.num_groups}) and each have a row; counts {counts.tolist()}."
            )
        self.groups.copy_(groups)

    def check_groups(self) -> None:
        """Refuse grouped weights whose groups were never set: every row would sit in group 0 and the weights would
        silently be measured against one dataset-wide mean. ``set_groups`` gives every group a row, so a group
        without one means it was never called (groups loaded with ``from_pretrained`` pass)."""
        counts = _group_counts(self.groups, self.num_groups)
        if self.num_groups > 1 and bool((counts == 0).any()):
            raise ValueError(
                f"ExampleWeights(num_groups={self.num_groups}) has {counts.tolist()} rows per group: its groups were "
                "never set, so every row would sit in group 0. Call set_groups(groups) with each example's group in "
                f"[0, {self.num_groups}) before training (hf-fg2u train --balance_column does), or use num_groups=1."
            )

    def log_shares(self, logits: torch.Tensor) -> torch.Tensor:
        """log of each row's unnormalised share: z (softmax) or log σ(z) (sigmoid); weights are their softmax."""
        return logits if self.parametrization == "softmax" else torch.nn.functional.logsigmoid(logits)

    def log_mean_shares(self, log_shares: torch.Tensor) -> torch.Tensor:
        """log of the mean share each row is measured against (held fixed): the dataset's, or its group's."""
        log_shares = log_shares.detach()
        if self.num_groups == 1:
            return torch.logsumexp(log_shares, dim=0) - math.log(log_shares.numel())
        members = torch.nn.functional.one_hot(self.groups, self.num_groups).to(log_shares.dtype)  # [N, G]
        top = log_shares.max()
        log_group_means = torch.log((log_shares - top).exp() @ members / members.sum(0)) + top
        return log_group_means[self.groups]

    def log_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """log w_i of every row (the mean share held fixed)."""
        log_shares = self.log_shares(logits)
        return log_shares - self.log_mean_shares(log_shares)

    def example_weights(self, outer, batch, losses):
        """w_i / B for the batch's rows: each row's share over the mean share (held fixed), over B. In a restricted
        unroll (``restrict``) φ holds only the unroll's logits and the batch carries each row's mean share."""
        if LOG_MEAN_SHARE in batch:
            log_weights = self.log_shares(outer["logits"][batch[KEPT_ROW]]) - batch[LOG_MEAN_SHARE]
        else:
            log_weights = self.log_weights(outer["logits"])[batch[self.id_column]]
        return torch.exp(log_weights) / log_weights.numel()

    def row_weights(self, outer, batch, losses):
        return torch.exp(self.log_weights(outer["logits"]))[batch[self.id_column]]

    def regularizer(self, outer, kind):
        """KL of the dataset-wide weights from uniform, or ½‖z‖² on the logits themselves."""
        logits = outer["logits"]
        return softmax_regularizer(self.log_shares(logits) if kind == "kl_uniform" else logits, kind)

    def prepare_dataset(self, dataset, role):
        if role != "train":
            return dataset
        self.check_groups()
        require_columns(dataset, self.required_columns, role, "ExampleWeights")
        ids = torch.as_tensor(dataset[self.id_column])
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.logits.numel()):
            raise ValueError(
                f"Column {self.id_column!r} has ids in [{int(ids.min())}, {int(ids.max())}] but ExampleWeights has "
                f"{self.logits.numel()} logits: ids must lie in [0, num_examples). Number the examples 0..n-1 "
                "(dataset.map(lambda _, i: {'example_id': i}, with_indices=True)) or raise num_examples."
            )
        return dataset

    def active_coordinates(self, inner_batches):
        mask = torch.zeros(self.logits.numel(), dtype=torch.bool, device=self.logits.device)
        for batch in inner_batches:
            mask[batch[self.id_column]] = True
        return {"logits": mask}

    def mark_scored(self, active):
        self.scored |= active["logits"].to(self.scored.device)

    def scored_rows(self, dataset):
        return self.scored[torch.as_tensor(dataset[self.id_column], dtype=torch.long)].tolist()

    def restrict(self, inner_batches, active):
        """Only the logits of the ``active`` rows, and each batch told its rows' places among them and their mean
        shares (computed once over the whole dataset, as ``log_weights`` holds them fixed): the same weights and
        hypergradient, at a cost in the unroll's rows."""
        kept = active["logits"].nonzero().reshape(-1)
        logits = self.logits.detach()
        log_mean = self.log_mean_shares(self.log_shares(logits)).expand(logits.shape)  # one per row
        batches = [
            {**batch, KEPT_ROW: torch.searchsorted(kept, batch[self.id_column]),
             LOG_MEAN_SHARE: log_mean[batch[self.id_column]]}
            for batch in inner_batches
        ]  # fmt: skip
        return RestrictedOuter({"logits": logits[kept]}, batches, kept)

    def project_(self) -> None:
        """Clamp the logits to ``max_logit`` (when set): rows can still be pushed down, and back up to the cap."""
        if self.max_logit is not None:
            with torch.no_grad():
                self.logits.clamp_(max=self.max_logit)

    def weights(self) -> torch.Tensor:
        """Per-example weights with mean 1 (within each group, when there are groups)."""
        return torch.exp(self.log_weights(self.logits.detach()))

    def summary(self):
        weights = self.weights()
        return {
            "weight_entropy": normalized_entropy(weights / weights.sum()),
            "weight_min": float(weights.min()),
            "weight_max": float(weights.max()),
        }


def _group_counts(groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Rows per group [num_groups] (a row below 0 counts in group 0; ``set_groups`` refuses those)."""
    return torch.bincount(groups.clamp_min(0), minlength=num_groups)
