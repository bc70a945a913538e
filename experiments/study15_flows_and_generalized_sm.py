"""Study 15: score (DSM), denoiser (EDM) and velocity (flow matching) at equal wall-clock; a learned covariance.

Three training losses of ``dsm-jax train`` (``--set loss=dsm|edm|flow_matching``),
each on the same network and the same sigma range, trained for the same
wall-clock time (``_common.fit(..., time_budget=...)``, compilation excluded):

* **8 Gaussians** (the ``default``, ``edm`` and ``flow_matching`` presets'
  settings, MLP width 128, depth 3): multi-scale DSM (stratified levels, 10
  evaluations per example and step), EDM's preconditioned denoiser and
  conditional flow matching on the linear (rectified-flow) path. 60 s each.
* **8x8 digits**: the digits presets' settings with an MLP on the flattened
  images (width 256, depth 3) instead of the U-Net: on this shared 2-core CPU
  the U-Net runs about one step per second, too few steps in minutes to
  compare losses. 120 s each.

Every model is sampled as a VE score model (the flow through
:func:`dsm_jax.flows.score_model_from_velocity`) with Euler, Heun and
DPM-Solver++(2M) on Karras grids of the run's sigma range at about 10, 20 and
35 model evaluations, with the adaptive probability-flow ODE (Tsit5, rtol =
atol = 1e-3), and the flow also with its own Euler in ``t`` (a uniform grid of
``t`` from the run's sigma_max to sigma_min, then one step to ``t = 1``) and
the adaptive ODE in ``t``. Quality: MMD^2 over its two-sample floor (toy), the
Frechet distance in the digits classifier's features with its floor and a
Gaussian fit (digits). Log-likelihood through the probability-flow ODE of the
VE SDE of the run's grid (:func:`dsm_jax.likelihood.log_likelihood`): nats on
held-out toy points against the exact log-density of the mixture convolved
with sigma_min (the density that ODE models), bits/dim on held-out digits
dequantized as in study 10 (bin 1/8, offset 3 bits/dim, Hutchinson trace).

Second order: :class:`dsm_jax.models.CovarianceMLP` (full) trained with
:func:`dsm_jax.losses.second_order_dsm_loss` (exact first-order denoiser,
eight log-uniform levels per step in [0.03, 3], loss / sigma^4) on the 8
Gaussians for 60 s; relative Frobenius error of
:func:`dsm_jax.tweedie.learned_posterior_covariance` against the exact
``GaussianMixture.posterior_covariance`` at several sigmas, next to the
``sigma^2 I`` of an untrained head.

Quick mode: one-second budgets, tiny networks, few points (numbers test the harness).
"""

from __future__ import annotations

import dataclasses
import math
import time

import _common as C
import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax import noise, samplers
from dsm_jax.config import get_preset
from dsm_jax.likelihood import bits_per_dim, log_likelihood
from dsm_jax.losses import second_order_dsm_loss
from dsm_jax.metrics import digits_features, frechet_distance, frechet_with_baselines, mmd2, mmd2_floor
from dsm_jax.models import CovarianceMLP, init_params, make_velocity_fn
from dsm_jax.run import LOSSES, build_run, vesde_of_grid
from dsm_jax.tweedie import learned_posterior_covariance

MODELS = ("dsm", "edm", "flow_matching")
PRESETS = {
    "toy": {"dsm": "default", "edm": "edm", "flow_matching": "flow_matching"},
    "digits": {"dsm": "digits", "edm": "edm_digits", "flow_matching": "digits"},
}
NFES = (10, 20, 35)
GRID_SAMPLERS = ("euler", "heun", "dpmpp")
BIN = 2.0 / 16  # digits levels 0..16 map to k / 8 - 1 (study 10)
COV_SIGMAS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
# The presets' 0.999 averages over ~1000 steps, as many as a minute of training on this CPU gives the
# multi-level DSM: its EMA would still hold a third of the initialisation. 0.99 averages over ~100 steps.
EMA_DECAY = 0.99


