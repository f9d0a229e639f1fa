"""The group-shift directions against autograd on a tiny LM: ∇ of the groups' mean-loss differences."""

import torch

from hf_fg2u.lm.group_shift import group_shift_directions
from hf_fg2u.lm.losses import make_lm_losses
from hf_fg2u.lm.params import trainable_parameters
from tests.helpers.tiny import random_lm_batches, tiny_lm


def test_group_shift_directions_match_autograd():
    model = tiny_lm()
    losses = make_lm_losses(model, second_order=False)
    params = {k: v.detach().clone().requires_grad_() for k, v in trainable_parameters(model).items()}
    batches, _ = random_lm_batches(2, batch_size=4)
    groups = [torch.tensor([0, 2, 2, 0]), torch.tensor([2, 2, 1, 0])]  # group 0: 3 rows, 1: 1 row, 2: 4 rows
    directions = group_shift_directions(losses, params, {}, batches, groups, 3)
    assert len(directions) == 2
    per_row = torch.cat([losses(params, {}, batch) for batch in batches])
    every = torch.cat(groups)
    means = {g: per_row[every == g].mean() for g in (0, 1, 2)}
    names = sorted(params)
    for direction, group in zip(directions, (1, 2), strict=True):
        expected = torch.autograd.grad(means[group] - means[0], [params[k] for k in names], retain_graph=True)
        for name, value in zip(names, expected, strict=True):
            torch.testing.assert_close(direction[name], value, rtol=1e-5, atol=1e-7)


def test_one_group_present_gives_no_direction():
    model = tiny_lm()
    losses = make_lm_losses(model, second_order=False)
    batches, _ = random_lm_batches(1, batch_size=4)
    assert group_shift_directions(losses, trainable_parameters(model), {}, batches, [torch.full((4,), 3)], 4) == []


def test_two_processes_whose_rows_differ_agree_on_the_groups_and_get_the_whole_direction():
    """Process A's rows hold group 0 only, B's both groups: decided on the row counts reduced over processes, A
    still computes (and reduces) a direction, and the mean of the two equals one process's over all the rows."""
    model = tiny_lm()
    losses = make_lm_losses(model, second_order=False)
    params = trainable_parameters(model)
    batches, _ = random_lm_batches(2, batch_size=4)
    groups = [torch.tensor([0, 0, 0, 0]), torch.tensor([1, 1, 0, 1])]
    mean_counts = (torch.bincount(groups[0], minlength=2) + torch.bincount(groups[1], minlength=2)).double() / 2

    def process(rank, other_direction=None, seen=None):
        def reduce(tree):  # the mean over the two processes, the other's share given
            if "counts" in tree:
                return {"counts": mean_counts.to(tree["counts"].dtype)}
            if seen is not None:
                seen.append(tree)
                return tree
            return {k: (v + other_direction[k]) / 2 for k, v in tree.items()}

        return group_shift_directions(losses, params, {}, [batches[rank]], [groups[rank]], 2, reduce=reduce)

    seen = []
    process(1, seen=seen)
    reduced = process(0, other_direction=seen[0])
    whole = group_shift_directions(losses, params, {}, batches, groups, 2)
    assert len(reduced) == len(whole) == 1
    for name in whole[0]:
        torch.testing.assert_close(reduced[0][name], whole[0][name], rtol=1e-5, atol=1e-7)
