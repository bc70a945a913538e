"""Model outputs to scores: the one place where a parameterization is converted.

A model is a callable ``model_fn(x, sigma) -> array`` with ``x: [B, *D]`` and
``sigma: [B]``. Its output means different things depending on how it was
trained. For the noising ``x_noisy = scale * x0 + sigma * eps`` the score of
the noisy marginal is recovered as

* ``"score"``:  ``s = out``
* ``"eps"``:    ``s = -out / sigma``                   (out predicts eps)
* ``"x0"``:     ``s = (scale * out - x_noisy) / sigma^2`` (out predicts x0)
* ``"v"``:      ``s = -(scale * out + sigma * x_noisy) / sigma`` (out predicts
  ``v = scale * eps - sigma * x0``; defined for VP-type noising only, see below)
* ``"energy"``: ``s = -grad_x E(x, sigma)``            (out is a scalar energy
  per example, shape ``[B]``, as in energy-based models)

The velocity ``v`` (Salimans & Ho 2022) is defined for variance-preserving
noising, ``scale^2 + sigma^2 = 1``: then ``eps = scale v + sigma x_noisy`` and
``x0 = scale x_noisy - sigma v``, so the score is ``-eps / sigma`` as above.
Elsewhere these identities fail (with ``scale = 1``, the variance-exploding
noising, ``scale^2 + sigma^2 = 1 + sigma^2``), so "v" is refused there: a
concrete ``scale`` must lie in ``[0, 1)`` (``scale = 1`` is VE, and ``sigma > 0``
forces ``scale < 1``), and when ``sigma`` is concrete too,
``|scale^2 + sigma^2 - 1|`` must be at most :data:`V_TOLERANCE`. A traced
pair (inside ``jit``) is the caller's: the VP SDEs of :mod:`dsm_jax.sde` give
``(scale(t), sigma(t))`` on the unit circle.

The inverse maps (:func:`score_to_output`) turn a score back into each
output, so one exact model can be written in every parameterization
(:func:`convert_model`); the tests check the round trips.

References:
    Vincent, "A connection between score matching and denoising autoencoders",
    Neural Computation 2011 (score <-> denoiser).
    Ho, Jain & Abbeel, "Denoising diffusion probabilistic models", NeurIPS 2020
    (eps-prediction).
    Salimans & Ho, "Progressive distillation for fast sampling of diffusion
    models", ICLR 2022 (v-prediction, appendix D).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax._checks import check_choice, is_concrete
from dsm_jax._utils import expand_to, to_batch, to_batch_expanded

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
ScoreFn = Callable[[jax.Array], jax.Array]

V_TOLERANCE = 1e-4
"""How far ``scale^2 + sigma^2`` may be from 1 for ``parameterization="v"`` (float32 VP marginals are ~1e-7 off)."""


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
    if parameterization == "v":
        # eps = scale v + sigma x_noisy (scale^2 + sigma^2 = 1), s = -eps / sigma
        return -to_batch_expanded(scale, x) * out / s - x
    raise ValueError(f"parameterization {parameterization!r} has no direct output-to-score map.")


def score_to_output(
    score: jax.Array, x: jax.Array, sigma: jax.Array, parameterization: str, *, scale: float | jax.Array = 1.0
) -> jax.Array:
    """The inverse of :func:`output_to_score`: what a ``parameterization`` model outputs for ``score``.

    * "score": ``score``; "eps": ``-sigma s``; "x0": ``(x_noisy + sigma^2 s) / scale``
      (Tweedie's formula);
    * "v": ``scale eps - sigma x0 = -sigma (s + x_noisy) / scale`` (with ``scale^2 + sigma^2 = 1``).

    "x0" and "v" divide by ``scale``: at ``scale = 0`` (a VP process at its
    pure-noise end) the score says nothing about ``x0``. ``sigma`` is ``[B]``.
    """
    s = expand_to(sigma, x)
    if parameterization == "score":
        return score
    if parameterization == "eps":
        return -s * score
    if parameterization == "x0":
        return (x + s**2 * score) / to_batch_expanded(scale, x)
    if parameterization == "v":
        check_v_noising(scale, sigma)
        return -s * (score + x) / to_batch_expanded(scale, x)
    raise ValueError(f"parameterization {parameterization!r} has no score-to-output map.")


def check_v_noising(scale, sigma=None) -> None:
    """``ValueError`` unless the noising ``scale x0 + sigma eps`` is variance-preserving, where "v" is defined.

    Concrete values only (traced ones pass): ``scale`` in ``[0, 1)``, and
    ``|scale^2 + sigma^2 - 1| <= V_TOLERANCE`` when ``sigma`` is concrete too.
    """
    if not is_concrete(scale):
        return
    a = np.asarray(scale, dtype=np.float64)
    if not np.all((a >= 0) & (a < 1)):
        raise ValueError(
            f"parameterization='v' (v = scale*eps - sigma*x0) is defined for variance-preserving noising "
            f"(scale^2 + sigma^2 = 1), got scale={_shown(a)}; scale=1 is variance-exploding noising, where v is "
            "not defined: use 'x0', 'eps' or 'score' there, or a VP process (dsm_jax.sde.VPSDE)."
        )
    if sigma is None or not is_concrete(sigma):
        return
    total = a**2 + np.asarray(sigma, dtype=np.float64) ** 2
    if not np.all(np.abs(total - 1.0) <= V_TOLERANCE):
        raise ValueError(
            f"parameterization='v' needs scale^2 + sigma^2 = 1 (variance-preserving noising), got "
            f"scale^2 + sigma^2 = {_shown(total)} for scale={_shown(a)}."
        )


def _shown(a: np.ndarray) -> str:
    return f"{a.min():.6g}" if a.min() == a.max() else f"array(min={a.min():.6g}, max={a.max():.6g})"


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


def _v_score(model_fn: ModelFn, x: jax.Array, sigma: jax.Array, scale) -> jax.Array:
    check_v_noising(scale, sigma)
    return _output_score("v")(model_fn, x, sigma, scale)


# The one table of parameterizations: name -> (model_fn, x, sigma [B], scale) -> score.
_TO_SCORE = {
    "score": _output_score("score"),
    "eps": _output_score("eps"),
    "x0": _output_score("x0"),
    "v": _v_score,
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
        parameterization: "score", "eps", "x0", "v" or "energy".
        scale: the signal scale of the noising (VP-type SDEs); "x0" and "v" use it
            ("v" needs ``scale^2 + sigma^2 = 1``).
    """
    check_parameterization(parameterization)
    return model_to_score(model_fn, x, broadcast_sigma(sigma, x), parameterization, scale=scale)


def as_score_fn(model_fn: ModelFn, *, parameterization: str = "score", scale: float | jax.Array = 1.0) -> ModelFn:
    """Wraps a model into ``score_fn(x, sigma) -> score`` of the same signature."""
    check_parameterization(parameterization)
    if parameterization == "v":
        check_v_noising(scale)

    def score_fn(x, sigma):
        return model_to_score(model_fn, x, broadcast_sigma(sigma, x), parameterization, scale=scale)

    return score_fn


def convert_model(model_fn: ModelFn, *, parameterization: str, target: str, scale: float | jax.Array = 1.0) -> ModelFn:
    """``model_fn`` (outputs of ``parameterization``) rewritten as a model whose outputs mean ``target``.

    The output is converted to a score and back (:func:`score_to_output`), so
    ``score_from_model(convert_model(m, parameterization=p, target=q), x, sigma,
    parameterization=q)`` is the score of ``m`` (to float rounding). ``target``
    is "score", "eps", "x0" or "v" ("energy" has no pointwise output).

    Example:
        >>> score = lambda x, sigma: -x / (1.0 + sigma[:, None] ** 2)  # exact for N(0, I)
        >>> denoiser = convert_model(score, parameterization="score", target="x0")
        >>> denoiser(jnp.ones((1, 2)), 1.0)  # E[x0 | x_noisy] = x_noisy / 2
        Array([[0.5, 0.5]], dtype=float32)
    """
    check_parameterization(parameterization)
    check_choice("target", target, tuple(p for p in PARAMETERIZATIONS if p != "energy"))
    if target == "v":
        check_v_noising(scale)

    def converted(x, sigma):
        sigma = broadcast_sigma(sigma, x)
        score = model_to_score(model_fn, x, sigma, parameterization, scale=scale)
        return score_to_output(score, x, sigma, target, scale=scale)

    return converted
