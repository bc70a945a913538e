"""Evaluation metrics: score error against an exact score, sample quality, PSNR, bits/dim.

* :func:`fisher_divergence` ``E_x |s(x) - s*(x)|^2`` (optionally relative to
  ``E_x |s*(x)|^2``) for any two score functions, and
  :func:`per_sigma_fisher_divergence`, the same for a noise-conditional
  model against a Gaussian mixture's exact noised scores, one value per
  noise level.
* :func:`mmd2`: the unbiased (or biased) squared maximum mean discrepancy
  with an RBF kernel whose bandwidth defaults to the median heuristic
  (:func:`median_bandwidth`), computed block by block so that ``10^4 x 10^4``
  never holds a ``10^4 x 10^4`` matrix; :func:`mmd2_floor`, the value the
  same statistic takes between two samples of the reference law (the
  "two-sample floor") so a model's MMD can be read against it.
* :func:`sliced_wasserstein`: the sliced p-Wasserstein distance, exact in
  each random direction (1-D optimal transport between the sorted
  projections, also for samples of different sizes).
* :func:`mode_weights`: the fraction of samples in each mode of a mixture.
* :func:`frechet_distance`: the Frechet distance between Gaussians fitted to
  two feature sets (the statistic of FID), also from precomputed
  :func:`feature_statistics` (:func:`frechet_distance_from_stats`), in
  float64 NumPy; :func:`digits_features`, the hidden layer of a small
  classifier of the 8x8 digits (:mod:`dsm_jax.digits_classifier`), the
  features of a small-scale FID; :func:`frechet_with_baselines`, a model's
  value next to its floor and a Gaussian fit's.
* :func:`psnr` and :func:`bits_per_dim` (the one in
  :mod:`dsm_jax.likelihood`, re-exported).

All functions are pure JAX and jit-compatible unless stated (keys are
explicit arguments); the Frechet distance and the digits features are host
NumPy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax._checks import check_batched, check_positive_int, check_positive_number, check_sigma_schedule
from dsm_jax._utils import row_blocks, sq_distances, to_batch
from dsm_jax.digits_classifier import DigitsClassifier, digits_classifier, digits_features
from dsm_jax.distributions import GaussianMixture
from dsm_jax.likelihood import bits_per_dim
from dsm_jax.parameterization import ModelFn, ScoreFn, check_parameterization, model_to_score

__all__ = [
    "DigitsClassifier",
    "FisherDivergence",
    "FrechetReport",
    "MMDFloor",
    "ModeWeights",
    "bits_per_dim",
    "digits_classifier",
    "digits_features",
    "feature_statistics",
    "fid",
    "fisher_divergence",
    "frechet_distance",
    "frechet_distance_from_stats",
    "frechet_with_baselines",
    "median_bandwidth",
    "mmd2",
    "mmd2_floor",
    "mode_weights",
    "per_sigma_fisher_divergence",
    "psnr",
    "rbf_kernel",
    "sliced_wasserstein",
]


def _flat(name: str, x) -> jax.Array:
    x = jnp.asarray(x)
    check_batched(name, x)
    return x.reshape(x.shape[0], -1)


def _check_same_dim(x: jax.Array, y: jax.Array) -> None:
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"x and y must have examples of the same shape, got {x.shape} and {y.shape}.")


# ---------------------------------------------------------------------------
# Fisher divergence
# ---------------------------------------------------------------------------


class FisherDivergence(NamedTuple):
    """Per-noise-level score errors.

    Attributes:
        sigmas: ``[L]`` the noise levels.
        absolute: ``[L]`` ``E |s_theta(x, sigma) - s*(x, sigma)|^2``.
        relative: ``[L]`` ``absolute / E |s*(x, sigma)|^2``.
    """

    sigmas: jax.Array
    absolute: jax.Array
    relative: jax.Array


def _sq_norms(a: jax.Array) -> jax.Array:
    return jnp.sum(a.reshape(a.shape[0], -1) ** 2, axis=1)


def fisher_divergence(
    score_fn: ScoreFn, target_score_fn: ScoreFn, x: jax.Array, *, relative: bool = False
) -> jax.Array:
    """Monte-Carlo Fisher divergence ``E_x |s(x) - s*(x)|^2`` over the points ``x``.

    With ``relative=True``: ``E_x |s(x) - s*(x)|^2 / E_x |s*(x)|^2`` (both
    means over the same points), a scale-free number: 0 for the exact
    score, 1 for the zero function.

    No factor 1/2 (the score-matching objective is half of this).

    Args:
        score_fn: ``score_fn(x) -> [B, *D]``, the model.
        target_score_fn: ``target_score_fn(x) -> [B, *D]``, the exact score.
        x: ``[B, *D]`` points drawn from the law the expectation is over.
        relative: divide by the target's mean squared norm.

    Returns:
        A scalar.

    Example:
        >>> from dsm_jax.distributions import Gaussian
        >>> g = Gaussian(jnp.zeros(2), jnp.eye(2))
        >>> x = g.sample(jax.random.key(0), 1000)
        >>> fisher_divergence(lambda z: -0.5 * z, g.score, x, relative=True)   # s = s*/2
        Array(0.25, dtype=float32)
    """
    check_batched("x", x)
    s, target = score_fn(x), target_score_fn(x)
    if s.shape != x.shape or target.shape != x.shape:
        raise ValueError(
            f"score_fn and target_score_fn must return x's shape {x.shape}, got {s.shape} and {target.shape}."
        )
    err = jnp.mean(_sq_norms(s - target))
    return err / jnp.mean(_sq_norms(target)) if relative else err


def per_sigma_fisher_divergence(
    model_fn: ModelFn,
    distribution: GaussianMixture,
    sigmas,
    key: jax.Array,
    *,
    num_samples: int = 2000,
    parameterization: str = "score",
    scale=1.0,
) -> FisherDivergence:
    """Fisher divergence of a noise-conditional model to the exact noised score, per sigma.

    For each ``sigma``: ``x ~ p_sigma``, the law of ``scale * x0 + sigma * eps``
    (``distribution.convolve(sigma, scale=scale)``), and

        ``F(sigma) = E_{p_sigma} |s_theta(x, sigma) - grad log p_sigma(x)|^2``,
        ``relative = F(sigma) / E_{p_sigma} |grad log p_sigma(x)|^2``,

    the target DSM fits at that noise level. Levels are processed one at a
    time (``lax.map``), each with ``num_samples`` points from
    ``fold_in(key, i)``.

    Args:
        model_fn: ``model_fn(x, sigma) -> [B, *D]`` with ``sigma: [B]``.
        distribution: a :class:`~dsm_jax.distributions.GaussianMixture` (or
            :class:`~dsm_jax.distributions.Gaussian`), the clean data law.
        sigmas: ``[L]`` noise levels.
        key: PRNG key.
        num_samples: points per level.
        parameterization: what the model outputs ("score", "eps", "x0", "energy").
        scale: signal scale of the noising (1 for VE).

    Returns:
        :class:`FisherDivergence` with ``[L]`` arrays.
    """
    check_sigma_schedule(sigmas, decreasing=False)
    num_samples = check_positive_int("num_samples", num_samples)
    check_parameterization(parameterization)
    check_positive_number("scale", scale)
    sigmas = jnp.asarray(sigmas, jnp.result_type(float))

    def one_level(args):
        i, sigma = args
        noised = distribution.convolve(sigma, scale=scale)
        x = noised.sample(jax.random.fold_in(key, i), num_samples)
        model_score = model_to_score(model_fn, x, to_batch(sigma, x), parameterization, scale=scale)
        target = noised.score(x)
        err, norm = jnp.mean(_sq_norms(model_score - target)), jnp.mean(_sq_norms(target))
        return err, err / norm

    absolute, relative = jax.lax.map(one_level, (jnp.arange(sigmas.shape[0]), sigmas))
    return FisherDivergence(sigmas, absolute, relative)


# ---------------------------------------------------------------------------
# MMD
# ---------------------------------------------------------------------------


def rbf_kernel(a: jax.Array, b: jax.Array, bandwidth) -> jax.Array:
    """``k(a_i, b_j) = exp(-|a_i - b_j|^2 / (2 h^2)) -> [n, m]`` for flat ``a: [n, d]``, ``b: [m, d]``."""
    d2 = sq_distances(a, b)
    return jnp.exp(-jnp.maximum(d2, 0.0) / (2.0 * bandwidth**2))


def median_bandwidth(x: jax.Array, y: jax.Array | None = None, *, max_points: int = 1000) -> jax.Array:
    """The median heuristic: ``h = median_{i<j} |z_i - z_j|`` over pooled points.

    ``z`` is the first ``max_points`` rows of ``x`` (or the first
    ``max_points / 2`` rows of each of ``x`` and ``y``), so the cost is
    bounded; the rows should be in random order (i.i.d. samples are).

    For ``z ~ N(mu, s^2 I_d)`` the squared distance is ``2 s^2 chi^2_d``, so
    in 2-D ``h^2 -> 4 ln(2) s^2``.

    References:
        Gretton et al., "A kernel two-sample test", JMLR 2012, Sec. 8.
    """
    max_points = check_positive_int("max_points", max_points, minimum=2)
    x = _flat("x", x)
    if y is None:
        z = x[:max_points]
    else:
        y = _flat("y", y)
        _check_same_dim(x, y)
        z = jnp.concatenate([x[: max_points // 2], y[: max_points - max_points // 2]])
    if z.shape[0] < 2:
        raise ValueError(f"the median heuristic needs at least 2 points, got {z.shape[0]}.")
    return _median_distance(z)


@jax.jit
def _median_distance(z: jax.Array) -> jax.Array:
    """Median pairwise distance of the rows of ``z`` (jitted: one compilation per shape when eager)."""
    z = z - jnp.mean(z, axis=0)  # distances unchanged, the expansion better conditioned
    d2 = sq_distances(z, z)
    i, j = jnp.triu_indices(z.shape[0], k=1)
    return jnp.sqrt(jnp.maximum(jnp.median(d2[i, j]), 0.0))


@functools.partial(jax.jit, static_argnames="block_size")
def _kernel_sum(a: jax.Array, b: jax.Array, bandwidth, block_size: int) -> jax.Array:
    """``sum_ij k(a_i, b_j)``, ``block_size`` rows of ``a`` at a time (memory ``block_size * m``).

    Jitted so that eager calls of :func:`mmd2` reuse one compilation per shape.
    """
    rows, weights = row_blocks(a, block_size)
    block_sums = jax.lax.map(lambda rw: rw[1] @ jnp.sum(rbf_kernel(rw[0], b, bandwidth), axis=1), (rows, weights))
    return jnp.sum(block_sums)


def mmd2(
    x: jax.Array,
    y: jax.Array,
    *,
    bandwidth=None,
    unbiased: bool = True,
    block_size: int = 1024,
) -> jax.Array:
    """Squared MMD between samples with the RBF kernel ``exp(-|a - b|^2 / (2 h^2))``.

    Unbiased (Gretton et al. 2012, Eq. 3):

        ``MMD_u^2 = sum_{i != j} k(x_i, x_j) / (n (n-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
        - 2 sum_{i, j} k(x_i, y_j) / (n m)``;

    it has mean ``MMD^2`` and can be negative when the laws agree. The biased
    V-statistic (``unbiased=False``) keeps ``i = j`` and divides by ``n^2``,
    ``m^2``; it is 0 exactly when the two samples are the same multiset.
    Kernel sums are taken ``block_size`` rows at a time, so the memory is
    ``O(block_size * max(n, m))``.

    Args:
        x: ``[n, *D]``.
        y: ``[m, *D]``.
        bandwidth: kernel width ``h > 0``; default :func:`median_bandwidth` of
            the pooled samples. To compare a model with its two-sample floor,
            fix ``h`` once and pass it to both (see :func:`mmd2_floor`).
        unbiased: the U-statistic (default) or the V-statistic.
        block_size: rows per block.

    Returns:
        A scalar.

    Example:
        >>> x = jax.random.normal(jax.random.key(0), (2000, 2))
        >>> float(mmd2(x, x, bandwidth=1.0, unbiased=False))
        0.0

    References:
        Gretton et al., "A kernel two-sample test", JMLR 2012.
    """
    x, y = _flat("x", x), _flat("y", y)
    _check_same_dim(x, y)
    block_size = check_positive_int("block_size", block_size)
    n, m = x.shape[0], y.shape[0]
    if unbiased and min(n, m) < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 points in each sample, got n={n}, m={m}.")
    if bandwidth is None:
        bandwidth = median_bandwidth(x, y)
    else:
        check_positive_number("bandwidth", bandwidth)
    # Centring does not change distances and keeps |a|^2 + |b|^2 - 2ab well conditioned.
    center = 0.5 * (jnp.mean(x, axis=0) + jnp.mean(y, axis=0))
    x, y = x - center, y - center
    s_xx = _kernel_sum(x, x, bandwidth, min(block_size, n))
    s_yy = _kernel_sum(y, y, bandwidth, min(block_size, m))
    s_xy = _kernel_sum(x, y, bandwidth, min(block_size, n))
    if unbiased:
        # k(z, z) = 1 for the RBF kernel: remove the diagonal exactly.
        return (s_xx - n) / (n * (n - 1)) + (s_yy - m) / (m * (m - 1)) - 2.0 * s_xy / (n * m)
    return s_xx / n**2 + s_yy / m**2 - 2.0 * s_xy / (n * m)


class MMDFloor(NamedTuple):
    """The two-sample floor of :func:`mmd2`.

    Attributes:
        floor: root mean square of ``values``: the typical size of the
            statistic when both samples come from the reference law.
        values: ``[num_pairs]`` the null MMD^2 values.
        bandwidth: the kernel width used (pass it to :func:`mmd2` for the model).
    """

    floor: jax.Array
    values: jax.Array
    bandwidth: jax.Array


def _draw(reference, key: jax.Array, n: int) -> jax.Array:
    if callable(reference):
        return jnp.asarray(reference(key, n))
    return reference[jax.random.permutation(key, reference.shape[0])[:n]]


def mmd2_floor(
    reference: Callable[[jax.Array, int], jax.Array] | jax.Array | np.ndarray,
    key: jax.Array,
    n: int,
    *,
    against: jax.Array | None = None,
    num_pairs: int = 8,
    bandwidth=None,
    block_size: int = 1024,
) -> MMDFloor:
    """What :func:`mmd2` gives when the model is perfect: the two-sample floor.

    Each of ``num_pairs`` null values is the unbiased ``MMD^2`` between a
    fresh reference sample of size ``n`` and either a second fresh sample
    of size ``n`` or, with ``against``, that fixed array (e.g. the held-out
    test set the model's samples are compared with). The null values have
    mean 0; their root mean square is the floor. A model whose
    ``mmd2(samples, against)`` (same ``n``, same ``bandwidth``) is within a
    few floors cannot be told from the data at this sample size.

    Args:
        reference: ``sampler(key, n) -> [n, *D]`` (e.g.
            ``mixture.sample`` or a toy-set sampler), or an array ``[M, *D]``
            from which samples are drawn without replacement (e.g. the
            training set; ``M >= n``).
        key: PRNG key.
        n: sample size, the same as the model's.
        against: optional fixed second sample ``[m, *D]``.
        num_pairs: number of null values.
        bandwidth: kernel width; default the median heuristic of the first
            pair, reused for all pairs.
        block_size: see :func:`mmd2`.

    Returns:
        :class:`MMDFloor`.
    """
    n = check_positive_int("n", n, minimum=2)
    num_pairs = check_positive_int("num_pairs", num_pairs)
    if not callable(reference):
        reference = jnp.asarray(reference)
        check_batched("reference", reference)
        if reference.shape[0] < n:
            raise ValueError(f"reference holds {reference.shape[0]} examples, fewer than n={n}.")
    keys = jax.random.split(key, 2 * num_pairs)
    draws = [_draw(reference, k, n) for k in keys]
    seconds = [against] * num_pairs if against is not None else draws[1::2]
    if bandwidth is None:
        bandwidth = median_bandwidth(draws[0], seconds[0])
    values = jnp.stack(
        [mmd2(a, b, bandwidth=bandwidth, block_size=block_size) for a, b in zip(draws[0::2], seconds, strict=True)]
    )
    return MMDFloor(jnp.sqrt(jnp.mean(values**2)), values, jnp.asarray(bandwidth))


# ---------------------------------------------------------------------------
# Sliced Wasserstein
# ---------------------------------------------------------------------------


def _wasserstein_1d_pp(u: jax.Array, v: jax.Array, p: float) -> jax.Array:
    """``W_p^p`` between the empirical laws of sorted ``u: [n, P]`` and ``v: [m, P]``, per column.

    ``W_p^p = int_0^1 |F^{-1}(q) - G^{-1}(q)|^p dq``; both quantile functions
    are step functions, constant between the merged breakpoints ``i/n``, ``j/m``.
    """
    n, m = u.shape[0], v.shape[0]
    breaks = jnp.sort(jnp.concatenate([jnp.arange(1, n + 1) / n, jnp.arange(1, m + 1) / m]))
    widths = jnp.diff(breaks, prepend=0.0)
    mid = breaks - 0.5 * widths
    iu = jnp.clip(jnp.floor(mid * n).astype(jnp.int32), 0, n - 1)
    iv = jnp.clip(jnp.floor(mid * m).astype(jnp.int32), 0, m - 1)
    return widths @ jnp.abs(u[iu] - v[iv]) ** p


def sliced_wasserstein(
    x: jax.Array, y: jax.Array, key: jax.Array, *, num_projections: int = 256, p: float = 2.0
) -> jax.Array:
    """Sliced p-Wasserstein distance ``(E_theta W_p^p(theta.x, theta.y))^{1/p}``.

    ``theta`` is uniform on the unit sphere (``num_projections`` Monte-Carlo
    directions from ``key``); in each direction the 1-D distance between the
    empirical laws is exact (sorted projections; samples may differ in size).
    A pure translation ``y = x + delta`` gives ``E (theta . delta)^2 = |delta|^2 / d``
    for ``p = 2``.

    Args:
        x: ``[n, *D]``.
        y: ``[m, *D]``.
        key: PRNG key for the directions.
        num_projections: number of directions.
        p: the order, ``>= 1``.

    Returns:
        A scalar.

    References:
        Bonneel et al., "Sliced and Radon Wasserstein barycenters of
        measures", J. Math. Imaging Vis. 2015.
    """
    x, y = _flat("x", x), _flat("y", y)
    _check_same_dim(x, y)
    num_projections = check_positive_int("num_projections", num_projections)
    if not (isinstance(p, (int, float)) and p >= 1):
        raise ValueError(f"p must be a number >= 1, got {p!r}.")
    return _sliced_wasserstein(x, y, key, num_projections, float(p))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _sliced_wasserstein(x, y, key, num_projections: int, p: float) -> jax.Array:
    theta = jax.random.normal(key, (num_projections, x.shape[1]), x.dtype)
    theta = theta / jnp.linalg.norm(theta, axis=1, keepdims=True)
    u, v = jnp.sort(x @ theta.T, axis=0), jnp.sort(y @ theta.T, axis=0)
    return jnp.mean(_wasserstein_1d_pp(u, v, p)) ** (1.0 / p)


# ---------------------------------------------------------------------------
# Mode weights
# ---------------------------------------------------------------------------


class ModeWeights(NamedTuple):
    """Samples per mixture component.

    Attributes:
        weights: ``[K]`` fraction of the kept samples assigned to each
            component (sums to 1 when any sample is kept).
        counts: ``[K]`` kept samples per component.
        rejected_fraction: fraction of samples far from every mode (0 without
            ``max_mahalanobis``).
    """

    weights: jax.Array
    counts: jax.Array
    rejected_fraction: jax.Array


def mode_weights(
    samples: jax.Array, mixture: GaussianMixture, *, max_mahalanobis: float | None = None, block_size: int = 4096
) -> ModeWeights:
    """Assigns each sample to its most responsible component and counts.

    Sample ``x`` goes to ``argmax_k w_k N(x; mu_k, Sigma_k)``. With
    ``max_mahalanobis = r`` it is rejected instead when
    ``(x - mu_k)^T Sigma_k^{-1} (x - mu_k) > r^2`` for that component, so
    points between or far from all modes do not count for any; for a sample
    of the mixture itself the rejected fraction is ``P(chi^2_d > r^2)``
    (``exp(-r^2 / 2)`` in 2-D) when the modes are well separated.

    Args:
        samples: ``[B, d]``.
        mixture: a :class:`~dsm_jax.distributions.GaussianMixture`.
        max_mahalanobis: rejection radius ``r > 0`` in standard deviations, or None.
        block_size: samples processed at a time (``lax.map`` over blocks).

    Returns:
        :class:`ModeWeights`.
    """
    if not isinstance(mixture, GaussianMixture):
        raise ValueError(f"mixture must be a GaussianMixture, got {type(mixture).__name__}.")
    check_batched("samples", samples)
    block_size = check_positive_int("block_size", block_size)
    if jnp.shape(samples)[1:] != (mixture.dim,):
        raise ValueError(f"samples must have shape [B, {mixture.dim}], got {jnp.shape(samples)}.")
    if max_mahalanobis is None:
        max_mahalanobis = jnp.inf
    else:
        check_positive_number("max_mahalanobis", max_mahalanobis)
    return _mode_weights(samples, mixture, max_mahalanobis, min(block_size, samples.shape[0]))


@functools.partial(jax.jit, static_argnums=3)
def _mode_weights(samples, mixture: GaussianMixture, max_mahalanobis, block_size: int) -> ModeWeights:
    precisions = jnp.linalg.inv(mixture.covariance_matrices)

    def block_counts(block):
        x, valid = block
        assign = jnp.argmax(mixture.component_log_probs(x), axis=1)
        diff = x - mixture.means[assign]
        maha2 = jnp.einsum("bi,bij,bj->b", diff, precisions[assign], diff)
        keep = valid * (maha2 <= jnp.square(max_mahalanobis))
        return jnp.sum(jax.nn.one_hot(assign, mixture.num_components) * keep[:, None], axis=0)

    counts = jnp.sum(jax.lax.map(block_counts, row_blocks(samples, block_size)), axis=0)
    total = jnp.sum(counts)
    n = samples.shape[0]
    return ModeWeights(counts / total, counts, (n - total) / n)


# ---------------------------------------------------------------------------
# PSNR
# ---------------------------------------------------------------------------


def psnr(x: jax.Array, reference: jax.Array, *, data_range: float = 2.0) -> jax.Array:
    """Peak signal-to-noise ratio per example, in dB: ``10 log10(R^2 / MSE)``.

    ``MSE`` is the mean over the dimensions of one example and ``R`` the
    width of the data range: 2 for data in ``[-1, 1]`` (the digits of
    :mod:`dsm_jax.data`), 1 for ``[0, 1]``, 255 for 8-bit levels. Identical
    examples give ``inf``.

    Args:
        x: ``[B, *D]`` e.g. denoised images.
        reference: ``[B, *D]`` the clean images.
        data_range: ``R > 0``.

    Returns:
        ``[B]``.

    Example:
        >>> psnr(jnp.full((1, 4), 0.1), jnp.zeros((1, 4)), data_range=1.0)   # MSE 0.01
        Array([20.], dtype=float32)
    """
    check_batched("x", x, min_ndim=1)
    if jnp.shape(x) != jnp.shape(reference):
        raise ValueError(f"x and reference must have the same shape, got {jnp.shape(x)} and {jnp.shape(reference)}.")
    check_positive_number("data_range", data_range)
    diff = (jnp.asarray(x) - jnp.asarray(reference)).reshape(jnp.shape(x)[0], -1)
    mse = jnp.mean(diff**2, axis=1)
    return 10.0 * jnp.log10(data_range**2 / mse)


# ---------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------


def _real_array(name: str, value) -> np.ndarray:
    arr = np.asarray(value)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}.")
    return arr.astype(np.float64)


def _check_features(name: str, features) -> np.ndarray:
    """``features`` as a float64 ``[N, F]`` array with ``N >= 2``, ``F >= 1`` and finite values."""
    x = _real_array(name, features)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D array [N, F] of N feature vectors, got shape {x.shape}.")
    if x.shape[0] < 2:
        raise ValueError(f"{name} must hold at least 2 rows to estimate a covariance, got shape {x.shape}.")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ValueError(f"{name} must be finite, got NaN or Inf in {bad.size} rows (first {bad[:5].tolist()}).")
    return x


def _statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(axis=0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [F], cov [F, F])``: the mean and unbiased covariance (divisor ``N - 1``) of ``features``, float64.

    The statistics :func:`frechet_distance_from_stats` takes, so a reference
    set's are computed once and reused.

    Args:
        features: ``[N, F]`` finite real values, ``N >= 2``.

    Returns:
        ``(mu, cov)`` float64 NumPy arrays.
    """
    return _statistics(_check_features("features", features))


def _check_stats(mu_name: str, mu, cov_name: str, cov) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, cov)`` as float64 with ``cov`` a symmetric positive semi-definite ``[F, F]`` (symmetrised)."""
    mu, cov = _real_array(mu_name, mu), _real_array(cov_name, cov)
    if mu.ndim != 1 or mu.shape[0] == 0:
        raise ValueError(f"{mu_name} must be a non-empty 1-D mean vector [F], got shape {mu.shape}.")
    f = mu.shape[0]
    if cov.shape != (f, f):
        raise ValueError(f"{cov_name} must have shape [F, F] = ({f}, {f}) to match {mu_name}, got {cov.shape}.")
    for name, arr in ((mu_name, mu), (cov_name, cov)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} must be finite, got {int(np.sum(~np.isfinite(arr)))} NaN or Inf entries.")
    # Float32 statistics are symmetric and semi-definite up to rounding only: accept that much.
    scale = float(np.abs(cov).max())
    asymmetry = float(np.abs(cov - cov.T).max())
    if asymmetry > 1e-5 * scale:
        raise ValueError(f"{cov_name} must be symmetric, got max |C - C^T| = {asymmetry:.3g} (max |C| = {scale:.3g}).")
    cov = 0.5 * (cov + cov.T)
    lowest = float(np.linalg.eigvalsh(cov)[0]) if f else 0.0
    if lowest < -1e-5 * scale:
        raise ValueError(f"{cov_name} must be positive semi-definite, got the eigenvalue {lowest:.3g}.")
    return mu, cov


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """The symmetric square root ``V diag(sqrt(max(w, 0))) V^T`` of a symmetric ``cov = V diag(w) V^T``."""
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _frechet(mu_a, cov_a, mu_b, cov_b) -> float:
    sqrt_a = _psd_sqrt(cov_a)
    inner = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (inner + inner.T)), 0.0, None)))
    d = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
    return max(float(d), 0.0)  # >= 0 exactly; rounding can leave -1e-15 * tr C for equal laws


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """The squared Frechet (2-Wasserstein) distance between ``N(mu_a, cov_a)`` and ``N(mu_b, cov_b)``.

        ``d^2 = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^{1/2} C_b C_a^{1/2})^{1/2})``

    (Dowson & Landau 1982), the statistic of FID (Heusel et al. 2017), which
    reports ``d^2`` itself. Computed in float64 NumPy with symmetric square
    roots from eigendecompositions (eigenvalues below 0 from rounding are
    set to 0), so semi-definite covariances (fewer examples than features,
    constant features) give a real, finite value; no complex matrix square
    root is taken. The result is symmetric in ``a`` and ``b`` (the trace term
    is the sum of the square roots of the eigenvalues of ``C_a C_b``), 0 for
    equal statistics, and ``|mu_a - mu_b|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2``
    for commuting covariances with eigenvalues ``a_i``, ``b_i``.

    Args:
        mu_a: ``[F]`` mean of the first Gaussian.
        cov_a: ``[F, F]`` its covariance, symmetric positive semi-definite
            (up to float32 rounding, then symmetrised).
        mu_b: ``[F]`` mean of the second.
        cov_b: ``[F, F]`` its covariance.

    Returns:
        ``d^2 >= 0`` as a Python float.

    Example:
        >>> frechet_distance_from_stats(np.zeros(2), np.diag([1.0, 4.0]), np.ones(2), np.diag([4.0, 1.0]))
        4.0

    References:
        Dowson & Landau, "The Frechet distance between multivariate normal
        distributions", J. Multivariate Anal. 1982; Heusel et al., "GANs
        trained by a two time-scale update rule converge to a local Nash
        equilibrium", NeurIPS 2017.
    """
    mu_a, cov_a = _check_stats("mu_a", mu_a, "cov_a", cov_a)
    mu_b, cov_b = _check_stats("mu_b", mu_b, "cov_b", cov_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"mu_a and mu_b must have the same feature dimension, got {mu_a.shape} and {mu_b.shape}.")
    return _frechet(mu_a, cov_a, mu_b, cov_b)


def frechet_distance(features_a, features_b) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets (FID's statistic on any features).

    Each set's mean and unbiased covariance (:func:`feature_statistics`) go
    into :func:`frechet_distance_from_stats`. The estimate is biased upwards:
    for two independent samples of sizes ``n_a``, ``n_b`` of one law with
    covariance ``C`` (eigenvalues ``l_i``), ``E d^2 = tr(C) (1/n_a + 1/n_b)``
    from the means plus, to first order in ``1/n``,
    ``(1/(n_a - 1) + 1/(n_b - 1)) / 2 * (sum_ij l_i l_j / (l_i + l_j) + tr(C) / 2)``
    from the covariances (``2 F / n + (F^2 + F) / (2 (n - 1))`` in all for
    ``C = I_F`` and ``n_a = n_b = n``). So compare values at equal sample
    sizes, next to the same statistic between two real samples (the floor).

    Args:
        features_a: ``[N_a, F]`` finite real feature vectors, ``N_a >= 2``.
        features_b: ``[N_b, F]``, the same ``F``.

    Returns:
        ``d^2 >= 0`` as a Python float.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(500, 3))
        >>> round(frechet_distance(x, x + np.array([1.0, 2.0, 2.0])), 10)   # a shift by |delta| = 3
        9.0
    """
    a, b = _check_features("features_a", features_a), _check_features("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"features_a and features_b must have the same feature dimension, got F={a.shape[1]} and F={b.shape[1]}."
        )
    return _frechet(*_statistics(a), *_statistics(b))


