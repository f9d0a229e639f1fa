"""The recipes behind ``hf-fg2u train`` (TRL-style: script, training and model arguments, YAML + CLI).

    hf-fg2u train --recipe noisy_reweighting                  # the packaged YAML: offline default
    hf-fg2u train --recipe noisy_reweighting --max_steps 10   # CLI flags override the YAML
    hf-fg2u train --config my_run.yaml                        # your own YAML (typed values, an env: block)
    hf-fg2u train --recipe noisy_reweighting --model_name_or_path HuggingFaceTB/SmolLM2-135M \\
        --dataset_name my/noisy-data --dataset_meta_split validation      # real model and data (needs the Hub)

Recipes: ``noisy_reweighting`` (ExampleWeights or WeightNet on data with a corrupted subset),
``domain_mixture`` (DomainWeights, meta data from one target domain), ``soft_prompt`` (SoftPrompt outer,
LoRA inner). Without ``--model_name_or_path`` a tiny Llama is built from config; without ``--dataset_name``
the package generates data with known structure (``hf_fg2u.data``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import DatasetDict, load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from . import data as builtin_data
from .config import BilevelConfig
from .launch import add_launch_arguments
from .outer import DomainWeights, ExampleWeights, SoftPrompt, WeightNet
from .parsing import ConfigParser
from .trainer import BilevelTrainer, auroc

RECIPES = ("noisy_reweighting", "domain_mixture", "soft_prompt")
RECIPES_DIR = Path(__file__).parent / "recipes"  # the YAML configs and accelerate configs, shipped as package data


@dataclass
class ScriptArguments:
    """What to learn and on which data."""

    _argument_group_name = "recipe: what to learn and on which data"

    recipe: str = field(default="noisy_reweighting", metadata={"help": f"One of {RECIPES}."})
    outer: str = field(
        default="example_weights",
        metadata={"help": "noisy_reweighting only: 'example_weights' (a weight per example) or 'weight_net'."},
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A datasets name/path; default: built-in data."})
    dataset_config: str | None = field(default=None, metadata={"help": "The dataset's config name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split for the inner (training) data."})
    dataset_meta_split: str = field(default="validation", metadata={"help": "Split for the meta (outer) data."})
    dataset_eval_split: str | None = field(default=None, metadata={"help": "Split for evaluation (optional)."})
    text_column: str = field(default="text", metadata={"help": "Column holding the raw text."})
    domain_column: str = field(default="domain", metadata={"help": "domain_mixture: column naming the domain."})
    target_domain: str = field(default="facts_a", metadata={"help": "domain_mixture: domain of the meta data."})
    max_length: int = field(default=10, metadata={"help": "Tokens per example (pad or truncate)."})
    answer_only: bool = field(
        default=True, metadata={"help": "Train only on the answer after '=' or '>' (built-in data); False for text."}
    )
    num_facts: int = field(default=12, metadata={"help": "Built-in data: facts (per domain)."})
    copies: int = field(default=8, metadata={"help": "Built-in data: training rows per fact."})
    corrupted_fraction: float = field(default=0.4, metadata={"help": "Built-in data: fraction of wrong rows."})
    num_domains: int = field(default=3, metadata={"help": "Built-in domain_mixture data: number of domains."})
    generation_seed: int = field(default=0, metadata={"help": "Seed of the built-in data."})
    num_virtual_tokens: int = field(default=4, metadata={"help": "soft_prompt: virtual tokens."})
    weight_net_hidden_size: int = field(default=8, metadata={"help": "weight_net: hidden units."})
    compare_uniform: bool = field(
        default=True, metadata={"help": "Also run the same budget with the outer variables frozen, and compare."}
    )
    plot: bool = field(default=True, metadata={"help": "Write PNG plots into output_dir."})
    final_stage_steps: int = field(
        default=0,
        metadata={"help": "noisy_reweighting: then train a fresh adapter for this many steps with the learned "
                  "weights as a plain weighted loss (no bilevel), saved in output_dir/final_adapter."},
    )  # fmt: skip


@dataclass
class ModelArguments:
    """Which model, and its LoRA adapter."""

    _argument_group_name = "model and its LoRA adapter"

    model_name_or_path: str | None = field(default=None, metadata={"help": "Default: a tiny Llama from config."})
    gguf_file: str | None = field(default=None, metadata={"help": "A GGUF file inside model_name_or_path."})
    attn_implementation: str = field(default="eager", metadata={"help": "eager, sdpa (math kernel is used)."})
    tiny_hidden_size: int = field(default=32, metadata={"help": "Built-in tiny model: hidden size."})
    tiny_num_layers: int = field(default=2, metadata={"help": "Built-in tiny model: layers."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        metadata={"help": "Modules that get LoRA adapters."},
    )


def make_parser() -> ConfigParser:
    """The ``hf-fg2u train`` parser: recipe options, bilevel options, model/LoRA, then the Trainer's."""
    parser = ConfigParser(
        (ScriptArguments, BilevelConfig, ModelArguments), prog="hf-fg2u train",
        usage="hf-fg2u train [--recipe NAME | --config FILE] [--num_processes N] [--OPTION VALUE ...]",
        description="Learn outer variables (data weights, a soft prompt) by bilevel meta-tuning. Without --config, "
        "the packaged YAML of --recipe gives the defaults.",
    )  # fmt: skip
    add_launch_arguments(parser.run_group)
    parser.set_defaults(output_dir="outputs/hf_fg2u")
    return parser


