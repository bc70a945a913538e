"""Forward noising SDEs: variance exploding, variance preserving and sub-VP.

Each SDE ``dx = f(x, t) dt + g(t) dw`` on ``t in [0, T]`` is linear in ``x``,
so its transition from clean data is Gaussian:

    ``x_t = scale(t) * x_0 + sigma(t) * eps``,  ``eps ~ N(0, I)``.

:meth:`marginal` returns ``(scale(t), sigma(t))``. Models stay conditioned on
the noise level: the samplers call ``model_fn(x, sigma(t))`` (sigma being the
marginal standard deviation) and convert the output with
``score_from_model(..., scale=scale(t))``, so a network trained with the
multi-scale DSM loss on sigmas is also a VE-SDE score model, and an
eps-prediction network for the VP SDE is the usual DDPM network.

* :class:`VESDE`: ``f = 0``, ``g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min))``,
  ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``, ``scale = 1``.
  Following Song et al. 2021, the data at ``t = 0`` is taken as already
  perturbed by ``sigma_min`` (``sigma(0) = sigma_min``).
* :class:`VPSDE`: ``f = -beta(t) x / 2``, ``g = sqrt(beta(t))``,
  ``beta(t) = beta_min + t (beta_max - beta_min)``,
  ``scale(t) = exp(-B(t) / 2)``, ``sigma(t)^2 = 1 - scale(t)^2`` with
  ``B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2``
  (the continuous limit of DDPM).
* :class:`SubVPSDE`: ``f = -beta(t) x / 2``,
  ``g = sqrt(beta(t) (1 - exp(-2 B(t))))``, ``scale(t) = exp(-B(t) / 2)``,
  ``sigma(t) = 1 - exp(-B(t))`` (variance below the VP one at every ``t``).

All three are immutable pytrees (frozen dataclasses registered with
``jax.tree_util.register_dataclass``): their numeric parameters are leaves,
``T`` and ``t_min`` static. Times ``t`` may be a
scalar or ``[B]``; results have the shape of ``t`` (coefficients) or of ``x``.

The reverse-time pieces (what score_sde's ``SDE.reverse`` holds) are public
here, shared by the samplers and the likelihood: :meth:`SDE.time_grid` (the
decreasing grid from ``T`` to ``t_min``), :func:`time_score_fn` (a model in
sigma as a score in time, the one conversion of its parameterization),
:meth:`SDE.reverse_drift` (``f - g^2 s``, Anderson 1982) and
:meth:`SDE.probability_flow_drift` (``f - g^2 s / 2``).

References:
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, "Score-based
    generative modeling through stochastic differential equations", ICLR 2021.
    Ho, Jain & Abbeel, "Denoising diffusion probabilistic models", NeurIPS 2020.
    Anderson, "Reverse-time diffusion equation models", Stochastic Processes
    and their Applications 1982.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax._checks import (
    check_batched,
    check_positive_int,
    check_positive_number,
    check_same_shape,
    check_state,
    is_concrete,
)
from dsm_jax._utils import LOG_2PI, dataclass_transform, to_batch, to_batch_expanded
from dsm_jax.parameterization import ModelFn, check_parameterization, model_to_score

__all__ = [
    "SDE",
    "VESDE",
    "VPSDE",
    "SubVPSDE",
    "TimeScoreFn",
    "check_score_input",
    "check_sde",
    "ExactScoreModel",
    "exact_score_model",
    "time_score_fn",
    "ve_model_from_vp",
]

TimeScoreFn = Callable[[jax.Array, jax.Array], jax.Array]
"""``score_fn(x, t) -> [B, *D]``: the score of the marginal ``p_t``, ``t`` a scalar or ``[B]``."""


def _check_times(T, t_min) -> None:
    check_positive_number("T", T)
    check_positive_number("t_min", t_min)
    if not float(t_min) < float(T):
        raise ValueError(f"t_min must be smaller than T, got t_min={t_min!r} and T={T!r}.")


def _concrete_float(value):
    """The value as a float when it is a user-given number, else None.

    Pytree machinery rebuilds these classes with tracers, placeholders or
    batched leaves; those are not validated.
    """
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, (np.ndarray, jax.Array)) and is_concrete(value) and np.ndim(value) == 0:
        return float(np.asarray(value))
    return None


def _check_positive(name: str, value) -> None:
    v = _concrete_float(value)
    if v is not None:
        check_positive_number(name, v)


def _t_like(t, dtype=None) -> jax.Array:
    return jnp.asarray(t, dtype=dtype if dtype is not None else jnp.result_type(float))


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def _pytree(cls):
    """A frozen dataclass registered as a JAX pytree; fields made by :func:`_static` are metadata."""
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


def _static(default):
    """A static (non-leaf) field: part of the tree structure, hashed by ``jit``."""
    return dataclasses.field(default=default, metadata=dict(static=True))


class SDE:
    """Base class: a linear SDE ``dx = f(x, t) dt + g(t) dw`` with a Gaussian prior.

    Subclasses implement :meth:`drift_coefficient` (``f(x, t) = c(t) x``),
    :meth:`diffusion`, :meth:`marginal`, :meth:`t_from_noise_ratio`,
    :meth:`scale_for_sigma` and the
    prior's standard deviation :attr:`prior_std`.
    """

    T: float
    t_min: float

    def replace(self, **changes) -> SDE:
        """A copy with some fields changed (``dataclasses.replace``; validated like a new SDE)."""
        return dataclasses.replace(cast(Any, self), **changes)

    # -- the SDE ---------------------------------------------------------
    def drift_coefficient(self, t) -> jax.Array:
        """``c(t)`` with ``f(x, t) = c(t) x``."""
        raise NotImplementedError

    def diffusion(self, t) -> jax.Array:
        """``g(t)``, with the shape of ``t``."""
        raise NotImplementedError

    def drift(self, x: jax.Array, t) -> jax.Array:
        """``f(x, t)``, shape of ``x``; ``t`` a scalar or ``[B]``."""
        return to_batch_expanded(self.drift_coefficient(t), x) * x

    # -- reverse time -------------------------------------------------------
    def time_grid(self, num_steps: int, *, t_min=None, t_start=None) -> jax.Array:
        """The uniform decreasing grid ``t_k = t_start - k (t_start - t_min) / num_steps``, ``[num_steps + 1]``.

        Args:
            num_steps: number of intervals, ``>= 1``.
            t_min: the end time (default :attr:`t_min`), ``> 0``.
            t_start: the start time (default :attr:`T`), ``> t_min``.

        Returns:
            ``[num_steps + 1]`` float32 times from ``t_start`` to ``t_min``.

        Example:
            >>> VESDE(0.01, 10.0, t_min=0.2).time_grid(4).tolist()
            [1.0, 0.800000011920929, 0.6000000238418579, 0.4000000059604645, 0.20000000298023224]
        """
        num_steps = check_positive_int("num_steps", num_steps)
        t_min = self.t_min if t_min is None else t_min
        t_start = self.T if t_start is None else t_start
        check_positive_number("t_min", t_min)
        if is_concrete(t_min) and is_concrete(t_start) and not np.all(np.asarray(t_min) < np.asarray(t_start)):
            raise ValueError(f"t_min must be smaller than the start time {t_start!r}, got t_min={t_min!r}.")
        return jnp.linspace(jnp.asarray(t_start, jnp.float32), jnp.asarray(t_min, jnp.float32), num_steps + 1)

    def reverse_drift(self, x: jax.Array, t, score: jax.Array) -> jax.Array:
        """The drift ``f(x, t) - g(t)^2 s(x, t)`` of the reverse-time SDE.

        The reverse of ``dx = f dt + g dw`` is ``dx = [f - g^2 grad log p_t] dt
        + g dw_bar`` run from ``T`` down to 0 (Anderson 1982; Song et al. 2021,
        Eq. 6); ``score`` is ``s(x, t) = grad log p_t(x)``, the shape of ``x``.
        """
        return self.drift(x, t) - to_batch_expanded(self.diffusion(t), x) ** 2 * score

    def probability_flow_drift(self, x: jax.Array, t, score: jax.Array) -> jax.Array:
        """The probability-flow vector field ``f(x, t) - g(t)^2 s(x, t) / 2``.

        ``dx/dt`` of this ODE has the marginals ``p_t`` of the SDE at every
        ``t`` (Song et al. 2021, Eq. 13); ``score`` is ``s(x, t)``.
        """
        return self.drift(x, t) - 0.5 * to_batch_expanded(self.diffusion(t), x) ** 2 * score

    # -- the marginal ------------------------------------------------------
    def marginal(self, t) -> tuple[jax.Array, jax.Array]:
        """``(scale(t), sigma(t))`` with ``x_t = scale(t) x_0 + sigma(t) eps``."""
        raise NotImplementedError

    def scale(self, t) -> jax.Array:
        return self.marginal(t)[0]

    def sigma(self, t) -> jax.Array:
        """The marginal standard deviation: what ``model_fn`` is conditioned on."""
        return self.marginal(t)[1]

    def scale_for_sigma(self, sigma) -> jax.Array:
        """``scale(t)`` at the time where ``sigma(t) = sigma``.

        A model only sees sigma; this recovers the signal scale that goes with
        it (e.g. to build an exact score ``gmm.convolve(sigma, scale=...)``).
        """
        raise NotImplementedError

    def noise_ratio(self, t) -> jax.Array:
        """``sigma(t) / scale(t)``: the noise level of ``x_t / scale(t)`` around ``x_0``."""
        scale, sigma = self.marginal(t)
        return sigma / scale

    def t_from_noise_ratio(self, ratio) -> jax.Array:
        """The time ``t`` with ``sigma(t) / scale(t) = ratio`` (inverse of :meth:`noise_ratio`)."""
        raise NotImplementedError

    # -- the prior ----------------------------------------------------------
    @property
    def prior_std(self) -> float:
        raise NotImplementedError

    def prior_sample(self, key: jax.Array, shape) -> jax.Array:
        """Draws ``[B, *D]`` from the prior ``N(0, prior_std^2 I)`` (approximately ``p_T``)."""
        shape = tuple(shape)
        if len(shape) < 2 or shape[0] < 1:
            raise ValueError(f"shape must be [B, *D] with B >= 1, got {shape}.")
        return self.prior_std * jax.random.normal(key, shape)

    def prior_log_prob(self, z: jax.Array) -> jax.Array:
        """``log N(z; 0, prior_std^2 I)`` per example, ``[B]``."""
        check_batched("z", z)
        dim = math.prod(z.shape[1:])
        std = jnp.asarray(self.prior_std, z.dtype)
        sq = jnp.sum((z / std).reshape(z.shape[0], -1) ** 2, axis=-1)
        return -0.5 * sq - dim * (jnp.log(std) + 0.5 * LOG_2PI)


@_pytree
class VESDE(SDE):
    """Variance exploding SDE (NCSN / SMLD): ``dx = sqrt(d sigma^2(t) / dt) dw``.

    ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``, ``scale = 1``,
    prior ``N(0, sigma_max^2 I)``.

    Args:
        sigma_min: noise level at ``t = 0``, > 0.
        sigma_max: noise level at ``t = T = 1``; for the prior to match ``p_T``
            it should exceed the largest distance between data points
            (:func:`dsm_jax.noise.ncsnv2_sigma_max`).
        t_min: the smallest time the samplers and the likelihood integrate to.

    Example:
        >>> sde = VESDE(0.01, 10.0)
        >>> [round(float(v), 4) for v in sde.marginal(1.0)]   # (scale, sigma) at T
        [1.0, 10.0]
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = _static(1e-5)
    T: float = _static(1.0)

    def __post_init__(self):
        _check_positive("sigma_min", self.sigma_min)
        _check_positive("sigma_max", self.sigma_max)
        lo, hi = _concrete_float(self.sigma_min), _concrete_float(self.sigma_max)
        if lo is not None and hi is not None and not hi > lo:
            raise ValueError(f"sigma_max must exceed sigma_min, got sigma_min={lo!r}, sigma_max={hi!r}.")
        _check_times(self.T, self.t_min)

    def _log_ratio(self):
        return jnp.log(self.sigma_max) - jnp.log(self.sigma_min)

    def drift_coefficient(self, t):
        return jnp.zeros_like(_t_like(t))

    def diffusion(self, t):
        return self.sigma(t) * jnp.sqrt(2.0 * self._log_ratio())

    def marginal(self, t):
        t = _t_like(t)
        sigma = self.sigma_min * jnp.exp(t * self._log_ratio())
        return jnp.ones_like(sigma), sigma

    def scale_for_sigma(self, sigma):
        return jnp.ones_like(_t_like(sigma))

    def t_from_noise_ratio(self, ratio):
        return (jnp.log(_t_like(ratio)) - jnp.log(self.sigma_min)) / self._log_ratio()

    @property
    def prior_std(self):
        return self.sigma_max


