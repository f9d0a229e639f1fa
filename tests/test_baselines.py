"""The simple data filters and the fair comparison of selections, on a tiny Llama with the character tokenizer."""

import copy
import dataclasses

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import TrainingArguments

from hf_fg2u.baselines import (
    adam_direction,
    auroc_by_kind,
    base_model_losses,
    compare_selections,
    gradient_alignment_scores,
    keep_top,
    last_token_losses,
    plot_heldout_losses,
    plot_weights_by_kind,
    row_gradients,
    warm_up,
)
from hf_fg2u.lm.collator import PaddingCollator
from hf_fg2u.lm.formats import tokenize_dataset
from hf_fg2u.lm.losses import per_example_token_loss
from tests.helpers.tiny import TOKENIZER, lora, tiny_llama

COLLATOR = PaddingCollator(pad_token_id=TOKENIZER.pad_token_id)


pytestmark = pytest.mark.usefixtures("one_thread")


def rows(texts):
    return tokenize_dataset(Dataset.from_dict({"text": texts}), TOKENIZER, max_length=None, role="test")


def test_keep_top_keeps_the_highest_scores():
    assert keep_top(torch.tensor([0.3, -1.0, 2.0, 0.5]), 0.5).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert keep_top(torch.tensor([0.3, -1.0]), 0.1).tolist() == [1.0, 0.0]  # at least one row
    with pytest.raises(ValueError, match=r"keep_fraction=0 must lie in \(0, 1\]"):
        keep_top(torch.tensor([1.0]), 0)


def test_auroc_by_kind_scores_each_kind_against_the_clean_rows_only():
    kinds = ["clean", "clean", "garbled", "garbled", "other", "other"]
    suspicion = [0.1, 0.5, 0.9, 0.8, 0.3, 0.0]  # garbled above every clean row; other: one above, one below both
    assert auroc_by_kind(suspicion, kinds) == {"garbled": 1.0, "other": 0.25}


def test_base_model_losses_are_each_rows_own_loss_despite_padding():
    model, data = tiny_llama(), rows(["a short one", "a much longer row of text here", "mid size row"])
    losses = base_model_losses(model, data, COLLATOR, batch_size=3)
    alone = [
        per_example_token_loss(model(input_ids=torch.tensor([r["input_ids"]])).logits, torch.tensor([r["labels"]]))
        for r in data
    ]
    torch.testing.assert_close(losses, torch.cat(alone).detach(), atol=1e-5, rtol=1e-5)


def test_last_token_losses_split_each_rows_loss_at_its_end_of_text_token_despite_padding():
    model, data = tiny_llama(), rows(["a short one", "a much longer row of text here", "mid size row"])
    found = last_token_losses(model, data, COLLATOR, batch_size=3)
    for i, row in enumerate(data):
        ids = torch.tensor([row["input_ids"]])
        assert row["input_ids"][-1] == TOKENIZER.eos_token_id
        token_nll = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none")
        assert found["tokens"][i].item() == len(row["input_ids"]) - 1
        assert found["last"][i].item() == pytest.approx(token_nll[-1].item(), abs=1e-5)
        assert found["rest"][i].item() == pytest.approx(token_nll[:-1].mean().item(), abs=1e-5)
    row_means = (found["last"] + found["rest"] * (found["tokens"] - 1)) / found["tokens"]
    torch.testing.assert_close(row_means, base_model_losses(model, data, COLLATOR), atol=1e-5, rtol=1e-5)


def test_gradient_alignment_is_one_for_the_meta_row_itself_and_lower_for_other_text():
    model = get_peft_model(tiny_llama(), lora())
    meta = rows(["the cat sat on the mat"])
    train = rows(["the cat sat on the mat", "zq xv kj wq zz xx qq"])
    scores = gradient_alignment_scores(model, train, meta, COLLATOR)
    assert scores[0].item() == pytest.approx(1.0, abs=1e-5)
    assert scores[1].item() < 0.9


def test_row_gradients_of_a_padded_batch_are_each_rows_own_gradient():
    """vmapped over a padded batch = one row at a time through autograd (float32 rounding), losses included."""
    model = get_peft_model(tiny_llama(), lora())
    with torch.no_grad():  # lora_B off zero, so lora_A has a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    data = rows(["a short one", "a much longer row of text here", "mid size row", "x"])
    params = [p for p in model.parameters() if p.requires_grad]
    found = list(row_gradients(model, data, COLLATOR, batch_size=3))  # a full batch and a last one of one row
    assert len(found) == len(data)
    for (gradient, loss), row in zip(found, data, strict=True):
        ids = torch.tensor([row["input_ids"]])
        alone = per_example_token_loss(model(input_ids=ids).logits, torch.tensor([row["labels"]])).sum()
        expected = torch.cat([g.flatten() for g in torch.autograd.grad(alone, params)])
        assert expected.abs().max() > 1e-3  # a gradient worth comparing
        torch.testing.assert_close(gradient, expected, atol=1e-5, rtol=1e-4)
        assert loss.item() == pytest.approx(alone.item(), abs=1e-5)


