"""EDM preconditioning and the EDM loss against EDM Table 1 and the exact Gaussian / GMM denoisers."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import tiny_sets

from dsm_jax import cli
from dsm_jax import run as run_lib
from dsm_jax.config import LOSSES, PRESETS, Config
from dsm_jax.distributions import GaussianMixture
from dsm_jax.losses import edm_loss, edm_weight
from dsm_jax.models import NoiseConditionalMLP, edm_coefficients, edm_model_fn, edm_precondition, init_params

SIGMA_DATA = 0.5


def _gmm():
    return GaussianMixture(
        [0.3, 0.7], [[-0.6, 0.3], [0.4, -0.2]], [[[0.05, 0.01], [0.01, 0.04]], [[0.06, 0.0], [0.0, 0.03]]]
    )


def _gmm_denoiser(gmm):
    """The exact denoiser ``E[x | y]`` with one sigma per example (``posterior_mean`` takes one sigma)."""
    return jax.vmap(lambda y, s: gmm.posterior_mean(y[None], s)[0])


# ---------------------------------------------------------------------------
# Preconditioning
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_coefficients_match_edm_table_1(sigma_data):
    sigma = np.array([1e-3, 0.02, 0.5, 1.0, 7.0, 80.0])
    got = edm_coefficients(jnp.asarray(sigma, jnp.float32), sigma_data)
    s2, d2 = sigma**2, sigma_data**2
    want = (d2 / (s2 + d2), sigma * sigma_data / np.sqrt(s2 + d2), 1.0 / np.sqrt(s2 + d2), np.log(sigma) / 4.0)
    for name, g, w in zip(("c_skip", "c_out", "c_in", "c_noise"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=2e-6, atol=1e-7, err_msg=name)
    # The EDM loss weight is 1 / c_out^2: unit weight on the raw network's error.
    np.testing.assert_allclose(np.asarray(edm_weight(sigma, sigma_data) * got.c_out**2), 1.0, rtol=1e-5)


def test_coefficients_stay_finite_where_the_squares_would_not():
    sigma = jnp.array([1e-30, 1e-20, 1e20, 1e30], jnp.float32)  # sigma^2 under/overflows float32 at both ends
    c = edm_coefficients(sigma)
    for v in c:
        assert np.all(np.isfinite(np.asarray(v)))
    np.testing.assert_allclose(np.asarray(c.c_skip), [1.0, 1.0, 0.0, 0.0], atol=1e-30)
    np.testing.assert_allclose(np.asarray(c.c_out), [1e-30, 1e-20, 0.5, 0.5], rtol=1e-6)


def test_implied_raw_network_of_the_exact_denoiser_is_finite_and_of_unit_size():
    """F* = (D* - c_skip y) / c_out for the exact GMM denoiser D*, from sigma = 1e-4 to 1e8.

    F* is the posterior mean of the raw target F_t = (sigma x0 / sd - sd n) / sqrt(sigma^2 + sd^2), so by
    Jensen E|F*|^2 <= E|F_t|^2 <= max(E|x0|^2 / sd^2, d): the preconditioned network's job is O(1) everywhere.
    """
    gmm = _gmm()
    x0 = gmm.sample(jax.random.key(0), 2000)
    n = jax.random.normal(jax.random.key(1), x0.shape)
    bound = max(float(jnp.mean(jnp.sum(x0**2, axis=1))) / SIGMA_DATA**2, x0.shape[1])
    denoise = jax.jit(lambda y, s: gmm.posterior_mean(y, s))
    for sigma in np.logspace(-4, 8, 13):
        y = x0 + sigma * n
        c = edm_coefficients(jnp.float32(sigma), SIGMA_DATA)
        raw = (denoise(y, jnp.float32(sigma)) - c.c_skip * y) / c.c_out
        assert np.all(np.isfinite(np.asarray(raw))), sigma
        assert float(jnp.mean(jnp.sum(raw**2, axis=1))) <= 1.1 * bound, sigma


def test_precondition_composes_f_as_table_1():
    f = lambda x, c_noise: jnp.sin(3.0 * x) + c_noise[:, None]
    x = jax.random.normal(jax.random.key(2), (5, 3))
    sigma = jnp.array([0.01, 0.3, 1.0, 5.0, 80.0])
    c = edm_coefficients(sigma, 0.7)
    want = c.c_skip[:, None] * x + c.c_out[:, None] * f(c.c_in[:, None] * x, c.c_noise)
    np.testing.assert_allclose(edm_precondition(f, 0.7)(x, sigma), want, rtol=1e-6)


class _LogSigma(nn.Module):
    """Outputs ``x * log(sigma)``: shows what a library network's embedding of ``log sigma`` is given."""

    @nn.compact
    def __call__(self, x, sigma):
        return x * jnp.log(sigma)[:, None]