def _check_betas(beta_min, beta_max) -> None:
    for name, value in (("beta_min", beta_min), ("beta_max", beta_max)):
        v = _concrete_float(value)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}.")
    lo, hi = _concrete_float(beta_min), _concrete_float(beta_max)
    if lo is not None and hi is not None and not (hi >= lo and hi > 0):
        raise ValueError(f"beta_max must be > 0 and >= beta_min, got beta_min={lo!r}, beta_max={hi!r}.")


class _BetaSchedule(SDE):
    """The linear ``beta(t)`` shared by VP and sub-VP."""

    beta_min: float
    beta_max: float

    def __post_init__(self):
        _check_betas(self.beta_min, self.beta_max)
        _check_times(self.T, self.t_min)

    def beta(self, t):
        return self.beta_min + _t_like(t) * (self.beta_max - self.beta_min)

    def integrated_beta(self, t):
        """``B(t) = int_0^t beta(s) ds``."""
        t = _t_like(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def drift_coefficient(self, t):
        return -0.5 * self.beta(t)

    def _t_from_integrated_beta(self, b):
        """Solves ``B(t) = b`` for ``t >= 0`` (the positive root of the quadratic)."""
        slope = self.beta_max - self.beta_min
        # t = 2 b / (beta_min + sqrt(beta_min^2 + 2 slope b)): stable also when slope -> 0.
        return 2.0 * b / (self.beta_min + jnp.sqrt(self.beta_min**2 + 2.0 * slope * b))

    @property
    def prior_std(self):
        return 1.0


@_pytree
class VPSDE(_BetaSchedule):
    """Variance preserving SDE (DDPM): ``dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw``.

    ``scale(t) = exp(-B(t) / 2)``, ``sigma(t) = sqrt(1 - scale(t)^2)``, prior ``N(0, I)``.
    With ``N`` steps, ``beta_i = beta(t_i) / N`` are DDPM's discrete betas
    (``beta_min = 0.1, beta_max = 20`` give DDPM's 1e-4 ... 0.02 for N = 1000).

    Args:
        beta_min: ``beta(0) >= 0``.
        beta_max: ``beta(T) >= beta_min``.
        t_min: the smallest time the samplers and the likelihood integrate to.

    Example:
        >>> sde = VPSDE(0.1, 20.0)
        >>> scale, sigma = sde.marginal(0.5)
        >>> bool(jnp.allclose(scale**2 + sigma**2, 1.0))
        True
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = _static(1e-5)
    T: float = _static(1.0)

    def diffusion(self, t):
        return jnp.sqrt(self.beta(t))

    def marginal(self, t):
        b = self.integrated_beta(t)
        return jnp.exp(-0.5 * b), jnp.sqrt(-jnp.expm1(-b))

    def scale_for_sigma(self, sigma):
        sigma = _t_like(sigma)
        return jnp.sqrt((1.0 - sigma) * (1.0 + sigma))  # no cancellation in 1 - sigma^2

    def t_from_noise_ratio(self, ratio):
        # sigma^2 / scale^2 = exp(B) - 1 = ratio^2.
        return self._t_from_integrated_beta(jnp.log1p(_t_like(ratio) ** 2))


@_pytree
class SubVPSDE(_BetaSchedule):
    """Sub-VP SDE: ``dx = -beta x / 2 dt + sqrt(beta (1 - exp(-2 B(t)))) dw``.

    ``scale(t) = exp(-B(t) / 2)``, ``sigma(t) = 1 - exp(-B(t))``, prior ``N(0, I)``.

    Args:
        beta_min: ``beta(0) >= 0``.
        beta_max: ``beta(T) >= beta_min``.
        t_min: the smallest time the samplers and the likelihood integrate to.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = _static(1e-5)
    T: float = _static(1.0)

    def diffusion(self, t):
        return jnp.sqrt(self.beta(t) * -jnp.expm1(-2.0 * self.integrated_beta(t)))

    def marginal(self, t):
        b = self.integrated_beta(t)
        return jnp.exp(-0.5 * b), -jnp.expm1(-b)

    def scale_for_sigma(self, sigma):
        return jnp.sqrt(1.0 - _t_like(sigma))

    def t_from_noise_ratio(self, ratio):
        # With a = scale: (1 - a^2) / a = ratio  =>  a = (sqrt(ratio^2 + 4) - ratio) / 2.
        ratio = _t_like(ratio)
        a = 2.0 / (jnp.sqrt(ratio**2 + 4.0) + ratio)
        return self._t_from_integrated_beta(-2.0 * jnp.log(a))


def check_sde(sde) -> SDE:
    """``sde`` is a :class:`SDE` (raises ``ValueError`` naming it otherwise)."""
    if not isinstance(sde, SDE):
        raise ValueError(f"sde must be a dsm_jax.sde.SDE (VESDE, VPSDE, SubVPSDE), got {sde!r}.")
    return sde


def time_score_fn(model_fn: ModelFn, sde: SDE, *, parameterization: str = "score") -> TimeScoreFn:
    """A noise-conditional model as the score in time: ``score_fn(x, t) -> [B, *D]``.

    ``score_fn(x, t) = S(model_fn(x, sigma(t)))`` with ``(scale(t), sigma(t)) =
    sde.marginal(t)`` and ``S`` the parameterization's map to a score
    (:func:`dsm_jax.parameterization.score_from_model`; "x0" uses
    ``scale(t)``): the model stays conditioned on sigma, the SDE maps time to
    sigma. This is where the samplers and the likelihood convert a model,
    once (the parameterization is validated here, not per call); everything
    after works on a score. An :class:`ExactScoreModel` of the same ``sde``
    is used through its ``time_score(x, t)``, exact also where a float32
    ``sigma(t)`` cannot say ``scale(t)`` (VP near ``T``).

    Args:
        model_fn: ``model_fn(x, sigma) -> out`` with ``sigma: [B]``.
        sde: a :class:`SDE`.
        parameterization: "score", "eps", "x0" or "energy" (what ``model_fn`` outputs).

    Returns:
        ``score_fn(x, t)``, ``t`` a scalar or ``[B]``.

    Example:
        >>> sde = VESDE(0.01, 10.0)
        >>> eps_model = lambda x, sigma: jnp.ones_like(x)                 # predicts eps = 1
        >>> score_fn = time_score_fn(eps_model, sde, parameterization="eps")
        >>> bool(jnp.allclose(score_fn(jnp.zeros((1, 2)), 1.0), -1.0 / 10.0))   # -eps / sigma(T)
        True
    """
    check_sde(sde)
    check_parameterization(parameterization)
    if parameterization == "score" and isinstance(model_fn, ExactScoreModel) and _same_sde(model_fn.sde, sde):
        # The exact score in time: its scale from t, not from the rounded sigma(t).
        return model_fn.time_score

    def score_fn(x, t):
        scale, sigma = sde.marginal(t)
        return model_to_score(model_fn, x, to_batch(sigma, x), parameterization, scale=to_batch(scale, x))

    return score_fn


def ve_model_from_vp(model_fn: ModelFn, sde: SDE, *, parameterization: str = "score") -> ModelFn:
    """A model trained with a VP-type SDE as a model of the VE process, for the sigma-grid samplers.

    The EDM change of variables (Karras et al. 2022, Sec. 4 and App. B.2): with
    ``x_t = scale(t) x_0 + sigma(t) eps``, the variable ``x_ve = x_t / scale(t) =
    x_0 + sigma_ve eps`` is the VE process at the noise level ``sigma_ve =
    sigma(t) / scale(t)`` (:meth:`SDE.noise_ratio`), and its density is
    ``p_ve(x_ve) = scale^d p_t(scale x_ve)``, so

        ``grad log p_ve(x_ve; sigma_ve) = scale(t) * s_t(scale(t) x_ve)``,
        ``t = sde.t_from_noise_ratio(sigma_ve)``;

    the denoisers agree: ``D_ve(x_ve, sigma_ve) = E[x_0 | x_t] = (x_t + sigma^2 s_t(x_t)) / scale``.
    ``s_t`` is ``model_fn`` evaluated as the library trains VP models
    (:func:`dsm_jax.losses.sde_dsm_loss`): on ``x_t``, conditioned on the marginal
    ``sigma(t)``, its output converted with ``scale(t)``
    (:func:`time_score_fn`, so an :func:`exact_score_model` of ``sde`` keeps its precision).

    The returned model outputs the VE score ("score" parameterization, the
    samplers' default), for noise levels in ``[sde.noise_ratio(t_min),
    sde.noise_ratio(T)]`` (about ``0.0014 .. 152`` for ``VPSDE(0.1, 20)``; a grid should stay
    inside, e.g. ``karras_sigmas(80.0, 0.002, n)`` as in EDM). The VP prior ``N(0, I)``
    at ``T`` is ``N(0, (1 + sigma_ve(T)^2) I)`` in the VE variable, close to
    ``sigma_ve * N(0, I)``, the samplers' ``x_init``. A VE SDE maps to itself.

    Args:
        model_fn: ``model_fn(x_t, sigma) -> out`` of a model trained with ``sde``.
        sde: the :class:`SDE` it was trained with (VP or sub-VP).
        parameterization: what ``model_fn`` outputs: "score", "eps", "x0" or "energy".

    Returns:
        ``model_ve(x_ve, sigma_ve) -> score`` ("score" parameterization).

    Example:
        >>> from dsm_jax.distributions import Gaussian
        >>> from dsm_jax.samplers import heun
        >>> from dsm_jax.noise import karras_sigmas
        >>> model_fn = ve_model_from_vp(exact_score_model(Gaussian(jnp.zeros(2), jnp.ones(2)), VPSDE()), VPSDE())
        >>> sigmas = karras_sigmas(80.0, 0.002, 18)
        >>> x = heun(model_fn, sigmas[0] * jax.random.normal(jax.random.key(0), (4, 2)), sigmas)
        >>> x.shape
        (4, 2)

    References:
        Karras, Aittala, Aila & Laine, NeurIPS 2022, Sec. 4 (Eq. 4) and Appendix B.2.
    """
    score_fn = time_score_fn(model_fn, sde, parameterization=parameterization)

    def ve_model(x, sigma):
        t = sde.t_from_noise_ratio(to_batch(sigma, x))
        scale = to_batch_expanded(sde.scale(t), x).astype(x.dtype)
        return scale * score_fn(scale * x, t)

    return ve_model


def _same_sde(a: SDE, b: SDE) -> bool:
    """``a`` and ``b`` are the same process: one object, or the same class with equal concrete parameters."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return (
        tree_a == tree_b
        and all(is_concrete(u) and is_concrete(v) for u, v in zip(leaves_a, leaves_b, strict=True))
        and all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(leaves_a, leaves_b, strict=True))
    )


def check_score_input(score_fn: TimeScoreFn, sde: SDE, x: jax.Array, *, name: str = "x") -> None:
    """Static checks of an ODE/SDE state before any loop is traced.

    ``x`` is a batched floating-point array (finite at run time with
    :func:`dsm_jax.debug_checks`) and ``score_fn(x, t)`` returns its shape; the
    model is traced abstractly (``jax.eval_shape``), so a wrong output shape
    raises ``ValueError`` ("model_fn returned shape ...") before tracing.
    """
    check_sde(sde)
    check_state(name, x)
    out = jax.eval_shape(score_fn, x, jnp.asarray(sde.T, jnp.float32))
    check_same_shape("model_fn", out, x.shape, f"the shape of {name}, {tuple(x.shape)}")


class ExactScoreModel:
    """The exact score of a noised ground-truth law, as a model: see :func:`exact_score_model`.

    ``model(x, sigma)`` is the score of ``distribution.convolve(sigma,
    scale=sde.scale_for_sigma(sigma))``; ``model.time_score(x, t)`` the score of
    ``p_t`` with ``(scale, sigma) = sde.marginal(t)`` taken from ``t``, which
    :func:`time_score_fn` uses when given this model with the same ``sde``.
    """

    def __init__(self, distribution, sde: SDE):
        self.distribution = distribution
        self.sde = check_sde(sde)

    def _score(self, x, sigma, scale):
        one = lambda xi, si, ai: self.distribution.convolve(si, scale=ai).score(xi[None])[0]
        return jax.vmap(one)(x, sigma, scale)

    def __call__(self, x, sigma):
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype).reshape(-1), (x.shape[0],))
        return self._score(x, sigma, self.sde.scale_for_sigma(sigma))

    def time_score(self, x, t):
        scale, sigma = self.sde.marginal(to_batch(t, x))
        return self._score(x, sigma.astype(x.dtype), scale.astype(x.dtype))


def exact_score_model(distribution, sde: SDE) -> ExactScoreModel:
    """A closed-form ``model_fn(x, sigma)`` ("score" parameterization) for an SDE.

    Returns the exact score of the noised marginal
    ``distribution.convolve(sigma, scale=sde.scale_for_sigma(sigma))`` for
    each example's sigma, for any ground-truth distribution with
    ``convolve`` and ``score`` (:mod:`dsm_jax.distributions`). Use it to check
    a sampler or a likelihood against the exact answer, or as the reference
    a trained network should approach.

    Precision: from a float32 sigma the VP scale ``sqrt(1 - sigma^2)`` cannot
    be recovered near ``t = T``: there ``sigma = 0.99998``, whose rounding
    (``3e-8``) is a ``1e-3`` relative error of ``1 - sigma^2`` and of the
    scale (``6.6e-3``), amplified ``1 / scale = 150`` times by Tweedie's
    ``(x + sigma^2 s) / scale`` and by the probability-flow ODE. So the
    returned model also carries ``time_score(x, t)``, the score of ``p_t``
    with ``(scale(t), sigma(t)) = sde.marginal(t)`` taken from ``t``, and
    :func:`time_score_fn` (hence every SDE sampler and the likelihood) uses
    it when it is given this model and the same ``sde``.

    Example:
        >>> from dsm_jax.distributions import GaussianMixture
        >>> gmm = GaussianMixture(jnp.array([0.5, 0.5]), jnp.array([[2.0, 2.0], [-2.0, -2.0]]), jnp.full((2, 2), 0.25))
        >>> model_fn = exact_score_model(gmm, VPSDE())
        >>> model_fn(jnp.zeros((3, 2)), jnp.full((3,), 0.5)).shape
        (3, 2)
    """
    return ExactScoreModel(distribution, sde)
