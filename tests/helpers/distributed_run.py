"""A few outer steps of BilevelTrainer, for tests/test_distributed.py: run it with ``accelerate launch`` (2
processes) or plainly (1 process); rank 0 writes the outer logits, the world size and every rank's θ and φ
checksums to --result."""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hf_fg2u import ExampleWeights  # noqa: E402
from tests.helpers.tiny import fact_data, trainer_for  # noqa: E402


class DriftOnRankOne(TrainerCallback):
    """Perturbs rank 1's inner parameters after the first outer step, as a non-deterministic kernel might."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and self.trainer.accelerator.process_index == 1:
            for value in self.trainer._inner_params.values():
                value.add_(1e-3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--result", required=True, type=Path)
    parser.add_argument("--batch", type=int, required=True, help="per-process inner batch size")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--perturb", action="store_true", help="make rank 1's θ drift after the first step")
    parser.add_argument("--process_split", default="directions", choices=["directions", "data"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, data = fact_data(num_facts=8, copies=4)
    trainer = trainer_for(
        args.output, ExampleWeights(32), data, max_steps=args.steps, per_device_train_batch_size=args.batch,
        num_directions=4, directions="rademacher", save_strategy="steps", save_steps=2, logging_steps=1,
        process_split=args.process_split,
    )  # fmt: skip
    if args.perturb:
        trainer.add_callback(DriftOnRankOne(trainer))
    trainer.train(resume_from_checkpoint=args.resume)
    theta = torch.stack([v.double().sum() for v in trainer._inner_params.values()]).sum().reshape(1)
    phi = (trainer.outer.logits.detach().double() * torch.arange(1, 33)).sum().reshape(1)  # order-sensitive
    checksums = trainer.accelerator.gather(theta).tolist()
    outer_checksums = trainer.accelerator.gather(phi).tolist()
    if trainer.accelerator.is_main_process:
        resyncs = sum(e.get("theta_resyncs", 0) for e in trainer.state.log_history)
        result = {"world_size": trainer.accelerator.num_processes, "logits": trainer.outer.logits.tolist()}
        result.update(resyncs=resyncs, theta_checksums=checksums, outer_checksums=outer_checksums)
        args.result.write_text(json.dumps(result))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # destroys the process group: no gloo thread is left running at exit
    # The results are written and the group destroyed; skip the interpreter's teardown, where a gloo thread still
    # being torn down aborts a rank now and then ("terminate called without an active exception", SIGABRT).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
