"""``BilevelTrainer``: a ``transformers.Trainer`` whose step is one outer step of bilevel meta-tuning.

One Trainer step draws ``unroll_steps`` inner batches (one train batch of ``unroll_steps × batch`` examples,
split) and one meta batch, estimates the hypergradient of the meta loss after the unrolled inner training, and
hands it to the Trainer's own optimizer and scheduler as the outer variables' gradient. The inner θ (LoRA) and
its optimizer state carry over between outer steps, back to their start per ``inner_reset_every`` /
``inner_reset_patience`` (:mod:`hf_fg2u.trainer.inner_resets`). Logging, callbacks, evaluation,
checkpoints and ``push_to_hub`` are the Trainer's, extended with the bilevel state.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from hf_fg2u.hypergrad import METHOD_SPECS, NonFiniteHypergradientError, estimate_hypergradient, method_from_config
from hf_fg2u.hypergrad.auto import available_megabytes, choose_method
from hf_fg2u.hypergrad.inner_optimizers import make_inner_optimizer
from hf_fg2u.lm.collator import PaddingCollator
from hf_fg2u.lm.data_checks import ModelLimits, drop_long_train_rows, prepare_datasets
from hf_fg2u.lm.formats import MODEL_INPUT_COLUMNS
from hf_fg2u.lm.group_shift import check_meta_groups
from hf_fg2u.lm.params import load_parameters, trainable_parameters, unwrap_model
from hf_fg2u.outer import OuterModule
from hf_fg2u.trainer.checkpointing import check_steps_left, run_settings, verify_checkpoint
from hf_fg2u.trainer.config import BilevelConfig
from hf_fg2u.trainer.inner_resets import ResetPolicy
from hf_fg2u.trainer.inner_state import InnerStateMixin, outer_step_seed
from hf_fg2u.trainer.metrics import LogLastStep, MetricsMixin
from hf_fg2u.trainer.model_setup import check_datasets, check_trainer_inputs, prepare_model
from hf_fg2u.trainer.processes import ProcessPolicy, check_same_settings
from hf_fg2u.trainer.run_folder import RunLock, check_new_run, clear_checkpoints
from hf_fg2u.trainer.safeguards import OuterStepSafeguards, OuterUpdateGuard
from hf_fg2u.trainer.saving import SavingMixin
from hf_fg2u.trainer.weights_export import WeightExportMixin

logger = logging.get_logger(__name__)


# Below this normalized entropy per-row weights sit on about N**COLLAPSED_ENTROPY rows of N: a warning at the end
# (not for domain weights, where mass on the target domain is the aim).
COLLAPSED_ENTROPY = 0.5


MAX_SURPLUS_DIRECTIONS = 4096  # beyond φ's size, more directions than this are refused, not only warned about


class BilevelTrainer(InnerStateMixin, OuterStepSafeguards, MetricsMixin, WeightExportMixin, SavingMixin, Trainer):
    """Learns outer variables (data weights, a soft prompt) by hypergradients through LoRA fine-tuning.

    Args beyond ``Trainer``'s: ``meta_dataset`` (the outer objective's data), ``outer`` (an
    :class:`~hf_fg2u.outer.OuterModule`), ``peft_config`` (wraps ``model`` in an adapter). ``model`` may be a
    name or path, loaded with ``AutoModelForCausalLM.from_pretrained(model, **args.model_init_kwargs)``.
    Datasets may be raw, in TRL's formats (tokenized here with ``processing_class``, see ``hf_fg2u.lm.formats``),
    or tokenized; every split is checked at construction (``hf_fg2u.lm.data_checks``).
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
        check_trainer_inputs(args, outer)
        model, self.model_name = prepare_model(model, args, peft_config)
        check_same_settings(run_settings(args, model))
        check_datasets(train_dataset, meta_dataset)
        self.outer = outer
        # as given (less the rows truncation_mode='drop' left out): what export_weights() returns, with a weight column
        self.user_train_dataset, train_dataset = drop_long_train_rows(
            train_dataset, processing_class, args, outer.id_column
        )
        train_dataset, meta_dataset, eval_dataset = prepare_datasets(
            train_dataset, meta_dataset, eval_dataset, outer, processing_class, args,
            ModelLimits.of(model),
        )  # fmt: skip
        meta_columns = [c for c in MODEL_INPUT_COLUMNS if c in meta_dataset.column_names]
        self._meta_groups = None  # each meta row's group, where the shift directions are taken on them
        if args.project_group_shift and outer.meta_group_column is not None:
            column = outer.meta_group_column
            self._meta_groups = check_meta_groups(meta_dataset, column, outer.num_groups, args.meta_batch_size)
            meta_columns.append(column)
        self.meta_dataset = meta_dataset.select_columns(meta_columns)
        if data_collator is None:
            data_collator = PaddingCollator.for_tokenizer(processing_class)
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
            **kwargs,
        )  # fmt: skip
        self.outer.to(self.args.device)
        self.processes = ProcessPolicy(self.accelerator, self.args)
        self._init_run_state()
        self.add_callback(OuterUpdateGuard(self))
        self.method_choice = self._resolve_auto_method() if self.args.method == "auto" else None
        # Built once from the config; every outer step then passes data only.
        self._methods = {name: method_from_config(self.args, name) for name in self._method_names()}
        self._check_methods()
        self._inner_optimizer = make_inner_optimizer(
            self.args.inner_optimizer, self.args.inner_lr, **self.args.inner_optimizer_kwargs()
        )
        for method in self._methods:
            self._problem(self.model, method)  # preflight now, not deep inside the first step
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

    def _init_run_state(self) -> None:
        """What the run keeps across outer steps (all empty until the first one)."""
        self._inner_params: dict[str, torch.Tensor] | None = None
        self._inner_state: dict | None = None
        self._initial_params: dict[str, torch.Tensor] | None = None  # θ_start: resets return here
        self._initial_state: dict | None = None  # s_start (None: a fresh inner optimizer state)
        self._resets = ResetPolicy(self.args.inner_reset_every, self.args.inner_reset_patience)
        self._problems: dict[bool, tuple] = {}
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._outer_before: tuple[dict, dict] | None = None  # φ and the outer optimizer state before the update
        self._inner_before: tuple | None = None  # θ, the inner optimizer state and the reset policy's, likewise
        self._outer_buffers: list | None = None  # where they are copied, reused every step
        self._save_error: Exception | None = None  # rank 0's checkpoint write failure, reported to every rank
        self._steps_run, self._steps_skipped, self._meta_loss_sum = 0, 0, 0.0
        self._largest_hypergrad = 0.0  # of this train(): 0 after every step means φ never moved
        self._staging: str | None = None

    def _check_methods(self) -> None:
        """What the chosen methods cannot do with this run, refused (or warned about) before any compute."""
        self.processes.check_direction_shares(self._methods)
        self.processes.warn_if_unroll_repeated(self._methods)
        self._check_direction_count()
        if self.args.project_group_shift and self.outer.num_groups > 1 and "fg2u_zo" in self._methods:
            raise ValueError("fg2u_zo never forms the meta gradient, so the group-shift projection of grouped weights "
                             "cannot apply: use method rgu or fg2u, or set project_group_shift=False.")  # fmt: skip
        if "hessian_free" in self._methods and self.args.inner_optimizer != "sgd":
            warnings.warn(
                f"hessian_free takes each inner step's Jacobian as -inner_lr·H, SGD's step; with inner_optimizer="
                f"{self.args.inner_optimizer!r} the step is preconditioned per coordinate, so its hypergradient is a "
                "cruder first-order guess (its direction, not its scale, after normalize_hypergradient). rgu is exact "
                "for any inner optimizer.",
                stacklevel=3,
            )
        self._warn_if_truncation_hides_rows()

    def _check_direction_count(self) -> None:
        """More random directions than one unroll's coordinates cost more than the exact answer, which that many
        orthogonal directions already give: a warning, and an error past MAX_SURPLUS_DIRECTIONS (10**9 directions
        would run for days with no sign of progress). Basis directions are distinct coordinates among those, so more
        of them than there are would fail at step 0: refused now."""
        directional = [name for name, method in self._methods.items() if method.directional]
        b = self.args.num_directions
        size, what = self._unroll_coordinates()
        if not directional or b <= size:
            return
        if self.args.directions == "basis":
            raise ValueError(
                f"directions='basis' with num_directions={b}, but {what}: basis directions are distinct coordinates "
                f"among them, so step 0 would fail. Set num_directions <= {size} ({size} gives the exact "
                "hypergradient), or use random directions (directions='orthogonal')."
            )
        message = (
            f"num_directions={b} exceeds {what}: {size} orthogonal directions (directions='orthogonal') already give "
            f"the exact hypergradient of {directional[0]!r}. Use at most {size}, or an exact method such as rgu."
        )
        if b > MAX_SURPLUS_DIRECTIONS:
            raise ValueError(message)
        warnings.warn(message, stacklevel=3)

    def _unroll_coordinates(self) -> tuple[int, str]:
        """How many coordinates of φ one unroll can affect, and what they are: every coordinate, or for per-row
        outer variables (``per_row_coordinates``) at most one per row of the unroll, which all processes share
        (gathered for process_split='directions', the union over ranks for 'data')."""
        size = sum(value.numel() for value in self.outer.outer_dict().values())
        whole = f"the {size} coordinates of the outer variables ({type(self.outer).__name__})"
        if not self.outer.per_row_coordinates:
            return size, whole
        args, world = self.args, self.processes.world
        rows = args.unroll_steps * self._train_batch_size * world
        if rows >= size:
            return size, whole
        return rows, (
            f"the {rows} coordinates one unroll can affect (unroll_steps={args.unroll_steps} × "
            f"{self._train_batch_size} rows × {world} processes, of the {size} of {type(self.outer).__name__})"
        )

    def _warn_if_truncation_hides_rows(self) -> None:
        """trgu differentiates only the last K steps: outer variables tied to rows (per-example weights) of the
        earlier steps get exactly zero hypergradient, every outer step."""
        args = self.args
        per_row = self.outer.per_row_coordinates
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
            check_steps_left(Path(resume_from_checkpoint), self.args.max_steps)
        else:
            check_new_run(self.args.output_dir, self.args.overwrite_output_dir)
        self._steps_run, self._steps_skipped, self._meta_loss_sum = 0, 0, 0.0
        self._largest_hypergrad = 0.0
        with contextlib.ExitStack() as held:
            refused = None
            if self.args.should_save:
                try:
                    held.enter_context(RunLock(self.args.output_dir))
                except Exception as error:  # another live run holds the lock, or the folder cannot be written
                    refused = error
            self.processes.agree(refused, f"The run lock of output_dir={self.args.output_dir!r}")
            if not resume_from_checkpoint and self.args.overwrite_output_dir and self.args.should_save:
                clear_checkpoints(self.args.output_dir)  # held by this run now: no other writes there
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        entropy = self.outer.summary().get("weight_entropy")
        if self._steps_run and self.outer.per_row_coordinates and entropy is not None and entropy < COLLAPSED_ENTROPY:
            warnings.warn(
                f"The learned weights collapsed: their normalized entropy is {entropy:.3f} (1 = uniform, 0 = all "
                "weight on one row), so a few rows carry the whole loss. Lower learning_rate, use "
                "weight_regularization, or the sigmoid parametrization (keep-probabilities).",
                stacklevel=2,
            )
        if self._steps_run and self._largest_hypergrad == 0.0 and self.args.learning_rate > 0:
            warnings.warn(
                f"The hypergradient was exactly 0 at every one of the {self._steps_run} outer steps: the outer "
                "variables never moved, so the run learned nothing. Usually the inner steps do not change the meta "
                "loss: an inner_lr so large that the inner loss diverges (try 10x lower), a LoRA adapter that does "
                "nothing (lora_alpha 0), or outer variables that no train row uses.",
                stacklevel=2,
            )
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
        active = self.processes.active_coordinates(self.outer.active_coordinates(inner_batches))
        restricted = self.outer.restrict(inner_batches, active)  # per-row φ: only the unroll's rows
        try:
            result = estimate_hypergradient(
                inner_loss, outer_loss, self._inner_params,
                self.outer.outer_dict() if restricted is None else restricted.outer,
                inner_batches if restricted is None else restricted.inner_batches, meta_batch,
                method=self._methods[method], inner_optimizer=self._inner_optimizer,
                seed=outer_step_seed(self.args.seed, step), optimizer_state=self._inner_state,
                active_coordinates=active if restricted is None else None,
                direction_slice=self.processes.direction_share(method),
                reduce_gradients=self.processes.inner_gradient_reducer(),
                meta_gradient=self._meta_gradient(model, method),
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
        if restricted is not None:
            summed = restricted.expand(summed, self.outer.outer_dict())
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
        self._inner_before = (self._inner_params, self._inner_state, self._resets.state_dict())
        self.outer.mark_scored(active)  # undone with φ if the update is not finite
        for name, parameter in self.outer.named_parameters():
            parameter.grad = grads[name].to(parameter.dtype)
        self._inner_params, self._inner_state = result.params, result.optimizer_state
        load_parameters(model, result.params)
        self._resets.observe(result.outer_loss)
        self._record(result, method, step, seconds, _norm(summed))
        return torch.tensor(result.outer_loss, device=self.args.device)

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

    # -- bilevel pieces -------------------------------------------------------------------------------------------

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


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


def _unit_norm(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The outer gradient divided by its global norm (unchanged where it is zero)."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    return grads if norm == 0 else {k: (g / norm).to(g.dtype) for k, g in grads.items()}
