"""The model card: huggingface_hub parses it and its metadata, and its quick-start snippet runs when pasted."""

import re

import pytest
import torch
import transformers
from huggingface_hub import ModelCard
from peft import PeftModel

from hf_fg2u import ExampleWeights
from hf_fg2u.hub.model_card import PLOT_NAME, build_model_card
from tests.helpers.tiny import fact_data, tiny_llama, trainer_for


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A one-step run on a base model saved to a folder (so the adapter names a loadable base), saved."""
    tmp_path = tmp_path_factory.mktemp("card")
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    _, data = fact_data(num_facts=8, copies=4)
    trainer = trainer_for(tmp_path, ExampleWeights(32), data, model=str(base), max_steps=1, num_directions=2)
    trainer.train()
    folder = tmp_path / "saved"
    trainer.save_model(str(folder))
    return trainer, folder, base


def test_card_parses_with_validated_metadata(saved_run, hub):
    trainer, folder, base = saved_run
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model is None and card.data.library_name == "peft"  # a local path is no Hub metadata
    assert card.data.pipeline_tag == "text-generation"
    assert {"hf_fg2u", "bilevel", "fg2u", "exampleweights"} <= set(card.data.tags)
    card.validate()  # the Hub's validate-yaml endpoint (here the stand-in) receives the parsed metadata
    assert any(request.path == "/api/validate-yaml" for request in hub.requests)
    text = card.text
    assert "2406.14095" in text and "weight_entropy" in text and f"transformers {transformers.__version__}" in text
    assert str(folder.resolve()) in text  # the quick start points at this folder (the repo id once pushed)


def test_card_quick_start_runs_when_pasted(saved_run):
    trainer, folder, _ = saved_run
    snippet = re.search(r"## Quick start\n\n```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    namespace = {}
    exec(compile(snippet, "README.md quick start", "exec"), namespace)  # noqa: S102 - the card's own snippet
    expected = trainer.outer.logits.detach()
    torch.testing.assert_close(namespace["run"].outer.logits.detach(), expected)
    torch.testing.assert_close(namespace["outer"].logits.detach(), expected)
    assert isinstance(namespace["run"].model, PeftModel) and isinstance(namespace["model"], PeftModel)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"](ids).logits, trainer.model(input_ids=ids).logits)


def test_card_shows_the_weights_plot_saved_beside_it(saved_run, tmp_path):
    trainer, _, _ = saved_run
    assert "![learned weights]" not in build_model_card(trainer, tmp_path).text
    (tmp_path / PLOT_NAME).write_bytes(b"\x89PNG")
    assert f"![learned weights]({PLOT_NAME})" in build_model_card(trainer, tmp_path).text


def test_card_metadata_metrics_and_options_are_the_runs_own(saved_run, tmp_path):
    """Issue 23 item 7: Hub names only in metadata, datasets and license when known, result metrics only (no
    timings, FLOPs or the loss copy), and only the options of the method that ran."""
    trainer, _, base = saved_run
    assert trainer.args.method == "fg2u"
    card = build_model_card(trainer, tmp_path, dataset="my-org/noisy", license="apache-2.0")
    assert card.data.datasets == ["my-org/noisy"] and card.data.license == "apache-2.0"
    assert build_model_card(trainer, tmp_path, dataset=str(base)).data.datasets is None
    trainer.model_name = "HuggingFaceTB/SmolLM2-135M"
    try:
        assert build_model_card(trainer, tmp_path).data.base_model == "HuggingFaceTB/SmolLM2-135M"
    finally:
        trainer.model_name = str(base)
    metrics = card.text[card.text.index("## Final metrics") : card.text.index("## Bilevel configuration")]
    assert "| meta_loss |" in metrics and "| train_loss |" in metrics
    for noise in ("runtime", "flos", "per_second", "| loss |", "learning_rate"):
        assert noise not in metrics, noise
    config = card.text[card.text.index("## Bilevel configuration") : card.text.index("## Versions")]
    assert '"num_directions"' in config and '"directions"' in config  # fg2u's own options
    for other in ('"zo_epsilon"', '"cg_damping"', '"truncation"'):
        assert other not in config, other
