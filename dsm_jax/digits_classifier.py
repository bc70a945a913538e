"""A small classifier of the 8x8 digits whose hidden layer is the feature space of a small-scale FID.

FID (Heusel et al. 2017) compares the Frechet distance of two image sets in
the features of a network trained on real images (InceptionV3 pool features
for ImageNet-sized images). For the 8x8 digits of :mod:`dsm_jax.data` that
network is a one-hidden-layer perceptron (64 ReLU units, scikit-learn's
``MLPClassifier`` with a fixed ``random_state``), trained on the training
split that ``load_dataset("digits")`` makes (its default seed and 297
held-out images) and scored on the held-out split. Its features are the
hidden layer's activations ``relu(x W_1 + b_1)`` for images in the library's
scaling (``levels / 8 - 1`` in ``[-1, 1]``), so :func:`digits_features` of a
model's samples against the held-out images through
:func:`dsm_jax.metrics.frechet_distance` is a small-scale FID. The training
split is fixed, whatever split a run uses: like Inception for FID, the
classifier is a fixed yardstick, and a run with another seed may hold out
images it was trained on.

Training takes about a second and is deterministic (the same weights on every
fresh training on one machine). The first use trains it and keeps the weights
in a cache file ``digits_classifier_<hash>.npz`` in :func:`cache_dir` (the
hash is that of the settings and of the scikit-learn version, so a change of
either trains anew), written atomically; later processes read it. A cache
directory that cannot be created or written is not an error (the classifier
then lives in memory only); an unreadable cache file is retrained and
replaced with a :class:`DigitsClassifierCacheWarning`.

Example:
    >>> from dsm_jax.data import load_dataset
    >>> from dsm_jax.metrics import frechet_distance
    >>> test = load_dataset("digits").test
    >>> clf = digits_classifier()  # doctest: +SKIP
    >>> clf.test_accuracy  # doctest: +SKIP
    0.976...
    >>> frechet_distance(digits_features(samples), digits_features(test))  # doctest: +SKIP

References:
    Heusel et al., "GANs trained by a two time-scale update rule converge to
    a local Nash equilibrium", NeurIPS 2017.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dsm_jax._utils import PathLike
from dsm_jax.runlog import write_atomic

__all__ = [
    "SETTINGS",
    "DigitsClassifier",
    "DigitsClassifierCacheWarning",
    "cache_dir",
    "digits_classifier",
    "digits_features",
    "load_or_train_digits_classifier",
    "train_digits_classifier",
]

SETTINGS = {"hidden": 64, "alpha": 1e-3, "max_iter": 500, "random_state": 0, "split_seed": 0, "num_test": 297}
"""The classifier's settings: hidden units, L2 penalty, Adam epochs at most, initialisation seed, and the
data split (``load_dataset("digits", seed=split_seed, num_test=num_test)``, the default one)."""

_NUM_PIXELS = 64
_NUM_CLASSES = 10
_FORMAT = 1  # the cache file's layout; part of the hash


class DigitsClassifierCacheWarning(RuntimeWarning):
    """A cached digits classifier was unreadable and has been retrained and replaced."""


class DigitsClassifier(NamedTuple):
    """A trained digits perceptron ``logits = relu(x W_1 + b_1) W_2 + b_2`` (host NumPy, float64).

    Attributes:
        hidden_weights: ``[64, H]`` ``W_1``.
        hidden_biases: ``[H]`` ``b_1``.
        output_weights: ``[H, 10]`` ``W_2``.
        output_biases: ``[10]`` ``b_2``.
        test_accuracy: the fraction of the held-out digits it labels right.
        train_seconds: the wall-clock time its training took.
        key: the hash of its settings (the cache file's name).
    """

    hidden_weights: np.ndarray
    hidden_biases: np.ndarray
    output_weights: np.ndarray
    output_biases: np.ndarray
    test_accuracy: float
    train_seconds: float
    key: str

    def features(self, images) -> np.ndarray:
        """``[N, H]`` the hidden activations ``relu(x W_1 + b_1)`` of ``images`` (``[N, 8, 8, 1]`` or ``[N, 64]``)."""
        x = _check_images(images)
        return np.maximum(x @ self.hidden_weights + self.hidden_biases, 0.0)

    def predict(self, images) -> np.ndarray:
        """``[N]`` the most likely digit of each image."""
        return np.argmax(self.features(images) @ self.output_weights + self.output_biases, axis=1)


def _check_images(images) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim < 2 or x.shape[0] == 0 or int(np.prod(x.shape[1:])) != _NUM_PIXELS:
        raise ValueError(
            f"images must be a batch of 8x8 digits [N, 8, 8, 1] (or [N, 64]) with N >= 1, got shape {x.shape}."
        )
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"images must hold real numbers, got dtype {x.dtype}.")
    x = x.reshape(x.shape[0], _NUM_PIXELS).astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ValueError(f"images must be finite, got NaN or Inf in {bad.size} images (first {bad[:5].tolist()}).")
    return x


def _settings_key() -> str:
    import sklearn

    blob = json.dumps({"settings": SETTINGS, "sklearn": sklearn.__version__, "format": _FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _split_with_labels() -> tuple:
    """``(train, train_labels, test, test_labels)``: the split of ``load_dataset`` with each image's label.

    ``load_dataset`` returns images only; the 1797 digits are pairwise distinct, so each image's label is
    found by its pixels.
    """
    from dsm_jax.data import load_dataset, load_digits

    ds = load_dataset("digits", seed=SETTINGS["split_seed"], num_test=SETTINGS["num_test"])
    images, labels = load_digits()
    label_of = {image.tobytes(): int(label) for image, label in zip(images, labels, strict=True)}
    return (
        ds.train,
        np.array([label_of[image.tobytes()] for image in ds.train]),
        ds.test,
        np.array([label_of[image.tobytes()] for image in ds.test]),
    )


def train_digits_classifier() -> DigitsClassifier:
    """Trains the classifier of :data:`SETTINGS` afresh (no cache), deterministically.

    Returns:
        A :class:`DigitsClassifier` with its held-out accuracy and training time.
    """
    from sklearn.neural_network import MLPClassifier

    train, train_labels, test, test_labels = _split_with_labels()
    model = MLPClassifier(
        hidden_layer_sizes=(SETTINGS["hidden"],),
        activation="relu",
        solver="adam",
        alpha=SETTINGS["alpha"],
        max_iter=SETTINGS["max_iter"],
        random_state=SETTINGS["random_state"],
    )
    start = time.perf_counter()
    model.fit(train.reshape(train.shape[0], -1).astype(np.float64), train_labels)
    seconds = time.perf_counter() - start
    (w1, w2), (b1, b2) = model.coefs_, model.intercepts_
    classifier = DigitsClassifier(w1, b1, w2, b2, 0.0, seconds, _settings_key())
    accuracy = float(np.mean(classifier.predict(test) == test_labels))
    return classifier._replace(test_accuracy=accuracy)


def cache_dir() -> Path:
    """Where the library caches what it trains: ``$DSM_JAX_CACHE``, else ``$XDG_CACHE_HOME/dsm_jax``, else
    ``~/.cache/dsm_jax``."""
    if os.environ.get("DSM_JAX_CACHE"):
        return Path(os.environ["DSM_JAX_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"], "dsm_jax")
    return Path.home() / ".cache" / "dsm_jax"


def _cache_file(directory: Path, key: str) -> Path:
    return directory / f"digits_classifier_{key}.npz"


def _write(path: Path, classifier: DigitsClassifier) -> None:
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            arrays: dict = {name: np.asarray(value) for name, value in classifier._asdict().items()}
            np.savez(f, **arrays)

    write_atomic(path, save)


def _read(path: Path, key: str) -> DigitsClassifier:
    """The classifier in ``path``; ``ValueError`` (or the reader's own error) when it is not a whole one."""
    with np.load(path, allow_pickle=False) as data:
        fields = {name: data[name] for name in DigitsClassifier._fields}
    hidden = SETTINGS["hidden"]
    shapes = {
        "hidden_weights": (_NUM_PIXELS, hidden),
        "hidden_biases": (hidden,),
        "output_weights": (hidden, _NUM_CLASSES),
        "output_biases": (_NUM_CLASSES,),
    }
    for name, shape in shapes.items():
        if fields[name].shape != shape or not np.isfinite(fields[name]).all():
            raise ValueError(f"{name} has shape {fields[name].shape} or non-finite values, expected {shape}")
    if str(fields["key"]) != key:
        raise ValueError(f"it holds the classifier of settings {str(fields['key'])!r}, not {key!r}")
    return DigitsClassifier(
        hidden_weights=fields["hidden_weights"].astype(np.float64),
        hidden_biases=fields["hidden_biases"].astype(np.float64),
        output_weights=fields["output_weights"].astype(np.float64),
        output_biases=fields["output_biases"].astype(np.float64),
        test_accuracy=float(fields["test_accuracy"]),
        train_seconds=float(fields["train_seconds"]),
        key=key,
    )


def load_or_train_digits_classifier(directory: PathLike | None = None) -> DigitsClassifier:
    """The classifier from the cache file in ``directory`` (default :func:`cache_dir`), trained and cached
    when absent.

    An unreadable or inconsistent cache file is retrained and replaced, with a
    :class:`DigitsClassifierCacheWarning`; a directory that cannot be created
    or written is skipped silently (the classifier is returned all the same).
    Every call reads the file or trains; :func:`digits_classifier` keeps the
    result for the process.

    Args:
        directory: the cache directory.

    Returns:
        A :class:`DigitsClassifier`.
    """
    directory = cache_dir() if directory is None else Path(directory)
    key = _settings_key()
    path = _cache_file(directory, key)
    if path.is_file():
        try:
            return _read(path, key)
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
            warnings.warn(
                f"the cached digits classifier {str(path)!r} is unreadable ({err}); retraining and replacing it.",
                DigitsClassifierCacheWarning,
                stacklevel=2,
            )
    classifier = train_digits_classifier()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write(path, classifier)
    except OSError:
        pass  # a read-only or unusable cache directory: the classifier lives in memory only
    return classifier


@functools.cache
def _classifier_in(directory: str) -> DigitsClassifier:
    return load_or_train_digits_classifier(directory)


def digits_classifier(directory: PathLike | None = None) -> DigitsClassifier:
    """The digits classifier, read or trained once per process and cache ``directory`` (default
    :func:`cache_dir`); see :func:`load_or_train_digits_classifier`."""
    return _classifier_in(os.fspath(cache_dir() if directory is None else directory))


def digits_features(images, *, classifier: DigitsClassifier | None = None) -> np.ndarray:
    """``[N, H]`` float64 features of 8x8 digits for a small-scale FID: the classifier's hidden layer.

    Args:
        images: ``[N, 8, 8, 1]`` (or ``[N, 64]``) in the library's digits
            scaling (``[-1, 1]``; samples outside it are taken as they are).
        classifier: default :func:`digits_classifier` (trained on first use
            and cached).

    Returns:
        ``[N, H]`` with ``H = SETTINGS["hidden"]``.
    """
    return (digits_classifier() if classifier is None else classifier).features(images)
