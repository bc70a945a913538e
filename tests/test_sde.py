"""SDEs against their closed forms, and the continuous-time DSM loss."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsm_jax.distributions import Gaussian, GaussianMixture
from dsm_jax.losses import sde_dsm_loss
from dsm_jax.sde import SDE, VESDE, VPSDE, SubVPSDE, check_score_input, exact_score_model, time_score_fn

SDES = [VESDE(0.01, 20.0), VPSDE(0.1, 20.0), SubVPSDE(0.1, 20.0)]
IDS = ["ve", "vp", "subvp"]
TIMES = jnp.array([1e-4, 0.01, 0.2, 0.5, 0.9, 1.0])


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_marginal_solves_the_moment_odes(sde, x64):
    """For dx = c(t) x dt + g(t) dw the marginal of x_0 = const obeys
    d log scale / dt = c(t) and d sigma^2 / dt = 2 c(t) sigma^2 + g(t)^2:
    ties drift and diffusion to the marginal, checked with autodiff."""
    for t in np.asarray(TIMES, dtype=np.float64):
        t = jnp.float64(t)
        dlog_scale = jax.grad(lambda u: jnp.log(sde.scale(u)))(t)
        dvar = jax.grad(lambda u: sde.sigma(u) ** 2)(t)
        c, g = sde.drift_coefficient(t), sde.diffusion(t)
        np.testing.assert_allclose(dlog_scale, c, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(dvar, 2 * c * sde.sigma(t) ** 2 + g**2, rtol=1e-8, atol=1e-12)


def test_closed_forms():
    ve, vp, sub = SDES
    scale, sigma = ve.marginal(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(scale, 1.0)
    np.testing.assert_allclose(sigma, [0.01, 20.0], rtol=1e-6)
    scale, sigma = vp.marginal(TIMES)
    np.testing.assert_allclose(scale**2 + sigma**2, 1.0, rtol=1e-6)
    # B(1) = beta_min + (beta_max - beta_min) / 2 = 10.05.
    np.testing.assert_allclose(vp.scale(1.0), np.exp(-10.05 / 2), rtol=1e-5)
    scale, sigma = sub.marginal(TIMES)
    np.testing.assert_allclose(sigma, 1.0 - scale**2, rtol=1e-5, atol=1e-7)
    # sub-VP has less variance than VP at every time.
    assert np.all(np.asarray(sub.sigma(TIMES)) < np.asarray(vp.sigma(TIMES)))
    x = jnp.ones((3, 2))
    np.testing.assert_allclose(vp.drift(x, 0.5), -0.5 * vp.beta(0.5) * x, rtol=1e-6)
    np.testing.assert_allclose(ve.drift(x, jnp.array([0.1, 0.2, 0.3])), 0.0)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_inverse_maps(sde):
    ratio = sde.noise_ratio(TIMES)
    np.testing.assert_allclose(sde.t_from_noise_ratio(ratio), TIMES, rtol=2e-3, atol=1e-6)
    scale, sigma = sde.marginal(TIMES[1:-1])
    # float32 sigma carries a relative error ~6e-8; scale(sigma) amplifies it by
    # |d log scale / d log sigma| = sigma^2 / scale^2 (VP), at most 2 / scale^2 (sub-VP).
    amplification = 2.0 * np.asarray(sigma) ** 2 / np.asarray(scale) ** 2
    np.testing.assert_allclose(sde.scale_for_sigma(sigma), scale, rtol=4 * 6e-8 * np.max(amplification) + 1e-6)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_prior(sde, getkey):
    z = sde.prior_sample(getkey(), (4000, 3))
    assert z.shape == (4000, 3)
    # Sample std of 12000 N(0, s^2) values: relative SE sqrt(1 / (2 n)) = 0.0065; 5 SE.
    np.testing.assert_allclose(jnp.std(z), sde.prior_std, rtol=5 * np.sqrt(1 / (2 * z.size)))
    ref = Gaussian(jnp.zeros(3), jnp.full(3, float(sde.prior_std) ** 2))
    np.testing.assert_allclose(sde.prior_log_prob(z[:10]), ref.log_prob(z[:10]), rtol=1e-5)
    assert sde.prior_log_prob(jnp.zeros((2, 2, 2))).shape == (2,)


def test_pytree_jit_vmap_immutable():
    ve = VESDE(0.01, 20.0)
    leaves, treedef = jax.tree.flatten(ve)
    assert len(leaves) == 2
    assert jax.tree.unflatten(treedef, leaves) == ve
    np.testing.assert_allclose(jax.jit(lambda s: s.sigma(0.5))(ve), ve.sigma(0.5), rtol=1e-6)
    stacked = VPSDE(jnp.array([0.1, 0.2]), jnp.array([20.0, 10.0]))
    out = jax.vmap(lambda s: s.sigma(0.3))(stacked)
    np.testing.assert_allclose(out, [VPSDE(0.1, 20.0).sigma(0.3), VPSDE(0.2, 10.0).sigma(0.3)], rtol=1e-6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ve.sigma_max = 3.0
    assert isinstance(ve, SDE) and ve.T == 1.0 and ve.t_min == 1e-5


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: VESDE(1.0, 0.5), "sigma_max"),
        (lambda: VESDE(-0.1, 5.0), "sigma_min"),
        (lambda: VPSDE(0.1, -1.0), "beta_max"),
        (lambda: VPSDE(5.0, 1.0), "beta_max"),
        (lambda: SubVPSDE(float("nan"), 1.0), "beta_min"),
        (lambda: VESDE(0.01, 5.0, t_min=1.5), "t_min"),
        (lambda: VPSDE().prior_sample(jax.random.key(0), (3,)), "shape"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------------------
# Reverse-time pieces
# ---------------------------------------------------------------------------


def test_time_grid():
    sde = VPSDE(0.1, 20.0, t_min=1e-3)
    ts = sde.time_grid(4)
    np.testing.assert_allclose(ts, [1.0, 0.75025, 0.5005, 0.25075, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(sde.time_grid(2, t_min=0.2, t_start=0.6), [0.6, 0.4, 0.2], rtol=1e-6)
    for kwargs, match in [
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=3, t_min=1.5), "t_min"),
        (dict(num_steps=3, t_min=-0.1), "t_min"),
    ]:
        with pytest.raises(ValueError, match=match):
            sde.time_grid(**kwargs)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_probability_flow_drift_is_the_gaussian_transport(sde, x64):
    """For 1-D data N(m, v) the marginal is N(scale m, V(t)), V = scale^2 v + sigma^2, and the
    probability flow is the affine transport dx/dt = scale' m + V' / (2 V) (x - scale m)
    (derivatives by autodiff): the drift built from f, g and the exact score equals it;
    the reverse drift is f - g^2 s, the flow's f - g^2 s / 2 minus another g^2 s / 2."""
    m, v = 0.7, 0.4
    data = Gaussian(jnp.array([m], jnp.float64), jnp.array([[v]], jnp.float64))
    score_fn = time_score_fn(exact_score_model(data, sde), sde)
    x = jnp.linspace(-3.0, 3.0, 7, dtype=jnp.float64)[:, None]
    var = lambda t: sde.scale(t) ** 2 * v + sde.sigma(t) ** 2
    for t in (0.05, 0.3, 0.8):
        t = jnp.float64(t)
        transport = jax.grad(sde.scale)(t) * m + jax.grad(var)(t) / (2 * var(t)) * (x - sde.scale(t) * m)
        score = score_fn(x, t)
        np.testing.assert_allclose(sde.probability_flow_drift(x, t, score), transport, rtol=1e-6, atol=1e-9)
        g2 = sde.diffusion(t) ** 2
        np.testing.assert_allclose(
            sde.reverse_drift(x, t, score), sde.probability_flow_drift(x, t, score) - 0.5 * g2 * score, rtol=1e-12
        )
        # Per-example times broadcast like scalar ones.
        per_example = sde.probability_flow_drift(x, jnp.full((7,), t), score)
        np.testing.assert_allclose(per_example, transport, rtol=1e-6, atol=1e-9)


