"""Shared fixtures: x64 on demand and a fresh-key factory."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session's xdist workers, subprocesses and notebook
# kernels (they inherit the environment): the same programs are compiled by several tests.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"dsm_jax_test_cache_{os.getuid()}")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax
import pytest

import dsm_jax  # noqa: E402,F401  (applies the XLA CPU workaround before any computation)


@pytest.fixture
def x64():
    """Runs a test in double precision and restores the previous setting."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def getkey():
    """getkey() returns a new key each call, from a fixed seed."""
    counter = iter(range(10**9))
    base = jax.random.key(1234)
    return lambda: jax.random.fold_in(base, next(counter))
