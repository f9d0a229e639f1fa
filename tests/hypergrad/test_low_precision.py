"""bf16 as users run it (issue 24): a bf16 base model with fp32 LoRA (peft's default on a bf16 model), and a
full-parameter bf16 θ. Each method's hypergradient against the same method on the float64 weights, the same
batches, seeds and directions, so the difference is the precision's alone (docs/low_precision.md has every cell,
from scripts/check_low_precision.py). The bounds are about twice the errors measured there, for the settings the
README recommends on a bf16 model: SGD/momentum, or Adam with inner_eps >= 1e-4."""

import copy
import warnings

import pytest
import torch

from hf_fg2u.hypergrad import estimate_hypergradient
from hf_fg2u.lm.losses import losses_to_problem, make_lm_losses
from hf_fg2u.lm.params import trainable_parameters
from hf_fg2u.outer import ExampleWeights
from tests.helpers.tiny import config, gpt2, lora, random_lm_batches, tiny_llama, tiny_lm

STEPS, BATCH, LR = 3, 4, 0.05
OPTIONS = {
    "rgu": {},
    "trgu": {"truncation": 2},
    "fg2u": {"num_directions": 8, "directions": "rademacher"},
    "neumann": {"implicit_steps": 5},
    "cg": {"implicit_steps": 5, "cg_damping": 1.0},
    "hessian_free": {},
    "fg2u_zo": {"num_directions": 8, "zo_epsilon": 1e-2},
}
SGD, ADAM = ("sgd", {}), ("adam", {"eps": 1e-4})
# (method, inner optimizer, full-parameter θ) -> (relative error allowed, cosine required)
BOUNDS = {
    **{(m, "sgd", full): (0.03, 0.999) for m in ("rgu", "trgu", "fg2u", "neumann", "cg") for full in (False, True)},
    **{(m, "adam", False): (0.25, 0.98) for m in ("rgu", "trgu", "fg2u")},
    **{(m, "adam", True): (0.2, 0.99) for m in ("rgu", "trgu", "fg2u")},
    ("hessian_free", "sgd", False): (0.3, 0.97),  # finite differences on a bf16 base
    ("fg2u_zo", "adam", False): (1.2, 0.9),  # finite differences of h: the direction holds, not the scale
    ("fg2u_zo", "adam", True): (0.5, 0.95),
}


def lowered(reference: torch.nn.Module, full: bool) -> torch.nn.Module:
    """The float64 model's weights rounded to bf16: every weight (full), or all but LoRA's (kept in fp32)."""
    model = copy.deepcopy(reference)
    for name, parameter in model.named_parameters():
        parameter.data = parameter.data.to(torch.float32 if "lora_" in name and not full else torch.bfloat16)
    return model


def hypergradient(model, method: str, optimizer: tuple[str, dict]) -> torch.Tensor:
    torch.manual_seed(0)
    weights = ExampleWeights(STEPS * BATCH).to(torch.float64)
    with torch.no_grad():
        weights.logits.normal_(0.0, 0.5)
    theta = next(p for p in model.parameters() if p.requires_grad)
    outer = {k: v.to(torch.float64 if theta.dtype == torch.float64 else torch.float32)
             for k, v in weights.outer_dict().items()}  # fmt: skip
    inner_loss, outer_loss = losses_to_problem(make_lm_losses(model, None, second_order=True), weights.example_weights)
    batches, meta = random_lm_batches(STEPS, BATCH)
    result = estimate_hypergradient(
        inner_loss, outer_loss, trainable_parameters(model), outer, batches, meta, method=method,
        inner_optimizer=optimizer[0], inner_lr=LR, inner_optimizer_kwargs=optimizer[1],
        step_seeds=list(range(STEPS)), seed=0, **OPTIONS[method],
    )  # fmt: skip
    return result.grad["logits"].double()


@pytest.mark.parametrize(("method", "optimizer", "full"), list(BOUNDS), ids=lambda v: str(v))
def test_bf16_hypergradients_stay_close_to_float64(method, optimizer, full):
    allowed, cosine_needed = BOUNDS[method, optimizer, full]
    reference_model = gpt2(lora=False) if full else tiny_lm("llama", dtype=torch.float64)
    inner = SGD if optimizer == "sgd" else ADAM
    reference = hypergradient(reference_model, method, inner)
    low = hypergradient(lowered(reference_model, full), method, inner)
    error = float((low - reference).norm() / reference.norm())
    cosine = float(torch.nn.functional.cosine_similarity(low, reference, dim=0))
    assert error < allowed and cosine > cosine_needed, f"relative error {error:.3g}, cosine {cosine:.4f}"


def test_adam_with_a_small_eps_on_a_bf16_model_is_warned_about(tmp_path):
    """At inner_eps=1e-8 the rgu hypergradient of a bf16 base had cosine 0.33 to float64's."""
    from hf_fg2u import BilevelTrainer, ExampleWeights
    from tests.helpers.tiny import TOKENIZER, fact_data

    _, data = fact_data(num_facts=4, copies=4)

    def build(**overrides):
        return BilevelTrainer(
            tiny_llama().to(torch.bfloat16), config(tmp_path, max_steps=1, use_cpu=True, **overrides),
            train_dataset=data["train"], meta_dataset=data["meta"], outer=ExampleWeights(len(data["train"])),
            peft_config=lora(), processing_class=TOKENIZER,
        )  # fmt: skip

    with pytest.warns(UserWarning, match=r"computes in torch.bfloat16 .*inner_eps=1e-08: .* Set inner_eps=0.0001"):
        build(inner_optimizer="adam")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*inner optimizer is Adam with inner_eps")
        build(inner_optimizer="adam", inner_eps=1e-4, overwrite_output_dir=True)
