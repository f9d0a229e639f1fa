"""Reports on learned per-example weights: summary numbers, the most down-weighted rows and plots.

Used by ``hf-fg2u weights <output_dir>`` and the demo. A run saves ``BilevelTrainer.export_weights()`` to
``<output_dir>/weighted_dataset.parquet``; :func:`load_weighted_dataset` reads it back, :func:`export_weighted`
turns it into plain rows for trainers without weights (``hf-fg2u weights --export``). Weights are
positive with mean 1, so 1 is "as in uniform training" and a weight below 0.5 is a row the run halved or more.
Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch), imported only when called.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from hf_fg2u.lm.evaluation import auroc
from hf_fg2u.outer.base import normalized_entropy

WEIGHTED_DATASET_DIR = "weighted_dataset"
WEIGHTED_DATASET_FILE = "weighted_dataset.parquet"  # what a run writes (model_card.WEIGHTED_DATASET_FILE)
HISTOGRAM_NAME = "weights_histogram.png"
CORRUPTED_COLUMN = "is_corrupted"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
PLOTS_HINT = "pip install 'hf_fg2u[plots]'"

_LABELS = {
    "count": "examples",
    "mean": "mean",
    "std": "std",
    "min": "min",
    "q05": "5%",
    "q25": "25%",
    "q50": "median",
    "q75": "75%",
    "q95": "95%",
    "max": "max",
    "normalized_entropy": "normalized entropy",
    "fraction_below_half": "fraction < 0.5",
    "num_corrupted": "corrupted examples",
    "auroc_corrupted": "AUROC (-weight, corrupted)",
    "mean_weight_clean": "mean weight, clean",
    "mean_weight_corrupted": "mean weight, corrupted",
}


def _as_tensor(values, dtype: torch.dtype | None = None) -> torch.Tensor:
    if torch.is_tensor(values):
        return values.detach().cpu().to(dtype or values.dtype)
    return torch.as_tensor(list(values), dtype=dtype)


def _as_weights(weights) -> torch.Tensor:
    values = _as_tensor(weights, torch.float64)
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"weights must be a non-empty 1-D sequence, got shape {tuple(values.shape)}.")
    if not torch.isfinite(values).all():
        raise ValueError(f"weights must be finite; {int((~torch.isfinite(values)).sum())} of them are NaN or inf.")
    return values


def _as_flags(corrupted, count: int) -> torch.Tensor:
    flags = _as_tensor(corrupted, torch.bool).reshape(-1)
    if flags.numel() != count:
        raise ValueError(f"corrupted has {flags.numel()} flags but there are {count} weights; pass one per weight.")
    return flags


def weight_summary(weights, corrupted: Sequence[bool] | torch.Tensor | None = None) -> dict[str, float]:
    """Summary numbers of per-example ``weights`` [N] (a tensor or a list).

    Keys: ``count``, ``mean``, ``std`` (population), ``min``, ``q05``/``q25``/``q50``/``q75``/``q95`` (linear
    interpolation), ``max``, ``normalized_entropy`` (of w/Σw: 1 for uniform, 0 for one example),
    ``fraction_below_half``. With ``corrupted`` [N] flags also ``num_corrupted``, ``auroc_corrupted`` (AUROC of
    -weight for the corrupted rows: 1 when they all get the smallest weights, 0.5 for chance) and
    ``mean_weight_clean`` / ``mean_weight_corrupted`` (NaN when a group is empty).
    """
    values = _as_weights(weights)
    quantiles = torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64))
    total = values.sum()
    summary: dict[str, float] = {
        "count": values.numel(),
        "mean": float(values.mean()),
        "std": float(values.std(correction=0)),
        "min": float(values.min()),
        **{f"q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, quantiles, strict=True)},
        "max": float(values.max()),
        "normalized_entropy": normalized_entropy(values / total) if total > 0 else math.nan,
        "fraction_below_half": float((values < 0.5).double().mean()),
    }
    if corrupted is not None:
        flags = _as_flags(corrupted, values.numel())
        summary["num_corrupted"] = int(flags.sum())
        summary["auroc_corrupted"] = auroc(-values, flags)
        summary["mean_weight_clean"] = float(values[~flags].mean()) if (~flags).any() else math.nan
        summary["mean_weight_corrupted"] = float(values[flags].mean()) if flags.any() else math.nan
    return summary


def format_summary(summary: Mapping[str, float], title: str = "Learned per-example weights") -> str:
    """``summary`` (from :func:`weight_summary`) as an aligned two-column text table."""
    rows = [(_LABELS.get(key, key), value) for key, value in summary.items()]
    width = max(len(label) for label, _ in rows)
    lines = [title, "-" * max(len(title), width + 12)]
    for label, value in rows:
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else f"{value:.4f}"
        lines.append(f"{label:<{width}}  {text:>10}")
    return "\n".join(lines)


def _column(dataset, name: str) -> list:
    return list(dataset[name])


def _as_text(value) -> str:
    """A string, or chat messages as ``"role: content | role: content"``."""
    if isinstance(value, list):
        return " | ".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in value if isinstance(m, dict))
    return str(value)


def row_text(row: Mapping, text_column: str = "text") -> str | None:
    """The readable text of one row in any format the trainer reads: ``text``, ``prompt → completion`` or the
    ``messages``; None when the row has none of them (a tokenized dataset)."""
    if text_column in row:
        return _as_text(row[text_column])
    if "prompt" in row and "completion" in row:
        return f"{_as_text(row['prompt'])} → {_as_text(row['completion'])}"
    if "messages" in row:
        return _as_text(row["messages"])
    return None


def most_downweighted(
    dataset, k: int = 10, weight_column: str = "weight", text_column: str = "text", highest: bool = False
) -> list[tuple[float, str] | tuple[float, str, bool]]:
    """The ``k`` rows of ``dataset`` with the smallest weights, smallest first (ties keep dataset order); with
    ``highest`` the ``k`` largest, largest first.

    Each row is ``(weight, text)``, or ``(weight, text, is_corrupted)`` when the dataset has an ``is_corrupted``
    column. The text is the row's text, ``prompt → completion`` or messages (see :func:`row_text`); without any
    (a tokenized dataset) it is ``"example_id=<id>"``, or ``"row <i>"``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}.")
    if weight_column not in dataset.column_names:
        raise ValueError(
            f"The dataset has no {weight_column!r} column (columns: {dataset.column_names}). Add one with "
            "BilevelTrainer.export_weights(), or pass weight_column= the column that holds the weights."
        )
    weights = torch.as_tensor(_column(dataset, weight_column), dtype=torch.float64)
    order = torch.sort(weights, stable=True, descending=highest).indices[:k].tolist()
    rows = dataset.select(order)
    texts = [row_text(row, text_column) for row in rows]
    if all(text is not None for text in texts):
        labels = texts
    elif "example_id" in dataset.column_names:
        labels = [f"example_id={i}" for i in _column(rows, "example_id")]
    else:
        labels = [f"row {i}" for i in order]
    result = [(float(weights[i]), label) for i, label in zip(order, labels, strict=True)]
    if CORRUPTED_COLUMN in dataset.column_names:
        flags = _column(rows, CORRUPTED_COLUMN)
        result = [(*row, bool(flag)) for row, flag in zip(result, flags, strict=True)]
    return result


