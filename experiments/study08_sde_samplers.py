"""Study 8: probability-flow ODE vs reverse SDE vs predictor-corrector, quality vs model evaluations.

The eight-Gaussian mixture (exact score known) with a VE SDE (sigma from 0.01
to 6). For the exact noised score and for a noise-conditional MLP trained by
multi-scale DSM (stratified levels), samples from Euler-Maruyama on the
reverse SDE, predictor-corrector (reverse diffusion + one Langevin corrector
step, snr 0.16) and the probability-flow ODE (diffrax Tsit5, adaptive, at
several tolerances) are scored by MMD^2 to exact samples (next to the
two-sample floor) and by sliced Wasserstein distance, against the number of
model evaluations (NFE). The ODE also gives the held-out log-likelihood,
reported in bits per dimension next to the exact value of the mixture.
"""

from __future__ import annotations

import math

import _common as C
import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax.data import eight_gaussians_mixture
from dsm_jax.likelihood import log_likelihood
from dsm_jax.metrics import mmd2, mmd2_floor, sliced_wasserstein
from dsm_jax.models import NoiseConditionalMLP, init_params, make_model_fn
from dsm_jax.noise import geometric_sigmas
from dsm_jax.samplers import euler_maruyama, predictor_corrector, probability_flow_ode
from dsm_jax.sde import VESDE
from dsm_jax.train import make_dsm_loss_fn


def main(argv=None):
    args = C.parse_args(__doc__.splitlines()[0], argv)
    n = 64 if args.quick else 2000
    steps = 10 if args.quick else 5000
    em_steps = [10] if args.quick else [10, 25, 50, 100, 250, 1000]
    pc_steps = [5] if args.quick else [10, 25, 50, 100, 250, 500]
    tols = [1e-1] if args.quick else [1e-1, 1e-2, 1e-3, 1e-5]
    mixture = eight_gaussians_mixture()
    sde = VESDE(sigma_min=0.01, sigma_max=6.0)
    exact = lambda x, sigma: mixture.convolve(sigma[0]).score(x)

    data = np.asarray(mixture.sample(jax.random.key(1), 20000))
    model = NoiseConditionalMLP(width=32 if args.quick else 128, depth=2 if args.quick else 3, fourier_scale=1.0)
    params = init_params(model, jax.random.key(2), jnp.asarray(data[:1]))
    loss_fn = make_dsm_loss_fn(model, geometric_sigmas(6.0, 0.01, 10), sigma_sampling="stratified")
    batches = lambda s: data[np.random.RandomState(s).randint(0, data.shape[0], 256)]
    state, info = C.fit(loss_fn, params, batches, num_steps=steps, learning_rate=1e-3, seed=args.seed)
    learned = make_model_fn(model, state.ema_params)

    reference = jnp.asarray(mixture.sample(jax.random.key(3), n))
    floor = mmd2_floor(mixture.sample, jax.random.key(4), n, against=reference)
    x_init = sde.prior_sample(jax.random.key(5), (n, 2))

    def score_samples(samples):
        return {
            "mmd2": float(mmd2(samples, reference, bandwidth=floor.bandwidth)),
            "sliced_wasserstein": float(sliced_wasserstein(samples, reference, jax.random.key(6))),
        }

    results = {"mmd2_floor": float(floor.floor), "train_seconds": info["seconds"]}
    for name, model_fn in (("exact", exact), ("learned", learned)):
        rows = []
        for k in em_steps:
            r = jax.jit(lambda x, key: euler_maruyama(model_fn, sde, x, key, num_steps=k))(x_init, jax.random.key(7))
            rows.append({"sampler": "em", "steps": k, "nfe": int(r.nfe), **score_samples(r.samples)})
        for k in pc_steps:
            r = jax.jit(lambda x, key: predictor_corrector(model_fn, sde, x, key, num_steps=k, snr=0.16))(
                x_init, jax.random.key(8)
            )
            rows.append({"sampler": "pc", "steps": k, "nfe": int(r.nfe), **score_samples(r.samples)})
        for tol in tols:
            r = jax.jit(lambda x: probability_flow_ode(model_fn, sde, x, rtol=tol, atol=tol))(x_init)
            rows.append({"sampler": "ode", "tol": tol, "nfe": int(r.nfe), **score_samples(r.samples)})
        for row in rows:
            print(name, row)
        results[name] = rows

    # Held-out log-likelihood through the ODE (exact trace), in bits per dimension.
    x_test = jnp.asarray(mixture.sample(jax.random.key(9), 8 if args.quick else 500))
    bpd = lambda nats: float(-np.mean(np.asarray(nats)) / (2 * math.log(2.0)))
    results["bits_per_dim"] = {
        "exact_mixture": bpd(mixture.log_prob(x_test)),
        "ode_exact_score": bpd(log_likelihood(exact, sde, x_test)),
        "ode_learned": bpd(log_likelihood(learned, sde, x_test)),
    }
    print("bits/dim", results["bits_per_dim"])
    C.save_results(
        args, "study08_sde_samplers", results, {"n": n, "train_steps": steps, "sde": "VE(0.01, 6)", "pc_snr": 0.16}
    )

    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, name in zip(axes, ("exact", "learned"), strict=False):
        for sampler, marker in (("em", "o-"), ("pc", "s-"), ("ode", "^-")):
            rows = [r for r in results[name] if r["sampler"] == sampler]
            ax.semilogx(
                [r["nfe"] for r in rows], [max(r["mmd2"], 1e-6) / floor.floor for r in rows], marker, label=sampler
            )
        ax.axhline(1.0, color="0.5", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("model evaluations")
        ax.set_title(f"{name} score")
        ax.legend()
    axes[0].set_ylabel("MMD^2 / two-sample floor")
    C.save_figure(fig, args, "study08_sde_samplers")
    return results


if __name__ == "__main__":
    main()
