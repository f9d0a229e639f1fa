"""The recipes behind ``hf-fg2u train`` (TRL-style: script, training and model arguments, YAML + CLI).

    hf-fg2u train --recipe noisy_reweighting                  # the packaged YAML: offline default
    hf-fg2u train --recipe noisy_reweighting --max_steps 10   # CLI flags override the YAML
    hf-fg2u train --config my_run.yaml                        # your own YAML (typed values, an env: block)
    hf-fg2u train --recipe noisy_reweighting --model_name_or_path HuggingFaceTB/SmolLM2-135M \\
        --data_files train=train.jsonl meta=meta.jsonl eval=eval.jsonl   # your model and your files

Recipes: ``noisy_reweighting`` (ExampleWeights or WeightNet on data with a corrupted subset),
``domain_mixture`` (DomainWeights, meta data from one target domain), ``soft_prompt`` (SoftPrompt outer,
LoRA inner). Without ``--model_name_or_path`` a tiny Llama is built from config; without ``--dataset_name`` or
``--data_files`` the package generates data with known structure (``hf_fg2u.lm.toy_data``). Your data may be in any
format ``BilevelTrainer`` tokenizes (``text``, ``prompt`` + ``completion``, ``messages``; see ``hf_fg2u.lm.formats``).
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path

import torch
from datasets import DatasetDict
from transformers import TrainerCallback

from hf_fg2u.cli.arguments import ModelArguments, ScriptArguments
from hf_fg2u.cli.data_loading import user_splits, uses_own_data
from hf_fg2u.cli.models import check_model_arguments, load_model_and_tokenizer, lora_config
from hf_fg2u.cli.registry import RECIPES, builtin_splits, make_outer, with_meta_groups
from hf_fg2u.hub.model_card import WEIGHTED_DATASET_FILE
from hf_fg2u.lm.data_checks import EvalInMetaWarning, MetaInTrainWarning
from hf_fg2u.lm.evaluation import auroc
from hf_fg2u.outer import DomainWeights
from hf_fg2u.trainer.bilevel import BilevelTrainer
from hf_fg2u.trainer.config import BilevelConfig


# -- main ---------------------------------------------------------------------------------------------------------
def main(script_args: ScriptArguments, training_args: BilevelConfig, model_args: ModelArguments, callbacks=()) -> dict:
    """Run one recipe; returns (and writes to ``output_dir/results.json``) its headline numbers. ``callbacks``
    (``TrainerCallback``s) are added to the bilevel run's trainer."""
    output_dir = Path(training_args.output_dir)
    quiet_replicas(training_args.process_index)
    resume = resume_target(training_args.resume_from_checkpoint)
    check_model_arguments(model_args)
    raw = user_splits(script_args) if uses_own_data(script_args) else builtin_splits(script_args)
    results, runs = {}, {}
    for name in ("bilevel", "uniform") if script_args.compare_uniform else ("bilevel",):
        args = training_args
        if name == "uniform":  # the same budget with φ frozen: what plain fine-tuning would give
            frozen = {"learning_rate": 0.0, "method": "hessian_free", "phase1_method": None, "phase1_steps": 0,
                      "project_group_shift": False}  # fmt: skip
            # A resumed run trains its uniform baseline again from the start: over what an interrupted one left.
            overwrite = training_args.overwrite_output_dir or resume is not None
            args = clone_config(training_args, output_dir=str(output_dir / "uniform"), push_to_hub=False,
                                overwrite_output_dir=overwrite, **frozen)  # fmt: skip
        trainer = build_trainer(script_args, args, model_args, raw)
        if script_args.time_budget_s is not None:
            trainer.add_callback(TimeBudget(script_args.time_budget_s))
        for callback in callbacks if name == "bilevel" else ():
            trainer.add_callback(callback)
        if name == "bilevel" and trainer.outer.weighs_rows:
            trainer.add_callback(EpochWeights(trainer))
        if trainer.is_world_process_zero():
            print(run_banner(script_args, args, name, trainer))
        trainer.train(resume_from_checkpoint=resume if name == "bilevel" else None)
        # "final_meta": the per-step train logs already use meta_loss; one tag per meaning
        final = trainer.evaluate(trainer.meta_dataset, metric_key_prefix="final_meta")
        results[f"{name}_meta_loss"] = final["final_meta_loss"]
        results[f"{name}_outer_steps"] = trainer.state.global_step
        if "eval" in raw:  # held out: neither trained on nor used by the outer objective
            results[f"{name}_eval_loss"] = trainer.evaluate()["eval_loss"]
        runs[name] = trainer
    trainer = runs["bilevel"]
    after_training = RECIPES[script_args.recipe].after_training
    if after_training is not None:
        results.update(after_training(script_args, raw, trainer))
    results.update(summarize(script_args, raw, trainer, results, output_dir))
    if script_args.plot and trainer.args.should_save:
        from hf_fg2u.hub.report import meta_loss_history, plot_meta_loss_curves

        curves = {name: meta_loss_history(run.state.log_history) for name, run in runs.items()}
        if any(curves.values()):  # nothing is logged with logging_strategy="no"
            results["meta_loss_plot"] = str(plot_meta_loss_curves(curves, output_dir / "meta_loss.png"))
    trainer.save_model()  # after the plots: the card shows them and push_to_hub (if set) uploads them
    if script_args.final_stage_steps and trainer.outer.weighs_rows:
        results.update(final_stage(script_args, training_args, model_args, trainer))
    if trainer.args.should_save:
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    trainer.accelerator.end_training()  # under several processes: destroy the process group before exit
    return results


