"""DataRater: weights from a row's features (its log loss, its group), learned by the bilevel loop, saved and loaded
bit for bit, applied to rows it never saw."""

import math

import pytest
import torch
from datasets import Dataset, DatasetDict

from hf_fg2u.lm.evaluation import auroc
from hf_fg2u.outer import DataRater, OuterModule
from tests.helpers.tiny import fact_data, trainer_for

pytestmark = pytest.mark.usefixtures("one_thread")


def set_rule(rater, slope, bias, group_biases=()):
    with torch.no_grad():
        rater.net[0].weight.copy_(torch.tensor([[slope, *group_biases]]))
        rater.net[0].bias.fill_(bias)


def test_starts_uniform_and_is_a_logistic_rule_on_the_log_loss_per_group():
    rater = DataRater(group_column="completion", groups=[" no", " yes"])
    losses = torch.tensor([0.01, 0.5, 2.0, 3.0])
    batch = {rater.group_index_column: torch.tensor([0, 1, 0, 1])}
    torch.testing.assert_close(rater.example_weights(rater.outer_dict(), batch, losses), torch.full((4,), 0.25))
    set_rule(rater, slope=-2.0, bias=0.5, group_biases=(0.3, -0.7))
    expected = [
        1 / (1 + math.exp(-(-2.0 * math.log(loss + 1e-4) + 0.5 + (0.3 if group == 0 else -0.7))))
        for loss, group in zip(losses.tolist(), [0, 1, 0, 1], strict=True)
    ]
    keep = rater.row_weights(rater.outer_dict(), batch, losses)
    torch.testing.assert_close(keep, torch.tensor(expected), rtol=1e-6, atol=0)
    weights = rater.example_weights(rater.outer_dict(), batch, losses)
    torch.testing.assert_close(weights, keep / keep.sum())
    assert rater.summary() == {"rater_loss_slope": -2.0, "rater_bias": 0.5}


def test_save_and_load_round_trip_bit_for_bit(tmp_path):
    rater = DataRater(
        hidden_size=4, group_column="completion", groups=[" a", " b", " c"], row_format="prompt_completion"
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in rater.parameters():
            parameter.normal_()
    rater.save_pretrained(tmp_path)
    loaded = OuterModule.from_pretrained(tmp_path)
    assert isinstance(loaded, DataRater) and loaded.config == rater.config
    for name, value in rater.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    batch, losses = {rater.group_index_column: torch.tensor([0, 2, 1])}, torch.tensor([0.2, 1.0, 4.0])
    assert torch.equal(loaded.row_weights(loaded.outer_dict(), batch, losses),
                       rater.row_weights(rater.outer_dict(), batch, losses))  # fmt: skip


def test_fit_recovers_the_logistic_rule_that_made_the_targets():
    rater = DataRater(group_column="completion", groups=[" no", " yes"])
    generator = torch.Generator().manual_seed(0)
    losses = torch.rand(400, generator=generator) * 3 + 0.01
    groups = torch.randint(0, 2, (400,), generator=generator)
    true = DataRater(group_column="completion", groups=[" no", " yes"])
    set_rule(true, slope=-3.0, bias=0.2, group_biases=(0.5, -0.5))
    targets = true.row_weights(true.outer_dict(), {true.group_index_column: groups}, losses)
    cross_entropy = rater.fit_(losses, targets, groups)
    fitted = rater.row_weights(rater.outer_dict(), {rater.group_index_column: groups}, losses)
    torch.testing.assert_close(fitted, targets, atol=1e-3, rtol=0)  # the same rule (its bias split differently)
    assert rater.summary()["rater_loss_slope"] == pytest.approx(-3.0, abs=1e-2)
    entropy = torch.nn.functional.binary_cross_entropy(targets, targets)  # the least cross-entropy possible
    assert cross_entropy == pytest.approx(float(entropy), abs=1e-4)


def test_rows_of_a_group_the_rater_never_saw_are_refused():
    rater = DataRater(group_column="completion", groups=[" no", " yes"])
    rows = Dataset.from_list([{"prompt": "a", "completion": " yes"}, {"prompt": "b", "completion": " maybe"}])
    with pytest.raises(ValueError, match=r"values \[' maybe'\] that the rater has no group for.*' no', ' yes'"):
        rater.prepare_dataset(rows, "scored")
    numbered = rater.prepare_dataset(rows.select([0]), "scored")
    assert numbered[rater.group_index_column] == [1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"hidden_size": -1}, "hidden_size >= 0"), ({"group_column": "c"}, "together"),
     ({"group_column": "c", "groups": ["x"]}, "at least two distinct"), ({"loss_floor": 0.0}, "loss_floor > 0")],
)  # fmt: skip
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataRater(**kwargs)


def test_the_bilevel_loop_teaches_it_to_down_weight_wrong_rows_it_never_saw(tmp_path):
    """Trained on half the rows of the toy facts (40% wrong answers), the rater separates the wrong rows of the other
    half, rows no unroll reached: it reads their losses under the adapter trained alongside it, never their ids."""
    _, data = fact_data(copies=16)
    order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(0)).tolist()
    seen, unseen = data["train"].select(order[:64]), data["train"].select(order[64:])
    trainer = trainer_for(tmp_path, DataRater(), DatasetDict({**data, "train": seen}), method="rgu", max_steps=24,
                          learning_rate=0.3, optim="sgd", normalize_hypergradient=True, inner_optimizer="adam",
                          inner_lr=1e-2)  # fmt: skip
    trainer.train()
    assert trainer.outer.summary()["rater_loss_slope"] < -1.0  # a higher loss, a lower weight (seed 0: -2.5)
    weights = trainer.dataset_weights(unseen)
    assert auroc(-weights.double(), torch.tensor(unseen["is_corrupted"])) > 0.95  # seed 0: 1.0


def test_fitted_to_the_weights_the_loop_learned_it_weighs_rows_it_never_saw(tmp_path):
    """The recipe's way: per-row keep-probabilities learned by the online loop on half the rows, the rater fitted to
    them from each row's loss; it then separates the wrong rows of the other half, and becomes the run's outer
    module (its export is the rater's)."""
    from hf_fg2u import ExampleWeights
    from hf_fg2u.trainer.rater_fit import fit_rater

    _, data = fact_data(copies=16)
    order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(0)).tolist()
    seen, unseen = data["train"].select(order[:64]), data["train"].select(order[64:])
    seen = seen.map(lambda _, i: {"example_id": i}, with_indices=True)
    weights = ExampleWeights(64, parametrization="sigmoid")
    trainer = trainer_for(tmp_path, weights, DatasetDict({**data, "train": seen}), method="rgu", max_steps=24,
                          learning_rate=4.0, optim="sgd", normalize_hypergradient=True, inner_optimizer="adam",
                          inner_lr=1e-2)  # fmt: skip
    trainer.train()
    with torch.no_grad():
        weights.scored[:3] = False  # rows no unroll reached are left out of the fit
        weights.logits[:3] = 50.0
    found = fit_rater(trainer, DataRater())
    assert trainer.outer is not weights and isinstance(trainer.outer, DataRater)
    assert found["rater_fit_rows"] == 61 and found["rater_loss_slope"] < 0
    separation = auroc(-trainer.dataset_weights(unseen).double(), torch.tensor(unseen["is_corrupted"]))
    assert separation > 0.95, separation  # seed 0: 1.0
    with pytest.raises(ValueError, match="outer=example_weights with weight_parametrization=sigmoid"):
        fit_rater(trainer, DataRater())
