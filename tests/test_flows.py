"""Flow matching against closed forms: paths, exact conversions, the loss at the exact field, OT couplings, reflow."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsm_jax import flows
from dsm_jax.distributions import GaussianMixture
from dsm_jax.flows import LinearPath, SDEPath, VPPath
from dsm_jax.losses import flow_matching_loss
from dsm_jax.metrics import mmd2, mmd2_floor
from dsm_jax.sde import VESDE, VPSDE, exact_score_model

MIX = GaussianMixture(
    jnp.array([0.5, 0.3, 0.2]),
    jnp.array([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]),
    jnp.array([[0.3, 0.1], [0.1, 0.4], [0.2, 0.2]]),
)
PATHS = {
    "linear": LinearPath(),
    "linear_smin": LinearPath(0.05),
    "vp": VPPath(),
    "ve": SDEPath(VESDE(0.01, 20.0)),
}


# ---------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------


def test_linear_path_closed_form():
    t = jnp.array([0.0, 0.3, 1.0])
    alpha, sigma, d_alpha, d_sigma = LinearPath(0.1).coefficients_and_derivatives(t)
    np.testing.assert_allclose(alpha, t)
    np.testing.assert_allclose(sigma, 1.0 - 0.9 * t, rtol=1e-6)
    np.testing.assert_allclose(d_alpha, 1.0)
    np.testing.assert_allclose(d_sigma, -0.9, rtol=1e-6)


def test_vp_path_closed_form():
    """alpha = exp(-B(s)/2) with s = 1 - t (1 - t_min), so alpha' = alpha beta(s) (1 - t_min) / 2; alpha^2 + sigma^2 = 1."""
    path, sde = VPPath(0.1, 20.0), VPSDE(0.1, 20.0)
    t = jnp.array([0.0, 0.25, 0.5, 0.9, 1.0])
    alpha, sigma, d_alpha, d_sigma = path.coefficients_and_derivatives(t)
    s = 1.0 - t * (1.0 - 1e-5)
    np.testing.assert_allclose(alpha, jnp.exp(-0.5 * sde.integrated_beta(s)), rtol=1e-6)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(d_alpha, 0.5 * alpha * sde.beta(s) * (1.0 - 1e-5), rtol=1e-5)
    np.testing.assert_allclose(sigma * d_sigma, -alpha * d_alpha, rtol=1e-3)  # float32 at alpha ~ 0.007
    assert float(alpha[0]) < 0.01 and float(sigma[-1]) < 2e-3


@pytest.mark.parametrize("name", sorted(PATHS))
def test_t_from_noise_ratio_inverts_noise_ratio(name):
    path = PATHS[name]
    t = jnp.linspace(0.05, 0.95, 7)
    np.testing.assert_allclose(path.t_from_noise_ratio(path.noise_ratio(t)), t, rtol=1e-4, atol=1e-5)


def test_paths_are_pytrees_through_jit():
    f = jax.jit(lambda path, t: path.coefficients_and_derivatives(t))
    for path in PATHS.values():
        out = f(path, jnp.array([0.5]))
        np.testing.assert_allclose(np.stack(out), np.stack(path.coefficients_and_derivatives(jnp.array([0.5]))))


# ---------------------------------------------------------------------------
# Exact conversions on the mixture
# ---------------------------------------------------------------------------


def _points(n=64, seed=0):
    kx, kt = jax.random.split(jax.random.key(seed))
    return 2.0 * jax.random.normal(kx, (n, 2)), jax.random.uniform(kt, (n,), minval=0.05, maxval=0.95)


