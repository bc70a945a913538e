"""Ground-truth densities against autodiff, Monte Carlo and each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsm_jax.distributions import Gaussian, GaussianMixture


def _random_spd(key, d):
    a = jax.random.normal(key, (d, d))
    return a @ a.T / d + 0.5 * jnp.eye(d)


def _mixtures(key, d):
    k1, k2, k3 = jax.random.split(key, 3)
    means = 2.0 * jax.random.normal(k1, (3, d))
    full = jax.vmap(lambda k: _random_spd(k, d))(jax.random.split(k2, 3))
    diag = 0.3 + jax.random.uniform(k3, (3, d))
    weights = jnp.array([0.2, 0.5, 0.3])
    return {
        "full": GaussianMixture(weights, means, full),
        "diag": GaussianMixture(weights, means, diag),
    }


@pytest.mark.parametrize("kind", ["full", "diag"])
@pytest.mark.parametrize("d", [1, 3])
def test_gmm_score_is_grad_log_prob(kind, d, x64):
    gmm = _mixtures(jax.random.key(0), d)[kind]
    x = 2.0 * jax.random.normal(jax.random.key(1), (16, d))
    auto = jax.grad(lambda z: jnp.sum(gmm.log_prob(z)))(x)
    np.testing.assert_allclose(gmm.score(x), auto, rtol=1e-9, atol=1e-9)


def test_gaussian_matches_single_component_mixture(x64):
    cov = _random_spd(jax.random.key(2), 3)
    mean = jnp.array([1.0, -1.0, 0.5])
    g = Gaussian(mean, cov)
    m = GaussianMixture(jnp.ones(1), mean[None], cov[None])
    x = jax.random.normal(jax.random.key(3), (8, 3))
    np.testing.assert_allclose(g.log_prob(x), m.log_prob(x), rtol=1e-12)
    np.testing.assert_allclose(g.score(x), m.score(x), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        g.posterior_mean(x, 0.7, scale=0.8), m.posterior_mean(x, 0.7, scale=0.8), rtol=1e-10, atol=1e-12
    )
    scipy_stats = pytest.importorskip("scipy.stats")
    np.testing.assert_allclose(g.log_prob(x), scipy_stats.multivariate_normal(mean, cov).logpdf(x), rtol=1e-10)


def test_gmm_score_far_from_modes_is_finite_and_correct():
    gmm = GaussianMixture(jnp.array([0.3, 0.7]), jnp.array([[2.0, 2.0], [-2.0, -2.0]]), jnp.full((2, 2), 0.25))
    x = jnp.array([[1e3, 1e3], [-1e3, 1e3], [1e3, -5e2]])
    s = gmm.score(x)
    assert jnp.all(jnp.isfinite(s)) and jnp.all(jnp.isfinite(gmm.log_prob(x)))
    # (1e3, 1e3) and (1e3, -5e2) are owned entirely by the nearer component (2, 2).
    np.testing.assert_allclose(s[0], -(x[0] - jnp.array([2.0, 2.0])) / 0.25, rtol=1e-6)
    np.testing.assert_allclose(s[2], -(x[2] - jnp.array([2.0, 2.0])) / 0.25, rtol=1e-6)
    # (-1e3, 1e3) is equally far from both: responsibilities are the weights 0.3 / 0.7.
    expected = -(0.3 * (x[1] - jnp.array([2.0, 2.0])) + 0.7 * (x[1] + 2.0)) / 0.25
    np.testing.assert_allclose(s[1], expected, rtol=1e-6)


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_convolve_matches_monte_carlo_moments(kind):
    d = 2
    gmm = _mixtures(jax.random.key(4), d)[kind]
    sigma, scale, n = 0.7, 0.6, 200_000
    k1, k2 = jax.random.split(jax.random.key(5))
    y = scale * gmm.sample(k1, n) + sigma * jax.random.normal(k2, (n, d))
    noised = gmm.convolve(sigma, scale=scale)
    # Exact moments of the noised mixture.
    covs = noised.covariance_matrices
    mean = jnp.einsum("k,kd->d", noised.weights, noised.means)
    second = jnp.einsum("k,kij->ij", noised.weights, covs + jnp.einsum("ki,kj->kij", noised.means, noised.means))
    cov = second - jnp.outer(mean, mean)
    # Standard errors: sd/sqrt(n) for the mean; for the covariance entries sqrt(var(y_i y_j)/n),
    # bounded here by sqrt((C_ii C_jj + C_ij^2 + moments)/n); 5 standard errors.
    se_mean = jnp.sqrt(jnp.diag(cov) / n)
    np.testing.assert_array_less(jnp.abs(y.mean(0) - mean), 5 * se_mean)
    emp_cov = jnp.cov(y.T)
    centred = y - y.mean(0)
    se_cov = jnp.sqrt(jnp.var(centred[:, :, None] * centred[:, None, :], axis=0) / n)
    np.testing.assert_array_less(jnp.abs(emp_cov - cov), 5 * se_cov)


@pytest.mark.parametrize("kind", ["full", "diag"])
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_posterior_mean_is_tweedie(kind, scale, x64):
    gmm = _mixtures(jax.random.key(6), 3)[kind]
    sigma = 0.8
    y = 2.0 * jax.random.normal(jax.random.key(7), (32, 3))
    tweedie = (y + sigma**2 * gmm.convolve(sigma, scale=scale).score(y)) / scale
    np.testing.assert_allclose(gmm.posterior_mean(y, sigma, scale=scale), tweedie, rtol=1e-9, atol=1e-9)


def test_posterior_covariance_is_second_order_tweedie(x64):
    gmm = _mixtures(jax.random.key(8), 2)["full"]
    sigma = 0.5
    y = jax.random.normal(jax.random.key(9), (8, 2))
    noised = gmm.convolve(sigma)
    # Cov[x|y] = sigma^2 I + sigma^4 Hessian log q(y)
    hess = jax.vmap(jax.jacfwd(lambda z: noised.score(z[None])[0]))(y)
    expected = sigma**2 * jnp.eye(2) + sigma**4 * hess
    np.testing.assert_allclose(gmm.posterior_covariance(y, sigma), expected, rtol=1e-8, atol=1e-10)


def test_posterior_mean_matches_monte_carlo_1d():
    """E[x | y] against the average of x over prior draws whose y falls in a narrow bin."""
    gmm = GaussianMixture(jnp.array([0.3, 0.7]), jnp.array([[-2.0], [1.5]]), jnp.array([[0.3], [0.5]]))
    sigma, n, half_width = 1.0, 2_000_000, 0.02
    k1, k2 = jax.random.split(jax.random.key(10))
    x = gmm.sample(k1, n)[:, 0]
    y = x + sigma * jax.random.normal(k2, (n,))
    for y0 in (-1.0, 0.0, 1.0):
        sel = np.abs(np.asarray(y) - y0) < half_width
        xs = np.asarray(x)[sel]
        exact = float(gmm.posterior_mean(jnp.array([[y0]]), sigma)[0, 0])
        # Tolerance: 5 standard errors of the bin average, plus the bias of a bin of this width,
        # |d E[x|y]/dy| * half_width <= (Var[x|y]/sigma^2) * half_width with Var[x|y] <= prior var.
        se = xs.std() / np.sqrt(xs.size)
        bias = (
            float(jnp.max(gmm.posterior_covariance(jnp.array([[y0]]), sigma))) / sigma**2 * half_width
            + 0.05 * half_width
        )
        assert abs(xs.mean() - exact) < 5 * se + bias, (y0, xs.mean(), exact, se)


def test_sample_statistics_gaussian():
    cov = jnp.array([[1.0, 0.6], [0.6, 2.0]])
    g = Gaussian(jnp.array([1.0, -2.0]), cov)
    n = 100_000
    x = g.sample(jax.random.key(11), n)
    np.testing.assert_array_less(jnp.abs(x.mean(0) - g.mean), 5 * jnp.sqrt(jnp.diag(cov) / n))
    # var of a sample covariance entry: (C_ii C_jj + C_ij^2) / n
    se = jnp.sqrt((jnp.outer(jnp.diag(cov), jnp.diag(cov)) + cov**2) / n)
    np.testing.assert_array_less(jnp.abs(jnp.cov(x.T) - cov), 5 * se)


def test_pytree_through_jit_and_vmap():
    gmm = _mixtures(jax.random.key(12), 2)["diag"]
    x = jnp.ones((4, 2))
    np.testing.assert_allclose(jax.jit(lambda m, z: m.score(z))(gmm, x), gmm.score(x), rtol=1e-6)
    sigmas = jnp.array([0.1, 0.5, 1.0])
    per_sigma = jax.vmap(lambda s: gmm.convolve(s).score(x))(sigmas)
    assert per_sigma.shape == (3, 4, 2)
    np.testing.assert_allclose(per_sigma[1], gmm.convolve(0.5).score(x), rtol=1e-6)


TWO = GaussianMixture([0.5, 0.5], [[0.0], [1.0]], [[1.0], [1.0]])


def test_constructed_inside_jit_and_vmap():
    """Inside a transform the constructor traces (rank checks only) and normalises traced weights."""
    x = jnp.array([[0.3, -0.2]])
    means, covs = jnp.array([[1.0, 0.0], [-1.0, 0.0]]), jnp.full((2, 2), 0.5)
    ref = GaussianMixture(jnp.array([1.0, 3.0]), means, covs).score(x)
    made = jax.jit(lambda w, m: GaussianMixture(w, m, covs).score(x))(jnp.array([1.0, 3.0]), means)
    np.testing.assert_allclose(made, ref, rtol=1e-6)
    shifted = jax.vmap(lambda m: Gaussian(m, jnp.ones(2)).score(x))(means)
    np.testing.assert_allclose(shifted[0], Gaussian(means[0], jnp.ones(2)).score(x), rtol=1e-6)
    with pytest.raises(ValueError, match=r"means must have shape \[K, d\]"):
        jax.jit(lambda m: GaussianMixture(jnp.ones(2), m, covs))(means[:, :, None])
    # Rebuilt by the pytree machinery (a batch axis on every leaf) without the constructor's checks.
    batched = jax.vmap(lambda s: GaussianMixture(jnp.ones(2), means, covs).convolve(s))(jnp.array([0.1, 0.2, 0.3]))
    assert batched.means.shape == (3, 2, 2)
    assert jax.tree.map(lambda a: a[None], TWO).means.shape == (1, 2, 1)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Gaussian([0.0, 0.0], [[1.0, 2.0], [2.0, 1.0]]), "positive definite"),
        (lambda: Gaussian([0.0, 0.0], [1.0, -1.0]), "cov"),
        (lambda: Gaussian([0.0, 0.0], [1.0, 1.0, 1.0]), "cov must have shape"),
        (lambda: GaussianMixture([0.5, 0.5], [[0.0], [1.0]], [[1.0]]), "covs must have shape"),
        (lambda: GaussianMixture([0.5, -0.5], [[0.0], [1.0]], [[1.0], [1.0]]), "weights"),
        (lambda: GaussianMixture([0.5, 0.5], [[0.0], [1.0]], [[1.0], [1.0]]).convolve(0.0), "sigma"),
        (
            lambda: GaussianMixture([0.5, 0.5], [[0.0], [1.0]], [[1.0], [1.0]]).score(jnp.ones((3, 2))),
            r"x must have shape \[B, 1\]",
        ),
        (lambda: Gaussian([0.0], [1.0]).sample(jax.random.key(0), 0), "n must be"),
        # Non-finite parameters, numpy or jax.
        (lambda: Gaussian([np.nan, 0.0], [1.0, 1.0]), r"mean must be finite, got \[nan,"),
        (lambda: Gaussian(jnp.array([0.0, 0.0]), jnp.array([[1.0, np.inf], [0.0, 1.0]])), "cov must be finite"),
        (lambda: GaussianMixture([0.5, 0.5], jnp.array([[0.0], [np.inf]]), [[1.0], [1.0]]), "means must be finite"),
        (lambda: GaussianMixture([0.5, np.nan], [[0.0], [1.0]], [[1.0], [1.0]]), "weights must be finite"),
        (lambda: GaussianMixture([0.5, 0.5], [[0.0], [1.0]], np.array([[1.0], [np.nan]])), "covs .*must be finite"),
        (lambda: GaussianMixture([0.5, 0.5], [[0.0], [1.0]], jnp.full((2, 1, 1), np.nan)), "covs must be finite"),
        # Wrong ranks given as jax arrays (they used to pass unchecked).
        (
            lambda: GaussianMixture(jnp.ones(2), jnp.zeros((2, 2, 1)), jnp.ones((2, 2))),
            r"means must have shape \[K, d\], got shape \(2, 2, 1\)",
        ),
        (lambda: GaussianMixture(jnp.ones(2), jnp.zeros(2), jnp.ones(2)), r"means must have shape \[K, d\]"),
        (
            lambda: GaussianMixture(jnp.ones((2, 1)), jnp.zeros((2, 1)), jnp.ones((2, 1))),
            r"weights must have shape \[K\]=\(2,\)",
        ),
        (lambda: Gaussian(jnp.zeros((1, 2)), jnp.ones(2)), r"mean must have shape \[d\], got shape \(1, 2\)"),
        (lambda: Gaussian(jnp.zeros(2), jnp.ones((1, 2, 2))), "cov must have shape"),
        (lambda: Gaussian([0.0], [1.0]).sample(3, 2), r"key must be a PRNG key: pass jax.random.key\(seed\)"),
        (lambda: TWO.sample_with_labels(jnp.ones(2), 2), "key must be a PRNG key"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
