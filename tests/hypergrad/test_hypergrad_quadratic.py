"""Every method against an exact reference on a closed-form bilevel quadratic, in float64."""

import warnings

import pytest
import torch

from hf_fg2u.hypergrad import NonFiniteHypergradientError, estimate_hypergradient
from hf_fg2u.hypergrad.inner_optimizers import make_inner_optimizer
from hf_fg2u.hypergrad.methods import make_method
from tests.helpers.tiny import Quadratic

STEPS, LR = 12, 0.1


def estimate(problem, method, steps=STEPS, **kwargs):
    kwargs.setdefault("inner_lr", LR)
    return estimate_hypergradient(
        problem.inner_loss, problem.outer_loss, problem.params, problem.outer, [None] * steps, None, method=method,
        **kwargs,
    )  # fmt: skip


def relative_error(estimate_, exact):
    return float((estimate_ - exact).norm() / exact.norm())


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("rgu", {}),
        ("trgu", {"truncation": STEPS}),
        ("fg2u", {"directions": "basis", "num_directions": 5, "jvp": "forward"}),
        ("fg2u", {"directions": "basis", "num_directions": 5, "jvp": "double_backward"}),
        ("fg2u", {"directions": "basis", "num_directions": 5, "jvp": "double_backward", "directions_per_pass": 2}),
    ],
)
def test_exact_methods_equal_the_closed_form(quadratic, method, kwargs):
    result = estimate(quadratic, method, **kwargs)
    exact = quadratic.unrolled_sgd_gradient(STEPS, LR)
    assert relative_error(result.grad["phi"], exact) < 1e-8
    assert result.outer_loss == pytest.approx(
        float(quadratic.unrolled_value(quadratic.outer, STEPS, make_inner_optimizer("sgd", LR)))
    )


def test_finite_difference_tangents_are_close_to_exact(quadratic):
    result = estimate(quadratic, "fg2u", directions="basis", num_directions=5, jvp="finite_difference")
    assert relative_error(result.grad["phi"], quadratic.unrolled_sgd_gradient(STEPS, LR)) < 1e-6


def test_truncated_rgu_is_biased_but_runs_fewer_differentiated_steps(quadratic):
    exact = quadratic.unrolled_sgd_gradient(STEPS, LR)
    errors = [relative_error(estimate(quadratic, "trgu", truncation=k).grad["phi"], exact) for k in (1, 4, STEPS)]
    assert errors[0] > errors[1] > 1e-3 and errors[2] < 1e-10


def central_difference(problem, optimizer, steps, eps=1e-6):
    phi = problem.outer["phi"]
    grad = torch.zeros_like(phi)
    for i in range(phi.numel()):
        shift = torch.zeros_like(phi)
        shift[i] = eps
        up = problem.unrolled_value({"phi": phi + shift}, steps, optimizer)
        down = problem.unrolled_value({"phi": phi - shift}, steps, optimizer)
        grad[i] = (up - down) / (2 * eps)
    return grad


@pytest.mark.parametrize("name, kwargs", [("momentum", {"beta": 0.9}), ("adam", {}), ("adam", {"weight_decay": 0.1})])
@pytest.mark.parametrize("method", ["rgu", "fg2u"])
def test_momentum_and_adam_match_finite_differences(quadratic, name, kwargs, method):
    optimizer = make_inner_optimizer(name, 0.05, **kwargs)
    reference = central_difference(quadratic, optimizer, STEPS)
    extra = {"directions": "basis", "num_directions": 5} if method == "fg2u" else {}
    result = estimate(quadratic, method, inner_optimizer=name, inner_lr=0.05, inner_optimizer_kwargs=kwargs, **extra)
    assert relative_error(result.grad["phi"], reference) < 1e-5
    assert set(result.optimizer_state) >= ({"momentum"} if name == "momentum" else {"exp_avg", "exp_avg_sq", "step"})


def test_rademacher_mean_converges_and_variance_matches_theory():
    """E[ĝ] = ∇h, E‖ĝ − ∇h‖² = (N−1)/b·‖∇h‖² for Rademacher directions (no direct term: f depends on φ only
    through θ_T, so every coordinate is estimated)."""
    problem = Quadratic(n=6, m=10, direct=False)
    exact = problem.unrolled_sgd_gradient(3, LR)
    b, seeds = 4, 300
    samples = torch.stack(
        [estimate(problem, "fg2u", steps=3, num_directions=b, seed=s).grad["phi"] for s in range(seeds)]
    )
    mean_error = float((samples.mean(0) - exact).norm() / exact.norm())
    theory = (10 - 1) / b * float(exact.pow(2).sum())
    empirical = float((samples - exact).pow(2).sum(1).mean())
    standard_error_of_mean = (theory / seeds) ** 0.5 / float(exact.norm())
    assert mean_error < 4 * standard_error_of_mean
    assert empirical == pytest.approx(theory, rel=0.25)


