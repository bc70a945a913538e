"""Tests for dsm_jax.train: the train step, pmap equivalence, exact resume, faults, learning.

Multi-device and kill/resume tests run this file as a worker script in a
subprocess (``python tests/test_train.py MODE WORKDIR JSON``), with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` where several devices
are needed.
"""

import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsm_jax.checkpoint import Checkpointer, CorruptCheckpointWarning
from dsm_jax.distributions import GaussianMixture
from dsm_jax.models import NoiseConditionalMLP, UNet, init_params, make_score_fn
from dsm_jax.models import make_dsm_loss_fn as models_make_dsm_loss_fn
from dsm_jax.noise import geometric_sigmas
from dsm_jax.runlog import MetricsLogWarning, read_metrics, repair_metrics
from dsm_jax.train import (
    ConfigMismatchError,
    NonFiniteError,
    TrainingInterrupted,
    TrainingTerminated,
    create_train_state,
    learning_rate_schedule,
    make_dsm_loss_fn,
    make_multi_step,
    make_optimizer,
    make_train_step,
    train,
)

GMM = GaussianMixture(jnp.array([0.3, 0.7]), jnp.array([[2.0, 2.0], [-2.0, -1.0]]), jnp.full((2, 2), 0.25))
TRAIN_KW = dict(ema_decay=0.9, log_every=5, quiet=True)


def _toy(*, batch=16, width=16, depth=1, num_levels=4, nan_step=None, sleep=0.0, wrap_loss=None, signal_at=None):
    """(loss_fn, params, batch_at) for a tiny noise-conditional MLP on a 2-D mixture.

    ``signal_at=(step, signum)``: fetching the batch of that step sends the signal to this process.
    """
    data = np.asarray(GMM.sample(jax.random.key(0), 1024))

    def batch_at(step):
        if sleep:
            time.sleep(sleep)
        if signal_at is not None and step == signal_at[0]:
            os.kill(os.getpid(), signal_at[1])
        x = data[(step * batch + np.arange(batch)) % len(data)]
        if step == nan_step:
            x = x.copy()
            x[0, 0] = np.nan
        return x

    model = NoiseConditionalMLP(width=width, depth=depth)
    params = init_params(model, jax.random.key(1), data[:1])
    loss_fn = make_dsm_loss_fn(model, geometric_sigmas(3.0, 0.05, num_levels), scale_by_sigma=True)
    if wrap_loss is not None:
        loss_fn = wrap_loss(loss_fn)
    return loss_fn, params, batch_at


def _optimizer():
    return make_optimizer(3e-3, warmup_steps=2)


def _run(workdir, num_steps, *, toy=None, **kwargs):
    loss_fn, params, batch_at = toy if toy is not None else _toy()
    return train(
        loss_fn,
        params,
        batch_at,
        workdir=str(workdir),
        num_steps=num_steps,
        optimizer=_optimizer(),
        **{**TRAIN_KW, "save_every": 10, **kwargs},
    )


def _events(workdir, name):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("event") == name]


def _raw_step_records(workdir):
    """The steps of the step records of metrics.jsonl as written (every line must be JSON)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if "event" not in r]


def _tree_digest(directory):
    """{relative path: sha256 of the contents} of every file under ``directory``."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _worker_env(num_devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if num_devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    return env


def _worker_cmd(mode, workdir, **kwargs):
    return [sys.executable, os.path.abspath(__file__), mode, str(workdir), json.dumps(kwargs)]


