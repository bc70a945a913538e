"""Metrics against closed forms: Fisher divergence, MMD, sliced Wasserstein, mode weights, PSNR.

Statistical checks use fixed keys; each tolerance is k standard errors,
derived at the assertion from the sample size.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from dsm_jax import metrics as M
from dsm_jax.distributions import Gaussian, GaussianMixture
from dsm_jax.likelihood import bits_per_dim

MIX = GaussianMixture(
    jnp.array([0.5, 0.3, 0.2]),
    jnp.array([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]),
    jnp.array([[0.3, 0.1], [0.1, 0.4], [0.2, 0.2]]),
)


# ---------------------------------------------------------------------------
# Fisher divergence
# ---------------------------------------------------------------------------


def test_fisher_divergence_of_the_exact_score_is_zero_and_scales():
    x = MIX.sample(jax.random.key(0), 500)
    assert float(M.fisher_divergence(MIX.score, MIX.score, x)) == 0.0
    # s = c s*: |s - s*|^2 / |s*|^2 = (1 - c)^2 at every point, so exactly on any sample.
    for c in (0.0, 0.5, 2.0):
        rel = M.fisher_divergence(lambda z, c=c: c * MIX.score(z), MIX.score, x, relative=True)
        np.testing.assert_allclose(float(rel), (1 - c) ** 2, rtol=1e-5)
    with pytest.raises(ValueError, match=r"must return x's shape \(500, 2\)"):
        M.fisher_divergence(lambda z: z[:, :1], MIX.score, x)


def _exact_models(mix):
    score = lambda x, sigma: mix.convolve(sigma[0]).score(x)
    return {
        "score": score,
        "eps": lambda x, sigma: -sigma[:, None] * score(x, sigma),
        "x0": lambda x, sigma: mix.posterior_mean(x, sigma[0]),
    }


@pytest.mark.parametrize("parameterization", ["score", "eps", "x0"])
def test_per_sigma_fisher_divergence_of_exact_models_is_zero(parameterization):
    sigmas = jnp.array([2.0, 0.5, 0.1])
    model = _exact_models(MIX)[parameterization]
    out = M.per_sigma_fisher_divergence(
        model, MIX, sigmas, jax.random.key(1), num_samples=500, parameterization=parameterization
    )
    assert out.absolute.shape == out.relative.shape == (3,)
    np.testing.assert_array_equal(out.sigmas, sigmas)
    # "score" is the target itself; "eps" and "x0" go through a float32 conversion (Tweedie for x0).
    np.testing.assert_allclose(out.relative, 0.0, atol=1e-5)


def test_per_sigma_fisher_divergence_closed_form_for_a_gaussian():
    """Data N(0, v I_d), model = the clean score -x / v at every sigma. With
    p_sigma = N(0, (v + sigma^2) I): s - s* = -x sigma^2 / (v (v + sigma^2)), so
    relative = (sigma^2 / v)^2 exactly at every point, and
    absolute = E|x|^2 sigma^4 / (v (v + sigma^2))^2 = d sigma^4 / (v^2 (v + sigma^2))."""
    v, d, n = 0.5, 3, 4000
    g = Gaussian(jnp.zeros(d), jnp.full(d, v))
    sigmas = jnp.array([1.0, 0.3])
    out = M.per_sigma_fisher_divergence(lambda x, s: -x / v, g, sigmas, jax.random.key(2), num_samples=n)
    s2 = np.asarray(sigmas, np.float64) ** 2
    np.testing.assert_allclose(out.relative, (s2 / v) ** 2, rtol=1e-5)
    expected = d * s2**2 / (v**2 * (v + s2))
    # |x|^2 ~ (v + sigma^2) chi^2_d has relative standard deviation sqrt(2 / d); 4 standard errors of the mean.
    np.testing.assert_allclose(out.absolute, expected, rtol=4 * math.sqrt(2 / d / n))


def test_per_sigma_fisher_divergence_rejects_bad_input():
    with pytest.raises(ValueError, match="sigmas must be > 0"):
        M.per_sigma_fisher_divergence(lambda x, s: x, MIX, jnp.array([1.0, 0.0]), jax.random.key(0))
    with pytest.raises(ValueError, match="parameterization must be one of"):
        M.per_sigma_fisher_divergence(
            lambda x, s: x, MIX, jnp.array([1.0]), jax.random.key(0), parameterization="noise"
        )


# ---------------------------------------------------------------------------
# MMD
# ---------------------------------------------------------------------------


N_MMD = 400  # one sample size for most MMD tests: each new shape costs a compilation


def _mmd2_float64(x, y, h):
    """Unbiased MMD^2 straight from the definition, in float64 (reference)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    k = lambda a, b: np.exp(-np.sum((a[:, None] - b[None]) ** 2, -1) / (2 * h * h))
    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return (
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * k(x, y).mean()
    )


