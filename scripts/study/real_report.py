"""Fill docs/real_demo.md (and the README's demo block) from what the real-model runs wrote: the harm table of
``make study-real-harm`` and the printout and plots of ``make demo-real``; nothing in those blocks is typed.

    .venv/bin/python scripts/study/real_report.py [--demo outputs/demo_real]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: demo_real, real_text
import demo_real  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# Other demo runs shown in docs/real_demo.md: {marker: their results.json, copied under --runs}.
OTHER_RUNS = {
    "demo-constant-step": "demo_constant_step.json",  # the run before the recipe's outer step decayed
}


def fill(text: str, name: str, block: str) -> str:
    """Replace what lies between ``<!-- name:begin ... -->`` and ``<!-- name:end -->`` by ``block``."""
    pattern = re.compile(rf"(<!-- {name}:begin[^>]*-->\n).*?(<!-- {name}:end -->)", re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"no <!-- {name}:begin --> ... <!-- {name}:end --> markers")
    return pattern.sub(lambda m: m.group(1) + block.rstrip("\n") + "\n" + m.group(2), text)


def runs_by_kinds(folder: Path) -> dict[tuple[str, ...], list[dict]]:
    """The results.json copies in ``folder`` (in file-name order), grouped by their sorted corruption kinds."""
    by_kinds: dict[tuple[str, ...], list[dict]] = {}
    for path in sorted(folder.glob("*.json")):
        run = json.loads(path.read_text())
        by_kinds.setdefault(tuple(sorted(run["auroc"]["learned weights"])), []).append(run)
    return by_kinds


def study_table(folder: Path) -> str:
    """One Markdown table per set of corruption kinds over the study runs' results.json copies in ``folder``
    (each with the ``note`` saying what it varies and the ``task`` it ran on): AUROC of the learned weights."""
    tables = []
    for kinds, runs in runs_by_kinds(folder).items():
        lines = [
            "| run | lines per row | data seed | meta rows | outer steps | "
            + " | ".join(f"AUROC {k}" for k in kinds)
            + " |",
            "|---|---|---|---|---|" + "---|" * len(kinds),
        ]
        for run in runs:
            task, aurocs = run["task"], run["auroc"]["learned weights"]
            cells = [run["note"], str(lines_per_row(run)), str(task["data_seed"]), str(task["num_meta"])]
            cells.append(str(run.get("outer_steps")))
            lines.append("| " + " | ".join(cells + [f"{aurocs[k]:.3f}" for k in kinds]) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables) + "\n"


def lines_per_row(run: dict) -> int:
    """The passage length a demo run's task had (runs from before the option: 2 lines)."""
    return run["task"].get("lines_per_passage", 2)


def runs_table(folder: Path) -> str:
    """One Markdown table per set of corruption kinds over the demo runs' results.json copies in ``folder``, a
    row per run in order of row length and data seed: the lines per row, the split its fresh adapters
    early-stopped on, AUROC of the learned weights per kind, held-out loss of every selection, and the learned
    weights' margin over uniform weights (negative: the learned weights win)."""
    tables = []
    for kinds, runs in runs_by_kinds(folder).items():
        header = ["lines per row", "data seed", "early stop on", *(f"AUROC {k}" for k in kinds), *demo_real.SELECTIONS]
        lines = ["| " + " | ".join([*header, "learned − uniform"]) + " |", "|" + "---|" * (len(header) + 1)]
        for run in sorted(
            runs, key=lambda run: (lines_per_row(run), run["task"]["data_seed"], run.get("stop_split", "meta"))
        ):
            heldout, stopped_on = run["heldout_loss"], run.get("stop_split", "meta")  # earlier runs: the meta split
            cells = [str(lines_per_row(run)), str(run["task"]["data_seed"]), stopped_on]
            cells += [f"{run['auroc']['learned weights'][k]:.3f}" for k in kinds]
            cells += [f"{heldout[name]:.4f}" for name in demo_real.SELECTIONS]
            cells.append(f"{heldout['learned weights'] - heldout['uniform']:+.4f}")
            lines.append("| " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables) + "\n"


def outer_table(folder: Path) -> str:
    """One Markdown table per set of corruption kinds over the outer-loop study's results.json copies in
    ``folder`` (each with its ``note``): AUROC of the learned weights, how they are spread, and the held-out loss
    of a fresh adapter on them against uniform weights and the clean rows alone (the selections that do not
    depend on the run; the mean over the run's adapter seeds)."""
    tables = []
    for kinds, runs in runs_by_kinds(folder).items():
        header = ["run", "data seed", "outer steps", *(f"AUROC {k}" for k in kinds), "largest weight",
                  "effective rows", "adapter seeds", "learned weights", "uniform", "clean rows only",
                  "learned − uniform"]  # fmt: skip
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for run in runs:
            heldout, spread = run["heldout_loss"], run["weights"]
            cells = [run["note"], str(run["task"]["data_seed"]), str(run.get("outer_steps"))]
            cells += [f"{run['auroc']['learned weights'][k]:.3f}" for k in kinds]
            cells += [f"{spread['max']:.2f}", f"{spread['effective_rows']:.0f} of {spread['rows']}"]
            cells.append(str(len(run.get("heldout_loss_per_seed") or [heldout])))
            cells += [f"{heldout[name]:.4f}" for name in ("learned weights", "uniform", demo_real.ORACLE)]
            cells.append(f"{heldout['learned weights'] - heldout['uniform']:+.4f}")
            lines.append("| " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=REPO / "outputs" / "demo_real")
    parser.add_argument("--harm", type=Path, default=REPO / "docs" / "bench" / "real" / "harm.md")
    parser.add_argument(
        "--runs", type=Path, default=REPO / "docs" / "bench" / "real", help="Where the OTHER_RUNS results lie."
    )
    options = parser.parse_args(argv)
    results = json.loads((options.demo / "results.json").read_text())
    printout = "```text\n$ make demo-real\n" + demo_real.format_table(results) + "\n```\n"
    docs = REPO / "docs" / "real_demo.md"
    text = fill(docs.read_text(), "demo", printout)
    if options.harm.exists():
        text = fill(text, "harm", options.harm.read_text())
    for marker, name in OTHER_RUNS.items():
        path = options.runs / name
        if path.exists():
            other = json.loads(path.read_text())
            text = fill(text, marker, "```text\n" + demo_real.format_table(other) + "\n```\n")
    for marker in ("draws", "pairs"):  # the demo on other data seeds; on prompt/completion rows (--pairs)
        if (options.runs / marker).is_dir():
            text = fill(text, marker, runs_table(options.runs / marker))
    study = options.runs / "study"
    if study.is_dir():
        text = fill(text, "study", study_table(study))
    if (options.runs / "outer").is_dir():
        text = fill(text, "outer", outer_table(options.runs / "outer"))
    for marker in ("unroll", "tokens"):  # scripts/study/study_real_unroll.py, scripts/study/study_real_tokens.py
        tables = sorted((options.runs / marker).glob("*.md"))
        if tables:
            text = fill(text, marker, "\n".join(path.read_text() for path in tables))
    docs.write_text(text)
    readme = REPO / "README.md"
    readme.write_text(fill(readme.read_text(), "demo-real", printout))
    shutil.copy(options.demo / "weights.png", REPO / "docs" / "real_demo_weights.png")
    shutil.copy(options.demo / "heldout_loss.png", REPO / "docs" / "real_demo_heldout.png")
    print(f"wrote {docs}, the demo block of {readme} and the two plots")


if __name__ == "__main__":
    main(sys.argv[1:])
