"""Samplers with exact scores: moments, mode weights, MMD to fresh data, structure.

Statistical checks use fixed keys and tolerances derived from the sample size
(k standard errors, stated at each assertion).
"""

import functools

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify, io_callback

from dsm_jax import debug_checks
from dsm_jax import samplers as S
from dsm_jax.distributions import Gaussian, GaussianMixture
from dsm_jax.noise import geometric_sigmas
from dsm_jax.sde import VESDE, VPSDE, exact_score_model

# ---------------------------------------------------------------------------
# A small unbiased MMD^2 (sum of Gaussian kernels), local to these tests.
# ---------------------------------------------------------------------------

BANDWIDTHS = (0.25, 0.5, 1.0, 2.0)


@jax.jit
def mmd2_unbiased(x, y):
    """Unbiased MMD^2 (Gretton et al. 2012, Eq. 3) with a sum of Gaussian kernels."""

    def gram(a, b):
        d2 = jnp.sum(a**2, 1)[:, None] + jnp.sum(b**2, 1)[None, :] - 2.0 * a @ b.T
        return sum(jnp.exp(-jnp.maximum(d2, 0.0) / (2.0 * h * h)) for h in BANDWIDTHS)

    n, m = x.shape[0], y.shape[0]
    kxx, kyy = gram(x, x), gram(y, y)
    within_x = (jnp.sum(kxx) - jnp.trace(kxx)) / (n * (n - 1))
    within_y = (jnp.sum(kyy) - jnp.trace(kyy)) / (m * (m - 1))
    return within_x + within_y - 2.0 * jnp.mean(gram(x, y))


MIX = GaussianMixture(
    jnp.array([0.5, 0.3, 0.2]),
    jnp.array([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]),
    jnp.array([[0.3, 0.1], [0.1, 0.4], [0.2, 0.2]]),
)
N_MMD = 4000
FLOOR_PAIRS = 6
# An unbiased MMD^2 between two samples of the same law has mean 0; its spread
# (the "two-sample floor") is estimated by the RMS over independent fresh pairs.
# A sampler passes if its MMD^2 to fresh data is below FACTOR floors: a null
# value exceeds 4 RMS rarely, and test_mmd_floor_has_power checks that data
# from a visibly wrong law does exceed it.
FACTOR = 4.0


@pytest.fixture(scope="module")
def mmd_reference():
    keys = jax.random.split(jax.random.key(2024), 2 * FLOOR_PAIRS + 1)
    sample = jax.jit(lambda k: MIX.sample(k, N_MMD))
    null = [float(mmd2_unbiased(sample(keys[2 * i]), sample(keys[2 * i + 1]))) for i in range(FLOOR_PAIRS)]
    floor = float(np.sqrt(np.mean(np.square(null))))
    return sample(keys[-1]), floor


def test_mmd_floor_has_power(mmd_reference):
    """Data with weights (0.4, 0.4, 0.2) instead of (0.5, 0.3, 0.2), or covariances
    1.3 times too large, is well above FACTOR floors: the MMD test can fail."""
    fresh, floor = mmd_reference
    wrong_weights = GaussianMixture(jnp.array([0.4, 0.4, 0.2]), MIX.means, MIX.covs)
    wrong_covs = GaussianMixture(MIX.weights, MIX.means, 1.3 * MIX.covs)
    for wrong in (wrong_weights, wrong_covs):
        x = jax.jit(lambda k, law=wrong: law.sample(k, N_MMD))(jax.random.key(5))
        assert float(mmd2_unbiased(x, fresh)) > FACTOR * floor


SDES = {"ve": VESDE(0.01, 20.0), "vp": VPSDE(0.1, 20.0)}


def _eps_model(score_model):
    return lambda x, sigma: -sigma[:, None] * score_model(x, sigma)


