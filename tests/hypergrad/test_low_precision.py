"""bf16 as users run it (issue 24): a bf16 base model with fp32 LoRA (peft's default for a bf16 model), and a
full-parameter bf16 θ. Each method's hypergradient is compared with the same method on a float64 copy of the same
weights, batches, seeds and directions, so the error measured is the precision's alone. The tolerances are about
twice the relative errors measured here; the README quotes them."""

import copy

import pytest
import torch

from hf_fg2u.hypergrad import estimate_hypergradient
from hf_fg2u.lm.losses import losses_to_problem, make_lm_losses
from hf_fg2u.lm.params import trainable_parameters
from hf_fg2u.outer import ExampleWeights
from tests.helpers.tiny import gpt2, random_lm_batches, tiny_lm

STEPS, BATCH, LR = 3, 4, 0.05
# method -> (options, relative error allowed with a bf16 base and fp32 LoRA, with a full bf16 θ or None: refused)
METHODS = {
    "rgu": ({}, 0.03, 0.15),
    "trgu": ({"truncation": 2}, 0.03, 0.15),
    "fg2u": ({"num_directions": 8, "directions": "rademacher"}, 0.03, 0.15),
    "neumann": ({"implicit_steps": 5}, 0.03, 0.15),
    "cg": ({"implicit_steps": 5, "cg_damping": 1.0}, 0.03, 0.15),
    "hessian_free": ({}, 0.03, 0.15),
    "fg2u_zo": ({"num_directions": 8, "zo_epsilon": 1e-2}, 0.3, None),
}


def lowered(reference: torch.nn.Module, full: bool) -> torch.nn.Module:
    """The float64 model's weights rounded to bf16: every weight (full), or all but LoRA's, kept in fp32."""
    model = copy.deepcopy(reference)
    for name, parameter in model.named_parameters():
        dtype = torch.float32 if "lora_" in name and not full else torch.bfloat16
        parameter.data = parameter.data.to(dtype)
    return model


def hypergradient(model, method, options, full):
    torch.manual_seed(0)
    outer_module = ExampleWeights(STEPS * BATCH).to(torch.float64)
    with torch.no_grad():
        outer_module.logits.normal_(0.0, 0.5)
    first = next(p for p in model.parameters() if p.requires_grad)
    outer = {k: v.to(torch.float32 if first.dtype != torch.float64 else torch.float64)
             for k, v in outer_module.outer_dict().items()}  # fmt: skip
    losses = make_lm_losses(model, None, second_order=True)
    inner_loss, outer_loss = losses_to_problem(losses, outer_module.example_weights)
    batches, meta = random_lm_batches(STEPS, BATCH)
    result = estimate_hypergradient(
        inner_loss, outer_loss, trainable_parameters(model), outer, batches, meta, method=method,
        inner_optimizer="adam" if method in ("rgu", "trgu", "fg2u", "fg2u_zo") else "sgd", inner_lr=LR,
        step_seeds=list(range(STEPS)), seed=0, **options,
    )  # fmt: skip
    return {k: v.double() for k, v in result.grad.items()}


def relative_error(low, reference) -> float:
    norm = torch.sqrt(sum(g.pow(2).sum() for g in reference.values()))
    assert float(norm) > 1e-6, "the reference is zero"
    return float(torch.sqrt(sum((low[k] - reference[k]).pow(2).sum() for k in reference)) / norm)


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_base_with_fp32_lora_is_close_to_float64(method):
    options, allowed, _ = METHODS[method]
    reference = tiny_lm("llama", dtype=torch.float64)
    error = relative_error(
        hypergradient(lowered(reference, full=False), method, options, False),
        hypergradient(reference, method, options, False),
    )
    assert error < allowed, f"{method}: relative error {error:.3g} with a bf16 base, allowed {allowed}"


@pytest.mark.parametrize("method", [m for m, (_, _, full) in METHODS.items() if full is not None])
def test_full_parameter_bf16_theta_is_close_to_float64(method):
    options, _, allowed = METHODS[method]
    reference = gpt2(lora=False)
    error = relative_error(
        hypergradient(lowered(reference, full=True), method, options, True),
        hypergradient(reference, method, options, True),
    )
    assert error < allowed, f"{method}: relative error {error:.3g} with a bf16 θ, allowed {allowed}"
