"""``dsm_step``: the library's multi-scale DSM training step against the PyTorch reference.

Log-uniform sigma, sigma^2 weighting, Adam; one step per call, ``k`` steps
per call (:func:`dsm_jax.train.make_multi_step`) and the whole-batch key
variant, d in ``cfg["dsm_dims"]``, batch in ``cfg["dsm_batches"]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from harness import Bench, row, speedups
from seed_mlp import LEARNING_RATE, SIGMA_MAX, SIGMA_MIN, Net, data, keys

from dsm_jax.models import make_dsm_loss_fn
from dsm_jax.noise import geometric_sigmas
from dsm_jax.train import create_train_state, make_multi_step, make_train_step


def jax_dsm_step(b: Bench, net: Net, steps_per_call: int = 1, *, per_example_keys: bool = True):
    """``(step, state)``: the library's DSM training step (``make_dsm_loss_fn`` + ``make_train_step``), jitted.

    ``step(state, x, key) -> state``. Plain Adam (no clipping), as the
    reference; the library's default EMA (0.999) is kept, work the reference
    does not do. With ``steps_per_call > 1``, ``x`` is ``[k, B, d]`` and the
    ``k`` steps run in one call of :func:`dsm_jax.train.make_multi_step`.
    ``per_example_keys`` is :func:`make_train_step`'s option (default True:
    one key per example).
    """
    optimizer = optax.adam(LEARNING_RATE)
    state = create_train_state(net.params, optimizer)
    shape = (net.module.dim, net.module.hidden, net.module.num_layers)
    # One jitted function per network shape, so that its compilations are shared.
    step = b.once(
        ("dsm_step", shape, steps_per_call, per_example_keys),
        lambda: _make_dsm_step(net.module, optimizer, steps_per_call, per_example_keys),
    )
    return step, state


def _make_dsm_step(module, optimizer, steps_per_call, per_example_keys):
    sigmas = geometric_sigmas(SIGMA_MAX, SIGMA_MIN, 10)
    loss_fn = make_dsm_loss_fn(module, sigmas, weighting="sigma2", sigma_sampling="log_uniform")
    step = make_train_step(loss_fn, optimizer, per_example_keys=per_example_keys)
    if steps_per_call == 1:
        return jax.jit(lambda s, x, k: step(s, x, k)[0], donate_argnums=0)
    run_steps = make_multi_step(step)
    return jax.jit(lambda s, xs, k: run_steps(s, xs, k)[0], donate_argnums=0)


def library_train_step(loss_fn, params):
    """``(step, state)``: the library's train step for ``loss_fn(params, x, key)`` (whole batch, one key), plain Adam, jitted."""
    optimizer = optax.adam(LEARNING_RATE)
    step = make_train_step(loss_fn, optimizer, per_example_keys=False)
    return jax.jit(lambda s, x, k: step(s, x, k)[0], donate_argnums=0), create_train_state(params, optimizer)


def bench_dsm_step(b: Bench) -> list:
    return [_dsm_step_row(b, dim, batch) for dim in b.cfg["dsm_dims"] for batch in b.cfg["dsm_batches"]]


def _dsm_step_row(b: Bench, dim: int, batch: int) -> dict:
    cfg, tref, k = b.cfg, b.tref, b.cfg["steps_per_call"]
    net = Net(dim, cfg, tref)
    x = data(dim, batch)
    step, state = jax_dsm_step(b, net)
    step_bk, state_bk = jax_dsm_step(b, net, per_example_keys=False)
    many, state_k = jax_dsm_step(b, net, k)
    xs = jnp.asarray(np.stack([data(dim, batch, s) for s in range(k)]))
    contenders = {
        "dsm_jax": b.stepper(step, state, [(jnp.asarray(x), key) for key in keys()]),
        "dsm_jax_batch_key": b.stepper(step_bk, state_bk, [(jnp.asarray(x), key) for key in keys()]),
        f"dsm_jax_{k}_per_call": b.stepper(many, state_k, [(xs, key) for key in keys()]),
    }
    if tref is not None:
        torch, ref = tref
        opt = net.torch_optimizer()
        xt = torch.from_numpy(x)
        contenders["pytorch"] = lambda: ref.train_step(
            net.torch_model, opt, ref.dsm_loss_log_uniform, xt, SIGMA_MIN, SIGMA_MAX
        )
    timed = b.time(contenders)
    timed[f"dsm_jax_{k}_per_call"]["median_s"] /= k  # per step
    return row(
        f"d={dim} B={batch}",
        timed,
        speedups(
            timed,
            {
                "torch/jax": ("pytorch", "dsm_jax"),
                "torch/jax_batch_key": ("pytorch", "dsm_jax_batch_key"),
                "torch/jax_k_per_call": ("pytorch", f"dsm_jax_{k}_per_call"),
                "jax/jax_k_per_call": ("dsm_jax", f"dsm_jax_{k}_per_call"),
            },
        ),
        steps_per_call=k,
    )