def test_library_networks_see_c_noise_through_their_log_sigma_embedding():
    x = jax.random.normal(jax.random.key(3), (4, 2))
    sigma = jnp.array([0.002, 0.1, 2.0, 80.0])
    c = edm_coefficients(sigma)
    want = c.c_skip[:, None] * x + c.c_out[:, None] * (c.c_in[:, None] * x) * c.c_noise[:, None]
    np.testing.assert_allclose(edm_model_fn(_LogSigma(), {})(x, sigma), want, rtol=1e-5)
    # An untrained MLP (zero output layer) is the skip connection alone.
    mlp = NoiseConditionalMLP(width=16, depth=1)
    params = init_params(mlp, jax.random.key(4), x)
    np.testing.assert_allclose(edm_model_fn(mlp, params)(x, sigma), c.c_skip[:, None] * x, rtol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf")])
def test_precondition_rejects_bad_sigma_data(bad):
    with pytest.raises(ValueError, match="sigma_data"):
        edm_precondition(lambda x, c: x, bad)


# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------

REPEATS, BATCH = 8, 2048


def _repeat(fn):
    """``(mean, standard error)`` of ``fn(key)`` over REPEATS independent keys."""
    values = np.array([float(fn(jax.random.key(100 + i))) for i in range(REPEATS)])
    return values.mean(), values.std(ddof=1) / np.sqrt(REPEATS)


def _lognormal_expectation(fn, p_mean=-1.2, p_std=1.2, nodes=80):
    """``E fn(sigma)`` for ``log sigma ~ N(p_mean, p_std^2)`` by Gauss-Hermite quadrature."""
    z, w = np.polynomial.hermite_e.hermegauss(nodes)
    return float(np.sum(w * fn(np.exp(p_mean + p_std * z))) / np.sqrt(2.0 * np.pi))


def test_loss_at_the_exact_gaussian_denoiser_equals_its_closed_form():
    """x ~ N(0, diag(c)): E lambda |D* - x|^2 = E_sigma sum_i lambda sigma^2 c_i / (c_i + sigma^2)."""
    c = np.array([0.1, 0.25, 1.0])
    denoiser = lambda y, s: y * (c / (c + s[:, None] ** 2))
    data = lambda k: jnp.sqrt(c) * jax.random.normal(jax.random.fold_in(k, 7), (BATCH, 3))
    mean, se = _repeat(jax.jit(lambda k: edm_loss(denoiser, data(k), k)))
    want = _lognormal_expectation(
        lambda s: edm_weight(s, SIGMA_DATA) * np.sum(s[:, None] ** 2 * c / (c + s[:, None] ** 2), 1)
    )
    assert abs(mean - want) < 4 * se, (mean, want, se)
    # The closed form is a sharp test: a denoiser for the wrong variances is many standard errors off.
    wrong = lambda y, s: y * (2.0 * c / (2.0 * c + s[:, None] ** 2))
    off, _ = _repeat(jax.jit(lambda k: edm_loss(wrong, data(k), k)))
    assert off - want > 6 * se


def test_loss_at_the_exact_gmm_denoiser_equals_its_expected_posterior_variance():
    """E lambda |D* - x|^2 = E_sigma lambda(sigma) E_y tr Cov[x | y]: Monte Carlo with the posterior covariance."""
    gmm = _gmm()
    denoiser = _gmm_denoiser(gmm)
    mean, se = _repeat(jax.jit(lambda k: edm_loss(denoiser, gmm.sample(jax.random.fold_in(k, 7), BATCH), k)))

    @jax.jit
    def posterior_variance(key, sigma):
        x = gmm.sample(key, BATCH)
        y = x + sigma * jax.random.normal(jax.random.fold_in(key, 1), x.shape)
        tr = jnp.trace(gmm.posterior_covariance(y, sigma), axis1=1, axis2=2)
        return jnp.mean(tr), jnp.var(tr) / BATCH

    z, w = np.polynomial.hermite_e.hermegauss(24)
    w = w / np.sqrt(2.0 * np.pi)
    sigmas = np.exp(-1.2 + 1.2 * z)
    parts = [posterior_variance(jax.random.key(7 + i), jnp.float32(s)) for i, s in enumerate(sigmas)]
    lam = edm_weight(sigmas, SIGMA_DATA)
    want = float(np.sum(w * lam * np.array([float(m) for m, _ in parts])))
    want_var = float(np.sum((w * lam) ** 2 * np.array([float(v) for _, v in parts])))
    assert abs(mean - want) < 4 * np.sqrt(se**2 + want_var), (mean, want, se, want_var)


def test_the_exact_denoiser_minimises_the_loss_by_the_predicted_amount():
    """D* + theta c_out(sigma) u: lambda |c_out u|^2 = |u|^2, so the loss is quadratic in theta with curvature |u|^2."""
    gmm, u = _gmm(), jnp.array([0.3, -0.2])
    exact = _gmm_denoiser(gmm)
    data = lambda k: gmm.sample(jax.random.fold_in(k, 7), BATCH)
    loss = lambda theta, k, scale=1.0: edm_loss(
        lambda y, s: scale * exact(y, s) + theta * edm_coefficients(s, SIGMA_DATA).c_out[:, None] * u,
        data(k),
        k,
    )
    grad = jax.jit(jax.grad(loss))
    g_mean, g_se = _repeat(lambda k: grad(0.0, k, 1.0))
    assert abs(g_mean) < 4 * g_se, (g_mean, g_se)
    # The test has power: the gradient at a shrunk denoiser is far from 0.
    g_off = float(grad(0.0, jax.random.key(5), 0.8))
    assert abs(g_off) > 8 * g_se
    # The loss is exactly quadratic in theta with curvature |u|^2 (weight * c_out^2 = 1) ...
    value = jax.jit(lambda theta, k: loss(theta, k))
    k = jax.random.key(5)
    for theta in (-0.3, 0.3):
        got = float(value(theta, k) - value(0.0, k))
        np.testing.assert_allclose(got, theta * float(grad(0.0, k, 1.0)) + theta**2 * float(u @ u), rtol=2e-3)
        # ... so on average a perturbed denoiser costs theta^2 |u|^2 more.
        d_mean, d_se = _repeat(lambda k: value(theta, k) - value(0.0, k))
        assert d_mean > 0 and abs(d_mean - theta**2 * float(u @ u)) < 4 * d_se, (theta, d_mean, d_se)


def test_key_batch_draws_as_batches_of_one_and_other_parameterizations_convert():
    gmm = _gmm()
    x = gmm.sample(jax.random.key(0), 8)
    keys = jax.random.split(jax.random.key(1), 8)
    denoiser = _gmm_denoiser(gmm)
    one = jax.jit(lambda xj, kj: edm_loss(denoiser, xj, kj))
    one_by_one = np.mean([float(one(x[j : j + 1], keys[j])) for j in range(8)])
    np.testing.assert_allclose(float(jax.jit(lambda k: edm_loss(denoiser, x, k))(keys)), one_by_one, rtol=1e-5)
    score = lambda y, s: gmm.convolve(s[0]).score(y)  # one sigma per example: batches of one
    one_score = jax.jit(lambda xj, kj: edm_loss(score, xj, kj, parameterization="score"))
    by_score = np.mean([float(one_score(x[j : j + 1], keys[j])) for j in range(8)])
    np.testing.assert_allclose(by_score, one_by_one, rtol=1e-4)


def test_per_sigma_diagnostics_bin_to_the_nearest_level():
    denoiser = lambda y, s: y / (1.0 + s[:, None] ** 2)  # exact for N(0, I)
    x = jax.random.normal(jax.random.key(0), (512, 2))
    levels = jnp.array([1e6, 1.0, 0.1])
    _, per_sigma = edm_loss(denoiser, x, jax.random.key(1), sigma_data=1.0, sigmas=levels, return_per_sigma=True)
    assert per_sigma.shape == (3,) and np.isnan(per_sigma[0]) and np.all(np.isfinite(per_sigma[1:]))
    # The unweighted DSM loss of the exact denoiser: d / (2 sigma^2 (1 + sigma^2)) per level, ~1/sigma^2.
    assert float(per_sigma[2]) > 10 * float(per_sigma[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sigma_data=0.0), "sigma_data"),
        (dict(p_std=-1.0), "p_std"),
        (dict(p_mean=float("nan")), "p_mean"),
        (dict(parameterization="energy"), "energy"),
        (dict(parameterization="nope"), "parameterization"),
        (dict(return_per_sigma=True), "sigmas"),
    ],
)
def test_loss_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        edm_loss(lambda y, s: y, jnp.zeros((4, 2)), jax.random.key(0), **kwargs)


