"""Shared pieces of the benchmarks in ``scripts/``: a tiny peft-LoRA Llama built from config (no downloads),
random token batches with example ids, and the peak-memory measurement of one call on Linux.

Memory is measured as resident set size (RSS) because torch on CPU has no allocator statistics. RSS is only
meaningful per process, so each measurement belongs in a fresh process (see ``bench_unroll.py --worker``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"


@dataclass(frozen=True)
class ModelSizes:
    """Sizes of the benchmark model and its batches. ``intermediate=None`` takes Llama's ratio, 8/3 of the
    hidden size rounded up to a multiple of 16 (688 at hidden 256), so one flag scales the whole model."""

    hidden: int = 256
    intermediate: int | None = None
    layers: int = 4
    heads: int = 4
    vocab: int = 2048
    rank: int = 4
    batch_size: int = 8
    seq_len: int = 128

    @property
    def ffn(self) -> int:
        return self.intermediate or 16 * math.ceil(self.hidden * 8 / 3 / 16)

    def as_dict(self) -> dict:
        return {**asdict(self), "intermediate": self.ffn}


def build_llama(sizes: ModelSizes, seed: int = 0, inner: str = "lora") -> torch.nn.Module:
    """A float32 Llama with eager attention (forward AD and double backward both work through it). ``inner``:
    "lora" wraps it in LoRA on q_proj/v_proj (only the adapter trains; lora_B is drawn away from peft's zero init:
    at B = 0 the LoRA A gradients vanish and the second-order work of the benchmarked methods would be
    unrepresentative); "full" trains every parameter."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=sizes.vocab, hidden_size=sizes.hidden, intermediate_size=sizes.ffn,
        num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads, num_key_value_heads=sizes.heads,
        max_position_embeddings=sizes.seq_len, attn_implementation="eager",
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.float32)
    if inner == "lora":
        lora = LoraConfig(
            r=sizes.rank, lora_alpha=2 * sizes.rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
        )
        model = get_peft_model(model, lora).to(torch.float32)
        perturb_lora_b(model)
    elif inner != "full":
        raise ValueError(f"inner={inner!r}: use 'lora' or 'full'.")
    model.eval()
    return model


def perturb_lora_b(model: torch.nn.Module, std: float = 0.02) -> None:
    """Draw lora_B away from peft's zero init (at B = 0 the LoRA A gradients vanish)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, std)


def random_token_batches(steps: int, sizes: ModelSizes, seed: int = 1) -> tuple[list[dict], dict]:
    """``steps`` inner batches of random tokens whose ``example_id`` columns number the examples 0..T·B-1
    consecutively (the per-example weight indices), and one meta batch."""
    gen = torch.Generator().manual_seed(seed)

    def batch() -> dict:
        shape = (sizes.batch_size, sizes.seq_len)
        return {
            "input_ids": torch.randint(0, sizes.vocab, shape, generator=gen),
            "attention_mask": torch.ones(shape, dtype=torch.long),
        }

    inner = [
        {**batch(), "example_id": torch.arange(t * sizes.batch_size, (t + 1) * sizes.batch_size)} for t in range(steps)
    ]
    return inner, batch()


def _status_mb(field: str) -> float:
    """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status, in MB (the kernel reports KiB)."""
    with open(STATUS) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(f"{field} not in {STATUS}")


def release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap back to the OS, so that memory a previous call freed but
    malloc kept is not counted in the baseline and silently reused by the measured call."""
    gc.collect()
    # Not glibc: the baseline then includes malloc's cache and the growth is a lower bound.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0), so the peak read afterwards belongs to the
    measured call and not to model construction or the warm-up. Returns False where that is not allowed."""
    try:
        with open(CLEAR_REFS, "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def measure_peak(call: Callable[[], object]) -> dict:
    """Run ``call`` once; return its peak RSS growth over the RSS just before it, and its wall time.

    growth_mb = VmHWM after the call − VmRSS before it. VmHWM is the high-water mark that ``ru_maxrss``
    reports; after :func:`reset_peak_rss` it is the call's own peak. Without the reset (``peak_reset``
    False) an earlier, higher peak can inflate the growth.
    """
    release_free_memory()
    peak_reset = reset_peak_rss()
    baseline = _status_mb("VmRSS")
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    return {
        "growth_mb": peak - baseline, "seconds": seconds, "baseline_mb": baseline, "peak_mb": peak,
        "peak_reset": peak_reset,
    }  # fmt: skip


def run_worker_process(
    command: list[str], threads: int, extra_env: dict[str, str] | None = None, error_lines: int = 1
) -> tuple[dict | None, str | None]:
    """Run one measurement in a fresh process (RSS then holds nothing from other measurements) with
    ``threads`` OpenMP/MKL threads; its last stdout line is its JSON record. Returns (record, None), or
    (None, error) for a worker that failed: "killed by signal N (out of memory?)", or the last ``error_lines``
    lines of its traceback (Python's ^^^ marker lines left out) — a failure never stops the whole benchmark."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(extra_env or {})}
    env.setdefault("HF_HUB_OFFLINE", "1")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1]), None
    if done.returncode < 0:
        return None, f"killed by signal {-done.returncode} (out of memory?)"
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip().strip("^~")]
    return None, " | ".join(lines[-error_lines:]) or f"exit status {done.returncode}"


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two flat vectors, in float64."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))
