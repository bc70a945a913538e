"""FID: the Inception network (random weights, small input), weight files, reference statistics, the refusals."""

import json

import numpy as np
import pytest

from dsm_jax import inception, metrics

SIDE = inception.MIN_INPUT_SIZE  # 75x75, fed unresized: one compile of the full network at a tenth of 299's cost


def random_torch_arrays(seed: int = 0) -> dict:
    """Random weights in the PyTorch state-dict layout (He-scaled kernels, BatchNorm near identity), plus extras."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (_, _, shape) in inception._template().items():
        if name.endswith("conv.weight"):
            kh, kw, cin, cout = shape
            out[name] = (rng.normal(size=(cout, cin, kh, kw)) * np.sqrt(2.0 / (kh * kw * cin))).astype(np.float32)
        elif name.endswith(("bn.weight", "bn.running_var")):
            out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            out[name] = rng.normal(0.0, 0.1, shape).astype(np.float32)
    out["fc.weight"] = np.zeros((1008, 2048), np.float32)  # in the real file; ignored
    out["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0)
    return out


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / "weights.npz"
    arrays = random_torch_arrays()
    np.savez(path, **arrays)
    return path, arrays


@pytest.fixture(scope="module")
def network(weights_file):
    net = inception.FIDNetwork.load(weights_file[0], input_size=None)
    return net


def _images(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIDE, SIDE, 3), dtype=np.uint8)


def test_weights_round_trip_and_bad_files(weights_file, tmp_path):
    path, arrays = weights_file
    variables = inception.load_fid_weights(path)
    back = inception.to_torch_arrays(variables)
    assert len(back) == len(arrays) - 2 == 94 * 5  # 94 conv + BatchNorm pairs
    assert all(np.array_equal(back[k], arrays[k]) for k in back)
    kernel = variables["params"]["Mixed_7c"]["branch3x3_2a"]["conv"]["kernel"]
    assert kernel.shape == (1, 3, 384, 384)  # [kh, kw, in, out] for a 1x3 convolution
    broken = dict(arrays)
    del broken["Mixed_6e.branch_pool.bn.running_var"]
    np.savez(tmp_path / "missing.npz", **broken)
    with pytest.raises(ValueError, match="lack 1 of 470"):
        inception.load_fid_weights(tmp_path / "missing.npz")
    broken["Mixed_6e.branch_pool.bn.running_var"] = np.ones(7, np.float32)
    np.savez(tmp_path / "shape.npz", **broken)
    with pytest.raises(ValueError, match="running_var has shape"):
        inception.load_fid_weights(tmp_path / "shape.npz")
    with pytest.raises(ValueError, match="do not exist"):
        inception.load_fid_weights(tmp_path / "nothing.npz")


def test_network_shapes_determinism_and_batch_independence(network):
    x = _images(0, 3)
    feats = inception.fid_features(network, x, batch_size=2)
    assert feats.shape == (3, 2048) and np.all(np.isfinite(feats)) and np.all(feats >= 0)
    assert np.array_equal(feats, inception.fid_features(network, x, batch_size=2))
    alone = inception.fid_features(network, x[2:], batch_size=2)  # padded into the same compiled shape
    np.testing.assert_allclose(alone[0], feats[2], rtol=1e-4, atol=1e-5)
    assert not np.allclose(feats[0], feats[1])
    grey = inception.fid_features(network, x[:2, ..., :1], batch_size=2)
    rgb = inception.fid_features(network, np.repeat(x[:2, ..., :1], 3, axis=-1), batch_size=2)
    assert np.array_equal(grey, rgb)
    # model samples in [-1, 1] are quantized to the levels first
    samples = (x[:2].astype(np.float32) + 0.5) / 128 - 1
    assert np.array_equal(inception.fid_features(network, samples, batch_size=2), feats[:2])


def _torch_bilinear(x: np.ndarray, out: int) -> np.ndarray:
    """PyTorch's bilinear, align_corners=False, written out: source = (dst + 0.5) in / out - 0.5, clamped at 0."""

    def axis_weights(n_in):
        src = np.maximum((np.arange(out) + 0.5) * n_in / out - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = src - i0
        w = np.zeros((out, n_in))
        np.add.at(w, (np.arange(out), i0), 1 - lam)
        np.add.at(w, (np.arange(out), i1), lam)
        return w

    wh, ww = axis_weights(x.shape[1]), axis_weights(x.shape[2])
    return np.einsum("ph,bhwc,qw->bpqc", wh, x, ww)


@pytest.mark.parametrize("size_in, size_out", [(8, 19), (19, 8), (32, 75)])
def test_resize_is_pytorch_bilinear_without_antialias(size_in, size_out):
    x = np.random.default_rng(1).uniform(-1, 1, (2, size_in, size_in, 3)).astype(np.float32)
    got = np.asarray(inception.resize_bilinear(x, size_out))
    np.testing.assert_allclose(got, _torch_bilinear(x.astype(np.float64), size_out), atol=1e-5)


@pytest.fixture(scope="module")
def stats_file(network, tmp_path_factory):
    stats = inception.reference_stats(network, _images(3, 6), dataset="synthetic", split="test", batch_size=2)
    path = tmp_path_factory.mktemp("stats") / "ref.npz"
    inception.save_reference_stats(path, stats)
    return path, stats


def test_reference_stats_round_trip_and_hash_check(stats_file, tmp_path):
    path, stats = stats_file
    loaded = inception.load_reference_stats(path)
    assert np.array_equal(loaded.mean, stats.mean) and np.array_equal(loaded.covariance, stats.covariance)
    assert (loaded.num_images, loaded.dataset, loaded.split) == (6, "synthetic", "test")
    assert loaded.settings == stats.settings and loaded.settings_hash == stats.settings_hash
    assert loaded.settings["input_size"] is None and len(loaded.settings["weights_sha256"]) == 64
    with np.load(path) as f:
        fields = {k: f[k] for k in f.files}
    edited = json.loads(str(fields["settings_json"]))
    edited["input_size"] = 299
    np.savez(tmp_path / "edited.npz", **{**fields, "settings_json": np.array(json.dumps(edited, sort_keys=True))})
    with pytest.raises(ValueError, match="stored hash"):
        inception.load_reference_stats(tmp_path / "edited.npz")
    np.savez(tmp_path / "other.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="not a FID reference"):
        inception.load_reference_stats(tmp_path / "other.npz")


def test_fid_refuses_small_sets_and_other_settings(network, stats_file):
    path, _ = stats_file
    samples = (_images(4, 4).astype(np.float32) + 0.5) / 128 - 1
    with pytest.raises(ValueError, match="FID of 4 samples: at least 2048"):
        metrics.fid(samples, path, weights=network)
    with pytest.raises(ValueError, match="FID of 6 reference images"):
        metrics.fid(_images(4, 7), path, weights=network, min_samples=7)
    other = inception.FIDNetwork(network.variables, weights_digest="0" * 64, input_size=None)
    with pytest.raises(ValueError, match="other settings: weights_sha256"):
        metrics.fid(samples, path, weights=other, force=True)


@pytest.mark.slow  # two 2048 x 2048 Frechet distances (eigendecompositions): ~10 s on 2 idle cores
def test_forced_fid_is_positive_and_zero_against_its_own_images(network, stats_file):
    path, stats = stats_file
    samples = (_images(4, 4).astype(np.float32) + 0.5) / 128 - 1
    value = metrics.fid(samples, path, weights=network, force=True, batch_size=2)
    assert np.isfinite(value) and value > 0
    same = metrics.fid(_images(3, 6), stats, weights=network, force=True, batch_size=2)
    assert same == pytest.approx(0.0, abs=1e-6 * np.trace(stats.covariance))


@pytest.mark.slow  # a 3-step training run, then the Inception compiled at 75x75 inside evaluate: ~30 s on 2 cores
def test_evaluate_with_fid_weights_and_reference(weights_file, tmp_path, capsys):
    from _tiny import tiny_sets

    from dsm_jax import cli

    path, _ = weights_file
    px = np.random.default_rng(5).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "px.npy", px)
    workdir = tmp_path / "run"
    sets = tiny_sets(model="unet", channels=8, batch_size=16, num_train=None, num_test=8, num_samples=8, sigma_max=20)
    sets += ["--set", "sigma_sampling=random", "--set", "steps_per_call=1", "--set", "steps_per_sigma=2"]
    argv = ["train", "--dataset", str(tmp_path / "px.npy"), "--workdir", str(workdir), "--quiet", "--num-steps", "3"]
    assert cli.main([*argv, *sets]) == 0
    net75 = inception.FIDNetwork.load(path, input_size=SIDE)  # the 8x8 images resized to 75x75
    ref = tmp_path / "ref.npz"
    inception.save_reference_stats(ref, inception.reference_stats(net75, px[:20], dataset="px", split="train"))
    evaluate = ["evaluate", "--workdir", str(workdir), "--num", "4"]
    for extra, needle in (
        (["--fid-weights", str(path)], "go together"),
        (["--fid-weights", str(tmp_path / "no.npz"), "--fid-ref", str(ref)], "no.npz"),
        (["--fid-weights", str(path), "--fid-ref", str(tmp_path / "px.npy")], "px.npy"),
        (["--fid-weights", str(path), "--fid-ref", str(ref)], "at least 2048"),
    ):
        capsys.readouterr()
        assert cli.main([*evaluate, *extra]) == cli.EXIT_USER_ERROR, needle
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert cli.main([*evaluate, "--fid-weights", str(path), "--fid-ref", str(ref), "--fid-force"]) == 0
    written = json.loads((workdir / "eval_ald_n4_seed0.json").read_text())
    assert np.isfinite(written["fid"]) and written["fid"] > 0
    assert written["fid_reference"]["num_images"] == 20 and written["fid_reference"]["split"] == "train"


@pytest.mark.slow  # the network compiled at 299x299: ~8 s on 2 cores
def test_reference_statistics_command(weights_file, tmp_path, capsys):
    np.save(tmp_path / "px.npy", _images(6, 10)[:, :32, :32])
    out = tmp_path / "stats.npz"
    argv = ["--weights", str(weights_file[0]), "--dataset", str(tmp_path / "px.npy"), "--split", "train"]
    assert inception._main([*argv, "--out", str(out), "--batch-size", "2"]) == 0
    stats = inception.load_reference_stats(out)
    assert (stats.num_images, stats.split, stats.settings["input_size"]) == (9, "train", 299)
    assert np.all(np.isfinite(stats.covariance))
    with pytest.raises(ValueError, match="at least 2 images"):
        inception._main([*argv[:-1], "test", "--out", str(out)])  # the held-out split is 1 image
    assert "wrote" in capsys.readouterr().out
