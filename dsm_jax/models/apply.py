"""From a Flax module and its parameters to the library's ``model_fn(x, sigma)``, and its DSM loss.

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

from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsm_jax._checks import check_choice, check_sigma_schedule
from dsm_jax.losses import SIGMA_SAMPLING, edm_loss, is_key_batch, multiscale_dsm_loss
from dsm_jax.models.precondition import edm_model_fn
from dsm_jax.noise import Weighting, get_weighting
from dsm_jax.parameterization import as_score_fn, broadcast_sigma, check_parameterization, expand_to

# Folded into a training-loss key to give the dropout masks their own random stream.
_DROPOUT_STREAM = 0x64726F70  # "drop"


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
    options: dict[str, Any] | None = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return lowered.compile(compiler_options=options)(key)


def uses_dropout(model: nn.Module) -> bool:
    """True when ``model`` has a positive ``dropout`` attribute (``UNet(dropout=0.1)``): trained with ``train=True``."""
    return float(getattr(model, "dropout", 0.0) or 0.0) > 0.0


def dropout_rng_of(model: nn.Module, key: jax.Array) -> jax.Array | None:
    """The dropout key of one training-loss call, or ``None`` for a module without dropout.

    The loss's own key (or, for ``[B]`` per-example keys, the first
    example's) folded with a fixed stream number: the masks of a step are
    a function of ``(seed, step)`` (and the device) and the noise draws are untouched. One key
    covers the loss's single model call, whose masks are independent across
    every example and level of that call; under data parallelism each device
    draws from its own first example's key, so, unlike the noise, the masks
    of an example depend on the device count.
    """
    if not uses_dropout(model):
        return None
    first = key[0] if is_key_batch(key) else key
    return jax.random.fold_in(first, _DROPOUT_STREAM)


def make_model_fn(model: nn.Module, params: Any, *, scale_by_sigma: bool = False, dropout_rng=None):
    """``model_fn(x, sigma) = model.apply(params, x, sigma)``, optionally divided by sigma.

    Args:
        model: a Flax linen module called as ``model(x, sigma)`` with ``sigma: [B]``.
        params: its ``"params"`` collection.
        scale_by_sigma: return ``output / sigma`` (NCSNv2).
        dropout_rng: ``None`` (the default: the deterministic network, for
            sampling and evaluation), or a PRNG key: the module is then called
            in training mode, ``model(x, sigma, train=True)`` with
            ``rngs={"dropout": dropout_rng}`` (see :func:`dropout_rng_of`).

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

    train_kwargs = {} if dropout_rng is None else {"train": True, "rngs": {"dropout": dropout_rng}}

    def model_fn(x, sigma):
        sigma = broadcast_sigma(sigma, x)
        # one output, no mutable collections
        out = cast(jax.Array, model.apply({"params": params}, x, sigma, **train_kwargs))
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
    return as_score_fn(
        make_model_fn(model, params, scale_by_sigma=scale_by_sigma), parameterization=parameterization, scale=scale
    )


