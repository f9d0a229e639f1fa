"""``BilevelTrainer``: a ``transformers.Trainer`` whose step is one outer step of bilevel meta-tuning.

One Trainer step draws ``unroll_steps`` inner batches (one train batch of ``unroll_steps × batch`` examples,
split) and one meta batch, estimates the hypergradient of the meta loss after the unrolled inner training, and
hands it to the Trainer's own optimizer and scheduler as the outer variables' gradient. The inner θ (LoRA) and
its optimizer state carry over between outer steps per ``inner_reset_every``. Logging, callbacks, evaluation,
checkpoints and ``push_to_hub`` are the Trainer's, extended with the bilevel state.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from .config import BilevelConfig
from .functional import load_parameters, trainable_parameters, unwrap_model
from .hypergrad import NonFiniteHypergradientError, estimate_hypergradient, needs_second_order
from .model_card import WEIGHTED_DATASET_FILE, write_model_card
from .outer import OuterModule
from .problem import losses_to_problem, make_lm_losses

STATE_NAME = "bilevel_state.safetensors"
STATE_CONFIG_NAME = "bilevel_state.json"
MODEL_INPUT_COLUMNS = ("input_ids", "attention_mask", "labels")


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
            model = wrap_with_peft(model, peft_config)
        trainable_parameters(model)  # raises a clear error when nothing is trainable
        if meta_dataset is None or len(meta_dataset) == 0:
            raise ValueError(
                "meta_dataset is missing or empty: the outer objective needs held-out examples (e.g. clean or "
                "target-domain data), tokenized like the train dataset."
            )
        if train_dataset is None or len(train_dataset) == 0:
            raise ValueError("train_dataset is missing or empty: the inner loop needs training examples.")
        check_model_columns(train_dataset, "train")
        check_model_columns(meta_dataset, "meta")
        self.outer = outer
        train_dataset = outer.prepare_dataset(train_dataset, "train")
        meta_dataset = outer.prepare_dataset(meta_dataset, "meta")
        self.meta_dataset = meta_dataset.select_columns(
            [c for c in MODEL_INPUT_COLUMNS if c in meta_dataset.column_names]
        )
        if eval_dataset is not None:
            check_model_columns(eval_dataset, "eval")
        if data_collator is None:
            pad = getattr(processing_class, "pad_token_id", None)
            data_collator = BilevelDataCollator(pad_token_id=pad if pad is not None else 0)
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
            **kwargs,
        )  # fmt: skip
        self.outer.to(self.args.device)
        self._inner_params: dict[str, torch.Tensor] | None = None
        self._inner_state: dict | None = None
        self._initial_params: dict[str, torch.Tensor] | None = None
        self._problems: dict[bool, tuple] = {}
        self._metrics: dict[str, list[float]] = defaultdict(list)
        for method in {self.args.method, self.args.phase1_method} - {None}:
            self._problem(self.model, method)  # preflight now, not deep inside the first step
        self._warn_if_truncation_hides_rows()
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    def _warn_if_truncation_hides_rows(self) -> None:
        """trgu differentiates only the last K steps: outer variables tied to rows (per-example weights) of the
        earlier steps get exactly zero hypergradient, every outer step."""
        args = self.args
        per_row = type(self.outer).active_coordinates is not OuterModule.active_coordinates
        hidden_steps = args.unroll_steps - args.truncation
        if "trgu" in (args.method, args.phase1_method) and per_row and hidden_steps > 0:
            warnings.warn(
                f"method 'trgu' with truncation={args.truncation} < unroll_steps={args.unroll_steps}: the "
                f"{type(self.outer).__name__} of rows in the first {hidden_steps} inner steps of every unroll get a "
                "zero hypergradient. Set truncation=unroll_steps, or use 'fg2u' or 'hessian_free', which reach "
                "every step.",
                stacklevel=3,
            )

    # -- Trainer hooks ------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """The Trainer's optimizer (``args.optim``, ``learning_rate``...) over the outer variables φ."""
        return super().create_optimizer(model=self.outer)

    def get_train_dataloader(self):
        """Batches of ``unroll_steps × batch`` examples: one Trainer step is one unroll."""
        return self._get_dataloader(
            dataset=self.train_dataset, description="Training", sampler_fn=self._get_train_sampler, is_training=True,
            batch_size=self._train_batch_size * self.args.unroll_steps,
        )  # fmt: skip

    @property
    def data_parallel(self) -> bool:
        """Whether processes keep their own inner rows and average inner gradients (``process_split='data'``)."""
        return self.args.process_split == "data" and self.accelerator.num_processes > 1

    def direction_share(self, method: str) -> slice | None:
        """This process's contiguous share of the b directions (None: all of them, on one process)."""
        world = self.accelerator.num_processes
        if world == 1 or method not in ("fg2u", "fg2u_zo") or self.data_parallel:
            return None
        per_rank = math.ceil(self.args.num_directions / world)
        start = min(self.args.num_directions, self.accelerator.process_index * per_rank)
        return slice(start, min(self.args.num_directions, start + per_rank))

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
        size = self._train_batch_size
        if self.accelerator.num_processes > 1 and not self.data_parallel:  # ranks split directions: same unroll
            inputs, size = self._gather_unroll(inputs), size * self.accelerator.num_processes
        inner_batches = [
            {k: v[i : i + size] for k, v in inputs.items()} for i in range(0, len(inputs["input_ids"]), size)
        ]
        meta_batch = self._prepare_inputs(self.meta_batch(step))
        self._ensure_inner_state(model, step)
        self._resync_inner_state(model)
        inner_loss, outer_loss, _ = self._problem(model, method)
        start = time.perf_counter()
        try:
            result = estimate_hypergradient(
                inner_loss, outer_loss, self._inner_params, self.outer.outer_dict(), inner_batches, meta_batch,
                method=method, inner_optimizer=self.args.inner_optimizer, inner_lr=self.args.inner_lr,
                num_directions=self.args.num_directions, directions=self.args.directions,
                seed=self.args.seed * 1_000_003 + step, inner_optimizer_kwargs=self.args.inner_optimizer_kwargs(),
                optimizer_state=self._inner_state, jvp=self.args.jvp,
                directions_per_pass=self.args.directions_per_pass,
                active_coordinates=self._active_coordinates(inner_batches), truncation=self.args.truncation,
                direction_slice=self.direction_share(method),
                reduce_gradients=self._average_over_processes if self.data_parallel else None,
                zo_epsilon=self.args.zo_epsilon, zo_scheme=self.args.zo_scheme,
                implicit_steps=self.args.implicit_steps, neumann_lr=self.args.neumann_lr,
                cg_damping=self.args.cg_damping,
            )  # fmt: skip
        except NonFiniteHypergradientError as error:
            if self.args.nonfinite_policy == "stop":
                raise
            warnings.warn(f"Outer step {step} skipped (nonfinite_policy='skip'): {error}", stacklevel=2)
            for parameter in self.outer.parameters():
                parameter.grad = None
            self._metrics["skipped_steps"].append(1.0)
            return torch.tensor(float("nan"), device=self.args.device)
        seconds = time.perf_counter() - start
        grads = self._add_regularizer(self._sum_over_processes(result.grad, method))
        for name, parameter in self.outer.named_parameters():
            parameter.grad = grads[name].to(parameter.dtype)
        self._inner_params, self._inner_state = result.params, result.optimizer_state
        load_parameters(model, result.params)
        self._record(result, method, step, seconds)
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

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the bilevel metrics gathered since the last log (means) and the outer variables' summary."""
        if "loss" in logs:
            for key, values in self._metrics.items():
                logs[key] = sum(values) if key in ("skipped_steps", "theta_resyncs") else sum(values) / len(values)
            logs.update(self.outer.summary())
            self._metrics.clear()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """The Trainer's save (the peft adapter, tokenizer, args), then the outer variables, the inner
        optimizer state and a model card: a folder ready for the Hub and for exact resumption."""
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        output_dir = Path(output_dir or self.args.output_dir)
        # The Trainer pickles its args, hub_token included, into a file that push_to_hub uploads.
        redacted = copy.copy(self.args)
        redacted.hub_token = None
        torch.save(redacted, output_dir / TRAINING_ARGS_NAME)
        self.outer.save_pretrained(output_dir)
        base_model = unwrap_model(self.model).get_base_model() if hasattr(self.model, "get_base_model") else None
        self.outer.save_peft_adapter(output_dir / "prompt_adapter", base_model or self.model, self.model_name)
        self._save_bilevel_state(output_dir)
        write_model_card(self, output_dir)  # replaces peft's generic card

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        directory = Path(resume_from_checkpoint)
        self._check_resume_compatible(directory)
        loaded = OuterModule.from_pretrained(directory)
        if loaded.config != self.outer.config:
            raise ValueError(
                f"Checkpoint {directory} holds outer variables {type(loaded).__name__}({loaded.config}) but this "
                f"trainer has {type(self.outer).__name__}({self.outer.config}). Resume with the same outer module."
            )
        self.outer.load_state_dict(loaded.state_dict())
        self._load_bilevel_state(directory, model or self.model)

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
        weights as ``weighted_dataset.parquet`` in that commit when the outer variables weight rows."""
        if (
            self.args.should_save
            and self.train_dataset is not None
            and type(self.outer).row_weights is not OuterModule.row_weights
        ):
            self.export_weights().to_parquet(str(Path(self.args.output_dir) / WEIGHTED_DATASET_FILE))
        return super().push_to_hub(commit_message, blocking, token, revision, **kwargs)

    # -- bilevel pieces -------------------------------------------------------------------------------------------
    def meta_batch(self, step: int) -> dict:
        """The meta batch of outer step ``step``: a seeded draw without replacement, so resuming at any step
        draws the same batches without saving a data position."""
        generator = torch.Generator().manual_seed(self.args.seed * 7_919 + step)
        size = min(self.args.meta_batch_size, len(self.meta_dataset))
        rows = torch.randperm(len(self.meta_dataset), generator=generator)[:size].tolist()
        return self.data_collator([self.meta_dataset[i] for i in rows])

    def export_weights(self, dataset=None, column: str = "weight"):
        """``dataset`` (default: the train dataset) with a ``weight`` column from the learned outer variables,
        ready for ``push_to_hub``. Weights have mean 1 over the dataset."""
        dataset = self.train_dataset if dataset is None else self.outer.prepare_dataset(dataset, "train")
        weights = self.dataset_weights(dataset)
        return dataset.add_column(column, weights.tolist())

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
            losses = per_example_losses(params, outer, batch)
            weights = self.outer.row_weights(outer, batch, losses)
            chunks.append(torch.ones_like(losses) if weights is None else weights)
        weights = torch.cat(chunks).double().cpu()
        return (weights / weights.mean()).float()

    def _problem(self, model, method: str):
        """(inner_loss, outer_loss, per-example losses) for ``method``, built (and preflighted) once per kind."""
        second_order = needs_second_order(method, self.args.jvp)
        if second_order not in self._problems:
            losses = make_lm_losses(model, self.outer.prefix, second_order=second_order)
            self._problems[second_order] = (*losses_to_problem(losses, self.outer.example_weights), losses)
        return self._problems[second_order]

    def _ensure_inner_state(self, model, step: int) -> None:
        if self._inner_params is None:
            self._inner_params = trainable_parameters(model)
        if self._initial_params is None:
            self._initial_params = {k: v.clone() for k, v in self._inner_params.items()}
        every = self.args.inner_reset_every
        if every and step > 0 and step % every == 0:
            self._inner_params = {k: v.clone() for k, v in self._initial_params.items()}
            self._inner_state = None
            load_parameters(model, self._inner_params)

    def _gather_unroll(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every rank's rows of the unroll, concatenated in rank order — the rows one process with
        ``num_processes ×`` the batch size would read — after padding to a common length."""
        fill = getattr(self.data_collator, "fill", BilevelDataCollator().fill)
        gathered = {}
        for key, value in inputs.items():
            if value.dim() > 1:
                value = self.accelerator.pad_across_processes(value, dim=1, pad_index=fill.get(key, 0))
            gathered[key] = self.accelerator.gather(value.contiguous())
        return gathered

    def _resync_inner_state(self, model) -> None:
        """Ranks compute θ identically by construction; check a checksum of θ every outer step and, if a rank
        drifted (non-deterministic kernels, a bug), copy rank 0's θ and inner optimizer state to all."""
        if self.accelerator.num_processes == 1:
            return
        checksum = torch.stack([v.double().sum() for v in self._inner_params.values()]).sum().reshape(1)
        sums = self.accelerator.gather(checksum.to(self.args.device))
        if float((sums - sums[0]).abs().max()) <= 1e-9 * (1.0 + float(sums[0].abs())):
            return
        warnings.warn(f"Inner parameters differ across processes (checksums {sums.tolist()}); resynchronising "
                      "from rank 0.", stacklevel=2)  # fmt: skip
        for value in [*self._inner_params.values(), *flatten_state(self._inner_state or {}).values()]:
            torch.distributed.broadcast(value, src=0)
        load_parameters(model, self._inner_params)
        self._metrics["theta_resyncs"].append(1.0)

    def _active_coordinates(self, inner_batches: list[dict]) -> dict[str, torch.Tensor | None] | None:
        """The coordinates of φ the unroll can affect; with a data-parallel inner loop, the union over ranks
        (every rank must draw the same directions)."""
        active = self.outer.active_coordinates(inner_batches)
        if active is None or not self.data_parallel:
            return active
        union = {}
        for key, mask in active.items():
            if mask is not None:
                counts = mask.to(torch.int32).contiguous()
                torch.distributed.all_reduce(counts)
                mask = counts > 0
            union[key] = mask
        return union

    def _average_over_processes(self, tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mean over processes of a dict of tensors: the inner gradient (and its tangents) of the data-parallel
        inner loop."""
        world = self.accelerator.num_processes
        return {name: value / world for name, value in all_reduce_sum(tree).items()}

    def _sum_over_processes(self, grads: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
        """The one all-reduce of an outer step: the shares of the directions sum to the full estimate."""
        return grads if self.direction_share(method) is None else all_reduce_sum(grads)

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

    def _record(self, result, method: str, step: int, seconds: float) -> None:
        metrics = self._metrics
        metrics["meta_loss"].append(result.outer_loss)
        metrics["inner_loss"].append(sum(result.inner_losses) / len(result.inner_losses))
        metrics["hypergrad_norm"].append(result.grad_norm)
        metrics["phase"].append(1.0 if method != self.args.method or step < self.args.phase1_steps else 2.0)
        metrics["outer_step_seconds"].append(seconds)
        if result.num_directions:
            metrics["directions_per_second"].append(result.num_directions / max(seconds, 1e-9))

    def _save_bilevel_state(self, directory: Path) -> None:
        tensors = {}
        if self._initial_params is not None:
            tensors.update({f"initial/{k}": v for k, v in self._initial_params.items()})
        for key, value in flatten_state(self._inner_state or {}).items():
            tensors[f"inner_state/{key}"] = value
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / STATE_NAME))
        description = {
            **self._compatibility_fields(),
            "outer_config": self.outer.config,
            "bilevel_config": self.args.bilevel_fields(),
        }
        (directory / STATE_CONFIG_NAME).write_text(json.dumps(description, indent=2, default=str))

    def _compatibility_fields(self) -> dict:
        """What a checkpoint must share with this trainer to resume: the outer type, the inner optimizer (its
        state's layout) and the names of the inner parameters."""
        return {
            "outer_type": type(self.outer).__name__,
            "inner_optimizer": self.args.inner_optimizer,
            "inner_parameters": sorted(trainable_parameters(self.model)),
        }

    def _check_resume_compatible(self, directory: Path) -> None:
        path = directory / STATE_CONFIG_NAME
        if not path.is_file():
            raise ValueError(f"{directory} is not a BilevelTrainer checkpoint: {STATE_CONFIG_NAME} is missing.")
        saved = json.loads(path.read_text())
        mine = self._compatibility_fields()
        wrong = [key for key, value in mine.items() if saved.get(key) != value]
        if wrong:
            details = "; ".join(f"{k}: checkpoint {saved.get(k)!r:.120} vs now {mine[k]!r:.120}" for k in wrong)
            raise ValueError(
                f"Checkpoint {directory} comes from an incompatible config ({details}). Resume with the config it "
                "was written with, or start a new run in another output_dir."
            )

    def _load_bilevel_state(self, directory: Path, model) -> None:
        try:
            tensors = load_file(str(directory / STATE_NAME))
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"Could not read {directory / STATE_NAME}: {error}. The checkpoint is corrupt or incomplete; "
                "resume from an earlier checkpoint."
            ) from error
        device = self.args.device
        self._inner_params = {k: v.detach().clone().to(device) for k, v in trainable_parameters(model).items()}
        initial = {k.removeprefix("initial/"): v.to(device) for k, v in tensors.items() if k.startswith("initial/")}
        self._initial_params = initial or None
        state = {
            k.removeprefix("inner_state/"): v.to(device) for k, v in tensors.items() if k.startswith("inner_state/")
        }
        self._inner_state = unflatten_state(state) if state else None


def wrap_with_peft(model, peft_config):
    """Wrap ``model`` in a peft adapter; a config that matches no module is an error that names the modules."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except ValueError as error:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
        raise ValueError(
            f"The peft config targets nothing in this model ({error}). target_modules="
            f"{getattr(peft_config, 'target_modules', None)}; module names here include {names[:20]}."
        ) from error


def check_model_columns(dataset, role: str) -> None:
    if "input_ids" not in dataset.column_names:
        raise ValueError(
            f"The {role} dataset has no 'input_ids' column (columns: {dataset.column_names}). Tokenize it first, "
            "e.g. with hf_fg2u.data.tokenize_for_causal_lm(dataset, tokenizer)."
        )


def all_reduce_sum(tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum over processes of a dict of tensors, into new tensors (the inputs are left as they are)."""
    summed = {}
    for name, value in tree.items():
        value = value.contiguous().clone()
        torch.distributed.all_reduce(value)
        summed[name] = value
    return summed


def flatten_state(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """{'exp_avg': {'w': t}, 'step': s} -> {'exp_avg/w': t, 'step': s}."""
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update(flatten_state(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten_state(flat: dict[str, torch.Tensor]) -> dict:
    """Inverse of :func:`flatten_state` (parameter names never start with a state key, so one split suffices)."""
    state: dict = {}
    for key, value in flat.items():
        head, _, rest = key.partition("/")
        if rest:
            state.setdefault(head, {})[rest] = value
        else:
            state[head] = value
    return state


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
