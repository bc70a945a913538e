"""Langevin dynamics with a fixed score, and annealed Langevin dynamics over noise levels (NCSN).

Both are one ``step(carry, x)`` scanned by ``jax.lax.scan`` (annealed: the
levels an outer scan, the steps an inner one), so the compiled size does not
grow with the number of steps. They return the samples ``[B, *D]`` (or
``(samples, trajectory)`` with ``return_trajectory=True``), the NCSN
contract; with ``return_result=True`` they return a
:class:`~dsm_jax.samplers.SampleResult` ``(samples, nfe, trajectory)`` like
every other sampler, ``nfe`` counting the model evaluations.

References:
    Song & Ermon, "Generative modeling by estimating gradients of the data
    distribution", NeurIPS 2019 (annealed Langevin dynamics).
    Roberts & Tweedie, "Exponential convergence of Langevin distributions and
    their discrete approximations", Bernoulli 1996.
    Welling & Teh, "Bayesian learning via stochastic gradient Langevin
    dynamics", ICML 2011.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dsm_jax._checks import (
    check_key,
    check_positive_int,
    check_positive_number,
    check_same_shape,
    check_sigma_schedule,
    check_state,
    runtime_check_positive,
)
from dsm_jax.parameterization import ModelFn, as_score_fn
from dsm_jax.samplers._result import Projection, SampleResult, scan, snapshot_every, with_start
from dsm_jax.tweedie import posterior_mean

__all__ = ["PREDRAW_ELEMENTS", "annealed_langevin", "annealed_langevin_scan", "check_annealed", "langevin"]

# Annealed Langevin draws a level's noise up front when it has at most this many numbers (16 MiB of float32).
PREDRAW_ELEMENTS = 1 << 22


def _result(x, nfe: int, traj, return_trajectory: bool, return_result: bool):
    if return_result:
        return SampleResult(x, jnp.asarray(nfe, jnp.int32), traj)
    return (x, traj) if return_trajectory else x


def langevin(
    score_fn: Callable[[jax.Array], jax.Array],
    x0: jax.Array,
    key: jax.Array,
    *,
    step_size,
    num_steps: int,
    return_trajectory: bool = False,
    trajectory_every: int | None = None,
    return_result: bool = False,
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
        return_result: return a :class:`SampleResult` with ``nfe = num_steps``.

    Returns:
        ``samples [B, *D]``, or ``(samples, trajectory [S, B, *D])``, or with
        ``return_result`` a :class:`SampleResult`.

    Example:
        >>> from dsm_jax.distributions import Gaussian
        >>> g = Gaussian(jnp.zeros(2), jnp.ones(2))
        >>> out = langevin(g.score, jnp.zeros((512, 2)), jax.random.key(0),
        ...                step_size=0.05, num_steps=200, return_result=True)
        >>> out.samples.shape, int(out.nfe)
        ((512, 2), 200)

    References:
        Roberts & Tweedie, Bernoulli 1996; Welling & Teh, ICML 2011.
    """
    check_state("x0", x0)
    check_key(key)
    check_positive_number("step_size", step_size)
    runtime_check_positive("step_size", step_size)
    num_steps = check_positive_int("num_steps", num_steps)
    every = snapshot_every(return_trajectory, trajectory_every, num_steps)
    check_same_shape("score_fn", jax.eval_shape(score_fn, x0), x0.shape, f"the shape of x, {tuple(x0.shape)}")
    step_size = jnp.asarray(step_size, x0.dtype)

    def step(x, k):
        z = jax.random.normal(k, x.shape, x.dtype)
        return x + step_size * score_fn(x) + jnp.sqrt(2.0 * step_size) * z, None

    x, traj = scan(step, x0, jax.random.split(key, num_steps), every)
    return _result(x, num_steps, with_start(x0, traj), return_trajectory, return_result)


