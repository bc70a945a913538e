"""The input checks shared by the networks of :mod:`dsm_jax.models`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["check_inputs"]


def check_inputs(x: jax.Array, sigma: jax.Array, *, min_ndim: int) -> None:
    """``x`` is ``[B, *D]`` with at least ``min_ndim`` dims and ``sigma`` is ``[B]``; ``ValueError`` otherwise.

    Example:
        >>> check_inputs(jnp.zeros((2, 8, 8, 1)), jnp.ones(3), min_ndim=4)
        Traceback (most recent call last):
        ...
        ValueError: sigma must have shape [B]=(2,), got shape (3,).
    """
    if x.ndim < min_ndim:
        raise ValueError(f"x must have at least {min_ndim} dims [B, ...], got shape {x.shape}.")
    if jnp.shape(sigma) != (x.shape[0],):
        raise ValueError(f"sigma must have shape [B]=({x.shape[0]},), got shape {jnp.shape(sigma)}.")
