"""Peers: Betty's hypergradients (darts, sama, neumann, cg) against the exact one, beside ours, on one problem.

Problem: a tiny Llama built from config (hidden 64, 2 layers, 4 heads, vocab 256, eager attention, float32) with
peft LoRA r=4 on q_proj/v_proj as θ, and a logit per training example as φ (``example_logits``, zeros,
softmax-normalised per batch) weighting the inner loss; the meta loss is the plain LM loss on a meta batch of
random tokens. Every method sees the same setting: T inner SGD steps (lr 1e-2) from the same θ_0, then one
hypergradient with respect to φ. Exact = our ``rgu`` (reverse mode through the T steps).

Methods: Betty (https://github.com/leopard-ai/betty, PyPI ``betty-ml``) ``darts``, ``sama``, ``neumann`` and
``cg``, with our loss functions inside its ``ImplicitProblem``\\s: the inner problem takes T steps with
``torch.optim.SGD``, then the outer problem's backward leaves Betty's hypergradient in φ's ``.grad``, which is
read before any outer update (the outer optimizer never steps). Ours: ``fg2u`` (b=8 Rademacher directions),
``hessian_free``, ``neumann`` and ``cg`` (5 iterations each; Neumann step = inner lr, as Betty's here).
Betty's methods are implicit (IFT) approximations at θ_T using its last inner batch only, so with T > 1 they
ignore the weights of the earlier batches by design; T=1 (the default) gives every method the same one batch.

Reported per method: cosine similarity of its hypergradient to the exact one, the norm ratio (Betty's darts
and sama leave out the inner lr factor of an unrolled step, so their direction is what compares), peak RSS
growth during one outer step (``measure_peak``; each method in a fresh process of this script, after one
warm-up outer step), the median time of 5 further outer steps, and memory / time over rgu's.

Betty 0.2.x declares ``Requires-Python <3.11`` and 0.1.1 has metadata that current pip rejects, so on Python
3.11+ install it with ``pip install --no-deps --ignore-requires-python betty-ml==0.2.1`` (its other dependency,
numpy, comes with transformers). Without Betty the script still runs: it writes the import error and what was
tried into the report and measures our methods only.

Copy-paste (from the repository root; ~2 minutes on 2 CPU cores, mostly imports of 9 workers)::

    .venv/bin/python scripts/bench_betty.py --out-dir docs

Writes ``bench_betty.md`` (table) and ``bench_betty.json`` (config, versions, Betty attempts and raw records
with every hypergradient) to ``--out-dir``. Worker mode (one method, one JSON line; what the parent runs)::

    .venv/bin/python scripts/bench_betty.py --worker betty:darts
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from _bench_common import ModelSizes, build_llama, cosine, measure_peak, random_token_batches, run_worker_process

from hf_fg2u.hypergrad import estimate_hypergradient
from hf_fg2u.lm.losses import batch_softmax_weights, make_lm_problem
from hf_fg2u.lm.params import trainable_parameters

KEY = "example_logits"
INNER_LR = 1e-2
IMPLICIT_STEPS = 5
TIMING_REPEATS = 5
FG2U_DIRECTIONS = 8
EXACT = "ours:rgu"
OURS = {
    "rgu": {},
    "fg2u": {"num_directions": FG2U_DIRECTIONS, "directions_per_pass": FG2U_DIRECTIONS, "directions": "rademacher"},
    "hessian_free": {},
    "neumann": {"implicit_steps": IMPLICIT_STEPS},
    "cg": {"implicit_steps": IMPLICIT_STEPS},
}
BETTY = ("darts", "sama", "neumann", "cg")
BETTY_SETTINGS = ("type", "unroll_steps", "darts_alpha", "sama_adam_alpha", "neumann_iterations", "neumann_alpha")
BETTY_SETTINGS += ("cg_iterations", "cg_alpha")
BETTY_PIP = "pip install --no-deps --ignore-requires-python betty-ml==0.2.1"
SIZES = ModelSizes(hidden=64, layers=2, heads=4, vocab=256, rank=4, batch_size=8, seq_len=32)
SIZE_FLAGS = ("hidden", "layers", "heads", "vocab", "rank", "batch_size", "seq_len")
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Setup:
    """The bilevel problem every method is run on."""

    model: torch.nn.Module
    batches: list[dict]
    meta: dict
    inner_loss: Callable
    outer_loss: Callable
    outer: dict[str, torch.Tensor]
    seed: int


def build_setup(sizes: ModelSizes, steps: int, seed: int) -> Setup:
    model = build_llama(sizes, seed)
    batches, meta = random_token_batches(steps, sizes, seed + 1)
    inner_loss, outer_loss = make_lm_problem(model, batch_softmax_weights(KEY))
    outer = {KEY: torch.zeros(steps * sizes.batch_size)}
    return Setup(model, batches, meta, inner_loss, outer_loss, outer, seed)


def our_step(setup: Setup, method: str) -> tuple[Callable[[], torch.Tensor], dict]:
    """One outer step of our ``method`` (unroll + hypergradient from θ_0); returns it and its options."""
    params = trainable_parameters(setup.model)
    options = OURS[method]

    def step() -> torch.Tensor:
        result = estimate_hypergradient(
            setup.inner_loss, setup.outer_loss, params, setup.outer, setup.batches, setup.meta, method=method,
            inner_lr=INNER_LR, seed=setup.seed, **options,
        )  # fmt: skip
        return result.grad[KEY]

    return step, options


def live_parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's own trainable parameters by name (not copies), so autograd reaches them."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def betty_step(setup: Setup, method: str) -> tuple[Callable[[], torch.Tensor], dict]:
    """One outer step of Betty's ``method``: T engine steps of the inner problem, after which Betty runs the
    outer problem's backward. The outer problem's optimizer step is replaced by reading φ's ``.grad``, and the
    inner problem restores θ_0 at every inner-loop start, so each call starts from the same point."""
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.logging import get_logger
    from betty.problems import ImplicitProblem

    get_logger().setLevel(logging.WARNING)
    initial = {name: p.detach().clone() for name, p in live_parameters(setup.model).items()}
    captured: list[torch.Tensor] = []

    class Weights(torch.nn.Module):
        def __init__(self, logits: torch.Tensor):
            super().__init__()
            self.logits = torch.nn.Parameter(logits.clone())

    class Inner(ImplicitProblem):
        def training_step(self, batch):
            return setup.inner_loss(live_parameters(self.module), {KEY: self.outer.module.logits}, batch)

        def trainable_parameters(self):
            return list(live_parameters(self.module).values())

        def parameters(self):
            return self.trainable_parameters()

        def on_inner_loop_start(self):
            with torch.no_grad():
                for name, p in live_parameters(self.module).items():
                    p.copy_(initial[name])

    class Outer(ImplicitProblem):
        def training_step(self, batch):
            return setup.outer_loss(live_parameters(self.inner.module), {KEY: self.module.logits}, batch)

        def custom_optimizer_step(self):
            captured.append(self.module.logits.grad.detach().clone())

    steps = len(setup.batches)
    config = Config(
        type=method, unroll_steps=steps, neumann_iterations=IMPLICIT_STEPS, neumann_alpha=INNER_LR,
        cg_iterations=IMPLICIT_STEPS,
    )  # fmt: skip
    weights = Weights(setup.outer[KEY])
    outer = Outer(
        "outer", Config(first_order=True), weights, torch.optim.SGD(weights.parameters(), lr=0.0), None, [setup.meta]
    )
    sgd = torch.optim.SGD(live_parameters(setup.model).values(), lr=INNER_LR)
    inner = Inner("inner", config, setup.model, sgd, None, setup.batches)
    dependencies = {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}
    engine = Engine([outer, inner], EngineConfig(strategy="cpu", logger_type="none"), dependencies)

    def step() -> torch.Tensor:
        captured.clear()
        for _ in range(steps):
            engine.train_step()
        if len(captured) != 1:
            raise RuntimeError(f"Betty ran {len(captured)} outer backward passes in {steps} inner steps, not 1.")
        return captured[0]

    return step, {name: getattr(config, name) for name in BETTY_SETTINGS}


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(method_id: str, sizes: ModelSizes, steps: int, threads: int, seed: int) -> dict:
    """One measurement in this process: build, one warm-up outer step, the memory-measured one, then the
    median time of ``TIMING_REPEATS`` more (a single call of a few tens of ms is too noisy to compare)."""
    torch.set_num_threads(threads)
    library, method = method_id.split(":")
    setup = build_setup(sizes, steps, seed)
    step, options = (betty_step if library == "betty" else our_step)(setup, method)
    step()
    grads: list[torch.Tensor] = []
    stats = measure_peak(lambda: grads.append(step()))
    record = {"method": method_id, "options": options, "grad": grads[0].tolist(), **stats}
    return record | {"median_seconds": median_seconds(step, TIMING_REPEATS)}


def run_worker(method_id: str, args: argparse.Namespace) -> dict:
    """``measure`` in a fresh process; a failure becomes a record with the end of the worker's traceback."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", method_id, "--steps", str(args.steps)]
    command += ["--threads", str(args.threads), "--seed", str(args.seed)]
    for flag in SIZE_FLAGS:
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    # The traceback's last frame, its source line and the exception.
    record, error = run_worker_process(command, args.threads, error_lines=3)
    return record if record is not None else {"method": method_id, "error": error}


