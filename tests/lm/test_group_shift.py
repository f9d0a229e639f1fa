"""The grouped meta gradient against autograd on a tiny LM: the mean meta loss and its gradient less the projection on
∇ of the groups' mean-loss differences, all from one pass per group."""

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from hf_fg2u.hypergrad.projection import project_out
from hf_fg2u.lm.group_shift import check_meta_groups, group_parts, grouped_meta_gradient, with_every_group
from hf_fg2u.lm.losses import make_lm_losses
from hf_fg2u.lm.params import trainable_parameters
from hf_fg2u.trainer.inner_state import InnerStateMixin
from tests.helpers.tiny import random_lm_batches, tiny_lm


def reference(losses, params, batch, groups, present):
    """The mean loss, its gradient, and the directions ∇(mean_g − mean_first) by plain autograd over the whole batch."""
    params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    names = sorted(params)
    per_row = losses(params, {}, batch)
    mean = per_row.mean()
    grad = dict(zip(names, torch.autograd.grad(mean, [params[k] for k in names], retain_graph=True), strict=True))
    means = {g: per_row[groups == g].mean() for g in present}
    directions = []
    for g in present[1:]:
        values = torch.autograd.grad(means[g] - means[present[0]], [params[k] for k in names], retain_graph=True)
        directions.append(dict(zip(names, values, strict=True)))
    return mean.detach(), grad, directions


