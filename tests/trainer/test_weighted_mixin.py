"""WeightedLossMixin: per-row weights in a plain transformers.Trainer and in TRL's SFTTrainer, trained on the
objective of WeightedLossTrainer (hf-fg2u finetune) at any batch size and accumulation."""

import pytest
import torch
from transformers import Trainer

from hf_fg2u.lm.collator import PaddingCollator
from hf_fg2u.trainer.weighted_loss import WeightedLossTrainer
from hf_fg2u.trainer.weighted_mixin import WeightCollator, WeightedLossMixin, check_keeps_weights
from tests.helpers.tiny import TOKENIZER, fact_data
from tests.trainer.test_final_stage import lora_model, training_args

pytestmark = pytest.mark.usefixtures("one_thread")
trl = pytest.importorskip("trl")

# Two SGD steps from one adapter: the same rows in the same order differ only by float summation order.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


class WeightedTrainer(WeightedLossMixin, Trainer):
    pass


class WeightedSFTTrainer(WeightedLossMixin, trl.SFTTrainer):
    pass


def weighted_rows():
    _, data = fact_data(num_facts=4, copies=4)
    weights = [0.0002 if flag else 1.0 + 0.25 * (i % 3) for i, flag in enumerate(data["train"]["is_corrupted"])]
    return data["train"].add_column("weight", weights)


def arguments(tmp_path, sft=False, **overrides):
    """Two SGD steps (test_final_stage's arguments); for SFTConfig, its fields that differ from TrainingArguments'
    set as the finetune trainer runs."""
    values = dict(
        output_dir=str(tmp_path / "out"), max_steps=2, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    if not sft:
        return training_args(tmp_path, **values | overrides)
    defaults = {"bf16": False, "shuffle_dataset": False, "max_length": None}
    return trl.SFTConfig(**values | defaults | overrides)


def build(kind, tmp_path, rows, **overrides):
    """A trainer of ``kind`` on ``rows`` with one starting adapter and the rows in their order."""
    if kind == "sft":
        args = arguments(tmp_path, sft=True, **overrides)
        trainer = WeightedSFTTrainer(model=lora_model(), args=args, train_dataset=rows, processing_class=TOKENIZER)
    else:
        args = arguments(tmp_path, **overrides)
        cls = WeightedLossTrainer if kind == "finetune" else WeightedTrainer
        extra = {} if kind == "finetune" else {"data_collator": PaddingCollator.for_tokenizer(TOKENIZER)}
        trainer = cls(lora_model(), args, train_dataset=rows, processing_class=TOKENIZER, **extra)
    trainer._get_train_sampler = lambda *_: torch.utils.data.SequentialSampler(trainer.train_dataset)
    return trainer


def adapter(trainer):
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_mixin_trains_the_adapter_of_the_weighted_fine_tune(tmp_path, kind):
    """At batch 8 and at batch 1 × 8 accumulation steps, a Trainer or SFTTrainer with the mixin ends with
    WeightedLossTrainer's adapter (tolerance 1e-5 relative, 1e-6 absolute), and not with the uniform one."""
    rows = weighted_rows()
    reference = adapter(build("finetune", tmp_path / "ref", rows, per_device_train_batch_size=8))
    batch8 = adapter(build(kind, tmp_path / "b8", rows, per_device_train_batch_size=8))
    batch1 = adapter(build(kind, tmp_path / "b1", rows, per_device_train_batch_size=1, gradient_accumulation_steps=8))
    uniform_rows = rows.remove_columns("weight").add_column("weight", [1.0] * len(rows))
    uniform = adapter(build(kind, tmp_path / "u", uniform_rows, per_device_train_batch_size=8))
    for name, value in reference.items():
        torch.testing.assert_close(batch8[name], value, **TOLERANCE, msg=name)
        torch.testing.assert_close(batch1[name], value, **TOLERANCE, msg=name)
    start = {name: value.detach() for name, value in lora_model().named_parameters()}
    moved = max(float((reference[name] - start[name]).abs().max()) for name in reference)
    gap = max(float((uniform[name] - reference[name]).abs().max()) for name in reference)
    assert gap > 0.05 * moved, (gap, moved)


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_two_processes_of_four_rows_train_the_adapter_of_batch_eight(tmp_path):
    """DDP averages the ranks' gradients: 2 ranks × 4 rows per step end with WeightedLossTrainer's batch-8 adapter
    (tolerance as above)."""
    from safetensors.torch import load_file

    from tests.trainer.test_distributed import launch

    result = tmp_path / "ranks.safetensors"
    launch("weighted_mixin_run.py", 2, ["--output", str(tmp_path / "ranks"), "--result", str(result)])
    reference = adapter(build("finetune", tmp_path / "ref", weighted_rows(), per_device_train_batch_size=8))
    ranks = load_file(str(result))
    assert set(ranks) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(ranks[name], value, **TOLERANCE, msg=name)


def test_a_trainer_without_the_mixin_is_warned_that_it_drops_the_weights(tmp_path):
    rows = weighted_rows()
    plain = Trainer(lora_model(), arguments(tmp_path), train_dataset=rows)
    with pytest.warns(UserWarning, match="drops"):
        assert check_keeps_weights(plain) is False
    assert check_keeps_weights(build("trainer", tmp_path, rows)) is True
    assert check_keeps_weights(build("finetune", tmp_path, rows)) is True


def test_packing_and_missing_weights_are_refused(tmp_path):
    rows = weighted_rows()
    args = arguments(tmp_path, sft=True, padding_free=True)
    with pytest.raises(ValueError, match="padding_free=False"):
        WeightedSFTTrainer(model=lora_model(), args=args, train_dataset=rows, processing_class=TOKENIZER)
    trainer = build("trainer", tmp_path, rows)
    batch = trainer.data_collator([{k: v for k, v in row.items() if k != "weight"} for row in rows.select([0, 1])])
    trainer.model.train()
    with pytest.raises(ValueError, match="no 'weight' column"):
        trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))


def test_weight_collator_keeps_the_weights_out_of_the_inner_collator():
    seen = []
    collator = WeightCollator(lambda rows: seen.extend(rows) or {"n": len(rows)})
    batch = collator([{"input_ids": [1], "weight": 0.5}, {"input_ids": [2], "weight": 2}])
    assert all("weight" not in row for row in seen)
    assert batch["weight"].tolist() == [0.5, 2.0]