def test_mmd_of_identical_sets():
    x = MIX.sample(jax.random.key(3), N_MMD)
    assert abs(float(M.mmd2(x, x, bandwidth=1.0, unbiased=False))) < 1e-6
    # Unbiased with y = x: 2 (S - n) / (n (n-1)) - 2 S / n^2 = -2 (1 - mean K) / (n - 1), K the Gram matrix.
    xn = np.asarray(x, np.float64)
    gram = np.exp(-np.sum((xn[:, None] - xn[None]) ** 2, -1) / 2.0)
    expected = -2.0 * (1.0 - gram.mean()) / (len(xn) - 1)
    np.testing.assert_allclose(float(M.mmd2(x, x, bandwidth=1.0)), expected, rtol=1e-4)


def test_mmd_blocks_match_the_definition():
    # Sizes that no block divides: the padding must not count.
    x, y = MIX.sample(jax.random.key(4), 50), MIX.sample(jax.random.key(5), 33) + 0.3
    np.testing.assert_allclose(
        float(M.mmd2(x, y, bandwidth=0.7, block_size=7)), _mmd2_float64(x, y, 0.7), rtol=1e-4, atol=1e-7
    )


def test_mmd_never_builds_the_full_gram_matrix():
    n = m = 3000

    def largest(jaxpr, sizes):
        for eqn in jaxpr.eqns:
            sizes.extend(math.prod(v.aval.shape) for v in eqn.outvars)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, jex_core.ClosedJaxpr):
                        largest(sub.jaxpr, sizes)
                    elif isinstance(sub, jex_core.Jaxpr):
                        largest(sub, sizes)
        return max(sizes)

    fn = lambda a, b: M.mmd2(a, b, bandwidth=1.0, block_size=256)
    jaxpr = jax.make_jaxpr(fn)(jnp.zeros((n, 2)), jnp.zeros((m, 2)))
    assert largest(jaxpr.jaxpr, []) == 256 * m


def test_mmd_of_shifted_gaussians_matches_the_closed_form():
    """x ~ N(0, s^2 I_d), y ~ N(delta, s^2 I_d), k = exp(-|a - b|^2 / (2 h^2)).
    For Z ~ N(mu, S I_d): E exp(-|Z|^2 / (2 h^2)) = (h^2 / (h^2 + S))^{d/2} exp(-|mu|^2 / (2 (h^2 + S))),
    so MMD^2 = 2 c (1 - exp(-|delta|^2 / (2 (h^2 + 2 s^2)))), c = (h^2 / (h^2 + 2 s^2))^{d/2}.
    The estimator is unbiased: the mean of R independent estimates is within 4
    standard errors (their sd / sqrt(R)) of it."""
    s, h, d, n, reps = 1.0, 1.0, 2, N_MMD, 32
    delta = jnp.array([1.0, 0.0])
    c = (h**2 / (h**2 + 2 * s**2)) ** (d / 2)
    exact = 2 * c * (1 - math.exp(-1.0 / (2 * (h**2 + 2 * s**2))))
    keys = jax.random.split(jax.random.key(6), 2 * reps)
    est = np.array(
        [
            float(
                M.mmd2(
                    s * jax.random.normal(keys[2 * i], (n, d)),
                    delta + s * jax.random.normal(keys[2 * i + 1], (n, d)),
                    bandwidth=h,
                )
            )
            for i in range(reps)
        ]
    )
    se = est.std(ddof=1) / math.sqrt(reps)
    assert abs(est.mean() - exact) < 4 * se, (est.mean(), exact, se)
    assert se < 0.05 * exact  # the check is sharp enough to see a wrong constant