def resume_target(value: str | None) -> str | bool | None:
    """``--resume_from_checkpoint``: ``true`` for the output_dir's latest checkpoint, or a checkpoint folder that
    must exist (checked before the model loads); the Trainer reads every file of it before resuming."""
    if value is None or str(value).lower() == "false":
        return None
    if str(value).lower() == "true":
        return True
    if not Path(value).is_dir():
        raise ValueError(f"--resume_from_checkpoint {value!r} is not a folder. Pass a checkpoint-N folder of the "
                         "run, or true for the output_dir's latest one.")  # fmt: skip
    return str(value)


def quiet_replicas(process_index: int) -> None:
    """Ranks other than the first print no Python warnings or progress bars of datasets: every rank sees the same
    data and settings, so they would repeat the first one's word for word (the Trainer's log_level_replica does the
    same for its logs)."""
    if process_index > 0:
        import datasets

        warnings.simplefilter("ignore")
        datasets.disable_progress_bars()  # the tokenization's "Map" bars


def run_banner(script_args, args: BilevelConfig, name: str, trainer) -> str:
    """The first lines of a run: processes and backend, what runs, and whether a uniform run follows."""
    lines = []
    if name == "bilevel":
        backend = trainer.accelerator.state.backend or "none"
        lines.append(
            f"[hf_fg2u] {args.world_size} process{'es' if args.world_size > 1 else ''}, backend {backend}, "
            f"device {args.device.type}"
        )
    steps = f"{args.max_steps} outer steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"
    line = f"[hf_fg2u] {script_args.recipe}: {name} run ({steps}, method {args.method})"
    if name == "bilevel":
        line += (
            "; then the same budget on uniform weights (compare_uniform true: twice the time)"
            if script_args.compare_uniform
            else "; no uniform-weights baseline (--compare_uniform true adds one)"
        )
    return "\n".join(lines + [line])


EPOCHS_FOLDER = "epochs"  # output_dir/epochs/weighted_dataset_epoch{k}.parquet
KEPT_EPOCHS = 5  # the first epoch's weights and the last 5 are kept: a long run writes 6 files, not one an epoch


def epoch_weights_file(epoch: int) -> str:
    """Where epoch ``epoch``'s weights go, relative to the run's output_dir."""
    return f"{EPOCHS_FOLDER}/weighted_dataset_epoch{epoch}.parquet"


