"""``--set loss=flow_matching``: a velocity network trained by the command, sampled as its exact VE score."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import tiny_sets

from dsm_jax import cli
from dsm_jax import run as run_lib
from dsm_jax.config import PRESETS, Config
from dsm_jax.flows import LinearPath, VPPath, score_model_from_velocity
from dsm_jax.losses.flow_matching import dsm_weight


@pytest.mark.parametrize("path", [LinearPath(), LinearPath(0.1), VPPath()])
def test_the_diagnostic_weight_turns_a_velocity_error_into_the_dsm_loss_of_the_converted_model(path):
    key_x, key_z, key_t = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (64, 2))
    z = jax.random.normal(key_z, (64, 2))
    t = jax.random.uniform(key_t, (64,), minval=0.2, maxval=0.9)
    velocity = lambda x_t, t: 0.3 * x_t + jnp.sin(3.0 * t)[:, None]  # noqa: E731  (any field)
    x_t, u = path.sample(x, z, t)
    alpha, sigma = path.coefficients(t)
    sigma_ve = sigma / alpha
    score = score_model_from_velocity(velocity, path)(x_t / alpha[:, None], sigma_ve)
    dsm = 0.5 * jnp.sum((score + z / sigma_ve[:, None]) ** 2, axis=1)
    via_weight = dsm_weight(path, t) * jnp.sum((velocity(x_t, t) - u) ** 2, axis=1)
    np.testing.assert_allclose(via_weight, dsm, rtol=2e-4)


def test_a_tiny_flow_matching_run_trains_and_samples_with_heun(tmp_path, capsys):
    workdir = tmp_path / "fm"
    args = ["train", "--workdir", str(workdir), "--num-steps", "40", "--dataset", "two_clusters", "--quiet"]
    assert cli.main([*args, *tiny_sets(loss="flow_matching", sampler="heun", grid_steps=5)]) == 0
    saved = json.loads((workdir / "config.json").read_text())["config"]
    assert (saved["loss"], saved["path"], saved["parameterization"]) == ("flow_matching", "linear", "score")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert losses[-1]["step"] == 40 and all(np.isfinite(r["loss"]) for r in losses)
    per_sigma = np.array([r["per_sigma_loss"] for r in losses], dtype=float)
    assert per_sigma.shape[1] == 4 and np.isfinite(per_sigma).any(axis=0).all()  # every level seen at some step
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert np.all(np.isfinite(metrics["mmd2"])) and np.all(np.isfinite(metrics["relative_fisher_mean"]))
    capsys.readouterr()
    argv = ["sample", "--workdir", str(workdir), "--sampler", "heun", "--steps", "5", "--num", "32"]
    assert cli.main(argv) == 0
    out = np.load(workdir / "samples_heun_n32_seed0.npz")
    assert out["samples"].shape == (32, 2) and np.isfinite(out["samples"]).all() and int(out["nfe"]) == 9


def test_flow_matching_refuses_a_parameterization_the_user_set(tmp_path, capsys):
    args = ["train", "--workdir", str(tmp_path / "w"), "--num-steps", "2", "--dataset", "two_clusters", "--quiet"]
    assert cli.main([*args, "--set", "loss=flow_matching", "--set", "parameterization=x0"]) == 2
    assert "loss='flow_matching' trains a velocity" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_config_validates_the_path_and_the_preset_is_kept():
    with pytest.raises(ValueError, match="path must be one of linear, vp; got 'cosine'"):
        Config(loss="flow_matching", path="cosine")
    preset = PRESETS["flow_matching"]
    cfg, _ = run_lib.fit_to_data(preset, (2,), frozenset())
    cfg, chosen = run_lib._fit_to_loss(cfg, frozenset())
    assert cfg == preset and chosen == () and (preset.loss, preset.sampler) == ("flow_matching", "heun")
