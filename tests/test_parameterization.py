"""The parameterizations (score, eps, x0, v) against the exact GMM answers, where "v" is refused, and min-SNR."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsm_jax.distributions import GaussianMixture
from dsm_jax.losses import dsm_loss
from dsm_jax.noise import get_weighting, min_snr_weighting
from dsm_jax.parameterization import (
    as_score_fn,
    convert_model,
    score_from_model,
    score_to_output,
)

OUTPUTS = ("score", "eps", "x0", "v")
# VP-type noising: scale^2 + sigma^2 = 1, from nearly clean to nearly pure noise.
VP_SIGMAS = (0.05, 0.6, 0.995)


def _gmm():
    return GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -1.0]], [[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]]])


def _exact_score_model(gmm, scale):
    """The exact score of ``scale x0 + sigma eps`` as a ``model_fn(x, sigma)`` (one sigma per call)."""
    return lambda x, sigma: gmm.convolve(sigma[0], scale=scale).score(x)


def _points(gmm, sigma, scale):
    x0 = gmm.sample(jax.random.key(0), 32)
    return scale * x0 + sigma * jax.random.normal(jax.random.key(1), x0.shape, dtype=x0.dtype)


@pytest.mark.parametrize("sigma", VP_SIGMAS)
def test_exact_outputs_match_the_posterior_means(sigma, x64):
    """x0 is E[x0 | x], eps is E[eps | x], v is scale E[eps | x] - sigma E[x0 | x] (Salimans & Ho's definition)."""
    gmm, scale = _gmm(), float(np.sqrt(1.0 - sigma**2))
    x = _points(gmm, sigma, scale)
    sig = jnp.full((x.shape[0],), sigma)
    score = gmm.convolve(sigma, scale=scale).score(x)
    x0_mean = gmm.posterior_mean(x, sigma, scale=scale)
    eps_mean = (x - scale * x0_mean) / sigma
    expected = {"score": score, "eps": eps_mean, "x0": x0_mean, "v": scale * eps_mean - sigma * x0_mean}
    for name in OUTPUTS:
        np.testing.assert_allclose(
            score_to_output(score, x, sig, name, scale=scale), expected[name], rtol=1e-9, atol=1e-9
        )


@pytest.mark.parametrize("sigma", VP_SIGMAS)
def test_converting_the_exact_model_between_all_parameterizations_keeps_the_score(sigma, x64):
    gmm, scale = _gmm(), float(np.sqrt(1.0 - sigma**2))
    x = _points(gmm, sigma, scale)
    exact = _exact_score_model(gmm, scale)
    want = exact(x, jnp.full((x.shape[0],), sigma))
    for source, target in itertools.product(OUTPUTS, OUTPUTS):
        model = convert_model(exact, parameterization="score", target=source, scale=scale)
        model = convert_model(model, parameterization=source, target=target, scale=scale)
        got = score_from_model(model, x, sigma, parameterization=target, scale=scale)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9, err_msg=f"{source} -> {target}")


def test_v_model_dsm_loss_equals_the_score_model_loss(x64):
    """The DSM loss sees only the score: the exact model gives the same loss whatever it outputs."""
    gmm, sigma = _gmm(), 0.6
    scale = float(np.sqrt(1.0 - sigma**2))
    exact = _exact_score_model(gmm, scale)
    x = gmm.sample(jax.random.key(2), 256)
    want = dsm_loss(exact, x, sigma, jax.random.key(3), scale=scale)
    for name in OUTPUTS[1:]:
        model = convert_model(exact, parameterization="score", target=name, scale=scale)
        got = dsm_loss(model, x, sigma, jax.random.key(3), parameterization=name, scale=scale)
        np.testing.assert_allclose(got, want, rtol=1e-9)


@pytest.mark.parametrize(
    "scale, sigma, match",
    [
        (1.0, 0.5, "variance-exploding"),  # the library's default noising x0 + sigma eps
        (1.2, 0.5, "variance-preserving"),
        (-0.5, 0.5, "variance-preserving"),
        (0.8, 0.5, r"scale\^2 \+ sigma\^2 = 0.89"),
        (np.array([0.6, 0.6]), np.array([0.8, 0.7]), r"scale\^2 \+ sigma\^2"),
    ],
)
def test_v_is_refused_where_it_is_not_defined(scale, sigma, match):
    model = lambda x, s: jnp.zeros_like(x)
    x = jnp.ones((2, 2))
    with pytest.raises(ValueError, match=match):
        score_from_model(model, x, sigma, parameterization="v", scale=scale)


def test_v_is_refused_at_wrap_time_for_the_default_ve_scale():
    with pytest.raises(ValueError, match="variance-exploding"):
        as_score_fn(lambda x, s: x, parameterization="v")
    with pytest.raises(ValueError, match="variance-exploding"):
        convert_model(lambda x, s: x, parameterization="score", target="v")


def test_v_on_the_unit_circle_passes_and_traced_values_are_the_callers():
    model = lambda x, s: jnp.ones_like(x)
    x = jnp.ones((2, 2))
    sigma, scale = 0.6, 0.8
    got = score_from_model(model, x, sigma, parameterization="v", scale=scale)
    np.testing.assert_allclose(got, -(scale * 1.0 + sigma * 1.0) / sigma * np.ones((2, 2)), rtol=1e-6)
    traced = jax.jit(lambda a, s: score_from_model(model, x, s, parameterization="v", scale=a))(0.8, 0.6)
    np.testing.assert_allclose(traced, got, rtol=1e-6)


