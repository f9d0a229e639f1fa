"""Fidelity of the hypergradient estimators: how close each gets to the exact hypergradient, and at what memory.

Problem: the tiny Llama of ``_bench_common`` (hidden 64, 2 layers, 4 heads, vocab 256, float32, eager attention)
with peft LoRA r=4 on q_proj/v_proj; T inner SGD steps on batches of B random 32-token rows; φ is one logit per
training example (``example_logits``, softmax-normalised per batch), so N = T·B outer coordinates, all active.
The exact reference ∇h is method "rgu" on the same unroll. Every number comes from real calls of
``hf_fg2u.hypergrad.estimate_hypergradient``. Four parts:

1. cosine(fg2u, ∇h) vs the number of directions b at fixed N (Rademacher and orthogonal, several seeds),
   against the theory √(b/(b+N−1)) (≈ E cos for Rademacher) and √(b/N) (orthogonal; exact at b = N);
2. cosine vs N at fixed b (N changed through the batch size B ≥ 2: with B = 1 the per-batch softmax weight
   is 1 whatever φ, so ∇h = 0), against √(b/(b+N−1));
3. the empirical E‖ĝ−∇h‖² over many seeds vs the theory (N−1)/b·‖∇h‖² (Rademacher) and (N+1)/b·‖∇h‖²
   (Gaussian), and the bias ‖mean ĝ − ∇h‖ against its noise level √(tr Cov/S). The theory covers the
   through-θ part only: fg2u adds ∇_φ f exactly, and here the meta loss does not depend on φ (checked: the
   run reports ‖∇_φ f‖);
4. equal memory: fg2u (several b, all in one vmap pass or one direction per pass), trgu (several K),
   neumann and cg, hessian_free and rgu at one T, each in a fresh worker process of this script (a T=1
   warm-up, then peak RSS growth and time of one call via ``_bench_common.measure_peak``), with its cosine to
   ∇h (the parent computes ∇h once and hands it to the workers in a temporary .pt file; fg2u's cosine is
   averaged over a few seeds, the first one the measured call).

Copy-paste (from the repository root)::

    .venv/bin/python scripts/bench_fidelity.py --quick --threads 1 --out-dir /tmp/fidelity   # check, ~1.5 min
    .venv/bin/python scripts/bench_fidelity.py --out-dir docs/bench/fidelity                 # full, ~5 min

Writes ``bench_fidelity.md`` (tables and headline figures), ``bench_fidelity.json`` (configuration and raw
per-seed values) and three plots (``bench_fidelity_directions.png``, ``bench_fidelity_outer_dim.png``,
``bench_fidelity_memory.png``) to ``--out-dir``. Times are only meaningful on an otherwise idle machine; the
memory of part 4 is not affected by load. Workers inherit the environment, so
``MALLOC_MMAP_THRESHOLD_=65536`` in front of the command removes glibc's few-MB heap drift from the memory
figures (at the cost of slower calls; see ``bench_unroll.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from _bench_common import ModelSizes, build_llama, cosine, measure_peak, random_token_batches, run_worker_process

from hf_fg2u.hypergrad import estimate_hypergradient
from hf_fg2u.lm.losses import batch_softmax_weights, make_lm_problem
from hf_fg2u.lm.params import trainable_parameters

KEY = "example_logits"
INNER_LR = 1.0
MODEL_SEED = 0
DATA_SEED = 1
REPO = Path(__file__).resolve().parents[1]
# E‖ĝ − ∇h‖² = factor(N)/b · ‖∇h‖² for b i.i.d. directions of each kind.
VARIANCE_FACTOR = {"rademacher": lambda n: n - 1, "gaussian": lambda n: n + 1}


@dataclass(frozen=True)
class Plan:
    """What one run measures: the model and batch sizes, T of parts 1–3 (N = T·B), the batch sizes of part 2,
    b of parts 2 and 3, seeds per point, and the T and method settings of the equal-memory part (fg2u as
    (b, directions per vmap pass): memory grows with the directions per pass, time with the passes)."""

    sizes: ModelSizes
    steps: int
    batch_sizes: tuple[int, ...]
    curve_directions: int
    variance_directions: int
    seeds: int
    variance_seeds: int
    memory_steps: int
    memory_fg2u: tuple[tuple[int, int], ...]
    memory_truncations: tuple[int, ...]
    implicit_steps: tuple[int, ...]
    memory_seeds: int


FULL = Plan(
    sizes=ModelSizes(hidden=64, layers=2, heads=4, vocab=256, batch_size=4, seq_len=32),
    steps=8, batch_sizes=(2, 4, 8, 16), curve_directions=8, variance_directions=4, seeds=6, variance_seeds=48,
    memory_steps=16, memory_fg2u=((1, 1), (4, 4), (16, 16), (16, 1)), memory_truncations=(1, 2, 4, 8),
    implicit_steps=(5, 20), memory_seeds=3,
)  # fmt: skip
QUICK = replace(
    FULL, sizes=ModelSizes(hidden=32, layers=1, heads=2, vocab=128, batch_size=2, seq_len=16), steps=4,
    batch_sizes=(2, 4, 8), curve_directions=4, seeds=2, variance_seeds=8, memory_steps=4,
    memory_fg2u=((1, 1), (4, 4), (4, 1)), memory_truncations=(1, 2), implicit_steps=(5,), memory_seeds=2,
)  # fmt: skip


@dataclass
class Problem:
    """The bilevel problem of one unroll: losses, θ_0, the T inner batches and the meta batch."""

    inner_loss: Callable
    outer_loss: Callable
    params: dict[str, torch.Tensor]
    batches: list[dict]
    meta: dict

    @property
    def size(self) -> int:
        """N: one outer coordinate per training example of the unroll."""
        return sum(len(batch["example_id"]) for batch in self.batches)

    def outer(self) -> dict[str, torch.Tensor]:
        return {KEY: torch.zeros(self.size)}

    def hypergradient(self, method: str, steps: int | None = None, **options) -> torch.Tensor:
        """The method's ∇h estimate (float64 vector of length N) over the first ``steps`` batches (all: None);
        the outer vector always covers every batch, so a warm-up with fewer steps shares the problem."""
        result = estimate_hypergradient(
            self.inner_loss, self.outer_loss, self.params, self.outer(), self.batches[:steps], self.meta,
            method=method, inner_optimizer="sgd", inner_lr=INNER_LR, **options,
        )  # fmt: skip
        return result.grad[KEY].double()

    def direct_term_norm(self) -> float:
        """‖∇_φ f‖ at θ_0: zero when the meta loss does not read φ (fg2u adds this term exactly)."""
        grad = torch.func.grad(self.outer_loss, argnums=1)(self.params, self.outer(), self.meta)
        return float(grad[KEY].norm())


def build_problem(model: torch.nn.Module, sizes: ModelSizes, steps: int) -> Problem:
    inner_loss, outer_loss = make_lm_problem(model, batch_softmax_weights(KEY))
    batches, meta = random_token_batches(steps, sizes, DATA_SEED)
    return Problem(inner_loss, outer_loss, trainable_parameters(model), batches, meta)


def fg2u(problem: Problem, directions: int, kind: str, seed: int) -> torch.Tensor:
    """fg2u with ``directions`` directions of ``kind`` drawn from ``seed``, all in one vmap pass."""
    return problem.hypergradient(
        "fg2u", num_directions=directions, directions=kind, seed=seed, directions_per_pass=directions
    )


def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return float((estimate - exact).norm() / exact.norm())


def theory_cosine(kind: str, directions: int, size: int) -> float:
    """≈ E cos(ĝ, ∇h): √(E⟨ĝ,∇h⟩² / E‖ĝ‖²‖∇h‖²), i.e. √(b/(b+N−1)) for Rademacher and, for b orthogonal
    directions (a random b-dimensional projection, b ≤ N), √(b/N)."""
    if kind == "orthogonal":
        return math.sqrt(directions / size)
    return math.sqrt(directions / (directions + size - 1))


def direction_counts(size: int) -> list[int]:
    """1, 2, 4, ... below N, then N itself."""
    return [2**i for i in range(size.bit_length()) if 2**i < size] + [size]


def mean_std(values: list[float]) -> tuple[float, float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    return float(tensor.mean()), float(tensor.std()) if len(values) > 1 else 0.0


def log(message: str) -> None:
    print(message, flush=True)


# --- parts 1-3: in this process ---------------------------------------------------------------------------------


def sanity_check(problem: Problem, exact: torch.Tensor) -> dict:
    """fg2u with the N basis directions must reproduce rgu; the meta loss must not depend on φ."""
    basis = fg2u(problem, problem.size, "basis", 0)
    return {"basis_vs_rgu_relative_error": relative_error(basis, exact), "direct_term_norm": problem.direct_term_norm()}


def cosine_vs_directions(problem: Problem, exact: torch.Tensor, plan: Plan) -> list[dict]:
    """Part 1: cosine to ∇h for b = 1, 2, 4, ..., N, Rademacher and orthogonal, ``plan.seeds`` seeds each."""
    records = []
    for kind in ("rademacher", "orthogonal"):
        for directions in direction_counts(problem.size):
            cosines = [cosine(fg2u(problem, directions, kind, seed), exact) for seed in range(plan.seeds)]
            records.append(
                {"kind": kind, "b": directions, "N": problem.size, "cosines": cosines,
                 "theory": theory_cosine(kind, directions, problem.size)}
            )  # fmt: skip
            log(f"  {kind} b={directions}: cos {mean_std(cosines)[0]:.3f}")
    return records


def cosine_vs_outer_dim(model: torch.nn.Module, plan: Plan) -> list[dict]:
    """Part 2: N = T·B through the batch size B, Rademacher with b = ``plan.curve_directions``; each B is its
    own problem with its own exact reference."""
    records, directions = [], plan.curve_directions
    for batch_size in plan.batch_sizes:
        problem = build_problem(model, replace(plan.sizes, batch_size=batch_size), plan.steps)
        exact = problem.hypergradient("rgu")
        cosines = [cosine(fg2u(problem, directions, "rademacher", seed), exact) for seed in range(plan.seeds)]
        records.append(
            {"B": batch_size, "N": problem.size, "b": directions, "cosines": cosines,
             "theory": theory_cosine("rademacher", directions, problem.size)}
        )  # fmt: skip
        log(f"  B={batch_size} N={problem.size}: cos {mean_std(cosines)[0]:.3f}")
    return records


def variance_record(kind: str, directions: int, estimates: torch.Tensor, exact: torch.Tensor) -> dict:
    """Empirical E‖ĝ−∇h‖² (± its standard error) vs the theory, and the bias ‖mean ĝ − ∇h‖ vs the noise
    level √(tr Cov/S) it has for an unbiased estimator."""
    seeds, size = estimates.shape
    squared_errors = (estimates - exact).pow(2).sum(1)
    theory = VARIANCE_FACTOR[kind](size) / directions * float(exact.pow(2).sum())
    mse, mse_se = float(squared_errors.mean()), float(squared_errors.std()) / math.sqrt(seeds)
    mean = estimates.mean(0)
    trace_cov = float((estimates - mean).pow(2).sum()) / (seeds - 1)
    bias = float((mean - exact).norm())
    return {
        "kind": kind, "b": directions, "N": size, "seeds": seeds, "mse": mse, "mse_se": mse_se, "theory": theory,
        "ratio": mse / theory, "ratio_se": mse_se / theory, "bias": bias, "bias_noise": math.sqrt(trace_cov / seeds),
        "relative_bias": bias / float(exact.norm()), "squared_errors": squared_errors.tolist(),
    }  # fmt: skip


def variance_study(problem: Problem, exact: torch.Tensor, plan: Plan) -> list[dict]:
    """Part 3: ``plan.variance_seeds`` independent estimates per direction kind."""
    records = []
    for kind in VARIANCE_FACTOR:
        seeds = range(plan.variance_seeds)
        estimates = torch.stack([fg2u(problem, plan.variance_directions, kind, seed) for seed in seeds])
        records.append(variance_record(kind, plan.variance_directions, estimates, exact))
        log(f"  {kind} b={plan.variance_directions}: empirical/theory {records[-1]['ratio']:.3f}")
    return records


# --- part 4: one fresh worker process per method ----------------------------------------------------------------


def memory_specs(plan: Plan) -> list[dict]:
    """(label, method, options, seeds) of every equal-memory measurement; fg2u's cosine is averaged over
    ``plan.memory_seeds`` direction seeds, the deterministic methods run once, and so does fg2u split into
    several passes: it gives the one-pass estimate of the same b and seed, only its cost differs."""
    specs = [
        {"label": f"fg2u b={b}" + ("" if per_pass == b else f", {per_pass}/pass"), "method": "fg2u",
         "options": {"num_directions": b, "directions": "rademacher", "directions_per_pass": per_pass},
         "seeds": list(range(plan.memory_seeds if per_pass == b else 1))}
        for b, per_pass in plan.memory_fg2u
    ]  # fmt: skip
    specs += [{"label": f"trgu K={k}", "method": "trgu", "options": {"truncation": k}} for k in plan.memory_truncations]
    specs += [
        {"label": f"{method} {steps} it", "method": method, "options": {"implicit_steps": steps}}
        for method in ("neumann", "cg")
        for steps in plan.implicit_steps
    ]
    specs += [{"label": name, "method": name, "options": {}} for name in ("hessian_free", "rgu")]
    return [{"seeds": [0], **spec} for spec in specs]


def measure_in_worker(spec: dict) -> dict:
    """The worker's job: build the problem, warm up with T=1, measure one call at T, then the remaining seeds'
    estimates (unmeasured) for the cosine."""
    torch.set_num_threads(spec["threads"])
    sizes = ModelSizes(**spec["sizes"])
    problem = build_problem(build_llama(sizes, MODEL_SEED), sizes, spec["steps"])
    exact = torch.load(spec["exact"])
    first, *rest = spec["seeds"]

    def call(seed: int, steps: int | None = None) -> torch.Tensor:
        return problem.hypergradient(spec["method"], steps, seed=seed, **spec["options"])

    call(first, 1)
    estimates = []
    stats = measure_peak(lambda: estimates.append(call(first)))
    estimates += [call(seed) for seed in rest]
    return {
        "label": spec["label"], "method": spec["method"], "options": spec["options"], "T": spec["steps"],
        "N": problem.size, **stats,
        "cosines": [cosine(g, exact) for g in estimates],
        "norm_ratios": [float(g.norm() / exact.norm()) for g in estimates],
    }  # fmt: skip


def run_worker(spec: dict) -> dict:
    """One measurement in a fresh process of this script; a failed worker gives a record with ``error``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    record, error = run_worker_process(command, spec["threads"])
    if record is not None:
        return record
    return {"label": spec["label"], "method": spec["method"], "options": spec["options"], "error": error}


