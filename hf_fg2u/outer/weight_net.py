"""``WeightNet``: a small MLP from per-example features to a weight (Meta-Weight-Net style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_fg2u.outer.base import OuterModule, require_columns


@dataclass(frozen=True)
class WeightNetConfig:
    """``WeightNet``'s arguments, checked when built."""

    hidden_size: int = 32
    domains: list[str] | None = None
    domain_column: str = "domain"

    def __post_init__(self):
        if not isinstance(self.hidden_size, int) or self.hidden_size < 1:
            raise ValueError(f"WeightNet needs hidden_size >= 1, got {self.hidden_size!r}.")


class WeightNet(OuterModule):
    """weight_i ∝ sigmoid(MLP([loss_i, one_hot(domain_i)])), normalised within the batch.

    It reads features, not ids, so it generalises to examples never seen in an unroll. The loss feature is
    the example's current (detached) loss under θ.
    """

    config_class = WeightNetConfig
    weighs_rows = True

    def __init__(self, hidden_size: int = 32, domains: list[str] | None = None, domain_column: str = "domain"):
        domains = list(domains) if domains else None
        super().__init__(WeightNetConfig(hidden_size, domains, domain_column))
        self.domains = domains
        self.domain_column = domain_column
        self.index_column = f"{domain_column}_index"
        self.required_columns = (self.index_column,) if domains else ()
        features = 1 + (len(domains) if domains else 0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(features, hidden_size), torch.nn.Tanh(), torch.nn.Linear(hidden_size, 1)
        )

    def features(self, batch: dict, losses: torch.Tensor) -> torch.Tensor:
        columns = [losses.detach().unsqueeze(-1)]
        if self.domains:
            one_hot = torch.nn.functional.one_hot(batch[self.index_column], len(self.domains))
            columns.append(one_hot.to(losses.dtype))
        return torch.cat(columns, dim=-1)

    def raw_weights(self, outer: dict, batch: dict, losses: torch.Tensor) -> torch.Tensor:
        """sigmoid(MLP(features)) [B] with the MLP's parameters taken from ``outer``."""
        params = {name.removeprefix("net."): value for name, value in outer.items()}
        logits = torch.func.functional_call(self.net, params, (self.features(batch, losses),))
        return torch.sigmoid(logits.squeeze(-1))

    def example_weights(self, outer, batch, losses):
        raw = self.raw_weights(outer, batch, losses)
        return raw / raw.sum()

    def row_weights(self, outer, batch, losses):
        return self.raw_weights(outer, batch, losses)

    def prepare_dataset(self, dataset, role):
        if not self.domains or role != "train":
            return dataset
        require_columns(dataset, (self.domain_column,), role, "WeightNet")
        index = {name: i for i, name in enumerate(self.domains)}
        return dataset.map(lambda row: {self.index_column: index[row[self.domain_column]]})
