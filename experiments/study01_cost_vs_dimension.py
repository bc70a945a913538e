"""Study 1: cost of a training step of the score-matching family against the dimension d.

One optimizer step (loss, gradient, Adam update; jitted, per-batch key) of

* ESM: explicit score matching with the exact Jacobian trace, one ``jax.jvp``
  per basis vector (``explicit_score_matching_loss``; the basis is pushed in
  chunks of 512 directions to bound memory, i.e. unchunked up to d = 512);
* SSM-VR with 1 and 4 Rademacher projections (``sliced_score_matching_loss``);
* DSM at one sigma (``dsm_loss``),

all on the same noise-conditional MLP (width 128, 2 residual blocks; for
ESM/SSM the sigma input is held at 1) and the same batch of 32, for
d in {2, 8, 32, 128, 512, 1024, 3072}. Time is the median wall time of the
compiled step; memory is what XLA's buffer assignment reports for the
compiled step (``compiled.memory_analysis()``: temporaries, and arguments +
outputs, which are the parameters and Adam state). Slopes are least-squares
fits of log time on log d. The network's first and last layers have
128 d weights each, so even one forward pass grows with d once 128 d
dominates the 2 x 128^2 hidden weights (d >~ 256): the claim "O(d) vs O(1)"
is about the number of network passes per example (d jvps vs one), which
shows as the ESM / DSM ratio growing like d. Quick mode: d in {2, 8}, a tiny
MLP, no SSM-VR-4, compiled without XLA optimisations (not results).
"""

from __future__ import annotations

import math

import _common as C
import jax
import numpy as np

from dsm_jax.losses import dsm_loss, explicit_score_matching_loss, sliced_score_matching_loss
from dsm_jax.models import NoiseConditionalMLP, init_params, make_model_fn
from dsm_jax.train import create_train_state, make_optimizer, make_train_step

NAME = "study01_cost_vs_dimension"
METHODS = ("esm", "ssm_vr_1", "ssm_vr_4", "dsm")
ESM_CHUNK = 512
SIGMA = 0.1


def loss_for(method: str, model, *, chunk_size=ESM_CHUNK):
    """``loss_fn(params, x, key)`` of one method on ``model``."""

    def loss_fn(params, x, key):
        model_fn = make_model_fn(model, params)
        score_fn = lambda z: model_fn(z, 1.0)
        if method == "esm":
            return explicit_score_matching_loss(score_fn, x, chunk_size=chunk_size)
        if method.startswith("ssm_vr_"):
            return sliced_score_matching_loss(
                score_fn, x, key, num_projections=int(method.rsplit("_", 1)[1]), variance_reduction=True
            )
        return dsm_loss(model_fn, x, SIGMA, key)

    return loss_fn


def compiled_step(loss_fn, state, optimizer, x, key, *, quick=False):
    """The jitted train step compiled for these shapes, and its memory report.

    Quick mode compiles without XLA's backend optimisations (its timings are not results).
    """
    step = jax.jit(make_train_step(loss_fn, optimizer, ema_decay=0.0, per_example_keys=False))
    options = {"xla_backend_optimization_level": 0} if quick else None
    compiled = step.lower(state, x, key).compile(compiler_options=options)
    mem = compiled.memory_analysis()
    memory = None
    if mem is not None:
        memory = {
            "temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
        }
    return compiled, memory


