"""Tweedie's formulas from the exact GMM score against the GMM's exact posterior."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsm_jax.distributions import Gaussian, GaussianMixture
from dsm_jax.tweedie import denoise, posterior_covariance, posterior_mean

WEIGHTS = [0.2, 0.5, 0.3]
MEANS = [[-2.0, 1.0, 0.0], [1.5, -0.5, 1.0], [0.5, 2.0, -1.5]]
COVS = [
    [[0.5, 0.1, 0.0], [0.1, 0.3, 0.05], [0.0, 0.05, 0.4]],
    [[0.3, -0.1, 0.0], [-0.1, 0.6, 0.1], [0.0, 0.1, 0.2]],
    [[0.2, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, 0.2]],
]


def _gmm():
    """Built at call time, so that it is float64 under the x64 fixture."""
    return GaussianMixture(WEIGHTS, MEANS, COVS)


GMM = _gmm()
# (sigma, scale): VE-type and VP-type noising.
NOISE = [(0.3, 1.0), (1.2, 1.0), (0.6, 0.8)]


@functools.partial(jax.jit, static_argnames=("n",))
def _noisy_points(gmm, key, sigma, scale, n=64):
    x = gmm.sample(key, n)
    y = scale * x + sigma * jax.random.normal(jax.random.fold_in(key, 1), x.shape)
    # A few points far from every mode, where a naive mixture score underflows.
    return jnp.concatenate([y, jnp.array([[30.0, -40.0, 25.0], [-50.0, 0.0, 10.0]])])


# Everything is compiled once per test (jit) rather than dispatched op by op: much faster.


@pytest.mark.parametrize("sigma, scale", NOISE)
def test_posterior_mean_matches_gmm(sigma, scale, getkey, x64):
    gmm = _gmm()
    y = _noisy_points(gmm, getkey(), sigma, scale)
    got, expected = jax.jit(
        lambda y: (
            posterior_mean(gmm.convolve(sigma, scale=scale).score, y, sigma, scale=scale),
            gmm.posterior_mean(y, sigma, scale=scale),
        )
    )(y)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sigma, scale", NOISE)
def test_posterior_covariance_matches_gmm(sigma, scale, getkey, x64):
    gmm = _gmm()
    y = _noisy_points(gmm, getkey(), sigma, scale)
    cov, expected = jax.jit(
        lambda y: (
            posterior_covariance(gmm.convolve(sigma, scale=scale).score, y, sigma, scale=scale),
            gmm.posterior_covariance(y, sigma, scale=scale),
        )
    )(y)
    assert cov.shape == (y.shape[0], 3, 3)
    np.testing.assert_allclose(cov, expected, rtol=1e-8, atol=1e-9)


def test_float32_and_per_example_sigma(getkey):
    """Per-example sigma [B] and scale [B]; float32 accuracy."""
    sigma = jnp.array([0.3, 0.3, 0.9, 0.9])
    low = jnp.array([True, True, False, False])[:, None]
    y = _noisy_points(GMM, getkey(), 0.5, 1.0, n=2)

    def both(y):
        score = lambda z: jnp.where(low, GMM.convolve(0.3).score(z), GMM.convolve(0.9).score(z))
        expected = jnp.where(low, GMM.posterior_mean(y, 0.3), GMM.posterior_mean(y, 0.9))
        return posterior_mean(score, y, sigma), expected

    got, expected = jax.jit(both)(y)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_covariance_of_a_gaussian_is_constant():
    g = Gaussian(jnp.array([1.0, -1.0]), jnp.array([[1.0, 0.5], [0.5, 2.0]]))
    y = jnp.array([[0.0, 0.0], [10.0, -3.0]])
    cov, expected = jax.jit(
        lambda y: (posterior_covariance(g.convolve(0.7).score, y, 0.7), g.posterior_covariance(y, 0.7))
    )(y)
    np.testing.assert_allclose(cov, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sigma, scale", NOISE)
def test_denoise_for_every_parameterization(sigma, scale, getkey):
    y = _noisy_points(GMM, getkey(), sigma, scale)[:16]
    score = GMM.convolve(sigma, scale=scale).score
    models = {
        "score": lambda x, s: score(x),
        "eps": lambda x, s: -s[:, None] * score(x),
        "x0": lambda x, s: GMM.posterior_mean(x, sigma, scale=scale),
        "energy": lambda x, s: -GMM.convolve(sigma, scale=scale).log_prob(x),
    }
    got, expected = jax.jit(
        lambda y: (
            {k: denoise(m, y, sigma, parameterization=k, scale=scale) for k, m in models.items()},
            GMM.posterior_mean(y, sigma, scale=scale),
        )
    )(y)
    for name in models:
        np.testing.assert_allclose(got[name], expected, rtol=1e-4, atol=1e-4, err_msg=name)


def test_bad_input(getkey):
    y = jnp.ones((4, 3))
    score = GMM.convolve(0.5).score
    with pytest.raises(ValueError, match="sigma"):
        posterior_mean(score, y, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        posterior_covariance(score, y, jnp.ones(3))
    with pytest.raises(ValueError, match="scale"):
        posterior_mean(score, y, 0.5, scale=-1.0)
    with pytest.raises(ValueError, match="score_fn"):
        posterior_mean(lambda z: z[:, :2], y, 0.5)
    with pytest.raises(ValueError, match="x_noisy"):
        posterior_mean(score, y[0], 0.5)
    with pytest.raises(ValueError, match="parameterization"):
        denoise(lambda x, s: x, y, 0.5, parameterization="v")
    with pytest.raises(ValueError, match="model_fn"):
        denoise(lambda x, s: x[:, :2], y, 0.5)
    with pytest.raises(ValueError, match="x_noisy must be floating point, got dtype int32"):
        posterior_covariance(score, jnp.ones((4, 3), jnp.int32), 0.5)
    with pytest.raises(ValueError, match="x_noisy must be floating point"):
        denoise(lambda x, s: x, jnp.ones((4, 3), jnp.int32), 0.5)
