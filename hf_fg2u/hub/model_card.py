"""The model card (README.md) of a saved bilevel run, built with ``huggingface_hub.ModelCard``/``ModelCardData``
(which render and check the metadata, as TRL's cards do): what was learned, how, with which versions, and a
quick start that loads the run."""

from __future__ import annotations

import json
from pathlib import Path

import accelerate
import datasets
import peft
import torch
import transformers
from huggingface_hub import ModelCard, ModelCardData

import hf_fg2u

PLOT_NAME = "weights_histogram.png"  # written by the noisy_reweighting recipe (hf_fg2u.hub.report) beside the card
WEIGHTED_DATASET_FILE = "weighted_dataset.parquet"  # written by BilevelTrainer.push_to_hub

BODY = """
# {model_name}

Outer variables **{outer_type}** learned by bilevel meta-tuning with [hf_fg2u](https://github.com/hf-fg2u/hf_fg2u),
method **{method}**{phase}, inner variables: the LoRA adapter of this run{base}.

## Quick start

```python
{snippet}
```

## Files

- `adapter_config.json`, `adapter_model.safetensors`: the inner LoRA adapter (plain peft).
- `outer_config.json`, `outer_model.safetensors`: the outer variables (`OuterModule.from_pretrained`).
{weighted_dataset}
## Learned outer variables

{summary}{plot}
{rater}
## Final metrics

{metrics}

## Bilevel configuration

```json
{config}
```

## Versions

hf_fg2u {hf_fg2u}, transformers {transformers}, peft {peft}, torch {torch}, accelerate {accelerate},
datasets {datasets}.

## Citation

(FG)²U — {paper_title}, arXiv [{paper_id}](https://arxiv.org/abs/{paper_id}):

```bibtex
{citation}
```
"""

SNIPPET = """from hf_fg2u.hub.load import load_run

run = load_run("{location}")  # base model + LoRA adapter + outer variables + tokenizer, from the Hub or a folder
print(type(run.outer).__name__, run.outer.summary())

# or piece by piece, the adapter with plain peft:
from peft import AutoPeftModelForCausalLM
from hf_fg2u.outer import OuterModule

model = AutoPeftModelForCausalLM.from_pretrained("{location}"{base_kwargs})
outer = OuterModule.from_pretrained("{location}")"""


def quick_start(location: str, base: str | None, gguf_file: str | None = None) -> str:
    """The snippet that loads the run; where the adapter names no base model it says what to pass, and a base
    loaded from a GGUF file is named to peft (which passes ``gguf_file`` on to the base's ``from_pretrained``)."""
    snippet = SNIPPET.format(location=location, base_kwargs=f", gguf_file={json.dumps(gguf_file)}" if gguf_file else "")
    if not base:
        return "# This adapter names no base model: pass load_run(..., base_model=your_model).\n" + snippet
    return snippet


# Logged numbers that describe the machine or the schedule, not the run's result: left off the card.
NOT_RESULTS = ("step", "epoch", "loss", "learning_rate", "total_flos")
NOT_RESULT_SUFFIXES = ("_runtime", "_per_second", "_seconds")


def final_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last logged value of every numeric metric that says how the run did (train and eval): no timings,
    FLOPs or learning rate, and not ``loss`` (the Trainer's copy of ``meta_loss``)."""
    metrics = {}
    for entry in log_history:
        for key, value in entry.items():
            if isinstance(value, int | float) and key not in NOT_RESULTS and not key.endswith(NOT_RESULT_SUFFIXES):
                metrics[key] = value
    return metrics


def hub_name(name: str | None) -> str | None:
    """``name`` when it can be a Hub repo id (``org/model``), else None: a local path means nothing to a reader of
    the card and the Hub rejects it as metadata (TRL leaves it out too)."""
    if not name or Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    return name


def method_config(args) -> dict:
    """The bilevel configuration without the options of hypergradient methods that did not run (an rgu run shows
    no zo_epsilon or cg_damping)."""
    import dataclasses

    from hf_fg2u.hypergrad.methods import METHOD_SPECS

    def options(name):
        return {f.name for f in dataclasses.fields(METHOD_SPECS[name].options_type)} if name in METHOD_SPECS else set()

    ran = set().union(*(options(name) for name in (args.method, args.phase1_method)))
    others = set().union(*(options(name) for name in METHOD_SPECS)) - ran
    return {key: value for key, value in args.bilevel_fields().items() if key not in others}


def table(values: dict[str, float], empty: str) -> str:
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted(values.items())) or f"| ({empty}) | |"
    return "| name | value |\n|---|---|\n" + rows


