"""The benchmark harness: timing in turn, compilation with the run's options, rows, ratios, targets, tables.

Every comparison (the ``bench_*.py`` files) is a function ``bench(b)`` of a
:class:`Bench`, which carries the sizes, the optional PyTorch reference, the
timing settings and the compilation caches of one run: no module state, so
two runs in one process (the tests) do not share options or caches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# (comparison, setting pattern, ratio name, target, "min" (ratio >= target) or "max" (<=), what)
TARGETS = [
    ("dsm_step", "B=128", "torch/jax", 1.5, "min", "DSM step vs PyTorch at batch 128"),
    ("dsm_step", "B=128", "torch/jax_k_per_call", 1.5, "min", "DSM step vs PyTorch at batch 128, k steps per call"),
    ("dsm_step", "B=2048", "torch/jax", 1.4, "min", "DSM step vs PyTorch at batch 2048"),
    ("dsm_step", "B=2048", "torch/jax_k_per_call", 1.4, "min", "DSM step vs PyTorch at batch 2048, k steps per call"),
    ("flops", "", "fraction_of_peak", 0.75, "min", "DSM step at batch 2048, share of the fp32 GEMM rate"),
    ("langevin", "B=64", "torch/jax", 2.0, "min", "annealed Langevin vs PyTorch at batch 64"),
    ("langevin", "B=1024", "torch/jax", 1.5, "min", "annealed Langevin vs PyTorch at batch 1024"),
    ("explicit_sm", "", "torch/jvp", 2.0, "min", "exact-trace SM step vs the autograd loop"),
    ("dim_scaling", "", "t(d_max)/t(d_min)", 2.0, "max", "step time between d = 2 and d = 1024"),
    ("unet_step", "", "torch/jax", 1.0, "min", "U-Net training step vs PyTorch (bench_unet_torch.py)"),
]


def interleaved(contenders: dict, *, repeats: int, target_ms: float, warmup: int = 2) -> dict:
    """Median seconds per call of each ``fn()`` (which must block), measured in turn.

    After ``warmup`` calls each, the number of calls per measurement is set
    so that one measurement lasts about ``target_ms``; every repetition
    measures each contender once, the order rotated by one each time.
    """
    names = list(contenders)
    inner = {}
    for name in names:
        fn = contenders[name]
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-6)
        inner[name] = max(1, int(round(target_ms / 1e3 / one)))
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, n = contenders[name], inner[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n)
    return {
        name: {"median_s": float(np.median(t)), "times_s": t, "calls_per_measurement": inner[name]}
        for name, t in times.items()
    }


class Bench:
    """One benchmark run: ``cfg`` (sizes), ``tref`` (``(torch, torch_reference)`` or None), ``repeats``.

    ``compiler_options`` apply to every compilation (quick mode compiles
    without backend optimisations: its numbers are not results).
    """

    def __init__(self, cfg: dict, tref: Any, repeats: int, compiler_options: dict | None = None):
        self.cfg, self.tref, self.repeats = cfg, tref, repeats
        self.compiler_options = dict(compiler_options or {})
        self._compiled: dict = {}
        self._made: dict = {}

    def compiled(self, jitted, *args):
        """``jitted`` compiled for ``args`` with the run's options (once per function and shapes)."""
        leaves, tree = jax.tree.flatten(args)
        key = (jitted, tree, tuple((a.shape, str(a.dtype)) for a in leaves))
        if key not in self._compiled:
            self._compiled[key] = jitted.lower(*args).compile(compiler_options=self.compiler_options or None)
        return self._compiled[key]

    def once(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` the first time ``key`` is asked for, the same object afterwards.

        Used for jitted functions shared between equal networks, so that
        their compilations are shared too.
        """
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def stepper(self, step, state, args_list) -> Callable[[], None]:
        """``fn()`` running ``state = step(state, *args)`` on the next arguments, blocking."""
        # Fresh buffers: the step donates its state, whose params and EMA start out as the same arrays.
        box = {"state": jax.tree.map(jnp.copy, state), "i": 0}
        step = self.compiled(step, box["state"], *args_list[0])

        def fn():
            args = args_list[box["i"] % len(args_list)]
            box["i"] += 1
            box["state"] = jax.block_until_ready(step(box["state"], *args))

        return fn

    def blocking(self, jitted: Callable, *args) -> Callable[[], Any]:
        """``fn()`` calling the compiled ``jitted(*args)`` and blocking."""
        fn = self.compiled(jitted, *args)
        return lambda: jax.block_until_ready(fn(*args))

    def time(self, contenders: dict, *, warmup: int = 2) -> dict:
        """:func:`interleaved` with the run's repeats and measurement length."""
        return interleaved(contenders, repeats=self.repeats, target_ms=self.cfg["target_ms"], warmup=warmup)


def row(setting: str, timed: dict, ratios: dict, **extra) -> dict:
    """A result row: the setting, median times in ms, the raw timings, the ratios and ``extra`` fields."""
    return {
        "setting": setting,
        "times_ms": {k: v["median_s"] * 1e3 for k, v in timed.items()},
        "raw": timed,
        "ratios": ratios,
        **extra,
    }


def speedups(timed: dict, pairs: dict) -> dict:
    """``{label: median(slow) / median(fast)}`` for ``label -> (slow, fast)`` present in ``timed``."""
    return {
        label: timed[a]["median_s"] / timed[b]["median_s"]
        for label, (a, b) in pairs.items()
        if a in timed and b in timed
    }


def add_peak_fractions(results: dict) -> None:
    """Langevin rows get their matmul rate as a share of the GEMM rate measured by ``flops`` (when it ran)."""
    if not results.get("flops") or not results.get("langevin"):
        return
    peak = max(results["flops"][0]["gemm_gflops_per_s"].values())
    for r in results["langevin"]:
        r["fraction_of_peak"] = {k: v / peak for k, v in r["matmul_gflops_per_s"].items()}


def check_targets(results: dict) -> list:
    """One entry per (target, matching row): the measured ratio and whether it meets the target."""
    out = []
    for name, pattern, ratio, target, kind, what in TARGETS:
        for r in results.get(name, []):
            if ratio in r["ratios"] and (not pattern or pattern in r["setting"].split()):
                value = r["ratios"][ratio]
                met = value >= target if kind == "min" else value <= target
                out.append(
                    {
                        "benchmark": name,
                        "setting": r["setting"],
                        "ratio": ratio,
                        "value": value,
                        "target": (">= " if kind == "min" else "<= ") + f"{target:g}",
                        "met": bool(met),
                        "what": what,
                    }
                )
    return out


def _measurements(r: dict) -> list:
    """``[(name, number, unit)]`` of a row: median times in ms, or peak memory in MiB."""
    if "times_ms" in r:
        return [(k, f"{v:.3g}", "ms") for k, v in r["times_ms"].items()]
    return [(k, f"{v['total'] / 2**20:.1f}", "MiB") for k, v in r["bytes"].items()]


def format_table(results: dict, targets: list) -> str:
    """The text table printed at the end of a run."""
    lines = []
    for name, rows in results.items():
        lines.append(f"== {name}")
        for r in rows:
            cells = "  ".join(f"{k}={n}{u}" for k, n, u in _measurements(r))
            ratios = "  ".join(f"{k}={v:.3g}" for k, v in r["ratios"].items())
            lines.append(f"  {r['setting']:<28} {cells}\n  {'':<28} {ratios}")
    lines.append("== targets")
    for t in targets:
        lines.append(
            f"  {t['what']:<58} {t['setting']:<22} {t['ratio']}={t['value']:.3g} (target {t['target']}): "
            + ("met" if t["met"] else "MISSED")
        )
    return "\n".join(lines)


def markdown_tables(results: dict, targets: list) -> str:
    """The medians and ratios of every comparison, and the targets, as Markdown tables."""
    out = []
    for name, rows in results.items():
        out.append(f"### {name}\n")
        for r in rows:
            cells = ", ".join(f"{k} {n} {u}" for k, n, u in _measurements(r))
            ratios = ", ".join(f"**{k} = {v:.3g}**" for k, v in r["ratios"].items())
            out.append(f"- `{r['setting']}`: {cells}; {ratios}")
        out.append("")
    out.append("### targets\n")
    out.append("| comparison | setting | measured | target | |")
    out.append("|---|---|---|---|---|")
    for t in targets:
        out.append(
            f"| {t['what']} | `{t['setting']}` | {t['ratio']} = {t['value']:.3g} | {t['target']} | {'met' if t['met'] else 'missed'} |"
        )
    return "\n".join(out) + "\n"