def equal_memory(model: torch.nn.Module, plan: Plan, threads: int) -> list[dict]:
    """Part 4: the exact ∇h at T = ``plan.memory_steps`` once here, then every method in its own worker."""
    problem = build_problem(model, plan.sizes, plan.memory_steps)
    exact = problem.hypergradient("rgu")
    records = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "exact.pt"
        torch.save(exact, path)
        base = {"sizes": plan.sizes.as_dict(), "steps": plan.memory_steps, "threads": threads, "exact": str(path)}
        for spec in memory_specs(plan):
            records.append(run_worker({**base, **spec}))
            record = records[-1]
            result = record.get("error") or f"+{record['growth_mb']:.1f} MB, cos {mean_std(record['cosines'])[0]:.3f}"
            log(f"  {spec['label']}: {result}")
    return records


# --- report -----------------------------------------------------------------------------------------------------


def pm(values: list[float], digits: int = 3) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def directions_table(records: list[dict]) -> str:
    by = {(r["kind"], r["b"]): r for r in records}
    lines = [
        "| b | Rademacher cos | √(b/(b+N−1)) | orthogonal cos | √(b/N) |",
        "|---|---|---|---|---|",
    ]
    for b in sorted({r["b"] for r in records}):
        rad, orth = by[("rademacher", b)], by[("orthogonal", b)]
        lines.append(
            f"| {b} | {pm(rad['cosines'])} | {rad['theory']:.3f} | {pm(orth['cosines'])} | {orth['theory']:.3f} |"
        )
    return "\n".join(lines)


