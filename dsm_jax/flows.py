"""Flow matching: Gaussian probability paths, exact velocity <-> score <-> denoiser maps, couplings, reflow.

**Convention (Lipman et al. 2023): time runs from noise at t = 0 to data at t = 1.**
A Gaussian path joins noise ``z ~ N(0, I)`` (Lipman's ``x_0``) to data ``x ~ p``
(his ``x_1``; the rest of the library calls clean data ``x0``, hence the names
``noise`` and ``data`` here):

    ``x_t = alpha(t) x + sigma(t) z``,  with ``alpha(0) ~ 0, sigma(0) ~ 1`` and ``alpha(1) = 1``.

Its conditional velocity is ``u_t = alpha'(t) x + sigma'(t) z`` and the
marginal velocity, the field whose ODE ``dx/dt = v(x, t)`` carries ``p_0`` to
``p_1``, is ``v(x, t) = E[u_t | x_t = x]``. With the denoiser
``D(x, t) = E[data | x_t = x]`` and the score ``s = grad log p_t``, Tweedie
(``E[z | x_t] = -sigma s``) gives the exact conversions, valid for any data law
(Albergo & Vanden-Eijnden 2023, Sec. 2; Lipman et al. 2023, Thm. 3):

    ``v = alpha' D - sigma sigma' s``
    ``v = (alpha' / alpha) x + sigma (alpha' sigma / alpha - sigma') s``      (:func:`velocity_from_score`)
    ``s = (alpha v - alpha' x) / (sigma (alpha' sigma - alpha sigma'))``        (:func:`score_from_velocity`)
    ``D = (sigma v - sigma' x) / (alpha' sigma - alpha sigma')``                 (:func:`denoiser_from_velocity`)
    ``v = (sigma' / sigma) x + (alpha' sigma - alpha sigma') D / sigma``         (:func:`velocity_from_denoiser`)

(``alpha' sigma - alpha sigma' > 0`` on every path here: 1 on :class:`LinearPath`.)

**Paths as noise levels.** Dividing by ``alpha``, ``x_t / alpha(t) = x + (sigma / alpha) z``
is the variance-exploding noising of the rest of the library at the noise level
``sigma_ve(t) = sigma(t) / alpha(t)`` (:meth:`GaussianPath.noise_ratio`, inverted by
:meth:`GaussianPath.t_from_noise_ratio`). The model wrappers use this:
:func:`score_model_from_velocity` turns a velocity field into a library
``model_fn(x, sigma)`` ("score" parameterization) and
:func:`velocity_model_from_score_model` runs a library model as a flow. By
default the model is the VE one: ``model_fn(y, sigma)`` is the score of
``y = data + sigma eps``, as trained by the multi-scale DSM loss and used with
``VESDE`` by the samplers and :func:`dsm_jax.likelihood.log_likelihood`; with
``sde=`` it is the model those samplers call for that SDE
(``model_fn(scale x + sigma eps, sigma)``, the matching time found by
``sde.t_from_noise_ratio``). Either way the maps are exact, so a flow-matching
model samples with the library's samplers and gets log-likelihoods, and a
score model integrates as a flow.

Everything in time is a pure function: ``velocity_fn(x, t)`` with ``x: [B, *D]``
and ``t: [B]`` (a scalar ``t`` is broadcast by the functions here).

References:
    Lipman, Chen, Ben-Hamu, Nickel & Le, "Flow matching for generative
    modeling", ICLR 2023.
    Liu, Gong & Liu, "Flow straight and fast: learning to generate and transfer
    data with rectified flow", ICLR 2023.
    Albergo & Vanden-Eijnden, "Building normalizing flows with stochastic
    interpolants", ICLR 2023 (and Albergo, Boffi & Vanden-Eijnden,
    "Stochastic interpolants", 2023): the score-velocity relation.
    Tong et al., "Improving and generalizing flow-based generative models
    with minibatch optimal transport", TMLR 2024 (arXiv 2023).
    Pooladian et al., "Multisample flow matching: straightening flows with
    minibatch couplings", ICML 2023.
    Cuturi, "Sinkhorn distances", NeurIPS 2013.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax import ode
from dsm_jax._checks import check_choice, check_key, check_positive_int, check_positive_number, check_state
from dsm_jax._utils import dataclass_transform, sq_distances, to_batch, to_batch_expanded
from dsm_jax.parameterization import ModelFn, check_parameterization, model_to_score
from dsm_jax.sde import SDE, VPSDE, check_sde

__all__ = [
    "COUPLINGS",
    "PATHS",
    "GaussianPath",
    "LinearPath",
    "SDEPath",
    "VPPath",
    "VelocityFn",
    "check_path",
    "denoiser_from_velocity",
    "exact_velocity",
    "get_path",
    "integrate",
    "ot_pairs",
    "reflow",
    "score_from_velocity",
    "score_model_from_velocity",
    "sinkhorn_pairs",
    "sinkhorn_plan",
    "velocity_from_denoiser",
    "velocity_from_score",
    "velocity_model_from_score_model",
]

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]
"""``velocity_fn(x, t) -> [B, *D]`` with ``x: [B, *D]`` and ``t: [B]``."""


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def _pytree(cls):
    """A frozen dataclass registered as a JAX pytree; fields made by :func:`_static` are metadata."""
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


def _t_like(t) -> jax.Array:
    return jnp.asarray(t, dtype=jnp.result_type(float))


# ---------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------


class GaussianPath:
    """Base class: ``x_t = alpha(t) data + sigma(t) noise`` for ``t in [0, 1]`` (noise at 0, data at 1).

    Subclasses implement :meth:`coefficients` (``(alpha(t), sigma(t))``,
    element-wise in ``t``) and :meth:`t_from_noise_ratio`; the time derivatives
    are taken from :meth:`coefficients` by forward-mode autodiff, so they are
    exact.
    """

    def coefficients(self, t) -> tuple[jax.Array, jax.Array]:
        """``(alpha(t), sigma(t))``, each with the shape of ``t``."""
        raise NotImplementedError

    def t_from_noise_ratio(self, ratio) -> jax.Array:
        """The time with ``sigma(t) / alpha(t) = ratio`` (inverse of :meth:`noise_ratio`)."""
        raise NotImplementedError

    def alpha(self, t) -> jax.Array:
        return self.coefficients(t)[0]

    def sigma(self, t) -> jax.Array:
        return self.coefficients(t)[1]

    def coefficients_and_derivatives(self, t) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``(alpha, sigma, d alpha / dt, d sigma / dt)`` at ``t``, each with the shape of ``t``."""
        t = _t_like(t)
        (alpha, sigma), (d_alpha, d_sigma) = jax.jvp(self.coefficients, (t,), (jnp.ones_like(t),))
        return alpha, sigma, d_alpha, d_sigma

    def d_alpha(self, t) -> jax.Array:
        return self.coefficients_and_derivatives(t)[2]

    def d_sigma(self, t) -> jax.Array:
        return self.coefficients_and_derivatives(t)[3]

    def noise_ratio(self, t) -> jax.Array:
        """``sigma(t) / alpha(t)``: the VE noise level of ``x_t / alpha(t)`` around the data."""
        alpha, sigma = self.coefficients(t)
        return sigma / alpha

    def sample(self, data: jax.Array, noise: jax.Array, t) -> tuple[jax.Array, jax.Array]:
        """``(x_t, u_t)``: ``alpha data + sigma noise`` and the conditional velocity ``alpha' data + sigma' noise``."""
        alpha, sigma, d_alpha, d_sigma = (to_batch_expanded(c, data) for c in self.coefficients_and_derivatives(t))
        return alpha * data + sigma * noise, d_alpha * data + d_sigma * noise


