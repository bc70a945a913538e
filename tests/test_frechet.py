"""The Frechet distance against closed forms: commuting and non-commuting Gaussians, symmetry, zero for
equal sets, the small-sample bias, bad input; the digits feature extractor: accuracy, determinism, its cache.

Everything is float64 NumPy; the statistical check uses a fixed seed and a tolerance of k standard
errors derived from the number of replicates, plus the size of the neglected O(1/N^2) terms.
"""

import json
import math
import warnings

import jax
import numpy as np
import pytest

from dsm_jax import digits_classifier as D
from dsm_jax import metrics as M
from dsm_jax.data import load_dataset


def _random_spd(rng, f, low=0.3, high=3.0):
    q, _ = np.linalg.qr(rng.normal(size=(f, f)))
    return (q * rng.uniform(low, high, f)) @ q.T


def test_commuting_covariances_give_the_sum_of_squared_root_differences():
    rng = np.random.default_rng(0)
    f = 6
    mu_a, mu_b = rng.normal(size=f), rng.normal(size=f)
    a, b = rng.uniform(0.1, 5.0, f), rng.uniform(0.1, 5.0, f)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = M.frechet_distance_from_stats(mu_a, np.diag(a), mu_b, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)
    # The same eigenvalues in a common rotated basis: still commuting, the same value.
    q, _ = np.linalg.qr(rng.normal(size=(f, f)))
    rotated = M.frechet_distance_from_stats(q @ mu_a, (q * a) @ q.T, q @ mu_b, (q * b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-10)


def test_non_commuting_covariances_match_the_transport_map_closed_form():
    # C_b = T C_a T with T symmetric positive definite: x -> T x is the optimal map, so
    # (C_a^1/2 C_b C_a^1/2)^1/2 = C_a^1/2 T C_a^1/2 and d^2 = |dmu|^2 + tr((I - T) C_a (I - T)).
    rng = np.random.default_rng(1)
    f = 5
    cov_a, t = _random_spd(rng, f), _random_spd(rng, f)
    cov_b = t @ cov_a @ t
    assert np.abs(cov_a @ cov_b - cov_b @ cov_a).max() > 0.1  # genuinely non-commuting
    mu_a, mu_b = rng.normal(size=f), rng.normal(size=f)
    i_t = np.eye(f) - t
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(i_t @ cov_a @ i_t)
    assert M.frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-10)


def test_two_by_two_covariances_match_the_determinant_formula():
    # For 2x2 PSD M: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)), with M = C_a^1/2 C_b C_a^1/2.
    cov_a = np.array([[2.0, 0.9], [0.9, 1.0]])
    cov_b = np.array([[0.5, -0.3], [-0.3, 3.0]])
    tr_sqrt = math.sqrt(np.trace(cov_a @ cov_b) + 2 * math.sqrt(np.linalg.det(cov_a) * np.linalg.det(cov_b)))
    expected = 1.0 + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt
    got = M.frechet_distance_from_stats(np.zeros(2), cov_a, np.array([1.0, 0.0]), cov_b)
    assert got == pytest.approx(expected, rel=1e-12)


def test_the_distance_is_symmetric_zero_for_equal_sets_and_a_shift_for_translates():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    y = rng.normal(size=(200, 8)) ** 2
    d_xy, d_yx = M.frechet_distance(x, y), M.frechet_distance(y, x)
    assert d_xy > 1.0 and d_xy == pytest.approx(d_yx, rel=1e-10)
    trace = np.trace(np.cov(x, rowvar=False))
    assert M.frechet_distance(x, x) <= 1e-12 * trace
    delta = rng.normal(size=8)
    assert M.frechet_distance(x, x + delta) == pytest.approx(np.sum(delta**2), rel=1e-9)


def test_features_and_statistics_agree_with_numpy():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(50, 4)), rng.normal(size=(70, 4)).astype(np.float32)
    mu, cov = M.feature_statistics(x)
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-12)
    assert mu.dtype == cov.dtype == np.float64
    via_stats = M.frechet_distance_from_stats(*M.feature_statistics(x), *M.feature_statistics(y))
    assert M.frechet_distance(x, y) == via_stats


