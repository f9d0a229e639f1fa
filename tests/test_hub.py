"""BilevelTrainer.push_to_hub through the Trainer's own path, against a stand-in Hub on 127.0.0.1."""

import io
import json

import torch
from safetensors.torch import load

from hf_fg2u import ExampleWeights

from .test_fake_hub import assert_token_only_in_authorization
from .test_trainer import fact_data, trainer_for

TOKEN = "hf_fake"


def test_push_to_hub_lands_adapter_outer_variables_and_card_without_the_token(hub, tmp_path, capsys):
    _, data = fact_data(num_facts=8, copies=4)
    outer = ExampleWeights(32)
    trainer = trainer_for(
        tmp_path, outer, data, max_steps=2, num_directions=2, push_to_hub=True, hub_model_id="tester/weights",
        hub_token=TOKEN, hub_strategy="end",
    )  # fmt: skip
    trainer.train()
    trainer.push_to_hub()

    files = hub.repos["tester/weights"]
    expected = {"adapter_config.json", "adapter_model.safetensors", "outer_config.json", "outer_model.safetensors"}
    assert expected | {"README.md"} <= set(files)
    assert json.loads(files["outer_config.json"])["type"] == "ExampleWeights"
    torch.testing.assert_close(load(files["outer_model.safetensors"])["logits"], outer.logits.detach())
    assert load(files["adapter_model.safetensors"])  # peft's adapter weights arrived
    card = files["README.md"].decode()
    assert "2406.14095" in card and "hf_fg2u" in card and "ExampleWeights" in card
    assert [path for path, content in files.items() if TOKEN.encode() in content] == []
    assert_token_only_in_authorization(hub)
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err
    assert TOKEN not in json.dumps(trainer.state.log_history)
    assert isinstance(io.BytesIO(files["training_args.bin"]), io.BytesIO)
