"""Few-step samplers on a grid of noise levels: Euler, Heun (EDM) and DPM-Solver++ (2M).

All three integrate the probability-flow ODE of the variance-exploding process
``x_sigma = x_0 + sigma * eps`` in the noise level itself (Karras et al. 2022, Eq. 4
with ``sigma(t) = t``, ``s(t) = 1``):

    ``dx / dsigma = (x - D(x, sigma)) / sigma = -sigma * grad_x log p_sigma(x)``,

where ``D(x, sigma) = E[x_0 | x_sigma = x] = x + sigma^2 s(x, sigma)`` is Tweedie's
denoiser, computed from the model's output converted to a score by
:func:`dsm_jax.parameterization.as_score_fn` (once, at entry). They start from
``x_init = sigmas[0] * z`` (``z ~ N(0, I)``, the caller draws it), step through
the decreasing levels ``sigmas[0] > ... > sigmas[-1] > 0`` and end with a
first-order step from ``sigmas[-1]`` to ``sigma = 0``, which is ``D(x, sigmas[-1])``.
With ``N`` levels:

* :func:`euler`: ``x <- x + (sigma_next - sigma) (x - D) / sigma``; ``N`` evaluations, order 1.
* :func:`heun`: Euler then the trapezoidal correction at ``sigma_next``
  (EDM Algorithm 1; with ``churn > 0`` the stochastic Algorithm 2);
  ``2 N - 1`` evaluations, order 2.
* :func:`dpm_solver_pp`: the exact integral of the linear part in
  ``lambda = -log sigma`` with the denoiser extrapolated linearly from the
  last two levels (multistep DPM-Solver++ 2M, data prediction); first order at
  the first step (no history yet) and at the last (the step to 0);
  ``N`` evaluations, order 2.

Each is one ``step(carry, level)`` run by ``jax.lax.scan`` over the grid, so its
compiled size does not depend on ``N``; nothing is jit-wrapped. Grids:
:func:`dsm_jax.noise.karras_sigmas` (EDM's, recommended) or any strictly
decreasing positive array. A model trained with a VP SDE is sampled through
:func:`dsm_jax.sde.ve_model_from_vp` (the EDM change of variables).

Returns, like :func:`~dsm_jax.samplers.annealed_langevin`: the samples
``[B, *D]``, ``(samples, trajectory)`` with ``return_trajectory=True`` (the
trajectory ``[N + 1, B, *D]``: the state at each level, then the samples), or
with ``return_result=True`` a :class:`~dsm_jax.samplers.SampleResult`
``(samples, nfe, trajectory)``.

Example:
    >>> from dsm_jax.noise import karras_sigmas
    >>> denoiser = lambda x, sigma: x / (1.0 + sigma[:, None] ** 2)     # N(0, I) data: E[x0 | x]
    >>> sigmas = karras_sigmas(80.0, 0.002, 18)
    >>> x_init = sigmas[0] * jax.random.normal(jax.random.key(0), (512, 2))
    >>> out = heun(denoiser, x_init, sigmas, parameterization="x0", return_result=True)
    >>> out.samples.shape, int(out.nfe)
    ((512, 2), 35)

References:
    Karras, Aittala, Aila & Laine, "Elucidating the design space of
    diffusion-based generative models", NeurIPS 2022 (Eq. 4-5, Algorithms 1-2).
    Lu, Zhou, Bao, Chen, Li & Zhu, "DPM-Solver++: fast solver for guided
    sampling of diffusion probabilistic models", 2022 (Algorithm 2, 2M).
    Song, Meng & Ermon, "Denoising diffusion implicit models", ICLR 2021
    (the first-order step, which equals Euler's in sigma).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax._checks import (
    check_key,
    check_same_shape,
    check_sigma_schedule,
    check_state,
    is_concrete,
    runtime_check_positive,
)
from dsm_jax.parameterization import ModelFn, as_score_fn
from dsm_jax.samplers.langevin import _result

__all__ = ["dpm_solver_pp", "euler", "heun"]

DPM_ORDERS = (1, 2)


def _denoiser(model_fn: ModelFn, x_init: jax.Array, sigmas, parameterization: str):
    """Checks the inputs before tracing; returns ``(D(x, sigma), sigmas)`` with ``sigmas`` in ``x_init``'s dtype."""
    check_state("x_init", x_init)
    check_sigma_schedule(sigmas, decreasing=True)
    runtime_check_positive("sigmas", sigmas)
    score_fn = as_score_fn(model_fn, parameterization=parameterization)
    sigmas = jnp.asarray(sigmas, x_init.dtype)
    out = jax.eval_shape(score_fn, x_init, sigmas[0])
    check_same_shape("model_fn", out, x_init.shape, f"the shape of x_init, {tuple(x_init.shape)}")

    def denoise(x, sigma):
        return x + sigma**2 * score_fn(x, sigma)

    return denoise, sigmas


