"""Study 7: Langevin vs annealed Langevin on a mixture with unequal weights (Song & Ermon 2019, Fig. 3).

p = 1/5 N((-5, -5), I) + 4/5 N((5, 5), I). Started from uniform noise on
[-8, 8]^2, plain Langevin dynamics with the exact score keeps roughly the
initial split between the modes (the modes are separated by a region of
vanishing density, and within each basin the score does not depend on the
weights), while annealed Langevin over a geometric sigma ladder recovers
the 4:1 ratio. The same with scores learned by multi-scale DSM.
"""

from __future__ import annotations

import _common as C
import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax.distributions import GaussianMixture
from dsm_jax.metrics import mode_weights
from dsm_jax.models import NoiseConditionalMLP, init_params, make_model_fn
from dsm_jax.noise import geometric_sigmas
from dsm_jax.samplers import annealed_langevin, langevin
from dsm_jax.train import make_dsm_loss_fn

MIXTURE = GaussianMixture(jnp.array([0.2, 0.8]), jnp.array([[-5.0, -5.0], [5.0, 5.0]]), jnp.stack([jnp.eye(2)] * 2))


def _weights(samples):
    return np.asarray(mode_weights(jnp.asarray(samples), MIXTURE).weights)


def run_samplers(model_fn, sigmas, x0, key, *, ld_steps, ald_steps, step_lr):
    """(LD samples with the score at the smallest sigma, ALD samples)."""
    k1, k2 = jax.random.split(key)
    s_min = float(sigmas[-1])
    score = lambda x: model_fn(x, jnp.full((x.shape[0],), s_min))
    ld = jax.jit(lambda x, k: langevin(score, x, k, step_size=step_lr / 2, num_steps=ld_steps))(x0, k1)
    ald = jax.jit(lambda x, k: annealed_langevin(model_fn, x, k, sigmas, steps_per_sigma=ald_steps, step_lr=step_lr))(
        x0, k2
    )
    return np.asarray(ld), np.asarray(ald)


def main(argv=None):
    args = C.parse_args(__doc__.splitlines()[0], argv)
    n = 512 if args.quick else 10000
    train_steps = 10 if args.quick else 4000
    ld_steps, ald_steps = (200, 20) if args.quick else (1000, 100)
    sigmas = geometric_sigmas(20.0, 0.1, 10)
    # alpha_i = step_lr sigma_i^2 / sigma_L^2; step_lr = 2e-3 gives alpha_i / sigma_i^2 = 0.2 at every level.
    step_lr = 2e-3
    x0 = jax.random.uniform(jax.random.key(args.seed), (n, 2), minval=-8.0, maxval=8.0)
    start = _weights(x0)

    exact = lambda x, sigma: MIXTURE.convolve(sigma[0]).score(x)
    ld_e, ald_e = run_samplers(
        exact, sigmas, x0, jax.random.key(1), ld_steps=ld_steps, ald_steps=ald_steps, step_lr=step_lr
    )

    data = np.asarray(MIXTURE.sample(jax.random.key(2), 20000))
    model = NoiseConditionalMLP(width=32 if args.quick else 128, depth=2 if args.quick else 3, fourier_scale=1.0)
    params = init_params(model, jax.random.key(3), jnp.asarray(data[:1]))
    loss_fn = make_dsm_loss_fn(model, sigmas, sigma_sampling="stratified")
    batches = lambda s: data[np.random.RandomState(s).randint(0, data.shape[0], 256)]
    state, info = C.fit(loss_fn, params, batches, num_steps=train_steps, learning_rate=1e-3, seed=args.seed)
    learned = make_model_fn(model, state.ema_params)
    ld_l, ald_l = run_samplers(
        learned, sigmas, x0, jax.random.key(4), ld_steps=ld_steps, ald_steps=ald_steps, step_lr=step_lr
    )

    results = {
        "true_weights": [0.2, 0.8],
        "initial_weights": start.tolist(),
        "exact_score": {"langevin": _weights(ld_e).tolist(), "annealed": _weights(ald_e).tolist()},
        "learned_score": {"langevin": _weights(ld_l).tolist(), "annealed": _weights(ald_l).tolist()},
        # Binomial standard error of a weight estimated from n samples.
        "standard_error": float(np.sqrt(0.2 * 0.8 / n)),
        "train_seconds": info["seconds"],
    }
    C.save_results(
        args,
        "study07_langevin_vs_annealed",
        results,
        {
            "n": n,
            "sigmas": np.asarray(sigmas),
            "step_lr": step_lr,
            "ld_steps": ld_steps,
            "ald_steps_per_sigma": ald_steps,
            "train_steps": train_steps,
        },
    )
    for k in ("exact_score", "learned_score"):
        print(k, "LD", np.round(results[k]["langevin"], 3), "ALD", np.round(results[k]["annealed"], 3))

    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 3.6), layout="constrained")
    axes = fig.subplots(1, 5, sharex=True, sharey=True)
    panels = [
        (np.asarray(MIXTURE.sample(jax.random.key(5), n)), "exact samples"),
        (ld_e, "Langevin, exact score"),
        (ald_e, "annealed, exact score"),
        (ld_l, "Langevin, learned"),
        (ald_l, "annealed, learned"),
    ]
    for ax, (s, title) in zip(axes, panels, strict=False):
        w = _weights(s)
        ax.scatter(s[:, 0], s[:, 1], s=1, alpha=0.3)
        ax.set_title(f"{title}\nweights {w[0]:.2f} / {w[1]:.2f}", fontsize=9)
        ax.set_xlim(-9, 9)
        ax.set_ylim(-9, 9)
        ax.set_aspect("equal")
    C.save_figure(fig, args, "study07_langevin_vs_annealed")
    return results


if __name__ == "__main__":
    main()