def test_time_score_fn_converts_each_parameterization_once():
    """eps and x0 models of the exact score give the exact score in time (x0 with scale(t), not 1)."""
    sde = VPSDE(0.1, 20.0)
    score_model = exact_score_model(GMM, sde)
    eps_model = lambda x, s: -s[:, None] * score_model(x, s)
    x0_model = lambda x, s: (x + s[:, None] ** 2 * score_model(x, s)) / sde.scale_for_sigma(s)[:, None]
    x, t = jnp.array([[0.3, -0.2], [1.0, 2.0]]), jnp.array([0.2, 0.6])
    reference = time_score_fn(score_model, sde)(x, t)
    np.testing.assert_allclose(reference, score_model(x, sde.sigma(t)), rtol=1e-6)
    for p, model in (("eps", eps_model), ("x0", x0_model)):
        np.testing.assert_allclose(time_score_fn(model, sde, parameterization=p)(x, t), reference, rtol=1e-4, err_msg=p)
    with pytest.raises(ValueError, match="parameterization"):
        time_score_fn(score_model, sde, parameterization="velocity")
    with pytest.raises(ValueError, match="sde"):
        time_score_fn(score_model, "vp")
    with pytest.raises(ValueError, match="model_fn returned shape"):
        check_score_input(time_score_fn(lambda x, s: x[:, :1], sde), sde, x)
    with pytest.raises(ValueError, match="x_init must be floating point"):
        check_score_input(time_score_fn(score_model, sde), sde, x.astype(jnp.int32), name="x_init")


