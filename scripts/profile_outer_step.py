"""Where an outer step's time goes: one epoch of noisy_reweighting_real's online loop (the rows of bench_rows.py,
N = 250) with the engine's parts timed from inside — the unrolled inner steps (forward, with each step's graph
kept), the pullbacks through them, the meta gradient (with grouped weights, its answer-shift directions from the
same pass over the meta rows) — beside
one plain LoRA step of the same rows (`hf-fg2u finetune`, measured by bench_rows.py). Run nothing else meanwhile.

    .venv/bin/python scripts/profile_outer_step.py --work outputs/bench_rows_grouped \\
        --out docs/bench/outer_step_profile.json [--balance_column completion]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time
from pathlib import Path


def timed_parts():
    """Wrap the engine's parts with wall-clock timers; returns {part: [seconds, calls]}."""
    import hf_fg2u.hypergrad.reverse as reverse

    found = collections.defaultdict(lambda: [0.0, 0])

    def wrap(module, name, part):
        original = getattr(module, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                found[part][0] += time.perf_counter() - start
                found[part][1] += 1

        setattr(module, name, timed)

    wrap(reverse, "_differentiable_gradient", "inner steps (forward and backward, graph kept)")
    wrap(reverse, "primal_step", "inner steps (forward and backward, graph kept)")
    wrap(reverse, "_pull_back", "pullbacks through the inner steps (double backward)")
    wrap(reverse, "_step_vjp", "pullbacks through the inner steps (double backward)")
    wrap(reverse, "meta_gradient_and_value", "meta gradient (and, grouped, its answer-shift directions)")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("outputs/bench_rows_grouped"))
    parser.add_argument("--model", default=".cache/smollm2-hf")
    parser.add_argument("--rows", type=int, default=250)
    parser.add_argument("--balance_column")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/outer_step_profile.json"))
    args = parser.parse_args()
    found = timed_parts()
    from hf_fg2u.cli.main import main as cli

    start = time.perf_counter()
    cli(["train", "--recipe", "noisy_reweighting_real", "--model_name_or_path", args.model, "--data_files",
         f"train={args.work / f'train_{args.rows}.jsonl'}", f"meta={args.work / 'meta.jsonl'}",
         "--inner_reset_every", "0", "--num_train_epochs", "1", "--output_dir", str(args.work / "profile_run"),
         "--overwrite_output_dir", "true", "--disable_tqdm", "true", "--max_length", "32", "--plot", "false",
         *(["--balance_column", args.balance_column] if args.balance_column else [])])  # fmt: skip
    total = time.perf_counter() - start
    steps = found["meta gradient (and, grouped, its answer-shift directions)"][1]
    parts = {part: seconds for part, (seconds, _) in found.items()}
    record = {"rows": args.rows, "balance_column": args.balance_column, "outer_steps": steps, "seconds": total,
              "per_outer_step": {part: seconds / steps for part, seconds in parts.items()}}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    sys.exit(main())
