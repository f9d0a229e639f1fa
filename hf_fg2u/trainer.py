"""``BilevelTrainer``: a ``transformers.Trainer`` whose step is one outer step of bilevel meta-tuning.

One Trainer step draws ``unroll_steps`` inner batches (one train batch of ``unroll_steps × batch`` examples,
split) and one meta batch, estimates the hypergradient of the meta loss after the unrolled inner training, and
hands it to the Trainer's own optimizer and scheduler as the outer variables' gradient. The inner θ (LoRA) and
its optimizer state carry over between outer steps, back to their start per ``inner_reset_every`` /
``inner_reset_patience`` (:mod:`hf_fg2u.inner_resets`). Logging, callbacks, evaluation,
checkpoints and ``push_to_hub`` are the Trainer's, extended with the bilevel state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging

from .checkpointing import (
    INNER_STATES,
    PARTIAL_PREFIX,
    STATE_CONFIG_NAME,
    check_resume_compatible,
    compatibility_fields,
    load_bilevel_state,
    publish_checkpoint,
    publish_files,
    read_json,
    rotate_checkpoints_by_step,
    save_bilevel_state,
    verify_checkpoint,
)
from .config import BilevelConfig
from .data_checks import prepare_dataset, prepare_datasets
from .distributed import ProcessPolicy
from .formats import MODEL_INPUT_COLUMNS
from .functional import load_parameters, select_inner_parameters, trainable_parameters, unwrap_model
from .hypergrad import METHOD_SPECS, NonFiniteHypergradientError, estimate_hypergradient, method_from_config
from .hypergrad.unroll import clone_tree, run_inner_loop
from .inner_resets import ResetPolicy
from .method_choice import available_megabytes, choose_method
from .model_card import WEIGHTED_DATASET_FILE, build_model_card, write_model_card
from .optim import make_inner_optimizer
from .outer import OuterModule
from .problem import losses_to_problem, make_lm_losses
from .run_folder import RunLock, check_output_dir

logger = logging.get_logger(__name__)


@dataclass
class BilevelDataCollator:
    """Pads ``input_ids``/``attention_mask``/``labels`` (labels with -100) to the longest example and stacks
    the other numeric columns (example ids, domain indices) as tensors."""

    pad_token_id: int = 0

    @property
    def fill(self) -> dict[str, int]:
        """The padding value of each padded column."""
        return {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": -100}

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        fill = self.fill
        batch = {}
        for key in features[0]:
            values = [f[key] for f in features]
            if key in fill:
                batch[key] = torch.tensor([list(v) + [fill[key]] * (length - len(v)) for v in values])
            elif isinstance(values[0], int | float | bool) or torch.is_tensor(values[0]):
                batch[key] = torch.as_tensor(values)
        if "attention_mask" not in batch:
            lengths = torch.tensor([len(f["input_ids"]) for f in features])
            batch["attention_mask"] = (torch.arange(length) < lengths[:, None]).long()
        return batch


class BilevelTrainer(Trainer):
    """Learns outer variables (data weights, a soft prompt) by hypergradients through LoRA fine-tuning.

    Args beyond ``Trainer``'s: ``meta_dataset`` (the outer objective's data), ``outer`` (an
    :class:`~hf_fg2u.outer.OuterModule`), ``peft_config`` (wraps ``model`` in an adapter). ``model`` may be a
    name or path, loaded with ``AutoModelForCausalLM.from_pretrained(model, **args.model_init_kwargs)``.
    Datasets may be raw, in TRL's formats (tokenized here with ``processing_class``, see ``hf_fg2u.formats``),
    or tokenized; every split is checked at construction (``hf_fg2u.data_checks``).
    """

    _tag_names = ["hf_fg2u", "bilevel", "fg2u", "data-reweighting"]
    _name = "Bilevel (FG)²U"
    _paper = {
        "title": "Memory-Efficient Gradient Unrolling for Large-Scale Bi-level Optimization",
        "id": "2406.14095",
        "citation": (
            "@inproceedings{shen2024fg2u,\n  title     = {Memory-Efficient Gradient Unrolling for Large-Scale "
            "Bi-level Optimization},\n  author    = {Shen, Qianli and Wang, Yezhen and Yang, Zhouhao and Li, "
            "Xiang and Wang, Haonan and Zhang, Yang and Scarlett, Jonathan and Zhu, Zhanxing and Kawaguchi, "
            "Kenji},\n  booktitle = {Advances in Neural Information Processing Systems},\n  year      = {2024}\n}"
        ),
    }

    def __init__(
        self,
        model,
        args: BilevelConfig | None = None,
        data_collator=None,
        train_dataset=None,
        meta_dataset=None,
        eval_dataset=None,
        outer: OuterModule | None = None,
        processing_class=None,
        peft_config=None,
        callbacks=None,
        optimizers=(None, None),
        **kwargs,
    ):
        args = args or BilevelConfig(output_dir="bilevel-output")
        if not isinstance(args, BilevelConfig):
            raise TypeError(f"args must be a BilevelConfig, got {type(args).__name__}.")
        check_output_dir(args.output_dir, args.overwrite_output_dir)
        if outer is None or not isinstance(outer, OuterModule):
            raise TypeError(
                "outer must be an OuterModule (ExampleWeights, DomainWeights, WeightNet or SoftPrompt), got "
                f"{type(outer).__name__}."
            )
        if isinstance(model, str):
            self.model_name = model
            model = AutoModelForCausalLM.from_pretrained(model, **(args.model_init_kwargs or {}))
        else:
            self.model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        if peft_config is not None:
            if hasattr(model, "peft_config"):
                raise ValueError(
                    "The model already has a peft adapter and peft_config was given too. Drop peft_config to train "
                    "the existing adapter (load it with is_trainable=True), or pass the base model."
                )
            model = wrap_with_peft(model, peft_config, args.seed)
        if args.inner_parameters:
            select_inner_parameters(model, args.inner_parameters)
        trainable_parameters(model)  # raises a clear error when nothing is trainable
        if meta_dataset is None or len(meta_dataset) == 0:
            raise ValueError(
                "meta_dataset is missing or empty: the outer objective needs held-out examples (e.g. clean or "
                "target-domain data), tokenized like the train dataset."
            )
        if train_dataset is None or len(train_dataset) == 0:
            raise ValueError("train_dataset is missing or empty: the inner loop needs training examples.")
        self.outer = outer
        self.user_train_dataset = train_dataset  # as given: what export_weights() returns, with a weight column
        train_dataset, meta_dataset, eval_dataset = prepare_datasets(
            train_dataset, meta_dataset, eval_dataset, outer, processing_class, args,
            vocab_size=model.get_input_embeddings().weight.shape[0],
        )  # fmt: skip
        self.meta_dataset = meta_dataset.select_columns(
            [c for c in MODEL_INPUT_COLUMNS if c in meta_dataset.column_names]
        )
        if data_collator is None:
            pad = getattr(processing_class, "pad_token_id", None)
            data_collator = BilevelDataCollator(pad_token_id=pad if pad is not None else 0)
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
            **kwargs,
        )  # fmt: skip
        self.outer.to(self.args.device)
        self.processes = ProcessPolicy(self.accelerator, self.args)
        self._inner_params: dict[str, torch.Tensor] | None = None
        self._inner_state: dict | None = None
        self._initial_params: dict[str, torch.Tensor] | None = None  # θ_start: resets return here
        self._initial_state: dict | None = None  # s_start (None: a fresh inner optimizer state)
        self._resets = ResetPolicy(self.args.inner_reset_every, self.args.inner_reset_patience)
        self._problems: dict[bool, tuple] = {}
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._outer_before: tuple[dict, dict] | None = None  # φ and the outer optimizer state before the update
        self._outer_buffers: list | None = None  # where they are copied, reused every step
        self._save_error: Exception | None = None  # rank 0's checkpoint write failure, reported to every rank
        self._steps_run, self._steps_skipped, self._meta_loss_sum = 0, 0, 0.0
        self._staging: str | None = None
        self.add_callback(_OuterUpdateGuard(self))
        self.method_choice = self._resolve_auto_method() if self.args.method == "auto" else None
        # Built once from the config; every outer step then passes data only.
        self._methods = {name: method_from_config(self.args, name) for name in self._method_names()}
        self.processes.check_direction_shares(self._methods)
        self._inner_optimizer = make_inner_optimizer(
            self.args.inner_optimizer, self.args.inner_lr, **self.args.inner_optimizer_kwargs()
        )
        for method in self._methods:
            self._problem(self.model, method)  # preflight now, not deep inside the first step
        self._warn_if_truncation_hides_rows()
        self.add_callback(LogLastStep())
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    def _method_names(self) -> list[str]:
        return [name for name in (self.args.method, self.args.phase1_method) if name is not None]

    def _resolve_auto_method(self):
        """method='auto': rgu when its stored trajectory fits the memory budget, else fg2u; logged once, and
        written into the config so checkpoints and the model card say what ran. Every process plans with the
        least memory any of them has, so all pick the same method and checkpoint_every (hence run the same
        collectives)."""
        args = self.args
        available, source = available_megabytes(args.memory_budget_mb, args.device)
        if self.processes.world > 1:
            available, source = self.processes.minimum(available), f"{source}; the least over processes"
        choice = choose_method(
            trainable_parameters(self.model), args.inner_optimizer, args.unroll_steps, (available, source),
            directions_per_pass=args.directions_per_pass or args.num_directions,
            offload_trajectory=args.offload_trajectory,
        )  # fmt: skip
        if self.args.process_index == 0:  # every rank makes the same choice; one says so
            logger.warning(choice.message())
        self.args.method = choice.method
        if choice.method == "rgu":
            self.args.checkpoint_every = choice.checkpoint_every
        return choice

    def _warn_if_truncation_hides_rows(self) -> None:
        """trgu differentiates only the last K steps: outer variables tied to rows (per-example weights) of the
        earlier steps get exactly zero hypergradient, every outer step."""
        args = self.args
        per_row = type(self.outer).active_coordinates is not OuterModule.active_coordinates
        hidden_steps = args.unroll_steps - args.truncation
        partial = [name for name in self._methods if not METHOD_SPECS[name].reaches_every_step]
        if partial and per_row and hidden_steps > 0:
            warnings.warn(
                f"method 'trgu' with truncation={args.truncation} < unroll_steps={args.unroll_steps}: the "
                f"{type(self.outer).__name__} of rows in the first {hidden_steps} inner steps of every unroll get a "
                "zero hypergradient. Set truncation=unroll_steps, or use 'fg2u' or 'hessian_free', which reach "
                "every step.",
                stacklevel=3,
            )

    # -- Trainer hooks ------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """The Trainer's train, holding the output_dir's run lock, after reading every file of the checkpoint
        to resume from; a run whose every outer step was skipped raises instead of ending as a success."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) if os.path.isdir(
                self.args.output_dir) else None  # fmt: skip
            if resume_from_checkpoint is None:
                raise ValueError(f"No checkpoint-N folder to resume from in output_dir={self.args.output_dir!r}.")
        if resume_from_checkpoint:
            verify_checkpoint(Path(resume_from_checkpoint))
        elif not self.args.overwrite_output_dir and (Path(self.args.output_dir) / STATE_CONFIG_NAME).is_file():
            raise ValueError(
                f"output_dir={self.args.output_dir!r} holds a finished run; a new run would replace its model and "
                "results and mix them with its checkpoints. Resume it (resume_from_checkpoint, or "
                "--resume_from_checkpoint true for the latest checkpoint), pass overwrite_output_dir=True to replace "
                "it, or choose another output_dir."
            )
        self._steps_run, self._steps_skipped, self._meta_loss_sum = 0, 0, 0.0
        with contextlib.ExitStack() as held:
            refused = None
            if self.args.should_save:
                try:
                    held.enter_context(RunLock(self.args.output_dir))
                except Exception as error:  # another live run holds the lock, or the folder cannot be written
                    refused = error
            self.processes.agree(refused, f"The run lock of output_dir={self.args.output_dir!r}")
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        if self._steps_skipped and not self._steps_run:
            raise RuntimeError(
                f"All {self._steps_skipped} outer steps were skipped for non-finite values (see the warnings for "
                "the cause); nothing was learned. Lower inner_lr or learning_rate, or check the data."
            )
        return output

    def create_optimizer(self, model=None):
        """The Trainer's optimizer (``args.optim``, ``learning_rate``...) over the outer variables φ."""
        return super().create_optimizer(model=self.outer)

    def get_train_dataloader(self):
        """Batches of ``unroll_steps × batch`` examples: one Trainer step is one unroll. An epoch's last, incomplete
        batch is dropped: it would silently unroll fewer inner steps (evaluation keeps its last batch)."""
        drop_last, self.args.dataloader_drop_last = self.args.dataloader_drop_last, True  # read by _get_dataloader
        try:
            return self._get_dataloader(
                dataset=self.train_dataset, description="Training", sampler_fn=self._get_train_sampler,
                is_training=True, batch_size=self._train_batch_size * self.args.unroll_steps,
            )  # fmt: skip
        finally:
            self.args.dataloader_drop_last = drop_last

    def _set_signature_columns_if_needed(self):
        # Keep the columns the outer module reads (example ids, domains) through remove_unused_columns.
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in self.outer.required_columns if c not in self._signature_columns]

    def _clip_grad_norm(self, model):
        # The gradients this Trainer produces belong to the outer variables, not to the model.
        return self.accelerator.clip_grad_norm_(self.outer.parameters(), self.args.max_grad_norm)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One outer step: unroll, estimate the hypergradient, write it to φ.grad. Returns the meta loss."""
        step = self.state.global_step
        method = self.args.method_at(step)
        inputs = self._prepare_inputs(inputs)
        inner_batches = self._inner_batches(inputs)
        meta_batch = self._prepare_inputs(self.meta_batch(step))
        self._ensure_inner_state(model, step)
        if self.processes.resync_inner_state(model, self._inner_params, self._inner_state, self.args.device):
            self._metrics["theta_resyncs"].append(1.0)
        inner_loss, outer_loss, _ = self._problem(model, method)
        start = time.perf_counter()
        failure = None
        try:
            result = estimate_hypergradient(
                inner_loss, outer_loss, self._inner_params, self.outer.outer_dict(), inner_batches, meta_batch,
                method=self._methods[method], inner_optimizer=self._inner_optimizer, inner_lr=self.args.inner_lr,
                seed=self.args.seed * 1_000_003 + step, optimizer_state=self._inner_state,
                active_coordinates=self.processes.active_coordinates(self.outer.active_coordinates(inner_batches)),
                direction_slice=self.processes.direction_share(method),
                reduce_gradients=self.processes.inner_gradient_reducer(),
            )  # fmt: skip
        except NonFiniteHypergradientError as error:
            failure = error
        # One process's non-finite share skips (or stops) the step on every process, before the share sum.
        if self.processes.any_process(failure is not None):
            if failure is None:
                failure = NonFiniteHypergradientError("another process's share of the hypergradient is not finite")
            if self.args.nonfinite_policy == "stop":
                raise failure
            return self._skip_step(step, str(failure))
        seconds = time.perf_counter() - start
        summed = self.processes.sum_direction_shares(result.grad, method)
        grads = self._add_regularizer(summed)
        if self.args.normalize_hypergradient:
            grads = _unit_norm(grads)
        bad = [name for name, grad in grads.items() if not torch.isfinite(grad).all()]
        if bad:
            return self._skip_step(
                step, f"the gradient of {bad} is not finite after adding weight_regularization="
                f"{self.args.weight_regularization!r} × {self.args.weight_regularization_coef:g}; lower the "
                "coefficient."
            )  # fmt: skip
        self._outer_before = self._snapshot_outer()
        for name, parameter in self.outer.named_parameters():
            parameter.grad = grads[name].to(parameter.dtype)
        self._inner_params, self._inner_state = result.params, result.optimizer_state
        load_parameters(model, result.params)
        self._resets.observe(result.outer_loss)
        self._record(result, method, step, seconds, _norm(summed))
        return torch.tensor(result.outer_loss, device=self.args.device)

    def _snapshot_outer(self) -> tuple[dict, dict | None]:
        """φ and the outer optimizer state as they are before the update, copied into buffers kept from the last
        step (no allocation, no deep copy of the state per step; new buffers only when the layout changes)."""
        live = (dict(self.outer.state_dict()), self.optimizer.state_dict() if self.optimizer is not None else None)
        leaves, spec = tree_flatten(live)
        buffers = self._outer_buffers
        same = buffers is not None and len(buffers) == len(leaves) and all(
            torch.is_tensor(b) == torch.is_tensor(v) and (not torch.is_tensor(v) or (
                b.shape == v.shape and b.dtype == v.dtype and b.device == v.device))
            for b, v in zip(buffers, leaves, strict=True)
        )  # fmt: skip
        if same:
            buffers = [b.copy_(v) if torch.is_tensor(v) else v for b, v in zip(buffers, leaves, strict=True)]
        else:
            buffers = [v.detach().clone() if torch.is_tensor(v) else v for v in leaves]
        self._outer_buffers = buffers
        return tree_unflatten(buffers, spec)

    def _skip_step(self, step: int, reason: str) -> torch.Tensor:
        """Skip the outer update of ``step`` (nonfinite_policy='skip') or raise ('stop')."""
        if self.args.nonfinite_policy == "stop":
            raise NonFiniteHypergradientError(f"Outer step {step}: {reason}")
        warnings.warn(f"Outer step {step} skipped (nonfinite_policy='skip'): {reason}", stacklevel=3)
        for parameter in self.outer.parameters():
            parameter.grad = None
        self._metrics["skipped_steps"].append(1.0)
        self._steps_skipped += 1
        return torch.tensor(float("nan"), device=self.args.device)

    def _check_outer_update(self) -> None:
        """After the outer optimizer's step: a non-finite φ (an overflowing learning rate or moment) is put back
        as it was before the step, with the optimizer state, and the step counts as skipped; a finite one is
        projected onto its feasible set (``OuterModule.project_``)."""
        before, self._outer_before = self._outer_before, None
        if before is None:
            return
        bad = [name for name, value in self.outer.state_dict().items() if not torch.isfinite(value).all()]
        if not bad:
            self.outer.project_()
            self._steps_run += 1
            self._meta_loss_sum += self._metrics["meta_loss"][-1]
            return
        self.outer.load_state_dict(before[0])
        if before[1] is not None:
            self.optimizer.load_state_dict(before[1])
            self._outer_buffers = None  # the optimizer's state may now be these buffers: take new ones next step
        self._metrics["meta_loss"].pop()  # that step's update did not happen
        self._skip_step(
            self.state.global_step, f"the outer update made {bad} non-finite (learning_rate="
            f"{self.args.learning_rate:g}, optim={self.args.optim!r}); φ was restored. Lower learning_rate."
        )  # fmt: skip

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The meta loss of a batch under the current θ and φ (soft prompt included); used for evaluation."""
        params = {n: p for n, p in unwrap_model(model).named_parameters() if p.requires_grad}
        _, outer_loss, _ = self._problem(model, self.args.method)
        loss = outer_loss(params, self.outer.outer_dict(), inputs)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the bilevel metrics gathered since the last log (means) and the outer variables' summary."""
        if "loss" in logs:
            # The Trainer counts a skipped step's loss as 0 or as a past mean: report the steps that ran only.
            logs.pop("loss")
            for key, values in self._metrics.items():
                if values:
                    logs[key] = sum(values) if key in ("skipped_steps", "theta_resyncs") else sum(values) / len(values)
            if "meta_loss" in logs:
                logs["loss"] = logs["meta_loss"]
            logs.update(self.outer.summary())
            self._metrics.clear()
        if "train_loss" in logs:  # the run's summary: totals over every outer step of this train()
            logs["train_loss"] = self._meta_loss_sum / self._steps_run if self._steps_run else math.nan
            logs["skipped_steps"] = float(self._steps_skipped)
            logs["outer_steps_run"] = float(self._steps_run)
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """The Trainer's save (the peft adapter, tokenizer, args), then the outer variables, the inner
        optimizer state and a model card: a folder ready for the Hub and for exact resumption. A save outside a
        checkpoint is written into ``_partial-save/`` first and its files then moved in one by one (each
        replaced atomically), so a failure while writing leaves the previous save whole. Within a checkpoint a
        failure is kept for :meth:`_save_checkpoint`, which reports it to every process."""
        output_dir = Path(output_dir or self.args.output_dir)
        if self._staging is not None:  # a checkpoint: its whole folder is staged already
            try:
                self._write_save(output_dir, state_dict, final=Path(self._staging).parent / output_dir.name)
            except Exception as error:
                self._save_error = error
            return
        if not self.args.should_save:
            super()._save(str(output_dir), state_dict=state_dict)  # collectives of a sharded model, if any
            return
        staging = output_dir / f"{PARTIAL_PREFIX}save"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self._write_save(staging, state_dict, final=output_dir)
            publish_files(staging, output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _write_save(self, output_dir: Path, state_dict, final: Path) -> None:
        """Write the save into ``output_dir``; its model card names ``final``, where it will be moved."""
        args = self.args
        # The Trainer pickles its args, hub_token included, into a file that push_to_hub uploads: it gets the
        # redacted copy, so no unredacted training_args.bin is ever written.
        self.args = args.redacted()
        try:
            super()._save(str(output_dir), state_dict=state_dict)
        finally:
            self.args = args
        if not self.args.should_save:
            return
        self.outer.save_pretrained(output_dir)
        base_model = unwrap_model(self.model).get_base_model() if hasattr(self.model, "get_base_model") else None
        self.outer.save_peft_adapter(output_dir / "prompt_adapter", base_model or self.model, self.model_name)
        description = {
            **compatibility_fields(self.outer, self.args, self.model, self.train_dataset, self.meta_dataset),
            "outer_config": self.outer.config,
            "bilevel_config": self.args.bilevel_fields(),
        }
        description["reset_policy"] = self._resets.state_dict()
        states = (self._initial_params, self._initial_state, self._inner_state)
        save_bilevel_state(output_dir, dict(zip(INNER_STATES, states, strict=True)), description)
        write_base_model_file(output_dir, base_model or self.model, self.model_name)
        build_model_card(self, final).save(output_dir / "README.md")  # replaces peft's generic card

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into ``_partial-checkpoint-N/`` and renamed to ``checkpoint-N``
        when complete: a kill or a full disk mid-save leaves no ``checkpoint-N`` for a resume to pick. Whether
        every process wrote its part is agreed on before the rename, so a failure on one process (rank 0's
        write) raises on all instead of leaving the others waiting."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging = os.path.join(run_dir, f"{PARTIAL_PREFIX}{name}")
        error = None
        try:
            super()._save_checkpoint(model, trial)  # its rotation sees only the staging folder
        except Exception as caught:
            error = caught
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(self._staging, ignore_errors=True)
            raise
        finally:
            staging, self._staging = self._staging, None
        error, self._save_error = error or self._save_error, None
        try:
            self.processes.agree(error, f"Saving {name}")  # also the barrier: every rank's files (RNG states) are in
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.args.should_save:
            final = publish_checkpoint(Path(staging) / name, Path(run_dir) / name)
            if self.state.best_global_step == self.state.global_step:
                self.state.best_model_checkpoint = str(final)
            rotate_checkpoints_by_step(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)

    def _get_output_dir(self, trial) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        directory = Path(resume_from_checkpoint)
        mine = compatibility_fields(self.outer, self.args, self.model, self.train_dataset, self.meta_dataset)
        check_resume_compatible(directory, mine)  # before the adapter's load, which fails on other shapes
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = OuterModule.from_pretrained(directory)
        if loaded.config != self.outer.config:
            raise ValueError(
                f"Checkpoint {directory} holds outer variables {type(loaded).__name__}({loaded.config}) but this "
                f"trainer has {type(self.outer).__name__}({self.outer.config}). Resume with the same outer module."
            )
        self.outer.load_state_dict(loaded.state_dict())
        device = self.args.device
        inner = trainable_parameters(model or self.model)
        self._inner_params = {k: v.detach().clone().to(device) for k, v in inner.items()}
        states = load_bilevel_state(directory, device)
        self._initial_params, self._initial_state, self._inner_state = (states[k] for k in INNER_STATES)
        self._resets.load_state_dict(read_json(directory / STATE_CONFIG_NAME).get("reset_policy", {}))

    def create_model_card(self, model_name: str | None = None, **kwargs) -> None:
        """Write README.md: method, config, final metrics, versions, citation and tags (never a token)."""
        if not self.is_world_process_zero():
            return
        write_model_card(self, Path(self.args.output_dir), model_name=model_name, **kwargs)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token=None,
        revision: str | None = None,
        **kwargs,
    ):
        """The Trainer's push (adapter, outer variables, card: one commit), with the train dataset and its learned
        weights as ``weighted_dataset.parquet`` in that commit when the outer variables weight rows. The upload is
        one commit, so a failure leaves nothing partial on the Hub; it is re-raised saying where the run is saved
        and that calling push_to_hub again is enough."""
        if (
            self.args.should_save
            and self.train_dataset is not None
            and type(self.outer).row_weights is not OuterModule.row_weights
        ):
            self.export_weights().to_parquet(str(Path(self.args.output_dir) / WEIGHTED_DATASET_FILE))
        try:
            return super().push_to_hub(commit_message, blocking, token, revision, **kwargs)
        except Exception as error:  # HTTP, connection and timeout errors of huggingface_hub and its client
            raise RuntimeError(
                f"push_to_hub to {self.hub_model_id or self.args.hub_model_id!r} failed ({type(error).__name__}: "
                f"{error}). The run is saved in {self.args.output_dir}; the Hub holds no partial upload. Call "
                "trainer.push_to_hub() again once the Hub is reachable."
            ) from error

    # -- bilevel pieces -------------------------------------------------------------------------------------------
    def meta_batch(self, step: int) -> dict:
        """The meta batch of outer step ``step``: a seeded draw without replacement, so resuming at any step
        draws the same batches without saving a data position."""
        generator = torch.Generator().manual_seed(self.args.seed * 7_919 + step)
        size = min(self.args.meta_batch_size, len(self.meta_dataset))
        rows = torch.randperm(len(self.meta_dataset), generator=generator)[:size].tolist()
        return self.data_collator([self.meta_dataset[i] for i in rows])

    def export_weights(self, dataset=None, column: str = "weight"):
        """``dataset`` (default: the train dataset as given to the trainer) with every column it has except
        token ids, plus a ``weight`` column from the learned outer variables (mean 1), ready for
        ``push_to_hub``. A raw dataset is tokenized like the train dataset; rows without an id column are
        numbered 0..n-1 in order."""
        if dataset is None:
            dataset, tokenized = self.user_train_dataset, self.train_dataset
        else:
            vocab_size = unwrap_model(self.model).get_input_embeddings().weight.shape[0]
            tokenized = prepare_dataset(dataset, "exported", self.outer, self.processing_class, self.args, vocab_size)
        weights = self.dataset_weights(tokenized)
        keep = [c for c in dataset.column_names if c not in MODEL_INPUT_COLUMNS]
        return dataset.select_columns(keep).add_column(column, weights.tolist())

    @torch.no_grad()
    def dataset_weights(self, dataset) -> torch.Tensor:
        """Per-example weight of every row of ``dataset`` (mean 1), from the current θ and φ."""
        model = unwrap_model(self.model)
        outer = self.outer.outer_dict()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        columns = [c for c in (*MODEL_INPUT_COLUMNS, *self.outer.required_columns) if c in dataset.column_names]
        view, chunks = dataset.select_columns(columns), []
        _, _, per_example_losses = self._problem(model, self.args.method)
        for start in range(0, len(view), 64):
            rows = [view[i] for i in range(start, min(start + 64, len(view)))]
            batch = self._prepare_inputs(self.data_collator(rows))
            if self.outer.reads_losses:
                losses = per_example_losses(params, outer, batch)
            else:  # weights of ids or domains: no forward pass over the dataset
                losses = torch.zeros(len(rows), device=batch["input_ids"].device)
            weights = self.outer.row_weights(outer, batch, losses)
            chunks.append(torch.ones_like(losses) if weights is None else weights)
        weights = torch.cat(chunks).double().cpu()
        return (weights / weights.mean()).float()

    def _inner_batches(self, inputs: dict) -> list[dict]:
        """One unroll's rows split into its inner batches (all ranks' rows when ranks share the unroll)."""
        size = self._train_batch_size
        if self.processes.shares_unroll:  # ranks split directions: same unroll
            fill = getattr(self.data_collator, "fill", BilevelDataCollator().fill)
            inputs, size = self.processes.gather_unroll(inputs, fill), size * self.processes.world
        return [{k: v[i : i + size] for k, v in inputs.items()} for i in range(0, len(inputs["input_ids"]), size)]

    def _problem(self, model, method: str):
        """(inner_loss, outer_loss, per-example losses) for ``method``, built (and preflighted) once per kind."""
        second_order = self._methods[method].second_order
        if second_order not in self._problems:
            losses = make_lm_losses(model, self.outer.prefix, second_order=second_order)
            self._problems[second_order] = (*losses_to_problem(losses, self.outer.example_weights), losses)
        return self._problems[second_order]

    def _ensure_inner_state(self, model, step: int) -> None:
        if self._inner_params is None:
            self._inner_params = trainable_parameters(model)
        if self._initial_params is None:
            if self.args.inner_warmup_steps:
                self._inner_params, self._inner_state = self._warm_up(model)
                load_parameters(model, self._inner_params)
            self._initial_params = clone_tree(self._inner_params)
            self._initial_state = clone_tree(self._inner_state)
        if self._resets.due():
            logger.info(f"Outer step {step}: θ and the inner optimizer state go back to their start.")
            self._inner_params = clone_tree(self._initial_params)
            self._inner_state = clone_tree(self._initial_state)
            load_parameters(model, self._inner_params)
            self._resets.restarted()
            self._metrics["inner_resets"].append(1.0)

    def _warm_up(self, model) -> tuple[dict, dict]:
        """θ and the inner optimizer state after ``inner_warmup_steps`` plain inner steps (nothing differentiated)
        on train batches at the initial φ: where the outer steps start, and where resets return.

        The batches are the *last* ones of the first epoch's order: the first outer steps score rows the warm-up
        has not just fitted (a row θ was trained on looks helpful to its own hypergradient)."""
        steps, seen = self.args.inner_warmup_steps, 0
        batches = deque(maxlen=steps)
        while seen < steps:
            before = seen
            for unroll in self.get_train_dataloader():
                inner = self._inner_batches(self._prepare_inputs(unroll))
                batches.extend(inner)
                seen += len(inner)
            if seen == before:
                raise ValueError("inner_warmup_steps needs train batches, but the train dataloader is empty.")
        batches = list(batches)
        params = trainable_parameters(model)
        inner_loss = self._problem(model, self.args.method_at(0))[0]
        seeds = [self.args.seed * 1_000_003 - 1 - i for i in range(steps)]  # disjoint from the outer steps' seeds
        params, state, losses = run_inner_loop(
            inner_loss, self._inner_optimizer, params, self._inner_optimizer.init(params), self.outer.outer_dict(),
            batches[:steps], seeds, reduce_gradients=self.processes.inner_gradient_reducer(),
        )  # fmt: skip
        logger.info(f"Inner warm-up: {steps} steps, inner loss {losses[0]:.4f} -> {losses[-1]:.4f}.")
        self._metrics["warmup_inner_loss"].append(losses[-1])
        return params, state

    def _add_regularizer(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        coef, kind = self.args.weight_regularization_coef, self.args.weight_regularization
        if kind == "none" or coef == 0.0:
            return grads
        outer = {k: v.clone().requires_grad_(True) for k, v in self.outer.outer_dict().items()}
        with torch.enable_grad():
            penalty = self.outer.regularizer(outer, kind)
            if penalty is None:
                return grads
            extra = torch.autograd.grad(coef * penalty, list(outer.values()), allow_unused=True)
        self._metrics["weight_penalty"].append(float(penalty.detach()))
        return {k: g if e is None else g + e for (k, g), e in zip(grads.items(), extra, strict=True)}

    def _record(self, result, method: str, step: int, seconds: float, grad_norm: float) -> None:
        metrics = self._metrics
        metrics["meta_loss"].append(result.outer_loss)
        metrics["inner_loss"].append(sum(result.inner_losses) / len(result.inner_losses))
        metrics["hypergrad_norm"].append(grad_norm)  # of the whole estimate, not of this process's share
        if self.args.phase1_method is not None:  # a two-phase schedule: which phase this step was in
            metrics["phase"].append(1.0 if method != self.args.method or step < self.args.phase1_steps else 2.0)
        metrics["outer_step_seconds"].append(seconds)
        if result.num_directions:
            metrics["directions_per_second"].append(result.num_directions / max(seconds, 1e-9))


class _OuterUpdateGuard(TrainerCallback):
    """Checks φ right after the outer optimizer's step (before the scheduler, logging and saving see it)."""

    def __init__(self, trainer: BilevelTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._check_outer_update()


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


def _unit_norm(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The outer gradient divided by its global norm (unchanged where it is zero)."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    return grads if norm == 0 else {k: (g / norm).to(g.dtype) for k, g in grads.items()}


BASE_MODEL_FILE = "base_model.json"  # how load_run loads the base when the name alone is not enough (GGUF)


def write_base_model_file(output_dir: Path, model, name: str | None) -> None:
    """Record the GGUF file a base model was loaded from (``config.gguf_file``, set by the recipe's loader): the
    adapter config names only the folder, from which ``from_pretrained`` alone cannot load it."""
    gguf_file = getattr(getattr(model, "config", None), "gguf_file", None)
    if gguf_file:
        record = {"base_model_name_or_path": name, "gguf_file": gguf_file}
        (Path(output_dir) / BASE_MODEL_FILE).write_text(json.dumps(record, indent=2))


def wrap_with_peft(model, peft_config, seed: int | None = None):
    """Wrap ``model`` in a peft adapter; a config that matches no module is an error that names the modules. With
    ``seed`` the adapter's random initial weights come from it, not from whatever ran before in the process: the
    same command gives the same run, and fresh adapters compared start alike."""
    from peft import get_peft_model

    if seed is not None:
        set_seed(seed)
    try:
        with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return get_peft_model(model, peft_config)
    except ValueError as error:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
        raise ValueError(
            f"The peft config targets nothing in this model ({error}). target_modules="
            f"{getattr(peft_config, 'target_modules', None)}; module names here include {names[:20]}."
        ) from error


class LogLastStep(TrainerCallback):
    """Log at the last step whatever ``logging_steps`` is, so that a run shorter than ``logging_steps`` still
    records its meta loss and bilevel metrics."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and args.logging_strategy != "no":
            control.should_log = True
        return control


def auroc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for boolean ``positives`` (ties count one half), by the rank-sum
    (Mann-Whitney U) formula: O(N log N) time and O(N) memory, so it scales to datasets of millions of rows
    without adding scikit-learn as a dependency for one metric."""
    scores, positives = torch.as_tensor(scores).double().flatten(), torch.as_tensor(positives).bool().flatten()
    num_pos, num_neg = int(positives.sum()), int((~positives).sum())
    if num_pos == 0 or num_neg == 0:
        return math.nan
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    average_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based mean rank of each tie group
    rank_sum = average_rank[inverse][positives].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))
