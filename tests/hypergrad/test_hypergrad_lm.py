"""Hypergradients through tiny Hugging Face causal LMs with peft LoRA, per-example weights as φ."""

import pytest
import torch

from hf_fg2u.hypergrad import estimate_hypergradient, needs_second_order
from hf_fg2u.lm.losses import batch_softmax_weights, make_lm_problem
from hf_fg2u.lm.params import load_parameters, trainable_parameters
from tests.helpers.tiny import random_lm_batches, tiny_lm

STEPS, BATCH, LR = 3, 4, 0.5
NUM_EXAMPLES = STEPS * BATCH


def lm_estimate(model, method, batches, meta, dtype=torch.float32, **kwargs):
    inner_loss, outer_loss = make_lm_problem(model, batch_softmax_weights(), second_order=True)
    outer = {"example_logits": torch.linspace(-0.5, 0.5, NUM_EXAMPLES, dtype=dtype)}
    return estimate_hypergradient(
        inner_loss, outer_loss, trainable_parameters(model), outer, batches, meta, method=method, inner_lr=LR,
        **kwargs,
    )  # fmt: skip


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fg2u_basis_equals_rgu_in_float32(arch, attn):
    model = tiny_lm(arch, attn)
    batches, meta = random_lm_batches(STEPS, BATCH)
    reference = lm_estimate(model, "rgu", batches, meta).grad["example_logits"]
    assert float(reference.norm()) > 1e-4
    basis = {"directions": "basis", "num_directions": NUM_EXAMPLES}
    for jvp, tolerance in [("forward", 1e-5), ("double_backward", 1e-5), ("finite_difference", 1e-2)]:
        result = lm_estimate(model, "fg2u", batches, meta, jvp=jvp, **basis)
        assert relative_error(result.grad["example_logits"], reference) < tolerance, jvp


@pytest.mark.parametrize("jvp", ["forward", "double_backward"])
def test_fg2u_basis_equals_rgu_in_float64_on_gpt2(jvp):
    model = tiny_lm("gpt2", "eager", dtype=torch.float64)
    batches, meta = random_lm_batches(STEPS, BATCH)
    reference = lm_estimate(model, "rgu", batches, meta, dtype=torch.float64).grad["example_logits"]
    result = lm_estimate(
        model, "fg2u", batches, meta, dtype=torch.float64, jvp=jvp, directions="basis", num_directions=NUM_EXAMPLES
    )
    assert relative_error(result.grad["example_logits"], reference) < 1e-8


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_extra_right_padding_changes_nothing(attn):
    """The same examples padded to their own length and padded 5 tokens further give the same hypergradient."""
    model = tiny_lm("llama", attn)
    batches, meta = random_lm_batches(STEPS, BATCH)
    for batch in batches:  # ragged lengths: example i keeps 10 - i tokens
        for i in range(BATCH):
            batch["attention_mask"][i, 10 - i :] = 0
    padded = []
    for batch in batches:
        extra = torch.zeros(BATCH, 5, dtype=torch.long)
        padded.append(
            {
                "input_ids": torch.cat([batch["input_ids"], extra + 3], 1),
                "attention_mask": torch.cat([batch["attention_mask"], extra], 1),
                "example_id": batch["example_id"],
            }
        )
    kwargs = {"directions": "basis", "num_directions": NUM_EXAMPLES}
    short = lm_estimate(model, "fg2u", batches, meta, **kwargs)
    long = lm_estimate(model, "fg2u", padded, meta, **kwargs)
    assert relative_error(long.grad["example_logits"], short.grad["example_logits"]) < 1e-5
    assert long.outer_loss == pytest.approx(short.outer_loss, rel=1e-6)


def test_final_params_write_back_into_the_model():
    model = tiny_lm("llama")
    batches, meta = random_lm_batches(STEPS, BATCH)
    result = lm_estimate(model, "fg2u", batches, meta, num_directions=2)
    load_parameters(model, result.params)
    for name, value in trainable_parameters(model).items():
        assert torch.equal(value, result.params[name])
    _, outer_loss = make_lm_problem(model)
    assert float(outer_loss(trainable_parameters(model), {}, meta)) == pytest.approx(result.outer_loss, rel=1e-6)


def test_hessian_free_equals_rgu_for_one_sgd_step():
    model = tiny_lm("llama")
    batches, meta = random_lm_batches(1, BATCH)
    reference = lm_estimate(model, "rgu", batches, meta).grad["example_logits"]
    estimate = lm_estimate(model, "hessian_free", batches, meta).grad["example_logits"]
    assert relative_error(estimate[:BATCH], reference[:BATCH]) < 1e-2
    assert not needs_second_order("hessian_free", "forward") and needs_second_order("rgu", "finite_difference")


def test_cg_matches_a_dense_implicit_gradient_on_an_lm():
    """Against ∇_φf − H_φθ (H_θθ + λI)⁻¹ ∇_θf built from dense Hessians of the mean inner loss at θ_T."""
    model = tiny_lm("gpt2", dtype=torch.float64)
    batches, meta = random_lm_batches(2, BATCH)
    inner_loss, outer_loss = make_lm_problem(model, batch_softmax_weights())
    params = trainable_parameters(model)
    outer = {"example_logits": torch.zeros(2 * BATCH, dtype=torch.float64)}
    result = estimate_hypergradient(
        inner_loss, outer_loss, params, outer, batches, meta, method="rgu", inner_lr=LR
    )  # θ_T of the unroll
    names = list(result.params)
    flat = torch.cat([result.params[n].reshape(-1) for n in names])

    def unflatten(vector):
        out, start = {}, 0
        for n in names:
            size = result.params[n].numel()
            out[n] = vector[start : start + size].reshape(result.params[n].shape)
            start += size
        return out

    def mean_inner(vector, logits):
        return sum(inner_loss(unflatten(vector), {"example_logits": logits}, b) for b in batches) / len(batches)

    hessian = torch.func.hessian(mean_inner, argnums=0)(flat, outer["example_logits"])
    mixed = torch.func.jacrev(torch.func.grad(mean_inner, argnums=0), argnums=1)(flat, outer["example_logits"])
    damping = max(0.0, -float(torch.linalg.eigvalsh(hessian)[0])) + 1.0
    meta_grad = torch.func.grad(lambda v: outer_loss(unflatten(v), outer, meta))(flat)
    dense = -mixed.T @ torch.linalg.solve(hessian + damping * torch.eye(len(flat), dtype=flat.dtype), meta_grad)
    cg = estimate_hypergradient(
        inner_loss, outer_loss, params, outer, batches, meta, method="cg", inner_lr=LR, implicit_steps=200,
        cg_damping=damping,
    )  # fmt: skip
    assert relative_error(cg.grad["example_logits"], dense) < 1e-6
    neumann = estimate_hypergradient(
        inner_loss, outer_loss, params, outer, batches, meta, method="neumann", inner_lr=LR, implicit_steps=3
    )
    assert torch.isfinite(neumann.grad["example_logits"]).all()
