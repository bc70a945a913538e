"""The two data-parallel backends of dsm_jax.train: pmap and jit over a device Mesh.

Each device count is one subprocess (``python tests/test_sharding.py N
WORKDIR``) run with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
that runs every case of that count and writes its results to
``WORKDIR/result_N.npz``; the tests compare them:

* both backends on 1, 2 and 4 devices give the parameters of 1-device pmap
  after 10 steps (the same per-example keys and batches; only the order of
  the float32 reductions of the gradient differs);
* runs checkpointed at step 5 on 4 devices (under each backend) resume on 2,
  under the same and the other backend, and end where the uninterrupted run does;
* on 2 devices a sharding run stopped at step 5 and resumed is bitwise the
  uninterrupted one (step-indexed batches and keys);
* a sharded checkpoint loads as host arrays in a 1-device process.
"""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsm_jax.checkpoint import load_params
from dsm_jax.distributions import GaussianMixture
from dsm_jax.models import NoiseConditionalMLP, init_params
from dsm_jax.noise import geometric_sigmas
from dsm_jax.train import make_dsm_loss_fn, make_optimizer, train

NUM_STEPS = 10
BACKENDS = ("pmap", "sharding")
# The 4-device run's checkpoints at step 5 and the backend each is resumed under on 2 devices.
RESUMES = {
    "sharding4": ("sharding", "sharding"),
    "sharding4_to_pmap": ("sharding", "pmap"),
    "pmap4": ("pmap", "sharding"),
}


def _toy():
    """(loss_fn, params, batch_at) of a tiny noise-conditional MLP on a 2-D mixture, batch 16."""
    gmm = GaussianMixture(jnp.array([0.3, 0.7]), jnp.array([[2.0, 2.0], [-2.0, -1.0]]), jnp.full((2, 2), 0.25))
    data = np.asarray(gmm.sample(jax.random.key(0), 512))
    model = NoiseConditionalMLP(width=16, depth=1)
    params = init_params(model, jax.random.key(1), data[:1])
    loss_fn = make_dsm_loss_fn(model, geometric_sigmas(3.0, 0.05, 4), scale_by_sigma=True)
    return loss_fn, params, lambda step: data[(step * 16 + np.arange(16)) % len(data)]


def _train(toy, parallel, num_steps, workdir=None, **kwargs):
    loss_fn, params, batch_at = toy
    kw = dict(optimizer=make_optimizer(3e-3, warmup_steps=2), ema_decay=0.9, steps_per_call=5, save_every=5)
    return train(
        loss_fn, params, batch_at, num_steps=num_steps, workdir=workdir, parallel=parallel, quiet=True, **kw, **kwargs
    )


def _flat(state) -> np.ndarray:
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves((state.params, state.ema_params))])


def _worker(num_devices: int, workdir: str) -> None:
    """Runs the cases of ``num_devices`` devices; writes ``result_<num_devices>.npz``."""
    if jax.device_count() != num_devices:
        raise SystemExit(f"expected {num_devices} devices, got {jax.devices()}")
    toy = _toy()
    out = {}
    for backend in BACKENDS:
        start = time.perf_counter()
        out[backend] = _flat(_train(toy, backend, NUM_STEPS))
        print(f"{backend} {num_devices}: {time.perf_counter() - start:.2f} s", file=sys.stderr)
    if num_devices == 4:
        for name, (saved_under, _) in RESUMES.items():
            _train(toy, saved_under, 5, os.path.join(workdir, name))
    if num_devices == 2:
        for name, (_, resumed_under) in RESUMES.items():
            out[f"resumed_{name}"] = _flat(_train(toy, resumed_under, NUM_STEPS, os.path.join(workdir, name)))
        _train(toy, "sharding", 5, os.path.join(workdir, "stopped"))
        out["stopped_resumed"] = _flat(_train(toy, "sharding", NUM_STEPS, os.path.join(workdir, "stopped")))
    out["initial"] = np.concatenate([np.ravel(a) for a in jax.tree.leaves(toy[1])] * 2)
    np.savez(os.path.join(workdir, f"result_{num_devices}.npz"), **out)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """``{num_devices: npz}`` from one subprocess per device count (4 first: 2 resumes its checkpoints)."""
    workdir = tmp_path_factory.mktemp("sharding")
    out = {}
    for n in (4, 2, 1):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), str(n), str(workdir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[n] = dict(np.load(os.path.join(workdir, f"result_{n}.npz")))
    out["workdir"] = workdir
    return out


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(a - b)))


@pytest.mark.parametrize("num_devices", [1, 2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_and_device_counts_give_the_same_parameters(results, backend, num_devices):
    """10 Adam steps (size <= 3e-3) move the parameters by O(1e-2); the backends and device counts
    differ only in float32 reduction order, measured at most a few 1e-8 (printed)."""
    reference = results[1]["pmap"]
    got = results[num_devices][backend]
    same_count = _max_diff(got, results[num_devices]["pmap"])
    print(
        f"{backend} on {num_devices} device(s): max abs difference from 1-device pmap {_max_diff(got, reference):.2e}, from pmap on {num_devices}: {same_count:.2e}"
    )
    assert _max_diff(reference, results[1]["initial"]) > 1e-3
    assert _max_diff(got, reference) < 1e-6


@pytest.mark.parametrize("name", sorted(RESUMES))
def test_a_run_checkpointed_on_four_devices_resumes_on_two(results, name):
    saved_under, resumed_under = RESUMES[name]
    got = results[2][f"resumed_{name}"]
    print(
        f"saved on 4 ({saved_under}), resumed on 2 ({resumed_under}): max abs difference {_max_diff(got, results[1]['pmap']):.2e}"
    )
    assert _max_diff(got, results[1]["pmap"]) < 1e-6
    with open(os.path.join(results["workdir"], name, "metrics.jsonl")) as f:
        events = [r for r in map(json.loads, f) if r.get("event") in ("start", "resume")]
    assert [(e["event"], e["step"], e["num_devices"], e["parallel"]) for e in events] == [
        ("start", 0, 4, saved_under),
        ("resume", 5, 2, resumed_under),
    ]


def test_sharding_resume_is_bitwise_exact(results):
    """Stopped at step 5 and resumed on the same 2 devices: bitwise the uninterrupted (in-memory) run."""
    np.testing.assert_array_equal(results[2]["stopped_resumed"], results[2]["sharding"])


def test_load_params_reads_a_sharded_checkpoint_on_one_device(results):
    """A checkpoint written by the sharding backend (on 2 devices, resumed from 4) loads as host arrays here."""
    params = load_params(os.path.join(results["workdir"], "sharding4", "checkpoints"), ema=False)
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(params))
    flat = np.concatenate([np.ravel(a) for a in jax.tree.leaves(params)])
    np.testing.assert_array_equal(flat, results[2]["resumed_sharding4"][: flat.size])


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match=r"parallel must be one of \['pmap', 'sharding'\], got 'pjit'"):
        train(lambda p, b, k: 0.0, {}, lambda s: None, num_steps=1, parallel="pjit")


def test_the_config_field_names_the_backends_of_train():
    from dsm_jax import config as config_lib
    from dsm_jax import train as train_lib

    assert config_lib.PARALLEL == train_lib.PARALLEL
    assert "parallel" in config_lib.NON_TRAINING_FIELDS  # a run may resume under the other backend
    with pytest.raises(ValueError, match="parallel must be one of pmap, sharding; got 'pjit'"):
        config_lib.Config(parallel="pjit")


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2])
