"""The padding collator every trainer here uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PaddingCollator:
    """Pads ``input_ids``/``attention_mask``/``labels`` (labels with -100) to the longest example and stacks
    the other numeric columns (example ids, domain indices) as tensors."""

    pad_token_id: int = 0

    @classmethod
    def for_tokenizer(cls, tokenizer, model=None) -> PaddingCollator:
        """Padding with the tokenizer's pad token, else the model config's (when given), else 0."""
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        return cls(pad_token_id=pad if pad is not None else 0)

    @property
    def fill(self) -> dict[str, int]:
        """The padding value of each padded column."""
        return {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": -100}

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        fill = self.fill
        batch = {}
        for key in features[0]:
            values = [f[key] for f in features]
            if key in fill:
                batch[key] = torch.tensor([list(v) + [fill[key]] * (length - len(v)) for v in values])
            elif isinstance(values[0], int | float | bool) or torch.is_tensor(values[0]):
                batch[key] = torch.as_tensor(values)
        if "attention_mask" not in batch:
            lengths = torch.tensor([len(f["input_ids"]) for f in features])
            batch["attention_mask"] = (torch.arange(length) < lengths[:, None]).long()
        return batch