def outer_dim_table(records: list[dict]) -> str:
    lines = ["| B | N | cos | √(b/(b+N−1)) |", "|---|---|---|---|"]
    lines += [f"| {r['B']} | {r['N']} | {pm(r['cosines'])} | {r['theory']:.3f} |" for r in records]
    return "\n".join(lines)


def variance_table(records: list[dict]) -> str:
    lines = [
        "| directions | b | N | seeds | E‖ĝ−∇h‖² | theory | empirical/theory | ‖mean ĝ−∇h‖ | √(tr Cov/S) | "
        "bias/noise | ‖mean ĝ−∇h‖/‖∇h‖ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['kind']} | {r['b']} | {r['N']} | {r['seeds']} | {r['mse']:.3e} ± {r['mse_se']:.1e} | "
        f"{r['theory']:.3e} | {r['ratio']:.3f} ± {r['ratio_se']:.3f} | {r['bias']:.2e} | {r['bias_noise']:.2e} | "
        f"{r['bias'] / r['bias_noise']:.2f} | {r['relative_bias']:.3f} |"
        for r in records
    ]
    return "\n".join(lines)


def measured(records: list[dict]) -> list[dict]:
    """The workers that succeeded, by memory growth."""
    return sorted((r for r in records if "error" not in r), key=lambda r: r["growth_mb"])


