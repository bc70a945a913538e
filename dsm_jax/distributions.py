"""Ground truth: Gaussians and Gaussian mixtures with closed-form scores.

Both classes are immutable pytrees (they pass through ``jit``/``vmap``), accept
full ``[d, d]`` or diagonal ``[d]`` covariances, and expose

* ``log_prob(x) -> [B]`` and ``score(x) = grad_x log p(x) -> [B, d]``,
* ``sample(key, n) -> [n, d]``,
* ``convolve(sigma, *, scale=1.0)``: the exact law of ``scale * x + sigma * eps``
  with ``eps ~ N(0, I)`` (the noised marginal used by DSM and the SDEs),
* ``posterior_mean(y, sigma, *, scale=1.0)``: ``E[x | y]``, the Bayes-optimal
  denoiser, computed from the Gaussian conditionals (not through Tweedie, so
  the two can be checked against each other),
* ``posterior_covariance(y, sigma, *, scale=1.0)``: ``Cov[x | y] -> [B, d, d]``.
* the mixture per component (class-conditional ground truth): ``component(k)``
  (a :class:`Gaussian`), ``component_scores``, ``conditional_score(x, labels)``
  and the Bayes classifier ``log_responsibilities(x) = log p(k | x)``.

The constructors check what the user passes, before any tracing: ranks always
(also for tracers, whose shapes are static), finiteness, positive (definite)
covariances and valid weights whenever the values are concrete (numpy or jax
arrays, not tracers), so a constructor called inside ``jit``/``vmap`` still
traces. Rebuilding by the pytree machinery (``jit``/``vmap`` outputs,
``jax.tree.map``) bypasses the constructor, so leaves with a batch axis or
placeholders pass through untouched.

The mixture uses log-sum-exp responsibilities, so its score is finite and
accurate far from every mode (e.g. at ``|x| = 1e3``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax._checks import (
    check_batched,
    check_finite,
    check_key,
    check_positive_int,
    check_positive_number,
    is_concrete,
)
from dsm_jax._utils import LOG_2PI, dataclass_transform

# --------------------------------------------------------------------------
# Single-component helpers; `cov` is [d] (diagonal) or [d, d] (full).
# --------------------------------------------------------------------------


def _is_diag(cov: jax.Array) -> bool:
    return cov.ndim == 1


def _solve(cov: jax.Array, v: jax.Array) -> jax.Array:
    """Sigma^{-1} v for v: [B, d]."""
    if _is_diag(cov):
        return v / cov
    chol = jnp.linalg.cholesky(cov)
    return jax.scipy.linalg.cho_solve((chol, True), v.T).T


def _logpdf(x: jax.Array, mean: jax.Array, cov: jax.Array) -> jax.Array:
    d = mean.shape[-1]
    diff = x - mean
    if _is_diag(cov):
        maha = jnp.sum(diff**2 / cov, axis=-1)
        logdet = jnp.sum(jnp.log(cov))
    else:
        chol = jnp.linalg.cholesky(cov)
        z = jax.scipy.linalg.solve_triangular(chol, diff.T, lower=True)
        maha = jnp.sum(z**2, axis=0)
        logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
    return -0.5 * (maha + logdet + d * LOG_2PI)


def _logpdf_parts(x: jax.Array, mean: jax.Array, cov: jax.Array):
    """log N(x; mean, cov) = -1/2 (quad + rest), split so that ``quad = x^T P x``
    carries the huge part far from the mean and ``rest = -2 x^T P mu + mu^T P mu
    + logdet + d log 2 pi`` the part that tells components apart.

    Components with the same covariance get bitwise-identical ``quad``, so
    their responsibilities stay exact even at |x| = 1e3 in float32.
    """
    d = mean.shape[-1]
    if _is_diag(cov):
        quad = jnp.sum(x**2 / cov, axis=-1)
        cross = jnp.sum(x * (mean / cov), axis=-1)
        const = jnp.sum(mean**2 / cov) + jnp.sum(jnp.log(cov))
    else:
        chol = jnp.linalg.cholesky(cov)
        zx = jax.scipy.linalg.solve_triangular(chol, x.T, lower=True)
        zm = jax.scipy.linalg.solve_triangular(chol, mean, lower=True)
        quad = jnp.sum(zx**2, axis=0)
        cross = zm @ zx
        const = jnp.sum(zm**2) + 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
    return quad, -2.0 * cross + const + d * LOG_2PI


def _noised_cov(cov: jax.Array, sigma, scale) -> jax.Array:
    if _is_diag(cov):
        return scale**2 * cov + sigma**2
    return scale**2 * cov + sigma**2 * jnp.eye(cov.shape[-1], dtype=cov.dtype)


def _full(cov: jax.Array) -> jax.Array:
    return jnp.diag(cov) if _is_diag(cov) else cov


def _gaussian_posterior(y, mean, cov, sigma, scale):
    """Mean [B, d] and covariance [d, d] of x | y for x ~ N(mean, cov), y = scale x + sigma eps."""
    noised = _noised_cov(cov, sigma, scale)
    # E[x|y] = mean + scale * cov (scale^2 cov + sigma^2 I)^{-1} (y - scale mean)
    gain_times_resid = _solve(noised, y - scale * mean)
    full_cov = _full(cov)
    post_mean = mean + scale * gain_times_resid @ full_cov.T
    # Cov[x|y] = cov - scale^2 cov (scale^2 cov + sigma^2 I)^{-1} cov
    post_cov = full_cov - scale**2 * full_cov @ _solve(noised, full_cov)
    return post_mean, 0.5 * (post_cov + post_cov.T)


def _validate_cov(name: str, cov: jax.Array, d: int, *, leading: tuple = ()) -> None:
    if cov.shape not in (leading + (d,), leading + (d, d)):
        raise ValueError(
            f"{name} must have shape {leading + (d,)} (diagonal) or {leading + (d, d)} (full), got {cov.shape}."
        )
    if is_concrete(cov):
        arr = np.asarray(cov)
        if arr.ndim == len(leading) + 1:
            check_positive_number(f"{name} (diagonal variances)", arr)
        else:
            check_finite(name, arr)
            eig = np.linalg.eigvalsh(0.5 * (arr + np.swapaxes(arr, -1, -2)))
            if not np.all(eig > 0):
                raise ValueError(f"{name} must be symmetric positive definite; smallest eigenvalue {eig.min():.3g}.")


def _float_array(name: str, value, ndim: int, what: str) -> jax.Array:
    """``value`` as a float array of rank ``ndim`` (any array, list or tracer), finite when concrete."""
    arr = jnp.asarray(value, dtype=jnp.result_type(float))
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have shape {what}, got shape {arr.shape}.")
    check_finite(name, arr)
    return arr


@dataclass_transform(frozen_default=True)
def _pytree_class(cls):
    """A frozen dataclass registered as a pytree whose rebuilding bypasses ``__init__``.

    So ``__post_init__`` (validation) runs only when a user calls the
    constructor, never on the leaves that ``jit``/``vmap``/``tree.map``
    rebuild a class from (tracers, batched arrays, placeholders).
    """
    cls = dataclasses.dataclass(frozen=True)(cls)
    names = tuple(f.name for f in dataclasses.fields(cls))

    def flatten_with_keys(obj):
        return [(jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in names], None

    def unflatten(_, leaves):
        obj = object.__new__(cls)
        for n, leaf in zip(names, leaves, strict=True):
            object.__setattr__(obj, n, leaf)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten)
    cls.replace = lambda self, **updates: dataclasses.replace(self, **updates)
    return cls


def _check_points(x: jax.Array, d: int, name: str = "x") -> None:
    check_batched(name, x)
    if x.ndim != 2 or x.shape[-1] != d:
        raise ValueError(f"{name} must have shape [B, {d}], got {jnp.shape(x)}.")


def _check_labels(labels, batch_size: int, num_components: int) -> jax.Array:
    """Integer labels ``[B]`` or a scalar, in ``[0, K)`` when concrete; returned as ``[B]``."""
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {jnp.result_type(labels)}.")
    if jnp.shape(labels) not in ((), (batch_size,)):
        raise ValueError(f"labels must be a scalar or have shape [B]=({batch_size},), got shape {jnp.shape(labels)}.")
    if is_concrete(labels):
        arr = np.asarray(labels)
        if np.any(arr < 0) or np.any(arr >= num_components):
            raise ValueError(f"labels must lie in [0, {num_components}), got {arr.tolist()!r}.")
    return jnp.broadcast_to(jnp.asarray(labels), (batch_size,))


def _check_noise(sigma, scale) -> None:
    check_positive_number("sigma", sigma)
    check_positive_number("scale", scale)


# --------------------------------------------------------------------------
# Gaussian
# --------------------------------------------------------------------------


@_pytree_class
class Gaussian:
    """A multivariate normal ``N(mean, cov)``.

    Args:
        mean: ``[d]``.
        cov: ``[d, d]`` (full, symmetric positive definite) or ``[d]`` (diagonal variances).

    Example:
        >>> g = Gaussian(jnp.zeros(2), jnp.array([1.0, 4.0]))
        >>> g.score(jnp.ones((1, 2)))   # -(x - mean) / var
        Array([[-1.  , -0.25]], dtype=float32)
    """

    mean: jax.Array
    cov: jax.Array

    def __post_init__(self):
        mean = _float_array("mean", self.mean, 1, "[d]")
        cov = jnp.asarray(self.cov, dtype=mean.dtype)
        _validate_cov("cov", cov, mean.shape[0])
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "cov", cov)

    @property
    def dim(self) -> int:
        return self.mean.shape[-1]

    @property
    def covariance_matrix(self) -> jax.Array:
        return _full(self.cov)

    def log_prob(self, x: jax.Array) -> jax.Array:
        _check_points(x, self.dim)
        return _logpdf(x, self.mean, self.cov)

    def score(self, x: jax.Array) -> jax.Array:
        """grad_x log p(x) = -Sigma^{-1} (x - mean)."""
        _check_points(x, self.dim)
        return -_solve(self.cov, x - self.mean)

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        check_key(key)
        check_positive_int("n", n)
        z = jax.random.normal(key, (n, self.dim), dtype=self.mean.dtype)
        if _is_diag(self.cov):
            return self.mean + z * jnp.sqrt(self.cov)
        return self.mean + z @ jnp.linalg.cholesky(self.cov).T

    def convolve(self, sigma, *, scale=1.0) -> Gaussian:
        """Law of ``scale * x + sigma * eps``: ``N(scale mean, scale^2 cov + sigma^2 I)``."""
        _check_noise(sigma, scale)
        return Gaussian(scale * self.mean, _noised_cov(self.cov, sigma, scale))

    def posterior_mean(self, y: jax.Array, sigma, *, scale=1.0) -> jax.Array:
        """E[x | y] for ``y = scale x + sigma eps`` (linear in y)."""
        _check_points(y, self.dim, "x_noisy")
        _check_noise(sigma, scale)
        return _gaussian_posterior(y, self.mean, self.cov, sigma, scale)[0]

    def posterior_covariance(self, y: jax.Array, sigma, *, scale=1.0) -> jax.Array:
        """Cov[x | y] ``[B, d, d]`` (the same for every y)."""
        _check_points(y, self.dim, "x_noisy")
        _check_noise(sigma, scale)
        cov = _gaussian_posterior(y, self.mean, self.cov, sigma, scale)[1]
        return jnp.broadcast_to(cov, (y.shape[0],) + cov.shape)


# --------------------------------------------------------------------------
# Gaussian mixture
# --------------------------------------------------------------------------


@_pytree_class
class GaussianMixture:
    """A mixture ``sum_k w_k N(means_k, covs_k)``.

    Args:
        weights: ``[K]`` non-negative, normalised on construction.
        means: ``[K, d]``.
        covs: ``[K, d, d]`` (full), ``[K, d]`` (diagonal).

    Example:
        >>> gmm = GaussianMixture(jnp.array([0.5, 0.5]),
        ...                       jnp.array([[2.0, 2.0], [-2.0, -2.0]]),
        ...                       jnp.full((2, 2), 0.25))
        >>> noised = gmm.convolve(0.5)         # the DSM target at sigma = 0.5
        >>> noised.score(jnp.zeros((1, 2)))    # symmetric: zero at the origin
        Array([[0., 0.]], dtype=float32)
    """

    weights: jax.Array
    means: jax.Array
    covs: jax.Array

    def __post_init__(self):
        means = _float_array("means", self.means, 2, "[K, d]")
        covs = jnp.asarray(self.covs, dtype=means.dtype)
        k, d = means.shape
        if np.shape(self.weights) != (k,):
            raise ValueError(f"weights must have shape [K]=({k},), got shape {np.shape(self.weights)}.")
        if is_concrete(self.weights):
            w = np.asarray(self.weights, dtype=np.float64)
            if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
                raise ValueError(f"weights must be finite, non-negative and have a positive sum, got {self.weights!r}.")
            weights = jnp.asarray(w / w.sum(), dtype=means.dtype)
        else:
            weights = jnp.asarray(self.weights, dtype=means.dtype)
            weights = weights / jnp.sum(weights)
        _validate_cov("covs", covs, d, leading=(k,))
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "covs", covs)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @property
    def covariance_matrices(self) -> jax.Array:
        return jax.vmap(_full)(self.covs)

    def _shifted_logits(self, x: jax.Array):
        """``(shift [B], logits [B, K])`` with ``component_log_probs = logits + shift``."""
        _check_points(x, self.dim)
        quad, rest = jax.vmap(_logpdf_parts, in_axes=(None, 0, 0), out_axes=1)(x, self.means, self.covs)
        shift = jnp.min(quad, axis=1)
        logits = -0.5 * ((quad - shift[:, None]) + rest) + jnp.log(self.weights)
        return -0.5 * shift, logits

    def component_log_probs(self, x: jax.Array) -> jax.Array:
        """log w_k + log N(x; mu_k, Sigma_k) -> [B, K]."""
        shift, logits = self._shifted_logits(x)
        return logits + shift[:, None]

    def responsibilities(self, x: jax.Array) -> jax.Array:
        """p(k | x) -> [B, K], via a stable softmax."""
        return jax.nn.softmax(self._shifted_logits(x)[1], axis=-1)

    def log_prob(self, x: jax.Array) -> jax.Array:
        shift, logits = self._shifted_logits(x)
        return shift + jax.nn.logsumexp(logits, axis=-1)

    def score(self, x: jax.Array) -> jax.Array:
        """sum_k p(k|x) * (-Sigma_k^{-1} (x - mu_k))."""
        resp = self.responsibilities(x)
        comp = jax.vmap(lambda m, c: -_solve(c, x - m), out_axes=1)(self.means, self.covs)
        return jnp.einsum("bk,bkd->bd", resp, comp)

    # -- per component (class-conditional ground truth) -------------------------
    def component(self, k: int) -> Gaussian:
        """Component ``k`` as a :class:`Gaussian`: the class-conditional law ``p(x | label = k)``.

        Noised per component like the mixture: ``gmm.convolve(sigma).component(k)
        == gmm.component(k).convolve(sigma)``.
        """
        k = check_positive_int("k", k, minimum=0)
        if k >= self.num_components:
            raise ValueError(f"k must be a component index in [0, {self.num_components}), got {k}.")
        return Gaussian(self.means[k], self.covs[k])

    def log_responsibilities(self, x: jax.Array) -> jax.Array:
        """``log p(k | x) -> [B, K]``: the Bayes classifier of the components (stable log-softmax)."""
        return jax.nn.log_softmax(self._shifted_logits(x)[1], axis=-1)

    def component_scores(self, x: jax.Array) -> jax.Array:
        """``grad_x log N(x; mu_k, Sigma_k) = -Sigma_k^{-1} (x - mu_k) -> [B, K, d]``."""
        _check_points(x, self.dim)
        return jax.vmap(lambda m, c: -_solve(c, x - m), out_axes=1)(self.means, self.covs)

    def conditional_score(self, x: jax.Array, labels) -> jax.Array:
        """The class-conditional score ``grad_x log p(x | k = labels_b) -> [B, d]``.

        ``labels``: integers ``[B]`` or a scalar, each in ``[0, K)``. For the
        noised law use ``gmm.convolve(sigma, scale=...).conditional_score(x, labels)``.
        By Bayes, ``score(x) + grad_x log p(k | x) = conditional_score(x, k)``.
        """
        _check_points(x, self.dim)
        labels = _check_labels(labels, x.shape[0], self.num_components)
        return jnp.take_along_axis(self.component_scores(x), labels[:, None, None], axis=1)[:, 0]

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        check_key(key)
        check_positive_int("n", n)
        k_comp, k_noise = jax.random.split(key)
        comp = jax.random.categorical(k_comp, jnp.log(self.weights), shape=(n,))
        z = jax.random.normal(k_noise, (n, self.dim), dtype=self.means.dtype)
        if _is_diag(self.covs[0]):
            return self.means[comp] + z * jnp.sqrt(self.covs[comp])
        chols = jnp.linalg.cholesky(self.covs)
        return self.means[comp] + jnp.einsum("nij,nj->ni", chols[comp], z)

    def sample_with_labels(self, key: jax.Array, n: int):
        """Samples and the index of the component each came from."""
        check_key(key)
        k_comp, _ = jax.random.split(key)
        comp = jax.random.categorical(k_comp, jnp.log(self.weights), shape=(n,))
        return self.sample(key, n), comp

    def convolve(self, sigma, *, scale=1.0) -> GaussianMixture:
        """Law of ``scale * x + sigma * eps``: each component noised, weights kept."""
        _check_noise(sigma, scale)
        covs = jax.vmap(lambda c: _noised_cov(c, sigma, scale))(self.covs)
        return GaussianMixture(self.weights, scale * self.means, covs)

    def _posteriors(self, y, sigma, scale):
        _check_points(y, self.dim, "x_noisy")
        _check_noise(sigma, scale)
        resp = self.convolve(sigma, scale=scale).responsibilities(y)  # p(k | y)
        means, covs = jax.vmap(lambda m, c: _gaussian_posterior(y, m, c, sigma, scale), out_axes=(1, 0))(
            self.means, self.covs
        )  # [B, K, d], [K, d, d]
        return resp, means, covs

    def posterior_mean(self, y: jax.Array, sigma, *, scale=1.0) -> jax.Array:
        """E[x | y] = sum_k p(k | y) E[x | y, k]."""
        resp, means, _ = self._posteriors(y, sigma, scale)
        return jnp.einsum("bk,bkd->bd", resp, means)

    def posterior_covariance(self, y: jax.Array, sigma, *, scale=1.0) -> jax.Array:
        """Cov[x | y] -> [B, d, d] by the law of total covariance over components."""
        resp, means, covs = self._posteriors(y, sigma, scale)
        mean = jnp.einsum("bk,bkd->bd", resp, means)
        within = jnp.einsum("bk,kij->bij", resp, covs)
        centred = means - mean[:, None, :]
        between = jnp.einsum("bk,bki,bkj->bij", resp, centred, centred)
        return within + between
