"""Samplers: Langevin dynamics, reverse-time SDEs, the probability-flow ODE, DDPM/DDIM, inverse problems.

One file per family:

* :mod:`~dsm_jax.samplers.langevin`: :func:`langevin`, :func:`annealed_langevin` (NCSN);
* :mod:`~dsm_jax.samplers.reverse_sde`: the predictors, the Langevin corrector,
  :func:`euler_maruyama`, :func:`predictor_corrector`, :func:`ddpm`, :func:`ddim`;
* :mod:`~dsm_jax.samplers.ode`: :func:`probability_flow_ode` (over :func:`dsm_jax.ode.solve`);
* :mod:`~dsm_jax.samplers.sigma_grid`: :func:`euler`, :func:`heun`, :func:`dpm_solver_pp`
  (the probability-flow ODE on a grid of noise levels, 10-35 evaluations);
* :mod:`~dsm_jax.samplers.inverse`: :func:`inpaint`, :func:`inpaint_annealed_langevin`,
  :func:`denoise_observation`, and for the operators of :mod:`dsm_jax.measurements`
  :func:`dps`, :func:`pigdm`, :func:`projection`;
* :mod:`~dsm_jax.samplers._result`: :class:`SampleResult` and the thinned scan.

Every fixed-step sampler is one ``step(carry, x)`` run by ``jax.lax.scan``
over a grid (noise levels, times, keys): its compiled size does not grow with
the number of steps. Nothing is jit-wrapped; the caller jits, e.g.
``jax.jit(partial(euler_maruyama, model_fn, sde, num_steps=500))(x, key)``.
Keys are explicit. A model's parameterization is turned into a score once, at
entry (:func:`dsm_jax.parameterization.as_score_fn` for the sigma-conditioned
samplers, :func:`dsm_jax.sde.time_score_fn` for the SDE ones); the steps only
see a score.

Checks: before tracing, shapes, dtypes (floating-point states), keys and
every concrete value (sigmas decreasing and > 0, step sizes > 0) are checked.
Values traced under ``jit`` (a schedule or a step size passed as an argument,
the initial states) are only checked at run time with the opt-in ``checkify``
checks of :func:`dsm_jax.debug_checks` (sigmas and step sizes finite and > 0,
initial states finite); off by default, they add nothing to the program.

Returns and the evaluation count: every sampler can return a
:class:`SampleResult` ``(samples, nfe, trajectory)``, ``nfe`` counting model
evaluations and ``trajectory`` ``None`` unless asked. The SDE/ODE and
inverse-problem samplers always do; :func:`langevin`,
:func:`annealed_langevin` and :func:`inpaint_annealed_langevin` keep the NCSN
contract (the samples ``[B, *D]``, or ``(samples, trajectory)`` with
``return_trajectory=True``), and so do :func:`euler`, :func:`heun` and
:func:`dpm_solver_pp`; they return a :class:`SampleResult` with
``return_result=True``.

References:
    Song & Ermon, NeurIPS 2019 (annealed Langevin dynamics, inpainting).
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, ICLR 2021
    (reverse SDE, predictor-corrector, probability-flow ODE, imputation).
    Karras, Aittala, Aila & Laine, NeurIPS 2022 (EDM: Euler and Heun on a sigma grid).
    Lu et al. 2022 (DPM-Solver++).
    Ho, Jain & Abbeel, NeurIPS 2020 (DDPM). Song, Meng & Ermon, ICLR 2021 (DDIM).
"""

from dsm_jax.samplers._result import SampleResult
from dsm_jax.samplers.inverse import denoise_observation, dps, inpaint, inpaint_annealed_langevin, pigdm, projection
from dsm_jax.samplers.langevin import PREDRAW_ELEMENTS, annealed_langevin, langevin
from dsm_jax.samplers.ode import probability_flow_ode
from dsm_jax.samplers.reverse_sde import (
    DDPM_VARIANCES,
    Predictor,
    ddim,
    ddim_predictor,
    ddpm,
    euler_maruyama,
    euler_maruyama_predictor,
    langevin_corrector,
    predictor_corrector,
    reverse_diffusion_predictor,
)
from dsm_jax.samplers.sigma_grid import dpm_solver_pp, euler, heun
from dsm_jax.sde import TimeScoreFn

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
    "euler",
    "heun",
    "dpm_solver_pp",
    "ddpm",
    "ddim",
    "inpaint",
    "inpaint_annealed_langevin",
    "denoise_observation",
    "dps",
    "pigdm",
    "projection",
    "DDPM_VARIANCES",
    "PREDRAW_ELEMENTS",
    "Predictor",
    "TimeScoreFn",
]