def settings_for(quick: bool) -> dict:
    if quick:  # one budget and one grid sampler: the harness's every path, few compilations
        return dict(
            budget={"toy": None, "digits": None},  # fixed steps, not seconds: the same harness on any machine
            max_steps=100,
            width={"toy": 16, "digits": 16},
            n_toy=256,
            n_ll=4,
            tol=1e-1,
            nfes=(4,),
            grid_samplers=("heun",),
        )
    return dict(
        budget={"toy": 60.0, "digits": 120.0},
        max_steps=10**9,
        width={"toy": 128, "digits": 256},
        n_toy=2000,
        n_ll=200,
        tol=1e-3,
        nfes=NFES,
        grid_samplers=GRID_SAMPLERS,
    )


def make_run(data: str, loss: str, s: dict):
    """The run of ``dsm-jax train --preset P --set loss=L --set model=mlp`` (``width`` as in :func:`settings_for`)."""
    config = dataclasses.replace(get_preset(PRESETS[data][loss]), loss=loss, model="mlp", width=s["width"][data])
    config = dataclasses.replace(config, steps_per_call=50)  # the MLP runs well inside a compiled loop
    return build_run(config, user_set=frozenset({"model"}))


def train(run, budget: float | None, max_steps: int, seed: int):
    """``(ema_params, info)``: the run's loss (:data:`dsm_jax.run.LOSSES`) for ``budget`` seconds."""
    train_x = np.asarray(run.dataset.train, np.float32)
    batch = run.config.batch_size

    def batch_at(step):
        return train_x[np.random.RandomState(seed + step).randint(0, train_x.shape[0], batch)]

    params = init_params(run.model, jax.random.key(seed), jnp.asarray(train_x[:1]))
    lr = run.config.learning_rate
    state, info = C.fit(
        LOSSES[run.config.loss].make(run),
        params,
        batch_at,
        num_steps=max_steps,
        learning_rate=lr,
        seed=seed,
        ema_decay=EMA_DECAY,
        time_budget=budget,
    )
    return state.ema_params, info


def grid_levels(sampler: str, nfe: int) -> int:
    """Levels of a Karras grid giving about ``nfe`` evaluations (Heun: ``2 n - 1``)."""
    return (nfe + 1) // 2 if sampler == "heun" else nfe


def flow_euler(velocity_fn, x, t_hi: float, t_lo: float, nfe: int):
    """Euler in ``t``: ``nfe - 1`` uniform steps from ``t_hi`` to ``t_lo``, then one to ``t = 1``; ``nfe`` evaluations."""
    ts = jnp.concatenate([jnp.linspace(t_hi, t_lo, nfe), jnp.ones(1)])

    def step(x, i):
        return x + (ts[i + 1] - ts[i]) * velocity_fn(x, ts[i]), None

    x, _ = jax.lax.scan(step, x, jnp.arange(nfe))
    return x


