"""``rgu``/``trgu`` store the trajectory (θ_t, s_t), not the graph: against a graph-retaining reference unroll
in float64, for every inner optimizer, dropout with step seeds, every kind of outer variable, checkpointing of
segments, offloaded states, truncation and full-parameter inner variables."""

import pytest
import torch

from hf_fg2u.hypergrad import estimate_hypergradient
from hf_fg2u.hypergrad.inner_optimizers import make_inner_optimizer
from hf_fg2u.hypergrad.reference import graph_reverse_hypergradient
from hf_fg2u.hypergrad.unroll import run_inner_loop
from hf_fg2u.lm.losses import losses_to_problem, make_lm_losses
from hf_fg2u.lm.params import trainable_parameters
from hf_fg2u.outer import DomainWeights, ExampleWeights, SoftPrompt, WeightNet
from tests.helpers.tiny import Quadratic, gpt2, random_lm_batches

STEPS, BATCH, LR = 5, 4, 0.05
OPTIMIZERS = {
    "sgd": {},
    "sgd_weight_decay": {"weight_decay": 0.1},
    "momentum": {"beta": 0.9},
    "nesterov": {"beta": 0.9, "nesterov": True},
    "adam": {"betas": (0.9, 0.99)},
    "adamw": {"betas": (0.9, 0.99), "weight_decay": 0.1},
}


def outer_module(kind: str, hidden: int):
    if kind == "example_weights":
        return ExampleWeights(STEPS * BATCH)
    if kind == "domain_weights":
        return DomainWeights(["a", "b", "c"])
    if kind == "soft_prompt":
        return SoftPrompt(3, hidden)
    return WeightNet(hidden_size=4)


def with_domains(batches):
    for batch in batches:
        batch["domain_index"] = batch["example_id"] % 3
    return batches


def problem(model, kind):
    """(inner_loss, outer_loss, φ) of an outer module of ``kind``, φ moved off its init so every term counts."""
    outer = outer_module(kind, model.config.hidden_size if hasattr(model.config, "hidden_size") else 32)
    outer = outer.to(torch.float64)
    with torch.no_grad():
        for parameter in outer.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    losses = make_lm_losses(model, outer.prefix, second_order=True)
    inner_loss, outer_loss = losses_to_problem(losses, outer.example_weights)
    return inner_loss, outer_loss, outer.outer_dict()


def compare(model, kind="example_weights", optimizer="adam", **kwargs):
    torch.manual_seed(0)
    inner_loss, outer_loss, outer = problem(model, kind)
    batches, meta = random_lm_batches(STEPS, BATCH)
    batches = with_domains(batches)
    params = trainable_parameters(model)
    hyper = OPTIMIZERS[optimizer]
    name = optimizer.removesuffix("_weight_decay").replace("adamw", "adam").replace("nesterov", "momentum")
    inner = make_inner_optimizer(name, LR, **hyper)
    seeds = list(range(100, 100 + STEPS))
    reference, value, final = graph_reverse_hypergradient(
        inner_loss, outer_loss, inner, params, inner.init(params), outer, batches, meta, seeds
    )
    result = estimate_hypergradient(
        inner_loss, outer_loss, params, outer, batches, meta, method="rgu", inner_optimizer=inner, inner_lr=LR,
        step_seeds=seeds, **kwargs,
    )  # fmt: skip
    assert result.outer_loss == pytest.approx(value, rel=1e-12)
    for key in final:
        torch.testing.assert_close(result.params[key], final[key], rtol=0, atol=1e-12)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in reference.values()))
    assert float(norm) > 1e-6, "the reference is zero: the comparison would compare zeros"
    error = torch.sqrt(sum((result.grad[k] - reference[k]).pow(2).sum() for k in reference)) / norm
    return float(error)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_trajectory_rgu_equals_the_graph_reference_for_every_inner_optimizer(optimizer):
    assert compare(gpt2(), optimizer=optimizer) < 1e-10


@pytest.mark.parametrize("kind", ["domain_weights", "soft_prompt", "weight_net"])
def test_trajectory_rgu_equals_the_graph_reference_for_every_outer_module(kind):
    assert compare(gpt2(), kind=kind) < 1e-10


def test_dropout_masks_are_replayed_from_the_step_seeds():
    """With dropout on, the backward sweep recomputes each step under its seed: the same masks as the
    forward unroll, hence the same numbers as the graph that saw them once."""
    assert compare(gpt2(dropout=0.2)) < 1e-10


@pytest.mark.parametrize("checkpoint_every", [2, 3, 5, 7])
def test_checkpointed_segments_give_the_same_hypergradient(checkpoint_every):
    assert compare(gpt2(), checkpoint_every=checkpoint_every) < 1e-10


def test_offloaded_states_give_the_same_hypergradient():
    assert compare(gpt2(), offload_trajectory=True, checkpoint_every=2) < 1e-10


def test_full_parameter_inner_variables():
    """No adapter: every weight of the model is θ (fg2u's home ground); rgu is still exact."""
    assert compare(gpt2(lora=False), optimizer="adam") < 1e-10