SAMPLERS = {
    "em": lambda m, sde, x, k: S.euler_maruyama(m, sde, x, k, num_steps=200),
    "pc": lambda m, sde, x, k: S.predictor_corrector(m, sde, x, k, num_steps=100, corrector_steps=1, snr=0.1),
    "ode": lambda m, sde, x, k: S.probability_flow_ode(m, sde, x),
    "ode_fixed": lambda m, sde, x, k: S.probability_flow_ode(m, sde, x, num_steps=25),
    "ddpm_eps": lambda m, sde, x, k: S.ddpm(_eps_model(m), sde, x, k, num_steps=100),
    "ddim_eps": lambda m, sde, x, k: S.ddim(_eps_model(m), sde, x, num_steps=50),
}
CASES = [(s, v) for v in ("ve", "vp") for s in ("em", "pc", "ode")] + [
    ("ode_fixed", "vp"),
    ("ddpm_eps", "vp"),
    ("ddim_eps", "vp"),
]


@pytest.mark.parametrize("sampler, sde_name", CASES)
def test_sde_samplers_match_the_data(sampler, sde_name, mmd_reference):
    """Exact score of the mixture's noised marginals, start from the SDE's prior:
    the samples' MMD^2 to fresh data is within FACTOR two-sample floors."""
    fresh, floor = mmd_reference
    sde = SDES[sde_name]
    model = exact_score_model(MIX, sde)
    x_init = sde.prior_sample(jax.random.key(11), (N_MMD, 2))
    out = jax.jit(functools.partial(SAMPLERS[sampler], model, sde))(x_init, jax.random.key(12))
    assert out.samples.shape == (N_MMD, 2) and out.trajectory is None
    ratio = float(mmd2_unbiased(out.samples, fresh)) / floor
    assert ratio < FACTOR, f"{sampler}/{sde_name}: MMD^2 = {ratio:.2f} floors (nfe {int(out.nfe)})"


# ---------------------------------------------------------------------------
# Langevin dynamics
# ---------------------------------------------------------------------------


def test_langevin_reproduces_a_gaussian():
    """ULA on N(m, C) with step h has the Gaussian stationary law N(m, S),
    S = (P (I - h P / 2))^{-1}, P = C^{-1} (an O(h) bias, exact here). 4000 chains
    of 1000 steps (14 relaxation times 1/(h lambda_min(P))). Mean within 4 SE
    (sqrt(S_ii / n)); covariance entries within 4 SE (sqrt((S_ii S_jj + S_ij^2) / n))."""
    mean, cov = np.array([1.0, -0.5]), np.array([[1.0, 0.5], [0.5, 0.8]])
    g, h, n = Gaussian(mean, cov), 0.02, 4000
    x = jax.jit(lambda x0, k: S.langevin(g.score, x0, k, step_size=h, num_steps=1000))(
        jnp.zeros((n, 2)), jax.random.key(0)
    )
    x = np.asarray(x, dtype=np.float64)
    prec = np.linalg.inv(cov)
    s = np.linalg.inv(prec @ (np.eye(2) - 0.5 * h * prec))
    assert np.max(np.abs(s - cov)) < 0.02  # the step's bias is small against the covariance
    se_mean = np.sqrt(np.diag(s) / n)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 4 * se_mean)
    se_cov = np.sqrt((np.outer(np.diag(s), np.diag(s)) + s**2) / n)
    np.testing.assert_array_less(np.abs(np.cov(x.T) - s), 4 * se_cov)


UNEQUAL = GaussianMixture(jnp.array([0.2, 0.8]), jnp.array([[-5.0, -5.0], [5.0, 5.0]]), jnp.ones((2, 2)))


