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
    directions = group_shift_directions(losses, params, {}, batches, groups)
    assert len(directions) == 2
    per_row = torch.cat([losses(params, {}, batch) for batch in batches])
    every = torch.cat(groups)
    means = {g: per_row[every == g].mean() for g in (0, 1, 2)}
    names = sorted(params)
    for direction, group in zip(directions, (1, 2), strict=True):
        expected = torch.autograd.grad(means[group] - means[0], [params[k] for k in names], retain_graph=True)
        for name, value in zip(names, expected, strict=True):
            torch.testing.assert_close(direction[name], value, rtol=1e-5, atol=1e-7)


def test_one_group_present_gives_no_direction_and_reduce_is_applied():
    model = tiny_lm()
    losses = make_lm_losses(model, second_order=False)
    params = trainable_parameters(model)
    batches, _ = random_lm_batches(1, batch_size=4)
    assert group_shift_directions(losses, params, {}, batches, [torch.full((4,), 3)]) == []
    halved = group_shift_directions(losses, params, {}, batches, [torch.tensor([0, 0, 1, 1])],
                                    reduce=lambda tree: {k: v / 2 for k, v in tree.items()})  # fmt: skip
    plain = group_shift_directions(losses, params, {}, batches, [torch.tensor([0, 0, 1, 1])])
    for name in plain[0]:
        torch.testing.assert_close(halved[0][name], plain[0][name] / 2)
