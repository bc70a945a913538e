"""FID: the FID InceptionV3 in Flax (pool3 features), reference statistics, and the FID of a sample set.

The network is the InceptionV3 variant of the TensorFlow FID code as
pytorch-fid ports it (``fid_inception_v3``): torchvision's InceptionV3 with
``Mixed_5b..5d`` and ``Mixed_6b..6e`` and ``Mixed_7b`` averaging their pool
branch without the padded zeros (``count_include_pad=False``, TensorFlow's
average pool) and ``Mixed_7c`` max-pooling it instead (3x3, stride 1, pad 1);
every convolution is bias-free, followed by BatchNorm (eps 1e-3) and ReLU;
the features are the 2048 global averages after ``Mixed_7c`` (pool3).

Input (what pytorch-fid does to a PNG): 8-bit levels ``u`` become
``u / 255`` in ``[0, 1]``, are resized to 299x299 **bilinearly with
half-pixel centres and no antialiasing** (PyTorch's ``F.interpolate(...,
mode="bilinear", align_corners=False)``; ``jax.image.resize(...,
"bilinear", antialias=False)`` computes the same weights, clamped at the
borders), then mapped to ``[-1, 1]`` by ``2 x - 1`` (the resize is linear, so
it is applied after the map here). Model samples in ``[-1, 1]`` are first
quantized to the levels a PNG would store (:func:`dsm_jax.images.to_levels`).
Clean-fid instead resizes with PIL's antialiased bicubic filter; its numbers
differ from these and are not comparable.

Weights are never downloaded: convert pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` once with
``experiments/convert_fid_inception.py`` (``torch.load(...,
weights_only=True)``, no pickle of code) into an ``.npz`` of the PyTorch
state dict (names and layouts unchanged); :func:`load_fid_weights` maps it to
Flax (convolution kernels ``[O, I, kh, kw] -> [kh, kw, I, O]``).

Reference statistics (:class:`ReferenceStats`, an ``.npz``) hold the mean,
the covariance, the number of images, the data set and split they came
from, and the settings (weights digest, input size, resize, quantization)
with their hash; :func:`fid` refuses to compare against statistics made
with other settings, and refuses sample sets smaller than
:data:`FID_MIN_SAMPLES` = 2048 (below the feature dimension the covariance
is singular and the FID is dominated by its small-sample bias) unless
``force=True``.

References:
    Heusel et al., "GANs trained by a two time-scale update rule converge to
    a local Nash equilibrium", NeurIPS 2017 (FID).
    Szegedy et al., "Rethinking the Inception architecture", CVPR 2016.
    Seitzer, pytorch-fid (the weights' PyTorch port); Parmar et al.,
    "On aliased resizing and surprising subtleties in GAN evaluation", CVPR 2022 (clean-fid).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax._checks import check_positive_int

__all__ = [
    "FIDInceptionV3",
    "FIDNetwork",
    "FID_FEATURES",
    "FID_INPUT_SIZE",
    "FID_MIN_SAMPLES",
    "ReferenceStats",
    "fid",
    "fid_features",
    "load_fid_weights",
    "load_reference_stats",
    "reference_stats",
    "save_reference_stats",
    "to_torch_arrays",
]

FID_INPUT_SIZE = 299
FID_FEATURES = 2048
FID_MIN_SAMPLES = 2048
"""The smallest sample set :func:`fid` accepts without ``force=True``: the feature dimension."""
MIN_INPUT_SIZE = 75
"""The smallest input the network's valid convolutions and strides accept (then pool3 is 1x1)."""
_FORMAT = "dsm_jax FID reference statistics v1"


# ---------------------------------------------------------------------------
# The network (module and variable names are those of the PyTorch state dict)
# ---------------------------------------------------------------------------


class BasicConv(nn.Module):
    """``ReLU(BatchNorm(Conv(x)))``, the convolution bias-free, BatchNorm with eps 1e-3 and running statistics."""

    features: int
    kernel: tuple = (1, 1)
    stride: int = 1
    pad: tuple = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((self.pad[0], self.pad[0]), (self.pad[1], self.pad[1]))
        x = nn.Conv(self.features, self.kernel, (self.stride, self.stride), padding, use_bias=False, name="conv")(x)
        return nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x))


