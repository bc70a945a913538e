"""EDM preconditioning: a raw network ``F(x, c_noise)`` wrapped into a denoiser ``D(x, sigma)`` (Karras et al. 2022).

``D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))``
with the coefficients of EDM Table 1 ("Ours"), ``s = sigma``, ``sd = sigma_data``:

* ``c_skip = sd^2 / (s^2 + sd^2)``: the skip connection, 1 at small sigma
  (the noisy input is nearly clean) and 0 at large sigma (it is nearly noise);
* ``c_out = s sd / sqrt(s^2 + sd^2)``: the network's output scale;
* ``c_in = 1 / sqrt(s^2 + sd^2)``: the input scale, so that ``c_in x`` has unit
  variance when the data have standard deviation ``sd``;
* ``c_noise = log(s) / 4``: the conditioning input.

With these, the training target of ``F``, ``(x0 - c_skip x) / c_out``, has unit
variance at every sigma (EDM section 5 and appendix B.6), and the EDM loss
weight ``lambda = (s^2 + sd^2) / (s sd)^2`` equals ``1 / c_out^2``, so every
sigma contributes an O(1) loss on ``F``. The wrapped model outputs an estimate
of ``x0``: use it with ``parameterization="x0"`` everywhere (samplers,
:func:`dsm_jax.tweedie.denoise`, the metrics).

The library's networks (:class:`dsm_jax.models.NoiseConditionalMLP`,
:class:`dsm_jax.models.UNet`) take ``(x, sigma)`` and embed ``log sigma``
themselves (Fourier or sinusoidal features, :mod:`dsm_jax.models.embeddings`).
:func:`edm_model_fn` passes them ``exp(c_noise) = sigma^(1/4)`` as their
``sigma``, so their own embedding sees ``log(exp(c_noise)) = c_noise``: exactly
EDM's conditioning input, a positive number (their input checks ask for
``sigma > 0``), and the features of ``log sigma / 4`` vary four times slower
in ``log sigma`` than a plain network's, which suits the low-frequency Fourier
features the MLP defaults to (``fourier_scale=1``) over EDM's wide log-normal
range of sigma. Any other network is wrapped by :func:`edm_precondition`
directly as ``F(x, c_noise)``.

References:
    Karras, Aittala, Aila & Laine, "Elucidating the design space of
    diffusion-based generative models", NeurIPS 2022 (Table 1, section 5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsm_jax._checks import check_positive_number
from dsm_jax._utils import expand_to, to_batch

__all__ = ["EDMCoefficients", "edm_coefficients", "edm_model_fn", "edm_precondition"]


class EDMCoefficients(NamedTuple):
    """The four preconditioning coefficients of EDM Table 1, each shaped like ``sigma``."""

    c_skip: jax.Array
    c_out: jax.Array
    c_in: jax.Array
    c_noise: jax.Array


def edm_coefficients(sigma, sigma_data: float = 0.5) -> EDMCoefficients:
    """``(c_skip, c_out, c_in, c_noise)`` of EDM Table 1 at ``sigma`` (any shape, > 0).

    Written with ``r = sqrt(sigma^2 + sigma_data^2)`` computed as ``hypot``, so
    no square overflows or underflows (float32 is finite for sigma from about
    1e-38 to 3e38): ``c_skip = (sigma_data / r)^2``, ``c_out = sigma
    (sigma_data / r)``, ``c_in = 1 / r``, ``c_noise = log(sigma) / 4``.

    Example:
        >>> c = edm_coefficients(jnp.array([0.5]))   # sigma = sigma_data
        >>> [round(float(v[0]), 4) for v in c]
        [0.5, 0.3536, 1.4142, -0.1733]
    """
    check_positive_number("sigma_data", sigma_data)
    sigma = jnp.asarray(sigma)
    r = jnp.hypot(sigma, sigma_data)
    ratio = sigma_data / r
    return EDMCoefficients(ratio**2, sigma * ratio, 1.0 / r, jnp.log(sigma) / 4.0)


def edm_precondition(apply_fn: Callable[[jax.Array, jax.Array], jax.Array], sigma_data: float = 0.5):
    """The EDM denoiser ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` of a raw network ``F``.

    Args:
        apply_fn: the raw network ``F(x, c_noise) -> [B, *D]`` with ``c_noise = log(sigma) / 4`` of shape ``[B]``.
        sigma_data: the standard deviation of the data (0.5 for images in [-1, 1], EDM's choice).

    Returns:
        ``denoiser(x, sigma) -> [B, *D]``, a model with ``parameterization="x0"``;
        ``sigma`` a scalar or ``[B]``.

    Example:
        >>> denoiser = edm_precondition(lambda x, c_noise: jnp.zeros_like(x))
        >>> denoiser(jnp.ones((1, 2)), 0.5).round(4)  # F = 0: D = c_skip x = x / 2 at sigma = sigma_data
        Array([[0.5, 0.5]], dtype=float32)
    """
    check_positive_number("sigma_data", sigma_data)
    if not callable(apply_fn):
        raise ValueError(f"apply_fn must be a callable F(x, c_noise), got {type(apply_fn).__name__}.")

    def denoiser(x, sigma):
        sigma = to_batch(sigma, x)
        c = edm_coefficients(sigma, sigma_data)
        out = apply_fn(expand_to(c.c_in, x) * x, c.c_noise)
        if out.shape != x.shape:
            raise ValueError(f"apply_fn returned shape {out.shape}, expected the input's shape {x.shape}.")
        return expand_to(c.c_skip, x) * x + expand_to(c.c_out, x) * out

    return denoiser


def edm_model_fn(model: nn.Module, params: Any, *, sigma_data: float = 0.5, labels=None, dropout_rng=None):
    """:func:`edm_precondition` of a library network ``model(x, sigma)`` (which embeds ``log sigma`` itself).

    ``F(x, c_noise) = model.apply(params, x, exp(c_noise))``: the network's
    embedding of ``log`` of its second input sees ``c_noise`` (module docstring).
    ``labels`` (a conditional network's ``[B]`` labels) are closed over:
    ``model.apply(params, x, exp(c_noise), labels)``.
    ``dropout_rng``: as in :func:`dsm_jax.models.make_model_fn` (``None``: deterministic).

    Returns:
        ``denoiser(x, sigma)``, ``parameterization="x0"``.
    """
    train_kwargs = {} if dropout_rng is None else {"train": True, "rngs": {"dropout": dropout_rng}}

    def apply_fn(x, c_noise):
        args = (x, jnp.exp(c_noise)) if labels is None else (x, jnp.exp(c_noise), labels)
        return cast(jax.Array, model.apply({"params": params}, *args, **train_kwargs))

    return edm_precondition(apply_fn, sigma_data)
