"""Study 5: the weighting lambda(sigma) of multi-scale DSM: sigma^2, 1 or 1/sigma^2.

The same MLP (output / sigma, NCSNv2), data, batches, seed and number of
steps; 10 geometric levels from 4 to 0.01, every example at every level, on
the eight-Gaussian mixture (radius 2, std 0.25). Only lambda changes. The
per-level DSM loss in score space is ~ d / (2 sigma^2) at its optimum plus the
score error, so lambda = sigma^2 makes every level O(1), lambda = 1 lets the
smallest levels dominate (by 1/sigma^2) and 1/sigma^2 even more so
(1/sigma^4). Quick mode runs sigma^2 and 1/sigma^2 only.

Metrics: the relative Fisher divergence to the exact noised score per level;
sample quality of annealed Langevin (100 steps per level, NCSNv2 step size,
Tweedie denoising; 2000 samples): MMD^2 against held-out data next to its
two-sample floor, and the mode weights (total variation to the true 1/8 and
the fraction of samples farther than 3 std from every mode).
"""

from __future__ import annotations

import _common as C
import _toy as T
import jax
import numpy as np

from dsm_jax.data import eight_gaussians_mixture
from dsm_jax.noise import geometric_sigmas

NAME = "study05_weighting"
WEIGHTINGS = ("sigma2", "one", "inv_sigma2")


def main(argv=None):
    args = C.parse_args(__doc__.splitlines()[0], argv)
    steps = 10 if args.quick else 2500
    n = 200 if args.quick else 2000
    num_eval = 200 if args.quick else 4000
    steps_per_sigma = 5 if args.quick else 100
    mixture = eight_gaussians_mixture()
    key = jax.random.key(args.seed)
    train = np.asarray(T.draw(mixture, jax.random.fold_in(key, 0), 10_000))
    test = np.asarray(T.draw(mixture, jax.random.fold_in(key, 1), n))
    sigmas = np.asarray(geometric_sigmas(4.0, 0.01, 10))

    per_weighting, samples_of = {}, {}
    for weighting in WEIGHTINGS[::2] if args.quick else WEIGHTINGS:
        model_fn, info = T.train_dsm(
            train,
            sigmas,
            steps=steps,
            seed=args.seed,
            batch_size=128,
            weighting=weighting,
            scale_by_sigma=True,
            quick=args.quick,
        )
        rel = T.per_sigma_fisher(model_fn, mixture, sigmas, jax.random.fold_in(key, 2), num_samples=num_eval)
        samples, _, _ = T.annealed_samples(
            model_fn, sigmas, jax.random.fold_in(key, 3), n, steps_per_sigma=steps_per_sigma
        )
        samples_of[weighting] = samples
        per_weighting[weighting] = {
            "relative_fisher_per_sigma": rel,
            "mean_relative_fisher": float(np.mean(rel)),
            "mmd": T.mmd_two_bandwidths(samples, T.sampler(mixture), test, jax.random.fold_in(key, 4), 0.25),
            **T.mode_summary(samples, mixture, np.asarray(mixture.weights)),
            "train_seconds": info["seconds"],
        }
        r = per_weighting[weighting]
        print(
            f"{weighting:10s} mean rel. Fisher {r['mean_relative_fisher']:.4f}  MMD^2/floor (h=0.25) "
            f"{r['mmd']['h_0.25']['ratio_to_floor']:.2f}  TV {r['mode_weights_tv']:.3f}  off-mode {r['off_mode_fraction']:.3f}"
        )

    results = {
        "sigmas": sigmas,
        "per_weighting": per_weighting,
        "off_mode_fraction_of_exact_samples": float(np.exp(-9.0 / 2)),
    }
    settings = {
        "steps": steps,
        "batch_size": 128,
        "parameterization": "score / sigma (NCSNv2)",
        "sigma_sampling": "all",
        "learning_rate": 1e-3,
        "model": "MLP 128x3",
        "sampler": {"steps_per_sigma": steps_per_sigma, "n": n},
        "eval_points_per_sigma": num_eval,
        "data": "eight_gaussians_mixture(radius=2, std=0.25)",
    }
    C.save_results(args, NAME, results, settings)
    _figure(args, sigmas, per_weighting, samples_of, test)
    return results


def _figure(args, sigmas, per_weighting, samples_of, test):
    from matplotlib.figure import Figure

    labels = {"sigma2": "lambda = sigma^2", "one": "lambda = 1", "inv_sigma2": "lambda = 1/sigma^2"}
    fig = Figure(figsize=(14, 3.3), layout="constrained")
    axes = fig.subplots(1, 4)
    for w, r in per_weighting.items():
        axes[0].loglog(sigmas, r["relative_fisher_per_sigma"], "o-", label=labels[w])
    axes[0].set_xlabel("sigma")
    axes[0].set_ylabel("relative Fisher divergence")
    axes[0].legend(fontsize=8)
    for ax, (w, samples) in zip(axes[1:], samples_of.items(), strict=False):
        ax.scatter(test[:800, 0], test[:800, 1], s=2, linewidths=0, color="tab:blue")
        ax.scatter(samples[:800, 0], samples[:800, 1], s=2, linewidths=0, color="tab:red")
        ax.set_xlim(-3.2, 3.2)
        ax.set_ylim(-3.2, 3.2)
        ax.set_aspect("equal")
        r = per_weighting[w]
        ax.set_title(
            f"{labels[w]}: MMD^2 (h=0.25) {r['mmd']['h_0.25']['ratio_to_floor']:.1f} floors, TV {r['mode_weights_tv']:.2f}",
            fontsize=9,
        )
    C.save_figure(fig, args, NAME)


if __name__ == "__main__":
    main()
