"""Helpers shared by the losses: per-example sums, the data check, per-level diagnostics."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsm_jax._checks import check_batched, check_floating, runtime_check_finite


def _sum_per_example(v: jax.Array) -> jax.Array:
    return jnp.sum(v.reshape(v.shape[0], -1), axis=-1)


def _check_data(name: str, x) -> None:
    """Batched floating-point data; finite at run time with :func:`dsm_jax.debug_checks`."""
    check_batched(name, x)
    check_floating(name, x)
    runtime_check_finite(name, x)


def _nearest_level(sigma_b: jax.Array, sigmas: jax.Array) -> jax.Array:
    """``[B]`` index of the level of ``sigmas [L]`` nearest to each ``sigma_b [B]`` in log scale."""
    return jnp.argmin(jnp.abs(jnp.log(sigma_b)[:, None] - jnp.log(sigmas)[None, :]), axis=1)


def _mean_per_level(per_example: jax.Array, idx: jax.Array, num_levels: int) -> jax.Array:
    """``[L]``: the mean of ``per_example [B]`` over the examples of each level ``idx [B]``; NaN where none."""
    sums = jax.ops.segment_sum(per_example, idx, num_segments=num_levels)
    counts = jax.ops.segment_sum(jnp.ones_like(per_example), idx, num_segments=num_levels)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), jnp.nan)
