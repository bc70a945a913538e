"""Denoising score matching: one sigma, many sigmas (NCSN), SURE, and the continuous-time SDE loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsm_jax._checks import (
    check_choice,
    check_key,
    check_positive_number,
    check_sigma,
    check_sigma_schedule,
    is_concrete,
    runtime_check_positive,
)
from dsm_jax._utils import expand_to, to_batch
from dsm_jax.divergence import (
    TRACES,
    exact_divergence_and_value,
    hutchinson_divergence_and_value,
)
from dsm_jax.losses._common import _check_data, _mean_per_level, _nearest_level, _sum_per_example
from dsm_jax.noise import WEIGHTINGS, Weighting, get_weighting, sample_log_uniform_sigmas
from dsm_jax.parameterization import check_parameterization, model_to_score

# ---------------------------------------------------------------------------
# Denoising score matching
# ---------------------------------------------------------------------------


def _check_dsm_inputs(x, sigma, key, parameterization):
    _check_data("x", x)
    check_sigma(sigma, x.shape[0])
    runtime_check_positive("sigma", sigma)
    check_key(key)
    check_parameterization(parameterization)


def _dsm_per_example(model_fn, x, sigma, eps, parameterization, scale):
    """1/2 |s(scale x + sigma eps, sigma) + eps / sigma|^2 per example; sigma is [B].

    ``parameterization`` was validated by the public entry.
    """
    s_b = expand_to(sigma, x)
    x_noisy = scale * x + s_b * eps
    if parameterization == "eps":
        # s = -eps_hat / sigma: the residual is (eps - eps_hat) / sigma, no cancellation.
        eps_hat = model_fn(x_noisy, sigma)
        if eps_hat.shape != x.shape:
            raise ValueError(f"model_fn returned shape {eps_hat.shape}, expected {x.shape}.")
        return 0.5 * _sum_per_example((eps - eps_hat) ** 2) / sigma**2
    score = model_to_score(model_fn, x_noisy, sigma, parameterization, scale=scale)
    return 0.5 * _sum_per_example((score + eps / s_b) ** 2)


def dsm_loss(
    model_fn,
    x: jax.Array,
    sigma,
    key: jax.Array,
    *,
    parameterization: str = "score",
    scale=1.0,
) -> jax.Array:
    """Denoising score matching at one noise level (Vincent 2011).

    ``L(sigma) = E_x E_eps 1/2 |s(x~, sigma) + eps / sigma|^2`` with
    ``x~ = scale * x + sigma * eps``: the regression target ``-eps / sigma``
    is the score of the Gaussian kernel ``q(x~ | x)``. Its minimiser is the
    score of the noised marginal ``q_sigma``; ``L`` differs from
    ``1/2 E|s - grad log q_sigma|^2`` by a constant (Vincent's identity).

    Args:
        model_fn: ``model_fn(x, sigma) -> out``, ``sigma: [B]``.
        x: clean data ``[B, *D]``.
        sigma: scalar or ``[B]`` noise level(s), > 0.
        key: PRNG key for the noise ``eps``.
        parameterization: what the model outputs: "score", "eps", "x0", "energy".
        scale: signal scale of the noising (1 for VE; ``alpha(t)`` for VP).

    Returns:
        A scalar (batch mean of the per-example loss, summed over dimensions).

    Example:
        >>> score = lambda x, sigma: -x / (1.0 + sigma[:, None] ** 2)  # exact for N(0, I)
        >>> x = jax.random.normal(jax.random.key(0), (256, 2))
        >>> float(dsm_loss(score, x, 0.5, jax.random.key(1))) > 0
        True
    """
    _check_dsm_inputs(x, sigma, key, parameterization)
    sigma = to_batch(sigma, x)
    eps = jax.random.normal(key, x.shape, dtype=x.dtype)
    return jnp.mean(_dsm_per_example(model_fn, x, sigma, eps, parameterization, scale))


def _per_level_losses(model_fn, x, sigmas, key, parameterization, scale):
    """[L, B] per-example DSM losses, vmapped over the levels (one key per level).

    ``sigmas`` is ``[L]`` (one level per row) or ``[L, B]`` (per-example levels per row).
    """
    eps = _level_noise(key, sigmas.shape[0], x.shape, x.dtype)
    return _per_level_losses_given_eps(model_fn, x, sigmas, eps, parameterization, scale)


def _level_noise(key, num_levels: int, x_shape, dtype) -> jax.Array:
    """``eps [L, *x_shape]``: level ``i`` drawn with ``jax.random.split(key, L)[i]``."""
    keys = jax.random.split(key, num_levels)
    return jax.vmap(lambda k: jax.random.normal(k, x_shape, dtype=dtype))(keys)


def _per_level_losses_given_eps(model_fn, x, sigmas, eps, parameterization, scale):
    """[L, B] per-example DSM losses for the noise ``eps [L, B, *D]`` and levels ``[L]`` or ``[L, B]``.

    The levels are vectorised as ``jax.vmap`` over sigma would, with the
    ``L`` copies of the batch stacked into one batch of ``L * B`` for a single
    model call: the same numbers, but the weight gradients are plain matrix
    products (a vmapped model call adds a transposing copy of every layer's
    cotangent in the backward pass; see ``experiments/benchmarks/RESULTS.md``).
    Like every DSM loss, this needs a ``model_fn`` that treats examples independently.
    """
    num_levels, batch = eps.shape[0], x.shape[0]
    levels = jnp.broadcast_to(sigmas[:, None] if sigmas.ndim == 1 else sigmas, (num_levels, batch))
    stack = lambda a: a.reshape((num_levels * batch,) + a.shape[2:])
    xs = stack(jnp.broadcast_to(x, (num_levels,) + x.shape))
    per_example = _dsm_per_example(model_fn, xs, stack(levels), stack(eps), parameterization, scale)
    return per_example.reshape(num_levels, batch)


def per_sigma_dsm_losses(
    model_fn,
    x: jax.Array,
    sigmas: jax.Array,
    key: jax.Array,
    *,
    parameterization: str = "score",
    scale=1.0,
) -> jax.Array:
    """Unweighted DSM loss at every level, ``jax.vmap``-ed over ``sigmas``.

    Level ``i`` uses ``jax.random.split(key, L)[i]``, so the result equals
    ``[dsm_loss(model_fn, x, sigmas[i], keys[i]) for i in range(L)]``.

    Returns:
        ``[L]``.
    """
    _check_data("x", x)
    check_sigma_schedule(sigmas, decreasing=False)
    runtime_check_positive("sigmas", sigmas)
    check_key(key)
    check_parameterization(parameterization)
    sigmas = jnp.asarray(sigmas, dtype=x.dtype)
    return jnp.mean(_per_level_losses(model_fn, x, sigmas, key, parameterization, scale), axis=1)


def _jitter_in_log_cells(sigmas: jax.Array, u: jax.Array) -> jax.Array:
    """``[L, B]`` levels, row ``i`` log-uniform in the cell of ``sigmas[i]``.

    The cell of a level spans half-way (in log sigma) to each neighbour; the
    end cells are symmetric about their level. With a geometric grid the
    cells tile ``[sigma_1 gamma^{1/2}, sigma_L gamma^{-1/2}]``.
    """
    logs = jnp.log(sigmas)
    if sigmas.shape[0] == 1:
        return jnp.broadcast_to(sigmas[:, None], u.shape)
    half = jnp.diff(logs) / 2  # [L-1], signed
    lower = jnp.concatenate([-half[:1], -half])  # towards the previous level
    upper = jnp.concatenate([half, half[-1:]])  # towards the next level
    return jnp.exp(logs[:, None] + lower[:, None] + u * (upper - lower)[:, None])


def multiscale_dsm_loss(
    model_fn,
    x: jax.Array,
    sigmas: jax.Array,
    key: jax.Array,
    *,
    weighting: Weighting = "sigma2",
    parameterization: str = "score",
    sigma_sampling: str = "all",
    scale=1.0,
    return_per_sigma: bool = False,
):
    """Multi-scale DSM (NCSN): ``sum_i lambda(sigma_i) L(sigma_i) / L``.

    * ``sigma_sampling="all"``: every example at every level; the per-level
      losses are computed with ``jax.vmap`` over ``sigmas`` and averaged with
      weights ``lambda(sigma_i)``.
    * ``sigma_sampling="random"``: one level per example, drawn uniformly
      (Song & Ermon 2019): ``E_i E_x lambda(sigma_i) l(x, sigma_i)``, the same
      expectation at 1/L of the cost.
    * ``sigma_sampling="log_uniform"``: one continuous level per example,
      ``log sigma ~ U(log min sigmas, log max sigmas)``: the continuum the
      geometric grid discretises, so the model is trained between the grid
      levels too (what reverse-SDE and ODE samplers query).
    * ``sigma_sampling="stratified"``: every example at every level, each
      level jittered log-uniformly within its cell of the grid (half-way to
      its neighbours): the cost and low variance of "all", the continuum of
      "log_uniform" (a stratified estimate of the same integral). The cells
      need a strictly monotone ``sigmas`` (decreasing, as the samplers take
      it, or increasing).

    Args:
        model_fn: ``model_fn(x, sigma) -> out``.
        x: clean data ``[B, *D]``.
        sigmas: ``[L]`` positive noise levels (strictly monotone for "stratified").
        key: PRNG key (``jax.random.key(seed)``), or ``[B]`` keys, one per example: example ``j`` then
            draws exactly what a batch of one would draw with ``key[j]``, so
            the loss does not depend on how a batch is split (what
            :func:`dsm_jax.train.make_train_step` needs for its per-example
            keys, without running the model example by example).
        weighting: "sigma2" (default), "one", "inv_sigma2", "min_snr" or a callable.
        parameterization: "score", "eps", "x0" or "energy".
        sigma_sampling: "all", "random", "log_uniform" or "stratified".
        scale: signal scale of the noising.
        return_per_sigma: also return the unweighted per-level losses ``[L]``
            (for "random", the mean over the examples that drew each level;
            for "log_uniform", over those whose sigma is nearest to it in log
            scale; NaN for a level no example drew).

    Returns:
        A scalar, or ``(scalar, [L])`` with ``return_per_sigma``.

    Example:
        >>> from dsm_jax.noise import geometric_sigmas
        >>> sigmas = geometric_sigmas(1.0, 0.01, 10)
        >>> model_fn = lambda x, sigma: -x / (1.0 + sigma[:, None] ** 2)  # exact for N(0, I)
        >>> x = jax.random.normal(jax.random.key(0), (256, 2))
        >>> loss, per_sigma = multiscale_dsm_loss(
        ...     model_fn, x, sigmas, jax.random.key(1), return_per_sigma=True)
        >>> per_sigma.shape
        (10,)
    """
    _check_data("x", x)
    mode = _SIGMA_SAMPLINGS[check_choice("sigma_sampling", sigma_sampling, SIGMA_SAMPLING)]
    check_sigma_schedule(sigmas, decreasing=False, monotone=mode.monotone)
    runtime_check_positive("sigmas", sigmas)
    check_key(key, allow_batch=True)
    check_parameterization(parameterization)
    lam = get_weighting(weighting, scale=scale)
    sigmas = jnp.asarray(sigmas, dtype=x.dtype)
    draws = _multiscale_draws(key, x.shape, x.dtype, sigmas, mode)

    if mode.per_level:
        levels = draws.get("levels", sigmas)  # [L, B] jittered levels, or the grid itself
        per_example = _per_level_losses_given_eps(model_fn, x, levels, draws["eps"], parameterization, scale)
        per_level = jnp.mean(per_example, axis=1)
        weights = lam(levels)
        loss = jnp.mean((weights[:, None] if weights.ndim == 1 else weights) * per_example)
    else:
        sigma_b = draws["sigma"]
        per_example = _dsm_per_example(model_fn, x, sigma_b, draws["eps"], parameterization, scale)
        loss = jnp.mean(lam(sigma_b) * per_example)
        if return_per_sigma:
            idx = draws.get("idx")
            if idx is None:  # a continuous level: diagnostics binned to the nearest grid level in log scale
                idx = _nearest_level(sigma_b, sigmas)
            per_level = _mean_per_level(per_example, idx, sigmas.shape[0])
    if return_per_sigma:
        return loss, per_level
    return loss


def is_key_batch(key: jax.Array) -> bool:
    """True when ``key`` is a batch of PRNG keys (typed ``[B]`` or raw ``uint32 [B, 2]``), not one key."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim == 1
    return key.ndim == 2


def _draw_all(key, x_shape, dtype, sigmas) -> dict:
    """``eps [L, B, *D]``, level ``i`` from ``split(key, L)[i]``."""
    return {"eps": _level_noise(key, sigmas.shape[0], x_shape, dtype)}


def _draw_stratified(key, x_shape, dtype, sigmas) -> dict:
    """``levels [L, B]`` (each grid level jittered in its log cell) and ``eps [L, B, *D]``."""
    num_levels = sigmas.shape[0]
    k_u, k_loss = jax.random.split(key)
    levels = _jitter_in_log_cells(sigmas, jax.random.uniform(k_u, (num_levels, x_shape[0]), dtype=dtype))
    return {"levels": levels, "eps": _level_noise(k_loss, num_levels, x_shape, dtype)}


def _draw_random(key, x_shape, dtype, sigmas) -> dict:
    """``idx [B]`` uniform over the grid, ``sigma = sigmas[idx]`` and ``eps [B, *D]``."""
    k_idx, k_eps = jax.random.split(key)
    idx = jax.random.randint(k_idx, (x_shape[0],), 0, sigmas.shape[0])
    return {"idx": idx, "sigma": sigmas[idx], "eps": jax.random.normal(k_eps, x_shape, dtype=dtype)}


def _draw_log_uniform(key, x_shape, dtype, sigmas) -> dict:
    """``sigma [B]`` log-uniform between the grid's ends and ``eps [B, *D]``."""
    k_sigma, k_eps = jax.random.split(key)
    sigma_b = sample_log_uniform_sigmas(k_sigma, (x_shape[0],), jnp.min(sigmas), jnp.max(sigmas)).astype(dtype)
    return {"sigma": sigma_b, "eps": jax.random.normal(k_eps, x_shape, dtype=dtype)}


class _SigmaSampling(NamedTuple):
    """How :func:`multiscale_dsm_loss` picks the levels.

    ``draw(key, x_shape, dtype, sigmas) -> dict`` makes the random draws;
    ``per_level``: every example at every level (draws ``[L, B, ...]``), else one
    level per example (draws ``[B, ...]``); ``monotone``: the grid must be
    strictly monotone (the stratified cells run half-way to each neighbour,
    so a non-monotone grid would overlap them).
    """

    draw: Callable[..., dict]
    per_level: bool
    monotone: bool = False


_SIGMA_SAMPLINGS = {
    "all": _SigmaSampling(_draw_all, per_level=True),
    "random": _SigmaSampling(_draw_random, per_level=False),
    "log_uniform": _SigmaSampling(_draw_log_uniform, per_level=False),
    "stratified": _SigmaSampling(_draw_stratified, per_level=True, monotone=True),
}
SIGMA_SAMPLING = tuple(_SIGMA_SAMPLINGS)


def _multiscale_draws(key, x_shape, dtype, sigmas, mode: _SigmaSampling) -> dict:
    """The random draws of :func:`multiscale_dsm_loss` for data of shape ``x_shape`` (see ``mode.draw``).

    With ``[B]`` keys, example ``j``'s draws are those of a batch of one with ``key[j]``.
    """
    if not is_key_batch(key):
        return mode.draw(key, x_shape, dtype, sigmas)
    if key.shape[0] != x_shape[0]:
        raise ValueError(
            f"key holds {key.shape[0]} keys but x has {x_shape[0]} examples; pass one key or one per example."
        )
    one = jax.vmap(lambda k: mode.draw(k, (1,) + tuple(x_shape[1:]), dtype, sigmas))(key)
    # Each entry has the example axis at 0 (vmap) and a singleton batch axis (per-example
    # entries: axis 1; per-level entries [L, 1, ...]: axis 2). Put the batch where a batch call has it.
    if mode.per_level:  # [B, L, 1, ...] -> [L, B, ...]
        return {name: jnp.moveaxis(v[:, :, 0], 0, 1) for name, v in one.items()}
    return {name: v[:, 0] for name, v in one.items()}  # [B, 1, ...] -> [B, ...]


# ---------------------------------------------------------------------------
# SURE
# ---------------------------------------------------------------------------


def sure_loss(
    denoiser_fn,
    y: jax.Array,
    sigma,
    key: jax.Array | None = None,
    *,
    num_probes: int = 1,
    trace: str = "hutchinson",
    probe: str = "rademacher",
) -> jax.Array:
    """Stein's unbiased risk estimate of a denoiser, from noisy data alone.

    For ``y = x + sigma eps`` with ``eps ~ N(0, I)`` and a weakly
    differentiable denoiser ``D``,

    ``SURE(D, y) = |y - D(y)|^2 - d sigma^2 + 2 sigma^2 div_y D(y)``

    has expectation ``E|D(y) - x|^2`` (Stein 1981). The divergence is a
    Hutchinson estimate with ``num_probes`` jvps (Ramani et al. 2008's
    Monte-Carlo SURE) or exact (``trace="exact"``, small d).

    Args:
        denoiser_fn: ``denoiser_fn(y, sigma) -> x_hat``, ``sigma: [B]``.
        y: noisy observations ``[B, *D]``.
        sigma: the known noise level(s), scalar or ``[B]``.
        key: PRNG key for the probes (unused with ``trace="exact"``).
        num_probes: Hutchinson probes.
        trace: "hutchinson" or "exact".
        probe: "rademacher" or "gaussian".

    Returns:
        A scalar: the batch mean of SURE (summed over dimensions).
    """
    _check_data("y", y)
    check_sigma(sigma, y.shape[0])
    runtime_check_positive("sigma", sigma)
    check_choice("trace", trace, TRACES)
    sigma_b = to_batch(sigma, y)
    if trace == "exact":
        div, x_hat = exact_divergence_and_value(denoiser_fn, y, sigma=sigma_b)
    else:
        if key is None:
            raise ValueError("key must be a PRNG key when trace='hutchinson', got None.")
        check_key(key)
        div, x_hat = hutchinson_divergence_and_value(
            denoiser_fn, y, key, sigma=sigma_b, num_probes=num_probes, probe=probe
        )
    d = y[0].size
    per_example = _sum_per_example((y - x_hat) ** 2) - d * sigma_b**2 + 2.0 * sigma_b**2 * div
    return jnp.mean(per_example)


# ---------------------------------------------------------------------------
# Continuous-time DSM for an SDE
# ---------------------------------------------------------------------------

SDE_WEIGHTINGS = WEIGHTINGS + ("likelihood",)


def sde_dsm_loss(
    model_fn,
    x: jax.Array,
    sde,
    key: jax.Array,
    *,
    weighting: Weighting = "sigma2",
    t_min=1e-5,
    parameterization: str = "score",
) -> jax.Array:
    """Continuous-time DSM for a noising SDE (Song et al. 2021, Eq. 7).

    ``E_t E_x E_eps lambda(t) 1/2 |s(x_t, sigma(t)) + eps / sigma(t)|^2``
    with ``t ~ U(t_min, T)`` per example, ``(scale, sigma) = sde.marginal(t)``
    and ``x_t = scale x + sigma eps``. The model is conditioned on
    ``sigma(t)``, as everywhere in the library.

    Args:
        model_fn: ``model_fn(x, sigma) -> out``, ``sigma: [B]``.
        x: clean data ``[B, *D]``.
        sde: a :class:`dsm_jax.sde.SDE` (anything with ``marginal``,
            ``diffusion`` and ``T``).
        key: PRNG key (times and noise).
        weighting: ``lambda`` as a function of sigma: "sigma2" (default; the
            NCSN/DDPM choice, every time's loss O(1)), "one", "inv_sigma2",
            "min_snr" (with the SDE's ``scale(t)`` in the SNR),
            a callable ``lambda(sigma)``, or "likelihood": ``lambda = g(t)^2``,
            which makes the loss an upper bound on the negative
            log-likelihood up to constants (Song, Durkan, Murray & Ermon 2021).
        t_min: smallest time sampled, in ``(0, T)``.
        parameterization: "score", "eps", "x0" or "energy".

    Returns:
        A scalar.

    References:
        Song et al., ICLR 2021; Song, Durkan, Murray & Ermon, "Maximum
        likelihood training of score-based diffusion models", NeurIPS 2021.
    """
    _check_data("x", x)
    check_key(key)
    check_parameterization(parameterization)
    if not callable(weighting):
        check_choice("weighting", weighting, SDE_WEIGHTINGS)
    check_positive_number("t_min", t_min)
    runtime_check_positive("t_min", t_min)
    if is_concrete(t_min) and not float(t_min) < float(sde.T):
        raise ValueError(f"t_min must be smaller than sde.T={sde.T}, got {t_min!r}.")
    k_t, k_eps = jax.random.split(key)
    t = jax.random.uniform(k_t, (x.shape[0],), dtype=x.dtype, minval=t_min, maxval=sde.T)
    scale, sigma = sde.marginal(t)
    eps = jax.random.normal(k_eps, x.shape, dtype=x.dtype)
    per_example = _dsm_per_example(model_fn, x, sigma, eps, parameterization, expand_to(scale, x))
    if weighting == "likelihood":
        lam = sde.diffusion(t) ** 2
    else:
        lam = get_weighting(weighting, scale=scale)(sigma)
    return jnp.mean(lam * per_example)
