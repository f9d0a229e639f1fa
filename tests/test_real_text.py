"""The real-text task builder: passages from Gutenberg-like text, corruptions of known kind, disjoint splits."""

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # scripts/real_text.py, not in the wheel
from real_text import build_corrupted_text_task, char_noise, code_passages, passages, shuffle_words  # noqa: E402

PLAY = """The Project Gutenberg eBook of a play
*** START OF THE PROJECT GUTENBERG EBOOK A PLAY ***
ACT I.

Scene I. A platform.

[Enter Bernardo.]

Ber.
Who is there upon the platform tonight?
Nay answer me and unfold yourself now.
Long live the king of all this land.
Short.

HAMLET
A little more than kin and less than kind.
The sun is up and so are we all now.
*** END OF THE PROJECT GUTENBERG EBOOK A PLAY ***
This licence text is long enough to count as a line of words.
This licence text is long enough to count as a line of words too.
"""


def sentences(count, words=("alpha", "beta", "gamma", "delta", "eps", "zeta"), seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(6)) + f" {i}" for i in range(count)]


def test_passages_join_runs_of_lines_and_drop_headings_speakers_directions_and_licence():
    assert passages(PLAY) == [
        "Who is there upon the platform tonight? Nay answer me and unfold yourself now.",
        "A little more than kin and less than kind. The sun is up and so are we all now.",
    ]
    assert passages(PLAY, lines_per_passage=1)[2] == "Long live the king of all this land."


def test_shuffle_words_keeps_the_words_in_another_order():
    text = "one two three four five six"
    shuffled = shuffle_words(text, random.Random(0))
    assert shuffled != text and sorted(shuffled.split()) == sorted(text.split())
    assert shuffle_words("same same", random.Random(0)) == "same same"  # nothing to reorder


def test_char_noise_replaces_about_the_given_fraction_of_letters():
    text = "abcdefghij " * 200
    noisy = char_noise(text, random.Random(0), fraction=0.25)
    changed = sum(a != b for a, b in zip(text, noisy, strict=True)) / sum(c.isalpha() for c in text)
    assert len(noisy) == len(text) and noisy[10::11] == text[10::11]  # spaces untouched
    assert changed == pytest.approx(0.25 * 25 / 26, abs=0.03)  # a replacement may draw the same letter


def test_task_has_the_requested_rows_per_kind_and_disjoint_clean_splits():
    clean, other = sentences(60), sentences(20, words=("milton", "paradise", "eden"), seed=1)
    prose = sentences(9, words=("liberty", "printing", "licence"), seed=2)
    kinds = ("other_author", "other_domain", "shuffled_words", "char_noise")
    sources = {"other_author": other, "other_domain": prose}
    task = build_corrupted_text_task(
        clean, sources, num_train_clean=12, num_corrupted=5, num_meta=6, num_eval=7, corruptions=kinds, seed=3
    )
    train = task["train"]
    assert {kind: train["corruption"].count(kind) for kind in set(train["corruption"])} == {
        "clean": 12, "other_author": 5, "other_domain": 5, "shuffled_words": 5, "char_noise": 5,
    }  # fmt: skip
    assert train["is_corrupted"] == [kind != "clean" for kind in train["corruption"]]
    assert (len(task["meta"]), len(task["eval"])) == (6, 7)
    train_clean = {t for t, k in zip(train["text"], train["corruption"], strict=True) if k == "clean"}
    meta, eval_ = set(task["meta"]["text"]), set(task["eval"]["text"])
    assert not (train_clean & meta or train_clean & eval_ or meta & eval_)
    assert train_clean | meta | eval_ <= set(clean)
    other_rows = [t for t, k in zip(train["text"], train["corruption"], strict=True) if k == "other_author"]
    assert set(other_rows) <= set(other)
    assert {t for t, k in zip(train["text"], train["corruption"], strict=True) if k == "other_domain"} <= set(prose)
    # Damaged rows come from clean passages used nowhere else (its number names the source passage).
    number = lambda text: next(word for word in text.split() if word.isdigit())  # noqa: E731
    origins = {number(t) for t, k in zip(train["text"], train["corruption"], strict=True) if k == "shuffled_words"}
    used = {number(t) for t in train_clean | meta | eval_}
    assert len(origins) == 5 and not origins & used
    again = build_corrupted_text_task(clean, sources, 12, 5, 6, 7, kinds, seed=3)
    assert again["train"]["text"] == train["text"] and "stop" not in again
    # A stop split is drawn last: the other splits stay as they were, and it shares no passage with them.
    stopped = build_corrupted_text_task(clean, sources, 12, 5, 6, 7, kinds, seed=3, num_stop=4)
    assert all(stopped[split]["text"] == task[split]["text"] for split in ("train", "meta", "eval"))
    assert len(stopped["stop"]) == 4 and set(stopped["stop"]["text"]) <= set(clean)
    assert not {number(t) for t in stopped["stop"]["text"]} & (used | origins)