def test_median_bandwidth_of_a_gaussian():
    """For z ~ N(0, s^2 I_2), |z - z'|^2 = 2 s^2 E with E ~ Exp(1), so the median squared
    distance is 4 ln(2) s^2. The sample median over pairs of n points is a U-quantile with
    standard deviation <= 1 / (sqrt(n) f(m)), f(m) = 1 / (4 s^2) the density at the median:
    <= 4 s^2 / sqrt(n), i.e. <= 2.3% of h = sqrt(4 ln 2) s for n = 1000. 4 of those: 9%."""
    s = 1.5
    x = s * jax.random.normal(jax.random.key(7), (2000, 2))
    h = float(M.median_bandwidth(x, max_points=1000))
    expected = math.sqrt(4 * math.log(2)) * s
    tol = 4 * 0.5 * (4 * s**2 / math.sqrt(1000)) / (4 * math.log(2) * s**2)
    assert abs(h / expected - 1) < tol, (h, expected, tol)
    # Pooled: half of the points from each sample; a far-away y widens the bandwidth.
    assert float(M.median_bandwidth(x, x + 10.0)) > 3 * h


def test_mmd_floor_is_centred_at_zero_and_has_power():
    """Null values (two fresh samples of the same law) have mean 0 for the unbiased
    statistic: their mean is within 4 standard errors of 0. The biased V-statistic on
    the same pairs is off by ~2 (1 - E k) / n, which this check does detect; and a
    sample of a shifted law sits far above the floor."""
    n, pairs = N_MMD, 16
    floor = M.mmd2_floor(MIX.sample, jax.random.key(8), n, num_pairs=pairs, bandwidth=1.0)
    assert floor.values.shape == (pairs,) and float(floor.bandwidth) == 1.0
    se = float(jnp.std(floor.values, ddof=1)) / math.sqrt(pairs)
    assert abs(float(jnp.mean(floor.values))) < 4 * se
    np.testing.assert_allclose(float(floor.floor), float(jnp.sqrt(jnp.mean(floor.values**2))), rtol=1e-6)
    keys = jax.random.split(jax.random.key(8), 2 * pairs)
    biased = [
        float(M.mmd2(MIX.sample(keys[2 * i], n), MIX.sample(keys[2 * i + 1], n), bandwidth=1.0, unbiased=False))
        for i in range(pairs)
    ]
    assert np.mean(biased) > 4 * se
    shifted = MIX.sample(jax.random.key(9), n) + jnp.array([0.5, 0.0])
    assert float(M.mmd2(shifted, MIX.sample(jax.random.key(10), n), bandwidth=1.0)) > 10 * float(floor.floor)


def test_mmd_floor_from_an_array_and_against_a_test_set():
    train, test = MIX.sample(jax.random.key(11), N_MMD), MIX.sample(jax.random.key(12), N_MMD)
    # n = the array's size: drawing without replacement takes every row (in some order),
    # so each null value is the MMD of the whole array against `test`.
    floor = M.mmd2_floor(train, jax.random.key(13), N_MMD, against=test, num_pairs=3, bandwidth=1.0)
    assert floor.values.shape == (3,)
    np.testing.assert_allclose(floor.values, [_mmd2_float64(train, test, 1.0)] * 3, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="reference holds 400 examples, fewer than n=401"):
        M.mmd2_floor(train, jax.random.key(13), N_MMD + 1)