class FrechetReport(NamedTuple):
    """A model's Frechet distance next to what a perfect model and a Gaussian give (:func:`frechet_with_baselines`).

    Attributes:
        frechet: samples vs the reference set.
        floor: ``n`` training examples vs the reference set: what a perfect model gives at this size.
        gaussian: ``n`` draws of the full-covariance Gaussian fitted to the training set vs the reference set.
        n: the size of each of the three compared sets.
    """

    frechet: float
    floor: float
    gaussian: float
    n: int


def frechet_with_baselines(
    samples, reference, train, key: jax.Array, *, features: Callable[[np.ndarray], np.ndarray] = digits_features
) -> FrechetReport:
    """The Frechet distance of ``samples`` to ``reference`` in ``features``, with its floor and a Gaussian baseline.

    The three values compare sets of the same size ``n = min(len(samples),
    len(reference), len(train))`` (the first ``n`` samples, ``n`` training
    examples drawn without replacement, ``n`` draws of ``N(mean(train),
    cov(train))`` in the data space) with all of ``reference``, so they share
    the small-sample bias of :func:`frechet_distance` and read against each
    other: a model between the floor and the Gaussian beats a Gaussian fit.

    Args:
        samples: ``[N_s, *D]`` the model's samples (finite).
        reference: ``[N_r, *D]`` held-out data.
        train: ``[N_t, *D]`` the training data.
        key: PRNG key for the training subset and the Gaussian draws.
        features: ``features(x [n, *D]) -> [n, F]``; default :func:`digits_features`.

    Returns:
        :class:`FrechetReport`.
    """
    samples, reference, train = (np.asarray(a) for a in (samples, reference, train))
    for name, arr in (("samples", samples), ("reference", reference), ("train", train)):
        check_batched(name, arr)
        if arr.shape[1:] != reference.shape[1:]:
            raise ValueError(f"{name} must have examples of shape {reference.shape[1:]}, got {arr.shape}.")
    n = min(samples.shape[0], reference.shape[0], train.shape[0])
    if n < 2:
        raise ValueError(f"the Frechet distance needs at least 2 examples in each set, got n={n}.")
    k_subset, k_gauss = jax.random.split(key)
    flat = _check_features("train", train.reshape(train.shape[0], -1))
    mean, cov = _statistics(flat)
    z = np.asarray(jax.random.normal(k_gauss, (n, flat.shape[1])), dtype=np.float64)
    gaussian = (mean + z @ _psd_sqrt(cov)).reshape((n,) + train.shape[1:])
    subset = train[np.asarray(jax.random.permutation(k_subset, train.shape[0]))[:n]]
    stats = feature_statistics(features(reference))

    def distance(x) -> float:
        return frechet_distance_from_stats(*feature_statistics(features(x)), *stats)

    return FrechetReport(distance(samples[:n]), distance(subset), distance(gaussian), n)


