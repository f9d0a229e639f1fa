"""Weight reports: summary numbers on hand-made weights, PNG plots, the most down-weighted rows, report_weights."""

import math
import sys

import pytest
import torch
from datasets import Dataset

from hf_fg2u.hub.report import (
    format_most_downweighted,
    format_summary,
    meta_loss_history,
    most_downweighted,
    plot_meta_loss_curves,
    plot_weight_histogram,
    report_weights,
    weight_summary,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Nine equally spaced weights with mean 1; the three smallest are the corrupted rows.
WEIGHTS = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8]
CORRUPTED = [True, True, True, False, False, False, False, False, False]


def assert_png(path, min_bytes=5_000, max_bytes=300_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert min_bytes < len(data) < max_bytes, len(data)


def test_weight_summary_numbers():
    summary = weight_summary(WEIGHTS, CORRUPTED)
    # A float32 tensor gives the same numbers to float32 precision.
    assert weight_summary(torch.tensor(WEIGHTS), torch.tensor(CORRUPTED)) == pytest.approx(summary, abs=1e-6)
    # Linear interpolation on 9 equally spaced points: q(p) = 0.2 + 1.6 p.
    expected = {
        "count": 9, "mean": 1.0, "std": 0.2 * math.sqrt(60 / 9), "min": 0.2, "max": 1.8, "q05": 0.28, "q25": 0.6,
        "q50": 1.0, "q75": 1.4, "q95": 1.72, "fraction_below_half": 2 / 9, "num_corrupted": 3, "auroc_corrupted": 1.0,
        "mean_weight_clean": 1.3, "mean_weight_corrupted": 0.4,
    }  # fmt: skip
    probabilities = torch.tensor(WEIGHTS, dtype=torch.float64) / 9
    expected["normalized_entropy"] = float(-(probabilities * probabilities.log()).sum() / math.log(9))
    assert set(summary) == set(expected)
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, abs=1e-9), key
    assert summary["count"] == 9 and isinstance(summary["count"], int)


def test_weight_summary_edge_cases():
    uniform = weight_summary([1.0] * 5)
    assert uniform["normalized_entropy"] == pytest.approx(1.0, abs=1e-12)
    assert uniform["std"] == 0.0 and uniform["fraction_below_half"] == 0.0
    assert "auroc_corrupted" not in uniform
    reversed_flags = weight_summary(WEIGHTS, CORRUPTED[::-1])
    assert reversed_flags["auroc_corrupted"] == 0.0  # the corrupted rows got the largest weights
    ties = weight_summary([1.0, 1.0, 1.0, 1.0], [True, False, True, False])
    assert ties["auroc_corrupted"] == 0.5
    assert math.isnan(weight_summary([1.0, 1.0], [False, False])["mean_weight_corrupted"])
    with pytest.raises(ValueError, match="2 flags but there are 9 weights"):
        weight_summary(WEIGHTS, [True, False])
    with pytest.raises(ValueError, match="NaN or inf"):
        weight_summary([1.0, float("nan")])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        weight_summary([])


def test_format_summary_is_an_aligned_table():
    text = format_summary(weight_summary(WEIGHTS, CORRUPTED))
    lines = text.splitlines()
    assert lines[0] == "Learned per-example weights"
    rows = lines[2:]
    assert len(rows) == 16
    assert len({len(row) for row in rows}) == 1  # every row right-aligns its value to the same column
    assert any(row.startswith("AUROC (-weight, corrupted)") and row.endswith("1.0000") for row in rows)
    assert any(row.startswith("examples") and row.endswith(" 9") for row in rows)


def weighted_dataset(with_text=True):
    columns = {"example_id": list(range(9)), "weight": [1.4, 0.2, 1.0, 0.05, 1.8, 0.6, 1.2, 0.6, 2.15]}
    columns["is_corrupted"] = [w < 0.7 for w in columns["weight"]]
    if with_text:
        columns["text"] = [f"fact{i}=\n{i}" for i in range(9)]
    return Dataset.from_dict(columns)