def test_warm_up_trains_the_adapter_on_the_rows_and_zero_steps_leave_it_as_it_was():
    model, data = get_peft_model(tiny_llama(), lora()), rows(["the cat sat on the mat", "a dog ran in the park"] * 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    warm_up(model, data, COLLATOR, steps=0, learning_rate=1e-2, batch_size=2)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    loss_before = base_model_losses(model, data, COLLATOR).mean()
    warm_up(model, data, COLLATOR, steps=10, learning_rate=1e-2, batch_size=2)
    assert not model.training  # left in eval mode for the scores that follow
    assert base_model_losses(model, data, COLLATOR).mean() < loss_before - 0.1
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B left its initial zeros
    with pytest.raises(ValueError, match=r"steps >= 0 and batch_size >= 1, got steps=-1"):
        warm_up(model, data, COLLATOR, steps=-1, learning_rate=1e-2, batch_size=2)


def test_compare_selections_trains_on_the_kept_rows_and_reports_held_out_loss(tmp_path):
    heldout = ["the cat sat on the mat"] * 4
    train = rows(heldout + ["zq xv kj wq zz xx qq"] * 4)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4, learning_rate=5e-2,
        lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    base = tiny_llama()
    selections = {
        "held-out text only": torch.tensor([1.0] * 4 + [0.0] * 4),
        "other text only": torch.tensor([0.0] * 4 + [1.0] * 4),
        "other text again": torch.tensor([0.0] * 4 + [2.0] * 4),  # a constant weight changes nothing
    }
    losses = compare_selections(lambda: copy.deepcopy(base), train, rows(heldout), selections, lora(), args)
    assert list(losses) == list(selections)
    assert losses["held-out text only"] < losses["other text only"] - 0.5
    assert losses["other text again"] == pytest.approx(losses["other text only"], rel=1e-4)
    with pytest.raises(ValueError, match=r"Selection 'short' has 2 weights for 8 rows"):
        compare_selections(lambda: base, train, rows(heldout), {"short": torch.ones(2)}, lora(), args)


def test_early_stopping_reads_the_held_out_loss_at_the_best_step_of_the_stop_split(tmp_path):
    """Training on one text lowers its loss at every step while another text's loss falls, rises and falls again
    (4.33, 3.75, 3.86, 3.79 after 2..8 steps here). Stopped on the first text, the read-out is the last step's;
    stopped on the other text itself, it is that text's lowest. Each is checked against fresh adapters trained for
    2, 4, 6 and 8 steps without stopping: the same seed gives them the same start, so the same trajectory."""
    text, other = ["the cat sat on the mat"] * 4, ["zq xv kj wq zz xx qq"] * 4
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, eval_steps=2, per_device_train_batch_size=4, learning_rate=5e-2,
        lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    base, selections = tiny_llama(), {"all": torch.ones(4)}
    make = lambda: copy.deepcopy(base)  # noqa: E731
    on_text = compare_selections(make, rows(text), rows(other), selections, lora(), args, stop_on=rows(text))
    on_other = compare_selections(make, rows(text), rows(other), selections, lora(), args, stop_on=rows(other))
    after = [
        compare_selections(make, rows(text), rows(other), selections, lora(), dataclasses.replace(args, max_steps=k))
        for k in (2, 4, 6, 8)
    ]
    after = [loss["all"] for loss in after]
    assert min(after) < after[-1] - 0.02  # the other text's best step is not the last
    assert on_text["all"] == pytest.approx(after[-1], abs=1e-5)
    assert on_other["all"] == pytest.approx(min(after), abs=1e-5)


def test_plots_are_written(tmp_path):
    kinds = ["clean", "clean", "garbled"]
    assert plot_weights_by_kind([1.4, 1.2, 0.4], kinds, tmp_path / "w.png").stat().st_size > 1000
    assert plot_heldout_losses({"uniform": 2.0, "learned": 1.5}, tmp_path / "l.png").stat().st_size > 1000


def test_adam_direction_is_the_step_torch_adam_would_take():
    """LESS's feature of a row: Adam's next update for the row's gradient, from the warm-up's moments. Checked
    against torch.optim.Adam taking that step (update = -lr · direction, no weight decay)."""
    model, data = get_peft_model(tiny_llama(), lora()), rows(["the cat sat on the mat", "a dog ran in the park"] * 2)
    optimizer = warm_up(model, data, COLLATOR, steps=3, learning_rate=1e-2, batch_size=2)
    params = [p for p in model.parameters() if p.requires_grad]
    gradient = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
    direction = adam_direction(gradient, optimizer, params)
    before = torch.cat([p.detach().flatten() for p in params])
    offset = 0
    for p in params:
        p.grad = gradient[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    optimizer.step()
    after = torch.cat([p.detach().flatten() for p in params])
    torch.testing.assert_close(before - after, 1e-2 * direction, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="no Adam state"):
        adam_direction(gradient, torch.optim.Adam(params), params)
