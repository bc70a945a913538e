"""Faults a careful user meets, against the command line (issue 12).

Locks and concurrent writers, ``--overwrite`` with the same or another
config and with files no run wrote, ``--workdir .``, SIGINT and SIGTERM while
training and while sampling, a full and a read-only disk, and every user
mistake as one line with exit status 2. Signals, a second live process and
XLA flags need subprocesses (each ~5-10 s); everything else calls
``cli.main`` in this process.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _tiny import tiny_sets

from dsm_jax import cli
from dsm_jax import run as run_lib
from dsm_jax import workdir as workdir_lib
from dsm_jax.interrupt import call_interruptibly

ROOT = Path(__file__).resolve().parents[1]
# Sampling long enough (4 x 3000 steps of 2000 samples, several seconds) for a signal to land inside it.
TINY = [
    "--dataset",
    "two_clusters",
    "--quiet",
    *tiny_sets(save_every=10, num_samples=2000, steps_per_sigma=3000),
]
# Signals must reach the sampler within this; the sampler alone runs longer (checked below).
PROMPT_SECONDS = 3.0


def _train_argv(workdir, *extra, steps=20):
    return ["train", "--workdir", str(workdir), "--num-steps", str(steps), *TINY, *extra]


def _snapshot(directory: Path) -> dict:
    """``{relative path: sha256}`` of every file below ``directory`` (directories as None)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = os.fspath(path.relative_to(directory))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return out


def _one_line_error(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    assert lines[0].startswith("dsm-jax"), lines[0]
    return lines[0]


def _checkpoint_steps(workdir: Path) -> list:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _events(workdir: Path) -> list:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if '"event"' in line]


