"""Guidance wrappers against the closed-form class-conditional scores of Gaussian mixtures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsm_jax import samplers as S
from dsm_jax.distributions import Gaussian, GaussianMixture
from dsm_jax.guidance import classifier_free, classifier_guidance, exact_classifier, exact_conditional_model
from dsm_jax.metrics import mode_weights
from dsm_jax.parameterization import score_from_model
from dsm_jax.sde import VPSDE, exact_score_model

SDE = VPSDE()
# Three well separated modes (nearest-mode assignment is right for > 0.999 of each component's draws).
MEANS3 = jnp.array([[-2.5, 0.0], [2.5, 0.0], [0.0, 3.0]])
MIX3 = GaussianMixture(jnp.array([0.5, 0.3, 0.2]), MEANS3, jnp.full((3, 2), 0.5))
# Two overlapping modes along x1: the guidance has something to sharpen.
MIX2 = GaussianMixture(jnp.array([0.5, 0.5]), jnp.array([[-1.5, 0.0], [1.5, 0.0]]), jnp.full((2, 2), 0.5))


def _sample(model_fn, n, key, num_steps=200):
    return S.euler_maruyama(model_fn, SDE, SDE.prior_sample(key, (n, 2)), key, num_steps=num_steps).samples


def test_component_pieces_match_the_gaussians():
    """component(k) is the k-th Gaussian, noised like the mixture; conditional scores pick the component;
    score + grad log p(k | x) = conditional score (Bayes)."""
    x = jax.random.normal(jax.random.key(0), (5, 2)) * 2.0
    labels = np.array([0, 1, 2, 0, 2])
    noised = MIX3.convolve(0.7, scale=0.8)
    for k in range(3):
        g = noised.component(k)
        ref = MIX3.component(k).convolve(0.7, scale=0.8)
        np.testing.assert_allclose(g.mean, ref.mean, rtol=1e-6)
        np.testing.assert_allclose(g.cov, ref.cov, rtol=1e-6)

    @jax.jit
    def pieces(x, labels):
        want = jnp.stack([noised.component(k).score(x) for k in range(3)], axis=1)
        want = jnp.take_along_axis(want, labels[:, None, None], axis=1)[:, 0]
        grad_log_resp = jax.vmap(jax.grad(lambda xi, k: noised.log_responsibilities(xi[None])[0, k]))(x, labels)
        resp = (jnp.exp(noised.log_responsibilities(x)), noised.responsibilities(x))
        return want, noised.conditional_score(x, labels), noised.score(x) + grad_log_resp, resp

    want, got, bayes, (resp, resp_ref) = pieces(x, jnp.asarray(labels))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bayes, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(resp, resp_ref, rtol=1e-5)


def test_scale_zero_samples_the_requested_component_only():
    """w = 0 with the exact conditional score: >= 0.97 of the draws lie nearest their requested mode."""
    n = 600
    labels = jnp.repeat(jnp.arange(3), n)
    guided = classifier_free(exact_conditional_model(MIX3, sde=SDE), labels, 0.0, null_label=3)
    x = np.asarray(jax.jit(lambda k: _sample(guided, 3 * n, k))(jax.random.key(0)))
    nearest = np.argmin(((x[:, None] - np.asarray(MEANS3)[None]) ** 2).sum(-1), axis=1)
    fractions = [float(np.mean(nearest[np.asarray(labels) == k] == k)) for k in range(3)]
    print("fraction nearest the requested mode per class:", fractions)
    assert min(fractions) >= 0.97, fractions


def test_growing_scales_concentrate_the_samples():
    """w = 0, 1, 3 (the same keys): the per-class variance along the axis joining the modes decreases
    strictly; w = 0 has the component's variance 0.5 (4 SE); the orthogonal variance, which no
    classifier of the two classes sees, stays 0.5 (4 SE) at every scale."""
    n = 1000
    labels = jnp.repeat(jnp.arange(2), n)
    cond = exact_conditional_model(MIX2, sde=SDE)
    run = jax.jit(lambda w, k: _sample(classifier_free(cond, labels, w, null_label=2), 2 * n, k))
    lab = np.asarray(labels)
    se = 0.5 * np.sqrt(2.0 / (2 * n))  # SE of a pooled sample variance of N(., 0.5)
    along = []
    for w in (0.0, 1.0, 3.0):
        x = np.asarray(run(w, jax.random.key(1)))
        var = np.mean([np.var(x[lab == k], axis=0) for k in range(2)], axis=0)
        along.append(float(var[0]))
        assert abs(var[1] - 0.5) < 4 * se, (w, var)
    print("variance along the modes' axis for w = 0, 1, 3:", along)
    assert abs(along[0] - 0.5) < 4 * se, along
    assert along[0] > along[1] > along[2], along


def test_null_label_reproduces_the_mixture():
    """The null label is the mixture's score (to float32); sampling with it recovers the mode weights (4 SE)."""
    cond = exact_conditional_model(MIX3, sde=SDE)
    uncond = classifier_free(cond, 3, 2.5, null_label=3)  # cond == uncond: any scale gives the mixture
    x = jax.random.normal(jax.random.key(2), (8, 2)) * 2.0
    sigma = jnp.linspace(0.05, 0.99, 8)
    got, want = jax.jit(lambda x, s: (uncond(x, s), exact_score_model(MIX3, SDE)(x, s)))(x, sigma)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    n = 2000
    samples = jax.jit(lambda k: _sample(uncond, n, k))(jax.random.key(3))
    weights = np.asarray(mode_weights(samples, MIX3).weights)
    w = np.asarray(MIX3.weights)
    print("mode weights:", weights, "expected", w)
    np.testing.assert_array_less(np.abs(weights - w), 4 * np.sqrt(w * (1 - w) / n))


