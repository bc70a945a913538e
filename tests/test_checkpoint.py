"""Tests for dsm_jax.checkpoint: orbax round trips, keep-K, atomicity leftovers, corrupt fallback."""

import glob
import os

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from dsm_jax.checkpoint import Checkpointer, CorruptCheckpointWarning, load_params
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