def recipe_config(name: str) -> Path:
    """The packaged YAML of recipe ``name`` (shipped inside the package, so it works from any directory)."""
    if name not in RECIPES:
        raise ValueError(f"recipe={name!r} is not known; use one of {RECIPES}.")
    return RECIPES_DIR / f"{name}.yaml"


def parse_args(argv: list[str] | None = None):
    """(script_args, training_args, model_args) from ``--config FILE`` or else the packaged YAML of ``--recipe``
    (default noisy_reweighting), overridden by the CLI flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    config = None
    if not any(arg == "--config" or arg.startswith("--config=") for arg in argv):
        early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        early.add_argument("--recipe", default=ScriptArguments.recipe)
        named, _ = early.parse_known_args(argv)
        config = recipe_config(named.recipe)
    script_args, training_args, model_args, *launch_options = parser.parse_args_and_config(argv, config=config)
    if launch_options:
        raise ValueError(
            f"{sorted(vars(launch_options[0]))} start processes under `hf-fg2u train` only; with recipes/train.py "
            "use `accelerate launch --config_file ... recipes/train.py ...`."
        )
    if script_args.recipe not in RECIPES:
        raise ValueError(f"recipe={script_args.recipe!r} is not known; use one of {RECIPES}.")
    return script_args, training_args, model_args


# -- model and data ---------------------------------------------------------------------------------------------
def load_model_and_tokenizer(model_args: ModelArguments, seed: int):
    if model_args.model_name_or_path is None:
        tokenizer = builtin_data.make_char_tokenizer()
        torch.manual_seed(seed)
        # initializer_range 0.2: behind RMSNorm a frozen lm_head drawn with 0.02 caps a 32-wide model's logits
        # near ±0.6, and no adapter could fit anything.
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=model_args.tiny_hidden_size,
            intermediate_size=2 * model_args.tiny_hidden_size, num_hidden_layers=model_args.tiny_num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            attn_implementation=model_args.attn_implementation, initializer_range=0.2,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        return LlamaForCausalLM(config), tokenizer
    extra = {"gguf_file": model_args.gguf_file} if model_args.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, attn_implementation=model_args.attn_implementation,
        dtype=torch.float32, **extra,
    )  # fmt: skip
    if model_args.gguf_file:
        model = dequantized_copy(model)
    return model, tokenizer


def dequantized_copy(model):
    """A GGUF-loaded model is already dequantised to fp32 but still marked quantized, which the Trainer refuses
    to train and save; rebuild the architecture from its config without the mark and load the weights."""
    config = model.config
    config.quantization_config = None
    delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation)
    fresh.load_state_dict(model.state_dict())
    return fresh.to(torch.float32)


def builtin_splits(script_args: ScriptArguments) -> DatasetDict:
    s = script_args
    if s.recipe == "noisy_reweighting":
        return builtin_data.make_fact_splits(s.num_facts, s.copies, s.generation_seed, s.corrupted_fraction)
    if s.recipe == "domain_mixture":
        return builtin_data.make_fact_domain_splits(
            s.num_domains, s.num_facts, s.copies, s.generation_seed, s.target_domain
        )
    return builtin_data.make_fact_splits(s.num_facts, s.copies, s.generation_seed, 0.0)


def hub_splits(script_args: ScriptArguments) -> DatasetDict:
    s = script_args
    loaded = load_dataset(s.dataset_name, s.dataset_config)
    missing = [x for x in (s.dataset_train_split, s.dataset_meta_split) if x not in loaded]
    if missing:
        raise ValueError(
            f"{s.dataset_name} has no split {missing} (splits: {list(loaded)}). Set --dataset_train_split and "
            "--dataset_meta_split."
        )
    splits = {"train": loaded[s.dataset_train_split], "meta": loaded[s.dataset_meta_split]}
    if s.dataset_eval_split:
        splits["eval"] = loaded[s.dataset_eval_split]
    train = splits["train"]
    if "example_id" not in train.column_names:
        splits["train"] = train.map(lambda _, i: {"example_id": i}, with_indices=True)
    return DatasetDict(splits)


def make_outer(script_args: ScriptArguments, splits: DatasetDict, model):
    s = script_args
    if s.recipe == "noisy_reweighting":
        if s.outer == "weight_net":
            return WeightNet(hidden_size=s.weight_net_hidden_size)
        if s.outer != "example_weights":
            raise ValueError(
                f"outer={s.outer!r} is not known for noisy_reweighting; use example_weights or weight_net."
            )
        return ExampleWeights(len(splits["train"]))
    if s.recipe == "domain_mixture":
        return DomainWeights(sorted(splits["train"].unique(s.domain_column)), domain_column=s.domain_column)
    hidden = model.get_input_embeddings().weight.shape[1]
    return SoftPrompt(s.num_virtual_tokens, hidden, init_std=0.5)


# -- main ---------------------------------------------------------------------------------------------------------
def main(script_args: ScriptArguments, training_args: BilevelConfig, model_args: ModelArguments) -> dict:
    """Run one recipe; returns (and writes to ``output_dir/results.json``) its headline numbers."""
    output_dir = Path(training_args.output_dir)
    raw = hub_splits(script_args) if script_args.dataset_name else builtin_splits(script_args)
    results, runs = {}, {}
    for name in ("bilevel", "uniform") if script_args.compare_uniform else ("bilevel",):
        args = training_args
        if name == "uniform":  # the same budget with φ frozen: what plain fine-tuning would give
            frozen = {"learning_rate": 0.0, "method": "hessian_free", "phase1_method": None, "phase1_steps": 0}
            args = clone_config(training_args, output_dir=str(output_dir / "uniform"), push_to_hub=False, **frozen)
        trainer = build_trainer(script_args, args, model_args, raw)
        print(f"[hf_fg2u] {script_args.recipe}: {name} run ({args.max_steps} outer steps, method {args.method})")
        trainer.train()
        results[f"{name}_meta_loss"] = trainer.evaluate()["eval_loss"]
        runs[name] = trainer
    trainer = runs["bilevel"]
    results.update(summarize(script_args, raw, trainer, results, output_dir))
    if script_args.plot and len(runs) > 1:
        from .report import meta_loss_history, plot_meta_loss_curves

        curves = {name: meta_loss_history(run.state.log_history) for name, run in runs.items()}
        results["meta_loss_plot"] = str(plot_meta_loss_curves(curves, output_dir / "meta_loss.png"))
    trainer.save_model()  # after the plots: the card shows them and push_to_hub (if set) uploads them
    if script_args.final_stage_steps and script_args.recipe == "noisy_reweighting":
        results["final_adapter_meta_loss"] = final_stage(script_args, training_args, model_args, trainer)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    trainer.accelerator.end_training()  # under several processes: destroy the process group before exit
    return results


def build_trainer(script_args, training_args: BilevelConfig, model_args: ModelArguments, raw: DatasetDict):
    """A BilevelTrainer for a recipe's raw splits: model, tokenizer, tokenized splits, outer module, LoRA."""
    model, tokenizer = load_model_and_tokenizer(model_args, training_args.seed)
    splits = builtin_data.tokenize_for_causal_lm(
        raw, tokenizer, max_length=script_args.max_length, text_column=script_args.text_column,
        answer_only=script_args.answer_only,
    )  # fmt: skip
    return BilevelTrainer(
        model, training_args, train_dataset=splits["train"], meta_dataset=splits["meta"],
        eval_dataset=splits.get("eval", splits["meta"]), outer=make_outer(script_args, raw, model),
        processing_class=tokenizer, peft_config=lora_config(model_args),
    )  # fmt: skip