def test_annealed_langevin_recovers_weights_plain_langevin_does_not():
    """Song & Ermon 2019, Fig. 3: for 0.2 N((-5,-5), I) + 0.8 N((5,5), I) and
    uniform starts on [-8, 8]^2, plain Langevin with the exact score keeps the
    initial 50/50 split (its chains never cross the low-density gap: the score
    does not see the weights far from the boundary), while annealed Langevin with
    the exact noised scores recovers 0.2 / 0.8. n = 1000: binomial SE of a weight
    sqrt(w (1 - w) / n) = 0.0126; 4 SE allowed. Per-component means within
    4 SE (sqrt(1 / n_k))."""
    n = 1000
    x0 = jax.random.uniform(jax.random.key(0), (n, 2), minval=-8.0, maxval=8.0)
    model = exact_score_model(UNEQUAL, VESDE(0.01, 20.0))
    sigmas = geometric_sigmas(20.0, 0.1, 10)

    @jax.jit
    def run(x0, key):
        k1, k2 = jax.random.split(key)
        ld = S.langevin(UNEQUAL.score, x0, k1, step_size=0.1, num_steps=1000)
        ald = S.annealed_langevin(model, x0, k2, sigmas, steps_per_sigma=100, step_lr=0.002)
        return ld, ald, UNEQUAL.responsibilities(ld)[:, 1] > 0.5, UNEQUAL.responsibilities(ald)[:, 1] > 0.5

    ld, ald, ld_right, ald_right = (np.asarray(a) for a in run(x0, jax.random.key(1)))
    se_w = np.sqrt(0.8 * 0.2 / n)
    # Annealed Langevin: the weights and the component means.
    assert abs(ald_right.mean() - 0.8) < 4 * se_w, ald_right.mean()
    for right, centre in ((ald_right, 5.0), (~ald_right, -5.0)):
        np.testing.assert_array_less(np.abs(ald[right].mean(0) - centre), 4 / np.sqrt(right.sum()))
    # Plain Langevin: the split stays at the uniform start's 1/2, far from 0.8.
    assert abs(ld_right.mean() - 0.5) < 4 * np.sqrt(0.25 / n), ld_right.mean()
    assert ld_right.mean() < 0.8 - 10 * se_w


# ---------------------------------------------------------------------------
# Structure: scan, trajectories, NFE
# ---------------------------------------------------------------------------


