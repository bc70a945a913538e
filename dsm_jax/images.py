"""8-bit image datasets: folders of PNG/JPEG files, the CIFAR-10/100 binary files, uint8 arrays.

:func:`dsm_jax.data.load_dataset` hands these sources here (the names it accepts):

* **a directory holding ``data_batch_1.bin``**: CIFAR-10's binary version
  (``data_batch_1.bin`` ... ``data_batch_5.bin`` for training,
  ``test_batch.bin`` held out). A record is 1 label byte and 3072 pixel
  bytes: the 1024 red values of the 32x32 image row by row, then green,
  then blue. Raw bytes are read, never the pickled Python version.
* **a directory holding ``train.bin``**: CIFAR-100's binary version
  (``train.bin``, ``test.bin``), records of 2 label bytes (coarse, fine) and
  the same 3072 pixel bytes; the fine label (0..99) is kept.
* **any other directory**: an image folder. Class sub-folders (each
  immediate sub-directory, sorted by name) give the integer labels
  ``0, 1, ...``; files directly in the directory (and no sub-folders) are one
  unlabelled class. ``.png``, ``.jpg`` and ``.jpeg`` files are read with
  Pillow, in sorted order; every image must have the same size, and all are
  read as RGB unless every one is grey-level (``L``), which gives 1 channel.
* **a ``.npy`` or ``.npz`` file of dtype uint8**, ``[N, H, W, C]`` or ``[N, H, W]``
  (channel axis added). A ``.npy`` file is memory-mapped
  (``np.load(mmap_mode="r")``), so it may be larger than memory; an
  ``.npz`` archive is read into memory, its optional ``labels`` array gives
  the labels. (Float ``.npy``/``.npz`` arrays keep the user-array path of
  :func:`dsm_jax.data.load_array`.)

Splits: CIFAR uses its own held-out file as the test split (``num_test``
takes a seeded subset of it, ``num_train`` of the training files); without
one (a folder, an array, or a CIFAR directory with no test file) the split is
the seeded random split of the digits (:func:`dsm_jax.data.load_dataset`),
``num_test`` defaulting to 10% of the examples.

Scaling (the dequantization convention of :mod:`dsm_jax.likelihood`): the
integer level ``u in {0, ..., 255}`` occupies the bin
``[-1 + u / 128, -1 + (u + 1) / 128)`` of ``[-1, 1]`` (256 bins of width
``2 / 256``, exactly those of :func:`dsm_jax.likelihood.uniform_dequantize`
with ``num_bins=256, data_range=(-1, 1)``), and training sees its centre,
``x = (u + 0.5) / 128 - 1`` (:func:`from_levels`), the mean of the uniform
dequantization. Bits/dim then takes the offset
``uniform_dequantization_offset(256, (-1, 1)) = 7``; :func:`to_levels` is the
inverse (the bin holding ``x``, clipped). Score_sde's ``u / 255 * 2 - 1`` maps
the levels onto the bin edges instead; the difference is at most 1/256.

Nothing is held as float32: the examples stay uint8 (in memory, in a memory
map, or as files) inside an :class:`ImageArray`, which converts the rows
asked for. Batches come from :class:`ImageBatchSource`: the same indices as
:class:`dsm_jax.data.BatchSource` for the same ``(seed, step)`` (so a resumed
run gets bitwise the same batches), optional horizontal flips drawn
per example from ``(seed, step)``, and a thread pool that decodes the next
batches in the background.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import threading
import typing
import weakref
import zipfile
from collections.abc import Callable, Sequence

import numpy as np

from dsm_jax._checks import check_positive_int

__all__ = [
    "CIFAR_SHAPE",
    "IMAGE_SUFFIXES",
    "ImageArray",
    "ImageBatchSource",
    "ImageSource",
    "batch_source",
    "from_levels",
    "is_image_source",
    "load_image_dataset",
    "read_cifar_binary",
    "read_cifar_directory",
    "read_image_folder",
    "to_levels",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CIFAR_SHAPE = (32, 32, 3)
_CIFAR_PIXELS = 32 * 32 * 3
_FLIP_STREAM = 0x464C4950  # "FLIP": keeps the flips' random stream apart from any other use of (seed, step)
_LABELS_KEY = "labels"

PathLike = str | os.PathLike


def from_levels(levels) -> np.ndarray:
    """8-bit levels to ``[-1, 1]`` float32 at the bin centres: ``x = (u + 0.5) / 128 - 1``."""
    return (np.asarray(levels, np.float32) + 0.5) * np.float32(1.0 / 128.0) - np.float32(1.0)


def to_levels(x) -> np.ndarray:
    """The inverse of :func:`from_levels`: the bin of ``x``, ``floor((x + 1) * 128)`` clipped to ``[0, 255]``, uint8."""
    return np.clip(np.floor((np.asarray(x, np.float32) + 1.0) * 128.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Readers: every one returns uint8 [N, H, W, C] (or a lazy file list) and int64 labels
# ---------------------------------------------------------------------------


def read_cifar_binary(path: PathLike, *, label_bytes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR binary file: ``(images uint8 [N, 32, 32, 3], labels int64 [N])``.

    Each record is ``label_bytes`` label bytes (CIFAR-10: 1; CIFAR-100: 2,
    coarse then fine, and the last, the fine label, is returned) followed by
    3072 bytes: the red, green and blue 32x32 planes, each row-major.

    Raises:
        ValueError: the file is missing or its size is not a whole number of records.
    """
    path = os.fspath(path)
    record = label_bytes + _CIFAR_PIXELS
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise ValueError(f"cannot read the CIFAR file {path!r}: {err.strerror}.") from None
    if raw.size == 0 or raw.size % record:
        raise ValueError(
            f"{path!r} holds {raw.size} bytes, not a whole number of {record}-byte CIFAR records "
            f"({label_bytes} label byte(s) + 3072 pixels); is it the binary version of the data set?"
        )
    rows = raw.reshape(-1, record)
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), rows[:, label_bytes - 1].astype(np.int64)


