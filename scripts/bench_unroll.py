"""Peak memory growth and time of one hypergradient vs the unroll length T, methods side by side.

Model: a tiny Llama built from config (hidden 256, intermediate 688, 4 layers, 4 heads, vocab 2048, eager
attention, float32); the inner variables θ are peft LoRA r=4 on q_proj/v_proj (``--inner lora``) or every
parameter of the model (``--inner full``); T inner batches of 8x128 random tokens. The outer variable is a logit
per training example (``example_logits``, T·batch zeros, softmax-normalised per batch); every coordinate is
active. Inner optimizer: ``--inner-optimizer`` (SGD lr 1e-2 or Adam lr 1e-3).

Methods: ``plain`` (T plain inner steps, no hypergradient: the baseline), ``fg2u`` (b directions in one vmap
pass), ``rgu`` (exact; stores the trajectory (θ_t, s_t) and recomputes one step at a time going backwards),
``graph_rgu`` (the graph-retaining reverse unroll of higher/Betty-style libraries, ``hf_fg2u.hypergrad.reference``:
not a method of this library, the baseline it used to be measured against), ``trgu`` (last min(T, K) steps),
``neumann`` / ``cg`` (5 iterations, Hessian of the last inner batch), ``hessian_free``. Each (method, T, b) runs
in a fresh process of this script: build the model, one warm-up call of the same method with T=1 (kernels,
caches), then the measured call. growth = peak RSS during the call − RSS just before it (see ``_bench_common``).

Copy-paste (from the repository root)::

    .venv/bin/python scripts/bench_unroll.py --quick --out-dir /tmp/bench     # a fast check (~2 min)
    .venv/bin/python scripts/bench_unroll.py                                  # the full default, to docs/
    .venv/bin/python scripts/bench_unroll.py --hidden 128 --layers 2 --batch-size 4 --seq-len 64 \\
        --steps 1 2 4 8 16 --out-dir /tmp/bench                               # a medium run
    .venv/bin/python scripts/bench_unroll.py --methods plain fg2u --fg2u-directions 1 8   # cost of b=8 vs b=1

Writes ``bench_unroll.md`` (table), ``bench_unroll.json`` (config + raw records) and ``bench_unroll.png``
(memory and time vs T, log-log) to ``--out-dir``. Run nothing else on the machine meanwhile: an OpenMP team
that shares a core with another busy process slows down many-fold (use ``--threads 1`` beside other work).

With glibc's default (dynamic) mmap threshold, freed activations stay in the heap and fragment it, so even
the flat methods drift up by a few MB over T=1..16; ``--mmap-threshold 65536`` removes the drift (exactly
flat growth) but roughly doubles the times, so use it for memory-only runs.

Worker mode (one measurement, one JSON line on stdout; what the parent runs, and what a test can run)::

    .venv/bin/python scripts/bench_unroll.py --worker --methods fg2u --steps 8 --directions 1 --quick
    # {"method": "fg2u", "T": 8, "b": 1, "growth_mb": ..., "seconds": ..., "baseline_mb": ..., ...}

``--worker`` takes exactly one method and one T; size flags, ``--jvp``, ``--truncation``, ``--threads`` apply
(``--mmap-threshold`` does not: set ``MALLOC_MMAP_THRESHOLD_`` in the worker's environment instead).
In-process, ``measure(method, steps, directions, sizes)`` returns the same dict (put ``scripts/`` on
``sys.path`` to import it); its memory numbers are only clean in a process that does nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from _bench_common import ModelSizes, build_llama, measure_peak, random_token_batches, run_worker_process

from hf_fg2u.hypergrad import DEFAULT_JVP, JVP_MODES, estimate_hypergradient
from hf_fg2u.hypergrad.inner_optimizers import make_inner_optimizer
from hf_fg2u.hypergrad.reference import graph_reverse_hypergradient
from hf_fg2u.hypergrad.unroll import run_inner_loop
from hf_fg2u.lm.losses import batch_softmax_weights, make_lm_problem
from hf_fg2u.lm.params import trainable_parameters

METHODS = ("plain", "fg2u", "rgu", "graph_rgu", "trgu", "neumann", "cg", "hessian_free")
DEFAULT_STEPS = [1, 2, 4, 8, 16, 32]
QUICK = {"hidden": 64, "layers": 2, "batch_size": 4, "seq_len": 32, "steps": [1, 2, 4]}
SIZE_FLAGS = ("hidden", "intermediate", "layers", "heads", "vocab", "rank", "batch_size", "seq_len")
INNER_LR = {"sgd": 1e-2, "adam": 1e-3}
INNERS = ("lora", "full")
NEUMANN_STEPS = 5
REPO = Path(__file__).resolve().parents[1]


def method_options(method: str, steps: int, directions: int, jvp: str, truncation: int) -> dict:
    """Keyword arguments of ``estimate_hypergradient`` for one benchmarked method at unroll length T.
    fg2u batches all b directions in one vmap pass, so b's cost shows in one call."""
    if method == "fg2u":
        return {"num_directions": directions, "directions_per_pass": directions, "jvp": jvp}
    if method == "trgu":
        return {"truncation": min(steps, truncation)}
    if method in ("neumann", "cg"):
        return {"implicit_steps": NEUMANN_STEPS, "implicit_batches": "last", "jvp": jvp}
    return {}


