"""``DomainWeights``: a learned softmax mixture over named data domains (DoReMi-like)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_fg2u.outer.base import OuterModule, normalized_entropy, require_columns, softmax_regularizer


@dataclass(frozen=True)
class DomainWeightsConfig:
    """``DomainWeights``' arguments, checked when built."""

    domains: list[str]
    domain_column: str = "domain"
    init: list[float] | None = None

    def __post_init__(self):
        if len(self.domains) < 2 or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"DomainWeights needs at least two distinct domain names, got {self.domains}.")
        if self.init is not None and len(self.init) != len(self.domains):
            raise ValueError(f"DomainWeights init has {len(self.init)} logits for {len(self.domains)} domains.")


class DomainWeights(OuterModule):
    """A logit per domain; an example's weight is its domain's probability, normalised within the batch.

    The dataset's domain column holds names; ``prepare_dataset`` adds ``<column>_index`` with their indices.
    """

    config_class = DomainWeightsConfig
    reads_losses = False
    weighs_rows = True

    def __init__(self, domains: list[str], domain_column: str = "domain", init: list[float] | None = None):
        domains = list(domains)
        super().__init__(DomainWeightsConfig(domains, domain_column, None if init is None else list(init)))
        self.domains = domains
        self.domain_column = domain_column
        self.index_column = f"{domain_column}_index"
        self.required_columns = (self.index_column,)
        start = torch.zeros(len(domains)) if init is None else torch.as_tensor(init, dtype=torch.float32)
        self.logits = torch.nn.Parameter(start.clone())

    def example_weights(self, outer, batch, losses):
        mixture = torch.softmax(outer["logits"], dim=0)[batch[self.index_column]]
        return mixture / mixture.sum()

    def row_weights(self, outer, batch, losses):
        return torch.softmax(outer["logits"], dim=0)[batch[self.index_column]]

    def regularizer(self, outer, kind):
        return softmax_regularizer(outer["logits"], kind)

    def prepare_dataset(self, dataset, role):
        if role != "train":
            return dataset
        require_columns(dataset, (self.domain_column,), role, "DomainWeights")
        unknown = sorted(set(dataset.unique(self.domain_column)) - set(self.domains))
        if unknown:
            raise ValueError(
                f"The train dataset has domains {unknown} that DomainWeights does not know ({self.domains}). "
                "Pass every domain name to DomainWeights(domains=...)."
            )
        index = {name: i for i, name in enumerate(self.domains)}
        return dataset.map(lambda row: {self.index_column: index[row[self.domain_column]]})

    def probabilities(self) -> dict[str, float]:
        probs = torch.softmax(self.logits.detach(), dim=0)
        return {name: float(p) for name, p in zip(self.domains, probs, strict=True)}

    def summary(self):
        probs = torch.softmax(self.logits.detach(), dim=0)
        out = {"weight_entropy": normalized_entropy(probs), "weight_min": float(probs.min())}
        out["weight_max"] = float(probs.max())
        out.update({f"domain_weight/{name}": p for name, p in self.probabilities().items()})
        return out