def pareto(records: list[dict]) -> list[dict]:
    """The methods that no other beats on both memory and mean cosine, by memory."""
    front, best = [], -math.inf
    for record in measured(records):
        if mean_std(record["cosines"])[0] > best:
            front.append(record)
            best = mean_std(record["cosines"])[0]
    return front


def fg2u_theory(record: dict) -> str:
    """√(b/(b+N−1)) for an fg2u row, a dash for the other methods."""
    if record["method"] != "fg2u":
        return "—"
    return f"{theory_cosine('rademacher', record['options']['num_directions'], record['N']):.3f}"


def memory_table(records: list[dict]) -> str:
    lines = [
        "| method | memory growth (MB) | time (s) | cos to ∇h | fg2u theory √(b/(b+N−1)) | ‖ĝ‖/‖∇h‖ | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['label']} | {r['growth_mb']:.1f} | {r['seconds']:.2f} | {pm(r['cosines'])} | {fg2u_theory(r)} | "
        f"{pm(r['norm_ratios'])} | {len(r['cosines'])} |"
        for r in measured(records)
    ]
    lines += [f"| {r['label']} | failed: {r['error']} | | | | | |" for r in records if "error" in r]
    return "\n".join(lines)


def headlines(results: dict) -> list[str]:
    """The run's key figures as bullet lines, all computed from ``results``."""
    sanity, directions, variance = results["sanity"], results["directions"], results["variance"]
    full = {r["kind"]: r for r in directions if r["b"] == r["N"]}
    lines = [
        f"sanity: fg2u with the N = {full['rademacher']['N']} basis directions vs rgu, relative error "
        f"{sanity['basis_vs_rgu_relative_error']:.1e}; ‖∇_φ f‖ = {sanity['direct_term_norm']:.1e} (the meta loss "
        "does not read φ, so the variance theory applies as stated)",
        f"cosine at b = N: Rademacher {pm(full['rademacher']['cosines'])} (theory "
        f"{full['rademacher']['theory']:.3f}), orthogonal {pm(full['orthogonal']['cosines'], 6)}",
    ]
    lines += [
        f"variance empirical/theory, {r['kind']} b={r['b']}: {r['ratio']:.3f} ± {r['ratio_se']:.3f} over "
        f"{r['seeds']} seeds; bias/noise {r['bias'] / r['bias_noise']:.2f}"
        for r in variance
    ]
    rgu = next((r for r in measured(results["memory"]) if r["method"] == "rgu"), None)
    front = ", ".join(
        f"{r['label']} ({r['growth_mb']:.1f} MB"
        + (f" = {r['growth_mb'] / rgu['growth_mb']:.2f}× rgu" if rgu else "")
        + f", cos {mean_std(r['cosines'])[0]:.3f})"
        for r in pareto(results["memory"])
    )
    lines.append(f"equal memory, best cosine at each memory (Pareto front, T = {results['memory_steps']}): {front}")
    truncated = [r for r in measured(results["memory"]) if r["method"] == "trgu"]
    if truncated:
        gap = max(abs(r["cosines"][0] - r["norm_ratios"][0]) for r in truncated)
        lines.append(
            f"trgu: cos = ‖ĝ‖/‖∇h‖ within {gap:.0e} for every K, as when ĝ is ∇h on the last K batches' examples "
            "and 0 on the others (φ_i acts only in its own step, which truncation cuts off)"
        )
    return [f"- {line}" for line in lines]


