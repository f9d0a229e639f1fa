"""``DataRater``: a meta-learned rater that maps features of a row to its weight, so it weighs rows it never saw.

Per-example weights (``ExampleWeights``) hold one logit per row: a weight exists only for a row the bilevel loop
unrolled. The rater holds instead a small network over features of a row, learned by the same outer step on a
sample, then applied to any pool (``hf-fg2u score``), the way DataRater, MATES and QuRating score data they were
not trained on.

What it sees, per row: the log of its loss under the inner θ (the LoRA adapter trained alongside it; at scoring
time the run's final adapter) and, with ``group_column`` (e.g. ``completion`` where the answers are a few labels),
which group the row is in. Never its id or its text. With the default ``hidden_size=0`` the rater is a logistic
rule σ(a·log ℓ + c_g): a learned soft threshold on the loss, one per group — the small-loss rule, with its
threshold and sharpness learned from the meta rows instead of set from a known noise rate.

Two ways to learn it: as the outer variable of the bilevel loop itself (``outer=data_rater``: the hypergradient
of the meta loss moves its parameters), or fitted (``fit_``) to the per-row keep-probabilities the online loop
learned for a sample (``--recipe data_rater``). On the words task of ``make rater`` the first learned the opposite
rule — early in the online loop the rows with a high loss are mostly right answers not yet learned, whose weight
speeds up the meta loss, and the slope stayed positive (+1.5 after two epochs, the meta loss flat at 0.33) — so the
recipe takes the second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_fg2u.outer.base import OuterModule, require_columns

FEATURES = ("log_loss",)


@dataclass(frozen=True)
class DataRaterConfig:
    """``DataRater``'s arguments, checked when built. ``row_format`` (the train rows' format: ``prompt_completion``,
    ``conversational`` or ``language_modeling``) is recorded so that scoring refuses rows of another format."""

    hidden_size: int = 0
    group_column: str | None = None
    groups: list[str] | None = None
    row_format: str | None = None
    loss_floor: float = 1e-4

    def __post_init__(self):
        if not isinstance(self.hidden_size, int) or self.hidden_size < 0:
            raise ValueError(f"DataRater needs hidden_size >= 0 (0: a linear rule), got {self.hidden_size!r}.")
        if (self.group_column is None) != (self.groups is None):
            raise ValueError("DataRater takes group_column and groups together (the column, and its values).")
        if self.groups is not None and (len(self.groups) < 2 or len(set(self.groups)) != len(self.groups)):
            raise ValueError(f"DataRater groups must be at least two distinct values, got {self.groups!r}.")
        if not self.loss_floor > 0:
            raise ValueError(f"DataRater needs loss_floor > 0 (log of the loss), got {self.loss_floor!r}.")


class DataRater(OuterModule):
    """weight_i ∝ σ(net(features_i)): a row's keep-probability from its features (see the module docstring).

    In the inner loss the keep-probabilities are normalised over the batch (the rater's parameters are shared by
    every row, so only their ranking within a batch is learned and no overall scale drifts); exported weights are
    the keep-probabilities over their dataset's mean (mean 1), the scale of a bilevel run's weights. The network
    starts at zero output: every row weighs the same until the meta rows say otherwise.
    """

    config_class = DataRaterConfig
    weighs_rows = True

    def __init__(
        self,
        hidden_size: int = 0,
        group_column: str | None = None,
        groups: list[str] | None = None,
        row_format: str | None = None,
        loss_floor: float = 1e-4,
    ):
        groups = [str(group) for group in groups] if groups is not None else None
        super().__init__(DataRaterConfig(hidden_size, group_column, groups, row_format, loss_floor))
        self.group_index_column = f"{group_column}_rater_group" if group_column else None
        self.required_columns = (self.group_index_column,) if group_column else ()
        inputs = len(FEATURES) + (len(groups) if groups else 0)
        if hidden_size:
            self.net = torch.nn.Sequential(
                torch.nn.Linear(inputs, hidden_size), torch.nn.Tanh(), torch.nn.Linear(hidden_size, 1)
            )
        else:
            self.net = torch.nn.Sequential(torch.nn.Linear(inputs, 1))
        with torch.no_grad():  # a zero output: uniform weights to start
            self.net[-1].weight.zero_()
            self.net[-1].bias.zero_()
        self.learned_on: dict = {}  # what it was fitted on (hf_fg2u.trainer.rater_fit), for the model card

    def features(self, batch: dict, losses: torch.Tensor) -> torch.Tensor:
        """[B, F]: log(loss + loss_floor), then the group's one-hot when there are groups."""
        columns = [torch.log(losses.detach() + self.config.loss_floor).unsqueeze(-1)]
        if self.config.groups:
            one_hot = torch.nn.functional.one_hot(batch[self.group_index_column], len(self.config.groups))
            columns.append(one_hot.to(losses.dtype))
        return torch.cat(columns, dim=-1)

    def keep_probabilities(self, outer: dict, batch: dict, losses: torch.Tensor) -> torch.Tensor:
        """σ(net(features)) [B], the network's parameters taken from ``outer``."""
        params = {name.removeprefix("net."): value for name, value in outer.items()}
        features = self.features(batch, losses).to(next(iter(params.values())).dtype)
        logits = torch.func.functional_call(self.net, params, (features,))
        return torch.sigmoid(logits.squeeze(-1)).to(losses.dtype)

    def example_weights(self, outer, batch, losses):
        keep = self.keep_probabilities(outer, batch, losses)
        return keep / keep.sum()

    def row_weights(self, outer, batch, losses):
        return self.keep_probabilities(outer, batch, losses)

    def check_groups(self, dataset, role: str) -> None:
        """Refuse rows without the group column, or with a value the rater has no group for."""
        if not self.config.groups:
            return
        column = self.config.group_column
        require_columns(dataset, (column,), role, "DataRater")
        unknown = sorted({str(value) for value in dataset.unique(column)} - set(self.config.groups))
        if unknown:
            raise ValueError(
                f"The {role} rows hold {column!r} values {unknown[:5]} that the rater has no group for (it knows "
                f"{self.config.groups}): it can weigh only rows of the groups it was learned on. Drop those rows, or "
                "learn a rater on rows that include them."
            )

    def prepare_dataset(self, dataset, role):
        """Number each row's group (train, and any rows to score); a value the rater has no group for is refused."""
        if not self.config.groups or role not in ("train", "scored", "exported"):
            return dataset
        self.check_groups(dataset, role)
        index = {name: i for i, name in enumerate(self.config.groups)}
        column = self.config.group_column
        return dataset.map(lambda row: {self.group_index_column: index[str(row[column])]}, desc="Rater groups")

    def fit_(self, losses: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor | None = None,
             steps: int = 100) -> float:  # fmt: skip
        """Fit the network so that σ(net(features)) matches ``targets`` [N] in [0, 1] (e.g. the keep-probabilities
        the bilevel loop learned for N rows), by cross-entropy with L-BFGS from the current parameters; ``losses``
        [N] the rows' losses, ``groups`` [N] their group indices. Returns the final mean cross-entropy."""
        batch = {} if groups is None else {self.group_index_column: groups}
        features = self.features(batch, losses.float())
        targets = targets.float().clamp(0.0, 1.0)
        optimizer = torch.optim.LBFGS(self.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(self.net(features).squeeze(-1), targets)
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
            final = closure().detach()
        optimizer.zero_grad()
        return float(final)

    def summary(self):
        """The slope on the log loss (negative: higher loss, lower weight) and the bias, for the logs."""
        if self.config.hidden_size:
            return {}
        weight, bias = self.net[0].weight.detach()[0], self.net[0].bias.detach()
        return {"rater_loss_slope": float(weight[0]), "rater_bias": float(bias[0])}