def format_most_downweighted(rows: Sequence[tuple], max_chars: int = 60, title: str = "most down-weighted") -> str:
    """Rows from :func:`most_downweighted` as a numbered list; texts on one line, cut at ``max_chars``."""
    lines = [f"{len(rows)} {title} examples", "rank  weight    text"]
    for rank, (weight, text, *extra) in enumerate(rows, start=1):
        text = text.replace("\n", "\\n")
        text = text if len(text) <= max_chars else text[: max_chars - 1] + "…"
        flag = ("  [corrupted]" if extra[0] else "  [clean]") if extra else ""
        lines.append(f"{rank:>4}  {weight:<8.4f}  {text}{flag}")
    return "\n".join(lines)


def _agg_figure(width: float = 6.0, height: float = 4.0):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(f"Plotting needs matplotlib: {PLOTS_HINT}") from error
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def plot_weight_histogram(
    weights,
    corrupted: Sequence[bool] | torch.Tensor | None = None,
    path: str | Path = HISTOGRAM_NAME,
    title: str = "Learned per-example weights",
    bins: int = 30,
) -> Path:
    """Histogram of ``weights`` as a PNG at ``path``; with ``corrupted`` flags, clean and corrupted rows overlaid
    on shared bins. The x axis is logarithmic when the positive weights span more than two decades."""
    import numpy as np

    values = _as_weights(weights).numpy()
    figure = _agg_figure()
    axes = figure.add_subplot()
    low, high = float(values.min()), float(values.max())
    log_scale = low > 0 and high / low > 100.0
    if high == low:
        low, high = low - 0.5 * max(abs(low), 1e-3), high + 0.5 * max(abs(high), 1e-3)
    edges = np.geomspace(low, high, bins + 1) if log_scale else np.linspace(low, high, bins + 1)
    if corrupted is None:
        axes.hist(values, bins=edges, color="tab:blue", alpha=0.8, label=f"all examples (n={len(values)})")
    else:
        flags = _as_flags(corrupted, len(values)).numpy()
        for mask, name, color in ((~flags, "clean", "tab:blue"), (flags, "corrupted", "tab:red")):
            axes.hist(values[mask], bins=edges, color=color, alpha=0.55, label=f"{name} (n={int(mask.sum())})")
    if log_scale:
        axes.set_xscale("log")
    axes.axvline(1.0, color="black", linestyle="--", linewidth=1, label="uniform weight (1)")
    axes.set_xlabel("weight" + (" (log scale)" if log_scale else ""))
    axes.set_ylabel("examples")
    axes.set_title(title)
    axes.legend()
    return _save(figure, path)


