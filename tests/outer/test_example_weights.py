"""ExampleWeights' parametrizations: the batch weights, the exported weights and the penalties, checked against
the formulas written out by hand."""

import pytest
import torch

from hf_fg2u import ExampleWeights
from hf_fg2u.cli.arguments import ScriptArguments
from hf_fg2u.cli.registry import make_outer, with_meta_groups
from hf_fg2u.outer.base import OuterModule
from tests.helpers.tiny import fact_data, trainer_for

LOGITS = torch.tensor([1.5, -0.5, 0.0, 2.0, -3.0], dtype=torch.float64)


def weights_with(parametrization: str, logits: torch.Tensor = LOGITS) -> ExampleWeights:
    outer = ExampleWeights(len(logits), parametrization=parametrization).double()
    with torch.no_grad():
        outer.logits.copy_(logits)
    return outer


@pytest.mark.parametrize(
    ("parametrization", "share"), [("softmax", torch.exp), ("sigmoid", torch.sigmoid)], ids=["softmax", "sigmoid"]
)
def test_batch_and_exported_weights_are_each_rows_share(parametrization, share):
    outer = weights_with(parametrization)
    batch = {"example_id": torch.tensor([3, 0, 4])}
    expected = share(LOGITS[[3, 0, 4]]) / share(LOGITS).mean() / 3  # w_i / B, w_i = s_i / mean over the dataset
    torch.testing.assert_close(outer.example_weights(outer.outer_dict(), batch, None), expected, rtol=1e-12, atol=0)
    everyone = share(LOGITS) / share(LOGITS).sum()
    torch.testing.assert_close(outer.row_weights(outer.outer_dict(), batch, None), len(LOGITS) * everyone[[3, 0, 4]])
    torch.testing.assert_close(outer.weights(), len(LOGITS) * everyone, rtol=1e-12, atol=0)
    assert outer.weights().mean().item() == pytest.approx(1.0, abs=1e-12)


def test_sigmoid_weights_cannot_pile_onto_one_row():
    """One row with a far larger logit takes almost the whole weight under softmax; under sigmoid it counts no
    more than a row kept in full (N / (1 + (N - 1) σ(0)) < 2 times the mean)."""
    logits = torch.zeros(20, dtype=torch.float64)
    logits[7] = 30.0
    assert weights_with("softmax", logits).weights()[7].item() == pytest.approx(20.0, rel=1e-9)
    capped = weights_with("sigmoid", logits).weights()
    assert capped[7].item() == pytest.approx(20 / (1 + 19 * 0.5), rel=1e-9)
    # and a row can still be dropped: its weight goes to 0 as its logit falls
    logits[3] = -30.0
    assert weights_with("sigmoid", logits).weights()[3].item() < 1e-12


def test_regularizers_of_the_sigmoid_weights():
    outer = weights_with("sigmoid")
    probs = torch.sigmoid(LOGITS) / torch.sigmoid(LOGITS).sum()
    kl = (probs * (probs * len(LOGITS)).log()).sum()
    torch.testing.assert_close(outer.regularizer(outer.outer_dict(), "kl_uniform"), kl, rtol=1e-12, atol=0)
    torch.testing.assert_close(outer.regularizer(outer.outer_dict(), "l2"), 0.5 * LOGITS.pow(2).sum())
    flat = weights_with("sigmoid", torch.full((5,), 0.7, dtype=torch.float64))
    assert flat.regularizer(flat.outer_dict(), "kl_uniform").item() == pytest.approx(0.0, abs=1e-12)


def test_hypergradient_through_the_sigmoid_weights_matches_the_chain_rule():
    """d(Σ_i w_i ℓ_i / B)/dz_j for w_i = σ(z_i)/m, m = mean_k σ(z_k) held fixed: autograd through example_weights
    against the formula σ'(z_j) ℓ_j / (m B), and 0 for the rows outside the batch."""
    outer = weights_with("sigmoid")
    losses = torch.tensor([0.3, 2.0, 4.0], dtype=torch.float64)
    rows = torch.tensor([1, 2, 4])
    logits = LOGITS.clone().requires_grad_(True)
    weights = outer.example_weights({"logits": logits}, {"example_id": rows}, None)
    (weights * losses).sum().backward()
    s = torch.sigmoid(LOGITS)
    expected = torch.zeros_like(LOGITS)
    expected[rows] = (s * (1 - s))[rows] * losses / (s.mean() * len(rows))
    torch.testing.assert_close(logits.grad, expected, rtol=1e-12, atol=1e-15)


