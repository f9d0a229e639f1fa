"""``hf-fg2u score RUN --data_files rows.jsonl [more] --output_dir OUT``: weigh rows a learned rater never saw.

RUN is a ``--recipe data_rater`` run (folder or Hub repo): its rater, the adapter its loss feature is read under,
and the tokenizer. OUT receives ``weighted_dataset.parquet`` (the rows' own columns plus ``weight``, mean 1 over
the scored rows, the scale of a bilevel run's weights) and ``score_results.json``, so ``hf-fg2u weights OUT`` and
``hf-fg2u finetune OUT`` work on it unchanged. Rows are streamed in chunks to a parquet file, so memory stays flat
in the number of rows; every check runs before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

SCORE_RESULTS = "score_results.json"
WEIGHTED = "weighted_dataset.parquet"
PARTIAL = ".scoring"  # the work of a score in progress: parts, then the new outputs, moved into place at the end
RUN_MARKERS = ("bilevel_state.json", "outer_config.json", "adapter_config.json", "_hf_fg2u.lock")
OWN_FILES = (SCORE_RESULTS, WEIGHTED, "base_model.json", PARTIAL)  # what a score writes, and may replace
KEEP = "__hf_fg2u_keep_probability"  # the first pass's column, a name no user column has


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-fg2u score", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("run", help="A `hf-fg2u train --recipe data_rater` run: its folder or Hub repo id.")
    parser.add_argument("--data_files", nargs="+", required=True, help="Rows to weigh: .jsonl/.json/.csv/.parquet.")
    parser.add_argument("--output_dir", required=True, help="Where weighted_dataset.parquet goes (a new folder).")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Replace an earlier score's output.")
    parser.add_argument("--model_name_or_path", default=None, help="The base model, when the run's is not here.")
    parser.add_argument("--gguf_file", default=None, help="The base model's GGUF file inside --model_name_or_path.")
    parser.add_argument("--batch_size", type=at_least(1), default=64, help="Rows per forward pass.")
    parser.add_argument("--max_length", type=at_least(2), default=512, help="Longer rows keep their end (the answer).")
    parser.add_argument("--bf16", action="store_true", help="Forward passes under bf16 autocast.")
    parser.add_argument("--disable_tqdm", action="store_true", help="No progress bar.")
    parser.add_argument("--num_processes", type=int, default=1, help="Ranks that split the rows (accelerate launch).")
    parser.add_argument("--accelerate_config", default=None, help="An accelerate config for the ranks.")
    return parser


def at_least(low: int):
    """An argparse type: an int of at least ``low``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse a folder holding a run or any file a score does not write; an earlier (or interrupted) score's output
    only with ``overwrite``, and then only its own files are replaced."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file; give a folder for the scored rows.")
    held = [name for name in RUN_MARKERS if (output_dir / name).exists()]
    if held:
        raise ValueError(f"--output_dir {output_dir} holds a run ({', '.join(held)}); scoring would mix its files "
                         "with the scored rows. Choose another folder.")  # fmt: skip
    entries = {path.name for path in output_dir.iterdir()}
    others = sorted(entries - set(OWN_FILES))
    if others:
        raise ValueError(f"--output_dir {output_dir} holds files a score does not write ({others[:3]}): choose an "
                         "empty folder.")  # fmt: skip
    if entries and not overwrite:
        what = "an earlier score's output" if SCORE_RESULTS in entries else "an interrupted score's files"
        raise ValueError(f"--output_dir {output_dir} holds {what}: pass --overwrite_output_dir to replace it.")


def check_same_base(run, model_name_or_path: str | None) -> None:
    """Refuse a base model whose tokenizer differs from the run's: the rater's loss feature was learned on the
    losses of that model's tokens."""
    if model_name_or_path is None or run.tokenizer is None:
        return
    from transformers import AutoTokenizer

    given = AutoTokenizer.from_pretrained(model_name_or_path)
    if given.get_vocab() != run.tokenizer.get_vocab():
        raise ValueError(
            f"--model_name_or_path {model_name_or_path} has another tokenizer than the rater's run "
            f"({len(given)} vs {len(run.tokenizer)} tokens): the rater reads losses under the adapter it was learned "
            "with, on that base model. Score with the run's base model, or learn a rater on this one."
        )


