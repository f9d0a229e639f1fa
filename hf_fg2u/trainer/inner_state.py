"""The inner problem's lifecycle: the unroll's batches, the meta batch, the warm-up, θ carried over or
reset between outer steps, and the pure loss functions built once per kind."""

from __future__ import annotations

from collections import deque

import torch
from transformers.utils import logging

from hf_fg2u.hypergrad.unroll import clone_tree, run_inner_loop
from hf_fg2u.lm.collator import PaddingCollator
from hf_fg2u.lm.group_shift import grouped_meta_gradient, with_every_group
from hf_fg2u.lm.losses import losses_to_problem, make_lm_losses
from hf_fg2u.lm.params import load_parameters, trainable_parameters

logger = logging.get_logger(__name__)
# Seed streams of a run, each a stride apart so that steps of one never meet another's: the unroll of outer step
# t (and, below 0, the warm-up's steps), and the meta batch of outer step t.
OUTER_STEP_SEED_STRIDE = 1_000_003
META_BATCH_SEED_STRIDE = 7_919


def outer_step_seed(seed: int, step: int) -> int:
    """The seed of outer step ``step``'s unroll (negative steps: the warm-up's inner steps)."""
    return seed * OUTER_STEP_SEED_STRIDE + step


class InnerStateMixin:
    """The inner problem's lifecycle, a part of ``BilevelTrainer`` (reads its ``args``, ``outer``, ``model``)."""

    def _ensure_inner_state(self, model, step: int) -> None:
        if self._inner_params is None:
            self._inner_params = trainable_parameters(model)
        if self._initial_params is None:
            if self.args.inner_warmup_steps:
                self._inner_params, self._inner_state = self._warm_up(model)
                load_parameters(model, self._inner_params)
            self._initial_params = clone_tree(self._inner_params)
            self._initial_state = clone_tree(self._inner_state)
        if self._resets.due():
            logger.info(f"Outer step {step}: θ and the inner optimizer state go back to their start.")
            self._inner_params = clone_tree(self._initial_params)
            self._inner_state = clone_tree(self._initial_state)
            load_parameters(model, self._inner_params)
            self._resets.restarted()
            self._metrics["inner_resets"].append(1.0)

    def _warm_up(self, model) -> tuple[dict, dict]:
        """θ and the inner optimizer state after ``inner_warmup_steps`` plain inner steps (nothing differentiated)
        on train batches at the initial φ: where the outer steps start, and where resets return.

        The batches are the *last* ones of the first epoch's order: the first outer steps score rows the warm-up
        has not just fitted (a row θ was trained on looks helpful to its own hypergradient)."""
        steps, seen = self.args.inner_warmup_steps, 0
        batches = deque(maxlen=steps)
        while seen < steps:
            before = seen
            for unroll in self.get_train_dataloader():
                inner = self._inner_batches(self._prepare_inputs(unroll))
                batches.extend(inner)
                seen += len(inner)
            if seen == before:
                raise ValueError("inner_warmup_steps needs train batches, but the train dataloader is empty.")
        batches = list(batches)
        params = trainable_parameters(model)
        inner_loss = self._problem(model, self.args.method_at(0))[0]
        seeds = [outer_step_seed(self.args.seed, -1 - i) for i in range(steps)]  # before outer step 0's
        params, state, losses = run_inner_loop(
            inner_loss, self._inner_optimizer, params, self._inner_optimizer.init(params), self.outer.outer_dict(),
            batches[:steps], seeds, reduce_gradients=self.processes.inner_gradient_reducer(),
        )  # fmt: skip
        logger.info(f"Inner warm-up: {steps} steps, inner loss {losses[0]:.4f} -> {losses[-1]:.4f}.")
        self._metrics["warmup_inner_loss"].append(losses[-1])
        return params, state

    def _inner_batches(self, inputs: dict) -> list[dict]:
        """One unroll's rows split into its inner batches (all ranks' rows when ranks share the unroll)."""
        size = self._train_batch_size
        if self.processes.shares_unroll:  # ranks split directions: same unroll
            fill = getattr(self.data_collator, "fill", PaddingCollator().fill)
            inputs, size = self.processes.gather_unroll(inputs, fill), size * self.processes.world
        return [{k: v[i : i + size] for k, v in inputs.items()} for i in range(0, len(inputs["input_ids"]), size)]

    def meta_batch(self, step: int) -> dict:
        """The meta batch of outer step ``step``: a seeded draw without replacement, so resuming at any step
        draws the same batches without saving a data position; with the meta rows' groups, one that holds a row of
        every group (``with_every_group``)."""
        generator = torch.Generator().manual_seed(self.args.seed * META_BATCH_SEED_STRIDE + step)
        size = min(self.args.meta_batch_size, len(self.meta_dataset))
        order = torch.randperm(len(self.meta_dataset), generator=generator).tolist()
        rows = order[:size] if self._meta_groups is None else with_every_group(order[:size], order, self._meta_groups)
        return self.data_collator([self.meta_dataset[i] for i in rows])

    def _problem(self, model, method: str):
        """(inner_loss, outer_loss, per-example losses) for ``method``, built (and preflighted) once per kind."""
        second_order = self._methods[method].second_order
        if second_order not in self._problems:
            losses = make_lm_losses(model, self.outer.prefix, second_order=second_order)
            self._problems[second_order] = (*losses_to_problem(losses, self.outer.example_weights), losses)
        return self._problems[second_order]

    def _meta_gradient(self, model, method: str):
        """With weights measured within groups (and ``project_group_shift``): the meta gradient less the directions
        that only shift the groups' shares, taken on the meta rows' groups; else None (the plain gradient)."""
        column = self.outer.meta_group_column
        if not self.args.project_group_shift or column is None:
            return None
        losses = self._problem(model, method)[2]
        return grouped_meta_gradient(losses, lambda batch: batch[column], self.outer.num_groups)