# ---------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------


def fid(samples, reference, *, weights, force: bool = False, min_samples: int = 2048, batch_size: int = 50) -> float:
    """Frechet Inception distance of ``samples`` to reference statistics (:func:`dsm_jax.inception.fid`).

    ``FID = |mu_s - mu_r|^2 + tr(C_s + C_r - 2 (C_s C_r)^{1/2})`` on the 2048
    pool3 features of the FID InceptionV3 (pytorch-fid's network and
    bilinear 299x299 resize), samples in ``[-1, 1]`` quantized to 8 bits
    first, as a PNG would store them.

    Args:
        samples: ``[N, H, W, C]`` images in ``[-1, 1]`` (or uint8 levels).
        reference: :class:`dsm_jax.inception.ReferenceStats` or the path of their ``.npz``.
        weights: the converted FID Inception weights (``.npz`` path) or a :class:`dsm_jax.inception.FIDNetwork`.
        force: compare fewer than ``min_samples`` samples anyway.
        min_samples: the smallest set accepted without ``force`` (2048, the feature dimension).
        batch_size: images per forward.

    References:
        Heusel et al., NeurIPS 2017.
    """
    from dsm_jax import inception

    return inception.fid(
        samples, reference, network=weights, force=force, min_samples=min_samples, batch_size=batch_size
    )
