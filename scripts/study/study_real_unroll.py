"""Which inner loop makes the hypergradient tell corrupted rows from clean ones? (``make study-real-unroll``)

At one warmed-up adapter θ_w (4 Adam steps on uniform rows) and uniform weights, takes the exact (rgu)
hypergradient of the example logits over the same unrolls (every train row twice, 16 rows per unroll) under
several inner loops: Adam in T = 1, 2 or 4 steps, and SGD with the step size whose first update is as long as
Adam's. Prints, per inner loop, the AUROC (corrupted vs clean, per kind) of the sum of the unit-normalised
hypergradients ("pooled": the ranking an outer loop that stayed at θ_w and uniform weights would reach) and the
mean AUROC within one unroll, and writes them to ``--out`` as JSON and Markdown.

    .venv/bin/python scripts/study/study_real_unroll.py --data_seed 1 --corruptions other_domain char_noise code

Task flags are scripts/demo_real.py's; ``--model_name_or_path`` / ``--gguf_file`` as for the recipe.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: demo_real, real_text
import demo_real  # noqa: E402
import torch

from hf_fg2u.baselines import auroc_by_kind
from hf_fg2u.cli import arguments, models
from hf_fg2u.hypergrad import estimate_hypergradient
from hf_fg2u.hypergrad.inner_optimizers import make_inner_optimizer
from hf_fg2u.hypergrad.unroll import run_inner_loop, tree_dot
from hf_fg2u.lm.collator import PaddingCollator
from hf_fg2u.lm.losses import batch_softmax_weights, make_lm_problem
from hf_fg2u.lm.params import trainable_parameters
from hf_fg2u.trainer.model_setup import wrap_with_peft

ROWS_PER_UNROLL = 16
WARMUP_STEPS = 4
# name: (inner optimizer, inner steps T); the rows per inner step are ROWS_PER_UNROLL / T.
INNER_LOOPS = {"adam T=2": ("adam", 2), "adam T=1": ("adam", 1), "adam T=4": ("adam", 4), "sgd T=2": ("sgd", 2)}


def make_parser() -> argparse.ArgumentParser:
    parser = demo_real.make_parser()
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--inner_loops", nargs="+", default=list(INNER_LOOPS), choices=list(INNER_LOOPS))
    parser.add_argument("--passes", type=int, default=2, help="How many times each train row is unrolled.")
    parser.add_argument("--out", type=Path, default=Path("outputs/study_real_unroll"))
    return parser


def main(argv: list[str] | None = None) -> dict:
    options, recipe_argv = make_parser().parse_known_args(argv)
    task = demo_real.make_task(options)
    _, training_args, model_args = arguments.parse_args(
        ["--config", str(demo_real.CONFIG), "--output_dir", str(options.out / "unused"), *recipe_argv]
    )
    base, tokenizer, tokenized = demo_real.load_and_tokenize(task, training_args, model_args)
    kinds = list(task["train"]["corruption"])
    collator = PaddingCollator(pad_token_id=tokenizer.pad_token_id or 0)
    train = tokenized["train"].add_column("example_id", list(range(len(kinds))))
    columns = [c for c in ("input_ids", "attention_mask", "labels", "example_id") if c in train.column_names]

    def batch(rows: list[int]) -> dict:
        return collator([{c: train[i][c] for c in columns} for i in rows])

    meta = collator([{c: row[c] for c in columns if c in row} for row in tokenized["meta"]])
    model = wrap_with_peft(copy.deepcopy(base), models.lora_config(model_args))
    inner_loss, outer_loss = make_lm_problem(model, batch_softmax_weights())
    outer = {"example_logits": torch.zeros(len(kinds))}
    generator = torch.Generator().manual_seed(training_args.seed)
    adam = make_inner_optimizer("adam", training_args.inner_lr)
    theta = trainable_parameters(model)
    warmup = [batch(torch.randperm(len(kinds), generator=generator)[:8].tolist()) for _ in range(WARMUP_STEPS)]
    theta_w, state_w, _ = run_inner_loop(
        inner_loss, adam, theta, adam.init(theta), outer, warmup, [None] * WARMUP_STEPS
    )
    order = torch.cat([torch.randperm(len(kinds), generator=generator) for _ in range(options.passes)]).tolist()
    unrolls = [order[i : i + ROWS_PER_UNROLL] for i in range(0, len(order) - ROWS_PER_UNROLL + 1, ROWS_PER_UNROLL)]
    sgd_lr = matched_sgd_lr(inner_loss, adam, theta_w, state_w, outer, batch(unrolls[0][:8]))

    results = {"sgd_lr": sgd_lr, "unrolls": len(unrolls), "inner_loops": {}}
    for name in options.inner_loops:
        optimizer_name, steps = INNER_LOOPS[name]
        lr = training_args.inner_lr if optimizer_name == "adam" else sgd_lr
        optimizer = make_inner_optimizer(optimizer_name, lr)
        state = state_w if optimizer_name == "adam" else optimizer.init(theta_w)
        start, pooled, within = time.perf_counter(), torch.zeros(len(kinds)), []
        size = ROWS_PER_UNROLL // steps
        for rows in unrolls:
            result = estimate_hypergradient(
                inner_loss, outer_loss, theta_w, outer, [batch(rows[i : i + size]) for i in range(0, len(rows), size)],
                meta, method="rgu", inner_optimizer=optimizer, optimizer_state=state, seed=0,
            )  # fmt: skip
            grad = result.grad["example_logits"].detach()
            pooled += grad / grad.norm()
            seen = [kinds[i] for i in rows]
            if "clean" in seen:
                within.append(auroc_by_kind(grad[rows], seen))
        per_kind = auroc_by_kind(pooled, kinds)
        mean_within = {k: sum(a[k] for a in within if k in a) / sum(k in a for a in within) for k in per_kind}
        results["inner_loops"][name] = {"pooled": per_kind, "within_unroll": mean_within}
        print(f"{name:<10} {time.perf_counter() - start:.0f} s  pooled {fmt(per_kind)}  within {fmt(mean_within)}")
    options.out.mkdir(parents=True, exist_ok=True)
    length = "" if options.lines_per_passage == 2 else f"_lines{options.lines_per_passage}"  # 2: the earlier files
    stem = f"seed{options.data_seed}_{'_'.join(options.corruptions)}{length}"
    (options.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (options.out / f"{stem}.md").write_text(markdown(results, options) + "\n")
    return results


def matched_sgd_lr(inner_loss, adam, theta_w, state_w, outer, batch) -> float:
    """The SGD step size whose first update from θ_w is as long as Adam's on the same batch."""
    params = {k: v.detach().requires_grad_() for k, v in theta_w.items()}
    grads = torch.autograd.grad(inner_loss(params, outer, batch), list(params.values()))
    grads = dict(zip(params, grads, strict=True))
    moved, _, _ = run_inner_loop(inner_loss, adam, theta_w, state_w, outer, [batch], [None])
    step = {k: moved[k] - theta_w[k] for k in theta_w}
    return float(tree_dot(step, step).sqrt() / tree_dot(grads, grads).sqrt())


def fmt(per_kind: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in sorted(per_kind.items()))


def markdown(results: dict, options) -> str:
    kinds = sorted(next(iter(results["inner_loops"].values()))["pooled"])
    lines = [
        f"data seed {options.data_seed}, {options.lines_per_passage}-line rows, {results['unrolls']} unrolls of "
        f"{ROWS_PER_UNROLL} rows at θ after {WARMUP_STEPS} Adam steps (SGD step size {results['sgd_lr']:.3g}):",
        "",
        "| inner loop | " + " | ".join(f"pooled {k}" for k in kinds) + " | " + " | ".join(f"within {k}" for k in kinds)
        + " |",
        "|---|" + "---|" * (2 * len(kinds)),
    ]  # fmt: skip
    for name, run in results["inner_loops"].items():
        cells = [f"{run['pooled'][k]:.3f}" for k in kinds] + [f"{run['within_unroll'][k]:.3f}" for k in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