def _count_eqns(jaxpr):
    """Equations of a jaxpr including every sub-jaxpr (scan bodies, conds)."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += _count_eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += _count_eqns(sub)
    return total


def _linear_model(x, sigma):
    return -x / (1.0 + sigma[:, None] ** 2)


JAXPR_CASES = {
    "langevin": lambda n: lambda x, k: S.langevin(lambda z: -z, x, k, step_size=0.1, num_steps=n),
    "langevin_traj": lambda n: (
        lambda x, k: S.langevin(
            lambda z: -z, x, k, step_size=0.1, num_steps=n, return_trajectory=True, trajectory_every=7
        )[0]
    ),
    "annealed": lambda n: (
        lambda x, k: S.annealed_langevin(
            _linear_model, x, k, jnp.geomspace(10.0, 0.01, n), steps_per_sigma=n, step_lr=1e-3
        )
    ),
    "em": lambda n: lambda x, k: S.euler_maruyama(_linear_model, VESDE(), x, k, num_steps=n).samples,
    "pc": lambda n: lambda x, k: S.predictor_corrector(_linear_model, VPSDE(), x, k, num_steps=n).samples,
    "ddpm": lambda n: lambda x, k: S.ddpm(_linear_model, VPSDE(), x, k, num_steps=n).samples,
    "ddim": lambda n: lambda x, k: S.ddim(_linear_model, VPSDE(), x, k, num_steps=n).samples,
}


@pytest.mark.parametrize("name", list(JAXPR_CASES))
def test_compiled_size_does_not_grow_with_steps(name):
    x, key = jnp.zeros((3, 2)), jax.random.key(0)
    sizes = []
    for n in (10, 1000):
        jaxpr = jax.make_jaxpr(JAXPR_CASES[name](n))(x, key)
        assert any(e.primitive.name == "scan" for e in jaxpr.jaxpr.eqns)
        sizes.append(_count_eqns(jaxpr.jaxpr))
    assert sizes[0] == sizes[1], sizes


def test_trajectory_is_a_thinning_of_the_full_path():
    x0, key = jnp.ones((5, 2)), jax.random.key(3)
    run = lambda every: S.langevin(
        lambda z: -z, x0, key, step_size=0.1, num_steps=10, return_trajectory=True, trajectory_every=every
    )
    x_full, full = run(1)
    x_thin, thin = run(3)
    assert full.shape == (11, 5, 2) and thin.shape == (5, 5, 2)  # start, steps 3, 6, 9, end
    np.testing.assert_allclose(thin, full[np.array([0, 3, 6, 9, 10])], rtol=1e-6)
    np.testing.assert_allclose(x_thin, x_full, rtol=1e-6)
    np.testing.assert_allclose(full[-1], x_full, rtol=1e-6)
    # SDE sampler: same thinning; without the Tweedie step the last snapshot is the sample.
    em = lambda every: S.euler_maruyama(
        _linear_model,
        VESDE(),
        x0,
        key,
        num_steps=10,
        final_denoise=False,
        return_trajectory=True,
        trajectory_every=every,
    )
    full, thin = em(1), em(4)
    assert thin.trajectory.shape == (4, 5, 2)  # start, steps 4, 8, end
    np.testing.assert_allclose(thin.trajectory, full.trajectory[np.array([0, 4, 8, 10])], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(full.trajectory[-1], full.samples, rtol=1e-6)
    # Annealed Langevin: by default one snapshot per level, after the start.
    x, traj = S.annealed_langevin(
        _linear_model,
        x0,
        key,
        jnp.array([3.0, 1.0, 0.3]),
        steps_per_sigma=4,
        step_lr=0.01,
        final_denoise=False,
        return_trajectory=True,
    )
    assert traj.shape == (4, 5, 2)
    np.testing.assert_allclose(traj[-1], x, rtol=1e-6)
    # The ODE saves num_snapshots states from T to t_min.
    out = S.probability_flow_ode(_linear_model, VPSDE(), x0, return_trajectory=True, num_snapshots=5)
    assert out.trajectory.shape == (5, 5, 2)


def _counting_model():
    """A linear model that counts its executions through a host callback."""
    calls = [0]

    def bump(_):
        calls[0] += 1
        return np.zeros((), np.float32)

    def model(x, sigma):
        return _linear_model(x, sigma) + io_callback(bump, jax.ShapeDtypeStruct((), jnp.float32), x, ordered=True)

    return model, calls


@pytest.mark.parametrize(
    "run",
    [
        lambda m, x, k: S.euler_maruyama(m, VESDE(), x, k, num_steps=13),
        lambda m, x, k: S.predictor_corrector(m, VESDE(), x, k, num_steps=7, corrector_steps=2),
        lambda m, x, k: S.ddim(m, VPSDE(), x, num_steps=9, final_denoise=False, parameterization="score"),
        lambda m, x, k: S.probability_flow_ode(m, VPSDE(), x),
        lambda m, x, k: S.probability_flow_ode(m, VESDE(), x, num_steps=12),
        lambda m, x, k: S.probability_flow_ode(
            m, VPSDE(), x, solver=diffrax.Heun(), stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3)
        ),
        lambda m, x, k: S.langevin(
            lambda z: m(z, jnp.ones(z.shape[0])), x, k, step_size=0.1, num_steps=6, return_result=True
        ),
        lambda m, x, k: S.annealed_langevin(m, x, k, _SIG, steps_per_sigma=4, step_lr=0.01, return_result=True),
        lambda m, x, k: S.annealed_langevin(
            m,
            x,
            k,
            _SIG,
            steps_per_sigma=3,
            step_lr=0.01,
            final_denoise=False,
            return_trajectory=True,
            return_result=True,
        ),
        lambda m, x, k: S.inpaint_annealed_langevin(
            m, x, jnp.array([1.0, 0.0]), k, _SIG, steps_per_sigma=2, step_lr=0.01, return_result=True
        ),
    ],
    ids=[
        "em",
        "pc",
        "ddim",
        "ode_adaptive",
        "ode_fixed",
        "ode_heun_pid",
        "langevin",
        "annealed",
        "annealed_traj",
        "inpaint_annealed",
    ],
)
def test_nfe_counts_model_evaluations(run):
    """Every sampler reports its model evaluations one way, SampleResult.nfe (the Langevin ones with
    return_result=True), equal to the executions counted by a host callback."""
    model, calls = _counting_model()
    out = jax.jit(lambda x, k: run(model, x, k))(jnp.ones((4, 2)), jax.random.key(0))
    jax.block_until_ready(out.samples)
    assert isinstance(out, S.SampleResult)
    assert int(out.nfe) == calls[0] > 0


def test_return_result_keeps_the_langevin_samples_and_trajectory():
    """return_result=True returns the same samples (and trajectory) as the NCSN contract's array / tuple."""
    x0, key = jnp.ones((5, 2)), jax.random.key(3)
    walk = lambda **kw: S.langevin(lambda z: -z, x0, key, step_size=0.1, num_steps=10, **kw)
    x, traj = walk(return_trajectory=True, trajectory_every=4)
    out = walk(return_trajectory=True, trajectory_every=4, return_result=True)
    np.testing.assert_array_equal(out.samples, x)
    np.testing.assert_array_equal(out.trajectory, traj)
    assert walk(return_result=True).trajectory is None and int(walk(return_result=True).nfe) == 10
    anneal = lambda **kw: S.annealed_langevin(_linear_model, x0, key, _SIG, steps_per_sigma=4, step_lr=0.01, **kw)
    out = anneal(return_result=True)
    np.testing.assert_array_equal(out.samples, anneal())
    assert out.trajectory is None and int(out.nfe) == 3 * 4 + 1
    mask = jnp.array([1.0, 0.0])
    inpaint = lambda **kw: S.inpaint_annealed_langevin(
        _linear_model, x0, mask, key, _SIG, steps_per_sigma=2, step_lr=0.01, final_denoise=False, **kw
    )
    out = inpaint(return_result=True)
    np.testing.assert_array_equal(out.samples, inpaint())
    np.testing.assert_array_equal(out.samples[:, 0], x0[:, 0])  # the known entries are the observation
    assert int(out.nfe) == 3 * 2


