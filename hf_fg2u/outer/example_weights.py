"""``ExampleWeights``: a learned logit per training example."""

from __future__ import annotations

import torch

from .base import OuterModule, normalized_entropy, require_columns, softmax_regularizer


class ExampleWeights(OuterModule):
    """A logit per training example, read through an id column; weights are the softmax of the batch's logits.

    Only the examples of the current unroll can affect h, so they alone get random directions: the estimator's
    dimension is T·batch, not the dataset size. ``weights()`` reports num_examples·softmax(all logits), mean 1.
    """

    def __init__(self, num_examples: int, id_column: str = "example_id", init: float = 0.0):
        super().__init__(num_examples=num_examples, id_column=id_column, init=init)
        if num_examples < 1:
            raise ValueError(f"ExampleWeights needs num_examples >= 1, got {num_examples}.")
        self.id_column = id_column
        self.required_columns = (id_column,)
        self.logits = torch.nn.Parameter(torch.full((num_examples,), float(init)))

    def example_weights(self, outer, batch, losses):
        return torch.softmax(outer["logits"][batch[self.id_column]], dim=0)

    def row_weights(self, outer, batch, losses):
        return torch.softmax(outer["logits"], dim=0)[batch[self.id_column]]

    def regularizer(self, outer, kind):
        return softmax_regularizer(outer["logits"], kind)

    def prepare_dataset(self, dataset, role):
        if role != "train":
            return dataset
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

    def weights(self) -> torch.Tensor:
        """Per-example weights with mean 1 (num_examples · softmax of all logits)."""
        return self.logits.numel() * torch.softmax(self.logits.detach(), dim=0)

    def summary(self):
        weights = self.weights()
        return {
            "weight_entropy": normalized_entropy(weights / weights.sum()),
            "weight_min": float(weights.min()),
            "weight_max": float(weights.max()),
        }