def _steps(sigmas: jax.Array):
    """``(sigma_i, sigma_{i+1})`` for the ``N - 1`` steps between the levels."""
    return sigmas[:-1], sigmas[1:]


def _trajectory(x_init, traj, samples):
    """``[x_init, states after each step..., samples]``, or None without a trajectory."""
    if traj is None:
        return None
    return jnp.concatenate([x_init[None], traj, samples[None]], axis=0)


def euler(
    model_fn: ModelFn,
    x_init: jax.Array,
    sigmas,
    *,
    parameterization: str = "score",
    return_trajectory: bool = False,
    return_result: bool = False,
):
    """Euler's method on the probability-flow ODE in sigma, then the step to 0 (``N`` evaluations).

    ``d_i = (x - D(x, sigma_i)) / sigma_i``, ``x <- x + (sigma_{i+1} - sigma_i) d_i``,
    and finally ``x <- D(x, sigma_{N-1})``. In sigma this is also the DDIM step
    ``x <- (sigma_{i+1} / sigma_i) x + (1 - sigma_{i+1} / sigma_i) D``.

    Args:
        model_fn: ``model_fn(x, sigma) -> out`` with ``sigma: [B]``.
        x_init: ``[B, *D]``, ``sigmas[0] * N(0, I)`` draws.
        sigmas: ``[N]`` strictly decreasing positive levels (e.g. :func:`dsm_jax.noise.karras_sigmas`).
        parameterization: what ``model_fn`` outputs: "score", "eps", "x0" or "energy".
        return_trajectory: also return the states ``[N + 1, B, *D]`` (one per level, then the samples).
        return_result: return a :class:`~dsm_jax.samplers.SampleResult` with ``nfe = N``.

    Returns:
        ``samples``, ``(samples, trajectory)`` or a :class:`~dsm_jax.samplers.SampleResult`.

    References:
        Karras et al., NeurIPS 2022, Eq. 4 (the ODE) and Algorithm 1 without its correction.
    """
    denoise, sigmas = _denoiser(model_fn, x_init, sigmas, parameterization)

    def step(x, level):
        sigma, sigma_next = level
        d = (x - denoise(x, sigma)) / sigma
        x = x + (sigma_next - sigma) * d
        return x, x if return_trajectory else None

    x, traj = jax.lax.scan(step, x_init, _steps(sigmas))
    samples = denoise(x, sigmas[-1])
    return _result(samples, sigmas.shape[0], _trajectory(x_init, traj, samples), return_trajectory, return_result)


def _check_non_negative(name: str, value) -> float:
    """A concrete finite number ``>= 0`` (these options decide the program's structure, so no tracers)."""
    if isinstance(value, bool) or not is_concrete(value) or np.ndim(value) != 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
    v = float(value)
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return v