def test_probability_flow_ode_takes_solver_and_controller_objects():
    """num_steps=N is ConstantStepSize with N steps; rtol/atol are a PIDController; any diffrax
    solver and controller are passed as objects and give the same answer as the keywords."""
    sde, x = VPSDE(), jax.random.normal(jax.random.key(0), (6, 2))
    run = lambda **kw: S.probability_flow_ode(_linear_model, sde, x, **kw)
    fixed, fixed_obj = run(num_steps=12), run(num_steps=12, stepsize_controller=diffrax.ConstantStepSize())
    np.testing.assert_array_equal(fixed.samples, fixed_obj.samples)
    assert int(fixed.nfe) == int(fixed_obj.nfe) == 6 * 12 + 1 + 1  # Tsit5 (FSAL) steps, then Tweedie
    tol, tol_obj = run(rtol=1e-3, atol=1e-4), run(stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-4))
    np.testing.assert_array_equal(tol.samples, tol_obj.samples)
    heun = run(num_steps=40, solver=diffrax.Heun())
    assert int(heun.nfe) == 2 * 40 + 1
    # Heun with 40 steps is within its O(dt^2) error (0.3% here) of the adaptive Tsit5 solve.
    np.testing.assert_allclose(heun.samples, run().samples, rtol=1e-2)


# ---------------------------------------------------------------------------
# Inverse problems
# ---------------------------------------------------------------------------

_C = 0.5 * np.array([[1.0, 0.6], [0.6, 1.0]])
TWO = GaussianMixture(jnp.array([0.4, 0.6]), jnp.array([[-3.0, -3.0], [3.0, 3.0]]), jnp.array([_C, _C]))


def _check_normal_moments(x, mean, var, what):
    """Sample mean within 4 SE (sqrt(var / n)); sample variance within 4 SE,
    SE = sqrt((m4 - s^4) / n) from the sample's own fourth moment."""
    n = x.size
    c = x - x.mean()
    se_var = np.sqrt((np.mean(c**4) - np.mean(c**2) ** 2) / n)
    assert abs(x.mean() - mean) < 4 * np.sqrt(var / n), (what, x.mean(), mean)
    assert abs(x.var() - var) < 4 * se_var, (what, x.var(), var)