def make_dsm_loss_fn(
    model: nn.Module,
    sigmas,
    *,
    weighting: Weighting = "sigma2",
    parameterization: str = "score",
    sigma_sampling: str = "stratified",
    scale_by_sigma: bool = False,
):
    """Multi-scale DSM of a Flax module as ``loss_fn(params, x, keys) -> (loss, {"per_sigma_loss": [L]})``.

    ``loss = sum_i lambda(sigma_i) L(sigma_i) / L`` by
    :func:`dsm_jax.losses.multiscale_dsm_loss` on
    ``make_model_fn(model, params, scale_by_sigma=...)``: the training
    loss of :func:`dsm_jax.train.train` for a noise-conditional network.

    The loss takes one key per example (``keys: [B]``, as
    ``multiscale_dsm_loss`` does), so :func:`dsm_jax.train.make_train_step`
    should pass it the key batch (``loss_takes_key_batch=True``); the
    function is also marked ``loss_fn.accepts_key_batch = True``, which
    ``make_train_step`` reads when that argument is not given.

    ``sigma_sampling`` defaults to "stratified", as the CLI: every example
    at every level, each level jittered log-uniformly inside its cell of the
    grid, so the model is also trained between the levels, where the
    reverse-SDE and probability-flow ODE samplers query it. "all" (the exact
    levels) suffices for annealed Langevin, which only queries the grid, but
    not for the ODE: on a 3-D, 4-component mixture the ODE's samples were
    tens of MMD floors away with flattened mode weights although every
    per-sigma Fisher divergence on the grid looked healthy, against under 3
    floors with "stratified" (``tests/test_defaults.py``). Both cost ``L``
    model evaluations per example; "random" (one level per example) costs 1
    and suits models whose step is expensive (the digits U-Net). Stratified
    levels want a smooth sigma embedding: see ``fourier_scale`` of
    :class:`dsm_jax.models.NoiseConditionalMLP`.

    A module with dropout (a positive ``dropout`` attribute, e.g.
    ``UNet(dropout=0.1)``) is called in training mode with a dropout key
    drawn from the loss's key (:func:`dropout_rng_of`); any other module is
    called exactly as :func:`make_model_fn` calls it for sampling.

    Args:
        model: a Flax module called as ``model(x, sigma)``.
        sigmas: the noise levels ``[L]``.
        weighting, parameterization, sigma_sampling: as in
            :func:`dsm_jax.losses.multiscale_dsm_loss`.
        scale_by_sigma: NCSNv2's ``output / sigma`` (see :func:`make_model_fn`).

    Returns:
        ``loss_fn(params, x, keys)``.
    """
    check_sigma_schedule(sigmas, decreasing=False, monotone=sigma_sampling == "stratified")
    check_parameterization(parameterization)
    check_choice("sigma_sampling", sigma_sampling, SIGMA_SAMPLING)
    get_weighting(weighting)
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def loss_fn(params, x, key):
        model_fn = make_model_fn(model, params, scale_by_sigma=scale_by_sigma, dropout_rng=dropout_rng_of(model, key))
        loss, per_sigma = multiscale_dsm_loss(
            model_fn,
            x,
            sigmas,
            key,
            weighting=weighting,
            parameterization=parameterization,
            sigma_sampling=sigma_sampling,
            return_per_sigma=True,
        )
        return loss, {"per_sigma_loss": per_sigma}

    loss_fn.accepts_key_batch = True  # pyright: ignore[reportFunctionMemberAccess]  (read by make_train_step)
    return loss_fn


def make_edm_loss_fn(
    model: nn.Module,
    sigmas,
    *,
    sigma_data: float = 0.5,
    p_mean: float = -1.2,
    p_std: float = 1.2,
):
    """EDM training of a Flax module as ``loss_fn(params, x, keys) -> (loss, {"per_sigma_loss": [L]})``.

    :func:`dsm_jax.losses.edm_loss` on the preconditioned denoiser
    :func:`dsm_jax.models.edm_model_fn` (``parameterization="x0"``): log-normal
    sigma, weight ``(sigma^2 + sigma_data^2) / (sigma sigma_data)^2``. Like
    :func:`make_dsm_loss_fn` it takes one key per example
    (``loss_fn.accepts_key_batch = True``) and reports the unweighted per-level
    DSM loss on the grid ``sigmas`` (each example binned to its nearest level
    in log scale), for the training diagnostics and plots. Dropout as in
    :func:`make_dsm_loss_fn`.

    Args:
        model: a Flax module called as ``model(x, sigma)``.
        sigmas: the levels ``[L]`` of the diagnostics (the run's sampling grid).
        sigma_data, p_mean, p_std: as in :func:`dsm_jax.losses.edm_loss`.

    Returns:
        ``loss_fn(params, x, keys)``.
    """
    check_sigma_schedule(sigmas, decreasing=False)
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def loss_fn(params, x, key):
        denoiser = edm_model_fn(model, params, sigma_data=sigma_data, dropout_rng=dropout_rng_of(model, key))
        loss, per_sigma = edm_loss(
            denoiser,
            x,
            key,
            sigma_data=sigma_data,
            p_mean=p_mean,
            p_std=p_std,
            sigmas=sigmas,
            return_per_sigma=True,
        )
        return loss, {"per_sigma_loss": per_sigma}

    loss_fn.accepts_key_batch = True  # pyright: ignore[reportFunctionMemberAccess]  (read by make_train_step)
    return loss_fn
