"""Tests for dsm_jax.checkpoint: orbax round trips, keep-K, atomicity leftovers, checksums, corrupt fallback."""

import glob
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from dsm_jax.checkpoint import Checkpointer, CorruptCheckpointError, CorruptCheckpointWarning, load_params
from dsm_jax.train import TrainState, create_train_state


def _state(seed: int = 0, step: int = 0) -> TrainState:
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"dense": {"kernel": jax.random.normal(k1, (3, 4)), "bias": jax.random.normal(k2, (4,))}}
    state = create_train_state(params, optax.adam(1e-3))
    ema = jax.tree.map(lambda p: 0.5 * p, params)
    return state.replace(step=jnp.asarray(step, jnp.int32), ema_params=ema)


def _corrupt(directory: str, step: int) -> None:
    """Truncates every array data file of a step (what a disk error or a bad copy leaves)."""
    files = glob.glob(os.path.join(directory, str(step), "state", "**", "d", "*"), recursive=True)
    assert files, "expected orbax data files to corrupt"
    for f in files:
        open(f, "wb").close()


def _flip_one_byte(path: str) -> None:
    """Flips the lowest bit of the middle byte of a file (what a bad disk sector or bit rot does)."""
    with open(path, "rb+") as f:
        data = bytearray(f.read())
        data[len(data) // 2] ^= 0x01
        f.seek(0)
        f.write(data)


def _files(step_dir: str) -> list:
    return sorted(
        os.path.relpath(os.path.join(root, name), step_dir) for root, _, names in os.walk(step_dir) for name in names
    )


def test_round_trip_is_bitwise_and_keeps_metadata(tmp_path):
    state = _state(seed=3, step=7)
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(7, state, data_state={"step": 7}, config={"lr": 0.001, "name": "toy"})
        restored, meta = ckpt.restore(7, target=_state(seed=99))
    assert isinstance(restored, TrainState)
    chex.assert_trees_all_equal(restored, jax.device_get(state))
    assert meta == {"step": 7, "data_state": {"step": 7}, "config": {"lr": 0.001, "name": "toy"}}


def test_keeps_only_the_latest_k(tmp_path):
    with Checkpointer(tmp_path / "ck", keep=2) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.save(step, _state(step=step))
        assert ckpt.all_steps() == [3, 4]
        assert ckpt.latest_step() == 4


def test_no_checkpoint_gives_none(tmp_path):
    with Checkpointer(tmp_path / "ck") as ckpt:
        assert ckpt.restore_latest(target=_state()) is None


def test_corrupt_latest_is_skipped_with_a_warning(tmp_path):
    directory = str(tmp_path / "ck")
    with Checkpointer(directory) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _state(seed=step, step=step), data_state={"step": step})
    _corrupt(directory, 3)
    with Checkpointer(directory) as ckpt:
        with pytest.warns(CorruptCheckpointWarning, match="step 3"):
            restored, meta = ckpt.restore_latest(target=_state())
        assert meta["step"] == 2
        chex.assert_trees_all_equal(restored, jax.device_get(_state(seed=2, step=2)))
        # Moved aside, not deleted: orbax no longer lists it, the files are still there.
        assert ckpt.all_steps() == [1, 2]
        assert len(glob.glob(os.path.join(directory, "corrupt-3-*"))) == 1
        # The run can write step 3 again.
        ckpt.save(3, _state(seed=30, step=3))
        assert ckpt.restore_latest(target=_state())[1]["step"] == 3


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A checkpoint directory with steps 1 and 2 (distinct states), copied by each test that damages it."""
    directory = str(tmp_path_factory.mktemp("two") / "ck")
    with Checkpointer(directory) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _state(seed=step, step=step), data_state={"step": step}, config={"lr": 0.001})
    return directory


def test_a_flipped_byte_in_any_file_falls_back_to_the_previous_step(two_steps, tmp_path):
    """One bit changed in each file of a step directory: detected by the checksums, step 1 restored bitwise.

    Without checksums a flip in an array data file restored a silently
    different parameter, and one in the meta item a different config.
    """
    files = _files(os.path.join(two_steps, "2"))
    kinds = {
        "state data": "state/ocdbt.process_0/d/",
        "state metadata": "state/_METADATA",
        "step metadata": "_CHECKPOINT_METADATA",
        "meta item": "meta/metadata",
        "checksum manifest": "dsm_jax_checksums.json",
    }
    for kind, needle in kinds.items():
        assert any(needle in f for f in files), (kind, files)
    for i, name in enumerate(files):
        directory = str(tmp_path / f"ck{i}")
        shutil.copytree(two_steps, directory)
        _flip_one_byte(os.path.join(directory, "2", name))
        with Checkpointer(directory) as ckpt:
            with pytest.warns(CorruptCheckpointWarning, match="step 2") as record:
                restored, meta = ckpt.restore_latest(target=_state())
            assert meta["step"] == 1, name
            chex.assert_trees_all_equal(restored, jax.device_get(_state(seed=1, step=1)))
            assert ckpt.all_steps() == [1]
        assert len(glob.glob(os.path.join(directory, "corrupt-2-*"))) == 1
        if name != "dsm_jax_checksums.json":
            assert name in str(record[0].message), (name, str(record[0].message))


def test_an_untouched_checkpoint_is_verified_and_bitwise(two_steps, tmp_path):
    directory = str(tmp_path / "ck")
    shutil.copytree(two_steps, directory)  # checksums are of contents: a copied run stays valid
    with Checkpointer(directory) as ckpt:
        restored, meta = ckpt.restore_latest(target=_state())
    assert meta == {"step": 2, "data_state": {"step": 2}, "config": {"lr": 0.001}}
    chex.assert_trees_all_equal(restored, jax.device_get(_state(seed=2, step=2)))
    with open(os.path.join(directory, "2", "dsm_jax_checksums.json")) as f:
        manifest = json.load(f)
    assert sorted(manifest["files"]) == [
        f for f in _files(os.path.join(directory, "2")) if f != "dsm_jax_checksums.json"
    ]


def test_an_added_or_removed_file_is_a_mismatch(two_steps, tmp_path):
    for change in ("add", "remove"):
        directory = str(tmp_path / change)
        shutil.copytree(two_steps, directory)
        if change == "add":
            open(os.path.join(directory, "2", "state", "stray"), "w").close()
        else:
            os.remove(os.path.join(directory, "2", "commit_success.txt"))
        with Checkpointer(directory, read_only=True) as ckpt:
            with pytest.raises(
                CorruptCheckpointError,
                match="unexpected: state/stray" if change == "add" else "missing: commit_success.txt",
            ):
                ckpt.restore(2)


def test_a_missing_manifest_is_corrupt_but_an_old_unflagged_checkpoint_is_accepted(two_steps, tmp_path):
    """A writer killed between orbax's commit and the manifest: not trusted. Checkpoints of older versions
    (no manifest and no "checksums" flag in their meta item) restore unverified."""
    directory = str(tmp_path / "ck")
    shutil.copytree(two_steps, directory)
    os.remove(os.path.join(directory, "2", "dsm_jax_checksums.json"))
    with Checkpointer(directory) as ckpt:
        with pytest.warns(CorruptCheckpointWarning, match="no checksum manifest"):
            assert ckpt.restore_latest(target=_state())[1]["step"] == 1
    old = str(tmp_path / "old")
    shutil.copytree(two_steps, old)
    os.remove(os.path.join(old, "2", "dsm_jax_checksums.json"))
    meta_file = os.path.join(old, "2", "meta", "metadata")
    with open(meta_file) as f:
        meta = json.load(f)
    del meta["checksums"]
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    with Checkpointer(old) as ckpt:
        restored, meta = ckpt.restore_latest(target=_state())
    assert meta["step"] == 2
    chex.assert_trees_all_equal(restored, jax.device_get(_state(seed=2, step=2)))


def test_every_checkpoint_corrupt_gives_none(tmp_path):
    directory = str(tmp_path / "ck")
    with Checkpointer(directory) as ckpt:
        ckpt.save(1, _state(step=1))
    with open(os.path.join(directory, "1", "meta", "metadata"), "w") as f:
        f.write("{not json")
    with Checkpointer(directory) as ckpt:
        with pytest.warns(CorruptCheckpointWarning):
            assert ckpt.restore_latest(target=_state()) is None


def test_unfinished_save_is_ignored_and_cleaned(tmp_path):
    """A process killed mid-save leaves an orbax temporary directory: never restored, removed on open."""
    directory = str(tmp_path / "ck")
    with Checkpointer(directory) as ckpt:
        ckpt.save(5, _state(seed=5, step=5))
    leftover = os.path.join(directory, "10.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(leftover, "state"))
    with Checkpointer(directory) as ckpt:
        assert ckpt.all_steps() == [5]
        assert ckpt.restore_latest(target=_state())[1]["step"] == 5
    assert not os.path.exists(leftover)


def test_load_params_reads_ema_without_touching_the_directory(tmp_path):
    directory = str(tmp_path / "ck")
    state = _state(seed=4, step=9)
    with Checkpointer(directory) as ckpt:
        ckpt.save(9, state)
    before = sorted(os.listdir(directory))
    ema = load_params(directory)
    raw = load_params(directory, ema=False, step=9)
    chex.assert_trees_all_equal(ema, jax.device_get(state.ema_params))
    chex.assert_trees_all_equal(raw, jax.device_get(state.params))
    assert sorted(os.listdir(directory)) == before


def test_load_params_verifies_and_leaves_a_corrupt_checkpoint_in_place(two_steps, tmp_path):
    directory = str(tmp_path / "ck")
    shutil.copytree(two_steps, directory)
    data_file = next(f for f in _files(os.path.join(directory, "2")) if "/d/" in f)
    _flip_one_byte(os.path.join(directory, "2", data_file))
    with pytest.warns(CorruptCheckpointWarning, match="step 2.*left it in place"):
        ema = load_params(directory)
    chex.assert_trees_all_equal(ema, jax.device_get(_state(seed=1, step=1).ema_params))
    assert sorted(os.listdir(directory)) == ["1", "2"]
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch in step 2"):
        load_params(directory, step=2)


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path / "ck", keep=0)
    with pytest.raises(ValueError, match="directory"):
        load_params(tmp_path / "missing")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no checkpoint"):
        load_params(tmp_path / "empty")
    with Checkpointer(tmp_path / "ck") as ckpt:
        with pytest.raises(ValueError, match="step"):
            ckpt.save(-1, _state())
