"""``BilevelConfig``: every knob of bilevel meta-tuning, on top of ``transformers.TrainingArguments``.

The Trainer's own fields keep their meaning for the *outer* problem: ``learning_rate``, ``optim``,
``lr_scheduler_type`` and ``max_steps`` drive the outer optimizer over φ, and one Trainer step is one outer step
(``unroll_steps`` inner batches + one meta batch). ``per_device_train_batch_size`` is the inner batch size.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from hf_fg2u.hypergrad import DEFAULT_JVP, DIRECTIONS, JVP_MODES, METHOD_SPECS, METHODS
from hf_fg2u.hypergrad.inner_optimizers import INNER_OPTIMIZERS
from hf_fg2u.hypergrad.methods import data_parallel_methods, needs_second_order
from hf_fg2u.hypergrad.zeroth_order import ZO_SCHEMES
from hf_fg2u.recipe_yaml import recipe_values
from hf_fg2u.registry import check_choice
from hf_fg2u.trainer.redaction import PicklesRedacted, redact, redacted_args

NONFINITE_POLICIES = ("skip", "stop")
PROCESS_SPLITS = ("directions", "data")
CONFIG_METHODS = (*METHODS, "auto")
REGULARIZERS = ("none", "kl_uniform", "l2")
FLOAT32_MAX = torch.finfo(torch.float32).max


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def check_deepspeed_installed(args: TrainingArguments) -> None:
    """Refuse ``--deepspeed`` without the deepspeed package, naming what to install."""
    from transformers.integrations import is_deepspeed_available

    if args.deepspeed and not is_deepspeed_available():
        raise ValueError(
            f"--deepspeed {args.deepspeed!r} needs the deepspeed package, which is not installed. Install it "
            "(pip install deepspeed), or leave --deepspeed out."
        )


def check_optimizer_installed(args: TrainingArguments) -> None:
    """Refuse an ``--optim`` whose package is missing (bitsandbytes, galore, ...) now, naming what to install, not
    at the first step with a raw ImportError."""
    from transformers import Trainer

    try:
        Trainer.get_optimizer_cls_and_kwargs(args)
    except ImportError as error:
        raise ValueError(
            f"--optim {getattr(args.optim, 'value', args.optim)} needs a package that is not installed: "
            f"{str(error).strip().splitlines()[0]} Or pick another --optim (e.g. adamw_torch)."
        ) from None
    except Exception:  # other problems (an optimizer that needs the model) are the Trainer's to report
        pass


def check_trains_a_step(args: TrainingArguments) -> None:
    """Refuse ``num_train_epochs`` <= 0 without a ``max_steps``: the Trainer would run no step and report success."""
    if args.max_steps == 0:
        raise ValueError(
            "max_steps=0 trains no step. Pass a positive number of outer steps, or -1 to train num_train_epochs epochs."
        )
    if args.max_steps <= 0 and not args.num_train_epochs > 0:
        raise ValueError(
            f"num_train_epochs={args.num_train_epochs} with max_steps={args.max_steps} trains no step. Set "
            "--num_train_epochs > 0, or --max_steps > 0."
        )


def _check_range(name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = True):
    """A finite number in [low, high) (by default): NaN and inf fail every comparison or the bound."""
    ok = isinstance(value, int | float) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r} must be a finite number in {interval}.")


@dataclass
class BilevelConfig(PicklesRedacted, TrainingArguments):
    """Configuration of :class:`~hf_fg2u.BilevelTrainer`: ``TrainingArguments`` plus the bilevel options.

    The Trainer's own fields drive the *outer* problem (φ: the weights, the soft prompt): ``learning_rate``,
    ``optim``, ``lr_scheduler_type``, ``max_steps``; one Trainer step is one outer step. The options below are listed
    with their types and defaults, generated from the same field metadata that ``hf-fg2u train --help`` prints.
    """

    # -- hypergradient method ----------------------------------------------------------------------------------
    method: str = field(
        default="fg2u",
        metadata={"help": "Hypergradient method. fg2u: forward gradient unrolling (unbiased, memory constant in T "
                  "and |θ|). rgu: exact, stores T copies of θ and the inner optimizer state (cheap for LoRA). auto: "
                  "rgu when that fits memory_budget_mb, else fg2u.",
                  "choices": list(CONFIG_METHODS)},
    )  # fmt: skip
    jvp: str = field(
        default=DEFAULT_JVP,
        metadata={"help": f"How each inner step's tangent is computed, one of {JVP_MODES}. 'finite_difference' "
                  "works with kernels that have no forward AD or double backward (flash attention)."},
    )  # fmt: skip
    num_directions: int = field(default=8, metadata={"help": "b, random directions per outer step (fg2u, fg2u_zo)."})
    directions: str = field(default="rademacher", metadata={"help": f"Kind of directions, one of {DIRECTIONS}."})
    directions_per_pass: int = field(
        default=8, metadata={"help": "Directions batched in one vmap pass; lower it to save memory."}
    )
    truncation: int = field(default=4, metadata={"help": "K, the differentiated last inner steps of 'trgu'."})
    implicit_steps: int = field(default=10, metadata={"help": "Neumann terms or CG iterations ('neumann', 'cg')."})
    neumann_lr: float | None = field(default=None, metadata={"help": "Neumann step size; default inner_lr."})
    cg_damping: float = field(default=0.0, metadata={"help": "λ of (H + λI) in 'cg'."})
    zo_epsilon: float = field(default=1e-3, metadata={"help": "Step μ of the finite differences of 'fg2u_zo'."})
    zo_scheme: str = field(default="central", metadata={"help": f"'fg2u_zo' differences, one of {ZO_SCHEMES}."})

    # -- unroll -----------------------------------------------------------------------------------------------
    unroll_steps: int = field(default=4, metadata={"help": "T, inner optimizer steps per outer step."})
    meta_batch_size: int = field(default=8, metadata={"help": "Examples of the meta (outer) batch per outer step."})
    process_split: str = field(
        default="directions",
        metadata={"help": f"How several processes share an outer step, one of {PROCESS_SPLITS}. 'directions': every "
                  "process runs the same unroll on all ranks' rows and takes b/P of the directions (one all-reduce "
                  "per outer step; a method without directions, such as rgu, repeats the whole unroll on every "
                  "process). 'data': every process keeps its own rows and all b directions; the inner gradient and "
                  "its tangents (or VJPs) are averaged across processes at every inner step (for batches that do "
                  "not fit one device; fg2u, rgu and trgu)."},
    )  # fmt: skip

    # -- inner optimizer ---------------------------------------------------------------------------------------
    inner_optimizer: str = field(
        default="adam", metadata={"help": f"Inner optimizer, one of {sorted(INNER_OPTIMIZERS)} (differentiable)."}
    )
    inner_lr: float = field(default=1e-3, metadata={"help": "Inner learning rate."})
    inner_momentum: float = field(default=0.9, metadata={"help": "β of 'momentum'."})
    inner_beta1: float = field(default=0.9, metadata={"help": "β₁ of 'adam'."})
    inner_beta2: float = field(default=0.999, metadata={"help": "β₂ of 'adam'."})
    inner_weight_decay: float = field(default=0.0, metadata={"help": "Inner weight decay (decoupled for 'adam')."})
    inner_nesterov: bool = field(default=False, metadata={"help": "Nesterov momentum for 'momentum'."})
    inner_eps: float = field(
        default=1e-8,
        metadata={"help": "ε of 'adam'; >= 1e-4 on a bf16/fp16 model (docs/low_precision.md)."},
    )  # fmt: skip
    inner_eps_root: float = field(
        default=1e-16, metadata={"help": "'adam': added inside √v (a finite derivative at a zero gradient)."}
    )

    # -- inner warm-up and resets -------------------------------------------------------------------------------
    inner_reset_every: int = field(
        default=0,
        metadata={"help": "Reset θ and the inner optimizer state to their start once they have run k outer steps "
                  "since the start or the last reset: 0 = never (warm start, online bilevel), 1 = every outer step."},
    )  # fmt: skip
    inner_reset_patience: int = field(
        default=0,
        metadata={"help": "Reset θ and the inner optimizer state to their start when the meta loss has not improved "
                  "on its best since the last reset for this many outer steps: 0 = never. Once θ overfits the "
                  "train rows, the hypergradient stops telling good rows from bad; a reset keeps it informative."},
    )  # fmt: skip
    inner_warmup_steps: int = field(
        default=0,
        metadata={"help": "Plain inner steps on the initial (uniform) weights before the first outer step; resets "
                  "return to this warmed-up θ. At the base model every row looks helpful (all teach the domain's "
                  "vocabulary), so the first hypergradients carry no signal; a few cheap steps skip them."},
    )  # fmt: skip

    # -- memory of trajectory reverse (rgu, trgu, auto) ---------------------------------------------------------
    checkpoint_every: int = field(
        default=1,
        metadata={"help": "rgu/trgu: keep every k-th inner state and recompute the others in the backward sweep "
                  "(memory ≈ (T/k + k)·|θ, s| instead of T·|θ, s|, one more primal step per step)."},
    )  # fmt: skip
    offload_trajectory: bool = field(
        default=False, metadata={"help": "rgu/trgu: keep the stored inner states in CPU memory (accelerator runs)."}
    )
    keep_step_graphs: bool = field(
        default=False,
        metadata={"help": "rgu/trgu: keep each step's graph, not recompute it (0.86x the time, more memory)."},
    )  # fmt: skip
    memory_budget_mb: float | None = field(
        default=None,
        metadata={"help": "method='auto': the memory (MB) the chosen method may use beyond the model and activations; "
                  "default: half of what is free on the accelerator after the model, or on CPU half of the available "
                  "system memory divided among this machine's processes (the least over all processes)."},
    )  # fmt: skip

    # -- inner variables ------------------------------------------------------------------------------------------
    inner_parameters: list[str] | None = field(
        default=None,
        metadata={"help": "Without a peft config: regular expressions (re.search) over parameter names selecting θ, "
                  "e.g. 'lm_head' 'layers\\.1[01]\\.'; the rest is frozen. Default: every parameter that requires "
                  "grad (all of them for a plain model: full fine-tuning). With a peft config: a subset of the "
                  "adapter's parameters."},
    )  # fmt: skip

    # -- two-phase schedule ------------------------------------------------------------------------------------
    phase1_method: str | None = field(
        default=None, metadata={"help": "A cheap method for the first phase1_steps outer steps (e.g. hessian_free)."}
    )
    phase1_steps: int = field(default=0, metadata={"help": "Outer steps of phase 1 before switching to method."})

    # -- outer variables ---------------------------------------------------------------------------------------
    project_group_shift: bool = field(
        default=True,
        metadata={"help": "Grouped weights (--balance_column): drop from the meta gradient the directions that "
                  "only shift each group's share, so a row earns credit beyond its answer (docs/value.md)."},
    )  # fmt: skip
    normalize_hypergradient: bool = field(
        default=False,
        metadata={"help": "Divide the outer gradient by its norm before the outer optimizer: with optim='sgd' "
                  "every outer step moves φ by learning_rate, whatever the hypergradient's scale, and the weights "
                  "keep their relative magnitudes (Adam's per-coordinate scaling reduces a row seen a few times to "
                  "the signs of its hypergradients)."},
    )  # fmt: skip
    weight_regularization: str = field(
        default="none", metadata={"help": f"Penalty on learned weights, one of {REGULARIZERS}."}
    )
    weight_regularization_coef: float = field(default=0.0, metadata={"help": "Coefficient of the penalty."})
    nonfinite_policy: str = field(
        default="skip",
        metadata={"help": "On a NaN/inf loss or hypergradient: 'skip' the outer update with a warning (θ is "
                  "kept from before the step), or 'stop' with an error."},
    )  # fmt: skip
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow an output_dir that holds files of something other than an hf_fg2u run (they may "
                  "be replaced). Without it such a folder is refused."},
    )  # fmt: skip
    model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments (JSON) for from_pretrained when the model is given by name."},
    )

    # -- data -------------------------------------------------------------------------------------------------
    max_length: int | None = field(
        default=512,
        metadata={"help": "Raw datasets (text, prompt + completion, messages) are tokenized by the trainer and cut "
                  "at this many tokens (a warning counts the rows cut); None keeps every token."},
    )  # fmt: skip
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "A raw row over max_length: keep_start cuts its end (as TRL), keep_end its start, drop "
                  "leaves it out; counted.", "choices": ["keep_start", "keep_end", "drop"]},
    )  # fmt: skip
    dataset_text_field: str = field(
        default="text", metadata={"help": "Column of plain-text rows in a raw dataset (language-modelling format)."}
    )

    # -- Trainer defaults that suit outer steps ------------------------------------------------------------------
    learning_rate: float = field(default=0.1, metadata={"help": "Outer learning rate (of φ)."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N outer steps."})

    def __post_init__(self):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
            # `accelerate launch` with a multi-GPU config on a machine without GPUs: run the ranks on CPU (gloo).
            self.use_cpu = True
        check_deepspeed_installed(self)  # the Trainer's own check is a raw PackageNotFoundError
        super().__post_init__()
        check_optimizer_installed(self)
        if self.use_cpu or not _has_accelerator():
            self.dataloader_pin_memory = False  # torch warns that pinning needs an accelerator, once per loader
        self._check_choices()
        self._check_counts()
        self._check_numbers()
        self._check_combinations()
        if isinstance(self.model_init_kwargs, str):
            try:
                self.model_init_kwargs = json.loads(self.model_init_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(f"model_init_kwargs is not valid JSON: {error}") from error

    def _check_choices(self) -> None:
        """Every named option is one of its choices, and the process split suits the methods."""
        check_choice("method", self.method, CONFIG_METHODS)
        check_choice("jvp", self.jvp, JVP_MODES)
        check_choice("directions", self.directions, DIRECTIONS)
        check_choice("zo_scheme", self.zo_scheme, ZO_SCHEMES)
        check_choice("inner_optimizer", self.inner_optimizer, sorted(INNER_OPTIMIZERS))
        check_choice("nonfinite_policy", self.nonfinite_policy, NONFINITE_POLICIES)
        check_choice("weight_regularization", self.weight_regularization, REGULARIZERS)
        check_choice("process_split", self.process_split, PROCESS_SPLITS)
        unsupported = [
            m for m in (self.method, self.phase1_method) if m in METHODS and not METHOD_SPECS[m].data_parallel
        ]
        if self.process_split == "data" and unsupported:
            raise ValueError(
                f"process_split='data' averages inner gradients (and their tangents or VJPs) across processes, which "
                f"{data_parallel_methods()} do; got {unsupported}. Use process_split='directions' (every method), "
                "or one of those methods."
            )
        if self.phase1_method is not None:
            check_choice("phase1_method", self.phase1_method, METHODS)

    def _check_counts(self) -> None:
        """Counts are positive (or zero where 0 means off)."""
        names = ("num_directions", "directions_per_pass", "unroll_steps", "meta_batch_size", "truncation",
                 "implicit_steps", "per_device_train_batch_size", "per_device_eval_batch_size")  # fmt: skip
        for name in (*names, "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        for name in ("inner_reset_every", "inner_reset_patience", "inner_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 = off).")
        check_trains_a_step(self)
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2 (a token and the one it predicts) or None.")

    def _check_combinations(self) -> None:
        """Trainer options that the bilevel step cannot honour: refused here, not silently ignored."""
        if (self.fp16 or self.bf16) and (self.use_cpu or not _has_accelerator()):
            raise ValueError(
                f"fp16={self.fp16}, bf16={self.bf16} on CPU: the bilevel step computes in the model's own dtype, "
                "so mixed precision would silently do nothing. Set fp16=False and bf16=False, or load the model "
                'in the dtype you want (model_init_kwargs=\'{"dtype": "bfloat16"}\').'
            )
        if self.phase1_steps < 0 or (self.phase1_steps > 0 and self.phase1_method is None):
            raise ValueError(
                f"phase1_steps={self.phase1_steps} needs phase1_method (e.g. 'hessian_free') and must be >= 0."
            )
        if self.gradient_accumulation_steps != 1:
            raise ValueError(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps}: one Trainer step is one outer "
                "step here. Raise meta_batch_size, num_directions or unroll_steps instead, and keep it at 1."
            )
        if self.auto_find_batch_size:
            raise ValueError("auto_find_batch_size is not supported; set per_device_train_batch_size yourself.")
        if self.memory_budget_mb is not None and not self.memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb={self.memory_budget_mb} must be > 0 (MB), or None to measure it.")
        second_order = {self.method_is_second_order(m) for m in (self.method, self.phase1_method) if m}
        if self.gradient_checkpointing:
            # Every method calls the model through torch.func (grad, jvp or vmap), which checkpointing breaks.
            raise ValueError(
                "gradient_checkpointing=True does not compose with the torch.func transforms every method uses "
                "(the Trainer would turn it on after the checks, and step 1 would fail). Set it to False: fg2u's "
                "memory does not grow with the unroll; lower directions_per_pass or the batch to save memory."
            )
        if (self.fsdp or self.deepspeed) and True in second_order:
            raise ValueError(
                "FSDP / DeepSpeed shard parameters, which forward-mode and double-backward passes cannot call "
                "functionally. Use plain data parallelism (accelerate multi-GPU without FSDP/ZeRO-3), or "
                "jvp='finite_difference', or a first-order method ('hessian_free', 'fg2u_zo')."
            )

    def method_is_second_order(self, method: str) -> bool:
        """Whether ``method`` needs forward AD or double backward; 'auto' may pick rgu, so it does."""
        return method == "auto" or needs_second_order(method, self.jvp)

    def _check_numbers(self) -> None:
        """Ranges of the numeric knobs: a NaN or inf here turns φ or θ into NaN with no other warning."""
        _check_range("inner_lr", self.inner_lr, 0.0, math.inf, low_open=True)
        _check_range("learning_rate", self.learning_rate, 0.0, math.inf)  # 0: φ frozen (a uniform baseline)
        if self.neumann_lr is not None:
            _check_range("neumann_lr", self.neumann_lr, 0.0, math.inf, low_open=True)
        _check_range("zo_epsilon", self.zo_epsilon, 0.0, math.inf, low_open=True)
        _check_range("cg_damping", self.cg_damping, 0.0, math.inf)
        for name in ("inner_momentum", "inner_beta1", "inner_beta2", "adam_beta1", "adam_beta2"):
            _check_range(name, getattr(self, name), 0.0, 1.0)
        for name in ("inner_weight_decay", "weight_decay", "max_grad_norm"):
            _check_range(name, getattr(self, name), 0.0, math.inf)
        _check_range("adam_epsilon", self.adam_epsilon, 0.0, math.inf, low_open=True)
        _check_range("inner_eps", self.inner_eps, 0.0, math.inf, low_open=True)
        _check_range("inner_eps_root", self.inner_eps_root, 0.0, math.inf)
        # Above float32's range the penalty's gradient is inf for every φ.
        _check_range("weight_regularization_coef", self.weight_regularization_coef, 0.0, FLOAT32_MAX, high_open=False)

    def redacted(self) -> BilevelConfig:
        """A copy without credentials (hub_token, tokens inside model_init_kwargs): what may be written or pushed."""
        return redacted_args(self)

    def to_dict(self) -> dict:
        """The Trainer's dict of the args (what report_to integrations log), credentials redacted."""
        return redact(super().to_dict())

    def method_at(self, outer_step: int) -> str:
        """The method of outer step ``outer_step`` under the two-phase schedule."""
        if self.phase1_method is not None and outer_step < self.phase1_steps:
            return self.phase1_method
        return self.method

    def inner_optimizer_kwargs(self) -> dict:
        if self.inner_optimizer == "momentum":
            return {
                "beta": self.inner_momentum,
                "nesterov": self.inner_nesterov,
                "weight_decay": self.inner_weight_decay,
            }
        if self.inner_optimizer == "adam":
            return {"betas": (self.inner_beta1, self.inner_beta2), "eps": self.inner_eps,
                    "eps_root": self.inner_eps_root, "weight_decay": self.inner_weight_decay}  # fmt: skip
        return {"weight_decay": self.inner_weight_decay}

    @classmethod
    def from_recipe(cls, name: str, **overrides) -> BilevelConfig:
        """The config of packaged recipe ``name`` (``hf_fg2u/recipes/NAME.yaml``, what ``hf-fg2u train --recipe
        NAME`` runs), ``overrides`` applied: ``BilevelConfig.from_recipe("noisy_reweighting_real", output_dir="w")``.

        Only the YAML's config fields are read; its recipe, data and model keys (``outer``, ``max_length``,
        ``lora_r``, ``builtin_data``, ...) belong to the CLI's other argument groups. An override that is no field of
        this config, or an unknown recipe, is a ValueError."""
        fields = {field.name for field in dataclasses.fields(cls) if field.init}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            hints = {key: difflib.get_close_matches(key, fields, n=1) for key in unknown}
            hint = "; ".join(f"{key!r}: did you mean {match[0]!r}?" for key, match in hints.items() if match)
            raise ValueError(
                f"{cls.__name__}.from_recipe({name!r}) got overrides {unknown}, which are not fields of "
                f"{cls.__name__}{' (' + hint + ')' if hint else ''}. Pass fields of {cls.__name__} only."
            )
        values = {key: value for key, value in recipe_values(name).items() if key in fields}
        return cls(**{**values, **overrides})

    def bilevel_fields(self) -> dict:
        """The bilevel part of the config (for checkpoints and the model card), credentials redacted."""
        names = [f for f in BilevelConfig.__dataclass_fields__ if f not in TrainingArguments.__dataclass_fields__]
        return redact({name: getattr(self, name) for name in names})


def _document_fields(cls: type[BilevelConfig]) -> None:
    """Append every bilevel field (type, default, help) and the Trainer defaults it changes to the docstring, as
    TRL's configs document theirs, from one source: the fields' metadata."""
    base = TrainingArguments.__dataclass_fields__
    lines = ["", "    Parameters:"]
    for name, spec in cls.__dataclass_fields__.items():
        if name in base:
            continue
        kind = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", str(spec.type))
        lines.append(f"        {name} (``{kind}``, defaults to ``{spec.default!r}``):")
        lines.append(f"            {spec.metadata.get('help', '')}")
    changed = [(name, base[name].default, spec.default) for name, spec in cls.__dataclass_fields__.items()
               if name in base and spec.default != base[name].default]  # fmt: skip
    lines += ["", "    Trainer defaults changed here:"]
    lines += [f"        {name}: ``{old!r}`` -> ``{new!r}`` ({cls.__dataclass_fields__[name].metadata.get('help', '')})"
              for name, old, new in changed]  # fmt: skip
    cls.__doc__ = (cls.__doc__ or "") + "\n".join(lines) + "\n"


_document_fields(BilevelConfig)
