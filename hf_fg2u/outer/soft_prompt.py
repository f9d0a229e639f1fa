"""``SoftPrompt``: learned input embeddings prepended to every inner and meta example."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hf_fg2u.outer.base import OuterModule

WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class SoftPromptConfig:
    """``SoftPrompt``'s arguments, checked when built."""

    num_virtual_tokens: int
    hidden_size: int
    init_std: float = 0.02

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise ValueError(f"SoftPrompt needs num_virtual_tokens >= 1, got {self.num_virtual_tokens}.")


class SoftPrompt(OuterModule):
    """P virtual tokens of size H. The attention mask and labels are extended by the loss functions
    (``hf_fg2u.lm.losses.per_example_lm_loss``), so the prompt is trained only through its effect on θ_T and
    on the meta loss."""

    config_class = SoftPromptConfig
    reads_losses = False

    def __init__(self, num_virtual_tokens: int, hidden_size: int, init_std: float = 0.02):
        super().__init__(SoftPromptConfig(num_virtual_tokens, hidden_size, init_std))
        self.embeddings = torch.nn.Parameter(torch.randn(num_virtual_tokens, hidden_size) * init_std)

    @classmethod
    def from_text(cls, text: str, tokenizer, model, num_virtual_tokens: int | None = None) -> SoftPrompt:
        """Initialise from the embeddings of ``text``'s tokens (repeated or cut to ``num_virtual_tokens``)."""
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"SoftPrompt.from_text: {text!r} tokenizes to nothing; pass a non-empty text.")
        size = num_virtual_tokens or len(ids)
        ids = (ids * (size // len(ids) + 1))[:size]
        table = model.get_input_embeddings().weight.detach()
        prompt = cls(size, table.shape[1])
        with torch.no_grad():
            prompt.embeddings.copy_(table[torch.tensor(ids)].float())
        return prompt

    def prefix(self, outer):
        return outer["embeddings"]

    @property
    def prefix_length(self) -> int:
        return self.embeddings.shape[0]

    def save_peft_adapter(self, directory, model, base_model_name=None):
        """Write a peft prompt-tuning adapter (``PeftModel.from_pretrained(base, directory)`` loads it), so the
        prompt works without hf_fg2u. Combine it with the LoRA adapter of the same run for the full effect."""
        from peft import PromptTuningConfig
        from safetensors.torch import save_file

        config = model.config
        peft_config = PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=self.embeddings.shape[0], token_dim=self.embeddings.shape[1],
            num_transformer_submodules=1, num_attention_heads=config.num_attention_heads,
            num_layers=config.num_hidden_layers, base_model_name_or_path=base_model_name,
        )  # fmt: skip
        directory = Path(directory)
        peft_config.save_pretrained(str(directory))
        save_file({"prompt_embeddings": self.embeddings.detach().contiguous().cpu()}, str(directory / WEIGHTS))
        return directory
