"""The registry of hypergradient methods: each name maps to a method object that carries its options
dataclass and its properties, built once (from keywords or from a ``BilevelConfig``); each outer step then
passes data only (an :class:`Unroll`).

Properties that callers used to derive from the method's name in many places live here once:
``second_order`` (differentiates through an inner gradient: needs forward AD or double backward),
``directional`` (estimates from random directions, so processes can split the directions), ``data_parallel``
(supports an inner gradient averaged across processes at every step), ``reaches_every_step`` (every inner step
contributes to the hypergradient).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from hf_fg2u.hypergrad.directions import DIRECTIONS, OuterSpace, sample_directions
from hf_fg2u.hypergrad.forward import forward_directional_derivatives, split_directions
from hf_fg2u.hypergrad.implicit import implicit_hypergradient
from hf_fg2u.hypergrad.result import HypergradientResult
from hf_fg2u.hypergrad.reverse import reverse_hypergradient
from hf_fg2u.hypergrad.unroll import JVP_MODES, Unroll
from hf_fg2u.hypergrad.zeroth_order import ZO_SCHEMES, zeroth_order_directional_derivatives
from hf_fg2u.registry import Registry, check_choice

DEFAULT_JVP = "double_backward"


# -- options ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DirectionOptions:
    """Random directions of fg2u / fg2u_zo: b, their kind, and how many share one vmap pass (None = all)."""

    num_directions: int = 8
    directions: str = "rademacher"
    directions_per_pass: int | None = 8

    def __post_init__(self):
        check_choice("directions", self.directions, DIRECTIONS)
        _check_positive("num_directions", self.num_directions)
        if self.directions_per_pass is not None:
            _check_positive("directions_per_pass", self.directions_per_pass)


@dataclass(frozen=True)
class ForwardOptions(DirectionOptions):
    """fg2u: how each inner step's tangent is computed, and the step of ``jvp="finite_difference"``."""

    jvp: str = DEFAULT_JVP
    fd_epsilon: float | None = None

    def __post_init__(self):
        super().__post_init__()
        check_choice("jvp", self.jvp, JVP_MODES)


@dataclass(frozen=True)
class ZerothOrderOptions(DirectionOptions):
    """fg2u_zo: the finite-difference step μ of h and the scheme."""

    zo_epsilon: float = 1e-3
    zo_scheme: str = "central"

    def __post_init__(self):
        super().__post_init__()
        check_choice("zo_scheme", self.zo_scheme, ZO_SCHEMES)
        if not self.zo_epsilon > 0 or self.zo_epsilon == float("inf"):
            raise ValueError(f"zo_epsilon={self.zo_epsilon} must be a finite number > 0 (e.g. 1e-3).")


@dataclass(frozen=True)
class ReverseOptions:
    """rgu / trgu: K differentiated last steps (trgu), every k-th state kept (the rest recomputed), whether the
    stored states live in CPU memory, and whether each step's graph is kept instead of recomputed."""

    truncation: int | None = None
    checkpoint_every: int = 1
    offload_trajectory: bool = False
    keep_step_graphs: bool = False

    def __post_init__(self):
        _check_positive("checkpoint_every", self.checkpoint_every)
        if self.keep_step_graphs and (self.checkpoint_every != 1 or self.offload_trajectory):
            raise ValueError(
                "keep_step_graphs=True keeps every step's graph in memory, so it cannot be combined with "
                f"checkpoint_every={self.checkpoint_every} or offload_trajectory={self.offload_trajectory}, which "
                "save memory by recomputing or moving the steps: use one or the other."
            )


@dataclass(frozen=True)
class ImplicitOptions:
    """neumann / cg / hessian_free: iterations, Neumann step (default inner_lr), CG damping, which batches
    define the Hessian, and how Hessian products are computed."""

    implicit_steps: int = 10
    neumann_lr: float | None = None
    cg_damping: float = 0.0
    implicit_batches: str = "all"
    jvp: str = DEFAULT_JVP
    fd_epsilon: float | None = None

    def __post_init__(self):
        check_choice("implicit_batches", self.implicit_batches, ("all", "last"))
        check_choice("jvp", self.jvp, JVP_MODES)
        if self.cg_damping < 0:
            raise ValueError(f"cg_damping={self.cg_damping} must be >= 0 (λ of H + λI).")


