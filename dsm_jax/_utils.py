"""Small array idioms shared by the library: per-example broadcasting, pairwise distances, blocking.

Private to the package (the one module, with :mod:`dsm_jax._checks`, whose
private names other modules may import); the public names that wrap them
(``dsm_jax.parameterization.broadcast_sigma`` and ``expand_to``) stay where they were.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp

if sys.version_info >= (3, 11):
    from typing import dataclass_transform as dataclass_transform
else:  # a dependency of chex, hence installed
    from typing_extensions import dataclass_transform as dataclass_transform

LOG_2PI = math.log(2.0 * math.pi)
"""``log(2 pi)``, the constant of every Gaussian log-density."""

PathLike = str | os.PathLike
"""A file-system path as the public functions take it: a string or any ``os.PathLike``."""


def to_batch(value: Any, x: jax.Array) -> jax.Array:
    """A scalar or ``[B]`` value (a sigma, a time, a coefficient) as ``[B]`` in ``x``'s dtype.

    Example:
        >>> to_batch(0.5, jnp.zeros((3, 2)))
        Array([0.5, 0.5, 0.5], dtype=float32)
    """
    value = jnp.asarray(value, dtype=x.dtype)
    return jnp.broadcast_to(value.reshape(-1), (x.shape[0],))


def expand_to(v: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a per-example ``[B]`` array to ``[B, 1, ...]``, broadcasting against ``x: [B, *D]``."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def to_batch_expanded(value: Any, x: jax.Array) -> jax.Array:
    """A scalar or ``[B]`` value as ``[B, 1, ...]``: ``expand_to(to_batch(value, x), x)``.

    Example:
        >>> to_batch_expanded(jnp.array([1.0, 2.0]), jnp.zeros((2, 3, 4))).shape
        (2, 1, 1)
    """
    return expand_to(to_batch(value, x), x)


def sq_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """``|a_i - b_j|^2 -> [n, m]`` for flat ``a: [n, d]``, ``b: [m, d]``, as ``|a|^2 + |b|^2 - 2 a.b``.

    The expansion is one matrix product, but it loses precision when the
    points lie far from the origin compared with their spread: centre both
    on the same point first (distances do not change) where that can happen.
    It can come out slightly negative; callers clamp at 0 where it matters.
    """
    return jnp.sum(a**2, axis=1)[:, None] + jnp.sum(b**2, axis=1)[None, :] - 2.0 * a @ b.T


def row_blocks(a: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """``a: [n, d]`` zero-padded to ``[num_blocks, block_size, d]``, with a 0/1 mask ``[num_blocks, block_size]``.

    For a ``lax.map``/``lax.scan`` over blocks of rows, which bounds memory by
    one block; the mask marks the real rows of the last block.
    """
    n = a.shape[0]
    num_blocks = -(-n // block_size)
    rows = jnp.zeros((num_blocks * block_size, a.shape[1]), a.dtype).at[:n].set(a)
    mask = (jnp.arange(num_blocks * block_size) < n).astype(a.dtype)
    return rows.reshape(num_blocks, block_size, -1), mask.reshape(num_blocks, block_size)