# ---------------------------------------------------------------------------
# Continuous-time DSM
# ---------------------------------------------------------------------------

GMM = GaussianMixture(jnp.array([0.3, 0.7]), jnp.array([[-1.0, 0.5], [1.5, -0.5]]), jnp.array([[0.3, 0.2], [0.5, 0.4]]))


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_sde_dsm_loss_parameterizations_agree(sde, getkey):
    """The same exact model written as score, eps and x0 gives the same loss:
    the VP conversions use the right scale(t)."""
    score = exact_score_model(GMM, sde)
    eps_model = lambda x, s: -s[:, None] * score(x, s)
    x0_model = lambda x, s: (x + s[:, None] ** 2 * score(x, s)) / sde.scale_for_sigma(s)[:, None]
    x, key = GMM.sample(getkey(), 64), getkey()
    ref = sde_dsm_loss(score, x, sde, key)
    np.testing.assert_allclose(sde_dsm_loss(eps_model, x, sde, key, parameterization="eps"), ref, rtol=2e-4)
    np.testing.assert_allclose(sde_dsm_loss(x0_model, x, sde, key, parameterization="x0"), ref, rtol=2e-3)
    # Against the formula, with the loss's own draws of t and eps.
    k_t, k_eps = jax.random.split(key)
    t = jax.random.uniform(k_t, (64,), minval=1e-5, maxval=1.0)
    scale, sigma = sde.marginal(t)
    eps = jax.random.normal(k_eps, x.shape)
    xt = scale[:, None] * x + sigma[:, None] * eps
    manual = jnp.mean(sigma**2 * 0.5 * jnp.sum((score(xt, sigma) + eps / sigma[:, None]) ** 2, -1))
    np.testing.assert_allclose(ref, manual, rtol=1e-5)
    g2 = sde.diffusion(t) ** 2
    manual_lik = jnp.mean(g2 * 0.5 * jnp.sum((score(xt, sigma) + eps / sigma[:, None]) ** 2, -1))
    np.testing.assert_allclose(sde_dsm_loss(score, x, sde, key, weighting="likelihood"), manual_lik, rtol=1e-5)