def _run_worker(mode, workdir, *, num_devices=1, timeout=240, **kwargs):
    proc = subprocess.run(
        _worker_cmd(mode, workdir, **kwargs),
        env=_worker_env(num_devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for the worker")


def _logged_saves(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r["step"] for r in map(json.loads, f.read().splitlines()[:-1]) if r.get("event") == "save"]


def _logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r["step"] for r in map(json.loads, f.read().splitlines()[:-1]) if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """40 steps in one go: the reference for every resumed run."""
    return _run(tmp_path_factory.mktemp("reference"), 40)


# ---------------------------------------------------------------------------
# The train step
# ---------------------------------------------------------------------------


def test_train_step_one_step_by_hand():
    """One step equals Adam on the gradient of the mean loss, and the EMA formula."""
    loss_fn, params, batch_at = _toy(batch=4)
    opt = optax.adam(1e-2)
    state = create_train_state(params, opt)
    batch, key = batch_at(0), jax.random.key(7)
    new, metrics = jax.jit(make_train_step(loss_fn, opt, ema_decay=0.75))(state, batch, key)

    keys = [jax.random.fold_in(key, j) for j in range(batch.shape[0])]
    mean_loss = lambda p: jnp.mean(jnp.stack([loss_fn(p, batch[j : j + 1], keys[j])[0] for j in range(len(keys))]))
    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
    updates, _ = opt.update(grads, opt.init(params), params)
    expected = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(new.params, expected, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(
        new.ema_params, jax.tree.map(lambda p, q: 0.75 * p + 0.25 * q, params, expected), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    grad_norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-5)
    assert metrics["per_sigma_loss"].shape == (4,)
    assert int(new.step) == 1


@pytest.mark.parametrize("sigma_sampling", ["all", "stratified", "random", "log_uniform"])
def test_batched_keys_equal_the_per_example_vmap(sigma_sampling):
    """make_dsm_loss_fn's losses take the [B] keys at once: the same step as vmapping them example by example."""
    model = NoiseConditionalMLP(width=16, depth=1)
    x = np.asarray(GMM.sample(jax.random.key(0), 32))
    params = init_params(model, jax.random.key(1), x[:1])
    loss_fn = make_dsm_loss_fn(model, geometric_sigmas(3.0, 0.05, 4), sigma_sampling=sigma_sampling)
    assert loss_fn.accepts_key_batch
    plain = lambda p, b, k: loss_fn(p, b, k)  # no mark: the vmap path
    opt = optax.adam(1e-2)
    state = create_train_state(params, opt)
    key = jax.random.key(3)
    fast, m_fast = jax.jit(make_train_step(loss_fn, opt))(state, x, key)
    slow, m_slow = jax.jit(make_train_step(plain, opt))(state, x, key)
    chex.assert_trees_all_close(fast.params, slow.params, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m_fast["loss"], m_slow["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_fast["per_sigma_loss"], m_slow["per_sigma_loss"], rtol=1e-5)


def test_train_step_traces_once():
    loss_fn, params, batch_at = _toy()
    opt = _optimizer()
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(make_train_step(loss_fn, opt, ema_decay=0.9), n=1))
    state = create_train_state(params, opt)
    for s in range(20):
        state, _ = step(state, batch_at(s), jax.random.key(s))
    assert int(state.step) == 20


def test_driver_compiles_once(tmp_path):
    """Calls of k steps aligned with the save period: one trace of the loss for the whole run."""
    chex.clear_trace_counter()
    toy = _toy(wrap_loss=lambda f: chex.assert_max_traces(f, n=1))
    state = _run(tmp_path, 24, toy=toy, steps_per_call=4, save_every=8, log_every=3)
    assert int(state.step) == 24


def test_steps_per_call_matches_single_steps(tmp_path, uninterrupted):
    """k steps per device call (lax.scan), here with calls of 3 and 1 steps, gives the same run.

    Same arithmetic in a different compiled program: equal up to float32
    rounding (a few ulp per step, amplified at most ~1e3 over 40 Adam steps).
    """
    state = _run(tmp_path, 40, steps_per_call=3)
    chex.assert_trees_all_close(state.params, uninterrupted.params, rtol=1e-4, atol=1e-5)


def test_in_memory_training_writes_nothing_and_equals_a_workdir_run(tmp_path, monkeypatch, uninterrupted):
    """workdir=None: the same compiled calls on the same steps as with a work directory, bitwise; no files, no handlers."""
    monkeypatch.chdir(tmp_path)
    loss_fn, params, batch_at = _toy()
    handlers = []

    def watched(step):
        handlers.append(signal.getsignal(signal.SIGINT))
        return batch_at(step)

    state = train(loss_fn, params, watched, num_steps=40, optimizer=_optimizer(), **{**TRAIN_KW, "save_every": 10})
    chex.assert_trees_all_equal(state, uninterrupted)
    assert os.listdir(tmp_path) == []
    assert set(handlers) == {signal.default_int_handler}
    with pytest.raises(NonFiniteError, match=r"at step 3 .*training in memory, nothing was saved\.$"):
        train(*_toy(nan_step=3), num_steps=10, optimizer=_optimizer(), **TRAIN_KW)
    assert os.listdir(tmp_path) == []


def test_multi_step_scans_k_steps_and_runs_one_step_without_a_loop():
    """make_multi_step: k steps in a scan equal k single steps with the keys fold_in(base, step); k = 1 has no loop."""
    # A small quadratic loss with noise from the key: cheap to compile, and wrong keys would show.
    loss_fn = lambda p, b, k: jnp.mean((p["w"] * b - jax.random.normal(k, b.shape)) ** 2)
    params = {"w": jnp.ones((3,))}
    opt = optax.adam(0.1)
    step = make_train_step(loss_fn, opt, ema_decay=0.9)
    run_steps = make_multi_step(step)
    # From step 7: the keys follow state.step, not the position in the call.
    state, base = create_train_state(params, opt).replace(step=jnp.int32(7)), jax.random.key(5)
    batches = np.random.default_rng(0).standard_normal((3, 4, 3)).astype(np.float32)
    many, metrics = jax.jit(run_steps)(state, batches, base)
    one_by_one, jitted = state, jax.jit(step)
    for s in range(3):
        one_by_one, last = jitted(one_by_one, batches[s], jax.random.fold_in(base, 7 + s))
    chex.assert_trees_all_close(many, one_by_one, rtol=1e-6, atol=1e-7)
    assert metrics["loss"].shape == (3,) and int(many.step) == 10
    np.testing.assert_allclose(metrics["loss"][-1], last["loss"], rtol=1e-6)
    loops = ("scan", "while")
    assert any(p in str(jax.make_jaxpr(run_steps)(state, batches, base)) for p in loops)
    one = jax.make_jaxpr(run_steps)(state, batches[:1], base)
    assert not any(p in str(one) for p in loops)
    assert jax.eval_shape(run_steps, state, batches[:1], base)[1]["loss"].shape == (1,)
    with pytest.raises(ValueError, match="unroll must be .*got 0"):
        make_multi_step(step, unroll=0)


def test_the_key_batch_protocol_is_an_explicit_argument():
    """loss_takes_key_batch decides whether the loss sees the [B] keys at once; it overrides accepts_key_batch."""
    model_loss, params, batch_at = _toy(batch=8)
    shapes = []

    def loss(p, b, k):
        shapes.append((b.shape[0], k.shape))
        return model_loss(p, b, k)

    opt = optax.adam(1e-3)
    state = create_train_state(params, opt)
    run = lambda **kw: jax.eval_shape(make_train_step(loss, opt, **kw), state, batch_at(0), jax.random.key(0))
    run()  # unmarked: vmapped over examples, one key each
    run(loss_takes_key_batch=True)
    loss.accepts_key_batch = True
    run()  # the mark is read when the argument is absent
    run(loss_takes_key_batch=False)  # the argument wins
    assert shapes == [(1, ()), (8, (8,)), (8, (8,)), (1, ())]
    assert make_dsm_loss_fn is models_make_dsm_loss_fn and models_make_dsm_loss_fn.__module__ == "dsm_jax.models.apply"
    with pytest.raises(ValueError, match="loss_takes_key_batch must be True, False or None, got 'yes'"):
        make_train_step(loss, opt, loss_takes_key_batch="yes")


def test_dsm_jax_train_does_not_load_the_networks():
    code = (
        "import sys, dsm_jax.train as t; assert 'dsm_jax.models' not in sys.modules; "
        "from dsm_jax.train import make_dsm_loss_fn; assert 'dsm_jax.models' in sys.modules; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---------------------------------------------------------------------------
# Data parallelism
# ---------------------------------------------------------------------------


def _pmap_worker(workdir):
    devices = jax.local_devices()
    if len(devices) != 4:
        raise SystemExit(f"expected 4 devices, got {devices}")
    toy = _toy()
    four = _run(os.path.join(workdir, "four"), 10, toy=toy, devices=devices)
    one = _run(os.path.join(workdir, "one"), 10, toy=toy, devices=devices[:1])
    diff = lambda a, b: max(
        float(np.max(np.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=False)
    )
    loss_fn, params, batch_at = toy
    try:
        _run(os.path.join(workdir, "odd"), 1, toy=(loss_fn, params, lambda s: batch_at(s)[:14]), devices=devices)
        error = None
    except ValueError as err:
        error = str(err)
    print(
        json.dumps(
            {
                "params_diff": diff(four.params, one.params),
                "ema_diff": diff(four.ema_params, one.ema_params),
                "moved": diff(one.params, params),
                "steps": [int(four.step), int(one.step)],
                "error": error,
            }
        )
    )


def test_pmap_four_devices_match_one(tmp_path):
    out = json.loads(_run_worker("pmap", tmp_path, num_devices=4).strip().splitlines()[-1])
    print("pmap 4 vs 1 device, max abs param difference after 10 steps:", out)
    assert out["steps"] == [10, 10]
    # The same per-example keys and batch on 4 devices or 1: only the order of the
    # float32 reductions differs (mean of 4 partial means vs one mean), a few ulp of
    # the gradient per step; 10 Adam steps of size <= 3e-3 keep the parameters
    # within 1e-5 while they move by O(1e-2).
    assert out["moved"] > 1e-3
    assert out["params_diff"] < 1e-5
    assert out["ema_diff"] < 1e-5
    assert "divisible by num_devices=4" in out["error"]


# ---------------------------------------------------------------------------
# Resume, kills, signals, non-finite values
# ---------------------------------------------------------------------------


def test_resume_in_a_new_process_is_bitwise_exact(tmp_path, uninterrupted):
    _run(tmp_path, 20)
    _run_worker("train", tmp_path, num_steps=40)
    assert _events(tmp_path, "resume")[0]["step"] == 20
    with Checkpointer(os.path.join(tmp_path, "checkpoints")) as ckpt:
        resumed, meta = ckpt.restore(40, target=uninterrupted)
    assert meta["data_state"] == {"step": 40}
    chex.assert_trees_all_equal(resumed, uninterrupted)


class _CountingSource:
    """A stateful data source (next_batch / state / restore) over the same batches as ``batch_at``."""

    def __init__(self, batch_at):
        self.batch_at, self.position = batch_at, 0

    def next_batch(self):
        self.position += 1
        return self.batch_at(self.position - 1)

    def state(self):
        return {"position": self.position}

    def restore(self, state):
        self.position = state["position"]


def test_stateful_data_source_resumes_exactly(tmp_path, uninterrupted):
    loss_fn, params, batch_at = _toy()
    _run(tmp_path, 20, toy=(loss_fn, params, _CountingSource(batch_at)))
    state = _run(tmp_path, 40, toy=(loss_fn, params, _CountingSource(batch_at)))
    with Checkpointer(os.path.join(tmp_path, "checkpoints")) as ckpt:
        assert ckpt.restore(40)[1]["data_state"] == {"position": 40}
    chex.assert_trees_all_equal(state, uninterrupted)


def test_sigkill_mid_training_resumes_and_finishes(tmp_path, uninterrupted):
    """Killed after logging steps past its last checkpoint: the replayed steps are logged once, the end is bitwise."""
    proc = subprocess.Popen(
        _worker_cmd("train", tmp_path, num_steps=40, sleep=0.08), env=_worker_env(), stderr=subprocess.PIPE, text=True
    )
    # Saves every 10 steps, logs every 5: wait for the log of step 25 before the save of step 30.
    _wait_for(
        lambda: (
            any(s >= 20 for s in _logged_saves(tmp_path))
            and max(_logged_steps(tmp_path)) > max(_logged_saves(tmp_path))
        ),
        proc,
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    logged_before = _logged_steps(tmp_path)
    state = _run(tmp_path, 40)
    resumed_from = _events(tmp_path, "resume")[0]["step"]
    assert 20 <= resumed_from < max(logged_before) < 40, (resumed_from, logged_before)
    chex.assert_trees_all_equal(state, uninterrupted)
    expected = list(range(5, 41, 5))
    assert _raw_step_records(tmp_path) == expected  # replayed records dropped on resume, not duplicated
    assert [r["step"] for r in read_metrics(os.path.join(tmp_path, "metrics.jsonl"), events=False)] == expected


def test_a_partial_last_line_is_dropped_before_resuming(tmp_path):
    """A kill in the middle of a write leaves half a record; it is not glued to the resumed run's first record."""
    _run(tmp_path, 20)
    path = os.path.join(tmp_path, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 25, "loss": 0.29')
    with pytest.warns(MetricsLogWarning, match="partial last line"):
        _run(tmp_path, 30)
    assert _raw_step_records(tmp_path) == [5, 10, 15, 20, 25, 30]
    assert _events(tmp_path, "resume")[0]["step"] == 20


def test_read_metrics_skips_bad_lines_and_keeps_the_latest_record_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        '{"event": "start", "step": 0}',
        '{"step": 5, "loss": 1.0}',
        '{"step": 10, "loss": 0.9}',
        '{"step": 12, "loss": 0.8{"event": "resume", "step": 10}',
        '{"step": 15, "loss": 0.7}',
        '{"event": "resume", "step": 10}',
        '{"step": 15, "loss": 0.6}',
        "[1, 2]",
        "",
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(MetricsLogWarning, match=r"2 unreadable line\(s\) \(line 4, 8\)"):
        records = read_metrics(path)
    assert records == [
        {"event": "start", "step": 0},
        {"step": 5, "loss": 1.0},
        {"step": 10, "loss": 0.9},
        {"event": "resume", "step": 10},
        {"step": 15, "loss": 0.6},
    ]
    with pytest.warns(MetricsLogWarning):
        assert [r["loss"] for r in read_metrics(path, events=False)] == [1.0, 0.9, 0.6]
    with pytest.raises(ValueError, match="path"):
        read_metrics(tmp_path / "missing.jsonl")


def test_repair_metrics_keeps_events_and_unreadable_lines_and_rewrites_only_on_change(tmp_path):
    path = tmp_path / "metrics.jsonl"
    text = '{"step": 5, "loss": 1.0}\nnot json\n{"event": "save", "step": 10}\n{"step": 10, "loss": 0.9}\n'
    path.write_text(text)
    before = os.stat(path).st_mtime_ns, os.stat(path).st_ino
    assert repair_metrics(path, resume_step=10) == 0
    assert (os.stat(path).st_mtime_ns, os.stat(path).st_ino) == before
    assert repair_metrics(path, resume_step=5) == 1
    assert path.read_text() == '{"step": 5, "loss": 1.0}\nnot json\n{"event": "save", "step": 10}\n'
    path.write_text('{"step": 5, "loss": 1.0}\n{"step": 10, "loss": 0.9}')  # whole record, newline lost
    assert repair_metrics(path) == 0
    assert path.read_text() == '{"step": 5, "loss": 1.0}\n{"step": 10, "loss": 0.9}\n'
    assert repair_metrics(tmp_path / "missing.jsonl") == 0


def test_sigterm_saves_the_current_step(tmp_path):
    proc = subprocess.Popen(
        _worker_cmd("train", tmp_path, num_steps=100000, save_every=1000, sleep=0.02),
        env=_worker_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: any(s >= 15 for s in _logged_steps(tmp_path)), proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    stopped = _events(tmp_path, "interrupted")[0]["step"]
    assert 15 <= stopped < 1000
    with Checkpointer(os.path.join(tmp_path, "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [stopped]
        _, meta = ckpt.restore(stopped)
    assert meta["data_state"] == {"step": stopped}


@pytest.mark.parametrize("signum, kind", [(signal.SIGINT, TrainingInterrupted), (signal.SIGTERM, TrainingTerminated)])
def test_a_signal_raises_an_exception_naming_the_saved_step(tmp_path, signum, kind):
    """The signal arrives while step 7's batch is fetched: step 8 (the end of that call) is saved, then raised."""
    with pytest.raises(kind) as info:
        _run(tmp_path, 40, toy=_toy(signal_at=(7, signum)))
    err = info.value
    assert isinstance(err, KeyboardInterrupt if signum == signal.SIGINT else SystemExit)
    assert err.saved_step == 8 and err.checkpoint_dir == os.path.join(tmp_path, "checkpoints")
    assert err.message.endswith("at step 8; checkpoint saved")
    if signum == signal.SIGTERM:
        assert err.code == 143
    with Checkpointer(err.checkpoint_dir) as ckpt:
        assert ckpt.latest_step() == 8
    assert _events(tmp_path, "interrupted")[0] == {
        "event": "interrupted",
        "step": 8,
        "signal": signal.Signals(signum).name,
    }


def test_resuming_with_a_different_config_is_an_error(tmp_path):
    _run(tmp_path, 10, config={"lr": 0.003, "width": 16, "seed": 0})
    before = _tree_digest(tmp_path)
    with pytest.raises(
        ConfigMismatchError,
        match=r"config differs .* step 10 .*\(lr: 0.003 saved, 0.001 now; seed: 0 saved, "
        r"absent now; width: 16 saved, 32 now\)",
    ):
        _run(tmp_path, 20, config={"lr": 0.001, "width": 32})
    assert _tree_digest(tmp_path) == before  # nothing written, not even the log
    assert int(_run(tmp_path, 20, config={"lr": 0.003, "width": 16, "seed": 0}).step) == 20
    assert int(_run(tmp_path, 30).step) == 30  # no config given: nothing to compare


def test_a_field_added_since_the_checkpoint_resumes_at_its_default(tmp_path):
    """A run written before a config field existed resumes when the field has the value it had implicitly."""
    _run(tmp_path, 10, config={"lr": 0.003})
    defaults = {"lr": 0.001, "dtype": "float32"}
    state = _run(tmp_path, 20, config={"lr": 0.003, "dtype": "float32"}, config_defaults=defaults)
    assert int(state.step) == 20
    with pytest.raises(ConfigMismatchError, match=r"dtype: 'float32' saved, 'bfloat16' now"):
        _run(tmp_path, 30, config={"lr": 0.003, "dtype": "bfloat16"}, config_defaults=defaults)


def test_progress_lines_on_stdout_without_a_terminal(tmp_path, capsys):
    """Under pytest stderr is no terminal (no bar): one line per log interval, none with quiet=True."""
    _run(tmp_path / "a", 10, quiet=False)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines] == [["step", "5/10"], ["step", "10/10"]], out
    for line in lines:
        assert re.fullmatch(r"step \d+/10  loss [-+.\de]+  [\d.]+ steps/s  ETA \d+:\d\d:\d\d", line), line
    assert lines[-1].endswith("ETA 0:00:00") and err == ""
    _run(tmp_path / "b", 10, quiet=True)
    assert capsys.readouterr() == ("", "")


def _tensorboard_scalars(workdir):
    """``{tag: [(step, value)]}`` of the event files in ``workdir``, read record by record.

    An event file is a sequence of records ``[uint64 length][uint32 crc][data][uint32 crc]``
    whose data is an ``Event`` protocol buffer.
    """
    from tensorboardX.proto import event_pb2

    out = {}
    for name in sorted(os.listdir(workdir)):
        if not name.startswith("events.out.tfevents"):
            continue
        with open(os.path.join(workdir, name), "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboardX")
    lr = learning_rate_schedule(3e-3, warmup_steps=2)  # the rate of _optimizer()
    _run(tmp_path, 10, tensorboard=True, learning_rate_fn=lr)
    scalars = _tensorboard_scalars(tmp_path)
    records = [r for r in read_metrics(os.path.join(tmp_path, "metrics.jsonl")) if "loss" in r]
    assert [step for step, _ in scalars["loss"]] == [r["step"] for r in records] == [5, 10]
    np.testing.assert_allclose([v for _, v in scalars["loss"]], [r["loss"] for r in records], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in scalars["grad_norm"]], [r["grad_norm"] for r in records], rtol=1e-6)
    assert sorted(t for t in scalars if t.startswith("per_sigma_loss/")) == [f"per_sigma_loss/{i}" for i in range(4)]
    np.testing.assert_allclose([v for _, v in scalars["learning_rate"]], [float(lr(5)), float(lr(10))], rtol=1e-6)


def test_tensorboard_without_tensorboardx_warns_once_and_trains(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX raises ImportError
    with pytest.warns(RuntimeWarning, match="tensorboardX is not installed") as record:
        state = _run(tmp_path, 5, tensorboard=True)
    assert int(state.step) == 5 and len(record) == 1
    assert not [name for name in os.listdir(tmp_path) if name.startswith("events.")]
    with pytest.raises(ValueError, match="tensorboard=True needs a workdir"):
        train(lambda p, b, k: 0.0, {}, lambda s: None, num_steps=1, tensorboard=True)


def test_nan_in_data_names_the_step_and_keeps_checkpoints(tmp_path):
    toy = _toy(nan_step=13)
    _run(tmp_path, 10, toy=toy, save_every=5)
    before = _tree_digest(os.path.join(tmp_path, "checkpoints"))
    with pytest.raises(NonFiniteError, match=r"non-finite loss .* at step 13 .*last good checkpoint is step 10"):
        _run(tmp_path, 20, toy=toy, save_every=5)
    assert _tree_digest(os.path.join(tmp_path, "checkpoints")) == before
    assert _events(tmp_path, "nonfinite")[0]["step"] == 13


def test_nan_before_the_first_checkpoint_says_none_was_written(tmp_path):
    with pytest.raises(NonFiniteError, match=r"at step 3 .*no checkpoint was written yet\.$"):
        _run(tmp_path, 10, toy=_toy(nan_step=3), save_every=5)
    assert not os.listdir(os.path.join(tmp_path, "checkpoints"))


def test_corrupt_latest_checkpoint_falls_back_and_resumes_exactly(tmp_path):
    first = _run(tmp_path, 10, save_every=5)
    step_dir = os.path.join(tmp_path, "checkpoints", "10", "state")
    for root, _, files in os.walk(step_dir):
        for name in files:
            if os.path.basename(root) == "d":
                open(os.path.join(root, name), "wb").close()
    with pytest.warns(CorruptCheckpointWarning, match="step 10"):
        again = _run(tmp_path, 10, save_every=5)
    assert _events(tmp_path, "resume")[0]["step"] == 5
    chex.assert_trees_all_equal(again, first)


def test_bad_arguments_raise(tmp_path):
    loss_fn, params, batch_at = _toy()
    base = dict(workdir=str(tmp_path), num_steps=1, quiet=True)
    for kwargs, name in [
        (dict(num_steps=-1), "num_steps"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(steps_per_call=0), "steps_per_call"),
        (dict(save_every=0), "save_every"),
        (dict(config={"f": print}), "config"),
    ]:
        with pytest.raises(ValueError, match=name):
            train(loss_fn, params, batch_at, **{**base, **kwargs})
    with pytest.raises(ValueError, match="data"):
        train(loss_fn, params, 42, **base)
    with pytest.raises(ValueError, match="divisible"):
        train(loss_fn, params, lambda s: np.float32(1.0), **base)
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer(optimizer="sgd")
    with pytest.raises(ValueError, match="total_steps"):
        make_optimizer(warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="weight_decay"):
        make_optimizer(weight_decay=0.1)
    with pytest.raises(ValueError, match="ema_decay"):
        make_train_step(loss_fn, optax.adam(1e-3), ema_decay=-0.1)


def test_optimizer_schedule_and_weight_decay():
    """Adam's first update is -lr * g / (|g| + eps): zero at step 0 of a warmup; AdamW adds -lr * wd * p."""
    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.5, 0.5])}
    opt = make_optimizer(1e-2, warmup_steps=4, total_steps=20, grad_clip_norm=None)
    updates, _ = opt.update(g, opt.init(p), p)
    np.testing.assert_array_equal(updates["w"], jnp.zeros(2))
    opt = make_optimizer(1e-2, optimizer="adamw", weight_decay=0.1, grad_clip_norm=None)
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, g), opt.init(p), p)
    np.testing.assert_allclose(updates["w"], -1e-2 * 0.1 * p["w"], rtol=1e-6)


# ---------------------------------------------------------------------------
# Learning works
# ---------------------------------------------------------------------------


def _relative_fisher(model, params, sigmas, n=2000):
    """mean over sigma of E_{q_sigma}|s_theta - grad log q_sigma|^2 / E_{q_sigma}|grad log q_sigma|^2."""
    score_fn = jax.jit(make_score_fn(model, params, scale_by_sigma=True))
    values = []
    for i, sigma in enumerate(np.asarray(sigmas)):
        noised = GMM.convolve(float(sigma))
        x = noised.sample(jax.random.key(1000 + i), n)
        exact = noised.score(x)
        err = jnp.mean(jnp.sum((score_fn(x, float(sigma)) - exact) ** 2, axis=-1))
        values.append(float(err / jnp.mean(jnp.sum(exact**2, axis=-1))))
    return float(np.mean(values)), values


def test_learning_reduces_the_fisher_divergence(tmp_path):
    """Multi-scale DSM on a 2-D mixture: a short run learns the noised scores.

    The untrained model (zero output layer) has relative Fisher divergence
    exactly 1. We require an order of magnitude less after 1500 steps. The
    Monte-Carlo error of each ratio (2000 samples) is a few percent of its
    value, far from deciding the comparison.
    """
    sigmas = geometric_sigmas(3.0, 0.05, 10)
    model = NoiseConditionalMLP(width=64, depth=2)
    data = np.asarray(GMM.sample(jax.random.key(0), 100_000))
    params = init_params(model, jax.random.key(1), data[:1])
    loss_fn = make_dsm_loss_fn(model, sigmas, scale_by_sigma=True)
    batch = 128
    state = train(
        loss_fn,
        params,
        lambda s: data[(s * batch + np.arange(batch)) % len(data)],
        workdir=str(tmp_path),
        num_steps=1500,
        steps_per_call=10,
        save_every=1500,
        log_every=500,
        optimizer=make_optimizer(2e-3, warmup_steps=100, total_steps=1500),
        ema_decay=0.99,
        quiet=True,
    )
    untrained, _ = _relative_fisher(model, params, sigmas)
    trained, per_sigma = _relative_fisher(model, state.params, sigmas)
    ema, _ = _relative_fisher(model, state.ema_params, sigmas)
    rates = [r["steps_per_sec"] for r in map(json.loads, open(os.path.join(tmp_path, "metrics.jsonl"))) if "loss" in r]
    print(
        f"relative Fisher divergence: untrained {untrained:.4f}, trained {trained:.4f}, EMA {ema:.4f}; "
        f"per sigma {np.round(per_sigma, 4).tolist()}; steps/s per log interval {np.round(rates, 1).tolist()}"
    )
    np.testing.assert_allclose(untrained, 1.0, rtol=1e-6)
    assert trained < 0.1 * untrained
    assert ema < 0.1 * untrained


# ---------------------------------------------------------------------------
# Worker entry point
# ---------------------------------------------------------------------------

if __name__ == "__main__":
    _mode, _workdir, _kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if _mode == "pmap":
        _pmap_worker(_workdir)
    elif _mode == "train":
        _sleep = _kwargs.pop("sleep", 0.0)
        _run(_workdir, toy=_toy(sleep=_sleep), **_kwargs)
    else:
        raise SystemExit(f"unknown mode {_mode!r}")


def _bf16_run(dtype, seed, num_steps=100):
    """(initial loss, final loss, final state, model) of the default toy (eight Gaussians) trained in memory.

    A small MLP (width 32, depth 1), batch 64; the losses are the training loss on 2048 fixed points
    with fixed keys, each model evaluated in its own compute dtype.
    """
    from dsm_jax.config import Config
    from dsm_jax.run import build_run

    cfg = Config(seed=seed, dtype=dtype, width=32, depth=1, num_train=2048, num_test=256)
    run = build_run(cfg)
    data = run.dataset.train
    params = init_params(run.model, jax.random.key(seed), jnp.asarray(data[:1]))
    loss_fn = models_make_dsm_loss_fn(run.model, jnp.asarray(run.sigmas))
    state = train(
        loss_fn,
        params,
        lambda s: data[(s * 64 + np.arange(64)) % len(data)],
        num_steps=num_steps,
        optimizer=make_optimizer(cfg.learning_rate, warmup_steps=cfg.warmup_steps),
        seed=seed,
        steps_per_call=50,
        quiet=True,
    )
    keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.key(123), j))(jnp.arange(2048))
    evaluate = jax.jit(lambda p: loss_fn(p, jnp.asarray(data[:2048]), keys)[0])
    return float(evaluate(params)), float(evaluate(jax.tree.map(jnp.asarray, state.params))), state, run.model


def _matmul_input_dtypes(jaxpr) -> list:
    """The input dtypes of every matrix product and convolution of a jaxpr, nested calls included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            out.extend(str(v.aval.dtype) for v in eqn.invars)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                out.extend(_matmul_input_dtypes(inner))
    return out


@pytest.mark.parametrize("model", [NoiseConditionalMLP(width=32, depth=1), UNet(channels=8, channel_mults=(1, 2))])
def test_bfloat16_networks_compute_in_bf16_with_float32_parameters_and_output(model):
    """Under dtype=bfloat16 every matmul and convolution takes bf16 inputs, the parameters are float32
    (the same tree as float32's) and the output is float32; traced, not compiled."""
    x = jnp.zeros((4, 2) if isinstance(model, NoiseConditionalMLP) else (4, 8, 8, 1))
    sigma = jnp.full((4,), 0.5)
    bf16 = model.clone(dtype=jnp.bfloat16)
    params = jax.eval_shape(lambda k: bf16.init(k, x, sigma)["params"], jax.random.key(0))
    assert {a.dtype for a in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.eval_shape(lambda k: model.init(k, x, sigma)["params"], jax.random.key(0))
    )
    closed = jax.make_jaxpr(lambda p: bf16.apply({"params": p}, x, sigma))(params)
    dtypes = _matmul_input_dtypes(closed.jaxpr)
    assert len(dtypes) > 4 and set(dtypes) == {"bfloat16"}, dtypes
    assert closed.out_avals[0].dtype == jnp.float32
    assert set(_matmul_input_dtypes(jax.make_jaxpr(lambda p: model.apply({"params": p}, x, sigma))(params).jaxpr)) == {
        "float32"
    }


def test_bfloat16_mlp_output_is_a_bf16_rounding_from_float32():
    mlp = NoiseConditionalMLP(width=32, depth=1, zero_init_output=False)
    x, sigma = jax.random.normal(jax.random.key(0), (4, 2)), jnp.full((4,), 0.5)
    params = init_params(mlp, jax.random.key(1), x[:1])
    out_32 = jax.jit(mlp.apply)({"params": params}, x, sigma)
    out_16 = jax.jit(mlp.clone(dtype=jnp.bfloat16).apply)({"params": params}, x, sigma)
    rel = float(jnp.linalg.norm(out_16 - out_32) / jnp.linalg.norm(out_32))
    assert 1e-4 < rel < 5e-2, rel  # bf16 keeps 8 significant bits: relative rounding ~4e-3 per operation


@pytest.mark.slow
def test_bfloat16_trains_the_default_toy_like_float32():
    """``dtype=bfloat16`` trains the default toy as float32 does; parameters and optimizer state stay float32.

    Tolerance, measured in this setting (100 steps; seeds 0, 1, 2; the test runs seed 0): the loss
    decrease under bf16 was within 4.7e-5, 1.8e-4 and 1.1e-4 (relative) of the float32 decrease, the
    final losses within 1.1e-5, 4.0e-5 and 2.6e-5, and the two networks' outputs at the same
    parameters 3e-3 to 5e-3 apart. The bounds are about 5x the largest measured. (The loss includes
    the irreducible DSM variance, so the decrease is the sharper comparison.) 13 to 60 s on the shared 2 cores.
    """
    (l0_32, lf_32, _, _), (l0_16, lf_16, state_16, _) = (_bf16_run(dtype, seed=0) for dtype in ("float32", "bfloat16"))
    assert {a.dtype for a in jax.tree.leaves((state_16.params, state_16.ema_params))} == {np.dtype(np.float32)}
    assert {a.dtype for a in jax.tree.leaves(state_16.opt_state)} <= {np.dtype(np.float32), np.dtype(np.int32)}
    assert l0_32 - lf_32 > 0.1  # it trained
    assert abs((l0_16 - lf_16) / (l0_32 - lf_32) - 1.0) < 1e-3
    assert abs(lf_16 - lf_32) / lf_32 < 2e-4


def test_runtime_checks_are_reported_with_the_step(tmp_path):
    """Under dsm_jax.debug_checks() the losses' checkify checks reach the driver: named, with the steps."""
    import dsm_jax

    model = NoiseConditionalMLP(width=16, depth=1)
    x = np.random.default_rng(0).normal(size=(16, 2)).astype(np.float32)
    params = init_params(model, jax.random.key(0), jnp.asarray(x[:1]))
    batch_at = lambda s: np.full_like(x, np.nan) if s == 3 else x  # noqa: E731
    with dsm_jax.debug_checks():
        loss_fn = make_dsm_loss_fn(model, np.array([1.0, 0.5, 0.1], np.float32), sigma_sampling="all")
        with pytest.raises(ValueError, match=r"run-time check failed in steps 3-3 .*x must be finite"):
            train(loss_fn, params, batch_at, workdir=tmp_path, num_steps=6, save_every=100, quiet=True)
        # without the NaN batch the checked run trains as usual
        state = train(loss_fn, params, lambda s: x, workdir=tmp_path / "ok", num_steps=4, save_every=100, quiet=True)
    assert int(state.step) == 4
