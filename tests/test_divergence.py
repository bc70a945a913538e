"""The jvp trace estimators against jax.jacfwd and against their own statistics."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsm_jax.distributions import Gaussian
from dsm_jax.divergence import SlowPathWarning, exact_divergence, hutchinson_divergence


def _random_mlp(key, d, width=16):
    k1, k2, k3 = jax.random.split(key, 3)
    w1 = jax.random.normal(k1, (d, width)) / np.sqrt(d)
    w2 = jax.random.normal(k2, (width, width)) / np.sqrt(width)
    w3 = jax.random.normal(k3, (width, d)) / np.sqrt(width)
    return lambda x: jnp.tanh(jax.nn.silu(x @ w1) @ w2) @ w3 + 0.1 * x**2


def _jacfwd_trace(fn, x):
    per_example = lambda z: fn(z[None])[0]
    return jax.vmap(lambda z: jnp.trace(jax.jacfwd(per_example)(z).reshape(z.size, z.size)))(x)


@pytest.mark.parametrize("d", [1, 2, 5, 64])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 16])
def test_exact_matches_jacfwd(d, chunk_size, x64):
    fn = _random_mlp(jax.random.key(d), d)
    x = jax.random.normal(jax.random.key(100 + d), (4, d))
    np.testing.assert_allclose(
        exact_divergence(fn, x, chunk_size=chunk_size), _jacfwd_trace(fn, x), rtol=1e-10, atol=1e-10
    )


def test_exact_on_image_shaped_input(x64):
    w = jax.random.normal(jax.random.key(0), (12, 12)) / 4.0
    fn = lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w).reshape(x.shape)
    x = jax.random.normal(jax.random.key(1), (3, 2, 2, 3))
    expected = _jacfwd_trace(fn, x)
    np.testing.assert_allclose(exact_divergence(fn, x), expected, rtol=1e-10)
    np.testing.assert_allclose(exact_divergence(fn, x, chunk_size=5), expected, rtol=1e-10)


def test_exact_is_jittable_and_differentiable():
    a = jnp.array([[1.0, 2.0], [0.5, -1.0]])

    def loss(scale):
        return jnp.sum(exact_divergence(lambda x: scale * jnp.tanh(x @ a.T), jnp.zeros((2, 2))))

    # d/dscale of sum_b tr(scale * diag(sech^2(0)) a) = B * tr(a)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(1.5), 2 * jnp.trace(a), rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_whole_batch_fallback_for_fields_closing_over_the_batch(chunk_size, x64):
    """A field that cannot run on one example (it closes over a [B] array) takes the whole-batch path."""
    fn = _random_mlp(jax.random.key(5), 5)
    x = jax.random.normal(jax.random.key(6), (4, 5))
    c = jnp.linspace(0.5, 2.0, 4)
    coupled = lambda z: c[:, None] * fn(z)  # c_b * fn(z)_b: divergence c_b * div fn(z)_b
    with pytest.warns(SlowPathWarning, match=r"whole batch .* sigma=sigma_batch") as record:
        div = exact_divergence(coupled, x, chunk_size=chunk_size)
    np.testing.assert_allclose(div, c * _jacfwd_trace(fn, x), rtol=1e-10)
    assert record[0].filename == __file__  # attributed to the caller's line, not the library's


# The noised score of N(mu, C) at a per-example level: s(x, sigma) = -(C + sigma^2 I)^{-1} (x - mu),
# whose divergence is -tr((C + sigma^2 I)^{-1}).
_G = Gaussian(jnp.array([1.0, -1.0, 0.5]), jnp.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]]))


def _noised_score(x, sigma):
    return jax.vmap(lambda xi, si: _G.convolve(si).score(xi[None])[0])(x, sigma)


def _noised_divergence(sigma):
    return jnp.array([-jnp.trace(jnp.linalg.inv(_G.cov + s**2 * jnp.eye(3))) for s in sigma])


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_model_signature_takes_the_per_example_path(chunk_size, x64):
    """fn(x, sigma) with sigma=: no warning, the closed form, and the numbers of the closure's fallback."""
    x = jax.random.normal(jax.random.key(11), (5, 3))
    sigma = jnp.linspace(0.1, 2.0, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the per-example path says nothing
        fast = exact_divergence(_noised_score, x, sigma=sigma, chunk_size=chunk_size)
        scalar = exact_divergence(_noised_score, x, sigma=0.7, chunk_size=chunk_size)
    np.testing.assert_allclose(fast, _noised_divergence(sigma), rtol=1e-12)
    np.testing.assert_allclose(scalar, _noised_divergence(jnp.full(5, 0.7)), rtol=1e-12)
    with pytest.warns(SlowPathWarning):
        old = exact_divergence(lambda z: _noised_score(z, sigma), x, chunk_size=chunk_size)
    np.testing.assert_allclose(fast, old, rtol=1e-12)
    # Hutchinson: the same probes, the same estimate as the closure.
    key = jax.random.key(12)
    np.testing.assert_allclose(
        hutchinson_divergence(_noised_score, x, key, sigma=sigma, num_probes=3),
        hutchinson_divergence(lambda z: _noised_score(z, sigma), x, key, num_probes=3),
        rtol=1e-12,
    )


@pytest.mark.filterwarnings("ignore::dsm_jax.divergence.SlowPathWarning")  # single=False: the fallback, on purpose
@pytest.mark.parametrize("single", [True, False])
def test_chunked_gradients_equal_unchunked(single, x64):
    """The checkpointed chunks differentiate to the same parameter gradient as the whole basis."""
    x = jax.random.normal(jax.random.key(7), (3, 6))
    c = jnp.array([1.0, 2.0, 3.0]) if not single else jnp.ones(())
    w0 = jax.random.normal(jax.random.key(8), (6, 6)) / 3.0

    def loss(w, chunk_size):
        fn = lambda z: (c[:, None] if not single else c) * jnp.tanh(z @ w) ** 2
        return jnp.sum(exact_divergence(fn, x, chunk_size=chunk_size) ** 2)

    whole = jax.grad(loss)(w0, None)
    np.testing.assert_allclose(jax.grad(loss)(w0, 4), whole, rtol=1e-10)
    np.testing.assert_allclose(jax.grad(loss)(w0, 1), whole, rtol=1e-10)


def test_auto_chunk_size():
    from dsm_jax.divergence import resolve_chunk_size

    assert resolve_chunk_size(None, 128, 64) is None
    assert resolve_chunk_size(5, 128, 3) == 3  # at most the dimension
    # On the CPU (the tests' backend): about 2048 tangent rows per chunk, the whole basis when that covers it.
    assert resolve_chunk_size("auto", 128, 256) == 16
    assert resolve_chunk_size("auto", 128, 16) is None
    assert resolve_chunk_size("auto", 4096, 10) == 1
    for bad in ("big", 0, 2.5):
        with pytest.raises(ValueError, match="chunk_size"):
            resolve_chunk_size(bad, 8, 8)
    fn = _random_mlp(jax.random.key(3), 40)
    x = jax.random.normal(jax.random.key(4), (300, 40))  # auto: chunks of 6 directions
    np.testing.assert_allclose(
        exact_divergence(fn, x, chunk_size="auto"), exact_divergence(fn, x), rtol=1e-5, atol=1e-5
    )


def test_chunking_bounds_the_memory_of_the_gradient():
    """Under jax.grad, chunks of 8 directions at d = 256 need a fraction of the whole basis's temporaries."""
    d = 256
    w = jax.random.normal(jax.random.key(9), (d, 64)) / 16.0
    v = jax.random.normal(jax.random.key(10), (64, d)) / 8.0
    x = jnp.ones((8, d))

    def temp_bytes(chunk_size):
        loss = lambda w: jnp.sum(exact_divergence(lambda z: jnp.tanh(z @ w) @ v, x, chunk_size=chunk_size))
        return jax.jit(jax.grad(loss)).lower(w).compile().memory_analysis().temp_size_in_bytes

    # The whole basis holds [B, d, 64] tangents (0.5 MiB each) for the backward pass; 8 directions hold 1/32 of it.
    assert temp_bytes(8) < temp_bytes(None) / 4


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe, x64):
    d = 6
    fn = _random_mlp(jax.random.key(7), d)
    x = jax.random.normal(jax.random.key(8), (3, d))
    exact = exact_divergence(fn, x)
    n = 4000
    # One estimate per key to get the per-estimate spread; mean within 5 standard errors.
    estimates = jax.vmap(lambda k: hutchinson_divergence(fn, x, k, probe=probe))(jax.random.split(jax.random.key(9), n))
    mean, se = estimates.mean(0), estimates.std(0) / np.sqrt(n)
    np.testing.assert_array_less(jnp.abs(mean - exact), 5 * se)
    # num_probes averages: the same mean, variance down by the number of probes.
    many = hutchinson_divergence(fn, x, jax.random.key(10), num_probes=n, probe=probe)
    np.testing.assert_array_less(jnp.abs(many - exact), 5 * estimates.std(0) / np.sqrt(n))