# ---------------------------------------------------------------------------
# Training with EDM: the config, the presets and the command line
# ---------------------------------------------------------------------------


def test_a_tiny_edm_run_trains_samples_and_evaluates(tmp_path, capsys):
    workdir = tmp_path / "edm"
    args = ["train", "--workdir", str(workdir), "--num-steps", "20", "--dataset", "two_clusters", "--quiet"]
    assert cli.main([*args, *tiny_sets(loss="edm", sigma_data=1.0)]) == 0
    assert "parameterization='x0'" in capsys.readouterr().out  # said why the default 'score' was replaced
    saved = json.loads((workdir / "config.json").read_text())["config"]
    assert (saved["loss"], saved["parameterization"], saved["scale_by_sigma"]) == ("edm", "x0", False)
    samples = np.load(workdir / "samples.npz")["samples"]
    assert samples.shape == (256, 2) and np.all(np.isfinite(samples))
    metrics = json.loads((workdir / "metrics.json").read_text())
    for key in ("mmd2", "relative_fisher_mean"):
        assert np.all(np.isfinite(metrics[key])), key
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert losses[-1]["step"] == 20 and all(np.isfinite(r["loss"]) for r in losses)
    per_sigma = np.array([r["per_sigma_loss"] for r in losses], dtype=float)
    assert per_sigma.shape[1] == 4 and np.isfinite(per_sigma).any(axis=0).all()  # every level seen at some step
    assert (workdir / "losses.png").exists()


