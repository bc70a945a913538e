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
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

BENCH_DIR = Path(__file__).resolve().parent
for _p in (BENCH_DIR, BENCH_DIR.parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from _common import RESULTS_DIR, parse_args, save_results, write_atomic  # noqa: E402  (imports dsm_jax first)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from dsm_jax.divergence import exact_divergence, resolve_chunk_size  # noqa: E402
from dsm_jax.losses import dsm_loss, explicit_score_matching_loss, multiscale_dsm_loss, sliced_score_matching_loss  # noqa: E402
from dsm_jax.noise import geometric_sigmas  # noqa: E402
from dsm_jax.samplers import annealed_langevin  # noqa: E402
from dsm_jax.train import create_train_state, make_dsm_loss_fn, make_train_step  # noqa: E402

SIGMA_MIN, SIGMA_MAX = 0.01, 10.0
LEARNING_RATE = 1e-4
ESM_SIGMA = 0.1  # the explicit/sliced SM networks are the same MLP at a fixed sigma

FULL = dict(
    hidden=256, layers=4, target_ms=200.0, repeats=7,
    dsm_dims=(2, 64), dsm_batches=(128, 2048), steps_per_call=10,
    ms_dim=64, ms_batches=(128, 1024), ms_levels=10,
    esm_dims=(16, 64, 256), esm_batch=128,
    ld_dim=2, ld_batches=(64, 1024), ld_levels=10, ld_steps=100, ld_eps=2e-5,
    flops_batch=2048, flops_dims=(2, 64), gemm_n=2048,
    mem_dim=3072, mem_batch=16, mem_chunk=128,
    scaling_dims=(2, 1024), scaling_batch=128,
)
QUICK = dict(
    hidden=32, layers=3, target_ms=2.0, repeats=1,
    dsm_dims=(2,), dsm_batches=(16,), steps_per_call=3,
    ms_dim=4, ms_batches=(16,), ms_levels=3,
    esm_dims=(4,), esm_batch=8,
    ld_dim=2, ld_batches=(8,), ld_levels=2, ld_steps=5, ld_eps=2e-5,
    flops_batch=16, flops_dims=(2,), gemm_n=128,
    mem_dim=64, mem_batch=4, mem_chunk=16,
    scaling_dims=(2, 16), scaling_batch=16,
)

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
]


# ---------------------------------------------------------------------------
# The network, in Flax, and the PyTorch reference (optional)
# ---------------------------------------------------------------------------


class SeedMLP(nn.Module):
    """The seeds' noise-conditional MLP: ``net(concat(x, embed(sigma)))`` with SiLU."""

    dim: int
    hidden: int = 256
    num_layers: int = 4

    @nn.compact
    def __call__(self, x, sigma):
        emb = nn.silu(nn.Dense(self.hidden)(sigma[:, None]))
        emb = nn.Dense(self.hidden)(emb)
        h = jnp.concatenate([x, emb], axis=-1)
        for _ in range(self.num_layers - 1):
            h = nn.silu(nn.Dense(self.hidden)(h))
        return nn.Dense(self.dim)(h)


def layer_shapes(dim: int, hidden: int, num_layers: int) -> list:
    """``[(in, out)]`` of :class:`SeedMLP`'s linear layers in call order: the sigma embedding, then the trunk."""
    return [(1, hidden), (hidden, hidden), (dim + hidden, hidden)] + [(hidden, hidden)] * (num_layers - 2) + [(hidden, dim)]


def matmul_flops_per_example(dim: int, hidden: int, num_layers: int, *, train: bool) -> int:
    """Multiply-add FLOPs (2 per MAC) of :class:`SeedMLP` per example, counted by hand.

    Forward: ``2 * in * out`` per linear layer. A training step adds the
    weight gradient (``2 * in * out``) of every layer and the input gradient
    of every layer but the one reading sigma, and of the layer reading
    ``concat(x, embedding)`` only its embedding part (``2 * H * H``).
    """
    fwd = sum(2 * i * o for i, o in layer_shapes(dim, hidden, num_layers))
    if not train:
        return fwd
    not_needed = 2 * 1 * hidden + 2 * dim * hidden  # input gradients of sigma and of x
    return 3 * fwd - not_needed


