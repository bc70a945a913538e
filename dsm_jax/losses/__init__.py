"""The score-matching family of objectives, as pure functions.

Conventions: ``x: [B, *D]``; losses are averaged over the batch and summed
over data dimensions; keys are explicit. Every loss is jit-compatible and
differentiable in the model's parameters (close over them, or pass a
``functools.partial``). A ``model_fn(x, sigma)`` gets ``sigma`` of shape
``[B]``; its output is turned into a score by
:func:`dsm_jax.parameterization.score_from_model`.

Checks: before tracing, every loss checks shapes, that the data are floating
point, the keys (``jax.random.key(seed)``, not an int), the names, and every
concrete value (sigma > 0 and finite, a schedule's order). A value traced
under ``jit`` (a sigma passed as an argument of the jitted function, the data)
is only checked at run time, and only with the opt-in ``checkify`` checks of
:func:`dsm_jax.debug_checks` (sigma finite and > 0, data finite): off by
default, so a loss traced without them holds no extra operation.

References:
    Hyvarinen, "Estimation of non-normalized statistical models by score
    matching", JMLR 2005 (explicit score matching).
    Vincent, "A connection between score matching and denoising
    autoencoders", Neural Computation 2011 (DSM).
    Song, Garg, Shi & Ermon, "Sliced score matching", UAI 2019.
    Song & Ermon, NeurIPS 2019 (multi-scale DSM, NCSN).
    Stein, "Estimation of the mean of a multivariate normal distribution",
    Annals of Statistics 1981 (SURE).
    Karras, Aittala, Aila & Laine, NeurIPS 2022 (EDM loss, :func:`edm_loss`).
"""

from dsm_jax.losses.denoising import (
    SDE_WEIGHTINGS,
    SIGMA_SAMPLING,
    dsm_loss,
    is_key_batch,
    multiscale_dsm_loss,
    per_sigma_dsm_losses,
    sde_dsm_loss,
    sure_loss,
)
from dsm_jax.losses.edm import edm_loss, edm_weight
from dsm_jax.losses.flow_matching import flow_matching_loss
from dsm_jax.losses.generalized import (
    SECOND_ORDER_TARGETS,
    GradientOperator,
    TweedieOperator,
    generalized_score_matching_loss,
    second_order_dsm_loss,
)
from dsm_jax.losses.score_matching import explicit_score_matching_loss, sliced_score_matching_loss

__all__ = [
    "SECOND_ORDER_TARGETS",
    "GradientOperator",
    "TweedieOperator",
    "generalized_score_matching_loss",
    "second_order_dsm_loss",
    "SDE_WEIGHTINGS",
    "SIGMA_SAMPLING",
    "dsm_loss",
    "edm_loss",
    "edm_weight",
    "explicit_score_matching_loss",
    "flow_matching_loss",
    "is_key_batch",
    "multiscale_dsm_loss",
    "per_sigma_dsm_losses",
    "sde_dsm_loss",
    "sliced_score_matching_loss",
    "sure_loss",
]