def test_semi_definite_covariances_give_a_real_finite_value():
    # Fewer rows than features and a constant feature: both covariances are singular.
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 10)), rng.normal(size=(7, 10))
    x[:, 0] = y[:, 0] = 1.0
    d = M.frechet_distance(x, y)
    assert isinstance(d, float) and math.isfinite(d) and d > 0
    assert d == pytest.approx(M.frechet_distance(y, x), rel=1e-7)  # sqrt of rounding-level eigenvalues
    assert M.frechet_distance(x, x) < 1e-6


def test_the_small_sample_bias_matches_its_first_order_formula():
    # Two independent samples of size n from N(mu, C), eigenvalues l: E d^2 = 2 tr(C) / n
    # + (sum_ij l_i l_j / (l_i + l_j) + tr(C) / 2) / (n - 1) + O(F^3 / n^2).
    rng = np.random.default_rng(5)
    lam = np.array([0.5, 1.0, 2.0, 4.0])
    f, n, replicates = lam.size, 200, 400
    q, _ = np.linalg.qr(rng.normal(size=(f, f)))
    chol = np.linalg.cholesky((q * lam) @ q.T)
    mean = rng.normal(size=f)
    values = np.array(
        [
            M.frechet_distance(mean + rng.normal(size=(n, f)) @ chol.T, mean + rng.normal(size=(n, f)) @ chol.T)
            for _ in range(replicates)
        ]
    )
    expected = 2 * lam.sum() / n + (np.sum(np.outer(lam, lam) / np.add.outer(lam, lam)) + lam.sum() / 2) / (n - 1)
    std_error = values.std(ddof=1) / math.sqrt(replicates)
    higher_order = expected * f / n  # the relative size of the neglected terms
    assert abs(values.mean() - expected) < 4 * std_error + higher_order, (values.mean(), expected, std_error)


_GOOD = np.random.default_rng(6).normal(size=(10, 3))


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.zeros(10), _GOOD, r"features_a must be a 2-D array \[N, F\].*shape \(10,\)"),
        (_GOOD, np.zeros((10, 3, 1)), r"features_b must be a 2-D array.*shape \(10, 3, 1\)"),
        (_GOOD[:1], _GOOD, r"features_a must hold at least 2 rows.*shape \(1, 3\)"),
        (_GOOD, np.zeros((10, 0)), r"features_b must be a 2-D array"),
        (_GOOD, _GOOD[:, :2], r"the same feature dimension, got F=3 and F=2"),
        (
            np.where(np.arange(30).reshape(10, 3) == 4, np.nan, _GOOD),
            _GOOD,
            r"features_a must be finite.*1 rows \(first \[1\]\)",
        ),
        (_GOOD, _GOOD + 1j, r"features_b must hold real numbers, got dtype complex128"),
        (_GOOD.astype(str), _GOOD, r"features_a must hold real numbers"),
    ],
)
def test_frechet_distance_refuses_bad_features(a, b, match):
    with pytest.raises(ValueError, match=match):
        M.frechet_distance(a, b)


_MU, _COV = np.zeros(2), np.eye(2)


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros((2, 1)), _COV, _MU, _COV), r"mu_a must be a non-empty 1-D mean vector \[F\], got shape \(2, 1\)"),
        ((_MU, _COV, _MU, np.eye(3)), r"cov_b must have shape \[F, F\] = \(2, 2\) to match mu_b, got \(3, 3\)"),
        ((_MU, np.array([[1.0, 0.5], [0.0, 1.0]]), _MU, _COV), r"cov_a must be symmetric"),
        ((_MU, _COV, _MU, np.diag([1.0, -0.5])), r"cov_b must be positive semi-definite, got the eigenvalue -0.5"),
        ((np.array([0.0, np.inf]), _COV, _MU, _COV), r"mu_a must be finite"),
        ((_MU, _COV, np.zeros(3), np.eye(3)), r"mu_a and mu_b must have the same feature dimension"),
    ],
)
def test_frechet_distance_from_stats_refuses_bad_statistics(args, match):
    with pytest.raises(ValueError, match=match):
        M.frechet_distance_from_stats(*args)


