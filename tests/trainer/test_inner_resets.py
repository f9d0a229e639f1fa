"""Inner warm-up, resets back to it (every k steps, or when the meta loss stalls), the normalized outer step."""

import math

import pytest
import torch

import hf_fg2u.trainer.bilevel as trainer_module
import hf_fg2u.trainer.inner_state as inner_state_module
from hf_fg2u import BilevelConfig, ExampleWeights
from hf_fg2u.lm.params import trainable_parameters
from hf_fg2u.trainer.inner_resets import ResetPolicy
from tests.helpers.tiny import fact_data, trainer_for

FAST = dict(num_directions=2, per_device_train_batch_size=4, meta_batch_size=4, logging_steps=1, method="rgu")


@pytest.fixture(scope="module")
def data():
    return fact_data(num_facts=8, copies=2)[1]


def recording_estimate(monkeypatch):
    """Record θ at the start of every unroll and the meta loss after it."""
    real, calls = trainer_module.estimate_hypergradient, []

    def estimate(inner_loss, outer_loss, params, *args, **kwargs):
        result = real(inner_loss, outer_loss, params, *args, **kwargs)
        calls.append(({k: v.clone() for k, v in params.items()}, result.outer_loss))
        return result

    monkeypatch.setattr(trainer_module, "estimate_hypergradient", estimate)
    return calls


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_reset_policy_periodic_and_on_a_stalled_meta_loss():
    def resets(policy, meta_losses):
        steps = []
        for step, loss in enumerate(meta_losses):
            if policy.due():
                policy.restarted()
                steps.append(step)
            policy.observe(loss)
        return steps

    assert resets(ResetPolicy(every=3), [1.0] * 7) == [3, 6]
    # 4.5 and 4.2 do not beat 4.0: reset before step 4; then 3.9 is the cycle's best, 4.0 and 4.1 do not beat it.
    assert resets(ResetPolicy(patience=2), [5.0, 4.0, 4.5, 4.2, 3.9, 4.0, 4.1, 9.0]) == [4, 7]
    # Both: a cycle ends when the meta loss stalls, and lasts at most `every` steps.
    assert resets(ResetPolicy(every=3, patience=2), [5.0, 4.0, 3.0, 2.0, 2.5, 2.6, 1.0]) == [3, 6]
    policy = ResetPolicy(every=3, patience=2)
    resets(policy, [5.0, 4.0, 4.5])
    restored = ResetPolicy(every=3, patience=2)
    restored.load_state_dict(policy.state_dict())
    assert restored == policy


def test_warm_up_trains_theta_before_the_first_outer_step_and_resets_return_there(tmp_path, data, monkeypatch):
    calls = recording_estimate(monkeypatch)
    trainer = trainer_for(
        tmp_path, ExampleWeights(16), data, max_steps=4, inner_warmup_steps=3, inner_reset_every=2,
        inner_optimizer="adam", **FAST,
    )  # fmt: skip
    base = trainable_parameters(trainer.model)
    trainer.train()
    start = trainer._initial_params
    assert not same(start, base)  # the warm-up trained θ
    assert trainer._initial_state["step"].item() == 3  # three Adam steps
    starts = [params for params, _ in calls]
    assert same(starts[0], start) and same(starts[2], start)  # step 0, and the reset before step 2
    assert not same(starts[1], start) and not same(starts[3], start)  # warm-started from the previous unroll
    assert math.isfinite(trainer.state.log_history[0]["warmup_inner_loss"])  # logged with the first step


def test_warm_up_trains_on_the_rows_the_first_outer_steps_do_not_score(tmp_path, data, monkeypatch):
    """Issue 22 item 4: the warm-up takes the last batches of the first epoch's order, not the first outer steps'."""
    scored, warmed = [], []
    real_estimate, real_inner_loop = trainer_module.estimate_hypergradient, inner_state_module.run_inner_loop

    def ids(batches):
        return {int(i) for batch in batches for i in batch["example_id"]}

    def estimate(inner_loss, outer_loss, params, outer, inner_batches, *args, **kwargs):
        scored.append(ids(inner_batches))
        return real_estimate(inner_loss, outer_loss, params, outer, inner_batches, *args, **kwargs)

    def inner_loop(inner_loss, optimizer, params, state, outer, batches, *args, **kwargs):
        warmed.append(ids(batches))
        return real_inner_loop(inner_loss, optimizer, params, state, outer, batches, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "estimate_hypergradient", estimate)
    monkeypatch.setattr(inner_state_module, "run_inner_loop", inner_loop)
    trainer = trainer_for(tmp_path, ExampleWeights(16), data, max_steps=2, inner_warmup_steps=2, **FAST)
    trainer.train()  # 16 rows = two unrolls of 2 x 4 rows: the warm-up's 8 rows are outer step 1's
    assert len(warmed) == 1 and len(warmed[0]) == 8
    assert warmed[0].isdisjoint(scored[0]) and warmed[0] == scored[1]


