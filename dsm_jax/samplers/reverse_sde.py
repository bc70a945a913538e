"""Reverse-time SDE samplers: predictors, the Langevin corrector, Euler-Maruyama, PC, DDPM, DDIM.

The samplers integrate the reverse-time SDE of Song et al. 2021,

    ``dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dw_bar``  from ``t = T`` to ``t_min``,

on the uniform grid ``t_k = T - k (T - t_min) / num_steps``
(:meth:`dsm_jax.sde.SDE.time_grid`). The model is converted once, at entry,
into the score in time ``score_fn(x, t)`` (:func:`dsm_jax.sde.time_score_fn`:
``model_fn(x, sigma(t))`` through the parameterization with ``scale(t)``);
the predictors and the corrector only ever see that score. Each sampler ends
with an optional Tweedie step ``(x + sigma^2 s(x)) / scale`` at ``t_min``
(one more model evaluation), which removes the remaining noise ``sigma(t_min)``.

A *predictor* is any callable ``predictor(score_fn, sde, x, t, t_next, key) ->
x_next`` with ``score_fn(x, t)`` the score; :func:`euler_maruyama_predictor`,
:func:`reverse_diffusion_predictor` and :func:`ddim_predictor` are provided,
and any of them can be passed to :func:`predictor_corrector`.

Every sampler is one ``step(carry, x)`` scanned by ``jax.lax.scan`` over the
grid and returns a :class:`~dsm_jax.samplers.SampleResult`.

References:
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, "Score-based
    generative modeling through stochastic differential equations", ICLR 2021
    (reverse SDE, predictor-corrector).
    Ho, Jain & Abbeel, "Denoising diffusion probabilistic models", NeurIPS 2020.
    Song, Meng & Ermon, "Denoising diffusion implicit models", ICLR 2021.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax._checks import check_choice, check_key, check_positive_int, check_positive_number, is_concrete
from dsm_jax._utils import to_batch, to_batch_expanded
from dsm_jax.parameterization import ModelFn
from dsm_jax.samplers._result import Projection, SampleResult, scan, snapshot_every, with_start
from dsm_jax.sde import SDE, TimeScoreFn, check_score_input, time_score_fn
from dsm_jax.tweedie import posterior_mean

__all__ = [
    "DDPM_VARIANCES",
    "Predictor",
    "check_pc",
    "ddim",
    "ddim_predictor",
    "ddpm",
    "euler_maruyama",
    "euler_maruyama_predictor",
    "langevin_corrector",
    "predictor_corrector",
    "reverse_diffusion_predictor",
    "reverse_sde_scan",
    "sde_sampler_input",
    "tweedie_at",
]

Predictor = Callable[..., jax.Array]
DDPM_VARIANCES = ("beta", "posterior")


def tweedie_at(score_fn: TimeScoreFn, sde: SDE, x: jax.Array, t) -> jax.Array:
    """Tweedie's ``E[x_0 | x_t] = (x + sigma(t)^2 s(x, t)) / scale(t)``: one score evaluation."""
    scale, sigma = sde.marginal(t)
    return posterior_mean(lambda y: score_fn(y, t), x, to_batch(sigma, x), scale=to_batch(scale, x))


def sde_sampler_input(
    model_fn: ModelFn, sde: SDE, x: jax.Array, num_steps: int, parameterization: str, *, name: str = "x_init"
):
    """Checks a sampler's inputs before tracing; returns ``(score_fn(x, t), num_steps)``.

    The model is converted to the score in time here, once
    (:func:`dsm_jax.sde.time_score_fn`).
    """
    score_fn = time_score_fn(model_fn, sde, parameterization=parameterization)
    check_score_input(score_fn, sde, x, name=name)
    return score_fn, check_positive_int("num_steps", num_steps)


# ---------------------------------------------------------------------------
# Predictors and the Langevin corrector
# ---------------------------------------------------------------------------


def euler_maruyama_predictor(score_fn: TimeScoreFn, sde: SDE, x: jax.Array, t, t_next, key: jax.Array) -> jax.Array:
    """One Euler-Maruyama step of the reverse-time SDE from ``t`` to ``t_next < t``.

    ``x <- x - [f(x, t) - g(t)^2 s(x, t)] dt + g(t) sqrt(dt) z`` with
    ``dt = t - t_next > 0``.
    """
    dt = to_batch_expanded(t - t_next, x)
    g = to_batch_expanded(sde.diffusion(t), x)
    z = jax.random.normal(key, x.shape, x.dtype)
    return x - sde.reverse_drift(x, t, score_fn(x, t)) * dt + g * jnp.sqrt(dt) * z


def _transition(sde: SDE, x: jax.Array, t, t_next):
    """The forward transition ``x_t = a x_s + sqrt(v) z`` from ``s = t_next`` to ``t``.

    ``a = scale(t) / scale(s)`` and ``v = sigma(t)^2 - a^2 sigma(s)^2`` (the
    variances of a linear SDE add up). Also returns ``(scale, sigma)`` at both times.
    """
    scale_t, sigma_t = (to_batch_expanded(v, x) for v in sde.marginal(t))
    scale_s, sigma_s = (to_batch_expanded(v, x) for v in sde.marginal(t_next))
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