def lora_config(model_args: ModelArguments) -> LoraConfig:
    """The LoRA adapter of the model arguments (the bilevel run's and the final stage's)."""
    return LoraConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
    )  # fmt: skip


def final_stage(script_args, training_args, model_args, trainer) -> float:
    """Train a fresh adapter on the train data weighted by the learned weights; returns its meta loss."""
    from transformers import TrainingArguments

    from .final_stage import train_final_adapter

    output_dir = Path(training_args.output_dir) / "final_adapter"
    model, tokenizer = load_model_and_tokenizer(model_args, training_args.seed)
    weighted, meta = trainer.export_weights(), trainer.meta_dataset  # tokenized by the same tokenizer
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=script_args.final_stage_steps, learning_rate=training_args.inner_lr,
        per_device_train_batch_size=training_args.per_device_train_batch_size, report_to=[], save_strategy="no",
        logging_steps=training_args.logging_steps, seed=training_args.seed, use_cpu=training_args.use_cpu,
        disable_tqdm=training_args.disable_tqdm,
    )  # fmt: skip
    print(f"[hf_fg2u] final stage: a fresh adapter, {script_args.final_stage_steps} steps of weighted loss")
    lora = lora_config(model_args)
    final = train_final_adapter(model, weighted, lora, args, processing_class=tokenizer, eval_dataset=meta)
    final.save_model()
    return final.evaluate()["eval_loss"]