def load_torch(threads: int):
    """``(torch, torch_reference)`` with ``threads`` intra-op threads, or ``None`` without PyTorch."""
    try:
        import torch

        import torch_reference
    except ImportError:
        return None
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set by an earlier run in this process
        pass
    return torch, torch_reference


class Net:
    """One network in both frameworks with the same initial weights."""

    def __init__(self, dim: int, cfg: dict, tref, seed: int = 0):
        self.module = SeedMLP(dim, cfg["hidden"], cfg["layers"])
        self.torch_model, self.tref = None, tref
        if tref is not None:
            torch, ref = tref
            torch.manual_seed(seed)
            self.torch_model = ref.NoiseConditionalScoreNetwork(dim, cfg["hidden"], cfg["layers"])
            layers = ref.linear_layers(self.torch_model)
            self.params = {f"Dense_{i}": {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)} for i, (w, b) in enumerate(layers)}
        else:
            self.params = self.module.init(jax.random.key(seed), jnp.zeros((1, dim)), jnp.ones((1,)))["params"]

    def model_fn(self, params):
        return lambda x, sigma: self.module.apply({"params": params}, x, sigma)

    def score_fn(self, params):
        """The network at the fixed ``ESM_SIGMA``: ``x -> s(x)`` (explicit and sliced SM)."""
        return lambda x: self.module.apply({"params": params}, x, jnp.full((x.shape[0],), ESM_SIGMA, x.dtype))

    def torch_optimizer(self):
        torch, _ = self.tref
        return torch.optim.Adam(self.torch_model.parameters(), lr=LEARNING_RATE)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


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
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, n = contenders[name], inner[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n)
    return {name: {"median_s": float(np.median(t)), "times_s": t, "calls_per_measurement": inner[name]} for name, t in times.items()}


# Options for every compilation; quick mode compiles without backend optimisations (its numbers are not results).
COMPILER_OPTIONS: dict = {}


_COMPILED: dict = {}


def compiled(jitted, *args):
    """``jitted`` compiled for ``args`` with :data:`COMPILER_OPTIONS` (once per function and shapes)."""
    leaves, tree = jax.tree.flatten(args)
    key = (jitted, tree, tuple((a.shape, str(a.dtype)) for a in leaves), tuple(sorted(COMPILER_OPTIONS.items())))
    if key not in _COMPILED:
        _COMPILED[key] = jitted.lower(*args).compile(compiler_options=COMPILER_OPTIONS or None)
    return _COMPILED[key]


def stepper(step, state, args_list):
    """``fn()`` running ``state = step(state, *args)`` on the next arguments, blocking."""
    # Fresh buffers: the step donates its state, whose params and EMA start out as the same arrays.
    box = {"state": jax.tree.map(jnp.copy, state), "i": 0}
    step = compiled(step, box["state"], *args_list[0])

    def fn():
        args = args_list[box["i"] % len(args_list)]
        box["i"] += 1
        box["state"] = jax.block_until_ready(step(box["state"], *args))

    return fn


def blocking(jitted: Callable, *args) -> Callable:
    fn = compiled(jitted, *args)
    return lambda: jax.block_until_ready(fn(*args))


def row(setting: str, timed: dict, ratios: dict, **extra) -> dict:
    return {"setting": setting, "times_ms": {k: v["median_s"] * 1e3 for k, v in timed.items()},
            "raw": timed, "ratios": ratios, **extra}


def speedups(timed: dict, pairs: dict) -> dict:
    """``{label: median(slow) / median(fast)}`` for ``label -> (slow, fast)`` present in ``timed``."""
    return {label: timed[a]["median_s"] / timed[b]["median_s"] for label, (a, b) in pairs.items() if a in timed and b in timed}


# ---------------------------------------------------------------------------
# The comparisons
# ---------------------------------------------------------------------------


def _data(dim: int, batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, dim)).astype(np.float32)


def _keys(n: int = 8):
    return [jax.random.key(i) for i in range(n)]


_DSM_STEPS: dict = {}