@pytest.mark.parametrize("kind", ["gaussian", "orthogonal"])
def test_other_direction_kinds_are_unbiased(kind):
    problem = Quadratic(n=6, m=10, direct=False)
    exact = problem.unrolled_sgd_gradient(3, LR)
    seeds = 600
    samples = torch.stack(
        [
            estimate(problem, "fg2u", steps=3, num_directions=8, directions=kind, seed=i).grad["phi"]
            for i in range(seeds)
        ]
    )
    # Unbiased: the mean's error within 4 of its own standard errors (measured over the samples). A scale bias
    # hides in the vector's noise, so the component along the exact gradient, E<ĝ, g>/|g|² = 1, is checked too:
    # its standard error is small enough here that a 10% scale bias fails.
    standard_error = (samples.var(0) / seeds).sum().sqrt()
    assert float((samples.mean(0) - exact).norm()) < 4 * float(standard_error)
    scale = samples @ exact / exact.pow(2).sum()
    scale_error = float(scale.std() / seeds**0.5)
    assert abs(float(scale.mean()) - 1.0) < 4 * scale_error and 4 * scale_error < 0.1


def test_orthogonal_directions_with_b_equal_n_are_exact():
    problem = Quadratic(n=6, m=10, direct=False)
    result = estimate(problem, "fg2u", num_directions=10, directions="orthogonal")
    assert relative_error(result.grad["phi"], problem.unrolled_sgd_gradient(STEPS, LR)) < 1e-8


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_zeroth_order_with_basis_directions(quadratic, scheme):
    result = estimate(quadratic, "fg2u_zo", directions="basis", num_directions=5, zo_scheme=scheme, zo_epsilon=1e-5)
    assert relative_error(result.grad["phi"], quadratic.unrolled_sgd_gradient(STEPS, LR)) < 1e-3


@pytest.mark.parametrize("method, steps", [("cg", 20), ("neumann", 400)])
def test_implicit_methods_match_the_implicit_gradient_after_a_long_unroll(quadratic, method, steps):
    result = estimate(quadratic, method, steps=600, implicit_steps=steps, implicit_batches="last")
    assert relative_error(result.grad["phi"], quadratic.implicit_gradient()) < 1e-6


def test_cg_stops_with_a_warning_at_negative_curvature(quadratic):
    quadratic.A = quadratic.A - 2.0 * torch.eye(quadratic.A.shape[0], dtype=quadratic.A.dtype)
    assert float(torch.linalg.eigvalsh(quadratic.A).min()) < 0  # indefinite: θ_T is no minimum
    with pytest.warns(UserWarning, match="non-positive curvature.*cg_damping"):
        estimate(quadratic, "cg", steps=3, implicit_steps=20)
    damping = 1.0 - float(torch.linalg.eigvalsh(quadratic.A).min())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = estimate(quadratic, "cg", steps=3, implicit_steps=50, cg_damping=damping)
    assert torch.isfinite(result.grad["phi"]).all()


def test_hessian_free_equals_the_one_step_unrolled_gradient(quadratic):
    """With an identity inverse Hessian scaled by the inner step, the estimate is DARTS' one-step
    hypergradient: exact for T = 1 with SGD."""
    result = estimate(quadratic, "hessian_free", steps=1)
    assert relative_error(result.grad["phi"], quadratic.unrolled_sgd_gradient(1, LR)) < 1e-6


def test_direction_slices_sum_to_the_full_estimate(quadratic):
    full = estimate(quadratic, "fg2u", num_directions=6, seed=4)
    parts = [estimate(quadratic, "fg2u", num_directions=6, seed=4, direction_slice=slice(i, i + 3)) for i in (0, 3)]
    torch.testing.assert_close(parts[0].grad["phi"] + parts[1].grad["phi"], full.grad["phi"], rtol=1e-12, atol=1e-12)


