"""Guidance: conditional models turned back into unconditional-signature models ``model_fn(x, sigma)``.

A conditional model is ``model_fn(x, sigma, labels) -> out`` with ``labels: [B]``
integers and one reserved *null label* meaning "no label" (the unconditional
model of a network trained with label dropout). The wrappers here fix the labels
and return a plain ``model_fn(x, sigma)``, so every sampler of
:mod:`dsm_jax.samplers` takes a guided model unchanged.

* :func:`classifier_free`: ``(1 + w) out(x, sigma, y) - w out(x, sigma, null)``
  (Ho & Salimans 2022), i.e. the score ``(1 + w) s(x | y) - w s(x)``.
* :func:`classifier_guidance`: ``s(x) + w grad_x log p(y | x, sigma)`` with the
  classifier's gradient by ``jax.grad`` (Dhariwal & Nichol 2021; Song et al.
  2021, controllable generation).
* :func:`exact_conditional_model`, :func:`exact_classifier`: the closed forms of
  both for a :class:`~dsm_jax.distributions.GaussianMixture` whose labels are its
  components, for tests and as references.

References:
    Ho & Salimans, "Classifier-free diffusion guidance", NeurIPS 2021 workshop / arXiv 2207.12598 (2022).
    Dhariwal & Nichol, "Diffusion models beat GANs on image synthesis", NeurIPS 2021.
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, ICLR 2021 (Section 5, controllable generation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax._checks import check_positive_int, is_concrete
from dsm_jax._utils import to_batch, to_batch_expanded
from dsm_jax.distributions import GaussianMixture
from dsm_jax.parameterization import ModelFn, check_parameterization, model_to_score

__all__ = [
    "ConditionalModelFn",
    "classifier_free",
    "classifier_guidance",
    "exact_classifier",
    "exact_conditional_model",
]

ConditionalModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
"""``model_fn(x, sigma, labels) -> out`` with ``x: [B, *D]``, ``sigma: [B]``, ``labels: [B]`` integers."""


def _check_labels(labels) -> jax.Array:
    """Integer labels, a scalar or ``[B]`` (the batch size is checked when the wrapper is called)."""
    dtype = jnp.result_type(labels)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"labels must be integers (a scalar or [B]), got dtype {dtype}.")
    if jnp.ndim(labels) > 1:
        raise ValueError(f"labels must be a scalar or have shape [B], got shape {jnp.shape(labels)}.")
    if is_concrete(labels) and np.any(np.asarray(labels) < 0):
        raise ValueError(f"labels must be >= 0, got {np.asarray(labels).tolist()!r}.")
    return jnp.asarray(labels)


def _labels_for(labels: jax.Array, x: jax.Array) -> jax.Array:
    if labels.ndim == 1 and labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape [B]=({x.shape[0]},) for this x, got shape {labels.shape}.")
    return jnp.broadcast_to(labels, (x.shape[0],))


def _check_scale(scale) -> None:
    """A guidance scale: a scalar, finite and >= 0 when concrete."""
    if jnp.ndim(scale) != 0:
        raise ValueError(f"scale must be a scalar, got shape {jnp.shape(scale)}.")
    if is_concrete(scale):
        value = float(np.asarray(scale))
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"scale must be finite and >= 0, got {scale!r}.")


def classifier_free(model_fn: ConditionalModelFn, labels, scale, *, null_label: int) -> ModelFn:
    """Classifier-free guidance: ``out = (1 + w) out(x, sigma, y) - w out(x, sigma, null_label)``.

    For a score model this is the score ``(1 + w) s(x | y) - w s(x) = s(x | y) +
    w grad_x log p(y | x)`` (an implicit classifier raised to the power ``1 + w``
    in the density, Ho & Salimans 2022, Eq. 6): ``w = 0`` is the conditional
    model, larger ``w`` trades diversity for class fidelity.

    Parameterizations: the combination is applied to the model's *outputs* and
    the result keeps the model's parameterization. Its weights ``1 + w`` and
    ``-w`` sum to 1, and every output-to-score map of
    :mod:`dsm_jax.parameterization` is affine in the output with an offset that
    does not depend on it (``"score"``, ``"eps"``: ``-out / sigma``, ``"x0"``:
    ``(scale out - x) / sigma^2``), so the guided output converts to exactly the
    guided score above. For ``"energy"`` (out ``[B]``) the combined energy's
    gradient is the same combination of the scores (the gradient is linear), so
    it holds too; a parameterization with a non-affine map would not commute.

    Cost: the two evaluations are one call of ``model_fn`` on a batch of
    ``2 B`` (conditional and null labels concatenated), so a sampler's ``nfe``
    counts calls, each twice the batch.

    Args:
        model_fn: ``model_fn(x, sigma, labels) -> out`` (any parameterization).
        labels: integers ``[B]`` or a scalar (the same label for every example).
        scale: the guidance weight ``w``, a scalar ``>= 0``.
        null_label: the label the model was trained to read as "unconditional".

    Returns:
        ``model_fn(x, sigma) -> out``, the same parameterization as ``model_fn``.

    Example:
        >>> guided = classifier_free(cond_model, jnp.array([0, 1]), 2.0, null_label=10)   # doctest: +SKIP
        >>> euler_maruyama(guided, sde, x_init, key, num_steps=500)                       # doctest: +SKIP

    References:
        Ho & Salimans, "Classifier-free diffusion guidance", arXiv 2207.12598 (2022).
    """
    labels = _check_labels(labels)
    _check_scale(scale)
    null_label = check_positive_int("null_label", null_label, minimum=0)

    def guided(x, sigma):
        lab = _labels_for(labels, x)
        sigma = to_batch(sigma, x)
        both = model_fn(
            jnp.concatenate([x, x]),
            jnp.concatenate([sigma, sigma]),
            jnp.concatenate([lab, jnp.full_like(lab, null_label)]),
        )
        cond, uncond = both[: x.shape[0]], both[x.shape[0] :]
        return cond + to_batch_expanded(scale, cond) * (cond - uncond)

    return guided


def classifier_guidance(
    model_fn: ModelFn,
    log_prob_classifier: Callable[[jax.Array, jax.Array], jax.Array],
    labels,
    scale,
    *,
    parameterization: str = "score",
    sde: Any = None,
) -> ModelFn:
    """Classifier guidance: the score ``s(x, sigma) + w grad_x log p(y | x, sigma)``.

    ``log p(y | x, sigma)`` is the log-softmax of the classifier's output at the
    requested labels (so logits and log-probabilities both work), differentiated
    with ``jax.grad`` of its sum over the batch: the classifier must treat the
    examples independently (no batch statistics). With ``w = 1`` and the exact
    classifier of the noised data this is the exact class-conditional score
    ``grad log p_sigma(x | y)`` (Bayes' rule); ``w > 1`` sharpens the classes
    (Dhariwal & Nichol 2021, Section 4).

    The returned model is **"score"-parameterized** whatever ``model_fn``'s
    parameterization (pass ``parameterization="score"`` to the samplers).

    Args:
        model_fn: the unconditional ``model_fn(x, sigma) -> out``.
        log_prob_classifier: ``log_prob_classifier(x, sigma) -> [B, K]``, a
            noise-aware classifier's logits or log-probabilities on noisy ``x``.
        labels: integers ``[B]`` or a scalar.
        scale: the guidance weight ``w``, a scalar ``>= 0``.
        parameterization: what ``model_fn`` outputs ("score", "eps", "x0", "energy").
        sde: for "x0" models, the :class:`dsm_jax.sde.SDE` whose
            ``scale_for_sigma`` gives the signal scale at each sigma; None
            means scale 1 (variance exploding).

    Returns:
        ``score_fn(x, sigma) -> [B, *D]`` ("score" parameterization).

    References:
        Dhariwal & Nichol, "Diffusion models beat GANs on image synthesis", NeurIPS 2021, Algorithm 1.
        Song et al., ICLR 2021, Eq. (14) (controllable generation).
    """
    labels = _check_labels(labels)
    _check_scale(scale)
    check_parameterization(parameterization)
    if not callable(log_prob_classifier):
        raise ValueError(f"log_prob_classifier must be callable, got {log_prob_classifier!r}.")

    def log_likelihood(x, sigma, lab):
        logp = jax.nn.log_softmax(log_prob_classifier(x, sigma), axis=-1)
        if logp.shape[:1] != x.shape[:1] or logp.ndim != 2:
            raise ValueError(f"log_prob_classifier must return shape [B, K] with B={x.shape[0]}, got {logp.shape}.")
        return jnp.sum(jnp.take_along_axis(logp, lab[:, None], axis=1))

    def score_fn(x, sigma):
        lab = _labels_for(labels, x)
        sigma = to_batch(sigma, x)
        signal_scale = 1.0 if sde is None else sde.scale_for_sigma(sigma).astype(x.dtype)
        score = model_to_score(model_fn, x, sigma, parameterization, scale=signal_scale)
        grad = jax.grad(log_likelihood)(x, sigma, lab)
        return score + jnp.asarray(scale, x.dtype) * grad

    return score_fn


def _signal_scale(sde, sigma: jax.Array) -> jax.Array:
    return jnp.ones_like(sigma) if sde is None else sde.scale_for_sigma(sigma).astype(sigma.dtype)


def exact_conditional_model(mixture: GaussianMixture, *, sde: Any = None, null_label: int | None = None):
    """The exact conditional score model ``model_fn(x, sigma, labels)`` of a mixture labelled by component.

    For label ``k`` it returns the score of component ``k`` noised to
    ``sigma`` (``grad log N(x; scale mu_k, scale^2 Sigma_k + sigma^2 I)``); for
    ``null_label`` (default ``K``, one past the last component) the score of
    the whole noised mixture, as a network trained with label dropout would.
    "score" parameterization.

    Args:
        mixture: a :class:`~dsm_jax.distributions.GaussianMixture`.
        sde: the SDE whose ``scale_for_sigma`` gives the signal scale (None: 1, variance exploding).
        null_label: the unconditional label (default ``mixture.num_components``).

    Returns:
        ``model_fn(x, sigma, labels) -> [B, d]``.
    """
    if not isinstance(mixture, GaussianMixture):
        raise ValueError(f"mixture must be a GaussianMixture, got {type(mixture).__name__}.")
    num = mixture.num_components
    null = num if null_label is None else check_positive_int("null_label", null_label, minimum=0)
    if null < num:
        raise ValueError(f"null_label must not be a component index (< {num}), got {null}.")

    def one(xi, si, ai, li):
        noised = mixture.convolve(si, scale=ai)
        comp = noised.component_scores(xi[None])[0]
        return jnp.where(li == null, noised.score(xi[None])[0], comp[jnp.clip(li, 0, num - 1)])

    def model_fn(x, sigma, labels):
        sigma = to_batch(sigma, x)
        return jax.vmap(one)(x, sigma, _signal_scale(sde, sigma), _labels_for(_check_labels(labels), x))

    return model_fn


def exact_classifier(mixture: GaussianMixture, *, sde: Any = None):
    """The Bayes classifier of the noised mixture: ``log_prob_classifier(x, sigma) = log p(k | x_sigma) -> [B, K]``.

    With :func:`classifier_guidance` at ``scale=1`` on the mixture's exact score
    it gives the exact conditional score of :func:`exact_conditional_model`.
    """
    if not isinstance(mixture, GaussianMixture):
        raise ValueError(f"mixture must be a GaussianMixture, got {type(mixture).__name__}.")

    def log_prob_classifier(x, sigma):
        sigma = to_batch(sigma, x)
        one = lambda xi, si, ai: mixture.convolve(si, scale=ai).log_responsibilities(xi[None])[0]
        return jax.vmap(one)(x, sigma, _signal_scale(sde, sigma))

    return log_prob_classifier
