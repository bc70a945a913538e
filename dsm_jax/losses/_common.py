"""Helpers shared by the losses: per-example sums and the data check."""

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