def make_runner(model, method: str, batches: list[dict], meta: dict, directions: int, jvp: str, truncation: int,
                inner_optimizer: str = "sgd"):  # fmt: skip
    """``run(T)``: the method on the first T batches. The outer vector covers all batches, so the warm-up
    (T=1) and the measured call share the problem; active_coordinates is left None: all are active."""
    inner_loss, outer_loss = make_lm_problem(model, batch_softmax_weights(), second_order=method != "plain")
    params = trainable_parameters(model)
    outer = {"example_logits": torch.zeros(sum(len(b["example_id"]) for b in batches))}
    lr = INNER_LR[inner_optimizer]
    optimizer = make_inner_optimizer(inner_optimizer, lr)
    if method == "plain":
        return lambda T: run_inner_loop(
            inner_loss, optimizer, params, optimizer.init(params), outer, batches[:T], list(range(T))
        )
    if method == "graph_rgu":
        return lambda T: graph_reverse_hypergradient(
            inner_loss, outer_loss, optimizer, params, optimizer.init(params), outer, batches[:T], meta, list(range(T))
        )
    return lambda T: estimate_hypergradient(
        inner_loss, outer_loss, params, outer, batches[:T], meta, method=method, inner_optimizer=optimizer,
        **method_options(method, T, directions, jvp, truncation),
    )  # fmt: skip


def measure(
    method: str,
    steps: int,
    directions: int = 1,
    sizes: ModelSizes | None = None,
    *,
    jvp: str = DEFAULT_JVP,
    truncation: int = 4,
    threads: int = 2,
    seed: int = 0,
    memory_cap_mb: int | None = None,
    inner: str = "lora",
    inner_optimizer: str = "sgd",
) -> dict:
    """One measurement in this process: build, warm up with T=1, then time the call at T=``steps``.

    sizes: default :class:`ModelSizes`. memory_cap_mb: see :func:`cap_address_space`.
    Returns {method, T, b, growth_mb, seconds, baseline_mb, peak_mb, peak_reset, inner, theta_numel}; b is None
    except for fg2u; theta_numel = |θ|, the number of inner parameters.
    """
    sizes = sizes or ModelSizes()
    torch.set_num_threads(threads)
    model = build_llama(sizes, seed, inner)
    batches, meta = random_token_batches(steps, sizes, seed + 1)
    run = make_runner(model, method, batches, meta, directions, jvp, truncation, inner_optimizer)
    theta_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run(1)
    if memory_cap_mb:
        cap_address_space(memory_cap_mb)
    stats = measure_peak(lambda: run(steps))
    b = directions if method == "fg2u" else None
    return {"method": method, "T": steps, "b": b, **stats, "inner": inner, "theta_numel": theta_numel}


