"""Study 6: one noise level or many: why NCSN anneals.

Data: eight Gaussians on a circle of radius 2 (std 0.25) with unequal weights
w_k = k / 36 (k = 1..8). The same MLP and training budget for three models:

* one small sigma (0.01): DSM learns ~ the data score, sampled with plain
  Langevin at that level;
* one large sigma (1.0): sampled with plain Langevin at that level;
* NCSN: 10 geometric levels from 4 to 0.01 (output / sigma, lambda = sigma^2),
  sampled with annealed Langevin.

All samplers start from sigma_1 N(0, I) = 4 N(0, I) and make the same number
of score evaluations (1000 steps; the single-level chains use the annealed
sampler's step at their level, step_lr * sigma^2 / 0.01^2, capped at 0.05 for
the large level). Metrics: mode weights (total variation to w; fraction of
samples beyond 3 std of every mode), MMD^2 against held-out data next to its
two-sample floor, and the relative Fisher divergence of each model to the
exact score of its own level, over p_sigma and over a uniform box
[-4, 4]^2 (the low-density regions Langevin starts in).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import _common as C
import _toy as T
from dsm_jax.distributions import GaussianMixture
from dsm_jax.metrics import mode_weights
from dsm_jax.noise import geometric_sigmas, ncsnv2_step_size
from dsm_jax.samplers import langevin

NAME = "study06_one_vs_many_sigmas"
SIGMAS = np.asarray(geometric_sigmas(4.0, 0.01, 10))


def ring_mixture() -> GaussianMixture:
    angles = 2.0 * np.pi * np.arange(8) / 8
    means = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture(np.arange(1, 9) / 36.0, means, np.full((8, 2), 0.25**2))


def main(argv=None):
    args = C.parse_args(__doc__.splitlines()[0], argv)
    steps = 10 if args.quick else 2500
    n = 200 if args.quick else 2000
    steps_per_sigma = 5 if args.quick else 100
    num_eval = 200 if args.quick else 4000
    mixture = ring_mixture()
    true_w = np.asarray(mixture.weights)
    key = jax.random.key(args.seed)
    train = np.asarray(T.draw(mixture, jax.random.fold_in(key, 0), 10_000))
    test = np.asarray(T.draw(mixture, jax.random.fold_in(key, 1), n))
    box = np.asarray(jax.random.uniform(jax.random.fold_in(key, 2), (num_eval, 2), minval=-4.0, maxval=4.0))
    x0 = SIGMAS[0] * jax.random.normal(jax.random.fold_in(key, 3), (n, 2))
    step_lr = 2.0 * ncsnv2_step_size(SIGMAS, steps_per_sigma)
    num_langevin = steps_per_sigma * len(SIGMAS)

    variants = {}
    for name, sigmas in (("single_sigma_0.01", SIGMAS[-1:]), ("single_sigma_1.0", np.array([1.0])), ("ncsn_10_levels", SIGMAS)):
        multi = len(sigmas) > 1
        model_fn, info = T.train_dsm(train, sigmas, steps=steps, seed=args.seed, batch_size=128,
                                     scale_by_sigma=True, quick=args.quick)
        if multi:
            samples, _, _ = T.annealed_samples(model_fn, sigmas, jax.random.fold_in(key, 4), n,
                                               steps_per_sigma=steps_per_sigma)
            step = None
        else:
            sigma = float(sigmas[0])
            step = min(step_lr * sigma**2 / SIGMAS[-1] ** 2 / 2.0, 0.05)  # alpha/2 of annealed Langevin
            score = T.sigma_fn(model_fn, sigma)
            run = jax.jit(lambda x, k: langevin(score, x, k, step_size=step, num_steps=num_langevin))
            samples = np.asarray(run(x0, jax.random.fold_in(key, 4)))
        finite = samples[np.all(np.isfinite(samples), axis=1)]
        modes = mode_weights(jnp.asarray(finite), mixture, max_mahalanobis=3.0)
        fisher = {}
        for sigma in (sigmas[-1],) if not multi else (SIGMAS[0], 1.0, SIGMAS[-1]):
            noised = mixture.convolve(float(sigma))
            score = T.sigma_fn(model_fn, float(sigma))
            fisher[f"sigma_{float(sigma):.3g}"] = {
                "on_p_sigma": T.relative_fisher(score, noised.score, T.draw(noised, jax.random.fold_in(key, 5), num_eval)),
                "on_box": T.relative_fisher(score, noised.score, jnp.asarray(box)),
            }
        variants[name] = {
            "sigmas": sigmas,
            "langevin_step": step,
            "mode_weights": np.asarray(modes.weights),
            "mode_weights_tv": float(0.5 * np.abs(np.asarray(modes.weights) - true_w).sum()),
            "off_mode_fraction": float(modes.rejected_fraction),
            "mmd": T.mmd_vs_floor(samples, T.sampler(mixture), test, jax.random.fold_in(key, 6)),
            "relative_fisher": fisher,
            "train_seconds": info["seconds"],
            "samples": samples[:500],
        }
        v = variants[name]
        print(f"{name:18s} TV {v['mode_weights_tv']:.3f}  off-mode {v['off_mode_fraction']:.3f}  "
              f"MMD^2/floor {v['mmd']['ratio_to_floor']:.1f}  Fisher {fisher}")

    plots = {k: v.pop("samples") for k, v in variants.items()}
    results = {"true_weights": true_w, "variants": variants, "step_lr": step_lr,
               "off_mode_fraction_of_exact_samples": float(np.exp(-9.0 / 2))}
    settings = {"steps": steps, "batch_size": 128, "parameterization": "score / sigma (NCSNv2)",
                "weighting": "sigma2", "learning_rate": 1e-3, "model": "MLP 128x3", "n": n,
                "langevin_steps": num_langevin, "init": "4 N(0, I)",
                "data": "8 Gaussians on a circle (radius 2, std 0.25), weights k/36"}
    C.save_results(args, NAME, results, settings)
    _figure(args, variants, plots, test, true_w)
    return results


def _figure(args, variants, plots, test, true_w):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 3.8), layout="constrained")
    axes = fig.subplots(1, 4)
    for ax, (name, samples) in zip(axes, plots.items()):
        ax.scatter(test[:, 0], test[:, 1], s=2, alpha=0.3, color="tab:blue")
        ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5, color="tab:red")
        ax.set_xlim(-4, 4)
        ax.set_ylim(-4, 4)
        ax.set_aspect("equal")
        v = variants[name]
        ax.set_title(f"{name}: TV {v['mode_weights_tv']:.2f}, MMD^2 {v['mmd']['ratio_to_floor']:.1f} floors", fontsize=9)
    ax = axes[3]
    k = np.arange(1, 9)
    ax.bar(k - 0.3, true_w, width=0.15, label="true", color="black")
    for i, (name, v) in enumerate(variants.items()):
        ax.bar(k - 0.15 + 0.15 * i, v["mode_weights"], width=0.15, label=name)
    ax.set_xlabel("mode k")
    ax.set_title("mode weights", fontsize=9)
    ax.legend(fontsize=7)
    C.save_figure(fig, args, NAME)


if __name__ == "__main__":
    main()
