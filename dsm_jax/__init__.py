"""dsm_jax: score-based generative modelling with denoising score matching in JAX.

Pure functions of arrays, PRNG keys and callables. A model is any callable
``model_fn(x, sigma) -> array`` with ``x: [B, *D]`` and ``sigma: [B]``.
"""

from dsm_jax import distributions, divergence, losses, noise, parameterization
from dsm_jax.distributions import Gaussian, GaussianMixture
from dsm_jax.divergence import exact_divergence, hutchinson_divergence
from dsm_jax.losses import (
    dsm_loss,
    explicit_score_matching_loss,
    multiscale_dsm_loss,
    per_sigma_dsm_losses,
    sliced_score_matching_loss,
    sure_loss,
)
from dsm_jax.noise import (
    geometric_sigmas,
    get_weighting,
    ncsnv2_num_levels,
    ncsnv2_sigma_max,
    ncsnv2_step_size,
    sample_log_uniform_sigmas,
)
from dsm_jax.parameterization import as_score_fn, score_from_model

__version__ = "0.1.0"

__all__ = [
    "Gaussian",
    "GaussianMixture",
    "as_score_fn",
    "distributions",
    "divergence",
    "dsm_loss",
    "exact_divergence",
    "explicit_score_matching_loss",
    "geometric_sigmas",
    "get_weighting",
    "hutchinson_divergence",
    "losses",
    "multiscale_dsm_loss",
    "ncsnv2_num_levels",
    "ncsnv2_sigma_max",
    "ncsnv2_step_size",
    "noise",
    "parameterization",
    "per_sigma_dsm_losses",
    "sample_log_uniform_sigmas",
    "score_from_model",
    "sliced_score_matching_loss",
    "sure_loss",
]
