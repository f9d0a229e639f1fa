"""FakeHub against the real client: uploads land byte for byte, and Trainer.push_to_hub works offline.

These pin the stand-in itself, so later push-to-hub tests can trust what `FakeHub.repos` says arrived.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import HfApi, hf_hub_download
from safetensors.torch import load, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from tests.helpers.fake_hub import TOKEN, assert_token_only_in_authorization


def test_upload_folder_lands_identical_bytes(hub, tmp_path):
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (folder / "meta.json").write_text(json.dumps({"steps": 3, "weights": [0.5, 1.5]}))
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, folder / "w.safetensors")
    local = {path.name: path.read_bytes() for path in folder.iterdir()}

    api = HfApi(endpoint=hub.url, token=TOKEN)
    assert api.whoami()["name"] == "tester"
    repo_url = api.create_repo("tester/upload", exist_ok=True)
    assert repo_url.repo_id == "tester/upload"
    api.create_repo("tester/upload", exist_ok=True)  # second call answers 409, which exist_ok accepts
    info = api.upload_folder(repo_id="tester/upload", folder_path=folder, commit_message="add three files")

    assert hub.repos["tester/upload"] == local
    assert [commit.summary for commit in hub.commits] == ["initial commit", "add three files"]
    assert info.oid == hub.commits[-1].oid and set(hub.commits[-1].added) == set(local)
    assert sorted(api.list_repo_files("tester/upload")) == sorted(local)
    downloaded = hf_hub_download("tester/upload", "w.safetensors", cache_dir=tmp_path / "cache", token=TOKEN)
    assert load(Path(downloaded).read_bytes())["w"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    # Re-uploading unchanged files makes no commit: the client compares the git oids preupload reports.
    api.upload_folder(repo_id="tester/upload", folder_path=folder)
    assert len(hub.commits) == 2
    assert_token_only_in_authorization(hub)
    assert hub.unknown == [] and hub.blocked == []


def tiny_trainer(output_dir, **hub_args) -> Trainer:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    args = TrainingArguments(
        output_dir=str(output_dir), push_to_hub=True, hub_model_id="tester/tiny", report_to=[], **hub_args
    )
    return Trainer(model=LlamaForCausalLM(config), args=args)


def test_trainer_push_to_hub_lands_model_files(hub, tmp_path):
    trainer = tiny_trainer(tmp_path / "out", hub_token=TOKEN)
    info = trainer.push_to_hub()

    files = hub.repos["tester/tiny"]
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert not any(path.startswith("checkpoint-") for path in files)
    assert hub.commits[-1].summary == "End of training" and info.oid == hub.commits[-1].oid
    config = json.loads(files["config.json"])
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("llama", 32, 1)
    pushed = load(files["model.safetensors"])
    state = trainer.model.state_dict()
    assert "model.embed_tokens.weight" in pushed
    assert all(torch.equal(tensor, state[name]) for name, tensor in pushed.items())
    assert files["README.md"].startswith(b"---\n") and b"# tiny" in files["README.md"]
    assert_token_only_in_authorization(hub)
    # Stock transformers pickles the whole TrainingArguments, hub_token included, into training_args.bin, which the
    # push uploads; every other file must be clean (see the HF_TOKEN test for a leak-free setup).
    assert {path for path, data in files.items() if TOKEN.encode() in data} <= {"training_args.bin"}
    assert hub.unknown == [] and hub.blocked == []


def test_trainer_push_with_env_token_commits_no_token(hub, tmp_path, monkeypatch):
    """With the token in HF_TOKEN instead of `hub_token`, no committed file carries it, training_args.bin included."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    tiny_trainer(tmp_path / "out").push_to_hub()

    files = hub.repos["tester/tiny"]
    assert {"config.json", "model.safetensors", "README.md", "training_args.bin"} <= set(files)
    assert [path for path, data in files.items() if TOKEN.encode() in data] == []
    assert_token_only_in_authorization(hub)
    assert hub.unknown == [] and hub.blocked == []
