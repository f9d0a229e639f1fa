"""Multi-process policy of an outer step: which rows and directions each process handles, and the collectives
that make the processes agree (gather of the unroll, the direction-share sum, the data-parallel mean, the θ
checksum and resync, and the decisions every rank must take alike: skip a step, the memory ``auto`` plans
with, whether a lock or a save succeeded).

A decision that one rank takes alone from what it alone sees (its share's finiteness, its free memory, an
exception) makes the ranks run different collectives and hang; such decisions go through :meth:`any_process`,
:meth:`minimum` or :meth:`agree` first, so that every rank takes the same branch.

Two splits (``BilevelConfig.process_split``): ``'directions'`` gives every process the same unroll (gathered
from all ranks) and a contiguous share of the b directions, summed once at the end; ``'data'`` keeps each
process's own rows and averages the inner gradients (and their tangents) over processes at every inner step.
"""

from __future__ import annotations

import warnings

import torch

from hf_fg2u.hypergrad import METHOD_SPECS
from hf_fg2u.hypergrad.methods import data_parallel_methods
from hf_fg2u.lm.params import load_parameters
from hf_fg2u.trainer.checkpointing import flatten_state


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
        return balanced_share(self.args.num_directions, self.world, self.accelerator.process_index)

    def check_direction_shares(self, methods: dict) -> None:
        """Refuse, at the start, a split that leaves a process no direction where the method cannot run an empty
        share (fg2u can: such a process runs the unroll and adds zeros to the sum)."""
        empty = self.world - self.args.num_directions
        refused = [name for name in methods if name == "fg2u_zo"]
        if empty > 0 and refused and not self.data_parallel:
            raise ValueError(
                f"num_directions={self.args.num_directions} < {self.world} processes: {empty} processes would get no "
                f"direction, which method {refused[0]!r} does not support. Set num_directions >= {self.world} (a "
                "multiple of it balances the work), or use fewer processes."
            )

    def warn_if_unroll_repeated(self, methods: dict) -> None:
        """Under process_split='directions' a method that draws no directions has nothing to split: every process
        runs the whole unroll on all ranks' rows and gets the same result, P times the work of one process."""
        repeated = [name for name, method in methods.items() if not method.directional]
        if not self.shares_unroll or not repeated:
            return
        parallel = data_parallel_methods()
        if all(name in parallel for name in repeated):
            fix = "Set process_split='data': each process then unrolls its own rows, the inner gradients averaged."
        else:
            fix = f"Run it on one process, or use a method that process_split='data' splits by rows ({parallel})."
        warnings.warn(
            f"Method {repeated} draws no directions, so process_split='directions' gives each of the {self.world} "
            f"processes the whole unroll on every rank's rows: each repeats the same work and nothing is split. {fix}",
            stacklevel=3,
        )

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

    def any_process(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process (every process gets the same answer)."""
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag)], device=self.accelerator.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def minimum(self, value: float) -> float:
        """The smallest ``value`` over processes (every process gets the same number)."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
        return float(tensor.item())

    def agree(self, error: BaseException | None, what: str) -> None:
        """Make the outcome of ``what`` (run by some ranks only, e.g. rank 0's save) the same on every rank:
        if it failed anywhere, raise on every rank — the original error where it happened, a RuntimeError naming
        the failed rank elsewhere — instead of leaving the others waiting in the next collective."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        outcomes: list = [None] * self.world
        mine = None if error is None else f"{type(error).__name__}: {error}"
        torch.distributed.all_gather_object(outcomes, mine)
        if error is not None:
            raise error
        failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
        if failed:
            rank, outcome = failed[0]
            raise RuntimeError(f"{what} failed on process {rank} ({outcome}); every process stops.")

    def sum_direction_shares(self, grads: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
        """The one all-reduce of an outer step: the shares of the directions sum to the full estimate."""
        return grads if self.direction_share(method) is None else all_reduce_sum(grads)


def check_same_settings(settings: dict) -> None:
    """Refuse, on every process, a start where the processes were given different settings (e.g. another
    unroll_steps on one rank: they would run different collectives and die mid-run with a gloo/NCCL reset); the
    error names the settings that differ. Run before the Trainer is built (the launcher has set up the process
    group by then), so a refusal leaves nothing half-built behind."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, settings)
    differing = sorted({k for other in gathered for k in {*other, *settings} if other.get(k) != settings.get(k)})
    if differing:
        shown = "; ".join(f"{k}: " + ", ".join(f"rank {r} {g.get(k)!r:.40}" for r, g in enumerate(gathered))
                          for k in differing[:3])  # fmt: skip
        raise ValueError(
            f"The {world} processes were started with different settings ({shown}). Start every process with the "
            "same command and config."
        )


def balanced_share(total: int, world: int, rank: int) -> slice:
    """Rank ``rank``'s contiguous share of ``total`` items split over ``world`` ranks, sizes differing by at most
    one (no rank is empty when ``total >= world``; with fewer items some shares are empty and those ranks
    contribute zeros to the sum)."""
    return slice(rank * total // world, (rank + 1) * total // world)


def all_reduce_sum(tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum over processes of a dict of tensors, into new tensors (the inputs are left as they are)."""
    summed = {}
    for name, value in tree.items():
        value = value.contiguous().clone()
        torch.distributed.all_reduce(value)
        summed[name] = value
    return summed
