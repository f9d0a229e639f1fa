"""Issue 22 item 5: the same command with the same seed gives bit-identical weights, losses and adapter, in fresh
processes, on the user's path: a model folder loaded by from_pretrained, prompt/completion files, a fresh adapter."""

import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from hf_fg2u.lm.toy_data import make_char_tokenizer

RUN = "import sys; from hf_fg2u.cli import main; main.main(['train', *sys.argv[1:]])"
WORDS = ["good", "bad", "nice", "sad", "glad", "mad", "kind", "mean", "fine", "poor", "fair", "foul"]


def write_rows(path, count, offset, corrupted_every=0):
    rows = []
    for index in range(count):
        word, positive = WORDS[(index + offset) % len(WORDS)], (index + offset) % 2 == 0
        wrong = bool(corrupted_every) and index % corrupted_every == 0
        row = {"prompt": f"{word}{index}:", "completion": " yes" if positive != wrong else " no"}
        rows.append({**row, "is_corrupted": wrong} if corrupted_every else row)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def run_once(tmp_path, name, extra=()):
    """The real recipe's online mode, shrunk, in a fresh process."""
    model = tmp_path / "model"
    if not model.exists():
        tokenizer = make_char_tokenizer()
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(model)
        tokenizer.save_pretrained(model)
    files = [
        f"train={write_rows(tmp_path / 'train.jsonl', 32, 0, corrupted_every=3)}",
        f"meta={write_rows(tmp_path / 'meta.jsonl', 8, 5)}",
        f"eval={write_rows(tmp_path / 'eval.jsonl', 8, 7)}",
    ]
    out = tmp_path / name
    command = [
        sys.executable, "-c", RUN, "--recipe", "noisy_reweighting_real", "--model_name_or_path", str(model),
        "--data_files", *files, "--output_dir", str(out), "--max_steps", "3", "--inner_warmup_steps", "2",
        "--per_device_train_batch_size", "4", "--meta_batch_size", "4", "--max_length", "16",
        "--attn_implementation", "eager", "--plot", "false", *extra,
    ]  # fmt: skip
    subprocess.run(command, check=True, env={**os.environ, "PYTHONHASHSEED": "0"}, capture_output=True)
    weights = torch.tensor(Dataset.from_parquet(str(out / "weighted_dataset.parquet"))["weight"])
    results = json.loads((out / "results.json").read_text())
    results.pop("output_dir")
    return weights, results, load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "extra",
    [(), ("--balance_column", "completion"), ("--balance_column", "completion", "--keep_step_graphs", "false")],
    ids=["plain", "grouped", "grouped_recomputed"],
)
def test_the_same_command_twice_gives_identical_weights_losses_and_adapter(tmp_path, extra):
    """Grouped weights too: the answer-shift directions and their projection are deterministic as well."""
    (weights_a, results_a, adapter_a), (weights_b, results_b, adapter_b) = (run_once(tmp_path, n, extra) for n in "ab")
    assert len(weights_a) == 32 and weights_a.std() > 0  # the weights moved
    assert torch.equal(weights_a, weights_b)
    assert results_a == results_b  # the meta loss and the AUROC, as floats
    assert adapter_a.keys() == adapter_b.keys() and all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)
