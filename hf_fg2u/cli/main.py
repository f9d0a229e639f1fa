"""The hf-fg2u command: train, demo, weights, finetune and score.

hf-fg2u train --recipe noisy_reweighting [--config FILE] [--key value ...]   (hf-fg2u train --help)
hf-fg2u train --recipe noisy_reweighting --num_processes 2                  (ranks through accelerate)
hf-fg2u demo [--output_dir outputs/demo]
hf-fg2u weights outputs/demo [--top 10] [--push_to_hub user/dataset] [--export filtered|resampled]
hf-fg2u finetune outputs/demo --model_name_or_path MODEL [--eval_file F] [--test_file F]   (finetune --help)
hf-fg2u score outputs/rater --data_files pool.jsonl --output_dir outputs/pool   (a data_rater run weighs new rows)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from transformers.hf_argparser import string_to_bool

from hf_fg2u.cli import arguments, launch, recipe_run
from hf_fg2u.hub.report import EXPORTS
from hf_fg2u.trainer.run_folder import check_output_dir

# The demo is the noisy-data recipe on its packaged offline default (hf_fg2u/recipes/noisy_reweighting.yaml).
DEMO_ARGS = ["--recipe", "noisy_reweighting", "--output_dir", "outputs/demo", "--compare_uniform", "true"]
DEMO_MARKER = "demo_run.json"  # what the demo leaves in its folder: the next demo may replace that folder


def run_train(argv: list[str]) -> dict:
    """Run a recipe here, or with ``--num_processes N`` on N ranks started through ``accelerate launch``."""
    launch_args, argv = launch.split_launch_args(argv)
    if launch.launched():  # one rank of a launched group: the launching process prints the summary
        secret = json.loads(os.environ.pop(launch.SECRET_ARGS_ENV, "[]"))
        return recipe_run.main(*arguments.parse_args([*argv, *secret]))
    if launch_args.num_processes == 1:
        results = recipe_run.main(*arguments.parse_args(argv))
        print_train_summary(results)
        return results
    _, training_args, _ = arguments.parse_args(argv)  # bad options fail here, before any rank starts
    public, secret = launch.split_secret_args(argv, arguments.make_parser())
    command = launch.launch_command(launch_args.num_processes, launch_args.accelerate_config, public)
    env = launch.launch_env(launch_args.accelerate_config)
    line = launch.echo_command(command, env)
    if secret:
        names = [arg for arg in secret if arg.startswith("--")]
        line += (
            f"   # {', '.join(n.partition('=')[0] for n in names)}: passed to the ranks in ${launch.SECRET_ARGS_ENV}"
        )
    print("[hf_fg2u] " + line)
    hidden = {launch.SECRET_ARGS_ENV: json.dumps(secret)}  # always: never one inherited from elsewhere
    done = subprocess.run(command, check=False, env={**os.environ, **env, **hidden})
    if done.returncode != 0:
        raise RuntimeError(f"accelerate launch exited with status {done.returncode} (command above).")
    results = json.loads((Path(training_args.output_dir) / "results.json").read_text())
    print_train_summary(results)
    return results


SUMMARY_NUMBERS = {  # results key -> what the summary calls it
    "bilevel_meta_loss": "meta loss, learned outer variables",
    "uniform_meta_loss": "meta loss, uniform (same budget)",
    "meta_loss_reduction": "meta loss reduction",
    "bilevel_eval_loss": "held-out eval loss",
    "uniform_eval_loss": "held-out eval loss, uniform",
    "auroc_corrupted": "AUROC of the weights, corrupted vs clean",
    "bilevel_outer_steps": "outer steps",
}


def train_summary(results: dict) -> str:
    """The lines `hf-fg2u train` ends with: where the run is, its key numbers, and the next command."""
    folder = results.get("output_dir", "(not recorded)")
    lines = ["", f"hf_fg2u train: done. Output folder: {folder}"]
    for key, name in SUMMARY_NUMBERS.items():
        if key in results:
            value = results[key]
            shown = f"{100 * value:.1f}%" if key == "meta_loss_reduction" else f"{value:.4g}"
            lines.append(f"  {name:<42}: {shown}")
    if "domain_weights" in results:
        weights = ", ".join(f"{k} {v:.3f}" for k, v in results["domain_weights"].items())
        lines.append(f"  {'domain weights':<42}: {weights}")
    if any((Path(folder) / name).exists() for name in ("weighted_dataset.parquet", "weighted_dataset")):
        lines.append(f"  next: hf-fg2u weights {folder}   (then --export filtered for trl sft)")
    else:
        lines.append(f"  next: python -c \"from hf_fg2u.hub.load import load_run; print(load_run('{folder}'))\"")
    return "\n".join(lines)


def print_train_summary(results: dict) -> None:
    print(train_summary(results))


def run_demo(argv: list[str]) -> dict:
    """The demo; a folder holding an earlier demo's run (its ``DEMO_MARKER``) is replaced, any other run refused as
    ``hf-fg2u train`` refuses it, so ``make demo`` runs again and again but never over someone's run."""
    script_args, training_args, model_args = arguments.parse_args(DEMO_ARGS + argv)
    marker = Path(training_args.output_dir) / DEMO_MARKER
    if marker.is_file():
        training_args.overwrite_output_dir = True
    results = recipe_run.main(script_args, training_args, model_args)
    if training_args.should_save:
        marker.write_text(json.dumps({"written_by": "hf-fg2u demo", "replaced_by": "the next hf-fg2u demo"}) + "\n")
    print_demo_summary(results)
    return results


