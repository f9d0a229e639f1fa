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


def unroll_records(data: dict) -> tuple[dict, dict, list[int]]:
    """(successful records by (label, T), errors by (label, T), every T) of a bench_unroll run; fg2u is labelled
    with its b when the run has several."""
    several_b = len({r["b"] for r in data["records"] if r["method"] == "fg2u"}) > 1

    def name(record):
        if record["method"] == "rgu" and "inner" not in record:
            return "graph_rgu"  # recorded before rgu stored only the trajectory (records without "inner")
        return f"fg2u b={record['b']}" if record["method"] == "fg2u" and several_b else record["method"]

    ok = {(name(r), r["T"]): r for r in data["records"] if "error" not in r}
    failed = {(name(r), r["T"]): r["error"] for r in data["records"] if "error" in r}
    return ok, failed, sorted({r["T"] for r in data["records"]})


def fg2u_labels(ok: dict) -> list[str]:
    labels = {label for label, _ in ok if label.startswith("fg2u")}
    return sorted(labels, key=lambda label: int(label.split("=")[1]) if "=" in label else 0)


def unroll_headlines(data: dict) -> list[str]:
    ok, failed, steps = unroll_records(data)
    lines = []
    reference = min([t for t in steps if t >= 2] or steps)
    for name in [*fg2u_labels(ok)[:1], "rgu"]:
        mine = [t for t in steps if (name, t) in ok]
        if len(mine) > 1 and (name, reference) in ok:
            top = max(mine)
            low, high = ok[name, reference]["growth_mb"], ok[name, top]["growth_mb"]
            lines.append(f"{name} peak memory growth at T={top} / at T={reference}: **{high / low:.2f}** "
                         f"({low:.0f} → {high:.0f} MB)")  # fmt: skip
    for name in fg2u_labels(ok):
        both = [t for t in steps if ("rgu", t) in ok and (name, t) in ok]
        if both:
            ratios = [ok["rgu", t]["seconds"] / ok[name, t]["seconds"] for t in both]
            memory = [ok[name, t]["growth_mb"] / ok["rgu", t]["growth_mb"] for t in both]
            lines.append(f"rgu time / {name} time over T={both[0]}..{both[-1]}: {min(ratios):.2f}–{max(ratios):.2f}×; "
                         f"{name} memory / rgu memory: {min(memory):.2f}–{max(memory):.2f}×")  # fmt: skip
    graph = [t for t in steps if ("graph_rgu", t) in ok and ("rgu", t) in ok]
    if graph:
        t = max(graph)
        ratio = ok["rgu", t]["growth_mb"] / ok["graph_rgu", t]["growth_mb"]
        lines.append(f"trajectory rgu / graph-retaining rgu memory at T={t}: **{ratio:.3f}** (same numbers, exact)")
    graph_failed = sorted(t for (m, t) in failed if m == "graph_rgu")
    if graph_failed:
        lines.append(f"graph_rgu at T={graph_failed[0]}: {failed['graph_rgu', graph_failed[0]]}")
    fg2u = fg2u_labels(ok)[:1]
    plain = [t for t in steps if fg2u and (fg2u[0], t) in ok and ("plain", t) in ok]
    for name in [*fg2u, "rgu"]:
        both = [t for t in plain if (name, t) in ok]
        if both:
            time = [ok[name, t]["seconds"] / ok["plain", t]["seconds"] for t in both]
            lines.append(f"{name} time / plain inner steps: {min(time):.2f}–{max(time):.2f}×")
    return lines


