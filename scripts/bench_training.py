"""End to end: the noisy-data recipe (``hf-fg2u demo``'s data, model and settings) trained with each
hypergradient method under the same wall-clock budget, side by side in one run; and the two-phase schedule
(a cheap method first, fg2u after) against either method alone.

    .venv/bin/python scripts/bench_training.py --out-dir docs/bench               # ~7 min on 2 cores
    .venv/bin/python scripts/bench_training.py --budget 10 --out-dir /tmp/bench   # a fast check

Every run starts from the same model, data and seed and stops at the first outer step that ends after
``--budget`` seconds of training. Along the way it records, against wall time, the meta loss the trainer logs
(the outer loss on the meta batch after each unroll) and the AUROC of the learned weights at telling the
corrupted rows from the clean ones; at the end, the meta loss on the held-out eval split. Writes
``bench_training.md``, ``bench_training.json`` and the plots ``bench_training.png`` (methods) and
``bench_two_phase.png`` (schedules) to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_fg2u.cli import arguments, recipe_run, registry
from hf_fg2u.cli.main import DEMO_ARGS
from hf_fg2u.lm.evaluation import auroc

REPO = Path(__file__).resolve().parents[1]
METHOD_RUNS = {
    "fg2u": ["--method", "fg2u"],
    "fg2u b=4": ["--method", "fg2u", "--num_directions", "4", "--directions", "rademacher"],
    "fg2u_zo": ["--method", "fg2u_zo"],
    "rgu": ["--method", "rgu"],
    "trgu K=1": ["--method", "trgu", "--truncation", "1"],
    "neumann": ["--method", "neumann"],
    "cg": ["--method", "cg"],
    "hessian_free": ["--method", "hessian_free"],
    "uniform (φ frozen)": ["--method", "hessian_free", "--learning_rate", "0"],
}
TWO_PHASE_RUNS = {
    "fg2u": ["--method", "fg2u"],
    "hessian_free": ["--method", "hessian_free"],
    "hessian_free → fg2u": ["--method", "fg2u", "--phase1_method", "hessian_free"],
    "trgu K=1 → fg2u": ["--method", "fg2u", "--phase1_method", "trgu", "--truncation", "1"],
}


class WallClockRecorder(TrainerCallback):
    """Stops training once ``budget`` seconds have passed and records (seconds, meta loss, AUROC) per step."""

    def __init__(self, trainer, corrupted: torch.Tensor, budget: float):
        self.trainer, self.corrupted, self.budget = trainer, corrupted, budget
        self.start = 0.0
        self.points: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self.start
        weights = self.trainer.outer.weights()
        self.points.append({"step": state.global_step, "seconds": elapsed,
                            "auroc": auroc(-weights, self.corrupted)})  # fmt: skip
        if elapsed >= self.budget:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "meta_loss" in logs and self.points and self.points[-1]["step"] == state.global_step:
            self.points[-1]["meta_loss"] = float(logs["meta_loss"])


def run(name: str, extra: list[str], args: argparse.Namespace) -> dict:
    """One training run of the demo recipe with ``extra`` flags, stopped by the wall-clock budget."""
    argv = DEMO_ARGS + extra
    argv += ["--max_steps", "100000", "--logging_steps", "1", "--disable_tqdm", "true", "--plot", "false"]
    argv += ["--output_dir", str(Path(args.scratch) / name.replace(" ", "_")), "--compare_uniform", "false"]
    if "--phase1_method" in extra:
        argv += ["--phase1_steps", str(args.phase1_steps)]
    script_args, training_args, model_args = arguments.parse_args(argv)
    raw = registry.builtin_splits(script_args)
    trainer = recipe_run.build_trainer(script_args, training_args, model_args, raw)
    recorder = WallClockRecorder(trainer, torch.tensor(raw["train"]["is_corrupted"]), args.budget)
    trainer.add_callback(recorder)
    trainer.train()
    points = recorder.points
    final = {
        "name": name, "method": training_args.method, "steps": len(points), "seconds": points[-1]["seconds"],
        "eval_meta_loss": trainer.evaluate()["eval_loss"], "auroc": points[-1]["auroc"], "points": points,
    }  # fmt: skip
    print(f"{name:>22}: {final['steps']} steps in {final['seconds']:.0f} s, AUROC {final['auroc']:.3f}, "
          f"eval meta loss {final['eval_meta_loss']:.4f}", flush=True)  # fmt: skip
    return final


def table(results: list[dict], reference: dict) -> str:
    lines = [
        "| run | outer steps | s / step | AUROC | eval meta loss | meta loss / uniform's |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = r["eval_meta_loss"] / reference["eval_meta_loss"]
        lines.append(f"| {r['name']} | {r['steps']} | {r['seconds'] / r['steps']:.2f} | {r['auroc']:.3f} | "
                     f"{r['eval_meta_loss']:.4f} | {ratio:.3f} |")  # fmt: skip
    return "\n".join(lines)


def plot(results: list[dict], path: Path, title: str) -> None:
    """Meta loss and AUROC against wall time, a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        logged = [p for p in r["points"] if "meta_loss" in p]
        axes[0].plot([p["seconds"] for p in logged], [p["meta_loss"] for p in logged], label=r["name"], lw=1.2)
        axes[1].plot([p["seconds"] for p in r["points"]], [p["auroc"] for p in r["points"]], label=r["name"], lw=1.2)
    axes[0].set(xlabel="wall time (s)", ylabel="meta loss (meta batch, after the unroll)", yscale="log")
    axes[1].set(xlabel="wall time (s)", ylabel="AUROC, corrupted vs clean rows", ylim=(0.3, 1.02))
    for axis in axes:
        axis.grid(True, alpha=0.3)
    axes[1].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of training per run")
    parser.add_argument("--phase1-steps", type=int, default=15, help="outer steps of the cheap first phase")
    parser.add_argument("--parts", nargs="+", default=["methods", "two_phase"], choices=["methods", "two_phase"])
    parser.add_argument("--scratch", default="/tmp/hf_fg2u_bench_training")
    parser.add_argument("--out-dir", default=str(REPO / "docs" / "bench"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    start = time.time()
    done: dict[str, dict] = {}
    for part, runs in (("methods", METHOD_RUNS), ("two_phase", TWO_PHASE_RUNS)):
        if part in args.parts:
            for name, extra in runs.items():
                if name not in done:
                    done[name] = run(name, extra, args)
    uniform = done.get("uniform (φ frozen)")
    command = "python scripts/bench_training.py " + " ".join(sys.argv[1:])
    text = [
        "# End to end under one wall-clock budget\n",
        f"`{command.strip()}` — the demo's noisy-data recipe (12 facts × 8 rows, 40% corrupted, tiny Llama from "
        f"config, LoRA, T=2 Adam inner steps, b=16 orthogonal directions for fg2u/fg2u_zo), {args.budget:g} s of "
        f"training per run, torch threads {torch.get_num_threads()}, total {time.time() - start:.0f} s.\n",
    ]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "methods" in args.parts:
        methods = [done[name] for name in METHOD_RUNS]
        text += ["## Methods\n", table(methods, uniform), "\n", "![methods](bench_training.png)\n"]
        plot(methods, out / "bench_training.png", f"noisy-data recipe, {args.budget:g} s per method")
    if "two_phase" in args.parts:
        schedules = [done[name] for name in TWO_PHASE_RUNS]
        reference = uniform or schedules[0]
        text += [
            f"## Two-phase schedule ({args.phase1_steps} outer steps of the cheap method, then fg2u)\n",
            table(schedules, reference),
            "\n" if uniform else "\n(ratios against the first row: no uniform run in this invocation)\n",
            "![two-phase](bench_two_phase.png)\n",
        ]
        plot(schedules, out / "bench_two_phase.png", f"two-phase schedule, {args.budget:g} s per run")
    (out / "bench_training.md").write_text("\n".join(text))
    (out / "bench_training.json").write_text(json.dumps({"args": vars(args), "runs": done}, indent=1) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
