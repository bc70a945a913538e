"""Datasets and batches: 2-D toy sets, scikit-learn's 8x8 digits, user arrays.

Three kinds of data, all returned as a :class:`Dataset` (``train`` and a
held-out ``test`` split, host ``float32`` numpy arrays ``[N, *D]``):

* **2-D toy sets** drawn with an explicit PRNG key: :func:`swiss_roll`,
  :func:`moons`, :func:`eight_gaussians`, :func:`checkerboard`,
  :func:`rings`, :func:`pinwheel` and :func:`two_clusters` (the two-cluster
  mixture of the DSM tutorial). All live roughly in ``[-3, 3]^2``. Where the
  law is a Gaussian mixture (``eight_gaussians``, ``two_clusters``, or any
  :class:`~dsm_jax.distributions.GaussianMixture` through
  :func:`mixture_dataset`), ``Dataset.distribution`` holds it, so the exact
  score of the data and of every noised marginal is available.
* **Digits**: scikit-learn's 1797 8x8 grey-level images (shipped with
  scikit-learn, nothing is downloaded) as ``[N, 8, 8, 1]`` (channels-last),
  mapped from the 17 integer levels ``0..16`` to ``[-1, 1]`` by
  ``x = levels / 8 - 1`` (:func:`digits_from_levels`; inverse
  :func:`digits_to_levels`). ``[-1, 1]`` is centred, so a zero-mean noise
  prior and the usual ``sigma_max`` heuristics apply unchanged, and it is the
  range :func:`dsm_jax.likelihood.uniform_dequantization_offset` assumes by
  default.
* **User arrays**: ``.npy`` or ``.npz`` files read with
  ``allow_pickle=False`` and validated by :func:`load_array` (float dtype,
  finite values, shape ``[N, ...]``); bad files give a ``ValueError`` naming
  the path and the problem.
* **8-bit images** (image folders, the CIFAR-10/100 binary files, uint8
  ``.npy``/``.npz`` arrays): :mod:`dsm_jax.images`, which :func:`load_dataset`
  calls for them.

Batches come from :class:`BatchSource`, a pure function of the step:
``batch_at(step)`` is the slice ``[step * B, (step + 1) * B)`` of an endless
stream made of one fresh permutation of the training set per epoch
(permutation ``e`` drawn with ``fold_in(key(seed), e)``). The data position
is therefore the step itself: a resumed run asks for the same steps and gets
the same batches, with nothing else to checkpoint. :func:`shard_batch` turns
a global batch into ``[devices, per_device, ...]`` for ``pmap``.

Example:
    >>> ds = load_dataset("two_clusters", num_train=1000, num_test=200, seed=0)
    >>> ds.train.shape, ds.test.shape, ds.distribution.num_components
    ((1000, 2), (200, 2), 2)
    >>> batches = BatchSource(ds.train, batch_size=128, seed=0)
    >>> batches(0).shape
    (128, 2)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax._checks import check_positive_int, check_positive_number
from dsm_jax.distributions import GaussianMixture

__all__ = [
    "BatchSource",
    "DATASETS",
    "DIGITS_RANGE",
    "Dataset",
    "MIXTURES",
    "TOY_DATASETS",
    "checkerboard",
    "digits_from_levels",
    "digits_to_levels",
    "eight_gaussians",
    "eight_gaussians_mixture",
    "load_array",
    "load_dataset",
    "load_digits",
    "mixture_dataset",
    "moons",
    "pinwheel",
    "rings",
    "shard_batch",
    "swiss_roll",
    "two_clusters",
    "two_clusters_mixture",
    "validate_array",
]

DIGITS_MAX_LEVEL = 16
DIGITS_RANGE = (-1.0, 1.0)
_TOY_DEFAULTS = (10_000, 2_000)
_DIGITS_NUM_TEST = 297
_ARRAY_SUFFIXES = (".npy", ".npz")
_NPY_MAGIC = b"\x93NUMPY"
_NPZ_MAGIC = b"PK"  # a zip archive

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A training set and its held-out split.

    Attributes:
        name: the built-in name or the file path.
        train: ``[N_train, *D]`` float32 (host numpy).
        test: ``[N_test, *D]`` float32, disjoint from ``train`` (drawn with
            another key for the toy sets); for evaluation.
        distribution: the exact law of the data when known (a
            :class:`~dsm_jax.distributions.GaussianMixture`), else None.
        data_range: ``(low, high)`` bounds of the values for bounded data
            (digits: ``(-1, 1)``), None when unbounded.
        description: one line saying what the data is and how it is scaled.
        train_labels: ``[N_train]`` integer labels when the source has them
            (image class folders, CIFAR, an ``.npz`` ``labels`` array, the
            digits' classes, a Gaussian mixture's drawn component), else None.
        test_labels: ``[N_test]`` likewise.
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    distribution: GaussianMixture | None = None
    data_range: tuple[float, float] | None = None
    description: str = ""
    train_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape ``D`` of one example."""
        return tuple(self.train.shape[1:])

    @property
    def dim(self) -> int:
        """The number of dimensions of one example, ``prod(D)``."""
        return math.prod(self.shape)