# -- methods ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HypergradientMethod:
    """A method by name with its options; ``estimate(unroll)`` runs it."""

    name: str
    options: object = None

    @property
    def spec(self) -> MethodSpec:
        return METHOD_SPECS[self.name]

    @property
    def second_order(self) -> bool:
        return self.spec.second_order(self.options)

    @property
    def directional(self) -> bool:
        return self.spec.directional

    @property
    def data_parallel(self) -> bool:
        return self.spec.data_parallel

    def estimate(self, unroll: Unroll) -> HypergradientResult:
        if unroll.reduce_gradients is not None and not self.data_parallel:
            raise ValueError(
                f"reduce_gradients (a data-parallel inner loop) is supported by {data_parallel_methods()}, not "
                f"{self.name!r}."
            )
        return self.spec.run(self, unroll)


@dataclass(frozen=True)
class MethodSpec:
    """What a method is: its options type, its properties, and the function that runs it."""

    options_type: type
    run: Callable[[HypergradientMethod, Unroll], HypergradientResult]
    second_order: Callable[[object], bool]
    directional: bool = False
    data_parallel: bool = False
    reaches_every_step: bool = True


def _run_reverse(method: HypergradientMethod, u: Unroll) -> HypergradientResult:
    o = method.options
    truncation = o.truncation if method.name == "trgu" else None
    if method.name == "trgu" and (truncation is None or truncation < 1):
        raise ValueError(f"method='trgu' needs truncation=K >= 1 (the differentiated last steps), got {truncation}.")
    grad, value, params, state, losses = reverse_hypergradient(
        u,
        truncation=truncation,
        checkpoint_every=o.checkpoint_every,
        offload_trajectory=o.offload_trajectory,
        keep_step_graphs=o.keep_step_graphs,
    )
    return HypergradientResult(grad, value, params, state, losses, method=method.name)


def _run_implicit(method: HypergradientMethod, u: Unroll) -> HypergradientResult:
    o = method.options
    grad, value, params, state, losses = implicit_hypergradient(u, method.name, o)
    return HypergradientResult(grad, value, params, state, losses, method=method.name)


def _run_directional(method: HypergradientMethod, u: Unroll) -> HypergradientResult:
    """fg2u and fg2u_zo: ĝ = (1/b) Σ ⟨∇h, vᵢ⟩ vᵢ over directions drawn on the active coordinates."""
    o = method.options
    space = OuterSpace(u.outer, u.active_coordinates)
    first = next(iter(u.outer.values()))
    matrix, scale = sample_directions(o.directions, o.num_directions, space.size, u.seed, first.dtype, first.device)
    if u.direction_slice is not None:
        matrix = matrix[u.direction_slice]
    per_pass = o.directions_per_pass or max(1, matrix.shape[0])
    chunks = split_directions(space.to_dict(matrix, u.outer), per_pass) if matrix.shape[0] else []

    if method.name == "fg2u":
        through_params, direct, value, params, state, losses = forward_directional_derivatives(
            u, chunks, jvp=o.jvp, fd_epsilon=o.fd_epsilon
        )
        # The direct term ∇_φ f is exact and added whole; a process's share keeps the 1/b scaling of all b.
        estimate = space.to_dict(scale * (matrix.T @ through_params.to(matrix.dtype)), u.outer)
        share = 1.0 if u.direction_slice is None else matrix.shape[0] / o.num_directions
        grad = {k: estimate[k] + share * direct[k] for k in u.outer}
        derivatives = through_params + (matrix @ space.to_flat(direct).to(matrix.dtype))
    else:
        derivatives, value, params, state, losses = zeroth_order_directional_derivatives(
            u, chunks, zo_epsilon=o.zo_epsilon, zo_scheme=o.zo_scheme
        )
        grad = space.to_dict(scale * (matrix.T @ derivatives.to(matrix.dtype)), u.outer)
    return HypergradientResult(
        grad, value, params, state, losses, derivatives.detach(), method=method.name, num_directions=o.num_directions
    )


def _tangents_need_second_order(options) -> bool:
    return options.jvp != "finite_difference"


