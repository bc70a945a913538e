"""ODE log-likelihoods with the exact score against the analytic log-density."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsm_jax.distributions import Gaussian, GaussianMixture
from dsm_jax.likelihood import bits_per_dim, log_likelihood, uniform_dequantization_offset, uniform_dequantize
from dsm_jax.sde import VESDE, VPSDE, SubVPSDE, exact_score_model

GAUSS = Gaussian(jnp.array([0.5, -1.0]), jnp.array([[1.0, 0.3], [0.3, 0.5]]))
GMM = GaussianMixture(jnp.array([0.3, 0.7]), jnp.array([[-1.5, 0.0], [1.0, 1.0]]), jnp.array([[0.4, 0.3], [0.3, 0.2]]))
SDES = {"ve": VESDE(0.01, 20.0), "vp": VPSDE(0.1, 20.0), "subvp": SubVPSDE(0.1, 20.0)}


def _truth(dist, sde, x):
    """log p_{t_min}(x): the density the ODE computes (data noised to t_min)."""
    scale, sigma = sde.marginal(sde.t_min)
    return dist.convolve(sigma, scale=scale).log_prob(x)


def _exact_prior(dist, sde):
    scale, sigma = sde.marginal(sde.T)
    return dist.convolve(sigma, scale=scale).log_prob


@pytest.mark.parametrize("name", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("dist", [GAUSS, GMM], ids=["gaussian", "gmm"])
def test_exact_trace_equals_analytic_log_density(name, dist, getkey):
    """With the exact score and the exact p_T as prior, the only error is the
    ODE solver's (rtol = atol = 1e-5): the result must match to ~1e-3 nats."""
    sde = SDES[name]
    model = exact_score_model(dist, sde)
    x = dist.sample(getkey(), 32)
    ll, truth = jax.jit(
        lambda x: (log_likelihood(model, sde, x, None, prior_log_prob=_exact_prior(dist, sde)), _truth(dist, sde, x))
    )(x)
    np.testing.assert_allclose(ll, truth, atol=2e-3)


def test_sde_prior_and_fixed_steps(getkey):
    """With the default N(0, I) prior, VP's prior mismatch at T is small
    (scale(T) = 6.6e-3): errors stay below 0.05 nats for points near the data;
    a fixed-step Tsit5 solve agrees with the adaptive one."""
    sde = SDES["vp"]
    model = exact_score_model(GAUSS, sde)
    x = GAUSS.sample(getkey(), 32)
    ll, ll_fixed, truth = jax.jit(
        lambda x: (
            log_likelihood(model, sde, x, None),
            log_likelihood(model, sde, x, None, num_steps=200),
            _truth(GAUSS, sde, x),
        )
    )(x)
    np.testing.assert_allclose(ll, truth, atol=0.05)
    np.testing.assert_allclose(ll_fixed, ll, atol=2e-3)


def test_solver_and_controller_objects_match_the_keywords(getkey):
    """num_steps=N is ConstantStepSize with N steps, the default is PIDController(1e-5, 1e-5) with
    Tsit5: passing the objects gives the same numbers; a Heun grid of 100 steps is within 1e-3 nats."""
    sde = SDES["vp"]
    model = exact_score_model(GAUSS, sde)
    x = GAUSS.sample(getkey(), 8)
    ll = lambda **kw: log_likelihood(model, sde, x, None, **kw)
    pid = diffrax.PIDController(rtol=1e-5, atol=1e-5)
    out = jax.jit(
        lambda: (
            ll(),
            ll(solver=diffrax.Tsit5(), stepsize_controller=pid),
            ll(num_steps=50),
            ll(num_steps=50, stepsize_controller=diffrax.ConstantStepSize()),
            ll(num_steps=100, solver=diffrax.Heun()),
        )
    )()
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[2], out[3])
    np.testing.assert_allclose(out[4], out[0], atol=1e-3)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe, getkey):
    """The Hutchinson log-likelihood (one probe per example, fixed along the
    trajectory) minus the exact-trace one has mean zero: with B = 256 independent
    examples, the mean difference is within 4 standard errors."""
    sde = SDES["vp"]
    model = exact_score_model(GMM, sde)
    x = GMM.sample(getkey(), 256)
    key = getkey()
    ll_h, ll_e = jax.jit(
        lambda x: (
            log_likelihood(model, sde, x, key, trace="hutchinson", probe=probe),
            log_likelihood(model, sde, x, None, trace="exact"),
        )
    )(x)
    diff = np.asarray(ll_h - ll_e)
    se = diff.std(ddof=1) / np.sqrt(diff.size)
    assert se > 0  # the estimator is random: a zero spread would mean the trace is exact by accident
    assert abs(diff.mean()) < 4 * se, (diff.mean(), se)


def test_bits_per_dim_and_dequantization(getkey):
    # p(x) = 1/4 on two dimensions: 1 bit per dimension.
    np.testing.assert_allclose(bits_per_dim(jnp.array([-2.0 * np.log(2.0)]), 2), [1.0], rtol=1e-6)
    assert uniform_dequantization_offset(256, (-1.0, 1.0)) == 7.0
    assert uniform_dequantization_offset(256, (0.0, 1.0)) == 8.0
    np.testing.assert_allclose(bits_per_dim(jnp.zeros(3), 4, dequantization_offset=7.0), 7.0)
    # A uniform density on [-1, 1]^D (log p = -D log 2) of 8-bit data costs exactly 8 bits per dim.
    d = 5
    np.testing.assert_allclose(bits_per_dim(jnp.array([-d * np.log(2.0)]), d, dequantization_offset=7.0), [8.0])
    levels = jnp.arange(256)
    x = uniform_dequantize(getkey(), levels, num_bins=256, data_range=(-1.0, 1.0))
    width = 2.0 / 256
    lo = -1.0 + np.arange(256) * width
    assert np.all(np.asarray(x) >= lo) and np.all(np.asarray(x) < lo + width)


def test_bad_input(getkey):
    sde = SDES["ve"]
    model = exact_score_model(GAUSS, sde)
    x = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="trace"):
        log_likelihood(model, sde, x, None, trace="nope")
    with pytest.raises(ValueError, match="key"):
        log_likelihood(model, sde, x, None, trace="hutchinson")
    with pytest.raises(ValueError, match="rtol"):
        log_likelihood(model, sde, x, None, rtol=0.0)
    with pytest.raises(ValueError, match="rtol"):
        log_likelihood(model, sde, x, None, rtol=1e-3, stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3))
    with pytest.raises(ValueError, match="solver"):
        log_likelihood(model, sde, x, None, solver="tsit5")
    with pytest.raises(ValueError, match="num_probes"):
        log_likelihood(model, sde, x, getkey(), trace="hutchinson", num_probes=0)
    with pytest.raises(ValueError, match="model_fn"):
        log_likelihood(lambda x, s: x[:, :1], sde, x, None)
    with pytest.raises(ValueError, match="sde"):
        log_likelihood(model, "ve", x, None)
    with pytest.raises(ValueError, match="x"):
        log_likelihood(model, sde, jnp.zeros(2), None)
    with pytest.raises(ValueError, match="dim"):
        bits_per_dim(jnp.zeros(2), 0)
    with pytest.raises(ValueError, match="data_range"):
        uniform_dequantization_offset(256, (1.0, -1.0))