@pytest.mark.parametrize("groups", [[0, 2, 2, 0, 2, -1], [1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
def test_grouped_meta_gradient_matches_autograd(groups):
    """Three groups with a row of no group, two groups, one group (nothing projected): the same value, and the
    gradient projected off the same directions as autograd over the whole batch gives."""
    model = tiny_lm()
    losses = make_lm_losses(model, second_order=False)
    params = trainable_parameters(model)
    (batch,), _ = random_lm_batches(1, batch_size=6)
    groups = torch.tensor(groups)
    batch["meta_group"] = groups
    present = sorted(set(groups.tolist()) - {-1})
    (grad, grad_outer), value = grouped_meta_gradient(losses, lambda b: b["meta_group"], 3)(params, {}, batch)
    mean, plain, directions = reference(losses, params, batch, groups, present)
    torch.testing.assert_close(value, mean, rtol=1e-6, atol=1e-7)
    assert grad_outer == {}
    expected = project_out(plain, directions)
    for name in plain:
        torch.testing.assert_close(grad[name], expected[name], rtol=1e-4, atol=1e-7)
    if directions:  # the projection mattered, and nothing of the first direction is left
        norm = torch.sqrt(sum((d**2).sum() for d in directions[0].values()))
        unit = {k: v / norm for k, v in directions[0].items()}
        assert max((grad[k] - plain[k]).abs().max() for k in plain) > 1e-6
        assert abs(float(sum((grad[k] * unit[k]).sum() for k in grad))) < 1e-6
    else:
        for name in plain:
            torch.testing.assert_close(grad[name], plain[name], rtol=1e-4, atol=1e-7)


def test_meta_groups_are_checked_before_training():
    with pytest.raises(ValueError, match="needs a 'meta_group' column"):
        check_meta_groups(Dataset.from_dict({"input_ids": [[1]]}), "meta_group", 2)
    with pytest.raises(ValueError, match=r"meta column 'meta_group' must lie in \[-1, 2\)"):
        check_meta_groups(Dataset.from_dict({"meta_group": [0, 2]}), "meta_group", 2)
    with pytest.raises(ValueError, match="hold 1 of the 2 groups"):
        check_meta_groups(Dataset.from_dict({"meta_group": [1, 1, -1]}), "meta_group", 2)
    check_meta_groups(Dataset.from_dict({"meta_group": [1, 0, -1]}), "meta_group", 2)


def test_a_meta_batch_of_one_group_takes_rows_of_another():
    groups = [0, 0, 0, -1, 0, 1, 1, -1]
    order = [0, 1, 3, 2, 4, 7, 5, 6]  # the seeded permutation; the first 3 are the draw
    assert with_every_group(order[:3], order, groups) == [0, 1, 5]  # the row of no group gives way first
    assert with_every_group([0, 1], [0, 1, 2, 5], groups) == [0, 5]  # a row of a group held twice
    assert with_every_group([3, 7], [3, 7, 5, 0], groups) == [0, 5]  # no known group: two rows give way
    assert with_every_group([0, 5, 1], order, groups) == [0, 5, 1]  # two groups already: the draw as it was


def test_every_meta_batch_holds_every_group_of_the_meta_rows():
    """Issue 36: with three groups a draw that missed one left that group's shift in the hypergradient. Now every
    batch of the trainer's seeded draw holds all three; a draw that already did is kept as it was."""
    groups = [0, 0, 0, 0, 0, 0, 1, 1, 1, -1, 2, 2]
    assert with_every_group([0, 1, 6], [0, 1, 6, 2, 10, 7], groups) == [0, 10, 6]  # group 0 held twice gives way
    assert with_every_group([9, 0, 1], [9, 0, 1, 7, 11], groups) == [11, 0, 7]  # the last replaceable row first
    meta = Dataset.from_dict({"meta_group": groups})

    def collate(rows):
        return [row["meta_group"] for row in rows]

    trainer = SimpleNamespace(args=SimpleNamespace(seed=0, meta_batch_size=3), meta_dataset=meta, _meta_groups=groups,
                              data_collator=collate)  # fmt: skip
    plain = SimpleNamespace(**{**vars(trainer), "_meta_groups": None})
    kept = 0
    for step in range(40):
        batch, draw = InnerStateMixin.meta_batch(trainer, step), InnerStateMixin.meta_batch(plain, step)
        assert sorted(batch) == [0, 1, 2], (step, draw, batch)
        if sorted(draw) == [0, 1, 2]:
            assert batch == draw
            kept += 1
    assert 0 < kept < 40  # both cases were drawn


def test_meta_batches_smaller_than_the_groups_are_refused():
    three = Dataset.from_dict({"meta_group": [0, 1, 2, -1]})
    with pytest.raises(ValueError, match=r"each of the 3 groups .*meta_batch_size=2 is too small. Set meta_batch_siz"):
        check_meta_groups(three, "meta_group", 3, meta_batch_size=2)
    assert check_meta_groups(three, "meta_group", 3, meta_batch_size=3) == [0, 1, 2, -1]


def test_meta_groups_outside_the_range_or_not_integers_are_refused():
    with pytest.raises(ValueError, match=r"must lie in \[-1, 2\)"):
        group_parts(torch.tensor([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="must hold integers"):
        check_meta_groups(Dataset.from_dict({"meta_group": [0.0, 1.0]}), "meta_group", 2)
    with pytest.raises(ValueError, match="meta_batch_size=1 is too small"):
        check_meta_groups(Dataset.from_dict({"meta_group": [0, 1]}), "meta_group", 2, meta_batch_size=1)
    assert check_meta_groups(Dataset.from_dict({"meta_group": [0, 1, -1]}), "meta_group", 2) == [0, 1, -1]


def test_bf16_parameters_get_a_bf16_projected_gradient_computed_in_float32():
    """The shift dominates (the groups' targets are ±10): what is left after the projection is a small remainder
    of large parts. Summed and projected in float32 and cast back once, the bf16 result is the float32 one rounded."""
    gen = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(6, 16, generator=gen), "meta_group": torch.tensor([0, 1, 1, 0, 1, 0])}
    batch["y"] = torch.where(batch["meta_group"] == 0, 10.0, -10.0) + 0.1 * torch.randn(6, generator=gen)

    def losses(params, outer, b):
        return (b["x"] @ params["w"].float() - b["y"]) ** 2

    meta_gradient = grouped_meta_gradient(losses, lambda b: b["meta_group"], 2)
    w = 0.1 * torch.randn(16, generator=gen)
    (grad32, _), _ = meta_gradient({"w": w}, {}, batch)
    (grad16, _), _ = meta_gradient({"w": w.to(torch.bfloat16)}, {}, batch)
    assert grad16["w"].dtype == torch.bfloat16
    torch.testing.assert_close(grad16["w"].float(), grad32["w"], rtol=2e-2, atol=2e-2 * float(grad32["w"].abs().max()))
