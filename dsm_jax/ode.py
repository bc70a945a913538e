"""One ODE solve over diffrax, with its model-evaluation count.

:func:`solve` integrates ``dy/dt = field(t, y)`` from ``t0`` to ``t1`` (either
direction; ``y`` any pytree) with a diffrax solver and step-size controller
passed as objects: by default ``diffrax.Tsit5()`` with
``diffrax.PIDController(rtol=1e-5, atol=1e-5)``, started at
``dt0 = (t1 - t0) / 100`` rather than diffrax's initial step-size search, so
that the evaluation count is exactly what the step statistics say. A fixed
grid of ``N`` steps is ``stepsize_controller=diffrax.ConstantStepSize()`` with
``dt0 = (t1 - t0) / N`` (:func:`ode_options` builds it from ``num_steps=N``).
The probability-flow sampler and the likelihood both solve through here.
diffrax is imported on the first call, so that ``import dsm_jax`` stays light.

The count ``nfe`` is the number of calls of ``field`` on the whole state
(:func:`solver_evaluations`): an explicit Runge-Kutta step evaluates one
stage per entry of its tableau's ``c`` plus one, a first-same-as-last (FSAL)
tableau reuses the last stage of a step as the first of the next (also after
a rejected step) at the cost of one evaluation at the start, and rejected
steps count like accepted ones. Tsit5 thus costs ``6 * steps + 1``.

References:
    Kidger, "On neural differential equations", PhD thesis, 2021 (diffrax).
    Tsitouras, "Runge-Kutta pairs of order 5(4) satisfying only the first
    column simplifying assumption", Computers & Mathematics with Applications 2011.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dsm_jax._checks import check_positive_int, check_positive_number

__all__ = ["DEFAULT_ATOL", "DEFAULT_MAX_STEPS", "DEFAULT_RTOL", "ode_options", "solve", "solver_evaluations"]

DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-5
DEFAULT_MAX_STEPS = 4096

Field = Callable[[Any, Any], Any]  # field(t, y) -> dy/dt, y a pytree


def solver_evaluations(solver) -> tuple[int, int] | None:
    """``(evaluations per step, one-off evaluations)`` of a diffrax solver, or None when unknown.

    ``Euler`` is ``(1, 0)``; an explicit Runge-Kutta tableau with ``s`` stages
    is ``(s, 0)``, or ``(s - 1, 1)`` when it is FSAL (Tsit5: ``(6, 1)``);
    implicit solvers (whose Newton iterations vary) are None.

    Example:
        >>> import diffrax
        >>> solver_evaluations(diffrax.Tsit5()), solver_evaluations(diffrax.Heun())
        ((6, 1), (2, 0))
    """
    import diffrax

    if isinstance(solver, diffrax.Euler):
        return 1, 0
    tableau = getattr(solver, "tableau", None)
    if not isinstance(solver, diffrax.AbstractERK) or not isinstance(tableau, diffrax.ButcherTableau):
        return None  # implicit and other solvers: the cost of a step is not fixed
    stages = len(tableau.c) + 1
    return (stages - 1, 1) if tableau.fsal else (stages, 0)


def solve(
    field: Field,
    y0,
    t0,
    t1,
    *,
    solver=None,
    stepsize_controller=None,
    dt0=None,
    saveat=None,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> tuple[Any, jax.Array]:
    """Solves ``dy/dt = field(t, y)`` from ``t0`` to ``t1``; returns ``(solution, nfe)``.

    Args:
        field: ``field(t, y) -> dy/dt``, ``y`` a pytree (arrays, tuples of arrays).
        y0: the state at ``t0``.
        t0, t1: start and end times (``t1 < t0`` integrates backwards).
        solver: a diffrax solver object (default ``diffrax.Tsit5()``).
        stepsize_controller: a diffrax step-size controller (default
            ``diffrax.PIDController(rtol=1e-5, atol=1e-5)``). With
            ``diffrax.ConstantStepSize()`` pass ``dt0``.
        dt0: the first (or, with a constant step, every) step, signed like
            ``t1 - t0``; default ``(t1 - t0) / 100`` for an adaptive controller.
        saveat: a ``diffrax.SaveAt`` (default ``SaveAt(t1=True)``: ``sol.ys``
            holds the final state with a leading axis of 1).
        max_steps: the step budget, ``>= 1``.

    Returns:
        ``(solution, nfe)``: the ``diffrax.Solution`` and the number of calls
        of ``field`` (an int32 scalar array; -1 for a solver whose cost per step
        :func:`solver_evaluations` does not know).

    Example:
        >>> sol, nfe = solve(lambda t, y: -y, jnp.ones(2), 0.0, 1.0)
        >>> bool(jnp.allclose(sol.ys[-1], jnp.exp(-1.0), rtol=1e-4)), int(nfe)
        (True, 31)
    """
    import diffrax

    solver = diffrax.Tsit5() if solver is None else solver
    if stepsize_controller is None:
        stepsize_controller = diffrax.PIDController(rtol=DEFAULT_RTOL, atol=DEFAULT_ATOL)
    if dt0 is None:
        if isinstance(stepsize_controller, diffrax.ConstantStepSize):
            raise ValueError("dt0 must be given with diffrax.ConstantStepSize(), got dt0=None.")
        dt0 = (t1 - t0) / 100.0
    check_positive_int("max_steps", max_steps)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: field(t, y)),
        solver,
        t0=t0,
        t1=t1,
        dt0=dt0,
        y0=y0,
        stepsize_controller=stepsize_controller,
        saveat=diffrax.SaveAt(t1=True) if saveat is None else saveat,
        max_steps=max_steps,
    )
    evals = solver_evaluations(solver)
    if evals is None:
        nfe = jnp.asarray(-1, jnp.int32)
    else:
        nfe = (sol.stats["num_steps"] * evals[0] + evals[1]).astype(jnp.int32)
    return sol, nfe


def ode_options(
    t0,
    t1,
    *,
    rtol=None,
    atol=None,
    num_steps: int | None = None,
    solver=None,
    stepsize_controller=None,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> dict:
    """The keywords of :func:`solve` from a sampler's options, checked before tracing.

    The old keywords map onto objects: ``num_steps=N`` is
    ``ConstantStepSize()`` with ``dt0 = (t1 - t0) / N`` and ``max_steps = N``;
    ``rtol`` / ``atol`` (default 1e-5) build the ``PIDController``. An explicit
    adaptive ``stepsize_controller`` carries its own tolerances (so it
    excludes ``rtol``, ``atol`` and ``num_steps``); an explicit
    ``ConstantStepSize()`` needs ``num_steps``.

    Returns:
        ``dict(solver=, stepsize_controller=, dt0=, max_steps=)``.

    Example:
        >>> opts = ode_options(1.0, 0.0, num_steps=4)
        >>> type(opts["stepsize_controller"]).__name__, float(opts["dt0"]), opts["max_steps"]
        ('ConstantStepSize', -0.25, 4)
    """
    import diffrax

    max_steps = check_positive_int("max_steps", max_steps)
    if solver is not None and not isinstance(solver, diffrax.AbstractSolver):
        raise ValueError(f"solver must be a diffrax solver, e.g. diffrax.Tsit5(), got {solver!r}.")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None:
            check_positive_number(name, value)
    if stepsize_controller is None:
        if num_steps is not None:
            stepsize_controller = diffrax.ConstantStepSize()
        else:
            rtol = DEFAULT_RTOL if rtol is None else rtol
            atol = DEFAULT_ATOL if atol is None else atol
            stepsize_controller = diffrax.PIDController(rtol=rtol, atol=atol)
    elif not isinstance(stepsize_controller, diffrax.AbstractStepSizeController):
        raise ValueError(f"stepsize_controller must be a diffrax step-size controller, got {stepsize_controller!r}.")
    else:
        given = {k: v for k, v in (("rtol", rtol), ("atol", atol)) if v is not None}
        if given:
            raise ValueError(
                f"rtol and atol belong to the controller when stepsize_controller is given, "
                f"got stepsize_controller={stepsize_controller!r} and {given!r}."
            )
    constant = isinstance(stepsize_controller, diffrax.ConstantStepSize)
    if constant != (num_steps is not None):
        raise ValueError(
            "num_steps goes with a constant step (diffrax.ConstantStepSize()) and only with it, "
            f"got num_steps={num_steps!r} and stepsize_controller={stepsize_controller!r}."
        )
    if constant:
        num_steps = check_positive_int("num_steps", num_steps)
        dt0 = (t1 - t0) / num_steps
        return dict(solver=solver, stepsize_controller=stepsize_controller, dt0=dt0, max_steps=num_steps)
    return dict(solver=solver, stepsize_controller=stepsize_controller, dt0=None, max_steps=max_steps)