def jax_dsm_step(net: Net, steps_per_call: int = 1, *, per_example_keys: bool = True):
    """The library's DSM training step (``make_dsm_loss_fn`` + ``make_train_step``), jitted.

    Plain Adam (no clipping), as the reference; the library's default EMA
    (0.999) is kept, work the reference does not do. With
    ``steps_per_call > 1``, that many steps run in one ``lax.scan``.
    ``per_example_keys`` is :func:`make_train_step`'s option (default True:
    one key per example, the loss vmapped over examples).
    """
    optimizer = optax.adam(LEARNING_RATE)
    state = create_train_state(net.params, optimizer)
    key = (net.module.dim, net.module.hidden, net.module.num_layers, steps_per_call, per_example_keys)
    if key not in _DSM_STEPS:  # one jitted function per network shape, so its compilations are shared
        _DSM_STEPS[key] = _make_dsm_step(net.module, optimizer, steps_per_call, per_example_keys)
    return _DSM_STEPS[key], state


def _make_dsm_step(module, optimizer, steps_per_call, per_example_keys):
    sigmas = geometric_sigmas(SIGMA_MAX, SIGMA_MIN, 10)
    loss_fn = make_dsm_loss_fn(module, sigmas, weighting="sigma2", sigma_sampling="log_uniform")
    step = make_train_step(loss_fn, optimizer, per_example_keys=per_example_keys)
    if steps_per_call == 1:
        return jax.jit(lambda s, x, k: step(s, x, k)[0], donate_argnums=0)

    def many(s, xs, k):
        body = lambda s, inp: (step(s, inp[0], inp[1])[0], None)
        return jax.lax.scan(body, s, (xs, jax.random.split(k, xs.shape[0])))[0]

    return jax.jit(many, donate_argnums=0)


def bench_dsm_step(cfg, tref, repeats):
    rows, k = [], cfg["steps_per_call"]
    for dim in cfg["dsm_dims"]:
        for batch in cfg["dsm_batches"]:
            net = Net(dim, cfg, tref)
            x = _data(dim, batch)
            step, state = jax_dsm_step(net)
            step_bk, state_bk = jax_dsm_step(net, per_example_keys=False)
            many, state_k = jax_dsm_step(net, k)
            xs = jnp.asarray(np.stack([_data(dim, batch, s) for s in range(k)]))
            contenders = {
                "dsm_jax": stepper(step, state, [(jnp.asarray(x), key) for key in _keys()]),
                "dsm_jax_batch_key": stepper(step_bk, state_bk, [(jnp.asarray(x), key) for key in _keys()]),
                f"dsm_jax_{k}_per_call": stepper(many, state_k, [(xs, key) for key in _keys()]),
            }
            if tref is not None:
                torch, ref = tref
                opt = net.torch_optimizer()
                xt = torch.from_numpy(x)
                contenders["pytorch"] = lambda: ref.train_step(net.torch_model, opt, ref.dsm_loss_log_uniform, xt, SIGMA_MIN, SIGMA_MAX)
            timed = interleaved(contenders, repeats=repeats, target_ms=cfg["target_ms"])
            timed[f"dsm_jax_{k}_per_call"]["median_s"] /= k  # per step
            rows.append(row(f"d={dim} B={batch}", timed, speedups(timed, {
                "torch/jax": ("pytorch", "dsm_jax"),
                "torch/jax_batch_key": ("pytorch", "dsm_jax_batch_key"),
                "torch/jax_k_per_call": ("pytorch", f"dsm_jax_{k}_per_call"),
                "jax/jax_k_per_call": ("dsm_jax", f"dsm_jax_{k}_per_call"),
            }), steps_per_call=k))
    return rows


def bench_multiscale(cfg, tref, repeats):
    rows, dim = [], cfg["ms_dim"]
    sigmas = geometric_sigmas(SIGMA_MAX, SIGMA_MIN, cfg["ms_levels"])
    sig_list = [float(s) for s in np.asarray(sigmas)]
    for batch in cfg["ms_batches"]:
        net = Net(dim, cfg, tref)
        x = jnp.asarray(_data(dim, batch))

        def vmapped(params, x, key):
            return multiscale_dsm_loss(net.model_fn(params), x, sigmas, key, weighting="sigma2", sigma_sampling="all")

        def looped(params, x, key):
            keys = jax.random.split(key, len(sig_list))
            total = sum(s**2 * dsm_loss(net.model_fn(params), x, s, k) for s, k in zip(sig_list, keys))
            return total / len(sig_list)

        grad_v = jax.jit(jax.value_and_grad(vmapped))
        grad_l = jax.jit(jax.value_and_grad(looped))
        key = jax.random.key(0)
        contenders = {"vmap_over_sigma": blocking(grad_v, net.params, x, key), "jax_python_loop": blocking(grad_l, net.params, x, key)}
        if tref is not None:
            torch, ref = tref
            xt = torch.from_numpy(np.array(x))

            def torch_grad():
                net.torch_model.zero_grad()
                ref.multiscale_loss_loop(net.torch_model, xt, sig_list).backward()

            contenders["pytorch_loop"] = torch_grad
        timed = interleaved(contenders, repeats=repeats, target_ms=cfg["target_ms"])
        rows.append(row(f"d={dim} B={batch} L={len(sig_list)}", timed, speedups(timed, {
            "jax_loop/vmap": ("jax_python_loop", "vmap_over_sigma"),
            "torch_loop/vmap": ("pytorch_loop", "vmap_over_sigma"),
        })))
    return rows