def ddim_predictor(
    score_fn: TimeScoreFn, sde: SDE, x: jax.Array, t, t_next, key: jax.Array | None = None, *, eta=0.0
) -> jax.Array:
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
    one example's score vanishes but couples the examples of a batch. A
    score that vanishes for the whole batch (e.g. an untrained network with a
    zero output layer) carries no information: the step is then 0 and ``x``
    is returned unchanged, instead of an infinite step giving NaN.
    """
    s = score_fn(x, t)
    z = jax.random.normal(key, x.shape, x.dtype)
    norm = lambda v: jnp.mean(jnp.linalg.norm(v.reshape(v.shape[0], -1), axis=-1))
    s_norm = norm(s)
    eps = jnp.where(s_norm > 0, 2.0 * (snr * norm(z) / jnp.where(s_norm > 0, s_norm, 1.0)) ** 2, 0.0)
    return x + eps * s + jnp.sqrt(2.0 * eps) * z


# ---------------------------------------------------------------------------
# Reverse-time SDE samplers
# ---------------------------------------------------------------------------


def reverse_sde_scan(
    score_fn: TimeScoreFn,
    sde: SDE,
    x_init: jax.Array,
    key: jax.Array,
    ts: jax.Array,
    *,
    predictor: Predictor,
    corrector_steps: int,
    snr,
    final_denoise: bool,
    every: int | None,
    project: Projection | None = None,
) -> SampleResult:
    """Scans ``predictor`` (then ``corrector_steps`` Langevin corrections) over the grid ``ts``, unchecked.

    ``project(x, t, key)``, if given, runs after every update, and with
    ``t=None`` after the final Tweedie step (inpainting).
    ``nfe = num_steps * (1 + corrector_steps) + final_denoise``.
    """
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

    x, traj = scan(step, x_init, (ts[:-1], ts[1:], keys[:-1]), every)
    nfe = num_steps * (1 + corrector_steps)
    if final_denoise:
        x = tweedie_at(score_fn, sde, x, ts[-1])
        if project is not None:
            x = project(x, None, keys[-1])
        nfe += 1
    return SampleResult(x, jnp.asarray(nfe, jnp.int32), with_start(x_init, traj))


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
    trajectory_every: int | None = None,
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
    score_fn, num_steps = sde_sampler_input(model_fn, sde, x_init, num_steps, parameterization)
    check_key(key)
    ts = sde.time_grid(num_steps, t_min=t_min)
    every = snapshot_every(return_trajectory, trajectory_every, num_steps)
    return reverse_sde_scan(
        score_fn,
        sde,
        x_init,
        key,
        ts,
        predictor=euler_maruyama_predictor,
        corrector_steps=0,
        snr=None,
        final_denoise=final_denoise,
        every=every,
    )


def check_pc(snr, corrector_steps) -> int:
    """``corrector_steps >= 0`` and, when there are any, ``snr > 0``; returns ``corrector_steps``."""
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
    trajectory_every: int | None = None,
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
    score_fn, num_steps = sde_sampler_input(model_fn, sde, x_init, num_steps, parameterization)
    check_key(key)
    corrector_steps = check_pc(snr, corrector_steps)
    ts = sde.time_grid(num_steps, t_min=t_min)
    every = snapshot_every(return_trajectory, trajectory_every, num_steps)
    return reverse_sde_scan(
        score_fn,
        sde,
        x_init,
        key,
        ts,
        predictor=predictor,
        corrector_steps=corrector_steps,
        snr=snr,
        final_denoise=final_denoise,
        every=every,
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
    trajectory_every: int | None = None,
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
    score_fn, num_steps = sde_sampler_input(model_fn, sde, x_init, num_steps, parameterization)
    check_key(key)
    predictor = reverse_diffusion_predictor if variance == "beta" else functools.partial(ddim_predictor, eta=1.0)
    ts = sde.time_grid(num_steps, t_min=t_min)
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


def ddim(
    model_fn: ModelFn,
    sde: SDE,
    x_init: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    eta=0.0,
    final_denoise: bool = True,
    parameterization: str = "eps",
    t_min=None,
    return_trajectory: bool = False,
    trajectory_every: int | None = None,
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
    score_fn, num_steps = sde_sampler_input(model_fn, sde, x_init, num_steps, parameterization)
    if key is not None:
        check_key(key)
    ts = sde.time_grid(num_steps, t_min=t_min)
    every = snapshot_every(return_trajectory, trajectory_every, num_steps)
    key = jax.random.key(0) if key is None else key
    return reverse_sde_scan(
        score_fn,
        sde,
        x_init,
        key,
        ts,
        predictor=functools.partial(ddim_predictor, eta=eta),
        corrector_steps=0,
        snr=None,
        final_denoise=final_denoise,
        every=every,
    )
