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
