"""The divergence (trace of the Jacobian) of a vector field, with ``jax.jvp``.

For ``fn: [B, *D] -> [B, *D]`` that treats examples independently, the
per-example divergence is ``div fn(x_b) = tr(d fn(x)_b / d x_b)``.

* :func:`exact_divergence` pushes every basis vector ``e_i`` through one
  forward-mode product ``J e_i`` (a ``jax.jvp``), ``vmap``-ed over the basis:
  ``D`` jvps, no ``[D, D]`` Jacobian per example held beyond one chunk.
* :func:`hutchinson_divergence` uses ``E_v[v^T J v] = tr(J)`` for probes with
  ``E[v v^T] = I`` (Rademacher or Gaussian): one jvp per probe.

References:
    Hutchinson, "A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines", 1990.
    Grathwohl et al., "FFJORD", ICLR 2019 (the jvp/vjp trace estimator in
    continuous normalising flows).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from dsm_jax._checks import check_batched, check_choice, check_positive_int

PROBES = ("rademacher", "gaussian")

VectorField = Callable[[jax.Array], jax.Array]


def _check_field(fn: VectorField, x: jax.Array) -> None:
    check_batched("x", x)
    out = jax.eval_shape(fn, x)
    if out.shape != x.shape:
        raise ValueError(
            f"fn must map x of shape {x.shape} to the same shape to have a divergence, "
            f"got output shape {out.shape}."
        )


def exact_divergence_and_value(fn: VectorField, x: jax.Array, *, chunk_size: Optional[int] = None):
    """Returns ``(div fn(x) [B], fn(x) [B, *D])`` with one jvp per basis vector.

    The value is the primal output of the jvps, so it costs no extra forward pass.
    """
    _check_field(fn, x)
    batch, dim = x.shape[0], math.prod(x.shape[1:])
    if chunk_size is not None:
        chunk_size = min(check_positive_int("chunk_size", chunk_size), dim)

    # Linearise once: the primal pass is shared by every direction.
    value, jvp_fn = jax.linearize(fn, x)

    def directional(index):
        # Tangent e_index for every example; returns the index-th entry of J e_index.
        basis = jax.nn.one_hot(index, dim, dtype=x.dtype)
        tangent = jnp.broadcast_to(basis.reshape(x.shape[1:]), x.shape)
        return jvp_fn(tangent).reshape(batch, dim) @ basis

    if chunk_size is None or chunk_size >= dim:
        return jnp.sum(jax.vmap(directional)(jnp.arange(dim)), axis=0), value

    num_chunks = -(-dim // chunk_size)
    # Out-of-range indices (padding the last chunk) give all-zero tangents.
    indices = jnp.arange(num_chunks * chunk_size).reshape(num_chunks, chunk_size)
    per_chunk = jax.lax.map(lambda idx: jnp.sum(jax.vmap(directional)(idx), axis=0), indices)
    return jnp.sum(per_chunk, axis=0), value


def exact_divergence(fn: VectorField, x: jax.Array, *, chunk_size: Optional[int] = None) -> jax.Array:
    """Per-example trace of the Jacobian of ``fn`` at ``x``, exactly.

    ``div f(x) = sum_i (d f / d x)_{ii} = sum_i e_i^T J e_i``, one ``jax.jvp``
    per basis direction ``e_i``, vmapped. Cost: ``D`` forward-mode passes.

    Args:
        fn: a vector field ``[B, *D] -> [B, *D]`` acting on each example
            independently (a batch-coupled layer such as BatchNorm would leak
            cross-example terms into the trace).
        x: ``[B, *D]``.
        chunk_size: if set, process the basis ``chunk_size`` directions at a
            time (``lax.map`` over chunks) so peak memory is that of
            ``chunk_size`` jvps instead of ``D``.

    Returns:
        ``[B]``.

    Example:
        >>> A = jnp.array([[1.0, 2.0], [3.0, 4.0]])
        >>> exact_divergence(lambda x: x @ A.T, jnp.ones((3, 2)))
        Array([5., 5., 5.], dtype=float32)
    """
    return exact_divergence_and_value(fn, x, chunk_size=chunk_size)[0]


def sample_probes(key: jax.Array, shape, *, probe: str = "rademacher", dtype=jnp.float32) -> jax.Array:
    """Random vectors with ``E[v v^T] = I``: Rademacher (+-1) or standard normal."""
    check_choice("probe", probe, PROBES)
    if probe == "rademacher":
        return jax.random.rademacher(key, shape, dtype=dtype)
    return jax.random.normal(key, shape, dtype=dtype)


def hutchinson_divergence_and_value(fn: VectorField, x: jax.Array, key: jax.Array, *, num_probes: int = 1, probe: str = "rademacher"):
    """Returns ``(estimate of div fn(x) [B], fn(x))``; see :func:`hutchinson_divergence`."""
    _check_field(fn, x)
    check_positive_int("num_probes", num_probes)
    probes = sample_probes(key, (num_probes,) + x.shape, probe=probe, dtype=x.dtype)

    value, jvp_fn = jax.linearize(fn, x)
    est = jax.vmap(lambda v: jnp.sum((v * jvp_fn(v)).reshape(x.shape[0], -1), axis=-1))(probes)
    return jnp.mean(est, axis=0), value


def hutchinson_divergence(fn: VectorField, x: jax.Array, key: jax.Array, *, num_probes: int = 1, probe: str = "rademacher") -> jax.Array:
    """Unbiased Monte-Carlo estimate of the per-example divergence.

    ``div f(x) ~= 1/M sum_m v_m^T J v_m`` with ``v_m`` Rademacher or Gaussian;
    one ``jax.jvp`` per probe. Rademacher probes have the lower variance
    (``2 sum_{i != j} J_ij^2`` against ``2 ||J||_F^2`` for symmetric ``J``).

    Args:
        fn: a vector field ``[B, *D] -> [B, *D]``.
        x: ``[B, *D]``.
        key: PRNG key for the probes.
        num_probes: number of probes M averaged.
        probe: "rademacher" or "gaussian".

    Returns:
        ``[B]``.

    References:
        Hutchinson 1990; Song, Garg, Shi & Ermon, "Sliced score matching",
        UAI 2019.
    """
    return hutchinson_divergence_and_value(fn, x, key, num_probes=num_probes, probe=probe)[0]
