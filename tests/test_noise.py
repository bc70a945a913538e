"""Noise schedules, weightings and the NCSNv2 heuristics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsm_jax.noise import (
    geometric_sigmas,
    get_weighting,
    ncsnv2_gamma,
    ncsnv2_num_levels,
    ncsnv2_overlap,
    ncsnv2_sigma_max,
    ncsnv2_step_size,
    ncsnv2_step_size_objective,
    sample_log_uniform_sigmas,
)


def test_geometric_sigmas():
    s = geometric_sigmas(50.0, 0.01, 10)
    assert s.shape == (10,)
    np.testing.assert_allclose([s[0], s[-1]], [50.0, 0.01], rtol=1e-6)
    ratios = np.asarray(s[:-1] / s[1:])
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-5)
    assert np.all(np.diff(np.asarray(s)) < 0)


def test_geometric_sigmas_at_the_float32_limits():
    """Ends at the edges of the float32 range are kept, every level positive and finite."""
    s = np.asarray(geometric_sigmas(3e38, 1.2e-38, 50))
    assert s.dtype == np.float32 and np.all(np.isfinite(s)) and np.all(s > 0)
    assert np.all(np.diff(s) < 0)


def test_log_uniform_sampler_is_uniform_in_log():
    n = 100_000
    s = sample_log_uniform_sigmas(jax.random.key(0), (n,), 0.01, 10.0)
    u = (jnp.log(s) - np.log(0.01)) / (np.log(10.0) - np.log(0.01))
    assert float(s.min()) >= 0.01 and float(s.max()) <= 10.0
    # Uniform(0,1): mean 1/2 with sd sqrt(1/12/n); 5 standard errors.
    assert abs(float(u.mean()) - 0.5) < 5 * np.sqrt(1 / 12 / n)


def test_weightings():
    sig = jnp.array([0.1, 1.0, 2.0])
    np.testing.assert_allclose(get_weighting("sigma2")(sig), sig**2)
    np.testing.assert_allclose(get_weighting("one")(sig), 1.0)
    np.testing.assert_allclose(get_weighting("inv_sigma2")(sig), 1 / sig**2, rtol=1e-6)
    f = lambda s: s
    assert get_weighting(f) is f


def test_ncsnv2_sigma_max_matches_brute_force():
    x = np.asarray(jax.random.normal(jax.random.key(1), (700, 5, 3)))
    flat = x.reshape(700, -1)
    brute = np.sqrt(((flat[:, None] - flat[None]) ** 2).sum(-1)).max()
    for block in (64, 700, 1000):
        np.testing.assert_allclose(ncsnv2_sigma_max(x, block_size=block), brute, rtol=1e-5)


def test_ncsnv2_num_levels_cifar10():
    # Song & Ermon 2020 used L = 232 for CIFAR-10 (D = 3072, sigma_1 = 50, sigma_L = 0.01).
    levels = ncsnv2_num_levels(3072, 50.0, 0.01)
    assert 200 <= levels <= 240, levels
    gamma = ncsnv2_gamma(3072)
    np.testing.assert_allclose(ncsnv2_overlap(gamma, 3072), 0.5, atol=1e-6)
    # The returned count keeps adjacent ratios within gamma.
    assert (50.0 / 0.01) ** (1.0 / (levels - 1)) <= gamma


def test_ncsnv2_step_size_cifar10_config():
    sigmas = geometric_sigmas(50.0, 0.01, 232)  # gamma = 5000^(1/231)
    eps = ncsnv2_step_size(sigmas, 5)
    np.testing.assert_allclose(eps, 6.2e-6, rtol=0.02)
    gamma = 5000 ** (1 / 231)
    value = ncsnv2_step_size_objective(eps, gamma, 0.01, 5)
    # The expression is gamma^2 at eps -> 0 and stays above 1 for this gamma and T:
    # "closest to 1" is the minimiser, and it is the best step on a fine grid.
    assert 1.0 < value < gamma**2
    grid = np.linspace(0.5 * eps, 1.5 * eps, 1001)
    best = min(abs(ncsnv2_step_size_objective(e, gamma, 0.01, 5) - 1.0) for e in grid)
    assert abs(value - 1.0) <= best + 1e-12


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: geometric_sigmas(0.01, 50.0, 10), "sigma_max must exceed"),
        (lambda: geometric_sigmas(50.0, 0.0, 10), "sigma_min must be > 0"),
        (lambda: geometric_sigmas(50.0, float("nan"), 10), "sigma_min must be finite"),
        (lambda: geometric_sigmas(50.0, 0.1, 0), "num must be an integer"),
        # The float32 ends: 1e-50 would underflow to 0, 1e39 overflow to inf.
        (lambda: geometric_sigmas(5.0, 1e-50, 5), r"sigma_min must lie in \[1.175e-38, 3.403e\+38\].*1e-50"),
        (lambda: geometric_sigmas(1e39, 0.05, 5), r"sigma_max must lie in .* float32, got 1e\+39"),
        (lambda: sample_log_uniform_sigmas(jax.random.key(0), (3,), 1e-50, 1.0), "sigma_min must lie in"),
        (lambda: sample_log_uniform_sigmas(jax.random.key(0), (3,), 0.1, 1e39), "sigma_max must lie in"),
        (
            lambda: sample_log_uniform_sigmas(0, (3,), 0.1, 1.0),
            r"key must be a PRNG key: pass jax.random.key\(seed\), got 0 \(int\)",
        ),
        (lambda: get_weighting("sigma"), "weighting must be one of"),
        (lambda: ncsnv2_step_size(jnp.array([0.1, 1.0]), 5), "strictly decreasing"),
        (lambda: ncsnv2_step_size(jnp.array([1.0, 0.1]), 0), "steps_per_sigma"),
        (lambda: ncsnv2_num_levels(0, 50.0, 0.01), "dim"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