def crossover(data: dict) -> dict | None:
    """Where fg2u b=1 needs less memory than trajectory rgu (full-parameter run), and the per-parameter costs
    behind it: rgu's memory per stored step and fg2u's constant overhead, both in bytes per inner parameter."""
    ok, _, steps = unroll_records(data)
    fg2u = fg2u_labels(ok)[:1]
    both = [t for t in steps if fg2u and (fg2u[0], t) in ok and ("rgu", t) in ok]
    if len(both) < 2:
        return None
    numel = ok["rgu", both[0]]["theta_numel"]
    below = [t for t in both if ok[fg2u[0], t]["growth_mb"] < ok["rgu", t]["growth_mb"]]
    first, last = both[0], both[-1]
    rgu_slope = (ok["rgu", last]["growth_mb"] - ok["rgu", first]["growth_mb"]) / (last - first)
    fg2u_mean = sum(ok[fg2u[0], t]["growth_mb"] for t in both) / len(both)
    return {
        "label": fg2u[0], "steps": both, "T_star": below[0] if below else None, "theta_numel": numel,
        "rgu_bytes_per_param_step": rgu_slope * 2**20 / numel, "fg2u_bytes_per_param": fg2u_mean * 2**20 / numel,
    }  # fmt: skip


def full_headlines(data: dict) -> list[str]:
    lines = unroll_headlines(data)
    found = crossover(data)
    if found is None:
        return lines
    if found["T_star"] is None:
        lines.append(f"{found['label']} needed more memory than rgu at every T measured ({found['steps']}).")
    else:
        lines.append(f"crossover **T\\* = {found['T_star']}**: from this unroll length on (of {found['steps']}), "
                     f"{found['label']} needs less memory than trajectory rgu on full-parameter inner variables "
                     f"(|θ| = {found['theta_numel']:,})")  # fmt: skip
    per_step, fixed = found["rgu_bytes_per_param_step"], found["fg2u_bytes_per_param"]
    lines.append(f"measured per inner parameter: rgu stores **{per_step:.1f} B per unrolled step** (θ and Adam's two "
                 f"moments in fp32 are 12 B); fg2u b=1 grew {fixed:.1f} B per parameter whatever T — at this size "
                 "mostly the tangent pass's activations, which do not scale with |θ|")  # fmt: skip
    return lines + gpu_sizes(per_step)


GPU_MEMORY_GB = (40, 80)
BASE_BYTES_PER_PARAM = 16  # fp32 weights, gradient and Adam's two moments: what plain full fine-tuning holds


def gpu_sizes(state_bytes: float) -> list[str]:
    """The largest model (full fine-tuning, fp32 Adam) each method fits on a 40/80 GB GPU at T = 8 and 32: plain
    full fine-tuning holds 16 B/parameter; rgu adds one stored state (θ, s) per unrolled step, fg2u b=1 one tangent
    of (θ, s) whatever T — both the measured size of one state. Activations are left out: every method needs
    them, and they depend on the batch, not on |θ|."""
    cells = []
    for gb in GPU_MEMORY_GB:
        for steps in (8, 32):
            rgu = gb * 1e9 / (BASE_BYTES_PER_PARAM + steps * state_bytes) / 1e9
            fg2u = gb * 1e9 / (BASE_BYTES_PER_PARAM + state_bytes) / 1e9
            cells.append(f"{gb} GB, T={steps}: rgu ≤ {rgu:.2f}B, fg2u ≤ {fg2u:.2f}B parameters")
    return [f"largest full fine-tune that fits (16 B/param of plain Adam training + {state_bytes:.1f} B per stored "
            "or tangent state, activations aside): " + "; ".join(cells)]  # fmt: skip


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


