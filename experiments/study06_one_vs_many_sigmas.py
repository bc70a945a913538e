"""Study 6: one noise level or many: why NCSN anneals.

Data: eight Gaussians on a circle of radius 2 (std 0.25) with unequal weights
w_k = k / 36 (k = 1..8). The same MLP and training budget for four models:

* one level only, sigma in {0.01 (NCSN's last level), 0.1, 1.0}: DSM at that
  level, sampled with plain Langevin at that level, step 0.1 (0.25^2 + sigma^2)
  (a tenth of the local variance of p_sigma: stable, and mixes within a mode
  in tens of steps);
* NCSN: 10 geometric levels from 4 to 0.01 (output / sigma, lambda = sigma^2),
  sampled with annealed Langevin (100 steps per level, NCSNv2 step size).

All samplers start from sigma_1 N(0, I) = 4 N(0, I) and make the same number
of score evaluations (1000 steps); quick mode runs sigma = 0.1 and NCSN only.
Metrics: mode weights (total variation to w; fraction of samples beyond 3
std of every mode), MMD^2 against held-out data next to its two-sample floor
(median bandwidth, and h = 0.25 which sees blur), and the relative Fisher
divergence of each model to the exact score of its own levels, over p_sigma
and over a uniform box [-4, 4]^2 (the low-density regions Langevin starts in).
"""

from __future__ import annotations

import _common as C
import _toy as T
import jax
import numpy as np

from dsm_jax.distributions import GaussianMixture
from dsm_jax.noise import geometric_sigmas, ncsnv2_step_size
from dsm_jax.samplers import langevin

NAME = "study06_one_vs_many_sigmas"
SIGMAS = np.asarray(geometric_sigmas(4.0, 0.01, 10))
MODE_STD = 0.25


def ring_mixture() -> GaussianMixture:
    angles = 2.0 * np.pi * np.arange(8) / 8
    means = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture(np.arange(1, 9) / 36.0, means, np.full((8, 2), MODE_STD**2))


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
    singles = [
        ("single_sigma_0.01", SIGMAS[-1:]),
        ("single_sigma_0.1", np.array([0.1])),
        ("single_sigma_1.0", np.array([1.0])),
    ]
    runs = singles + [("ncsn_10_levels", SIGMAS)]
    for name, sigmas in runs[1::2] if args.quick else runs:
        multi = len(sigmas) > 1
        model_fn, info = T.train_dsm(
            train, sigmas, steps=steps, seed=args.seed, batch_size=128, scale_by_sigma=True, quick=args.quick
        )
        if multi:
            samples, _, _ = T.annealed_samples(
                model_fn, sigmas, jax.random.fold_in(key, 4), n, steps_per_sigma=steps_per_sigma
            )
            step = None
        else:
            sigma = float(sigmas[0])
            step = 0.1 * (MODE_STD**2 + sigma**2)
            score = T.sigma_fn(model_fn, sigma)
            run = jax.jit(lambda x, k: langevin(score, x, k, step_size=step, num_steps=num_langevin))
            samples = np.asarray(run(x0, jax.random.fold_in(key, 4)))
        at = SIGMAS[[0, 4, 9]] if multi else sigmas  # the model's own levels: first, middle, last
        on_p_sigma = T.per_sigma_fisher(model_fn, mixture, at, jax.random.fold_in(key, 5), num_samples=num_eval)
        on_box = T.fisher_on_points(model_fn, mixture, at, box)
        fisher = {
            f"sigma_{float(s):.3g}": {"on_p_sigma": float(a), "on_box": float(b)}
            for s, a, b in zip(at, on_p_sigma, on_box, strict=False)
        }
        variants[name] = {
            "sigmas": sigmas,
            "langevin_step": step,
            **T.mode_summary(samples, mixture, true_w),
            "mmd": T.mmd_two_bandwidths(samples, T.sampler(mixture), test, jax.random.fold_in(key, 6), 0.25),
            "relative_fisher": fisher,
            "train_seconds": info["seconds"],
            "samples": samples[:500],
        }
        v = variants[name]
        print(
            f"{name:18s} TV {v['mode_weights_tv']:.3f}  off-mode {v['off_mode_fraction']:.3f}  "
            f"MMD^2/floor (h=0.25) {v['mmd']['h_0.25']['ratio_to_floor']:.1f}  Fisher {fisher}"
        )

    plots = {k: v.pop("samples") for k, v in variants.items()}
    results = {
        "true_weights": true_w,
        "variants": variants,
        "step_lr": step_lr,
        "off_mode_fraction_of_exact_samples": float(np.exp(-9.0 / 2)),
    }
    settings = {
        "steps": steps,
        "batch_size": 128,
        "parameterization": "score / sigma (NCSNv2)",
        "weighting": "sigma2",
        "learning_rate": 1e-3,
        "model": "MLP 128x3",
        "n": n,
        "langevin_steps": num_langevin,
        "init": "4 N(0, I)",
        "data": "8 Gaussians on a circle (radius 2, std 0.25), weights k/36",
    }
    C.save_results(args, NAME, results, settings)
    _figure(args, variants, plots, test, true_w)
    return results


def _figure(args, variants, plots, test, true_w):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(18, 3.4), layout="constrained")
    axes = fig.subplots(1, 5)
    for ax, (name, samples) in zip(axes, plots.items(), strict=False):
        ax.scatter(test[:500, 0], test[:500, 1], s=2, linewidths=0, color="tab:blue")
        ax.scatter(samples[:, 0], samples[:, 1], s=2, linewidths=0, color="tab:red")
        ax.set_xlim(-4, 4)
        ax.set_ylim(-4, 4)
        ax.set_aspect("equal")
        v = variants[name]
        ax.set_title(
            f"{name}: TV {v['mode_weights_tv']:.2f}, MMD^2 (h=0.25) {v['mmd']['h_0.25']['ratio_to_floor']:.1f} floors",
            fontsize=9,
        )
    ax = axes[4]
    k = np.arange(1, 9)
    ax.bar(k - 0.36, true_w, width=0.14, label="true", color="black")
    for i, (name, v) in enumerate(variants.items()):
        ax.bar(k - 0.22 + 0.14 * i, v["mode_weights"], width=0.14, label=name)
    ax.set_xlabel("mode k")
    ax.set_title("mode weights", fontsize=9)
    ax.legend(fontsize=7)
    C.save_figure(fig, args, NAME)


if __name__ == "__main__":
    main()
