"""The GGUF path of the CLI's model loading: a model transformers dequantised from GGUF is still marked quantized,
which the Trainer refuses to train; ``dequantized_copy`` rebuilds it unmarked with the same weights."""

import pytest
import torch

from hf_fg2u.cli.models import dequantized_copy
from tests.helpers.tiny import tiny_llama


@pytest.mark.parametrize(("dtype", "expected"), [("auto", torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_dequantized_copy_drops_the_quantization_mark_and_keeps_every_weight(dtype, expected):
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves on the config
    copy = dequantized_copy(model, dtype)
    assert not hasattr(copy.config, "quantization_config")
    assert copy is not model and type(copy) is type(model)
    original = model.state_dict()
    assert copy.state_dict().keys() == original.keys()
    for name, tensor in copy.state_dict().items():
        assert tensor.dtype == expected
        torch.testing.assert_close(tensor, original[name].to(expected), rtol=0, atol=0)
    ids = torch.tensor([[1, 2, 3]])
    if expected == torch.float32:  # the same model: the same logits
        torch.testing.assert_close(copy(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_the_lora_adapter_is_saved_as_a_causal_lm_adapter(tmp_path):
    """adapter_config.json says task_type CAUSAL_LM, as TRL writes it (it was null)."""
    import json

    from hf_fg2u.cli.arguments import ModelArguments
    from hf_fg2u.cli.models import lora_config
    from hf_fg2u.trainer.model_setup import wrap_with_peft

    model = wrap_with_peft(tiny_llama(), lora_config(ModelArguments(lora_target_modules=["q_proj"])), seed=0)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