def test_rademacher_has_lower_variance_than_gaussian(x64):
    """For a linear field v^T A v: Var_rad = 2 sum_{i!=j} a_ij^2 (sym.), Var_gauss = 2 ||A||_F^2."""
    a = jax.random.normal(jax.random.key(11), (5, 5))
    a = 0.5 * (a + a.T)
    fn = lambda x: x @ a.T
    x = jnp.zeros((1, 5))
    keys = jax.random.split(jax.random.key(12), 20000)
    var = {
        p: float(jax.vmap(lambda k, p=p: hutchinson_divergence(fn, x, k, probe=p))(keys).var())
        for p in ("rademacher", "gaussian")
    }
    off = a - jnp.diag(jnp.diag(a))
    exact_rad, exact_gauss = 2 * float(jnp.sum(off**2)), 2 * float(jnp.sum(a**2))
    assert var["rademacher"] < var["gaussian"]
    # The sample variance of 20000 draws is within ~10% of the exact one (its relative sd is
    # sqrt((kurtosis - 1) / n) <= sqrt(14 / 20000) ~ 3%, so 10% is > 3 sd).
    np.testing.assert_allclose(var["rademacher"], exact_rad, rtol=0.1)
    np.testing.assert_allclose(var["gaussian"], exact_gauss, rtol=0.1)