def _numbered_batches(directory: str) -> list:
    found = [
        (int(m.group(1)), name) for name in os.listdir(directory) if (m := re.fullmatch(r"data_batch_(\d+)\.bin", name))
    ]
    return [os.path.join(directory, name) for _, name in sorted(found)]


def read_cifar_directory(directory: PathLike) -> dict:
    """Reads a CIFAR-10 (``data_batch_*.bin``, ``test_batch.bin``) or CIFAR-100 (``train.bin``, ``test.bin``) directory.

    Returns:
        ``{"name": "cifar10" | "cifar100", "train": (images, labels), "test": (images, labels) or None}``.

    Raises:
        ValueError: the directory holds neither layout, or a file is malformed.
    """
    directory = os.fspath(directory)
    batches = _numbered_batches(directory)
    if batches:
        name, label_bytes, test_file = "cifar10", 1, "test_batch.bin"
    elif os.path.isfile(os.path.join(directory, "train.bin")):
        name, label_bytes, test_file = "cifar100", 2, "test.bin"
        batches = [os.path.join(directory, "train.bin")]
    else:
        raise ValueError(f"{directory!r} holds neither data_batch_*.bin (CIFAR-10) nor train.bin (CIFAR-100).")
    parts = [read_cifar_binary(p, label_bytes=label_bytes) for p in batches]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test_path = os.path.join(directory, test_file)
    test = read_cifar_binary(test_path, label_bytes=label_bytes) if os.path.isfile(test_path) else None
    return {"name": name, "train": train, "test": test}


def _is_cifar_directory(directory: str) -> bool:
    return bool(_numbered_batches(directory)) or os.path.isfile(os.path.join(directory, "train.bin"))


def _image_files(directory: str) -> list:
    return sorted(
        os.path.join(directory, f)
        for f in os.listdir(directory)
        if f.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(directory, f))
    )


