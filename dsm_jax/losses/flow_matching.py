"""Conditional flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023), with minibatch OT couplings."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import jax
import jax.numpy as jnp

from dsm_jax._checks import check_choice, check_floating, check_key, check_same_shape, check_sigma_schedule
from dsm_jax.flows import COUPLINGS, GaussianPath, VelocityFn, get_path
from dsm_jax.losses._common import _check_data, _mean_per_level, _nearest_level, _sum_per_example
from dsm_jax.losses.denoising import is_key_batch

T_SAMPLING = ("uniform", "logit_normal")
"""How the loss draws times: ``U[0, 1]``, or ``sigmoid(N(0, 1))`` (Esser et al. 2024), denser mid-path."""

Coupling = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _check_coupling(coupling) -> Coupling | None:
    """The coupling callable (None: independent pairs) from a name of ``COUPLINGS`` or a callable."""
    if coupling is None or callable(coupling):
        return cast(Coupling | None, coupling)
    return COUPLINGS[check_choice("coupling", coupling, tuple(COUPLINGS))]


def _sample_times(key: jax.Array, batch: int, t_sampling: str, dtype) -> jax.Array:
    if t_sampling == "uniform":
        return jax.random.uniform(key, (batch,), dtype=dtype)
    return jax.nn.sigmoid(jax.random.normal(key, (batch,), dtype=dtype))


def _check_t_range(t_range) -> tuple[float, float]:
    ok = isinstance(t_range, (tuple, list)) and len(t_range) == 2
    if ok:
        lo, hi = (float(v) for v in t_range)
        if 0.0 <= lo < hi <= 1.0:
            return lo, hi
    raise ValueError(f"t_range must be a pair (t_lo, t_hi) with 0 <= t_lo < t_hi <= 1, got {t_range!r}.")


def _draw(key, shape, dtype, t_sampling, t_range):
    """``(noise [B, *D], t [B], coupling key)``; ``[B]`` keys: example ``j`` draws what a batch of one draws."""
    if is_key_batch(key):
        noise, t, k_coupling = jax.vmap(lambda k: _draw(k, (1,) + tuple(shape[1:]), dtype, t_sampling, t_range))(key)
        return noise[:, 0], t[:, 0], k_coupling[0]
    k_noise, k_t, k_coupling = jax.random.split(key, 3)
    lo, hi = t_range
    t = lo + (hi - lo) * _sample_times(k_t, shape[0], t_sampling, dtype)
    return jax.random.normal(k_noise, shape, dtype=dtype), t, k_coupling


def dsm_weight(path: GaussianPath, t) -> jax.Array:
    """``w(t)`` with ``1/2 |s_ve + eps / sigma_ve|^2 = w(t) |v - u_t|^2``: a velocity error as a DSM loss.

    The score of ``p_t`` is affine in the velocity (:func:`dsm_jax.flows.score_from_velocity`)
    and maps the conditional velocity ``u_t`` to the conditional score ``-z / sigma``;
    the VE score at ``sigma_ve = sigma / alpha`` is ``alpha`` times it. Hence
    ``w = alpha^4 / (2 sigma^2 (alpha' sigma - alpha sigma')^2)`` (``t^4 / (2 (1 - t)^2)``
    on the rectified-flow path).
    """
    alpha, sigma, d_alpha, d_sigma = path.coefficients_and_derivatives(t)
    return alpha**4 / (2.0 * sigma**2 * (d_alpha * sigma - alpha * d_sigma) ** 2)


def flow_matching_loss(
    velocity_fn: VelocityFn,
    x: jax.Array,
    key: jax.Array,
    *,
    path: str | GaussianPath = "linear",
    sigma_min: float = 0.0,
    coupling: str | Coupling | None = None,
    t_sampling: str = "uniform",
    noise: jax.Array | None = None,
    t_range: tuple[float, float] = (0.0, 1.0),
    sigmas=None,
    return_per_sigma: bool = False,
):
    """Conditional flow matching: ``E_{t, x, z} |v(x_t, t) - u_t(x, z)|^2``.

    With data ``x``, noise ``z ~ N(0, I)`` and the path ``x_t = alpha(t) x +
    sigma(t) z`` (:mod:`dsm_jax.flows`: noise at ``t = 0``, data at ``t = 1``),
    the target is the conditional velocity ``u_t = alpha'(t) x + sigma'(t) z``
    (``x - (1 - sigma_min) z`` on the linear path). Its minimiser over fields
    is the marginal velocity ``E[u_t | x_t]``, whose ODE carries the noise to
    the data; the loss differs from ``E|v - E[u_t | x_t]|^2`` by a constant
    (Lipman et al. 2023, Thm. 2), so its gradient vanishes at the marginal
    field (:func:`dsm_jax.flows.exact_velocity` for a mixture).

    A coupling pairs the batch before the path is drawn: None (independent),
    "ot" (exact minibatch optimal transport, :func:`dsm_jax.flows.ot_pairs`,
    solved on the host), "sinkhorn" (entropic OT in JAX,
    :func:`dsm_jax.flows.sinkhorn_pairs`) or any
    ``coupling(noise, data, key) -> (noise, data)`` (Tong et al. 2023;
    Pooladian et al. 2023). With OT pairs the minimiser is the velocity of the
    coupled path, whose trajectories are straighter.

    Args:
        velocity_fn: ``velocity_fn(x_t, t) -> [B, *D]`` with ``t: [B]``.
        x: data ``[B, *D]``.
        key: PRNG key (noise, times, coupling).
        path: "linear", "vp" or a :class:`dsm_jax.flows.GaussianPath`.
        sigma_min: the linear path's noise at ``t = 1`` (only with ``path="linear"``).
        coupling: None, "ot", "sinkhorn" or a callable (above).
        t_sampling: "uniform" or "logit_normal".
        noise: ``[B, *D]`` noise paired with ``x`` row by row (e.g. from
            :func:`dsm_jax.flows.reflow`); drawn from ``key`` when None.
        t_range: ``(t_lo, t_hi)``: the drawn times are mapped affinely onto it
            (the noise levels a model is trained for, e.g.
            ``path.t_from_noise_ratio(sigma_max)`` to ``path.t_from_noise_ratio(sigma_min)``).
        sigmas: VE noise levels ``[L]`` for the diagnostics of ``return_per_sigma``.
        return_per_sigma: also return ``[L]``: the per-example error as the
            unweighted VE DSM loss (:func:`dsm_weight`), averaged over the examples
            whose ``sigma(t) / alpha(t)`` is nearest (in log scale) to each level,
            NaN where none is, as :func:`dsm_jax.losses.multiscale_dsm_loss` reports it.

    Returns:
        A scalar: the batch mean of the per-example squared error, summed over
        dimensions; ``(scalar, [L])`` with ``return_per_sigma``.

    Example:
        >>> x = jax.random.normal(jax.random.key(0), (256, 2))
        >>> loss = flow_matching_loss(lambda x_t, t: jnp.zeros_like(x_t), x, jax.random.key(1))
        >>> 3.0 < float(loss) < 5.0      # E|x - z|^2 = 4 for x, z ~ N(0, I)
        True

    References:
        Lipman, Chen, Ben-Hamu, Nickel & Le, "Flow matching for generative modeling", ICLR 2023.
        Liu, Gong & Liu, "Flow straight and fast", ICLR 2023.
        Tong et al., "Improving and generalizing flow-based generative models with minibatch
        optimal transport", 2023; Pooladian et al., "Multisample flow matching", ICML 2023.
        Esser et al., "Scaling rectified flow transformers", ICML 2024 (logit-normal times).
    """
    _check_data("x", x)
    check_key(key, allow_batch=True)
    path = get_path(path, sigma_min=sigma_min)
    coupling_fn = _check_coupling(coupling)
    check_choice("t_sampling", t_sampling, T_SAMPLING)
    t_range = _check_t_range(t_range)
    if return_per_sigma:
        if sigmas is None:
            raise ValueError("return_per_sigma=True needs sigmas, the levels [L] of the diagnostics; got None.")
        check_sigma_schedule(sigmas, decreasing=False)
    drawn_noise, t, k_coupling = _draw(key, x.shape, x.dtype, t_sampling, t_range)
    if noise is None:
        noise = drawn_noise
    else:
        check_same_shape("noise", noise, x.shape, "the shape of x")
        check_floating("noise", noise)
    data = x
    if coupling_fn is not None:
        noise, data = coupling_fn(noise, data, k_coupling)
    x_t, target = path.sample(data, noise, t)
    v = velocity_fn(x_t, t)
    check_same_shape("velocity_fn", v, x.shape, "the shape of x")
    sq_error = _sum_per_example((v - target) ** 2)
    loss = jnp.mean(sq_error)
    if return_per_sigma:
        levels = jnp.asarray(sigmas, dtype=x.dtype)
        idx = _nearest_level(path.noise_ratio(t), levels)
        return loss, _mean_per_level(dsm_weight(path, t) * sq_error, idx, levels.shape[0])
    return loss