def summarize(script_args, raw, trainer, results, output_dir: Path) -> dict:
    """Headline numbers and the weighted dataset / plots of the run."""
    out = {"output_dir": str(output_dir.resolve())}
    if "uniform_meta_loss" in results:
        out["meta_loss_reduction"] = 1.0 - results["bilevel_meta_loss"] / results["uniform_meta_loss"]
    if script_args.recipe == "noisy_reweighting":
        weighted = trainer.export_weights()
        if "text" in raw["train"].column_names:
            weighted = weighted.add_column("text", raw["train"]["text"])
        weighted.save_to_disk(str(output_dir / "weighted_dataset"))
        if "is_corrupted" in raw["train"].column_names:
            corrupted = torch.tensor(raw["train"]["is_corrupted"])
            out["auroc_corrupted"] = auroc(-torch.tensor(weighted["weight"]), corrupted)
            if script_args.plot:
                from .report import plot_weight_histogram

                path = plot_weight_histogram(
                    weighted["weight"], raw["train"]["is_corrupted"], output_dir / "weights_histogram.png"
                )
                out["histogram"] = str(path)
    if script_args.recipe == "domain_mixture":
        out["domain_weights"] = trainer.outer.probabilities()
    return out


def clone_config(config: BilevelConfig, **changes) -> BilevelConfig:
    """A copy of ``config`` with ``changes``, validated again by ``__post_init__``."""
    return dataclasses.replace(config, **changes)