def sample_all(run, params, x_grid, s: dict) -> list:
    """``[(sampler, nfe, samples, seconds)]``: every sampler of the study on one model."""
    model_fn = run.model_fn(params)
    p = run.config.parameterization  # "x0" for EDM's denoiser, "score" for DSM and the converted velocity
    hi, lo = float(run.sigmas[0]), float(run.sigmas[-1])
    calls = []
    tol = s["tol"]
    grid_samplers = {"euler": samplers.euler, "heun": samplers.heun, "dpmpp": samplers.dpm_solver_pp}
    for name in s["grid_samplers"]:
        solver = grid_samplers[name]
        for nfe in s["nfes"]:
            grid = noise.karras_sigmas(hi, lo, grid_levels(name, nfe))
            calls.append(
                (
                    name,
                    lambda x, solver=solver, grid=grid: solver(
                        model_fn, x, grid, parameterization=p, return_result=True
                    ),
                )
            )
    sde = vesde_of_grid(run.sigmas)
    calls.append(
        ("ode", lambda x: samplers.probability_flow_ode(model_fn, sde, x, rtol=tol, atol=tol, parameterization=p))
    )
    if run.config.loss == "flow_matching":
        from dsm_jax.flows import get_path, integrate

        path = get_path(run.config.path)
        velocity = make_velocity_fn(run.model, params, path)
        t_hi, t_lo = float(path.t_from_noise_ratio(hi)), float(path.t_from_noise_ratio(lo))
        alpha_hi = float(path.alpha(t_hi))
        for nfe in s["nfes"]:
            calls.append(("flow_euler", lambda x, nfe=nfe: (flow_euler(velocity, alpha_hi * x, t_hi, t_lo, nfe), nfe)))

        def flow_ode(x):
            x_lo, nfe = integrate(velocity, alpha_hi * x, t0=t_hi, t1=t_lo, rtol=tol, atol=tol)
            return x_lo / path.alpha(t_lo), nfe  # the VE frame at sigma_min, as the VE ODE ends

        calls.append(("flow_ode", flow_ode))
    out = []
    for name, fn in calls:
        jitted = jax.jit(fn)
        C.block(jitted(x_grid))  # compile
        t0 = time.perf_counter()
        result = C.block(jitted(x_grid))
        seconds = time.perf_counter() - t0
        samples, nfe = (result.samples, result.nfe) if hasattr(result, "samples") else result
        out.append((name, int(nfe), np.asarray(samples), seconds))
    return out


def likelihood(run, params, x, key, *, trace: str, tol: float) -> np.ndarray:
    sde = vesde_of_grid(run.sigmas)
    p = run.config.parameterization
    ll = log_likelihood(
        run.model_fn(params), sde, jnp.asarray(x), key, trace=trace, rtol=tol, atol=tol, parameterization=p
    )
    return np.asarray(ll)


def covariance_study(mixture, s: dict, quick: bool, seed: int) -> dict:
    """A full-covariance head trained by second-order DSM; relative Frobenius errors per sigma."""
    head = CovarianceMLP(structure="full", width=16 if quick else 64, depth=1 if quick else 2)
    params = head.init(jax.random.key(seed), jnp.zeros((1, 2)), jnp.ones(1))["params"]
    pool = np.asarray(mixture.sample(jax.random.key(seed + 11), 200_000), np.float32)
    denoiser = jax.vmap(lambda y, sigma: mixture.posterior_mean(y[None], sigma)[0])
    log_lo, log_hi = math.log(0.03), math.log(3.0)

    def loss_fn(p, x, key):
        cov_fn = lambda y, sigma: head.apply({"params": p}, y, sigma)  # noqa: E731
        k_sigma, k_noise = jax.random.split(key)
        sigmas = jnp.exp(jax.random.uniform(k_sigma, (8,), minval=log_lo, maxval=log_hi))

        def one(sigma, k):
            # / sigma^4: the covariance is O(sigma^2), so every level weighs O(1).
            return second_order_dsm_loss(cov_fn, x, sigma, k, denoiser_fn=denoiser) / sigma**4

        return jnp.mean(jax.vmap(one)(sigmas, jax.random.split(k_noise, 8)))

    def batch_at(step):
        return pool[np.random.RandomState(seed + step).randint(0, pool.shape[0], 128)]

    state, info = C.fit(
        loss_fn,
        params,
        batch_at,
        num_steps=2 * s["max_steps"],
        seed=seed,
        ema_decay=0.99,
        time_budget=s["budget"]["toy"],
        learning_rate=3e-3,
    )
    cov_fn = lambda y, sigma: head.apply({"params": state.ema_params}, y, sigma)  # noqa: E731
    norm = lambda a: float(jnp.mean(jnp.sqrt(jnp.sum(a**2, (1, 2)))))  # noqa: E731
    rows = []
    n = 512 if quick else 4096
    for i, sigma in enumerate(COV_SIGMAS):
        kx, kn = jax.random.split(jax.random.key(seed + 100 + i))
        y = mixture.sample(kx, n) + sigma * jax.random.normal(kn, (n, 2))
        exact = mixture.posterior_covariance(y, sigma)
        learned = learned_posterior_covariance(cov_fn, y, sigma)
        rows.append(
            {
                "sigma": sigma,
                "relative_frobenius": norm(learned - exact) / norm(exact),
                "relative_frobenius_sigma2_identity": norm(sigma**2 * jnp.eye(2) - exact) / norm(exact),
            }
        )
        print("covariance", rows[-1], flush=True)
    return {"rows": rows, "train_steps": info["steps"], "train_seconds": info["seconds"]}


