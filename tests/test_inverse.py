"""Measurement operators (adjoints, pseudo-inverses) and the posterior samplers against Gaussian closed forms.

Data ``x ~ N(m, C)`` in ``d = 4`` (images ``[2, 2, 1]``) with a full, anisotropic ``C``; for
``y = A x + sigma_y eps`` the posterior is ``N(m + G (y - A m), C - G A C)``,
``G = C A^T (A C A^T + sigma_y^2 I)^+``. Each method runs with the exact score of the noised Gaussian on
``n = 2000`` chains for one ``y``; its sample mean and covariance are compared with the closed form in
standard errors: ``sqrt(P_ii / n)`` for the mean, ``sqrt((P_ij^2 + P_ii P_jj) / n)`` for the covariance
(Gaussian samples). "Exact" methods must be within 4.5 SE on every entry; the approximate ones have their
bias printed and the stated bias asserted.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsm_jax import measurements as M
from dsm_jax.samplers import inverse as I
from dsm_jax.sde import VPSDE

SDE = VPSDE()
SHAPE = (2, 2, 1)
N = 2000
_rng = np.random.default_rng(0)
_Q = np.linalg.qr(_rng.normal(size=(4, 4)))[0]
C = (_Q * np.array([1.5, 0.8, 0.4, 0.2])) @ _Q.T
MEAN = np.array([0.5, -0.3, 0.2, 0.0])
X_TRUE = jnp.asarray(_rng.multivariate_normal(MEAN, C).reshape((1,) + SHAPE), jnp.float32)


def gaussian_model(mean, cov):
    """The exact score of ``N(mean, cov)`` noised to ``sigma`` on the VP SDE, for images of ``SHAPE``."""
    lam, u = np.linalg.eigh(cov)

    def model_fn(x, sigma):
        a = SDE.scale_for_sigma(sigma)[:, None]
        w = (x.reshape(x.shape[0], -1) - a * mean) @ u
        return (-(w / (a**2 * lam + sigma[:, None] ** 2)) @ u.T).reshape(x.shape).astype(x.dtype)

    return model_fn


MODEL = gaussian_model(MEAN, C)
OPERATORS = {
    "mask": M.Mask(jnp.array([1.0, 0.0, 0.0, 1.0]).reshape(SHAPE)),
    "downsample": M.Downsample(2),
    "blur": M.GaussianBlur(0.7, radius=1),
    "projection": M.random_projection(jax.random.key(7), 2, SHAPE),
}


def closed_form(a, y, sigma_y, mean=MEAN, cov=C):
    k = a @ cov @ a.T + sigma_y**2 * np.eye(a.shape[0])
    gain = cov @ a.T @ np.linalg.pinv(k, hermitian=True)
    return mean + gain @ (y - a @ mean), cov - gain @ a @ cov


def problem(name, sigma_y):
    """``(operator, dense A, one measurement y0, y tiled over N chains)``."""
    op = OPERATORS[name]
    y0 = op.measure(X_TRUE, jax.random.key(3), sigma_y)
    return op, np.asarray(op.matrix(SHAPE), np.float64), y0, jnp.tile(y0, (N,) + (1,) * (y0.ndim - 1))


def compare(samples, a, y0, sigma_y, what, mean=MEAN, cov=C):
    """Errors of the sample moments in SE (over the coordinates with posterior variance), and the bias."""
    x = np.asarray(samples, np.float64).reshape(N, -1)
    pm, pc = closed_form(a, np.asarray(y0, np.float64).reshape(-1), sigma_y, mean, cov)
    keep = np.diag(pc) > 1e-8
    pc[~keep, :], pc[:, ~keep] = 0.0, 0.0  # observed exactly: rounding-level values
    sm, sc = x.mean(0), np.cov(x.T)
    mean_z = np.max(np.abs(sm - pm)[keep] / np.sqrt(np.diag(pc)[keep] / N))
    sub = np.ix_(keep, keep)
    cov_se = np.sqrt((pc[sub] ** 2 + np.outer(np.diag(pc)[keep], np.diag(pc)[keep])) / N)
    cov_z = np.max(np.abs(sc - pc)[sub] / cov_se)
    out = dict(
        mean_z=float(mean_z),
        cov_z=float(cov_z),
        mean_error=float(np.linalg.norm(sm - pm)),
        cov_rel_error=float(np.linalg.norm(sc - pc) / np.linalg.norm(pc)),
        trace_ratio=float(np.trace(sc) / np.trace(pc)),
        residual=float(np.linalg.norm(a @ sm - np.asarray(y0).reshape(-1))),
    )
    print(what, {k: round(v, 4) for k, v in out.items()})
    return out


# ---------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------

_IMG = (3, 6, 4, 2)
ALL_OPERATORS = {
    "mask": M.Mask((jax.random.uniform(jax.random.key(0), _IMG[1:]) > 0.5).astype(jnp.float32)),
    "downsample": M.Downsample(2),
    "blur_reflect": M.GaussianBlur(1.0),
    "blur_zero": M.GaussianBlur(0.8, padding="zero"),
    "blur_reflect_wide": M.GaussianBlur(2.0, radius=3),
    "random_projection": M.random_projection(jax.random.key(1), 10, _IMG[1:]),
}


@pytest.mark.parametrize("name", list(ALL_OPERATORS))
def test_adjoint(name):
    """<A x, y> = <x, A^T y> for random x, y (to float32 rounding of the inner products)."""
    op = ALL_OPERATORS[name]
    x = jax.random.normal(jax.random.key(2), _IMG)

    @jax.jit
    def both(op, x):
        y = jax.random.normal(jax.random.key(3), op.A(x).shape)
        return jnp.vdot(op.A(x), y), jnp.vdot(x, op.AT(y)), jnp.sqrt(jnp.vdot(op.A(x), op.A(x)) * jnp.vdot(y, y))

    lhs, rhs, size = both(op, x)
    assert abs(float(lhs) - float(rhs)) < 1e-5 * float(size), (lhs, rhs)


@pytest.mark.parametrize("name", [n for n, op in ALL_OPERATORS.items() if op.has_pinv])
def test_pseudo_inverse(name):
    """A A^+ A = A and A^+ A A^+ = A^+ (Moore-Penrose), and A^+ equals the dense pseudo-inverse."""
    op = ALL_OPERATORS[name]
    x = jax.random.normal(jax.random.key(4), _IMG)
    y = op.A(jax.random.normal(jax.random.key(5), _IMG))
    np.testing.assert_allclose(op.A(op.pinv(op.A(x))), op.A(x), atol=1e-5)
    np.testing.assert_allclose(op.pinv(op.A(op.pinv(y))), op.pinv(y), atol=1e-5)
    a = np.asarray(op.matrix(_IMG[1:]), np.float64)
    want = np.asarray(y, np.float64).reshape(y.shape[0], -1) @ np.linalg.pinv(a).T
    np.testing.assert_allclose(np.asarray(op.pinv(y)).reshape(y.shape[0], -1), want, atol=1e-5)


def test_blur_paddings():
    """Reflect padding preserves a constant image; zero padding loses mass at the border only."""
    ones = jnp.ones((1, 5, 5, 1))
    np.testing.assert_allclose(M.GaussianBlur(1.0, radius=2).A(ones), ones, rtol=1e-6)
    zero = np.asarray(M.GaussianBlur(1.0, radius=2, padding="zero").A(ones))[0, :, :, 0]
    k = M.gaussian_kernel(1.0, 2)
    np.testing.assert_allclose(zero[2, 2], 1.0, rtol=1e-6)  # two pixels from every border: no loss
    np.testing.assert_allclose(zero[0, 2], k[2:].sum(), rtol=1e-6)  # the kernel's half beyond the edge lost
    np.testing.assert_allclose(zero[0, 0], k[2:].sum() ** 2, rtol=1e-6)


# ---------------------------------------------------------------------------
# Posterior samplers against the closed form
# ---------------------------------------------------------------------------


def test_projection_on_a_noise_free_mask_is_exact():
    """Observed coordinates equal y exactly; the unobserved ones have the conditional law of the
    Gaussian (within 4.5 SE), although C couples the two blocks."""
    op, a, y0, y = problem("mask", 0.0)
    out = jax.jit(lambda y, k: I.projection(MODEL, SDE, op, y, k, num_steps=200))(y, jax.random.key(5))
    assert int(out.nfe) == 401
    x = np.asarray(out.samples).reshape(N, 4)
    observed = np.asarray(op.mask).reshape(4) == 1
    assert np.all(x[:, observed] == np.asarray(y0).reshape(4)[observed])
    err = compare(x, a, y0, 0.0, "projection/mask")
    assert err["mean_z"] < 4.5 and err["cov_z"] < 4.5, err


@pytest.mark.parametrize("name", ["downsample", "projection"])
def test_projection_with_a_pseudo_inverse(name):
    """A x = y to float32 rounding for every chain; the null-space law is within 4.5 SE of the posterior
    (the replacement's bias is below the sampling error of n = 2000 on this problem)."""
    op, a, y0, y = problem(name, 0.0)
    x = jax.jit(lambda y, k: I.projection(MODEL, SDE, op, y, k, num_steps=200).samples)(y, jax.random.key(5))
    np.testing.assert_allclose(op.A(x), y, atol=1e-5)
    err = compare(x, a, y0, 0.0, f"projection/{name}")
    assert err["mean_z"] < 4.5 and err["cov_z"] < 4.5, err


@pytest.mark.parametrize("name, sigma_y", [("mask", 0.1), ("blur", 0.1), ("projection", 0.0)])
def test_pigdm_with_the_tweedie_covariance_is_exact_for_gaussian_data(name, sigma_y):
    """For Gaussian data, N(A x0_hat, sigma_y^2 I + A Cov[x_0 | x_t] A^T) is exactly p(y | x_t): the guided
    score is the posterior score, and the samples have the posterior's moments (4.5 SE; 500 steps, as the
    likelihood gets sharp at small t and 200 steps leave a ~10% variance excess on the observed entries)."""
    op, a, y0, y = problem(name, sigma_y)
    run = lambda y, k: I.pigdm(MODEL, SDE, op, y, sigma_y, k, num_steps=500, covariance="tweedie")
    out = jax.jit(run)(y, jax.random.key(5))
    assert int(out.nfe) == 501
    err = compare(out.samples, a, y0, sigma_y, f"pigdm-tweedie/{name} sigma_y={sigma_y}")
    assert err["mean_z"] < 4.5 and err["cov_z"] < 4.5, err


def test_pigdm_isotropic_is_exact_for_isotropic_data_and_biased_otherwise():
    """r_t^2 I is the exact posterior covariance of N(m, v I) data (data_variance = v): the samples have
    the posterior's moments (4.5 SE). With the anisotropic C the same approximation is biased: its mean
    is off by more than 4.5 SE (the comparison has the power to see it)."""
    op, a, y0, y = problem("projection", 0.1)
    iso_cov = 0.6 * np.eye(4)
    iso = gaussian_model(MEAN, iso_cov)
    run = jax.jit(
        lambda y, k: (
            I.pigdm(iso, SDE, op, y, 0.1, k, num_steps=500, data_variance=0.6).samples,
            I.pigdm(MODEL, SDE, op, y, 0.1, k, num_steps=500, data_variance=1.0).samples,
        )
    )
    x_iso, x_aniso = run(y, jax.random.key(5))
    err = compare(x_iso, a, y0, 0.1, "pigdm-isotropic/isotropic data", cov=iso_cov)
    assert err["mean_z"] < 4.5 and err["cov_z"] < 4.5, err
    biased = compare(x_aniso, a, y0, 0.1, "pigdm-isotropic/anisotropic data")
    assert biased["mean_z"] > 4.5, biased


def test_dps_bias():
    """DPS (reference-code convention, step 0.5, sigma_y = 0.1) on the downsampling: the stated bias is
    that it fits the measurement more tightly than the posterior (the mean's residual |A mean - y| is
    below the posterior's, which is |A m_post - y|), its mean is off the posterior mean by more than
    the sampling error but by less than half the prior's spread sqrt(tr C), and its variance is too
    small (trace ratio < 1)."""
    op, a, y0, y = problem("downsample", 0.1)
    x = jax.jit(lambda y, k: I.dps(MODEL, SDE, op, y, k, num_steps=200, step_size=0.5).samples)(y, jax.random.key(5))
    err = compare(x, a, y0, 0.1, "dps/downsample")
    pm, _ = closed_form(a, np.asarray(y0, np.float64).reshape(-1), 0.1)
    assert err["residual"] < np.linalg.norm(a @ pm - np.asarray(y0).reshape(-1)), err
    assert err["mean_z"] > 4.5 and err["mean_error"] < 0.5 * np.sqrt(np.trace(C)), err
    assert err["trace_ratio"] < 1.0, err


def test_dps_conventions_are_related_by_the_residual_norm(x64):
    """One step from the same x_init and key: "code" with step c equals "paper" with step c / (2 |r|),
    |r| = |y - A x0_hat(x_init)| at T (grad |r|^2 = 2 |r| grad |r|); the step does move x (a large c,
    as d x0_hat / d x_T is small at T): the two corrections agree to float64 rounding."""
    op, _, y0, _ = problem("projection", 0.1)
    # In float64: x0_hat at T divides a cancellation by scale(T) ~ 7e-3, float32 would blur the identity.
    y0 = jnp.asarray(y0, jnp.float64)
    x_init = SDE.prior_sample(jax.random.key(8), (1,) + SHAPE).astype(jnp.float64)
    key = jax.random.key(9)
    scale, sigma = SDE.marginal(SDE.T)
    x0 = (x_init + sigma**2 * MODEL(x_init, jnp.full((1,), sigma))) / scale
    r = float(jnp.linalg.norm(y0 - op.A(x0)))
    kw = dict(num_steps=1, final_denoise=False, x_init=x_init)
    code, paper, plain = jax.jit(
        lambda: tuple(
            I.dps(MODEL, SDE, op, y0, key, step_size=c, convention=conv, **kw).samples
            for c, conv in ((30.0, "code"), (30.0 / (2 * r), "paper"), (1e-30, "code"))
        )
    )()
    np.testing.assert_allclose(code - plain, paper - plain, rtol=1e-9)
    assert float(jnp.max(jnp.abs(code - plain))) > 1e-2


_Y = jnp.zeros((2,) + SHAPE)
_K = jax.random.key(0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: M.Mask(jnp.array([0.5, 1.0])), "mask must be an array of 0"),
        (lambda: M.Downsample(0), "factor"),
        (lambda: M.Downsample(3).A(jnp.zeros((1, 4, 4, 1))), "multiple of factor"),
        (lambda: M.Downsample(2).A(jnp.zeros((4, 4))), r"images \[B, H, W, C\]"),
        (lambda: M.GaussianBlur(0.0), "sigma"),
        (lambda: M.GaussianBlur(1.0, padding="wrap"), "padding"),
        (lambda: M.GaussianBlur(1.0, radius=3).A(jnp.zeros((1, 3, 3, 1))), "radius < the image size"),
        (lambda: M.MatrixOperator(jnp.ones(3)), r"weights must be a matrix"),
        (lambda: M.MatrixOperator(jnp.ones((2, 3)), (2, 2)), "input_shape"),
        (lambda: M.random_projection(_K, 0, (4,)), "num_measurements"),
        (lambda: M.Downsample(2).measure(jnp.zeros((1, 2, 2, 1)), _K, -1.0), "sigma_y must be >= 0"),
        (lambda: I.dps(MODEL, SDE, "mask", _Y, _K, num_steps=5, step_size=1.0), "operator must be"),
        (lambda: I.dps(MODEL, "vp", OPERATORS["mask"], _Y, _K, num_steps=5, step_size=1.0), "sde must be"),
        (lambda: I.dps(MODEL, SDE, OPERATORS["mask"], _Y, _K, num_steps=5, step_size=0.0), "step_size"),
        (
            lambda: I.dps(MODEL, SDE, OPERATORS["mask"], _Y, _K, num_steps=5, step_size=1.0, convention="x"),
            "convention",
        ),
        (lambda: I.dps(MODEL, SDE, OPERATORS["mask"], _Y, 0, num_steps=5, step_size=1.0), "key must be a PRNG"),
        (
            lambda: I.dps(MODEL, SDE, OPERATORS["mask"], _Y, _K, num_steps=5, step_size=1.0, x_init=jnp.zeros((2, 4))),
            "x_init must have the shape",
        ),
        (lambda: I.pigdm(MODEL, SDE, OPERATORS["mask"], _Y, -0.1, _K, num_steps=5), "sigma_y"),
        (lambda: I.pigdm(MODEL, SDE, OPERATORS["mask"], _Y, 0.1, _K, num_steps=5, covariance="full"), "covariance"),
        (lambda: I.pigdm(MODEL, SDE, OPERATORS["mask"], _Y, 0.1, _K, num_steps=0), "num_steps"),
        (lambda: I.projection(MODEL, SDE, OPERATORS["blur"], _Y, _K, num_steps=5), "pseudo-inverse"),
        (lambda: I.projection(MODEL, SDE, OPERATORS["mask"], _Y.astype(jnp.int32), _K, num_steps=5), "y must be"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