@_pytree
class LinearPath(GaussianPath):
    """The optimal-transport (rectified-flow) path: ``alpha(t) = t``, ``sigma(t) = 1 - (1 - sigma_min) t``.

    ``x_t = t data + (1 - (1 - sigma_min) t) noise`` (Lipman et al. 2023, Eq. 20;
    ``sigma_min = 0`` is rectified flow, Liu et al. 2023); the conditional
    velocity ``data - (1 - sigma_min) noise`` is constant along each line.
    Noise level ``sigma / alpha = (1 - (1 - sigma_min) t) / t``.

    Args:
        sigma_min: the noise left at ``t = 1``, in ``[0, 1)``.

    Example:
        >>> path = LinearPath()
        >>> [float(c) for c in path.coefficients_and_derivatives(0.25)]
        [0.25, 0.75, 1.0, -1.0]
    """

    sigma_min: float = 0.0

    def __post_init__(self):
        v = self.sigma_min
        if isinstance(v, (int, float, np.number)) and not (0.0 <= float(v) < 1.0):
            raise ValueError(f"sigma_min must lie in [0, 1), got {v!r}.")

    def coefficients(self, t):
        t = _t_like(t)
        return t, 1.0 - (1.0 - self.sigma_min) * t

    def t_from_noise_ratio(self, ratio):
        # (1 - (1 - m) t) / t = r  <=>  t = 1 / (r + 1 - m).
        return 1.0 / (_t_like(ratio) + 1.0 - self.sigma_min)


