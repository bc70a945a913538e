"""Wall-clock time to a sample set: annealed Langevin against Heun and DPM-Solver++ on the same trained model.

Study 13 (``experiments/study13_fast_samplers.py``) measures quality against
model evaluations; this script times the settings that reach the study's
targets, side by side in one run (interleaved repeats, so the ratios hold on
a shared machine): for each cached preset run (``experiments/results/_cache``,
trained by study 13), annealed Langevin with the run's default budget and
Heun / DPM-Solver++ at 35 / 20 evaluations, drawing the same number of
samples from the same start. It prints and writes
``fast_samplers.json`` and ``fast_samplers.md`` next to this file; the
quality of each setting is the study's, printed beside the times.

    python experiments/benchmarks/bench_fast_samplers.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from harness import interleaved  # noqa: E402

from dsm_jax import noise, samplers  # noqa: E402

# (preset, samples, annealed Langevin steps per level)
CASES = [("default", 2000, 100), ("edm", 2000, 100), ("digits", 297, 20), ("edm_digits", 297, 20)]


def contenders(run, model_fn, n: int, ald_steps: int) -> dict:
    """``{name: (nfe, blocking fn)}`` for the run's model: ald, heun (35 evaluations), dpmpp (20)."""
    p = run.config.parameterization
    sigmas = jnp.asarray(run.sigmas)
    x = float(run.sigmas[0]) * jax.random.normal(jax.random.key(0), (n,) + run.dataset.shape)
    step_lr = 2.0 * float(noise.ncsnv2_step_size(run.sigmas, ald_steps))
    hi, lo = float(run.sigmas[0]), float(run.sigmas[-1])
    ald = jax.jit(
        lambda x, k: samplers.annealed_langevin(
            model_fn, x, k, sigmas, steps_per_sigma=ald_steps, step_lr=step_lr, parameterization=p
        )
    )
    heun = jax.jit(lambda x: samplers.heun(model_fn, x, noise.karras_sigmas(hi, lo, 18), parameterization=p))
    dpmpp = jax.jit(lambda x: samplers.dpm_solver_pp(model_fn, x, noise.karras_sigmas(hi, lo, 20), parameterization=p))
    key = jax.random.key(1)
    return {
        f"ald_{len(run.sigmas) * ald_steps + 1}": lambda: jax.block_until_ready(ald(x, key)),
        "heun_35": lambda: jax.block_until_ready(heun(x)),
        "dpmpp_20": lambda: jax.block_until_ready(dpmpp(x)),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny untrained runs, for the tests")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    import study13_fast_samplers as study

    rows = []
    for preset, n, ald_steps in CASES:
        run, params = study.trained(preset, args.quick)
        if args.quick:
            n, ald_steps = 16, 2
        timed = interleaved(
            contenders(run, run.model_fn(params), n, ald_steps),
            repeats=2 if args.quick else args.repeats,
            target_ms=10 if args.quick else 500,
            warmup=1,
        )
        ald_name = next(k for k in timed if k.startswith("ald"))
        row = {
            "preset": preset,
            "samples": n,
            "median_s": {k: v["median_s"] for k, v in timed.items()},
            "ald/heun": timed[ald_name]["median_s"] / timed["heun_35"]["median_s"],
            "ald/dpmpp": timed[ald_name]["median_s"] / timed["dpmpp_20"]["median_s"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    payload = {"quick": args.quick, "devices": str(jax.devices()), "jax": jax.__version__, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (args.out / f"fast_samplers{suffix}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "| preset | samples | annealed Langevin | Heun, 35 NFE | DPM-Solver++, 20 NFE | ald / heun | ald / dpmpp |"
    ]
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        t = r["median_s"]
        ald_name = next(k for k in t if k.startswith("ald"))
        lines.append(
            f"| {r['preset']} | {r['samples']} | {t[ald_name]:.3f} s ({ald_name.split('_')[1]} NFE) | "
            f"{t['heun_35']:.3f} s | {t['dpmpp_20']:.3f} s | {r['ald/heun']:.1f}x | {r['ald/dpmpp']:.1f}x |"
        )
    (args.out / f"fast_samplers{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