def test_a_rows_weight_does_not_depend_on_its_batch_mates():
    """The same row weighs the same in any batch, and an all-clean batch's equal losses push every logit the same
    way (a per-batch normaliser would give hypergradients summing to zero: some row always pushed down)."""
    outer = weights_with("sigmoid")
    one = outer.example_weights(outer.outer_dict(), {"example_id": torch.tensor([3, 0])}, None)
    other = outer.example_weights(outer.outer_dict(), {"example_id": torch.tensor([3, 4])}, None)
    assert one[0].item() == pytest.approx(other[0].item(), rel=1e-12)
    logits = LOGITS.clone().requires_grad_(True)
    weights = outer.example_weights({"logits": logits}, {"example_id": torch.tensor([0, 2, 3])}, None)
    (weights * torch.ones(3, dtype=torch.float64)).sum().backward()
    assert (logits.grad[[0, 2, 3]] > 0).all()


def test_parametrization_survives_save_and_load(tmp_path):
    weights_with("sigmoid").save_pretrained(tmp_path)
    loaded = OuterModule.from_pretrained(tmp_path)
    assert isinstance(loaded, ExampleWeights) and loaded.parametrization == "sigmoid"
    torch.testing.assert_close(loaded.weights().double(), weights_with("sigmoid").weights(), rtol=1e-6, atol=0)


def test_recipe_option_picks_the_parametrization_and_unknown_ones_are_refused():
    splits = {"train": list(range(6))}
    outer = make_outer(ScriptArguments(weight_parametrization="sigmoid"), splits, model=None)
    assert outer.parametrization == "sigmoid" and outer.logits.numel() == 6
    with pytest.raises(ValueError, match=r"parametrization='tanh' is not known; use one of \('softmax', 'sigmoid'\)"):
        make_outer(ScriptArguments(weight_parametrization="tanh"), splits, model=None)
    assert ExampleWeights(4).parametrization == "softmax"  # the default, as saved runs without the key were


def test_max_logit_caps_the_logits_after_each_outer_step(tmp_path):
    """Two steps from the same seed: the capped run's logits equal the uncapped first step clamped at 0, and
    after the second step no logit is above 0 while some are below (rows are pushed down, none up)."""
    data = fact_data(num_facts=8, copies=2)[1]
    fast = dict(num_directions=2, per_device_train_batch_size=4, meta_batch_size=4, logging_steps=1, method="rgu")
    common = dict(optim="sgd", learning_rate=0.5, normalize_hypergradient=True, **fast)
    free = trainer_for(tmp_path / "free", ExampleWeights(16), data, max_steps=1, **common)
    free.train()
    capped = trainer_for(tmp_path / "capped", ExampleWeights(16, max_logit=0.0), data, max_steps=1, **common)
    capped.train()
    free_logits, capped_logits = free.outer.logits.detach(), capped.outer.logits.detach()
    assert (free_logits > 0).any() and (free_logits < 0).any()
    torch.testing.assert_close(capped_logits, free_logits.clamp(max=0.0), rtol=0, atol=0)
    longer = trainer_for(tmp_path / "longer", ExampleWeights(16, max_logit=0.0), data, max_steps=2, **common)
    longer.train()
    logits = longer.outer.logits.detach()
    assert logits.max().item() == 0.0 and logits.min().item() < -0.1


def test_max_logit_below_the_start_is_refused_and_is_saved(tmp_path):
    with pytest.raises(ValueError, match=r"max_logit=-1.0 must be a finite number >= init \(0.0\), or None"):
        ExampleWeights(4, max_logit=-1.0)
    ExampleWeights(4, max_logit=0.5).save_pretrained(tmp_path)
    assert OuterModule.from_pretrained(tmp_path).max_logit == 0.5