def betty_version() -> tuple[str | None, str]:
    """(betty-ml's version or None, what importing it gave: "ok" or the exact error)."""
    try:
        import betty  # noqa: F401
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"
    return metadata.version("betty-ml"), "ok"


def norm_ratio(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum(v * v for v in a)) / max(math.sqrt(sum(v * v for v in b)), 1e-300)


def label(method_id: str) -> str:
    library, method = method_id.split(":")
    if method_id == EXACT:
        return "rgu (exact)"
    if method == "fg2u":
        return f"fg2u b={FG2U_DIRECTIONS}"
    return f"betty {method}" if library == "betty" else method


def cell(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def compare(records: list[dict]) -> list[dict]:
    """Each record with cosine and norm ratio to the exact hypergradient and memory/time ratios over rgu."""
    exact = next((r for r in records if r["method"] == EXACT and "error" not in r), None)
    rows = []
    for record in records:
        row = {"label": label(record["method"]), **record}
        if exact is not None and "error" not in record:
            row["cosine"] = cosine(torch.tensor(record["grad"]), torch.tensor(exact["grad"]))
            row["norm_ratio"] = norm_ratio(record["grad"], exact["grad"])
            row["mem_vs_rgu"] = record["growth_mb"] / exact["growth_mb"] if exact["growth_mb"] > 1e-9 else None
            row["time_vs_rgu"] = record["median_seconds"] / exact["median_seconds"]
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    titles = ["method", "cosine to exact", "‖g‖ / ‖g_exact‖", "peak mem growth (MB)", "s / outer step"]
    titles += ["mem / rgu", "time / rgu"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['label']} | failed: {row['error'].replace('|', '/')} | | | | | |")
            continue
        values = [
            cell(row.get("cosine"), 4), cell(row.get("norm_ratio"), 3), cell(row["growth_mb"], 1),
            cell(row["median_seconds"], 3), cell(row.get("mem_vs_rgu"), 2), cell(row.get("time_vs_rgu"), 2),
        ]  # fmt: skip
        lines.append(f"| {row['label']} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def command_line(argv: list[str]) -> str:
    """The command that produced the report, with the environment variables that change what it runs."""
    executable = os.path.relpath(sys.executable)
    prefix = [f"{k}={os.environ[k]}" for k in ("PYTHONPATH", "OMP_NUM_THREADS") if k in os.environ]
    return " ".join(prefix + [shlex.join([executable, os.path.relpath(__file__), *argv])])


def report(
    rows: list[dict], attempts: list[dict], betty: str | None, betty_settings: dict | None, args: argparse.Namespace
) -> str:
    sizes = sizes_of(args)
    lines = [
        "# Peers: Betty's hypergradients vs exact, beside ours",
        "",
        f"Command: `{command_line(args.argv)}`",
        "",
        f"torch {torch.__version__}, betty-ml {betty or 'not available'}, Python {sys.version.split()[0]}. "
        f"Llama + LoRA {sizes.as_dict()}; T={args.steps} inner SGD step(s), lr={INNER_LR}; φ = "
        f"{args.steps * sizes.batch_size} example logits (zeros, softmax per batch); {args.threads} thread(s) "
        "per worker, each method in a fresh process after one warm-up outer step. Memory: peak RSS growth over "
        f"the RSS before the outer step; time: median of {TIMING_REPEATS} more outer steps. Exact = our rgu on the "
        "same unroll.",
        "",
        markdown_table(rows),
        "",
        f"Ours: {', '.join(f'{m} {OURS[m]}' for m in OURS if OURS[m])}; Neumann step = inner lr.",
    ]
    if betty_settings:
        settings = {k: v for k, v in betty_settings.items() if k != "type"}
        lines.append(f"Betty's `Config` of the inner problem (besides `type`): {settings}.")
    lines += ["", "Betty, what was tried:", ""]
    lines += [f"- {a['attempt']}: {a['result']}" for a in attempts]
    if betty is None:
        lines += ["", f"Install Betty into the venv with `{BETTY_PIP}` (0.2.x requires Python <3.11 otherwise)."]
    return "\n".join(lines) + "\n"


def sizes_of(args: argparse.Namespace) -> ModelSizes:
    return ModelSizes(**{flag: getattr(args, flag) for flag in SIZE_FLAGS})


def run_benchmark(args: argparse.Namespace) -> None:
    """Our methods, then Betty's if it imports; every attempt and its outcome is recorded."""
    betty, imported = betty_version()
    attempts = [{"attempt": "import betty", "result": imported}]
    method_ids = [f"ours:{m}" for m in OURS] + ([f"betty:{m}" for m in BETTY] if betty else [])
    records = []
    for index, method_id in enumerate(method_ids, 1):
        record = run_worker(method_id, args)
        records.append(record)
        outcome = record.get("error") or f"+{record['growth_mb']:.1f} MB, {record['median_seconds']:.3f} s"
        print(f"[{index}/{len(method_ids)}] {method_id}: {outcome}", flush=True)
        if method_id.startswith("betty:"):
            attempt = f"one outer step of Betty {method_id[6:]} (Engine + ImplicitProblem, T={args.steps})"
            attempts.append({"attempt": attempt, "result": record.get("error", "ok")})
    betty_settings = next(
        (r["options"] for r in records if r["method"].startswith("betty:") and "error" not in r), None
    )
    rows = compare(records)
    text = report(rows, attempts, betty, betty_settings, args)
    print("\n" + text)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_betty.md").write_text(text)
    config = {
        "command": command_line(args.argv), "sizes": sizes_of(args).as_dict(), "steps": args.steps,
        "threads": args.threads, "seed": args.seed, "inner_lr": INNER_LR, "implicit_steps": IMPLICIT_STEPS,
    }  # fmt: skip
    versions = {"torch": torch.__version__, "betty-ml": betty, "python": sys.version.split()[0]}
    payload = {"config": config, "versions": versions, "betty_attempts": attempts, "records": rows}
    (out / "bench_betty.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out}/bench_betty.{{md,json}}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1, help="T, inner SGD steps before the hypergradient")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--seed", type=int, default=0)
    for flag in SIZE_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, default=getattr(SIZES, flag))
    parser.add_argument("--out-dir", default=str(REPO / "docs"))
    workers = [f"ours:{m}" for m in OURS] + [f"betty:{m}" for m in BETTY]
    parser.add_argument("--worker", choices=workers, help="one measurement (one method) as a JSON line")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1.")
    args.argv = sys.argv[1:] if argv is None else argv
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, sizes_of(args), args.steps, args.threads, args.seed)))
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
