"""A GGUF file as a base model (issue 39 item 3): loaded the plain transformers way, it is dequantised but marked
quantised, which the Trainer refuses; ``trainable_base`` unmarks it, both trainers accept it, and what they save
loads back with ``load_run`` and with plain peft."""

import json
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, get_peft_model
from transformers import AutoModelForCausalLM, TrainingArguments

import hf_fg2u
from hf_fg2u import ExampleWeights, train_final_adapter
from hf_fg2u.trainer.model_setup import trainable_base
from tests.helpers.tiny import TOKENIZER, fact_data, lora, tiny_llama, trainer_for, write_tiny_gguf

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[1, 5, 9, 2, 7]])


@pytest.fixture
def gguf_folder(tmp_path):
    pytest.importorskip("gguf")
    folder = tmp_path / "base"
    folder.mkdir()
    write_tiny_gguf(folder)
    return folder


def load_gguf(folder):
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny.gguf")


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_trainable_base_drops_the_gguf_mark_on_the_same_weights(gguf_folder):
    loaded = load_gguf(gguf_folder)
    assert loaded.config.quantization_config.quant_method == "gguf"  # what the Trainer refuses
    model = trainable_base(loaded)
    assert not hasattr(model.config, "quantization_config") and model.config.gguf_file == "tiny.gguf"
    assert hasattr(loaded.config, "quantization_config")  # the model given is left as it was
    shared = dict(loaded.named_parameters())
    assert all(parameter is shared[name] for name, parameter in model.named_parameters())  # no copy of a weight
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, as in the file
    torch.testing.assert_close(logits(model), logits(loaded), rtol=0, atol=0)
    plain = tiny_llama()
    assert trainable_base(plain) is plain


def test_trainable_base_works_without_the_gguf_package_on_a_marked_config():
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "model.Q4_1.gguf"}
    fresh = trainable_base(model)
    assert not hasattr(fresh.config, "quantization_config") and fresh.config.gguf_file == "model.Q4_1.gguf"
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)


def test_a_peft_adapter_on_a_marked_gguf_base_is_refused_with_the_fix(tmp_path, gguf_folder):
    _, data = fact_data(num_facts=4, copies=4)
    wrapped = get_peft_model(load_gguf(gguf_folder), lora())
    with pytest.raises(ValueError, match="Pass the base model itself with peft_config"):
        trainer_for(tmp_path, ExampleWeights(len(data["train"])), data, model=wrapped)


def assert_loads_back(folder: Path, trained, gguf_folder):
    """``load_run`` and plain peft (given the recorded GGUF file) both rebuild ``trained``'s logits exactly: the
    base is dequantised from the same file, and the adapter is saved in float32."""
    record = json.loads((folder / "base_model.json").read_text())
    assert record == {"base_model_name_or_path": str(gguf_folder), "gguf_file": "tiny.gguf"}
    expected = logits(trained)
    assert (expected - logits(load_gguf(gguf_folder))).abs().max() > 1e-3  # the adapter moved: not a trivial match
    torch.testing.assert_close(logits(hf_fg2u.load_run(folder).model), expected, rtol=0, atol=1e-6)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(folder, gguf_file=record["gguf_file"])
    torch.testing.assert_close(logits(peft_model), expected, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Every one of the:UserWarning")  # the toy splits share rows
@pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")  # peft: the GGUF folder has no config
def test_a_gguf_base_trains_both_stages_and_each_saved_adapter_loads_back(tmp_path, gguf_folder):
    splits, data = fact_data()
    trainer = trainer_for(tmp_path, ExampleWeights(len(data["train"])), data, model=load_gguf(gguf_folder),
                          max_steps=2, num_directions=2)  # fmt: skip
    trainer.train()
    trainer.save_model()
    run = Path(trainer.args.output_dir)
    assert hf_fg2u.load_run(run).outer.config == trainer.outer.config
    assert f'from_pretrained("{run}", gguf_file="tiny.gguf")' in (run / "README.md").read_text()  # the card's peft line
    assert_loads_back(run, trainer.model, gguf_folder)

    weighted = splits["train"].add_column("weight", torch.linspace(0.5, 1.5, len(splits["train"])).tolist())
    args = TrainingArguments(
        output_dir=str(tmp_path / "final"), max_steps=2, per_device_train_batch_size=8, learning_rate=5e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    final = train_final_adapter(load_gguf(gguf_folder), weighted, lora(), args, processing_class=TOKENIZER)
    assert final.state.global_step == 2
    final.save_model()
    assert hf_fg2u.load_run(args.output_dir).outer is None  # an adapter alone: no outer variables
    assert_loads_back(Path(args.output_dir), final.model, gguf_folder)
