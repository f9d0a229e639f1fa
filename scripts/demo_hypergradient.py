"""One hypergradient on a tiny LoRA Llama, by fg2u and by the exact rgu, side by side (offline, ~1 minute).

    make demo                      # or: .venv/bin/python scripts/demo_hypergradient.py --steps 16

Prints both estimates of dh/dφ for per-example data weights φ, their cosine similarity, the time and the
peak memory growth of each (each method runs in a fresh worker process, see bench_unroll.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

from _bench_common import ModelSizes, build_llama, measure_peak, random_token_batches  # noqa: E402

from hf_fg2u.hypergrad import estimate_hypergradient  # noqa: E402
from hf_fg2u.lm.losses import batch_softmax_weights, make_lm_problem  # noqa: E402
from hf_fg2u.lm.params import trainable_parameters  # noqa: E402

SIZES = ModelSizes(hidden=128, layers=2, vocab=512, batch_size=4, seq_len=64)


def run_method(method: str, steps: int, directions: int) -> dict:
    """Compute one hypergradient in this process and return it with its cost."""
    torch.set_num_threads(2)
    model = build_llama(SIZES)
    batches, meta = random_token_batches(steps, SIZES)
    inner_loss, outer_loss = make_lm_problem(model, batch_softmax_weights())
    outer = {"example_logits": torch.zeros(steps * SIZES.batch_size)}
    options = {"num_directions": directions} if method == "fg2u" else {}
    holder = {}

    def call():
        holder["result"] = estimate_hypergradient(
            inner_loss, outer_loss, trainable_parameters(model), outer, batches, meta, method=method, inner_lr=0.05,
            progress=True, **options,
        )  # fmt: skip

    stats = measure_peak(call)
    result = holder["result"]
    return {"method": method, "grad": result.grad["example_logits"].tolist(), "outer_loss": result.outer_loss, **stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="unroll length T")
    parser.add_argument("--directions", type=int, default=32, help="fg2u's number of random directions b")
    parser.add_argument("--worker", choices=["fg2u", "rgu"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_method(args.worker, args.steps, args.directions)))
        return
    records = {}
    for method in ("fg2u", "rgu"):
        print(f"running {method} (T={args.steps}) ...", flush=True)
        command = [sys.executable, __file__, "--worker", method, "--steps", str(args.steps)]
        command += ["--directions", str(args.directions)]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        records[method] = json.loads(done.stdout.strip().splitlines()[-1])
    fg2u, rgu = (torch.tensor(records[m]["grad"]) for m in ("fg2u", "rgu"))
    torch.set_printoptions(precision=4, linewidth=110)
    print(f"\nTiny Llama + LoRA, {args.steps} inner SGD steps on {SIZES.batch_size}x{SIZES.seq_len} tokens each;")
    print(f"φ = a logit per training example ({fg2u.numel()} active coordinates).\n")
    print(f"fg2u (b={args.directions} Rademacher directions):\n{fg2u}")
    print(f"rgu (exact, reverse through the unroll):\n{rgu}\n")
    cosine = float(torch.nn.functional.cosine_similarity(fg2u, rgu, dim=0))
    print(f"cosine similarity fg2u vs rgu: {cosine:.3f}  (expected about sqrt(b/(b+N-1)) = "
          f"{(args.directions / (args.directions + fg2u.numel() - 1)) ** 0.5:.2f} for one draw)")  # fmt: skip
    for method, record in records.items():
        print(f"{method:5s} h(φ) = {record['outer_loss']:.4f}  time {record['seconds']:.2f} s  "
              f"peak memory growth {record['growth_mb']:.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
