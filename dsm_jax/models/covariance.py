"""A noise-conditional MLP head for the posterior covariance ``Cov[x | x_noisy]`` (second-order DSM).

``(x_noisy [B, *D], sigma [B]) -> C`` positive definite, in one of the forms of
:data:`dsm_jax.tweedie.COVARIANCE_STRUCTURES` (``D = prod(*D)``):

* "diagonal": ``c = softplus(a) [B, D]``;
* "full": ``C = diag(softplus(a)) + L L^T [B, D, D]``, ``L`` lower triangular;
* "low_rank": ``(softplus(a) [B, D], U [B, D, rank])`` meaning ``diag + U U^T``.

With ``sigma_scaled`` (the default) every form is multiplied by ``sigma^2``:
``Cov[x | y] -> sigma^2 I`` as ``sigma -> 0``, so the network works at unit
scale across levels. ``a`` starts at ``softplus^{-1}(1)`` (zero last layer), so
the untrained head outputs ``sigma^2 I`` plus a small ``L L^T``; ``L`` and ``U``
start small but not zero (at zero their gradient vanishes). Train it with
:func:`dsm_jax.losses.second_order_dsm_loss` and read it with
:func:`dsm_jax.tweedie.learned_posterior_covariance`.

References:
    Meng, Song, Li & Ermon, "Estimating high order gradients of the data
    distribution by denoising", NeurIPS 2021.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsm_jax._checks import check_choice, check_positive_int
from dsm_jax.models._inputs import check_inputs
from dsm_jax.models.embeddings import SigmaEmbedding
from dsm_jax.models.mlp import ResidualBlock
from dsm_jax.tweedie import COVARIANCE_STRUCTURES

__all__ = ["CovarianceMLP"]

_SOFTPLUS_INV_ONE = math.log(math.e - 1.0)
_small_init = nn.initializers.variance_scaling(1e-2, "fan_in", "normal")


class CovarianceMLP(nn.Module):
    """Residual MLP predicting a PSD covariance: ``(x_noisy [B, *D], sigma [B]) -> C``.

    Attributes:
        structure: "full", "diagonal" or "low_rank" (the output forms above).
        rank: columns of ``U`` for "low_rank".
        width: hidden size.
        depth: number of residual blocks.
        embedding: "fourier" or "sinusoidal" features of ``log sigma``.
        embed_dim: size of the fixed sigma features.
        fourier_scale: frequency scale of the Fourier features (as in
            :class:`dsm_jax.models.NoiseConditionalMLP`).
        sigma_scaled: multiply the output by ``sigma^2``.

    Example:
        >>> head = CovarianceMLP(structure="full", width=32, depth=1)
        >>> y, sigma = jnp.zeros((4, 2)), jnp.full((4,), 0.5)
        >>> params = head.init(jax.random.key(0), y, sigma)["params"]
        >>> head.apply({"params": params}, y, sigma).shape
        (4, 2, 2)
    """

    structure: str = "full"
    rank: int = 2
    width: int = 64
    depth: int = 2
    embedding: str = "fourier"
    embed_dim: int = 32
    fourier_scale: float = 1.0
    sigma_scaled: bool = True

    def __post_init__(self):
        check_choice("structure", self.structure, COVARIANCE_STRUCTURES)
        check_positive_int("rank", self.rank)
        check_positive_int("width", self.width)
        check_positive_int("depth", self.depth, minimum=0)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, sigma: jax.Array):
        check_inputs(x, sigma, min_ndim=2)
        flat = x.reshape(x.shape[0], -1)
        dim = flat.shape[-1]
        emb = SigmaEmbedding(self.width, self.embed_dim, self.embedding, self.fourier_scale)(sigma)
        h = nn.Dense(self.width)(flat)
        for _ in range(self.depth):
            h = ResidualBlock(self.width)(h, emb)
        h = nn.silu(nn.LayerNorm()(h))
        unit = 1.0 if not self.sigma_scaled else (sigma**2)[:, None]
        diag = unit * nn.softplus(nn.Dense(dim, kernel_init=nn.initializers.zeros)(h) + _SOFTPLUS_INV_ONE)
        if self.structure == "diagonal":
            return diag
        root = jnp.sqrt(unit)[..., None] if self.sigma_scaled else 1.0
        if self.structure == "low_rank":
            factor = nn.Dense(dim * self.rank, kernel_init=_small_init)(h).reshape(-1, dim, self.rank)
            return diag, root * factor
        rows, cols = jnp.tril_indices(dim)
        entries = nn.Dense(rows.shape[0], kernel_init=_small_init)(h)
        lower = root * jnp.zeros((x.shape[0], dim, dim), entries.dtype).at[:, rows, cols].set(entries)
        return jax.vmap(jnp.diag)(diag) + lower @ jnp.swapaxes(lower, 1, 2)
