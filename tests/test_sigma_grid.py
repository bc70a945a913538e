"""Karras grids and the sigma-grid samplers (Euler, Heun, DPM-Solver++) against exact answers."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsm_jax import metrics
from dsm_jax.data import eight_gaussians_mixture
from dsm_jax.noise import karras_sigmas
from dsm_jax.samplers import SampleResult, dpm_solver_pp, euler, heun
from dsm_jax.sde import VPSDE, SubVPSDE, exact_score_model, ve_model_from_vp

SIGMA_MAX, SIGMA_MIN = 80.0, 0.002
GMM = eight_gaussians_mixture()
SAMPLERS = {"euler": euler, "heun": heun, "dpm_solver_pp": dpm_solver_pp}
NFE = {"euler": lambda n: n, "heun": lambda n: 2 * n - 1, "dpm_solver_pp": lambda n: n}


def gmm_denoiser(x, sigma):
    """The exact denoiser E[x0 | x0 + sigma eps = x] of the 8 Gaussians ("x0" parameterization)."""
    return jax.vmap(lambda xi, si: GMM.posterior_mean(xi[None], si)[0])(x, sigma)


MEAN, VAR = jnp.array([1.0, -0.5]), 0.25


def gauss_denoiser(x, sigma):
    """E[x0 | x] for x0 ~ N(MEAN, VAR I): MEAN + VAR / (VAR + sigma^2) (x - MEAN)."""
    return MEAN + (VAR / (VAR + sigma[:, None] ** 2)) * (x - MEAN)


def gauss_score(x, sigma):
    return -(x - MEAN) / (VAR + sigma[:, None] ** 2)


# ---------------------------------------------------------------------------
# karras_sigmas
# ---------------------------------------------------------------------------


def test_karras_sigmas_follow_eq5():
    sigmas = karras_sigmas(SIGMA_MAX, SIGMA_MIN, 18, rho=7.0)
    assert sigmas.dtype == jnp.float32 and sigmas.shape == (18,)
    i = np.arange(18) / 17
    expected = (SIGMA_MAX ** (1 / 7) + i * (SIGMA_MIN ** (1 / 7) - SIGMA_MAX ** (1 / 7))) ** 7
    np.testing.assert_allclose(sigmas, expected, rtol=1e-6)
    assert float(sigmas[0]) == np.float32(SIGMA_MAX) and float(sigmas[-1]) == np.float32(SIGMA_MIN)
    assert np.all(np.diff(np.asarray(sigmas)) < 0)
    # rho = 1 is uniform in sigma; a large rho tends to the geometric grid.
    np.testing.assert_allclose(karras_sigmas(3.0, 1.0, 3, rho=1.0), [3.0, 2.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(karras_sigmas(100.0, 1.0, 3, rho=1e6), [100.0, 10.0, 1.0], rtol=1e-4)
    np.testing.assert_array_equal(karras_sigmas(0.5, 0.5, 1), [0.5])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sigma_max=1.0, sigma_min=2.0, num=4), "sigma_max"),
        (dict(sigma_max=-1.0, sigma_min=0.1, num=4), "sigma_max"),
        (dict(sigma_max=1.0, sigma_min=0.0, num=4), "sigma_min"),
        (dict(sigma_max=1.0, sigma_min=1e-40, num=4), "sigma_min"),
        (dict(sigma_max=1.0, sigma_min=0.1, num=0), "num"),
        (dict(sigma_max=1.0, sigma_min=0.1, num=2.5), "num"),
        (dict(sigma_max=1.0, sigma_min=0.1, num=4, rho=0.0), "rho"),
        (dict(sigma_max=1.0, sigma_min=0.1, num=1), "num=1"),
    ],
)
def test_karras_sigmas_rejects_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        karras_sigmas(**kwargs)


# ---------------------------------------------------------------------------
# The samplers: evaluation counts, returns, checks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_nfe_returns_and_trajectory(name):
    sigmas = karras_sigmas(10.0, 0.01, 6)
    x_init = sigmas[0] * jax.random.normal(jax.random.key(0), (8, 2))
    sampler = functools.partial(SAMPLERS[name], x_init=x_init, sigmas=sigmas)
    out, plain, from_score = jax.jit(
        lambda: (
            sampler(gauss_denoiser, parameterization="x0", return_result=True, return_trajectory=True),
            sampler(gauss_denoiser, parameterization="x0"),
            sampler(gauss_score),
        )
    )()
    assert isinstance(out, SampleResult) and int(out.nfe) == NFE[name](6)
    assert out.trajectory is not None and out.trajectory.shape == (7, 8, 2)
    np.testing.assert_array_equal(out.trajectory[0], x_init)
    np.testing.assert_array_equal(out.trajectory[-1], out.samples)
    np.testing.assert_array_equal(plain, out.samples)
    # The last step is the first-order step to sigma = 0: the denoiser at the last level.
    np.testing.assert_allclose(out.samples, gauss_denoiser(out.trajectory[-2], jnp.full((8,), sigmas[-1])), atol=1e-6)
    # The score parameterization gives the same samples through D = x + sigma^2 s.
    np.testing.assert_allclose(from_score, out.samples, atol=2e-4)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_one_level_is_one_denoising_step(name):
    sigmas = jnp.array([0.5])
    x = jax.random.normal(jax.random.key(1), (4, 2))
    out = jax.jit(lambda x: SAMPLERS[name](gauss_denoiser, x, sigmas, parameterization="x0", return_result=True))(x)
    assert int(out.nfe) == 1
    np.testing.assert_allclose(out.samples, gauss_denoiser(x, jnp.full((4,), 0.5)), atol=1e-6)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_program_size_does_not_grow_with_the_levels(name):
    def program(num):
        run = lambda x, sigmas: SAMPLERS[name](gauss_denoiser, x, sigmas, parameterization="x0")
        # The grid's length appears in the shapes only: drop the numbers, compare the rest.
        return re.sub(r"\d+", "", str(jax.make_jaxpr(run)(jnp.ones((2, 2)), karras_sigmas(10.0, 0.01, num))))

    assert program(5) == program(500)


BAD = [
    (dict(sigmas=jnp.array([0.1, 1.0])), "sigmas must be strictly decreasing"),
    (dict(sigmas=jnp.array([1.0, 0.0])), "sigmas must be > 0"),
    (dict(sigmas=jnp.ones((2, 2))), "sigmas must be a non-empty 1-D array"),
    (dict(x_init=jnp.ones(3)), "x_init must be batched"),
    (dict(x_init=jnp.ones((3, 2), jnp.int32)), "x_init must be floating point"),
    (dict(model_fn=lambda x, s: x[:, :1]), "model_fn returned shape"),
    (dict(parameterization="velocity"), "parameterization"),
]


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("bad, message", BAD)
def test_bad_input_raises_before_tracing(name, bad, message):
    args = dict(model_fn=gauss_denoiser, x_init=jnp.ones((3, 2)), sigmas=jnp.array([1.0, 0.1]))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        SAMPLERS[name](args.pop("model_fn"), args.pop("x_init"), args.pop("sigmas"), **args)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(churn=1.0), "key must be a PRNG key"),
        (dict(churn=-1.0, key=jax.random.key(0)), "churn must be a finite number >= 0"),
        (dict(s_noise=math.nan), "s_noise"),
        (dict(s_tmin=2.0, s_tmax=1.0), "s_tmax must be a number >= s_tmin"),
    ],
)
def test_heun_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        heun(gauss_denoiser, jnp.ones((3, 2)), jnp.array([1.0, 0.1]), **kwargs)


@pytest.mark.parametrize("order", [0, 3, True, 2.0])
def test_dpm_order_is_checked(order):
    with pytest.raises(ValueError, match="order must be one of"):
        dpm_solver_pp(gauss_denoiser, jnp.ones((3, 2)), jnp.array([1.0, 0.1]), order=order)


# ---------------------------------------------------------------------------
# The exact GMM denoiser: samples at the two-sample MMD floor
# ---------------------------------------------------------------------------

N_MMD = 1000


@pytest.fixture(scope="module")
def mmd_floor():
    """The two-sample floor at N_MMD (8 pairs of independent exact sample sets) and an exact set to compare with."""
    floor = metrics.mmd2_floor(GMM.sample, jax.random.key(1), N_MMD, num_pairs=8)
    return floor, GMM.sample(jax.random.key(2), N_MMD)


def _mmd_ratio(samples, mmd_floor):
    floor, test = mmd_floor
    return float(jax.jit(metrics.mmd2)(samples, test, bandwidth=floor.bandwidth)) / float(floor.floor)


def _grid_samples(sampler, num, **kwargs):
    sigmas = karras_sigmas(SIGMA_MAX, SIGMA_MIN, num)
    x_init = sigmas[0] * jax.random.normal(jax.random.key(3), (N_MMD, 2))
    run = jax.jit(lambda x: sampler(gmm_denoiser, x, sigmas, parameterization="x0", return_result=True, **kwargs))
    return run(x_init)


@pytest.mark.parametrize(
    "name, num, kwargs",
    [
        ("heun", 18, {}),  # 35 evaluations (EDM's CIFAR-10 setting)
        ("dpm_solver_pp", 20, {}),  # 20 evaluations
        ("euler", 35, {}),
        ("heun", 18, dict(churn=10.0, key=jax.random.key(4))),  # Algorithm 2
    ],
)
def test_exact_denoiser_samples_are_at_the_mmd_floor(name, num, kwargs, mmd_floor):
    out = _grid_samples(SAMPLERS[name], num, **kwargs)
    ratio = _mmd_ratio(out.samples, mmd_floor)
    print(f"{name} churn={kwargs.get('churn', 0.0)}: {int(out.nfe)} evaluations, MMD^2 / floor = {ratio:.2f}")
    assert int(out.nfe) == NFE[name](num)
    # The null statistic has mean 0 and RMS 1 floor: 3 floors is a 3-sigma band.
    assert abs(ratio) < 3.0


def test_too_few_euler_steps_are_seen_by_the_mmd(mmd_floor):
    # The check above can fail: 5 Euler levels leave the modes visibly blurred.
    assert _mmd_ratio(_grid_samples(euler, 5).samples, mmd_floor) > 20.0


def test_churn_draws_differ_by_key_and_repeat_with_it():
    sigmas = karras_sigmas(10.0, 0.01, 6)
    x_init = sigmas[0] * jax.random.normal(jax.random.key(0), (8, 2))
    run = functools.partial(heun, gauss_denoiser, x_init, sigmas, parameterization="x0")
    a, b, c = run(jax.random.key(1), churn=5.0), run(jax.random.key(1), churn=5.0), run(jax.random.key(2), churn=5.0)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # Churn outside [s_tmin, s_tmax] does nothing: Algorithm 1's samples.
    np.testing.assert_allclose(run(jax.random.key(1), churn=5.0, s_tmin=20.0), run(), atol=1e-6)


# ---------------------------------------------------------------------------
# Gaussian data: the closed-form flow and the order of convergence
# ---------------------------------------------------------------------------


def gauss_flow_sample(x_init, sigma_max, sigma_min):
    """The exact sampler output: the flow from sigma_max to sigma_min, then D at sigma_min.

    For N(m, c I) data, p_sigma = N(m, (c + sigma^2) I) and dx/dsigma = sigma (x - m) / (c + sigma^2),
    so x(sigma) - m = sqrt((c + sigma^2) / (c + sigma_max^2)) (x(sigma_max) - m).
    """
    x = MEAN + np.sqrt((VAR + sigma_min**2) / (VAR + sigma_max**2)) * (x_init - MEAN)
    return MEAN + VAR / (VAR + sigma_min**2) * (x - MEAN)


@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("dpm_solver_pp", 2)])
def test_error_falls_at_the_solver_order(name, order):
    z = jax.random.normal(jax.random.key(0), (16, 2))
    levels = np.array([16, 32, 64, 128])
    run = jax.jit(functools.partial(SAMPLERS[name], gauss_denoiser, parameterization="x0"))
    errors = []
    for num in levels:
        sigmas = karras_sigmas(SIGMA_MAX, SIGMA_MIN, int(num))
        x_init = sigmas[0] * z
        out = run(x_init, sigmas)
        errors.append(float(jnp.max(jnp.abs(out - gauss_flow_sample(x_init, SIGMA_MAX, SIGMA_MIN)))))
    slope = -np.polyfit(np.log(levels), np.log(errors), 1)[0]
    print(f"{name}: errors {np.round(errors, 6)}, fitted order {slope:.2f}")
    assert abs(slope - order) < 0.3


# ---------------------------------------------------------------------------
# VP models through the EDM change of variables
# ---------------------------------------------------------------------------


def gmm_score(x, sigma):
    """The exact VE score of the 8 Gaussians noised by sigma."""
    return jax.vmap(lambda xi, si: GMM.convolve(si).score(xi[None])[0])(x, sigma)


@pytest.mark.parametrize("sde", [VPSDE(0.1, 20.0), SubVPSDE(0.1, 20.0)], ids=["vp", "subvp"])
def test_vp_model_as_a_ve_model_is_the_exact_ve_score(sde):
    exact = exact_score_model(GMM, sde)
    sigma = jnp.asarray(np.geomspace(SIGMA_MAX, SIGMA_MIN, 64), jnp.float32)
    x = GMM.sample(jax.random.key(0), 64) + sigma[:, None] * jax.random.normal(jax.random.key(1), (64, 2))
    eps_model = lambda x, s: -s[:, None] * exact(x, s)  # the eps model of the same law
    score_ve = ve_model_from_vp(exact, sde)
    eps_ve = ve_model_from_vp(eps_model, sde, parameterization="eps")
    expected, *got = jax.jit(lambda x, s: (gmm_score(x, s), score_ve(x, s), eps_ve(x, s)))(x, sigma)
    for g in got:
        # sigma * score is O(1) at every level; float32 rounding leaves ~2e-6.
        np.testing.assert_allclose(sigma[:, None] * g, sigma[:, None] * expected, atol=1e-5)


def test_heun_samples_a_vp_model_like_the_ve_formulation():
    sigmas = karras_sigmas(SIGMA_MAX, SIGMA_MIN, 18)
    x_init = sigmas[0] * jax.random.normal(jax.random.key(3), (256, 2))
    vp_model = ve_model_from_vp(exact_score_model(GMM, VPSDE(0.1, 20.0)), VPSDE(0.1, 20.0))
    vp, ve = jax.jit(lambda x: (heun(vp_model, x, sigmas), heun(gmm_score, x, sigmas)))(x_init)
    np.testing.assert_allclose(vp, ve, atol=5e-5)  # measured 4e-6


# ---------------------------------------------------------------------------
# Parity with a peer implementation (diffusers' schedulers; optional, the bench extra)
# ---------------------------------------------------------------------------


def _diffusers_trajectory(name, x_init, sigmas):
    """The same exact denoiser through a NumPy bridge in diffusers' scheduler of the same method.

    Each scheduler gets exactly our grid (its ``sigmas`` set to ``[sigmas, 0]``, Heun's with
    the inner levels doubled as its ``set_timesteps`` builds them) and ``prediction_type="sample"``,
    so the model output is the denoiser. DPM-Solver multistep works on ``x_vp = x / sqrt(1 + sigma^2)``
    (its alpha_t, sigma_t from the VE sigma): its states are mapped back to compare.
    """
    torch = pytest.importorskip("torch")
    schedulers = pytest.importorskip("diffusers.schedulers")
    den = jax.jit(gmm_denoiser)
    grid = torch.from_numpy(np.concatenate([np.asarray(sigmas), [0.0]]).astype(np.float32))
    num = len(sigmas)

    def denoise(x, sigma):
        x = np.asarray(x, np.float32)
        return torch.from_numpy(np.asarray(den(jnp.asarray(x), jnp.full((x.shape[0],), sigma, jnp.float32))))

    x = torch.from_numpy(np.asarray(x_init))
    traj = [np.asarray(x_init)]
    if name == "euler":
        sch = schedulers.EulerDiscreteScheduler(prediction_type="sample")
        sch.set_timesteps(num)
        sch.sigmas = grid.clone()
        sch.is_scale_input_called = True  # the bridge feeds the unscaled state to the denoiser
    elif name == "heun":
        sch = schedulers.HeunDiscreteScheduler(prediction_type="sample")
        sch.set_timesteps(num)
        sch.sigmas = torch.cat([grid[:1], grid[1:-1].repeat_interleave(2), grid[-1:]])
    else:
        sch = schedulers.DPMSolverMultistepScheduler(
            prediction_type="sample", algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"
        )
        sch.set_timesteps(num)
        sch.sigmas = grid.clone()
        x = x / float(np.sqrt(1.0 + float(grid[0]) ** 2))
    sch.set_begin_index(0)
    for k, t in enumerate(sch.timesteps):
        sigma = float(sch.sigmas[k])
        if name == "dpm_solver_pp":
            to_ve = lambda v, s: v.numpy() * np.sqrt(1.0 + s**2)
            x = sch.step(denoise(to_ve(x, sigma), sigma), t, x).prev_sample
            traj.append(to_ve(x, float(grid[k + 1])))
        elif name == "heun":
            first = sch.state_in_first_order
            x = sch.step(denoise(x, sigma), t, x).prev_sample
            if not first or k == len(sch.timesteps) - 1:  # a completed step (or the last, Euler, one)
                traj.append(x.numpy())
        else:
            x = sch.step(denoise(x, sigma), t, x).prev_sample
            traj.append(x.numpy())
    return np.stack(traj)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_trajectories_match_diffusers(name):
    sigmas = karras_sigmas(SIGMA_MAX, SIGMA_MIN, 10)
    x_init = sigmas[0] * jax.random.normal(jax.random.key(0), (64, 2))
    reference = _diffusers_trajectory(name, x_init, sigmas)
    _, ours = SAMPLERS[name](gmm_denoiser, x_init, sigmas, parameterization="x0", return_trajectory=True)
    assert ours is not None and ours.shape == reference.shape == (11, 64, 2)
    difference = np.max(np.abs(np.asarray(ours) - reference), axis=(1, 2))
    print(f"{name}: max |ours - diffusers| per level {np.array2string(difference, precision=2)}")
    # float32 rounding: 16 ulps of each level's largest state (from ~100 at sigma = 80 to ~2.5 at the end).
    ulps = np.finfo(np.float32).eps * np.max(np.abs(reference), axis=(1, 2))
    assert np.all(difference <= 16 * ulps), difference / ulps
