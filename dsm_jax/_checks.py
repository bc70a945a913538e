"""Input validation shared by the library.

Two kinds of checks:

* **Before tracing (always on, free at run time).** Shapes, dtypes, names
  and PRNG keys are static and always checked; values (sigma > 0, finite
  means, a decreasing schedule, ...) are checked whenever they are concrete
  (not JAX tracers). Every error is a ``ValueError`` that names the argument
  and shows the offending value.
* **At run time (opt-in).** A value that is traced under ``jit`` (a sigma
  passed as an argument of a jitted step, the data of a batch) has no value
  before tracing. With :func:`debug_checks` (or ``DSM_JAX_CHECKS=1`` in the
  environment) the losses and samplers add ``jax.experimental.checkify``
  checks of what they can only see at run time: every sigma finite and
  > 0, the data (``x``, ``x0``, ``x_init``, ``y``) finite, the step sizes
  finite and > 0. Off by default: a function traced with the checks off
  holds no extra operation. With them on, a jitted function must be
  functionalised by ``checkify``, which returns the error::

      with dsm_jax.debug_checks():
          err, loss = checkify.checkify(jax.jit(loss_fn))(params, x, key)
      err.throw()   # raises checkify.JaxRuntimeError naming the argument and its value

  Outside ``jit`` a failed check raises at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.experimental import checkify


def is_concrete(value: Any) -> bool:
    """True when ``value`` holds actual numbers (not an abstract tracer)."""
    return not isinstance(value, Tracer)


def _short(value: Any) -> str:
    arr = np.asarray(value)
    if arr.ndim == 0:
        return repr(arr.item())
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


def check_finite(name: str, value: Any) -> None:
    """Checks a concrete array holds no NaN or inf (skipped for tracers)."""
    if is_concrete(value) and not np.all(np.isfinite(np.asarray(value))):
        raise ValueError(f"{name} must be finite, got {_short(value)}.")


def check_batched(name: str, x: Any, *, min_ndim: int = 2) -> None:
    shape = jnp.shape(x)
    if len(shape) < min_ndim:
        raise ValueError(f"{name} must be batched with shape [B, *D] (at least {min_ndim} dims), got shape {shape}.")
    if shape[0] == 0:
        raise ValueError(f"{name} must hold at least one example, got shape {shape}.")


def check_sigma(sigma: Any, batch_size: int, *, name: str = "sigma") -> None:
    """sigma: a positive finite scalar or an array of shape [B]."""
    shape = jnp.shape(sigma)
    if shape not in ((), (batch_size,), (1,)):
        raise ValueError(f"{name} must be a scalar or have shape [B]=({batch_size},), got shape {shape}.")
    check_positive_number(name, sigma)


def check_sigma_schedule(sigmas: Any, *, name: str = "sigmas", decreasing: bool = True, monotone: bool = False) -> None:
    """A 1-D array of positive noise levels, strictly decreasing if asked.

    ``monotone`` (with ``decreasing=False``) accepts either strict order, for
    code that only needs neighbouring levels to be neighbours on the sigma axis.
    """
    shape = jnp.shape(sigmas)
    if len(shape) != 1 or shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {shape}.")
    check_positive_number(name, sigmas)
    if (decreasing or monotone) and is_concrete(sigmas):
        arr = np.asarray(sigmas)
        steps = np.diff(arr)
        if arr.size > 1 and not np.all(steps < 0):
            if decreasing:
                raise ValueError(f"{name} must be strictly decreasing (largest noise first), got {_short(arr)}.")
            if not np.all(steps > 0):
                raise ValueError(f"{name} must be strictly monotone (decreasing or increasing), got {_short(arr)}.")


def check_same_shape(name: str, got: Any, expected_shape: tuple, what: str) -> None:
    shape = tuple(jnp.shape(got))
    if shape != tuple(expected_shape):
        raise ValueError(f"{name} returned shape {shape}, expected {tuple(expected_shape)} ({what}).")


def check_floating(name: str, x: Any) -> None:
    """``x`` has a floating-point dtype (integer data cannot be differentiated or noised)."""
    dtype = getattr(x, "dtype", None)
    dtype = np.asarray(x).dtype if dtype is None else dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got dtype {dtype}; cast it, e.g. x.astype(jnp.float32).")


def check_state(name: str, x: Any) -> None:
    """A batched floating-point state or data array ``[B, *D]``; finite at run time with :func:`debug_checks`."""
    check_batched(name, x)
    check_floating(name, x)
    runtime_check_finite(name, x)


def check_in_float_range(name: str, value: Any, dtype=jnp.float32) -> None:
    """A concrete positive value is representable in ``dtype``: at most its max, at least its smallest normal.

    Below the smallest normal a level underflows to 0 (XLA flushes subnormals
    to zero), above the max it overflows to inf.
    """
    if not is_concrete(value):
        return
    arr = np.asarray(value, dtype=np.float64)
    info = jnp.finfo(dtype)
    if np.any(arr > float(info.max)) or np.any(arr < float(info.tiny)):
        raise ValueError(
            f"{name} must lie in [{float(info.tiny):.4g}, {float(info.max):.4g}] to be a positive finite "
            f"{jnp.dtype(dtype).name}, got {_short(arr)}."
        )


def _describe(value: Any) -> str:
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return f"{value!r} ({type(value).__name__})"
    return f"an array of dtype {dtype} and shape {jnp.shape(value)}"


def check_key(key: Any, *, name: str = "key", allow_batch: bool = False) -> None:
    """``key`` is one PRNG key (typed, or a raw ``uint32`` one), or a batch ``[B]`` of them if allowed."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        ndim = key.ndim
    elif dtype == np.uint32 and jnp.ndim(key) >= 1:
        ndim = jnp.ndim(key) - 1  # raw keys carry their key data in the last axis
    else:
        ndim = None
    if ndim == 0 or (allow_batch and ndim == 1):
        return
    batch = " (or a batch of them, e.g. jax.random.split(key, B))" if allow_batch else ""
    raise ValueError(f"{name} must be a PRNG key{batch}: pass jax.random.key(seed), got {_describe(key)}.")


