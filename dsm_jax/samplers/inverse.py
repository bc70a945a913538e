"""Conditional sampling for inverse problems on top of the samplers: inpainting, denoising, linear operators.

Two families:

* Replacement / projection: a *projection* ``project(x, level, key)`` runs
  after every update of the underlying sampler (``level`` the time ``t`` or
  the noise level ``sigma`` just reached) and once more after the final
  Tweedie step, with ``level=None`` (the data itself: the clean observation is
  imposed). :func:`inpaint`, :func:`inpaint_annealed_langevin` (masks) and
  :func:`projection` (any operator with a pseudo-inverse).
* Likelihood guidance for ``y = A x + sigma_y eps`` with a linear operator of
  :mod:`dsm_jax.measurements`: the reverse SDE with the score plus a gradient
  of an approximate ``log p(y | x_t)`` taken through Tweedie's denoiser
  ``x0_hat(x_t) = (x_t + sigma_t^2 s(x_t, t)) / scale_t`` (``jax.vjp`` through
  the model, the score of the same call reused by the predictor):
  :func:`dps` (Chung et al. 2023) and :func:`pigdm` (Song et al. 2023).

Ground truth: for Gaussian data ``N(m, C)`` the posterior of a linear
measurement is Gaussian, ``mean = m + C A^T K^{-1} (y - A m)``, ``cov = C - C
A^T K^{-1} A C`` with ``K = A C A^T + sigma_y^2 I``; ``tests/test_inverse.py``
compares every method with it and states their biases.

References:
    Song & Ermon, "Generative modeling by estimating gradients of the data
    distribution", NeurIPS 2019 (inpainting with annealed Langevin dynamics).
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, "Score-based
    generative modeling through stochastic differential equations", ICLR 2021
    (imputation, Appendix I.2).
    Chung, Kim, Mccann, Klasky & Ye, "Diffusion posterior sampling for general
    noisy inverse problems", ICLR 2023 (DPS).
    Song, Vahdat, Mardani & Kautz, "Pseudoinverse-guided diffusion models for
    inverse problems", ICLR 2023 (PiGDM).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax._checks import (
    check_batched,
    check_choice,
    check_key,
    check_positive_int,
    check_positive_number,
    check_state,
    is_concrete,
    runtime_check_positive,
)
from dsm_jax._utils import to_batch, to_batch_expanded
from dsm_jax.measurements import LinearOperator
from dsm_jax.parameterization import ModelFn, as_score_fn, broadcast_sigma
from dsm_jax.samplers._result import SampleResult, scan, snapshot_every, with_start
from dsm_jax.samplers.langevin import annealed_langevin_scan, check_annealed
from dsm_jax.samplers.reverse_sde import (
    Predictor,
    check_pc,
    reverse_diffusion_predictor,
    reverse_sde_scan,
    sde_sampler_input,
    tweedie_at,
)
from dsm_jax.sde import SDE, TimeScoreFn, check_sde
from dsm_jax.tweedie import posterior_covariance

__all__ = [
    "DPS_CONVENTIONS",
    "PIGDM_COVARIANCES",
    "denoise_observation",
    "dps",
    "inpaint",
    "inpaint_annealed_langevin",
    "pigdm",
    "projection",
]

DPS_CONVENTIONS = ("code", "paper")
PIGDM_COVARIANCES = ("isotropic", "tweedie")


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


# ---------------------------------------------------------------------------
# Linear inverse problems y = A x + sigma_y eps
# ---------------------------------------------------------------------------


def _operator_input(model_fn, sde, operator, y, key, num_steps, parameterization, x_init, t_min):
    """Checks a posterior sampler's inputs; returns ``(score_fn, x_init, key, ts)``.

    ``x`` has the shape of ``A^T y``; ``x_init`` defaults to a prior draw.
    """
    if not isinstance(operator, LinearOperator):
        raise ValueError(f"operator must be a dsm_jax.measurements.LinearOperator, got {operator!r}.")
    check_sde(sde)
    check_state("y", y)
    check_key(key)
    x_struct = jax.eval_shape(operator.AT, y)
    k_init, key = jax.random.split(key)
    if x_init is None:
        x_init = sde.prior_sample(k_init, x_struct.shape).astype(y.dtype)
    elif jnp.shape(x_init) != x_struct.shape:
        raise ValueError(f"x_init must have the shape of A^T y {x_struct.shape}, got {jnp.shape(x_init)}.")
    score_fn, num_steps = sde_sampler_input(model_fn, sde, x_init, num_steps, parameterization)
    return score_fn, x_init, key, sde.time_grid(num_steps, t_min=t_min)


def _check_sigma_y(sigma_y) -> None:
    if jnp.ndim(sigma_y) != 0:
        raise ValueError(f"sigma_y must be a scalar, got shape {jnp.shape(sigma_y)}.")
    if is_concrete(sigma_y) and not (np.isfinite(float(np.asarray(sigma_y))) and float(np.asarray(sigma_y)) >= 0):
        raise ValueError(f"sigma_y must be finite and >= 0, got {sigma_y!r}.")


def _denoiser_vjp(score_fn: TimeScoreFn, sde: SDE, x: jax.Array, t):
    """``(x0_hat, vjp, score)``: Tweedie's ``x0_hat(x)`` at time ``t``, its ``jax.vjp`` and the score (one call)."""
    scale, sigma = (to_batch_expanded(v, x) for v in sde.marginal(t))

    def denoise(z):
        s = score_fn(z, t)
        return (z + sigma**2 * s) / scale, s

    x0, vjp, s = jax.vjp(denoise, x, has_aux=True)
    return x0, (lambda v: vjp(v)[0]), s


