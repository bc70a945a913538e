"""``langevin``: annealed Langevin, the library's ``lax.scan`` against Python loops (jitted JAX, PyTorch).

``cfg["ld_levels"]`` levels x ``cfg["ld_steps"]`` steps at batches
``cfg["ld_batches"]``; each row also reports the matmul rate (one forward
pass per step, counted by hand).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from harness import Bench, row, speedups
from seed_mlp import SIGMA_MIN, Net, data, matmul_flops_per_example

from dsm_jax.noise import geometric_sigmas
from dsm_jax.samplers import annealed_langevin


def _langevin_python_loop(b: Bench, net: Net, x0, sig_list, steps, eps):
    """The reference's loops in Python around one jitted Langevin step (what scan replaces)."""

    @jax.jit
    def step(params, x, sigma, alpha, key):
        score = net.model_fn(params)(x, jnp.full((x.shape[0],), sigma))
        return x + 0.5 * alpha * score + jnp.sqrt(alpha) * jax.random.normal(key, x.shape)

    keys = jax.random.split(jax.random.key(0), steps)
    one = b.compiled(step, net.params, jnp.asarray(x0), jnp.float32(1.0), jnp.float32(1.0), keys[0])

    def run():
        x = jnp.asarray(x0)
        for sigma in sig_list:
            alpha = jnp.float32(eps * (sigma / sig_list[-1]) ** 2)
            for t in range(steps):
                x = one(net.params, x, jnp.float32(sigma), alpha, keys[t])
        return jax.block_until_ready(x)

    return run


def bench_langevin(b: Bench) -> list:
    return [_langevin_row(b, batch) for batch in b.cfg["ld_batches"]]


def _langevin_row(b: Bench, batch: int) -> dict:
    cfg, tref, dim = b.cfg, b.tref, b.cfg["ld_dim"]
    sigmas = geometric_sigmas(1.0, SIGMA_MIN, cfg["ld_levels"])
    sig_list = [float(s) for s in np.asarray(sigmas)]
    steps, eps = cfg["ld_steps"], cfg["ld_eps"]
    net = Net(dim, cfg, tref)
    x0 = data(dim, batch)
    sample = jax.jit(
        lambda p, x, k: annealed_langevin(
            net.model_fn(p), x, k, sigmas, steps_per_sigma=steps, step_lr=eps, final_denoise=False
        )
    )
    out = {"jax_finite": bool(np.all(np.isfinite(np.asarray(sample(net.params, jnp.asarray(x0), jax.random.key(0))))))}
    contenders = {
        "dsm_jax_scan": b.blocking(sample, net.params, jnp.asarray(x0), jax.random.key(0)),
        "jax_python_loop": _langevin_python_loop(b, net, x0, sig_list, steps, eps),
    }
    if tref is not None:
        torch, ref = tref
        xt = torch.from_numpy(x0)
        contenders["pytorch_loop"] = lambda: ref.annealed_langevin(net.torch_model, xt, sig_list, steps, eps)
        out["torch_finite"] = bool(torch.isfinite(contenders["pytorch_loop"]()).all())
    timed = b.time(contenders, warmup=1)
    # Matmul FLOPs of the whole run (one forward pass per step), counted by hand.
    flops = len(sig_list) * steps * batch * matmul_flops_per_example(dim, cfg["hidden"], cfg["layers"], train=False)
    out["matmul_gflops_per_s"] = {k: flops / v["median_s"] / 1e9 for k, v in timed.items()}
    return row(
        f"d={dim} B={batch} {len(sig_list)}x{steps}",
        timed,
        speedups(
            timed,
            {
                "torch/jax": ("pytorch_loop", "dsm_jax_scan"),
                "jax_loop/scan": ("jax_python_loop", "dsm_jax_scan"),
            },
        ),
        **out,
    )
