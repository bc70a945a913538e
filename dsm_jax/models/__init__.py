"""Flax networks for ``model_fn(x, sigma)``: a noise-conditional MLP, a small U-Net, sigma embeddings.

Use :func:`make_model_fn` to turn ``(module, params)`` into the library's
model signature (optionally with NCSNv2's ``output / sigma``) and
:func:`make_dsm_loss_fn` for the multi-scale DSM training loss of a module;
:func:`edm_precondition` wraps a raw network into EDM's denoiser (Karras et al. 2022),
:func:`edm_model_fn` does so for these networks and :func:`make_edm_loss_fn` trains it.
"""

from dsm_jax.models.apply import (
    flow_model_fn,
    init_params,
    make_conditional_model_fn,
    make_dsm_loss_fn,
    make_edm_loss_fn,
    make_flow_matching_loss_fn,
    make_model_fn,
    make_score_fn,
    make_velocity_fn,
)
from dsm_jax.models.covariance import CovarianceMLP
from dsm_jax.models.embeddings import GaussianFourierEmbedding, LabelEmbedding, SigmaEmbedding, sinusoidal_embedding
from dsm_jax.models.mlp import NoiseConditionalMLP
from dsm_jax.models.precondition import EDMCoefficients, edm_coefficients, edm_model_fn, edm_precondition
from dsm_jax.models.unet import UNet

__all__ = [
    "CovarianceMLP",
    "EDMCoefficients",
    "GaussianFourierEmbedding",
    "LabelEmbedding",
    "NoiseConditionalMLP",
    "SigmaEmbedding",
    "UNet",
    "edm_coefficients",
    "edm_model_fn",
    "edm_precondition",
    "flow_model_fn",
    "init_params",
    "make_conditional_model_fn",
    "make_dsm_loss_fn",
    "make_edm_loss_fn",
    "make_flow_matching_loss_fn",
    "make_model_fn",
    "make_score_fn",
    "make_velocity_fn",
    "sinusoidal_embedding",
]