def annealed_langevin_scan(
    score_fn: ModelFn,
    x0: jax.Array,
    key: jax.Array,
    sigmas: jax.Array,
    steps_per_sigma: int,
    step_lr,
    *,
    final_denoise: bool,
    every: int | None,
    project: Projection | None = None,
):
    """Algorithm 1 of Song & Ermon 2019 on a score ``score_fn(x, sigma)``, unchecked; returns ``(x, trajectory)``.

    ``project(x, sigma, key)``, if given, runs after every step, and with
    ``sigma=None`` after the final Tweedie step (inpainting). The inputs are
    those :func:`check_annealed` accepted.
    """
    sigmas = jnp.asarray(sigmas, x0.dtype)
    alphas = step_lr * sigmas**2 / sigmas[-1] ** 2
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
            x = x + 0.5 * alpha * score_fn(x, sigma) + jnp.sqrt(alpha) * z
            return (x if project is None else project(x, sigma, k_p)), None

        return scan(step, x, (jax.vmap(normal)(k_z) if predraw else k_z, k_p), every)

    x, traj = jax.lax.scan(level, x0, (sigmas, alphas, level_keys[:-1]))
    if traj is not None:
        traj = with_start(x0, traj.reshape((-1,) + x0.shape))
    if final_denoise:
        x = posterior_mean(lambda y: score_fn(y, sigmas[-1]), x, sigmas[-1])
        if project is not None:
            x = project(x, None, level_keys[-1])
    return x, traj


def check_annealed(x0, key, sigmas, steps_per_sigma, step_lr, *, name: str = "x0") -> int:
    """The static checks of annealed Langevin; returns ``steps_per_sigma``."""
    check_state(name, x0)
    check_key(key)
    check_sigma_schedule(sigmas, decreasing=True)
    runtime_check_positive("sigmas", sigmas)
    check_positive_number("step_lr", step_lr)
    runtime_check_positive("step_lr", step_lr)
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
    trajectory_every: int | None = None,
    return_result: bool = False,
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
        parameterization: "score", "eps", "x0" or "energy"; the model is
            converted to a score once, here (:func:`dsm_jax.parameterization.as_score_fn`).
        trajectory_every: snapshot spacing within each level (default
            ``steps_per_sigma``: one snapshot per level).
        return_result: return a :class:`SampleResult` with
            ``nfe = L * steps_per_sigma + final_denoise``.

    Returns:
        ``samples [B, *D]``, or ``(samples, trajectory)``, or with
        ``return_result`` a :class:`SampleResult`; the trajectory holds
        ``x0`` and, for each level, the snapshots taken in it (the state
        before the Tweedie step last). ``samples`` costs
        ``L * steps_per_sigma + final_denoise`` model evaluations.

    Example:
        >>> from dsm_jax.noise import geometric_sigmas
        >>> sigmas = geometric_sigmas(10.0, 0.01, 10)
        >>> score = lambda x, sigma: -x / (1.0 + sigma[:, None] ** 2)    # N(0, I) noised
        >>> out = annealed_langevin(score, jnp.zeros((64, 2)), jax.random.key(0), sigmas,
        ...                         steps_per_sigma=5, step_lr=1e-4, return_result=True)
        >>> out.samples.shape, int(out.nfe)
        ((64, 2), 51)

    References:
        Song & Ermon, NeurIPS 2019, Algorithm 1.
    """
    steps_per_sigma = check_annealed(x0, key, sigmas, steps_per_sigma, step_lr)
    score_fn = as_score_fn(model_fn, parameterization=parameterization)
    every = snapshot_every(return_trajectory, trajectory_every, steps_per_sigma, default=steps_per_sigma)
    x, traj = annealed_langevin_scan(
        score_fn, x0, key, sigmas, steps_per_sigma, step_lr, final_denoise=final_denoise, every=every
    )
    nfe = jnp.shape(sigmas)[0] * steps_per_sigma + int(final_denoise)
    return _result(x, nfe, traj, return_trajectory, return_result)