def _jacfwd_esm_loss(score_fn, x):
    """Explicit SM with the per-example Jacobian from ``jax.jacfwd``, then its trace."""
    single = lambda xi: score_fn(xi[None])[0]
    jac = jax.vmap(jax.jacfwd(single))(x)
    s = score_fn(x)
    return jnp.mean(jnp.trace(jac, axis1=1, axis2=2) + 0.5 * jnp.sum(s**2, axis=-1))


def _jax_train_step(loss_fn, params):
    """The library's train step for ``loss_fn(params, x, key)`` (whole batch, one key), plain Adam, jitted."""
    optimizer = optax.adam(LEARNING_RATE)
    step = make_train_step(loss_fn, optimizer, per_example_keys=False)
    return jax.jit(lambda s, x, k: step(s, x, k)[0], donate_argnums=0), create_train_state(params, optimizer)


def bench_explicit_sm(cfg, tref, repeats):
    rows, batch = [], cfg["esm_batch"]
    for dim in cfg["esm_dims"]:
        net = Net(dim, cfg, tref)
        x = jnp.asarray(_data(dim, batch))
        chunk = max(1, dim // 4)
        losses = {
            "jvp": lambda p, x, k: explicit_score_matching_loss(net.score_fn(p), x),  # the default, chunk_size="auto"
            "jvp_whole_basis": lambda p, x, k: explicit_score_matching_loss(net.score_fn(p), x, chunk_size=None),
            f"jvp_chunk{chunk}": lambda p, x, k: explicit_score_matching_loss(net.score_fn(p), x, chunk_size=chunk),
            "jacfwd_trace": lambda p, x, k: _jacfwd_esm_loss(net.score_fn(p), x),
        }
        contenders = {}
        for name, loss in losses.items():
            step, state = _jax_train_step(loss, net.params)
            contenders[name] = stepper(step, state, [(x, jax.random.key(0))])
        if tref is not None:
            torch, ref = tref
            opt = net.torch_optimizer()
            xt = torch.from_numpy(np.array(x))
            contenders["pytorch_autograd_loop"] = lambda: ref.train_step(net.torch_model, opt, ref.explicit_sm_loss, xt, ESM_SIGMA)
        timed = interleaved(contenders, repeats=repeats, target_ms=cfg["target_ms"])
        rows.append(row(f"d={dim} B={batch}", timed, speedups(timed, {
            "torch/jvp": ("pytorch_autograd_loop", "jvp"),
            "torch/jvp_whole_basis": ("pytorch_autograd_loop", "jvp_whole_basis"),
            "torch/jvp_chunked": ("pytorch_autograd_loop", f"jvp_chunk{chunk}"),
            "jacfwd/jvp": ("jacfwd_trace", "jvp"),
        }), auto_chunk_size=resolve_chunk_size("auto", batch, dim)))
    return rows


def _langevin_python_loop(net: Net, x0, sig_list, steps, eps):
    """The reference's loops in Python around one jitted Langevin step (what scan replaces)."""

    @jax.jit
    def step(params, x, sigma, alpha, key):
        score = net.model_fn(params)(x, jnp.full((x.shape[0],), sigma))
        return x + 0.5 * alpha * score + jnp.sqrt(alpha) * jax.random.normal(key, x.shape)

    keys = jax.random.split(jax.random.key(0), steps)
    one = compiled(step, net.params, jnp.asarray(x0), jnp.float32(1.0), jnp.float32(1.0), keys[0])

    def run():
        x = jnp.asarray(x0)
        for sigma in sig_list:
            alpha = jnp.float32(eps * (sigma / sig_list[-1]) ** 2)
            for t in range(steps):
                x = one(net.params, x, jnp.float32(sigma), alpha, keys[t])
        return jax.block_until_ready(x)

    return run


def bench_langevin(cfg, tref, repeats):
    rows, dim = [], cfg["ld_dim"]
    sigmas = geometric_sigmas(1.0, SIGMA_MIN, cfg["ld_levels"])
    sig_list = [float(s) for s in np.asarray(sigmas)]
    steps, eps = cfg["ld_steps"], cfg["ld_eps"]
    for batch in cfg["ld_batches"]:
        net = Net(dim, cfg, tref)
        x0 = _data(dim, batch)
        sample = jax.jit(lambda p, x, k: annealed_langevin(net.model_fn(p), x, k, sigmas, steps_per_sigma=steps, step_lr=eps, final_denoise=False))
        out = {"jax_finite": bool(np.all(np.isfinite(np.asarray(sample(net.params, jnp.asarray(x0), jax.random.key(0))))))}
        contenders = {"dsm_jax_scan": blocking(sample, net.params, jnp.asarray(x0), jax.random.key(0)),
                      "jax_python_loop": _langevin_python_loop(net, x0, sig_list, steps, eps)}
        if tref is not None:
            torch, ref = tref
            xt = torch.from_numpy(x0)
            contenders["pytorch_loop"] = lambda: ref.annealed_langevin(net.torch_model, xt, sig_list, steps, eps)
            out["torch_finite"] = bool(torch.isfinite(contenders["pytorch_loop"]()).all())
        timed = interleaved(contenders, repeats=repeats, target_ms=cfg["target_ms"], warmup=1)
        # Matmul FLOPs of the whole run (one forward pass per step), counted by hand.
        flops = len(sig_list) * steps * batch * matmul_flops_per_example(dim, cfg["hidden"], cfg["layers"], train=False)
        out["matmul_gflops_per_s"] = {k: flops / v["median_s"] / 1e9 for k, v in timed.items()}
        rows.append(row(f"d={dim} B={batch} {len(sig_list)}x{steps}", timed, speedups(timed, {
            "torch/jax": ("pytorch_loop", "dsm_jax_scan"),
            "jax_loop/scan": ("jax_python_loop", "dsm_jax_scan"),
        }), **out))
    return rows


def bench_flops(cfg, tref, repeats):
    n, batch = cfg["gemm_n"], cfg["flops_batch"]
    a = jnp.asarray(_data(n, n, 1))
    b = jnp.asarray(_data(n, n, 2))
    contenders = {"jnp.dot": blocking(jax.jit(jnp.dot), a, b)}
    if tref is not None:
        torch, _ = tref
        at, bt = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))
        contenders["torch.mm"] = lambda: torch.mm(at, bt)
    flops, cost = {}, {}
    for dim in cfg["flops_dims"]:
        net = Net(dim, cfg, tref)
        step, state = jax_dsm_step(net)
        x = jnp.asarray(_data(dim, batch))
        analysis = compiled(step, state, x, jax.random.key(0)).cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        cost[f"d={dim}"] = float(analysis.get("flops", float("nan")))
        flops[f"d={dim}"] = batch * matmul_flops_per_example(dim, cfg["hidden"], cfg["layers"], train=True)
        contenders[f"dsm_step_d={dim}"] = stepper(step, state, [(x, key) for key in _keys()])
        chain, operands = _matmul_chain(dim, cfg["hidden"], cfg["layers"], batch)
        contenders[f"matmuls_only_d={dim}"] = blocking(chain, *operands)
        many, state_k = jax_dsm_step(net, cfg["steps_per_call"])
        xs = jnp.stack([x] * cfg["steps_per_call"])
        contenders[f"dsm_step_k_per_call_d={dim}"] = stepper(many, state_k, [(xs, key) for key in _keys()])
    timed = interleaved(contenders, repeats=repeats, target_ms=cfg["target_ms"])
    for dim in cfg["flops_dims"]:
        timed[f"dsm_step_k_per_call_d={dim}"]["median_s"] /= cfg["steps_per_call"]
    gemm_flops = 2.0 * n**3
    rates = {"jnp.dot": gemm_flops / timed["jnp.dot"]["median_s"]}
    if "torch.mm" in timed:
        rates["torch.mm"] = gemm_flops / timed["torch.mm"]["median_s"]
    peak = max(rates.values())
    rows = []
    for dim in cfg["flops_dims"]:
        name = f"d={dim}"
        rate = flops[name] / timed[f"dsm_step_{name}"]["median_s"]
        shown = (f"dsm_step_{name}", f"dsm_step_k_per_call_{name}", f"matmuls_only_{name}", "jnp.dot", "torch.mm")
        rows.append(row(f"{name} B={batch}", {k: v for k, v in timed.items() if k in shown},
                        {"fraction_of_peak": rate / peak,
                         "fraction_of_peak_k_per_call": flops[name] / timed[f"dsm_step_k_per_call_{name}"]["median_s"] / peak,
                         "matmuls_only_fraction_of_peak": flops[name] / timed[f"matmuls_only_{name}"]["median_s"] / peak},
                        step_matmul_flops_by_hand=flops[name], step_flops_cost_analysis=cost[name],
                        step_gflops_per_s=rate / 1e9, gemm_gflops_per_s={k: v / 1e9 for k, v in rates.items()}, gemm_n=n))
    return rows