def test_no_warm_up_starts_at_the_model_and_never_resets_by_default(tmp_path, data, monkeypatch):
    calls = recording_estimate(monkeypatch)
    trainer = trainer_for(tmp_path, ExampleWeights(16), data, max_steps=3, **FAST)
    base = trainable_parameters(trainer.model)
    trainer.train()
    assert same(calls[0][0], base) and trainer._initial_state is None
    assert not any(same(params, base) for params, _ in calls[1:])
    assert "inner_resets" not in {key for log in trainer.state.log_history for key in log}


def test_a_stalled_meta_loss_resets_theta(tmp_path, data, monkeypatch):
    """inner_lr so large that the meta loss stops improving: every reset the policy calls for happens, and only
    those (replayed from the recorded meta losses)."""
    calls = recording_estimate(monkeypatch)
    trainer = trainer_for(tmp_path, ExampleWeights(16), data, max_steps=8, inner_reset_patience=1, inner_lr=0.3, **FAST)
    trainer.train()
    replay, expected = ResetPolicy(patience=1), []
    for _, meta_loss in calls:
        expected.append(replay.due())
        if expected[-1]:
            replay.restarted()
        replay.observe(meta_loss)
    assert 1 <= sum(expected) < len(calls)
    for step, (params, _) in enumerate(calls):
        assert same(params, trainer._initial_params) == (step == 0 or expected[step]), step
    assert sum(log.get("inner_resets", 0) for log in trainer.state.log_history) == sum(expected)


def test_resume_continues_exactly_through_warm_up_and_resets(tmp_path, data):
    common = dict(
        FAST, max_steps=6, save_strategy="steps", save_steps=3, inner_warmup_steps=2, inner_reset_patience=1,
        inner_lr=0.3, inner_optimizer="adam",
    )  # fmt: skip
    straight = trainer_for(tmp_path / "straight", ExampleWeights(16), data, **common)
    straight.train()
    assert sum(log.get("inner_resets", 0) for log in straight.state.log_history) >= 1
    first = trainer_for(tmp_path / "resumed", ExampleWeights(16), data, **{**common, "max_steps": 3})
    first.train()
    second = trainer_for(tmp_path / "resumed", ExampleWeights(16), data, **common)
    second.train(resume_from_checkpoint=str(tmp_path / "resumed" / "run" / "checkpoint-3"))
    assert torch.equal(second.outer.logits, straight.outer.logits)  # bitwise: the README says "exactly"
    assert all(torch.equal(value, straight._inner_params[name]) for name, value in second._inner_params.items())
    assert all(torch.equal(value, straight._initial_params[name]) for name, value in second._initial_params.items())


def test_normalized_hypergradient_moves_phi_by_the_learning_rate(tmp_path, data):
    trainer = trainer_for(
        tmp_path, ExampleWeights(16), data, max_steps=1, optim="sgd", learning_rate=0.3,
        normalize_hypergradient=True, **FAST,
    )  # fmt: skip
    before = trainer.outer.logits.detach().clone()
    trainer.train()
    step = trainer.outer.logits.detach() - before
    assert step.norm().item() == pytest.approx(0.3, rel=1e-5)
    assert trainer.state.log_history[0]["hypergrad_norm"] != pytest.approx(1.0)  # the raw one was not unit


@pytest.mark.parametrize("name", ["inner_reset_patience", "inner_warmup_steps"])
def test_negative_counts_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match=f"{name}=-1 must be >= 0"):
        BilevelConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **{name: -1})