def heun(
    model_fn: ModelFn,
    x_init: jax.Array,
    sigmas,
    key: jax.Array | None = None,
    *,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    parameterization: str = "score",
    return_trajectory: bool = False,
    return_result: bool = False,
):
    """Heun's method on the probability-flow ODE in sigma (EDM Algorithms 1 and 2); ``2 N - 1`` evaluations.

    Per step from ``sigma_i`` to ``sigma_{i+1}`` (``i < N - 1``):

    * with ``churn > 0`` (Algorithm 2) the noise is first raised to
      ``sigma_hat = (1 + gamma_i) sigma_i`` by ``x <- x + sqrt(sigma_hat^2 - sigma_i^2) s_noise z``,
      ``gamma_i = min(churn / N, sqrt(2) - 1)`` when ``s_tmin <= sigma_i <= s_tmax``, else 0
      (without churn, ``sigma_hat = sigma_i``);
    * ``d = (x - D(x, sigma_hat)) / sigma_hat``, ``x' = x + (sigma_{i+1} - sigma_hat) d``;
    * ``d' = (x' - D(x', sigma_{i+1})) / sigma_{i+1}``, ``x <- x + (sigma_{i+1} - sigma_hat) (d + d') / 2``.

    The last step goes to ``sigma = 0`` with Euler alone (after its churn, if any):
    ``x <- D(x, sigma_hat)``. The local error is ``O(h^3)``, the global one ``O(h^2)``.

    Args:
        model_fn: ``model_fn(x, sigma) -> out`` with ``sigma: [B]``.
        x_init: ``[B, *D]``, ``sigmas[0] * N(0, I)`` draws.
        sigmas: ``[N]`` strictly decreasing positive levels (e.g. :func:`dsm_jax.noise.karras_sigmas`).
        key: PRNG key, required when ``churn > 0`` (unused otherwise).
        churn: ``S_churn >= 0``, the total amount of added noise (0: deterministic, Algorithm 1).
        s_tmin, s_tmax: churn only at levels in ``[s_tmin, s_tmax]``.
        s_noise: ``S_noise >= 0``, the scale of the added noise (EDM used 1.003-1.007).
        parameterization: what ``model_fn`` outputs: "score", "eps", "x0" or "energy".
        return_trajectory: also return the states ``[N + 1, B, *D]`` (one per level, then the samples).
        return_result: return a :class:`~dsm_jax.samplers.SampleResult` with ``nfe = 2 N - 1``.

    Returns:
        ``samples``, ``(samples, trajectory)`` or a :class:`~dsm_jax.samplers.SampleResult`.

    References:
        Karras et al., NeurIPS 2022, Algorithms 1 and 2.
    """
    churn = _check_non_negative("churn", churn)
    s_tmin = _check_non_negative("s_tmin", s_tmin)
    s_noise = _check_non_negative("s_noise", s_noise)
    if not (is_concrete(s_tmax) and np.ndim(s_tmax) == 0 and float(s_tmax) >= s_tmin):
        raise ValueError(f"s_tmax must be a number >= s_tmin={s_tmin!r}, got {s_tmax!r}.")
    stochastic = churn > 0.0
    if stochastic:
        check_key(key)
    denoise, sigmas = _denoiser(model_fn, x_init, sigmas, parameterization)
    num = sigmas.shape[0]
    gamma = min(churn / num, math.sqrt(2.0) - 1.0)
    gammas = jnp.where((sigmas >= s_tmin) & (sigmas <= float(s_tmax)), gamma, 0.0).astype(sigmas.dtype)
    keys = jax.random.split(key, num) if key is not None and stochastic else jnp.zeros((num,))

    def churned(x, sigma, gamma, k):
        """``(x_hat, sigma_hat)``: the state with its noise raised by ``gamma`` (Algorithm 2, lines 5-6)."""
        if not stochastic:
            return x, sigma
        z = jax.random.normal(k, x.shape, x.dtype)
        # sqrt(sigma_hat^2 - sigma^2) without the cancellation (which can round below 0 at gamma = 0).
        return x + sigma * jnp.sqrt(gamma * (2.0 + gamma)) * s_noise * z, sigma * (1.0 + gamma)

    def step(x, level):
        sigma, sigma_next, gamma, k = level
        x, sigma_hat = churned(x, sigma, gamma, k)
        h = sigma_next - sigma_hat
        d = (x - denoise(x, sigma_hat)) / sigma_hat
        x_euler = x + h * d
        d_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
        x = x + h * 0.5 * (d + d_next)
        return x, x if return_trajectory else None

    x, traj = jax.lax.scan(step, x_init, (*_steps(sigmas), gammas[:-1], keys[:-1]))
    x_hat, sigma_hat = churned(x, sigmas[-1], gammas[-1], keys[-1])
    samples = denoise(x_hat, sigma_hat)
    return _result(samples, 2 * num - 1, _trajectory(x_init, traj, samples), return_trajectory, return_result)