def load_rows(files: list[str]):
    from hf_fg2u.cli.data_loading import builder_of, load_files

    missing = [path for path in files if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"--data_files: no file at {missing}.")
    empty = [path for path in files if Path(path).stat().st_size == 0]
    if empty:
        raise ValueError(f"--data_files: {empty} are empty; give files with rows to weigh.")
    from datasets.exceptions import DatasetGenerationError

    try:
        rows = load_files({"train": files}, builder_of({"train": files}))["train"]
    except DatasetGenerationError as error:  # e.g. files of two formats: their columns cannot be joined
        raise ValueError(f"--data_files {files} could not be read as one table ({error.__cause__ or error}): give "
                         "files of one format and the same columns.") from error  # fmt: skip
    except ValueError as error:
        if "corresponds to no data" not in str(error):
            raise
        raise ValueError(f"--data_files {files} hold no rows; give files with rows to weigh.") from error
    if len(rows) == 0:
        raise ValueError(f"--data_files {files} hold no rows; give files with rows to weigh.")
    return rows


def score(args: argparse.Namespace) -> dict | None:
    """Check everything, then weigh the rows in two streaming passes (keep-probabilities, then weights over their
    mean); returns what ``score_results.json`` holds. Launched on several ranks (``--num_processes``), each rank
    scores a contiguous share of the rows into a part of its own and the first writes the weights (the others
    return None); the launching process checked the output folder before starting them."""
    from accelerate import PartialState

    from hf_fg2u.hub.load import load_run
    from hf_fg2u.lm.scoring import RowScorer

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU ranks (gloo) where there is no GPU
    expected = int(os.environ.get("WORLD_SIZE", 1))
    if state.num_processes != expected:
        raise RuntimeError(f"This rank sees {state.num_processes} processes of {expected} launched: the ranks would "
                           "each score every row. Check the accelerate config.")  # fmt: skip
    output_dir = Path(args.output_dir)
    if state.num_processes == 1:
        check_output_dir(output_dir, args.overwrite_output_dir)
    rows = load_rows(args.data_files)
    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    run = load_run(args.run, base_model=args.model_name_or_path, **kwargs)
    check_same_base(run, args.model_name_or_path)
    scorer = RowScorer(run.model.to(state.device), run.outer, run.tokenizer, args.max_length, args.batch_size)
    scorer.check_format(rows.column_names, f"--data_files {args.data_files}")
    scorer.rater.check_groups(rows, "scored")  # before anything is written
    partial = output_dir / PARTIAL
    if state.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # an interrupted score's (--overwrite_output_dir checked it)
        partial.mkdir(parents=True)
    state.wait_for_everyone()
    try:
        results = _score_rows(args, state, scorer, rows, partial)
        if results is not None:
            _write_base_record(run.folder, partial)
            for name in (WEIGHTED, SCORE_RESULTS, "base_model.json"):  # the earlier score's files, replaced only now
                os.replace(partial / name, output_dir / name)
    finally:  # the other ranks are done once the first has results (they passed its last barrier)
        if state.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
    return results


def _score_rows(args, state, scorer, rows, partial: Path) -> dict | None:
    """Both passes into ``partial``: this rank's share of keep-probabilities, then (first rank) the weights."""
    start = time.perf_counter()
    share = rows.shard(state.num_processes, state.process_index, contiguous=True)
    totals = _first_pass(scorer, share, partial / f"keep-{state.process_index:05d}.parquet", args)
    (partial / f"totals-{state.process_index:05d}.json").write_text(json.dumps(totals))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    shares = [json.loads(path.read_text()) for path in sorted(partial.glob("totals-*.json"))]
    total, counted, unscored = (sum(share[i] for share in shares) for i in range(3))
    seconds = time.perf_counter() - start
    if not counted:
        raise ValueError(f"No row of {args.data_files} has an answer to score (every completion is empty, or "
                         f"--max_length {args.max_length} cut it off).")  # fmt: skip
    mean = total / counted
    if unscored:
        warnings.warn(f"{unscored} of {len(rows)} rows have no answer to score (an empty completion): their weight "
                      "is 0 and their scored column False.", stacklevel=2)  # fmt: skip
    _second_pass(sorted(partial.glob("keep-*.parquet")), partial / WEIGHTED, mean)
    results = {
        "run": str(args.run), "data_files": list(args.data_files), "rows": len(rows), "unscored_rows": unscored,
        "processes": state.num_processes, "mean_keep_probability": mean, "seconds": seconds,
        "rows_per_second": len(rows) / seconds,
    }  # fmt: skip
    results.update(_separation(partial / WEIGHTED))
    (partial / SCORE_RESULTS).write_text(json.dumps(results, indent=2))
    return results