# ---------------------------------------------------------------------------
# 2-D toy sets: sampler(key, n) -> [n, 2] float32
# ---------------------------------------------------------------------------


def _check_n(n) -> int:
    return check_positive_int("n", n)


def _add_noise(key: jax.Array, x: jax.Array, noise: float) -> jax.Array:
    """``x + noise * N(0, I)``; ``noise=0`` returns ``x``."""
    if noise == 0:
        return x
    check_positive_number("noise", noise)
    return x + noise * jax.random.normal(key, x.shape, x.dtype)


def swiss_roll(key: jax.Array, n: int, *, noise: float = 0.1) -> jax.Array:
    """A 2-D Swiss roll: ``t (cos t, sin t) / 5`` with ``t ~ U[1.5 pi, 4.5 pi]``, plus N(0, noise^2).

    Returns:
        ``[n, 2]``, within about ``[-2.8, 2.8]^2``.
    """
    n = _check_n(n)
    k_t, k_noise = jax.random.split(key)
    t = 1.5 * jnp.pi * (1.0 + 2.0 * jax.random.uniform(k_t, (n,)))
    x = jnp.stack([t * jnp.cos(t), t * jnp.sin(t)], axis=1) / 5.0
    return _add_noise(k_noise, x, noise)


def moons(key: jax.Array, n: int, *, noise: float = 0.1) -> jax.Array:
    """Two interleaved half circles (each with probability 1/2), centred and scaled by 2, plus N(0, noise^2).

    Upper moon ``(cos a, sin a)``, lower moon ``(1 - cos a, 1/2 - sin a)``,
    ``a ~ U[0, pi]``, then ``2 (x - (1/2, 1/4))``.

    Returns:
        ``[n, 2]``, within about ``[-3, 3] x [-1.5, 1.5]``.
    """
    n = _check_n(n)
    k_side, k_angle, k_noise = jax.random.split(key, 3)
    lower = jax.random.bernoulli(k_side, 0.5, (n,))
    a = jnp.pi * jax.random.uniform(k_angle, (n,))
    upper_pts = jnp.stack([jnp.cos(a), jnp.sin(a)], axis=1)
    lower_pts = jnp.stack([1.0 - jnp.cos(a), 0.5 - jnp.sin(a)], axis=1)
    x = jnp.where(lower[:, None], lower_pts, upper_pts)
    return _add_noise(k_noise, 2.0 * (x - jnp.array([0.5, 0.25])), noise)


def eight_gaussians_mixture(radius: float = 2.0, std: float = 0.25) -> GaussianMixture:
    """Eight equal-weight isotropic Gaussians with means ``radius (cos 2 pi k/8, sin 2 pi k/8)``."""
    check_positive_number("radius", radius)
    check_positive_number("std", std)
    angles = 2.0 * np.pi * np.arange(8) / 8
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture(jnp.full(8, 1.0 / 8), jnp.asarray(means), jnp.full((8, 2), float(std) ** 2))