class _SDEPathBase(GaussianPath):
    """A library SDE run backwards as a path: flow time ``t`` is SDE time ``T - t (T - t_min)``.

    So ``t = 0`` is the SDE's prior end ``T`` and ``t = 1`` its ``t_min``, where
    ``sigma`` is small but positive (the path analogue of ``sigma_min``) and the
    derivatives stay finite.
    """

    def _sde(self) -> SDE:
        raise NotImplementedError

    def coefficients(self, t):
        sde = self._sde()
        return sde.marginal(sde.T - _t_like(t) * (sde.T - sde.t_min))

    def t_from_noise_ratio(self, ratio):
        sde = self._sde()
        return (sde.T - sde.t_from_noise_ratio(ratio)) / (sde.T - sde.t_min)


@_pytree
class SDEPath(_SDEPathBase):
    """Any :class:`dsm_jax.sde.SDE` as a path: ``(alpha, sigma)(t) = sde.marginal(T - t (T - t_min))``.

    ``SDEPath(VESDE(...))`` is the VE path (``alpha = 1``, ``sigma`` from
    ``sigma_max`` down to about ``sigma_min``; its noise at ``t = 0`` is
    ``N(0, sigma_max^2 I)``, not ``N(0, I)``).
    """

    sde: SDE

    def __post_init__(self):
        check_sde(self.sde)

    def _sde(self):
        return self.sde


