"""Where the time of a benchmarked workload goes, per XLA operation (how RESULTS.md's profiles were taken).

``python experiments/benchmarks/profile_ops.py dsm_step --batch 2048 --dim 2``
runs the workload a few times under ``jax.profiler.trace`` with XLA's CPU
thunks instrumented (``--xla_cpu_enable_xprof_traceme``), then prints the
operations with the largest total time per call (fusions, dots, copies, while
loops) from the Perfetto trace. Traced durations include the tracer's overhead
and overlap when XLA runs independent thunks concurrently: read them as
shares, not as absolute times. Workloads: ``dsm_step`` (the library's DSM
train step), ``explicit_sm`` (its explicit SM step), ``langevin`` (annealed
Langevin, 10 x 100 steps), ``multiscale`` (the L = 10 loss and gradient),
``unet_step`` (the U-Net step of ``bench_unet_torch.py``; ``--dim`` is the
number of its size, 1 to 3, ``--batch`` the batch).
"""

from __future__ import annotations

import os

if "xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import run  # noqa: E402  (the benchmarks' sizes; sets the import path and imports dsm_jax first)
from bench_dsm_step import jax_dsm_step, library_train_step  # noqa: E402
from harness import Bench  # noqa: E402
from seed_mlp import SIGMA_MAX, SIGMA_MIN, Net, data, keys  # noqa: E402

from dsm_jax.losses import explicit_score_matching_loss, multiscale_dsm_loss  # noqa: E402
from dsm_jax.noise import geometric_sigmas  # noqa: E402
from dsm_jax.samplers import annealed_langevin  # noqa: E402

WORKLOADS = ("dsm_step", "explicit_sm", "langevin", "multiscale", "unet_step")


def workload(name: str, dim: int, batch: int):
    """A blocking ``fn()`` running one call of the workload, on the benchmarks' network and full sizes."""
    b = Bench(dict(run.FULL), None, repeats=1)
    if name == "unet_step":
        return _unet_step(b, dim, batch)
    cfg = b.cfg
    net = Net(dim, cfg, None)
    x = jnp.asarray(data(dim, batch))
    if name == "dsm_step":
        step, state = jax_dsm_step(b, net)
        return b.stepper(step, state, [(x, k) for k in keys()])
    if name == "explicit_sm":
        loss = lambda p, x, k: explicit_score_matching_loss(net.score_fn(p), x)
        step, state = library_train_step(loss, net.params)
        return b.stepper(step, state, [(x, jax.random.key(0))])
    if name == "langevin":
        sigmas = geometric_sigmas(1.0, SIGMA_MIN, cfg["ld_levels"])
        sample = jax.jit(
            lambda p, x, k: annealed_langevin(
                net.model_fn(p),
                x,
                k,
                sigmas,
                steps_per_sigma=cfg["ld_steps"],
                step_lr=cfg["ld_eps"],
                final_denoise=False,
            )
        )
        return b.blocking(sample, net.params, x, jax.random.key(0))
    sigmas = geometric_sigmas(SIGMA_MAX, SIGMA_MIN, cfg["ms_levels"])
    grad = jax.jit(
        jax.value_and_grad(
            lambda p, x, k: multiscale_dsm_loss(net.model_fn(p), x, sigmas, k, weighting="sigma2", sigma_sampling="all")
        )
    )
    return b.blocking(grad, net.params, x, jax.random.key(0))


def _unet_step(b: Bench, index: int, batch: int):
    import bench_unet_torch as unet

    from dsm_jax.models import UNet, init_params
    from dsm_jax.train import create_train_state

    _, spec, size, cin, _, _ = unet.SIZES[index - 1]
    model = UNet(**spec)
    x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
    state = create_train_state(init_params(model, jax.random.key(0), x), unet.optax.adam(unet.LEARNING_RATE))
    return b.stepper(unet.jax_functions(model, 1)["step"], state, [(x, k) for k in keys()])


def top_operations(trace_dir: Path, calls: int, top: int) -> list:
    """``[(name, ms per call, count per call)]`` of the XLA operations in the newest trace, largest first."""
    files = sorted(trace_dir.glob("**/*.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {trace_dir}.")
    events = json.load(gzip.open(files[-1]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        # Complete events of XLA operations; Python frames ($...) and the executor's own spans are skipped.
        if e.get("ph") == "X" and not name.startswith("$") and "::" not in name and "(" not in name:
            total[name] += e.get("dur", 0)
            count[name] += 1
    return [(n, t / 1e3 / calls, count[n] / calls) for n, t in total.most_common(top)]


def main(argv: list | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=WORKLOADS)
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--calls", type=int, default=5, help="traced calls (after 3 untraced warm-up calls)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--trace-dir", type=Path, default=None, help="keep the trace here (default: a temporary directory)"
    )
    args = parser.parse_args(argv)
    for name in ("dim", "batch", "calls", "top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    fn = workload(args.workload, args.dim, args.batch)
    for _ in range(3):
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = args.trace_dir or Path(tmp)
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            for _ in range(args.calls):
                fn()
        rows = top_operations(trace_dir, args.calls, args.top)
    print(f"{args.workload}, d={args.dim}, batch {args.batch}: XLA operations by traced time per call")
    for name, ms, n in rows:
        print(f"  {ms:9.3f} ms  x{n:6.0f}  {name}")
    return rows


if __name__ == "__main__":
    main()