def two_clusters_mixture() -> GaussianMixture:
    """The DSM tutorial mixture: ``1/2 N((2, 2), 0.5^2 I) + 1/2 N((-2, -2), 0.5^2 I)``."""
    return GaussianMixture(jnp.array([0.5, 0.5]), jnp.array([[2.0, 2.0], [-2.0, -2.0]]), jnp.full((2, 2), 0.25))


def eight_gaussians(key: jax.Array, n: int) -> jax.Array:
    """``n`` draws from :func:`eight_gaussians_mixture` (radius 2, std 0.25)."""
    return eight_gaussians_mixture().sample(key, _check_n(n))


def two_clusters(key: jax.Array, n: int) -> jax.Array:
    """``n`` draws from :func:`two_clusters_mixture`."""
    return two_clusters_mixture().sample(key, _check_n(n))


def checkerboard(key: jax.Array, n: int) -> jax.Array:
    """Uniform on the 8 dark cells of a 4x4 board of unit cells covering ``[-2, 2]^2``.

    A cell ``(i, j)`` (column, row) is dark when ``i + j`` is even.

    Returns:
        ``[n, 2]``.
    """
    n = _check_n(n)
    k_col, k_row, k_pos = jax.random.split(key, 3)
    col = jax.random.randint(k_col, (n,), 0, 4)
    row = 2 * jax.random.randint(k_row, (n,), 0, 2) + col % 2
    corner = jnp.stack([col, row], axis=1).astype(jnp.float32) - 2.0
    return corner + jax.random.uniform(k_pos, (n, 2))


def rings(key: jax.Array, n: int, *, radii: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0), noise: float = 0.05) -> jax.Array:
    """Concentric circles, plus N(0, noise^2).

    A ring is chosen with probability proportional to its radius (so the
    density along every circle is the same), the angle uniformly.

    Returns:
        ``[n, 2]``.
    """
    n = _check_n(n)
    check_positive_number("radii", np.asarray(radii, dtype=np.float64))
    k_ring, k_angle, k_noise = jax.random.split(key, 3)
    radii_arr = jnp.asarray(radii, jnp.float32)
    r = radii_arr[jax.random.categorical(k_ring, jnp.log(radii_arr), shape=(n,))]
    a = 2.0 * jnp.pi * jax.random.uniform(k_angle, (n,))
    return _add_noise(k_noise, r[:, None] * jnp.stack([jnp.cos(a), jnp.sin(a)], axis=1), noise)


def pinwheel(
    key: jax.Array,
    n: int,
    *,
    num_arms: int = 5,
    radial_std: float = 0.3,
    tangential_std: float = 0.1,
    rate: float = 0.25,
) -> jax.Array:
    """A pinwheel of ``num_arms`` curved arms (Johnson et al. 2016).

    For arm ``k`` (uniform), ``f = (1 + radial_std z_1, tangential_std z_2)``
    is rotated by ``2 pi k / num_arms + rate * exp(f_1)`` and scaled by 2.

    Returns:
        ``[n, 2]``.

    References:
        Johnson et al., "Composing graphical models with neural networks for
        structured representations and fast inference", NeurIPS 2016.
    """
    n = _check_n(n)
    num_arms = check_positive_int("num_arms", num_arms)
    for name, value in (("radial_std", radial_std), ("tangential_std", tangential_std)):
        check_positive_number(name, value)
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate >= 0):
        raise ValueError(f"rate must be a finite number >= 0, got {rate!r}.")
    k_arm, k_feat = jax.random.split(key)
    arm = jax.random.randint(k_arm, (n,), 0, num_arms)
    f = jax.random.normal(k_feat, (n, 2)) * jnp.array([radial_std, tangential_std]) + jnp.array([1.0, 0.0])
    angle = 2.0 * jnp.pi * arm / num_arms + rate * jnp.exp(f[:, 0])
    c, s = jnp.cos(angle), jnp.sin(angle)
    return 2.0 * jnp.stack([c * f[:, 0] - s * f[:, 1], s * f[:, 0] + c * f[:, 1]], axis=1)