def _guided_scan(score_fn, sde, x_init, key, ts, guide, *, predictor, final_denoise, every) -> SampleResult:
    """Scans ``guide(x, t) -> (score, correction)`` then ``predictor`` with that score, plus the correction.

    The predictor gets the (guided) score of ``x`` as a constant function: the
    predictors evaluate ``score_fn(x, t)`` once, at the current state, so the
    model is called once per step (with its vjp). ``nfe = num_steps + final_denoise``.
    """
    num_steps = ts.shape[0] - 1
    keys = jax.random.split(key, num_steps)

    def step(x, inp):
        t, t_next, k = inp
        s, correction = guide(x, t)
        return predictor(lambda *_: s, sde, x, t, t_next, k) + correction, None

    x, traj = scan(step, x_init, (ts[:-1], ts[1:], keys), every)
    nfe = num_steps
    if final_denoise:
        x = tweedie_at(score_fn, sde, x, ts[-1])
        nfe += 1
    return SampleResult(x, jnp.asarray(nfe, jnp.int32), with_start(x_init, traj))


def _norms(v: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=-1))


def dps(
    model_fn: ModelFn,
    sde: SDE,
    operator: LinearOperator,
    y: jax.Array,
    key: jax.Array,
    *,
    num_steps: int,
    step_size,
    convention: str = "code",
    predictor: Predictor = reverse_diffusion_predictor,
    final_denoise: bool = True,
    parameterization: str = "score",
    t_min=None,
    x_init: jax.Array | None = None,
    return_trajectory: bool = False,
    trajectory_every: int | None = None,
) -> SampleResult:
    """Diffusion posterior sampling (DPS, Chung et al. 2023, Algorithm 1) for ``y = A x + sigma_y eps``.

    Each step moves ``x_i`` (time ``t``) by the predictor with the
    unconditional score, then down the gradient, *with respect to* ``x_i``, of
    the residual of Tweedie's denoiser ``x0_hat(x_i)``:

    * ``convention="code"`` (the reference implementation; its configs'
      ``scale``): ``x_{i-1} = pred(x_i) - step_size * grad ||y - A x0_hat(x_i)||``,
      the **un-squared** norm;
    * ``convention="paper"`` (Algorithm 1 with a constant ``zeta_i``):
      ``x_{i-1} = pred(x_i) - step_size * grad ||y - A x0_hat(x_i)||^2``.

    The paper's experiments set ``zeta_i = zeta' / ||y - A x0_hat(x_i)||``
    (Appendix C) in the squared form, which is the ``"code"`` form with
    ``step_size = 2 zeta'`` (``grad ||r||^2 = 2 ||r|| grad ||r||``). The
    reference code takes the norm over the whole batch; here each example is
    its own problem (per-example norms). ``sigma_y`` enters only through the
    step size (the reference code does not use it); neither form is the score
    of ``p(y | x_t)``, and DPS is not an exact posterior sampler even for
    Gaussian data (its likelihood ``N(A x0_hat, sigma_y^2 I)`` ignores
    ``Cov[x_0 | x_t]``).

    Args:
        model_fn: ``model_fn(x, sigma) -> out`` (unconditional).
        sde: a :class:`dsm_jax.sde.SDE` (Chung et al. used VP).
        operator: a :class:`dsm_jax.measurements.LinearOperator`.
        y: measurements ``[B, *M]``; ``x`` has the shape of ``operator.AT(y)``.
        key: PRNG key.
        num_steps: reverse steps, ``>= 1``.
        step_size: ``> 0``, in the chosen ``convention``.
        convention: "code" or "paper" (see above).
        predictor: a predictor of :mod:`dsm_jax.samplers.reverse_sde` (it
            must evaluate the score once, at the current state).
        final_denoise, parameterization, t_min, return_trajectory,
            trajectory_every: as in :func:`predictor_corrector`.
        x_init: initial state (default a prior draw).

    Returns:
        :class:`SampleResult`, ``nfe = num_steps + final_denoise`` (each step's
        call is differentiated once, a vjp).

    References:
        Chung, Kim, Mccann, Klasky & Ye, ICLR 2023, Algorithm 1 and Appendix C.
    """
    check_choice("convention", convention, DPS_CONVENTIONS)
    check_positive_number("step_size", step_size)
    score_fn, x_init, key, ts = _operator_input(
        model_fn, sde, operator, y, key, num_steps, parameterization, x_init, t_min
    )
    every = snapshot_every(return_trajectory, trajectory_every, ts.shape[0] - 1)

    def guide(x, t):
        x0, vjp, s = _denoiser_vjp(score_fn, sde, x, t)
        r = y - operator.A(x0)
        if convention == "code":
            # d ||r|| / d x0 = -A^T r / ||r||; a zero residual has no direction (and no step).
            norm = to_batch_expanded(_norms(r), r)
            grad_x0 = -operator.AT(jnp.where(norm > 0, r / jnp.where(norm > 0, norm, 1.0), 0.0))
        else:
            grad_x0 = -2.0 * operator.AT(r)
        return s, -jnp.asarray(step_size, x.dtype) * vjp(grad_x0)

    return _guided_scan(
        score_fn, sde, x_init, key, ts, guide, predictor=predictor, final_denoise=final_denoise, every=every
    )


