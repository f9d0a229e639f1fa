"""Check ``method="auto"``'s memory model (hf_fg2u/hypergrad/auto.py) against measured peaks on CPU.

Each measurement runs in a fresh process and reads its peak resident memory (``ru_maxrss``). The method's own
memory is the peak of ``estimate_hypergradient`` minus the peak of the same process running one plain inner
step instead (model, activations, θ_0, s_0 and one step's buffers: what every method holds). It is compared
with the model's method terms (the total minus what every method holds). Batches are tiny so that activations,
which the model leaves out, do not blur the θ-sized terms.

    OMP_NUM_THREADS=1 python scripts/check_memory_model.py
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

CASES = [  # (name, θ, method, T, directions_per_pass)
    ("LoRA r=128", "lora", "rgu", 32, 1),
    ("LoRA r=128", "lora", "fg2u", 32, 4),
    ("full-parameter", "full", "rgu", 16, 1),
    ("full-parameter", "full", "fg2u", 16, 4),
]


def measure(theta: str, method: str, steps: int, per_pass: int) -> float:
    """Peak RSS (MB) of this process after the run (call in a fresh process)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_fg2u.hypergrad import estimate_hypergradient
    from hf_fg2u.hypergrad.inner_optimizers import make_inner_optimizer
    from hf_fg2u.hypergrad.unroll import run_inner_loop
    from hf_fg2u.lm.losses import batch_softmax_weights, make_lm_problem
    from hf_fg2u.lm.params import trainable_parameters

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, attn_implementation="eager")  # fmt: skip
    model = LlamaForCausalLM(config)
    if theta == "lora":
        model = get_peft_model(model, LoraConfig(r=128, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    tokens = torch.randint(0, 256, (steps + 1, 8), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": tokens[t : t + 1], "attention_mask": torch.ones(1, 8, dtype=torch.long),
                "example_id": torch.tensor([t])} for t in range(steps + 1)]  # fmt: skip
    inner_loss, outer_loss = make_lm_problem(model, batch_softmax_weights(), second_order=True)
    outer = {"example_logits": torch.zeros(steps)}
    params = trainable_parameters(model)
    if method == "base":
        optimizer = make_inner_optimizer("adam", 1e-3)
        run_inner_loop(inner_loss, optimizer, params, optimizer.init(params), outer, batches[:1], [0])
    else:
        estimate_hypergradient(
            inner_loss, outer_loss, params, outer, batches[:steps], batches[steps], method=method,
            inner_optimizer="adam", inner_lr=1e-3, num_directions=per_pass, directions_per_pass=per_pass,
        )  # fmt: skip
    numel = sum(p.numel() for p in params.values())
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "numel": numel}))


def run(theta: str, method: str, steps: int, per_pass: int) -> dict:
    # Every allocation of 64 KB and more gets its own mapping, returned when freed: the resident peak is then the
    # peak of live tensors, not of glibc's arenas (whose freed holes a fixed threshold would keep resident).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, __file__, "--one", theta, method, str(steps), str(per_pass)],
                          capture_output=True, text=True, check=True, env=env)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch

    from hf_fg2u.hypergrad.auto import MemoryModel

    header = f"{'θ':16} {'method':6} {'T':>3} {'per pass':>8} {'|θ| (M)':>8} {'model MB':>9} {'measured MB':>12}"
    print(f"{header} {'ratio':>6}")
    for name, theta, method, steps, per_pass in CASES:
        base, peak = run(theta, "base", steps, per_pass), run(theta, method, steps, per_pass)
        memory = MemoryModel.of({"w": torch.zeros(base["numel"])}, "adam")
        total = memory.rgu_megabytes(steps) if method == "rgu" else memory.fg2u_megabytes(per_pass)
        held_by_all = memory.common() / 2**20
        predicted, measured = total - held_by_all, peak["peak_mb"] - base["peak_mb"]
        print(f"{name:16} {method:6} {steps:>3} {per_pass:>8} {base['numel'] / 1e6:>8.2f} {predicted:>9.1f} "
              f"{measured:>12.1f} {measured / predicted:>6.2f}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        measure(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