TOY_DATASETS: dict = {
    "swiss_roll": swiss_roll,
    "moons": moons,
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "rings": rings,
    "pinwheel": pinwheel,
    "two_clusters": two_clusters,
}
"""2-D toy samplers ``sampler(key, n) -> [n, 2]`` by name."""

MIXTURES: dict = {"eight_gaussians": eight_gaussians_mixture, "two_clusters": two_clusters_mixture}
"""The toy sets whose law is a Gaussian mixture: name -> a function returning it."""

DATASETS: dict = {
    "swiss_roll": "2-D Swiss roll (noise 0.1)",
    "moons": "2-D two moons (noise 0.1)",
    "eight_gaussians": "2-D mixture of 8 Gaussians on a circle of radius 2 (std 0.25); exact score known",
    "checkerboard": "2-D uniform checkerboard on [-2, 2]^2",
    "rings": "2-D four concentric rings (noise 0.05)",
    "pinwheel": "2-D pinwheel with 5 arms",
    "two_clusters": "2-D tutorial mixture: N((2,2), 0.25 I) and N((-2,-2), 0.25 I), equal weights; exact score known",
    "digits": "scikit-learn 8x8 digits, 1797 images [N, 8, 8, 1] scaled to [-1, 1]",
}
"""Every built-in dataset name accepted by :func:`load_dataset`, with a one-line description."""


def _toy_dataset(name, sampler, num_train, num_test, seed, distribution, description) -> Dataset:
    key = jax.random.key(seed)
    train = np.asarray(sampler(jax.random.fold_in(key, 0), num_train), np.float32)
    if num_test:
        test = np.asarray(sampler(jax.random.fold_in(key, 1), num_test), np.float32)
    else:
        test = np.zeros((0,) + train.shape[1:], np.float32)
    train_labels = test_labels = None
    if distribution is not None:
        # The component each point was drawn from (the same key draws the same component as the sampler's).
        def drawn(k, n):
            return np.asarray(distribution.sample_with_labels(k, n)[1], np.int64) if n else np.zeros(0, np.int64)

        train_labels = drawn(jax.random.fold_in(key, 0), num_train)
        test_labels = drawn(jax.random.fold_in(key, 1), num_test)
    return Dataset(
        name,
        train,
        test,
        distribution=distribution,
        description=description,
        train_labels=train_labels,
        test_labels=test_labels,
    )


def mixture_dataset(
    mixture: GaussianMixture, *, num_train: int = 10_000, num_test: int = 2_000, seed: int = 0, name: str = "mixture"
) -> Dataset:
    """Train and test draws of any Gaussian mixture, with ``distribution=mixture``.

    The training set uses ``fold_in(key(seed), 0)``, the test set
    ``fold_in(key(seed), 1)``, so neither depends on the other's size.
    """
    if not isinstance(mixture, GaussianMixture):
        raise ValueError(f"mixture must be a GaussianMixture, got {type(mixture).__name__}.")
    sizes = _check_sizes(num_train, num_test, seed)
    description = f"Gaussian mixture with {mixture.num_components} components"
    return _toy_dataset(name, mixture.sample, *sizes, mixture, description)


# ---------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------


def digits_from_levels(levels) -> np.ndarray:
    """Grey levels ``0..16`` to ``[-1, 1]``: ``x = levels / 8 - 1``."""
    return np.asarray(levels, np.float32) * (2.0 / DIGITS_MAX_LEVEL) - 1.0


