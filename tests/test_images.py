"""8-bit image data: CIFAR binary files, image folders, uint8 arrays; scaling, batches, flips, training."""

import json

import jax
import numpy as np
import pytest
from _tiny import tiny_sets
from PIL import Image

from dsm_jax import cli, images, likelihood
from dsm_jax.data import BatchSource, load_dataset


def _cifar_records(pixels_hwc: np.ndarray, labels, label_bytes: int = 1) -> np.ndarray:
    """The binary records of images ``[N, 32, 32, 3]``: label byte(s), then the R, G and B planes."""
    planes = pixels_hwc.transpose(0, 3, 1, 2).reshape(len(pixels_hwc), -1)
    heads = np.repeat(np.asarray(labels, np.uint8)[:, None], label_bytes, axis=1)
    if label_bytes == 2:
        heads[:, 0] = 99 - heads[:, 1]  # a coarse label that differs from the fine one
    return np.concatenate([heads, planes], axis=1).astype(np.uint8)


def _known_cifar(n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose pixel (i, j, c) of image k is (k + offset + 3 i + 5 j + 80 c) mod 256, labels k mod 10."""
    k, i, j, c = np.meshgrid(np.arange(n), np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    return ((k + offset + 3 * i + 5 * j + 80 * c) % 256).astype(np.uint8), (np.arange(n) + offset) % 10


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cifar")
    parts = [_known_cifar(48, offset=0), _known_cifar(48, offset=48)]
    for number, (px, lab) in zip((1, 2), parts, strict=True):
        _cifar_records(px, lab).tofile(d / f"data_batch_{number}.bin")
    test_px, test_lab = _known_cifar(16, offset=200)
    _cifar_records(test_px, test_lab).tofile(d / "test_batch.bin")
    train_px = np.concatenate([p[0] for p in parts])
    train_lab = np.concatenate([p[1] for p in parts])
    return d, train_px, train_lab, test_px, test_lab


def _pixel(label: int, k: int, i: int, j: int, c: int) -> int:
    return (40 * label + 7 * k + 11 * i + 13 * j + 60 * c) % 256


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of 8x8 RGB PNGs (sub-folders 'a_cat' -> 0, 'b_dog' -> 1) with known pixels."""
    root = tmp_path_factory.mktemp("folder")
    expected = {}
    for label, name in enumerate(("a_cat", "b_dog")):
        (root / name).mkdir()
        for k in range(40):
            px = np.fromfunction(lambda i, j, c: _pixel(label, k, i, j, c), (8, 8, 3), dtype=int).astype(np.uint8)
            path = root / name / f"img{k:02d}.png"
            Image.fromarray(px, "RGB").save(path)
            expected[str(path)] = (px, label)
    return root, expected


def test_cifar10_binary_is_decoded_exactly(cifar_dir):
    d, train_px, train_lab, test_px, test_lab = cifar_dir
    ds = load_dataset(d)
    assert isinstance(ds.train, images.ImageArray) and ds.shape == (32, 32, 3) and ds.data_range == (-1.0, 1.0)
    assert np.array_equal(ds.train.levels(), train_px) and np.array_equal(ds.train_labels, train_lab)
    assert np.array_equal(ds.test.levels(), test_px) and np.array_equal(ds.test_labels, test_lab)
    assert np.array_equal(ds.train[:3], images.from_levels(train_px[:3])) and ds.train[:3].dtype == np.float32
    sub = load_dataset(d, num_train=10, num_test=4, seed=1)
    assert len(sub.train) == 10 and len(sub.test) == 4
    assert np.array_equal(sub.test.levels(), test_px[sub.test.indices])
    assert np.array_equal(sub.test_labels, test_lab[sub.test.indices])


def test_cifar100_reads_the_fine_label_and_bad_sizes_are_refused(tmp_path):
    px, lab = _known_cifar(12)
    _cifar_records(px, lab, label_bytes=2).tofile(tmp_path / "train.bin")
    ds = load_dataset(tmp_path, num_test=2)  # no test.bin: a seeded split of train.bin
    assert np.array_equal(ds.train_labels, lab[ds.train.indices])
    assert np.array_equal(ds.train.levels(), px[ds.train.indices]) and len(ds.test) == 2
    (tmp_path / "train.bin").write_bytes(b"\0" * 3000)
    with pytest.raises(ValueError, match="whole number of 3074-byte"):
        load_dataset(tmp_path)


def test_image_folder_labels_and_pixels(folder):
    root, expected = folder
    ds = load_dataset(root, num_test=8, seed=0)
    assert ds.shape == (8, 8, 3) and len(ds.train) == 72 and len(ds.test) == 8
    for split, labels in ((ds.train, ds.train_labels), (ds.test, ds.test_labels)):
        for row, (index, label) in enumerate(zip(split.indices, labels, strict=True)):
            px, want = expected[split.source.files[index]]
            assert label == want and np.array_equal(split.levels(row), px)
    assert set(ds.train_labels.tolist()) == {0, 1}


def test_folder_errors_and_grey_images(tmp_path):
    (tmp_path / "cls").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8), "L").save(tmp_path / "cls" / "a.png")
    Image.fromarray(np.full((4, 4), 200, np.uint8), "L").save(tmp_path / "cls" / "b.png")
    files, labels, shape, classes = images.read_image_folder(tmp_path)
    assert shape == (4, 4, 1) and classes == ["cls"] and labels.tolist() == [0, 0]
    Image.fromarray(np.zeros((4, 4), np.uint8), "L").save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="both image files"):
        images.read_image_folder(tmp_path)
    (tmp_path / "loose.png").unlink()
    Image.fromarray(np.zeros((5, 4), np.uint8), "L").save(tmp_path / "cls" / "c.png")
    with pytest.raises(ValueError, match="same size"):
        images.read_image_folder(tmp_path)
    with pytest.raises(ValueError, match="holds no"):
        images.read_image_folder(_empty(tmp_path))


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_scaling_is_the_bin_centre_of_the_likelihood_dequantization():
    u = np.arange(256)
    x = images.from_levels(u)
    assert x[0] == np.float32(-1 + 1 / 256) and x[-1] == np.float32(1 - 1 / 256)
    assert np.array_equal(images.to_levels(x), u) and images.to_levels(np.array([-2.0, 2.0])).tolist() == [0, 255]
    noisy = np.asarray(likelihood.uniform_dequantize(jax.random.key(0), np.tile(u, 8)))
    assert np.array_equal(images.to_levels(noisy), np.tile(u, 8))  # every draw stays in its level's bin
    assert np.all(np.abs(noisy - np.tile(x, 8)) <= 1 / 256 + 1e-6)


