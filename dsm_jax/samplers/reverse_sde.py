"""Samplers: Langevin dynamics, reverse-time SDEs, the probability-flow ODE, DDPM/DDIM.

Every fixed-step sampler is one ``step(carry, x)`` run by ``jax.lax.scan``
over a grid (noise levels, times, keys): its compiled size does not grow with
the number of steps. Nothing is jit-wrapped; the caller jits, e.g.
``jax.jit(partial(euler_maruyama, model_fn, sde, num_steps=500))(x, key)``.
Keys are explicit.

Checks: before tracing, shapes, dtypes (floating-point states), keys and
every concrete value (sigmas decreasing and > 0, step sizes > 0) are checked.
Values traced under ``jit`` (a schedule or a step size passed as an argument,
the initial states) are only checked at run time with the opt-in ``checkify``
checks of :func:`dsm_jax.debug_checks` (sigmas and step sizes finite and > 0,
initial states finite); off by default, they add nothing to the program.

Returns:
    :func:`langevin` and :func:`annealed_langevin` (the NCSN contract) return
    the samples ``[B, *D]``, or ``(samples, trajectory)`` with
    ``return_trajectory=True``. The SDE/ODE samplers and the inverse-problem
    samplers return a :class:`SampleResult` ``(samples, nfe, trajectory)``:
    ``nfe`` counts model evaluations, ``trajectory`` is ``None`` unless asked.

Trajectories are thinned: with ``trajectory_every=k`` the trajectory holds the
initial state, the state after every ``k`` steps and the final state (before
the optional Tweedie step), so memory is ``O(num_steps / k)``. By default
``k = ceil(num_steps / 100)`` (at most about 100 snapshots).

SDE samplers integrate the reverse-time SDE of Song et al. 2021,

    ``dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dw_bar``  from ``t = T`` to ``t_min``,

on the uniform grid ``t_k = T - k (T - t_min) / num_steps``. The model is
called as ``model_fn(x, sigma(t))`` and its output converted with
``score_from_model(..., scale=scale(t))`` (see :mod:`dsm_jax.sde`). Each ends
with an optional Tweedie step ``(x + sigma^2 s(x)) / scale`` at ``t_min``
(one more model evaluation), which removes the remaining noise ``sigma(t_min)``.

A *predictor* is any callable ``predictor(score_fn, sde, x, t, t_next, key) ->
x_next`` with ``score_fn(x, t)`` the score; :func:`euler_maruyama_predictor`,
:func:`reverse_diffusion_predictor` and :func:`ddim_predictor` are provided,
and any of them can be passed to :func:`predictor_corrector`.

References:
    Song & Ermon, "Generative modeling by estimating gradients of the data
    distribution", NeurIPS 2019 (annealed Langevin dynamics, inpainting).
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, "Score-based
    generative modeling through stochastic differential equations", ICLR 2021
    (reverse SDE, predictor-corrector, probability-flow ODE, imputation).
    Ho, Jain & Abbeel, "Denoising diffusion probabilistic models", NeurIPS 2020.
    Song, Meng & Ermon, "Denoising diffusion implicit models", ICLR 2021.
    Roberts & Tweedie, "Exponential convergence of Langevin distributions and
    their discrete approximations", Bernoulli 1996.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax._checks import (
    check_batched,
    check_choice,
    check_floating,
    check_key,
    check_positive_int,
    check_positive_number,
    check_same_shape,
    check_sigma_schedule,
    is_concrete,
    runtime_check_finite,
    runtime_check_positive,
)
from dsm_jax.parameterization import (
    ModelFn,
    broadcast_sigma,
    check_parameterization,
    expand_to,
    score_from_model,
)
from dsm_jax.sde import SDE
from dsm_jax.tweedie import posterior_mean

__all__ = [
    "SampleResult",
    "langevin",
    "annealed_langevin",
    "euler_maruyama_predictor",
    "reverse_diffusion_predictor",
    "ddim_predictor",
    "langevin_corrector",
    "euler_maruyama",
    "predictor_corrector",
    "probability_flow_ode",
    "ddpm",
    "ddim",
    "inpaint",
    "inpaint_annealed_langevin",
    "denoise_observation",
]

TimeScoreFn = Callable[[jax.Array, jax.Array], jax.Array]
Predictor = Callable[..., jax.Array]
DDPM_VARIANCES = ("beta", "posterior")


class SampleResult(NamedTuple):
    """What the SDE/ODE samplers return.

    Attributes:
        samples: ``[B, *D]``.
        nfe: number of model evaluations (an integer scalar array; each
            evaluation is one call on the whole batch).
        trajectory: ``[S, B, *D]`` snapshots, or ``None``.
    """

    samples: jax.Array
    nfe: jax.Array
    trajectory: Optional[jax.Array] = None


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _per_example(value, x: jax.Array) -> jax.Array:
    """A scalar or ``[B]`` value (time, coefficient) as ``[B, 1, ...]``."""
    value = jnp.asarray(value, dtype=x.dtype)
    return expand_to(jnp.broadcast_to(value.reshape(-1), (x.shape[0],)), x)


def _default_every(num_steps: int) -> int:
    return max(1, math.ceil(num_steps / 100))


def _trajectory_every(return_trajectory: bool, trajectory_every, num_steps: int):
    if not return_trajectory:
        return None
    if trajectory_every is None:
        return _default_every(num_steps)
    return check_positive_int("trajectory_every", trajectory_every)


def _scan(step, carry, xs, every: Optional[int]):
    """``lax.scan(step, carry, xs)``; with ``every``, also returns snapshots of the carry.

    The snapshots are taken after every ``every`` steps and after the last one,
    by an outer scan over chunks of ``every`` steps (plus a scan over the
    remaining steps), so only ``O(n / every)`` states are stored.
    """
    if every is None:
        return jax.lax.scan(step, carry, xs)[0], None
    n = jax.tree.leaves(xs)[0].shape[0]
    chunks, rest = divmod(n, every)
    snaps = []
    if chunks:
        head = jax.tree.map(lambda a: a[: chunks * every].reshape((chunks, every) + a.shape[1:]), xs)

        def chunk(c, xs_chunk):
            c = jax.lax.scan(step, c, xs_chunk)[0]
            return c, c

        carry, traj = jax.lax.scan(chunk, carry, head)
        snaps.append(traj)
    if rest:
        carry = jax.lax.scan(step, carry, jax.tree.map(lambda a: a[chunks * every :], xs))[0]
        snaps.append(carry[None])
    return carry, jnp.concatenate(snaps, axis=0)


def _with_start(x0, traj):
    return None if traj is None else jnp.concatenate([x0[None], traj], axis=0)


def _check_state(name: str, x: jax.Array) -> None:
    """A batched floating-point sampler state; finite at run time with :func:`dsm_jax.debug_checks`."""
    check_batched(name, x)
    check_floating(name, x)
    runtime_check_finite(name, x)


def _check_score_shape(name: str, fn, x: jax.Array, *args) -> None:
    out = jax.eval_shape(fn, x, *args)
    check_same_shape(name, out, x.shape, f"the shape of x, {tuple(x.shape)}")


def _check_sde(sde) -> None:
    if not isinstance(sde, SDE):
        raise ValueError(f"sde must be a dsm_jax.sde.SDE (VESDE, VPSDE, SubVPSDE), got {sde!r}.")


def _time_score_fn(model_fn: ModelFn, sde: SDE, parameterization: str) -> TimeScoreFn:
    """``score_fn(x, t)``: the model called at ``sigma(t)``, converted with ``scale(t)``."""

    def score_fn(x, t):
        scale, sigma = sde.marginal(t)
        scale = broadcast_sigma(scale, x)
        return score_from_model(model_fn, x, broadcast_sigma(sigma, x), parameterization=parameterization, scale=scale)

    return score_fn


def _tweedie_at(score_fn: TimeScoreFn, sde: SDE, x: jax.Array, t) -> jax.Array:
    scale, sigma = sde.marginal(t)
    return posterior_mean(lambda y: score_fn(y, t), x, broadcast_sigma(sigma, x), scale=broadcast_sigma(scale, x))


# ---------------------------------------------------------------------------
# Langevin dynamics
# ---------------------------------------------------------------------------


def langevin(
    score_fn: Callable[[jax.Array], jax.Array],
    x0: jax.Array,
    key: jax.Array,
    *,
    step_size,
    num_steps: int,
    return_trajectory: bool = False,
    trajectory_every: Optional[int] = None,
):
    """Unadjusted Langevin dynamics with a fixed score.

    ``x <- x + step_size * s(x) + sqrt(2 step_size) z``, ``z ~ N(0, I)``;
    its stationary law tends to ``p`` as ``step_size -> 0`` (with an
    ``O(step_size)`` bias for a fixed step).

    Args:
        score_fn: ``score_fn(x) -> [B, *D]``, the score ``grad log p`` (no sigma).
        x0: initial states ``[B, *D]``.
        key: PRNG key.
        step_size: ``> 0``.
        num_steps: ``>= 1``.
        return_trajectory: also return the thinned trajectory.
        trajectory_every: snapshot spacing (default ``ceil(num_steps / 100)``).

    Returns:
        ``samples [B, *D]``, or ``(samples, trajectory [S, B, *D])``.

    Example:
        >>> from dsm_jax.distributions import Gaussian
        >>> g = Gaussian(jnp.zeros(2), jnp.ones(2))
        >>> x = langevin(g.score, jnp.zeros((512, 2)), jax.random.key(0),
        ...              step_size=0.05, num_steps=200)

    References:
        Roberts & Tweedie, Bernoulli 1996; Welling & Teh, ICML 2011.
    """
    _check_state("x0", x0)
    check_key(key)
    check_positive_number("step_size", step_size)
    runtime_check_positive("step_size", step_size)
    num_steps = check_positive_int("num_steps", num_steps)
    every = _trajectory_every(return_trajectory, trajectory_every, num_steps)
    _check_score_shape("score_fn", score_fn, x0)
    step_size = jnp.asarray(step_size, x0.dtype)

    def step(x, k):
        z = jax.random.normal(k, x.shape, x.dtype)
        return x + step_size * score_fn(x) + jnp.sqrt(2.0 * step_size) * z, None

    x, traj = _scan(step, x0, jax.random.split(key, num_steps), every)
    return (x, _with_start(x0, traj)) if return_trajectory else x


# Annealed Langevin draws a level's noise up front when it has at most this many numbers (16 MiB of float32).
PREDRAW_ELEMENTS = 1 << 22


def _annealed_langevin(model_fn, x0, key, sigmas, steps_per_sigma, step_lr, final_denoise, every, parameterization, project):
    """Algorithm 1 of Song & Ermon 2019; ``project(x, sigma, key)`` (or None) runs after every step."""
    sigmas = jnp.asarray(sigmas, x0.dtype)
    alphas = step_lr * sigmas**2 / sigmas[-1] ** 2
    score = lambda x, sigma: score_from_model(model_fn, x, sigma, parameterization=parameterization)
    level_keys = jax.random.split(key, sigmas.shape[0] + 1)

    # The noise of a whole level is drawn before its steps when it is small: the same numbers as
    # drawing it step by step (the same keys), without a PRNG call per step inside the loop.
    predraw = steps_per_sigma * x0.size <= PREDRAW_ELEMENTS
    normal = lambda k: jax.random.normal(k, x0.shape, x0.dtype)

    def level(x, inp):
        sigma, alpha, k = inp
        k_z, k_p = jnp.moveaxis(jax.vmap(jax.random.split)(jax.random.split(k, steps_per_sigma)), 1, 0)

        def step(x, inp):
            z_or_key, k_p = inp
            z = z_or_key if predraw else normal(z_or_key)
            x = x + 0.5 * alpha * score(x, sigma) + jnp.sqrt(alpha) * z
            return (x if project is None else project(x, sigma, k_p)), None

        return _scan(step, x, (jax.vmap(normal)(k_z) if predraw else k_z, k_p), every)

    x, traj = jax.lax.scan(level, x0, (sigmas, alphas, level_keys[:-1]))
    if traj is not None:
        traj = _with_start(x0, traj.reshape((-1,) + x0.shape))
    if final_denoise:
        x = posterior_mean(lambda y: score(y, sigmas[-1]), x, sigmas[-1])
        if project is not None:
            x = project(x, jnp.zeros((), x.dtype), level_keys[-1])
    return x, traj


def _check_annealed(x0, key, sigmas, steps_per_sigma, step_lr, parameterization, name="x0"):
    _check_state(name, x0)
    check_key(key)
    check_sigma_schedule(sigmas, decreasing=True)
    runtime_check_positive("sigmas", sigmas)
    check_positive_number("step_lr", step_lr)
    runtime_check_positive("step_lr", step_lr)
    check_parameterization(parameterization)
    return check_positive_int("steps_per_sigma", steps_per_sigma)


def annealed_langevin(
    model_fn: ModelFn,
    x0: jax.Array,
    key: jax.Array,
    sigmas: jax.Array,
    *,
    steps_per_sigma: int,
    step_lr,
    final_denoise: bool = True,
    return_trajectory: bool = False,
    parameterization: str = "score",
    trajectory_every: Optional[int] = None,
):
    """Annealed Langevin dynamics (NCSN sampling, Song & Ermon 2019, Algorithm 1).

    For each noise level ``sigma_i`` of the decreasing schedule, with
    ``alpha_i = step_lr * sigma_i^2 / sigma_L^2`` and ``T = steps_per_sigma``
    steps, ``x <- x + alpha_i / 2 * s(x, sigma_i) + sqrt(alpha_i) z``. The
    levels are an outer ``lax.scan``, the steps an inner one. With
    ``final_denoise`` the result is Tweedie's ``x + sigma_L^2 s(x, sigma_L)``
    (Jolicoeur-Martineau et al. 2021; Song & Ermon 2020), one more model call.

    The step size shrinks with sigma so that the signal-to-noise ratio
    ``|alpha s| / |sqrt(alpha) z|`` is the same at every level. Unlike plain
    Langevin with the clean score, the large-sigma levels mix between modes, so
    the relative weights of well-separated modes are recovered.
    Note: :func:`dsm_jax.noise.ncsnv2_step_size` returns the NCSNv2 ``eps``
    of the ``alpha s + sqrt(2 alpha) z`` convention: pass ``step_lr = 2 * eps``.

    Args:
        model_fn: ``model_fn(x, sigma) -> out`` with ``sigma: [B]``.
        x0: initial states ``[B, *D]`` (e.g. uniform noise, or ``sigma_1 * N(0, I)``).
        key: PRNG key.
        sigmas: ``[L]`` strictly decreasing noise levels.
        steps_per_sigma: Langevin steps per level, ``>= 1``.
        step_lr: ``> 0``, the step at the last level ``sigma_L``.
        final_denoise: end with the Tweedie step at ``sigma_L``.
        return_trajectory: also return the trajectory.
        parameterization: "score", "eps", "x0" or "energy".
        trajectory_every: snapshot spacing within each level (default
            ``steps_per_sigma``: one snapshot per level).

    Returns:
        ``samples [B, *D]``, or ``(samples, trajectory)``; the trajectory holds
        ``x0`` and, for each level, the snapshots taken in it (the state
        before the Tweedie step last). ``samples`` costs
        ``L * steps_per_sigma + final_denoise`` model evaluations.

    Example:
        >>> from dsm_jax.noise import geometric_sigmas
        >>> sigmas = geometric_sigmas(10.0, 0.01, 10)
        >>> x0 = jax.random.uniform(key, (64, 2), minval=-8, maxval=8)     # doctest: +SKIP
        >>> x = jax.jit(lambda x0, k: annealed_langevin(model_fn, x0, k, sigmas,
        ...             steps_per_sigma=100, step_lr=2e-5))(x0, key)        # doctest: +SKIP

    References:
        Song & Ermon, NeurIPS 2019, Algorithm 1.
    """
    steps_per_sigma = _check_annealed(x0, key, sigmas, steps_per_sigma, step_lr, parameterization)
    every = None
    if return_trajectory:
        every = steps_per_sigma if trajectory_every is None else check_positive_int("trajectory_every", trajectory_every)
    x, traj = _annealed_langevin(model_fn, x0, key, sigmas, steps_per_sigma, step_lr, final_denoise, every, parameterization, None)
    return (x, traj) if return_trajectory else x


# ---------------------------------------------------------------------------
# Predictors and the Langevin corrector for reverse-time SDEs
# ---------------------------------------------------------------------------


def euler_maruyama_predictor(score_fn: TimeScoreFn, sde: SDE, x: jax.Array, t, t_next, key: jax.Array) -> jax.Array:
    """One Euler-Maruyama step of the reverse-time SDE from ``t`` to ``t_next < t``.

    ``x <- x - [f(x, t) - g(t)^2 s(x, t)] dt + g(t) sqrt(dt) z`` with
    ``dt = t - t_next > 0``.
    """
    dt = _per_example(t - t_next, x)
    g = _per_example(sde.diffusion(t), x)
    drift = sde.drift(x, t) - g**2 * score_fn(x, t)
    z = jax.random.normal(key, x.shape, x.dtype)
    return x - drift * dt + g * jnp.sqrt(dt) * z


def _transition(sde: SDE, x: jax.Array, t, t_next):
    """The forward transition ``x_t = a x_s + sqrt(v) z`` from ``s = t_next`` to ``t``.

    ``a = scale(t) / scale(s)`` and ``v = sigma(t)^2 - a^2 sigma(s)^2`` (the
    variances of a linear SDE add up). Also returns ``(scale, sigma)`` at both times.
    """
    scale_t, sigma_t = (_per_example(v, x) for v in sde.marginal(t))
    scale_s, sigma_s = (_per_example(v, x) for v in sde.marginal(t_next))
    a = scale_t / scale_s
    v = jnp.maximum(sigma_t**2 - a**2 * sigma_s**2, 0.0)
    return a, v, (scale_t, sigma_t), (scale_s, sigma_s)


def reverse_diffusion_predictor(score_fn: TimeScoreFn, sde: SDE, x: jax.Array, t, t_next, key: jax.Array) -> jax.Array:
    """Ancestral (reverse-diffusion) step: DDPM's update for any of the SDEs.

    With the forward transition ``x_t = a x_s + sqrt(v) z`` (``s = t_next``),
    Tweedie gives ``E[x_s | x_t] = (x_t + v s(x_t, t)) / a``; the step is

        ``x_s = (x_t + v s(x_t, t)) / a + sqrt(v) z``.

    For the VP SDE (``a = sqrt(alpha_t)``, ``v = beta_t``) this is DDPM's
    Algorithm 2 with ``sigma_t^2 = beta_t``; for VE (``a = 1``,
    ``v = sigma_t^2 - sigma_s^2``) it is the reverse-diffusion predictor of
    Song et al. 2021.
    """
    a, v, _, _ = _transition(sde, x, t, t_next)
    z = jax.random.normal(key, x.shape, x.dtype)
    return (x + v * score_fn(x, t)) / a + jnp.sqrt(v) * z


def ddim_predictor(score_fn: TimeScoreFn, sde: SDE, x: jax.Array, t, t_next, key: Optional[jax.Array] = None, *, eta=0.0) -> jax.Array:
    """The DDIM update (deterministic for ``eta = 0``) on ``(scale, sigma)``.

    ``x0_hat = (x_t + sigma_t^2 s) / scale_t``, ``eps_hat = -sigma_t s``,

        ``x_s = scale_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z``,

    ``c^2 = eta^2 sigma_s^2 v / sigma_t^2`` (``v`` the forward transition
    variance). ``eta = 0`` is DDIM (a first-order solver of the
    probability-flow ODE), ``eta = 1`` DDPM's ancestral step with the
    posterior variance ``beta_tilde``. Use ``functools.partial(ddim_predictor,
    eta=...)`` as a predictor.

    References:
        Song, Meng & Ermon, ICLR 2021, Eq. (12).
    """
    _, v, (scale_t, sigma_t), (scale_s, sigma_s) = _transition(sde, x, t, t_next)
    s = score_fn(x, t)
    x0_hat = (x + sigma_t**2 * s) / scale_t
    eps_hat = -sigma_t * s
    c2 = eta**2 * sigma_s**2 * v / sigma_t**2
    x_next = scale_s * x0_hat + jnp.sqrt(jnp.maximum(sigma_s**2 - c2, 0.0)) * eps_hat
    if key is None or (is_concrete(eta) and float(np.max(np.asarray(eta))) == 0.0):
        return x_next
    return x_next + jnp.sqrt(c2) * jax.random.normal(key, x.shape, x.dtype)


def langevin_corrector(score_fn: TimeScoreFn, sde: SDE, x: jax.Array, t, key: jax.Array, *, snr) -> jax.Array:
    """One Langevin MCMC step at fixed time ``t``, with the step set by ``snr``.

    ``x <- x + eps s(x, t) + sqrt(2 eps) z`` with
    ``eps = 2 (snr * |z| / |s|)^2``, ``|.|`` the per-example Euclidean norm
    averaged over the batch (Song et al. 2021, Algorithm 5, with their VP
    factor ``alpha_i = 1 - beta_i`` set to 1).

    What ``snr`` means: it is the ratio of the size of the deterministic move
    ``eps * s`` to the size of the random move ``sqrt(2 eps) z``,
    ``|eps s| / |sqrt(2 eps) z| = snr``. The step therefore adapts to the
    current score norm: a small ``snr`` (0.01 - 0.2) means mostly noise and
    small, safe moves; a larger one faster but biased moves. Song et al. used
    0.16 (VE on CIFAR-10), 0.075 (high resolution) and 0.01 (VP). The norms
    are batch averages (as in their code), which keeps the step finite when
    one example's score vanishes but couples the examples of a batch.
    """
    s = score_fn(x, t)
    z = jax.random.normal(key, x.shape, x.dtype)
    norm = lambda v: jnp.mean(jnp.linalg.norm(v.reshape(v.shape[0], -1), axis=-1))
    eps = 2.0 * (snr * norm(z) / norm(s)) ** 2
    return x + eps * s + jnp.sqrt(2.0 * eps) * z


# ---------------------------------------------------------------------------
# Reverse-time SDE samplers
# ---------------------------------------------------------------------------


def _time_grid(sde: SDE, num_steps: int, t_start, t_min):
    t_min = sde.t_min if t_min is None else t_min
    t_start = sde.T if t_start is None else t_start
    check_positive_number("t_min", t_min)
    if is_concrete(t_min) and is_concrete(t_start) and not np.all(np.asarray(t_min) < np.asarray(t_start)):
        raise ValueError(f"t_min must be smaller than the start time {t_start!r}, got t_min={t_min!r}.")
    return jnp.linspace(jnp.asarray(t_start, jnp.float32), jnp.asarray(t_min, jnp.float32), num_steps + 1)


def _reverse_sde(
    model_fn, sde, x_init, key, ts, *, predictor, corrector_steps, snr, parameterization, final_denoise, every, project=None
) -> SampleResult:
    """Scans ``predictor`` (then ``corrector_steps`` Langevin corrections) over the grid ``ts``.

    ``project(x, t, key)``, if given, runs after every update (inpainting).
    """
    score_fn = _time_score_fn(model_fn, sde, parameterization)
    num_steps = ts.shape[0] - 1
    keys = jax.random.split(key, num_steps + 1)

    def proj(x, t, k):
        return x if project is None else project(x, t, k)

    def correct(x, t, k):
        def corrector_step(x, k):
            k_c, k_p = jax.random.split(k)
            return proj(langevin_corrector(score_fn, sde, x, t, k_c, snr=snr), t, k_p), None

        return jax.lax.scan(corrector_step, x, jax.random.split(k, corrector_steps))[0]

    def step(x, inp):
        t, t_next, k = inp
        k_pred, k_proj, k_corr = jax.random.split(k, 3)
        x = proj(predictor(score_fn, sde, x, t, t_next, k_pred), t_next, k_proj)
        if corrector_steps:
            x = correct(x, t_next, k_corr)
        return x, None

    x, traj = _scan(step, x_init, (ts[:-1], ts[1:], keys[:-1]), every)
    nfe = num_steps * (1 + corrector_steps)
    if final_denoise:
        x = _tweedie_at(score_fn, sde, x, ts[-1])
        if project is not None:
            x = project(x, None, keys[-1])
        nfe += 1
    return SampleResult(x, jnp.asarray(nfe, jnp.int32), _with_start(x_init, traj))


def _check_model_input(model_fn, sde, x, parameterization, name):
    """Static checks shared by the SDE samplers and the likelihood."""
    _check_sde(sde)
    _check_state(name, x)
    check_parameterization(parameterization)
    # Raises "model_fn returned shape ..." before any loop is traced.
    sigma = jnp.ones((x.shape[0],), x.dtype)
    jax.eval_shape(lambda z: score_from_model(model_fn, z, sigma, parameterization=parameterization), x)


def _check_sde_sampler(model_fn, sde, x_init, num_steps, parameterization, name="x_init"):
    _check_model_input(model_fn, sde, x_init, parameterization, name)
    return check_positive_int("num_steps", num_steps)


def euler_maruyama(
    model_fn: ModelFn,
    sde: SDE,
    x_init: jax.Array,
    key: jax.Array,
    *,
    num_steps: int,
    final_denoise: bool = True,
    parameterization: str = "score",
    t_min=None,
    return_trajectory: bool = False,
    trajectory_every: Optional[int] = None,
) -> SampleResult:
    """Samples by Euler-Maruyama on the reverse-time SDE (Song et al. 2021, Eq. 6).

    ``x <- x - [f(x, t) - g(t)^2 s(x, t)] dt + g(t) sqrt(dt) z`` on the
    uniform grid from ``T`` to ``t_min``, then the optional Tweedie step.

    Args:
        model_fn: ``model_fn(x, sigma) -> out``, called at ``sigma(t)``.
        sde: a :class:`dsm_jax.sde.SDE`.
        x_init: ``[B, *D]`` draws from the prior, e.g. ``sde.prior_sample(key, shape)``.
        key: PRNG key.
        num_steps: number of time steps, ``>= 1``.
        final_denoise: end with Tweedie's ``(x + sigma^2 s) / scale`` at ``t_min``.
        parameterization: "score", "eps", "x0" or "energy".
        t_min: end time (default ``sde.t_min``).
        return_trajectory: also return the thinned trajectory.
        trajectory_every: snapshot spacing (default ``ceil(num_steps / 100)``).

    Returns:
        :class:`SampleResult` with ``nfe = num_steps + final_denoise``.

    Example:
        >>> from dsm_jax.sde import VESDE
        >>> sde = VESDE(0.01, 10.0)
        >>> x = sde.prior_sample(k1, (256, 2))                                    # doctest: +SKIP
        >>> out = jax.jit(lambda x, k: euler_maruyama(model_fn, sde, x, k, num_steps=500))(x, k2)  # doctest: +SKIP
        >>> out.samples, out.nfe                                                  # doctest: +SKIP
    """
    num_steps = _check_sde_sampler(model_fn, sde, x_init, num_steps, parameterization)
    check_key(key)
    ts = _time_grid(sde, num_steps, None, t_min)
    every = _trajectory_every(return_trajectory, trajectory_every, num_steps)
    return _reverse_sde(
        model_fn, sde, x_init, key, ts, predictor=euler_maruyama_predictor, corrector_steps=0, snr=None,
        parameterization=parameterization, final_denoise=final_denoise, every=every,
    )


def _check_pc(snr, corrector_steps):
    corrector_steps = check_positive_int("corrector_steps", corrector_steps, minimum=0)
    if corrector_steps:
        check_positive_number("snr", snr)
    return corrector_steps


def predictor_corrector(
    model_fn: ModelFn,
    sde: SDE,
    x_init: jax.Array,
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
    trajectory_every: Optional[int] = None,
) -> SampleResult:
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 1).

    At each time step the predictor moves ``x`` from ``t_k`` to ``t_{k+1}``
    along the reverse SDE; then ``corrector_steps`` Langevin steps at
    ``t_{k+1}`` (:func:`langevin_corrector`, step from the signal-to-noise
    ratio ``snr``) pull ``x`` towards the marginal ``p_{t_{k+1}}``, correcting
    the predictor's discretisation error.

    ``snr``: the ratio of the norm of the score move to the norm of the noise
    move in each corrector step (see :func:`langevin_corrector`); the
    corrector's step is ``eps = 2 (snr |z| / |s|)^2``, so it scales with the
    current noise level. Song et al. used 0.16 for VE and 0.01 for VP.

    Args:
        model_fn: ``model_fn(x, sigma) -> out``.
        sde: a :class:`dsm_jax.sde.SDE`.
        x_init: prior draws ``[B, *D]``.
        key: PRNG key.
        num_steps: predictor steps, ``>= 1``.
        snr: corrector signal-to-noise ratio, ``> 0``.
        corrector_steps: Langevin steps per time step, ``>= 0``
            (0 gives the predictor alone).
        predictor: a predictor callable (default :func:`reverse_diffusion_predictor`;
            :func:`euler_maruyama_predictor`, ``partial(ddim_predictor, eta=...)``).
        final_denoise, parameterization, t_min, return_trajectory,
            trajectory_every: as in :func:`euler_maruyama`.

    Returns:
        :class:`SampleResult` with
        ``nfe = num_steps * (1 + corrector_steps) + final_denoise``.
    """
    num_steps = _check_sde_sampler(model_fn, sde, x_init, num_steps, parameterization)
    check_key(key)
    corrector_steps = _check_pc(snr, corrector_steps)
    ts = _time_grid(sde, num_steps, None, t_min)
    every = _trajectory_every(return_trajectory, trajectory_every, num_steps)
    return _reverse_sde(
        model_fn, sde, x_init, key, ts, predictor=predictor, corrector_steps=corrector_steps, snr=snr,
        parameterization=parameterization, final_denoise=final_denoise, every=every,
    )