def test_active_coordinates_restrict_the_directions(quadratic):
    mask = torch.tensor([True, True, False, False, False])
    result = estimate(quadratic, "fg2u", directions="basis", num_directions=2, active_coordinates={"phi": mask})
    exact = quadratic.unrolled_sgd_gradient(STEPS, LR)
    torch.testing.assert_close(result.grad["phi"][:2], exact[:2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.grad["phi"][2:], quadratic.d[2:], rtol=1e-12, atol=1e-12)


def test_warm_start_state_continues_the_unroll(quadratic):
    first = estimate(quadratic, "rgu", steps=4, inner_optimizer="adam")
    whole = estimate(quadratic, "rgu", steps=8, inner_optimizer="adam")
    second = estimate_hypergradient(
        quadratic.inner_loss, quadratic.outer_loss, first.params, quadratic.outer, [None] * 4, None, method="rgu",
        inner_optimizer="adam", inner_lr=LR, optimizer_state=first.optimizer_state,
    )  # fmt: skip
    torch.testing.assert_close(second.params["theta"], whole.params["theta"], rtol=1e-12, atol=1e-12)


def test_divergence_raises_a_clear_error(quadratic):
    with pytest.raises(NonFiniteHypergradientError, match="lower inner_lr"):
        estimate(quadratic, "fg2u", steps=400, inner_lr=50.0, directions="basis", num_directions=5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "maml"}, "method="),
        ({"method": "fg2u", "jvp": "reverse"}, "jvp="),
        ({"method": "trgu"}, "truncation"),
        ({"method": "fg2u", "directions": "halton"}, "directions="),
    ],
)
def test_bad_arguments_name_the_fix(quadratic, kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate(quadratic, **kwargs)


def test_options_that_would_not_be_read_are_refused(quadratic):
    """A built method or optimizer carries its own options: the same names beside it are an error, not a
    second source that silently disagrees (issue 21)."""
    built = make_method("fg2u", num_directions=5, directions="basis")
    with pytest.raises(TypeError, match="would not be read"):
        estimate(quadratic, built, num_directions=7)
    with pytest.raises(TypeError, match="not options of any hypergradient method"):
        estimate(quadratic, "fg2u", num_direction=5)
    adam = make_inner_optimizer("adam", 0.05)
    with pytest.raises(ValueError, match="already built with lr=0.05"):
        estimate(quadratic, "rgu", inner_optimizer=adam, inner_lr=0.1)
    same = estimate(quadratic, "rgu", inner_optimizer=adam, inner_lr=0.05)
    by_name = estimate(quadratic, "rgu", inner_optimizer="adam", inner_lr=0.05)
    torch.testing.assert_close(same.grad["phi"], by_name.grad["phi"])


def test_the_neumann_step_is_the_inner_optimizers_lr(quadratic):
    """Neumann's default step is the lr the unroll ran with, read from the optimizer itself."""
    built = estimate(quadratic, "neumann", inner_optimizer=make_inner_optimizer("sgd", 0.07), inner_lr=None)
    explicit = estimate(quadratic, "neumann", inner_lr=0.07, neumann_lr=0.07)
    other = estimate(quadratic, "neumann", inner_lr=0.07, neumann_lr=0.02)
    torch.testing.assert_close(built.grad["phi"], explicit.grad["phi"], rtol=1e-12, atol=1e-12)
    assert relative_error(other.grad["phi"], explicit.grad["phi"]) > 1e-3


class DropoutQuadratic(Quadratic):
    """The quadratic seen through dropout masks on θ, drawn inside the losses as a model's dropout layers are:
    every pair of evaluations a method differences must see the same masks."""

    def inner_loss(self, params, outer, batch):
        return super().inner_loss({"theta": torch.nn.functional.dropout(params["theta"], 0.5)}, outer, batch)

    def outer_loss(self, params, outer, batch):
        return super().outer_loss({"theta": torch.nn.functional.dropout(params["theta"], 0.5)}, outer, batch)


def test_finite_differences_see_the_same_dropout_masks_on_both_sides():
    """Issue 24 item 2: the plus and minus gradients of a central difference (fg2u's finite_difference tangent,
    hessian_free) and fg2u_zo's meta losses drew different masks: errors of order 1/eps. Now each matches the
    exact method on the masked function (the step's seed fixes its masks in every method)."""
    problem = DropoutQuadratic(n=6, m=5)
    basis = dict(directions="basis", num_directions=5, seed=3)
    exact = estimate(problem, "fg2u", jvp="forward", **basis).grad["phi"]
    differenced = estimate(problem, "fg2u", jvp="finite_difference", fd_epsilon=1e-6, **basis).grad["phi"]
    assert relative_error(differenced, exact) < 1e-6
    one_step = estimate(problem, "fg2u", steps=1, jvp="forward", **basis).grad["phi"]
    hessian_free = estimate(problem, "hessian_free", steps=1, fd_epsilon=1e-6, seed=3).grad["phi"]
    assert relative_error(hessian_free, one_step) < 1e-6  # exact at T = 1 with SGD
    zo = [
        estimate(problem, "fg2u_zo", zo_epsilon=eps, zo_scheme="central", **basis).grad["phi"] for eps in (1e-4, 1e-6)
    ]
    assert relative_error(zo[0], zo[1]) < 1e-4  # the same function differentiated at two step sizes


def test_finite_differences_are_refused_for_a_half_precision_theta():
    problem = Quadratic(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="need θ in float32 or float64, and θ is torch.bfloat16"):
        estimate(problem, "hessian_free", steps=1)