def print_demo_summary(results: dict) -> None:
    lines = [
        "",
        "hf_fg2u demo: learned per-example weights on data with 40% corrupted rows",
        f"  AUROC of the weights, corrupted vs clean : {results['auroc_corrupted']:.3f}   (target >= 0.9)",
        f"  meta loss, learned weights              : {results['bilevel_meta_loss']:.4f}",
        f"  meta loss, uniform weights (same budget): {results['uniform_meta_loss']:.4f}",
        f"  meta loss reduction                     : {100 * results['meta_loss_reduction']:.1f}%   (target >= 5%)",
        f"  weight histogram                        : {results.get('histogram', '(matplotlib missing)')}",
        f"  Hub-ready output folder                 : {results['output_dir']}",
        "  next: hf-fg2u weights " + results["output_dir"],
    ]
    print("\n".join(lines))


def run_weights(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="hf-fg2u weights", description="Summarise the weights of a finished run.")
    parser.add_argument("run", type=Path, metavar="RUN", help="The run's output folder.")
    parser.add_argument("--top", type=int, default=10, help="Rows shown at each end of the weights.")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="Push the weighted dataset as a Hub dataset.")
    export = parser.add_argument_group(
        "export for a trainer without weights (trl sft)",
        "Plain rows, no weight column: `trl sft --dataset_name DIR` then trains on what the weights say.",
    )
    export.add_argument(
        "--export", choices=EXPORTS, help="filtered: drop low-weight rows; resampled: draw rows ∝ weight."
    )
    export.add_argument("--output_dir", metavar="DIR", help="Where DIR/train.jsonl goes (default RUN/export_KIND).")
    export.add_argument(
        "--overwrite_output_dir", type=string_to_bool, nargs="?", const=True, default=False, metavar="BOOL",
        help="Replace an existing DIR/train.jsonl (refused otherwise).",
    )  # fmt: skip
    export.add_argument("--threshold", type=float, help="filtered: keep rows with weight >= this (default: the mean).")
    export.add_argument("--keep_fraction", type=float, help="filtered: keep this fraction of the rows, by weight.")
    export.add_argument("--num_rows", type=int, help="resampled: rows to draw (default: as many as the data has).")
    export.add_argument("--seed", type=int, default=0, help="resampled: the draw's seed.")
    export.add_argument(
        "--drop_unscored", action="store_true",
        help="Leave out the rows that never entered an unroll (column scored False, at their starting weight); "
        "by default filtered keeps them all and resampled draws them at their starting weight.",
    )  # fmt: skip
    args = parser.parse_args(argv)
    from hf_fg2u.hub.report import export_weighted, load_weighted_dataset, report_weights

    check_weights_counts(args)
    path = Path(args.output_dir or args.run / f"export_{args.export}") / "train.jsonl"
    if args.export:
        check_output_dir(str(path.parent), overwrite=True)  # a file or an unwritable folder: before any work
    if args.export and path.exists() and not args.overwrite_output_dir:
        raise ValueError(
            f"{path} exists: the export would replace it. Pass another --output_dir, or --overwrite_output_dir true "
            "to replace it."
        )
    text = report_weights(args.run, k=args.top)
    print(text)
    weighted = None
    if args.push_to_hub or args.export:
        weighted = load_weighted_dataset(args.run)
    if args.export:
        rows = export_weighted(
            weighted, args.export, args.threshold, args.keep_fraction, args.num_rows, args.seed, args.drop_unscored
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        rows.to_json(str(path))
        note = unscored_note(weighted, args)
        print(f"{args.export}: {len(rows)} of {len(weighted)} rows, without weights, in {path}{note}")
    if args.push_to_hub:
        push_weighted(weighted, args.push_to_hub, args.run)
    return text


def check_weights_counts(args) -> None:
    """``--top`` and ``--num_rows`` are counts of rows: refused below 1 by their own names."""
    if args.top < 1:
        raise ValueError(f"--top {args.top}: pass how many rows to show at each end of the weights, 1 or more.")
    if args.num_rows is not None and args.num_rows < 1:
        raise ValueError(
            f"--num_rows {args.num_rows}: pass how many rows to draw, 1 or more (leave it out: as many as the data "
            "has)."
        )


def unscored_note(weighted, args) -> str:
    """What the export did with the rows that never entered an unroll (empty when there are none)."""
    from hf_fg2u.hub.report import scored_flags

    unscored = int((~scored_flags(weighted)).sum())
    if not unscored:
        return ""
    if args.drop_unscored:
        return f" ({unscored} never-scored rows left out: --drop_unscored)"
    kept = "kept" if args.export == "filtered" else "drawn at their starting weight"
    return f" ({unscored} never-scored rows {kept}; --drop_unscored leaves them out)"


def push_weighted(weighted, repo_id: str, run: Path) -> None:
    """Push the weighted rows as a Hub dataset; offline or refused, a one-line reason and where the rows stay."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        weighted.push_to_hub(repo_id)
    except (OSError, HfHubHTTPError, OfflineModeIsEnabled, ValueError) as error:  # connection, auth, offline mode
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        sys.exit(
            f"Could not push the weighted dataset to {repo_id}: {type(error).__name__}: {reason:.300}\nNothing is "
            f"lost: the rows and their weights stay in {run}. Push again when online and logged in "
            "(`hf auth login`, or HF_TOKEN), with HF_HUB_OFFLINE unset."
        )
    print(f"pushed the weighted dataset to {repo_id}")


def run_finetune(argv: list[str]) -> dict:
    """Fine-tune a fresh model on a run's (or a file's) weighted rows and print where it went and its scores."""
    from hf_fg2u.cli.finetune import finetune, parse_finetune_args

    results = finetune(*parse_finetune_args(argv))
    print(f"\nhf_fg2u finetune: done. Model in {results['output_dir']}")
    for key in ("rows", "effective_rows", "steps", "best_epoch", "eval_loss", "test_loss", "test_accuracy"):
        if results.get(key) is not None:
            value = results[key]
            print(f"  {key:<16}: {value:.4f}" if isinstance(value, float) else f"  {key:<16}: {value}")
    return results


def run_score(argv: list[str]) -> dict:
    from hf_fg2u.cli.score import run_score as score

    return score(argv)


COMMANDS = {"train": run_train, "demo": run_demo, "weights": run_weights, "finetune": run_finetune, "score": run_score}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:  # the docstring is plain text
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"hf-fg2u: unknown command {argv[0]!r}; use one of {sorted(COMMANDS)}.")
        return
    try:
        COMMANDS[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        sys.exit(f"hf-fg2u {argv[0]}: {error}")


if __name__ == "__main__":
    main()