def cap_address_space(extra_mb: int) -> None:
    """Let the measured call map at most ``extra_mb`` MB more than the process holds now: past that, torch's
    allocator raises "can't allocate memory" and the cell is recorded as out of memory, instead of the kernel
    killing whatever runs on the machine."""
    import resource

    with open("/proc/self/status") as status:
        size_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = (size_kb // 1024 + extra_mb) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def worker_command(method: str, steps: int, directions: int | None, args: argparse.Namespace) -> list[str]:
    """The command line of one ``--worker`` measurement with the parent's sizes and options."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--methods", method, "--steps", str(steps)]
    command += ["--directions", str(directions or 1), "--jvp", args.jvp, "--truncation", str(args.truncation)]
    command += ["--threads", str(args.threads), "--seed", str(args.seed)]
    command += ["--inner", args.inner, "--inner-optimizer", args.inner_optimizer]
    if args.memory_cap_mb:
        command += ["--memory-cap-mb", str(args.memory_cap_mb)]
    for flag in SIZE_FLAGS:
        if getattr(args, flag) is not None:
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return command


def run_worker(method: str, steps: int, directions: int | None, args: argparse.Namespace) -> dict:
    """One measurement in a fresh process; a failed worker (out of memory, killed) yields a record with
    ``error`` instead of stopping the whole benchmark."""
    extra_env = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else None
    record, error = run_worker_process(worker_command(method, steps, directions, args), args.threads, extra_env)
    if record is not None:
        return record
    if "can't allocate memory" in error or "MemoryError" in error:
        error = f"out of memory (over the {args.memory_cap_mb} MB cap)"
    return {"method": method, "T": steps, "b": directions, "error": error}


def plan(args: argparse.Namespace) -> list[tuple[str, int, int | None]]:
    """(method, T, b) of every measurement, T-major so that a partial run covers all methods; b is None for
    the methods without directions."""
    directions = args.fg2u_directions or [args.directions]
    return [
        (method, steps, b)
        for steps in args.steps
        for method in args.methods
        for b in (directions if method == "fg2u" else [None])
    ]


def label(record: dict, several_b: bool) -> str:
    return f"fg2u b={record['b']}" if record["method"] == "fg2u" and several_b else record["method"]


def cell(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def failure(error: str) -> str:
    """The table's word for a cell without numbers."""
    if error.startswith("skipped"):
        return "skip"
    return "OOM" if "out of memory" in error else "fail"


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None where either is missing or b is too small to divide by meaningfully."""
    return None if a is None or b is None or b <= 1e-9 else a / b


def ratio_columns(labels: list[str], fg2u_labels: list[str], steps: list[int]) -> list[tuple]:
    """(title, numerator, denominator, key, fixed T of the denominator or None) of each ratio column: is the
    memory of fg2u and of trajectory rgu flat in T (vs their T=2 value), fg2u's memory vs rgu's (and vs the
    graph-retaining baseline), rgu's time vs fg2u's, and what each costs over T plain steps."""
    reference = min([t for t in steps if t >= 2] or steps)
    fg2u = fg2u_labels[0] if fg2u_labels else None
    flat = [name for name in (fg2u, "rgu") if name in labels]
    columns = [(f"{name} mem / T={reference}", name, name, "growth_mb", reference) for name in flat]
    if fg2u:
        columns += [(f"{fg2u} mem / {o}", fg2u, o, "growth_mb", None) for o in ("rgu", "graph_rgu") if o in labels]
    if "rgu" in labels:
        columns += [(f"rgu time / {name}", "rgu", name, "seconds", None) for name in fg2u_labels]
    if "plain" in labels:
        columns += [
            (f"{name} time / plain", name, "plain", "seconds", None) for name in (fg2u, "rgu") if name in labels
        ]
    return columns


def markdown_table(records: list[dict], steps: list[int], labels: list[str], fg2u_labels: list[str]) -> str:
    """Rows T; memory growth (MB) and time (s) per method, then the ratio columns."""
    several_b = len(fg2u_labels) > 1
    value = {(label(r, several_b), r["T"]): r for r in records if "error" not in r}
    failed = {(label(r, several_b), r["T"]): failure(r["error"]) for r in records if "error" in r}

    def get(name: str, steps_: int, key: str) -> float | None:
        return value[(name, steps_)][key] if (name, steps_) in value else None

    def fmt(name: str, steps_: int, key: str, digits: int) -> str:
        return failed.get((name, steps_)) or cell(get(name, steps_, key), digits)

    ratios = ratio_columns(labels, fg2u_labels, steps)
    header = [f"mem {name} (MB)" for name in labels] + [f"time {name} (s)" for name in labels]
    header += [title for title, *_ in ratios]
    lines = ["| T | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]
    for t in steps:
        row = [fmt(n, t, "growth_mb", 1) for n in labels] + [fmt(n, t, "seconds", 2) for n in labels]
        row += [cell(ratio(get(num, t, key), get(den, fixed or t, key)), 2) for _, num, den, key, fixed in ratios]
        lines.append(f"| {t} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(records: list[dict], labels: list[str], several_b: bool, path: Path) -> None:
    """Two log-log panels, memory growth and time vs T, one line per method; non-positive growth (noise
    around zero for flat methods) cannot sit on a log axis and is left out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plots]'): no plot written.")
        return
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in labels:
        mine = sorted((r for r in records if "error" not in r and label(r, several_b) == name), key=lambda r: r["T"])
        for axis, key in zip(axes, ("growth_mb", "seconds"), strict=True):
            points = [(r["T"], r[key]) for r in mine if r[key] > 0]
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=name)
    steps = sorted({r["T"] for r in records})
    for axis, title in zip(axes, ("peak memory growth (MB)", "time per call (s)"), strict=True):
        axis.set(xscale="log", yscale="log", xlabel="unroll length T", title=title)
        axis.set_xticks(steps, [str(t) for t in steps])
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        axis.yaxis.set_minor_formatter(NullFormatter())
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def describe(args: argparse.Namespace, sizes: ModelSizes) -> str:
    return (
        f"Llama {sizes.as_dict()}, inner variables: {'LoRA' if args.inner == 'lora' else 'every parameter'}, "
        f"{args.threads} threads, jvp={args.jvp}, trgu K={args.truncation}, neumann {NEUMANN_STEPS} steps, inner "
        f"{args.inner_optimizer} lr={INNER_LR[args.inner_optimizer]}, torch {torch.__version__}, "
        f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold or 'glibc default'}. Memory: peak RSS growth over the RSS "
        "before the call (fresh process per cell, after a T=1 warm-up)."
    )


