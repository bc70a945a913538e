"""Generalized score matching (a linear operator L, the target L p / p) and second-order DSM.

Generalized score matching (Lyu 2009) fits a field ``f`` to ``L p / p`` for a
linear operator ``L`` acting on the density. With the adjoint ``L^+`` of
``L`` (``int (L g)^T f = int g (L^+ f)`` for test functions, boundary terms
vanishing), expanding the square and integrating by parts gives

    ``1/2 E_p |f - L p / p|^2 = E_p[ 1/2 |f|^2 - (L^+ f) ] + 1/2 E_p |L p / p|^2``,

whose right side needs only samples of ``p`` and the field: that is
:func:`generalized_score_matching_loss`. Two operators ship as instances:

* :class:`GradientOperator`, ``L = grad``: ``L p / p = grad log p`` and
  ``L^+ = -div``, so the loss is Hyvarinen's
  ``E[1/2 |f|^2 + div f]``, the value of
  :func:`dsm_jax.losses.explicit_score_matching_loss`.
* :class:`TweedieOperator`, ``(L g)(y) = (y g(y) + sigma^2 grad g(y)) / scale``
  on the noisy marginal ``p_sigma`` of ``y = scale x + sigma eps``:
  ``L p_sigma / p_sigma = E[x | y]`` (Tweedie), so ``f`` learns the denoiser.
  The adjoint term ``E[(L^+ f)(y)] = int f^T L p_sigma = E_{x, y}[x^T f(y)]``
  is estimated with the clean sample ``x`` behind each ``y`` (no divergence):
  the loss is ``E[1/2 |f(y)|^2 - x^T f(y)] = 1/2 E|f(y) - x|^2 - 1/2 E|x|^2``.
  For ``f(y) = (y + sigma^2 s(y)) / scale`` this is
  ``sigma^4 / scale^2 * dsm_loss(s) - 1/2 E|x|^2``, with the same noise.
  On noisy samples alone the adjoint is ``(y^T f - sigma^2 div f) / scale``
  and the loss is SURE up to a constant (``TweedieOperator(noisy_data=True)``).

Second-order DSM (Meng et al. 2021) regresses the posterior covariance
``Cov[x | y] = (sigma^2 I + sigma^4 grad^2 log p_sigma(y)) / scale^2`` (the
second-order Tweedie formula) on an outer product of the denoising residual,
given a first-order denoiser ``D(y)``: :func:`second_order_dsm_loss`.

References:
    Lyu, "Interpretation and generalization of score matching", UAI 2009.
    Hyvarinen, JMLR 2005; Vincent, Neural Computation 2011.
    Meng, Song, Li & Ermon, "Estimating high order gradients of the data
    distribution by denoising", NeurIPS 2021.
    Lu, Zheng, Bao, Chen, Li & Zhu, "Maximum likelihood training for
    score-based diffusion ODEs by high-order denoising score matching",
    ICML 2022 (the centred second-order target).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import cast

import jax
import jax.numpy as jnp

from dsm_jax._checks import (
    check_choice,
    check_key,
    check_positive_int,
    check_sigma,
    runtime_check_positive,
)
from dsm_jax._utils import expand_to, to_batch, to_batch_expanded
from dsm_jax.divergence import TRACES, exact_divergence_and_value, hutchinson_divergence_and_value
from dsm_jax.losses._common import _check_data, _sum_per_example
from dsm_jax.tweedie import COVARIANCE_STRUCTURES

__all__ = [
    "SECOND_ORDER_TARGETS",
    "GradientOperator",
    "TweedieOperator",
    "generalized_score_matching_loss",
    "second_order_dsm_loss",
]

Field = Callable[[jax.Array], jax.Array]
OperatorAdjoint = Callable[[Field, jax.Array, "jax.Array | None"], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class GradientOperator:
    """``L = grad``: classical score matching; ``L p / p = grad log p``, ``L^+ f = -div f``.

    Attributes:
        trace: "exact" (one ``jax.jvp`` per dimension,
            :func:`dsm_jax.divergence.exact_divergence`) or "hutchinson"
            (random probes; then the loss needs a ``key``).
        num_probes: probes per example for "hutchinson".
        chunk_size: chunking of the exact trace (see
            :func:`dsm_jax.divergence.resolve_chunk_size`).
    """

    trace: str = "exact"
    num_probes: int = 1
    chunk_size: int | str | None = "auto"

    def __post_init__(self):
        check_choice("trace", self.trace, TRACES)
        check_positive_int("num_probes", self.num_probes)

    def __call__(self, field_fn: Field, x: jax.Array, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """``(f(x), -div f(x))``: the field at the data and the adjoint term ``[B]``."""
        if self.trace == "exact":
            div, value = exact_divergence_and_value(field_fn, x, chunk_size=self.chunk_size)
        else:
            if key is None:
                raise ValueError("GradientOperator(trace='hutchinson') needs a key: pass key=jax.random.key(seed).")
            div, value = hutchinson_divergence_and_value(field_fn, x, key, num_probes=self.num_probes)
        return value, -div


@dataclasses.dataclass(frozen=True)
class TweedieOperator:
    """``(L g)(y) = (y g + sigma^2 grad g) / scale`` on ``p_sigma``: ``L p_sigma / p_sigma = E[x | y]``.

    Two estimates of the adjoint term, for the two kinds of data:

    * clean data (default): called with ``x``, it draws ``y = scale x + sigma eps``
      with ``eps = jax.random.normal(key, x.shape)`` (the noise of
      :func:`dsm_jax.losses.dsm_loss` for the same key) and returns the field
      at ``y`` with the unbiased adjoint term ``x^T f(y)`` (denoising: no
      divergence);
    * ``noisy_data=True``: called with noisy samples ``y`` themselves, it
      returns ``f(y)`` and the adjoint itself, ``(L^+ f)(y) = (y^T f(y) -
      sigma^2 div f(y)) / scale`` (the integration by parts; exact or
      Hutchinson trace). For ``scale = 1`` the loss is then
      ``1/2 SURE(f) + d sigma^2 / 2 - 1/2 E|y|^2``
      (:func:`dsm_jax.losses.sure_loss` with the same trace and key).

    Attributes:
        sigma: noise level, scalar or ``[B]``, > 0.
        scale: signal scale, scalar or ``[B]`` (1 for VE; ``alpha(t)`` for VP).
        noisy_data: the data passed are noisy samples ``y``, not clean ``x``.
        trace: "exact" or "hutchinson" divergence, with ``noisy_data``.
        num_probes: Hutchinson probes, with ``noisy_data``.
    """

    sigma: float | jax.Array
    scale: float | jax.Array = 1.0
    noisy_data: bool = False
    trace: str = "exact"
    num_probes: int = 1

    def __post_init__(self):
        check_choice("trace", self.trace, TRACES)
        check_positive_int("num_probes", self.num_probes)

    def __call__(self, field_fn: Field, x: jax.Array, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """``(f(y), x^T f(y))`` for ``y = scale x + sigma eps``, or ``(f(y), (L^+ f)(y))`` with ``noisy_data``."""
        check_sigma(self.sigma, x.shape[0])
        check_sigma(self.scale, x.shape[0], name="scale")
        runtime_check_positive("sigma", self.sigma)
        sigma_b, scale_b = to_batch(self.sigma, x), to_batch(self.scale, x)
        if self.noisy_data:
            if self.trace == "exact":
                div, value = exact_divergence_and_value(field_fn, x)
            else:
                if key is None:
                    raise ValueError("TweedieOperator(trace='hutchinson') needs a key: pass key=jax.random.key(seed).")
                div, value = hutchinson_divergence_and_value(field_fn, x, key, num_probes=self.num_probes)
            return value, (_sum_per_example(x * value) - sigma_b**2 * div) / scale_b
        if key is None:
            raise ValueError("TweedieOperator needs a key for the noise: pass key=jax.random.key(seed).")
        eps = jax.random.normal(key, x.shape, dtype=x.dtype)
        y = expand_to(scale_b, x) * x + expand_to(sigma_b, x) * eps
        value = field_fn(y)
        if value.shape != x.shape:
            raise ValueError(f"field_fn returned shape {value.shape}, expected {x.shape} (a denoiser of x).")
        return value, _sum_per_example(x * value)


def generalized_score_matching_loss(
    field_fn: Field, x: jax.Array, operator_adjoint: OperatorAdjoint, key: jax.Array | None = None
) -> jax.Array:
    """Generalized score matching: ``E_p[ 1/2 |f|^2 - (L^+ f) ]``, fitting ``f`` to ``L p / p``.

    Equals ``1/2 E_p |f - L p / p|^2`` up to the constant
    ``-1/2 E_p |L p / p|^2`` (independent of ``f``), so its minimiser is
    ``L p / p``; see the module docstring for the derivation.

    The operator is a callable
    ``operator_adjoint(field_fn, x, key) -> (f_values, adjoint)``:

    * it receives the field ``field_fn: [B, *D] -> [B, ...]`` (examples
      treated independently), the data ``x [B, *D]`` (samples of the
      distribution the operator is defined on, or the clean samples behind
      them, as for :class:`TweedieOperator`) and ``key`` (``None`` if none
      was given; an operator that needs one raises);
    * it returns ``f_values [B, ...]``, the field at the points where the
      expectation is taken (the data, or points it draws from them), and
      ``adjoint [B]``, per example an estimate of ``(L^+ f)`` at those points
      whose expectation is ``int f^T L p`` (exact for
      :class:`GradientOperator`, unbiased for :class:`TweedieOperator`).

    The field is evaluated once, by the operator, so the loss's two terms
    share it.

    Args:
        field_fn: the learned field ``f``.
        x: data ``[B, *D]``, floating point.
        operator_adjoint: e.g. ``GradientOperator()`` (value of
            :func:`explicit_score_matching_loss`) or ``TweedieOperator(sigma)``
            (value ``sigma^4 / scale^2 * dsm_loss - 1/2 E|x|^2`` for the
            denoiser of the same score, with the same key).
        key: PRNG key, for operators that sample (noise, probes).

    Returns:
        A scalar (batch mean).

    Example:
        >>> x = jax.random.normal(jax.random.key(0), (512, 2))           # N(0, I)
        >>> loss = generalized_score_matching_loss(lambda z: -z, x, GradientOperator())  # the exact score
        >>> abs(float(loss) + 1.0) < 0.2  # E[1/2 |x|^2 - d] = -1
        True

    References:
        Lyu, UAI 2009; Hyvarinen, JMLR 2005.
    """
    _check_data("x", x)
    if key is not None:
        check_key(key)
    if not callable(operator_adjoint):
        raise ValueError(
            f"operator_adjoint must be a callable (field_fn, x, key) -> (f, adjoint), got {operator_adjoint!r}."
        )
    value, adjoint = operator_adjoint(field_fn, x, key)
    if jnp.shape(adjoint) != (x.shape[0],):
        raise ValueError(
            f"operator_adjoint must return an adjoint term of shape [B]=({x.shape[0]},), got {jnp.shape(adjoint)}."
        )
    return jnp.mean(0.5 * _sum_per_example(value**2) - adjoint)


# ---------------------------------------------------------------------------
# Second-order DSM: the posterior covariance
# ---------------------------------------------------------------------------

SECOND_ORDER_TARGETS = ("centred", "uncentred")
"""The per-sample targets of :func:`second_order_dsm_loss`; both have ``E[T | y] = Cov[x | y]``."""


def _check_covariance_output(out, structure: str, batch: int, dim: int) -> None:
    if structure == "low_rank":
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ValueError(f"a 'low_rank' cov_fn must return (diag [B, D], factor [B, D, r]), got {type(out)}.")
        diag, factor = out
        if diag.shape != (batch, dim) or factor.ndim != 3 or factor.shape[:2] != (batch, dim):
            raise ValueError(
                f"a 'low_rank' cov_fn must return diag {(batch, dim)} and factor {(batch, dim)} + (r,), got "
                f"{diag.shape} and {factor.shape}."
            )
        return
    want = (batch, dim, dim) if structure == "full" else (batch, dim)
    if jnp.shape(out) != want:
        raise ValueError(f"a {structure!r} cov_fn must return shape {want}, got {jnp.shape(out)}.")


def _half_sq_error(out, structure: str, terms) -> jax.Array:
    """``1/2 |C - T|^2 [B]`` for ``T = sum_j s_j a_j a_j^T`` (``terms = [(s_j, a_j [B, D])]``).

    "full" and "low_rank" use the whole Frobenius norm, "diagonal" the
    diagonal entries only (its off-diagonal part would be a constant).
    "low_rank" never forms a ``[D, D]`` matrix: ``|C - T|^2 = |C|^2 - 2 <C, T> + |T|^2``.
    """
    if structure == "diagonal":
        t_diag = sum(s * a**2 for s, a in terms)
        return 0.5 * jnp.sum((out - t_diag) ** 2, axis=-1)
    if structure == "full":
        t = sum(s * a[:, :, None] * a[:, None, :] for s, a in terms)
        return 0.5 * jnp.sum((out - t) ** 2, axis=(1, 2))
    diag, factor = out
    gram = jnp.swapaxes(factor, 1, 2) @ factor  # [B, r, r]
    c_sq = jnp.sum(diag**2, -1) + 2 * jnp.sum(diag * jnp.sum(factor**2, -1), -1) + jnp.sum(gram**2, (1, 2))
    c_t = sum(s * (jnp.sum(diag * a**2, -1) + jnp.sum(jnp.einsum("bdr,bd->br", factor, a) ** 2, -1)) for s, a in terms)
    t_sq = sum(s * r * jnp.sum(a * b, -1) ** 2 for s, a in terms for r, b in terms)
    return 0.5 * (c_sq - 2 * c_t + t_sq)


def second_order_dsm_loss(
    cov_fn,
    x: jax.Array,
    sigma,
    key: jax.Array,
    *,
    denoiser_fn=None,
    score_fn=None,
    structure: str = "full",
    target: str = "centred",
    scale=1.0,
) -> jax.Array:
    """Second-order DSM: ``E 1/2 |C(y, sigma) - T|_F^2``, minimised by ``C = Cov[x | y]``.

    ``y = scale x + sigma eps`` with ``eps = jax.random.normal(key, x.shape)``
    (the noise of :func:`dsm_jax.losses.dsm_loss` for the same key), ``D(y)``
    a first-order denoiser (held fixed: ``jax.lax.stop_gradient``) and the
    per-sample target, with ``r = x - D(y)`` flattened to ``[B, D]``:

    * ``target="centred"``: ``T = r r^T`` (Lu et al. 2022's form);
    * ``target="uncentred"``: ``T = u u^T - m m^T`` with ``u = x - y / scale``
      and ``m = D(y) - y / scale`` (Meng et al. 2021's second-order DSM,
      ``s_2 + s_1 s_1^T ~ (z z^T - I) / sigma^2``, written for the covariance).

    With the exact denoiser both have ``E[T | y] = Cov[x | y]``, so the loss
    is ``1/2 E|C - Cov[x | y]|_F^2`` plus a constant (the target's conditional
    variance): a covariance ``C = Cov + Delta`` costs exactly ``1/2 E|Delta|_F^2``
    more in expectation. The centred target has the smaller variance (its
    excess over the uncentred one is ``2 |m|^2 tr(Cov) + 2 m^T Cov m`` for a
    symmetric posterior), hence the default. With an inexact denoiser the
    centred minimiser is ``Cov + (E[x|y] - D)(E[x|y] - D)^T``.

    The covariance of ``x`` scales like ``sigma^2`` at small sigma: to train
    one model across levels, weight the loss by ``1 / sigma^4`` (or have the
    model output ``sigma^2`` times a unit-scale matrix, as
    :class:`dsm_jax.models.CovarianceMLP` does).

    Args:
        cov_fn: ``cov_fn(y, sigma) -> output`` with ``sigma: [B]``, in the form
            ``structure`` names: "full" ``[B, D, D]``, "diagonal" ``[B, D]``
            (the loss then matches the diagonal only), "low_rank"
            ``(diag [B, D], factor [B, D, r])`` meaning ``diag(c) + U U^T``;
            ``D = prod(*D)``. :func:`dsm_jax.tweedie.learned_posterior_covariance`
            turns a trained one into ``[B, D, D]``.
        x: clean data ``[B, *D]``.
        sigma: scalar or ``[B]`` noise level(s), > 0.
        key: PRNG key for the noise.
        denoiser_fn: ``denoiser_fn(y, sigma) -> E[x | y]`` estimate ``[B, *D]``
            (e.g. ``GaussianMixture.posterior_mean`` or an "x0" model), or
        score_fn: ``score_fn(y, sigma) -> [B, *D]``, the noisy marginal's score;
            its Tweedie denoiser ``(y + sigma^2 s) / scale`` is used. Exactly
            one of the two.
        structure: one of :data:`dsm_jax.tweedie.COVARIANCE_STRUCTURES`.
        target: one of :data:`SECOND_ORDER_TARGETS`.
        scale: signal scale, scalar or ``[B]``.

    Returns:
        A scalar (batch mean of the per-example ``1/2 |C - T|_F^2``).

    References:
        Meng, Song, Li & Ermon, NeurIPS 2021; Lu et al., ICML 2022.
    """
    _check_data("x", x)
    check_sigma(sigma, x.shape[0])
    check_sigma(scale, x.shape[0], name="scale")
    runtime_check_positive("sigma", sigma)
    check_key(key)
    check_choice("structure", structure, COVARIANCE_STRUCTURES)
    check_choice("target", target, SECOND_ORDER_TARGETS)
    if (denoiser_fn is None) == (score_fn is None):
        raise ValueError(
            "second_order_dsm_loss needs exactly one of denoiser_fn= and score_fn= (the first-order model)."
        )
    batch = x.shape[0]
    sigma_b, scale_e = to_batch(sigma, x), to_batch_expanded(scale, x)
    s_e = expand_to(sigma_b, x)
    eps = jax.random.normal(key, x.shape, dtype=x.dtype)
    y = scale_e * x + s_e * eps
    if denoiser_fn is not None:
        denoised, name = denoiser_fn(y, sigma_b), "denoiser_fn"
    else:
        score = cast(Callable[[jax.Array, jax.Array], jax.Array], score_fn)  # exactly one was given
        denoised, name = (y + s_e**2 * score(y, sigma_b)) / scale_e, "score_fn"
    if denoised.shape != x.shape:
        raise ValueError(f"{name} returned shape {denoised.shape}, expected {x.shape}.")
    denoised = jax.lax.stop_gradient(denoised)
    flat = lambda a: a.reshape(batch, -1)
    if target == "centred":
        terms = [(1.0, flat(x - denoised))]
    else:
        terms = [(1.0, flat(x - y / scale_e)), (-1.0, flat(denoised - y / scale_e))]
    out = cov_fn(y, sigma_b)
    _check_covariance_output(out, structure, batch, terms[0][1].shape[1])
    return jnp.mean(_half_sq_error(out, structure, terms))