# ---------------------------------------------------------------------------
# Opt-in run-time checks (jax.experimental.checkify)
# ---------------------------------------------------------------------------

_RUNTIME_CHECKS = contextvars.ContextVar(
    "dsm_jax_runtime_checks", default=os.environ.get("DSM_JAX_CHECKS", "") not in ("", "0")
)


def runtime_checks_enabled() -> bool:
    """Whether the losses and samplers add ``checkify`` checks when traced (see :func:`debug_checks`)."""
    return _RUNTIME_CHECKS.get()


@contextlib.contextmanager
def debug_checks(enabled: bool = True) -> Iterator[None]:
    """Turns the run-time checks of traced values on (or off) inside the block.

    The losses and samplers then check with ``jax.experimental.checkify``
    that sigma (every level) is finite and > 0 and the data are finite, also
    for values traced under ``jit``. The setting is read when a function is
    traced, and ``jax.jit`` reuses a trace: entering and leaving a block that
    changes the setting clears JAX's caches (``jax.clear_caches()``) so that
    functions are traced again with (or without) the checks. That costs a
    recompilation; this is a debugging tool. ``DSM_JAX_CHECKS=1`` sets the
    default for the whole process.

    Under ``jit``, functionalise the checks with ``checkify``::

        with dsm_jax.debug_checks():
            err, loss = checkify.checkify(jax.jit(loss_fn))(params, x, key)
        err.throw()

    Example:
        >>> from dsm_jax.losses import dsm_loss
        >>> model_fn = lambda x, sigma: -x
        >>> f = jax.jit(lambda s: dsm_loss(model_fn, jnp.ones((4, 2)), s, jax.random.key(0)))
        >>> with debug_checks():
        ...     err, _ = checkify.checkify(f)(0.0)
        >>> err.get()
        'sigma must be finite and > 0 (traced value), got min 0.0, max 0.0 (`check` failed)'
    """
    changed = bool(enabled) != _RUNTIME_CHECKS.get()
    token = _RUNTIME_CHECKS.set(bool(enabled))
    if changed:
        jax.clear_caches()
    try:
        yield
    finally:
        _RUNTIME_CHECKS.reset(token)
        if changed:
            jax.clear_caches()


def runtime_check_positive(name: str, value: Any) -> None:
    """With run-time checks on: ``value`` (traced) is finite and > 0. Concrete values were checked already."""
    if not runtime_checks_enabled() or is_concrete(value):
        return
    v = jnp.asarray(value)
    checkify.check(
        jnp.all(jnp.isfinite(v) & (v > 0)),
        f"{name} must be finite and > 0 (traced value), got min {{}}, max {{}}",
        jnp.min(v),
        jnp.max(v),
    )


def runtime_check_finite(name: str, x: Any) -> None:
    """With run-time checks on: every entry of ``x`` is finite (concrete or traced)."""
    if not runtime_checks_enabled():
        return
    bad = jnp.sum(~jnp.isfinite(x))
    checkify.check(bad == 0, f"{name} must be finite, got {{}} non-finite entries", bad)
