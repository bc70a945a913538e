"""Score-matching losses against closed forms and their defining identities."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from dsm_jax import debug_checks
from dsm_jax.distributions import Gaussian, GaussianMixture
from dsm_jax.divergence import SlowPathWarning
from dsm_jax.losses import (
    dsm_loss,
    explicit_score_matching_loss,
    multiscale_dsm_loss,
    per_sigma_dsm_losses,
    sde_dsm_loss,
    sliced_score_matching_loss,
    sure_loss,
)
from dsm_jax.losses.denoising import _dsm_per_example
from dsm_jax.noise import geometric_sigmas
from dsm_jax.sde import VESDE

TWO_CLUSTERS = GaussianMixture(jnp.array([0.5, 0.5]), jnp.array([[2.0, 2.0], [-2.0, -2.0]]), jnp.full((2, 2), 0.25))


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


def test_trace_losses_take_the_model_signature(x64):
    """With sigma= the losses call model(x, sigma) per example: the closed form, the closure's numbers, no warning."""
    g = Gaussian(jnp.array([1.0, -1.0, 0.5]), jnp.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]]))
    noised_score = lambda z, s: jax.vmap(lambda zi, si: g.convolve(si).score(zi[None])[0])(z, s)
    x = jax.random.normal(jax.random.key(40), (6, 3))
    sigma = jnp.linspace(0.2, 1.5, 6)
    # Explicit SM of s = -P (x - mu), P = (C + sigma^2 I)^{-1}: mean of -tr(P) + 1/2 |P (x - mu)|^2.
    prec = jnp.linalg.inv(g.cov[None] + sigma[:, None, None] ** 2 * jnp.eye(3))
    r = jnp.einsum("bij,bj->bi", prec, x - g.mean)
    closed = jnp.mean(-jnp.trace(prec, axis1=1, axis2=2) + 0.5 * jnp.sum(r**2, axis=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the per-example path: no SlowPathWarning
        fast = explicit_score_matching_loss(noised_score, x, sigma=sigma)
        sliced = sliced_score_matching_loss(noised_score, x, jax.random.key(41), sigma=sigma, num_projections=2)
        sure_loss(lambda y, s: y, x, sigma, trace="exact")  # SURE passes its [B] sigma the same way
    np.testing.assert_allclose(fast, closed, rtol=1e-12)
    with pytest.warns(SlowPathWarning, match="sigma=sigma_batch"):
        old = explicit_score_matching_loss(lambda z: noised_score(z, sigma), x)
    np.testing.assert_allclose(fast, old, rtol=1e-12)
    old_sliced = sliced_score_matching_loss(lambda z: noised_score(z, sigma), x, jax.random.key(41), num_projections=2)
    np.testing.assert_allclose(sliced, old_sliced, rtol=1e-12)


def test_sliced_sm_variance_reduction_lowers_variance():
    d = 4
    model = _mlp_model(jax.random.key(6), d)
    score = lambda z: model(z, jnp.ones(z.shape[0]))
    x = jax.random.normal(jax.random.key(7), (8, d))
    keys = jax.random.split(jax.random.key(8), 2000)
    var = lambda vr: jax.vmap(
        lambda k: sliced_score_matching_loss(score, x, k, probe="gaussian", variance_reduction=vr)
    )(keys).var()
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
    for s, k in zip(sigmas, keys, strict=True):
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
    loop = [dsm_loss(model, x, s, k, parameterization=parameterization) for s, k in zip(sigmas, keys, strict=True)]
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
    ones = [
        multiscale_dsm_loss(model, x[j : j + 1], sigmas, keys[j], sigma_sampling=sigma_sampling, return_per_sigma=True)
        for j in range(12)
    ]
    np.testing.assert_allclose(loss, np.mean([loss_j for loss_j, _ in ones]), rtol=1e-5)
    with warnings.catch_warnings():  # levels no example drew are all-NaN columns: nanmean warns, gives NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        expected_per = np.nanmean(np.stack([np.asarray(p) for _, p in ones]), axis=0)
    np.testing.assert_allclose(per, expected_per, rtol=1e-5)
    # Raw uint32 keys work the same way, and a wrong number of keys is an error naming both counts.
    raw = jax.vmap(jax.random.key_data)(keys)
    np.testing.assert_allclose(
        multiscale_dsm_loss(model, x, sigmas, raw, sigma_sampling=sigma_sampling), loss, rtol=1e-6
    )
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
    strat_and_grid = jax.vmap(
        lambda k: jnp.stack(
            [
                multiscale_dsm_loss(
                    model, jax.random.normal(k, (64, d)), two, jax.random.fold_in(k, 1), sigma_sampling=m
                )
                for m in ("stratified", "all")
            ]
        )
    )(keys)
    strat, grid = strat_and_grid[:, 0], strat_and_grid[:, 1]
    g = np.sqrt(b / a)
    tol = 5 * float(strat.std()) / np.sqrt(keys.shape[0])
    assert abs(float(strat.mean()) - expected(a / g, b * g)) < tol
    assert abs(float(grid.mean()) - float(strat.mean())) > 5 * tol
    loss, per = multiscale_dsm_loss(
        model, jnp.ones((512, d)), sigmas, keys[0], sigma_sampling="log_uniform", return_per_sigma=True
    )
    assert per.shape == (5,) and np.all(np.isfinite(np.asarray(per)))


def test_losses_are_jittable_and_differentiable():
    x = jax.random.normal(jax.random.key(24), (16, 2))
    sigmas = geometric_sigmas(2.0, 0.1, 4)

    def model(params, y, s):
        return y @ params["w"] + params["b"] * jnp.log(s)[:, None]

    params = {"w": jnp.eye(2), "b": jnp.ones(2)}
    for sampling in ("all", "random"):
        f = jax.jit(
            jax.value_and_grad(
                lambda p, k, sampling=sampling: multiscale_dsm_loss(
                    functools.partial(model, p), x, sigmas, k, sigma_sampling=sampling
                )
            )
        )
        value, grads = f(params, jax.random.key(0))
        assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    g = jax.grad(lambda p: sliced_score_matching_loss(lambda y: model(p, y, jnp.ones(16)), x, jax.random.key(1)))(
        params
    )
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
        (
            lambda m, x, k: multiscale_dsm_loss(m, x, jnp.ones(3), k, sigma_sampling="one"),
            "sigma_sampling must be one of",
        ),
        (lambda m, x, k: sliced_score_matching_loss(lambda y: y, x, k, probe="normal"), "probe must be one of"),
        (lambda m, x, k: sliced_score_matching_loss(lambda y: y, x, k, num_projections=0), "num_projections"),
        (lambda m, x, k: sure_loss(m, x, 0.5, None), "key must be a PRNG key"),
        (lambda m, x, k: sure_loss(m, x, 0.5, k, trace="approx"), "trace must be one of"),
        # A key that is not a PRNG key names the fix.
        (
            lambda m, x, k: multiscale_dsm_loss(m, x, jnp.ones(3), 0),
            r"key must be a PRNG key \(or a batch of them.*\): pass jax.random.key\(seed\), got 0 \(int\)",
        ),
        (
            lambda m, x, k: multiscale_dsm_loss(m, x, jnp.ones(3), jnp.ones((8, 2))),
            r"key must be a PRNG key .*dtype float32",
        ),
        (lambda m, x, k: dsm_loss(m, x, 0.5, 7), r"key must be a PRNG key: pass jax.random.key\(seed\), got 7 \(int\)"),
        (lambda m, x, k: per_sigma_dsm_losses(m, x, jnp.ones(3), 1), "key must be a PRNG key"),
        (lambda m, x, k: sliced_score_matching_loss(lambda y: y, x, 0), "key must be a PRNG key"),
        (lambda m, x, k: sure_loss(m, x, 0.5, 3), "key must be a PRNG key"),
        (lambda m, x, k: sde_dsm_loss(m, x, VESDE(), 0), "key must be a PRNG key"),
        # Integer data.
        (lambda m, x, k: dsm_loss(m, x.astype(jnp.int32), 0.5, k), "x must be floating point, got dtype int32"),
        (lambda m, x, k: multiscale_dsm_loss(m, x.astype(jnp.int32), jnp.ones(3), k), "x must be floating point"),
        (lambda m, x, k: per_sigma_dsm_losses(m, x.astype(jnp.int32), jnp.ones(3), k), "x must be floating point"),
        (lambda m, x, k: explicit_score_matching_loss(lambda y: y, x.astype(jnp.int32)), "x must be floating point"),
        (lambda m, x, k: sliced_score_matching_loss(lambda y: y, x.astype(jnp.int32), k), "x must be floating point"),
        (lambda m, x, k: sure_loss(m, x.astype(jnp.int32), 0.5, k), "y must be floating point"),
        (lambda m, x, k: sde_dsm_loss(m, x.astype(jnp.int32), VESDE(), k), "x must be floating point"),
        # Stratified cells need a monotone grid.
        (
            lambda m, x, k: multiscale_dsm_loss(m, x, jnp.array([1.0, 0.1, 0.5]), k, sigma_sampling="stratified"),
            r"sigmas must be strictly monotone .*got \[1. , 0.1, 0.5\]",
        ),
        # The model signature's sigma.
        (lambda m, x, k: explicit_score_matching_loss(m, x, sigma=0.0), "sigma must be > 0"),
        (
            lambda m, x, k: sliced_score_matching_loss(m, x, k, sigma=jnp.ones(3)),
            r"sigma must be a scalar or have shape \[B\]",
        ),
    ],
)
def test_bad_input(call, match):
    model = _mlp_model(jax.random.key(27), 2)
    with pytest.raises(ValueError, match=match):
        call(model, jnp.ones((8, 2)), jax.random.key(0))


