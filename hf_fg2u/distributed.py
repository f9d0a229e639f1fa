"""Multi-process policy of an outer step: which rows and directions each process handles, and the collectives
that make the processes agree (gather of the unroll, the direction-share sum, the data-parallel mean, the θ
checksum and resync).

Two splits (``BilevelConfig.process_split``): ``'directions'`` gives every process the same unroll (gathered
from all ranks) and a contiguous share of the b directions, summed once at the end; ``'data'`` keeps each
process's own rows and averages the inner gradients (and their tangents) over processes at every inner step.
"""

from __future__ import annotations

import math
import warnings

import torch

from .checkpointing import flatten_state
from .functional import load_parameters
from .hypergrad import METHOD_SPECS


class ProcessPolicy:
    """What this process computes and how its results are combined with the other processes'."""

    def __init__(self, accelerator, args):
        self.accelerator = accelerator
        self.args = args

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def data_parallel(self) -> bool:
        """Whether processes keep their own inner rows and average inner gradients (``process_split='data'``)."""
        return self.args.process_split == "data" and self.world > 1

    @property
    def shares_unroll(self) -> bool:
        """Whether every process must see the same unroll (several processes splitting the directions)."""
        return self.world > 1 and not self.data_parallel

    def direction_share(self, method: str) -> slice | None:
        """This process's contiguous share of the b directions (None: all of them, on one process)."""
        if self.world == 1 or not METHOD_SPECS[method].directional or self.data_parallel:
            return None
        per_rank = math.ceil(self.args.num_directions / self.world)
        start = min(self.args.num_directions, self.accelerator.process_index * per_rank)
        return slice(start, min(self.args.num_directions, start + per_rank))

    def gather_unroll(self, inputs: dict[str, torch.Tensor], fill: dict[str, int]) -> dict[str, torch.Tensor]:
        """Every rank's rows of the unroll, concatenated in rank order — the rows one process with
        ``num_processes ×`` the batch size would read — after padding to a common length with ``fill``."""
        gathered = {}
        for key, value in inputs.items():
            if value.dim() > 1:
                value = self.accelerator.pad_across_processes(value, dim=1, pad_index=fill.get(key, 0))
            gathered[key] = self.accelerator.gather(value.contiguous())
        return gathered

    def resync_inner_state(self, model, params: dict[str, torch.Tensor], state: dict | None, device) -> bool:
        """Ranks compute θ identically by construction; check a checksum of θ every outer step and, if a rank
        drifted (non-deterministic kernels, a bug), copy rank 0's θ and inner optimizer state to all (in
        place). Returns whether a resync happened."""
        if self.world == 1:
            return False
        checksum = torch.stack([v.double().sum() for v in params.values()]).sum().reshape(1)
        sums = self.accelerator.gather(checksum.to(device))
        if float((sums - sums[0]).abs().max()) <= 1e-9 * (1.0 + float(sums[0].abs())):
            return False
        warnings.warn(f"Inner parameters differ across processes (checksums {sums.tolist()}); resynchronising "
                      "from rank 0.", stacklevel=3)  # fmt: skip
        for value in [*params.values(), *flatten_state(state or {}).values()]:
            torch.distributed.broadcast(value, src=0)
        load_parameters(model, params)
        return True

    def active_coordinates(self, active: dict[str, torch.Tensor | None] | None):
        """The coordinates of φ the unroll can affect; with a data-parallel inner loop, the union over ranks
        (every rank must draw the same directions)."""
        if active is None or not self.data_parallel:
            return active
        union = {}
        for key, mask in active.items():
            if mask is not None:
                counts = mask.to(torch.int32).contiguous()
                torch.distributed.all_reduce(counts)
                mask = counts > 0
            union[key] = mask
        return union

    def average(self, tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mean over processes of a dict of tensors: the inner gradient (and its tangents) of the data-parallel
        inner loop."""
        return {name: value / self.world for name, value in all_reduce_sum(tree).items()}

    def inner_gradient_reducer(self):
        """The reduction the inner loop applies to its gradients (None: each process's own are the full ones)."""
        return self.average if self.data_parallel else None

    def sum_direction_shares(self, grads: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
        """The one all-reduce of an outer step: the shares of the directions sum to the full estimate."""
        return grads if self.direction_share(method) is None else all_reduce_sum(grads)


def all_reduce_sum(tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum over processes of a dict of tensors, into new tensors (the inputs are left as they are)."""
    summed = {}
    for name, value in tree.items():
        value = value.contiguous().clone()
        torch.distributed.all_reduce(value)
        summed[name] = value
    return summed
