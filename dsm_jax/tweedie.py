"""Tweedie's formulas: the posterior mean and covariance of clean data from a score.

For ``y = scale * x + sigma * eps`` with ``eps ~ N(0, I)`` and ``s(y) =
grad_y log p_sigma(y)`` the score of the noisy marginal,

* ``E[x | y]   = (y + sigma^2 s(y)) / scale``                 (first order),
* ``Cov[x | y] = (sigma^2 I + sigma^4 d s / d y) / scale^2``  (second order).

The first makes every score model a denoiser (the Bayes-optimal one when the
score is exact); the second is the derivative of the first,
``Cov[x | y] = sigma^2 / scale * d E[x | y] / d y``, here computed with one
``jax.jvp`` per data dimension (meant for small dimensions).

A model trained for the covariance itself (second-order DSM,
:func:`dsm_jax.losses.second_order_dsm_loss`, with a head such as
:class:`dsm_jax.models.CovarianceMLP`) gives the same ``[B, D, D]`` through
:func:`learned_posterior_covariance`, one model call and no Jacobian; code that
needs ``Cov[x | y]`` (a PiGDM-type inverse solver, say) can take either as a
callable ``(x_noisy, sigma) -> [B, D, D]``.

References:
    Efron, "Tweedie's formula and selection bias", JASA 2011.
    Robbins, "An empirical Bayes approach to statistics", 1956.
    Vincent, Neural Computation 2011 (score <-> denoiser).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dsm_jax._checks import check_batched, check_choice, check_floating, check_same_shape, check_sigma
from dsm_jax._utils import to_batch, to_batch_expanded
from dsm_jax.parameterization import ModelFn, ScoreFn, as_score_fn

__all__ = [
    "COVARIANCE_STRUCTURES",
    "dense_covariance",
    "denoise",
    "learned_posterior_covariance",
    "posterior_covariance",
    "posterior_mean",
]

COVARIANCE_STRUCTURES = ("full", "diagonal", "low_rank")
"""How a covariance model's output encodes a ``[B, D, D]`` covariance (see :func:`dense_covariance`)."""


def _per_example(value, x: jax.Array, name: str) -> jax.Array:
    """A scalar or ``[B]`` value as ``[B, 1, ...]`` to broadcast against ``x``."""
    check_sigma(value, x.shape[0], name=name)
    return to_batch_expanded(value, x)


def _check_inputs(score_fn, x_noisy, sigma, scale):
    check_batched("x_noisy", x_noisy)
    check_floating("x_noisy", x_noisy)
    sigma_b = _per_example(sigma, x_noisy, "sigma")
    scale_b = _per_example(scale, x_noisy, "scale")
    check_same_shape("score_fn", jax.eval_shape(score_fn, x_noisy), x_noisy.shape, "the shape of x_noisy")
    return sigma_b, scale_b


def posterior_mean(score_fn: ScoreFn, x_noisy: jax.Array, sigma, *, scale: float | jax.Array = 1.0) -> jax.Array:
    """Tweedie's denoiser ``E[x | y] = (y + sigma^2 s(y)) / scale``.

    Args:
        score_fn: ``score_fn(y) -> [B, *D]``, the score of the noisy marginal
            at this noise level (e.g. ``lambda y: model_score(y, sigma)``).
        x_noisy: ``y = scale * x + sigma * eps``, ``[B, *D]``.
        sigma: noise standard deviation, scalar or ``[B]``.
        scale: signal scale, scalar or ``[B]`` (1 for VE; ``scale(t)`` for VP).

    Returns:
        ``[B, *D]``.

    Example:
        >>> from dsm_jax.distributions import Gaussian
        >>> g = Gaussian(jnp.zeros(2), jnp.ones(2))           # x ~ N(0, I)
        >>> y = jnp.ones((1, 2))
        >>> posterior_mean(g.convolve(1.0).score, y, 1.0)    # shrinks y by 1/2
        Array([[0.5, 0.5]], dtype=float32)

    References:
        Efron, JASA 2011.
    """
    sigma_b, scale_b = _check_inputs(score_fn, x_noisy, sigma, scale)
    return (x_noisy + sigma_b**2 * score_fn(x_noisy)) / scale_b