def meta_loss_history(log_history: Sequence[Mapping], key: str = "meta_loss") -> list[tuple[int, float]]:
    """``(step, value)`` pairs of ``key`` from a Trainer's ``state.log_history``, for :func:`plot_meta_loss_curves`."""
    return [(int(entry["step"]), float(entry[key])) for entry in log_history if key in entry and "step" in entry]


def plot_meta_loss_curves(
    histories: Mapping[str, Sequence[tuple[int, float]]],
    path: str | Path = "meta_loss.png",
    title: str = "Meta loss during training",
) -> Path:
    """Meta loss against outer step for several runs (e.g. ``{"bilevel": [...], "uniform": [...]}``), one line
    each, as a PNG at ``path``. Histories are ``(step, loss)`` pairs, e.g. from :func:`meta_loss_history`."""
    if not histories or not any(histories.values()):
        raise ValueError("histories is empty: pass {run name: [(step, meta loss), ...]} with at least one point.")
    figure = _agg_figure()
    axes = figure.add_subplot()
    for name, points in histories.items():
        if not points:
            continue
        steps, losses = zip(*sorted(points), strict=True)
        axes.plot(steps, losses, marker="o", markersize=3, label=name)
    axes.set_xlabel("outer step")
    axes.set_ylabel("meta loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def load_weighted_dataset(output_dir: str | Path):
    """The weighted rows of a run: ``weighted_dataset.parquet`` (the one copy a run writes, the file its Hub repo
    holds), or a ``weighted_dataset/`` folder of ``save_to_disk`` (runs before that, or saved by hand)."""
    import datasets

    output_dir = Path(output_dir)
    parquet, folder = output_dir / WEIGHTED_DATASET_FILE, output_dir / WEIGHTED_DATASET_DIR
    if parquet.is_file():
        return datasets.Dataset.from_parquet(str(parquet))
    if not folder.is_dir():
        raise FileNotFoundError(
            f"No weighted dataset at {parquet}. Run the training first: `hf-fg2u train --recipe "
            f"noisy_reweighting --output_dir {output_dir}` (or `hf-fg2u demo --output_dir "
            f"{output_dir}`), or save one yourself: trainer.export_weights().to_parquet('{parquet}')."
        )
    dataset = datasets.load_from_disk(str(folder))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"{folder} holds splits {list(dataset)}; expected a Dataset or a 'train' split.")
        dataset = dataset["train"]
    return dataset


def report_weights(output_dir: str | Path, dataset=None, k: int = 10, histogram: bool = True) -> str:
    """The weight report of a run: summary table, the ``k`` most down- and up-weighted rows, and
    ``<output_dir>/weights_histogram.png``. Returns the text (the caller prints it).

    ``dataset`` defaults to the run's weighted dataset (``load_weighted_dataset``: a ``weight`` column and
    optionally ``is_corrupted`` and ``text``). Without matplotlib the report says so instead of plotting.
    """

    output_dir = Path(output_dir)
    if dataset is None:
        dataset = load_weighted_dataset(output_dir)
    if "weight" not in dataset.column_names:
        raise ValueError(
            f"The weighted dataset has no 'weight' column (columns: {dataset.column_names}). Save "
            "BilevelTrainer.export_weights(), which adds it."
        )
    weights = _column(dataset, "weight")
    corrupted = _column(dataset, CORRUPTED_COLUMN) if CORRUPTED_COLUMN in dataset.column_names else None
    parts = [
        format_summary(weight_summary(weights, corrupted)),
        *[line for line in (unscored_line(dataset),) if line],
        format_most_downweighted(most_downweighted(dataset, k=min(k, len(dataset)))),
        format_most_downweighted(
            most_downweighted(dataset, k=min(k, len(dataset)), highest=True), title="most up-weighted"
        ),
    ]
    if histogram:
        try:
            path = plot_weight_histogram(weights, corrupted, path=output_dir / HISTOGRAM_NAME)
            parts.append(f"Histogram: {path}")
        except ImportError:
            parts.append(f"Histogram skipped: matplotlib is not installed ({PLOTS_HINT}).")
        except OSError as error:  # a run folder on a read-only filesystem: the report itself still stands
            parts.append(f"Histogram skipped: {output_dir / HISTOGRAM_NAME} could not be written ({error.strerror}).")
    return "\n\n".join(parts)


