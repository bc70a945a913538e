"""From a Flax module and its parameters to the library's ``model_fn(x, sigma)``.

The one place where a network's raw output is post-processed before the
parameterization (score / eps / x0, handled by :mod:`dsm_jax.parameterization`)
turns it into a score. The only post-processing is NCSNv2's technique 3,
``output / sigma`` (Song & Ermon 2020): a network whose raw output is O(1)
at every noise level then represents a score of size ``~1 / sigma``.

References:
    Song & Ermon, "Improved techniques for training score-based generative
    models", NeurIPS 2020 (technique 3: noise conditioning by ``1 / sigma``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsm_jax.parameterization import as_score_fn, broadcast_sigma, expand_to


def init_params(model: nn.Module, key: jax.Array, x: jax.Array) -> Any:
    """Initial parameters of a noise-conditional module for inputs shaped like ``x [B, *D]``.

    ``model.init`` is compiled once (not op by op). On CPU it is compiled
    without XLA backend optimisations: it runs once, and the compilation of
    one random draw per parameter would otherwise take several seconds for a
    U-Net (the draws agree with an optimised compile to float rounding).
    """
    x = jnp.asarray(x)[:1]
    sigma = jnp.ones((1,), x.dtype)
    lowered = jax.jit(lambda k: model.init(k, x, sigma)["params"]).lower(key)
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return lowered.compile(compiler_options=options)(key)


def make_model_fn(model: nn.Module, params: Any, *, scale_by_sigma: bool = False):
    """``model_fn(x, sigma) = model.apply(params, x, sigma)``, optionally divided by sigma.

    Args:
        model: a Flax linen module called as ``model(x, sigma)`` with ``sigma: [B]``.
        params: its ``"params"`` collection.
        scale_by_sigma: return ``output / sigma`` (NCSNv2).

    Returns:
        ``model_fn(x, sigma) -> [B, *D]``; ``sigma`` may be a scalar or ``[B]``.

    Example:
        >>> from dsm_jax.models import NoiseConditionalMLP
        >>> model = NoiseConditionalMLP(width=32, depth=1)
        >>> params = init_params(model, jax.random.key(0), jnp.zeros((1, 2)))
        >>> model_fn = make_model_fn(model, params, scale_by_sigma=True)
        >>> model_fn(jnp.ones((3, 2)), 0.5).shape
        (3, 2)
    """

    def model_fn(x, sigma):
        sigma = broadcast_sigma(sigma, x)
        out = model.apply({"params": params}, x, sigma)
        if scale_by_sigma:
            out = out / expand_to(sigma, out)
        return out

    return model_fn


def make_score_fn(
    model: nn.Module,
    params: Any,
    *,
    parameterization: str = "score",
    scale_by_sigma: bool = False,
    scale=1.0,
):
    """``score_fn(x, sigma)``: :func:`make_model_fn` converted by :func:`dsm_jax.parameterization.as_score_fn`."""
    return as_score_fn(make_model_fn(model, params, scale_by_sigma=scale_by_sigma), parameterization=parameterization, scale=scale)
