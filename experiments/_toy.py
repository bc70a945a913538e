"""Shared pieces of the score-matching-family and 2-D studies (1-6, 9).

Training a noise-conditional MLP with multi-scale DSM, annealed Langevin
sampling, MMD read against its two-sample floor, and score-field quivers.
Everything else comes from the library and ``_common``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import _common as C
import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax.data import BatchSource
from dsm_jax.metrics import fisher_divergence, mmd2, mmd2_floor, mode_weights, per_sigma_fisher_divergence
from dsm_jax.models import NoiseConditionalMLP, init_params, make_model_fn
from dsm_jax.noise import ncsnv2_step_size
from dsm_jax.samplers import annealed_langevin
from dsm_jax.train import make_dsm_loss_fn


@functools.partial(jax.jit, static_argnums=2)
def draw(distribution, key: jax.Array, n: int) -> jax.Array:
    """``distribution.sample(key, n)`` compiled once per shape (eager sampling compiles op by op)."""
    return distribution.sample(key, n)


def sampler(distribution) -> Callable:
    """``(key, n) -> samples`` of a distribution, for :func:`dsm_jax.metrics.mmd2_floor`."""
    return functools.partial(draw, distribution)


def fisher_on_points(model_fn, mixture, sigmas, x) -> np.ndarray:
    """Relative Fisher divergence to the exact noised score at each level, on the fixed points ``x`` (one jit)."""
    x = jnp.asarray(x)

    def table(levels, points):  # points as an argument, not a constant XLA would try to fold
        def one(sigma):
            sigma_b = jnp.full((points.shape[0],), sigma, points.dtype)
            return fisher_divergence(
                lambda z: model_fn(z, sigma_b), mixture.convolve(sigma).score, points, relative=True
            )

        return jax.lax.map(one, levels)

    return np.asarray(jax.jit(table)(jnp.asarray(sigmas, x.dtype), x))


def relative_fisher(score_fn: Callable, target_score_fn: Callable, x) -> float:
    """Relative Fisher divergence ``E|s - s*|^2 / E|s*|^2`` over the points ``x`` (jitted)."""
    return float(jax.jit(lambda z: fisher_divergence(score_fn, target_score_fn, z, relative=True))(x))


def per_sigma_fisher(model_fn, mixture, sigmas, key, *, parameterization: str = "score", num_samples: int = 4000):
    """Relative Fisher divergence to the exact noised score at every level, ``[L]`` numpy (jitted)."""
    run = jax.jit(
        lambda k: per_sigma_fisher_divergence(
            model_fn, mixture, jnp.asarray(sigmas), k, num_samples=num_samples, parameterization=parameterization
        )
    )
    return np.asarray(run(key).relative)


def mlp(quick: bool = False) -> NoiseConditionalMLP:
    """The MLP of the 2-D studies: 128 wide, 3 residual blocks (quick: 16 wide, none, to compile fast).

    Fourier features of log sigma at scale 1: the levels span decades.
    """
    return NoiseConditionalMLP(width=16 if quick else 128, depth=0 if quick else 3, fourier_scale=1.0)


def train_dsm(
    data: np.ndarray,
    sigmas,
    *,
    steps: int,
    seed: int,
    batch_size: int = 256,
    weighting="sigma2",
    parameterization: str = "score",
    sigma_sampling: str = "all",
    scale_by_sigma: bool = False,
    learning_rate: float = 1e-3,
    model: NoiseConditionalMLP | None = None,
    quick: bool = False,
):
    """Multi-scale DSM (one level is single-sigma DSM) of an MLP on ``data``.

    Returns:
        ``(model_fn, info)``: the EMA model as ``model_fn(x, sigma)`` (its
        output means ``parameterization``) and ``fit``'s info.
    """
    model = mlp(quick) if model is None else model
    params = init_params(model, jax.random.key(seed + 1), jnp.asarray(data[:1]))
    loss_fn = make_dsm_loss_fn(
        model,
        jnp.asarray(sigmas),
        weighting=weighting,
        parameterization=parameterization,
        sigma_sampling=sigma_sampling,
        scale_by_sigma=scale_by_sigma,
    )
    batches = BatchSource(data, batch_size, seed=seed)
    state, info = C.fit(loss_fn, params, batches, num_steps=steps, learning_rate=learning_rate, seed=seed)
    return make_model_fn(model, state.ema_params, scale_by_sigma=scale_by_sigma), info


def annealed_samples(
    model_fn,
    sigmas,
    key,
    n: int,
    *,
    steps_per_sigma: int,
    parameterization: str = "score",
    dim: int = 2,
    return_trajectory: bool = False,
):
    """Annealed Langevin from ``sigma_1 N(0, I)``, step size by NCSNv2's technique 4.

    Returns:
        ``(samples, trajectory or None, step_lr)``.
    """
    sigmas = jnp.asarray(sigmas)
    step_lr = 2.0 * ncsnv2_step_size(np.asarray(sigmas), steps_per_sigma)
    k0, k1 = jax.random.split(key)
    x0 = sigmas[0] * jax.random.normal(k0, (n, dim))
    run = jax.jit(
        lambda x0, k: annealed_langevin(
            model_fn,
            x0,
            k,
            sigmas,
            steps_per_sigma=steps_per_sigma,
            step_lr=step_lr,
            parameterization=parameterization,
            return_trajectory=return_trajectory,
        )
    )
    out = run(x0, k1)
    samples, traj = out if return_trajectory else (out, None)
    return np.asarray(samples), traj, step_lr


def mmd_vs_floor(samples, reference: Callable, held_out, key, *, num_pairs: int = 8, bandwidth=None) -> dict:
    """Unbiased MMD^2 of ``samples`` against ``held_out`` next to its two-sample floor.

    ``held_out`` holds at least ``len(samples)`` fresh points of the data
    law; the floor is the RMS of the same statistic between fresh draws of
    ``reference(key, n)`` and ``held_out`` (same ``n``, same bandwidth:
    ``bandwidth``, default the median heuristic of the first null pair).
    Non-finite samples (a diverged chain) are counted and dropped.
    """
    samples = np.asarray(samples)
    finite = np.all(np.isfinite(samples), axis=1)
    samples = samples[finite]
    n = samples.shape[0]
    against = jnp.asarray(held_out[:n])
    floor = mmd2_floor(reference, key, n, against=against, num_pairs=num_pairs, bandwidth=bandwidth)
    value = float(mmd2(jnp.asarray(samples), against, bandwidth=floor.bandwidth))
    return {
        "mmd2": value,
        "floor": float(floor.floor),
        "ratio_to_floor": value / float(floor.floor),
        "bandwidth": float(floor.bandwidth),
        "n": int(n),
        "non_finite_samples": int((~finite).sum()),
    }


def mmd_two_bandwidths(samples, reference: Callable, held_out, key, local: float) -> dict:
    """:func:`mmd_vs_floor` at the median bandwidth (global shape, mode weights) and at ``local`` (blur)."""
    return {
        f"h_{h}": mmd_vs_floor(samples, reference, held_out, key, bandwidth=None if h == "median" else h)
        for h in ("median", local)
    }


def mode_summary(samples, mixture, true_weights) -> dict:
    """Mode weights of the finite samples within 3 std of a mode, their total variation to ``true_weights``.

    Weights are zeros when no sample is near any mode (then the TV is 1/2 + 1/2 = 1 by convention).
    """
    samples = np.asarray(samples)
    finite = samples[np.all(np.isfinite(samples), axis=1)]
    modes = mode_weights(jnp.asarray(finite), mixture, max_mahalanobis=3.0)
    counts = np.asarray(modes.counts)
    weights = counts / max(counts.sum(), 1.0)
    tv = 0.5 * np.abs(weights - np.asarray(true_weights)).sum() if counts.sum() else 1.0
    return {
        "mode_weights": weights,
        "mode_weights_tv": float(tv),
        "off_mode_fraction": 1.0 - float(counts.sum()) / samples.shape[0],
    }


def quiver(ax, score_fn: Callable, *, lim: float = 4.5, num: int = 19, title: str = "", background=None):
    """Score arrows on a ``num x num`` grid of ``[-lim, lim]^2`` (normalised length, colour = log |s|)."""
    g = np.linspace(-lim, lim, num)
    grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2).astype(np.float32)
    v = np.asarray(score_fn(jnp.asarray(grid)), np.float64)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    u = v / np.maximum(norm, 1e-12)
    if background is not None:
        ax.scatter(background[:, 0], background[:, 1], s=2, linewidths=0, color="lightsteelblue")
    ax.quiver(
        grid[:, 0],
        grid[:, 1],
        u[:, 0],
        u[:, 1],
        np.log10(norm[:, 0] + 1e-12),
        angles="xy",
        cmap="viridis",
        pivot="mid",
        scale=num * 1.2,
        width=0.004,
    )
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)


def sigma_fn(model_fn, sigma: float) -> Callable:
    """``x -> model_fn(x, sigma)`` (jitted), for plots and metrics at one level."""
    return jax.jit(lambda x: model_fn(x, jnp.full((x.shape[0],), sigma, x.dtype)))
