"""Input validation shared by the library.

Static misuse is caught before tracing: shapes are always static, and values
are checked whenever they are concrete (not JAX tracers). Every error is a
``ValueError`` that names the argument and shows the offending value.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(value: Any) -> bool:
    """True when ``value`` holds actual numbers (not an abstract tracer)."""
    return not isinstance(value, jax.core.Tracer)


def _short(value: Any) -> str:
    arr = np.asarray(value)
    if arr.size <= 8:
        return np.array2string(arr, precision=6, separator=", ")
    return f"array(shape={arr.shape}, min={arr.min():.6g}, max={arr.max():.6g})"


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")
    return value


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_positive_number(name: str, value: Any) -> None:
    """Checks a concrete scalar or array is finite and > 0 (skipped for tracers)."""
    if not is_concrete(value):
        return
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got {value!r}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {_short(arr)}.")
    if not np.all(arr > 0):
        raise ValueError(f"{name} must be > 0, got {_short(arr)}.")


def check_batched(name: str, x: Any, *, min_ndim: int = 2) -> None:
    shape = jnp.shape(x)
    if len(shape) < min_ndim:
        raise ValueError(
            f"{name} must be batched with shape [B, *D] (at least {min_ndim} dims), "
            f"got shape {shape}."
        )
    if shape[0] == 0:
        raise ValueError(f"{name} must hold at least one example, got shape {shape}.")


def check_sigma(sigma: Any, batch_size: int, *, name: str = "sigma") -> None:
    """sigma: a positive finite scalar or an array of shape [B]."""
    shape = jnp.shape(sigma)
    if shape not in ((), (batch_size,), (1,)):
        raise ValueError(
            f"{name} must be a scalar or have shape [B]=({batch_size},), got shape {shape}."
        )
    check_positive_number(name, sigma)


def check_sigma_schedule(sigmas: Any, *, name: str = "sigmas", decreasing: bool = True) -> None:
    """A 1-D array of positive noise levels, strictly decreasing if asked."""
    shape = jnp.shape(sigmas)
    if len(shape) != 1 or shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {shape}.")
    check_positive_number(name, sigmas)
    if decreasing and is_concrete(sigmas):
        arr = np.asarray(sigmas)
        if arr.size > 1 and not np.all(np.diff(arr) < 0):
            raise ValueError(
                f"{name} must be strictly decreasing (largest noise first), got {_short(arr)}."
            )


def check_same_shape(name: str, got: Any, expected_shape: tuple, what: str) -> None:
    shape = tuple(jnp.shape(got))
    if shape != tuple(expected_shape):
        raise ValueError(f"{name} returned shape {shape}, expected {tuple(expected_shape)} ({what}).")