def test_task_names_what_is_missing():
    with pytest.raises(ValueError, match=r"10 distinct clean passages, but the splits need 20"):
        build_corrupted_text_task(sentences(10), None, 8, 4, 4, 4, ("shuffled_words",))
    with pytest.raises(ValueError, match=r"'other_domain' needs at least num_corrupted=4 passages in sources"):
        build_corrupted_text_task(sentences(40), {"other_domain": sentences(2)}, 8, 4, 4, 4, ("other_domain",))
    with pytest.raises(ValueError, match=r"name one or more of"):
        build_corrupted_text_task(sentences(40), None, 8, 4, 4, 4, ("typos",))


def test_pairs_split_each_passage_at_its_first_line_and_mismatch_completions_across_passages():
    first, rest = sentences(60, seed=4), sentences(60, words=("one", "two", "three"), seed=5)
    clean = [f"{a}\n{b}" for a, b in zip(first, rest, strict=True)]  # line i pairs with line i (same number)
    kinds = ("mismatched_completion", "shuffled_words")
    task = build_corrupted_text_task(clean, None, 12, 5, 6, 7, kinds, seed=1, pairs=True)
    train, number = task["train"], lambda text: next(w for w in text.split() if w.isdigit())  # noqa: E731
    assert train.column_names == ["prompt", "completion", "is_corrupted", "corruption"]
    assert task["meta"].column_names == ["prompt", "completion"] == task["eval"].column_names
    for row in [*train, *task["meta"], *task["eval"]]:
        assert row["prompt"].endswith("\n") and "\n" not in row["completion"]
        mismatched = row.get("corruption") == "mismatched_completion"
        assert (number(row["prompt"]) != number(row["completion"])) == mismatched
        if row.get("corruption") == "shuffled_words":  # the completion is damaged, the prompt is not
            assert row["prompt"].strip() in first and row["completion"] not in rest
            assert sorted(row["completion"].split()) == sorted(rest[first.index(row["prompt"].strip())].split())
    assert train["corruption"].count("mismatched_completion") == 5
    assert passages(PLAY, separator="\n")[0] == (
        "Who is there upon the platform tonight?\nNay answer me and unfold yourself now."
    )
    with pytest.raises(ValueError, match=r"'mismatched_completion' needs prompt/completion rows"):
        build_corrupted_text_task(clean, None, 12, 5, 6, 7, kinds, seed=1)
    with pytest.raises(ValueError, match=r"passages of two or more lines"):
        build_corrupted_text_task(first, None, 12, 5, 6, 7, ("shuffled_words",), pairs=True)


def test_code_passages_keep_code_lines_and_skip_comments_docstrings_and_blank_lines():
    source = '''def area(width, height):
    """The area.

    Of a rectangle, in square units.
    """
    product = width * height
    return product if product > 0 else 0

# a comment line breaks a run
x = compute(1, 2)
y = compute(3, 4)
'''
    assert code_passages(source) == [
        "    product = width * height\n    return product if product > 0 else 0",
        "x = compute(1, 2)\ny = compute(3, 4)",
    ]
