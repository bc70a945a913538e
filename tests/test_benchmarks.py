"""The benchmarks (experiments/benchmarks/run.py and its modules) in quick mode: structure, not speed.

No timing assertions: quick mode runs tiny sizes once; the test checks that
every comparison reports finite positive ratios, that targets are evaluated,
and that the PyTorch reference is skipped cleanly when PyTorch is absent and
computes the same network and loss as dsm_jax when it is present.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "experiments" / "benchmarks"


def load_run():
    for p in (BENCH, BENCH.parent):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    return importlib.import_module("run")


def load(name: str):
    """A module of the benchmarks (``seed_mlp``, ``bench_flops``, ...), once ``run`` has set the import path."""
    load_run()
    return importlib.import_module(name)


def check_payload(payload: dict, names) -> dict:
    assert payload["quick"] is True
    results = payload["results"]["benchmarks"]
    assert list(results) == list(names)
    for name, rows in results.items():
        assert rows, name
        for row in rows:
            assert row["ratios"], (name, row["setting"])
            for label, value in row["ratios"].items():
                assert value is not None and math.isfinite(value) and value > 0, (name, row["setting"], label, value)
            for label, ms in row.get("times_ms", {}).items():
                assert ms is not None and math.isfinite(ms) and ms > 0, (name, label, ms)
    for t in payload["results"]["targets"]:
        assert {"benchmark", "setting", "ratio", "value", "target", "met"} <= set(t)
        assert t["met"] in (True, False)
    return results


def test_quick_run_without_torch(tmp_path, monkeypatch):
    # None in sys.modules makes ``import torch`` raise ImportError, as when it is not installed.
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "torch_reference", None)
    run = load_run()
    run.main(["--quick", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "results.json").read_text())
    results = check_payload(payload, run.BENCHMARKS)
    assert payload["settings"]["torch"] is None
    times = [k for rows in results.values() for r in rows for k in r.get("times_ms", {})]
    assert times and not any("torch" in k or "pytorch" in k for k in times)
    # The targets that need no reference are still evaluated.
    assert {t["benchmark"] for t in payload["results"]["targets"]} == {"flops", "dim_scaling"}
    # The summary over runs (here the same run twice) lists every ratio with its median and counts the met targets.
    summarize = importlib.import_module("summarize")
    text = summarize.main([str(tmp_path / "results.json")] * 2 + ["--out", str(tmp_path / "summary.md")])
    assert (tmp_path / "summary.md").read_text() == text
    n_ratios = sum(len(r["ratios"]) for rows in results.values() for r in rows)
    assert text.count("| **") == n_ratios + len(payload["results"]["targets"])
    target_lines = [line for line in text.splitlines() if line.endswith("runs |")]
    assert len(target_lines) == len(payload["results"]["targets"])
    for line, t in zip(
        target_lines, payload["results"]["targets"], strict=False
    ):  # the same run twice: met in both or in neither
        assert line.endswith(f"| {2 if t['met'] else 0}/2 runs |"), line
    with pytest.raises(SystemExit, match="no such results file"):
        summarize.main([str(tmp_path / "missing.json")])
    table = (tmp_path / "results.md").read_text()
    assert "### targets" in table and all(f"### {name}" in table for name in run.BENCHMARKS)
    # The step's matmul FLOPs grow with d: the d-scaling rows report the growth and the time normalised by it.
    for r in results["dim_scaling"]:
        assert r["network_flop_ratio"] > 1 and "time_ratio/flop_ratio" in r["ratios"]
    mem = results["memory"][0]["bytes"]
    assert all(v["total"] > 0 for v in mem.values())
    # The hand count of the step's matmul FLOPs is below XLA's count of all its FLOPs.
    flops = results["flops"][0]
    assert 0 < flops["step_matmul_flops_by_hand"] <= flops["step_flops_cost_analysis"]


def test_matmul_flop_count_by_hand():
    seed_mlp, bench_flops = load("seed_mlp"), load("bench_flops")
    # dim 2, width 4, 3 layers: embedding 1x4 and 4x4; net (2+4)x4, 4x4, 4x2.
    fwd = 2 * (4 + 16 + 24 + 16 + 8)
    assert seed_mlp.matmul_flops_per_example(2, 4, 3, train=False) == fwd
    # Training: weight and input gradients of every layer, except the input gradients of sigma (1x4) and x (2x4).
    assert seed_mlp.matmul_flops_per_example(2, 4, 3, train=True) == 3 * fwd - 2 * (4 + 8)
    # The matmul-only chain does this work, plus what XLA also computes and throws away: the input gradient
    # of the concat's x part (2 * d * H per example), so XLA's count of it lies between the two.
    for dim, hidden, layers, batch in ((2, 4, 3, 5), (64, 256, 4, 128)):
        chain, operands = bench_flops.matmul_chain(dim, hidden, layers, batch)
        analysis = chain.lower(*operands).compile().cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        by_hand = batch * seed_mlp.matmul_flops_per_example(dim, hidden, layers, train=True)
        assert by_hand <= analysis["flops"] <= by_hand + batch * 2 * dim * hidden, (dim, analysis["flops"], by_hand)


def test_torch_reference_matches_dsm_jax(tmp_path):
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp

    from dsm_jax.losses import explicit_score_matching_loss

    run, seed_mlp = load_run(), load("seed_mlp")
    tref = seed_mlp.load_torch(1)
    net = seed_mlp.Net(3, run.QUICK, tref)
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    sigma = np.linspace(0.1, 2.0, 5).astype(np.float32)
    with torch.no_grad():
        out_t = net.torch_model(torch.from_numpy(x), torch.from_numpy(sigma)).numpy()
    out_j = np.asarray(net.model_fn(net.params)(jnp.asarray(x), jnp.asarray(sigma)))
    np.testing.assert_allclose(out_j, out_t, rtol=1e-5, atol=1e-6)
    # The autograd-loop trace and the jvp trace give the same explicit SM loss.
    loss_t = tref[1].explicit_sm_loss(net.torch_model, torch.from_numpy(x), seed_mlp.ESM_SIGMA).item()
    loss_j = float(explicit_score_matching_loss(net.score_fn(net.params), jnp.asarray(x)))
    assert loss_j == pytest.approx(loss_t, rel=1e-4, abs=1e-5)

    run.main(["--quick", "--only", "langevin", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "results_langevin.json").read_text())
    results = check_payload(payload, ["langevin"])
    assert payload["settings"]["torch"] == torch.__version__
    row = results["langevin"][0]
    assert "pytorch_loop" in row["times_ms"] and "torch/jax" in row["ratios"]
    assert row["jax_finite"] and row["torch_finite"]
    assert set(row["matmul_gflops_per_s"]) == set(row["times_ms"])


def test_profile_ops_lists_xla_operations():
    """The profiling helper (a fresh process: the XLA flag must be set before JAX starts) finds the step's dots."""
    import os
    import subprocess

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, str(BENCH / "profile_ops.py"), "dsm_step", "--batch", "8", "--calls", "1", "--top", "40"],
        capture_output=True,
        text=True,
        env=env,
        cwd=BENCH,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if " ms  x" in line]
    assert lines and any("dot" in line for line in lines), out.stdout
    bad = subprocess.run(
        [sys.executable, str(BENCH / "profile_ops.py"), "dsm_step", "--batch", "0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=BENCH,
        timeout=300,
    )
    assert bad.returncode == 2 and "--batch must be >= 1, got 0" in bad.stderr


def test_each_run_has_its_own_compiler_options_and_caches():
    """No module state: a Bench caches compilations and shared functions for itself only, with its own options."""
    import jax
    import jax.numpy as jnp

    harness = load("harness")
    f, x = jax.jit(lambda v: v + 1), jnp.ones(3)
    quick = harness.Bench({}, None, 1, {"xla_backend_optimization_level": 0})
    full = harness.Bench({}, None, 1)
    assert quick.compiled(f, x) is quick.compiled(f, x)
    assert full.compiled(f, x) is not quick.compiled(f, x)
    assert quick.once("step", object) is quick.once("step", object)
    assert full.once("step", object) is not quick.once("step", object)
    assert full.compiler_options == {} and quick.compiler_options == {"xla_backend_optimization_level": 0}


@pytest.mark.slow  # four tiny untrained runs, three samplers each: ~1 min of compilation
def test_fast_samplers_bench_quick(tmp_path):
    rows = load("bench_fast_samplers").main(["--quick", "--out", str(tmp_path)])
    assert [r["preset"] for r in rows] == ["default", "edm", "digits", "edm_digits"]
    for r in rows:
        assert all(math.isfinite(t) and t > 0 for t in r["median_s"].values())
        assert math.isfinite(r["ald/heun"]) and math.isfinite(r["ald/dpmpp"])
    assert (tmp_path / "fast_samplers_quick.md").read_text().count("\n") == 6


@pytest.mark.slow  # a U-Net step compiled five ways and an eager PyTorch U-Net: ~3 min on the loaded 2 cores
def test_unet_bench_quick_run_with_torch(tmp_path):
    pytest.importorskip("torch")
    bench = load("bench_unet_torch")
    bench.main(["--quick", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "results_unet.json").read_text())
    (row,) = check_payload(payload, ["unet_step"])["unet_step"]
    # The PyTorch twin has the library U-Net's parameter count (the script asserts it too).
    assert row["jax_params"] == row["torch_params"] == 42313
    assert set(row["ratios"]) >= {"torch/jax", "scan/per_call", "unrolled/per_call", "torch/jax_forward_backward"}
    assert row["step_flops"] > 0 and math.isfinite(row["jax_optimizer_share"])
    assert [t["ratio"] for t in payload["results"]["targets"]] == ["torch/jax"]
    assert (tmp_path / "results_unet.md").read_text().startswith("### unet_step")
