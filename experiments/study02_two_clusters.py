"""Study 2: the tutorial's two-cluster mixture with single-sigma DSM (sigma = 0.5).

The mixture 1/2 N((2, 2), 0.25 I) + 1/2 N((-2, -2), 0.25 I); an MLP trained
with DSM at the one level sigma = 0.5 (the tutorial's setting), then plain
Langevin dynamics with the learned score from 3 N(0, I) (step 0.01, 1000
steps, as in the tutorial).

DSM at one sigma learns the score of the *noised* law p_sigma = p * N(0,
sigma^2 I), known exactly here (``GaussianMixture.convolve``), not the score
of p. We report the relative Fisher divergence of the learned field to both,
and compare the Langevin samples (whose stationary law is p_sigma) with
fresh draws of p_sigma and of p: MMD^2 next to its two-sample floor, mode
weights and the per-cluster spread.
"""

from __future__ import annotations

import _common as C
import _toy as T
import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax.data import two_clusters_mixture
from dsm_jax.metrics import mode_weights
from dsm_jax.samplers import langevin

NAME = "study02_two_clusters"
SIGMA = 0.5


def main(argv=None):
    args = C.parse_args(__doc__.splitlines()[0], argv)
    steps = 20 if args.quick else 3000
    n = 200 if args.quick else 2000
    langevin_steps = 50 if args.quick else 1000
    mixture = two_clusters_mixture()
    noised = mixture.convolve(SIGMA)
    key = jax.random.key(args.seed)
    train = np.asarray(T.draw(mixture, jax.random.fold_in(key, 0), 10_000))
    test = np.asarray(T.draw(mixture, jax.random.fold_in(key, 1), n))

    model_fn, info = T.train_dsm(train, [SIGMA], steps=steps, seed=args.seed, quick=args.quick)
    score = T.sigma_fn(model_fn, SIGMA)

    rel_noised = T.relative_fisher(score, noised.score, T.draw(noised, jax.random.fold_in(key, 2), 10_000))
    rel_clean = T.relative_fisher(score, mixture.score, T.draw(mixture, jax.random.fold_in(key, 3), 10_000))

    x0 = 3.0 * jax.random.normal(jax.random.fold_in(key, 4), (n, 2))
    run = jax.jit(
        lambda x0, k: langevin(
            score, x0, k, step_size=0.01, num_steps=langevin_steps, return_trajectory=True, trajectory_every=5
        )
    )
    samples, traj = run(x0, jax.random.fold_in(key, 5))
    samples = np.asarray(samples)
    held_noisy = np.asarray(T.draw(noised, jax.random.fold_in(key, 6), n))
    # The median bandwidth (~3.5) sees mostly the mode weights; h = 0.5 resolves the clusters' width.
    mmd = {
        "p_sigma": T.mmd_two_bandwidths(samples, T.sampler(noised), held_noisy, jax.random.fold_in(key, 7), 0.5),
        "p_data": T.mmd_two_bandwidths(samples, T.sampler(mixture), test, jax.random.fold_in(key, 7), 0.5),
    }
    assign = np.asarray(jnp.argmax(mixture.responsibilities(jnp.asarray(samples)), axis=1))
    spread = float(np.mean([samples[assign == k].std(axis=0).mean() for k in range(2) if np.any(assign == k)]))

    results = {
        "relative_fisher_vs_noised_score": rel_noised,
        "relative_fisher_vs_clean_score": rel_clean,
        "langevin_mmd": mmd,
        "langevin_mode_weights": np.asarray(mode_weights(jnp.asarray(samples), mixture).weights),
        "langevin_cluster_std": spread,
        "cluster_std_p_data": 0.5,
        "cluster_std_p_sigma": float(np.sqrt(0.25 + SIGMA**2)),
        "train_steps": info["steps"],
        "train_seconds": info["seconds"],
        "final_loss": info["losses"][-1],
    }
    settings = {
        "sigma": SIGMA,
        "steps": steps,
        "batch_size": 256,
        "learning_rate": 1e-3,
        "model": "MLP 128x3",
        "langevin": {"step_size": 0.01, "num_steps": langevin_steps, "init": "3 N(0, I)", "n": n},
    }
    C.save_results(args, NAME, results, settings)
    ratios = {f"{law}_{h}": round(v["ratio_to_floor"], 2) for law, d in mmd.items() for h, v in d.items()}
    print(f"relative Fisher: vs p_sigma {rel_noised:.4f}, vs p {rel_clean:.4f}; MMD^2 / floor {ratios}")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    T.quiver(axes[0], noised.score, background=train[:800], title=f"exact score of p_sigma (sigma={SIGMA})")
    T.quiver(axes[1], score, background=train[:800], title=f"learned by DSM; rel. Fisher {rel_noised:.3f}")
    ax = axes[2]
    ax.scatter(test[:800, 0], test[:800, 1], s=2, linewidths=0, color="tab:blue", label="data")
    ax.scatter(samples[:800, 0], samples[:800, 1], s=2, linewidths=0, color="tab:red", label="Langevin (learned score)")
    path = np.asarray(traj)[:, 0]
    ax.plot(path[:, 0], path[:, 1], "-", color="tab:green", lw=0.8, label="one chain")
    ax.set_xlim(-4.5, 4.5)
    ax.set_ylim(-4.5, 4.5)
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=7, markerscale=4)
    ax.set_title(
        f"MMD^2 (h=0.5) vs p_sigma: {ratios['p_sigma_h_0.5']:.1f} floors; vs p: {ratios['p_data_h_0.5']:.1f}",
        fontsize=9,
    )
    C.save_figure(fig, args, NAME)
    return results


if __name__ == "__main__":
    main()
