"""Shared plumbing of the experiment scripts: arguments, quick mode, results, timing, fitting.

Every study is ``python experiments/<study>.py [--quick] [--out DIR]``. Quick
mode (``--quick`` or the environment variable ``DSM_JAX_QUICK=1``, the switch
the notebooks use too) shrinks every budget so the test suite can run the
script end to end in seconds; its numbers are not results. Full runs write
``<out>/<study>.json`` (numbers, settings, machine, date) and PNG figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

import dsm_jax  # noqa: F401  (XLA CPU workaround before the first computation)
from dsm_jax import runlog

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def quick_from_env() -> bool:
    """True when ``DSM_JAX_QUICK`` is set to 1/true/yes."""
    return os.environ.get("DSM_JAX_QUICK", "").strip().lower() in ("1", "true", "yes")


def parse_args(description: str, argv: list | None = None, **extra) -> argparse.Namespace:
    """``--quick`` and ``--out`` (plus ``extra`` as ``name=(type, default, help)``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny budgets, for the tests (also DSM_JAX_QUICK=1)")
    parser.add_argument("--out", type=Path, default=None, help=f"results directory (default {RESULTS_DIR})")
    parser.add_argument("--seed", type=int, default=0)
    for name, (typ, default, help_) in extra.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=typ, default=default, help=help_)
    args = parser.parse_args(argv)
    args.quick = args.quick or quick_from_env()
    if args.out is None:
        args.out = RESULTS_DIR / "quick" if args.quick else RESULTS_DIR
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def machine_info() -> dict:
    """The machine and versions a result was measured on."""
    import flax
    import optax

    return {
        "date": datetime.date.today().isoformat(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
    }


def _to_builtin(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_builtin(v) for v in obj]
    if isinstance(obj, (np.ndarray, jax.Array)):
        return _to_builtin(np.asarray(obj).tolist())
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def save_results(args: argparse.Namespace, name: str, results: dict, settings: dict) -> Path:
    """Writes ``<out>/<name>.json`` atomically (a temporary file, then a rename)."""
    payload = {
        "study": name,
        "quick": bool(args.quick),
        "seed": args.seed,
        "settings": settings,
        "results": results,
        "machine": machine_info(),
    }
    path = Path(args.out) / f"{name}.json"
    write_atomic(path, json.dumps(_to_builtin(payload), indent=2) + "\n")
    print(f"wrote {path}")
    return path


def write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename: an earlier file is never half-overwritten."""
    runlog.write_atomic(path, lambda tmp: tmp.write_text(text))


def save_figure(fig, args: argparse.Namespace, name: str) -> Path:
    """Saves a matplotlib figure as ``<out>/<name>.png``."""
    path = Path(args.out) / f"{name}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    print(f"wrote {path}")
    return path


def block(tree: Any) -> Any:
    """Waits for every array in ``tree``."""
    return jax.block_until_ready(tree)


def median_time(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time in seconds of ``fn()`` (blocked) after ``warmup`` calls."""
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def fit(
    loss_fn: Callable,
    params: Any,
    batch_at: Callable[[int], Any],
    *,
    num_steps: int,
    learning_rate: float = 1e-3,
    seed: int = 0,
    ema_decay: float = 0.999,
    steps_per_call: int | None = None,
    time_budget: float | None = None,
    grad_clip_norm: float | None = 1.0,
) -> tuple:
    """In-memory training on one device with the library's loop (:func:`dsm_jax.train.make_multi_step`).

    ``loss_fn(params, batch, key) -> loss`` or ``(loss, aux)``; ``batch_at(step)``
    returns the batch of a step; the step keys are those of
    :func:`dsm_jax.train.train` with this ``seed``. ``steps_per_call`` steps
    run in one jitted call (default: 50, or 1 for convolutional models, which
    XLA's CPU backend runs much slower inside a loop). Stops after ``num_steps``
    or, with ``time_budget`` seconds, at the first call boundary past the
    budget (compilation excluded); this clock is why it is not
    ``train(workdir=None)``.

    Returns:
        ``(state, info)`` with ``info = {"steps", "seconds", "losses"}``
        (``losses`` the mean loss of each call).
    """
    from dsm_jax.train import create_train_state, make_multi_step, make_optimizer, make_train_step

    optimizer = make_optimizer(learning_rate, grad_clip_norm=grad_clip_norm)
    state = create_train_state(params, optimizer)
    base = jax.random.key(seed)
    run = jax.jit(make_multi_step(make_train_step(loss_fn, optimizer, ema_decay=ema_decay)))

    if steps_per_call is None:
        jaxpr = str(jax.make_jaxpr(loss_fn)(params, batch_at(0), base))
        steps_per_call = 1 if "conv_general_dilated" in jaxpr else 50

    def batches_for(start, n):
        return jax.tree.map(lambda *b: np.stack(b), *[batch_at(s) for s in range(start, start + n)])

    k = max(1, min(steps_per_call, num_steps))
    block(run(state, batches_for(0, k), base))  # compile outside the clock
    losses, step, t0 = [], 0, time.perf_counter()
    while step < num_steps:
        n = min(k, num_steps - step)
        state, metrics = run(state, batches_for(step, n), base)
        losses.append(float(np.mean(np.asarray(metrics["loss"]))))
        step += n
        if time_budget is not None and time.perf_counter() - t0 > time_budget:
            break
    block(state)
    return state, {"steps": step, "seconds": time.perf_counter() - t0, "losses": losses}