def dpm_solver_pp(
    model_fn: ModelFn,
    x_init: jax.Array,
    sigmas,
    *,
    order: int = 2,
    parameterization: str = "score",
    return_trajectory: bool = False,
    return_result: bool = False,
):
    """Multistep DPM-Solver++ (data prediction) on the probability-flow ODE in sigma; ``N`` evaluations.

    With ``lambda = -log sigma`` the ODE is ``dx / dlambda = D(x, sigma) - x``,
    whose linear part integrates exactly: from ``sigma_i`` to ``sigma_{i+1}``,
    with ``h_i = lambda_{i+1} - lambda_i = log(sigma_i / sigma_{i+1})``,

        ``x <- (sigma_{i+1} / sigma_i) x + (1 - exp(-h_i)) D_hat``.

    Order 1: ``D_hat = D_i`` (DDIM). Order 2 (2M): ``D_hat = (1 + 1 / (2 r_i)) D_i
    - D_{i-1} / (2 r_i)`` with ``r_i = h_{i-1} / h_i``, the denoiser extrapolated
    from the previous level at no extra evaluation; the first step has no
    previous level and is first order, and the last one (to ``sigma = 0``,
    ``h = inf``) is ``x <- D(x, sigma_{N-1})``, first order too.

    Args:
        model_fn: ``model_fn(x, sigma) -> out`` with ``sigma: [B]``.
        x_init: ``[B, *D]``, ``sigmas[0] * N(0, I)`` draws.
        sigmas: ``[N]`` strictly decreasing positive levels (e.g. :func:`dsm_jax.noise.karras_sigmas`).
        order: 1 or 2.
        parameterization: what ``model_fn`` outputs: "score", "eps", "x0" or "energy".
        return_trajectory: also return the states ``[N + 1, B, *D]`` (one per level, then the samples).
        return_result: return a :class:`~dsm_jax.samplers.SampleResult` with ``nfe = N``.

    Returns:
        ``samples``, ``(samples, trajectory)`` or a :class:`~dsm_jax.samplers.SampleResult`.

    References:
        Lu et al., "DPM-Solver++", 2022, Algorithm 2 (multistep, data prediction).
    """
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order not in DPM_ORDERS:
        raise ValueError(f"order must be one of {list(DPM_ORDERS)}, got {order!r}.")
    denoise, sigmas = _denoiser(model_fn, x_init, sigmas, parameterization)
    num = sigmas.shape[0]
    log_sigmas = jnp.log(sigmas)
    hs = log_sigmas[:-1] - log_sigmas[1:]
    # The extrapolation weight 1 / (2 r_i); 0 at the first step, which has no previous denoiser.
    weights = jnp.zeros_like(hs) if order == 1 else jnp.concatenate([jnp.zeros_like(hs[:1]), 0.5 * hs[1:] / hs[:-1]])

    def step(carry, level):
        x, previous = carry
        sigma, sigma_next, h, w = level
        denoised = denoise(x, sigma)
        extrapolated = (1.0 + w) * denoised - w * previous
        x = (sigma_next / sigma) * x - jnp.expm1(-h) * extrapolated
        return (x, denoised), x if return_trajectory else None

    (x, _), traj = jax.lax.scan(step, (x_init, jnp.zeros_like(x_init)), (*_steps(sigmas), hs, weights))
    samples = denoise(x, sigmas[-1])
    return _result(samples, num, _trajectory(x_init, traj, samples), return_trajectory, return_result)