def _decode(path: str, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return pixels[..., None] if channels == 1 else pixels


def read_image_folder(directory: PathLike) -> tuple[list, np.ndarray, tuple, list]:
    """Lists an image folder: ``(files, labels int64 [N], shape (H, W, C), class_names)``.

    Only the headers are read here (Pillow opens files lazily), to check that
    every image has the same size and to choose the channels (1 when every
    image is grey-level ``L``, else 3); the pixels are decoded on demand.

    Raises:
        ValueError: no images, files directly beside class sub-folders, an unreadable file, or mixed sizes.
    """
    from PIL import Image, UnidentifiedImageError

    directory = os.fspath(directory)
    classes = sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))
    loose = _image_files(directory)
    if classes and loose:
        raise ValueError(
            f"{directory!r} holds both image files ({os.path.basename(loose[0])!r}, ...) and class sub-folders "
            f"({classes[0]!r}, ...); put every image in a class sub-folder, or remove the sub-folders."
        )
    groups = [_image_files(os.path.join(directory, c)) for c in classes] if classes else [loose]
    files = [f for group in groups for f in group]
    labels = np.concatenate([np.full(len(g), i, np.int64) for i, g in enumerate(groups)]) if files else np.zeros(0)
    if not files:
        raise ValueError(f"{directory!r} holds no {'/'.join(IMAGE_SUFFIXES)} images (nor class sub-folders of them).")
    size, grey = None, True
    for f in files:
        try:
            with Image.open(f) as image:
                this, mode = image.size, image.mode
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"cannot read the image {f!r}: {err}") from None
        if size is None:
            size = this
        elif this != size:
            raise ValueError(
                f"every image must have the same size: {f!r} is {this[0]}x{this[1]}, {files[0]!r} is "
                f"{size[0]}x{size[1]} (width x height); resize them first."
            )
        grey = grey and mode == "L"
    assert size is not None
    return files, labels, (size[1], size[0], 1 if grey else 3), classes


# ---------------------------------------------------------------------------
# ImageArray: uint8 rows converted to float32 on demand
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSource:
    """Where the uint8 rows live: an array (in memory or memory-mapped) or a list of image files.

    Attributes:
        shape: ``(H, W, C)`` of one image.
        pixels: ``[N, H, W, C]`` uint8 (``np.ndarray`` or ``np.memmap``), or None for files.
        files: the image files (decoded with Pillow on demand), or None.
    """

    shape: tuple
    pixels: np.ndarray | None = None
    files: Sequence[str] | None = None

    def __len__(self) -> int:
        return len(self.files) if self.pixels is None else self.pixels.shape[0]  # type: ignore[arg-type]

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """``[len(indices), H, W, C]`` uint8."""
        if self.pixels is not None:
            # Sorted reads are sequential on a memory map; the result is put back in the asked order.
            order = np.argsort(indices, kind="stable")
            out = np.empty((len(indices),) + self.shape, np.uint8)
            out[order] = self.pixels[indices[order]]
            return out
        assert self.files is not None
        out = np.empty((len(indices),) + self.shape, np.uint8)
        for row, i in enumerate(indices):
            out[row] = _decode(self.files[int(i)], self.shape[-1])
        return out


