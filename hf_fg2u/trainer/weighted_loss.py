"""The final stage: train a fresh LoRA adapter on the learned weights as a plain weighted loss (no bilevel).

Bilevel meta-tuning ends with weights (``BilevelTrainer.export_weights()``) and an adapter trained along the way
under weights that kept changing. To end with a model, train a new adapter once more with the final weights
fixed: loss = Σ_i (w_i / w̄) ℓ_i / B over each batch of B rows, ℓ_i the mean next-token loss of example i and w̄
the train dataset's mean weight, a normaliser fixed for the run (see :func:`hf_fg2u.lm.losses.weighted_row_loss`).
"""

from __future__ import annotations

import math
import warnings

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_fg2u.lm.collator import PaddingCollator
from hf_fg2u.lm.data_checks import check_model_columns
from hf_fg2u.lm.formats import prepare_split
from hf_fg2u.trainer.model_setup import trainable_base, wrap_with_peft, write_base_model_file
from hf_fg2u.trainer.weighted_mixin import WeightedLossMixin, check_weight_column


class WeightedLossTrainer(WeightedLossMixin, Trainer):
    """A ``Trainer`` whose loss is the per-example-weighted mean Σ_i (w_i / w̄) ℓ_i / B of a causal LM: the weighted
    fine-tune of ``hf-fg2u finetune`` and the final stage (:class:`WeightedLossMixin` on a plain ``Trainer``).

    Args beyond ``Trainer``'s: ``weight_column`` and ``weight_normalizer`` (see :class:`WeightedLossMixin`).
    Evaluation batches without weights get the plain mean of the per-example losses. The default collator is
    :class:`PaddingCollator`. A model loaded from a GGUF file is made trainable
    (:func:`~hf_fg2u.trainer.model_setup.trainable_base`) and the save records it in ``base_model.json``.
    """

    _tag_names = ["hf_fg2u", "weighted-loss", "data-reweighting"]

    def __init__(
        self,
        model=None,
        args: TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        weight_column: str = "weight",
        weight_normalizer: float | None = None,
        **kwargs,
    ):
        if train_dataset is not None and hasattr(train_dataset, "column_names"):
            check_model_columns(train_dataset, "train")
            mean_weight = check_weight_column(train_dataset, weight_column)  # before the Trainer is built
            weight_normalizer = mean_weight if weight_normalizer is None else weight_normalizer  # read once
        model = trainable_base(model)
        if data_collator is None:
            data_collator = PaddingCollator.for_tokenizer(processing_class, model)
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, weight_column=weight_column,
            weight_normalizer=weight_normalizer, **kwargs,
        )  # fmt: skip
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """The Trainer's save, and beside an adapter how to load its base where the name is not enough (a GGUF
        file); a full model's own config.json loads it."""
        super()._save(output_dir, state_dict=state_dict)
        model = self.accelerator.unwrap_model(self.model)
        if self.args.should_save and hasattr(model, "peft_config"):
            write_base_model_file(output_dir or self.args.output_dir, model)

    def unweighted_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The plain mean of the per-example losses (an evaluation batch without weights)."""
        losses, outputs = self.row_losses(model, inputs)
        loss = losses.mean()
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation reports the (weighted) loss only; logits of a causal LM are not gathered."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def train_final_adapter(
    model,
    weighted_dataset,
    peft_config,
    args: TrainingArguments,
    processing_class=None,
    eval_dataset=None,
    weight_column: str = "weight",
    max_length: int | None = 512,
    truncation_mode: str = "keep_start",
) -> WeightedLossTrainer:
    """Wrap ``model`` (a model, or a name/path for ``AutoModelForCausalLM``) in a fresh ``peft_config`` adapter,
    train it on ``weighted_dataset`` with :class:`WeightedLossTrainer`, and return the trainer (its ``model`` is
    the trained adapter; ``trainer.save_model()`` writes it). Raw rows (text, prompt/completion, messages) are
    tokenized with ``processing_class`` as the bilevel run tokenizes them, rows longer than ``max_length`` cut or
    dropped by ``truncation_mode`` (see ``hf_fg2u.lm.formats``)."""
    if isinstance(model, str):
        model = AutoModelForCausalLM.from_pretrained(model)
    if hasattr(model, "peft_config"):
        raise ValueError(
            "The model already has a peft adapter; the final stage trains a fresh one. Pass the base model "
            "(e.g. peft_model.get_base_model() of a fresh load, or the model name)."
        )
    model = trainable_base(model)  # before the adapter: a GGUF-loaded base is unmarked, not wrapped
    if peft_config is None:
        raise ValueError("peft_config is required: the final stage trains a fresh adapter (e.g. a LoraConfig).")

    def prepare(split, role):
        return prepare_split(split, role, processing_class, max_length, truncation_mode=truncation_mode)

    weighted_dataset = prepare(weighted_dataset, "train")
    eval_dataset = (
        {name: prepare(split, name) for name, split in eval_dataset.items()}
        if isinstance(eval_dataset, dict)
        else prepare(eval_dataset, "eval")
    )
    model = wrap_with_peft(model, peft_config, args.seed)
    trainer = WeightedLossTrainer(
        model=model, args=args, data_collator=PaddingCollator.for_tokenizer(processing_class, model),
        train_dataset=weighted_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
        weight_column=weight_column,
    )  # fmt: skip
    result = trainer.train()
    if not math.isfinite(result.training_loss):
        warnings.warn(
            f"The final adapter's training loss is {result.training_loss}; lower args.learning_rate "
            f"({args.learning_rate}) or check the weights.",
            stacklevel=2,
        )
    return trainer