def test_mmd_rejects_bad_input():
    x = jnp.zeros((5, 2))
    with pytest.raises(ValueError, match="same shape"):
        M.mmd2(x, jnp.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least 2 points in each sample, got n=5, m=1"):
        M.mmd2(x, jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        M.mmd2(x, x, bandwidth=0.0)


# ---------------------------------------------------------------------------
# Sliced Wasserstein
# ---------------------------------------------------------------------------


def test_sliced_wasserstein_of_a_shift():
    """y = x + delta translates every projection by theta.delta, so W_p = |theta.delta| per
    direction. In 2-D, theta.delta = |delta| cos(phi), phi uniform:
    p = 2: E cos^2 = 1/2, Var cos^2 = 3/8 - 1/4 = 1/8;
    p = 1: E|cos| = 2/pi, Var |cos| = 1/2 - 4/pi^2. Tolerance: 4 standard errors over P directions."""
    x = MIX.sample(jax.random.key(14), 500)
    delta = jnp.array([0.6, -0.8])  # |delta| = 1
    num = 2000
    sw2 = float(M.sliced_wasserstein(x, x + delta, jax.random.key(15), num_projections=num, p=2))
    assert abs(sw2**2 - 0.5) < 4 * math.sqrt(1 / 8 / num)
    sw1 = float(M.sliced_wasserstein(x, x + delta, jax.random.key(15), num_projections=num, p=1))
    assert abs(sw1 - 2 / math.pi) < 4 * math.sqrt((0.5 - 4 / math.pi**2) / num)


def test_sliced_wasserstein_is_exact_per_direction():
    # Same empirical law (reordered, duplicated): distance 0.
    x = MIX.sample(jax.random.key(16), 200)
    xx = jnp.concatenate([x[::-1], x])
    assert float(M.sliced_wasserstein(x, xx, jax.random.key(0), num_projections=16)) < 1e-5
    # 1-D, sizes 2 and 4: quantile functions {0, 1} and {0, 1, 2, 3} on quarters differ by 0, 1, 1, 2.
    a, b = jnp.array([[0.0], [1.0]]), jnp.array([[3.0], [1.0], [0.0], [2.0]])
    np.testing.assert_allclose(
        float(M.sliced_wasserstein(a, b, jax.random.key(0), num_projections=3, p=1)), 1.0, rtol=1e-6
    )
    np.testing.assert_allclose(
        float(M.sliced_wasserstein(a, b, jax.random.key(0), num_projections=3, p=2)), math.sqrt(1.5), rtol=1e-6
    )
    with pytest.raises(ValueError, match="p must be a number >= 1, got 0.5"):
        M.sliced_wasserstein(a, b, jax.random.key(0), p=0.5)


# ---------------------------------------------------------------------------
# Mode weights
# ---------------------------------------------------------------------------

FAR = GaussianMixture(
    jnp.array([0.5, 0.3, 0.2]), jnp.array([[-6.0, 0.0], [6.0, 0.0], [0.0, 8.0]]), jnp.full((3, 2), 0.25)
)


def test_mode_weights_recover_the_mixture_weights():
    """Modes 12+ standard deviations apart: misassignment has probability < 1e-9, so the
    counts are multinomial; each weight is within 4 binomial standard errors sqrt(w (1-w) / n).
    With r = 2 the rejected fraction is P(chi^2_2 > 4) = exp(-2), within 4 standard errors."""
    n = 20000
    x = FAR.sample(jax.random.key(17), n)
    out = M.mode_weights(x, FAR)
    w = np.asarray(FAR.weights)
    assert np.all(np.abs(np.asarray(out.weights) - w) < 4 * np.sqrt(w * (1 - w) / n))
    assert float(out.rejected_fraction) == 0.0 and float(jnp.sum(out.counts)) == n
    kept = M.mode_weights(x, FAR, max_mahalanobis=2.0)
    p = math.exp(-2.0)
    assert abs(float(kept.rejected_fraction) - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(np.asarray(kept.weights) - w) < 4 * np.sqrt(w * (1 - w) / (n * (1 - p))))


def test_mode_weights_reject_points_far_from_every_mode():
    x = jnp.array([[-6.0, 0.1], [6.2, 0.0], [0.0, 0.0], [50.0, 50.0]])
    out = M.mode_weights(x, FAR, max_mahalanobis=4.0)
    np.testing.assert_array_equal(out.counts, [1.0, 1.0, 0.0])
    np.testing.assert_allclose(float(out.rejected_fraction), 0.5)
    with pytest.raises(ValueError, match="mixture must be a GaussianMixture"):
        M.mode_weights(x, Gaussian(jnp.zeros(2), jnp.ones(2)))


# ---------------------------------------------------------------------------
# PSNR and bits/dim
# ---------------------------------------------------------------------------


def test_psnr_known_values():
    zeros = jnp.zeros((1, 8, 8, 1))
    np.testing.assert_allclose(M.psnr(zeros + 0.1, zeros, data_range=1.0), [20.0], rtol=1e-5)
    np.testing.assert_allclose(M.psnr(zeros + 0.2, zeros, data_range=2.0), [20.0], rtol=1e-5)
    np.testing.assert_allclose(
        M.psnr(jnp.ones((2, 3)), jnp.zeros((2, 3)), data_range=255.0), [20 * math.log10(255.0)] * 2, rtol=1e-5
    )
    # Per example: half the pixels off by 1 (MSE 1/2) on [-1, 1] data.
    x = jnp.array([[1.0, -1.0], [0.0, 0.0]])
    np.testing.assert_allclose(M.psnr(x, jnp.array([[0.0, -1.0], [0.0, 0.0]])), [10 * math.log10(8.0), np.inf])
    with pytest.raises(ValueError, match="same shape"):
        M.psnr(x, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="data_range must be > 0"):
        M.psnr(x, x, data_range=0.0)


def test_bits_per_dim_is_the_likelihood_one():
    assert M.bits_per_dim is bits_per_dim
    # p = 2^-3 per dimension over 4 dimensions: 3 bits/dim.
    np.testing.assert_allclose(M.bits_per_dim(jnp.array([-12 * math.log(2.0)]), 4), [3.0], rtol=1e-6)
