"""Sampling with the probability-flow ODE (Song et al. 2021, Eq. 13).

References:
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, "Score-based
    generative modeling through stochastic differential equations", ICLR 2021.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsm_jax import ode
from dsm_jax._checks import check_positive_int
from dsm_jax.parameterization import ModelFn
from dsm_jax.samplers._result import SampleResult
from dsm_jax.samplers.reverse_sde import tweedie_at
from dsm_jax.sde import SDE, check_score_input, time_score_fn

__all__ = ["probability_flow_ode"]


def probability_flow_ode(
    model_fn: ModelFn,
    sde: SDE,
    x_init: jax.Array,
    *,
    rtol=None,
    atol=None,
    num_steps: int | None = None,
    solver=None,
    stepsize_controller=None,
    max_steps: int = ode.DEFAULT_MAX_STEPS,
    final_denoise: bool = True,
    parameterization: str = "score",
    t_min=None,
    return_trajectory: bool = False,
    num_snapshots: int = 101,
) -> SampleResult:
    """Samples by integrating the probability-flow ODE from ``T`` to ``t_min``.

    ``dx/dt = f(x, t) - g(t)^2 s(x, t) / 2`` (:meth:`dsm_jax.sde.SDE.probability_flow_drift`)
    has the same marginals ``p_t`` as the SDE; it is deterministic given
    ``x_init``. Solved by :func:`dsm_jax.ode.solve` (diffrax): by default
    ``Tsit5`` with a ``PIDController(rtol, atol)`` (adaptive); with
    ``num_steps`` a constant step ``(T - t_min) / num_steps``; any diffrax
    solver and step-size controller can be passed as objects. The whole batch
    is one ODE state, so the error control (an RMS norm) and the step sizes are
    shared by the batch.

    Args:
        model_fn: ``model_fn(x, sigma) -> out``.
        sde: a :class:`dsm_jax.sde.SDE`.
        x_init: prior draws ``[B, *D]``.
        rtol, atol: tolerances of the default adaptive controller (1e-5 each).
        num_steps: if set, fixed steps instead of adaptive ones
            (``diffrax.ConstantStepSize()``).
        solver: a diffrax solver (default ``diffrax.Tsit5()``).
        stepsize_controller: a diffrax step-size controller (default
            ``PIDController(rtol, atol)``); a ``ConstantStepSize()`` needs ``num_steps``.
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

    Example:
        >>> import diffrax
        >>> from dsm_jax.sde import VPSDE
        >>> model_fn = lambda x, sigma: -x                          # the score of N(0, I) at every t
        >>> x_init = VPSDE().prior_sample(jax.random.key(0), (8, 2))
        >>> out = probability_flow_ode(model_fn, VPSDE(), x_init, num_steps=10, solver=diffrax.Heun())
        >>> int(out.nfe)                                            # 2 per Heun step, 1 for Tweedie
        21
    """
    import diffrax

    score_fn = time_score_fn(model_fn, sde, parameterization=parameterization)
    check_score_input(score_fn, sde, x_init, name="x_init")
    ts = sde.time_grid(1, t_min=t_min)
    t0, t1 = ts[0], ts[-1]
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
    if return_trajectory:
        saveat = diffrax.SaveAt(ts=jnp.linspace(t0, t1, check_positive_int("num_snapshots", num_snapshots, minimum=2)))
    else:
        saveat = diffrax.SaveAt(t1=True)
    field = lambda t, x: sde.probability_flow_drift(x, t, score_fn(x, t))
    sol, nfe = ode.solve(field, x_init, t0, t1, saveat=saveat, **options)
    x = sol.ys[-1]
    if final_denoise:
        x = tweedie_at(score_fn, sde, x, t1)
        nfe = nfe + 1
    return SampleResult(x, nfe, sol.ys if return_trajectory else None)