def digits_to_levels(x, *, round_to_int: bool = True) -> np.ndarray:
    """The inverse of :func:`digits_from_levels`: ``(x + 1) * 8``, clipped to ``[0, 16]`` (and rounded)."""
    levels = np.clip((np.asarray(x, np.float32) + 1.0) * (DIGITS_MAX_LEVEL / 2.0), 0.0, DIGITS_MAX_LEVEL)
    return np.rint(levels).astype(np.int32) if round_to_int else levels


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 scikit-learn digits as ``([1797, 8, 8, 1] float32 in [-1, 1], labels [1797] int)``."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    levels, labels = sklearn_load_digits(return_X_y=True)  # levels [1797, 64]: the 8 x 8 images, row-major
    return digits_from_levels(np.asarray(levels).reshape(-1, 8, 8, 1)), np.asarray(labels)


def _split(data: np.ndarray, num_train: int | None, num_test: int, seed: int, what: str):
    """A seeded random split of a finite array into ``(train, test)``."""
    n = data.shape[0]
    if num_test >= n:
        raise ValueError(f"num_test={num_test} leaves no training examples: {what} holds only {n} examples.")
    available = n - num_test
    if num_train is not None and num_train > available:
        raise ValueError(
            f"num_train={num_train} exceeds the {available} examples of {what} left after num_test={num_test}."
        )
    order = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(seed), 2), n))
    test_idx = np.sort(order[:num_test])
    train_idx = np.sort(order[num_test:][: num_train if num_train is not None else available])
    return data[train_idx], data[test_idx]


# ---------------------------------------------------------------------------
# User arrays
# ---------------------------------------------------------------------------


def validate_array(data: Any, *, name: str = "data") -> np.ndarray:
    """Checks a user array and returns it as float32 ``[N, ...]``.

    Raises:
        ValueError: the array is not floating point, has fewer than 2
            dimensions or no examples, has rows (examples) containing NaN
            or Inf (their count and first indices are given), or values so
            large that squared distances between examples overflow float32
            (``|x| > sqrt(3.4e38 / (4 d))`` for ``d`` values per example).
    """
    arr = np.asarray(data)
    if not np.issubdtype(arr.dtype, np.floating):
        hint = (
            " Convert it to floats in a range you choose, e.g. x.astype(np.float32) / 255 * 2 - 1."
            if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool
            else ""
        )
        raise ValueError(f"{name} must hold floating-point values, got dtype {arr.dtype}.{hint}")
    if arr.ndim < 2:
        raise ValueError(
            f"{name} must have shape [N, ...] with one example per row (at least 2 dimensions), got shape "
            f"{arr.shape}; for N scalars use x.reshape(-1, 1)."
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{name} holds no examples (shape {arr.shape}).")
    bad_rows = np.flatnonzero(~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1))
    if bad_rows.size:
        first = bad_rows[:10].tolist()
        raise ValueError(
            f"{name} has {bad_rows.size} of {arr.shape[0]} examples containing NaN or Inf values "
            f"(first indices: {first}); remove or fix them."
        )
    # Training works in float32 and squares distances between examples (sigma_max, losses): with
    # |x| <= m in d dimensions a squared distance reaches 4 d m^2, which must stay below float32's max.
    largest = float(np.max(np.abs(arr))) if arr.size else 0.0
    limit = math.sqrt(float(np.finfo(np.float32).max) / (4 * max(math.prod(arr.shape[1:]), 1)))
    if largest > limit:
        raise ValueError(
            f"{name} holds values up to {largest:.3g} in magnitude, which overflow float32 arithmetic (squared "
            f"distances exceed {float(np.finfo(np.float32).max):.3g}; at most {limit:.3g} fits); rescale the data, "
            "e.g. standardise it."
        )
    return arr.astype(np.float32, copy=False)