def test_inpainting():
    """Observe x1 = 2.5 of the two-mode mixture: the observation identifies the
    mode, so x2 | x1 is N(3 + 0.6 (2.5 - 3), 0.5 (1 - 0.36)) = N(2.7, 0.32).
    Replacement-based inpainting (PC with one corrector step, VE) and annealed
    Langevin inpainting both reproduce its mean and variance (4 SE, n = 2000),
    and keep the known coordinate exactly."""
    n, y1 = 2000, 2.5
    y = jnp.tile(jnp.array([[y1, 0.0]]), (n, 1))
    mask = jnp.array([1.0, 0.0])
    model = exact_score_model(TWO, VESDE(0.01, 20.0))

    @jax.jit
    def run(y, key):
        k1, k2 = jax.random.split(key)
        pc = S.inpaint(model, VESDE(0.01, 20.0), y, mask, k1, num_steps=200, corrector_steps=1)
        ald = S.inpaint_annealed_langevin(
            model, y, mask, k2, geometric_sigmas(20.0, 0.05, 10), steps_per_sigma=100, step_lr=0.001
        )
        return pc, ald

    pc, ald = run(y, jax.random.key(0))
    for name, x in (("pc", pc.samples), ("ald", ald)):
        x = np.asarray(x)
        assert np.all(x[:, 0] == y1), name
        _check_normal_moments(x[:, 1], 2.7, 0.32, name)


@pytest.mark.parametrize("sde_name", ["ve", "vp"])
def test_denoise_observation_samples_the_posterior(sde_name):
    """y = x + 1.0 * eps for the 3-component mixture: 2000 posterior draws for one
    y have the exact posterior mean (4 SE from the exact posterior variances) and
    per-coordinate variances (4 SE from the samples' fourth moments)."""
    sde, n, sigma_y = SDES[sde_name], 2000, 1.0
    y0 = jnp.array([[1.0, 0.5]])
    model = exact_score_model(MIX, sde)
    out = jax.jit(lambda y, k: S.denoise_observation(model, sde, y, sigma_y, k, num_steps=300))(
        jnp.tile(y0, (n, 1)), jax.random.key(0)
    )
    assert int(out.nfe) == 301
    mean = np.asarray(MIX.posterior_mean(y0, sigma_y))[0]
    cov = np.asarray(MIX.posterior_covariance(y0, sigma_y))[0]
    x = np.asarray(out.samples)
    for i in range(2):
        _check_normal_moments(x[:, i], mean[i], cov[i, i], f"coordinate {i}")


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

