"""Build the wrong-answers task of `make value`: is a word positive or negative, with 40% of the train answers flipped.

The words and their polarity come from the VADER sentiment lexicon (vaderSentiment on PyPI, MIT license; `make
value-data` fetches it): single lowercase words rated by ten people on -4..+4, kept when the mean rating is
decided (|mean| >= 1.5) and the raters agree (std <= 1.0) -- about 3000 words. Each row asks

    Is the word "grateful" positive or negative?
    Answer:

with the completion " positive" or " negative". The answer is decided by the prompt, a fine-tune learns a wrong
answer as readily as a right one, and forced-choice accuracy on held-out words is the metric.

Splits (disjoint words, drawn by --data_seed): train (--train_rows, a --corrupted_fraction of them flipped and
flagged in `is_corrupted`), meta (clean, --meta_rows), stop (clean, for early stopping of fine-tunes), test (clean,
held out from everything). Written as JSON lines: OUT/{train,meta,stop,test}.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

PROMPT = 'Is the word "{word}" positive or negative?\nAnswer:'
ANSWERS = {True: " positive", False: " negative"}


def read_lexicon(path: Path, min_abs_mean: float = 1.5, max_std: float = 1.0) -> list[tuple[str, bool]]:
    """(word, is_positive) for the lexicon's plain words whose polarity is decided and agreed on."""
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or not re.fullmatch("[a-z]+", fields[0]):
            continue
        mean, std = float(fields[1]), float(fields[2])
        if abs(mean) >= min_abs_mean and std <= max_std:
            words.append((fields[0], mean > 0))
    return sorted(words)


def make_splits(words, data_seed: int, train_rows: int, meta_rows: int, stop_rows: int, test_rows: int,
                corrupted_fraction: float) -> dict[str, list[dict]]:  # fmt: skip
    """Disjoint word splits; train answers flipped for a seeded ``corrupted_fraction`` of its rows."""
    needed = train_rows + meta_rows + stop_rows + test_rows
    if needed > len(words):
        raise ValueError(f"The splits need {needed} words; the lexicon has {len(words)} after filtering.")
    rng = random.Random(data_seed)
    words = list(words)
    rng.shuffle(words)
    flipped = set(rng.sample(range(train_rows), round(corrupted_fraction * train_rows)))

    def row(word, positive, wrong=False):
        return {"prompt": PROMPT.format(word=word), "completion": ANSWERS[positive != wrong]}

    bounds, start = {}, 0
    for name, size in (("train", train_rows), ("meta", meta_rows), ("stop", stop_rows), ("test", test_rows)):
        bounds[name], start = words[start : start + size], start + size
    splits = {name: [row(*item) for item in chunk] for name, chunk in bounds.items() if name != "train"}
    splits["train"] = [
        {**row(word, positive, index in flipped), "is_corrupted": index in flipped}
        for index, (word, positive) in enumerate(bounds["train"])
    ]
    return splits


def task_parser(description: str) -> argparse.ArgumentParser:
    """The options every build of the words task takes (this one and scripts/pool_task.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--lexicon", type=Path, required=True, help="vader_lexicon.txt of vaderSentiment.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--meta_rows", type=int, default=64)
    parser.add_argument("--stop_rows", type=int, default=100)
    parser.add_argument("--test_rows", type=int, default=300)
    parser.add_argument("--corrupted_fraction", type=float, default=0.4)
    return parser


def write_splits(out: Path, splits: dict[str, list[dict]]) -> str:
    """Each split as OUT/NAME.jsonl; a line saying what was written."""
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ", ".join(f"{name} {len(rows)}" for name, rows in splits.items()) + f" in {out}"


def main() -> None:
    parser = task_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--train_rows", type=int, default=600)
    args = parser.parse_args()
    words = read_lexicon(args.lexicon)
    splits = make_splits(words, args.data_seed, args.train_rows, args.meta_rows, args.stop_rows, args.test_rows,
                         args.corrupted_fraction)  # fmt: skip
    print(f"{len(words)} words; " + write_splits(args.out, splits))


if __name__ == "__main__":
    main()