def test_edm_refuses_a_parameterization_the_user_set(tmp_path, capsys):
    args = ["train", "--workdir", str(tmp_path / "w"), "--num-steps", "2", "--dataset", "two_clusters", "--quiet"]
    assert cli.main([*args, "--set", "loss=edm", "--set", "parameterization=eps"]) == 2
    assert "loss='edm' trains a preconditioned denoiser" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("loss", "flow", "loss must be one of"),
        ("sigma_data", 0.0, "sigma_data must be a positive number"),
        ("p_std", -1.0, "p_std must be a positive number"),
        ("p_mean", float("inf"), "p_mean must be a finite number"),
        ("parameterization", "v", "variance-preserving"),
    ],
)
def test_config_validates_the_edm_fields(field, value, match):
    with pytest.raises(ValueError, match=match):
        Config(**{field: value})


def test_the_edm_presets_pass_the_shape_and_loss_rules_unchanged():
    assert LOSSES[:2] == ("dsm", "edm") and PRESETS["default"].loss == "dsm"
    for name, shape in (("edm", (2,)), ("edm_digits", (8, 8, 1))):
        preset = PRESETS[name]
        cfg, _ = run_lib.fit_to_data(preset, shape, frozenset())
        cfg, chosen = run_lib._fit_to_loss(cfg, frozenset())
        assert cfg == preset and chosen == () and preset.loss == "edm" and preset.sampler == "heun"
    # The digits models train at continuous levels, not only on the grid the samplers step between.
    assert PRESETS["digits"].sigma_sampling == "log_uniform" == PRESETS["edm_digits"].sigma_sampling
