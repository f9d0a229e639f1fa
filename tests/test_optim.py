"""The pure inner optimizers reproduce torch.optim step for step."""

import pytest
import torch

from hf_fg2u.optim import make_inner_optimizer


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
