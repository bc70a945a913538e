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
from dsm_jax.flows import GaussianPath, check_path, score_model_from_velocity
from dsm_jax.losses import SIGMA_SAMPLING, edm_loss, flow_matching_loss, is_key_batch, multiscale_dsm_loss
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


def make_model_fn(model: nn.Module, params: Any, *, scale_by_sigma: bool = False, dropout_rng=None, labels=None):
    """``model_fn(x, sigma) = model.apply(params, x, sigma)``, optionally divided by sigma.

    Args:
        model: a Flax linen module called as ``model(x, sigma)`` with ``sigma: [B]``.
        params: its ``"params"`` collection.
        scale_by_sigma: return ``output / sigma`` (NCSNv2).
        labels: for a conditional module (``num_classes`` set), the ``[B]``
            labels closed over: ``model.apply(params, x, sigma, labels)``. None
            calls ``model(x, sigma)`` (a conditional module then reads the null label).
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
        args = (x, sigma) if labels is None else (x, sigma, labels)
        # one output, no mutable collections
        out = cast(jax.Array, model.apply({"params": params}, *args, **train_kwargs))
        if scale_by_sigma:
            out = out / expand_to(sigma, out)
        return out

    return model_fn


def make_conditional_model_fn(model: nn.Module, params: Any, *, scale_by_sigma: bool = False):
    """``model_fn(x, sigma, labels)`` of a conditional module, for :mod:`dsm_jax.guidance`.

    :func:`make_model_fn` with the labels as the third argument; the null
    label is ``model.num_classes``.
    """
    return lambda x, sigma, labels: make_model_fn(model, params, scale_by_sigma=scale_by_sigma, labels=labels)(x, sigma)


LABEL_DROPOUT_STREAM = 0x1ABE1
"""``fold_in`` constant of the per-example key that draws label dropout (apart from the loss's own draws)."""


def split_labelled_batch(model: nn.Module, batch, key: jax.Array, label_dropout: float):
    """``(x, labels)`` of a training batch: ``x`` alone gives ``(x, None)``.

    A labelled batch is ``{"x": [B, *D], "labels": [B]}`` (see
    :class:`dsm_jax.data.BatchSource`). Label dropout replaces each label by
    the null label ``model.num_classes`` with probability ``label_dropout``,
    drawn with ``fold_in(key_j, LABEL_DROPOUT_STREAM)`` of the example's key
    (one key for the batch: ``B`` draws from it), so one network learns
    both ``s(x | y)`` and ``s(x)`` (Ho & Salimans 2022).

    Raises:
        ValueError: labels for a module without ``num_classes``.
    """
    if not isinstance(batch, dict):
        return batch, None
    x, labels = batch["x"], batch["labels"]
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        raise ValueError("a labelled batch needs a conditional model (num_classes set), got num_classes=None.")
    if label_dropout > 0:
        if is_key_batch(key):
            drop = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, LABEL_DROPOUT_STREAM), label_dropout))(
                key
            )
        else:
            drop = jax.random.bernoulli(jax.random.fold_in(key, LABEL_DROPOUT_STREAM), label_dropout, labels.shape)
        labels = jnp.where(drop, num_classes, labels)
    return x, labels


