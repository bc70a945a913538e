"""The library's defaults are the CLI's, and they work: a user's own mixture, trained with them, samples with the ODE.

The fast test compares the defaults of :class:`NoiseConditionalMLP` and
:func:`make_dsm_loss_fn` with :class:`dsm_jax.config.Config` (the CLI's
settings, whose docstring says why they are what they are). The slow test is
the newcomer's script: a 3-D, 4-component Gaussian mixture (weights
0.4/0.3/0.2/0.1) trained with ``NoiseConditionalMLP()`` and
``make_dsm_loss_fn(model, sigmas)`` and sampled with the probability-flow ODE.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsm_jax import GaussianMixture, geometric_sigmas, metrics, ncsnv2_sigma_max
from dsm_jax.config import Config
from dsm_jax.models import NoiseConditionalMLP, init_params, make_model_fn
from dsm_jax.samplers import probability_flow_ode
from dsm_jax.sde import VESDE, exact_score_model
from dsm_jax.train import make_dsm_loss_fn, make_optimizer, train


def test_model_and_loss_defaults_are_the_cli_defaults():
    cfg, model = Config(), NoiseConditionalMLP()
    assert (model.width, model.depth, model.embedding, model.fourier_scale) == (
        cfg.width,
        cfg.depth,
        cfg.embedding,
        cfg.fourier_scale,
    )
    defaults = {
        k: p.default
        for k, p in inspect.signature(make_dsm_loss_fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    # Label dropout acts on labelled batches only: none in the library's loss, Config.label_dropout for the
    # command's conditional runs (num_classes set).
    assert defaults.pop("label_dropout") == 0.0 and cfg.num_classes is None
    assert defaults == {
        "weighting": cfg.weighting,
        "parameterization": cfg.parameterization,
        "sigma_sampling": cfg.sigma_sampling,
        "scale_by_sigma": cfg.scale_by_sigma,
    }


@pytest.mark.slow
def test_a_users_3d_mixture_trained_with_the_defaults_samples_with_the_ode(tmp_path):
    """Within a few MMD floors, with the mode weights and about the evaluations of the exact score.

    Reference: the same ODE from the same prior draws with the exact noised
    score. It is the reference for the mode weights rather than the mixture's
    own weights because the VE prior ``N(0, sigma_max^2 I)`` is not quite
    ``p * N(0, sigma_max^2 I)`` (the means sit 3.5 from the origin): the exact
    score itself samples 0.37/0.30/0.21/0.12 from these draws. Tolerance: 3
    standard errors of the difference of two independent estimates of a
    proportion from n samples, ``3 sqrt(2 w (1 - w) / n)`` (the two share
    their draws, so the true error is smaller). Measured (new defaults, 1000
    steps): MMD^2 ratio 2.7, weights 0.368/0.288/0.210/0.134 against
    0.372/0.298/0.209/0.121, 176 evaluations against 110; with the old
    defaults (``fourier_scale=16``, ``sigma_sampling="all"``) 68 floors,
    0.27/0.27/0.24/0.21 and 3962 evaluations, while every per-sigma relative
    Fisher divergence stayed below 0.09.

    Other factors at 1000 steps: ``fourier_scale=1`` with "all", 102 floors,
    weights 0.25/0.26/0.24/0.25, 650 evaluations; ``fourier_scale=16`` with
    "stratified", 3.6 floors and 1298 evaluations (12 times the exact score's).

    The budget: 1000 steps of batch 256, the CLI's learning rate, and an
    EMA horizon fit for the budget (``ema_decay=0.99``: at the default 0.999
    the EMA still holds 0.999^1000 = 37% of the zero-output initial model,
    and 2000 steps gave 46 floors). 500 steps gave 4.4 floors, too near the
    bound for a stable test; 2000 give 2.2.
    """
    n = 2000
    means = 2.0 * jnp.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], jnp.float32)
    mixture = GaussianMixture(jnp.array([0.4, 0.3, 0.2, 0.1]), means, jnp.stack([0.25 * jnp.eye(3)] * 4))
    data = np.asarray(mixture.sample(jax.random.key(0), 20_000))
    test = jnp.asarray(mixture.sample(jax.random.key(1), n))
    sigmas = geometric_sigmas(float(ncsnv2_sigma_max(data)), 0.01, 10)

    model = NoiseConditionalMLP()
    params = init_params(model, jax.random.key(2), jnp.asarray(data[:1]))
    loss_fn = make_dsm_loss_fn(model, sigmas)
    batch, num_steps = 256, 1000
    state = train(
        loss_fn,
        params,
        lambda s: data[(s * batch + np.arange(batch)) % len(data)],
        workdir=tmp_path,
        num_steps=num_steps,
        optimizer=make_optimizer(Config().learning_rate, warmup_steps=100),
        ema_decay=0.99,
        steps_per_call=50,
        save_every=num_steps,
        log_every=num_steps,
        quiet=True,
    )

    sde = VESDE(sigma_min=float(sigmas[-1]), sigma_max=float(sigmas[0]))
    x_init = sde.prior_sample(jax.random.key(3), (n, 3))
    ode = jax.jit(lambda model_fn, x: probability_flow_ode(model_fn, sde, x), static_argnums=0)
    learned = ode(make_model_fn(model, state.ema_params), x_init)
    exact = ode(exact_score_model(mixture, sde), x_init)

    floor = metrics.mmd2_floor(data, jax.random.key(4), n, against=test)
    ratio = float(metrics.mmd2(learned.samples, test, bandwidth=floor.bandwidth)) / float(floor.floor)
    weights = np.asarray(metrics.mode_weights(learned.samples, mixture).weights)
    reference = np.asarray(metrics.mode_weights(exact.samples, mixture).weights)
    tolerance = 3.0 * np.sqrt(2.0 * reference * (1.0 - reference) / n)
    print(
        f"MMD^2 / floor {ratio:.2f}; mode weights {np.round(weights, 3)} (exact score {np.round(reference, 3)}, "
        f"tolerance {np.round(tolerance, 3)}); evaluations {int(learned.nfe)} (exact score {int(exact.nfe)})"
    )
    assert ratio < 5.0
    np.testing.assert_array_less(np.abs(weights - reference), tolerance)
    # A smooth learned field: not many more solver steps than the exact one (old defaults: 36x).
    assert int(learned.nfe) < 3 * int(exact.nfe)