def rater_section(outer, location: str) -> str:
    """For a data rater: what it reads, what it was learned on, how well it separated the rows, and how to score."""
    from hf_fg2u.outer import DataRater

    if not isinstance(outer, DataRater):
        return ""
    config, found = outer.config, outer.learned_on
    reads = "the log of the row's loss under this run's adapter" + (
        f" and its `{config.group_column}` ({', '.join(repr(g) for g in config.groups)})" if config.groups else ""
    )
    learned = (f"Fitted to the keep-probabilities the online loop learned for {found['rater_fit_rows']} of its "
               f"{found['rater_rows']} train rows (those an unroll reached). ") if found else ""  # fmt: skip
    separated = (f"On those rows its weights separate the rows flagged `is_corrupted` at AUROC "
                 f"{found['rater_auroc_corrupted']:.3f}. ") if "rater_auroc_corrupted" in found else ""  # fmt: skip
    return (
        f"\n## Scoring rows with this rater\n\nIt reads {reads}, never a row's id or text, and weighs "
        f"{config.row_format or 'any'} rows. {learned}{separated}Weigh rows it never saw (a weighted_dataset.parquet "
        f"that `hf-fg2u weights` and `hf-fg2u finetune` read):\n\n```bash\nhf-fg2u score {location} --data_files "
        "pool.jsonl --output_dir scored_pool\n```\n"
    )


def build_model_card(trainer, directory: Path, model_name: str | None = None, **kwargs) -> ModelCard:
    """The card of ``trainer``'s run saved in ``directory``. The config holds only bilevel fields, never a token.
    The quick start names the Hub repo when the run is pushed, else the folder."""
    args = trainer.args
    base = trainer.model_name
    dataset = kwargs.get("dataset") or kwargs.get("dataset_name") or getattr(trainer, "card_datasets", None)
    datasets_meta = [d for d in ([dataset] if isinstance(dataset, str) else dataset or []) if hub_name(d)]
    data = ModelCardData(
        base_model=hub_name(base), library_name="peft", pipeline_tag="text-generation",
        datasets=datasets_meta or None, license=kwargs.get("license") or getattr(trainer, "card_license", None),
        tags=sorted({*trainer._tag_names, *(kwargs.get("tags") or []), type(trainer.outer).__name__.lower()}),
    )  # fmt: skip
    location = args.hub_model_id if args.push_to_hub and args.hub_model_id else str(Path(directory).resolve())
    has_weighted = (Path(directory) / WEIGHTED_DATASET_FILE).is_file()
    body = BODY.format(
        model_name=model_name or Path(args.output_dir).name,
        outer_type=type(trainer.outer).__name__,
        method=args.method,
        phase=f" (after {args.phase1_steps} steps of {args.phase1_method})" if args.phase1_method else "",
        base=f" on top of `{base}`" if base else "",
        snippet=quick_start(location, base, getattr(getattr(trainer.model, "config", None), "gguf_file", None)),
        weighted_dataset=f"- `{WEIGHTED_DATASET_FILE}`: the training rows with their learned `weight` column "
        "and `scored` (False: the row never entered an unroll and keeps its starting weight) "
        '(`datasets.load_dataset("parquet", data_files=...)`). A plain `Trainer` or TRL\'s `SFTTrainer` drops '
        "`weight`: train with `hf_fg2u.WeightedLossMixin` or `hf-fg2u finetune`.\n" if has_weighted else "",
        summary=table(trainer.outer.summary(), "no summary for this outer module"),
        rater=rater_section(trainer.outer, location),
        plot=f"\n\n![learned weights]({PLOT_NAME})" if (Path(directory) / PLOT_NAME).is_file() else "",
        metrics=table(final_metrics(trainer.state.log_history), "none yet"),
        config=json.dumps(method_config(args), indent=2, default=str),
        hf_fg2u=hf_fg2u.__version__, transformers=transformers.__version__, peft=peft.__version__,
        torch=torch.__version__, accelerate=accelerate.__version__, datasets=datasets.__version__,
        paper_title=trainer._paper["title"], paper_id=trainer._paper["id"], citation=trainer._paper["citation"],
    )  # fmt: skip
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_model_card(trainer, directory: Path, model_name: str | None = None, **kwargs) -> Path:
    """Write ``directory/README.md`` for ``trainer``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "README.md"
    build_model_card(trainer, directory, model_name, **kwargs).save(path)
    return path