def main(argv=None):
    args = C.parse_args(__doc__.splitlines()[0], argv)
    s = settings_for(args.quick)
    results = {}
    for data in ("toy", "digits"):
        runs = {loss: make_run(data, loss, s) for loss in MODELS}
        first = runs["dsm"]
        test = np.asarray(first.dataset.test, np.float32)
        if data == "toy":
            n = s["n_toy"]
            mixture = toy_mixture = first.dataset.distribution
            reference = jnp.asarray(mixture.sample(jax.random.key(3), n))
            floor = mmd2_floor(mixture.sample, jax.random.key(4), n, against=reference)
            baseline = {"mmd2_floor": float(floor.floor)}

            def quality(samples, reference=reference, floor=floor):
                value = float(mmd2(jnp.asarray(samples), reference, bandwidth=floor.bandwidth))
                return {"mmd2": value, "mmd2_over_floor": value / float(floor.floor)}

            x_ll = np.asarray(mixture.sample(jax.random.key(7), s["n_ll"]))
            exact_ll = np.asarray(mixture.convolve(float(first.sigmas[-1])).log_prob(jnp.asarray(x_ll)))
            baseline["exact_log_likelihood_nats"] = float(np.mean(exact_ll))
        else:
            n = 32 if args.quick else test.shape[0]
            report = frechet_with_baselines(test[:n], test, first.dataset.train, jax.random.key(4))
            baseline = {"frechet_floor": report.floor, "frechet_gaussian": report.gaussian, "frechet_n": report.n}
            test_features = digits_features(test)

            def quality(samples, test_features=test_features):
                flat = np.nan_to_num(np.asarray(samples), nan=0.0, posinf=1e3, neginf=-1e3)
                return {"frechet": frechet_distance(digits_features(flat), test_features)}

            x_ll = test[: s["n_ll"]] + BIN * (
                np.asarray(jax.random.uniform(jax.random.key(1), test[: s["n_ll"]].shape)) - 0.5
            )
        x_grid = float(first.sigmas[0]) * jax.random.normal(jax.random.key(5), (n,) + first.dataset.shape)
        case = {"n": n, **baseline, "models": {}}
        for loss, run in runs.items():
            assert np.allclose(run.sigmas, first.sigmas), "the three models share one sigma range"
            params, info = train(run, s["budget"][data], s["max_steps"], args.seed)
            rows = []
            for sampler, nfe, samples, seconds in sample_all(run, params, x_grid, s):
                finite = float(np.mean(np.all(np.isfinite(samples.reshape(n, -1)), axis=1)))
                rows.append(
                    {"sampler": sampler, "nfe": nfe, "seconds": seconds, "finite_fraction": finite, **quality(samples)}
                )
                print(f"{data}/{loss}", rows[-1], flush=True)
            t0 = time.perf_counter()
            if data == "toy":
                ll = likelihood(run, params, x_ll, jax.random.key(2), trace="exact", tol=s["tol"])
                ll_summary = {
                    "log_likelihood_nats": float(np.mean(ll)),
                    "log_likelihood_minus_exact": float(np.mean(ll - exact_ll)),
                    "log_likelihood_stderr": float(np.std(ll - exact_ll) / math.sqrt(ll.size)),
                }
            else:
                ll = likelihood(run, params, x_ll, jax.random.key(2), trace="hutchinson", tol=s["tol"])
                dim = int(np.prod(test.shape[1:]))
                bpd = np.asarray(bits_per_dim(jnp.asarray(ll), dim, dequantization_offset=math.log2(1.0 / BIN)))
                ll_summary = {
                    "bits_per_dim": float(np.mean(bpd)),
                    "bits_per_dim_stderr": float(np.std(bpd) / math.sqrt(bpd.size)),
                }
            ll_summary["likelihood_seconds"] = time.perf_counter() - t0
            print(f"{data}/{loss}", ll_summary, info["steps"], "steps", flush=True)
            case["models"][loss] = {
                "train_steps": info["steps"],
                "train_seconds": info["seconds"],
                "final_loss": info["losses"][-1],
                "rows": rows,
                **ll_summary,
            }
        results[data] = case
    results["covariance"] = covariance_study(toy_mixture, s, args.quick, args.seed)
    settings = {
        **s,
        "ema_decay": EMA_DECAY,
        "presets": PRESETS,
        "models": MODELS,
        "cov_sigmas": COV_SIGMAS,
        "network": "NoiseConditionalMLP (depth 3) on both data sets; the digits flattened",
    }
    C.save_results(args, "study15_flows_and_generalized_sm", results, settings)
    plot(results, args)
    return results


