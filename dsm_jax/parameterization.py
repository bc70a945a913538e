"""Model outputs to scores: the one place where a parameterization is converted.

A model is a callable ``model_fn(x, sigma) -> array`` with ``x: [B, *D]`` and
``sigma: [B]``. Its output means different things depending on how it was
trained. For the noising ``x_noisy = scale * x0 + sigma * eps`` the score of
the noisy marginal is recovered as

* ``"score"``:  ``s = out``
* ``"eps"``:    ``s = -out / sigma``                   (out predicts eps)
* ``"x0"``:     ``s = (scale * out - x_noisy) / sigma^2`` (out predicts x0)
* ``"energy"``: ``s = -grad_x E(x, sigma)``            (out is a scalar energy
  per example, shape ``[B]``, as in energy-based models)

References:
    Vincent, "A connection between score matching and denoising autoencoders",
    Neural Computation 2011 (score <-> denoiser).
    Ho, Jain & Abbeel, "Denoising diffusion probabilistic models", NeurIPS 2020
    (eps-prediction).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dsm_jax._checks import check_choice
from dsm_jax._utils import expand_to, to_batch, to_batch_expanded

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
ScoreFn = Callable[[jax.Array], jax.Array]


def broadcast_sigma(sigma, x: jax.Array) -> jax.Array:
    """Returns sigma as shape ``[B]`` (from a scalar or ``[B]``)."""
    return to_batch(sigma, x)


def output_to_score(
    out: jax.Array, x: jax.Array, sigma: jax.Array, parameterization: str, *, scale: float | jax.Array = 1.0
) -> jax.Array:
    """Converts a model output (not "energy") to a score; sigma is ``[B]``."""
    s = expand_to(sigma, x)
    if parameterization == "score":
        return out
    if parameterization == "eps":
        return -out / s
    if parameterization == "x0":
        return (to_batch_expanded(scale, x) * out - x) / s**2
    raise ValueError(f"parameterization {parameterization!r} has no direct output-to-score map.")


def _energy_score(model_fn: ModelFn, x: jax.Array, sigma: jax.Array, scale) -> jax.Array:
    del scale  # an energy's gradient is the score whatever the signal scale

    def total_energy(z):
        energy = model_fn(z, sigma)
        if energy.shape != (x.shape[0],):
            raise ValueError(f"an 'energy' model must return shape [B]=({x.shape[0]},), got {energy.shape}.")
        return jnp.sum(energy)

    return -jax.grad(total_energy)(x)


def _output_score(parameterization: str):
    def to_score(model_fn: ModelFn, x: jax.Array, sigma: jax.Array, scale) -> jax.Array:
        out = model_fn(x, sigma)
        if out.shape != x.shape:
            raise ValueError(
                f"model_fn returned shape {out.shape}, expected the input's shape {x.shape} "
                f"for parameterization={parameterization!r}."
            )
        return output_to_score(out, x, sigma, parameterization, scale=scale)

    return to_score


# The one table of parameterizations: name -> (model_fn, x, sigma [B], scale) -> score.
_TO_SCORE = {
    "score": _output_score("score"),
    "eps": _output_score("eps"),
    "x0": _output_score("x0"),
    "energy": _energy_score,
}
PARAMETERIZATIONS = tuple(_TO_SCORE)


def check_parameterization(parameterization: str) -> str:
    return check_choice("parameterization", parameterization, PARAMETERIZATIONS)


def model_to_score(
    model_fn: ModelFn, x: jax.Array, sigma: jax.Array, parameterization: str, *, scale: float | jax.Array = 1.0
) -> jax.Array:
    """:func:`score_from_model` for checked inputs: ``sigma`` already ``[B]``, ``parameterization`` validated.

    For the library's private helpers, which validate once at their public
    entry (with :func:`check_parameterization`) and then call this per level
    or per step without checking again.
    """
    return _TO_SCORE[parameterization](model_fn, x, sigma, scale)


def score_from_model(
    model_fn: ModelFn, x: jax.Array, sigma, *, parameterization: str = "score", scale: float | jax.Array = 1.0
) -> jax.Array:
    """Evaluates ``model_fn(x, sigma)`` and returns the score ``[B, *D]``.

    Args:
        model_fn: ``model_fn(x, sigma) -> out`` with ``sigma: [B]``.
        x: noisy input ``[B, *D]``.
        sigma: scalar or ``[B]`` noise level(s).
        parameterization: "score", "eps", "x0" or "energy".
        scale: the signal scale of the noising (VP-type SDEs); only "x0" uses it.
    """
    check_parameterization(parameterization)
    return model_to_score(model_fn, x, broadcast_sigma(sigma, x), parameterization, scale=scale)


def as_score_fn(model_fn: ModelFn, *, parameterization: str = "score", scale: float | jax.Array = 1.0) -> ModelFn:
    """Wraps a model into ``score_fn(x, sigma) -> score`` of the same signature."""
    check_parameterization(parameterization)

    def score_fn(x, sigma):
        return model_to_score(model_fn, x, broadcast_sigma(sigma, x), parameterization, scale=scale)

    return score_fn