EXPORTS = ("filtered", "resampled")
SCORED_COLUMN = "scored"  # False: a row that never entered an unroll, at its starting weight (export_weights)
# Columns the run adds to the user's rows: a tool that reads the exported data (trl sft) must not see them.
RUN_COLUMNS = ("weight", SCORED_COLUMN)


def scored_flags(dataset) -> torch.Tensor:
    """Whether each row's weight was learned [N] (the ``scored`` column; all True for a run from before it)."""
    if SCORED_COLUMN not in dataset.column_names:
        return torch.ones(len(dataset), dtype=torch.bool)
    return _as_tensor(_column(dataset, SCORED_COLUMN), torch.bool)


def unscored_line(dataset) -> str | None:
    """A line counting the rows that never entered an unroll, or None when every row did."""
    unscored = int((~scored_flags(dataset)).sum())
    if not unscored:
        return None
    return (
        f"Never scored: {unscored} of {len(dataset)} rows never entered an unroll and keep their starting weight "
        f"(column {SCORED_COLUMN!r} False). Exports keep them; --drop_unscored leaves them out; more outer steps "
        "(an epoch or more) score them."
    )


def export_weighted(
    dataset, kind: str, threshold: float | None = None, keep_fraction: float | None = None,
    num_rows: int | None = None, seed: int = 0, drop_unscored: bool = False,
):  # fmt: skip
    """The weighted rows as plain rows for a trainer that ignores weights (``trl sft``): ``filtered`` keeps the rows
    whose weight is at least ``threshold``, or the top ``keep_fraction`` of them by weight (default: above the mean
    weight); ``resampled`` draws ``num_rows`` rows (default: as many as there are) with replacement, each with
    probability ∝ its weight, from ``seed``. Either way without the ``weight`` and ``scored`` columns.

    Rows that never entered an unroll (``scored`` False) have no learned weight: ``filtered`` ranks the scored rows
    only and keeps every unscored row, ``resampled`` draws them at their starting weight; ``drop_unscored`` leaves
    them out of both."""
    scored = scored_flags(dataset)
    if kind == "filtered":
        ranked = scored.nonzero().flatten()
        chosen = _filtered_rows(dataset.select(ranked.tolist()), threshold, keep_fraction)
        unscored = [] if drop_unscored else (~scored).nonzero().flatten().tolist()
        keep = sorted(ranked[torch.as_tensor(chosen, dtype=torch.long)].tolist() + unscored)
        if not keep:
            raise ValueError("No row entered an unroll, so none has a learned weight: train longer, or export "
                             "without --drop_unscored.")  # fmt: skip
    elif kind == "resampled":
        if threshold is not None or keep_fraction is not None:
            raise ValueError("--threshold and --keep_fraction are for --export filtered; resampled uses --num_rows.")
        weights = _as_weights(_column(dataset, "weight")).double()
        if drop_unscored:
            weights = torch.where(scored, weights, torch.zeros_like(weights))
        if not weights.sum() > 0:
            raise ValueError("Every weight is 0: nothing to resample.")
        generator = torch.Generator().manual_seed(seed)
        count = len(weights) if num_rows is None else num_rows
        keep = torch.multinomial(weights, count, replacement=True, generator=generator).tolist()
    else:
        raise ValueError(f"export={kind!r} is not known; use one of {list(EXPORTS)}.")
    return dataset.select(keep).remove_columns([c for c in RUN_COLUMNS if c in dataset.column_names])


def _filtered_rows(dataset, threshold: float | None, keep_fraction: float | None) -> list[int]:
    """The rows of ``dataset`` that ``export_weighted(kind="filtered")`` keeps, by weight (none for no rows)."""
    if threshold is not None and keep_fraction is not None:
        raise ValueError("Give --threshold or --keep_fraction, not both.")
    if not len(dataset):
        return []
    weights = _as_weights(_column(dataset, "weight")).double()
    if keep_fraction is not None:
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction={keep_fraction} must be in (0, 1].")
        count = max(1, round(keep_fraction * len(weights)))
        return sorted(torch.argsort(weights, descending=True, stable=True)[:count].tolist())
    cut = weights.mean().item() if threshold is None else threshold
    keep = torch.nonzero(weights >= cut).flatten().tolist()
    if not keep:
        raise ValueError(f"No row has a weight >= {threshold} (largest {weights.max():.4g}); lower --threshold.")
    return keep