def real_headlines(data: dict) -> list[str]:
    runs = data["runs"]
    worst = {label: min(run["auroc"].values()) for label, run in runs.items()}
    ranked = sorted(worst, key=worst.get, reverse=True)
    return ["lowest AUROC over the corruption kinds, best first: " + ", ".join(f"{k} {worst[k]:.3f}" for k in ranked)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


SECTIONS = [
    # (title, folder or file under docs/bench, json name, headline function, plots, command, what it shows)
    ("Memory and time vs unroll length T: LoRA inner variables", "unroll/bench_unroll.md", "unroll/bench_unroll.json",
     unroll_headlines, ["unroll/bench_unroll.png"], "make bench (scripts/bench_unroll.py)",
     "One hypergradient of each method on a LoRA Llama from config (Adam inner), each cell in a fresh process; "
     "`rgu` stores the trajectory (θ_t, s_t), `graph_rgu` is the graph-retaining reverse unroll that higher- and "
     "Betty-style libraries run (kept in the benchmark only); fg2u with b = 1 and b = 8 directions in one vmap "
     "pass. `OOM` = over the address-space cap, `skip` = a shorter T already failed or ran past the time limit."),
    ("Memory and time vs unroll length T: full-parameter inner variables", "unroll_full/bench_unroll.md",
     "unroll_full/bench_unroll.json", full_headlines, ["unroll_full/bench_unroll.png"],
     "make bench (scripts/bench_unroll.py --inner full)",
     "The same model with every parameter as θ (full fine-tuning, Adam inner): rgu now stores T copies of the "
     "model and its two Adam moments, fg2u none. This is fg2u's home ground."),
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
     "The same measurement on hidden 256, 4 layers and 8×128-token batches (the sizes of DESIGN.md's targets), "
     "SGD inner. Recorded before rgu stored only the trajectory: its `rgu` column is the graph-retaining reverse "
     "unroll, `graph_rgu` in the headlines; `make bench-large` reruns it with both."),
    ("Real model, real text: methods at equal wall-clock", "real/bench_real.md", "real/bench_real.json",
     real_headlines, [], "make bench-real (scripts/bench_real.py, ~12 min)",
     "SmolLM2-135M-Instruct with LoRA on Gutenberg passages with corrupted rows of several kinds (the task of "
     "`make demo-real`, docs/real_demo.md): the recipe's settings with each method but a constant outer step of 1 "
     "(the mean of the recipe's decay, which needs a step count), every run stopped after the outer step that "
     "passes the same training time; the loss filter scores the rows at the base model, gradient alignment after "
     "the demo's 8-step warm-up of the adapter."),
    ("GPU", "gpu_check.md", "gpu_check.json", lambda data: [], [], "bash scripts/gpu_check.sh on a GPU machine",
     "A ~0.5B Llama-shaped model in bf16 with fp32 LoRA: memory vs T for fg2u and rgu, tokens per second."),
]  # fmt: skip


README_MARKERS = (
    "<!-- which-method:begin (written by scripts/bench_report.py) -->",
    "<!-- which-method:end -->",
)