class ImageArray:
    """A read-only float32 ``[N, H, W, C]`` view of uint8 images, scaled by :func:`from_levels` when read.

    Indexing (an int, a slice or an index array) returns numpy float32;
    :meth:`levels` returns the uint8 rows; ``np.asarray`` converts everything
    (``N * H * W * C * 4`` bytes: meant for small sets and evaluation).

    Args:
        source: an :class:`ImageSource`.
        indices: the rows of ``source`` this array shows, in order (default: all).
    """

    dtype = np.dtype(np.float32)

    def __init__(self, source: ImageSource, indices: np.ndarray | None = None):
        self.source = source
        self.indices = np.arange(len(source), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        self.shape = (len(self.indices),) + tuple(source.shape)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def levels(self, key=slice(None)) -> np.ndarray:
        """The uint8 rows ``key`` (an int, slice or index array)."""
        rows = self.indices[key]
        if np.ndim(rows) == 0:
            return self.source.gather(np.asarray([rows]))[0]
        return self.source.gather(rows)

    def subset(self, rows) -> ImageArray:
        """The lazy view of rows ``rows`` (nothing is read)."""
        return ImageArray(self.source, self.indices[rows])

    def __getitem__(self, key) -> np.ndarray:
        return from_levels(self.levels(key))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def reshape(self, *shape) -> np.ndarray:
        """``np.asarray(self).reshape(*shape)`` (reads every row)."""
        return np.asarray(self).reshape(*shape)


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


class ImageBatchSource:
    """Batches of an :class:`ImageArray` as a pure function of the step, decoded ahead in a thread pool.

    The indices of step ``s`` are exactly those of
    :class:`dsm_jax.data.BatchSource` with the same ``N``, ``batch_size``,
    ``seed`` and processes (it is used for them), so a resumed run reads the
    batches an uninterrupted one did, whatever was prefetched. With
    ``flip=True`` example ``j`` of the global batch of step ``s`` is mirrored
    left-right when the ``j``-th uniform of
    ``numpy.random.default_rng([seed, s, FLIP])`` is below 1/2: a function of
    ``(seed, s, j)`` only, like the indices.

    After serving step ``s`` the next ``prefetch`` steps are decoded in the
    background by ``num_workers`` threads (Pillow and numpy release the GIL
    while decoding and copying); a step asked out of order is computed on
    the spot, with the same result.

    Args:
        images: the training :class:`ImageArray`.
        batch_size: global batch size.
        seed: the shuffling (and flipping) seed.
        flip: random horizontal flips.
        prefetch: steps decoded ahead (0: none).
        num_workers: decoding threads (default ``min(4, os.cpu_count())``).
        process_index, process_count: as for :class:`dsm_jax.data.BatchSource`.
    """

    def __init__(
        self,
        images: ImageArray,
        batch_size: int,
        *,
        seed: int = 0,
        flip: bool = False,
        prefetch: int = 2,
        num_workers: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        labels: np.ndarray | None = None,
    ):
        from dsm_jax.data import BatchSource

        if not isinstance(images, ImageArray):
            raise ValueError(f"images must be an ImageArray, got {type(images).__name__}.")
        if not isinstance(flip, bool):
            raise ValueError(f"flip must be True or False, got {flip!r}.")
        self.images = images
        self.flip = flip
        # Zero bytes per example: only BatchSource's index arithmetic (and its labels) is used, on the same N.
        self.order = BatchSource(
            np.empty((len(images), 0), np.uint8),
            batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            labels=labels,
        )
        self.batch_size, self.seed = self.order.batch_size, self.order.seed
        self.prefetch = check_positive_int("prefetch", prefetch, minimum=0)
        workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        self._pool = concurrent.futures.ThreadPoolExecutor(check_positive_int("num_workers", workers))
        weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        self._pending: dict = {}
        self._lock = threading.Lock()

    def flips_at(self, step: int) -> np.ndarray:
        """This process's ``[B / P]`` booleans: which examples of step ``step`` are mirrored."""
        step = check_positive_int("step", step, minimum=0)
        mirrored = np.random.default_rng([self.seed, step, _FLIP_STREAM]).random(self.batch_size) < 0.5
        start = self.order.process_index * self.order.local_batch_size
        return mirrored[start : start + self.order.local_batch_size]

    def _compute(self, step: int) -> typing.Any:
        x = self.images[self.order.indices_at(step)]
        if self.flip:
            mirrored = self.flips_at(step)
            x[mirrored] = x[mirrored, :, ::-1]
        return x if self.order.labels is None else {"x": x, "labels": self.order.batch_at(step)["labels"]}

    def batch_at(self, step: int) -> typing.Any:
        """This process's part of the global batch of step ``step``, ``[B / P, H, W, C]`` float32.

        With ``labels``, ``{"x": images, "labels": [B / P]}`` as :class:`dsm_jax.data.BatchSource`.
        """
        step = check_positive_int("step", step, minimum=0)
        with self._lock:
            future = self._pending.pop(step, None)
            for stale in [s for s in self._pending if not step < s <= step + self.prefetch]:
                self._pending.pop(stale).cancel()
            for ahead in range(step + 1, step + 1 + self.prefetch):
                if ahead not in self._pending:
                    self._pending[ahead] = self._pool.submit(self._compute, ahead)
        return future.result() if future is not None else self._compute(step)

    __call__ = batch_at

    def close(self) -> None:
        """Stops the background threads (also done when the source is garbage-collected)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def batch_source(
    train, batch_size: int, *, seed: int = 0, flip: bool = False, labels=None
) -> Callable[[int], typing.Any]:
    """The batch source of a training set: :class:`ImageBatchSource` for images, else a ``BatchSource``.

    ``labels`` (``[N]`` integers) make every batch ``{"x": ..., "labels": ...}``.

    Raises:
        ValueError: ``flip=True`` for data that is not an 8-bit image set.
    """
    from dsm_jax.data import BatchSource

    if isinstance(train, ImageArray):
        return ImageBatchSource(train, batch_size, seed=seed, flip=flip, labels=labels)
    if flip:
        raise ValueError(
            f"random_flip=True applies to 8-bit image data sets (folders, CIFAR, uint8 arrays), got data of "
            f"shape {tuple(np.shape(train))}."
        )
    return BatchSource(train, batch_size, seed=seed, labels=labels)


# ---------------------------------------------------------------------------
# load_image_dataset
# ---------------------------------------------------------------------------


def _npz_member_dtype(path: str, key: str | None):
    """The dtype of the images array of an ``.npz`` archive, from its header only; None if unreadable."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
            images = [n for n in names if n != _LABELS_KEY]
            name = key if key is not None else (images[0] if len(images) == 1 else None)
            if name is None or name not in names:
                return None
            with archive.open(name + ".npy") as f:
                version = np.lib.format.read_magic(f)
                header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                return header(f)[2]
    except (OSError, ValueError, zipfile.BadZipFile):
        return None


def is_image_source(path: PathLike, key: str | None = None) -> bool:
    """Whether ``path`` is read by this module: a directory, or a ``.npy``/``.npz`` array of dtype uint8.

    A directory named like an array file (``x.npy``) is not: the array reader
    refuses it with "is a directory", the likelier mistake.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        return suffix not in (".npy", ".npz")
    if not os.path.isfile(path):
        return False
    if suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False).dtype == np.uint8
        except (OSError, ValueError, EOFError):
            return False
    return suffix == ".npz" and _npz_member_dtype(path, key) == np.uint8


def _as_images(pixels: np.ndarray, what: str) -> np.ndarray:
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    if pixels.ndim != 4 or pixels.shape[0] == 0:
        raise ValueError(f"{what} must hold uint8 images [N, H, W, C] or [N, H, W], got shape {pixels.shape}.")
    return pixels


def _read_uint8_array(path: str, key: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    if path.lower().endswith(".npy"):
        if key is not None:
            raise ValueError(f"key={key!r} applies to .npz archives only, got the .npy file {path!r}.")
        return _as_images(np.load(path, mmap_mode="r", allow_pickle=False), f"data file {path!r}"), None
    with np.load(path, allow_pickle=False) as archive:
        names = [n for n in archive.files if n != _LABELS_KEY]
        name = key if key is not None else names[0]
        pixels = _as_images(np.asarray(archive[name]), f"array {name!r} of {path!r}")
        labels = np.asarray(archive[_LABELS_KEY]).astype(np.int64) if _LABELS_KEY in archive.files else None
    if labels is not None and labels.shape != (pixels.shape[0],):
        raise ValueError(f"{path!r}: labels must have shape ({pixels.shape[0]},), got {labels.shape}.")
    return pixels, labels


def _dataset(path: str, train: ImageArray, test: ImageArray, description: str, train_labels, test_labels):
    from dsm_jax.data import Dataset

    # ImageArray stands in for the read-only float32 arrays Dataset documents (shape, indexing, np.asarray).
    return Dataset(
        path,
        typing.cast(np.ndarray, train),
        typing.cast(np.ndarray, test),
        data_range=(-1.0, 1.0),
        description=description,
        train_labels=train_labels,
        test_labels=test_labels,
    )


def load_image_dataset(path: PathLike, *, num_train=None, num_test=None, seed: int = 0, key: str | None = None):
    """An 8-bit image data set (see the module docstring) as a :class:`~dsm_jax.data.Dataset` of :class:`ImageArray`.

    Args:
        path: a CIFAR directory, an image folder, or a uint8 ``.npy``/``.npz`` file.
        num_train: training images (default: all the rest).
        num_test: held-out images (default: CIFAR's whole test file; else 10% of the images).
        seed: the seed of the split and the subsets.
        key: the images array of an ``.npz`` archive (default: its one array besides ``labels``).

    Returns:
        A :class:`~dsm_jax.data.Dataset` whose ``train``/``test`` are :class:`ImageArray` in ``[-1, 1]``,
        with ``train_labels``/``test_labels`` when the source has labels and ``data_range=(-1, 1)``.
    """
    from dsm_jax.data import _check_sizes, _split

    path = os.fspath(path)
    if os.path.isdir(path) and _is_cifar_directory(path):
        cifar = read_cifar_directory(path)
        kind = cifar["name"]
        if cifar["test"] is not None:
            (train_px, train_lab), (test_px, test_lab) = cifar["train"], cifar["test"]
            num_train, num_test, seed = _check_sizes(
                num_train, test_px.shape[0] if num_test is None else num_test, seed
            )
            train = _subset(ImageArray(ImageSource(CIFAR_SHAPE, pixels=train_px)), num_train, seed, 3, "training")
            test = _subset(ImageArray(ImageSource(CIFAR_SHAPE, pixels=test_px)), num_test, seed, 4, "test")
            description = f"{kind} binary {path!r}: {len(train)} training and {len(test)} test images 32x32x3"
            description += ", (u + 0.5) / 128 - 1"
            return _dataset(path, train, test, description, train_lab[train.indices], test_lab[test.indices])
        pixels, labels = cifar["train"]
        source, what = ImageSource(CIFAR_SHAPE, pixels=pixels), f"{kind} binary {path!r} (no test file)"
    elif os.path.isdir(path):
        files, labels, shape, classes = read_image_folder(path)
        source = ImageSource(shape, files=files)
        what = f"image folder {path!r}" + (f" ({len(classes)} classes)" if classes else "")
    else:
        pixels, labels = _read_uint8_array(path, key)
        source, what = ImageSource(tuple(pixels.shape[1:]), pixels=pixels), f"uint8 array {path!r}"
    n = len(source)
    num_train, num_test, seed = _check_sizes(num_train, n // 10 if num_test is None else num_test, seed)
    train_idx, test_idx = _split(np.arange(n), num_train, num_test, seed, what)
    full = ImageArray(source)
    train, test = full.subset(train_idx), full.subset(test_idx)
    h, w, c = source.shape
    description = f"{what}: {len(train)} training and {len(test)} held-out images {h}x{w}x{c}, (u + 0.5) / 128 - 1"
    if labels is None:
        return _dataset(path, train, test, description, None, None)
    return _dataset(path, train, test, description, labels[train_idx], labels[test_idx])


def _subset(images: ImageArray, num: int | None, seed: int, stream: int, what: str) -> ImageArray:
    """``num`` rows of ``images`` drawn with ``fold_in(key(seed), stream)`` (sorted), or all of them."""
    import jax

    n = len(images)
    if num is None or num == n:
        return images
    if num > n:
        raise ValueError(f"num_{'train' if what == 'training' else 'test'}={num} exceeds the {n} {what} images.")
    order = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(seed), stream), n))
    return images.subset(np.sort(order[:num]))