@_pytree
class VPPath(_SDEPathBase):
    """The variance-preserving path: the VP SDE (DDPM schedule) run from ``T`` to ``t_min``.

    ``alpha(t) = exp(-B(s) / 2)``, ``sigma(t) = sqrt(1 - alpha(t)^2)`` with
    ``s = 1 - t (1 - t_min)`` and ``B(s) = beta_min s + (beta_max - beta_min) s^2 / 2``
    (Lipman et al. 2023, Eq. 19, with the end pulled back to ``t_min``; at the
    defaults ``sigma(1) ~ 1e-3``, ``alpha(0) ~ 0.0066``).

    Args:
        beta_min, beta_max: the linear ``beta`` schedule of :class:`dsm_jax.sde.VPSDE`.
        t_min: the SDE time at ``t = 1``, ``> 0``.

    Example:
        >>> alpha, sigma = VPPath().coefficients(0.5)
        >>> bool(jnp.allclose(alpha**2 + sigma**2, 1.0))
        True
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = dataclasses.field(default=1e-5, metadata=dict(static=True))

    def __post_init__(self):
        self._sde()  # validates the schedule like VPSDE(beta_min, beta_max, t_min=t_min)

    def _sde(self):
        return VPSDE(self.beta_min, self.beta_max, t_min=self.t_min)


PATHS = ("linear", "vp")
"""The path names of :func:`get_path` (the command line's names)."""


def get_path(path: str | GaussianPath = "linear", *, sigma_min: float = 0.0) -> GaussianPath:
    """A path object from a name ("linear", "vp") or a :class:`GaussianPath` (returned as is).

    ``sigma_min`` is the :class:`LinearPath`'s; it must stay 0 otherwise.
    """
    if isinstance(path, GaussianPath):
        if sigma_min != 0.0:
            raise ValueError(f"sigma_min belongs to path='linear'; set it on the path object, got {sigma_min!r}.")
        return path
    if not isinstance(path, str):
        raise ValueError(f"path must be one of {list(PATHS)} or a dsm_jax.flows.GaussianPath, got {path!r}.")
    check_choice("path", path, PATHS)
    if path == "linear":
        return LinearPath(sigma_min)
    if sigma_min != 0.0:
        raise ValueError(f"sigma_min only applies to path='linear', got path={path!r} and sigma_min={sigma_min!r}.")
    return VPPath()


def check_path(path) -> GaussianPath:
    if not isinstance(path, GaussianPath):
        raise ValueError(f"path must be a dsm_jax.flows.GaussianPath (LinearPath, VPPath, SDEPath), got {path!r}.")
    return path


# ---------------------------------------------------------------------------
# Exact conversions (the one place velocity, score and denoiser meet)
# ---------------------------------------------------------------------------


def _coefficients(path: GaussianPath, t, x: jax.Array):
    """``(alpha, sigma, alpha', sigma')`` at ``t`` (scalar or ``[B]``), each ``[B, 1, ...]``."""
    return tuple(to_batch_expanded(c, x) for c in path.coefficients_and_derivatives(to_batch(t, x)))


def velocity_from_score(score: jax.Array, x: jax.Array, t, path: GaussianPath) -> jax.Array:
    """``v = (alpha' / alpha) x + sigma (alpha' sigma / alpha - sigma') s``: the marginal velocity from the score.

    Singular where ``alpha = 0`` (the pure-noise end of :class:`LinearPath`).

    Example:
        >>> x = jnp.array([[1.0, -2.0]])   # data N(0, I), linear path, t = 1/2: p_t = N(0, I / 2), s = -2 x
        >>> velocity_from_score(-2.0 * x, x, 0.5, LinearPath()).tolist()   # E[data - noise | x_t] = 0 by symmetry
        [[0.0, 0.0]]
    """
    alpha, sigma, d_alpha, d_sigma = _coefficients(path, t, x)
    return (d_alpha / alpha) * x + sigma * (d_alpha * sigma / alpha - d_sigma) * score


def score_from_velocity(velocity: jax.Array, x: jax.Array, t, path: GaussianPath) -> jax.Array:
    """``s = (alpha v - alpha' x) / (sigma (alpha' sigma - alpha sigma'))``: the score from the marginal velocity.

    The inverse of :func:`velocity_from_score`; singular where ``sigma = 0``.
    """
    alpha, sigma, d_alpha, d_sigma = _coefficients(path, t, x)
    return (alpha * velocity - d_alpha * x) / (sigma * (d_alpha * sigma - alpha * d_sigma))


def denoiser_from_velocity(velocity: jax.Array, x: jax.Array, t, path: GaussianPath) -> jax.Array:
    """``D = E[data | x_t = x] = (sigma v - sigma' x) / (alpha' sigma - alpha sigma')`` (finite at both ends)."""
    alpha, sigma, d_alpha, d_sigma = _coefficients(path, t, x)
    return (sigma * velocity - d_sigma * x) / (d_alpha * sigma - alpha * d_sigma)


def velocity_from_denoiser(denoised: jax.Array, x: jax.Array, t, path: GaussianPath) -> jax.Array:
    """``v = (sigma' / sigma) x + (alpha' sigma - alpha sigma') D / sigma``: the velocity of an x-prediction."""
    alpha, sigma, d_alpha, d_sigma = _coefficients(path, t, x)
    return (d_sigma * x + (d_alpha * sigma - alpha * d_sigma) * denoised) / sigma


def _model_frame(path: GaussianPath, t: jax.Array, sde: SDE | None):
    """``(c, sigma_m, scale_m)`` at path times ``t [B]``: the model sees ``c x_t`` at noise level ``sigma_m``.

    VE (``sde=None``): ``c = 1 / alpha``, ``sigma_m = sigma / alpha``, ``scale_m = 1``.
    For an SDE: its time with the same noise ratio, ``c = scale_sde / alpha``.
    """
    alpha, sigma = path.coefficients(t)
    if sde is None:
        return 1.0 / alpha, sigma / alpha, jnp.ones_like(alpha)
    scale_m, sigma_m = sde.marginal(sde.t_from_noise_ratio(sigma / alpha))
    return scale_m / alpha, sigma_m, scale_m


def velocity_model_from_score_model(
    model_fn: ModelFn, path: GaussianPath, *, parameterization: str = "score", sde: SDE | None = None
) -> VelocityFn:
    """A library model ``model_fn(x, sigma)`` run as a flow: ``velocity_fn(x, t)`` on ``path``.

    ``x_t / alpha(t)`` is the data noised at ``sigma(t) / alpha(t)`` (module
    docstring), so the score of ``p_t`` is ``s_t(x) = c S(model_fn(c x, sigma_m))``
    with ``c = 1 / alpha``, ``sigma_m = sigma / alpha`` for a VE model
    (``sde=None``: the multi-scale DSM loss's model), or, with ``sde``, ``sigma_m``
    the SDE's marginal std at its time of the same noise ratio and
    ``c = scale_sde / alpha``; ``S`` is the parameterization's map to a score.
    Then ``v = velocity_from_score(s_t, x, t, path)``. Defined where
    ``alpha(t) > 0``: start an integration at ``path.t_from_noise_ratio(sigma_max)``
    (the model's largest noise level), not at 0.

    Args:
        model_fn: ``model_fn(x, sigma) -> out``, ``sigma: [B]``.
        path: a :class:`GaussianPath`.
        parameterization: "score", "eps", "x0" or "energy" (what ``model_fn`` outputs).
        sde: the SDE the model was trained for (e.g. ``VPSDE()`` for a DDPM
            network), or None for a VE (``x + sigma eps``) model.

    Returns:
        ``velocity_fn(x, t)``, ``t`` a scalar or ``[B]``.
    """
    check_path(path)
    check_parameterization(parameterization)
    if sde is not None:
        check_sde(sde)

    def velocity_fn(x, t):
        t = to_batch(t, x)
        c, sigma_m, scale_m = (to_batch(v, x) for v in _model_frame(path, t, sde))
        score = to_batch_expanded(c, x) * model_to_score(
            model_fn, to_batch_expanded(c, x) * x, sigma_m, parameterization, scale=scale_m
        )
        return velocity_from_score(score, x, t, path)

    return velocity_fn


def score_model_from_velocity(velocity_fn: VelocityFn, path: GaussianPath, *, sde: SDE | None = None) -> ModelFn:
    """A velocity field as a library ``model_fn(x, sigma)`` ("score" parameterization).

    The inverse of :func:`velocity_model_from_score_model`: at noise level
    ``sigma`` the path time is ``t = path.t_from_noise_ratio(sigma / scale)``
    (``scale = 1`` for VE, ``sde.scale_for_sigma(sigma)`` with ``sde``), the
    model's input ``x`` is ``c x_t`` with ``c = scale / alpha(t)``, and the model
    returns ``score_from_velocity(v(x / c, t), x / c, t, path) / c``. So a
    flow-matching model samples with :func:`dsm_jax.samplers.annealed_langevin`,
    the sigma-grid ODE samplers, ``probability_flow_ode(..., VESDE(...))`` and
    gets log-likelihoods from :func:`dsm_jax.likelihood.log_likelihood` with a
    ``VESDE`` (or with ``sde`` for that SDE). Defined where ``sigma(t) > 0``,
    i.e. for noise levels above ``path.noise_ratio(1.0)`` (0 for ``LinearPath()``,
    about 1e-3 for ``VPPath()``).

    Args:
        velocity_fn: ``velocity_fn(x, t) -> [B, *D]``, ``t: [B]``.
        path: the :class:`GaussianPath` it was trained on.
        sde: None (VE model) or the SDE whose samplers will call the model.

    Returns:
        ``model_fn(x, sigma) -> score [B, *D]``.
    """
    check_path(path)
    if sde is not None:
        check_sde(sde)

    def model_fn(x, sigma):
        sigma = to_batch(sigma, x)
        scale = jnp.ones_like(sigma) if sde is None else sde.scale_for_sigma(sigma)
        t = to_batch(path.t_from_noise_ratio(sigma / scale), x)
        c = to_batch_expanded(scale / path.alpha(t), x)
        x_t = x / c
        return score_from_velocity(velocity_fn(x_t, t), x_t, t, path) / c

    return model_fn


def exact_velocity(distribution, path: GaussianPath) -> VelocityFn:
    """The exact marginal velocity of ``path`` for a ground-truth ``distribution`` (e.g. a ``GaussianMixture``).

    ``v(x, t) = alpha' D - sigma sigma' s`` with ``D = distribution.posterior_mean(x, sigma, scale=alpha)``
    and ``s`` the score of ``distribution.convolve(sigma, scale=alpha)``: both
    finite on the whole of ``[0, 1]`` (at ``alpha = 0``, ``D`` is the data mean;
    at ``sigma = 0``, ``s`` is the data score), so the field can be integrated
    from ``t = 0`` to ``t = 1`` exactly. Per example (``t: [B]``), vmapped.

    Example:
        >>> from dsm_jax.distributions import Gaussian
        >>> v = exact_velocity(Gaussian(jnp.ones(2), jnp.eye(2)), LinearPath())
        >>> v(jnp.zeros((1, 2)), 0.0).tolist()     # at t = 0: E[data] - E[noise]
        [[1.0, 1.0]]
    """
    check_path(path)

    def one(x, t):
        alpha, sigma, d_alpha, d_sigma = path.coefficients_and_derivatives(t)
        denoised = distribution.posterior_mean(x[None], sigma, scale=alpha)[0]
        score = distribution.convolve(sigma, scale=alpha).score(x[None])[0]
        return d_alpha * denoised - sigma * d_sigma * score

    def velocity_fn(x, t):
        return jax.vmap(one)(x, to_batch(t, x))

    return velocity_fn


# ---------------------------------------------------------------------------
# Integration and reflow
# ---------------------------------------------------------------------------


def integrate(
    velocity_fn: VelocityFn,
    x: jax.Array,
    *,
    t0=0.0,
    t1=1.0,
    num_steps: int | None = None,
    solver=None,
    rtol=None,
    atol=None,
    stepsize_controller=None,
    max_steps: int = ode.DEFAULT_MAX_STEPS,
) -> tuple[jax.Array, jax.Array]:
    """Solves ``dx/dt = velocity_fn(x, t)`` from ``t0`` to ``t1`` with :func:`dsm_jax.ode.solve`.

    Defaults: noise to data (``t0 = 0``, ``t1 = 1``), Tsit5 with a PID
    controller (``rtol = atol = 1e-5``); ``num_steps=N`` is a fixed grid, any
    diffrax solver and controller may be passed (:func:`dsm_jax.ode.ode_options`).
    ``t1 < t0`` integrates backwards (data to noise).

    Returns:
        ``(x_t1, nfe)``: the state at ``t1`` and the number of field evaluations.
    """
    check_state("x", x)
    options = ode.ode_options(
        t0,
        t1,
        rtol=rtol,
        atol=atol,
        num_steps=num_steps,
        solver=solver,
        stepsize_controller=stepsize_controller,
        max_steps=max_steps,
    )
    sol, nfe = ode.solve(lambda t, y: velocity_fn(y, to_batch(t, y)), x, t0, t1, **options)
    return sol.ys[-1], nfe


def reflow(velocity_fn: VelocityFn, noise: jax.Array, **options: Any) -> tuple[jax.Array, jax.Array]:
    """Rectified-flow reflow: the coupling ``(noise, Phi(noise))`` of a trained flow (Liu et al. 2023, Alg. 1).

    ``Phi`` integrates ``velocity_fn`` from ``t = 0`` to ``1`` (:func:`integrate`;
    ``options`` are its keywords). Training a new flow on these pairs
    (``flow_matching_loss(..., noise=pairs[0])`` with ``x = pairs[1]``) gives
    the 2-rectified flow, whose paths are straighter; the rectified coupling
    transports at no larger convex cost than the one it came from (Liu et al.
    2023, Thm. 3.5), e.g. ``E|Phi(z) - z|^2`` below the independent coupling's
    ``E|x|^2 + E|z|^2``.

    Args:
        velocity_fn: ``velocity_fn(x, t) -> [B, *D]``.
        noise: ``[B, *D]`` draws of the path's noise (``N(0, I)``).

    Returns:
        ``(noise, samples)``, both ``[B, *D]``: paired row by row.
    """
    samples, _ = integrate(velocity_fn, noise, t0=0.0, t1=1.0, **options)
    return noise, samples


# ---------------------------------------------------------------------------
# Minibatch couplings
# ---------------------------------------------------------------------------


def _cost(noise: jax.Array, data: jax.Array) -> jax.Array:
    """``|noise_i - data_j|^2 -> [B, B]``, constant under differentiation (a coupling only reorders)."""
    a = jax.lax.stop_gradient(noise.reshape(noise.shape[0], -1))
    b = jax.lax.stop_gradient(data.reshape(data.shape[0], -1))
    return jnp.maximum(sq_distances(a, b), 0.0)


def _assignment_on_host(cost) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment  # scipy ships with scikit-learn, a core dependency

    _, cols = linear_sum_assignment(np.asarray(cost))
    return cols.astype(np.int32)


def ot_pairs(noise: jax.Array, data: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Exact minibatch optimal transport: ``data`` reordered to minimise ``sum_i |noise_i - data_perm(i)|^2``.

    The assignment problem is solved on the host by
    ``scipy.optimize.linear_sum_assignment`` (``O(B^3)``; fine for batches of a
    few hundred) through ``jax.pure_callback``, so it works under ``jit`` (one
    host round trip per call; under ``vmap`` the batches are solved in turn).
    No gradient flows through the permutation (it is piecewise constant).

    Args:
        noise, data: ``[B, *D]``.
        key: unused (the assignment is deterministic; the argument makes the
            signature that of every coupling).

    Returns:
        ``(noise, data[perm])``.
    """
    del key
    perm = jax.pure_callback(
        _assignment_on_host,
        jax.ShapeDtypeStruct((noise.shape[0],), jnp.int32),
        _cost(noise, data),
        vmap_method="sequential",
    )
    return noise, data[perm]


def sinkhorn_plan(noise: jax.Array, data: jax.Array, *, epsilon: float = 0.05, num_iters: int = 200) -> jax.Array:
    """Entropic optimal-transport plan between two uniform batches, log-domain Sinkhorn in JAX (Cuturi 2013).

    Minimises ``<P, C> - eps H(P)`` over ``P >= 0`` with row and column sums
    ``1 / B``, ``C_ij = |noise_i - data_j|^2`` and ``eps = epsilon * mean(C)``
    (relative, so the same ``epsilon`` fits any data scale). Potentials ``f, g``
    alternate ``f_i = -eps log sum_j exp((g_j - C_ij) / eps) - eps log B`` and
    the same for ``g``; ``P_ij = exp((f_i + g_j - C_ij) / eps)``. As
    ``epsilon -> 0`` the plan tends to the exact assignment (divided by ``B``).

    Args:
        noise, data: ``[B, *D]``.
        epsilon: relative entropic regularisation, > 0.
        num_iters: Sinkhorn iterations (a ``lax.fori_loop``).

    Returns:
        ``[B, B]`` plan (sums to 1).
    """
    check_positive_number("epsilon", epsilon)
    num_iters = check_positive_int("num_iters", num_iters)
    cost = _cost(noise, data)
    eps = epsilon * jnp.mean(cost)
    log_marginal = -jnp.log(cost.shape[0])

    def step(_, fg):
        f, g = fg
        f = -eps * jax.nn.logsumexp((g[None, :] - cost) / eps, axis=1) + eps * log_marginal
        g = -eps * jax.nn.logsumexp((f[:, None] - cost) / eps, axis=0) + eps * log_marginal
        return f, g

    zeros = jnp.zeros(cost.shape[0], cost.dtype)
    f, g = jax.lax.fori_loop(0, num_iters, step, (zeros, zeros))
    return jnp.exp((f[:, None] + g[None, :] - cost) / eps)


def sinkhorn_pairs(
    noise: jax.Array, data: jax.Array, key: jax.Array, *, epsilon: float = 0.05, num_iters: int = 200
) -> tuple[jax.Array, jax.Array]:
    """Pairs drawn from the Sinkhorn plan: for each noise row ``i``, ``j ~ P_ij / sum_j P_ij``.

    Every noise draw is kept once (so the noise stays ``N(0, I)`` exactly) and
    data rows may repeat; all in JAX, jit-compatible (Tong et al. 2023 draw
    from the plan the same way, up to which side is kept).

    Returns:
        ``(noise, data[j])``.
    """
    check_key(key)
    plan = sinkhorn_plan(noise, data, epsilon=epsilon, num_iters=num_iters)
    cols = jax.random.categorical(key, jnp.log(plan), axis=1)
    return noise, data[cols]


COUPLINGS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {"ot": ot_pairs, "sinkhorn": sinkhorn_pairs}
"""The named couplings of the flow-matching loss: ``coupling(noise, data, key) -> (noise, data)``."""
