"""The final stage: a fresh LoRA adapter trained on fixed learned weights with WeightedLossTrainer."""

import math

import pytest
import torch
from peft import get_peft_model
from transformers import TrainingArguments

from hf_fg2u.lm.collator import PaddingCollator
from hf_fg2u.lm.losses import per_example_token_loss
from hf_fg2u.trainer.weighted_loss import WeightedLossTrainer, train_final_adapter
from tests.helpers.tiny import TOKENIZER, fact_data, lora, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def training_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "final"), max_steps=12, per_device_train_batch_size=16, learning_rate=5e-2,
        lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=4, use_cpu=True,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return TrainingArguments(**values)


def with_weights(dataset, corrupted_weight, clean_weight=1.0):
    return dataset.add_column(
        "weight", [corrupted_weight if flag else clean_weight for flag in dataset["is_corrupted"]]
    )


def lora_model(seed=0):
    """A LoRA-wrapped tiny model with lora_B moved off zero, so every LoRA matrix has a nonzero gradient."""
    model = get_peft_model(tiny_llama(seed), lora())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    return model


def loss_and_grads(trainer, rows):
    model = trainer.model
    model.train()
    model.zero_grad()
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_zero_weights_on_corrupted_rows_equal_training_on_the_clean_rows(tmp_path):
    _, data = fact_data()
    weighted = with_weights(data["train"], corrupted_weight=0.0)
    trainer = WeightedLossTrainer(lora_model(), training_args(tmp_path), train_dataset=weighted,
                                  processing_class=TOKENIZER)  # fmt: skip
    columns = ["input_ids", "attention_mask", "labels", "weight"]
    rows = [{k: row[k] for k in columns} for row in weighted]
    clean_rows = [row for row, flag in zip(rows, weighted["is_corrupted"], strict=True) if not flag]
    assert 0 < len(clean_rows) < len(rows)
    # remove_unused_columns keeps the weight column and drops the others the model does not take.
    assert set(next(iter(trainer.get_train_dataloader()))) == {"input_ids", "attention_mask", "labels", "weight"}

    assert trainer._keep_logits  # the loss reads only the logits that predict a label; the reference below all
    loss, grads = loss_and_grads(trainer, rows)
    # the clean rows alone, each at the mean weight: the plain mean over them
    clean_rows = [{**row, "weight": trainer.weight_normalizer} for row in clean_rows]
    clean_loss, clean_grads = loss_and_grads(trainer, clean_rows)
    with torch.no_grad():  # the reference: the plain mean of per-example losses over the clean rows
        batch = PaddingCollator(TOKENIZER.pad_token_id)(clean_rows)
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        reference = per_example_token_loss(logits, batch["labels"]).mean()
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)
    assert clean_loss.item() == pytest.approx(reference.item(), abs=1e-6)
    assert any(g.abs().max() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, clean_grads[name], rtol=1e-5, atol=1e-7)


def test_weighted_loss_is_the_weighted_mean_and_eval_without_weights_is_the_mean(tmp_path):
    _, data = fact_data(num_facts=4, copies=2)
    weights = [0.5, 2.0, 0.0, 1.0, 3.0, 0.25, 1.0, 0.25]
    weighted = data["train"].add_column("weight", weights)
    trainer = WeightedLossTrainer(lora_model(), training_args(tmp_path), train_dataset=weighted,
                                  processing_class=TOKENIZER)  # fmt: skip
    rows = [{k: row[k] for k in ("input_ids", "attention_mask", "labels", "weight")} for row in weighted]
    loss, _ = loss_and_grads(trainer, rows)
    with torch.no_grad():
        batch = PaddingCollator(TOKENIZER.pad_token_id)(rows)
        losses = per_example_token_loss(trainer.model(input_ids=batch["input_ids"]).logits, batch["labels"])
        w = torch.tensor(weights)
        assert loss.item() == pytest.approx(((w * losses).sum() / w.sum()).item(), abs=1e-6)
        trainer.model.eval()
        batch.pop("weight")
        assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(losses.mean().item(), abs=1e-6)


def trained_adapter(tmp_path, weighted, **overrides):
    """The LoRA matrices after 2 SGD steps of WeightedLossTrainer (no shuffling, no dropout: every run sees the
    same rows in the same order, whatever the batch size)."""
    args = training_args(tmp_path, max_steps=2, optim="sgd", learning_rate=0.5, **overrides)
    trainer = WeightedLossTrainer(lora_model(), args, train_dataset=weighted, processing_class=TOKENIZER)
    trainer._get_train_sampler = lambda *_: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}


