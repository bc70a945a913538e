"""Embeddings of the noise level: features of ``log sigma`` for conditioning a network.

A noise-conditional network sees ``sigma`` through a fixed feature map of
``v = log sigma`` (the log makes geometric schedules evenly spaced):

* sinusoidal (Vaswani et al. 2017; Ho et al. 2020's time embedding):
  ``[sin(scale * v * w_i), cos(scale * v * w_i)]`` with
  ``w_i = max_period^(-i / half)``, ``i = 0..half-1``;
* Gaussian Fourier features (Tancik et al. 2020; Song et al. 2021, NCSN++):
  ``[sin(2 pi v W), cos(2 pi v W)]`` with fixed ``W ~ N(0, scale^2)``.

References:
    Vaswani et al., "Attention is all you need", NeurIPS 2017.
    Tancik et al., "Fourier features let networks learn high frequency
    functions in low dimensional domains", NeurIPS 2020.
    Song et al., "Score-based generative modeling through stochastic
    differential equations", ICLR 2021.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsm_jax._checks import check_choice, check_positive_int, check_positive_number

EMBEDDINGS = ("fourier", "sinusoidal")


def _check_even(name: str, value) -> int:
    value = check_positive_int(name, value, minimum=2)
    if value % 2:
        raise ValueError(f"{name} must be even (sin and cos halves), got {value}.")
    return value


def sinusoidal_embedding(v: jax.Array, dim: int, *, scale: float = 100.0, max_period: float = 10000.0) -> jax.Array:
    """Transformer-style sinusoidal features of a scalar per example.

    ``emb(v) = [sin(scale v w_i), cos(scale v w_i)]_{i < dim/2}``,
    ``w_i = max_period^(-i / (dim/2))``: angular frequencies from ``scale``
    down to ``scale / max_period`` per unit of ``v``. With ``v = log sigma``
    and the defaults, the span of frequencies matches DDPM's embedding of
    1000 integer time steps over a ten-unit range of ``log sigma``.

    Args:
        v: ``[B]`` values (here ``log sigma``).
        dim: even embedding size.
        scale: the highest angular frequency.
        max_period: ratio of the highest to the lowest frequency.

    Returns:
        ``[B, dim]``.
    """
    dim = _check_even("dim", dim)
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = scale * jnp.asarray(v, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class GaussianFourierEmbedding(nn.Module):
    """Random Fourier features ``[sin(2 pi v W), cos(2 pi v W)]``, ``W ~ N(0, scale^2)``.

    ``W`` is drawn at ``init`` and kept fixed (a parameter behind
    ``stop_gradient``, so it is saved with the model but never trained).

    Attributes:
        features: even embedding size.
        scale: standard deviation of the frequencies (16 in NCSN++).
    """

    features: int = 64
    scale: float = 16.0

    def __post_init__(self):
        _check_even("features", self.features)
        check_positive_number("scale", self.scale)
        super().__post_init__()

    @nn.compact
    def __call__(self, v: jax.Array) -> jax.Array:
        half = self.features // 2
        w = self.param("W", nn.initializers.normal(stddev=self.scale), (half,))
        args = 2.0 * jnp.pi * jnp.asarray(v, jnp.float32)[:, None] * jax.lax.stop_gradient(w)[None, :]
        return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class SigmaEmbedding(nn.Module):
    """``sigma [B] -> [B, features]``: features of ``log sigma`` followed by a small MLP.

    ``Dense(features) -> SiLU -> Dense(features)`` on top of the chosen
    embedding of ``log sigma`` (the conditioning path of DDPM / NCSN++).

    Attributes:
        features: output size.
        embed_dim: size of the fixed feature map (even).
        kind: "fourier" or "sinusoidal".
        fourier_scale: ``scale`` of :class:`GaussianFourierEmbedding`.
        dtype: compute dtype of the two Dense layers (the features of
            ``log sigma`` are computed in float32; parameters are float32).
    """

    features: int = 128
    embed_dim: int = 64
    kind: str = "fourier"
    fourier_scale: float = 16.0
    dtype: Any = jnp.float32

    def __post_init__(self):
        check_positive_int("features", self.features)
        _check_even("embed_dim", self.embed_dim)
        check_choice("embedding", self.kind, EMBEDDINGS)
        check_positive_number("fourier_scale", self.fourier_scale)
        super().__post_init__()

    @nn.compact
    def __call__(self, sigma: jax.Array) -> jax.Array:
        v = jnp.log(sigma)
        if self.kind == "fourier":
            emb = GaussianFourierEmbedding(self.embed_dim, self.fourier_scale)(v)
        else:
            emb = sinusoidal_embedding(v, self.embed_dim)
        emb = nn.Dense(self.features, dtype=self.dtype)(emb)
        return nn.Dense(self.features, dtype=self.dtype)(nn.silu(emb))


def null_labels(labels: jax.Array | None, batch: int, num_classes: int) -> jax.Array:
    """``labels [B]`` as int32, or ``[B]`` copies of the null label ``num_classes`` when None.

    Raises:
        ValueError: ``labels`` is given but is not ``[batch]`` integers.
    """
    if labels is None:
        return jnp.full((batch,), num_classes, jnp.int32)
    if jnp.shape(labels) != (batch,) or not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(
            f"labels must be [B]=({batch},) integers, got shape {jnp.shape(labels)} dtype {jnp.result_type(labels)}."
        )
    return jnp.asarray(labels, jnp.int32)


class LabelEmbedding(nn.Module):
    """``labels [B] -> [B, features]``: a learned vector per class plus one for the null label.

    ``nn.Embed`` with ``num_classes + 1`` rows: rows ``0..num_classes-1`` are
    the classes, row ``num_classes`` the reserved *null label* ("no label"),
    which a network trained with label dropout reads as the unconditional
    model (Ho & Salimans 2022). The networks add it to the sigma embedding.

    Attributes:
        num_classes: number of classes ``K`` (the null label is ``K``).
        features: output size (the sigma embedding's).

    Reference:
        Ho & Salimans, "Classifier-free diffusion guidance", arXiv 2207.12598 (2022).
    """

    num_classes: int
    features: int = 128

    def __post_init__(self):
        check_positive_int("num_classes", self.num_classes)
        check_positive_int("features", self.features)
        super().__post_init__()

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:
        return nn.Embed(self.num_classes + 1, self.features)(labels)