def test_stratified_accepts_either_order(x64):
    """An increasing grid has the same cells as the decreasing one (run through the other way)."""
    from dsm_jax.losses.denoising import _jitter_in_log_cells

    sigmas = jnp.array([3.0, 1.0, 0.5, 0.05])
    u = jax.random.uniform(jax.random.key(30), (4, 16), dtype=jnp.float64)
    np.testing.assert_allclose(
        _jitter_in_log_cells(sigmas[::-1], 1.0 - u[::-1]), _jitter_in_log_cells(sigmas, u)[::-1], rtol=1e-12
    )
    model = _mlp_model(jax.random.key(31), 2)
    loss = multiscale_dsm_loss(model, jnp.ones((8, 2)), sigmas[::-1], jax.random.key(32), sigma_sampling="stratified")
    assert np.isfinite(loss)


# ---------------------------------------------------------------------------
# Opt-in run-time checks
# ---------------------------------------------------------------------------


def test_runtime_checks_catch_traced_sigma_zero():
    model = _mlp_model(jax.random.key(42), 2)
    x = jax.random.normal(jax.random.key(43), (8, 2))
    key = jax.random.key(44)
    f = lambda s, x: dsm_loss(model, x, s, key)
    loss = jax.jit(f)
    assert not np.isfinite(loss(0.0, x))  # off (the default): a traced sigma = 0 is not checked
    multi = lambda s: multiscale_dsm_loss(model, x, s, key, sigma_sampling="stratified")
    with debug_checks():
        # `loss` was traced without the checks: entering the block retraces it with them.
        err, _ = checkify.checkify(loss)(0.0, x)
        assert "sigma must be finite and > 0 (traced value), got min 0.0, max 0.0" in err.get()
        checked = jax.jit(checkify.checkify(f))
        assert "sigma must be finite and > 0" in checked(jnp.full(8, 0.5).at[3].set(jnp.inf), x)[0].get()
        assert (
            "x must be finite, got 1 non-finite entries" in checked(jnp.full(8, 0.5), x.at[0, 0].set(jnp.nan))[0].get()
        )
        assert checked(jnp.full(8, 0.5), x)[0].get() is None
        assert "sigmas must be finite and > 0" in jax.jit(checkify.checkify(multi))(jnp.array([1.0, 0.0]))[0].get()
        # Outside jit a failed check raises at once.
        with pytest.raises(checkify.JaxRuntimeError, match="x must be finite"):
            dsm_loss(model, x.at[0, 0].set(jnp.nan), 0.5, key)
    assert not np.isfinite(loss(0.0, x))  # off again after the block


def test_runtime_checks_off_add_nothing_to_the_program():
    """With the checks off the jaxpr has no check and is the same before and after a checked trace."""
    model = _mlp_model(jax.random.key(45), 2)
    x = jax.random.normal(jax.random.key(46), (8, 2))
    sigmas = geometric_sigmas(2.0, 0.1, 4)
    f = lambda s, x: multiscale_dsm_loss(model, x, s, jax.random.key(47), sigma_sampling="stratified")
    off = jax.make_jaxpr(f)(sigmas, x)
    assert "check[" not in str(off)
    checkified_off = jax.make_jaxpr(checkify.checkify(f))(sigmas, x)
    with debug_checks():
        checkified_on = jax.make_jaxpr(checkify.checkify(f))(sigmas, x)
    assert len(checkified_on.eqns) > len(checkified_off.eqns)
    assert str(jax.make_jaxpr(f)(sigmas, x)) == str(off)
