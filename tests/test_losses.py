"""Score-matching losses against closed forms and their defining identities."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsm_jax.distributions import Gaussian, GaussianMixture
from dsm_jax.losses import (
    _dsm_per_example,
    dsm_loss,
    explicit_score_matching_loss,
    multiscale_dsm_loss,
    per_sigma_dsm_losses,
    sliced_score_matching_loss,
    sure_loss,
)
from dsm_jax.noise import geometric_sigmas

TWO_CLUSTERS = GaussianMixture(
    jnp.array([0.5, 0.5]), jnp.array([[2.0, 2.0], [-2.0, -2.0]]), jnp.full((2, 2), 0.25)
)


def _mlp_model(key, d, width=32):
    """A small sigma-conditional field (x, sigma) -> [B, d] with fixed random weights."""
    k1, k2 = jax.random.split(key)
    w1 = jax.random.normal(k1, (d + 1, width)) / np.sqrt(d + 1)
    w2 = jax.random.normal(k2, (width, d)) / np.sqrt(width)

    def model(x, sigma):
        h = jnp.concatenate([x, jnp.log(sigma)[:, None]], axis=-1)
        return jnp.tanh(h @ w1) @ w2

    return model


# ---------------------------------------------------------------------------
# Explicit and sliced score matching
# ---------------------------------------------------------------------------


def test_explicit_sm_recovers_gaussian_score(x64):
    """A linear score s(x) = A x + b fitted by explicit SM is -Sigma_hat^{-1} (x - mu_hat)."""
    d, n = 3, 20_000
    cov = jnp.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]])
    mean = jnp.array([1.0, -1.0, 0.5])
    x = Gaussian(mean, cov).sample(jax.random.key(0), n)

    def loss(theta):
        a, b = theta[: d * d].reshape(d, d), theta[d * d :]
        return explicit_score_matching_loss(lambda z: z @ a.T + b, x)

    # The loss is quadratic in theta: one Newton step from zero is the exact minimiser.
    theta0 = jnp.zeros(d * d + d)
    theta = theta0 - jnp.linalg.solve(jax.hessian(loss)(theta0), jax.grad(loss)(theta0))
    a, b = theta[: d * d].reshape(d, d), theta[d * d :]
    emp_cov = jnp.cov(x.T, bias=True)
    np.testing.assert_allclose(a, -jnp.linalg.inv(emp_cov), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b, jnp.linalg.inv(emp_cov) @ x.mean(0), rtol=1e-6, atol=1e-8)
    # Against the true parameters: the empirical precision has relative error O(sqrt(d / n)) ~ 1%.
    np.testing.assert_allclose(a, -jnp.linalg.inv(cov), atol=0.1)
    # The true score scores lower than perturbed ones.
    true = explicit_score_matching_loss(Gaussian(mean, cov).score, x)
    assert true < explicit_score_matching_loss(lambda z: 1.2 * Gaussian(mean, cov).score(z), x)
    assert true < explicit_score_matching_loss(lambda z: Gaussian(mean + 0.2, cov).score(z), x)


def test_explicit_sm_chunked_equals_unchunked(x64):
    model = _mlp_model(jax.random.key(1), 7)
    score = lambda z: model(z, jnp.ones(z.shape[0]))
    x = jax.random.normal(jax.random.key(2), (5, 7))
    np.testing.assert_allclose(
        explicit_score_matching_loss(score, x), explicit_score_matching_loss(score, x, chunk_size=3), rtol=1e-12
    )


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize("variance_reduction", [False, True])
def test_sliced_sm_has_explicit_sm_as_expectation(probe, variance_reduction, x64):
    d = 4
    model = _mlp_model(jax.random.key(3), d)
    score = lambda z: model(z, jnp.ones(z.shape[0]))
    x = jax.random.normal(jax.random.key(4), (8, d))
    exact = explicit_score_matching_loss(score, x)
    n = 3000
    draws = jax.vmap(
        lambda k: sliced_score_matching_loss(score, x, k, probe=probe, variance_reduction=variance_reduction)
    )(jax.random.split(jax.random.key(5), n))
    se = draws.std() / np.sqrt(n)
    assert abs(draws.mean() - exact) < 5 * se, (draws.mean(), exact, se)


def test_sliced_sm_variance_reduction_lowers_variance():
    d = 4
    model = _mlp_model(jax.random.key(6), d)
    score = lambda z: model(z, jnp.ones(z.shape[0]))
    x = jax.random.normal(jax.random.key(7), (8, d))
    keys = jax.random.split(jax.random.key(8), 2000)
    var = lambda vr: jax.vmap(lambda k: sliced_score_matching_loss(score, x, k, probe="gaussian", variance_reduction=vr))(keys).var()
    assert var(True) < var(False)


# ---------------------------------------------------------------------------
# Denoising score matching
# ---------------------------------------------------------------------------


def test_vincent_identity_with_exact_convolved_score():
    """DSM(a) - DSM(b) = 1/2 E_q|a - grad log q_sigma|^2 - 1/2 E_q|b - grad log q_sigma|^2."""
    sigma, n = 0.7, 100_000
    model_a = _mlp_model(jax.random.key(9), 2)
    model_b = lambda x, s: -x / (1.0 + s[:, None] ** 2)
    k1, k2 = jax.random.split(jax.random.key(10))
    x = TWO_CLUSTERS.sample(k1, n)
    eps = jax.random.normal(k2, x.shape)
    sig = jnp.full((n,), sigma)
    dsm = lambda m: _dsm_per_example(m, x, sig, eps, "score", 1.0)
    lhs = dsm(model_a) - dsm(model_b)
    y = x + sigma * eps
    true_score = TWO_CLUSTERS.convolve(sigma).score(y)
    fisher = lambda m: 0.5 * jnp.sum((m(y, sig) - true_score) ** 2, axis=-1)
    rhs = fisher(model_a) - fisher(model_b)
    # Both sides are averages over the same n draws; their per-draw difference has mean 0.
    diff = lhs - rhs
    assert abs(float(diff.mean())) < 5 * float(diff.std()) / np.sqrt(n)
    # And the identity is not vacuous: the two models differ by far more than that.
    assert abs(float(rhs.mean())) > 20 * float(diff.std()) / np.sqrt(n)


def test_dsm_is_minimised_by_the_noised_score():
    sigma = 0.5
    x = TWO_CLUSTERS.sample(jax.random.key(11), 4096)
    exact = lambda y, s: TWO_CLUSTERS.convolve(sigma).score(y)
    key = jax.random.key(12)
    best = dsm_loss(exact, x, sigma, key)
    for other in (lambda y, s: 1.1 * exact(y, s), lambda y, s: exact(y, s) + 0.1, lambda y, s: -y):
        assert best < dsm_loss(other, x, sigma, key)


def _gaussian_models():
    """The exact N(0, I) noised-marginal model in each parameterization (scale a, noise sigma)."""
    # q = N(0, (a^2 + s^2) I): score -y / (a^2 + s^2); E[x0|y] = a y / (a^2 + s^2); eps = s y / (a^2 + s^2).
    a = 0.8
    var = lambda s: a**2 + s[:, None] ** 2
    return a, {
        "score": lambda y, s: -y / var(s),
        "eps": lambda y, s: s[:, None] * y / var(s),
        "x0": lambda y, s: a * y / var(s),
        "energy": lambda y, s: 0.5 * jnp.sum(y**2, axis=-1) / var(s)[:, 0],
    }


@pytest.mark.parametrize("parameterization", ["eps", "x0", "energy"])
def test_parameterizations_agree(parameterization):
    a, models = _gaussian_models()
    x = jax.random.normal(jax.random.key(13), (64, 3))
    sig = jnp.linspace(0.1, 2.0, 64)
    key = jax.random.key(14)
    ref = dsm_loss(models["score"], x, sig, key, scale=a)
    got = dsm_loss(models[parameterization], x, sig, key, parameterization=parameterization, scale=a)
    np.testing.assert_allclose(got, ref, rtol=2e-5)


def test_eps_with_sigma2_weighting_is_plain_eps_regression():
    model = _mlp_model(jax.random.key(15), 2)
    x = jax.random.normal(jax.random.key(16), (32, 2))
    sigmas = geometric_sigmas(5.0, 0.05, 6)
    key = jax.random.key(17)
    got = multiscale_dsm_loss(model, x, sigmas, key, parameterization="eps", weighting="sigma2")
    keys = jax.random.split(key, sigmas.shape[0])
    manual = []
    for s, k in zip(sigmas, keys):
        eps = jax.random.normal(k, x.shape)
        eps_hat = model(x + s * eps, jnp.full((32,), s))
        manual.append(0.5 * jnp.mean(jnp.sum((eps_hat - eps) ** 2, axis=-1)))
    np.testing.assert_allclose(got, np.mean(manual), rtol=1e-5)


@pytest.mark.parametrize("parameterization", ["score", "eps", "x0"])
def test_per_sigma_matches_python_loop(parameterization):
    model = _mlp_model(jax.random.key(18), 3)
    x = jax.random.normal(jax.random.key(19), (16, 3))
    sigmas = geometric_sigmas(3.0, 0.1, 5)
    key = jax.random.key(20)
    got = per_sigma_dsm_losses(model, x, sigmas, key, parameterization=parameterization)
    keys = jax.random.split(key, 5)
    loop = [dsm_loss(model, x, s, k, parameterization=parameterization) for s, k in zip(sigmas, keys)]
    np.testing.assert_allclose(got, jnp.stack(loop), rtol=1e-5)
    # The multiscale loss is their lambda-weighted mean, and the per-sigma values come back.
    total, per = multiscale_dsm_loss(model, x, sigmas, key, parameterization=parameterization, return_per_sigma=True)
    np.testing.assert_allclose(per, got, rtol=1e-6)
    np.testing.assert_allclose(total, jnp.mean(sigmas**2 * got), rtol=1e-5)


@pytest.mark.parametrize("sigma_sampling", ["all", "stratified", "random", "log_uniform"])
def test_one_key_per_example_equals_batches_of_one(sigma_sampling):
    """With [B] keys, example j draws what a batch of one draws with key[j]; loss and diagnostics follow."""
    model = _mlp_model(jax.random.key(21), 3)
    x = jax.random.normal(jax.random.key(22), (12, 3))
    sigmas = geometric_sigmas(3.0, 0.05, 6)
    keys = jax.random.split(jax.random.key(23), 12)
    loss, per = multiscale_dsm_loss(model, x, sigmas, keys, sigma_sampling=sigma_sampling, return_per_sigma=True)
    ones = [multiscale_dsm_loss(model, x[j:j + 1], sigmas, keys[j], sigma_sampling=sigma_sampling, return_per_sigma=True)
            for j in range(12)]
    np.testing.assert_allclose(loss, np.mean([l for l, _ in ones]), rtol=1e-5)
    with np.errstate(all="ignore"):  # levels an example did not draw are NaN
        expected_per = np.nanmean(np.stack([np.asarray(p) for _, p in ones]), axis=0)
    np.testing.assert_allclose(per, expected_per, rtol=1e-5)
    # Raw uint32 keys work the same way, and a wrong number of keys is an error naming both counts.
    raw = jax.vmap(jax.random.key_data)(keys)
    np.testing.assert_allclose(multiscale_dsm_loss(model, x, sigmas, raw, sigma_sampling=sigma_sampling), loss, rtol=1e-6)
    with pytest.raises(ValueError, match="11 keys but x has 12"):
        multiscale_dsm_loss(model, x, sigmas, keys[:11], sigma_sampling=sigma_sampling)


def test_random_sigma_sampling_has_the_same_expectation():
    model = _mlp_model(jax.random.key(21), 2)
    x = jax.random.normal(jax.random.key(22), (8, 2))
    sigmas = geometric_sigmas(2.0, 0.2, 4)
    keys = jax.random.split(jax.random.key(23), 4000)
    draws = jax.vmap(lambda k: multiscale_dsm_loss(model, x, sigmas, k, sigma_sampling="random"))(keys)
    full = jax.vmap(lambda k: multiscale_dsm_loss(model, x, sigmas, k, sigma_sampling="all"))(keys)
    diff = draws - full
    assert abs(float(diff.mean())) < 5 * float(diff.std()) / np.sqrt(keys.shape[0])
    loss, per = multiscale_dsm_loss(model, x, sigmas, keys[0], sigma_sampling="random", return_per_sigma=True)
    assert per.shape == (4,)


def test_continuous_sigma_sampling_matches_the_closed_form():
    # Data N(0, I_d) with its exact noised score s(y, sigma) = -y / (1 + sigma^2):
    # 1/2 |s(x + sigma eps) + eps / sigma|^2 has mean d / (2 sigma^2 (1 + sigma^2)), so with
    # lambda = sigma^2 and log sigma ~ U(log a, log b) the loss has mean
    # d/2 * [u - log(1 + e^{2u}) / 2]_{log a}^{log b} / (log b - log a).
    d, a, b = 3, 0.1, 3.0
    model = lambda y, sigma: -y / (1.0 + sigma[:, None] ** 2)
    keys = jax.random.split(jax.random.key(31), 2000)
    sigmas = geometric_sigmas(b, a, 5)

    def one(k):
        kx, kl = jax.random.split(k)
        x = jax.random.normal(kx, (64, d))
        return multiscale_dsm_loss(model, x, sigmas, kl, sigma_sampling="log_uniform")

    f = lambda u: u - 0.5 * np.log1p(np.exp(2 * u))
    expected = lambda lo, hi: d / 2 * (f(np.log(hi)) - f(np.log(lo))) / (np.log(hi) - np.log(lo))
    draws = jax.vmap(one)(keys)
    # Mean of 2000 independent draws: 5 standard errors.
    assert abs(float(draws.mean()) - expected(a, b)) < 5 * float(draws.std()) / np.sqrt(keys.shape[0])
    # "stratified": every level jittered in its log cell; the 2 cells of the grid (b, a) tile
    # [a / sqrt(gamma), b * sqrt(gamma)] with gamma = b / a (wide cells: far from the grid's value).
    two = jnp.array([b, a])
    strat_and_grid = jax.vmap(lambda k: jnp.stack([
        multiscale_dsm_loss(model, jax.random.normal(k, (64, d)), two, jax.random.fold_in(k, 1), sigma_sampling=m)
        for m in ("stratified", "all")]))(keys)
    strat, grid = strat_and_grid[:, 0], strat_and_grid[:, 1]
    g = np.sqrt(b / a)
    tol = 5 * float(strat.std()) / np.sqrt(keys.shape[0])
    assert abs(float(strat.mean()) - expected(a / g, b * g)) < tol
    assert abs(float(grid.mean()) - float(strat.mean())) > 5 * tol
    loss, per = multiscale_dsm_loss(model, jnp.ones((512, d)), sigmas, keys[0], sigma_sampling="log_uniform",
                                    return_per_sigma=True)
    assert per.shape == (5,) and np.all(np.isfinite(np.asarray(per)))


def test_losses_are_jittable_and_differentiable():
    x = jax.random.normal(jax.random.key(24), (16, 2))
    sigmas = geometric_sigmas(2.0, 0.1, 4)

    def model(params, y, s):
        return y @ params["w"] + params["b"] * jnp.log(s)[:, None]

    params = {"w": jnp.eye(2), "b": jnp.ones(2)}
    for sampling in ("all", "random"):
        f = jax.jit(jax.value_and_grad(
            lambda p, k: multiscale_dsm_loss(functools.partial(model, p), x, sigmas, k, sigma_sampling=sampling)
        ))
        value, grads = f(params, jax.random.key(0))
        assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    g = jax.grad(lambda p: sliced_score_matching_loss(lambda y: model(p, y, jnp.ones(16)), x, jax.random.key(1)))(params)
    assert np.all(np.isfinite(g["w"]))


# ---------------------------------------------------------------------------
# SURE
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_sure_is_unbiased_for_a_linear_denoiser(trace):
    """x ~ N(0, tau^2 I), y = x + sigma eps, D(y) = M y: E|D(y) - x|^2 = tau^2 |M - I|_F^2 + sigma^2 |M|_F^2."""
    d, n, tau, sigma = 4, 50_000, 1.5, 0.8
    m = jnp.eye(d) * 0.7 + 0.1 * jax.random.normal(jax.random.key(25), (d, d))
    k1, k2, k3 = jax.random.split(jax.random.key(26), 3)
    x = tau * jax.random.normal(k1, (n, d))
    y = x + sigma * jax.random.normal(k2, (n, d))
    denoiser = lambda z, s: z @ m.T
    expected = tau**2 * jnp.sum((m - jnp.eye(d)) ** 2) + sigma**2 * jnp.sum(m**2)
    # Per-example SURE values give the standard error of their mean.
    keys = jax.random.split(k3, n)
    per_example = jax.vmap(lambda yi, k: sure_loss(denoiser, yi[None], sigma, k, trace=trace))(y, keys)
    se = float(per_example.std()) / np.sqrt(n)
    assert abs(float(per_example.mean()) - float(expected)) < 5 * se
    # The batched call is the mean of the per-example ones (exact trace: deterministic).
    if trace == "exact":
        np.testing.assert_allclose(sure_loss(denoiser, y, sigma, trace="exact"), per_example.mean(), rtol=1e-4)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, x, k: dsm_loss(m, x, 0.0, k), "sigma must be > 0"),
        (lambda m, x, k: dsm_loss(m, x, -1.0, k), "sigma must be > 0"),
        (lambda m, x, k: dsm_loss(m, x, float("inf"), k), "sigma must be finite"),
        (lambda m, x, k: dsm_loss(m, x, jnp.ones(3), k), r"sigma must be a scalar or have shape \[B\]"),
        (lambda m, x, k: dsm_loss(m, x, 0.5, k, parameterization="noise"), "parameterization must be one of"),
        (lambda m, x, k: dsm_loss(m, x[0], 0.5, k), "x must be batched"),
        (lambda m, x, k: dsm_loss(lambda y, s: y[:, :1], x, 0.5, k), "model_fn returned shape"),
        (lambda m, x, k: multiscale_dsm_loss(m, x, jnp.array([1.0, 0.0]), k), "sigmas must be > 0"),
        (lambda m, x, k: multiscale_dsm_loss(m, x, jnp.ones(3), k, weighting="linear"), "weighting must be one of"),
        (lambda m, x, k: multiscale_dsm_loss(m, x, jnp.ones(3), k, sigma_sampling="one"), "sigma_sampling must be one of"),
        (lambda m, x, k: sliced_score_matching_loss(lambda y: y, x, k, probe="normal"), "probe must be one of"),
        (lambda m, x, k: sliced_score_matching_loss(lambda y: y, x, k, num_projections=0), "num_projections"),
        (lambda m, x, k: sure_loss(m, x, 0.5, None), "key must be a PRNG key"),
        (lambda m, x, k: sure_loss(m, x, 0.5, k, trace="approx"), "trace must be one of"),
    ],
)
def test_bad_input(call, match):
    model = _mlp_model(jax.random.key(27), 2)
    with pytest.raises(ValueError, match=match):
        call(model, jnp.ones((8, 2)), jax.random.key(0))