def test_batch_one_with_accumulation_trains_on_the_objective_of_batch_eight(tmp_path):
    """The weights count at any batch size: one row per device batch with 8 accumulation steps gives the adapter of
    batch 8 (a per-batch Σ w_i normaliser made batch 1 ignore the weights: w·ℓ/w = ℓ), and that adapter is not the
    uniform one."""
    _, data = fact_data(num_facts=4, copies=4)
    weights = [0.0002 if flag else 1.0 + 0.25 * (i % 3) for i, flag in enumerate(data["train"]["is_corrupted"])]
    weighted = data["train"].add_column("weight", weights)
    batch8 = trained_adapter(tmp_path / "b8", weighted, per_device_train_batch_size=8)
    batch1 = trained_adapter(tmp_path / "b1", weighted, per_device_train_batch_size=1, gradient_accumulation_steps=8)
    uniform = trained_adapter(tmp_path / "u1", weighted.remove_columns("weight").add_column("weight", [1.0] * 16),
                              per_device_train_batch_size=1, gradient_accumulation_steps=8)  # fmt: skip
    for name, value in batch8.items():
        torch.testing.assert_close(batch1[name], value, rtol=1e-5, atol=1e-6, msg=name)
    gap = max(float((batch1[name] - uniform[name]).abs().max()) for name in batch1)
    start = dict(lora_model().named_parameters())
    moved = max(float((batch1[name] - start[name]).abs().max()) for name in batch1)
    assert gap > 0.05 * moved, (gap, moved)  # the weights change the adapter at batch 1 (old code: gap 6e-7)


def test_the_weight_normaliser_is_the_train_rows_mean_weight(tmp_path):
    _, data = fact_data(num_facts=4, copies=2)
    weighted = data["train"].add_column("weight", [0.5, 2.0, 0.0, 1.0, 3.0, 0.25, 1.0, 0.25])
    trainer = WeightedLossTrainer(lora_model(), training_args(tmp_path), train_dataset=weighted,
                                  processing_class=TOKENIZER)  # fmt: skip
    assert trainer.weight_normalizer == pytest.approx(1.0)
    row = {k: weighted[1][k] for k in ("input_ids", "attention_mask", "labels", "weight")}
    loss, _ = loss_and_grads(trainer, [row])  # one row: its weight over the mean weight times its loss
    plain, _ = loss_and_grads(trainer, [{**row, "weight": 1.0}])
    assert loss.item() == pytest.approx(2.0 * plain.item(), rel=1e-6)
    with pytest.raises(ValueError, match="weight_normalizer must be a positive number"):
        WeightedLossTrainer(lora_model(), training_args(tmp_path), train_dataset=weighted, weight_normalizer=0.0)


def test_missing_or_invalid_weight_column_is_an_error(tmp_path):
    _, data = fact_data(num_facts=4, copies=2)
    with pytest.raises(ValueError, match="no 'weight' column.*BilevelTrainer.export_weights"):
        WeightedLossTrainer(lora_model(), training_args(tmp_path), train_dataset=data["train"])
    with pytest.raises(ValueError, match="no 'score' column"):
        WeightedLossTrainer(lora_model(), training_args(tmp_path), train_dataset=with_weights(data["train"], 0.0),
                            weight_column="score")  # fmt: skip
    with pytest.raises(ValueError, match="non-negative"):
        WeightedLossTrainer(lora_model(), training_args(tmp_path), train_dataset=with_weights(data["train"], -1.0))
    trainer = WeightedLossTrainer(lora_model(), training_args(tmp_path), train_dataset=with_weights(data["train"], 0))
    trainer.model.train()
    batch = PaddingCollator(TOKENIZER.pad_token_id)([{"input_ids": [1, 5, 6], "labels": [1, 5, 6]}])
    with pytest.raises(ValueError, match="training batch has no 'weight' column.*export_weights"):
        trainer.compute_loss(trainer.model, batch)
    with pytest.raises(ValueError, match="already has a peft adapter"):
        train_final_adapter(lora_model(), with_weights(data["train"], 0.0), lora(), training_args(tmp_path))


def test_train_final_adapter_with_clean_weights_beats_weights_on_the_corrupted_rows(tmp_path):
    _, data = fact_data()
    eval_loss = {}
    for name, corrupted_weight, clean_weight in (("clean", 0.0, 1.0), ("corrupted", 1.0, 0.0)):
        weighted = with_weights(data["train"], corrupted_weight, clean_weight)
        trainer = train_final_adapter(tiny_llama(), weighted, lora(), training_args(tmp_path / name),
                                      processing_class=TOKENIZER, eval_dataset=data["meta"])  # fmt: skip
        assert trainer.state.global_step == 12
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
        eval_loss[name] = trainer.evaluate()["eval_loss"]
    untrained = WeightedLossTrainer(tiny_llama(), training_args(tmp_path / "base"), eval_dataset=data["meta"],
                                    processing_class=TOKENIZER).evaluate()["eval_loss"]  # fmt: skip
    # Seeds 0-2 gave clean 0.8-1.2, corrupted 3.0-3.2, untrained 4.9.
    assert eval_loss["clean"] < 0.5 * untrained, (eval_loss, untrained)
    assert eval_loss["clean"] + 1.0 < eval_loss["corrupted"], eval_loss


def test_fresh_adapters_start_alike_whatever_the_random_state_before(tmp_path):
    """Two fresh adapters trained with the same args are the same adapter, even when other work drew random numbers
    between them (the payoff trains one per selection in one process): peft initialises lora_A at random."""
    _, data = fact_data()
    weighted = with_weights(data["train"], 1.0, 1.0)
    trained = []
    for draws in (0, 1000):
        model = tiny_llama()
        torch.rand(draws)
        trainer = train_final_adapter(model, weighted, lora(), training_args(tmp_path / str(draws)))
        trained.append({k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k})
    assert trained[0].keys() == trained[1].keys() and trained[0]
    for name, value in trained[0].items():
        torch.testing.assert_close(value, trained[1][name], atol=0.0, rtol=0.0, msg=name)