class EpochWeights(TrainerCallback):
    """What every epoch of a run that weights rows did, in ``epochs.json``: the mean meta loss of its outer steps,
    the eval loss after it (with ``eval_strategy="epoch"``), and, when the train rows carry ``is_corrupted``, the
    weights' AUROC (also logged as ``auroc_corrupted``). The weights after epoch k go to
    ``epochs/weighted_dataset_epoch{k}.parquet`` (``epoch_weights_file``): a fine-tune can start from any kept
    epoch's. The first epoch's and the last ``KEPT_EPOCHS`` epochs' are kept; each record's ``weights`` names its
    file, or is None once it was removed."""

    def __init__(self, trainer: BilevelTrainer):
        self.trainer, self.epochs = trainer, []

    def on_epoch_end(self, args, state, control, **kwargs):
        epoch = round(state.epoch)
        start = self.epochs[-1]["step"] if self.epochs else 0
        meta = [log["meta_loss"] for log in state.log_history if "meta_loss" in log and log["step"] > start]
        record = {"epoch": epoch, "step": state.global_step, "meta_loss": sum(meta) / len(meta) if meta else None}
        weighted = self.trainer.export_weights()
        if args.should_save:
            output_dir = Path(args.output_dir)
            (output_dir / EPOCHS_FOLDER).mkdir(parents=True, exist_ok=True)
            weighted.to_parquet(str(output_dir / epoch_weights_file(epoch)))
            if epoch - KEPT_EPOCHS > 1:  # the epoch that just left the window of kept ones
                (output_dir / epoch_weights_file(epoch - KEPT_EPOCHS)).unlink(missing_ok=True)
        if "is_corrupted" in weighted.column_names:
            record["auroc_corrupted"] = auroc(-torch.tensor(weighted["weight"]), torch.tensor(weighted["is_corrupted"]))
            self.trainer.log({"auroc_corrupted": record["auroc_corrupted"]})
        self.epochs.append(record)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.epochs and self.epochs[-1]["step"] == state.global_step and "eval_loss" in (metrics or {}):
            self.epochs[-1]["eval_loss"] = metrics["eval_loss"]

    def on_train_end(self, args, state, control, **kwargs):
        if args.should_save and self.epochs:
            output_dir = Path(args.output_dir)
            for record in self.epochs:
                name = epoch_weights_file(record["epoch"])
                record["weights"] = name if (output_dir / name).is_file() else None
            (output_dir / "epochs.json").write_text(json.dumps(self.epochs, indent=2))


