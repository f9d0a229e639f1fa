"""Write docs/benchmarks.md from the results the benchmark scripts left in docs/bench/ (``make bench`` runs
them all, then this). Headline ratios are computed here from their JSON; their tables are included as they
wrote them. A section whose results are missing says which command makes them.

    .venv/bin/python scripts/bench_report.py            # docs/bench/* -> docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def body(path: Path, docs: Path) -> str:
    """A sub-report without its top-level title, its headings one level down, its image links made relative
    to docs/."""
    lines = path.read_text().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    text = "\n".join("#" + line if line.startswith("## ") else line for line in lines).strip()
    folder = path.parent.relative_to(docs).as_posix()
    return re.sub(r"\]\(([^/)]+\.png)\)", lambda m: f"]({folder}/{m.group(1)})", text)


def unroll_headlines(data: dict) -> list[str]:
    ok = {(r["method"], r["T"]): r for r in data["records"] if "error" not in r}
    failed = {(r["method"], r["T"]): r["error"] for r in data["records"] if "error" in r}
    steps = sorted({r["T"] for r in data["records"]})
    fg2u = [t for t in steps if ("fg2u", t) in ok]
    if not fg2u:
        return ["fg2u has no result in this run."]
    top, ref = max(fg2u), min([t for t in fg2u if t >= 2] or fg2u)
    low, high = ok["fg2u", ref]["growth_mb"], ok["fg2u", top]["growth_mb"]
    lines = [f"fg2u peak memory growth at T={top} / at T={ref}: **{high / low:.2f}** ({low:.0f} → {high:.0f} MB)"]
    rgu = [t for t in steps if ("rgu", t) in ok and ("fg2u", t) in ok]
    if rgu:
        t = max(rgu)
        ratio = ok["fg2u", t]["growth_mb"] / ok["rgu", t]["growth_mb"]
        lines.append(f"fg2u / rgu memory at T={t} (rgu's longest run): **{ratio:.3f}**")
    rgu_failed = sorted(t for (m, t) in failed if m == "rgu")
    if rgu_failed:
        lines.append(f"rgu at T={rgu_failed[0]}: {failed['rgu', rgu_failed[0]]}")
    plain = [t for t in fg2u if ("plain", t) in ok]
    if plain:
        memory = [ok["fg2u", t]["growth_mb"] / ok["plain", t]["growth_mb"] for t in plain]
        time = [ok["fg2u", t]["seconds"] / ok["plain", t]["seconds"] for t in plain]
        lines.append(f"fg2u (b=1) / plain LoRA steps: memory {min(memory):.2f}–{max(memory):.2f}×, "
                     f"time {min(time):.2f}–{max(time):.2f}×")  # fmt: skip
    return lines


def directions_headlines(data: dict) -> list[str]:
    ok = [r for r in data["records"] if "error" not in r and r["method"] == "fg2u"]
    by_b = {r["b"]: r for r in ok}
    if len(by_b) < 2:
        return []
    low, high = min(by_b), max(by_b)
    time = by_b[high]["seconds"] / by_b[low]["seconds"]
    memory = by_b[high]["growth_mb"] / by_b[low]["growth_mb"]
    return [f"fg2u b={high} in one vmap pass / b={low}: time **{time:.2f}×**, memory {memory:.2f}×"]


def processes_headlines(data: dict) -> list[str]:
    seconds = {(r["process_split"], r["processes"]): r["seconds_per_step"] for r in data["records"]}
    base = min(p for _, p in seconds)
    return [
        f"process_split={split}: {p} processes are **{seconds[split, base] / s:.2f}×** as fast as {base}"
        for (split, p), s in seconds.items()
        if p != base
    ]


def betty_headlines(data: dict) -> list[str]:
    rows = [r for r in data["records"] if "cosine" in r]
    cells = ", ".join(f"{r['label']} {r['cosine']:.3f}" for r in rows)
    lines = [f"cosine to the exact hypergradient: {cells}"] if rows else []
    failed = [a for a in data.get("betty_attempts", []) if a.get("result") != "ok"]
    lines += [f"Betty: {a['attempt']}: {a['result']}" for a in failed]
    return lines


def training_headlines(data: dict) -> list[str]:
    runs = data["runs"]
    ranked = sorted(runs.values(), key=lambda r: r["eval_meta_loss"])
    cells = ", ".join(f"{r['name']} {r['eval_meta_loss']:.3f} (AUROC {r['auroc']:.2f})" for r in ranked)
    return [f"eval meta loss after {data['args']['budget']:g} s, best first: {cells}"]


def fidelity_headlines(data: dict) -> list[str]:
    lines = [f"fg2u with N basis directions vs rgu: relative error {data['sanity']['basis_vs_rgu_relative_error']:.1e}"]
    lines += [
        f"variance of {v['kind']} b={v['b']} over {v['seeds']} seeds / theory: **{v['ratio']:.2f}** ± "
        f"{v['ratio_se']:.2f}; bias / its noise {v['bias'] / v['bias_noise']:.2f}"
        for v in data["variance"]
    ]
    rgu = next((m for m in data["memory"] if m["method"] == "rgu"), None)
    if rgu:
        cells = [
            f"{m['label']} {m['growth_mb'] / rgu['growth_mb']:.2f}× memory, cosine {mean(m['cosines']):.2f}"
            for m in sorted(data["memory"], key=lambda m: m["growth_mb"])
            if m is not rgu
        ]
        lines.append(f"at T={data['memory_steps']}, against rgu: " + "; ".join(cells))
    return lines


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


SECTIONS = [
    # (title, folder or file under docs/bench, json name, headline function, plots, command, what it shows)
    ("Memory and time vs unroll length T", "unroll/bench_unroll.md", "unroll/bench_unroll.json", unroll_headlines,
     ["unroll/bench_unroll.png"], "make bench (scripts/bench_unroll.py)",
     "One hypergradient of each method on a LoRA Llama from config, each cell in a fresh process; `OOM` = over "
     "the address-space cap, `skip` = a shorter T already failed or ran past the time limit."),
    ("Batching directions with vmap", "directions/bench_unroll.md", "directions/bench_unroll.json",
     directions_headlines, [], "make bench (scripts/bench_unroll.py --fg2u-directions 1 8)",
     "The same model at T = 4, fg2u with b = 1 and b = 8 directions in one vmap pass."),
    ("Processes", "bench_processes.md", "bench_processes.json", processes_headlines, [],
     "make bench (scripts/bench_processes.py)",
     "Time per outer step with 1 and 2 processes (one thread each). Every rank still computes the primal inner "
     "gradient, so with a per-direction cost D and a fixed cost P the speed-up is at most (P + bD)/(P + bD/2)."),
    ("Fidelity", "fidelity/bench_fidelity.md", "fidelity/bench_fidelity.json", fidelity_headlines, [],
     "make bench (scripts/bench_fidelity.py)",
     "How close each estimate is to the exact hypergradient, and what it costs."),
    ("Peers: Betty", "bench_betty.md", "bench_betty.json", betty_headlines, [], "make bench (scripts/bench_betty.py)",
     "Betty's hypergradients and ours against the exact one on the same LoRA reweighting problem."),
    ("End to end", "bench_training.md", "bench_training.json", training_headlines, [],
     "make bench (scripts/bench_training.py)",
     "The demo's noisy-data recipe with each method, same wall clock. θ is warm-started across outer steps "
     "(inner_reset_every=0), so a method that takes more outer steps also trains θ longer: the eval meta loss "
     "mixes the quality of the weights with the inner progress; AUROC measures the weights alone."),
    ("Memory and time vs T, a larger model", "unroll_large/bench_unroll.md", "unroll_large/bench_unroll.json",
     unroll_headlines, ["unroll_large/bench_unroll.png"], "make bench-large (~40 min, not part of make bench)",
     "The same measurement on hidden 256, 4 layers and 8×128-token batches (the sizes of DESIGN.md's targets)."),
    ("GPU", "gpu_check.md", "gpu_check.json", lambda data: [], [], "bash scripts/gpu_check.sh on a GPU machine",
     "A ~0.5B Llama-shaped model in bf16 with fp32 LoRA: memory vs T for fg2u and rgu, tokens per second."),
]  # fmt: skip


def section(bench: Path, title, table, data_name, headlines, plots, command, what) -> str:
    table_path, data = bench / table, load(bench / data_name)
    if not table_path.exists() or data is None:
        return f"## {title}\n\nNo results yet: run `{command}`.\n"
    parts = [f"## {title}\n", what + "\n"]
    lines = headlines(data)
    if lines:
        parts.append("Headlines (computed from the JSON):\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    parts.append(body(table_path, bench.parent) + "\n")
    parts += [f"![{title}](bench/{plot})\n" for plot in plots if (bench / plot).exists()]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench-dir", default=str(REPO / "docs" / "bench"))
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    bench = Path(args.bench_dir)
    text = [
        "# Benchmarks\n",
        "Written by `scripts/bench_report.py` from what `make bench` measured (docs/bench/); no figure here is "
        "typed by hand. Memory on CPU is the peak resident-set growth of one call over the memory just before "
        "it, in a fresh process (CPU torch has no allocator statistics). Times on 2 CPU cores are noisy to ±20% "
        "when anything else runs.\n",
    ]
    text += [section(bench, *spec) for spec in SECTIONS]
    Path(args.out).write_text("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