def test_sde_dsm_loss_is_minimised_by_the_exact_score(getkey):
    """d/dc L(c * s_true) at c = 1 is E[lambda s . (s + eps / sigma)] = 0 by Stein's
    identity; at c = 0.7 it is clearly negative. 40 independent batches give a
    mean and its standard error; the test allows 4 SE."""
    sde = VPSDE(0.1, 20.0)
    score = exact_score_model(GMM, sde)

    def grad_at(c, key):
        k_x, k_l = jax.random.split(key)
        x = GMM.sample(k_x, 256)
        return jax.grad(lambda c: sde_dsm_loss(lambda x, s: c * score(x, s), x, sde, k_l, t_min=1e-3))(c)

    keys = jax.random.split(getkey(), 40)
    for c, sign in ((1.0, 0), (0.7, -1)):
        grads = np.asarray(jax.jit(jax.vmap(functools.partial(grad_at, c)))(keys))
        mean, se = grads.mean(), grads.std(ddof=1) / np.sqrt(grads.size)
        if sign == 0:
            assert abs(mean) < 4 * se, (mean, se)
        else:
            assert mean < -10 * se, (mean, se)


def test_sde_dsm_loss_bad_input(getkey):
    score = exact_score_model(GMM, VESDE())
    x = GMM.sample(getkey(), 8)
    with pytest.raises(ValueError, match="weighting"):
        sde_dsm_loss(score, x, VESDE(), getkey(), weighting="nope")
    with pytest.raises(ValueError, match="t_min"):
        sde_dsm_loss(score, x, VESDE(), getkey(), t_min=2.0)
    with pytest.raises(ValueError, match="t_min"):
        sde_dsm_loss(score, x, VESDE(), getkey(), t_min=0.0)
    with pytest.raises(ValueError, match="parameterization"):
        sde_dsm_loss(score, x, VESDE(), getkey(), parameterization="v")


def test_exact_score_model_takes_the_vp_scale_from_t():
    """Regression: at t = T the float32 sigma(T) = 0.99998 says the scale 6.6e-3 only to 1e-3
    (its rounding, 3e-8, over 1 - sigma = 2e-5); the exact model now takes it from t.

    Data N(m, c I) far from 0 make the scale error visible in the score
    -(x - scale m) / (scale^2 c + sigma^2); the reference is float64.
    """
    mean, var = np.array([4.0, -2.0]), 0.25
    sde = VPSDE(0.1, 20.0)
    b = 0.1 + 0.5 * (20.0 - 0.1)  # B(T)
    scale, sigma = np.exp(-b / 2), np.sqrt(-np.expm1(-b))
    z = np.asarray(jax.random.normal(jax.random.key(0), (256, 2)), np.float64)
    x = scale * mean + np.sqrt(scale**2 * var + sigma**2) * z
    exact = -(x - scale * mean) / (scale**2 * var + sigma**2)
    data = Gaussian(jnp.asarray(mean, jnp.float32), jnp.full(2, var, jnp.float32))
    model = exact_score_model(data, sde)
    # An equal SDE (another object) is recognised too; another SDE gets the sigma route.
    for same in (sde, VPSDE(0.1, 20.0)):
        got = np.asarray(time_score_fn(model, same)(jnp.asarray(x, jnp.float32), 1.0), np.float64)
        # float32 rounding: a few ulps (1.2e-7) of the largest score; the sigma route was off by 8e-6.
        assert np.max(np.abs(got - exact)) / np.max(np.abs(exact)) < 1e-6
    assert time_score_fn(model, VPSDE(0.1, 19.0)) is not model.time_score
    # model(x, sigma) itself is unchanged: the score at the scale that sigma implies.
    sig = jnp.full((4,), 0.5)
    np.testing.assert_allclose(
        model(jnp.zeros((4, 2)), sig),
        data.convolve(0.5, scale=float(np.sqrt(0.75))).score(jnp.zeros((4, 2))),
        rtol=1e-6,
    )