def _avg_pool_same(x: jax.Array) -> jax.Array:
    # TensorFlow's average pool: the padded zeros do not count (pytorch-fid's count_include_pad=False patch).
    # flax's annotation says str, but explicit (low, high) pairs are accepted, as in nn.Conv.
    pad = ((1, 1), (1, 1))
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=pad, count_include_pad=False)  # pyright: ignore[reportArgumentType]


def _max_pool_down(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2))


def _max_pool_same(x: jax.Array) -> jax.Array:
    # Padding with -inf never wins the max: PyTorch's max_pool2d(3, stride=1, padding=1).
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return nn.max_pool(x, (3, 3), strides=(1, 1))


def _row(features: int, k: int, name: str) -> BasicConv:
    """A ``1 x k`` convolution, padded to keep the size."""
    return BasicConv(features, (1, k), pad=(0, k // 2), name=name)


def _col(features: int, k: int, name: str) -> BasicConv:
    """A ``k x 1`` convolution, padded to keep the size."""
    return BasicConv(features, (k, 1), pad=(k // 2, 0), name=name)


class InceptionA(nn.Module):
    """Mixed_5b..5d: 1x1, 5x5, double 3x3 and pooled branches (64 + 64 + 96 + pool_features)."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, name="branch1x1")(x)
        b5 = BasicConv(64, (5, 5), pad=(2, 2), name="branch5x5_2")(BasicConv(48, name="branch5x5_1")(x))
        b3 = BasicConv(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), pad=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), pad=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: the strided 35 -> 17 reduction."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv(64, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), pad=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_down(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 branches (4 x 192 channels)."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = BasicConv(192, name="branch1x1")(x)
        b7 = BasicConv(c, name="branch7x7_1")(x)
        b7 = _row(c, 7, "branch7x7_2")(b7)
        b7 = _col(192, 7, "branch7x7_3")(b7)
        bd = BasicConv(c, name="branch7x7dbl_1")(x)
        bd = _col(c, 7, "branch7x7dbl_2")(bd)
        bd = _row(c, 7, "branch7x7dbl_3")(bd)
        bd = _col(c, 7, "branch7x7dbl_4")(bd)
        bd = _row(192, 7, "branch7x7dbl_5")(bd)
        bp = BasicConv(192, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: the strided 17 -> 8 reduction."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(BasicConv(192, name="branch3x3_1")(x))
        b7 = BasicConv(192, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), pad=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), pad=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_down(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (average pool branch) and Mixed_7c (``max_pool=True``, the FID network's quirk): 2048 channels."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, name="branch1x1")(x)
        b3 = BasicConv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([_row(384, 3, "branch3x3_2a")(b3), _col(384, 3, "branch3x3_2b")(b3)], -1)
        bd = BasicConv(448, name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), pad=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([_row(384, 3, "branch3x3dbl_3a")(bd), _col(384, 3, "branch3x3dbl_3b")(bd)], -1)
        if self.max_pool:
            pooled = _max_pool_same(x)
        else:
            pooled = _avg_pool_same(x)
        bp = BasicConv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
    """``[B, H, W, C] -> [B, size, size, C]`` as ``F.interpolate(mode="bilinear", align_corners=False)``."""
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), method="bilinear", antialias=False)


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3: ``x [B, H, W, 3]`` in ``[-1, 1]`` -> pool3 features ``[B, 2048]``.

    Attributes:
        input_size: the side the images are resized to first (299, the FID
            standard), or None to feed them as they are (at least 75x75).

    Example (shapes only: a random initialisation of the 21.8M weights is slow to compile):
        >>> net = FIDInceptionV3(input_size=None)
        >>> x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
        >>> variables = jax.eval_shape(net.init, jax.random.key(0), x)
        >>> jax.eval_shape(net.apply, variables, x).shape
        (1, 2048)
    """

    input_size: int | None = FID_INPUT_SIZE

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"x must be RGB images [B, H, W, 3], got shape {x.shape}.")
        if self.input_size is not None:
            x = resize_bilinear(x, self.input_size)
        if min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(f"the network needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, got {x.shape}.")
        x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), pad=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_down(x)
        x = BasicConv(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_down(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# ---------------------------------------------------------------------------
# Weights: the PyTorch state dict in an .npz <-> Flax variables
# ---------------------------------------------------------------------------

# (PyTorch suffix, Flax collection, Flax leaf) for the two layers of a BasicConv.
_FIELDS = (
    ("conv.weight", "params", "conv", "kernel"),
    ("bn.weight", "params", "bn", "scale"),
    ("bn.bias", "params", "bn", "bias"),
    ("bn.running_mean", "batch_stats", "bn", "mean"),
    ("bn.running_var", "batch_stats", "bn", "var"),
)


@functools.lru_cache(maxsize=1)
def _template() -> dict:
    """The shapes of every variable (no computation), as ``{torch_name: (collection, path, shape)}``."""
    shapes = jax.eval_shape(
        lambda: FIDInceptionV3(input_size=None).init(
            jax.random.key(0), jnp.zeros((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3))
        )
    )
    out = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes[collection])[0]:
            names = [p.key for p in path]
            for suffix, coll, layer, field in _FIELDS:
                if coll == collection and names[-2:] == [layer, field]:
                    out[".".join(names[:-2]) + "." + suffix] = (collection, tuple(names), tuple(leaf.shape))
    return out


def _to_flax(name: str, array: np.ndarray) -> np.ndarray:
    return array.transpose(2, 3, 1, 0) if name.endswith("conv.weight") else array


def load_fid_weights(path: str | os.PathLike) -> dict:
    """Reads an ``.npz`` of the FID Inception's PyTorch state dict into Flax variables.

    Keys are the state-dict names (``Mixed_5b.branch1x1.conv.weight``, ...);
    ``fc.*`` and ``*.num_batches_tracked`` are ignored.

    Returns:
        ``{"params": ..., "batch_stats": ...}`` for :class:`FIDInceptionV3`.

    Raises:
        ValueError: the file is missing or not an ``.npz``, or an array is missing or has the wrong shape.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(
            f"FID weights {path!r} do not exist (convert them once with experiments/convert_fid_inception.py)."
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the FID weights {path!r} as an .npz archive: {err}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"FID weights {path!r} must be an .npz archive of named arrays, got a single array.")
    variables: dict = {"params": {}, "batch_stats": {}}
    with archive:
        missing = [name for name in _template() if name not in archive.files]
        if missing:
            raise ValueError(
                f"FID weights {path!r} lack {len(missing)} of {len(_template())} arrays (first: {missing[:3]}); "
                "is it the converted pt_inception-2015-12-05 state dict?"
            )
        for name, (collection, names, shape) in _template().items():
            value = _to_flax(name, np.asarray(archive[name], np.float32))
            if value.shape != shape:
                raise ValueError(
                    f"FID weights {path!r}: {name} has shape {archive[name].shape}, expected the layout of {shape}."
                )
            node = variables[collection]
            for part in names[:-1]:
                node = node.setdefault(part, {})
            node[names[-1]] = value
    return variables


def to_torch_arrays(variables: dict) -> dict:
    """The inverse of :func:`load_fid_weights`: ``{state-dict name: array}`` in the PyTorch layout."""
    out = {}
    for name, (collection, names, _) in _template().items():
        node = variables[collection]
        for part in names:
            node = node[part]
        array = np.asarray(node)
        out[name] = array.transpose(3, 2, 0, 1) if name.endswith("conv.weight") else array
    return out


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FIDNetwork:
    """The FID Inception with its weights, its settings and one compiled forward per batch size.

    Args:
        variables: Flax variables of :class:`FIDInceptionV3` (:func:`load_fid_weights`).
        weights_digest: the sha256 of the weights file (part of the settings).
        input_size: the resize target (299; None feeds the images unresized, for tests).

    Use :meth:`load` for a weights file.
    """

    def __init__(self, variables: dict, *, weights_digest: str, input_size: int | None = FID_INPUT_SIZE):
        if input_size is not None:
            input_size = check_positive_int("input_size", input_size, minimum=MIN_INPUT_SIZE)
        self.variables = variables
        self.weights_digest = weights_digest
        self.input_size = input_size
        self.module = FIDInceptionV3(input_size=input_size)
        self._apply = jax.jit(self.module.apply)

    @classmethod
    def load(cls, path: str | os.PathLike, *, input_size: int | None = FID_INPUT_SIZE) -> FIDNetwork:
        """The network with the weights of the ``.npz`` ``path`` (:func:`load_fid_weights`)."""
        variables = load_fid_weights(path)
        return cls(variables, weights_digest=_file_digest(os.fspath(path)), input_size=input_size)

    @property
    def settings(self) -> dict:
        """Everything the features depend on besides the images (hashed into the reference statistics)."""
        return {
            "network": "FID InceptionV3 (pt_inception-2015-12-05 layout), pool3",
            "features": FID_FEATURES,
            "weights_sha256": self.weights_digest,
            "input_size": self.input_size,
            "resize": "bilinear, half-pixel centres, no antialias (F.interpolate align_corners=False)",
            "input": "uint8 levels u -> u / 127.5 - 1; samples in [-1, 1] quantized by floor((x + 1) * 128)",
        }

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._apply(self.variables, x)


def _as_levels(chunk) -> np.ndarray:
    from dsm_jax.images import to_levels

    chunk = np.asarray(chunk)
    return chunk if chunk.dtype == np.uint8 else to_levels(chunk)


def fid_features(network: FIDNetwork, images: Any, *, batch_size: int = 50) -> np.ndarray:
    """Pool3 features ``[N, 2048]`` (float64) of ``images``.

    Args:
        network: a :class:`FIDNetwork`.
        images: ``[N, H, W, C]`` (C = 1 or 3) uint8 levels, floats in ``[-1, 1]`` (model samples, quantized
            first), or a :class:`dsm_jax.images.ImageArray` (its levels are read batch by batch).
        batch_size: images per forward (the last batch is padded, so one shape is compiled).
    """
    from dsm_jax.images import ImageArray

    batch_size = check_positive_int("batch_size", batch_size)
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[-1] not in (1, 3) or shape[0] == 0:
        raise ValueError(f"images must be [N, H, W, C] with C = 1 or 3 and N >= 1, got shape {shape}.")
    out = np.empty((shape[0], FID_FEATURES), np.float64)
    for start in range(0, shape[0], batch_size):
        rows = slice(start, min(start + batch_size, shape[0]))
        chunk = images.levels(rows) if isinstance(images, ImageArray) else _as_levels(images[rows])
        x = chunk.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        n = x.shape[0]
        x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)]) if n < batch_size else x
        out[rows] = np.asarray(network(jnp.asarray(x)), np.float64)[:n]
    return out


# ---------------------------------------------------------------------------
# Statistics (dsm_jax.metrics.feature_statistics / frechet_distance_from_stats, imported when used)
# ---------------------------------------------------------------------------


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceStats:
    """FID reference statistics: the features' mean and covariance and what they were computed from.

    Attributes:
        mean: ``[2048]``.
        covariance: ``[2048, 2048]``.
        num_images: the images behind them.
        dataset: the data set's name or path.
        split: "train", "test", or another label of the images used.
        settings: :attr:`FIDNetwork.settings` of the network used.
    """

    mean: np.ndarray
    covariance: np.ndarray
    num_images: int
    dataset: str
    split: str
    settings: dict

    @property
    def settings_hash(self) -> str:
        """sha256 of the settings (sorted JSON)."""
        return _settings_hash(self.settings)


def reference_stats(
    network: FIDNetwork, images: Any, *, dataset: str, split: str, batch_size: int = 50
) -> ReferenceStats:
    """The :class:`ReferenceStats` of ``images`` (as :func:`fid_features` takes them; at least 2 for a covariance).

    Statistics of fewer than :data:`FID_MIN_SAMPLES` images are written (for
    tests); :func:`fid` refuses them unless forced.
    """
    if int(np.shape(images)[0]) < 2:
        raise ValueError(f"reference statistics need at least 2 images, got {np.shape(images)[0]}.")
    from dsm_jax.metrics import feature_statistics

    mean, cov = feature_statistics(fid_features(network, images, batch_size=batch_size))
    return ReferenceStats(mean, cov, int(np.shape(images)[0]), str(dataset), str(split), network.settings)


def save_reference_stats(path: str | os.PathLike, stats: ReferenceStats) -> None:
    """Writes ``stats`` to the ``.npz`` ``path`` (atomically): arrays, counts, the settings and their hash."""
    from dsm_jax.runlog import write_atomic

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(
                f,
                format=np.array(_FORMAT),
                mean=stats.mean,
                covariance=stats.covariance,
                num_images=np.array(stats.num_images),
                dataset=np.array(stats.dataset),
                split=np.array(stats.split),
                settings_json=np.array(json.dumps(stats.settings, sort_keys=True)),
                settings_hash=np.array(stats.settings_hash),
            )

    write_atomic(path, write)


def load_reference_stats(path: str | os.PathLike) -> ReferenceStats:
    """Reads :func:`save_reference_stats`'s file, checking its fields, shapes and settings hash.

    Raises:
        ValueError: missing or unreadable file, missing fields, or a hash that does not match the settings.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"FID reference statistics {path!r} do not exist.")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"cannot read the FID reference statistics {path!r}: {err}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{path!r} is not a FID reference statistics file (an .npz from save_reference_stats).")
    with loaded:
        fields = {k: loaded[k] for k in loaded.files}
    needed = ("format", "mean", "covariance", "num_images", "dataset", "split", "settings_json", "settings_hash")
    if any(k not in fields for k in needed) or str(fields["format"]) != _FORMAT:
        raise ValueError(f"{path!r} is not a FID reference statistics file (save_reference_stats writes them).")
    settings = json.loads(str(fields["settings_json"]))
    if _settings_hash(settings) != str(fields["settings_hash"]):
        raise ValueError(f"{path!r}: the settings do not match their stored hash (a damaged or edited file).")
    mean, cov = np.asarray(fields["mean"], np.float64), np.asarray(fields["covariance"], np.float64)
    if mean.ndim != 1 or cov.shape != mean.shape * 2:
        raise ValueError(f"{path!r}: mean {mean.shape} and covariance {cov.shape} do not fit together.")
    return ReferenceStats(mean, cov, int(fields["num_images"]), str(fields["dataset"]), str(fields["split"]), settings)


def _differences(a: dict, b: dict) -> list:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def fid(
    samples: Any,
    reference: ReferenceStats | str | os.PathLike,
    *,
    network: FIDNetwork | str | os.PathLike,
    force: bool = False,
    min_samples: int = FID_MIN_SAMPLES,
    batch_size: int = 50,
) -> float:
    """The FID of ``samples`` against reference statistics: the Frechet distance of the two feature Gaussians.

    Args:
        samples: images as :func:`fid_features` takes them (model samples in ``[-1, 1]``).
        reference: :class:`ReferenceStats` or the path of their file.
        network: a :class:`FIDNetwork`, or the path of the converted weights (resized to 299).
        force: compare sets smaller than ``min_samples`` anyway (not comparable with published FIDs).
        min_samples: the smallest sample set (and reference) accepted without ``force``.
        batch_size: images per forward.

    Raises:
        ValueError: too few samples or reference images, or statistics made with other settings.
    """
    min_samples = check_positive_int("min_samples", min_samples)
    if not isinstance(reference, ReferenceStats):
        reference = load_reference_stats(reference)
    if not isinstance(network, FIDNetwork):
        network = FIDNetwork.load(network)
    n = int(np.shape(samples)[0])
    for what, count in (("samples", n), ("reference images", reference.num_images)):
        if count < min_samples and not force:
            raise ValueError(
                f"FID of {count} {what}: at least {min_samples} are needed (below the feature dimension the "
                "covariance is singular and the FID biased; papers use 50000); pass force=True to compare anyway."
            )
    differences = _differences(reference.settings, network.settings)
    if differences:
        raise ValueError(f"the reference statistics were made with other settings: {'; '.join(differences)}.")
    from dsm_jax.metrics import feature_statistics, frechet_distance_from_stats

    mean, cov = feature_statistics(fid_features(network, samples, batch_size=batch_size))
    return frechet_distance_from_stats(mean, cov, reference.mean, reference.covariance)


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m dsm_jax.inception --weights W --dataset D --split train|test --out STATS``: reference statistics."""
    import argparse

    from dsm_jax.data import load_dataset

    parser = argparse.ArgumentParser(prog="python -m dsm_jax.inception", description=_main.__doc__)
    parser.add_argument("--weights", required=True, help="the converted FID Inception weights (.npz)")
    parser.add_argument("--dataset", required=True, help="an image data set (CIFAR directory, folder, uint8 array)")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--out", required=True, help="the statistics file to write (.npz)")
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args(argv)
    ds = load_dataset(args.dataset, num_test=None)
    images = ds.train if args.split == "train" else ds.test
    stats = reference_stats(
        FIDNetwork.load(args.weights), images, dataset=args.dataset, split=args.split, batch_size=args.batch_size
    )
    save_reference_stats(args.out, stats)
    print(f"wrote {args.out}: {stats.num_images} images of the {args.split} split of {args.dataset}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
