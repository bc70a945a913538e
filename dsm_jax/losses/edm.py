"""The EDM training loss: a denoiser regressed on clean data at log-normal noise levels (Karras et al. 2022)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsm_jax._checks import check_finite, check_key, check_positive_number, check_sigma_schedule
from dsm_jax._utils import expand_to
from dsm_jax.losses._common import _check_data, _mean_per_level, _nearest_level, _sum_per_example
from dsm_jax.losses.denoising import is_key_batch
from dsm_jax.parameterization import check_parameterization, model_to_score, score_to_output

__all__ = ["edm_loss", "edm_weight"]


def edm_weight(sigma, sigma_data: float = 0.5) -> jax.Array:
    """``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``, written ``1/sigma^2 + 1/sigma_data^2``.

    It equals ``1 / c_out^2`` of :func:`dsm_jax.models.edm_coefficients`, so
    ``lambda |D - x|^2 = |F - F_target|^2``: unit weight on the raw network.
    """
    sigma = jnp.asarray(sigma)
    return 1.0 / sigma**2 + 1.0 / sigma_data**2


def _draw(key, x_shape, dtype, p_mean, p_std):
    """``sigma [B]`` with ``log sigma ~ N(p_mean, p_std^2)`` and ``n [B, *D]``.

    ``[B]`` keys: example ``j`` draws what a batch of one draws with ``key[j]``.
    """
    if is_key_batch(key):
        one = jax.vmap(lambda k: _draw(k, (1,) + tuple(x_shape[1:]), dtype, p_mean, p_std))(key)
        return one[0][:, 0], one[1][:, 0]
    k_sigma, k_n = jax.random.split(key)
    sigma = jnp.exp(p_mean + p_std * jax.random.normal(k_sigma, (x_shape[0],), dtype=dtype))
    return sigma, jax.random.normal(k_n, x_shape, dtype=dtype)


def edm_loss(
    model_fn,
    x: jax.Array,
    key: jax.Array,
    *,
    sigma_data: float = 0.5,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    parameterization: str = "x0",
    sigmas=None,
    return_per_sigma: bool = False,
):
    """EDM's loss (Karras et al. 2022, eq. 2, Table 1): ``E lambda(sigma) |D(x + sigma n, sigma) - x|^2``.

    ``log sigma ~ N(p_mean, p_std^2)`` per example, ``n ~ N(0, I)``, and
    ``lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``
    (:func:`edm_weight`); the squared error is summed over the data dimensions
    and averaged over the batch. Its minimiser is the posterior mean
    ``D*(y, sigma) = E[x | x + sigma n = y]`` at every sigma, and at ``D*`` it
    equals ``E_sigma lambda(sigma) E tr Cov[x | y]``; a denoiser off by ``h``
    costs ``E lambda |h|^2`` more. In score terms, ``|D - x|^2 = sigma^4 |s +
    n / sigma|^2`` (Tweedie), so this is the DSM loss with weight ``2 sigma^4
    lambda(sigma) = 2 sigma^2 (sigma^2 + sigma_data^2) / sigma_data^2`` at
    log-normal levels. Train :func:`dsm_jax.models.edm_precondition`'s
    denoiser with it (or :func:`dsm_jax.models.make_edm_loss_fn` for the
    library's networks).

    Args:
        model_fn: ``model_fn(x, sigma) -> out``, ``sigma: [B]``; a denoiser by default.
        x: clean data ``[B, *D]``.
        key: PRNG key, or ``[B]`` keys (example ``j`` then draws what a batch of one draws with ``key[j]``).
        sigma_data: standard deviation of the data.
        p_mean, p_std: mean and standard deviation of ``log sigma``.
        parameterization: what ``model_fn`` outputs; anything but "x0" is converted to
            the denoiser through its score (:func:`dsm_jax.parameterization.score_to_output`).
        sigmas: noise levels ``[L]`` for the diagnostics of ``return_per_sigma``.
        return_per_sigma: also return ``[L]``: the unweighted DSM loss
            ``1/2 |s + n / sigma|^2 = |D - x|^2 / (2 sigma^4)`` averaged over the
            examples whose sigma is nearest (in log scale) to each level of
            ``sigmas``, NaN where none is, as :func:`multiscale_dsm_loss` reports it.

    Returns:
        A scalar, or ``(scalar, [L])`` with ``return_per_sigma``.

    Example:
        >>> denoiser = lambda y, sigma: y / (1.0 + sigma[:, None] ** 2)  # exact for N(0, I)
        >>> x = jax.random.normal(jax.random.key(0), (256, 2))
        >>> float(edm_loss(denoiser, x, jax.random.key(1), sigma_data=1.0)) > 0
        True

    References:
        Karras, Aittala, Aila & Laine, "Elucidating the design space of
        diffusion-based generative models", NeurIPS 2022.
    """
    _check_data("x", x)
    check_key(key, allow_batch=True)
    check_positive_number("sigma_data", sigma_data)
    check_finite("p_mean", p_mean)
    check_positive_number("p_std", p_std)
    check_parameterization(parameterization)
    if parameterization == "energy":
        raise ValueError("parameterization 'energy' cannot be trained with edm_loss; give a denoiser ('x0').")
    if return_per_sigma:
        if sigmas is None:
            raise ValueError("return_per_sigma=True needs sigmas, the levels [L] of the diagnostics; got None.")
        check_sigma_schedule(sigmas, decreasing=False)
    sigma, n = _draw(key, x.shape, x.dtype, p_mean, p_std)
    y = x + expand_to(sigma, x) * n
    if parameterization == "x0":
        denoised = model_fn(y, sigma)
        if denoised.shape != x.shape:
            raise ValueError(f"model_fn returned shape {denoised.shape}, expected {x.shape}.")
    else:
        denoised = score_to_output(model_to_score(model_fn, y, sigma, parameterization), y, sigma, "x0")
    sq_error = _sum_per_example((denoised - x) ** 2)
    loss = jnp.mean(edm_weight(sigma, sigma_data) * sq_error)
    if return_per_sigma:
        levels = jnp.asarray(sigmas, dtype=x.dtype)
        return loss, _mean_per_level(sq_error / (2.0 * sigma**4), _nearest_level(sigma, levels), levels.shape[0])
    return loss
