"""Fixtures of the command-line tests."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_fg2u.lm.toy_data import make_char_tokenizer
from tests.helpers.tiny import CHAT_TEMPLATE


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny Llama and its character tokenizer (with a chat template) saved as a user's model folder."""
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = make_char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