def test_feature_statistics_names_its_argument():
    with pytest.raises(ValueError, match=r"features must hold at least 2 rows"):
        M.feature_statistics(np.zeros((1, 4)))


# ---------------------------------------------------------------------------
# The digits feature extractor
# ---------------------------------------------------------------------------

ACCURACY_THRESHOLD = 0.95  # measured 0.976 on the 297 held-out digits; 0.95 is 3 binomial standard errors below


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One fresh training for the module, cached in a directory of its own: ``(classifier, directory)``."""
    directory = tmp_path_factory.mktemp("digits_cache")
    return D.load_or_train_digits_classifier(directory), directory


@pytest.fixture
def no_training(monkeypatch):
    """Makes any training an error: what is returned must come from the cache file."""

    def refuse():
        raise AssertionError("the classifier was trained instead of read from the cache")

    monkeypatch.setattr(D, "train_digits_classifier", refuse)


def _same(a: D.DigitsClassifier, b: D.DigitsClassifier) -> bool:
    arrays = ("hidden_weights", "hidden_biases", "output_weights", "output_biases")
    return all(np.array_equal(getattr(a, n), getattr(b, n)) for n in arrays) and a.test_accuracy == b.test_accuracy


def test_the_classifier_is_accurate_on_the_held_out_digits(trained):
    classifier, _ = trained
    _, _, test, test_labels = D._split_with_labels()
    assert test.shape == load_dataset("digits").test.shape == (297, 8, 8, 1)
    accuracy = float(np.mean(classifier.predict(test) == test_labels))
    assert accuracy == classifier.test_accuracy >= ACCURACY_THRESHOLD, accuracy


def test_two_fresh_trainings_give_identical_features(trained):
    classifier, _ = trained
    again = D.train_digits_classifier()
    assert _same(classifier, again)
    test = load_dataset("digits").test
    np.testing.assert_array_equal(M.digits_features(test, classifier=classifier), again.features(test))


def test_features_are_the_hidden_layer_of_either_image_layout(trained):
    classifier, _ = trained
    test = load_dataset("digits").test
    features = M.digits_features(test, classifier=classifier)
    assert features.shape == (297, D.SETTINGS["hidden"]) and features.dtype == np.float64
    assert (features >= 0).all() and features.std(axis=0).max() > 0.1
    np.testing.assert_array_equal(features, classifier.features(test.reshape(297, 64)))


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((4, 8, 8, 3)), r"images must be a batch of 8x8 digits.*\(4, 8, 8, 3\)"),
        (np.zeros(64), r"images must be a batch of 8x8 digits.*\(64,\)"),
        (np.full((2, 64), np.nan), r"images must be finite, got NaN or Inf in 2 images"),
    ],
)
def test_features_refuse_what_is_not_digits(trained, images, match):
    with pytest.raises(ValueError, match=match):
        trained[0].features(images)


def test_the_cache_file_round_trips(trained, no_training):
    classifier, directory = trained
    (path,) = directory.glob("digits_classifier_*.npz")
    assert path.name == f"digits_classifier_{classifier.key}.npz"
    assert _same(D.load_or_train_digits_classifier(directory), classifier)


def test_the_cache_directory_comes_from_the_environment(trained, no_training, monkeypatch, tmp_path):
    monkeypatch.delenv("DSM_JAX_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert D.cache_dir() == tmp_path / "home" / ".cache" / "dsm_jax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert D.cache_dir() == tmp_path / "xdg" / "dsm_jax"
    _, directory = trained
    monkeypatch.setenv("DSM_JAX_CACHE", str(directory))
    assert D.cache_dir() == directory
    assert _same(M.digits_classifier(), trained[0])  # read from $DSM_JAX_CACHE, not trained


def _garbage(path, classifier):
    path.write_bytes(b"not a numpy archive")


def _truncated(path, classifier):
    D._write(path, classifier)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _wrong_shapes(path, classifier):
    D._write(path, classifier._replace(hidden_weights=classifier.hidden_weights[:10]))


@pytest.mark.parametrize("corrupt", [_garbage, _truncated, _wrong_shapes])
def test_a_corrupt_cache_file_is_retrained_and_replaced(trained, monkeypatch, tmp_path, corrupt):
    classifier, _ = trained
    calls = []
    monkeypatch.setattr(D, "train_digits_classifier", lambda: calls.append(1) or classifier)
    path = tmp_path / f"digits_classifier_{classifier.key}.npz"
    corrupt(path, classifier)
    with pytest.warns(D.DigitsClassifierCacheWarning, match="unreadable.*retraining and replacing it"):
        got = D.load_or_train_digits_classifier(tmp_path)
    assert _same(got, classifier) and calls == [1]
    assert _same(D._read(path, classifier.key), classifier)  # the file was replaced by a whole one


def test_an_unusable_cache_directory_falls_back_to_memory(trained, monkeypatch, tmp_path):
    classifier, _ = trained
    monkeypatch.setattr(D, "train_digits_classifier", lambda: classifier)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = D.load_or_train_digits_classifier(blocker / "cache")  # its parent is a file: mkdir fails
    assert _same(got, classifier) and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# ---------------------------------------------------------------------------
# The model's value next to its floor and a Gaussian fit's; evaluate of a digits run
# ---------------------------------------------------------------------------


def test_frechet_with_baselines_compares_sets_of_one_size(trained):
    classifier, _ = trained
    ds = load_dataset("digits", num_train=400, num_test=150)
    features = classifier.features
    noise = np.random.default_rng(7).uniform(-1, 1, (500, 8, 8, 1))
    report = M.frechet_with_baselines(noise, ds.test, ds.train, jax.random.key(0), features=features)
    assert report.n == 150
    assert 0 < report.floor < report.gaussian < report.frechet
    # The floor is the same statistic with training digits in the samples' place.
    same = M.frechet_with_baselines(ds.train[:150], ds.test, ds.train, jax.random.key(0), features=features)
    assert same.frechet < same.gaussian and same.floor == report.floor
    with pytest.raises(ValueError, match=r"train must have examples of shape \(8, 8, 1\), got \(400, 64\)"):
        M.frechet_with_baselines(noise, ds.test, ds.train.reshape(400, 64), jax.random.key(0), features=features)
    with pytest.raises(ValueError, match=r"at least 2 examples in each set, got n=1"):
        M.frechet_with_baselines(noise[:1], ds.test, ds.train, jax.random.key(0), features=features)


def test_evaluate_of_a_digits_run_reports_the_frechet_distance_and_its_baselines(
    trained, no_training, monkeypatch, capsys
):
    from dsm_jax import run as run_lib
    from dsm_jax.config import Config

    monkeypatch.setenv("DSM_JAX_CACHE", str(trained[1]))
    run = run_lib.build_run(Config(dataset="digits", num_train=512, width=16, depth=1, num_sigmas=3, batch_size=32))
    samples = np.random.default_rng(8).uniform(-1, 1, (300, 8, 8, 1)).astype(np.float32)
    out = run_lib.evaluate(run, None, samples, jax.random.key(0))  # params are not used without an exact score
    assert out["frechet_n"] == 297 == run.dataset.test.shape[0]
    assert 0 < out["frechet_floor"] < out["frechet_gaussian"] < out["frechet"]
    assert json.loads(json.dumps(out)) == out  # metrics.json holds it as it is
    run_lib.print_metrics(out)
    line = next(line for line in capsys.readouterr().out.splitlines() if "Frechet" in line)
    assert f"{out['frechet']:.3f}" in line and f"floor {out['frechet_floor']:.3f}" in line, line