def warn_if_busy(threads: int) -> None:
    """Warn when other processes hold the cores the workers need: an OpenMP team that shares a core with
    another busy process waits at every barrier (measured here: 40x slower at 2 threads beside one busy
    process), so the times would be meaningless. Memory is unaffected."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load + threads > cores + 0.5:
        print(
            f"warning: load average {load:.1f} on {cores} cores; with --threads {threads} the times will be "
            "distorted by other processes (use fewer threads or an idle machine).",
            flush=True,
        )


def run_benchmark(args: argparse.Namespace, sizes: ModelSizes) -> None:
    """Run every measurement in its own worker, print progress, then write the table, JSON and plot."""
    warn_if_busy(args.threads)
    records, todo, stopped = [], plan(args), {}
    for index, (method, steps, b) in enumerate(todo, 1):
        if (method, b) in stopped:
            record = {"method": method, "T": steps, "b": b, "error": f"skipped: {stopped[method, b]}"}
        else:
            record = run_worker(method, steps, b, args)
        if "error" in record:
            stopped.setdefault((method, b), f"failed at T={steps}")
        elif args.max_seconds and record["seconds"] > args.max_seconds:
            stopped[method, b] = f"T={steps} took {record['seconds']:.0f} s > --max-seconds {args.max_seconds:g}"
        records.append(record)
        name = f"{method} T={steps}" + (f" b={b}" if b else "")
        result = record.get("error") or f"+{record['growth_mb']:.1f} MB, {record['seconds']:.2f} s"
        print(f"[{index}/{len(todo)}] {name}: {result}", flush=True)

    several_b = len(args.fg2u_directions or []) > 1
    labels = list(dict.fromkeys(label(r, several_b) for r in records))
    fg2u_labels = [name for name in labels if name.startswith("fg2u")]
    table = markdown_table(records, args.steps, labels, fg2u_labels)
    text = f"# Hypergradient cost vs unroll length\n\n{describe(args, sizes)}\n\n{table}\n"
    print("\n" + text)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_unroll.md").write_text(text)
    config = {**vars(args), "sizes": sizes.as_dict(), "torch": torch.__version__}
    config["inner_lr"] = INNER_LR[args.inner_optimizer]
    (out / "bench_unroll.json").write_text(json.dumps({"config": config, "records": records}, indent=1) + "\n")
    plot(records, labels, several_b, out / "bench_unroll.png")
    print(f"wrote {out}/bench_unroll.{{md,json,png}}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """CLI; ``--quick`` swaps in small defaults that explicit size and step flags still override."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", nargs="+", type=int, default=DEFAULT_STEPS, help="unroll lengths T")
    parser.add_argument("--directions", type=int, default=1, help="fg2u's b (one value)")
    parser.add_argument("--fg2u-directions", nargs="+", type=int, help="several b for fg2u, e.g. 1 8")
    parser.add_argument("--jvp", choices=JVP_MODES, default=DEFAULT_JVP, help="tangent mode of fg2u and neumann")
    parser.add_argument("--truncation", type=int, default=4, help="trgu's K; it differentiates min(T, K) steps")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    parser.add_argument("--inner", choices=INNERS, default="lora", help="inner variables: LoRA or every parameter")
    parser.add_argument("--inner-optimizer", choices=sorted(INNER_LR), default="sgd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-cap-mb", type=int, help="address-space cap of a call (MB): over it, out of memory")
    parser.add_argument("--max-seconds", type=float, help="skip a method's larger T once one call takes longer")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        help="bytes; workers get MALLOC_MMAP_THRESHOLD_ so glibc returns freed tensors at once: growth without "
        "malloc's few-MB drift with T, but slower times (e.g. 65536)",
    )
    defaults = ModelSizes()
    for flag in SIZE_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, default=getattr(defaults, flag))
    parser.add_argument("--quick", action="store_true", help="tiny model and T in 1 2 4: a fast check")
    parser.add_argument("--out-dir", default=str(REPO / "docs"))
    parser.add_argument("--worker", action="store_true", help="one measurement (one method, one T) as JSON")
    quick, _ = parser.parse_known_args(argv)
    if quick.quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    if args.worker and (len(args.methods) != 1 or len(args.steps) != 1):
        parser.error("--worker measures one cell: give exactly one --methods and one --steps value.")
    if min(args.steps) < 1 or args.directions < 1 or min(args.fg2u_directions or [1]) < 1:
        parser.error("--steps and directions must be >= 1.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = ModelSizes(**{flag: getattr(args, flag) for flag in SIZE_FLAGS})
    if args.worker:
        record = measure(
            args.methods[0], args.steps[0], args.directions, sizes, jvp=args.jvp, truncation=args.truncation,
            threads=args.threads, seed=args.seed, memory_cap_mb=args.memory_cap_mb, inner=args.inner,
            inner_optimizer=args.inner_optimizer,
        )  # fmt: skip
        print(json.dumps(record))
    else:
        run_benchmark(args, sizes)


if __name__ == "__main__":
    main()
