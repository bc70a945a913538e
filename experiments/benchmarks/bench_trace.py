"""``explicit_sm`` and ``memory``: the exact trace of the score's Jacobian, in time and in memory.

``explicit_sm``: explicit score-matching training step with the exact trace,
d in ``cfg["esm_dims"]``: the library's jvp trace (its default
``chunk_size="auto"``, the whole basis, chunks of d/4) against ``jax.jacfwd``
+ trace and the PyTorch autograd loop. ``memory``: peak memory of the exact
trace at d = ``cfg["mem_dim"]`` with and without chunking, from the compiled
executables' ``memory_analysis()``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from bench_dsm_step import library_train_step
from harness import Bench, row, speedups
from seed_mlp import ESM_SIGMA, Net, data

from dsm_jax.divergence import exact_divergence, resolve_chunk_size
from dsm_jax.losses import explicit_score_matching_loss


def _jacfwd_esm_loss(score_fn, x):
    """Explicit SM with the per-example Jacobian from ``jax.jacfwd``, then its trace."""
    single = lambda xi: score_fn(xi[None])[0]
    jac = jax.vmap(jax.jacfwd(single))(x)
    s = score_fn(x)
    return jnp.mean(jnp.trace(jac, axis1=1, axis2=2) + 0.5 * jnp.sum(s**2, axis=-1))


def bench_explicit_sm(b: Bench) -> list:
    return [_explicit_sm_row(b, dim) for dim in b.cfg["esm_dims"]]


def _explicit_sm_row(b: Bench, dim: int) -> dict:
    cfg, tref, batch = b.cfg, b.tref, b.cfg["esm_batch"]
    net = Net(dim, cfg, tref)
    x = jnp.asarray(data(dim, batch))
    chunk = max(1, dim // 4)
    losses = {
        "jvp": lambda p, x, k: explicit_score_matching_loss(net.score_fn(p), x),  # the default, chunk_size="auto"
        "jvp_whole_basis": lambda p, x, k: explicit_score_matching_loss(net.score_fn(p), x, chunk_size=None),
        f"jvp_chunk{chunk}": lambda p, x, k: explicit_score_matching_loss(net.score_fn(p), x, chunk_size=chunk),
        "jacfwd_trace": lambda p, x, k: _jacfwd_esm_loss(net.score_fn(p), x),
    }
    contenders = {}
    for name, loss in losses.items():
        step, state = library_train_step(loss, net.params)
        contenders[name] = b.stepper(step, state, [(x, jax.random.key(0))])
    if tref is not None:
        torch, ref = tref
        opt = net.torch_optimizer()
        xt = torch.from_numpy(np.array(x))
        contenders["pytorch_autograd_loop"] = lambda: ref.train_step(
            net.torch_model, opt, ref.explicit_sm_loss, xt, ESM_SIGMA
        )
    timed = b.time(contenders)
    return row(
        f"d={dim} B={batch}",
        timed,
        speedups(
            timed,
            {
                "torch/jvp": ("pytorch_autograd_loop", "jvp"),
                "torch/jvp_whole_basis": ("pytorch_autograd_loop", "jvp_whole_basis"),
                "torch/jvp_chunked": ("pytorch_autograd_loop", f"jvp_chunk{chunk}"),
                "jacfwd/jvp": ("jacfwd_trace", "jvp"),
            },
        ),
        auto_chunk_size=resolve_chunk_size("auto", batch, dim),
    )


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("temp", "argument", "output", "alias")}
    out["total"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    return out


def bench_memory(b: Bench) -> list:
    cfg = b.cfg
    dim, batch, chunk = cfg["mem_dim"], cfg["mem_batch"], cfg["mem_chunk"]
    net = Net(dim, cfg, None)
    x = jnp.asarray(data(dim, batch))
    rows = []
    for what, make in (
        ("exact_divergence", lambda c: lambda p, x: exact_divergence(net.score_fn(p), x, chunk_size=c)),
        (
            "explicit_sm_grad",
            lambda c: jax.grad(lambda p, x: explicit_score_matching_loss(net.score_fn(p), x, chunk_size=c)),
        ),
    ):
        mem = {
            name: _memory(b.compiled(jax.jit(make(c)), net.params, x))
            for name, c in (("whole_basis", None), (f"chunk{chunk}", chunk))
        }
        rows.append(
            {
                "setting": f"{what} d={dim} B={batch}",
                "bytes": mem,
                "ratios": {"whole/chunked": mem["whole_basis"]["total"] / mem[f"chunk{chunk}"]["total"]},
            }
        )
    return rows
