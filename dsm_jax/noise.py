"""Noise levels: schedules, samplers, loss weightings and the NCSNv2 heuristics.

References:
    Song & Ermon, "Generative modeling by estimating gradients of the data
    distribution", NeurIPS 2019 (NCSN: geometric sigmas, lambda = sigma^2).
    Song & Ermon, "Improved techniques for training score-based generative
    models", NeurIPS 2020 (NCSNv2: techniques 1, 2 and 4 below).
    Hang et al., "Efficient diffusion training via Min-SNR weighting
    strategy", ICCV 2023 (the "min_snr" weighting).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax._checks import (
    check_batched,
    check_choice,
    check_in_float_range,
    check_key,
    check_positive_int,
    check_positive_number,
    check_sigma_schedule,
)
from dsm_jax._utils import row_blocks, sq_distances

WEIGHTINGS = ("sigma2", "one", "inv_sigma2", "min_snr")

Weighting = str | Callable[[jax.Array], jax.Array]


def _check_grid_ends(sigma_max, sigma_min, num) -> int:
    """``num`` checked, with the ends of a decreasing grid of ``num`` levels (the one check of both grids).

    The levels lie between the two ends, so the ends alone decide whether all
    are representable in float32.
    """
    check_positive_number("sigma_max", sigma_max)
    check_positive_number("sigma_min", sigma_min)
    num = check_positive_int("num", num)
    if num == 1:
        if sigma_max != sigma_min:
            raise ValueError(f"num=1 needs sigma_max == sigma_min, got {sigma_max} and {sigma_min}.")
    elif not sigma_max > sigma_min:
        raise ValueError(f"sigma_max must exceed sigma_min, got sigma_max={sigma_max}, sigma_min={sigma_min}.")
    check_in_float_range("sigma_max", sigma_max, jnp.float32)
    check_in_float_range("sigma_min", sigma_min, jnp.float32)
    return num


def geometric_sigmas(sigma_max: float, sigma_min: float, num: int) -> jax.Array:
    """``num`` noise levels from ``sigma_max`` down to ``sigma_min``, equally spaced in log.

    ``sigma_i = sigma_max * (sigma_min / sigma_max)^{i / (num - 1)}``, in
    float32. Both ends must be positive finite float32 numbers (between
    ``1.18e-38`` and ``3.4e38``): beyond, a level would underflow to 0 or
    overflow to inf.

    Example:
        >>> geometric_sigmas(10.0, 0.1, 3)
        Array([10. ,  1. ,  0.1], dtype=float32)
    """
    num = _check_grid_ends(sigma_max, sigma_min, num)
    return jnp.asarray(np.geomspace(sigma_max, sigma_min, num), dtype=jnp.float32)


def karras_sigmas(sigma_max: float, sigma_min: float, num: int, rho: float = 7.0) -> jax.Array:
    """``num`` noise levels from ``sigma_max`` down to ``sigma_min``, equally spaced in ``sigma^(1/rho)``.

    ``sigma_i = (sigma_max^(1/rho) + i / (num - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
    (Karras et al. 2022, Eq. 5), computed in float64 and returned in float32.
    ``rho = 7`` concentrates the levels at small sigma, where the
    probability-flow ODE curves most; ``rho -> inf`` tends to
    :func:`geometric_sigmas`, ``rho = 1`` is uniform in sigma. The ends are
    checked as in :func:`geometric_sigmas`. Samplers that step to sigma = 0
    (:func:`dsm_jax.samplers.heun` and the like) append that 0 themselves.

    Example:
        >>> karras_sigmas(80.0, 0.002, 4).tolist()
        [80.0, 9.723201751708984, 0.46997904777526855, 0.0020000000949949026]

    References:
        Karras, Aittala, Aila & Laine, "Elucidating the design space of
        diffusion-based generative models", NeurIPS 2022, Eq. 5.
    """
    check_positive_number("rho", rho)
    num = _check_grid_ends(sigma_max, sigma_min, num)
    hi, lo = float(sigma_max) ** (1.0 / rho), float(sigma_min) ** (1.0 / rho)
    levels = (hi + np.linspace(0.0, 1.0, num) * (lo - hi)) ** rho
    levels[0], levels[-1] = sigma_max, sigma_min  # the ends exactly, not through the power's rounding
    return jnp.asarray(levels, dtype=jnp.float32)


def sample_log_uniform_sigmas(
    key: jax.Array, shape, sigma_min: float | jax.Array, sigma_max: float | jax.Array, *, dtype=jnp.float32
) -> jax.Array:
    """``log sigma ~ Uniform(log sigma_min, log sigma_max)``: the continuous analogue of a geometric grid.

    Both ends must be positive finite numbers of ``dtype`` (as for :func:`geometric_sigmas`).
    """
    check_key(key)
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        check_positive_number(name, value)
        check_in_float_range(name, value, dtype)
    u = jax.random.uniform(key, shape, dtype=dtype)
    return sigma_min * (sigma_max / sigma_min) ** u


def min_snr_weighting(sigma, scale=1.0, *, gamma: float = 5.0) -> jax.Array:
    """Min-SNR-gamma (Hang et al. 2023) as the weight ``lambda(sigma)`` of the library's score-space DSM loss.

    With ``x~ = scale x0 + sigma eps`` and ``SNR = scale^2 / sigma^2``, the paper
    weights the x0-loss ``|x0_hat - x0|^2`` by ``min(SNR, gamma)``, which is the
    same objective as the eps-loss ``|eps_hat - eps|^2`` weighted by
    ``min(SNR, gamma) / SNR`` and (VP noising) the v-loss ``|v_hat - v|^2``
    weighted by ``min(SNR, gamma) / (SNR + 1)``. Every DSM loss of this library
    is ``lambda(sigma) * 1/2 |s + eps / sigma|^2`` whatever the model outputs,
    and the three errors are multiples of the score error (``x0_hat`` and
    ``eps_hat`` are tied by ``x~ = scale x0_hat + sigma eps_hat``, ``s = -eps_hat / sigma``):

    * eps: ``s + eps / sigma = (eps - eps_hat) / sigma``, so
      ``|eps_hat - eps|^2 = sigma^2 |s + eps/sigma|^2``;
    * x0: ``s + eps / sigma = scale (x0_hat - x0) / sigma^2``, so
      ``|x0_hat - x0|^2 = (sigma^2 / SNR) |s + eps/sigma|^2``;
    * v (``scale^2 + sigma^2 = 1``): ``v_hat - v = (eps_hat - eps) / scale``, so
      ``|v_hat - v|^2 = sigma^2 (SNR + 1) / SNR |s + eps/sigma|^2``.

    Each paper weight times its factor gives one and the same
    ``lambda(sigma) = sigma^2 min(SNR, gamma) / SNR = sigma^2 min(1, gamma / SNR)``
    (up to the constant 2 of the 1/2): the weighting is a property of the noise
    level, not of the parameterization, and it equals "sigma2" (the unit-weight
    eps-loss) wherever ``SNR <= gamma`` and falls as ``gamma sigma^4 / scale^2``
    at high SNR. It is computed as ``sigma^2 * (g / max(scale^2, g))`` with
    ``g = gamma sigma^2``: no division by zero at either zero-SNR end (``scale = 0``
    gives ``sigma^2``, ``sigma -> 0`` gives 0) and no overflow of an intermediate.

    Args:
        sigma: noise levels (any shape).
        scale: the signal scale, broadcasting against ``sigma`` (1 for VE noising).
        gamma: the SNR cap (5 in the paper).
    """
    check_positive_number("gamma", gamma)
    s2 = jnp.asarray(sigma) ** 2
    g = gamma * s2
    return s2 * (g / jnp.maximum(jnp.asarray(scale) ** 2, g))


def get_weighting(weighting: Weighting, *, scale=1.0, gamma: float = 5.0) -> Callable[[jax.Array], jax.Array]:
    """The weighting ``lambda(sigma)`` of the multi-scale loss.

    * "sigma2": ``lambda = sigma^2`` (Song & Ermon 2019): every level's loss
      ``sigma^2 * 1/2 |s + eps/sigma|^2 = 1/2 |sigma s + eps|^2`` is O(1).
    * "one": ``lambda = 1`` (small sigmas dominate).
    * "inv_sigma2": ``lambda = 1 / sigma^2`` (even more so).
    * "min_snr": ``lambda = sigma^2 min(1, gamma / SNR)``, ``SNR = scale^2 / sigma^2``
      (Hang et al. 2023; :func:`min_snr_weighting` derives it for every parameterization).
    * a callable ``sigma -> lambda(sigma)``, elementwise.

    ``scale`` (the noising's signal scale, scalar or broadcasting against sigma) and
    ``gamma`` are used by "min_snr" only.
    """
    if callable(weighting):
        return weighting
    check_choice("weighting", weighting, WEIGHTINGS)
    if weighting == "sigma2":
        return lambda sigma: sigma**2
    if weighting == "one":
        return jnp.ones_like
    if weighting == "min_snr":
        check_positive_number("gamma", gamma)
        return lambda sigma: min_snr_weighting(sigma, scale, gamma=gamma)
    return lambda sigma: 1.0 / sigma**2


# ---------------------------------------------------------------------------
# NCSNv2 heuristics
# ---------------------------------------------------------------------------


def ncsnv2_sigma_max(data, *, block_size: int = 1024) -> float:
    """Technique 1: ``sigma_1`` = the maximum Euclidean distance between training points.

    Computed block by block (``block_size`` rows against all rows at a time),
    so 60000 x 3072 never builds an N x N matrix.

    Args:
        data: ``[N, *D]`` training data.
        block_size: rows per block.

    Returns:
        The maximum pairwise distance, a Python float.
    """
    data = jnp.asarray(data, dtype=jnp.float32)
    check_batched("data", data)
    block_size = check_positive_int("block_size", block_size)
    flat = data.reshape(data.shape[0], -1)
    # Centering does not change distances and keeps |a|^2 + |b|^2 - 2ab well conditioned.
    flat = flat - jnp.mean(flat, axis=0)
    rows, mask = row_blocks(flat, block_size)

    @jax.jit
    def block_max(carry, block):
        r, valid = block
        d2 = jnp.where(valid[:, None] > 0, sq_distances(r, flat), 0.0)  # padding rows count as 0
        return jnp.maximum(carry, jnp.max(d2)), None

    best, _ = jax.lax.scan(block_max, jnp.float32(0.0), (rows, mask))
    return float(jnp.sqrt(jnp.maximum(best, 0.0)))


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def ncsnv2_overlap(gamma: float, dim: int) -> float:
    """``Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma)``."""
    a = math.sqrt(2.0 * dim) * (gamma - 1.0)
    return _phi(a + 3.0 * gamma) - _phi(a - 3.0 * gamma)


def ncsnv2_gamma(dim: int, target: float = 0.5) -> float:
    """The geometric ratio ``gamma = sigma_{i-1} / sigma_i`` with overlap ``target`` (technique 2)."""
    dim = check_positive_int("dim", dim)
    if not 0.0 < target < ncsnv2_overlap(1.0, dim):
        raise ValueError(f"target must be in (0, {ncsnv2_overlap(1.0, dim):.4f}), got {target}.")
    lo, hi = 1.0, 2.0
    while ncsnv2_overlap(hi, dim) > target:
        hi *= 2.0
    for _ in range(200):  # the overlap decreases in gamma: bisection
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ncsnv2_overlap(mid, dim) > target else (lo, mid)
    return 0.5 * (lo + hi)


def ncsnv2_num_levels(dim: int, sigma_max: float, sigma_min: float, *, target: float = 0.5) -> int:
    """Technique 2: how many geometric levels link ``sigma_max`` to ``sigma_min``.

    Picks the ratio ``gamma`` at which ``Phi(sqrt(2D)(gamma-1)+3gamma) -
    Phi(sqrt(2D)(gamma-1)-3gamma) = target`` (about 0.5) and returns
    ``ceil(log(sigma_max / sigma_min) / log(gamma)) + 1`` levels, so adjacent
    levels are at most ``gamma`` apart.

    Example:
        >>> ncsnv2_num_levels(3072, 50.0, 0.01)  # CIFAR-10; the paper used 232
        220
    """
    check_positive_number("sigma_max", sigma_max)
    check_positive_number("sigma_min", sigma_min)
    if not sigma_max > sigma_min:
        raise ValueError(f"sigma_max must exceed sigma_min, got sigma_max={sigma_max}, sigma_min={sigma_min}.")
    gamma = ncsnv2_gamma(dim, target)
    return int(math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma))) + 1


def ncsnv2_step_size_objective(eps: float, gamma: float, sigma_min: float, steps_per_sigma: int) -> float:
    """The technique-4 expression, which should be close to 1.

    ``(1 - eps/s^2)^{2T} (gamma^2 - 2 eps / (s^2 - s^2 (1 - eps/s^2)^2))
    + 2 eps / (s^2 - s^2 (1 - eps/s^2)^2)`` with ``s = sigma_L``, ``T`` steps.
    """
    s2 = sigma_min**2
    r = 1.0 - eps / s2
    c = 2.0 * eps / (s2 - s2 * r**2)
    return r ** (2 * steps_per_sigma) * (gamma**2 - c) + c


def ncsnv2_step_size(sigmas, steps_per_sigma: int) -> float:
    """Technique 4: the Langevin step ``eps`` that brings the expression closest to 1.

    ``gamma`` is the geometric ratio of ``sigmas`` (decreasing) and ``sigma_L``
    its last entry. The result follows the NCSNv2 convention
    ``x <- x + alpha s + sqrt(2 alpha) z`` with ``alpha_i = eps sigma_i^2 / sigma_L^2``;
    :func:`dsm_jax.samplers.annealed_langevin` follows NCSN's Algorithm 1
    (``alpha/2 s + sqrt(alpha) z``), so pass ``step_lr = 2 * eps`` there.

    Example:
        >>> sigmas = geometric_sigmas(50.0, 0.01, 232)   # gamma = 5000^(1/231)
        >>> round(ncsnv2_step_size(sigmas, 5), 8)        # the CIFAR-10 config used 6.2e-6
        6.18e-06
    """
    sig = np.asarray(sigmas, dtype=np.float64)
    check_sigma_schedule(sig)
    steps_per_sigma = check_positive_int("steps_per_sigma", steps_per_sigma)
    if sig.size < 2:
        raise ValueError(f"sigmas needs at least 2 levels to define gamma, got {sig.size}.")
    gamma = float(np.exp(np.mean(np.log(sig[:-1] / sig[1:]))))
    sigma_min = float(sig[-1])
    # eps ranges over (0, sigma_L^2); search a fine log grid, then refine by golden section.
    grid = sigma_min**2 * np.logspace(-12, -1e-9, 20000)
    vals = np.abs(np.array([ncsnv2_step_size_objective(e, gamma, sigma_min, steps_per_sigma) for e in grid]) - 1.0)
    i = int(np.argmin(vals))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    f = lambda e: abs(ncsnv2_step_size_objective(e, gamma, sigma_min, steps_per_sigma) - 1.0)
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(100):
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        lo, hi = (lo, b) if f(a) < f(b) else (a, hi)
    return float(0.5 * (lo + hi))
