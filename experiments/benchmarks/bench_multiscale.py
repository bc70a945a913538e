"""``multiscale``: loss and gradient of multi-scale DSM at all L levels, ``jax.vmap`` over sigma against loops.

The library (vmap over sigma) against a Python loop over sigma, jitted JAX
and eager PyTorch, d = ``cfg["ms_dim"]``, every example at every level.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from harness import Bench, row, speedups
from seed_mlp import SIGMA_MAX, SIGMA_MIN, Net, data

from dsm_jax.losses import dsm_loss, multiscale_dsm_loss
from dsm_jax.noise import geometric_sigmas


def bench_multiscale(b: Bench) -> list:
    return [_multiscale_row(b, batch) for batch in b.cfg["ms_batches"]]


def _multiscale_row(b: Bench, batch: int) -> dict:
    cfg, tref, dim = b.cfg, b.tref, b.cfg["ms_dim"]
    sigmas = geometric_sigmas(SIGMA_MAX, SIGMA_MIN, cfg["ms_levels"])
    sig_list = [float(s) for s in np.asarray(sigmas)]
    net = Net(dim, cfg, tref)
    x = jnp.asarray(data(dim, batch))

    def vmapped(params, x, key):
        return multiscale_dsm_loss(net.model_fn(params), x, sigmas, key, weighting="sigma2", sigma_sampling="all")

    def looped(params, x, key):
        keys = jax.random.split(key, len(sig_list))
        total = sum(s**2 * dsm_loss(net.model_fn(params), x, s, k) for s, k in zip(sig_list, keys, strict=False))
        return total / len(sig_list)

    grad_v = jax.jit(jax.value_and_grad(vmapped))
    grad_l = jax.jit(jax.value_and_grad(looped))
    key = jax.random.key(0)
    contenders = {
        "vmap_over_sigma": b.blocking(grad_v, net.params, x, key),
        "jax_python_loop": b.blocking(grad_l, net.params, x, key),
    }
    if tref is not None:
        torch, ref = tref
        xt = torch.from_numpy(np.array(x))

        def torch_grad():
            net.torch_model.zero_grad()
            ref.multiscale_loss_loop(net.torch_model, xt, sig_list).backward()

        contenders["pytorch_loop"] = torch_grad
    timed = b.time(contenders)
    return row(
        f"d={dim} B={batch} L={len(sig_list)}",
        timed,
        speedups(
            timed,
            {
                "jax_loop/vmap": ("jax_python_loop", "vmap_over_sigma"),
                "torch_loop/vmap": ("pytorch_loop", "vmap_over_sigma"),
            },
        ),
    )
