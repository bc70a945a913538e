"""Fault injection: training processes killed (SIGKILL) at chosen and at random moments, then resumed.

Whatever the moment of the kill (a step, a log write, inside orbax's write
of a checkpoint, between orbax's commit and the checksum manifest), the run
resumed to the end must equal an uninterrupted one bitwise, with one step
record per step in ``metrics.jsonl`` and no temporary directory left.

Workers run this file as a script (``python tests/test_train_faults.py
WORKDIR JSON``), on the toy problem of ``tests/test_train.py``. A worker
told to ``hang`` in its n-th save writes a marker file at that point and
sleeps, so the test can kill it exactly there.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import chex
import numpy as np
import pytest
from test_train import _raw_step_records, _run, _toy, _wait_for, _worker_env

from dsm_jax.checkpoint import CorruptCheckpointWarning
from dsm_jax.runlog import MetricsLogWarning

NUM_STEPS = 40  # save every 10, log every 5 (test_train's settings)


def _start_worker(workdir, **kwargs):
    cmd = [sys.executable, os.path.abspath(__file__), str(workdir), json.dumps(kwargs)]
    return subprocess.Popen(cmd, env=_worker_env(), stderr=subprocess.PIPE, text=True)


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.returncode


def _orbax_temporaries(workdir):
    return glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*"))


def _run_starts(workdir):
    """The steps of the start and resume events logged so far (complete lines only)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")[:-1]
    return [r["step"] for r in map(json.loads, lines) if r.get("event") in ("start", "resume")]


def _check_resumed_run(workdir, twin):
    """Resumes in this process to the end: bitwise the twin, one step record per step, no leftovers."""
    state = _run(workdir, NUM_STEPS)
    chex.assert_trees_all_equal(state, twin)
    assert _raw_step_records(workdir) == list(range(5, NUM_STEPS + 1, 5))
    assert not _orbax_temporaries(workdir)


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("twin"), NUM_STEPS)


def test_kill_inside_a_checkpoint_write_resumes_exactly(tmp_path, twin):
    """Killed while orbax writes the checkpoint of step 20: step 10 is restored, the half-written one removed."""
    workdir, marker = tmp_path / "run", tmp_path / "hanging"
    proc = _start_worker(workdir, num_steps=NUM_STEPS, hang=["orbax", 2], marker=str(marker))
    _wait_for(marker.exists, proc)
    assert _orbax_temporaries(workdir), "expected orbax's temporary directory of the save in progress"
    _kill(proc)
    assert json.loads(marker.read_text())["step"] == 20
    _check_resumed_run(workdir, twin)
    with open(workdir / "metrics.jsonl") as f:
        resumes = [r["step"] for r in map(json.loads, f) if r.get("event") == "resume"]
    assert resumes == [10]


@pytest.mark.slow
def test_kills_at_random_moments_resume_exactly(tmp_path, twin):
    """Six workers in a row on one run, each killed at a random moment or inside a random save.

    The moments come from a fixed seed: a delay after the worker starts or
    resumes (a step, a log write or a save, wherever it lands), or a hang
    inside orbax's write or before the manifest of the worker's first or
    second save.
    """
    rng = np.random.default_rng(20261201)
    workdir = tmp_path / "run"
    faults = []
    for i in range(6):
        kind = rng.choice(["time", "orbax", "manifest"])
        marker = tmp_path / f"hanging{i}"
        if kind == "time":
            delay = float(rng.uniform(0.0, 1.5))
            started = len(_run_starts(workdir))
            proc = _start_worker(workdir, num_steps=NUM_STEPS, sleep=0.03)
            _wait_for(lambda: len(_run_starts(workdir)) > started or proc.poll() is not None, proc, timeout=180)
            time.sleep(delay)
            where = f"{delay:.2f} s after its start or resume"
        else:
            nth = int(rng.integers(1, 3))
            proc = _start_worker(workdir, num_steps=NUM_STEPS, sleep=0.03, hang=[kind, nth], marker=str(marker))
            _wait_for(lambda: marker.exists() or proc.poll() is not None, proc, timeout=180)
            where = f"in save {nth} ({kind})"
        if proc.poll() is None:
            _kill(proc)
            faults.append(f"killed {where}")
        else:
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            faults.append(f"finished before the kill {where}")
    print("faults:", faults, "; runs started at steps", _run_starts(workdir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check_resumed_run(workdir, twin)
    # A worker killed before its last manifest or mid-log leaves work for the final resume: only these warnings.
    assert {w.category for w in caught} <= {CorruptCheckpointWarning, MetricsLogWarning}, caught


# ---------------------------------------------------------------------------
# Worker entry point
# ---------------------------------------------------------------------------


def _hang(marker, step):
    with open(marker + ".tmp", "w") as f:
        json.dump({"step": step, "pid": os.getpid()}, f)
    os.replace(marker + ".tmp", marker)
    time.sleep(600)


def _install_hang(kind, nth, marker):
    """Makes the ``nth`` save of this process hang inside orbax's write or just before the manifest."""
    from orbax.checkpoint._src.handlers.json_checkpoint_handler import JsonCheckpointHandler

    import dsm_jax.checkpoint as checkpoint

    saves = []
    if kind == "orbax":
        original = JsonCheckpointHandler._save_fn

        async def save_meta(self, item, directory):  # the meta item, written inside orbax's temporary directory
            saves.append(item["step"])
            if len(saves) == nth:
                _hang(marker, item["step"])
            return await original(self, item, directory)

        JsonCheckpointHandler._save_fn = save_meta
    elif kind == "manifest":
        original = checkpoint._write_manifest

        def write_manifest(step_dir):  # orbax has committed the step, the manifest is not written yet
            saves.append(int(os.path.basename(step_dir)))
            if len(saves) == nth:
                _hang(marker, saves[-1])
            original(step_dir)

        checkpoint._write_manifest = write_manifest
    else:
        raise SystemExit(f"unknown hang {kind!r}")


if __name__ == "__main__":
    _workdir, _kwargs = sys.argv[1], json.loads(sys.argv[2])
    if "hang" in _kwargs:
        _install_hang(*_kwargs.pop("hang"), _kwargs.pop("marker"))
    _run(_workdir, toy=_toy(sleep=_kwargs.pop("sleep", 0.0)), **_kwargs)