def pigdm(
    model_fn: ModelFn,
    sde: SDE,
    operator: LinearOperator,
    y: jax.Array,
    sigma_y,
    key: jax.Array,
    *,
    num_steps: int,
    covariance: str = "isotropic",
    data_variance=1.0,
    guidance_scale=1.0,
    cg_iterations: int = 50,
    predictor: Predictor = reverse_diffusion_predictor,
    final_denoise: bool = True,
    parameterization: str = "score",
    t_min=None,
    x_init: jax.Array | None = None,
    return_trajectory: bool = False,
    trajectory_every: int | None = None,
) -> SampleResult:
    """Pseudoinverse-guided sampling (PiGDM, Song et al. 2023) for ``y = A x + sigma_y eps``.

    ``p(x_0 | x_t)`` is approximated by ``N(x0_hat(x_t), Sigma_t)``, so
    ``p(y | x_t) = N(A x0_hat, K_t)``, ``K_t = sigma_y^2 I + A Sigma_t A^T``,
    and the reverse SDE runs with the score plus ``guidance_scale`` times

        ``g = (d x0_hat / d x_t)^T A^T K_t^{-1} (y - A x0_hat)``

    (one vjp through the model; the dependence of ``Sigma_t`` on ``x_t`` is
    ignored, as in the paper). ``Sigma_t``:

    * ``covariance="isotropic"`` (the paper): ``r_t^2 I`` with
      ``r_t^2 = v rho^2 / (v + rho^2)``, ``rho = sigma(t) / scale(t)`` and
      ``v = data_variance``: the exact posterior variance when the data are
      ``N(mu, v I)`` (the paper's ``r_t^2 = sigma_t^2 / (1 + sigma_t^2)`` for
      ``v = 1``). ``K_t^{-1} r`` is solved matrix-free by conjugate gradients
      (``cg_iterations`` at most; ``A A^T`` of a mask or a downsampling is
      diagonal, one iteration).
    * ``covariance="tweedie"``: the second-order Tweedie covariance of the
      score, :func:`dsm_jax.tweedie.posterior_covariance` (one jvp per data
      dimension, and the dense ``A``: small ``D`` only); ``K_t`` is inverted
      densely per example (a pseudo-inverse, for singular noise-free ``K_t``).

    For Gaussian data and the exact score, ``"tweedie"`` (and ``"isotropic"``
    when ``C = v I``) makes ``N(A x0_hat, K_t)`` the exact ``p(y | x_t)``, hence
    the guided score the exact ``grad log p(x_t | y)``: the sampler is exact up
    to the time discretisation. ``guidance_scale = 1`` is this Bayes weight
    (the paper's Algorithm 1 writes the same term in DDIM form, with
    ``sqrt(alpha_bar_t)`` for its scaling of ``x_t``).

    Args:
        model_fn: ``model_fn(x, sigma) -> out`` (unconditional).
        sde: a :class:`dsm_jax.sde.SDE`.
        operator: a :class:`dsm_jax.measurements.LinearOperator`.
        y: measurements ``[B, *M]``.
        sigma_y: the measurement noise, a scalar ``>= 0`` (``0``: noise-free;
            then ``K_t`` must be invertible on the residuals, which holds for
            ``Sigma_t`` positive definite and ``A`` of full row rank, or for masks).
        key: PRNG key.
        num_steps: reverse steps, ``>= 1``.
        covariance: "isotropic" or "tweedie".
        data_variance: ``v > 0`` of the isotropic ``r_t^2``.
        guidance_scale: the weight of ``g``, ``> 0``.
        cg_iterations: the conjugate-gradient budget (isotropic), ``>= 1``.
        predictor, final_denoise, parameterization, t_min, x_init,
            return_trajectory, trajectory_every: as in :func:`dps`.

    Returns:
        :class:`SampleResult`; ``nfe = num_steps + final_denoise`` model calls
        (each differentiated once; ``"tweedie"`` adds ``D`` jvps per step).

    References:
        Song, Vahdat, Mardani & Kautz, ICLR 2023, Eqs. (5)-(8).
    """
    check_choice("covariance", covariance, PIGDM_COVARIANCES)
    _check_sigma_y(sigma_y)
    check_positive_number("data_variance", data_variance)
    check_positive_number("guidance_scale", guidance_scale)
    cg_iterations = check_positive_int("cg_iterations", cg_iterations)
    score_fn, x_init, key, ts = _operator_input(
        model_fn, sde, operator, y, key, num_steps, parameterization, x_init, t_min
    )
    every = snapshot_every(return_trajectory, trajectory_every, ts.shape[0] - 1)
    noise_var = jnp.asarray(sigma_y, y.dtype) ** 2

    def solve(x, t, r):
        scale, sigma = sde.marginal(t)
        if covariance == "isotropic":
            rho2 = (sigma / scale) ** 2
            r2 = (data_variance * rho2 / (data_variance + rho2)).astype(y.dtype)
            matvec = lambda u: noise_var * u + r2 * operator.A(operator.AT(u))
            return jax.scipy.sparse.linalg.cg(matvec, r, maxiter=cg_iterations, tol=1e-6)[0]
        cov = posterior_covariance(lambda z: score_fn(z, t), x, to_batch(sigma, x), scale=to_batch(scale, x))
        a = operator.matrix(x.shape[1:], x.dtype)
        gram = noise_var * jnp.eye(a.shape[0], dtype=x.dtype) + jnp.einsum("md,bde,ne->bmn", a, cov, a)
        # The pseudo-inverse: a mask's noise-free K_t is singular off the mask, where the residual is 0.
        return jnp.einsum("bmn,bn->bm", jnp.linalg.pinv(gram, hermitian=True), r.reshape(r.shape[0], -1)).reshape(
            r.shape
        )

    def guide(x, t):
        x0, vjp, s = _denoiser_vjp(score_fn, sde, x, t)
        u = solve(x, t, y - operator.A(x0))
        return s + jnp.asarray(guidance_scale, x.dtype) * vjp(operator.AT(u)), 0.0

    return _guided_scan(
        score_fn, sde, x_init, key, ts, guide, predictor=predictor, final_denoise=final_denoise, every=every
    )