def markdown(results: dict) -> str:
    config = results["config"]
    sizes = ", ".join(f"{key} {value}" for key, value in config["sizes"].items())
    part_seconds = ", ".join(f"{seconds:.0f}" for seconds in results["part_seconds"].values())
    return f"""# Hypergradient fidelity: cosine to the exact hypergradient, variance, equal memory

```bash
{config["command"]}
```

Llama + LoRA ({sizes}), random tokens, SGD inner lr {config["inner_lr"]}; φ = one logit per training
example, softmax-normalised per batch (N = T·B); exact ∇h = rgu on the same unroll. torch {config["torch"]},
threads: {config["threads"]}, load average at the start: {config["load_average"]:.2f}, run time:
{results["seconds"]:.0f} s (parts 1–4: {part_seconds} s). Cosines are mean ± std over direction seeds; the
theory cosines are √(E⟨ĝ,∇h⟩²/(E‖ĝ‖²‖∇h‖²)), which E cos approaches from below as b grows.

{chr(10).join(headlines(results))}

## 1. Cosine vs the number of directions b (T = {config["steps"]}, N = {results["directions"][0]["N"]})

{directions_table(results["directions"])}

![cosine vs b](bench_fidelity_directions.png)

## 2. Cosine vs N (T = {config["steps"]}, b = {config["curve_directions"]}, Rademacher; N = T·B)

{outer_dim_table(results["outer_dim"])}

![cosine vs N](bench_fidelity_outer_dim.png)

## 3. Variance vs theory ((N−1)/b·‖∇h‖² Rademacher, (N+1)/b·‖∇h‖² Gaussian)

{variance_table(results["variance"])}

## 4. Equal memory (T = {results["memory_steps"]}, N = {results["memory_steps"] * config["sizes"]["batch_size"]})

One fresh process per row: a T=1 warm-up, then the peak RSS growth and time of one call (neumann/cg use all T
inner batches for the Hessian, step α = inner lr). fg2u's cosine is over {config["memory_seeds"]} direction
seeds (the first is the measured call). The cosine of one call favours biased, low-variance methods: fg2u's
error is noise that averages out over outer steps (part 3: no bias beyond the noise), the others' is bias that
does not.

{memory_table(results["memory"])}

![cosine vs memory](bench_fidelity_memory.png)
"""


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def errorbar(axis, xs: list[float], records: list[dict], label: str, **style) -> None:
    stats = [mean_std(r["cosines"]) for r in records]
    axis.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3, marker="o", label=label, **style)


