"""Loading the user's data: Hub datasets, local folders and files by split (``--data_files train=a.jsonl ...``),
and the train/meta/eval splits a run needs, distinct from each other."""

from __future__ import annotations

import json
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hf_fg2u.cli.arguments import ScriptArguments

import re
from pathlib import Path

from datasets import DatasetDict, load_dataset

from hf_fg2u.trainer.redaction import redact_text

DATA_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def uses_own_data(script_args: ScriptArguments) -> bool:
    return bool(script_args.dataset_name or script_args.data_files)


def parse_data_files(entries: list[str]) -> dict[str, list[str]]:
    """``["train=a.jsonl", "meta=b.jsonl", "c.jsonl"]`` -> ``{"train": ["a.jsonl", "c.jsonl"], "meta": [...]}``."""
    files: dict[str, list[str]] = {}
    for entry in entries:
        split, sep, path = entry.partition("=")
        if not sep:
            split, path = "train", entry
        if not re.fullmatch(r"\w+", split) or not path:
            raise ValueError(f"--data_files entry {entry!r} is not SPLIT=PATH (e.g. meta=meta.jsonl) or a path.")
        files.setdefault(split, []).append(path)
    return files


def folder_data_files(folder: Path) -> dict[str, list[str]]:
    """The data files of a folder by split, the split being the file name's first word (``meta.jsonl``,
    ``train-00000-of-00002.parquet``)."""
    files: dict[str, list[str]] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in DATA_BUILDERS:
            files.setdefault(re.match(r"[A-Za-z0-9_]*", path.name).group() or "train", []).append(str(path))
    if not files:
        raise ValueError(f"{folder} holds no data file ({', '.join(DATA_BUILDERS)}).")
    return files


def builder_of(files: dict[str, list[str]]) -> str:
    builders = {DATA_BUILDERS.get(Path(f).suffix.lower()) for paths in files.values() for f in paths}
    if len(builders) != 1 or None in builders:
        raise ValueError(
            f"Cannot tell how to read {files}: use files of one kind ({', '.join(DATA_BUILDERS)}), or name the "
            "builder with --dataset_name json|csv|parquet."
        )
    return builders.pop()


def load_data(name: str | None, config: str | None, data_files: list[str] | None) -> DatasetDict:
    """A Hub dataset, a local folder (its files by split), a local file (split "train"), or files by split
    (``--data_files``). Local files are read one split at a time, so the splits' columns may differ (a train file
    with ``is_corrupted``, a meta file without)."""
    files = parse_data_files(data_files) if data_files else None
    if name is not None and Path(name).is_dir():
        folder = Path(name)
        if files:
            files = {k: [p if Path(p).exists() else str(folder / p) for p in v] for k, v in files.items()}
        else:
            files = folder_data_files(folder)
        return load_files(files)
    if name is not None and Path(name).is_file():  # one local file: its rows are the "train" split
        return load_files({"train": [name]})
    if name is None:
        if not files:
            raise ValueError("No data: pass --dataset_name or --data_files train=FILE meta=FILE.")
        return load_files(files)
    if files and name in DATA_BUILDERS.values():  # --dataset_name json --data_files ...
        return load_files(files, builder=name)
    return load_dataset(name, config, data_files=files)


def load_files(files: dict[str, list[str]], builder: str | None = None) -> DatasetDict:
    """Local files by split, one ``load_dataset`` call per split (one call for all would cast every split to the
    first one's columns). An empty file, or a JSON Lines file with a broken line, is an error naming the file and
    the line, not the loader's own exception."""
    for split, paths in files.items():
        for path in paths:
            check_local_file(split, path)
    loaded = {}
    for split, paths in files.items():
        try:
            loaded[split] = load_dataset(builder or builder_of({split: paths}), data_files={split: paths}, split=split)
        except Exception as error:  # pyarrow's and datasets' parse errors name neither the file nor the line
            bad = next((found for path in paths if (found := first_broken_json_line(path))), None)
            if bad is None:
                raise
            raise ValueError(f"{bad[0]} line {bad[1]} is not a JSON object ({bad[2]}); fix or remove it.") from error
    return DatasetDict(loaded)


def check_local_file(split: str, path: str) -> None:
    """A data file that exists, is a file and holds something; a URL or a folder is named with what to pass."""
    if re.match(r"[a-z][a-z0-9+.-]*://", path):
        raise ValueError(
            f"--data_files {split}={redact_text(path)} is a URL; files are read from this machine. Download it first "
            "(e.g. huggingface_hub.hf_hub_download or curl) and pass the local path, or pass a Hub dataset as "
            "--dataset_name."
        )
    if Path(path).is_dir():
        raise ValueError(
            f"--data_files {split}={path} is a folder. Pass the folder as --dataset_name {path} (its files by split: "
            "train.jsonl, meta.jsonl, ...), or name its files: --data_files train=FILE meta=FILE."
        )
    if not Path(path).exists():
        raise ValueError(f"--data_files {split}={path}: no such file.")
    if Path(path).stat().st_size == 0:
        raise ValueError(f"{path} is empty: a split needs at least one row.")