_X = jnp.zeros((4, 2))
_K = jax.random.key(0)
_SIG = jnp.array([1.0, 0.5, 0.1])
_bad_shape_model = lambda x, sigma: x[:, :1]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: S.annealed_langevin(_linear_model, _X, _K, _SIG[::-1], steps_per_sigma=2, step_lr=0.1), "decreasing"),
        (lambda: S.annealed_langevin(_linear_model, _X, _K, _SIG, steps_per_sigma=0, step_lr=0.1), "steps_per_sigma"),
        (lambda: S.annealed_langevin(_linear_model, _X, _K, _SIG, steps_per_sigma=2, step_lr=0.0), "step_lr"),
        (lambda: S.annealed_langevin(_bad_shape_model, _X, _K, _SIG, steps_per_sigma=2, step_lr=0.1), "model_fn"),
        (lambda: S.annealed_langevin(_linear_model, _X[0], _K, _SIG, steps_per_sigma=2, step_lr=0.1), "x0"),
        (lambda: S.langevin(lambda z: -z, _X, _K, step_size=0.0, num_steps=3), "step_size"),
        (lambda: S.langevin(lambda z: -z, _X, _K, step_size=-1.0, num_steps=3), "step_size"),
        (lambda: S.langevin(lambda z: -z, _X, _K, step_size=0.1, num_steps=0), "num_steps"),
        (lambda: S.langevin(lambda z: z[:, :1], _X, _K, step_size=0.1, num_steps=3), "score_fn"),
        (
            lambda: S.langevin(
                lambda z: -z, _X, _K, step_size=0.1, num_steps=3, return_trajectory=True, trajectory_every=0
            ),
            "trajectory_every",
        ),
        (lambda: S.euler_maruyama(_linear_model, VESDE(), _X, _K, num_steps=0), "num_steps"),
        (lambda: S.euler_maruyama(_bad_shape_model, VESDE(), _X, _K, num_steps=5), "model_fn"),
        (lambda: S.euler_maruyama(_linear_model, "ve", _X, _K, num_steps=5), "sde"),
        (lambda: S.euler_maruyama(_linear_model, VESDE(), _X, _K, num_steps=5, t_min=2.0), "t_min"),
        (lambda: S.predictor_corrector(_linear_model, VESDE(), _X, _K, num_steps=5, snr=0.0), "snr"),
        (
            lambda: S.predictor_corrector(_linear_model, VESDE(), _X, _K, num_steps=5, corrector_steps=-1),
            "corrector_steps",
        ),
        (lambda: S.probability_flow_ode(_linear_model, VESDE(), _X, rtol=-1.0), "rtol"),
        (lambda: S.probability_flow_ode(_linear_model, VESDE(), _X, solver="tsit5"), "solver"),
        (
            lambda: S.probability_flow_ode(_linear_model, VESDE(), _X, stepsize_controller=diffrax.ConstantStepSize()),
            "num_steps",
        ),
        (
            lambda: S.probability_flow_ode(
                _linear_model, VESDE(), _X, rtol=1e-3, stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3)
            ),
            "rtol",
        ),
        (lambda: S.probability_flow_ode(_bad_shape_model, VESDE(), _X), "model_fn"),
        (lambda: S.ddpm(_linear_model, VPSDE(), _X, _K, num_steps=5, variance="large"), "variance"),
        (lambda: S.ddim(_linear_model, VPSDE(), _X, None, num_steps=5, eta=0.5), "key"),
        (lambda: S.ddim(_linear_model, VPSDE(), _X, _K, num_steps=5, eta=2.0), "eta"),
        (lambda: S.inpaint(_linear_model, VESDE(), _X, jnp.array([0.5, 1.0]), _K, num_steps=5), "mask"),
        (lambda: S.inpaint(_linear_model, VESDE(), _X, jnp.ones(3), _K, num_steps=5), "mask"),
        (lambda: S.denoise_observation(_linear_model, VESDE(0.01, 20.0), _X, 50.0, _K, num_steps=5), "sigma_y"),
        (lambda: S.denoise_observation(_linear_model, VESDE(0.01, 20.0), _X, 0.0, _K, num_steps=5), "sigma_y"),
        # Keys: an int (or any non-key) is named with the fix.
        (
            lambda: S.langevin(lambda z: -z, _X, 0, step_size=0.1, num_steps=3),
            r"key must be a PRNG key: pass jax.random.key\(seed\), got 0 \(int\)",
        ),
        (
            lambda: S.annealed_langevin(_linear_model, _X, 3, _SIG, steps_per_sigma=2, step_lr=0.1),
            "key must be a PRNG key",
        ),
        (lambda: S.euler_maruyama(_linear_model, VESDE(), _X, 1, num_steps=5), "key must be a PRNG key"),
        (lambda: S.predictor_corrector(_linear_model, VESDE(), _X, jnp.ones(3), num_steps=5), "key must be a PRNG key"),
        (lambda: S.ddim(_linear_model, VPSDE(), _X, 5, num_steps=5, eta=0.5), "key must be a PRNG key"),
        (
            lambda: S.inpaint_annealed_langevin(
                _linear_model, _X, jnp.ones(2), 0, _SIG, steps_per_sigma=2, step_lr=0.1
            ),
            "key must be a PRNG key",
        ),
        # Integer states.
        (
            lambda: S.langevin(lambda z: -z, _X.astype(jnp.int32), _K, step_size=0.1, num_steps=3),
            "x0 must be floating point, got dtype int32",
        ),
        (
            lambda: S.annealed_langevin(_linear_model, _X.astype(jnp.int32), _K, _SIG, steps_per_sigma=2, step_lr=0.1),
            "x0 must be floating point",
        ),
        (
            lambda: S.euler_maruyama(_linear_model, VESDE(), _X.astype(jnp.int32), _K, num_steps=5),
            "x_init must be floating point",
        ),
        (
            lambda: S.inpaint(_linear_model, VESDE(), _X.astype(jnp.int32), jnp.ones(2), _K, num_steps=5),
            "y must be floating point",
        ),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_parameterizations_give_the_same_samples():
    """The same exact model as score, eps, x0 and energy: identical EM samples on
    the VP SDE (the conversions use scale(t) and sigma(t) correctly)."""
    sde = SDES["vp"]
    score = exact_score_model(MIX, sde)
    models = {
        "score": score,
        "eps": _eps_model(score),
        "x0": lambda x, s: (x + s[:, None] ** 2 * score(x, s)) / sde.scale_for_sigma(s)[:, None],
        "energy": lambda x, s: (
            -jax.vmap(lambda xi, si: MIX.convolve(si, scale=sde.scale_for_sigma(si)).log_prob(xi[None])[0])(x, s)
        ),
    }
    x_init = sde.prior_sample(jax.random.key(0), (64, 2))
    out = jax.jit(
        lambda x, k: {
            p: S.euler_maruyama(m, sde, x, k, num_steps=50, parameterization=p).samples for p, m in models.items()
        }
    )(x_init, jax.random.key(1))
    for p in ("eps", "x0", "energy"):
        np.testing.assert_allclose(out[p], out["score"], rtol=1e-3, atol=1e-3, err_msg=p)


