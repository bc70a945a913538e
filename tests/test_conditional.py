"""Class-conditional networks, label dropout, conditional training and guided sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsm_jax.models import NoiseConditionalMLP, UNet, init_params, make_conditional_model_fn, make_model_fn
from dsm_jax.models.apply import split_labelled_batch


def _without_labels(params):
    return {k: v for k, v in params.items() if k != "LabelEmbedding_0"}


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda **kw: NoiseConditionalMLP(width=16, depth=1, **kw), (3, 2)),
        (lambda **kw: UNet(channels=8, channel_mults=(1, 2), **kw), (2, 8, 8, 1)),
    ],
)
def test_num_classes_none_keeps_the_model_and_conditional_adds_only_the_label_table(make, shape):
    key, x = jax.random.key(0), jnp.ones(shape)
    sigma = jnp.full((shape[0],), 0.5)
    plain = init_params(make(), key, x)
    cond = init_params(make(num_classes=3), key, x)
    assert "LabelEmbedding_0" not in plain
    # Flax draws each parameter from its module path, so the shared parameters are bitwise equal.
    assert jax.tree.structure(plain) == jax.tree.structure(_without_labels(cond))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(_without_labels(cond)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    table = cond["LabelEmbedding_0"]["Embed_0"]["embedding"]
    assert table.shape[0] == 3 + 1  # the classes and the null label
    # The conditional output has the input's shape and depends on the label; labels=None is the null label.
    perturbed = jax.tree.map(lambda a: a + 0.1, cond)  # zero-initialised output layer: move off zero
    model = make(num_classes=3)
    out = make_model_fn(model, perturbed, labels=jnp.zeros(shape[0], jnp.int32))(x, sigma)
    assert out.shape == shape
    other = make_conditional_model_fn(model, perturbed)(x, sigma, jnp.ones(shape[0], jnp.int32))
    assert not np.allclose(np.asarray(out), np.asarray(other))
    null = make_conditional_model_fn(model, perturbed)(x, sigma, jnp.full(shape[0], 3, jnp.int32))
    np.testing.assert_array_equal(np.asarray(make_model_fn(model, perturbed)(x, sigma)), np.asarray(null))
    with pytest.raises(ValueError, match="unconditional model"):
        make(num_classes=None).apply({"params": plain}, x, sigma, jnp.zeros(shape[0], jnp.int32))


def test_label_dropout_rate_is_binomial():
    model = NoiseConditionalMLP(width=8, depth=1, num_classes=5)
    n, p = 20_000, 0.1
    keys = jax.random.split(jax.random.key(3), n)
    batch = {"x": jnp.zeros((n, 2)), "labels": jnp.arange(n, dtype=jnp.int32) % 5}
    _, labels = split_labelled_batch(model, batch, keys, p)
    dropped = np.asarray(labels) == 5
    frac = dropped.mean()
    assert abs(frac - p) < 4 * np.sqrt(p * (1 - p) / n), frac  # 4 binomial standard deviations (0.0085)
    kept = ~dropped
    np.testing.assert_array_equal(np.asarray(labels)[kept], np.asarray(batch["labels"])[kept])
    _, none_dropped = split_labelled_batch(model, batch, keys, 0.0)
    np.testing.assert_array_equal(np.asarray(none_dropped), np.asarray(batch["labels"]))
