"""Direction sampling: E[v vᵀ] = I, exact basis, orthogonality, and the outer-space round trip."""

import pytest
import torch

from hf_fg2u.hypergrad.directions import OuterSpace, sample_directions


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "orthogonal"])
def test_second_moment_is_identity(kind):
    matrix, scale = sample_directions(kind, 20_000, 6, seed=3, dtype=torch.float64)
    second_moment = matrix.T @ matrix / matrix.shape[0]
    assert scale == pytest.approx(1 / 20_000)
    torch.testing.assert_close(second_moment, torch.eye(6, dtype=torch.float64), atol=0.05, rtol=0)


def test_orthogonal_rows_are_orthogonal_within_a_block():
    matrix, _ = sample_directions("orthogonal", 5, 8, seed=0, dtype=torch.float64)
    torch.testing.assert_close(matrix @ matrix.T, 8 * torch.eye(5, dtype=torch.float64), atol=1e-10, rtol=0)


def test_basis_with_all_coordinates_is_a_permuted_identity():
    matrix, scale = sample_directions("basis", 6, 6, seed=0, dtype=torch.float64)
    assert scale == 1.0
    torch.testing.assert_close(matrix.T @ matrix, torch.eye(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_directions"):
        sample_directions("basis", 7, 6, seed=0)


def test_same_seed_same_directions_and_unknown_kind():
    first, _ = sample_directions("rademacher", 4, 9, seed=11)
    second, _ = sample_directions("rademacher", 4, 9, seed=11)
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="rademacher"):
        sample_directions("sobol", 4, 9, seed=0)


def test_outer_space_round_trip_touches_only_active_coordinates():
    outer = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    active = {"a": torch.tensor([[True, False, True], [False, False, True]])}
    space = OuterSpace(outer, active)
    assert space.size == 3 + 4
    flat = torch.arange(1.0, 8.0)
    scattered = space.to_dict(flat, outer)
    assert scattered["a"].tolist() == [[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]]
    assert scattered["b"].tolist() == [4.0, 5.0, 6.0, 7.0]
    assert torch.equal(space.to_flat(scattered), flat)
    with pytest.raises(ValueError, match="not keys"):
        OuterSpace(outer, {"c": None})