# ---------------------------------------------------------------------------
# The min-SNR weighting
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("vp", [False, True])
def test_min_snr_matches_the_papers_formula(vp):
    sigma = np.logspace(-3, 1 if not vp else -0.001, 50)
    scale = np.sqrt(1.0 - sigma**2) if vp else np.ones_like(sigma)
    snr = scale**2 / sigma**2
    for gamma in (1.0, 5.0):
        want = sigma**2 * np.minimum(snr, gamma) / snr
        got = min_snr_weighting(jnp.asarray(sigma), jnp.asarray(scale), gamma=gamma)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
        np.testing.assert_allclose(
            np.asarray(get_weighting("min_snr", scale=scale, gamma=gamma)(sigma)), want, rtol=1e-5
        )
    # sigma2 wherever SNR <= gamma: the cap changes only the clean end.
    low = snr <= 5.0
    np.testing.assert_allclose(np.asarray(min_snr_weighting(sigma, scale))[low], sigma[low] ** 2, rtol=1e-6)


def test_min_snr_is_the_same_lambda_for_every_parameterization(x64):
    """Paper weights on each parameterization's error = 2 lambda(sigma) * 1/2 |s + eps / sigma|^2, one lambda."""
    key0, key1, key2 = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(key0, (6, 3))
    eps = jax.random.normal(key1, (6, 3))
    sigma = jnp.array([0.02, 0.1, 0.3, 0.6, 0.9, 0.999])
    scale = jnp.sqrt(1.0 - sigma**2)
    x = scale[:, None] * x0 + sigma[:, None] * eps
    eps_hat = eps + 0.3 * jax.random.normal(key2, eps.shape)  # any prediction
    score = score_to_output(-eps_hat / sigma[:, None], x, sigma, "score")
    residual = 0.5 * jnp.sum((score + eps / sigma[:, None]) ** 2, axis=1)
    lam = min_snr_weighting(sigma, scale)
    snr = scale**2 / sigma**2
    clipped = jnp.minimum(snr, 5.0)
    targets = {
        "eps": (eps, clipped / snr),
        "x0": (x0, clipped),
        "v": (scale[:, None] * eps - sigma[:, None] * x0, clipped / (snr + 1)),
    }
    for name, (target, paper_weight) in targets.items():
        out = score_to_output(score, x, sigma, name, scale=scale)
        paper = paper_weight * jnp.sum((out - target) ** 2, axis=1)
        np.testing.assert_allclose(paper, 2.0 * lam * residual, rtol=1e-9, err_msg=name)


def test_min_snr_is_finite_at_the_zero_snr_ends():
    tiny = jnp.array([1e-30, 1e-20, 1e-10], jnp.float32)  # SNR -> inf: lambda -> 0 (sigma^2 underflows)
    huge = jnp.array([1e3, 1e8, 1e15], jnp.float32)  # SNR -> 0 (VE): lambda = sigma^2
    for sigma, scale, want in ((tiny, 1.0, np.zeros(3)), (huge, 1.0, np.asarray(huge, np.float64) ** 2)):
        got = np.asarray(min_snr_weighting(sigma, scale))
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)
    # VP's pure-noise end: scale = 0 exactly, SNR = 0.
    np.testing.assert_allclose(float(min_snr_weighting(jnp.float32(1.0), 0.0)), 1.0)
    grads = jax.vmap(jax.grad(lambda s: min_snr_weighting(s, 1.0)))(jnp.concatenate([tiny, huge[:2]]))
    assert np.all(np.isfinite(np.asarray(grads)))


def test_losses_take_min_snr_with_their_noising_scale():
    from dsm_jax.losses import multiscale_dsm_loss, sde_dsm_loss
    from dsm_jax.sde import VPSDE

    model = lambda x, s: -x / (1.0 + s[:, None] ** 2)
    x = jax.random.normal(jax.random.key(0), (64, 2))
    sigmas = jnp.array([3.0, 1.0, 0.3, 0.05])
    key = jax.random.key(1)
    by_name = multiscale_dsm_loss(model, x, sigmas, key, weighting="min_snr")
    by_formula = multiscale_dsm_loss(model, x, sigmas, key, weighting=lambda s: min_snr_weighting(s, 1.0))
    np.testing.assert_allclose(by_name, by_formula, rtol=1e-6)
    # The VP SDE's scale(t), not 1: the same as the formula with scale = sqrt(1 - sigma^2).
    sde = VPSDE(0.1, 20.0)
    vp_name = sde_dsm_loss(model, x, sde, key, weighting="min_snr")
    vp_formula = sde_dsm_loss(model, x, sde, key, weighting=lambda s: min_snr_weighting(s, jnp.sqrt(1.0 - s**2)))
    np.testing.assert_allclose(vp_name, vp_formula, rtol=1e-3)
    ve_assumed = sde_dsm_loss(model, x, sde, key, weighting=lambda s: min_snr_weighting(s, 1.0))
    assert abs(float(ve_assumed) - float(vp_name)) > 1e-3 * abs(float(vp_name))


def test_min_snr_rejects_a_bad_gamma():
    with pytest.raises(ValueError, match="gamma"):
        get_weighting("min_snr", gamma=0.0)