def log_x_axis(axis, ticks: list[float] | None = None) -> None:
    """A log x axis with plain numbers: at ``ticks`` if given, else matplotlib's decades."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    axis.set_xscale("log")
    if ticks is not None:
        axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
    else:
        axis.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    axis.xaxis.set_minor_formatter(NullFormatter())


def save(plt, figure, axis, path: Path) -> None:
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_directions(records: list[dict], path: Path) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for kind, color in (("rademacher", "C0"), ("orthogonal", "C1")):
        mine = [r for r in records if r["kind"] == kind]
        errorbar(axis, [r["b"] for r in mine], mine, f"{kind} (mean ± std)", color=color)
        formula = "√(b/N)" if kind == "orthogonal" else "√(b/(b+N−1))"
        axis.plot([r["b"] for r in mine], [r["theory"] for r in mine], "--", color=color, label=f"theory {formula}")
    log_x_axis(axis, sorted({r["b"] for r in records}))
    axis.set(xlabel="directions b", ylabel="cosine to exact ∇h", ylim=(0, 1.05))
    axis.set_title(f"fg2u cosine vs b (N = {records[0]['N']})")
    save(plt, figure, axis, path)


def plot_outer_dim(records: list[dict], path: Path) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    ns = [r["N"] for r in records]
    errorbar(axis, ns, records, "rademacher (mean ± std)", color="C0")
    axis.plot(ns, [r["theory"] for r in records], "--", color="C0", label="theory √(b/(b+N−1))")
    log_x_axis(axis, ns)
    axis.set(xlabel="outer dimension N = T·B", ylabel="cosine to exact ∇h", ylim=(0, 1.05))
    axis.set_title(f"fg2u cosine vs N (b = {records[0]['b']})")
    save(plt, figure, axis, path)


def plot_memory(records: list[dict], steps: int, path: Path) -> None:
    """Cosine vs memory growth, one colour per method family, each point labelled."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    families = list(dict.fromkeys(r["method"] for r in measured(records)))
    for index, family in enumerate(families):
        mine = [r for r in measured(records) if r["method"] == family]
        errorbar(axis, [r["growth_mb"] for r in mine], mine, family, color=f"C{index}", linestyle="none")
        for r in mine:
            axis.annotate(r["label"], (r["growth_mb"], mean_std(r["cosines"])[0]), fontsize=7, xytext=(4, 3),
                          textcoords="offset points")  # fmt: skip
    log_x_axis(axis)
    axis.set(xlabel="peak memory growth (MB, log scale)", ylabel="cosine to exact ∇h")
    axis.set_title(f"accuracy vs memory of one hypergradient (T = {steps})")
    save(plt, figure, axis, path)


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    (out / "bench_fidelity.md").write_text(text)
    (out / "bench_fidelity.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_directions(results["directions"], out / "bench_fidelity_directions.png")
    plot_outer_dim(results["outer_dim"], out / "bench_fidelity_outer_dim.png")
    plot_memory(results["memory"], results["memory_steps"], out / "bench_fidelity_memory.png")
    log("\n" + text + f"\nwrote {out}/bench_fidelity.{{md,json}} and 3 PNGs")


def run_benchmark(plan: Plan, args: argparse.Namespace, argv: list[str]) -> dict:
    """All four parts in order; returns everything the report and the JSON need."""
    start, load = time.perf_counter(), os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    model = build_llama(plan.sizes, MODEL_SEED)
    problem = build_problem(model, plan.sizes, plan.steps)
    exact = problem.hypergradient("rgu")
    log(f"T={plan.steps}, N={problem.size}, ‖∇h‖ = {float(exact.norm()):.3e}")
    results = {"sanity": sanity_check(problem, exact), "exact_norm": float(exact.norm())}
    log(f"sanity: {results['sanity']}")
    parts = (
        ("directions", "part 1: cosine vs b", lambda: cosine_vs_directions(problem, exact, plan)),
        ("outer_dim", "part 2: cosine vs N", lambda: cosine_vs_outer_dim(model, plan)),
        ("variance", "part 3: variance", lambda: variance_study(problem, exact, plan)),
        ("memory", "part 4: equal memory (one worker per method)", lambda: equal_memory(model, plan, args.threads)),
    )
    results["part_seconds"] = {}
    for key, title, run in parts:
        log(title)
        begin = time.perf_counter()
        results[key] = run()
        results["part_seconds"][key] = time.perf_counter() - begin
    results["memory_steps"] = plan.memory_steps
    results["seconds"] = time.perf_counter() - start
    results["config"] = {
        "command": shlex.join(["python", "scripts/bench_fidelity.py", *argv]), "sizes": plan.sizes.as_dict(),
        "inner_lr": INNER_LR, "steps": plan.steps, "batch_sizes": list(plan.batch_sizes),
        "curve_directions": plan.curve_directions, "variance_directions": plan.variance_directions,
        "seeds": plan.seeds, "variance_seeds": plan.variance_seeds, "memory_seeds": plan.memory_seeds,
        "threads": args.threads, "load_average": load, "torch": torch.__version__,
    }  # fmt: skip
    return results


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and problem: a fast check")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, here and in every worker")
    parser.add_argument("--seeds", type=int, help="direction seeds per point of parts 1 and 2 (default 6; --quick 2)")
    parser.add_argument("--variance-seeds", type=int, help="seeds per direction kind in part 3 (default 48; --quick 8)")
    parser.add_argument("--out-dir", default=str(REPO / "docs" / "bench_fidelity"))
    parser.add_argument("--worker", metavar="SPEC", help="internal: one part-4 measurement (a JSON spec)")
    args = parser.parse_args(argv)
    if min(args.seeds or 2, args.variance_seeds or 2) < 2:
        parser.error("--seeds and --variance-seeds must be >= 2 (a spread needs two samples).")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure_in_worker(json.loads(args.worker))))
        return
    plan = QUICK if args.quick else FULL
    plan = replace(plan, seeds=args.seeds or plan.seeds, variance_seeds=args.variance_seeds or plan.variance_seeds)
    write_outputs(run_benchmark(plan, args, argv), Path(args.out_dir))


if __name__ == "__main__":
    main()