def test_annealed_langevin_noise_drawn_up_front_or_per_step_is_the_same(monkeypatch):
    """A level's noise drawn before its steps (small problems) uses the same keys as drawing it step by step."""
    import importlib

    # The module, not the function dsm_jax.samplers.langevin that the package re-exports.
    langevin_module = importlib.import_module("dsm_jax.samplers.langevin")

    score = lambda x, sigma: -x / (1.0 + sigma[:, None] ** 2)
    x0 = jax.random.normal(jax.random.key(0), (16, 3)) * 3.0
    sigmas = jnp.array([3.0, 1.0, 0.3])
    run = lambda: S.annealed_langevin(
        score,
        x0,
        jax.random.key(1),
        sigmas,
        steps_per_sigma=7,
        step_lr=0.05,
        return_trajectory=True,
        trajectory_every=3,
    )
    up_front = run()
    monkeypatch.setattr(langevin_module, "PREDRAW_ELEMENTS", 0)
    per_step = run()
    np.testing.assert_allclose(up_front[0], per_step[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(up_front[1], per_step[1], rtol=1e-5, atol=1e-5)


def test_runtime_checks_catch_traced_levels_and_steps():
    """Off by default; with debug_checks() a zero level or step traced under jit is reported."""
    anneal = lambda sigmas, lr: S.annealed_langevin(_linear_model, _X, _K, sigmas, steps_per_sigma=2, step_lr=lr)
    walk = lambda h, x0: S.langevin(lambda z: -z, x0, _K, step_size=h, num_steps=3)
    assert jax.jit(anneal)(jnp.array([1.0, 0.0]), 0.1).shape == _X.shape  # no check: a silent non-finite result
    with debug_checks():
        run, step = jax.jit(checkify.checkify(anneal)), jax.jit(checkify.checkify(walk))
        assert "sigmas must be finite and > 0 (traced value), got min 0.0" in run(jnp.array([1.0, 0.0]), 0.1)[0].get()
        assert "step_lr must be finite and > 0" in run(_SIG[:2], -1.0)[0].get()
        assert run(_SIG[:2], 0.1)[0].get() is None
        assert "step_size must be finite and > 0" in step(0.0, _X)[0].get()
        assert "x0 must be finite, got 1 non-finite entries" in step(0.1, _X.at[1, 1].set(jnp.inf))[0].get()


def test_corrector_with_a_vanishing_score_leaves_x_unchanged():
    """A zero score (an untrained zero-output network) gives a zero corrector step, not inf * 0 = NaN."""
    sde = VESDE(sigma_min=0.01, sigma_max=5.0)
    zero = lambda x, sigma: jnp.zeros_like(x)  # noqa: E731
    x = jax.random.normal(jax.random.key(3), (8, 2)) * 5.0
    out = S.langevin_corrector(lambda y, t: zero(y, t), sde, x, 0.5, jax.random.key(4), snr=0.16)
    np.testing.assert_array_equal(out, x)
    result = S.predictor_corrector(zero, sde, x, jax.random.key(5), num_steps=5, snr=0.16, final_denoise=False)
    assert np.isfinite(np.asarray(result.samples)).all()