def _matmul_chain(dim: int, hidden: int, num_layers: int, batch: int):
    """The training step's matrix products alone (same shapes, no activations, loss or optimizer).

    Forward ``h <- h W`` through :class:`SeedMLP`'s layers, then for each layer
    the weight gradient ``h^T g`` and (but for the input layers) the input
    gradient ``g W^T``: exactly the FLOPs :func:`matmul_flops_per_example`
    counts, so its rate is what the step could reach if everything but the
    matmuls were free.
    """
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal(s).astype(np.float32) / np.sqrt(s[0])) for s in layer_shapes(dim, hidden, num_layers)]
    sigma = jnp.asarray(rng.standard_normal((batch, 1)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((batch, dim)).astype(np.float32))

    @jax.jit
    def chain(weights, sigma, x):
        emb1 = sigma @ weights[0]
        emb2 = emb1 @ weights[1]
        acts = [sigma, emb1, jnp.concatenate([x, emb2], axis=-1)]
        h = acts[-1]
        for w in weights[2:]:
            h = h @ w
            acts.append(h)
        g, grads = h, []
        for i in range(len(weights) - 1, 1, -1):  # the trunk, top down
            grads.append(acts[i].T @ g)
            g = g @ weights[i].T
        g = g[:, dim:]  # only the embedding's part of the concatenated input needs a gradient
        grads.append(emb1.T @ g)
        g = g @ weights[1].T
        grads.append(sigma.T @ g)  # no gradient for sigma itself
        return grads

    return chain, (weights, sigma, x)


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("temp", "argument", "output", "alias")}
    out["total"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    return out


def bench_memory(cfg, tref, repeats):
    dim, batch, chunk = cfg["mem_dim"], cfg["mem_batch"], cfg["mem_chunk"]
    net = Net(dim, cfg, None)
    x = jnp.asarray(_data(dim, batch))
    rows = []
    for what, make in (
        ("exact_divergence", lambda c: lambda p, x: exact_divergence(net.score_fn(p), x, chunk_size=c)),
        ("explicit_sm_grad", lambda c: jax.grad(lambda p, x: explicit_score_matching_loss(net.score_fn(p), x, chunk_size=c))),
    ):
        mem = {name: _memory(compiled(jax.jit(make(c)), net.params, x)) for name, c in (("whole_basis", None), (f"chunk{chunk}", chunk))}
        rows.append({"setting": f"{what} d={dim} B={batch}", "bytes": mem,
                     "ratios": {"whole/chunked": mem["whole_basis"]["total"] / mem[f"chunk{chunk}"]["total"]}})
    return rows


def bench_dim_scaling(cfg, tref, repeats):
    batch, rows = cfg["scaling_batch"], []
    contenders = {}
    for dim in cfg["scaling_dims"]:
        net = Net(dim, cfg, None)
        x = jnp.asarray(_data(dim, batch))
        step, state = jax_dsm_step(net)
        contenders[f"dsm_d={dim}"] = stepper(step, state, [(x, key) for key in _keys()])
        sliced = lambda p, x, key, net=net: sliced_score_matching_loss(net.score_fn(p), x, key)
        step, state = _jax_train_step(sliced, net.params)
        contenders[f"sliced_d={dim}"] = stepper(step, state, [(x, key) for key in _keys()])
    timed = interleaved(contenders, repeats=repeats, target_ms=cfg["target_ms"])
    lo, hi = cfg["scaling_dims"]
    for loss in ("dsm", "sliced"):
        part = {k: v for k, v in timed.items() if k.startswith(loss + "_")}
        ratios = speedups(part, {"t(d_max)/t(d_min)": (f"{loss}_d={hi}", f"{loss}_d={lo}")})
        # The MLP itself grows with d (first and last layer): the step's matmul FLOPs, by hand.
        grow = matmul_flops_per_example(hi, cfg["hidden"], cfg["layers"], train=True) / matmul_flops_per_example(lo, cfg["hidden"], cfg["layers"], train=True)
        ratios["time_ratio/flop_ratio"] = ratios["t(d_max)/t(d_min)"] / grow
        rows.append(row(f"{loss} B={batch} d={lo} vs d={hi}", part, ratios, network_flop_ratio=grow))
    return rows


BENCHMARKS = {
    "dsm_step": bench_dsm_step,
    "multiscale": bench_multiscale,
    "explicit_sm": bench_explicit_sm,
    "langevin": bench_langevin,
    "flops": bench_flops,
    "memory": bench_memory,
    "dim_scaling": bench_dim_scaling,
}


# ---------------------------------------------------------------------------
# Targets and the table
# ---------------------------------------------------------------------------


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
                out.append({"benchmark": name, "setting": r["setting"], "ratio": ratio, "value": value,
                            "target": (">= " if kind == "min" else "<= ") + f"{target:g}", "met": bool(met), "what": what})
    return out


def _measurements(r: dict) -> list:
    """``[(name, number, unit)]`` of a row: median times in ms, or peak memory in MiB."""
    if "times_ms" in r:
        return [(k, f"{v:.3g}", "ms") for k, v in r["times_ms"].items()]
    return [(k, f"{v['total'] / 2**20:.1f}", "MiB") for k, v in r["bytes"].items()]


def format_table(results: dict, targets: list) -> str:
    lines = []
    for name, rows in results.items():
        lines.append(f"== {name}")
        for r in rows:
            cells = "  ".join(f"{k}={n}{u}" for k, n, u in _measurements(r))
            ratios = "  ".join(f"{k}={v:.3g}" for k, v in r["ratios"].items())
            lines.append(f"  {r['setting']:<28} {cells}\n  {'':<28} {ratios}")
    lines.append("== targets")
    for t in targets:
        lines.append(f"  {t['what']:<58} {t['setting']:<22} {t['ratio']}={t['value']:.3g} (target {t['target']}): "
                     + ("met" if t["met"] else "MISSED"))
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
        out.append(f"| {t['what']} | `{t['setting']}` | {t['ratio']} = {t['value']:.3g} | {t['target']} | {'met' if t['met'] else 'missed'} |")
    return "\n".join(out) + "\n"


def main(argv: Optional[list] = None) -> dict:
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
    COMPILER_OPTIONS.clear()
    if args.quick:
        COMPILER_OPTIONS.update(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
    repeats = args.repeats or cfg["repeats"]
    if args.target_ms is not None:
        cfg["target_ms"] = args.target_ms
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    tref = load_torch(cores)

    results = {}
    for name, bench in BENCHMARKS.items():
        if args.only in (None, name):
            t0 = time.perf_counter()
            results[name] = bench(cfg, tref, repeats)
            print(f"[{name}: {time.perf_counter() - t0:.1f}s]", flush=True)
    add_peak_fractions(results)
    targets = check_targets(results)
    print(format_table(results, targets))
    settings = {**cfg, "repeats": repeats, "cores": cores, "torch": None if tref is None else tref[0].__version__,
                "torch_threads": None if tref is None else tref[0].get_num_threads(),
                "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    stem = "results" if args.only is None else f"results_{args.only}"
    save_results(args, stem, {"benchmarks": results, "targets": targets}, settings)
    write_atomic(Path(args.out) / f"{stem}.md", markdown_tables(results, targets))
    return {"benchmarks": results, "targets": targets}


if __name__ == "__main__":
    main()