METHOD_SPECS: Registry[MethodSpec] = Registry("method")
# forward gradient unrolling: unbiased, memory constant in T and in |θ|·T
METHOD_SPECS.register(
    "fg2u",
    MethodSpec(
        ForwardOptions,
        _run_directional,
        _tangents_need_second_order,
        directional=True,
        data_parallel=True,
    ),
)
# fg2u with finite differences of h: no derivative of the inner loop
METHOD_SPECS.register(
    "fg2u_zo",
    MethodSpec(
        ZerothOrderOptions,
        _run_directional,
        lambda options: False,
        directional=True,
    ),
)
# exact reverse unrolling that stores the trajectory (θ_t, s_t): memory T·|θ, s| + one step
METHOD_SPECS.register(
    "rgu",
    MethodSpec(
        ReverseOptions,
        _run_reverse,
        lambda options: True,
        data_parallel=True,
    ),
)
# reverse unrolling of the last K steps only: biased, memory K·|θ, s|
METHOD_SPECS.register(
    "trgu",
    MethodSpec(
        ReverseOptions,
        _run_reverse,
        lambda options: True,
        data_parallel=True,
        reaches_every_step=False,
    ),
)
# implicit function theorem at θ_T, Neumann series
METHOD_SPECS.register(
    "neumann",
    MethodSpec(
        ImplicitOptions,
        _run_implicit,
        _tangents_need_second_order,
    ),
)
# implicit function theorem at θ_T, conjugate gradient
METHOD_SPECS.register(
    "cg",
    MethodSpec(
        ImplicitOptions,
        _run_implicit,
        _tangents_need_second_order,
    ),
)
# first-order: identity for every (I − αH); exact for one SGD step
METHOD_SPECS.register(
    "hessian_free",
    MethodSpec(
        ImplicitOptions,
        _run_implicit,
        lambda options: False,
    ),
)
METHODS = tuple(METHOD_SPECS)


def data_parallel_methods() -> list[str]:
    return [name for name, spec in METHOD_SPECS.items() if spec.data_parallel]


def method_option_names() -> frozenset[str]:
    """Every keyword some method's options dataclass reads."""
    return frozenset(f.name for spec in METHOD_SPECS.values() for f in dataclasses.fields(spec.options_type))


def make_method(name: str | HypergradientMethod, **options) -> HypergradientMethod:
    """Build method ``name`` from keywords. Keywords that only other methods read are ignored, so one set of
    keywords (``estimate_hypergradient``'s, or a config's fields) serves every method; a keyword no method reads
    is a TypeError (a typo would otherwise be a silent default). A built method passes through, and then takes no
    keywords: its options were fixed when it was built."""
    if isinstance(name, HypergradientMethod):
        if options:
            raise TypeError(
                f"method is an already built {name.name!r} method, so {sorted(options)} would not be read: set them "
                "when building it (make_method / method_from_config), or pass the method's name instead."
            )
        return name
    options_type = METHOD_SPECS.get(name).options_type
    every = method_option_names()
    unknown = sorted(set(options) - every)
    if unknown:
        raise TypeError(f"{unknown} are not options of any hypergradient method; known: {sorted(every)}.")
    known = {f.name for f in dataclasses.fields(options_type)}
    return HypergradientMethod(name, options_type(**{k: v for k, v in options.items() if k in known}))


def method_from_config(config, name: str | None = None) -> HypergradientMethod:
    """Method ``name`` (default ``config.method``) with its options read from a ``BilevelConfig``'s fields."""
    name = name or config.method
    options_type = METHOD_SPECS.get(name).options_type
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(options_type) if hasattr(config, f.name)}
    return make_method(name, **values)


def needs_second_order(method: str, jvp: str) -> bool:
    """Whether ``method`` differentiates through an inner gradient (needs forward AD or double backward)."""
    return make_method(method, jvp=jvp).second_order


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1.")


__all__ = [
    "DEFAULT_JVP",
    "METHODS",
    "METHOD_SPECS",
    "DirectionOptions",
    "ForwardOptions",
    "HypergradientMethod",
    "ImplicitOptions",
    "MethodSpec",
    "ReverseOptions",
    "Unroll",
    "ZerothOrderOptions",
    "make_method",
    "method_from_config",
    "needs_second_order",
]
