"""The data-parallel inner loop of fg2u and rgu on 2 CPU ranks, for tests/test_distributed.py (run it with
``accelerate launch``): each rank takes half of every inner batch, inner gradients and tangents are averaged
across ranks at every step. rgu averages the VJP of the inner gradient likewise.
Rank 0 also computes, alone, fg2u and rgu with the inner loss defined as the mean
of the two halves' losses — the same function — and writes all three to --result."""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hf_fg2u.hypergrad import estimate_hypergradient  # noqa: E402
from hf_fg2u.lm.losses import batch_softmax_weights, make_lm_problem  # noqa: E402
from hf_fg2u.lm.params import trainable_parameters  # noqa: E402
from hf_fg2u.trainer.processes import all_reduce_sum  # noqa: E402
from tests.helpers.tiny import random_lm_batches, tiny_lm  # noqa: E402

STEPS, BATCH, HALF = 3, 8, 4


def halves(batch: dict) -> list[dict]:
    return [{k: v[i : i + HALF] for k, v in batch.items()} for i in (0, HALF)]


def average_over_ranks(tree: dict) -> dict:
    return {key: value / torch.distributed.get_world_size() for key, value in all_reduce_sum(tree).items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--result", required=True, type=Path)
    args = parser.parse_args()
    state = PartialState(cpu=True)
    torch.set_num_threads(1)
    model = tiny_lm("llama", "eager", dtype=torch.float64)
    batches, meta = random_lm_batches(STEPS, BATCH)
    inner_loss, outer_loss = make_lm_problem(model, batch_softmax_weights(), second_order=True)
    outer = {"example_logits": torch.linspace(-0.5, 0.5, STEPS * BATCH, dtype=torch.float64)}
    common = dict(inner_lr=0.5, inner_optimizer="adam", directions="basis", num_directions=STEPS * BATCH)
    params = trainable_parameters(model)
    local = [halves(batch)[state.process_index] for batch in batches]
    parallel = estimate_hypergradient(
        inner_loss, outer_loss, params, outer, local, meta, reduce_gradients=average_over_ranks, **common
    )
    parallel_rgu = estimate_hypergradient(
        inner_loss, outer_loss, params, outer, local, meta, method="rgu", reduce_gradients=average_over_ranks,
        checkpoint_every=2, **common,
    )  # fmt: skip
    if state.is_main_process:

        def mean_of_halves(p, o, batch):
            return sum(inner_loss(p, o, half) for half in halves(batch)) / 2

        single = estimate_hypergradient(mean_of_halves, outer_loss, params, outer, batches, meta, **common)
        exact = estimate_hypergradient(mean_of_halves, outer_loss, params, outer, batches, meta, method="rgu", **common)
        grads = {"parallel": parallel, "parallel_rgu": parallel_rgu, "single": single, "rgu": exact}
        result = {name: r.grad["example_logits"].tolist() for name, r in grads.items()}
        result["world_size"] = state.num_processes
        args.result.write_text(json.dumps(result))
    state.wait_for_everyone()
    state.destroy_process_group()
    # The results are written and the group destroyed; skip the interpreter's teardown, where a gloo thread still
    # being torn down aborts a rank now and then ("terminate called without an active exception", SIGABRT).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
