"""The divergence (trace of the Jacobian) of a vector field, with ``jax.jvp``.

For ``fn: [B, *D] -> [B, *D]`` that treats examples independently, the
per-example divergence is ``div fn(x_b) = tr(d fn(x)_b / d x_b)``.

* :func:`exact_divergence` pushes every basis vector ``e_i`` through one
  forward-mode product ``J e_i`` (a ``jax.jvp``), ``vmap``-ed over the basis:
  ``D`` jvps, no ``[D, D]`` Jacobian per example held beyond one chunk.
* :func:`hutchinson_divergence` uses ``E_v[v^T J v] = tr(J)`` for probes with
  ``E[v v^T] = I`` (Rademacher or Gaussian): one jvp per probe.

Both also take the library's one model signature: with ``sigma=`` (a scalar
or ``[B]``), ``fn(x, sigma)`` is called with ``sigma`` as ``[B]`` and the
divergence is taken in ``x``. Pass a noise-conditional model that way rather
than as ``lambda z: fn(z, sigma_batch)``: the exact trace then slices sigma
per example and runs its faster per-example path (a closure over a ``[B]``
sigma cannot run on one example, so it takes the slower whole-batch fallback
and warns with :class:`SlowPathWarning`; ``experiments/benchmarks/RESULTS.md``
has the measurements).

References:
    Hutchinson, "A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines", 1990.
    Grathwohl et al., "FFJORD", ICLR 2019 (the jvp/vjp trace estimator in
    continuous normalising flows).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dsm_jax._checks import check_batched, check_choice, check_floating, check_key, check_positive_int, check_sigma
from dsm_jax._utils import to_batch

PROBES = ("rademacher", "gaussian")
TRACES = ("exact", "hutchinson")
"""The trace estimators: :func:`exact_divergence` and :func:`hutchinson_divergence`."""

VectorField = Callable[..., jax.Array]


class SlowPathWarning(UserWarning):
    """A computation took a slower path than the one its inputs could have used."""


def _warn_at_caller(message: str, category=SlowPathWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside this package (the user's call site)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _batch_field(fn: VectorField, x: jax.Array, sigma):
    """``(field z -> fn(z) [or fn(z, sigma_b)], sigma_b or None)`` after the static checks."""
    check_batched("x", x)
    check_floating("x", x)
    if sigma is None:
        field, sigma_b = fn, None
    else:
        check_sigma(sigma, x.shape[0])
        sigma_b = to_batch(sigma, x)
        field = lambda z: fn(z, sigma_b)
    out = jax.eval_shape(field, x)
    if out.shape != x.shape:
        raise ValueError(
            f"fn must map x of shape {x.shape} to the same shape to have a divergence, got output shape {out.shape}."
        )
    return field, sigma_b


AUTO_CHUNK_ROWS = 2048


def resolve_chunk_size(chunk_size, batch: int, dim: int) -> int | None:
    """``None`` (the whole basis), a positive int, or ``"auto"`` resolved for ``batch`` and ``dim``.

    ``"auto"`` on a CPU takes chunks of ``max(1, 2048 // batch)`` directions
    (about 2048 tangent rows per chunk, small enough to stay in cache, which
    was faster than the whole basis for explicit score matching with MLP
    scores; ``experiments/benchmarks/RESULTS.md`` has the measurements). On
    accelerators it is the whole basis, whose parallelism they use.
    """
    if chunk_size is None:
        return None
    if isinstance(chunk_size, str):
        if chunk_size != "auto":
            raise ValueError(f"chunk_size must be None, a positive integer or 'auto', got {chunk_size!r}.")
        if jax.default_backend() != "cpu":
            return None
        chunk_size = max(1, AUTO_CHUNK_ROWS // max(batch, 1))
        return None if chunk_size >= dim else chunk_size
    return min(check_positive_int("chunk_size", chunk_size), dim)


def _on_one(fn: VectorField, xi: jax.Array, si) -> jax.Array:
    """``fn`` on a batch of one built from one example (and its sigma, if any)."""
    return (fn(xi[None]) if si is None else fn(xi[None], si[None]))[0]


def _acts_on_single_examples(fn: VectorField, x: jax.Array, sigma_b=None) -> bool:
    """True when ``fn`` also maps a batch of one ``[1, *D]`` (with ``sigma [1]``) to ``[1, *D]``.

    Not so for a closure over per-example arrays of the full batch (a ``[B]``
    sigma, say): such a field is differentiated as a whole batch instead.
    """
    if x.shape[0] == 1:
        return True
    one = jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)
    one_sigma = None if sigma_b is None else jax.ShapeDtypeStruct((1,), sigma_b.dtype)
    try:
        out = jax.eval_shape(lambda z, s: fn(z) if s is None else fn(z, s), one, one_sigma)
    except Exception:  # noqa: BLE001  (any failure means: not callable on one example)
        return False
    return getattr(out, "shape", None) == one.shape


def exact_divergence_and_value(fn: VectorField, x: jax.Array, *, sigma=None, chunk_size: int | str | None = None):
    """Returns ``(div fn(x) [B], fn(x) [B, *D])`` with one jvp per basis vector.

    How it is computed (both give the same numbers; the first is faster):

    * When ``fn`` also works on a batch of one, the jvps are ``jax.vmap``-ed
      over the examples outside and the basis inside, with the basis
      unbatched over the examples: the first layer's tangent ``W e_i`` is
      then computed once, not once per example. With ``sigma``, example ``b`` is called as
      ``fn(x[b:b+1], sigma[b:b+1])``.
    * Otherwise (a closure over per-example arrays of the batch) the whole
      batch is linearised once and the basis pushed through it (one
      ``[B, *D]`` tangent per direction); a :class:`SlowPathWarning` says so.

    With ``chunk_size``, each chunk of directions is a ``jax.checkpoint``-ed
    step of a ``lax.map``: reverse-mode differentiation (training) then keeps
    only one chunk's intermediates at a time as well.
    """
    field, sigma_b = _batch_field(fn, x, sigma)
    batch, dim = x.shape[0], math.prod(x.shape[1:])
    chunk_size = resolve_chunk_size(chunk_size, batch, dim)
    per_chunk = dim if chunk_size is None else chunk_size
    chunked = per_chunk < dim
    num_chunks = -(-dim // per_chunk)
    # Out-of-range indices (padding the last chunk) give all-zero tangents.
    indices = jnp.arange(num_chunks * per_chunk).reshape(num_chunks, -1)

    if _acts_on_single_examples(fn, x, sigma_b):

        def diag(xi, si, idx):
            # sum_i (J e_i)_i over the directions idx for one example; basis [c, dim] is the
            # same for every example (unbatched under the outer vmap).
            single = lambda z: _on_one(fn, z, si)
            basis = jax.nn.one_hot(idx, dim, dtype=x.dtype)
            value, tangents = jax.vmap(lambda e: jax.jvp(single, (xi,), (e.reshape(xi.shape),)), out_axes=(None, 0))(
                basis
            )
            return jnp.sum(tangents.reshape(-1, dim) * basis), value

        if not chunked:
            return jax.vmap(lambda xi, si: diag(xi, si, indices[0]))(x, sigma_b)
        part = jax.checkpoint(lambda idx: jax.vmap(lambda xi, si: diag(xi, si, idx)[0])(x, sigma_b))
        return jnp.sum(jax.lax.map(part, indices), axis=0), field(x)

    _warn_at_caller(
        "exact_divergence: fn cannot run on a batch of one example (it closes over arrays of the whole "
        "batch, such as a [B] sigma), so the whole batch is differentiated at once, which is slower. "
        "For the per-example path pass the model itself with its noise levels: "
        "fn(x, sigma) with sigma=sigma_batch (exact_divergence, explicit_score_matching_loss)."
    )
    # The whole batch at once: linearise once, the primal pass shared by every direction.
    value, jvp_fn = jax.linearize(field, x)

    def directional(index):
        # Tangent e_index for every example; returns the index-th entry of J e_index.
        basis = jax.nn.one_hot(index, dim, dtype=x.dtype)
        tangent = jnp.broadcast_to(basis.reshape(x.shape[1:]), x.shape)
        return jvp_fn(tangent).reshape(batch, dim) @ basis

    if not chunked:
        return jnp.sum(jax.vmap(directional)(indices[0]), axis=0), value
    part = jax.checkpoint(lambda idx: jnp.sum(jax.vmap(directional)(idx), axis=0))
    return jnp.sum(jax.lax.map(part, indices), axis=0), value


def exact_divergence(fn: VectorField, x: jax.Array, *, sigma=None, chunk_size: int | str | None = None) -> jax.Array:
    """Per-example trace of the Jacobian of ``fn`` at ``x``, exactly.

    ``div f(x) = sum_i (d f / d x)_{ii} = sum_i e_i^T J e_i``, one ``jax.jvp``
    per basis direction ``e_i``, vmapped. Cost: ``D`` forward-mode passes.

    Args:
        fn: a vector field ``[B, *D] -> [B, *D]`` acting on each example
            independently (a batch-coupled layer such as BatchNorm would leak
            cross-example terms into the trace); with ``sigma``, a model
            ``fn(x, sigma) -> [B, *D]`` with ``sigma: [B]``.
        x: ``[B, *D]``, floating point.
        sigma: optional noise level(s), scalar or ``[B]``: the divergence in
            ``x`` of ``fn(x, sigma)``, computed per example (the fast path,
            which a closure ``lambda z: fn(z, sigma_batch)`` cannot take).
        chunk_size: if set, process the basis ``chunk_size`` directions at a
            time (a ``lax.map`` over ``jax.checkpoint``-ed chunks) so peak
            memory is that of ``chunk_size`` jvps instead of ``D``, also under
            ``jax.grad``. ``"auto"``: see :func:`resolve_chunk_size`.

    Returns:
        ``[B]``.

    Example:
        >>> A = jnp.array([[1.0, 2.0], [3.0, 4.0]])
        >>> exact_divergence(lambda x: x @ A.T, jnp.ones((3, 2)))
        Array([5., 5., 5.], dtype=float32)
    """
    return exact_divergence_and_value(fn, x, sigma=sigma, chunk_size=chunk_size)[0]


def sample_probes(key: jax.Array, shape, *, probe: str = "rademacher", dtype=jnp.float32) -> jax.Array:
    """Random vectors with ``E[v v^T] = I``: Rademacher (+-1) or standard normal."""
    check_key(key)
    check_choice("probe", probe, PROBES)
    if probe == "rademacher":
        return jax.random.rademacher(key, shape, dtype=dtype)
    return jax.random.normal(key, shape, dtype=dtype)


def hutchinson_divergence_and_value(
    fn: VectorField, x: jax.Array, key: jax.Array, *, sigma=None, num_probes: int = 1, probe: str = "rademacher"
):
    """Returns ``(estimate of div fn(x) [B], fn(x))``; see :func:`hutchinson_divergence`."""
    field, _ = _batch_field(fn, x, sigma)
    check_positive_int("num_probes", num_probes)
    probes = sample_probes(key, (num_probes,) + x.shape, probe=probe, dtype=x.dtype)

    value, jvp_fn = jax.linearize(field, x)
    est = jax.vmap(lambda v: jnp.sum((v * jvp_fn(v)).reshape(x.shape[0], -1), axis=-1))(probes)
    return jnp.mean(est, axis=0), value


def hutchinson_divergence(
    fn: VectorField, x: jax.Array, key: jax.Array, *, sigma=None, num_probes: int = 1, probe: str = "rademacher"
) -> jax.Array:
    """Unbiased Monte-Carlo estimate of the per-example divergence.

    ``div f(x) ~= 1/M sum_m v_m^T J v_m`` with ``v_m`` Rademacher or Gaussian;
    one ``jax.jvp`` per probe. Rademacher probes have the lower variance
    (``2 sum_{i != j} J_ij^2`` against ``2 ||J||_F^2`` for symmetric ``J``).

    Args:
        fn: a vector field ``[B, *D] -> [B, *D]``, or with ``sigma`` a model
            ``fn(x, sigma)`` with ``sigma: [B]``.
        x: ``[B, *D]``, floating point.
        key: PRNG key for the probes.
        sigma: optional noise level(s), scalar or ``[B]``, passed to ``fn``
            (the whole batch is one jvp per probe either way).
        num_probes: number of probes M averaged.
        probe: "rademacher" or "gaussian".

    Returns:
        ``[B]``.

    References:
        Hutchinson 1990; Song, Garg, Shi & Ermon, "Sliced score matching",
        UAI 2019.
    """
    return hutchinson_divergence_and_value(fn, x, key, sigma=sigma, num_probes=num_probes, probe=probe)[0]