def ddpm(
    model_fn: ModelFn,
    sde: SDE,
    x_init: jax.Array,
    key: jax.Array,
    *,
    num_steps: int,
    variance: str = "beta",
    final_denoise: bool = True,
    parameterization: str = "eps",
    t_min=None,
    return_trajectory: bool = False,
    trajectory_every: Optional[int] = None,
) -> SampleResult:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) on the SDE's time grid.

    With ``alpha_t = scale(t)^2 / scale(s)^2``, ``beta_t = 1 - alpha_t`` for
    the VP SDE (``s`` the next, smaller time):

        ``x_s = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_t) + sigma_t z``

    with ``sigma_t^2 = beta_t`` (``variance="beta"``,
    :func:`reverse_diffusion_predictor`) or ``beta_tilde_t = beta_t (1 -
    alpha_bar_s) / (1 - alpha_bar_t)`` (``variance="posterior"``,
    :func:`ddim_predictor` with ``eta = 1``). ``eps_hat`` is the output of an
    eps-prediction model (the default ``parameterization``); any other
    parameterization is converted through the score. The same formulas,
    written with ``(scale, sigma)``, apply to the VE and sub-VP SDEs.

    Returns:
        :class:`SampleResult`, ``nfe = num_steps + final_denoise``.
    """
    check_choice("variance", variance, DDPM_VARIANCES)
    num_steps = _check_sde_sampler(model_fn, sde, x_init, num_steps, parameterization)
    check_key(key)
    predictor = reverse_diffusion_predictor if variance == "beta" else functools.partial(ddim_predictor, eta=1.0)
    ts = _time_grid(sde, num_steps, None, t_min)
    every = _trajectory_every(return_trajectory, trajectory_every, num_steps)
    return _reverse_sde(
        model_fn, sde, x_init, key, ts, predictor=predictor, corrector_steps=0, snr=None,
        parameterization=parameterization, final_denoise=final_denoise, every=every,
    )


def ddim(
    model_fn: ModelFn,
    sde: SDE,
    x_init: jax.Array,
    key: Optional[jax.Array] = None,
    *,
    num_steps: int,
    eta=0.0,
    final_denoise: bool = True,
    parameterization: str = "eps",
    t_min=None,
    return_trajectory: bool = False,
    trajectory_every: Optional[int] = None,
) -> SampleResult:
    """DDIM sampling (Song, Meng & Ermon 2021): deterministic for ``eta = 0``.

    ``x_s = scale_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z`` with
    ``x0_hat = (x_t - sigma_t eps_hat) / scale_t`` (:func:`ddim_predictor`).
    ``key`` is only needed when ``eta > 0``.

    Returns:
        :class:`SampleResult`, ``nfe = num_steps + final_denoise``.
    """
    if is_concrete(eta):
        if np.ndim(eta) != 0 or not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}.")
        if float(eta) > 0 and key is None:
            raise ValueError(f"key must be a PRNG key when eta > 0, got key=None and eta={eta!r}.")
    num_steps = _check_sde_sampler(model_fn, sde, x_init, num_steps, parameterization)
    if key is not None:
        check_key(key)
    ts = _time_grid(sde, num_steps, None, t_min)
    every = _trajectory_every(return_trajectory, trajectory_every, num_steps)
    key = jax.random.key(0) if key is None else key
    return _reverse_sde(
        model_fn, sde, x_init, key, ts, predictor=functools.partial(ddim_predictor, eta=eta), corrector_steps=0,
        snr=None, parameterization=parameterization, final_denoise=final_denoise, every=every,
    )


# ---------------------------------------------------------------------------
# Probability-flow ODE
# ---------------------------------------------------------------------------


def _ode_drift(score_fn: TimeScoreFn, sde: SDE):
    """The probability-flow vector field ``f(x, t) - g(t)^2 s(x, t) / 2``."""

    def drift(x, t):
        g = _per_example(sde.diffusion(t), x)
        return sde.drift(x, t) - 0.5 * g**2 * score_fn(x, t)

    return drift


def _solver_evals(solver):
    """``(evaluations per step, one-off evaluations)`` of a diffrax solver, or None.

    An explicit Runge-Kutta step evaluates one stage per entry of ``c`` plus
    one; first-same-as-last (FSAL) tableaus reuse the last stage of a step as
    the first of the next (also after a rejected step), which costs one
    evaluation at the start. Rejected steps count like accepted ones.
    """
    if isinstance(solver, diffrax.Euler):
        return 1, 0
    tableau = getattr(solver, "tableau", None)
    if tableau is None or not hasattr(tableau, "c") or not hasattr(tableau, "fsal"):
        return None
    stages = len(tableau.c) + 1
    return (stages - 1, 1) if tableau.fsal else (stages, 0)


def _solve_ode(vector_field, y0, t0, t1, *, solver, rtol, atol, num_steps, max_steps, saveat):
    """diffeqsolve with a PID controller (adaptive) or a constant step; returns (solution, nfe).

    The adaptive solve starts from ``dt0 = (t1 - t0) / 100`` rather than
    diffrax's initial step-size search, so that the evaluation count is exactly
    what the step statistics say.
    """
    solver = diffrax.Tsit5() if solver is None else solver
    if num_steps is None:
        controller, dt0 = diffrax.PIDController(rtol=rtol, atol=atol), (t1 - t0) / 100.0
    else:
        controller, dt0 = diffrax.ConstantStepSize(), (t1 - t0) / num_steps
        max_steps = num_steps
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), solver, t0=t0, t1=t1, dt0=dt0, y0=y0,
        stepsize_controller=controller, saveat=saveat, max_steps=max_steps,
    )
    evals = _solver_evals(solver)
    nfe = jnp.asarray(-1, jnp.int32) if evals is None else (sol.stats["num_steps"] * evals[0] + evals[1]).astype(jnp.int32)
    return sol, nfe


def _check_ode_options(rtol, atol, num_steps, max_steps):
    check_positive_number("rtol", rtol)
    check_positive_number("atol", atol)
    if num_steps is not None:
        check_positive_int("num_steps", num_steps)
    check_positive_int("max_steps", max_steps)


def probability_flow_ode(
    model_fn: ModelFn,
    sde: SDE,
    x_init: jax.Array,
    *,
    rtol=1e-5,
    atol=1e-5,
    num_steps: Optional[int] = None,
    solver=None,
    max_steps: int = 4096,
    final_denoise: bool = True,
    parameterization: str = "score",
    t_min=None,
    return_trajectory: bool = False,
    num_snapshots: int = 101,
) -> SampleResult:
    """Samples by integrating the probability-flow ODE from ``T`` to ``t_min``.

    ``dx/dt = f(x, t) - g(t)^2 s(x, t) / 2`` (Song et al. 2021, Eq. 13) has
    the same marginals ``p_t`` as the SDE; it is deterministic given
    ``x_init``. Solved by diffrax: by default ``Tsit5`` with a
    ``PIDController(rtol, atol)`` (adaptive); with ``num_steps`` a constant
    step ``(T - t_min) / num_steps``. The whole batch is one ODE state, so the
    error control (an RMS norm) and the step sizes are shared by the batch.

    Args:
        model_fn: ``model_fn(x, sigma) -> out``.
        sde: a :class:`dsm_jax.sde.SDE`.
        x_init: prior draws ``[B, *D]``.
        rtol, atol: tolerances of the adaptive controller.
        num_steps: if set, fixed steps instead of adaptive ones.
        solver: a diffrax solver (default ``diffrax.Tsit5()``).
        max_steps: step budget of the adaptive solver.
        final_denoise: end with the Tweedie step at ``t_min``.
        parameterization: "score", "eps", "x0" or "energy".
        t_min: end time (default ``sde.t_min``).
        return_trajectory: also return ``num_snapshots`` states at equally
            spaced times from ``T`` to ``t_min`` (interpolated by the solver).
        num_snapshots: see ``return_trajectory``.

    Returns:
        :class:`SampleResult`; ``nfe`` is counted from the solver's step
        statistics (exact for diffrax's explicit Runge-Kutta solvers, -1 for
        others): ``6 * steps + 1`` for Tsit5 (accepted and rejected steps),
        plus one for the Tweedie step.
    """
    _check_ode_options(rtol, atol, num_steps, max_steps)
    _check_model_input(model_fn, sde, x_init, parameterization, "x_init")
    ts = _time_grid(sde, 1, None, t_min)
    t0, t1 = ts[0], ts[-1]
    score_fn = _time_score_fn(model_fn, sde, parameterization)
    drift = _ode_drift(score_fn, sde)
    if return_trajectory:
        saveat = diffrax.SaveAt(ts=jnp.linspace(t0, t1, check_positive_int("num_snapshots", num_snapshots, minimum=2)))
    else:
        saveat = diffrax.SaveAt(t1=True)
    sol, nfe = _solve_ode(
        lambda t, y, args: drift(y, t), x_init, t0, t1, solver=solver, rtol=rtol, atol=atol,
        num_steps=num_steps, max_steps=max_steps, saveat=saveat,
    )
    x = sol.ys[-1]
    if final_denoise:
        x = _tweedie_at(score_fn, sde, x, t1)
        nfe = nfe + 1
    return SampleResult(x, nfe, sol.ys if return_trajectory else None)


# ---------------------------------------------------------------------------
# Inverse problems
# ---------------------------------------------------------------------------


def _check_mask(y, mask):
    check_batched("y", y)
    if jnp.shape(mask) != jnp.shape(y) and jnp.shape(mask) != jnp.shape(y)[1:]:
        raise ValueError(f"mask must have the shape of y {y.shape} or of one example {y.shape[1:]}, got {jnp.shape(mask)}.")
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
    trajectory_every: Optional[int] = None,
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
    num_steps = _check_sde_sampler(model_fn, sde, y, num_steps, parameterization, name="y")
    check_key(key)
    corrector_steps = _check_pc(snr, corrector_steps)
    ts = _time_grid(sde, num_steps, None, t_min)
    every = _trajectory_every(return_trajectory, trajectory_every, num_steps)
    k_init, k_proj, k_run = jax.random.split(key, 3)

    def project(x, t, k):
        if t is None:  # after the Tweedie step: the clean observation
            return mask * y + (1.0 - mask) * x
        scale, sigma = sde.marginal(t)
        noised = scale * y + sigma * jax.random.normal(k, y.shape, y.dtype)
        return mask * noised + (1.0 - mask) * x

    x_init = project(sde.prior_sample(k_init, y.shape).astype(y.dtype), ts[0], k_proj)
    return _reverse_sde(
        model_fn, sde, x_init, k_run, ts, predictor=predictor, corrector_steps=corrector_steps, snr=snr,
        parameterization=parameterization, final_denoise=final_denoise, every=every, project=project,
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
    x0: Optional[jax.Array] = None,
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

    Returns:
        ``[B, *D]``.
    """
    mask = _check_mask(y, mask)
    steps_per_sigma = _check_annealed(y, key, sigmas, steps_per_sigma, step_lr, parameterization, name="y")
    k_init, k_run = jax.random.split(key)
    if x0 is None:
        x0 = jnp.asarray(sigmas, y.dtype)[0] * jax.random.normal(k_init, y.shape, y.dtype)
    elif jnp.shape(x0) != y.shape:
        raise ValueError(f"x0 must have the shape of y {y.shape}, got {jnp.shape(x0)}.")

    def project(x, sigma, k):
        noised = y + sigma * jax.random.normal(k, y.shape, y.dtype)
        return mask * noised + (1.0 - mask) * x

    x, _ = _annealed_langevin(model_fn, x0, k_run, sigmas, steps_per_sigma, step_lr, final_denoise, None, parameterization, project)
    return x if final_denoise else mask * y + (1.0 - mask) * x


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
    trajectory_every: Optional[int] = None,
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
    num_steps = _check_sde_sampler(model_fn, sde, y, num_steps, parameterization, name="y")
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
    x_init = _per_example(sde.scale(t_star), y) * y
    every = _trajectory_every(return_trajectory, trajectory_every, num_steps)
    return _reverse_sde(
        model_fn, sde, x_init, key, ts, predictor=predictor, corrector_steps=0, snr=None,
        parameterization=parameterization, final_denoise=final_denoise, every=every,
    )
