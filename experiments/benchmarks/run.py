"""Benchmarks: dsm_jax against the PyTorch reference and the machine's matmul peak.

``python experiments/benchmarks/run.py [--quick] [--only NAME] [--repeats N]``
prints a table and writes ``experiments/benchmarks/results.json`` (``--only``:
``results_<NAME>.json``; ``--quick``: tiny sizes under
``experiments/results/quick/benchmarks/``, numbers that test the harness, not
the library).

Method. Each comparison is measured as a ratio within one run: after warm-up
(compilation included there), the contenders are called in turn, the order
rotated every repetition, each measurement averaging enough calls to last
about ``--target-ms``; medians over the repetitions are reported and the
ratio is of the medians. PyTorch (eager, the seeds' code, see
``torch_reference.py``) and XLA both run on the same cores
(``torch.set_num_threads(len(cores))``; XLA's CPU client uses one thread per
core). Without PyTorch the reference columns are skipped.

Every network is the seeds' noise-conditional MLP (sigma embedded by
``Linear(1, H) -> SiLU -> Linear(H, H)``, concatenated with ``x``, then
``num_layers`` linear layers of width ``H = 256`` with SiLU), in Flax for
dsm_jax, with the PyTorch reference's initial weights when PyTorch is there.

Comparisons (``--only`` names):

* ``dsm_step``: multi-scale DSM training step (log-uniform sigma, sigma^2
  weighting, Adam): dsm_jax (one step per call and ``k`` steps per call)
  against the PyTorch reference, d in {2, 64}, batch in {128, 2048}.
* ``multiscale``: loss and gradient of multi-scale DSM with every example
  at all L = 10 levels: ``jax.vmap`` over sigma (the library) against a
  Python loop over sigma (jitted JAX and eager PyTorch).
* ``explicit_sm``: explicit score-matching training step with the exact
  trace, d in {16, 64, 256}: the library's jvp trace (its default
  ``chunk_size="auto"``, the whole basis, chunks of d/4) against
  ``jax.jacfwd`` + trace and the PyTorch autograd loop.
* ``langevin``: annealed Langevin, 10 levels x 100 steps, batch 64 and
  1024: the library's ``lax.scan`` against the PyTorch Python loop.
* ``flops``: achieved matmul FLOP/s of the DSM training step at batch 2048
  as a fraction of the measured fp32 GEMM rate (jnp.dot and torch.mm of
  2048 x 2048, in the same run).
* ``memory``: peak memory of the exact trace at d = 3072 with and without
  chunking, from the compiled executables' ``memory_analysis()``.
* ``dim_scaling``: sliced-SM and DSM step time at d = 1024 over d = 2.

Layout: this file holds the sizes, the table of comparisons and the command
line; ``harness.py`` the timing, compilation, rows, ratios, targets and
tables; ``seed_mlp.py`` the network, its FLOP count and the PyTorch loader;
one ``bench_*.py`` per topic (``dsm_step``; ``multiscale``; ``trace``:
``explicit_sm`` and ``memory``; ``langevin``; ``flops``: ``flops`` and
``dim_scaling``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
for _p in (BENCH_DIR, BENCH_DIR.parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from _common import RESULTS_DIR, parse_args, save_results, write_atomic  # noqa: E402  (imports dsm_jax first)
from bench_dsm_step import bench_dsm_step  # noqa: E402
from bench_flops import bench_dim_scaling, bench_flops  # noqa: E402
from bench_langevin import bench_langevin  # noqa: E402
from bench_multiscale import bench_multiscale  # noqa: E402
from bench_trace import bench_explicit_sm, bench_memory  # noqa: E402
from harness import Bench, add_peak_fractions, check_targets, format_table, markdown_tables  # noqa: E402
from seed_mlp import load_torch  # noqa: E402

FULL = dict(
    hidden=256,
    layers=4,
    target_ms=200.0,
    repeats=7,
    dsm_dims=(2, 64),
    dsm_batches=(128, 2048),
    steps_per_call=10,
    ms_dim=64,
    ms_batches=(128, 1024),
    ms_levels=10,
    esm_dims=(16, 64, 256),
    esm_batch=128,
    ld_dim=2,
    ld_batches=(64, 1024),
    ld_levels=10,
    ld_steps=100,
    ld_eps=2e-5,
    flops_batch=2048,
    flops_dims=(2, 64),
    gemm_n=2048,
    mem_dim=3072,
    mem_batch=16,
    mem_chunk=128,
    scaling_dims=(2, 1024),
    scaling_batch=128,
)
QUICK = dict(
    hidden=32,
    layers=3,
    target_ms=2.0,
    repeats=1,
    dsm_dims=(2,),
    dsm_batches=(16,),
    steps_per_call=3,
    ms_dim=4,
    ms_batches=(16,),
    ms_levels=3,
    esm_dims=(4,),
    esm_batch=8,
    ld_dim=2,
    ld_batches=(8,),
    ld_levels=2,
    ld_steps=5,
    ld_eps=2e-5,
    flops_batch=16,
    flops_dims=(2,),
    gemm_n=128,
    mem_dim=64,
    mem_batch=4,
    mem_chunk=16,
    scaling_dims=(2, 16),
    scaling_batch=16,
)
# Quick mode compiles without backend optimisations: its numbers test the harness, they are not results.
QUICK_COMPILER_OPTIONS = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)

BENCHMARKS = {
    "dsm_step": bench_dsm_step,
    "multiscale": bench_multiscale,
    "explicit_sm": bench_explicit_sm,
    "langevin": bench_langevin,
    "flops": bench_flops,
    "memory": bench_memory,
    "dim_scaling": bench_dim_scaling,
}


def main(argv: list | None = None) -> dict:
    args = parse_args(
        __doc__.splitlines()[0],
        argv,
        only=(str, None, f"run one comparison: {', '.join(BENCHMARKS)}"),
        repeats=(int, None, "repetitions per measurement (default 7; 1 with --quick)"),
        target_ms=(float, None, "duration of one measurement in ms (default 200; 2 with --quick)"),
    )
    if args.only is not None and args.only not in BENCHMARKS:
        raise SystemExit(f"--only must be one of {', '.join(BENCHMARKS)}, got {args.only!r}")
    if args.out == RESULTS_DIR:  # full runs are this directory's results
        args.out = BENCH_DIR
    elif args.out == RESULTS_DIR / "quick":
        args.out = RESULTS_DIR / "quick" / "benchmarks"
        args.out.mkdir(parents=True, exist_ok=True)
    cfg = dict(QUICK if args.quick else FULL)
    repeats = args.repeats or cfg["repeats"]
    if args.target_ms is not None:
        cfg["target_ms"] = args.target_ms
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    tref = load_torch(cores)
    bench = Bench(cfg, tref, repeats, QUICK_COMPILER_OPTIONS if args.quick else None)

    results = {}
    for name, run_one in BENCHMARKS.items():
        if args.only in (None, name):
            t0 = time.perf_counter()
            results[name] = run_one(bench)
            print(f"[{name}: {time.perf_counter() - t0:.1f}s]", flush=True)
    add_peak_fractions(results)
    targets = check_targets(results)
    print(format_table(results, targets))
    settings = {
        **cfg,
        "repeats": repeats,
        "cores": cores,
        "torch": None if tref is None else tref[0].__version__,
        "torch_threads": None if tref is None else tref[0].get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    stem = "results" if args.only is None else f"results_{args.only}"
    save_results(args, stem, {"benchmarks": results, "targets": targets}, settings)
    write_atomic(Path(args.out) / f"{stem}.md", markdown_tables(results, targets))
    return {"benchmarks": results, "targets": targets}


if __name__ == "__main__":
    main()
