"""Conditional sampling for inverse problems on top of the samplers: inpainting, denoising of observations.

A *projection* ``project(x, level, key)`` runs after every update of the
underlying sampler (``level`` the time ``t`` or the noise level ``sigma`` just
reached) and once more after the final Tweedie step, with ``level=None``
(the data itself: the clean observation is imposed).

References:
    Song & Ermon, "Generative modeling by estimating gradients of the data
    distribution", NeurIPS 2019 (inpainting with annealed Langevin dynamics).
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, "Score-based
    generative modeling through stochastic differential equations", ICLR 2021
    (imputation, Appendix I.2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax._checks import check_batched, check_key, check_positive_number, is_concrete, runtime_check_positive
from dsm_jax._utils import to_batch_expanded
from dsm_jax.parameterization import ModelFn, as_score_fn, broadcast_sigma
from dsm_jax.samplers._result import SampleResult, snapshot_every
from dsm_jax.samplers.langevin import annealed_langevin_scan, check_annealed
from dsm_jax.samplers.reverse_sde import (
    Predictor,
    check_pc,
    reverse_diffusion_predictor,
    reverse_sde_scan,
    sde_sampler_input,
)
from dsm_jax.sde import SDE

__all__ = ["denoise_observation", "inpaint", "inpaint_annealed_langevin"]


def _check_mask(y, mask):
    check_batched("y", y)
    if jnp.shape(mask) != jnp.shape(y) and jnp.shape(mask) != jnp.shape(y)[1:]:
        raise ValueError(
            f"mask must have the shape of y {y.shape} or of one example {y.shape[1:]}, got {jnp.shape(mask)}."
        )
    if is_concrete(mask):
        m = np.asarray(mask)
        if not np.all((m == 0) | (m == 1)):
            raise ValueError("mask must hold only 0 (unknown) and 1 (known) entries.")
    return jnp.broadcast_to(jnp.asarray(mask, y.dtype), y.shape)


def inpaint(
    model_fn: ModelFn,
    sde: SDE,
    y: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    *,
    num_steps: int,
    snr=0.16,
    corrector_steps: int = 1,
    predictor: Predictor = reverse_diffusion_predictor,
    final_denoise: bool = True,
    parameterization: str = "score",
    t_min=None,
    return_trajectory: bool = False,
    trajectory_every: int | None = None,
) -> SampleResult:
    """Fills in the unknown entries of ``y`` by reverse-SDE sampling with replacement.

    The predictor-corrector sampler runs from the prior; after every update
    at time ``t`` the known entries (``mask == 1``) are replaced by a fresh
    draw of their noised value ``scale(t) y + sigma(t) z``, so they stay
    consistent with the observation at every noise level; the unknown ones
    follow the reverse SDE. At the end the known entries equal ``y``.
    This is the imputation method of Song et al. 2021 (Appendix I.2); it is
    an approximation of sampling from ``p(x_unknown | x_known = y)`` that is
    exact when the two blocks are independent and accurate when the observed
    entries identify the mode.

    Args:
        model_fn: ``model_fn(x, sigma) -> out``.
        sde: a :class:`dsm_jax.sde.SDE`.
        y: observations ``[B, *D]`` (values under ``mask == 0`` are ignored).
        mask: 1 where ``y`` is known, 0 where it is to be filled in; shape of
            ``y`` or of one example.
        key: PRNG key.
        num_steps, snr, corrector_steps, predictor, final_denoise,
            parameterization, t_min, return_trajectory, trajectory_every: as in
            :func:`predictor_corrector`.

    Returns:
        :class:`SampleResult`.
    """
    mask = _check_mask(y, mask)
    score_fn, num_steps = sde_sampler_input(model_fn, sde, y, num_steps, parameterization, name="y")
    check_key(key)
    corrector_steps = check_pc(snr, corrector_steps)
    ts = sde.time_grid(num_steps, t_min=t_min)
    every = snapshot_every(return_trajectory, trajectory_every, num_steps)
    k_init, k_proj, k_run = jax.random.split(key, 3)

    def project(x, t, k):
        if t is None:  # after the final Tweedie step: the clean observation
            return mask * y + (1.0 - mask) * x
        scale, sigma = sde.marginal(t)
        noised = scale * y + sigma * jax.random.normal(k, y.shape, y.dtype)
        return mask * noised + (1.0 - mask) * x

    x_init = project(sde.prior_sample(k_init, y.shape).astype(y.dtype), ts[0], k_proj)
    return reverse_sde_scan(
        score_fn,
        sde,
        x_init,
        k_run,
        ts,
        predictor=predictor,
        corrector_steps=corrector_steps,
        snr=snr,
        final_denoise=final_denoise,
        every=every,
        project=project,
    )


def inpaint_annealed_langevin(
    model_fn: ModelFn,
    y: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    sigmas: jax.Array,
    *,
    steps_per_sigma: int,
    step_lr,
    final_denoise: bool = True,
    parameterization: str = "score",
    x0: jax.Array | None = None,
    return_result: bool = False,
):
    """Inpainting with annealed Langevin dynamics (Song & Ermon 2019, Section 5).

    Runs :func:`annealed_langevin` and, after every step at level ``sigma_i``,
    sets the known entries to ``y + sigma_i z`` (fresh noise), so that they
    are a draw of the observation at the current noise level; the final
    result holds ``y`` exactly on the mask. Approximate, as :func:`inpaint`.

    Args:
        model_fn: ``model_fn(x, sigma) -> out``.
        y: observations ``[B, *D]``.
        mask: 1 where known, 0 where unknown (shape of ``y`` or of one example).
        key: PRNG key.
        sigmas: ``[L]`` strictly decreasing.
        steps_per_sigma, step_lr, final_denoise, parameterization: as in
            :func:`annealed_langevin`.
        x0: initial state (default ``sigmas[0] * N(0, I)``).
        return_result: return a :class:`SampleResult` with
            ``nfe = L * steps_per_sigma + final_denoise``.

    Returns:
        ``[B, *D]``, or with ``return_result`` a :class:`SampleResult`.
    """
    mask = _check_mask(y, mask)
    steps_per_sigma = check_annealed(y, key, sigmas, steps_per_sigma, step_lr, name="y")
    score_fn = as_score_fn(model_fn, parameterization=parameterization)
    k_init, k_run = jax.random.split(key)
    if x0 is None:
        x0 = jnp.asarray(sigmas, y.dtype)[0] * jax.random.normal(k_init, y.shape, y.dtype)
    elif jnp.shape(x0) != y.shape:
        raise ValueError(f"x0 must have the shape of y {y.shape}, got {jnp.shape(x0)}.")

    def project(x, sigma, k):
        if sigma is None:  # after the final Tweedie step: the clean observation
            return mask * y + (1.0 - mask) * x
        noised = y + sigma * jax.random.normal(k, y.shape, y.dtype)
        return mask * noised + (1.0 - mask) * x

    x, _ = annealed_langevin_scan(
        score_fn, x0, k_run, sigmas, steps_per_sigma, step_lr, final_denoise=final_denoise, every=None, project=project
    )
    if not final_denoise:
        x = project(x, None, k_run)
    if not return_result:
        return x
    return SampleResult(x, jnp.asarray(jnp.shape(sigmas)[0] * steps_per_sigma + int(final_denoise), jnp.int32))


def denoise_observation(
    model_fn: ModelFn,
    sde: SDE,
    y: jax.Array,
    sigma_y,
    key: jax.Array,
    *,
    num_steps: int,
    predictor: Predictor = reverse_diffusion_predictor,
    final_denoise: bool = True,
    parameterization: str = "score",
    t_min=None,
    return_trajectory: bool = False,
    trajectory_every: int | None = None,
) -> SampleResult:
    """Draws from the posterior ``p(x | y)`` of ``y = x + sigma_y eps`` (known ``sigma_y``).

    ``y`` is a draw of the forward process at the time ``t*`` with
    ``sigma(t*) / scale(t*) = sigma_y`` (:meth:`SDE.t_from_noise_ratio`):
    ``scale(t*) y = scale(t*) x + sigma(t*) eps``. The reverse SDE started at
    ``x_{t*} = scale(t*) y`` and run to ``t_min`` therefore samples
    ``p(x_0 | x_{t*})``, the posterior (exactly, for an exact score and a
    fine grid). There is no corrector: Langevin correction at time ``t``
    targets the unconditional marginal ``p_t`` and would forget ``y``.
    For the posterior *mean* (the MMSE denoiser) use
    :func:`dsm_jax.tweedie.denoise` instead: one model call.

    Args:
        model_fn: ``model_fn(x, sigma) -> out``.
        sde: a :class:`dsm_jax.sde.SDE`; ``sigma_y`` must lie in its range
            ``(noise_ratio(t_min), noise_ratio(T)]``.
        y: noisy observations ``[B, *D]``.
        sigma_y: their noise level, scalar or ``[B]``.
        key: PRNG key.
        num_steps: predictor steps from ``t*`` to ``t_min``.
        predictor, final_denoise, parameterization, t_min, return_trajectory,
            trajectory_every: as in :func:`predictor_corrector`.

    Returns:
        :class:`SampleResult`, ``nfe = num_steps + final_denoise``.
    """
    score_fn, num_steps = sde_sampler_input(model_fn, sde, y, num_steps, parameterization, name="y")
    check_key(key)
    check_positive_number("sigma_y", sigma_y)
    runtime_check_positive("sigma_y", sigma_y)
    sigma_y = broadcast_sigma(sigma_y, y) if jnp.ndim(sigma_y) else jnp.asarray(sigma_y, y.dtype)
    t_end = sde.t_min if t_min is None else t_min
    if is_concrete(sigma_y):
        lo, hi = float(sde.noise_ratio(t_end)), float(sde.noise_ratio(sde.T))
        s = np.asarray(sigma_y)
        if np.any(s <= lo) or np.any(s > hi * (1 + 1e-6)):
            raise ValueError(f"sigma_y must lie in ({lo:.4g}, {hi:.4g}] for this SDE, got {np.asarray(sigma_y)!r}.")
    t_star = jnp.minimum(sde.t_from_noise_ratio(sigma_y), sde.T)
    # A [num_steps + 1] grid, or [num_steps + 1, B] for per-example sigma_y.
    frac = jnp.linspace(0.0, 1.0, num_steps + 1).reshape((-1,) + (1,) * t_star.ndim)
    ts = t_star + frac * (t_end - t_star)
    x_init = to_batch_expanded(sde.scale(t_star), y) * y
    every = snapshot_every(return_trajectory, trajectory_every, num_steps)
    return reverse_sde_scan(
        score_fn,
        sde,
        x_init,
        key,
        ts,
        predictor=predictor,
        corrector_steps=0,
        snr=None,
        final_denoise=final_denoise,
        every=every,
    )