def test_classifier_guidance_with_the_bayes_classifier_is_the_conditional_score():
    """s(x) + 1 * grad log p(k | x_sigma) = s(x | k) for the exact noised mixture (float32), also for an
    "eps" model converted inside, and for an "x0" model with the SDE's scale."""
    x = jax.random.normal(jax.random.key(4), (12, 2)) * 2.5
    sigma = jnp.linspace(0.05, 0.95, 12)
    labels = jnp.arange(12) % 3
    score = exact_score_model(MIX3, SDE)
    clf = exact_classifier(MIX3, sde=SDE)
    eps_model = lambda z, s: -s[:, None] * score(z, s)
    x0_model = lambda z, s: (z + s[:, None] ** 2 * score(z, s)) / SDE.scale_for_sigma(s)[:, None]

    @jax.jit
    def run(x, sigma):
        return (
            exact_conditional_model(MIX3, sde=SDE)(x, sigma, labels),
            classifier_guidance(score, clf, labels, 1.0)(x, sigma),
            classifier_guidance(eps_model, clf, labels, 1.0, parameterization="eps")(x, sigma),
            classifier_guidance(x0_model, clf, labels, 1.0, parameterization="x0", sde=SDE)(x, sigma),
            classifier_guidance(score, clf, labels, 0.0)(x, sigma),
            score(x, sigma),
        )

    want, got, got_eps, got_x0, zero, plain = run(x, sigma)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_eps, want, rtol=1e-4, atol=1e-4)
    # The x0 round trip divides by sigma^2: float32 rounding of x0 grows by 1 / sigma^2.
    np.testing.assert_allclose(got_x0, want, rtol=1e-3, atol=1e-6 / float(sigma[0]) ** 2)
    np.testing.assert_allclose(zero, plain, rtol=1e-6)


@pytest.mark.parametrize("parameterization", ["score", "eps", "x0", "energy"])
def test_classifier_free_combines_outputs_into_the_guided_score(parameterization):
    """Whatever the parameterization, the guided output converts to (1 + w) s(x | y) - w s(x)."""
    g = [Gaussian(jnp.array([1.0, -1.0]) * k, jnp.array([1.0, 2.0]) * (k + 1)) for k in range(3)]
    x = jax.random.normal(jax.random.key(5), (6, 2))
    sigma, labels, w = jnp.full((6,), 0.6), jnp.array([0, 1, 0, 1, 0, 1]), 1.7

    def score(z, s, lab):
        rows = [jnp.where(lab[:, None] == k, gk.convolve(0.6).score(z), 0.0) for k, gk in enumerate(g)]
        return sum(rows)

    outputs = {
        "score": score,
        "eps": lambda z, s, lab: -s[:, None] * score(z, s, lab),
        "x0": lambda z, s, lab: z + s[:, None] ** 2 * score(z, s, lab),
        "energy": lambda z, s, lab: sum(
            jnp.where(lab == k, -gk.convolve(0.6).log_prob(z), 0.0) for k, gk in enumerate(g)
        ),
    }
    guided = classifier_free(outputs[parameterization], labels, w, null_label=2)
    got, want = jax.jit(
        lambda x: (
            score_from_model(guided, x, sigma, parameterization=parameterization),
            (1 + w) * score(x, sigma, labels) - w * score(x, sigma, jnp.full((6,), 2)),
        )
    )(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


_M = exact_conditional_model(MIX3)
_X = jnp.zeros((4, 2))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: classifier_free(_M, jnp.array([0.5, 1.0]), 1.0, null_label=3), "labels must be integers"),
        (lambda: classifier_free(_M, jnp.zeros((2, 2), jnp.int32), 1.0, null_label=3), "labels must be a scalar"),
        (lambda: classifier_free(_M, jnp.array([-1, 0]), 1.0, null_label=3), "labels must be >= 0"),
        (lambda: classifier_free(_M, 0, -1.0, null_label=3), "scale must be finite and >= 0"),
        (lambda: classifier_free(_M, 0, float("nan"), null_label=3), "scale must be finite"),
        (lambda: classifier_free(_M, 0, jnp.ones(2), null_label=3), "scale must be a scalar"),
        (lambda: classifier_free(_M, 0, 1.0, null_label=-1), "null_label"),
        (lambda: classifier_free(_M, jnp.array([0, 1]), 1.0, null_label=3)(_X, 0.5), r"labels must have shape \[B\]"),
        (lambda: classifier_guidance(lambda x, s: x, "clf", 0, 1.0), "log_prob_classifier must be callable"),
        (lambda: classifier_guidance(lambda x, s: x, exact_classifier(MIX3), 0, 1.0, parameterization="y"), "param"),
        (lambda: classifier_guidance(lambda x, s: x, lambda x, s: x[:, 0], 0, 1.0)(_X, 0.5), r"\[B, K\]"),
        (lambda: exact_conditional_model(MIX3, null_label=1), "null_label must not be a component"),
        (lambda: MIX3.component(3), "k must be a component index"),
        (lambda: MIX3.conditional_score(_X, jnp.array([0, 1, 2, 3])), r"labels must lie in \[0, 3\)"),
        (lambda: MIX3.conditional_score(_X, jnp.array([0.0])), "labels must be integers"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