class TimeBudget(TrainerCallback):
    """Ends training after the step during which ``seconds`` of training have passed. Under several processes
    rank 0's clock decides for all: ranks that stopped at different steps would wait on each other's collectives
    for ever."""

    def __init__(self, seconds: float):
        if not seconds > 0:
            raise ValueError(f"time_budget_s={seconds} must be > 0 seconds.")
        self.seconds, self.start = seconds, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        over = torch.tensor([float(time.perf_counter() - self.start >= self.seconds)], device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(over, src=0)
        if over.item():
            if state.is_world_process_zero:
                print(f"[hf_fg2u] time budget of {self.seconds:g} s reached after {state.global_step} outer steps")
            control.should_training_stop = True
            control.should_log = args.logging_strategy != "no"  # the last step's metrics, as at max_steps


def build_trainer(script_args, training_args: BilevelConfig, model_args: ModelArguments, raw: DatasetDict):
    """A BilevelTrainer for a recipe's raw splits (the built-in ones too: the trainer tokenizes every split by its
    format): model, tokenizer, outer module, LoRA."""
    raw = with_meta_groups(script_args, raw, training_args.project_group_shift)  # refused before the model loads
    model, tokenizer = load_model_and_tokenizer(model_args, training_args.seed, training_args.model_init_kwargs)
    with warnings.catch_warnings():
        for category in own_overlaps(script_args, raw):
            warnings.simplefilter("ignore", category)
        trainer = BilevelTrainer(
            model, training_args, train_dataset=raw["train"], meta_dataset=raw["meta"],
            eval_dataset=raw.get("eval", raw["meta"]), outer=make_outer(script_args, raw, model),
            processing_class=tokenizer, peft_config=lora_config(model_args),
        )  # fmt: skip
    # The card's `datasets` metadata (Hub names only; local files and folders are left out there).
    trainer.card_datasets = [name for name in (script_args.dataset_name, script_args.meta_dataset_name) if name]
    return trainer


def own_overlaps(script_args, raw: DatasetDict) -> list[type[Warning]]:
    """The split overlaps this script sets up itself, so not worth a warning on every run: the meta rows as eval
    rows when there is no eval split, and the built-in data's meta rows, which are clean copies of train facts."""
    overlaps = [] if "eval" in raw else [EvalInMetaWarning]
    return overlaps if uses_own_data(script_args) else [*overlaps, MetaInTrainWarning]


def final_stage(script_args, training_args, model_args, trainer) -> dict[str, float]:
    """Train a fresh adapter on the train data weighted by the learned weights (saved in final_adapter/); returns
    its losses by split (``final_adapter_meta_loss``, ...). With a held-out eval split, a second fresh adapter on
    uniform weights gets the same budget and both are scored there: the check, on data the outer loop never saw,
    that the learned weights are worth having (they are not when they fitted the meta split's noise)."""
    from transformers import TrainingArguments

    from hf_fg2u.trainer.weighted_loss import train_final_adapter

    output_dir = Path(training_args.output_dir) / "final_adapter"
    tokenized, meta, heldout = trainer.train_dataset, trainer.meta_dataset, trainer.eval_dataset  # same tokenizer
    learned = trainer.dataset_weights(tokenized).tolist()
    selections = {"final_adapter": learned}
    if heldout is not None:
        selections["uniform_adapter"] = [1.0] * len(learned)
    if trainer.is_world_process_zero():  # under several processes the ranks train this adapter together (DDP)
        also = " (and one on uniform weights, both scored on the eval split)" if heldout is not None else ""
        print(f"[hf_fg2u] final stage: a fresh adapter, {script_args.final_stage_steps} steps of weighted loss{also}")
    splits = {"meta": meta} | ({"eval": heldout} if heldout is not None else {})
    results = {}
    for name, weights in selections.items():
        model, tokenizer = load_model_and_tokenizer(model_args, training_args.seed, training_args.model_init_kwargs)
        args = TrainingArguments(
            output_dir=str(output_dir if name == "final_adapter" else output_dir / name),
            max_steps=script_args.final_stage_steps, learning_rate=training_args.inner_lr,
            per_device_train_batch_size=training_args.per_device_train_batch_size, report_to=[], save_strategy="no",
            logging_steps=training_args.logging_steps, seed=training_args.seed, use_cpu=training_args.use_cpu,
            disable_tqdm=training_args.disable_tqdm, dataloader_pin_memory=training_args.dataloader_pin_memory,
        )  # fmt: skip
        final = train_final_adapter(
            model, tokenized.add_column("weight", weights), lora_config(model_args), args, processing_class=tokenizer,
            eval_dataset=splits,
        )  # fmt: skip
        if name == "final_adapter":
            final.save_model()
        scores = final.evaluate()
        results.update({f"{name}_{split}_loss": scores[f"eval_{split}_loss"] for split in splits})
    if heldout is not None and results["final_adapter_eval_loss"] >= results["uniform_adapter_eval_loss"]:
        warnings.warn(
            f"The fresh adapter on the learned weights has no lower eval loss than one on uniform weights "
            f"({results['final_adapter_eval_loss']:.4f} vs {results['uniform_adapter_eval_loss']:.4f}): the weights "
            "did not generalise beyond the meta split. Use more meta rows, or train on uniform weights: the train "
            "data may hold nothing that the meta split tells apart.",
            stacklevel=2,
        )
    return results


def summarize(script_args, raw, trainer, results, output_dir: Path) -> dict:
    """Headline numbers and the weighted dataset / plots of the run. Every process gets the numbers; only the
    main one writes files (several processes share output_dir)."""
    out = {"output_dir": str(output_dir.resolve())}
    writes = trainer.args.should_save
    if "uniform_meta_loss" in results:
        out["meta_loss_reduction"] = 1.0 - results["bilevel_meta_loss"] / results["uniform_meta_loss"]
    if trainer.outer.weighs_rows:
        weighted = trainer.export_weights()  # the user's columns and a weight, no token ids
        if writes:
            output_dir.mkdir(parents=True, exist_ok=True)  # one copy: the file push_to_hub uploads too
            weighted.to_parquet(str(output_dir / WEIGHTED_DATASET_FILE))
        corrupted = torch.tensor(weighted["is_corrupted"]) if "is_corrupted" in weighted.column_names else None
        if corrupted is not None and 0 < int(corrupted.sum()) < len(corrupted):  # both kinds: an AUROC exists
            out["auroc_corrupted"] = auroc(-torch.tensor(weighted["weight"]), corrupted)
            if script_args.plot and writes:
                from hf_fg2u.hub.report import plot_weight_histogram

                path = plot_weight_histogram(
                    weighted["weight"], weighted["is_corrupted"], output_dir / "weights_histogram.png"
                )
                out["histogram"] = str(path)
    if isinstance(trainer.outer, DomainWeights):
        out["domain_weights"] = trainer.outer.probabilities()
    return out


def clone_config(config: BilevelConfig, **changes) -> BilevelConfig:
    """A copy of ``config`` with ``changes``, validated again by ``__post_init__``."""
    return dataclasses.replace(config, **changes)