def which_method(bench: Path) -> str:
    """The "which method when" table, its evidence computed from the LoRA and full-parameter unroll runs and the
    end-to-end run."""
    names = ("unroll/bench_unroll.json", "unroll_full/bench_unroll.json", "bench_training.json")
    lora, full, training = (load(bench / name) for name in names)
    rows = []
    if lora:
        ok, _, steps = unroll_records(lora)
        fg2u = fg2u_labels(ok)
        both = [t for t in steps if ("rgu", t) in ok and fg2u and (fg2u[-1], t) in ok]
        if both:
            time = max(ok["rgu", t]["seconds"] / ok[fg2u[-1], t]["seconds"] for t in both)
            low, high = ok["rgu", both[0]]["growth_mb"], ok["rgu", both[-1]]["growth_mb"]
            rows.append(("LoRA / adapter inner variables (the usual case)", "`rgu`",
                         f"exact; at most {time:.2f}× the time of {fg2u[-1]} at T={both[0]}..{both[-1]}; its memory "
                         f"grew {low:.0f} → {high:.0f} MB over that range"))  # fmt: skip
    found = crossover(full) if full else None
    if found and found["T_star"] is not None:
        first, last = found["steps"][0], found["steps"][-1]
        if found["T_star"] > first:
            rows.append((f"full-parameter inner variables, T < {found['T_star']}", "`rgu`",
                         "exact; its stored trajectory is still smaller than fg2u's overhead"))  # fmt: skip
        span = f"T ≥ {found['T_star']}" if found["T_star"] > first else f"every T measured ({first}..{last})"
        ok, _, _ = unroll_records(full)
        ratio = ok[found["label"], last]["growth_mb"] / ok["rgu", last]["growth_mb"]
        rows.append((f"full-parameter inner variables when memory is the limit ({span})", "`fg2u`",
                     f"memory constant in T (b=1: {ratio:.2f}× rgu's at T={last}); rgu adds "
                     f"{found['rgu_bytes_per_param_step']:.1f} B per parameter per unrolled step. Unbiased but noisy: "
                     "raise b as memory allows (Fidelity below)"))  # fmt: skip
    if training:
        runs = sorted(training["runs"].values(), key=lambda r: r["eval_meta_loss"])
        best = runs[0]
        rows.append(("short unrolls, many outer steps, bias acceptable", f"`{best['name']}`",
                     "lowest eval meta loss under the same wall clock in the end-to-end run "
                     f"({best['eval_meta_loss']:.3f}, AUROC {best['auroc']:.2f})"))  # fmt: skip
    rows.append(("kernels without forward AD or double backward (flash attention)",
                 '`fg2u_zo`, or `jvp="finite_difference"`',
                 "first-order: finite differences instead of second derivatives"))  # fmt: skip
    rows.append(("not sure", '`method="auto"`', "picks `rgu` when its trajectory fits `memory_budget_mb` (default: "
                 "half of the free memory), else `fg2u`, and logs the estimate"))  # fmt: skip
    lines = ["| situation | method | why (measured by `make bench`) |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def write_readme_table(table: str, readme: Path) -> None:
    """Replace the table between the README's markers (left alone when the markers are missing)."""
    text = readme.read_text()
    begin, end = README_MARKERS
    if begin not in text or end not in text:
        print(f"{readme} has no which-method markers: table not written there.")
        return
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


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


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys on xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def rows_section(bench: Path) -> str:
    """Cost of learning weights as rows grow (scripts/bench_rows.py): time per row against a plain LoRA epoch, for
    ungrouped weights (rows.json) and weights grouped by the answer, shift projected out (rows_grouped.json)."""
    title = "Cost as rows grow: learning weights against a plain epoch"
    tables = [rows_table(load(bench / "rows.json"), "ungrouped weights (the recipe as shipped)"),
              rows_table(load(bench / "rows_grouped.json"), "`--balance_column completion` (grouped weights, the "
                         "answer shift projected out of the meta gradient: the setting of docs/value.md)")]  # fmt: skip
    if not any(tables):
        return f"## {title}\n\nNo results yet: run `make bench-rows`.\n"
    intro = ("One epoch of noisy_reweighting_real's online loop (`hf-fg2u train`, rgu, unroll 2, batch 8) against "
             "one plain LoRA epoch over the same rows (`hf-fg2u finetune`, batch 8), SmolLM2-135M-Instruct, LoRA "
             "r=8 on q/v, rows of ~20 tokens; each a fresh process, wall time including the model load, peak "
             "resident memory by GNU time.\n")  # fmt: skip
    return "\n".join([f"## {title}\n", intro, *[t for t in tables if t], profile_table(bench)])


def profile_table(bench: Path) -> str:
    """Where an outer step's time goes (scripts/profile_outer_step.py: grouped and ungrouped weights), each part in
    plain epochs of its rows (the plain epoch's time per row fitted on rows_grouped.json's plain runs)."""
    grouped = load(bench / "rows_grouped.json")
    profiles = {name: load(bench / f"{name}.json") for name in ("outer_step_profile", "outer_step_profile_ungrouped")}
    profiles = {name: profile for name, profile in profiles.items() if profile is not None}
    if not profiles or grouped is None or len(grouped["results"]) < 2:
        return ""
    results = grouped["results"]
    plain_per_row = linear_fit([r["rows"] for r in results], [r["plain"]["seconds"] for r in results])[1]
    rows_per_step = 16  # the recipe's unroll: 2 inner steps of 8 rows
    plain_step = plain_per_row * rows_per_step
    kinds = {name: "grouped" if profile["balance_column"] else "ungrouped" for name, profile in profiles.items()}
    parts = list(dict.fromkeys(part for profile in profiles.values() for part in profile["per_outer_step"]))
    lines = [f"**Where one outer step's time goes** (one outer step reads {rows_per_step} rows, which a plain epoch "
             f"trains in {plain_step:.2f} s; seconds per outer step, and in plain epochs of its rows):\n",
             "| part | " + " | ".join(f"{kinds[n]} weights" for n in profiles) + " |",
             "|---|" + "---|" * len(profiles)]  # fmt: skip
    for part in parts:
        cells = []
        for profile in profiles.values():
            seconds = profile["per_outer_step"].get(part)
            cells.append("–" if seconds is None else f"{seconds:.2f} s ({seconds / plain_step:.2f}×)")
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    totals = [sum(profile["per_outer_step"].values()) for profile in profiles.values()]
    lines.append("| all parts | " + " | ".join(f"{t:.2f} s (**{t / plain_step:.2f}×**)" for t in totals) + " |")
    return "\n".join(lines) + "\n"


def rows_table(data: dict | None, label: str) -> str:
    if data is None:
        return ""
    results = data["results"]
    if not data.get("keep_step_graphs"):
        label += " — measured before the recipe kept each inner step's graph (`keep_step_graphs`, ~14% faster)"
    machine = data.get("machine")
    label += (f" — measured {machine['date']} on {machine['cpu']}, float32 matmul {machine['matmul_gflops']:.0f} "
              "GFLOP/s on 2 threads" if machine else " — measured on an earlier session's machine")  # fmt: skip
    lines = [f"**{label}**\n",
             "| rows | bilevel (s) | plain (s) | ratio | bilevel ms/row | plain ms/row | bilevel peak MB "
             "| plain peak MB |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        bilevel, plain = r["bilevel"], r["plain"]
        lines.append(f"| {r['rows']} | {bilevel['seconds']:.0f} | {plain['seconds']:.0f} | {r['ratio']:.2f} "
                     f"| {r['bilevel_per_row_ms']:.0f} | {r['plain_per_row_ms']:.0f} | {bilevel['peak_mb']:.0f} "
                     f"| {plain['peak_mb']:.0f} |")  # fmt: skip
    if len(results) >= 2:
        rows = [r["rows"] for r in results]
        fits = {kind: linear_fit(rows, [r[kind]["seconds"] for r in results]) for kind in ("bilevel", "plain")}
        intercept, slope = fits["bilevel"]
        worst = max(
            abs(r["bilevel"]["seconds"] - intercept - slope * r["rows"]) / r["bilevel"]["seconds"] for r in results
        )
        lines += ["", f"Linear fit, seconds = a + b·rows: bilevel b = {1000 * fits['bilevel'][1]:.0f} ms/row "
                  f"(a = {fits['bilevel'][0]:.0f} s, largest residual {worst:.0%}), plain b = "
                  f"{1000 * fits['plain'][1]:.0f} ms/row (a = {fits['plain'][0]:.0f} s): the marginal cost of a row is "
                  f"**{fits['bilevel'][1] / fits['plain'][1]:.2f}×** a plain epoch's."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench-dir", default=str(REPO / "docs" / "bench"))
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    args = parser.parse_args()
    bench = Path(args.bench_dir)
    text = [
        "# Benchmarks\n",
        "Written by `scripts/bench_report.py` from what `make bench` measured (docs/bench/); no figure here is "
        "typed by hand. Memory on CPU is the peak resident-set growth of one call over the memory just before "
        "it, in a fresh process (CPU torch has no allocator statistics). Times on 2 CPU cores are noisy to ±20% "
        "when anything else runs.\n",
    ]
    table = which_method(bench)
    text += ["## Which method when\n", table + "\n"]
    text += [section(bench, *spec) for spec in SECTIONS]
    text.append(rows_section(bench))
    Path(args.out).write_text("\n".join(text))
    write_readme_table(table, Path(args.readme))
    print(f"wrote {args.out} and the table of {args.readme}")


if __name__ == "__main__":
    main()