def loglog_slope(ds, ts):
    """Least-squares slope of log t on log d (None with fewer than 2 points)."""
    pts = [(d, t) for d, t in zip(ds, ts, strict=False) if t is not None]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def main(argv=None):
    args = C.parse_args(
        __doc__.splitlines()[0],
        argv,
        esm_budget=(float, 120.0, "skip ESM at a d whose predicted timing exceeds this many seconds"),
    )
    dims = [2, 8] if args.quick else [2, 8, 32, 128, 512, 1024, 3072]
    batch = 4 if args.quick else 32
    width, depth = (16, 1) if args.quick else (128, 2)
    repeats = 2 if args.quick else 9
    model = NoiseConditionalMLP(width=width, depth=depth)
    optimizer = make_optimizer(1e-3)
    key = jax.random.key(args.seed)

    methods = tuple(m for m in METHODS if m != "ssm_vr_4") if args.quick else METHODS
    rows = {m: {"seconds": [], "temp_bytes": [], "argument_output_bytes": []} for m in methods}
    esm_unchunked_temp, esm_skipped, params_count = [], [], []
    for d in dims:
        x = jax.random.normal(jax.random.fold_in(key, d), (batch, d))
        params = init_params(model, jax.random.fold_in(key, 10_000 + d), x)
        params_count.append(sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)))
        state = create_train_state(params, optimizer)
        for method in methods:
            seconds, memory = None, None
            if method == "esm":
                t_pred = _predicted_esm_seconds(dims, rows["esm"]["seconds"], d)
                if t_pred is not None and t_pred * (repeats + 1) > args.esm_budget:
                    esm_skipped.append({"d": d, "predicted_seconds_per_step": t_pred})
                    print(f"d={d}: ESM skipped (predicted {t_pred:.1f} s per step)")
            if not (method == "esm" and esm_skipped and esm_skipped[-1]["d"] == d):
                compiled, memory = compiled_step(loss_for(method, model), state, optimizer, x, key, quick=args.quick)
                r = repeats if method != "esm" or d < 1024 else 3
                seconds = C.median_time(lambda: compiled(state, x, key), repeats=r, warmup=1)
                del compiled
            rows[method]["seconds"].append(seconds)
            rows[method]["temp_bytes"].append(None if memory is None else memory["temp_bytes"])
            rows[method]["argument_output_bytes"].append(
                None if memory is None else memory["argument_bytes"] + memory["output_bytes"]
            )
            if seconds is not None:
                print(
                    f"d={d:5d} {method:9s} {seconds * 1e3:10.2f} ms/step  temp "
                    f"{(memory or {}).get('temp_bytes', 0) / 2**20:9.1f} MiB"
                )
        if d > ESM_CHUNK:  # what the unchunked trace would hold (compiled only, not run)
            _, memory = compiled_step(loss_for("esm", model, chunk_size=None), state, optimizer, x, key)
            esm_unchunked_temp.append({"d": d, "temp_bytes": None if memory is None else memory["temp_bytes"]})

    big = [i for i, d in enumerate(dims) if d >= 128]
    slopes = {
        m: {
            "all_d": loglog_slope(dims, rows[m]["seconds"]),
            "d_ge_128": loglog_slope([dims[i] for i in big], [rows[m]["seconds"][i] for i in big]),
        }
        for m in methods
    }
    ratio = [None if e is None else e / s for e, s in zip(rows["esm"]["seconds"], rows["dsm"]["seconds"], strict=False)]
    results = {
        "dims": dims,
        "per_method": rows,
        "loglog_slopes": slopes,
        "esm_over_dsm_time": ratio,
        "esm_over_dsm_slope": loglog_slope(dims, ratio),
        "esm_unchunked_temp_bytes": esm_unchunked_temp,
        "esm_skipped": esm_skipped,
        "num_params": params_count,
    }
    settings = {
        "batch_size": batch,
        "width": width,
        "depth": depth,
        "repeats": repeats,
        "esm_chunk_size": ESM_CHUNK,
        "dsm_sigma": SIGMA,
        "esm_budget_seconds": args.esm_budget,
        "timing": "median wall time of the compiled jitted train step (loss + grad + Adam), warm-up excluded",
        "memory": "compiled.memory_analysis(): temp_size (XLA temporaries); argument+output sizes",
    }
    C.save_results(args, NAME, results, settings)
    for m in methods:
        print(f"{m:9s} slope (all d) {slopes[m]['all_d']}, (d >= 128) {slopes[m]['d_ge_128']}")
    _figure(args, dims, rows, slopes, ratio)
    return results


def _predicted_esm_seconds(dims, measured, d):
    """Extrapolates the ESM step time to ``d`` from the last two measured dimensions (log-log)."""
    pts = [(dd, t) for dd, t in zip(dims, measured, strict=False) if t is not None]
    if len(pts) < 2:
        return None
    (d0, t0), (d1, t1) = pts[-2], pts[-1]
    slope = math.log(t1 / t0) / math.log(d1 / d0)
    return t1 * (d / d1) ** max(slope, 1.0)


def _figure(args, dims, rows, slopes, ratio):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.2), layout="constrained")
    ax_t, ax_r, ax_m = fig.subplots(1, 3)
    labels = {"esm": "ESM (exact trace)", "ssm_vr_1": "SSM-VR, 1 proj.", "ssm_vr_4": "SSM-VR, 4 proj.", "dsm": "DSM"}
    for m in rows:
        pts = [(d, t) for d, t in zip(dims, rows[m]["seconds"], strict=False) if t is not None]
        if pts:
            s = slopes[m]["d_ge_128"]
            ax_t.loglog(
                *zip(*pts, strict=False),
                "o-",
                label=f"{labels[m]} (slope d>=128: {s:.2f})" if s is not None else labels[m],
            )
        mem = [(d, b / 2**20) for d, b in zip(dims, rows[m]["temp_bytes"], strict=False) if b]
        if mem:
            ax_m.loglog(*zip(*mem, strict=False), "o-", label=labels[m])
    ax_t.set_xlabel("d")
    ax_t.set_ylabel("seconds per training step")
    ax_t.legend(fontsize=7)
    ax_t.set_title("time per step (batch 32)", fontsize=9)
    pts = [(d, r) for d, r in zip(dims, ratio, strict=False) if r is not None]
    if pts:
        ax_r.loglog(*zip(*pts, strict=False), "o-", color="tab:red")
        ax_r.loglog(dims, np.asarray(dims) / dims[0] * pts[0][1], ":", color="gray", label="~ d")
        ax_r.legend(fontsize=7)
    ax_r.set_xlabel("d")
    ax_r.set_title("ESM time / DSM time", fontsize=9)
    ax_m.set_xlabel("d")
    ax_m.set_ylabel("XLA temporaries (MiB)")
    ax_m.legend(fontsize=7)
    ax_m.set_title("compiled step: temp memory", fontsize=9)
    C.save_figure(fig, args, NAME)


if __name__ == "__main__":
    main()
