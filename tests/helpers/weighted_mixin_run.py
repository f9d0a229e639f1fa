"""WeightedLossMixin on 2 CPU ranks (gloo), for tests/trainer/test_weighted_mixin.py (run it with ``accelerate
launch``): a plain Trainer with the mixin, 4 rows per rank and step, the rows in their order; rank 0 writes the
trained LoRA matrices to --result (safetensors)."""

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.trainer.test_weighted_mixin import adapter, build, weighted_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--result", required=True, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = build("trainer", args.output, weighted_rows(), per_device_train_batch_size=4)
    lora = adapter(trainer)
    if trainer.is_world_process_zero():
        save_file({name: value.contiguous() for name, value in lora.items()}, str(args.result))


if __name__ == "__main__":
    main()