def load_array(path: PathLike, *, key: str | None = None) -> np.ndarray:
    """Loads a user array from ``.npy`` or ``.npz`` (``allow_pickle=False``) and validates it.

    Args:
        path: a ``.npy`` file, or a ``.npz`` archive.
        key: the array to take from a ``.npz`` archive; may be omitted when
            the archive holds exactly one array.

    Returns:
        ``[N, ...]`` float32, every value finite.

    Raises:
        ValueError: the file is missing, a directory or unreadable, has another
            suffix, is not in the numpy format its suffix says (e.g. a text
            file renamed ``.npy``), holds objects (pickles), the ``.npz`` key is missing or
            ambiguous, or the array fails :func:`validate_array`.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _ARRAY_SUFFIXES:
        raise ValueError(f"data file {path!r} must end in .npy or .npz, got suffix {suffix!r}.")
    if os.path.isdir(path):
        raise ValueError(f"data file {path!r} is a directory, not a .npy/.npz file.")
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist.")
    magic = _NPY_MAGIC if suffix == ".npy" else _NPZ_MAGIC
    try:
        with open(path, "rb") as f:
            head = f.read(len(magic))
    except OSError as err:
        raise ValueError(f"cannot read {path!r}: {err.strerror}.") from None
    if head != magic:
        kind = "a .npy file (np.save)" if suffix == ".npy" else "a .npz archive (np.savez)"
        raise ValueError(
            f"cannot read {path!r}: it is not {kind}, it does not start with the format's signature (a text or "
            f"other file renamed {suffix}? Load text with np.loadtxt, then save it with np.save)."
        )
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"cannot read {path!r} without pickle (object arrays are refused): {err}") from None
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read {path!r} as a numpy file: {err}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            names = list(loaded.files)
            if key is None:
                if len(names) != 1:
                    raise ValueError(f"{path!r} holds {len(names)} arrays {names}; choose one with key=<name>.")
                key = names[0]
            if key not in names:
                raise ValueError(f"{path!r} has no array {key!r}; it holds {names}.")
            try:
                loaded = loaded[key]
            except ValueError as err:
                raise ValueError(f"cannot read array {key!r} of {path!r} without pickle: {err}") from None
        return validate_array(loaded, name=f"array {key!r} of {path!r}")
    if key is not None:
        raise ValueError(f"key={key!r} applies to .npz archives only, got the .npy file {path!r}.")
    return validate_array(loaded, name=f"data file {path!r}")


# ---------------------------------------------------------------------------
# load_dataset
# ---------------------------------------------------------------------------


def _check_sizes(num_train, num_test, seed):
    if num_train is not None:
        num_train = check_positive_int("num_train", num_train)
    return num_train, check_positive_int("num_test", num_test, minimum=0), check_positive_int("seed", seed, minimum=0)


def _looks_like_path(name: str) -> bool:
    return name.lower().endswith(_ARRAY_SUFFIXES) or os.sep in name or "/" in name


def load_dataset(
    name_or_path: PathLike,
    *,
    num_train: int | None = None,
    num_test: int | None = None,
    seed: int = 0,
    key: str | None = None,
) -> Dataset:
    """A built-in dataset by name (see :data:`DATASETS`) or a user array by path.

    * Toy sets: ``num_train`` (default 10000) and ``num_test`` (default 2000)
      fresh draws, with keys ``fold_in(key(seed), 0)`` and ``fold_in(key(seed), 1)``.
    * ``"digits"``: a random split (permutation ``fold_in(key(seed), 2)``) with
      ``num_test`` held-out images (default 297, leaving 1500 for training);
      ``num_train`` (default: all the rest) may take fewer.
    * A ``.npy``/``.npz`` path of floats (:func:`load_array`, ``key`` picks the ``.npz``
      array): split like the digits, ``num_test`` defaulting to 10% of the
      examples (0 when there are fewer than 10).
    * 8-bit images (:func:`dsm_jax.images.load_image_dataset`): a directory
      holding CIFAR-10's ``data_batch_1.bin`` or CIFAR-100's ``train.bin``
      (the binary versions), any other directory as an image folder (class
      sub-folders give labels), or a ``.npy``/``.npz`` array of dtype uint8
      (a ``.npy`` is memory-mapped); ``train``/``test`` are then lazy
      :class:`~dsm_jax.images.ImageArray` views scaled to ``[-1, 1]`` by
      ``(u + 0.5) / 128 - 1``.

    Args:
        name_or_path: a key of :data:`DATASETS` or a path to a user array.
        num_train: training examples (see above).
        num_test: held-out examples (see above).
        seed: the seed of the draws or of the split.
        key: array name inside a ``.npz`` archive.

    Returns:
        A :class:`Dataset`.

    Raises:
        ValueError: an unknown name, a bad path or array, or sizes that do
            not fit.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(f"name_or_path must be a dataset name or a file path, got {name_or_path!r}.")
    name = os.fspath(name_or_path)
    if name in TOY_DATASETS:
        defaults = _TOY_DEFAULTS
        num_train, num_test, seed = _check_sizes(
            defaults[0] if num_train is None else num_train, defaults[1] if num_test is None else num_test, seed
        )
        distribution = MIXTURES[name]() if name in MIXTURES else None
        return _toy_dataset(name, TOY_DATASETS[name], num_train, num_test, seed, distribution, DATASETS[name])
    if name == "digits":
        num_train, num_test, seed = _check_sizes(num_train, _DIGITS_NUM_TEST if num_test is None else num_test, seed)
        images, targets = load_digits()
        train, test = _split(images, num_train, num_test, seed, "the digits")
        train_labels, test_labels = _split(targets.astype(np.int64), num_train, num_test, seed, "the digits")
        return Dataset(
            name,
            train,
            test,
            data_range=DIGITS_RANGE,
            description=DATASETS[name],
            train_labels=train_labels,
            test_labels=test_labels,
        )
    if not _looks_like_path(name) and not os.path.exists(name):
        raise ValueError(
            f"unknown dataset {name!r}: choose one of {sorted(DATASETS)} or give a path to a .npy/.npz file, "
            "an image folder or a CIFAR binary directory."
        )
    from dsm_jax import images

    if images.is_image_source(name, key):
        return images.load_image_dataset(name, num_train=num_train, num_test=num_test, seed=seed, key=key)
    data = load_array(name, key=key)
    num_train, num_test, seed = _check_sizes(num_train, data.shape[0] // 10 if num_test is None else num_test, seed)
    train, test = _split(data, num_train, num_test, seed, repr(name))
    return Dataset(
        name, train, test, description=f"user array {name!r}, {data.shape[0]} examples of shape {data.shape[1:]}"
    )


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


class BatchSource:
    """Deterministic shuffled batches as a pure function of the step: ``batch_at(step)``.

    The training set is read as an endless stream: epoch ``e`` is the
    permutation ``jax.random.permutation(fold_in(key(seed), e), N)`` of the
    examples, and the global batch of step ``s`` is stream positions
    ``[s B, (s + 1) B)``. Every example thus appears exactly once in each
    epoch (each block of ``N`` consecutive positions), no example is dropped
    when ``B`` does not divide ``N``, and a batch that straddles two epochs
    takes the end of one permutation and the start of the next. Because the
    batch depends on ``(seed, step)`` only, the step is the whole data
    position: resuming at step ``s`` gives the batches an uninterrupted run
    would have used. Pass the instance (it is callable) as ``data`` to
    :func:`dsm_jax.train.train`.

    Multi-host: with ``process_count = P``, process ``p`` receives rows
    ``[p B/P, (p + 1) B/P)`` of the global batch (the driver's convention);
    ``B`` must be divisible by ``P``.

    Args:
        data: ``[N, *D]`` training array (kept on the host).
        batch_size: global batch size ``B <= N``.
        seed: the shuffling seed.
        process_index: this process (default ``jax.process_index()``).
        process_count: number of processes (default ``jax.process_count()``).
        name: what to call the data in error messages.
        labels: ``[N]`` integer labels of ``data``, or None. With labels every
            batch is ``{"x": [B / P, *D], "labels": [B / P]}`` (the same
            examples in the same order as without them).

    Example:
        >>> source = BatchSource(np.arange(10.0).reshape(10, 1), batch_size=4, seed=0)
        >>> np.sort(np.concatenate([source(0), source(1), source(2)])[:10, 0]).tolist()
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        *,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        name: str = "the training set",
        labels: Any = None,
    ):
        self.data = np.asarray(data)
        if self.data.ndim < 1 or self.data.shape[0] == 0:
            raise ValueError(f"{name} must have shape [N, ...] with N >= 1, got shape {self.data.shape}.")
        self.labels = None if labels is None else np.asarray(labels)
        if self.labels is not None and (
            self.labels.shape != self.data.shape[:1] or not np.issubdtype(self.labels.dtype, np.integer)
        ):
            raise ValueError(
                f"labels must be [N]=({self.data.shape[0]},) integers, got shape {self.labels.shape} "
                f"dtype {self.labels.dtype}."
            )
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.seed = check_positive_int("seed", seed, minimum=0)
        self.num_examples = self.data.shape[0]
        if self.batch_size > self.num_examples:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than {name}, which has only {self.num_examples} "
                "examples; lower the batch size or use more data."
            )
        self.process_count = check_positive_int(
            "process_count", jax.process_count() if process_count is None else process_count
        )
        self.process_index = check_positive_int(
            "process_index", jax.process_index() if process_index is None else process_index, minimum=0
        )
        if self.process_index >= self.process_count:
            raise ValueError(f"process_index={self.process_index} must be < process_count={self.process_count}.")
        if self.batch_size % self.process_count:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by process_count={self.process_count}.")
        self.local_batch_size = self.batch_size // self.process_count
        self._key = jax.random.key(self.seed)
        self._permutation = functools.lru_cache(maxsize=4)(self._draw_permutation)

    def _draw_permutation(self, epoch: int) -> np.ndarray:
        return np.asarray(jax.random.permutation(jax.random.fold_in(self._key, epoch), self.num_examples))

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the examples in epoch ``epoch``, ``[N]``."""
        return self._permutation(check_positive_int("epoch", epoch, minimum=0))

    @property
    def steps_per_epoch(self) -> float:
        """``N / B`` (need not be an integer)."""
        return self.num_examples / self.batch_size

    def epoch_of(self, step: int) -> int:
        """The epoch of the first example of step ``step``'s batch."""
        return check_positive_int("step", step, minimum=0) * self.batch_size // self.num_examples

    def indices_at(self, step: int) -> np.ndarray:
        """Indices into ``data`` of this process's part of the batch of step ``step``, ``[B / P]``."""
        step = check_positive_int("step", step, minimum=0)
        start = step * self.batch_size + self.process_index * self.local_batch_size
        positions = np.arange(start, start + self.local_batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_examples)
        out = np.empty(self.local_batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._permutation(int(epoch))[offsets[mask]]
        return out

    def batch_at(self, step: int) -> Any:
        """This process's part of the global batch of step ``step``, ``[B / P, *D]`` (with labels: a dict)."""
        indices = self.indices_at(step)
        if self.labels is None:
            return self.data[indices]
        return {"x": self.data[indices], "labels": self.labels[indices].astype(np.int32)}

    __call__ = batch_at


def shard_batch(batch: Any, num_devices: int) -> Any:
    """Reshapes every leaf of a batch ``[B, ...]`` to ``[num_devices, B / num_devices, ...]`` for ``pmap``.

    Raises:
        ValueError: ``B`` is not divisible by ``num_devices``.

    Example:
        >>> shard_batch(np.zeros((8, 2)), 4).shape
        (4, 2, 2)
    """
    num_devices = check_positive_int("num_devices", num_devices)

    def split(leaf):
        leaf = np.asarray(leaf)
        if leaf.ndim == 0 or leaf.shape[0] % num_devices:
            raise ValueError(
                f"the batch size (leading dimension of shape {leaf.shape}) must be divisible by "
                f"num_devices={num_devices}."
            )
        return leaf.reshape((num_devices, leaf.shape[0] // num_devices) + leaf.shape[1:])

    return jax.tree.map(split, batch)