GROUPS = torch.tensor([0, 1, 0, 1, 1])


def grouped(parametrization: str = "sigmoid") -> ExampleWeights:
    outer = ExampleWeights(len(LOGITS), parametrization=parametrization, num_groups=2).double()
    with torch.no_grad():
        outer.logits.copy_(LOGITS)
    outer.set_groups(GROUPS)
    return outer


def test_grouped_weights_are_each_rows_share_over_its_groups_mean():
    """w_i = σ(z_i) / mean_{j in g(i)} σ(z_j): every group has mean weight 1, the same in batches and exported,
    and the hypergradient is the chain rule with the group's mean held fixed."""
    outer = grouped()
    s = torch.sigmoid(LOGITS)
    expected = torch.stack([s[i] / s[GROUPS[i] == GROUPS].mean() for i in range(len(LOGITS))])
    torch.testing.assert_close(outer.weights(), expected, rtol=1e-12, atol=0)
    for group in (0, 1):
        assert outer.weights()[group == GROUPS].mean().item() == pytest.approx(1.0, abs=1e-12)
    batch = {"example_id": torch.tensor([4, 1, 2])}
    torch.testing.assert_close(outer.example_weights(outer.outer_dict(), batch, None), expected[[4, 1, 2]] / 3)
    torch.testing.assert_close(outer.row_weights(outer.outer_dict(), batch, None), expected[[4, 1, 2]])
    logits = LOGITS.clone().requires_grad_(True)
    losses = torch.tensor([0.3, 2.0, 4.0], dtype=torch.float64)
    (outer.example_weights({"logits": logits}, batch, None) * losses).sum().backward()
    means = torch.stack([s[GROUPS[i] == GROUPS].mean() for i in range(len(LOGITS))])
    chain = torch.zeros_like(LOGITS)
    chain[[4, 1, 2]] = (s * (1 - s) / means)[[4, 1, 2]] * losses / 3
    torch.testing.assert_close(logits.grad, chain, rtol=1e-12, atol=1e-15)


def test_grouped_weights_ignore_a_shift_shared_by_a_whole_group():
    """Raising every logit of one group (what a meta set short of that answer asks for) leaves the softmax weights
    unchanged: a group's share of the loss is fixed, only the ranking within it is learned."""
    outer = grouped("softmax")
    before = outer.weights().clone()
    with torch.no_grad():
        outer.logits[GROUPS == 1] += 3.0
    torch.testing.assert_close(outer.weights(), before, rtol=1e-12, atol=0)
    ungrouped = weights_with("softmax", outer.logits.detach())
    assert not torch.allclose(ungrouped.weights(), before)


