"""The pure inner optimizers reproduce torch.optim step for step."""

import pytest
import torch

from hf_fg2u.hypergrad.inner_optimizers import make_inner_optimizer


@pytest.mark.parametrize(
    "name, kwargs, reference",
    [
        ("sgd", {"weight_decay": 0.1}, lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=0.1)),
        ("momentum", {"beta": 0.8}, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8)),
        (
            "momentum",
            {"beta": 0.8, "nesterov": True},
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True),
        ),
        ("adam", {"eps_root": 0.0}, lambda p: torch.optim.Adam(p, lr=0.05)),
        ("adam", {"eps_root": 0.0, "weight_decay": 0.1}, lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1)),
    ],
)
def test_matches_torch_optim(name, kwargs, reference):
    torch.manual_seed(0)
    target = torch.randn(7, dtype=torch.float64)
    start = torch.randn(7, dtype=torch.float64)
    weight = torch.nn.Parameter(start.clone())
    torch_optimizer = reference([weight])
    optimizer = make_inner_optimizer(name, 0.05, **kwargs)
    params = {"w": start.clone()}
    state = optimizer.init(params)
    for _ in range(5):
        torch_optimizer.zero_grad()
        ((weight - target) ** 4).sum().backward()
        torch_optimizer.step()
        grads = {"w": 4 * (params["w"] - target) ** 3}
        params, state = optimizer.update(grads, state, params)
    torch.testing.assert_close(params["w"], weight.detach(), rtol=1e-12, atol=1e-12)


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="adam"):
        make_inner_optimizer("lion", 0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_adam_on_low_precision_theta_keeps_its_state_in_fp32(dtype):
    """bf16/fp16 θ: the counter and moments are fp32, so every one of 300 steps is the float64 step from the same
    θ and moments, rounded once to θ's dtype (before: bf16 gave NaN at the first step, as 0.999**1 rounded to 1,
    and the counter stopped at 256; fp16 gave -inf)."""
    torch.manual_seed(0)
    target = torch.randn(7, dtype=torch.float64)
    optimizer = make_inner_optimizer("adam", 1e-2)
    params = {"w": torch.randn(7, dtype=torch.float64).to(dtype)}
    state = optimizer.init(params)
    for _ in range(300):
        grads = {"w": (4 * (params["w"].double() - target).pow(3)).to(dtype)}
        moments = {name: {"w": state[name]["w"].double()} for name in ("exp_avg", "exp_avg_sq")}
        exact_state = {**moments, "step": state["step"].double()}
        exact, _ = optimizer.update({"w": grads["w"].double()}, exact_state, {"w": params["w"].double()})
        params, state = optimizer.update(grads, state, params)
        assert params["w"].dtype == dtype and state["exp_avg"]["w"].dtype == torch.float32
        # one rounding to θ's dtype: within one unit in the last place (2^-7 for bf16, 2^-10 for fp16, relative)
        ulp = exact["w"].abs() * (2.0**-7 if dtype == torch.bfloat16 else 2.0**-10)
        assert ((params["w"].double() - exact["w"]).abs() <= ulp + 1e-30).all()
    assert state["step"].item() == 300
