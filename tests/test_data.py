"""Datasets and batches: exact structure of the toy sets, the digits scaling and split,
user-array validation with clear messages, and the step-indexed batch source.

Statistical checks use fixed keys and tolerances of k standard errors, derived
at each assertion.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsm_jax import data as D
from dsm_jax.train import DataSource

N = 4000


@pytest.mark.parametrize("name", sorted(D.TOY_DATASETS))
def test_toy_sets_are_seeded_2d_and_split(name):
    # One size throughout: every new shape costs a compilation.
    a = D.load_dataset(name, num_train=256, num_test=256, seed=3)
    b = D.load_dataset(name, num_train=256, num_test=0, seed=3)
    c = D.load_dataset(name, num_train=256, num_test=0, seed=4)
    assert a.train.shape == (256, 2) and a.test.shape == (256, 2) and a.train.dtype == np.float32
    assert a.shape == (2,) and a.dim == 2 and a.name == name and b.test.shape == (0, 2)
    # Same seed, same training set, whatever the test size; another seed, another set.
    np.testing.assert_array_equal(a.train, b.train)
    assert not np.array_equal(a.train, c.train)
    # train and test come from different keys: no shared point.
    assert not np.isin(a.test[:, 0], a.train[:, 0]).any()
    assert np.all(np.isfinite(a.train)) and np.abs(a.train).max() < 6.0
    assert (a.distribution is not None) == (name in D.MIXTURES)


def test_noise_free_toy_sets_lie_on_their_curves():
    key = jax.random.key(0)
    roll = np.asarray(D.swiss_roll(key, N, noise=0.0), np.float64) * 5.0
    t = np.linalg.norm(roll, axis=1)
    assert t.min() >= 1.5 * np.pi - 1e-4 and t.max() <= 4.5 * np.pi + 1e-4
    # The angle of t (cos t, sin t) is t itself (mod 2 pi).
    np.testing.assert_allclose(np.cos(np.arctan2(roll[:, 1], roll[:, 0]) - t), 1.0, atol=1e-6)

    m = np.asarray(D.moons(key, N, noise=0.0), np.float64) / 2.0 + [0.5, 0.25]
    upper = np.abs(np.hypot(m[:, 0], m[:, 1]) - 1.0) < 1e-5
    lower = np.abs(np.hypot(m[:, 0] - 1.0, m[:, 1] - 0.5) - 1.0) < 1e-5
    assert np.all(upper ^ lower)
    assert np.all(m[upper, 1] >= -1e-6) and np.all(m[lower, 1] <= 0.5 + 1e-6)

    radii = (0.5, 1.0, 2.0)
    r = np.linalg.norm(np.asarray(D.rings(key, N, radii=radii, noise=0.0)), axis=1)
    nearest = np.abs(r[:, None] - np.array(radii)).min(axis=1)
    assert nearest.max() < 1e-5
    # Ring k is drawn with probability r_k / sum(r); 4 binomial standard errors.
    frac = np.mean(np.abs(r - 2.0) < 1e-4)
    p = 2.0 / 3.5
    assert abs(frac - p) < 4 * np.sqrt(p * (1 - p) / N)

    board = np.asarray(D.checkerboard(key, N))
    assert np.all(np.abs(board) <= 2.0)
    assert np.all((np.floor(board[:, 0]) + np.floor(board[:, 1])) % 2 == 0)


def test_pinwheel_has_its_arms():
    x = np.asarray(D.pinwheel(jax.random.key(1), N, num_arms=3, radial_std=0.05, tangential_std=0.01, rate=0.0))
    # rate 0: straight arms at angles 0, 2pi/3, 4pi/3 and radius ~ 2.
    angle = np.arctan2(x[:, 1], x[:, 0]) % (2 * np.pi)
    arm_dist = np.abs((angle[:, None] - 2 * np.pi * np.arange(3) / 3 + np.pi) % (2 * np.pi) - np.pi).min(axis=1)
    assert arm_dist.max() < 0.05
    assert abs(np.median(np.linalg.norm(x, axis=1)) - 2.0) < 0.02


@pytest.mark.parametrize("name", sorted(D.MIXTURES))
def test_mixture_sets_match_their_distribution(name):
    ds = D.load_dataset(name, num_train=N, num_test=10, seed=0)
    mix = ds.distribution
    w, mu = np.asarray(mix.weights, np.float64), np.asarray(mix.means, np.float64)
    mean = w @ mu
    second = np.einsum("k,kij->ij", w, np.asarray(mix.covariance_matrices) + np.einsum("ki,kj->kij", mu, mu))
    cov = second - np.outer(mean, mean)
    # Sample mean within 4 standard errors sqrt(var / N) per coordinate.
    se = np.sqrt(np.diag(cov) / N)
    assert np.all(np.abs(ds.train.mean(axis=0) - mean) < 4 * se)
    # Sample variance: SE ~ sqrt((m4 - var^2) / N) <= sqrt(m4 / N), m4 the 4th central moment (from samples).
    centred = ds.train - mean
    se_var = np.sqrt(np.mean(centred**4, axis=0) / N)
    assert np.all(np.abs(centred.var(axis=0) - np.diag(cov)) < 4 * se_var)


def test_two_clusters_is_the_tutorial_mixture():
    mix = D.two_clusters_mixture()
    np.testing.assert_allclose(mix.weights, [0.5, 0.5])
    np.testing.assert_allclose(mix.means, [[2.0, 2.0], [-2.0, -2.0]])
    np.testing.assert_allclose(mix.covariance_matrices, np.broadcast_to(0.25 * np.eye(2), (2, 2, 2)))


def test_mixture_dataset_wraps_any_mixture():
    mix = D.eight_gaussians_mixture(radius=3.0, std=0.1)
    ds = D.mixture_dataset(mix, num_train=64, num_test=0, seed=1)
    assert ds.distribution is mix and ds.train.shape == (64, 2) and ds.test.shape == (0, 2)
    with pytest.raises(ValueError, match="mixture must be a GaussianMixture"):
        D.mixture_dataset(np.zeros(3))


def test_digits_scaling_and_split():
    images, labels = D.load_digits()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32 and labels.shape == (1797,)
    levels = np.unique(images)
    np.testing.assert_allclose(levels, np.arange(17) / 8.0 - 1.0)
    np.testing.assert_array_equal(D.digits_to_levels(D.digits_from_levels(np.arange(17))), np.arange(17))
    # Out-of-range model outputs are clipped back to valid levels.
    np.testing.assert_array_equal(D.digits_to_levels(np.array([-1.7, 1.3])), [0, 16])

    ds = D.load_dataset("digits", seed=5)
    assert ds.train.shape == (1500, 8, 8, 1) and ds.test.shape == (297, 8, 8, 1)
    assert ds.data_range == (-1.0, 1.0) and ds.distribution is None and ds.dim == 64
    # The split is a partition of the 1797 images.
    whole = np.sort(images.reshape(1797, -1).view("V256").ravel())
    parts = np.sort(np.concatenate([ds.train, ds.test]).reshape(1797, -1).view("V256").ravel())
    np.testing.assert_array_equal(whole, parts)
    small = D.load_dataset("digits", num_train=100, num_test=50, seed=5)
    assert small.train.shape[0] == 100 and small.test.shape[0] == 50
    with pytest.raises(ValueError, match="num_train=2000 exceeds the 1497"):
        D.load_dataset("digits", num_train=2000, num_test=300)


# ---------------------------------------------------------------------------
# User arrays
# ---------------------------------------------------------------------------


def test_user_arrays_load(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 3, 2)).astype(np.float64)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "one.npz", images=x)
    np.savez(tmp_path / "two.npz", images=x, labels=np.arange(50.0).reshape(50, 1))
    for path, key in ((tmp_path / "x.npy", None), (tmp_path / "one.npz", None), (tmp_path / "two.npz", "images")):
        arr = D.load_array(path, key=key)
        assert arr.dtype == np.float32
        np.testing.assert_allclose(arr, x.astype(np.float32))
    ds = D.load_dataset(str(tmp_path / "x.npy"), seed=2)
    assert ds.train.shape == (45, 3, 2) and ds.test.shape == (5, 3, 2)
    ds = D.load_dataset(str(tmp_path / "two.npz"), key="labels", num_test=10, seed=2)
    assert sorted(np.concatenate([ds.train, ds.test]).ravel().tolist()) == list(np.arange(50.0))


@pytest.mark.parametrize(
    "make, key, pattern",
    [
        (None, None, r"'[^']*missing\.npy' does not exist"),
        (lambda p: np.save(p, np.arange(12).reshape(6, 2)), None, r"dtype int64.*astype"),
        (lambda p: np.save(p, np.array([[1.0], [None]], dtype=object), allow_pickle=True), None, "without pickle"),
        (lambda p: np.save(p, np.ones(5)), None, r"shape \[N, \.\.\.\].*got shape \(5,\)"),
        (lambda p: np.save(p, np.ones((0, 2))), None, "no examples"),
        (lambda p: np.save(p, np.ones((3, 2)).astype(np.complex64)), None, "dtype complex64"),
    ],
)
def test_bad_npy_files_are_refused(tmp_path, make, key, pattern):
    path = tmp_path / "missing.npy" if make is None else tmp_path / "bad.npy"
    if make is not None:
        make(path)
    with pytest.raises(ValueError, match=pattern) as err:
        D.load_array(path, key=key)
    assert os.fspath(path) in str(err.value)


def test_non_finite_rows_are_counted_and_located(tmp_path):
    x = np.zeros((100, 2, 2), np.float32)
    x[7, 1, 0] = np.nan
    x[42, 0, 1] = np.inf
    x[42, 1, 1] = -np.inf
    x[99, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(ValueError, match=r"has 3 of 100 examples containing NaN or Inf.*\[7, 42, 99\]"):
        D.load_array(tmp_path / "nan.npy")
    with pytest.raises(ValueError, match="NaN or Inf"):
        D.validate_array(x)


def test_npz_keys_and_suffixes(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.ones((4, 2)), b=np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"holds 2 arrays \['a', 'b'\]; choose one with key"):
        D.load_array(tmp_path / "two.npz")
    with pytest.raises(ValueError, match=r"has no array 'c'; it holds \['a', 'b'\]"):
        D.load_array(tmp_path / "two.npz", key="c")
    np.save(tmp_path / "x.npy", np.ones((4, 2)))
    with pytest.raises(ValueError, match="applies to .npz archives only"):
        D.load_array(tmp_path / "x.npy", key="a")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"must end in \.npy or \.npz, got suffix '\.csv'"):
        D.load_array(tmp_path / "x.csv")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="cannot read"):
        D.load_array(tmp_path / "junk.npy")


def test_load_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'swissroll': choose one of \[.*'swiss_roll'"):
        D.load_dataset("swissroll")
    with pytest.raises(ValueError, match="does not exist"):
        D.load_dataset(str(tmp_path / "nope.npz"))
    np.save(tmp_path / "x.npy", np.ones((5, 2)))
    with pytest.raises(ValueError, match="num_test=5 leaves no training examples"):
        D.load_dataset(str(tmp_path / "x.npy"), num_test=5)
    with pytest.raises(ValueError, match="num_train must be an integer >= 1, got 0"):
        D.load_dataset("moons", num_train=0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        D.load_dataset("moons", seed=-1)
    assert set(D.DATASETS) == set(D.TOY_DATASETS) | {"digits"}


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def _ids(n):
    return np.arange(n, dtype=np.float32).reshape(n, 1)


@pytest.mark.parametrize("n, batch", [(12, 4), (10, 4), (7, 7)])
def test_batches_cover_each_example_once_per_epoch(n, batch):
    source = D.BatchSource(_ids(n), batch, seed=1)
    epochs = 3
    steps = -(-epochs * n // batch)
    stream = np.concatenate([source(s)[:, 0] for s in range(steps)]).astype(int)
    for e in range(epochs):
        block = stream[e * n : (e + 1) * n]
        np.testing.assert_array_equal(np.sort(block), np.arange(n))
        # Epoch e is the documented permutation fold_in(key(seed), e).
        np.testing.assert_array_equal(
            block, np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(1), e), n))
        )
    assert not np.array_equal(stream[:n], stream[n : 2 * n]) or n == 1


def test_batches_are_a_pure_function_of_the_step():
    data = np.random.default_rng(0).normal(size=(37, 3)).astype(np.float32)
    a = D.BatchSource(data, 8, seed=4)
    b = D.BatchSource(data, 8, seed=4)
    forward = [a(s) for s in range(20)]
    # A fresh source asked in another order (as after a resume) gives the same batches.
    for s in (13, 2, 19, 0, 7):
        np.testing.assert_array_equal(b.batch_at(s), forward[s])
    assert not np.array_equal(D.BatchSource(data, 8, seed=5)(0), forward[0])
    assert a.epoch_of(4) == 0 and a.epoch_of(5) == 1 and a.steps_per_epoch == 37 / 8
    # The driver treats it as batch_at(step) (the position is the step), not as a stateful source.
    assert callable(a) and not isinstance(a, DataSource)


def test_process_slices_make_the_global_batch():
    data = _ids(30)
    whole = D.BatchSource(data, 12, seed=2, process_index=0, process_count=1)
    parts = [D.BatchSource(data, 12, seed=2, process_index=p, process_count=3) for p in range(3)]
    for step in range(6):
        np.testing.assert_array_equal(np.concatenate([p(step) for p in parts]), whole(step))
        assert parts[0](step).shape == (4, 1)


def test_batch_source_errors():
    with pytest.raises(ValueError, match="batch_size=11 is larger than the training set, which has only 10"):
        D.BatchSource(_ids(10), 11)
    with pytest.raises(ValueError, match="batch_size=10 must be divisible by process_count=3"):
        D.BatchSource(_ids(10), 10, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index=2 must be < process_count=2"):
        D.BatchSource(_ids(10), 4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="step must be an integer >= 0, got -1"):
        D.BatchSource(_ids(10), 4)(-1)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        D.BatchSource(_ids(10), 0)


def test_shard_batch():
    batch = {"x": np.arange(24.0).reshape(8, 3), "y": np.arange(8)}
    sharded = D.shard_batch(batch, 4)
    assert sharded["x"].shape == (4, 2, 3) and sharded["y"].shape == (4, 2)
    np.testing.assert_array_equal(sharded["x"].reshape(8, 3), batch["x"])
    with pytest.raises(ValueError, match=r"leading dimension of shape \(8, 3\)\) must be divisible by num_devices=3"):
        D.shard_batch(batch, 3)


def test_large_batch_jit_matches_numpy():
    # Regression for the jaxlib 0.10.2 CPU miscompilation of fused element-wise
    # chains at leading dimension >= 16384 (worked around in dsm_jax/__init__.py).
    import dsm_jax  # noqa: F401  (sets the XLA flag before the CPU client exists)

    x = np.random.RandomState(0).randn(20000, 2).astype(np.float32)
    w = np.linspace(-1.0, 1.0, 128, dtype=np.float32).reshape(2, 64)
    got = np.asarray(jax.jit(lambda x: jnp.sum(jnp.tanh(x @ w) ** 2, axis=1))(x))
    want = np.sum(np.tanh(x.astype(np.float64) @ w) ** 2, axis=1)
    # float32 sums of 64 terms in [0, 1]: relative error a few 1e-7; the bug gives O(1).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