def projection(
    model_fn: ModelFn,
    sde: SDE,
    operator: LinearOperator,
    y: jax.Array,
    key: jax.Array,
    *,
    num_steps: int,
    snr=0.16,
    corrector_steps: int = 1,
    predictor: Predictor = reverse_diffusion_predictor,
    final_denoise: bool = True,
    parameterization: str = "score",
    t_min=None,
    x_init: jax.Array | None = None,
    return_trajectory: bool = False,
    trajectory_every: int | None = None,
) -> SampleResult:
    """Noise-free ``y = A x`` by reverse-SDE sampling with projection onto the measurements.

    :func:`inpaint` for any operator with a pseudo-inverse: after every update
    at time ``t`` the measured part of ``x`` is replaced by a fresh draw of the
    noised measurement, ``x <- x + A^+ (y_t - A x)`` with ``y_t = scale(t) y +
    sigma(t) A eps`` (the law of ``A x_t`` given ``A x_0 = y``); the null-space
    part ``(I - A^+ A) x`` follows the reverse SDE (with the Langevin
    corrector). At the end ``x <- x + A^+ (y - A x)``, so ``A x = y`` exactly
    (to rounding). For a :class:`~dsm_jax.measurements.Mask` this is
    :func:`inpaint` (the same updates). Approximate as :func:`inpaint`: exact
    on the measured part; the null-space part approaches the conditional law
    as the final noise levels get small (the projected ``y_t`` then carries
    ``y``). Measurement noise is ignored (``y`` is imposed).

    Args:
        model_fn: ``model_fn(x, sigma) -> out``.
        sde: a :class:`dsm_jax.sde.SDE`.
        operator: a :class:`dsm_jax.measurements.LinearOperator` with ``has_pinv``.
        y: noise-free measurements ``[B, *M]``.
        key: PRNG key.
        num_steps, snr, corrector_steps, predictor, final_denoise,
            parameterization, t_min, return_trajectory, trajectory_every: as
            in :func:`predictor_corrector`.
        x_init: initial state (default a prior draw).

    Returns:
        :class:`SampleResult`, ``nfe = num_steps * (1 + corrector_steps) + final_denoise``.
    """
    if isinstance(operator, LinearOperator) and not operator.has_pinv:
        raise ValueError(f"operator must have a pseudo-inverse (has_pinv) for projection, got {operator!r}.")
    corrector_steps = check_pc(snr, corrector_steps)
    score_fn, x_init, key, ts = _operator_input(
        model_fn, sde, operator, y, key, num_steps, parameterization, x_init, t_min
    )
    every = snapshot_every(return_trajectory, trajectory_every, ts.shape[0] - 1)

    def project(x, t, k):
        if t is None:  # after the final Tweedie step: the clean measurement
            return x + operator.pinv(y - operator.A(x))
        scale, sigma = sde.marginal(t)
        y_t = scale * y + sigma * operator.A(jax.random.normal(k, x.shape, x.dtype))
        return x + operator.pinv(y_t - operator.A(x))

    k_proj, k_run = jax.random.split(key)
    return reverse_sde_scan(
        score_fn,
        sde,
        project(x_init, ts[0], k_proj),
        k_run,
        ts,
        predictor=predictor,
        corrector_steps=corrector_steps,
        snr=snr,
        final_denoise=final_denoise,
        every=every,
        project=project,
    )
