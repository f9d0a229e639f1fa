"""GPU check: peak CUDA memory, time and tokens/s of one hypergradient vs the unroll length T, ~0.5B Llama.

Model: a Llama built from config (no download): hidden 1024, intermediate 4864, 24 layers, 16 heads, 8 KV heads,
vocab 32000 (about 0.50B parameters, counted and printed), base weights in bfloat16, SDPA attention (the library's
preflight runs it under the math kernel, the only SDPA kernel with double backward; the backends it leaves on
are recorded), peft LoRA r=8 on q_proj/v_proj kept in float32. The outer variable is a logit per training
example, softmax-normalised per batch (``make_lm_problem`` + ``batch_softmax_weights``, as in
``bench_unroll.py``); T inner batches of 4 x 512 random tokens, inner SGD.

Methods per T in 1 2 4 8 16 32: ``plain`` (T plain LoRA SGD steps, no hypergradient: the baseline),
``fg2u b=1`` and ``fg2u b=8`` (all b directions in one vmap pass), ``rgu`` (exact reverse mode). One warm-up
call (T=1) per method before its first measurement. Memory: torch.cuda.max_memory_allocated after
reset_peak_memory_stats, minus memory_allocated just before the call. An out-of-memory cell is recorded as
"OOM" and the cache emptied; a method that ran out of memory (or failed) at some T is skipped at larger T.
Time guard: a cell is skipped, with a note, when the time predicted from the method's last cell (linear in T)
exceeds ``--cell-limit`` or would run past ``--budget`` seconds since the start. Results are rewritten after
every cell, so an interrupted run still leaves them.

Copy-paste (from the repository root)::

    bash scripts/gpu_check.sh                                   # GPU machine: checks the environment, runs this
    python scripts/gpu_check.py --out-dir "$OUT"                # the same in a ready environment (~7 min)
    OMP_NUM_THREADS=1 .venv/bin/python scripts/gpu_check.py --cpu-smoke    # end-to-end check on CPU (< 1 min)

Writes ``gpu_check.json`` (environment, config, records) and ``gpu_check.md`` (table) to ``--out-dir``:
default ``$OUT``, else ``./gpu_check_out`` (``$TMPDIR/gpu_check_smoke`` with ``--cpu-smoke``). On CPU there are
no allocator statistics: memory is "n/a".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import transformers
from _bench_common import ModelSizes, perturb_lora_b, random_token_batches
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hf_fg2u.hypergrad import DEFAULT_JVP, estimate_hypergradient
from hf_fg2u.hypergrad.inner_optimizers import make_inner_optimizer
from hf_fg2u.hypergrad.unroll import run_inner_loop
from hf_fg2u.lm.losses import batch_softmax_weights, make_lm_problem
from hf_fg2u.lm.params import attention_implementation, preflight, trainable_parameters

GPU_DEFAULTS = {"hidden": 1024, "intermediate": 4864, "layers": 24, "heads": 16, "kv_heads": 8, "vocab": 32000}
GPU_DEFAULTS |= {"rank": 8, "batch_size": 4, "seq_len": 512, "steps": [1, 2, 4, 8, 16, 32]}
CPU_SMOKE = {"device": "cpu", "hidden": 64, "intermediate": 176, "layers": 2, "heads": 4, "kv_heads": 2}
CPU_SMOKE |= {"vocab": 512, "batch_size": 2, "seq_len": 32, "steps": [1, 2, 4], "budget": 50.0, "cell_limit": 20.0}
SIZE_FLAGS = ("hidden", "intermediate", "layers", "heads", "vocab", "rank", "batch_size", "seq_len")
INNER_LR = 1e-2
MB = 2**20
SDP_BACKENDS = ("flash", "mem_efficient", "math", "cudnn")


def build_model(sizes: ModelSizes, kv_heads: int, device: torch.device, base_dtype: torch.dtype, seed: int):
    """Llama from config on ``device`` with base weights in ``base_dtype`` and SDPA attention, wrapped in LoRA
    (peft keeps the adapters in float32). lora_B is drawn away from zero so LoRA A gets nonzero gradients."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=sizes.vocab, hidden_size=sizes.hidden, intermediate_size=sizes.ffn,
        num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads, num_key_value_heads=kv_heads,
        max_position_embeddings=sizes.seq_len, attn_implementation="sdpa",
    )  # fmt: skip
    with device:
        base = LlamaForCausalLM(config).to(base_dtype)
    lora = LoraConfig(r=sizes.rank, lora_alpha=2 * sizes.rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(base, lora)
    model.eval()
    perturb_lora_b(model)
    return model


def preflight_backends(model) -> list[str]:
    """The SDPA backends left enabled inside the context that ``preflight`` gives a second-order method."""
    with preflight(model, second_order=True)():
        return [name for name in SDP_BACKENDS if getattr(torch.backends.cuda, f"{name}_sdp_enabled", lambda: False)()]


def model_info(model, kv_heads: int) -> dict:
    """Parameter counts, dtypes, heads and attention of the built model."""
    parameters = list(model.named_parameters())
    config = model.config
    return {
        "parameters": sum(p.numel() for _, p in parameters),
        "trainable_parameters": sum(p.numel() for _, p in parameters if p.requires_grad),
        "base_dtype": sorted({str(p.dtype) for _, p in parameters if not p.requires_grad}),
        "lora_dtype": sorted({str(p.dtype) for _, p in parameters if p.requires_grad}),
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "kv_heads_as_requested": config.num_key_value_heads == kv_heads,
        "attn_implementation": attention_implementation(model),
        "sdpa_backends_under_preflight": preflight_backends(model),
    }


def environment(device: torch.device) -> dict:
    """Device name and memory, library versions."""
    info = {
        "python": f"{platform.python_version()} ({sys.executable})", "torch": torch.__version__,
        "cuda": torch.version.cuda, "transformers": transformers.__version__, "peft": peft.__version__,
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }  # fmt: skip
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info |= {"device": torch.cuda.get_device_name(device), "device_memory_mb": properties.total_memory / MB}
        info |= {"capability": f"{properties.major}.{properties.minor}", "bf16": torch.cuda.is_bf16_supported()}
    else:
        info |= {"device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"}
    return info


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def make_runners(model, sizes: ModelSizes, steps: int, directions: list[int], device: torch.device, seed: int):
    """{label: run(T)}: plain, fg2u per b, rgu, each on the first T of ``steps`` inner batches. The outer
    vector covers all batches, so every T shares the problem."""
    inner, meta = random_token_batches(steps, sizes, seed + 1)
    batches, meta = [to_device(b, device) for b in inner], to_device(meta, device)
    params = trainable_parameters(model)
    outer = {"example_logits": torch.zeros(steps * sizes.batch_size, device=device)}
    weights = batch_softmax_weights()
    plain_inner, _ = make_lm_problem(model, weights, second_order=False)
    inner_loss, outer_loss = make_lm_problem(model, weights, second_order=True)
    sgd = make_inner_optimizer("sgd", INNER_LR)

    def plain(T: int):
        return run_inner_loop(plain_inner, sgd, params, sgd.init(params), outer, batches[:T], list(range(T)))

    def hypergradient(method: str, **options) -> Callable[[int], object]:
        return lambda T: estimate_hypergradient(
            inner_loss, outer_loss, params, outer, batches[:T], meta, method=method, inner_lr=INNER_LR, **options
        )

    runners = {"plain": plain}
    for b in directions:
        runners[f"fg2u b={b}"] = hypergradient("fg2u", num_directions=b, directions_per_pass=b, jvp=DEFAULT_JVP)
    runners["rgu"] = hypergradient("rgu")
    return runners


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(call: Callable[[], object], device: torch.device) -> dict:
    """Time one call between synchronisations; on CUDA also its peak allocated memory over the memory before."""
    free_memory(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize(device)
    record = {"status": "ok", "seconds": time.perf_counter() - start}
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        record |= {"peak_growth_mb": (peak - before) / MB, "peak_mb": peak / MB, "baseline_mb": before / MB}
    return record


def guarded(call: Callable[[], object], device: torch.device) -> dict:
    """:func:`measure`, with out-of-memory and other failures turned into records instead of stopping the run
    (cuBLAS/cuDNN allocation failures arrive as plain RuntimeErrors and count as OOM too)."""
    try:
        return measure(call, device)
    except torch.cuda.OutOfMemoryError as error:
        record = {"status": "OOM", "note": str(error).splitlines()[0][:200]}
    except Exception as error:  # noqa: BLE001 - one failing method must not cost the other cells
        traceback.print_exc()
        out_of_memory = any(text in str(error) for text in ("out of memory", "ALLOC_FAILED"))
        record = {"status": "OOM" if out_of_memory else "error", "note": f"{type(error).__name__}: {error}"[:300]}
    free_memory(device)  # outside the except block: the traceback's frames are gone, their tensors freed
    return record


class Guard:
    """The time guard: skip a cell when its predicted time exceeds the per-cell limit or the overall budget."""

    def __init__(self, budget: float, cell_limit: float):
        self.start = time.perf_counter()
        self.budget, self.cell_limit = budget, cell_limit

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def reason_to_skip(self, predicted: float | None) -> str | None:
        left = self.budget - self.elapsed()
        if left <= 0:
            return f"budget of {self.budget:.0f} s spent"
        if predicted is not None and predicted > self.cell_limit:
            return f"predicted {predicted:.1f} s > cell limit {self.cell_limit:.1f} s"
        if predicted is not None and predicted > left:
            return f"predicted {predicted:.1f} s > {left:.1f} s left of the budget"
        return None


def skip_reason(label: str, T: int, records: list[dict], guard: Guard) -> str | None:
    """Why the cell (label, T) is not run: the method already ran out of memory or failed at a smaller T, or
    the time guard (prediction: the method's last measured seconds per step times T)."""
    mine = [r for r in records if r["label"] == label]
    stopped = next((r for r in mine if r["status"] in ("OOM", "error")), None)
    if stopped is not None:
        return f"{stopped['status']} at T={stopped['T']}"
    done = [r for r in mine if r["status"] == "ok"]
    return guard.reason_to_skip(done[-1]["seconds"] / done[-1]["T"] * T if done else None)


def measure_cell(run: Callable[[int], object], T: int, warm_up: bool, device: torch.device) -> dict:
    """The guarded measurement of ``run(T)``, after a T=1 warm-up call where ``warm_up``; a failed warm-up is
    the cell's record."""
    warm = guarded(lambda: run(1), device) if warm_up else {"status": "ok"}
    if warm["status"] != "ok":
        return {**warm, "note": f"in the T=1 warm-up: {warm['note']}"}
    return guarded(lambda: run(T), device)


def run_cells(args, runners: dict, device: torch.device, guard: Guard, write: Callable[[list[dict]], None]):
    """Every (T, method) cell, T-major so that a cut-short run still compares all methods at small T. Each
    method is warmed up once (T=1) before its first measurement."""
    records, warmed = [], set()
    tokens_per_step = args.batch_size * args.seq_len
    for T in args.steps:
        for label, run in runners.items():
            record = {"label": label, "T": T, "tokens": T * tokens_per_step}
            reason = skip_reason(label, T, records, guard)
            if reason is not None:
                record |= {"status": "skipped", "note": reason}
            else:
                record |= measure_cell(run, T, label not in warmed, device)
                warmed.add(label)
            if record["status"] == "ok":
                record["tokens_per_s"] = record["tokens"] / record["seconds"]
            records.append(record)
            print(f"[{guard.elapsed():6.1f} s] {describe_record(record)}", flush=True)
            write(records)
    return records


def fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def describe_record(record: dict) -> str:
    head = f"{record['label']:>9} T={record['T']:<3}"
    if record["status"] != "ok":
        return f"{head} {record['status']}: {record.get('note', '')}"
    growth = record.get("peak_growth_mb")
    memory = "memory n/a" if growth is None else f"+{growth:,.0f} MB peak"
    return f"{head} {memory}, {record['seconds']:.3f} s, {record['tokens_per_s']:,.0f} tokens/s"


def markdown(records: list[dict], env: dict, model: dict, args) -> str:
    """The report: environment and model lines, then one table row per cell."""
    backends = ", ".join(model["sdpa_backends_under_preflight"])
    lines = [
        "# hf_fg2u GPU check: one hypergradient vs unroll length T",
        "",
        f"- device: {env['device']}; torch {env['torch']} (CUDA {env['cuda'] or 'none'}), transformers "
        f"{env['transformers']}, peft {env['peft']}",
        f"- model: Llama {model['parameters'] / 1e6:.1f}M parameters, base {'/'.join(model['base_dtype'])}, "
        f"LoRA r={args.rank} q_proj/v_proj {'/'.join(model['lora_dtype'])} ({model['trainable_parameters']:,} "
        f"trainable), {model['num_attention_heads']} heads / {model['num_key_value_heads']} KV heads, attention "
        f"{model['attn_implementation']} (SDPA backends enabled under preflight: {backends})",
        f"- sizes: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab "
        f"{args.vocab}; batch {args.batch_size} x {args.seq_len} tokens per inner step; inner SGD lr {INNER_LR}",
        "- memory: peak allocated during the call minus allocated before it (after a T=1 warm-up per method)"
        + ("" if args.device.startswith("cuda") else "; n/a on CPU (no allocator statistics)"),
        "",
        "| T | method | status | peak growth (MB) | peak total (MB) | time (s) | tokens/s | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        cells = [fmt(r.get(k), d) for k, d in (("peak_growth_mb", 0), ("peak_mb", 0), ("seconds", 3))]
        cells += [fmt(r.get("tokens_per_s"), 0), r.get("note", "")]
        lines.append(f"| {r['T']} | {r['label']} | {r['status']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def make_writer(out: Path, env: dict, model: dict, args) -> Callable[[list[dict]], None]:
    """``write(records)``: rewrite the JSON and the markdown table in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    config = {**vars(args), "inner_lr": INNER_LR, "jvp": DEFAULT_JVP}

    def write(records: list[dict]) -> None:
        payload = {"environment": env, "model": model, "config": config, "records": records}
        (out / "gpu_check.json").write_text(json.dumps(payload, indent=1) + "\n")
        (out / "gpu_check.md").write_text(markdown(records, env, model, args))

    return write


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """CLI; ``--cpu-smoke`` swaps in a tiny CPU setup that explicit flags still override."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    for flag in (*SIZE_FLAGS, "kv_heads"):
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, default=GPU_DEFAULTS[flag])
    parser.add_argument("--steps", nargs="+", type=int, default=GPU_DEFAULTS["steps"], help="unroll lengths T")
    parser.add_argument("--directions", nargs="+", type=int, default=[1, 8], help="fg2u's b values")
    parser.add_argument("--base-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run")
    parser.add_argument("--cell-limit", type=float, default=150.0, help="seconds one cell may be predicted to take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=os.environ.get("OUT") or "gpu_check_out")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: an end-to-end check")
    smoke, _ = parser.parse_known_args(argv)
    if smoke.cpu_smoke:
        parser.set_defaults(
            **CPU_SMOKE, out_dir=os.environ.get("OUT") or str(Path(tempfile.gettempdir(), "gpu_check_smoke"))
        )
    args = parser.parse_args(argv)
    if min(args.steps) < 1 or min(args.directions) < 1:
        parser.error("--steps and --directions must be >= 1.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    guard = Guard(args.budget, args.cell_limit)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"torch {torch.__version__} sees no CUDA device; use --cpu-smoke (or --device cpu) on CPU.")
    sizes = ModelSizes(**{flag: getattr(args, flag) for flag in SIZE_FLAGS})
    model = build_model(sizes, args.kv_heads, device, getattr(torch, args.base_dtype), args.seed)
    env, info = environment(device), model_info(model, args.kv_heads)
    print(json.dumps({"environment": env, "model": info}, indent=1), flush=True)
    write = make_writer(Path(args.out_dir), env, info, args)
    runners = make_runners(model, sizes, max(args.steps), args.directions, device, args.seed)
    records = run_cells(args, runners, device, guard, write)
    print("\n" + markdown(records, env, info, args))
    print(f"wrote {args.out_dir}/gpu_check.{{json,md}} after {guard.elapsed():.0f} s")


if __name__ == "__main__":
    main()
