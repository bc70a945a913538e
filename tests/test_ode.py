"""dsm_jax.ode.solve against the closed form of a linear ODE; fixed and adaptive steps; the nfe count."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

from dsm_jax import ode

# dy/dt = A y with a damped rotation: y(t) = expm(A (t - t0)) y0 in closed form.
A = jnp.array([[-0.5, 2.0], [-2.0, -0.5]])
Y0 = jnp.array([[1.0, 0.0], [0.3, -0.7], [-1.0, 2.0]])  # three states, one ODE state [3, 2]


def _linear(t, y):
    return y @ A.T


def _exact(y0, t0, t1):
    """expm(A dt) = exp(-0.5 dt) [[cos 2dt, sin 2dt], [-sin 2dt, cos 2dt]]."""
    dt = t1 - t0
    c, s = np.cos(2 * dt), np.sin(2 * dt)
    return np.exp(-0.5 * dt) * (np.asarray(y0) @ np.array([[c, s], [-s, c]]).T)


def _max_error(sol, t0, t1):
    return float(np.max(np.abs(np.asarray(sol.ys[-1]) - _exact(Y0, t0, t1))))


@pytest.mark.parametrize("t0, t1", [(0.0, 2.0), (2.0, 0.5)], ids=["forward", "backward"])
def test_adaptive_default_matches_the_closed_form(t0, t1):
    """Tsit5 + PIDController(1e-5, 1e-5), forwards and backwards in time: the
    error is of the order of the tolerances (|y| <= 2.2, so within 3 * (atol + rtol |y|))."""
    sol, nfe = jax.jit(lambda y: ode.solve(_linear, y, t0, t1))(Y0)
    assert _max_error(sol, t0, t1) < 3 * (1e-5 + 1e-5 * 2.2)
    assert int(nfe) == 6 * int(sol.stats["num_steps"]) + 1


def test_tighter_tolerance_is_more_accurate_and_costs_more():
    errors, costs = [], []
    for tol in (1e-3, 1e-6):
        controller = diffrax.PIDController(rtol=tol, atol=tol)
        sol, nfe = ode.solve(_linear, Y0, 0.0, 2.0, stepsize_controller=controller)
        errors.append(_max_error(sol, 0.0, 2.0))
        costs.append(int(nfe))
    assert errors[1] < errors[0] / 30 and costs[1] > costs[0], (errors, costs)


@pytest.mark.parametrize("solver, order", [(diffrax.Euler(), 1), (diffrax.Heun(), 2), (diffrax.Tsit5(), 5)])
def test_fixed_steps_converge_at_the_solver_order(solver, order, x64):
    """Doubling the number of constant steps divides the global error by about 2^order
    (within a factor 0.7 of it, in float64 so that rounding does not floor the error)."""
    y0 = Y0.astype(jnp.float64)
    errors = []
    for n in (16, 32):
        sol, nfe = ode.solve(
            _linear, y0, 0.0, 2.0, solver=solver, stepsize_controller=diffrax.ConstantStepSize(), dt0=2.0 / n
        )
        errors.append(float(np.max(np.abs(np.asarray(sol.ys[-1]) - _exact(y0, 0.0, 2.0)))))
        per_step, once = ode.solver_evaluations(solver)
        assert int(sol.stats["num_steps"]) == n and int(nfe) == per_step * n + once
    assert errors[0] / errors[1] > 0.7 * 2**order, errors


def test_fixed_and_adaptive_agree_on_a_pytree_state():
    """A (y, integral) state as the likelihood uses: d integral / dt = sum(y) per row."""
    field = lambda t, s: (_linear(t, s[0]), jnp.sum(s[0], axis=-1))
    state = (Y0, jnp.zeros(3))
    fixed = ode.solve(field, state, 0.0, 1.0, **ode.ode_options(0.0, 1.0, num_steps=200))[0]
    adaptive = ode.solve(field, state, 0.0, 1.0, **ode.ode_options(0.0, 1.0, rtol=1e-7, atol=1e-7))[0]
    np.testing.assert_allclose(fixed.ys[0][-1], _exact(Y0, 0.0, 1.0), atol=1e-5)
    for a, b in zip(jax.tree.leaves(fixed.ys), jax.tree.leaves(adaptive.ys), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _counting_field():
    calls = [0]

    def bump(_):
        calls[0] += 1
        return np.zeros((), np.float32)

    def field(t, y):
        return _linear(t, y) + io_callback(bump, jax.ShapeDtypeStruct((), jnp.float32), y, ordered=True)

    return field, calls


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(solver=diffrax.Dopri5(), stepsize_controller=diffrax.PIDController(rtol=1e-4, atol=1e-4)),
        dict(solver=diffrax.Heun(), stepsize_controller=diffrax.ConstantStepSize(), dt0=0.1),
        dict(solver=diffrax.Euler(), stepsize_controller=diffrax.ConstantStepSize(), dt0=0.25),
    ],
    ids=["tsit5_pid", "dopri5_pid", "heun_fixed", "euler_fixed"],
)
def test_nfe_counts_field_evaluations(options):
    """nfe equals the number of field executions (a host callback counts them), rejected steps included."""
    field, calls = _counting_field()
    sol, nfe = jax.jit(lambda y: ode.solve(field, y, 0.0, 2.0, **options))(Y0)
    jax.block_until_ready(sol.ys)
    assert int(nfe) == calls[0] > 0


def test_unknown_solver_cost_is_minus_one():
    sol, nfe = ode.solve(_linear, Y0, 0.0, 1.0, solver=diffrax.Kvaerno3())
    assert int(nfe) == -1 and sol.ys.shape == (1, 3, 2)


def test_ode_options_map_the_old_keywords_to_objects():
    fixed = ode.ode_options(1.0, 0.0, num_steps=8)
    assert isinstance(fixed["stepsize_controller"], diffrax.ConstantStepSize)
    assert float(fixed["dt0"]) == -0.125 and fixed["max_steps"] == 8
    adaptive = ode.ode_options(0.0, 1.0, rtol=1e-3)
    controller = adaptive["stepsize_controller"]
    assert isinstance(controller, diffrax.PIDController) and (controller.rtol, controller.atol) == (1e-3, 1e-5)
    assert adaptive["dt0"] is None and adaptive["max_steps"] == ode.DEFAULT_MAX_STEPS
    given = diffrax.PIDController(rtol=1e-2, atol=1e-2)
    assert ode.ode_options(0.0, 1.0, stepsize_controller=given)["stepsize_controller"] is given
    constant = ode.ode_options(0.0, 1.0, num_steps=4, stepsize_controller=diffrax.ConstantStepSize())
    assert float(constant["dt0"]) == 0.25


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_steps=0), "num_steps"),
        (dict(rtol=0.0), "rtol"),
        (dict(rtol=-1.0, num_steps=5), "rtol"),
        (dict(atol=float("nan")), "atol"),
        (dict(max_steps=0), "max_steps"),
        (dict(solver="tsit5"), "solver"),
        (dict(stepsize_controller="pid"), "stepsize_controller"),
        (dict(stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3), rtol=1e-4), "rtol"),
        (dict(stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3), num_steps=5), "num_steps"),
        (dict(stepsize_controller=diffrax.ConstantStepSize()), "num_steps"),
    ],
)
def test_ode_options_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ode.ode_options(0.0, 1.0, **kwargs)


def test_solve_bad_input():
    with pytest.raises(ValueError, match="dt0"):
        ode.solve(_linear, Y0, 0.0, 1.0, stepsize_controller=diffrax.ConstantStepSize())
    with pytest.raises(ValueError, match="max_steps"):
        ode.solve(_linear, Y0, 0.0, 1.0, max_steps=0)
