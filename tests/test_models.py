"""Tests for dsm_jax.models: shapes, conditioning, per-example independence, the output helper."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsm_jax.models import (
    GaussianFourierEmbedding,
    NoiseConditionalMLP,
    SigmaEmbedding,
    UNet,
    edm_model_fn,
    init_params,
    make_model_fn,
    make_score_fn,
    sinusoidal_embedding,
)

# Small configurations; zero_init_output=False so outputs depend on the inputs at init.
UNET = UNet(channels=8, channel_mults=(1, 2), groups=4, attention_resolutions=(4,), zero_init_output=False)
MODELS = {
    "mlp_vector": (NoiseConditionalMLP(width=32, depth=2, zero_init_output=False), (5, 2)),
    "mlp_sinusoidal": (NoiseConditionalMLP(width=16, depth=1, embedding="sinusoidal", zero_init_output=False), (5, 3)),
    "mlp_image": (NoiseConditionalMLP(width=16, depth=1, zero_init_output=False), (5, 4, 4, 1)),
    # One U-Net (initialising one costs seconds on CPU), at two resolutions: the
    # convolutions do not depend on H, W; attention runs at 4x4 only in the 8x8 case.
    "unet_8x8": (UNET, (3, 8, 8, 1)),
    "unet_16x16": (UNET, (2, 16, 16, 1)),
}


# Initialise with the first shape listed (for the U-Net, 8x8: the resolution at which its attention exists).
MODEL_INPUT = {}
for _model, _shape in MODELS.values():
    MODEL_INPUT.setdefault(_model, (1,) + _shape[1:])


@functools.cache
def _params(model):
    return init_params(model, jax.random.key(1), jnp.zeros(MODEL_INPUT[model]))


def _setup(name):
    model, shape = MODELS[name]
    return model, _params(model), jax.random.normal(jax.random.key(0), shape)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shape_and_sigma_conditioning(name):
    model, params, x = _setup(name)
    fn = jax.jit(make_model_fn(model, params))
    out_small, out_large = fn(x, 0.1), fn(x, 10.0)
    chex.assert_shape(out_small, x.shape)
    chex.assert_tree_all_finite(out_small)
    # Different noise levels give different outputs: the network sees sigma.
    assert float(jnp.max(jnp.abs(out_small - out_large))) > 1e-4


@pytest.mark.parametrize("name", sorted(MODELS))
def test_examples_do_not_interact(name):
    """Output i depends on x_i and sigma_i only (no batch statistics), also for a batch of one."""
    model, params, x = _setup(name)
    fn = jax.jit(make_model_fn(model, params))
    sigma = jnp.linspace(0.1, 2.0, x.shape[0])
    full = fn(x, sigma)
    changed = fn(x.at[1:].set(x[1:] * 3.0 + 1.0), sigma.at[1:].set(5.0))
    np.testing.assert_allclose(changed[0], full[0], rtol=1e-5, atol=1e-6)
    one_by_one = jax.jit(jax.vmap(lambda xi, si: fn(xi[None], si[None])[0]))(x, sigma)
    np.testing.assert_allclose(one_by_one, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "model", [NoiseConditionalMLP(width=16, depth=1), UNet(channels=4, groups=2, channel_mults=(1,))]
)
def test_zero_initialised_output(model):
    x = jnp.ones((2, 8, 8, 1)) if isinstance(model, UNet) else jnp.ones((2, 2))
    params = init_params(model, jax.random.key(0), x)
    np.testing.assert_array_equal(jax.jit(make_model_fn(model, params))(x, 1.0), jnp.zeros_like(x))


def test_scale_by_sigma_and_score_fn():
    model, params, x = _setup("mlp_vector")
    sigma = jnp.array([0.1, 0.5, 1.0, 2.0, 4.0])
    raw = model.apply({"params": params}, x, sigma)
    scaled = make_model_fn(model, params, scale_by_sigma=True)(x, sigma)
    np.testing.assert_allclose(scaled, raw / sigma[:, None], rtol=1e-6)
    # "eps": score = -out / sigma (the conversion in dsm_jax.parameterization).
    score = make_score_fn(model, params, parameterization="eps")(x, sigma)
    np.testing.assert_allclose(score, -raw / sigma[:, None], rtol=1e-6)
    # A scalar sigma is broadcast to [B].
    np.testing.assert_allclose(
        make_model_fn(model, params)(x, 0.5), model.apply({"params": params}, x, jnp.full(5, 0.5))
    )


def test_sinusoidal_embedding_matches_formula():
    v = jnp.array([-1.0, 0.0, 2.5])
    emb = sinusoidal_embedding(v, 8, scale=3.0, max_period=100.0)
    chex.assert_shape(emb, (3, 8))
    for i in range(4):
        w = 100.0 ** (-i / 4)
        np.testing.assert_allclose(emb[:, i], np.sin(3.0 * np.asarray(v) * w), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(emb[:, 4 + i], np.cos(3.0 * np.asarray(v) * w), rtol=1e-5, atol=1e-6)


def test_fourier_frequencies_are_fixed():
    """W enters the features but receives no gradient (stop_gradient): it is never trained."""
    module = GaussianFourierEmbedding(features=8, scale=2.0)
    v = jnp.array([0.3, -0.7])
    params = module.init(jax.random.key(0), v)["params"]
    w = params["W"]
    emb = module.apply({"params": params}, v)
    np.testing.assert_allclose(emb[:, :4], jnp.sin(2 * math.pi * v[:, None] * w[None]), rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, v) ** 2))(params)
    np.testing.assert_array_equal(grads["W"], jnp.zeros_like(w))


def test_bad_configurations_raise():
    with pytest.raises(ValueError, match="embed_dim"):
        SigmaEmbedding(embed_dim=7)
    with pytest.raises(ValueError, match="embedding"):
        NoiseConditionalMLP(embedding="learned").init(jax.random.key(0), jnp.ones((1, 2)), jnp.ones(1))
    with pytest.raises(ValueError, match="width"):
        NoiseConditionalMLP(width=0)
    with pytest.raises(ValueError, match="groups"):
        UNet(channels=12, groups=8)
    with pytest.raises(ValueError, match="channel_mults"):
        UNet(channel_mults=())
    with pytest.raises(ValueError, match="divisible"):
        init_params(UNet(channels=8, groups=4, channel_mults=(1, 2, 2)), jax.random.key(0), jnp.ones((1, 6, 6, 1)))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        init_params(UNet(channels=8, groups=4), jax.random.key(0), jnp.ones((1, 8, 8)))
    model, params, x = _setup("mlp_vector")
    with pytest.raises(ValueError, match="sigma"):
        model.apply({"params": params}, x, jnp.ones(3))


def test_parameters_trained_with_another_fourier_scale_keep_their_frequencies():
    """The default scale changed from 16 to 1; W is a stored parameter, so old parameters give their old outputs."""
    old = NoiseConditionalMLP(width=16, depth=1, fourier_scale=16.0, zero_init_output=False)
    new = NoiseConditionalMLP(width=16, depth=1, zero_init_output=False)
    assert new.fourier_scale == 1.0
    x, sigma = jax.random.normal(jax.random.key(0), (4, 2)), jnp.array([0.01, 0.1, 1.0, 10.0])
    params = init_params(old, jax.random.key(1), x[:1])
    np.testing.assert_array_equal(new.apply({"params": params}, x, sigma), old.apply({"params": params}, x, sigma))
    # A fresh default model draws W at the new scale: ~16x smaller frequencies.
    w_old = params["SigmaEmbedding_0"]["GaussianFourierEmbedding_0"]["W"]
    w_new = init_params(new, jax.random.key(1), x[:1])["SigmaEmbedding_0"]["GaussianFourierEmbedding_0"]["W"]
    np.testing.assert_allclose(w_old, 16.0 * w_new, rtol=1e-5)


# Dropout: one small U-Net (8x8, no attention) with and without it; the same parameters fit both.
_DROPOUT_UNET = UNet(channels=8, channel_mults=(1, 2), groups=4, zero_init_output=False, dropout=0.5)


@functools.cache
def _dropout_setup():
    params = init_params(_DROPOUT_UNET, jax.random.key(1), jnp.zeros((1, 8, 8, 1)))
    return params, jax.random.normal(jax.random.key(0), (3, 8, 8, 1)), jnp.array([0.1, 0.5, 2.0])


def test_dropout_is_random_in_training_and_off_in_evaluation():
    params, x, sigma = _dropout_setup()
    plain = _DROPOUT_UNET.clone(dropout=0.0)
    # No parameters of its own: the same tree as the network without dropout.
    expected = jax.eval_shape(lambda k: plain.init(k, x[:1], sigma[:1])["params"], jax.random.key(1))
    assert jax.tree.structure(expected) == jax.tree.structure(params)

    @jax.jit  # one compilation for every variant
    def outputs():
        train = lambda key, x=x: make_model_fn(_DROPOUT_UNET, params, dropout_rng=key)(x, sigma)
        edm = lambda key: edm_model_fn(_DROPOUT_UNET, params, dropout_rng=key)(x, sigma)
        return {
            "eval": make_model_fn(_DROPOUT_UNET, params)(x, sigma),
            "plain": make_model_fn(plain, params)(x, sigma),
            "a": train(jax.random.key(2)),
            "b": train(jax.random.key(3)),
            "solo": train(jax.random.key(2), x.at[1].set(0.0)),
            "edm_train": edm(jax.random.key(2)),
            "edm_eval": edm(None),
        }

    out = outputs()
    np.testing.assert_array_equal(out["eval"], out["plain"])  # evaluation: no dropout at all
    differ = lambda u, v: float(jnp.max(jnp.abs(u - v))) > 1e-2
    assert differ(out["a"], out["b"]) and differ(out["a"], out["eval"]) and differ(out["edm_train"], out["edm_eval"])
    # Example 1's input does not change example 0's output: the masks do not mix examples.
    np.testing.assert_allclose(out["solo"][0], out["a"][0], rtol=1e-5, atol=1e-6)


def test_no_dropout_trains_the_network_exactly_as_before():
    """dropout=0.0: the loss calls the module as sampling does (no train flag, no rng), so the same bits."""
    from dsm_jax.losses import multiscale_dsm_loss
    from dsm_jax.models import make_dsm_loss_fn
    from dsm_jax.models.apply import dropout_rng_of

    params, x, _ = _dropout_setup()
    plain = _DROPOUT_UNET.clone(dropout=0.0)
    assert (
        dropout_rng_of(plain, jax.random.key(0)) is None
        and dropout_rng_of(_DROPOUT_UNET, jax.random.key(0)) is not None
    )
    sigmas = jnp.array([0.1, 1.0])
    keys = jax.random.split(jax.random.key(4), 3)
    loss, _ = jax.jit(make_dsm_loss_fn(plain, sigmas, sigma_sampling="random"))(params, x, keys)
    by_hand = jax.jit(lambda p: multiscale_dsm_loss(make_model_fn(plain, p), x, sigmas, keys, sigma_sampling="random"))
    np.testing.assert_array_equal(loss, by_hand(params))
    # The rate, not the train flag, changes the numbers: dropout=0.5 moves the loss, rate 0 in train mode does not.
    dropped, _ = jax.jit(make_dsm_loss_fn(_DROPOUT_UNET, sigmas, sigma_sampling="random"))(params, x, keys)
    assert abs(float(dropped) - float(loss)) > 1e-4 * abs(float(loss))
    rate_zero = jax.jit(lambda key: make_model_fn(plain, params, dropout_rng=key)(x, 0.5))
    # Train mode compiles another program (the rng is an input), so XLA may fuse and round differently.
    np.testing.assert_allclose(
        rate_zero(jax.random.key(5)), jax.jit(make_model_fn(plain, params))(x, 0.5), rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow  # compiles a U-Net training step: ~27 s on the loaded 2 cores
def test_a_unet_with_dropout_trains():
    import optax

    from dsm_jax.models import make_dsm_loss_fn
    from dsm_jax.train import train

    params, _, _ = _dropout_setup()
    data = jax.random.normal(jax.random.key(7), (16, 8, 8, 1))
    loss_fn = make_dsm_loss_fn(_DROPOUT_UNET, jnp.array([0.1, 1.0]), sigma_sampling="random")
    keys = jax.random.split(jax.random.key(8), 16)
    evaluate = jax.jit(lambda p: loss_fn(p, data, keys)[0])
    state = train(loss_fn, params, lambda step: data, num_steps=8, optimizer=optax.adam(3e-3), quiet=True)
    assert int(state.step) == 8 and float(evaluate(state.params)) < float(evaluate(params))


def test_bad_dropout_rates_raise():
    for rate in (-0.1, 1.0, True):
        with pytest.raises(ValueError, match="dropout"):
            UNet(dropout=rate)
