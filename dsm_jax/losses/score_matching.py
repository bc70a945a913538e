"""Explicit (Hyvarinen 2005) and sliced (Song et al. 2019) score matching: no noise, the model's own divergence."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dsm_jax._checks import (
    check_key,
    check_positive_int,
    check_sigma,
    runtime_check_positive,
)
from dsm_jax._utils import to_batch
from dsm_jax.divergence import (
    exact_divergence_and_value,
    sample_probes,
)
from dsm_jax.losses._common import _check_data, _sum_per_example

# ---------------------------------------------------------------------------
# Explicit and sliced score matching (no noise)
# ---------------------------------------------------------------------------


def explicit_score_matching_loss(
    score_fn: Callable[..., jax.Array], x: jax.Array, *, sigma=None, chunk_size: int | str | None = "auto"
) -> jax.Array:
    """Hyvarinen's score matching with the exact Jacobian trace.

    ``J(s) = E_x[ tr(grad_x s(x)) + 1/2 |s(x)|^2 ]``, which equals
    ``1/2 E|s - grad log p|^2`` up to a constant independent of ``s``. The
    trace uses one ``jax.jvp`` per dimension (:func:`exact_divergence`).

    For a noise-conditional model pass it with its levels,
    ``explicit_score_matching_loss(model_fn, x, sigma=sigma_batch)``, not as
    ``lambda z: model_fn(z, sigma_batch)``: the trace then runs per example,
    the faster path (the closure cannot run on one example, so it takes the
    whole-batch fallback and warns; see ``experiments/benchmarks/RESULTS.md``
    for measurements).

    Args:
        score_fn: ``[B, *D] -> [B, *D]``, examples treated independently; with
            ``sigma``, ``score_fn(x, sigma) -> [B, *D]`` with ``sigma: [B]``.
        x: data ``[B, *D]``, floating point.
        sigma: optional noise level(s) passed to ``score_fn``, scalar or ``[B]``.
        chunk_size: chunking of the trace's basis: ``None`` (all directions
            at once), a number of directions per chunk (bounds memory, also
            under ``jax.grad``), or ``"auto"`` (default: chunks of about 2048
            tangent rows on a CPU, which stay in cache; the whole basis on
            accelerators), see :func:`dsm_jax.divergence.resolve_chunk_size`.

    Returns:
        A scalar.
    """
    _check_data("x", x)
    if sigma is not None:
        runtime_check_positive("sigma", sigma)
    div, s = exact_divergence_and_value(score_fn, x, sigma=sigma, chunk_size=chunk_size)
    return jnp.mean(div + 0.5 * _sum_per_example(s**2))


def sliced_score_matching_loss(
    score_fn: Callable[..., jax.Array],
    x: jax.Array,
    key: jax.Array,
    *,
    sigma=None,
    num_projections: int = 1,
    probe: str = "rademacher",
    variance_reduction: bool = False,
) -> jax.Array:
    """Sliced score matching: random projections replace the trace.

    ``J(s) = E_x E_v[ v^T (grad_x s) v + 1/2 (v^T s)^2 ]``; with
    ``variance_reduction`` the second term is replaced by its expectation
    over ``v``, ``1/2 |s|^2`` (SSM-VR). Both have the explicit SM loss as
    expectation over the probes. One ``jax.jvp`` per projection.

    Args:
        score_fn: ``[B, *D] -> [B, *D]``; with ``sigma``,
            ``score_fn(x, sigma) -> [B, *D]`` with ``sigma: [B]``.
        x: data ``[B, *D]``, floating point.
        key: PRNG key for the projections.
        sigma: optional noise level(s) passed to ``score_fn``, scalar or ``[B]``.
        num_projections: probes per example, averaged.
        probe: "rademacher" or "gaussian" (``E[v v^T] = I`` for both).
        variance_reduction: use the SSM-VR form.

    Returns:
        A scalar.
    """
    _check_data("x", x)
    check_key(key)
    check_positive_int("num_projections", num_projections)
    if sigma is not None:
        check_sigma(sigma, x.shape[0])
        runtime_check_positive("sigma", sigma)
        sigma_b = to_batch(sigma, x)
        field = lambda z: score_fn(z, sigma_b)
    else:
        field = score_fn
    probes = sample_probes(key, (num_projections,) + x.shape, probe=probe, dtype=x.dtype)
    s, jvp_fn = jax.linearize(field, x)
    if s.shape != x.shape:
        raise ValueError(f"score_fn returned shape {s.shape}, expected {x.shape}.")

    def per_probe(v):
        vjv = _sum_per_example(v * jvp_fn(v))
        if variance_reduction:
            return vjv
        return vjv + 0.5 * _sum_per_example(v * s) ** 2

    per_example = jnp.mean(jax.vmap(per_probe)(probes), axis=0)
    if variance_reduction:
        per_example = per_example + 0.5 * _sum_per_example(s**2)
    return jnp.mean(per_example)
