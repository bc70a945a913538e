"""Exact log-likelihoods through the probability-flow ODE, and bits per dimension.

The probability-flow ODE ``dx/dt = v(x, t) = f(x, t) - g(t)^2 s(x, t) / 2``
transports ``p_{t_min}`` to ``p_T``; along a solution the instantaneous
change of variables gives ``d log p_t(x_t) / dt = -div v(x_t, t)``, so

    ``log p_{t_min}(x) = log p_T(x_T) + int_{t_min}^T div v(x_t, t) dt``.

:func:`log_likelihood` integrates ``x`` and the divergence integral together
from ``t_min`` to ``T`` with :func:`dsm_jax.ode.solve` (diffrax; Tsit5 + PID
controller by default, any solver and controller as objects), on the
probability-flow field of :meth:`dsm_jax.sde.SDE.probability_flow_drift` and
the score in time of :func:`dsm_jax.sde.time_score_fn`, and
evaluates ``log p_T`` with the SDE's prior. The divergence is exact (one
``jax.jvp`` per dimension, :func:`dsm_jax.divergence.exact_divergence`) or a
Hutchinson estimate whose probe is drawn once and kept fixed along the whole
trajectory (FFJORD), which makes the result an unbiased estimate of the
integral for that ODE solution.

What is computed is the density of ``p_{t_min}``: the data convolved with
``N(0, sigma(t_min)^2)`` (for VE, ``sigma(t_min) ~ sigma_min``), not of the
noiseless data. The two differ by ``O(sigma(t_min)^2)`` for smooth densities.
The prior ``N(0, prior_std^2 I)`` only approximates ``p_T``; pass
``prior_log_prob`` to use another (e.g. the exact ``p_T`` in tests).

References:
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, ICLR 2021 (Sec. 4.3, App. D.2).
    Chen, Rubanova, Bettencourt & Duvenaud, "Neural ODEs", NeurIPS 2018.
    Grathwohl et al., "FFJORD", ICLR 2019 (Hutchinson with a fixed probe).
    Theis, van den Oord & Bethge, "A note on the evaluation of generative
    models", ICLR 2016 (uniform dequantization).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from dsm_jax import ode
from dsm_jax._checks import check_batched, check_choice, check_positive_int
from dsm_jax.divergence import PROBES, TRACES, exact_divergence_and_value, hutchinson_divergence_and_value
from dsm_jax.parameterization import ModelFn
from dsm_jax.sde import SDE, check_score_input, time_score_fn

__all__ = ["log_likelihood", "bits_per_dim", "uniform_dequantization_offset", "uniform_dequantize"]


def log_likelihood(
    model_fn: ModelFn,
    sde: SDE,
    x: jax.Array,
    key: jax.Array | None = None,
    *,
    trace: str = "exact",
    num_probes: int = 1,
    probe: str = "rademacher",
    rtol=None,
    atol=None,
    t_min=None,
    num_steps: int | None = None,
    solver=None,
    max_steps: int = ode.DEFAULT_MAX_STEPS,
    parameterization: str = "score",
    chunk_size: int | None = None,
    prior_log_prob: Callable[[jax.Array], jax.Array] | None = None,
    stepsize_controller=None,
) -> jax.Array:
    """``log p_{t_min}(x)`` in nats, per example, via the probability-flow ODE.

    ``log p(x) = log p_T(x_T) + int_{t_min}^T div v(x_t, t) dt`` with
    ``v = f - g^2 s / 2`` (see the module docstring).

    Args:
        model_fn: ``model_fn(x, sigma) -> out``, called at ``sigma(t)``.
        sde: a :class:`dsm_jax.sde.SDE`.
        x: data ``[B, *D]`` (continuous; dequantize discrete data first).
        key: PRNG key for the Hutchinson probes (unused for ``trace="exact"``).
        trace: "exact" (``D`` jvps per evaluation) or "hutchinson"
            (``num_probes`` jvps; the probes are fixed along the trajectory).
        num_probes: Hutchinson probes averaged.
        probe: "rademacher" or "gaussian".
        rtol, atol: tolerances of the default adaptive controller (on ``x``
            and the integral; 1e-5 each).
        t_min: start time (default ``sde.t_min``).
        num_steps: fixed steps instead of adaptive ones (``diffrax.ConstantStepSize()``).
        solver: a diffrax solver (default ``diffrax.Tsit5()``).
        max_steps: step budget of the adaptive solver.
        parameterization: "score", "eps", "x0" or "energy".
        chunk_size: chunking of the exact trace's basis (memory bound).
        prior_log_prob: ``z [B, *D] -> [B]``; default ``sde.prior_log_prob``.
        stepsize_controller: a diffrax step-size controller (default
            ``PIDController(rtol, atol)``); a ``ConstantStepSize()`` needs ``num_steps``.

    Returns:
        ``[B]`` log-densities in nats. Divide by ``-D log 2`` (and add the
        dequantization offset) for bits per dimension: :func:`bits_per_dim`.

    Example:
        >>> ll = jax.jit(lambda x: log_likelihood(model_fn, VPSDE(), x, None))(x)   # doctest: +SKIP
        >>> offset = uniform_dequantization_offset(256, (0.0, 1.0))
        >>> bits_per_dim(ll, 784, dequantization_offset=offset)  # doctest: +SKIP
    """
    check_batched("x", x)
    check_choice("trace", trace, TRACES)
    check_choice("probe", probe, PROBES)
    check_positive_int("num_probes", num_probes)
    if trace == "hutchinson" and key is None:
        raise ValueError("key must be a PRNG key when trace='hutchinson', got None.")
    probe_key = jax.random.key(0) if key is None else key  # only the Hutchinson trace draws probes
    score_fn = time_score_fn(model_fn, sde, parameterization=parameterization)
    check_score_input(score_fn, sde, x, name="x")
    ts = sde.time_grid(1, t_min=t_min)
    t0, t1 = ts[-1], ts[0]  # forward in time: t_min -> T
    options = ode.ode_options(
        t0,
        t1,
        rtol=rtol,
        atol=atol,
        num_steps=num_steps,
        solver=solver,
        stepsize_controller=stepsize_controller,
        max_steps=max_steps,
    )

    def vector_field(t, state):
        field = lambda y: sde.probability_flow_drift(y, t, score_fn(y, t))
        if trace == "exact":
            div, v = exact_divergence_and_value(field, state[0], chunk_size=chunk_size)
        else:
            # The same key at every call: the same probes along the whole trajectory.
            div, v = hutchinson_divergence_and_value(field, state[0], probe_key, num_probes=num_probes, probe=probe)
        return v, div

    y0 = (x, jnp.zeros((x.shape[0],), x.dtype))
    sol, _ = ode.solve(vector_field, y0, t0, t1, **options)
    x_T, integral = sol.ys[0][-1], sol.ys[1][-1]
    prior = sde.prior_log_prob if prior_log_prob is None else prior_log_prob
    return prior(x_T) + integral


def bits_per_dim(log_likelihood, dim: int, *, dequantization_offset=0.0) -> jax.Array:
    """Bits per dimension: ``-log p(x) / (dim * log 2) + dequantization_offset``.

    The convention, which is where most bits/dim confusion comes from:
    discrete data with ``num_bins`` levels per dimension (256 for 8-bit
    images) is mapped to a continuous interval of width ``W`` (e.g.
    ``[-1, 1]``, ``W = 2``), each level becoming a bin of width
    ``W / num_bins``, and dequantized by uniform noise within the bin
    (:func:`uniform_dequantize`). Then (Theis et al. 2016)

        ``-log2 P(k) <= -E_u[log p(x)] / log 2 + D log2(num_bins / W)``,

    so the discrete model's bits/dim is bounded by the continuous one plus
    ``log2(num_bins / W)`` per dimension (:func:`uniform_dequantization_offset`):
    7 for 256 levels on ``[-1, 1]`` (score_sde's CIFAR-10 numbers), 8 on
    ``[0, 1]``. Leave the offset at 0 for genuinely continuous data. Data
    rescaled by any other affine map shifts the offset by the log2 of its
    Jacobian; report the offset used.

    Args:
        log_likelihood: ``[B]`` log-densities in nats (of the continuous data).
        dim: number of dimensions ``D`` of one example.
        dequantization_offset: bits per dimension to add (see above).

    Returns:
        ``[B]``.

    Example:
        >>> bits_per_dim(jnp.array([-2.0 * jnp.log(2.0)]), 2)   # p = 1/4 over 2 dims
        Array([1.], dtype=float32)
    """
    check_positive_int("dim", dim)
    ll = jnp.asarray(log_likelihood)
    return -ll / (dim * math.log(2.0)) + dequantization_offset


def uniform_dequantization_offset(num_bins: int = 256, data_range: Sequence[float] = (-1.0, 1.0)) -> float:
    """``log2(num_bins / (high - low))``: the bits/dim offset of uniform dequantization.

    Example:
        >>> uniform_dequantization_offset(256, (-1.0, 1.0))
        7.0
    """
    num_bins = check_positive_int("num_bins", num_bins)
    low, high = _range(data_range)
    return math.log2(num_bins / (high - low))


def _range(data_range):
    low, high = (float(v) for v in data_range)
    if not high > low:
        raise ValueError(f"data_range must be (low, high) with high > low, got {tuple(data_range)!r}.")
    return low, high


def uniform_dequantize(
    key: jax.Array, levels: jax.Array, *, num_bins: int = 256, data_range: Sequence[float] = (-1.0, 1.0)
) -> jax.Array:
    """Maps integer levels ``k in {0, ..., num_bins - 1}`` to ``low + (k + u) W / num_bins``, ``u ~ U[0, 1)``.

    The continuous values fill the bins exactly, which is what the offset of
    :func:`bits_per_dim` assumes (adding ``U[0, 1) / 256`` to data already
    divided by 255 does not).
    """
    num_bins = check_positive_int("num_bins", num_bins)
    low, high = _range(data_range)
    u = jax.random.uniform(key, jnp.shape(levels))
    return low + (jnp.asarray(levels, u.dtype) + u) * ((high - low) / num_bins)
