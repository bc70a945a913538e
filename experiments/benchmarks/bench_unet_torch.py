"""The U-Net training step (forward, backward, Adam) of dsm_jax against the same U-Net in PyTorch, on the CPU.

``python experiments/benchmarks/bench_unet_torch.py [--quick] [--repeats N]``
writes ``results_unet.json`` and ``results_unet.md`` next to this file
(``--quick``: tiny sizes under ``experiments/results/quick/benchmarks/``,
numbers that test the script, not the library).

Sizes (``SIZES``): the digits preset (8x8x1, 32 channels, multipliers (1, 2),
batch 128), a CPU-sized 32x32x3 U-Net (32 channels, (1, 2, 2), attention at
16x16), and the ``cifar10`` preset's width (128 channels, (1, 2, 2, 2), 2
blocks per resolution, attention at 16x16: 35.4M parameters) at batch 8 and
two timed steps per contender, as long as a step takes on these cores.

The loss is the digits preset's: :func:`dsm_jax.models.make_dsm_loss_fn`
with one log-uniform sigma per image, ``sigma^2`` weighting and the output
divided by sigma, stepped by :func:`dsm_jax.train.make_train_step` with
plain Adam (no clipping; the library's EMA kept), jitted; PyTorch runs
:mod:`torch_unet` (the same layers and parameter count, asserted) eagerly
in NCHW with the same loss and ``torch.optim.Adam``. Contenders, timed in
turn in one process (:func:`harness.interleaved`):

* ``dsm_jax``: one jitted step per call (``steps_per_call=1``, the CPU setting);
* ``dsm_jax_scan_k``: ``k`` steps in one call, a rolled ``lax.scan``
  (:func:`dsm_jax.train.make_multi_step`), and ``dsm_jax_unrolled_k`` the same
  scan fully unrolled (time per step);
* ``jax_forward`` / ``jax_forward_backward``: the loss alone and with its
  gradient (same sigma and noise draws), so ``step - forward_backward`` is
  the optimizer and EMA; ``pytorch_forward`` / ``pytorch_forward_backward``
  likewise (the forward without autograd's graph).

The XLA cost analysis of the compiled step gives its FLOP count, hence the
achieved GFLOP/s of both frameworks. ``profile_ops.py unet_step`` lists the
step's XLA operations by time.
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _common import RESULTS_DIR, parse_args, save_results, write_atomic  # noqa: E402
from harness import Bench, check_targets, markdown_tables, row, speedups  # noqa: E402
from seed_mlp import LEARNING_RATE, load_torch  # noqa: E402

from dsm_jax.models import UNet, init_params, make_dsm_loss_fn  # noqa: E402
from dsm_jax.noise import geometric_sigmas  # noqa: E402
from dsm_jax.train import create_train_state, make_multi_step, make_train_step  # noqa: E402

SIGMA_MIN, SIGMA_MAX = 0.02, 5.0
# (setting, U-Net attributes, image size, image channels, batch, {option overrides})
SIZES = [
    ("digits 8x8x1 C=32 (1,2)", dict(channels=32, channel_mults=(1, 2)), 8, 1, 128, {}),
    (
        "32x32x3 C=32 (1,2,2) attn16",
        dict(channels=32, channel_mults=(1, 2, 2), attention_resolutions=(16,)),
        32,
        3,
        32,
        {"scan": False},
    ),
    (
        "cifar10 width 32x32x3 C=128 (1,2,2,2) x2 attn16 B=8",
        dict(channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,)),
        32,
        3,
        8,
        {"scan": False, "breakdown": False, "repeats": 2, "warmup": 1},
    ),
]
QUICK_SIZES = [("quick 8x8x1 C=8 (1,2)", dict(channels=8, channel_mults=(1, 2), groups=4), 8, 1, 4, {})]
FULL = dict(target_ms=0.0, repeats=3, steps_per_call=2)
QUICK = dict(target_ms=0.0, repeats=1, steps_per_call=2)
QUICK_COMPILER_OPTIONS = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


def num_params(tree) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


def jax_functions(model: UNet, k: int) -> dict:
    """The jitted contenders: the train step (1 and ``k`` per call, rolled and unrolled), the loss, its gradient."""
    sigmas = geometric_sigmas(SIGMA_MAX, SIGMA_MIN, 10)
    loss_fn = make_dsm_loss_fn(model, sigmas, weighting="sigma2", sigma_sampling="log_uniform", scale_by_sigma=True)
    step = make_train_step(loss_fn, optax.adam(LEARNING_RATE))
    return {
        "step": jax.jit(lambda s, x, key: step(s, x, key)[0], donate_argnums=0),
        "scan": jax.jit(lambda s, xs, key: make_multi_step(step)(s, xs, key)[0], donate_argnums=0),
        "unrolled": jax.jit(lambda s, xs, key: make_multi_step(step, unroll=True)(s, xs, key)[0], donate_argnums=0),
        "forward": jax.jit(lambda p, x, keys: loss_fn(p, x, keys)[0]),
        "forward_backward": jax.jit(jax.value_and_grad(lambda p, x, keys: loss_fn(p, x, keys)[0])),
    }


def torch_contenders(tref, spec: dict, size: int, cin: int, x: np.ndarray, breakdown: bool) -> tuple[dict, int]:
    torch, _ = tref
    import torch_unet

    torch.manual_seed(0)
    net = torch_unet.UNet(cin, size, **spec)
    opt = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    loss = lambda: torch_unet.dsm_loss_log_uniform_images(net, xt, SIGMA_MIN, SIGMA_MAX)

    def step():
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
        return float(value.detach())

    def forward():
        with torch.no_grad():
            return float(loss())

    def forward_backward():
        net.zero_grad()
        value = loss()
        value.backward()
        return float(value.detach())

    out = {"pytorch": step}
    if breakdown:
        out |= {"pytorch_forward": forward, "pytorch_forward_backward": forward_backward}
    return out, torch_unet.num_parameters(net)


def _unet_row(b: Bench, setting: str, spec: dict, size: int, cin: int, batch: int, options: dict) -> dict:
    k = b.cfg["steps_per_call"]
    scan, breakdown = options.get("scan", True), options.get("breakdown", True)
    model = UNet(**spec)
    x = np.random.default_rng(0).standard_normal((batch, size, size, cin)).astype(np.float32)
    xj = jnp.asarray(x)
    params = init_params(model, jax.random.key(0), xj)
    fns = jax_functions(model, k)
    state = create_train_state(params, optax.adam(LEARNING_RATE))
    step_keys = [jax.random.key(i) for i in range(4)]
    contenders = {"dsm_jax": b.stepper(fns["step"], state, [(xj, key) for key in step_keys])}
    if scan:
        xs = jnp.broadcast_to(xj, (k,) + xj.shape)
        contenders[f"dsm_jax_scan_{k}"] = b.stepper(fns["scan"], state, [(xs, key) for key in step_keys])
        contenders[f"dsm_jax_unrolled_{k}"] = b.stepper(fns["unrolled"], state, [(xs, key) for key in step_keys])
    if breakdown:
        keys = jax.random.split(jax.random.key(1), batch)
        contenders["jax_forward"] = b.blocking(fns["forward"], params, xj, keys)
        contenders["jax_forward_backward"] = b.blocking(fns["forward_backward"], params, xj, keys)
    t0 = time.perf_counter()
    compiled_step = b.compiled(fns["step"], jax.tree.map(jnp.copy, state), xj, step_keys[0])
    cost = compiled_step.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", float("nan")))
    extra = {"jax_params": num_params(params), "batch": batch, "step_flops": flops, "steps_per_call": k}
    if b.tref is not None:
        torch_fns, torch_params = torch_contenders(b.tref, spec, size, cin, x, breakdown)
        if torch_params != extra["jax_params"]:
            raise AssertionError(
                f"{setting}: PyTorch U-Net has {torch_params} parameters, dsm_jax {extra['jax_params']}"
            )
        contenders |= torch_fns
        extra["torch_params"] = torch_params
    print(f"[{setting}: {extra['jax_params']:,} parameters, set up in {time.perf_counter() - t0:.0f}s]", flush=True)
    timed = (
        b.time(contenders, warmup=options.get("warmup", 2))
        if "repeats" not in options
        else _time(b, contenders, options)
    )
    for name in (f"dsm_jax_scan_{k}", f"dsm_jax_unrolled_{k}"):
        if name in timed:
            timed[name]["median_s"] /= k  # per step
    pairs = {
        "torch/jax": ("pytorch", "dsm_jax"),
        "scan/per_call": (f"dsm_jax_scan_{k}", "dsm_jax"),
        "unrolled/per_call": (f"dsm_jax_unrolled_{k}", "dsm_jax"),
        "jax_backward/forward": ("jax_forward_backward", "jax_forward"),
        "torch/jax_forward": ("pytorch_forward", "jax_forward"),
        "torch/jax_forward_backward": ("pytorch_forward_backward", "jax_forward_backward"),
    }
    ratios = speedups(timed, pairs)
    # The optimizer (and, for dsm_jax, the EMA) as a share of the step.
    for prefix, step_name in (("jax", "dsm_jax"), ("pytorch", "pytorch")):
        fb = timed.get(f"{prefix}_forward_backward")
        if fb is not None and step_name in timed:
            extra[f"{prefix}_optimizer_share"] = 1.0 - fb["median_s"] / timed[step_name]["median_s"]
    extra["gflops_per_s"] = {
        name: flops / timed[name]["median_s"] / 1e9 for name in ("dsm_jax", "pytorch") if name in timed
    }
    return row(setting, timed, ratios, **extra)


def _time(b: Bench, contenders: dict, options: dict) -> dict:
    """Few repetitions for the largest size (a step takes seconds here), still in turn."""
    from harness import interleaved

    return interleaved(contenders, repeats=options["repeats"], target_ms=0.0, warmup=options["warmup"])


def bench_unet_step(b: Bench, sizes) -> list:
    return [_unet_row(b, *size) for size in sizes]


def main(argv: list | None = None) -> dict:
    args = parse_args(
        __doc__.splitlines()[0],
        argv,
        repeats=(int, None, "repetitions per measurement (default 3; 1 with --quick)"),
        sizes=(str, None, "comma-separated indices into SIZES, e.g. 0,1 (default: all); results_unet_<indices>.*"),
    )
    if args.out == RESULTS_DIR:
        args.out = BENCH_DIR
    elif args.out == RESULTS_DIR / "quick":
        args.out = RESULTS_DIR / "quick" / "benchmarks"
        args.out.mkdir(parents=True, exist_ok=True)
    cfg = dict(QUICK if args.quick else FULL)
    repeats = args.repeats or cfg["repeats"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    tref = load_torch(cores)
    b = Bench(cfg, tref, repeats, QUICK_COMPILER_OPTIONS if args.quick else None)
    table = QUICK_SIZES if args.quick else SIZES
    chosen = range(len(table)) if args.sizes is None else [int(i) for i in args.sizes.split(",")]
    sizes = [table[i] for i in chosen]
    stem = "results_unet" if args.sizes is None else f"results_unet_{args.sizes.replace(',', '_')}"
    results = {"unet_step": bench_unet_step(b, sizes)}
    targets = check_targets(results)
    settings = {
        **cfg,
        "repeats": repeats,
        "cores": cores,
        "sizes": [s[0] for s in sizes],
        "torch": None if tref is None else tref[0].__version__,
        "torch_threads": None if tref is None else tref[0].get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    save_results(args, stem, {"benchmarks": results, "targets": targets}, settings)
    text = markdown_tables(results, targets)
    write_atomic(Path(args.out) / f"{stem}.md", text)
    print(text)
    return {"benchmarks": results, "targets": targets}


if __name__ == "__main__":
    main()