def _exact_score_at(path, x, t):
    """The score of p_t = MIX.convolve(sigma(t), scale=alpha(t)), per example."""
    alpha, sigma = path.coefficients(t)
    return jax.vmap(lambda xi, a, s: MIX.convolve(s, scale=a).score(xi[None])[0])(x, alpha, sigma)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_conversions_are_exact_on_the_mixture(name):
    """exact_velocity (alpha' D - sigma sigma' s) agrees with velocity_from_score and velocity_from_denoiser;
    score -> velocity -> score and velocity -> denoiser round-trip to the closed forms."""
    path = PATHS[name]
    x, t = _points()
    score = jax.jit(_exact_score_at)(path, x, t)
    alpha, sigma = path.coefficients(t)
    denoised = jax.jit(jax.vmap(lambda xi, a, s: MIX.posterior_mean(xi[None], s, scale=a)[0]))(x, alpha, sigma)
    v = jax.jit(flows.exact_velocity(MIX, path))(x, t)
    scale = float(jnp.max(jnp.abs(v)))
    np.testing.assert_allclose(flows.velocity_from_score(score, x, t, path), v, atol=2e-4 * scale)
    np.testing.assert_allclose(flows.velocity_from_denoiser(denoised, x, t, path), v, atol=2e-4 * scale)
    np.testing.assert_allclose(flows.score_from_velocity(v, x, t, path), score, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(flows.denoiser_from_velocity(v, x, t, path), denoised, rtol=1e-3, atol=1e-3)


def test_exact_velocity_is_finite_at_both_ends():
    """On the linear path v = alpha' D - sigma sigma' s: at t = 0, D = E[data] and s = -z, so v = E[data] - z;
    at t = 1, sigma = 0 and D = x, so v = x."""
    x = jax.random.normal(jax.random.key(3), (16, 2))
    v = jax.jit(flows.exact_velocity(MIX, LinearPath()))
    mean = jnp.sum(MIX.weights[:, None] * MIX.means, axis=0)
    np.testing.assert_allclose(v(x, 0.0), mean - x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v(x, 1.0), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["linear", "vp"])
def test_model_wrappers_match_the_exact_models(name):
    """A velocity as a VE / VP score model equals sde.exact_score_model; a VE score model (and a VP eps model)
    run as a flow equals the exact velocity."""
    path = PATHS[name]
    x, t = _points(32, seed=1)
    v_exact = flows.exact_velocity(MIX, path)
    sigma = jnp.geomspace(0.05, 5.0, 32)
    for sde in (None, VPSDE(0.1, 20.0)):
        got = jax.jit(flows.score_model_from_velocity(v_exact, path, sde=sde))(x, sigma)
        want = jax.jit(exact_score_model(MIX, VESDE(0.01, 20.0) if sde is None else sde))(x, sigma)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    v_at = jax.jit(v_exact)(x, t)
    v = jax.jit(flows.velocity_model_from_score_model(exact_score_model(MIX, VESDE(0.01, 20.0)), path))(x, t)
    np.testing.assert_allclose(v, v_at, rtol=2e-3, atol=2e-3)
    vp_score = exact_score_model(MIX, VPSDE(0.1, 20.0))
    eps_model = lambda y, s: -s[:, None] * vp_score(y, s)  # noqa: E731
    as_flow = flows.velocity_model_from_score_model(eps_model, path, parameterization="eps", sde=VPSDE(0.1, 20.0))
    np.testing.assert_allclose(jax.jit(as_flow)(x, t), v_at, rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------
# The loss at the exact field
# ---------------------------------------------------------------------------

C = jnp.array([0.5, -0.3])
E_DELTA2 = float(jnp.sum(C**2)) * 7.0 / 3.0  # E|c (1 + t)|^2, t ~ U[0, 1]
NUM_KEYS, BATCH = 16, 1024


def _delta(x, t):
    return C * (1.0 + t)[:, None]


def _loss_stats(path):
    """Per key (NUM_KEYS independent batches of BATCH): the gradient in theta of the loss at v* + theta delta at
    theta = 0 and at theta = 0.2, and the gap L(v* + delta) - L(v*), all on the same draws."""
    v_star = flows.exact_velocity(MIX, path)

    def loss(theta, key):
        data = MIX.sample(jax.random.fold_in(key, 1), BATCH)
        field = lambda x, t: v_star(x, t) + theta * _delta(x, t)  # noqa: E731
        return flow_matching_loss(field, data, key, path=path)

    def stats(key):
        return jax.grad(loss)(0.0, key), jax.grad(loss)(0.2, key), loss(1.0, key) - loss(0.0, key)

    keys = jax.random.split(jax.random.key(7), NUM_KEYS)
    return [np.asarray(a) for a in jax.jit(jax.vmap(stats))(keys)]


def _z(values, expected):
    """(mean - expected) in standard errors of the mean over the independent keys."""
    return (np.mean(values) - expected) / (np.std(values, ddof=1) / np.sqrt(values.size))


@pytest.mark.parametrize("name", ["linear", "vp"])
def test_loss_gradient_vanishes_at_the_exact_field_and_the_gap_is_e_delta2(name):
    """dL/dtheta = 2 E[delta . (v* - u)] = 0 at the marginal field, and L(v* + delta) - L(v*) = E|delta|^2,
    each within 4 standard errors (NUM_KEYS x BATCH draws); at a field off by 0.2 delta the gradient is
    0.4 E|delta|^2, and more than 4 standard errors away from 0: the test can fail."""
    grad, grad_off, gap = _loss_stats(PATHS[name])
    assert abs(_z(grad, 0.0)) < 4.0, (np.mean(grad), np.std(grad))
    assert abs(_z(gap, E_DELTA2)) < 4.0, (np.mean(gap), E_DELTA2)
    assert abs(_z(grad_off, 0.4 * E_DELTA2)) < 4.0
    assert _z(grad_off, 0.0) > 4.0


# ---------------------------------------------------------------------------
# Integration, reflow
# ---------------------------------------------------------------------------

N_MMD = 1000


@pytest.fixture(scope="module")
def flow_samples():
    noise = jax.random.normal(jax.random.key(21), (N_MMD, 2))
    v = flows.exact_velocity(MIX, LinearPath())
    pairs = jax.jit(lambda z: flows.reflow(v, z))(noise)
    return v, pairs


def test_exact_velocity_carries_the_prior_to_the_mixture(flow_samples):
    """The samples' MMD^2 to fresh data is within 4 two-sample floors (the RMS of the MMD^2 of reference samples
    to the same fresh set); stopping at t = 0.8 is not."""
    v, (noise, samples) = flow_samples
    fresh = MIX.sample(jax.random.key(23), N_MMD)
    sample = jax.jit(MIX.sample, static_argnums=1)
    floor = mmd2_floor(sample, jax.random.key(22), N_MMD, against=fresh, num_pairs=8, bandwidth=1.0)
    assert float(mmd2(samples, fresh, bandwidth=1.0)) < 4.0 * float(floor.floor)
    early, _ = jax.jit(lambda z: flows.integrate(v, z, t1=0.8))(noise)
    assert float(mmd2(early, fresh, bandwidth=1.0)) > 4.0 * float(floor.floor)


def test_reflow_pairs_are_consistent_and_cheaper_than_independent(flow_samples):
    """Integrating the samples back to t = 0 returns the noise; the rectified coupling's E|x - z|^2 is below
    the independent coupling's E|x|^2 + E|z|^2 (Liu et al. 2023, Thm. 3.5), here by more than half."""
    v, (noise, samples) = flow_samples
    back, _ = jax.jit(lambda x: flows.integrate(v, x, t0=1.0, t1=0.0))(samples)
    np.testing.assert_allclose(back, noise, atol=2e-3)
    independent = float(jnp.sum(MIX.weights * (jnp.sum(MIX.means**2, axis=1) + jnp.sum(MIX.covs, axis=1)))) + 2.0
    cost = jnp.sum((samples - noise) ** 2, axis=1)
    assert float(jnp.mean(cost)) + 4.0 * float(jnp.std(cost)) / np.sqrt(N_MMD) < 0.5 * independent
    # the loss on the reflowed pairs with the straight field (x - z) is zero
    assert float(flow_matching_loss(lambda x_t, t: samples - noise, samples, jax.random.key(0), noise=noise)) < 1e-10


# ---------------------------------------------------------------------------
# Minibatch OT
# ---------------------------------------------------------------------------


def _line_case(batch=12):
    """1-D noise and data: the monotone (sorted-to-sorted) assignment is the optimal one."""
    noise = jax.random.permutation(jax.random.key(30), jnp.linspace(-2.0, 2.0, batch))[:, None]
    data = jax.random.permutation(jax.random.key(31), jnp.linspace(-3.0, 3.5, batch))[:, None]
    monotone = jnp.sort(data[:, 0])[jnp.argsort(jnp.argsort(noise[:, 0]))][:, None]
    return noise, data, monotone


def test_ot_pairs_is_the_monotone_assignment_on_a_line():
    noise, data, monotone = _line_case()
    z, paired = jax.jit(flows.ot_pairs)(noise, data)
    np.testing.assert_array_equal(z, noise)
    np.testing.assert_array_equal(paired, monotone)


def test_ot_pairs_is_optimal_by_brute_force():
    noise = jax.random.normal(jax.random.key(32), (6, 2))
    data = jax.random.normal(jax.random.key(33), (6, 2)) + 1.0
    cost = np.sum((np.asarray(noise)[:, None] - np.asarray(data)[None]) ** 2, axis=-1)
    best = min(sum(cost[i, p[i]] for i in range(6)) for p in itertools.permutations(range(6)))
    _, paired = flows.ot_pairs(noise, data)
    np.testing.assert_allclose(float(jnp.sum((paired - noise) ** 2)), best, rtol=1e-5)


def test_sinkhorn_converges_to_the_monotone_assignment():
    """The plan has the uniform marginals, its row maxima are the optimal (monotone) assignment, and its mass
    on that assignment grows to 1 as epsilon -> 0; a large epsilon spreads it."""
    noise, data, monotone = _line_case()
    batch = noise.shape[0]
    on_optimal = data[None, :, 0] == monotone  # [B, B]: entry (i, j) is the optimal partner of noise i
    plan_fn = jax.jit(lambda a, b, e: flows.sinkhorn_plan(a, b, epsilon=e, num_iters=3000))
    masses = []
    for epsilon in (1e-2, 3e-3):
        plan = plan_fn(noise, data, epsilon)
        # columns exact up to float32 rounding of exp((f + g - C) / eps), rows up to the convergence
        np.testing.assert_allclose(jnp.sum(plan, axis=0), 1.0 / batch, rtol=1e-4)
        np.testing.assert_allclose(jnp.sum(plan, axis=1), 1.0 / batch, rtol=2e-3)
        np.testing.assert_array_equal(data[jnp.argmax(plan, axis=1)], monotone)
        masses.append(float(jnp.sum(plan * on_optimal)))
    assert 0.9 < masses[0] < masses[1] and masses[1] > 0.99, masses
    assert float(jnp.sum(flows.sinkhorn_plan(noise, data, epsilon=1.0) * on_optimal)) < 0.5


@pytest.mark.parametrize("coupling", [None, "ot"])
def test_loss_with_zero_field_is_the_coupling_cost(coupling):
    """On the linear path with v = 0 the loss is the mean of |x - z|^2 over the pairs: the independent cost,
    or with "ot" the optimal (monotone) one, exactly (also under jit)."""
    noise, data, monotone = _line_case()
    zero = lambda x_t, t: jnp.zeros_like(x_t)  # noqa: E731
    loss = jax.jit(lambda x, k: flow_matching_loss(zero, x, k, coupling=coupling, noise=noise))(
        data, jax.random.key(35)
    )
    expected = jnp.mean(((monotone if coupling else data) - noise) ** 2)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)


def test_loss_is_differentiable_under_jit_with_the_couplings():
    """The gradient in the field's parameters flows around the coupling (the pairs do not depend on them): with
    "ot" it equals the gradient on the optimal pairs given directly; with "sinkhorn" it is finite and nonzero."""
    noise, data, monotone = _line_case()

    def grad(x, coupling):
        loss = lambda theta: flow_matching_loss(  # noqa: E731
            lambda x_t, t: theta * x_t, x, jax.random.key(37), coupling=coupling, noise=noise
        )
        return float(jax.jit(jax.grad(loss))(0.5))

    np.testing.assert_allclose(grad(data, "ot"), grad(monotone, None), rtol=1e-5)
    assert grad(data, "ot") != grad(data, None)
    assert np.isfinite(grad(data, "sinkhorn")) and grad(data, "sinkhorn") != 0.0


def test_sinkhorn_pairs_are_drawn_from_the_plan():
    """With v = 0 and Sinkhorn pairs, the loss averaged over keys is <P, C> (each noise row's partner drawn from
    its row of the plan), within 4 standard errors; <P, C> lies between the optimal and the independent cost."""
    noise, data, monotone = _line_case()
    epsilon = 0.05
    zero = lambda x_t, t: jnp.zeros_like(x_t)  # noqa: E731
    coupling = lambda z, x, k: flows.sinkhorn_pairs(z, x, k, epsilon=epsilon, num_iters=1000)  # noqa: E731
    losses = jax.jit(jax.vmap(lambda k: flow_matching_loss(zero, data, k, coupling=coupling, noise=noise)))(
        jax.random.split(jax.random.key(36), 400)
    )
    plan = flows.sinkhorn_plan(noise, data, epsilon=epsilon, num_iters=1000)
    expected = float(jnp.sum(plan * (noise - data[:, 0]) ** 2))
    assert abs(_z(np.asarray(losses), expected)) < 4.0
    assert float(jnp.mean((monotone - noise) ** 2)) < expected < float(jnp.mean((data - noise) ** 2))


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

_ZERO = lambda x_t, t: jnp.zeros_like(x_t)  # noqa: E731
_X = jnp.ones((4, 2))
_KEY = jax.random.key(0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: flow_matching_loss(_ZERO, _X, _KEY, path="cosine"), "path must be one of"),
        (lambda: flow_matching_loss(_ZERO, _X, _KEY, path=3), "path must be one of"),
        (lambda: flow_matching_loss(_ZERO, _X, _KEY, path="vp", sigma_min=0.1), "sigma_min"),
        (lambda: flow_matching_loss(_ZERO, _X, _KEY, path=VPPath(), sigma_min=0.1), "sigma_min"),
        (lambda: flow_matching_loss(_ZERO, _X, _KEY, coupling="emd"), "coupling must be one of"),
        (lambda: flow_matching_loss(_ZERO, _X, _KEY, t_sampling="beta"), "t_sampling must be one of"),
        (lambda: flow_matching_loss(_ZERO, _X, 0), "key must be a PRNG key"),
        (lambda: flow_matching_loss(_ZERO, jnp.ones((4, 2), jnp.int32), _KEY), "x must be floating point"),
        (lambda: flow_matching_loss(_ZERO, jnp.ones(4), _KEY), "x must be batched"),
        (lambda: flow_matching_loss(_ZERO, _X, _KEY, noise=jnp.ones((3, 2))), "noise returned shape"),
        (lambda: flow_matching_loss(lambda x_t, t: x_t[:, :1], _X, _KEY), "velocity_fn returned shape"),
        (lambda: LinearPath(1.0), "sigma_min must lie in"),
        (lambda: VPPath(beta_min=-1.0), "beta_min"),
        (lambda: SDEPath("ve"), "sde must be"),
        (lambda: flows.sinkhorn_plan(_X, _X, epsilon=0.0), "epsilon must be > 0"),
        (lambda: flows.score_model_from_velocity(_ZERO, "linear"), "path must be a dsm_jax.flows.GaussianPath"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_logit_normal_times_concentrate_mid_path():
    """With t_sampling="logit_normal" the times are sigmoid(N(0, 1)): their mean is 1/2, their spread below U[0, 1]'s."""
    seen = []
    record = lambda x_t, t: (seen.append(t), jnp.zeros_like(x_t))[1]  # noqa: E731
    flow_matching_loss(record, jnp.ones((4000, 1)), _KEY, t_sampling="logit_normal")
    t = np.asarray(seen[0])
    assert abs(t.mean() - 0.5) < 0.02 and t.std() < 0.25 < np.sqrt(1.0 / 12.0)


def test_flow_model_gets_the_exact_log_likelihood():
    """The exact linear-path velocity, as a VE score model, through dsm_jax.likelihood with a VESDE: the
    log-density of MIX.convolve(sigma(t_min)) at the data, to 2e-3 nats (the ODE tolerance is 1e-5)."""
    from dsm_jax.likelihood import log_likelihood

    path, sde = LinearPath(), VESDE(0.01, 20.0)
    model_fn = flows.score_model_from_velocity(flows.exact_velocity(MIX, path), path)
    x = MIX.sample(jax.random.key(40), 8)
    prior = MIX.convolve(float(sde.sigma(1.0)))
    ll = jax.jit(lambda x: log_likelihood(model_fn, sde, x, prior_log_prob=prior.log_prob))(x)
    expected = MIX.convolve(float(sde.sigma(sde.t_min))).log_prob(x)
    np.testing.assert_allclose(ll, expected, atol=2e-3)