def test_batches_equal_batch_source_and_flips_are_step_deterministic(cifar_dir):
    ds = load_dataset(cifar_dir[0])
    plain = BatchSource(np.asarray(ds.train), 16, seed=3)
    loader = images.ImageBatchSource(ds.train, 16, seed=3, prefetch=3, num_workers=2)
    for step in (0, 1, 2, 7, 3, 3, 12):  # in order (prefetched), out of order and repeated
        assert np.array_equal(loader(step), plain(step)), step
    flipped = images.ImageBatchSource(ds.train, 16, seed=3, flip=True)
    again = images.ImageBatchSource(ds.train, 16, seed=3, flip=True, prefetch=0)
    mirrored = [flipped.flips_at(s) for s in range(8)]
    assert 0 < np.mean(mirrored) < 1 and not all(np.array_equal(mirrored[0], m) for m in mirrored[1:])
    for step in (5, 0, 5):
        batch, base, mask = flipped(step), plain(step), flipped.flips_at(step)
        assert np.array_equal(batch, again(step))
        assert np.array_equal(batch[mask], base[mask][:, :, ::-1]) and np.array_equal(batch[~mask], base[~mask])
    for source in (loader, flipped, again):
        source.close()
    with pytest.raises(ValueError, match="random_flip"):
        images.batch_source(np.zeros((8, 2), np.float32), 4, flip=True)


def test_uint8_npy_is_memory_mapped_and_npz_labels_are_read(tmp_path):
    px = np.random.default_rng(0).integers(0, 256, (30, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", px)
    ds = load_dataset(tmp_path / "x.npy", num_test=5)
    assert isinstance(ds.train.source.pixels, np.memmap) and ds.train_labels is None
    assert np.array_equal(ds.train.levels(), px[ds.train.indices])
    np.savez(tmp_path / "g.npz", images=px[..., 0], labels=np.arange(30) % 3)
    grey = load_dataset(tmp_path / "g.npz", num_test=0)
    assert grey.shape == (4, 4, 1) and np.array_equal(grey.train_labels, np.arange(30) % 3)
    np.save(tmp_path / "f.npy", px.astype(np.float32))
    assert not isinstance(load_dataset(tmp_path / "f.npy").train, images.ImageArray)


def _metrics(workdir):
    return json.loads((workdir / "metrics.json").read_text())


_SMALL = dict(batch_size=16, num_test=8, num_samples=8, steps_per_sigma=2, steps_per_call=1, save_every=3)
# sigma_max given: the NCSNv2 rule's pairwise distances would compile a constant-folded program per data set.
_SMALL.update(sigma_max=20, sigma_sampling="random", warmup_steps=1, sde_steps=2)


def test_train_a_few_steps_on_an_image_folder_with_flips(folder, tmp_path):
    sets = tiny_sets(model="unet", channels=8, channel_mults="1,2", num_train=None, random_flip=1, **_SMALL)
    assert (
        cli.main(
            ["train", "--dataset", str(folder[0]), "--workdir", str(tmp_path), "--quiet", "--num-steps", "3", *sets]
        )
        == 0
    )
    assert _metrics(tmp_path)["fraction_finite"] == 1.0


@pytest.mark.slow  # a 32x32 U-Net with attention: compiling training and the pc sampler takes ~20 s on 2 cores
def test_the_cifar10_preset_shrunk_trains_on_a_cifar_binary(cifar_dir, tmp_path):
    """The accelerator-sized preset, shrunk with --set to 8 channels (attention at 16x16 kept), 3 steps."""
    shrink = ["--set", "channels=8", "--set", "channel_mults=1,2", "--set", "num_res_blocks=1"]
    shrink += [arg for key, value in _SMALL.items() for arg in ("--set", f"{key}={value}")]
    argv = ["train", "--preset", "cifar10", "--dataset", str(cifar_dir[0]), "--workdir", str(tmp_path), "--quiet"]
    assert cli.main([*argv, "--num-steps", "3", *shrink]) == 0
    saved = json.loads((tmp_path / "config.json").read_text())["config"]
    assert saved["random_flip"] and saved["sampler"] == "pc" and saved["attention_resolutions"] == [16]
    assert saved["channels"] == 8 and _metrics(tmp_path)["fraction_finite"] == 1.0