def _batched_jacobian(fn: ScoreFn, x: jax.Array) -> jax.Array:
    """Per-example Jacobians ``[B, D, D]`` of a batched map acting on examples independently."""
    batch, dim = x.shape[0], math.prod(x.shape[1:])
    _, jvp_fn = jax.linearize(fn, x)
    basis = jnp.eye(dim, dtype=x.dtype).reshape((dim,) + x.shape[1:])
    # Column i of every example's Jacobian: J_b e_i, with e_i broadcast over the batch.
    columns = jax.vmap(lambda e: jvp_fn(jnp.broadcast_to(e, x.shape)).reshape(batch, dim))(basis)
    return jnp.transpose(columns, (1, 2, 0))


def posterior_covariance(score_fn: ScoreFn, x_noisy: jax.Array, sigma, *, scale: float | jax.Array = 1.0) -> jax.Array:
    """Second-order Tweedie: ``Cov[x | y] = (sigma^2 I + sigma^4 J_s(y)) / scale^2``.

    ``J_s = d s / d y`` is built column by column with ``jax.jvp`` (one per
    data dimension, vmapped), so this is meant for small ``D``. The exact
    score has a symmetric Jacobian; the result is symmetrised
    (``(C + C^T) / 2``) so that a learned score gives a symmetric estimate.

    Args:
        score_fn: the score of the noisy marginal, ``[B, *D] -> [B, *D]``,
            examples treated independently.
        x_noisy: ``[B, *D]``.
        sigma: scalar or ``[B]``.
        scale: scalar or ``[B]``.

    Returns:
        ``[B, D, D]`` with ``D = prod(*D)`` (the flattened data dimension).

    References:
        Efron, JASA 2011 (Section 7, higher moments);
        Meng, Song, Li & Ermon, "Estimating high order gradients of the data
        distribution by denoising", NeurIPS 2021.
    """
    sigma_b, scale_b = _check_inputs(score_fn, x_noisy, sigma, scale)
    sigma_b, scale_b = sigma_b.reshape(-1, 1, 1), scale_b.reshape(-1, 1, 1)
    jac = _batched_jacobian(score_fn, x_noisy)
    jac = 0.5 * (jac + jnp.swapaxes(jac, 1, 2))
    eye = jnp.eye(jac.shape[-1], dtype=jac.dtype)
    return (sigma_b**2 * eye + sigma_b**4 * jac) / scale_b**2


def denoise(
    model_fn: ModelFn, x_noisy: jax.Array, sigma, *, parameterization: str = "score", scale: float | jax.Array = 1.0
) -> jax.Array:
    """The denoiser of a trained model: Tweedie's ``E[x | y]`` with its score.

    ``model_fn(y, sigma)`` is converted to a score once, with
    :func:`dsm_jax.parameterization.as_score_fn`; an "x0" model thus
    returns its own output, an "eps" model ``(y - sigma eps_hat) / scale``.

    Args:
        model_fn: ``model_fn(x, sigma) -> out`` with ``sigma: [B]``.
        x_noisy: ``[B, *D]``.
        sigma: scalar or ``[B]``: the noise level of ``x_noisy``.
        parameterization: "score", "eps", "x0" or "energy".
        scale: the signal scale of ``x_noisy``.

    Returns:
        ``[B, *D]``.
    """
    check_batched("x_noisy", x_noisy)
    check_floating("x_noisy", x_noisy)
    check_sigma(sigma, x_noisy.shape[0])
    score_fn = as_score_fn(model_fn, parameterization=parameterization, scale=scale)
    return posterior_mean(lambda y: score_fn(y, sigma), x_noisy, sigma, scale=scale)