def test_trgu_equals_the_reference_on_its_last_steps():
    """trgu with K steps = the graph reference started at θ_{T-K}, s_{T-K} (treated as constants)."""
    q = Quadratic()
    optimizer = make_inner_optimizer("momentum", 0.1, beta=0.5)
    batches, seeds, keep = [None] * 8, [None] * 8, 3
    start, state, _ = run_inner_loop(q.inner_loss, optimizer, q.params, optimizer.init(q.params), q.outer,
                                     batches[:5], seeds[:5])  # fmt: skip
    reference, _, _ = graph_reverse_hypergradient(
        q.inner_loss, q.outer_loss, optimizer, start, state, q.outer, batches[5:], None, seeds[5:]
    )
    result = estimate_hypergradient(q.inner_loss, q.outer_loss, q.params, q.outer, batches, None, method="trgu",
                                    inner_optimizer=optimizer, truncation=keep, checkpoint_every=2)  # fmt: skip
    torch.testing.assert_close(result.grad["phi"], reference["phi"], rtol=1e-12, atol=0)


def test_checkpoint_every_below_one_is_refused():
    q = Quadratic()
    with pytest.raises(ValueError, match="checkpoint_every=0 must be an integer >= 1"):
        estimate_hypergradient(q.inner_loss, q.outer_loss, q.params, q.outer, [None], None, method="rgu",
                               checkpoint_every=0)  # fmt: skip


@pytest.mark.parametrize("model", ["lora", "full", "dropout"])
def test_kept_step_graphs_give_the_reference(model):
    """keep_step_graphs skips the recomputation, not a term: exact for adapters, full parameters and dropout."""
    built = {"lora": gpt2(), "full": gpt2(lora=False), "dropout": gpt2(dropout=0.2)}[model]
    assert compare(built, keep_step_graphs=True) < 1e-10


def float32_dropout_hypergradient(**options):
    """The per-row weight hypergradient of a float32 GPT-2 with dropout, Adam inner steps and fixed step seeds:
    the setting in which two sweeps that run the same operations agree bit for bit."""
    torch.manual_seed(0)
    model = gpt2(dropout=0.1).to(torch.float32)
    inner_loss, outer_loss, outer = problem(model, "example_weights")
    outer = {k: v.to(torch.float32) for k, v in outer.items()}
    batches, meta = random_lm_batches(STEPS, BATCH)
    return estimate_hypergradient(
        inner_loss, outer_loss, trainable_parameters(model), outer, batches, meta, inner_optimizer="adam",
        inner_lr=LR, step_seeds=list(range(STEPS)), **options,
    )  # fmt: skip


def test_kept_step_graphs_are_bitwise_the_recomputed_ones():
    """The same operations on the same numbers: the two sweeps agree bit for bit (float32, trgu too)."""
    results = []
    for keep in (False, True):
        results.append(float32_dropout_hypergradient(method="trgu", truncation=3, keep_step_graphs=keep))
    recomputed, kept = results
    assert all(torch.equal(recomputed.grad[k], kept.grad[k]) for k in kept.grad)
    assert all(torch.equal(recomputed.params[k], kept.params[k]) for k in kept.params)
    assert recomputed.inner_losses == kept.inner_losses


@pytest.mark.parametrize("memory_saving", [{"checkpoint_every": 2}, {"offload_trajectory": True}])
def test_kept_step_graphs_refuse_the_memory_savers(memory_saving):
    q = Quadratic()
    with pytest.raises(ValueError, match="keep_step_graphs=True keeps every step's graph"):
        estimate_hypergradient(q.inner_loss, q.outer_loss, q.params, q.outer, [None], None, method="rgu",
                               keep_step_graphs=True, **memory_saving)  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [{"keep_step_graphs": True}, {"keep_step_graphs": False}, {"checkpoint_every": 2},
     {"method": "trgu", "truncation": 3}],
    ids=["kept_graphs", "recomputed", "checkpointed", "trgu"],
)  # fmt: skip
def test_first_step_pulled_back_through_phi_only_changes_no_bit(monkeypatch, options):
    """The first differentiated step's λ_θ is never read, so its pullback is taken with respect to φ alone (once
    per call); the hypergradient is the one the full (θ, φ) pullback gives, bit for bit (float32, dropout)."""
    from hf_fg2u.hypergrad import reverse

    pullback, phi_only = reverse._differentiable_gradient, []

    def counted(*args):
        phi_only.append(len(args) > 5 and not args[5])
        return pullback(*args)

    results = []
    for full in (True, False):
        monkeypatch.setattr(reverse, "_differentiable_gradient", (lambda *a: pullback(*a[:5])) if full else counted)
        results.append(float32_dropout_hypergradient(**{"method": "rgu", **options}))
    assert sum(phi_only) == 1  # the φ-only pullback ran, once
    assert all(torch.equal(results[0].grad[k], results[1].grad[k]) for k in results[0].grad)