_K = jax.random.key(0)
_ONES = jnp.ones((2, 2))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: hutchinson_divergence(lambda x: x, _ONES, _K, probe="normal"), "probe must be one of"),
        (lambda: hutchinson_divergence(lambda x: x, _ONES, _K, num_probes=0), "num_probes"),
        (lambda: exact_divergence(lambda x: x, _ONES, chunk_size=0), "chunk_size"),
        (lambda: exact_divergence(lambda x: x[:, :1], _ONES), "same shape"),
        (lambda: exact_divergence(lambda x: x, jnp.ones(3)), r"x must be batched"),
        (
            lambda: hutchinson_divergence(lambda x: x, _ONES, 0),
            r"key must be a PRNG key: pass jax.random.key\(seed\), got 0 \(int\)",
        ),
        (lambda: hutchinson_divergence(lambda x: x, _ONES, jnp.ones(2)), r"key must be a PRNG key.*dtype float32"),
        (
            lambda: exact_divergence(lambda x: x, jnp.ones((2, 2), jnp.int32)),
            "x must be floating point, got dtype int32",
        ),
        (lambda: hutchinson_divergence(lambda x: x, jnp.ones((2, 2), jnp.int32), _K), "x must be floating point"),
        (lambda: exact_divergence(lambda x, s: x, _ONES, sigma=0.0), "sigma must be > 0"),
        (
            lambda: exact_divergence(lambda x, s: x, _ONES, sigma=jnp.ones(3)),
            r"sigma must be a scalar or have shape \[B\]",
        ),
        (lambda: hutchinson_divergence(lambda x, s: x, _ONES, _K, sigma=jnp.nan), "sigma must be finite"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