def _labelled(model_fn_of_labels, labels):
    """``model_fn(x, sigma)`` of the batch's ``labels [B]`` (None: ``model_fn_of_labels(None)``).

    The multi-level DSM losses call the model once on ``k`` stacked copies of
    the batch (``[k B]``, level-major: copy ``i`` is rows ``i B .. (i+1) B``),
    so a call on ``k B`` rows reads the labels tiled ``k`` times.
    """
    if labels is None:
        return model_fn_of_labels(None)

    def model_fn(x, sigma):
        n, b = x.shape[0], labels.shape[0]
        if n % b:
            raise ValueError(f"a batch of {n} rows is not a stack of copies of the {b} labelled examples.")
        return model_fn_of_labels(jnp.tile(labels, n // b))(x, sigma)

    return model_fn


def _check_label_dropout(label_dropout) -> float:
    value = float(label_dropout)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout!r}.")
    return value


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
    label_dropout: float = 0.0,
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
        label_dropout: for labelled batches ``{"x", "labels"}`` of a
            conditional module, the probability of the null label (see
            :func:`split_labelled_batch`); the labels are closed over in the
            model, so the DSM loss itself is unchanged.

    Returns:
        ``loss_fn(params, x, keys)``.
    """
    label_dropout = _check_label_dropout(label_dropout)
    check_sigma_schedule(sigmas, decreasing=False, monotone=sigma_sampling == "stratified")
    check_parameterization(parameterization)
    check_choice("sigma_sampling", sigma_sampling, SIGMA_SAMPLING)
    get_weighting(weighting)
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def loss_fn(params, batch, key):
        x, labels = split_labelled_batch(model, batch, key, label_dropout)
        model_fn = _labelled(
            lambda lab: make_model_fn(
                model, params, scale_by_sigma=scale_by_sigma, labels=lab, dropout_rng=dropout_rng_of(model, key)
            ),
            labels,
        )
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
    label_dropout: float = 0.0,
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
        label_dropout: as in :func:`make_dsm_loss_fn`, for labelled batches.

    Returns:
        ``loss_fn(params, x, keys)``.
    """
    label_dropout = _check_label_dropout(label_dropout)
    check_sigma_schedule(sigmas, decreasing=False)
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def loss_fn(params, batch, key):
        x, labels = split_labelled_batch(model, batch, key, label_dropout)
        denoiser = _labelled(
            lambda lab: edm_model_fn(
                model, params, sigma_data=sigma_data, labels=lab, dropout_rng=dropout_rng_of(model, key)
            ),
            labels,
        )
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


def make_velocity_fn(model: nn.Module, params: Any, path: GaussianPath):
    """A noise-conditional network as a velocity field: ``v(x_t, t) = model.apply(params, x_t, sigma(t) / alpha(t))``.

    The library's networks take ``(x, sigma)`` and embed ``log sigma``; a
    flow-matching network is conditioned on the path's VE noise level
    ``sigma(t) / alpha(t)`` (:meth:`dsm_jax.flows.GaussianPath.noise_ratio`)
    in place of ``t``: a monotone reparameterisation of time, so the same
    embedding serves both families, and the network's condition at a noise
    level is the same whether it is called in ``t`` or through
    :func:`dsm_jax.flows.score_model_from_velocity` at ``sigma``. Its input is
    the path's ``x_t`` itself (order one on the linear and VP paths).

    Returns:
        ``velocity_fn(x_t, t) -> [B, *D]``, ``t`` a scalar or ``[B]`` in ``(0, 1)``.
    """
    check_path(path)
    net = make_model_fn(model, params)
    return lambda x_t, t: net(x_t, broadcast_sigma(path.noise_ratio(broadcast_sigma(t, x_t)), x_t))


def flow_model_fn(model: nn.Module, params: Any, path: GaussianPath):
    """The library model ``model_fn(x, sigma)`` ("score", VE) of a flow-matching network (:func:`make_velocity_fn`).

    :func:`dsm_jax.flows.score_model_from_velocity` on the network's velocity:
    the exact score of ``x = data + sigma eps`` if the velocity is exact, so every
    sampler and the likelihood of the library run a flow-matching model.
    """
    return score_model_from_velocity(make_velocity_fn(model, params, path), path)


def make_flow_matching_loss_fn(model: nn.Module, sigmas, *, path: GaussianPath, t_sampling: str = "uniform"):
    """Flow matching of a Flax module as ``loss_fn(params, x, keys) -> (loss, {"per_sigma_loss": [L]})``.

    :func:`dsm_jax.losses.flow_matching_loss` on :func:`make_velocity_fn`, with
    the times restricted to the run's noise range: ``t`` from
    ``path.t_from_noise_ratio(max(sigmas))`` to ``path.t_from_noise_ratio(min(sigmas))``,
    the levels at which :func:`flow_model_fn` will be queried (and where the
    network's ``log sigma`` input stays finite). Like :func:`make_edm_loss_fn`
    it takes one key per example (``loss_fn.accepts_key_batch = True``) and
    reports the per-example error as the unweighted VE DSM loss
    (:func:`dsm_jax.losses.flow_matching.dsm_weight`), binned to the nearest
    level of ``sigmas`` in log scale.

    Args:
        model: a Flax module called as ``model(x, sigma)``.
        sigmas: the run's levels ``[L]`` (the training range and the diagnostics' grid).
        path: the :class:`dsm_jax.flows.GaussianPath`.
        t_sampling: "uniform" or "logit_normal" (mapped onto the range).

    Returns:
        ``loss_fn(params, x, keys)``.
    """
    check_sigma_schedule(sigmas, decreasing=False)
    check_path(path)
    sigmas = jnp.asarray(sigmas, jnp.float32)
    t_range = (float(path.t_from_noise_ratio(jnp.max(sigmas))), float(path.t_from_noise_ratio(jnp.min(sigmas))))

    def loss_fn(params, x, key):
        loss, per_sigma = flow_matching_loss(
            make_velocity_fn(model, params, path),
            x,
            key,
            path=path,
            t_sampling=t_sampling,
            t_range=t_range,
            sigmas=sigmas,
            return_per_sigma=True,
        )
        return loss, {"per_sigma_loss": per_sigma}

    loss_fn.accepts_key_batch = True  # pyright: ignore[reportFunctionMemberAccess]  (read by make_train_step)
    return loss_fn
