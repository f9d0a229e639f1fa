"""BilevelTrainer.push_to_hub through the Trainer's own path, against a stand-in Hub on 127.0.0.1."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from hf_fg2u import ExampleWeights
from hf_fg2u.hub.load import load_run
from hf_fg2u.hub.model_card import WEIGHTED_DATASET_FILE
from hf_fg2u.outer import OuterModule
from tests.helpers.fake_hub import TOKEN, assert_token_only_in_authorization
from tests.helpers.tiny import TOKENIZER, fact_data, tiny_llama, trainer_for


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
    pushed_args = torch.load(io.BytesIO(files["training_args.bin"]), weights_only=False)  # the Trainer's pickle
    assert pushed_args.hub_model_id == "tester/weights" and pushed_args.hub_token != TOKEN


def test_outer_module_pushes_and_loads_by_repo_id_and_revision(hub, tmp_path):
    outer = ExampleWeights(5)
    with torch.no_grad():
        outer.logits.copy_(torch.arange(5.0))
    outer.push_to_hub("tester/outer", token=TOKEN)
    commit = hub.commits[-1].oid
    assert set(hub.repos["tester/outer"]) >= {"outer_config.json", "outer_model.safetensors"}
    assert b"pickle" not in hub.repos["tester/outer"]["outer_config.json"]
    for revision in (None, commit):
        loaded = OuterModule.from_pretrained("tester/outer", revision=revision, cache_dir=tmp_path / "cache")
        assert isinstance(loaded, ExampleWeights) and loaded.logits.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hub repo"):
        OuterModule.from_pretrained("tester/missing", cache_dir=tmp_path / "cache")


FRESH_PROCESS = """
import json, sys, torch, datasets
from huggingface_hub import hf_hub_download
from peft import PeftModel
from transformers import AutoModelForCausalLM
from hf_fg2u.hub.load import load_run
from hf_fg2u.outer import OuterModule
run = load_run("tester/run")
plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), "tester/run")
ids = torch.tensor([[1, 2, 3, 4]])
weighted = datasets.load_dataset("parquet", data_files=hf_hub_download("tester/run", sys.argv[2]))["train"]
print(json.dumps({
    "run_logits": run.model(ids).logits.sum().item(), "plain_logits": plain(ids).logits.sum().item(),
    "outer": OuterModule.from_pretrained("tester/run").logits.tolist(), "load_run_outer": run.outer.logits.tolist(),
    "weights": list(weighted["weight"]),
    "token_ids": run.tokenizer("kqzt=42")["input_ids"],
}))
"""


def test_pushed_run_loads_back_by_repo_id_in_a_fresh_process(hub, tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    _, data = fact_data(num_facts=8, copies=4)
    outer = ExampleWeights(32)
    trainer = trainer_for(
        tmp_path, outer, data, model=str(base), max_steps=2, num_directions=2, push_to_hub=True,
        hub_model_id="tester/run", hub_token=TOKEN, hub_strategy="end",
    )  # fmt: skip
    trainer.train()
    commits = len(hub.commits)
    trainer.push_to_hub()
    assert len(hub.commits) == commits + 1  # adapter, outer variables, card and weighted dataset: one commit
    assert WEIGHTED_DATASET_FILE in hub.commits[-1].added and "outer_model.safetensors" in hub.commits[-1].added
    card = hub.repos["tester/run"]["README.md"].decode()
    assert 'load_run("tester/run")' in card and f"`{WEIGHTED_DATASET_FILE}`" in card  # quick start names the repo
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected_logits = trainer.model(input_ids=ids).logits.sum().item()
    expected_weights = list(trainer.export_weights()["weight"])

    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "home"),
           "HF_TOKEN": TOKEN, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(base), WEIGHTED_DATASET_FILE], env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["run_logits"] == pytest.approx(expected_logits, rel=1e-5)
    assert loaded["plain_logits"] == pytest.approx(expected_logits, rel=1e-5)
    assert loaded["outer"] == loaded["load_run_outer"] == pytest.approx(outer.logits.tolist())
    assert loaded["weights"] == pytest.approx(expected_weights)
    assert loaded["token_ids"] == TOKENIZER("kqzt=42")["input_ids"]  # the tokenizer came down with the run


def test_load_run_from_a_folder_without_a_base_model_name_says_what_to_pass(tmp_path):
    _, data = fact_data(num_facts=8, copies=4)
    trainer = trainer_for(tmp_path, ExampleWeights(32), data, max_steps=1, num_directions=2)
    trainer.train()
    trainer.save_model()
    folder = trainer.args.output_dir
    with pytest.raises(ValueError, match=r"names no base model.*base_model="):
        load_run(folder)
    run = load_run(folder, base_model=tiny_llama())
    assert run.outer.logits.tolist() == pytest.approx(trainer.outer.logits.tolist())
    assert run.tokenizer("kqzt=42")["input_ids"] == TOKENIZER("kqzt=42")["input_ids"]  # the run's own tokenizer
    assert run.tokenizer.pad_token_id == TOKENIZER.pad_token_id
    torch.testing.assert_close(
        run.model(torch.tensor([[1, 2, 3]])).logits, trainer.model(torch.tensor([[1, 2, 3]])).logits
    )


def test_model_config_options_reach_from_pretrained_and_a_gguf_base_is_recorded(tmp_path, monkeypatch):
    """Issue 23 item 5: --dtype, --model_revision, --trust_remote_code and --model_init_kwargs reach
    from_pretrained; a run on a GGUF base records the file and load_run passes it back."""
    from hf_fg2u.cli import arguments, models
    from hf_fg2u.hub import load as hub_module

    folder = tmp_path / "base"
    tiny_llama().save_pretrained(folder)
    TOKENIZER.save_pretrained(folder)
    script, training, model_args = arguments.parse_args([
        "--model_name_or_path", str(folder), "--dtype", "bfloat16", "--model_revision", "main",
        "--trust_remote_code", "true", "--model_init_kwargs", '{"attn_implementation": "sdpa"}',
    ])  # fmt: skip
    model, tokenizer = models.load_model_and_tokenizer(model_args, 0, training.model_init_kwargs)
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "sdpa"
    assert models.from_pretrained_kwargs(model_args, training.model_init_kwargs) == {
        "revision": "main", "trust_remote_code": True, "attn_implementation": "sdpa", "dtype": torch.bfloat16,
    }  # fmt: skip
    assert models.load_model_and_tokenizer(arguments.ModelArguments(model_name_or_path=str(folder)), 0)[0].dtype == (
        torch.float32
    )

    _, data = fact_data(num_facts=4, copies=4)
    base = tiny_llama()
    base.config.gguf_file = "model.Q4_1.gguf"  # what models.load_model_and_tokenizer sets on a GGUF base
    trainer = trainer_for(tmp_path, ExampleWeights(16), data, model=base, max_steps=1, num_directions=2)
    trainer.train()
    trainer.save_model()
    run = Path(trainer.args.output_dir)
    assert json.loads((run / "base_model.json").read_text())["gguf_file"] == "model.Q4_1.gguf"
    seen = {}

    def fake_from_pretrained(name, **kwargs):
        seen.update(kwargs)
        return tiny_llama()

    monkeypatch.setattr(hub_module.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    adapter = json.loads((run / "adapter_config.json").read_text())  # as a GGUF folder would name it
    (run / "adapter_config.json").write_text(json.dumps(adapter | {"base_model_name_or_path": str(folder)}))
    load_run(run)
    assert seen == {"gguf_file": "model.Q4_1.gguf"}


def test_load_run_of_a_full_model_names_its_loader(tmp_path):
    """A full fine-tune (hf-fg2u finetune --full_finetune true) holds no adapter: the error says what loads it."""
    tiny_llama().save_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match=r"holds no adapter .* AutoModelForCausalLM.from_pretrained\(folder\)"):
        load_run(tmp_path / "full")
