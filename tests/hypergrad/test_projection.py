"""project_out against a QR projector, and a projected meta gradient carried back exactly by every method."""

import pytest
import torch

from hf_fg2u.hypergrad import estimate_hypergradient
from hf_fg2u.hypergrad.projection import orthonormal_basis, project_out

STEPS, LR = 6, 0.1


def flat(tree):
    return torch.cat([tree[k].reshape(-1) for k in sorted(tree)])


def test_project_out_equals_the_orthogonal_projector():
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (3, 2), "b": (4,)}
    tree = {k: torch.randn(*s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    first, second = ({k: torch.randn(*s, generator=gen, dtype=torch.float64) for k, s in shapes.items()} for _ in "12")
    dependent = {k: 2 * first[k] - 3 * second[k] for k in shapes}
    zero = {k: torch.zeros(*s, dtype=torch.float64) for k, s in shapes.items()}
    directions = [first, zero, second, dependent]
    assert len(orthonormal_basis(directions)) == 2  # the zero and the dependent direction add nothing
    q, _ = torch.linalg.qr(torch.stack([flat(first), flat(second)], dim=1))
    expected = flat(tree) - q @ (q.T @ flat(tree))
    torch.testing.assert_close(flat(project_out(tree, directions)), expected, rtol=1e-12, atol=1e-12)
    assert project_out(tree, []) is tree


def test_project_out_keeps_a_bf16_tree_in_bf16_and_orthogonal():
    gen = torch.Generator().manual_seed(1)
    tree = {"w": torch.randn(256, generator=gen).to(torch.bfloat16)}
    direction = {"w": torch.randn(256, generator=gen).to(torch.bfloat16)}
    projected = project_out(tree, [direction])
    assert projected["w"].dtype == torch.bfloat16
    cosine = (
        flat(projected).float()
        @ flat(direction).float()
        / (flat(projected).float().norm() * flat(direction).float().norm())
    )
    assert abs(float(cosine)) < 2e-2  # bf16 rounding of the result, not of the float32 sums


@pytest.mark.parametrize("method, options", [("rgu", {}), ("fg2u", {"directions": "basis", "num_directions": 5}),
                                             ("trgu", {"truncation": STEPS})])  # fmt: skip
def test_a_projected_meta_gradient_is_carried_back_exactly(quadratic, method, options):
    """∇h' = (dθ_T/dφ)ᵀ P (θ_T − c) + d with P = I − uuᵀ: the closed form with the meta gradient projected."""
    gen = torch.Generator().manual_seed(2)
    unit = torch.randn(quadratic.A.shape[0], generator=gen, dtype=torch.float64)
    unit = unit / unit.norm()
    projector = torch.eye(unit.numel(), dtype=torch.float64) - torch.outer(unit, unit)
    plain = torch.func.grad_and_value(quadratic.outer_loss, argnums=(0, 1))

    def projected(params, outer, batch):
        (grad_params, grad_outer), value = plain(params, outer, batch)
        return (project_out(grad_params, [{"theta": unit}]), grad_outer), value

    result = estimate_hypergradient(
        quadratic.inner_loss, quadratic.outer_loss, quadratic.params, quadratic.outer, [None] * STEPS, None,
        method=method, inner_lr=LR, meta_gradient=projected, **options,
    )  # fmt: skip
    exact = quadratic.unrolled_sgd_gradient(STEPS, LR, meta_map=projector)
    torch.testing.assert_close(result.grad["phi"], exact, rtol=1e-9, atol=1e-12)
    assert (result.grad["phi"] - quadratic.unrolled_sgd_gradient(STEPS, LR)).norm() > 1e-3  # the projection mattered


def test_zeroth_order_refuses_a_meta_gradient_of_its_own(quadratic):
    with pytest.raises(ValueError, match="fg2u_zo never forms the meta gradient"):
        estimate_hypergradient(
            quadratic.inner_loss, quadratic.outer_loss, quadratic.params, quadratic.outer, [None] * 2, None,
            method="fg2u_zo", meta_gradient=torch.func.grad_and_value(quadratic.outer_loss, argnums=(0, 1)),
        )  # fmt: skip
