"""Build the pool task of `make rater`: the wrong-answers task of `make value`, grown to a pool 10x the rater's sample.

Same words, answers and noise rate as scripts/sentiment_task.py (VADER lexicon words, " positive"/" negative", 40% of
the pool's answers flipped, flagged in `is_corrupted`), and the same clean meta, stop and test rows as `make value`
for a data seed.
The pool is grown by asking about each remaining word in three phrasings (TEMPLATES), each row's answer flipped on
its own draw, so the pool holds about 7 600 rows; the rater learns on a random sample of --sample_rows of them.

Writes OUT/{sample,pool,meta,stop,test}.jsonl; the sample's rows are rows of the pool.
"""

from __future__ import annotations

import random

from sentiment_task import ANSWERS, PROMPT, make_splits, read_lexicon, task_parser, write_splits

TEMPLATES = (
    PROMPT,
    "Word: {word}\nIs its sentiment positive or negative?\nAnswer:",
    'Does the word "{word}" sound positive or negative?\nAnswer:',
)


def make_pool(words, data_seed: int, meta_rows: int, stop_rows: int, test_rows: int, pool_rows: int,
              sample_rows: int, corrupted_fraction: float) -> dict[str, list[dict]]:  # fmt: skip
    """The meta/stop/test rows of `make value`'s data seed (sentiment_task.make_splits), and a pool of every phrasing
    of the other words, noisy; the sample is drawn from the pool."""
    value_train_rows = 600  # sentiment_task's default train size: its words join the pool
    splits = make_splits(words, data_seed, value_train_rows, meta_rows, stop_rows, test_rows, corrupted_fraction)
    shuffled = list(words)
    random.Random(data_seed).shuffle(shuffled)  # the order make_splits draws its words in
    held = value_train_rows + meta_rows + stop_rows + test_rows
    pool_words = shuffled[:value_train_rows] + shuffled[held:]
    rng = random.Random(f"pool-{data_seed}")
    pool = [(template, word, positive) for word, positive in pool_words for template in TEMPLATES]
    if pool_rows > len(pool):
        raise ValueError(f"The pool needs {pool_rows} rows; the lexicon gives {len(pool)} after the held-out words.")
    rng.shuffle(pool)
    pool = pool[:pool_rows]
    flipped = set(rng.sample(range(len(pool)), round(corrupted_fraction * len(pool))))
    splits["pool"] = [
        {"prompt": template.format(word=word), "completion": ANSWERS[positive != (i in flipped)],
         "is_corrupted": i in flipped}
        for i, (template, word, positive) in enumerate(pool)
    ]  # fmt: skip
    splits["sample"] = [splits["pool"][i] for i in sorted(rng.sample(range(len(pool)), sample_rows))]
    del splits["train"]
    return splits


def main() -> None:
    parser = task_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--sample_rows", type=int, default=600)
    parser.add_argument("--pool_rows", type=int, default=6000)
    args = parser.parse_args()
    splits = make_pool(read_lexicon(args.lexicon), args.data_seed, args.meta_rows, args.stop_rows, args.test_rows,
                       args.pool_rows, args.sample_rows, args.corrupted_fraction)  # fmt: skip
    print(write_splits(args.out, splits))


if __name__ == "__main__":
    main()