def dense_covariance(output, structure: str = "full") -> jax.Array:
    """A covariance model's output as dense ``[B, D, D]`` matrices.

    * ``"full"``: ``output`` is ``C [B, D, D]``, returned as is;
    * ``"diagonal"``: ``output`` is ``c [B, D]``, ``C = diag(c)``;
    * ``"low_rank"``: ``output`` is ``(c [B, D], U [B, D, r])``, ``C = diag(c) + U U^T``.

    Args:
        output: the model output in the form ``structure`` names.
        structure: one of :data:`COVARIANCE_STRUCTURES`.

    Returns:
        ``[B, D, D]``.
    """
    check_choice("structure", structure, COVARIANCE_STRUCTURES)
    if structure == "low_rank":
        if not (isinstance(output, (tuple, list)) and len(output) == 2):
            raise ValueError(f"a 'low_rank' covariance is a pair (diag [B, D], factor [B, D, r]), got {type(output)}.")
        diag, factor = output
        if jnp.ndim(diag) != 2 or jnp.shape(factor)[:2] != jnp.shape(diag) or jnp.ndim(factor) != 3:
            raise ValueError(
                f"a 'low_rank' covariance needs diag [B, D] and factor [B, D, r], got shapes "
                f"{jnp.shape(diag)} and {jnp.shape(factor)}."
            )
        return jax.vmap(jnp.diag)(diag) + factor @ jnp.swapaxes(factor, 1, 2)
    want = 3 if structure == "full" else 2
    if jnp.ndim(output) != want or (structure == "full" and output.shape[1] != output.shape[2]):
        shape = "[B, D, D]" if structure == "full" else "[B, D]"
        raise ValueError(f"a {structure!r} covariance must have shape {shape}, got {jnp.shape(output)}.")
    return output if structure == "full" else jax.vmap(jnp.diag)(output)


def learned_posterior_covariance(covariance_fn, x_noisy: jax.Array, sigma, *, structure: str = "full") -> jax.Array:
    """``Cov[x | y]`` from a model trained for it, as dense ``[B, D, D]``.

    The learned counterpart of :func:`posterior_covariance`: ``covariance_fn``
    is a model ``(x_noisy [B, *D], sigma [B]) -> output`` trained with
    :func:`dsm_jax.losses.second_order_dsm_loss` (whose minimiser is
    ``Cov[x | y]``, so the signal scale is already in the model), its output
    in the form ``structure`` names (:func:`dense_covariance`). One model
    call, no Jacobian: this is what makes a covariance usable at high ``D``.

    Args:
        covariance_fn: ``covariance_fn(x_noisy, sigma) -> output``, ``sigma: [B]``.
        x_noisy: ``[B, *D]``.
        sigma: scalar or ``[B]``.
        structure: one of :data:`COVARIANCE_STRUCTURES`.

    Returns:
        ``[B, D, D]`` with ``D = prod(*D)``.

    Example:
        >>> cov_fn = lambda y, s: jnp.broadcast_to(s[:, None] ** 2 / 2, y.shape)  # N(0, I) data, diagonal
        >>> learned_posterior_covariance(cov_fn, jnp.zeros((1, 2)), 1.0, structure="diagonal")
        Array([[[0.5, 0. ],
                [0. , 0.5]]], dtype=float32)

    References:
        Meng, Song, Li & Ermon, NeurIPS 2021.
    """
    check_batched("x_noisy", x_noisy)
    check_floating("x_noisy", x_noisy)
    check_sigma(sigma, x_noisy.shape[0])
    check_choice("structure", structure, COVARIANCE_STRUCTURES)
    sigma_b = to_batch(sigma, x_noisy)
    cov = dense_covariance(covariance_fn(x_noisy, sigma_b), structure)
    dim = math.prod(x_noisy.shape[1:])
    if cov.shape != (x_noisy.shape[0], dim, dim):
        raise ValueError(
            f"covariance_fn gave covariances of shape {cov.shape}, expected {(x_noisy.shape[0], dim, dim)} "
            f"for x_noisy of shape {x_noisy.shape}."
        )
    return cov
