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

All three are immutable pytrees (``flax.struct.dataclass``): their numeric
parameters are leaves, ``T`` and ``t_min`` static. Times ``t`` may be a
scalar or ``[B]``; results have the shape of ``t`` (coefficients) or of ``x``.

References:
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, "Score-based
    generative modeling through stochastic differential equations", ICLR 2021.
    Ho, Jain & Abbeel, "Denoising diffusion probabilistic models", NeurIPS 2020.
"""

from __future__ import annotations

import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dsm_jax._checks import check_batched, check_positive_number, is_concrete
from dsm_jax.parameterization import expand_to

__all__ = ["SDE", "VESDE", "VPSDE", "SubVPSDE", "exact_score_model"]

_LOG_2PI = math.log(2.0 * math.pi)


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


class SDE:
    """Base class: a linear SDE ``dx = f(x, t) dt + g(t) dw`` with a Gaussian prior.

    Subclasses implement :meth:`drift_coefficient` (``f(x, t) = c(t) x``),
    :meth:`diffusion`, :meth:`marginal`, :meth:`t_from_noise_ratio`,
    :meth:`scale_for_sigma` and the
    prior's standard deviation :attr:`prior_std`.
    """

    T: float
    t_min: float

    # -- the SDE ---------------------------------------------------------
    def drift_coefficient(self, t) -> jax.Array:
        """``c(t)`` with ``f(x, t) = c(t) x``."""
        raise NotImplementedError

    def diffusion(self, t) -> jax.Array:
        """``g(t)``, with the shape of ``t``."""
        raise NotImplementedError

    def drift(self, x: jax.Array, t) -> jax.Array:
        """``f(x, t)``, shape of ``x``; ``t`` a scalar or ``[B]``."""
        c = _t_like(self.drift_coefficient(t), x.dtype)
        return expand_to(jnp.broadcast_to(c.reshape(-1), (x.shape[0],)), x) * x

    def sde(self, x: jax.Array, t) -> Tuple[jax.Array, jax.Array]:
        """``(f(x, t), g(t))``."""
        return self.drift(x, t), self.diffusion(t)

    # -- the marginal ------------------------------------------------------
    def marginal(self, t) -> Tuple[jax.Array, jax.Array]:
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
        return -0.5 * sq - dim * (jnp.log(std) + 0.5 * _LOG_2PI)


@struct.dataclass
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
    t_min: float = struct.field(pytree_node=False, default=1e-5)
    T: float = struct.field(pytree_node=False, default=1.0)

    def __post_init__(self):
        _check_positive("sigma_min", self.sigma_min)
        _check_positive("sigma_max", self.sigma_max)
        lo, hi = _concrete_float(self.sigma_min), _concrete_float(self.sigma_max)
        if lo is not None and hi is not None and not hi > lo:
            raise ValueError(
                f"sigma_max must exceed sigma_min, got sigma_min={lo!r}, sigma_max={hi!r}."
            )
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
        raise ValueError(
            f"beta_max must be > 0 and >= beta_min, got beta_min={lo!r}, beta_max={hi!r}."
        )


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


@struct.dataclass
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
    t_min: float = struct.field(pytree_node=False, default=1e-5)
    T: float = struct.field(pytree_node=False, default=1.0)

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


@struct.dataclass
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
    t_min: float = struct.field(pytree_node=False, default=1e-5)
    T: float = struct.field(pytree_node=False, default=1.0)

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


def exact_score_model(distribution, sde: SDE):
    """A closed-form ``model_fn(x, sigma)`` ("score" parameterization) for an SDE.

    Returns the exact score of the noised marginal
    ``distribution.convolve(sigma, scale=sde.scale_for_sigma(sigma))`` for
    each example's sigma, for any ground-truth distribution with
    ``convolve`` and ``score`` (:mod:`dsm_jax.distributions`). Use it to check
    a sampler or a likelihood against the exact answer, or as the reference
    a trained network should approach.

    Example:
        >>> from dsm_jax.distributions import GaussianMixture
        >>> gmm = GaussianMixture(jnp.array([0.5, 0.5]), jnp.array([[2.0, 2.0], [-2.0, -2.0]]), jnp.full((2, 2), 0.25))
        >>> model_fn = exact_score_model(gmm, VPSDE())
        >>> model_fn(jnp.zeros((3, 2)), jnp.full((3,), 0.5)).shape
        (3, 2)
    """
    if not isinstance(sde, SDE):
        raise ValueError(f"sde must be a dsm_jax.sde.SDE, got {sde!r}.")

    def model_fn(x, sigma):
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype).reshape(-1), (x.shape[0],))
        scale = sde.scale_for_sigma(sigma)
        one = lambda xi, si, ai: distribution.convolve(si, scale=ai).score(xi[None])[0]
        return jax.vmap(one)(x, sigma, scale)

    return model_fn