def first_broken_json_line(path: str) -> tuple[str, int, str] | None:
    """(path, line number, why) of the first line of a .jsonl/.json Lines file that is not a JSON object."""
    if Path(path).suffix not in (".jsonl", ".json") or not Path(path).is_file():
        return None
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                if number == 1 and Path(path).suffix == ".json":
                    return None  # a whole-file JSON document, not JSON Lines
                return path, number, error.msg
            if not isinstance(row, dict):
                return path, number, f"a {type(row).__name__}, not an object"
    return None


def _split(loaded: DatasetDict, name: str, source: str, flag: str):
    if name not in loaded:
        raise ValueError(f"{source} has no split {name!r} (splits: {list(loaded)}). Set {flag}.")
    return loaded[name]


def user_splits(script_args: ScriptArguments) -> DatasetDict:
    """The user's train, meta and (optional) held-out eval data, raw: ``BilevelTrainer`` tokenizes them."""
    s = script_args
    source = s.dataset_name or f"--data_files {' '.join(s.data_files)}"
    loaded = load_data(s.dataset_name, s.dataset_config, s.data_files)
    splits = {"train": _split(loaded, s.dataset_train_split, source, "--dataset_train_split")}
    meta_name = None
    if s.meta_dataset_name:
        meta = load_data(s.meta_dataset_name, s.meta_dataset_config, None)
        splits["meta"] = _split(meta, s.meta_dataset_split, s.meta_dataset_name, "--meta_dataset_split")
    else:
        meta_name = s.dataset_meta_split or next((n for n in ("meta", "validation") if n in loaded), None)
        if meta_name is None:
            raise ValueError(
                f"{source} has no meta data (splits: {list(loaded)}). Add a meta split (--data_files meta=FILE, a "
                "meta.jsonl in the folder), name one with --dataset_meta_split, or pass --meta_dataset_name."
            )
        splits["meta"] = _split(loaded, meta_name, source, "--dataset_meta_split")
    eval_name = s.dataset_eval_split or next((n for n in ("eval", "test") if n in loaded and n != meta_name), None)
    used = {meta_name: "meta", s.dataset_train_split: "train"}  # train last: it names a split both roles claim
    for role, name in (("meta", meta_name), ("eval", eval_name)):
        if name is not None and (name == s.dataset_train_split or (role == "eval" and name == meta_name)):
            raise ValueError(
                f"The {role} split {name!r} is also the {used[name]} split; held-out data must be distinct. Name "
                f"another split (--dataset_{role}_split) or pass its own file (--data_files {role}=FILE)."
            )
    if eval_name is not None:
        splits["eval"] = _split(loaded, eval_name, source, "--dataset_eval_split")
    check_corrupted_column(splits["train"], source)
    splits["train"] = without_weight_column(splits["train"], source)
    return DatasetDict(splits)


WEIGHT_COLUMN = "weight"  # where a run writes its learned weights (BilevelTrainer.export_weights)


def check_corrupted_column(train, source: str) -> None:
    """The optional ``is_corrupted`` column holds true/false (or 1/0) in every row: each epoch's end and the run's
    summary score the weights' AUROC on it, after the training a bad value would lose."""
    from hf_fg2u.hub.report import CORRUPTED_COLUMN

    if CORRUPTED_COLUMN not in train.column_names:
        return
    for row, value in enumerate(train[CORRUPTED_COLUMN]):
        if not (isinstance(value, bool) or (isinstance(value, int | float) and value in (0, 1))):
            shown = "null" if value is None else f"{type(value).__name__} {value!r:.40}"
            raise ValueError(
                f"Row {row} of the train data ({source}) has {shown} in column {CORRUPTED_COLUMN!r}, which must be "
                "true/false (or 1/0) in every row: the AUROC of the learned weights is scored on it. Fix that row, "
                f"or drop or rename the column to train without the AUROC."
            )


def without_weight_column(train, source: str):
    """The train rows without a ``weight`` column (a run's weighted_dataset.parquet fed back): the run writes its
    own learned weights under that name."""
    if WEIGHT_COLUMN not in train.column_names:
        return train
    warnings.warn(
        f"The train data ({source}) has a {WEIGHT_COLUMN!r} column (an earlier run's weights?); it is left out: this "
        "run learns its own and writes them in that column. Rename yours to keep it beside them.",
        stacklevel=3,
    )
    return train.remove_columns(WEIGHT_COLUMN)