def _first_pass(scorer, rows, keep_file: Path, args) -> tuple[float, int, int]:
    """The rows with their keep-probability (NaN: no answer to score), chunk by chunk to ``keep_file``; the sum and
    count of the scored ones, and the count of the others."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    total, counted, unscored, writer = 0.0, 0, 0, None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else torch.autocast("cpu", enabled=False)
    with tqdm(total=len(rows), desc="Scoring rows", unit="rows", disable=args.disable_tqdm) as bar, autocast:
        for start, keep in scorer.chunks(rows):
            chunk = rows.with_format("arrow")[start : start + len(keep)]
            table = chunk.append_column(KEEP, pa.array(keep.numpy()))
            writer = writer or pq.ParquetWriter(str(keep_file), table.schema)
            writer.write_table(table)
            scored = ~torch.isnan(keep)
            total += float(keep[scored].sum())
            counted += int(scored.sum())
            unscored += int((~scored).sum())
            bar.update(len(keep))
    if writer is not None:  # a rank's share may hold no row
        writer.close()
    return total, counted, unscored


def _second_pass(keep_files: list[Path], out_file: Path, mean: float) -> None:
    """``weight`` = keep-probability / its mean over the scored rows, and ``scored``: False (weight 0) for a row with no
    answer to score; row group by row group."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from hf_fg2u.hub.report import SCORED_COLUMN

    writer = None
    for keep_file, index in ((path, i) for path in keep_files for i in range(pq.ParquetFile(str(path)).num_row_groups)):
        table = pq.ParquetFile(str(keep_file)).read_row_group(index)
        keep = table.column(KEEP)
        weight = pc.fill_null(pc.if_else(pc.is_nan(keep), 0.0, pc.divide(keep, mean)), 0.0)
        stale = [name for name in (KEEP, SCORED_COLUMN, "weight") if name in table.column_names]
        table = table.drop_columns(stale).append_column(SCORED_COLUMN, pc.invert(pc.is_nan(keep)))
        table = table.append_column("weight", pa.array(weight, pa.float64()))
        writer = writer or pq.ParquetWriter(str(out_file), table.schema)
        writer.write_table(table)
    writer.close()


def _write_base_record(run_folder: Path, output_dir: Path) -> None:
    """What the run records of its base model, so ``hf-fg2u finetune OUT`` finds it as it does for a run."""
    from hf_fg2u.cli.finetune import base_model_of
    from hf_fg2u.hub.base_model import BASE_MODEL_FILE

    recorded = base_model_of(run_folder)  # base_model.json, else the adapter's config
    record = {key: recorded[key] for key in ("base_model_name_or_path", "gguf_file") if key in recorded}
    (output_dir / BASE_MODEL_FILE).write_text(json.dumps(record, indent=2))


def _separation(weighted_file: Path) -> dict:
    """AUROC of the weights, wrong rows against right ones, where the rows carry a boolean ``is_corrupted``."""
    import pyarrow.parquet as pq

    from hf_fg2u.lm.evaluation import auroc

    if "is_corrupted" not in pq.read_schema(str(weighted_file)).names:
        return {}
    table = pq.read_table(str(weighted_file), columns=["is_corrupted", "weight"])
    flags = table.column("is_corrupted").to_pylist()
    if any(not isinstance(flag, bool) for flag in flags) or len(set(flags)) < 2:
        return {}
    weights = torch.tensor(table.column("weight").to_pylist(), dtype=torch.float64)
    return {"auroc_corrupted": auroc(-weights, torch.tensor(flags))}


def run_score(argv: list[str]) -> dict:
    """Score here, or with ``--num_processes N`` on N ranks started through ``accelerate launch`` (the output folder and
    the files are checked here first)."""
    import subprocess

    from hf_fg2u.cli import launch

    launch_args, argv = launch.split_launch_args(argv)
    args = make_parser().parse_args(argv)
    if launch_args.num_processes > 1 and not launch.launched():
        check_output_dir(Path(args.output_dir), args.overwrite_output_dir)
        load_rows(args.data_files)
        command = launch.launch_command(launch_args.num_processes, launch_args.accelerate_config, argv, "score")
        env = launch.launch_env(launch_args.accelerate_config)
        print("[hf_fg2u] " + launch.echo_command(command, env))
        if subprocess.run(command, check=False, env={**os.environ, **env}).returncode:
            raise RuntimeError("accelerate launch of the scoring ranks failed (command above).")
        results = json.loads((Path(args.output_dir) / SCORE_RESULTS).read_text())
        if results.get("processes") != launch_args.num_processes:
            raise RuntimeError(f"The ranks scored as {results.get('processes')} processes, not "
                               f"{launch_args.num_processes}: check the accelerate config.")  # fmt: skip
    else:
        results = score(args)
        if results is None:  # a rank other than the first: the first reports
            return {}
    print(f"hf-fg2u score: {results['rows']} rows in {results['seconds']:.1f} s ({results['rows_per_second']:.1f} "
          f"rows/s) -> {Path(args.output_dir) / 'weighted_dataset.parquet'}")  # fmt: skip
    if "auroc_corrupted" in results:
        print(f"  AUROC of the weights, corrupted vs clean: {results['auroc_corrupted']:.4f}")
    print(f"  next: hf-fg2u weights {args.output_dir}   or   hf-fg2u finetune {args.output_dir}")
    return results