def test_most_downweighted_order_and_labels():
    rows = most_downweighted(weighted_dataset(), k=4)
    assert rows == [(0.05, "fact3=\n3", True), (0.2, "fact1=\n1", True), (0.6, "fact5=\n5", True),
                    (0.6, "fact7=\n7", True)]  # fmt: skip
    without_text = most_downweighted(weighted_dataset(with_text=False).remove_columns("is_corrupted"), k=2)
    assert without_text == [(0.05, "example_id=3"), (0.2, "example_id=1")]
    assert most_downweighted(weighted_dataset(), k=2, highest=True) == [
        (2.15, "fact8=\n8", False),
        (1.8, "fact4=\n4", False),
    ]
    pairs = Dataset.from_dict({"prompt": ["a=", "b="], "completion": ["1", "2"], "weight": [0.5, 1.5]})
    assert most_downweighted(pairs, k=1) == [(0.5, "a= → 1")]
    chats = Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}]], "weight": [1.0]})
    assert most_downweighted(chats, k=1) == [(1.0, "user: hi")]
    assert len(most_downweighted(weighted_dataset(), k=50)) == 9
    text = format_most_downweighted(rows)
    assert text.splitlines()[2] == "   1  0.0500    fact3=\\n3  [corrupted]"
    with pytest.raises(ValueError, match="no 'score' column.*export_weights"):
        most_downweighted(weighted_dataset(), weight_column="score")
    with pytest.raises(ValueError, match="positive int"):
        most_downweighted(weighted_dataset(), k=0)


def test_histogram_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_weight_histogram(torch.tensor(WEIGHTS), CORRUPTED, path=tmp_path / "plots" / "hist.png")
    assert path == tmp_path / "plots" / "hist.png"
    assert_png(path)
    # Weights over four decades get a log x axis; without flags a single histogram.
    wide = torch.logspace(-3, 1, 50)
    assert_png(plot_weight_histogram(wide / wide.mean(), path=tmp_path / "wide.png", title="wide"))
    assert_png(plot_weight_histogram([1.0, 1.0, 1.0], [True, False, False], path=tmp_path / "flat.png"))


def test_plots_without_matplotlib_name_the_extra(tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] or ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'hf_fg2u\[plots\]'"):
        plot_weight_histogram(WEIGHTS, path=tmp_path / "hist.png")
    text = report_weights(tmp_path, dataset=weighted_dataset(), k=2)
    assert "Histogram skipped" in text and "hf_fg2u[plots]" in text
    assert not (tmp_path / "weights_histogram.png").exists()


def test_meta_loss_curves(tmp_path):
    pytest.importorskip("matplotlib")
    log_history = [{"loss": 2.0, "meta_loss": 2.0, "step": 10}, {"eval_loss": 1.9, "step": 10},
                   {"loss": 1.5, "meta_loss": 1.5, "step": 20}]  # fmt: skip
    assert meta_loss_history(log_history) == [(10, 2.0), (20, 1.5)]
    histories = {"bilevel": meta_loss_history(log_history), "uniform": [(20, 1.9), (10, 2.1)]}
    assert_png(plot_meta_loss_curves(histories, tmp_path / "meta.png"))
    with pytest.raises(ValueError, match="histories is empty"):
        plot_meta_loss_curves({"bilevel": []}, tmp_path / "empty.png")


def test_report_weights_reads_the_saved_dataset(tmp_path):
    pytest.importorskip("matplotlib")
    weighted_dataset().save_to_disk(str(tmp_path / "run" / "weighted_dataset"))
    text = report_weights(tmp_path / "run", k=3)
    assert "AUROC (-weight, corrupted)      1.0000" in text
    assert "3 most down-weighted examples" in text and "3 most up-weighted examples" in text
    ranks = [line for line in text.splitlines() if line.startswith("   ")]
    assert [line.split()[1] for line in ranks] == ["0.0500", "0.2000", "0.6000", "2.1500", "1.8000", "1.4000"]
    assert "   1  2.1500    fact8=\\n8  [clean]" in text  # the highest-weighted row's text
    assert_png(tmp_path / "run" / "weights_histogram.png")
    assert f"Histogram: {tmp_path / 'run' / 'weights_histogram.png'}" in text


def test_report_weights_without_a_run_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weighted_dataset.*hf-fg2u train.*export_weights"):
        report_weights(tmp_path / "missing")
    Dataset.from_dict({"example_id": [0, 1]}).save_to_disk(str(tmp_path / "run" / "weighted_dataset"))
    with pytest.raises(ValueError, match="no 'weight' column"):
        report_weights(tmp_path / "run")