def test_groups_survive_save_and_load_and_bad_groups_are_refused(tmp_path):
    grouped().save_pretrained(tmp_path)
    loaded = OuterModule.from_pretrained(tmp_path)
    assert loaded.num_groups == 2 and loaded.groups.tolist() == GROUPS.tolist()
    torch.testing.assert_close(loaded.weights().double(), grouped().weights(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"Groups must lie in \[0, 2\) and each have a row; counts \[5, 0\]"):
        ExampleWeights(5, num_groups=2).set_groups([0] * 5)
    with pytest.raises(ValueError, match="one group per example"):
        ExampleWeights(5, num_groups=2).set_groups([0, 1])


def test_grouped_weights_whose_groups_were_never_set_are_refused(tmp_path):
    """Issue 36: ExampleWeights(num_groups=2) without set_groups put every row in group 0 and trained silently."""
    data = fact_data(num_facts=8, copies=2)[1]
    data = {**data, "meta": data["meta"].add_column("meta_group", [i % 2 for i in range(len(data["meta"]))])}
    common = dict(num_directions=2, per_device_train_batch_size=4, meta_batch_size=4, max_steps=1)
    with pytest.raises(ValueError, match=r"num_groups=2\) has \[16, 0\] rows per group: .*never set.*set_groups"):
        trainer_for(tmp_path / "unset", ExampleWeights(16, num_groups=2), data, **common)
    outer = ExampleWeights(16, num_groups=2)
    outer.set_groups([i % 2 for i in range(16)])
    trainer_for(tmp_path / "set", outer, data, **common)  # set: accepted
    ExampleWeights(16).check_groups()  # one group needs none


def test_recipe_balance_column_groups_the_rows_by_its_values():
    from datasets import Dataset

    train = Dataset.from_dict({"completion": [" no", " yes", " no", " yes", " yes"], "example_id": [4, 3, 2, 1, 0]})
    outer = make_outer(ScriptArguments(weight_parametrization="sigmoid", balance_column="completion"),
                       {"train": train}, model=None)  # fmt: skip
    assert outer.num_groups == 2 and outer.groups.tolist() == [1, 1, 0, 1, 0]  # by example_id; " no" < " yes"
    with pytest.raises(ValueError, match="some held by a single row"):
        make_outer(ScriptArguments(balance_column="example_id"), {"train": train}, model=None)
    with pytest.raises(ValueError, match="'answer' is not a column of the train data"):
        make_outer(ScriptArguments(balance_column="answer"), {"train": train}, model=None)
    with pytest.raises(ValueError, match="outer=example_weights only"):
        make_outer(ScriptArguments(outer="weight_net", balance_column="completion"), {"train": train}, model=None)


def test_recipe_balance_column_numbers_the_meta_rows_groups_as_the_train_rows():
    from datasets import Dataset, DatasetDict

    train = Dataset.from_dict({"completion": [" no", " yes", " no", " yes"]})
    meta = Dataset.from_dict({"completion": [" yes", " maybe", None, " no"]})
    args = ScriptArguments(balance_column="completion")
    grouped = with_meta_groups(args, DatasetDict(train=train, meta=meta), project_group_shift=True)
    assert grouped["meta"]["meta_group"] == [1, -1, -1, 0]  # a value no train row has, or none: -1
    unprojected = with_meta_groups(args, DatasetDict(train=train, meta=meta), project_group_shift=False)
    assert "meta_group" not in unprojected["meta"].column_names
    with pytest.raises(ValueError, match="'completion' is not a column of the meta data"):
        with_meta_groups(args, DatasetDict(train=train, meta=Dataset.from_dict({"text": ["a"]})), True)


def test_grouped_weights_project_the_group_shift_out_of_the_meta_gradient(tmp_path):
    """The trainer wires the projection in only for grouped weights: one step from the same seed moves the logits
    differently with and without it, ungrouped weights get the plain meta gradient, meta rows without their groups
    and fg2u_zo (no meta gradient) are refused."""
    plain_data = fact_data(num_facts=8, copies=2)[1]
    meta = plain_data["meta"]
    data = {**plain_data, "meta": meta.add_column("meta_group", [i % 2 for i in range(len(meta))])}
    common = dict(num_directions=2, per_device_train_batch_size=4, meta_batch_size=4, method="rgu", optim="sgd",
                  learning_rate=0.5, max_steps=1)  # fmt: skip

    def two_groups():
        outer = ExampleWeights(16, parametrization="sigmoid", num_groups=2)
        outer.set_groups([i % 2 for i in range(16)])
        return outer

    logits = {}
    for project in (True, False):
        trainer = trainer_for(tmp_path / str(project), two_groups(), data, project_group_shift=project, **common)
        trainer.train()
        logits[project] = trainer.outer.logits.detach()
    assert (logits[True] - logits[False]).abs().max() > 1e-4
    plain = trainer_for(tmp_path / "plain", ExampleWeights(16), data, **common)
    assert plain._meta_gradient(plain.model, "rgu") is None
    with pytest.raises(ValueError, match="needs a 'meta_group' column"):
        trainer_for(tmp_path / "no_meta_groups", two_groups(), plain_data, **common)
    with pytest.raises(ValueError, match="fg2u_zo never forms the meta gradient"):
        trainer_for(tmp_path / "zo", two_groups(), data, **{**common, "method": "fg2u_zo"})