def _spawn(argv, extra_env=None) -> subprocess.Popen:
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    env.update(extra_env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "dsm_jax", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if needle in line:
            return
        assert time.monotonic() < deadline, f"no {needle!r} line in time"
    proc.wait(timeout=30)
    pytest.fail(f"the process ended (status {proc.returncode}) before printing {needle!r}: {proc.stderr.read()}")


def _wait_for_training(proc: subprocess.Popen, workdir: Path, timeout: float = 120.0) -> None:
    """Until the training loop has logged a loss (the driver's signal handlers are then installed)."""
    deadline = time.monotonic() + timeout
    log = workdir / "metrics.jsonl"
    while not (log.exists() and '"loss"' in log.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start in time"
        time.sleep(0.1)


def _signal_and_wait(proc: subprocess.Popen, sig: int):
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, time.monotonic() - t0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained 20-step run (checkpoints at 10 and 20), not sampled yet."""
    workdir = tmp_path_factory.mktemp("faults") / "run"
    assert cli.main(_train_argv(workdir, "--no-sample")) == 0
    return workdir


@pytest.fixture
def run_copy(run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(run, workdir)
    return workdir


# ---------------------------------------------------------------------------
# Signals (subprocesses)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("command, sig, status", [("evaluate", signal.SIGINT, 130), ("sample", signal.SIGTERM, 143)])
def test_a_signal_while_sampling_exits_at_once_and_leaves_the_run_intact(run, command, sig, status):
    before = _snapshot(run)
    proc = _spawn([command, "--workdir", str(run)])
    _wait_for_line(proc, "sampling")
    time.sleep(0.5)  # inside the compiled sampler by now
    code, err, seconds = _signal_and_wait(proc, sig)
    assert code == status, err  # was -11 (SIGSEGV) for SIGINT, or the sampler ran to its end first
    line = _one_line_error(err)
    assert "interrupted while sampling" in line and "checkpointed" not in line
    assert seconds < PROMPT_SECONDS, seconds
    assert _snapshot(run) == before  # nothing half-written, no temporaries, no lock left behind


def test_sigint_while_training_checkpoints_resumes_and_a_second_writer_is_refused(tmp_path, capsys):
    workdir = tmp_path / "w"
    proc = _spawn(_train_argv(workdir, "--set", "save_every=100000", steps=100000))
    try:
        _wait_for_training(proc, workdir)
        held = (workdir / workdir_lib.LOCK_NAME).read_text()
        assert json.loads(held)["pid"] == proc.pid
        # While it runs: another train, an --overwrite with another config and an evaluate are all refused.
        config_before = (workdir / "config.json").read_bytes()
        for argv in (
            _train_argv(workdir, "--no-sample"),
            _train_argv(workdir, "--no-sample", "--overwrite", "--set", "width=48"),
            ["evaluate", "--workdir", str(workdir)],
        ):
            capsys.readouterr()
            assert cli.main(argv) == cli.EXIT_USER_ERROR
            line = _one_line_error(capsys.readouterr().err)
            assert "in use by" in line and f"pid {proc.pid}" in line, line
        assert (workdir / "config.json").read_bytes() == config_before
        code, err, _ = _signal_and_wait(proc, signal.SIGINT)
    finally:
        proc.kill()
    assert code == 130, err
    line = _one_line_error(err)
    steps = _checkpoint_steps(workdir)
    assert len(steps) == 1 and f"at step {steps[0]}, which was checkpointed" in line, (line, steps)
    assert not (workdir / workdir_lib.LOCK_NAME).exists()
    assert cli.main(_train_argv(workdir, "--no-sample", steps=steps[0] + 10)) == 0
    assert {"event": "resume", "step": steps[0], "num_devices": 1, "parallel": "pmap"} in _events(workdir)


def test_sigterm_while_training_checkpoints_and_says_so(tmp_path):
    workdir = tmp_path / "w"
    proc = _spawn(_train_argv(workdir, "--set", "save_every=100000", steps=100000))
    try:
        _wait_for_training(proc, workdir)
        code, err, _ = _signal_and_wait(proc, signal.SIGTERM)
    finally:
        proc.kill()
    assert code == 143, err  # was 143 with nothing printed
    steps = _checkpoint_steps(workdir)
    assert len(steps) == 1 and f"interrupted (SIGTERM) at step {steps[0]}, which was checkpointed" in _one_line_error(
        err
    )
    assert _events(workdir)[-1] == {"event": "interrupted", "step": steps[0], "signal": "SIGTERM"}


@pytest.mark.slow
def test_sigint_while_train_samples_keeps_the_trained_run(tmp_path):
    workdir = tmp_path / "w"
    proc = _spawn(_train_argv(workdir))
    try:
        _wait_for_line(proc, "sampling")
        time.sleep(0.5)
        before = _snapshot(workdir)
        code, err, seconds = _signal_and_wait(proc, signal.SIGINT)
    finally:
        proc.kill()
    assert code == 130, err
    line = _one_line_error(err)
    assert "interrupted while sampling" in line and "trained checkpoints are kept" in line
    assert seconds < PROMPT_SECONDS, seconds
    assert _snapshot(workdir) == {k: v for k, v in before.items() if k != workdir_lib.LOCK_NAME}
    assert _checkpoint_steps(workdir) == [10, 20] and not (workdir / "samples.npz").exists()


def test_a_late_error_under_overwrite_deletes_nothing_and_writes_no_config(run_copy, tmp_path):
    # Three devices do not divide the batch of 64: the old run must survive --overwrite, and a new
    # directory must not get a config.json that would make the corrected command refuse it.
    before = _snapshot(run_copy)
    fresh = tmp_path / "fresh"
    script = (
        "from dsm_jax import cli; import sys; "
        f"a = cli.main({_train_argv(run_copy, '--overwrite', '--set', 'width=48')!r}); "
        f"b = cli.main({_train_argv(fresh)!r}); print('STATUS', a, b)"
    )
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
        XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=3").strip(),
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "STATUS 2 2" in proc.stdout, proc.stdout + proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 2 and all("divisible by the 3 devices" in e for e in errors), proc.stderr
    assert _snapshot(run_copy) == before
    assert not fresh.exists()


# ---------------------------------------------------------------------------
# --overwrite and the work directory (in process)
# ---------------------------------------------------------------------------


def test_overwrite_with_the_same_config_resumes_and_keeps_everything(run_copy, capsys):
    (run_copy / "my_analysis.txt").write_text("keep me")
    capsys.readouterr()
    assert cli.main(_train_argv(run_copy, "--overwrite", "--no-sample", steps=30)) == 0
    out = capsys.readouterr().out
    assert "same training config; resuming it (nothing deleted)" in out and "resuming in" in out
    assert (run_copy / "my_analysis.txt").read_text() == "keep me"
    assert _checkpoint_steps(run_copy)[-1] == 30 and {
        "event": "resume",
        "step": 20,
        "num_devices": 1,
        "parallel": "pmap",
    } in _events(run_copy)


def test_overwrite_with_another_config_refuses_foreign_files_then_deletes_only_run_files(run_copy, capsys):
    (run_copy / "my_analysis.txt").write_text("keep me")
    before = _snapshot(run_copy)
    capsys.readouterr()
    argv = _train_argv(run_copy, "--overwrite", "--no-sample", "--set", "width=48", steps=10)
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    line = _one_line_error(capsys.readouterr().err)
    assert "my_analysis.txt" in line and "nothing was deleted" in line
    assert _snapshot(run_copy) == before
    (run_copy / "my_analysis.txt").unlink()
    assert cli.main(argv) == 0
    assert json.loads((run_copy / "config.json").read_text())["config"]["width"] == 48
    assert _checkpoint_steps(run_copy) == [10]  # the old run's 10 and 20 are gone
    assert {e["event"] for e in _events(run_copy)} == {"start", "save", "done"}


def test_workdir_dot_never_removes_the_current_directory(run_copy, monkeypatch, capsys):
    (run_copy / "notes.txt").write_text("mine")
    monkeypatch.chdir(run_copy)
    capsys.readouterr()
    argv = _train_argv(".", "--overwrite", "--no-sample", "--set", "width=48", steps=10)
    assert cli.main(argv) == cli.EXIT_USER_ERROR  # was: the directory emptied, then a traceback
    assert "notes.txt" in _one_line_error(capsys.readouterr().err)
    (run_copy / "notes.txt").unlink()
    monkeypatch.chdir(run_copy / "checkpoints")
    assert cli.main(_train_argv("..", "--overwrite", "--no-sample", "--set", "width=48", steps=10)) == 2
    assert "current directory" in _one_line_error(capsys.readouterr().err)
    monkeypatch.chdir(run_copy)
    assert cli.main(argv) == 0
    assert Path.cwd() == run_copy.resolve() and _checkpoint_steps(run_copy) == [10]


def test_a_run_that_never_checkpointed_does_not_block_another_config(tmp_path, capsys):
    # What an interrupted or failed start leaves: config.json and no checkpoint.
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"config": {"width": 64}, "resolved": {}}))
    assert cli.main(_train_argv(workdir, "--no-sample", steps=10)) == 0
    assert "has a different config and no checkpoint" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# Interrupt messages and the exit-status rule (in process)
# ---------------------------------------------------------------------------


def _raiser(exc):
    def fn(*args, **kwargs):
        raise exc

    return fn


def _terminated_at_step_20(*args, workdir, **kwargs):
    from dsm_jax.train import TrainingTerminated

    raise TrainingTerminated(20, os.path.join(workdir, "checkpoints"))  # what train() raises once it saved


@pytest.mark.parametrize(
    "target, fake, status, needle",
    [
        (
            "dsm_jax.run.build_run",
            _raiser(KeyboardInterrupt()),
            130,
            "interrupted (SIGINT) before anything was changed",
        ),
        ("dsm_jax.train.train", _raiser(KeyboardInterrupt()), 130, "interrupted (SIGINT) before the first checkpoint"),
        (
            "dsm_jax.train.train",
            _terminated_at_step_20,
            143,
            "interrupted (SIGTERM) at step 20, which was checkpointed",
        ),
    ],
)
def test_interrupt_messages_say_what_was_kept(target, fake, status, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(target, fake)
    workdir = tmp_path / "w"
    capsys.readouterr()
    assert cli.main(_train_argv(workdir, "--no-sample")) == status
    line = _one_line_error(capsys.readouterr().err)
    assert needle in line, line
    assert ("which was checkpointed" in line) == (status == 143)
    if target.endswith("build_run"):
        assert not workdir.exists()


def test_internal_errors_keep_their_traceback(run_copy, monkeypatch):
    # A ValueError raised once the work has started is a bug, not a user mistake: it propagates
    # (traceback, exit status 1) instead of being shortened to one line with status 2.
    monkeypatch.setattr("dsm_jax.train.train", _raiser(ValueError("an internal inconsistency")))
    with pytest.raises(ValueError, match="internal inconsistency"):
        cli.main(_train_argv(run_copy, "--no-sample"))
    monkeypatch.setattr("dsm_jax.run.build_run", _raiser(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["evaluate", "--workdir", str(run_copy)])


# ---------------------------------------------------------------------------
# Full and read-only disks (tmpfs; skipped where it cannot be mounted)
# ---------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    mount = tmp_path / "mnt"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line(tmpfs, capsys):
    # The default width (175k parameters, ~2.8 MB per checkpoint) does not fit in 3 MB.
    workdir = tmpfs / "w"
    capsys.readouterr()
    status = cli.main(_train_argv(workdir, "--no-sample", "--set", "width=128", "--set", "depth=3"))
    assert status == cli.EXIT_USER_ERROR  # was a traceback (orbax's ValueError RESOURCE_EXHAUSTED)
    line = _one_line_error(capsys.readouterr().err)
    assert "No space left on device" in line and str(workdir) in line, line
    assert not (workdir / workdir_lib.LOCK_NAME).exists()


def test_a_read_only_directory_is_one_line(tmpfs, run, capsys):
    shutil.copytree(run, tmpfs / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    before = _snapshot(tmpfs / "run")
    for argv, path in (
        (["evaluate", "--workdir", str(tmpfs / "run")], tmpfs / "run"),
        (_train_argv(tmpfs / "run", steps=30), tmpfs / "run"),
        (_train_argv(tmpfs / "new"), tmpfs / "new"),
    ):
        capsys.readouterr()
        assert cli.main(argv) == cli.EXIT_USER_ERROR
        line = _one_line_error(capsys.readouterr().err)
        assert "Read-only file system" in line and repr(str(path)) in line, line
    assert _snapshot(tmpfs / "run") == before


# ---------------------------------------------------------------------------
# Every user mistake: one line, exit status 2 (in process)
# ---------------------------------------------------------------------------


def _bad_inputs(tmp: Path, run: Path) -> dict:
    """The files the table below refers to."""
    (tmp / "a_file").write_text("x")
    np.savetxt(tmp / "text.npy", np.zeros((20, 2)))
    (tmp / "dir.npy").mkdir()
    np.save(tmp / "tiny.npy", np.random.RandomState(0).randn(8, 2).astype(np.float32))
    np.save(tmp / "huge.npy", (1e30 * np.random.RandomState(0).randn(500, 2)).astype(np.float32))
    np.save(tmp / "noisy.npy", np.zeros((4, 2), np.float32))
    edited = tmp / "edited"
    shutil.copytree(run, edited)
    saved = json.loads((edited / "config.json").read_text())
    saved["config"]["width"] = 48
    (edited / "config.json").write_text(json.dumps(saved))
    return {"T": str(tmp), "RUN": str(run)}


USER_ERRORS = [
    # (argv with {T} the test's directory and {RUN} a trained run, words of the expected line)
    (["train", "--workdir", "{T}/a_file"], "is a file, not a directory"),
    (["train", "--workdir", "{T}/a_file/sub", "{TINY}"], "Not a directory"),
    (["sample", "--workdir", "{RUN}", "--num", "-5"], "--num: must be a positive integer"),
    (["sample", "--workdir", "{RUN}", "--num", "0"], "--num: must be a positive integer"),
    (["sample", "--workdir", "{RUN}", "--seed", "-3"], "--seed: must be an integer >= 0"),
    (["train", "--seed", "-1"], "--seed: must be an integer >= 0"),
    (
        ["denoise", "--workdir", "{RUN}", "--input", "{T}/noisy.npy", "--sigma", "0.1", "--output", "{T}/dir.npy"],
        "is a directory",
    ),
    (["sample", "--workdir", "{T}/edited", "--num", "16"], "does not match the run's checkpoint"),
    (["train", "--workdir", "{T}/w", "--dataset", "{T}/text.npy"], "it is not a .npy file (np.save)"),
    (["train", "--workdir", "{T}/w", "--dataset", "{T}/dir.npy"], "is a directory, not a .npy/.npz file"),
    (["train", "--workdir", "{T}/w", "--dataset", "{T}/huge.npy"], "overflow float32"),
    (["train", "--workdir", "{T}/w", "--dataset", "{T}/tiny.npy", "--set", "batch_size=4"], "held-out examples of 8"),
    (["train", "--workdir", "{T}/w", "--set", "num_test=0"], "leaves 0 held-out examples"),
    (["train", "--workdir", "{T}/w", "--set", "num_sigmas=1"], "num_sigmas=1 cannot work"),
]


@pytest.mark.parametrize("argv, needle", USER_ERRORS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in USER_ERRORS])
def test_every_user_mistake_is_one_line_and_exit_2(argv, needle, run, tmp_path, capsys):
    names = _bad_inputs(tmp_path, run)
    argv = [b for a in argv for b in (TINY if a == "{TINY}" else [a.format(**names)])]
    capsys.readouterr()
    try:
        status = cli.main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        status = exit_info.code
    assert status == cli.EXIT_USER_ERROR
    assert needle in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_a_checkpoint_of_another_training_config_is_a_user_error(run_copy, capsys):
    # config.json edited to agree with the new command: the checkpoint's own config still differs.
    saved = json.loads((run_copy / "config.json").read_text())
    saved["config"]["learning_rate"] = 5e-4
    (run_copy / "config.json").write_text(json.dumps(saved))
    before = _snapshot(run_copy / "checkpoints")
    capsys.readouterr()
    assert cli.main(_train_argv(run_copy, "--no-sample", "--set", "learning_rate=5e-4", steps=30)) == 2
    line = _one_line_error(capsys.readouterr().err)  # was a traceback once train() made it a ValueError
    assert "learning_rate" in line and "resuming would mix two runs" in line
    assert _snapshot(run_copy / "checkpoints") == before


def test_samples_that_all_diverged_are_reported_as_such(run_copy, monkeypatch, capsys):
    def diverged(run, params, key, num, sampler, **kwargs):
        return np.full((num,) + run.dataset.shape, np.nan, np.float32), 1

    monkeypatch.setattr(run_lib, "draw_samples", diverged)
    before = _snapshot(run_copy)
    capsys.readouterr()
    assert cli.main(["sample", "--workdir", str(run_copy), "--num", "16"]) == cli.EXIT_USER_ERROR
    line = _one_line_error(capsys.readouterr().err)
    assert "diverged" in line and "step_lr" in line and "shape (0, 2)" not in line
    assert _snapshot(run_copy) == before


# ---------------------------------------------------------------------------
# dsm_jax.workdir and dsm_jax.interrupt
# ---------------------------------------------------------------------------


def _hold_lock_in_another_process(directory: Path) -> subprocess.Popen:
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from dsm_jax.workdir import WorkdirLock; "
        "WorkdirLock(sys.argv[1], command='train').acquire(); print('held', flush=True); time.sleep(600)"
    )
    # dsm_jax/__init__ imports JAX; load workdir.py alone so this helper starts in a fraction of a second.
    code = code.replace(
        "from dsm_jax.workdir import WorkdirLock",
        "import importlib.util as u; s = u.spec_from_file_location('w', sys.argv[2] + "
        "'/dsm_jax/workdir.py'); m = u.module_from_spec(s); s.loader.exec_module(m); "
        "WorkdirLock = m.WorkdirLock",
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory), str(ROOT)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_lock_names_a_live_holder_and_a_dead_one_does_not_block(tmp_path):
    holder = _hold_lock_in_another_process(tmp_path)
    try:
        with pytest.raises(workdir_lib.WorkdirLocked, match=f"pid {holder.pid} on host .* \\(dsm-jax train"):
            workdir_lib.WorkdirLock(tmp_path, command="sample").acquire()
    finally:
        holder.kill()  # like kill -9: the lock file stays, with the dead pid in it
        holder.wait()
    assert json.loads((tmp_path / workdir_lib.LOCK_NAME).read_text())["pid"] == holder.pid
    with workdir_lib.WorkdirLock(tmp_path, command="sample") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(workdir_lib.WorkdirLocked):  # a second lock in the same process is refused too
            workdir_lib.WorkdirLock(tmp_path, command="train").acquire()
    assert not (tmp_path / workdir_lib.LOCK_NAME).exists()


def test_denoise_locks_the_run_only_when_it_writes_there(run_copy, tmp_path, capsys):
    np.save(tmp_path / "noisy.npy", np.zeros((4, 2), np.float32))
    argv = ["denoise", "--workdir", str(run_copy), "--input", str(tmp_path / "noisy.npy"), "--sigma", "0.1", "--output"]
    holder = _hold_lock_in_another_process(run_copy)
    try:
        capsys.readouterr()
        assert cli.main(argv + [str(run_copy / "clean.npy")]) == cli.EXIT_USER_ERROR
        assert f"in use by pid {holder.pid}" in _one_line_error(capsys.readouterr().err)
        assert cli.main(argv + [str(tmp_path / "clean.npy")]) == 0  # reading beside a live writer is safe
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "clean.npy").exists() and not (run_copy / "clean.npy").exists()


def test_clear_run_files_deletes_only_what_a_run_writes(tmp_path, monkeypatch):
    run_names = [
        "checkpoints",
        "config.json",
        "metrics.jsonl",
        "metrics.json",
        "samples.npz",
        "samples.png",
        "samples_em_n32_seed0.npz",
        "samples_em_n32_seed0_metrics.json",
        "eval_ode_n32_seed0.json",
        "eval_ode_n32_seed0.npz",
        "score_field.png",
        "losses.png",
        ".metrics.json.tmp123.json",
    ]
    for name in run_names:
        (tmp_path / name).mkdir() if name == "checkpoints" else (tmp_path / name).write_text('{"config": {}}')
    (tmp_path / "checkpoints" / "20").mkdir()
    (tmp_path / "report.txt").write_text("mine")
    (tmp_path / "figures").mkdir()
    with pytest.raises(ValueError, match="figures, report.txt"):
        workdir_lib.clear_run_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(run_names + ["report.txt", "figures"])
    (tmp_path / "report.txt").unlink()
    (tmp_path / "figures").rmdir()
    monkeypatch.chdir(tmp_path / "checkpoints" / "20")
    with pytest.raises(ValueError, match="current directory"):
        workdir_lib.clear_run_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert workdir_lib.clear_run_files(tmp_path) == sorted(run_names)
    assert tmp_path.is_dir() and not any(tmp_path.iterdir())
    (tmp_path / "config.json").write_text("a user's own config")  # not a dsm-jax config: foreign
    assert workdir_lib.foreign_entries(tmp_path) == ["config.json"]


def test_call_interruptibly_returns_and_raises_like_a_call():
    assert call_interruptibly(lambda: 42, message="unused") == 42
    with pytest.raises(ZeroDivisionError):
        call_interruptibly(lambda: 1 / 0, message="unused")