MARKERS = {"euler": "x-", "heun": "D-", "dpmpp": "P-", "flow_euler": "o--"}
COLORS = {"dsm": "C0", "edm": "C1", "flow_matching": "C2"}


def plot(results: dict, args) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, data in zip(axes[:2], ("toy", "digits"), strict=True):
        case = results[data]
        key = "mmd2_over_floor" if data == "toy" else "frechet"
        for loss, model in case["models"].items():
            for sampler, marker in MARKERS.items():
                rows = sorted((r for r in model["rows"] if r["sampler"] == sampler), key=lambda r: r["nfe"])
                if rows:
                    ax.loglog(
                        [r["nfe"] for r in rows],
                        [r[key] for r in rows],
                        marker,
                        color=COLORS[loss],
                        label=f"{loss} {sampler}",
                        ms=4,
                    )
            for row in model["rows"]:
                if row["sampler"] in ("ode", "flow_ode"):
                    ax.loglog(
                        [row["nfe"]],
                        [row[key]],
                        "*" if row["sampler"] == "ode" else "s",
                        color=COLORS[loss],
                        ms=9,
                        label=f"{loss} adaptive {row['sampler']}",
                    )
        if data == "toy":
            ax.axhline(1.0, color="0.5", ls="--", lw=0.8, label="two-sample floor")
            # Linear within +-1 floor: the unbiased MMD^2 of samples at the floor is often negative.
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylabel("MMD^2 / floor (symlog)")
        else:
            ax.axhline(case["frechet_floor"], color="0.5", ls="--", lw=0.8, label="floor (real vs real)")
            ax.axhline(case["frechet_gaussian"], color="0.5", ls=":", lw=0.8, label="Gaussian fit")
            ax.set_ylabel("Frechet distance (digits features)")
        ax.set_xlabel("model evaluations per sample")
        ax.set_title(f"{data}: equal wall-clock training")
        ax.legend(fontsize=6, ncol=2)
    ax = axes[2]
    rows = results["covariance"]["rows"]
    ax.loglog([r["sigma"] for r in rows], [r["relative_frobenius"] for r in rows], "o-", label="second-order DSM head")
    ax.loglog(
        [r["sigma"] for r in rows],
        [r["relative_frobenius_sigma2_identity"] for r in rows],
        "s--",
        color="0.5",
        label="sigma^2 I (untrained)",
    )
    ax.set_xlabel("sigma")
    ax.set_ylabel("relative Frobenius error of Cov[x | y]")
    ax.set_title("8 Gaussians: learned posterior covariance")
    ax.legend(fontsize=7)
    C.save_figure(fig, args, "study15_flows_and_generalized_sm")


if __name__ == "__main__":
    main()
