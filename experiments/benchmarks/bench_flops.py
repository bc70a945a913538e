"""``flops`` and ``dim_scaling``: the DSM step's matmul rate against the GEMM peak, and its cost over d.

``flops``: achieved matmul FLOP/s of the DSM training step at batch
``cfg["flops_batch"]`` as a fraction of the measured fp32 GEMM rate
(``jnp.dot`` and ``torch.mm`` of ``gemm_n x gemm_n``, in the same run), next
to the step's matrix products alone. ``dim_scaling``: sliced-SM and DSM step
time at the largest over the smallest of ``cfg["scaling_dims"]``, also
normalised by the network's FLOP growth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from bench_dsm_step import jax_dsm_step, library_train_step
from harness import Bench, row, speedups
from seed_mlp import Net, data, keys, layer_shapes, matmul_flops_per_example

from dsm_jax.losses import sliced_score_matching_loss


def matmul_chain(dim: int, hidden: int, num_layers: int, batch: int):
    """The training step's matrix products alone (same shapes, no activations, loss or optimizer).

    Forward ``h <- h W`` through the seed MLP's layers, then for each layer
    the weight gradient ``h^T g`` and (but for the input layers) the input
    gradient ``g W^T``: exactly the FLOPs :func:`matmul_flops_per_example`
    counts, so its rate is what the step could reach if everything but the
    matmuls were free. Returns ``(jitted chain, operands)``.
    """
    rng = np.random.default_rng(0)
    weights = [
        jnp.asarray(rng.standard_normal(s).astype(np.float32) / np.sqrt(s[0]))
        for s in layer_shapes(dim, hidden, num_layers)
    ]
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


def bench_flops(b: Bench) -> list:
    cfg, tref = b.cfg, b.tref
    n, batch, k = cfg["gemm_n"], cfg["flops_batch"], cfg["steps_per_call"]
    a = jnp.asarray(data(n, n, 1))
    bb = jnp.asarray(data(n, n, 2))
    contenders = {"jnp.dot": b.blocking(jax.jit(jnp.dot), a, bb)}
    if tref is not None:
        torch, _ = tref
        at, bt = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(bb))
        contenders["torch.mm"] = lambda: torch.mm(at, bt)
    flops, cost = {}, {}
    for dim in cfg["flops_dims"]:
        net = Net(dim, cfg, tref)
        step, state = jax_dsm_step(b, net)
        x = jnp.asarray(data(dim, batch))
        analysis = b.compiled(step, state, x, jax.random.key(0)).cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        cost[f"d={dim}"] = float(analysis.get("flops", float("nan")))
        flops[f"d={dim}"] = batch * matmul_flops_per_example(dim, cfg["hidden"], cfg["layers"], train=True)
        contenders[f"dsm_step_d={dim}"] = b.stepper(step, state, [(x, key) for key in keys()])
        chain, operands = matmul_chain(dim, cfg["hidden"], cfg["layers"], batch)
        contenders[f"matmuls_only_d={dim}"] = b.blocking(chain, *operands)
        many, state_k = jax_dsm_step(b, net, k)
        xs = jnp.stack([x] * k)
        contenders[f"dsm_step_k_per_call_d={dim}"] = b.stepper(many, state_k, [(xs, key) for key in keys()])
    timed = b.time(contenders)
    for dim in cfg["flops_dims"]:
        timed[f"dsm_step_k_per_call_d={dim}"]["median_s"] /= k
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
        rows.append(
            row(
                f"{name} B={batch}",
                {k_: v for k_, v in timed.items() if k_ in shown},
                {
                    "fraction_of_peak": rate / peak,
                    "fraction_of_peak_k_per_call": flops[name]
                    / timed[f"dsm_step_k_per_call_{name}"]["median_s"]
                    / peak,
                    "matmuls_only_fraction_of_peak": flops[name] / timed[f"matmuls_only_{name}"]["median_s"] / peak,
                },
                step_matmul_flops_by_hand=flops[name],
                step_flops_cost_analysis=cost[name],
                step_gflops_per_s=rate / 1e9,
                gemm_gflops_per_s={k_: v / 1e9 for k_, v in rates.items()},
                gemm_n=n,
            )
        )
    return rows


def bench_dim_scaling(b: Bench) -> list:
    cfg = b.cfg
    batch, rows = cfg["scaling_batch"], []
    contenders = {}
    for dim in cfg["scaling_dims"]:
        net = Net(dim, cfg, None)
        x = jnp.asarray(data(dim, batch))
        step, state = jax_dsm_step(b, net)
        contenders[f"dsm_d={dim}"] = b.stepper(step, state, [(x, key) for key in keys()])
        sliced = lambda p, x, key, net=net: sliced_score_matching_loss(net.score_fn(p), x, key)
        step, state = library_train_step(sliced, net.params)
        contenders[f"sliced_d={dim}"] = b.stepper(step, state, [(x, key) for key in keys()])
    timed = b.time(contenders)
    lo, hi = cfg["scaling_dims"]
    for loss in ("dsm", "sliced"):
        part = {k: v for k, v in timed.items() if k.startswith(loss + "_")}
        ratios = speedups(part, {"t(d_max)/t(d_min)": (f"{loss}_d={hi}", f"{loss}_d={lo}")})
        # The MLP itself grows with d (first and last layer): the step's matmul FLOPs, by hand.
        grow = matmul_flops_per_example(hi, cfg["hidden"], cfg["layers"], train=True) / matmul_flops_per_example(
            lo, cfg["hidden"], cfg["layers"], train=True
        )
        ratios["time_ratio/flop_ratio"] = ratios["t(d_max)/t(d_min)"] / grow
        rows.append(row(f"{loss} B={batch} d={lo} vs d={hi}", part, ratios, network_flop_ratio=grow))
    return rows
