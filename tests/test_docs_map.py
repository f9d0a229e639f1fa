"""docs/README.md maps every file under docs/ to the make target that writes it (issue 37): no file is left out,
and every target it names is one the Makefile has."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT / "docs" / "README.md"


def listed_paths() -> set[str]:
    """The docs/ paths written in backticks in the map; a folder ends with a slash."""
    return set(re.findall(r"`(docs/[^`\s]+)`", MAP.read_text()))


def makefile_targets() -> set[str]:
    """The Makefile's explicit targets (``name:``, not ``NAME :=``)."""
    return set(re.findall(r"^([A-Za-z0-9_-]+):(?!=)", (ROOT / "Makefile").read_text(), re.M))


def test_every_docs_file_is_in_the_map():
    listed = listed_paths()
    files = [p.relative_to(ROOT) for p in sorted((ROOT / "docs").rglob("*")) if p.is_file() and p != MAP]
    assert len(files) > 50  # the map is checked against the real tree, not an empty one
    # A file is listed by its path or by its own folder's (the folder a command writes whole), never by a folder
    # above that: `docs/bench/` alone must not cover everything in it.
    missing = [str(f) for f in files if str(f) not in listed and f"{f.parent}/" not in listed]
    assert missing == [], f"add these to docs/README.md with the target that writes them: {missing}"


def test_every_target_the_map_names_exists():
    named = set(re.findall(r"`make ([A-Za-z0-9_-]+)", MAP.read_text()))
    assert {"value", "rater", "bench", "real-report", "low-precision"} <= named
    unknown = sorted(named - makefile_targets())
    assert unknown == [], f"docs/README.md names make targets the Makefile lacks: {unknown}"


def test_every_target_is_phony_and_described_for_make_help():
    text = (ROOT / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY:(.*?)(?<!\\)$", text, re.M | re.S).group(1).replace("\\\n", " ").split())
    described = set(re.findall(r"^([A-Za-z0-9_-]+):[^=\n]*## ", text, re.M))
    assert phony == makefile_targets() == described
