"""The model card (README.md) of a saved bilevel run: what was learned, how, with which versions."""

from __future__ import annotations

import json
from pathlib import Path

import accelerate
import datasets
import peft
import torch
import transformers

import hf_fg2u

TEMPLATE = """---
{metadata}
---

# {model_name}

Outer variables **{outer_type}** learned by bilevel meta-tuning with [hf_fg2u](https://github.com/hf-fg2u/hf_fg2u),
method **{method}**{phase}, inner variables: the LoRA adapter in this folder{base}.

## Files

- `adapter_config.json`, `adapter_model.safetensors`: the inner adapter; load with
  `PeftModel.from_pretrained(base_model, "<this folder>")`.
- `outer_config.json`, `outer_model.safetensors`: the outer variables; load with
  `hf_fg2u.outer.OuterModule.from_pretrained("<this folder>")`.

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


def final_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last logged value of every numeric metric (train and eval)."""
    metrics = {}
    for entry in log_history:
        for key, value in entry.items():
            if isinstance(value, int | float) and key not in ("step", "epoch"):
                metrics[key] = value
    return metrics


def write_model_card(trainer, directory: Path, model_name: str | None = None, **kwargs) -> Path:
    """Write ``directory/README.md`` for ``trainer``. The config holds only bilevel fields, never a token."""
    args = trainer.args
    base = trainer.model_name
    tags = sorted({*trainer._tag_names, *(kwargs.get("tags") or []), type(trainer.outer).__name__.lower()})
    metadata = {"library_name": "peft", "tags": tags}
    if base:
        metadata["base_model"] = base
    if kwargs.get("dataset"):
        metadata["datasets"] = kwargs["dataset"] if isinstance(kwargs["dataset"], list) else [kwargs["dataset"]]
    metrics = final_metrics(trainer.state.log_history)
    table = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())) or "| (none yet) | |"
    card = TEMPLATE.format(
        metadata="\n".join(f"{k}: {json.dumps(v)}" for k, v in metadata.items()),
        model_name=model_name or Path(args.output_dir).name,
        outer_type=type(trainer.outer).__name__,
        method=args.method,
        phase=f" (after {args.phase1_steps} steps of {args.phase1_method})" if args.phase1_method else "",
        base=f" on top of `{base}`" if base else "",
        metrics="| metric | value |\n|---|---|\n" + table,
        config=json.dumps(args.bilevel_fields(), indent=2, default=str),
        hf_fg2u=hf_fg2u.__version__, transformers=transformers.__version__, peft=peft.__version__,
        torch=torch.__version__, accelerate=accelerate.__version__, datasets=datasets.__version__,
        paper_title=trainer._paper["title"], paper_id=trainer._paper["id"], citation=trainer._paper["citation"],
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "README.md"
    path.write_text(card)
    return path
