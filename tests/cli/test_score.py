"""`hf-fg2u score`: a data_rater run weighs rows it never saw, in each row format, with the weights its own run
exported for the rows it did see; and every refusal happens before anything is written."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from hf_fg2u.cli.main import main
from hf_fg2u.cli.score import SCORE_RESULTS

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = ["good", "bad", "nice", "sad", "glad", "mad", "kind", "mean", "fine", "poor", "fair", "foul", "calm", "grim"]


def rows(row_format: str, words=WORDS, flip_every: int = 3):
    """Rows asking whether a word is nice, in one of the three formats; every ``flip_every``-th answer wrong."""
    out = []
    for index, word in enumerate(words):
        answer = " yes" if index % 2 == 0 else " no"
        wrong = index % flip_every == 0
        if wrong:
            answer = " no" if answer == " yes" else " yes"
        prompt = f"is {word} nice:"
        if row_format == "text":
            row = {"text": prompt + answer}
        elif row_format == "messages":
            row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
        else:
            row = {"prompt": prompt, "completion": answer}
        out.append({**row, "is_corrupted": wrong})
    return out


def write(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return str(path)


def learn_rater(tiny_model, tmp_path, row_format="prompt_completion", *extra, recipe="data_rater"):
    train = write(tmp_path / "train.jsonl", rows(row_format) * 2)
    meta = write(tmp_path / "meta.jsonl", rows(row_format, WORDS[:8], flip_every=10**6))
    out = tmp_path / f"rater_{row_format}"
    main(["train", "--recipe", recipe, "--model_name_or_path", tiny_model, "--data_files", f"train={train}",
          f"meta={meta}", "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "4",
          "--unroll_steps", "1", "--inner_warmup_steps", "0", "--meta_batch_size", "4", "--max_length", "64",
          "--disable_tqdm", "true", "--plot", "false", *extra])  # fmt: skip
    return out


@pytest.mark.parametrize("row_format", ["prompt_completion", "text", "messages"])
def test_score_weighs_new_rows_as_the_run_weighed_its_own(tiny_model, tmp_path, row_format):
    run = learn_rater(tiny_model, tmp_path, row_format)
    pool = write(tmp_path / "pool.jsonl", rows(row_format) * 2)  # the train rows, as a user's new file
    out = tmp_path / "scored"
    main(["score", str(run), "--data_files", pool, "--output_dir", str(out), "--batch_size", "5",
          "--disable_tqdm"])  # fmt: skip
    scored = pq.read_table(out / "weighted_dataset.parquet").to_pylist()
    exported = pq.read_table(run / "weighted_dataset.parquet").to_pylist()
    assert len(scored) == len(exported) == 2 * len(WORDS)
    assert set(scored[0]) == {*rows(row_format)[0], "scored", "weight"}  # the user's columns, as a run exports them
    assert all(row["scored"] for row in scored)
    got, want = (torch.tensor([row["weight"] for row in table]) for table in (scored, exported))
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-6)  # the run's own export, mean 1
    results = json.loads((out / SCORE_RESULTS).read_text())
    assert results["rows"] == 2 * len(WORDS) and results["rows_per_second"] > 0 and "auroc_corrupted" in results
    assert json.loads((out / "base_model.json").read_text())["base_model_name_or_path"] == tiny_model
    assert not (out / ".scoring").exists()
    card = (run / "README.md").read_text()  # what the rater reads, what it was fitted on, how to score with it
    kind = {"text": "language_modeling", "messages": "conversational"}.get(row_format, row_format)
    assert "## Scoring rows with this rater" in card and f"weighs {kind} rows" in card
    assert f"hf-fg2u score {run.resolve()}" in card and "keep-probabilities the online loop learned" in card


def test_score_output_feeds_weights_and_finetune(tiny_model, tmp_path, capsys):
    run = learn_rater(tiny_model, tmp_path)
    out = tmp_path / "scored"
    main(["score", str(run), "--data_files", write(tmp_path / "pool.jsonl", rows("prompt_completion")),
          "--output_dir", str(out), "--disable_tqdm"])  # fmt: skip
    main(["weights", str(out)])
    assert "weight" in capsys.readouterr().out
    main(["finetune", str(out), "--output_dir", str(tmp_path / "ft"), "--max_steps", "2",
          "--per_device_train_batch_size", "4", "--lora_target_modules", "q_proj", "v_proj", "--disable_tqdm",
          "true"])  # fmt: skip
    results = json.loads((tmp_path / "ft" / "finetune_results.json").read_text())
    assert results["model"] == tiny_model and results["steps"] == 2


def refused(argv, match):
    with pytest.raises(SystemExit, match=match):
        main(["score", *argv])


def test_every_refusal_names_the_fix_and_writes_nothing(tiny_model, tmp_path):
    run = learn_rater(tiny_model, tmp_path)
    out = tmp_path / "out"
    text = write(tmp_path / "text.jsonl", rows("text"))
    refused([str(run), "--data_files", text, "--output_dir", str(out)],
            "holds language_modeling rows, but the rater was learned on prompt_completion rows")  # fmt: skip
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    refused([str(run), "--data_files", str(empty), "--output_dir", str(out)], "are empty")
    pool = write(tmp_path / "pool.jsonl", rows("prompt_completion"))
    refused([str(run), "--data_files", pool, "--output_dir", str(run)], "holds a run")
    assert not out.exists()
    other = tmp_path / "other_model"
    from transformers import AutoTokenizer, LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(tiny_model).save_pretrained(other)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    refused([str(run), "--data_files", pool, "--output_dir", str(out), "--model_name_or_path", str(other)],
            "another tokenizer than the rater's run")  # fmt: skip
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused([str(run), "--data_files", pool, "--output_dir", str(out)], "choose an empty folder")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_run_of_per_row_weights_is_not_a_rater(tiny_model, tmp_path):
    run = learn_rater(tiny_model, tmp_path, recipe="noisy_reweighting_real")
    pool = write(tmp_path / "pool.jsonl", rows("prompt_completion"))
    refused([str(run), "--data_files", pool, "--output_dir", str(tmp_path / "o")], "this run learned ExampleWeights")
    assert not (tmp_path / "o").exists()


def test_two_processes_split_the_rows_and_write_what_one_writes(tiny_model, tmp_path):
    """--num_processes 2: each rank scores half the rows (gloo on CPU), the first writes the weights over the mean
    of all of them: the same file as one process writes."""
    run = learn_rater(tiny_model, tmp_path)
    pool = write(tmp_path / "pool.jsonl", rows("prompt_completion") * 3)
    tables = {}
    for processes in ("1", "2"):
        out = tmp_path / f"scored_{processes}"
        main(["score", str(run), "--data_files", pool, "--output_dir", str(out), "--disable_tqdm",
              "--num_processes", processes])  # fmt: skip
        tables[processes] = pq.read_table(out / "weighted_dataset.parquet").to_pylist()
        assert json.loads((out / SCORE_RESULTS).read_text())["processes"] == int(processes)
    assert [row["prompt"] for row in tables["2"]] == [row["prompt"] for row in tables["1"]]
    got, want = (torch.tensor([row["weight"] for row in tables[n]]) for n in ("2", "1"))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_replacing_an_earlier_score_keeps_it_until_the_new_one_is_written(tiny_model, tmp_path):
    """--overwrite_output_dir replaces only what a score writes, and only once the new weights exist: a score that
    fails leaves the earlier output as it was; a folder with the user's files, or an interrupted score's files
    without the flag, is refused."""
    run = learn_rater(tiny_model, tmp_path)
    pool = rows("prompt_completion")
    out = tmp_path / "scored"
    main(["score", str(run), "--data_files", write(tmp_path / "pool.jsonl", pool), "--output_dir", str(out),
          "--disable_tqdm"])  # fmt: skip
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    blank = write(tmp_path / "blank.jsonl", [{**row, "completion": " "} for row in pool])
    refused([str(run), "--data_files", blank, "--output_dir", str(out), "--overwrite_output_dir"],
            "has an answer to score")  # fmt: skip
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # nothing lost, no .scoring left
    (out / ".scoring").mkdir()  # as a killed score leaves it
    refused([str(run), "--data_files", blank, "--output_dir", str(out)], "overwrite_output_dir to replace")
    (out / "notes.txt").write_text("mine")
    refused([str(run), "--data_files", blank, "--output_dir", str(out), "--overwrite_output_dir"],
            r"files a score does not write \(\['notes.txt'\]\)")  # fmt: skip
    assert (out / "notes.txt").read_text() == "mine"


def test_rows_without_an_answer_weigh_0_and_columns_of_the_users_are_kept(tiny_model, tmp_path):
    run = learn_rater(tiny_model, tmp_path)
    pool = [{**row, "keep_probability": -1.0} for row in rows("prompt_completion")]
    pool[0]["completion"] = ""
    out = tmp_path / "scored"
    with pytest.warns(UserWarning, match="1 of 14 rows have no answer to score"):
        main(["score", str(run), "--data_files", write(tmp_path / "pool.jsonl", pool), "--output_dir", str(out),
              "--disable_tqdm"])  # fmt: skip
    scored = pq.read_table(out / "weighted_dataset.parquet").to_pylist()
    assert scored[0]["scored"] is False and scored[0]["weight"] == 0.0 and all(row["scored"] for row in scored[1:])
    assert [row["keep_probability"] for row in scored] == [-1.0] * 14  # the user's column, untouched
    assert sum(row["weight"] for row in scored[1:]) == pytest.approx(13.0)  # mean 1 over the scored rows
    with pytest.raises(SystemExit) as error:
        main(["score", str(run), "--data_files", str(tmp_path / "pool.jsonl"), "--output_dir", str(tmp_path / "o"),
              "--batch_size", "0"])  # fmt: skip
    assert error.value.code == 2 and not (tmp_path / "o").exists()
