"""Study 4: what the network outputs (score, eps or x0) at an equal training budget.

The same MLP, data, batches, seed and number of steps; multi-scale DSM with
``lambda(sigma) = sigma^2`` on 10 geometric levels from 4 to 0.01, every
example at every level, on the eight-Gaussian mixture (radius 2, std 0.25).
Only the meaning of the raw network output f changes:

* ``score``: s = f;
* ``score / sigma``: s = f / sigma (NCSNv2's output scaling);
* ``eps``: s = -f / sigma (f predicts the noise, DDPM);
* ``x0``: s = (f - x) / sigma^2 (f predicts the clean point).

With this weighting the loss is the same functional of s for all four
(``sigma^2 |s + eps / sigma|^2``), so differences come from how easy each
target is for the network (quick mode: score and x0 only). Metric: the relative Fisher divergence
E|s - grad log p_sigma|^2 / E|grad log p_sigma|^2 under p_sigma, per level,
against the exact noised mixture score.
"""

from __future__ import annotations

import _common as C
import _toy as T
import jax
import numpy as np

from dsm_jax.data import eight_gaussians_mixture
from dsm_jax.noise import geometric_sigmas

NAME = "study04_parameterization"
# name -> (parameterization, scale_by_sigma)
VARIANTS = {"score": ("score", False), "score/sigma": ("score", True), "eps": ("eps", False), "x0": ("x0", False)}


def main(argv=None):
    args = C.parse_args(__doc__.splitlines()[0], argv)
    steps = 10 if args.quick else 2500
    num_eval = 200 if args.quick else 4000
    mixture = eight_gaussians_mixture()
    key = jax.random.key(args.seed)
    train = np.asarray(T.draw(mixture, jax.random.fold_in(key, 0), 10_000))
    sigmas = np.asarray(geometric_sigmas(4.0, 0.01, 10))

    per_variant = {}
    names = ("score", "x0") if args.quick else tuple(VARIANTS)
    for name in names:
        parameterization, scale_by_sigma = VARIANTS[name]
        model_fn, info = T.train_dsm(
            train,
            sigmas,
            steps=steps,
            seed=args.seed,
            batch_size=128,
            parameterization=parameterization,
            scale_by_sigma=scale_by_sigma,
            quick=args.quick,
        )
        rel = T.per_sigma_fisher(
            model_fn,
            mixture,
            sigmas,
            jax.random.fold_in(key, 1),
            parameterization=parameterization,
            num_samples=num_eval,
        )
        per_variant[name] = {
            "relative_fisher_per_sigma": rel,
            "mean_relative_fisher": float(np.mean(rel)),
            "relative_fisher_at_sigma_min": float(rel[-1]),
            "worst_relative_fisher": float(np.max(rel)),
            "train_seconds": info["seconds"],
            "final_loss": info["losses"][-1],
        }
        print(f"{name:12s} mean rel. Fisher {np.mean(rel):.4f}  at sigma_min {rel[-1]:.4f}  worst {np.max(rel):.4f}")

    results = {"sigmas": sigmas, "per_variant": per_variant}
    settings = {
        "steps": steps,
        "batch_size": 128,
        "weighting": "sigma2",
        "sigma_sampling": "all",
        "learning_rate": 1e-3,
        "model": "MLP 128x3",
        "eval_points_per_sigma": num_eval,
        "data": "eight_gaussians_mixture(radius=2, std=0.25)",
    }
    C.save_results(args, NAME, results, settings)

    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.subplots()
    for name, r in per_variant.items():
        ax.loglog(sigmas, r["relative_fisher_per_sigma"], "o-", label=f"{name} (mean {r['mean_relative_fisher']:.3f})")
    ax.set_xlabel("sigma")
    ax.set_ylabel("relative Fisher divergence to the exact noised score")
    ax.set_title(f"same budget: {steps} steps, batch 128 x 10 levels", fontsize=9)
    ax.legend(fontsize=8)
    C.save_figure(fig, args, NAME)
    return results


if __name__ == "__main__":
    main()
