"""dsm_jax.run, the application layer, called as a library: the sampler table, the VE SDE of the grid,
output names, the work-directory plan and training a work directory without the command line."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsm_jax import cli, errors
from dsm_jax import config as config_lib
from dsm_jax import run as run_lib
from dsm_jax.config import Config
from dsm_jax.models import init_params

TINY = Config(
    dataset="two_clusters",
    num_train=256,
    num_test=64,
    width=16,
    depth=1,
    num_sigmas=3,
    batch_size=32,
    steps_per_call=5,
    save_every=10,
    log_every=5,
    warmup_steps=2,
    num_samples=32,
    steps_per_sigma=2,
    sde_steps=4,
    fisher_samples=32,
    num_steps=10,
)


@pytest.fixture(scope="module")
def tiny_run():
    """A run of TINY with perturbed initial parameters (the MLP's zero-initialised output layer gives a zero
    score, on which the predictor-corrector's step 2 (snr |z| / |s|)^2 is infinite)."""
    from jax.flatten_util import ravel_pytree

    run = run_lib.build_run(TINY)
    flat, unravel = ravel_pytree(init_params(run.model, jax.random.key(0), jnp.asarray(run.dataset.train[:1])))
    return run, unravel(flat + 0.1 * jax.random.normal(jax.random.key(1), flat.shape))


def test_the_sampler_names_are_defined_once():
    assert config_lib.SAMPLERS == tuple(run_lib.SAMPLERS)
    for command in ("train", "sample"):
        action = next(a for a in _subparser(command)._actions if a.dest == "sampler")
        assert list(action.choices) == list(run_lib.SAMPLERS)
    with pytest.raises(ValueError, match="sampler must be one of ald, em, pc, ode, euler, heun, dpmpp; got 'mcmc'"):
        Config(sampler="mcmc")


def test_config_choice_tuples_agree_with_the_library():
    from dsm_jax.models.embeddings import EMBEDDINGS
    from dsm_jax.noise import WEIGHTINGS

    assert config_lib.EMBEDDINGS == EMBEDDINGS and config_lib.WEIGHTINGS == WEIGHTINGS


def _subparser(command):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command]


def test_the_old_cli_names_are_the_run_layers():
    for name in ("Run", "build_run", "draw_samples", "evaluate", "load_trained", "fit_to_data"):
        assert getattr(cli, name) is getattr(run_lib, name), name
    assert cli.UserError is run_lib.UserError is errors.UserError
    assert issubclass(errors.UserError, ValueError)


def test_the_ve_sde_of_a_grid_spans_its_levels(tiny_run):
    run, _ = tiny_run
    sde = run_lib.vesde_of_grid(run.sigmas)
    assert (sde.sigma_min, sde.sigma_max) == (float(run.sigmas[-1]), float(run.sigmas[0]))
    # Its prior is N(0, sigma_max^2 I): the VE samplers start where annealed Langevin starts.
    x = np.asarray(sde.prior_sample(jax.random.key(0), (4000, 2)))
    assert abs(x.std() / run.sigmas[0] - 1) < 4 / np.sqrt(2 * x.size)


@pytest.mark.parametrize("name", list(run_lib.SAMPLERS))
def test_each_sampler_reports_the_model_evaluations_it_made(tiny_run, name):
    # The count is taken at run time (a host callback per evaluation), not from the sampler's own claim.
    run, params = tiny_run
    calls = []
    model_fn = run.model_fn(params)

    def counted(x, sigma):
        jax.debug.callback(lambda: calls.append(1))
        return model_fn(x, sigma)

    sampler = run_lib.SAMPLERS[name]
    samples, nfe = sampler.draw(run, counted, jax.random.key(1), (8, 2))
    jax.block_until_ready(samples)
    assert samples.shape == (8, 2) and np.isfinite(np.asarray(samples)).all()
    assert nfe == len(calls) > 0, (nfe, len(calls))
    assert sampler.describe(run) and sampler.meaning in run_lib.describe_samplers()


def test_draw_samples_refuses_an_unknown_sampler(tiny_run):
    run, params = tiny_run
    with pytest.raises(ValueError, match="'mcmc'"):
        run_lib.draw_samples(run, params, jax.random.key(0), 4, "mcmc")


def test_output_names_keep_the_training_record_apart():
    cfg = Config()
    assert run_lib.output_names(cfg, "ode", 32, 0, evaluate=False) == {
        "stem": "samples_ode_n32_seed0",
        "metrics_name": "samples_ode_n32_seed0_metrics.json",
    }
    assert run_lib.output_names(cfg, "em", 32, 3, evaluate=True) == {
        "stem": "eval_em_n32_seed3",
        "metrics_name": "eval_em_n32_seed3.json",
    }
    assert run_lib.output_names(cfg, cfg.sampler, cfg.num_samples, cfg.seed, evaluate=True) == {}


def test_plan_workdir_says_what_training_would_do_and_changes_nothing(tmp_path):
    cfg = TINY
    assert run_lib.plan_workdir(tmp_path / "absent", cfg, False) == ("new", None)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text(config_lib.dumps(cfg, {}))
    assert run_lib.plan_workdir(tmp_path / "w", dataclasses.replace(cfg, num_steps=99), False) == ("resume", None)
    action, note = run_lib.plan_workdir(tmp_path / "w", dataclasses.replace(cfg, width=48), False)
    assert action == "clear" and "no checkpoint" in note  # nothing to lose: no checkpoint was written
    (tmp_path / "w" / "checkpoints" / "10").mkdir(parents=True)
    with pytest.raises(errors.UserError, match="width: 16 in the run, 48 now.*--overwrite"):
        run_lib.plan_workdir(tmp_path / "w", dataclasses.replace(cfg, width=48), False)
    (tmp_path / "w" / "notes.txt").write_text("mine")
    with pytest.raises(errors.UserError, match="notes.txt"):
        run_lib.plan_workdir(tmp_path / "w", dataclasses.replace(cfg, width=48), True)
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["checkpoints", "config.json", "notes.txt"]


def test_train_and_sample_trains_a_work_directory_without_the_command_line(tmp_path):
    phases = []
    workdir = tmp_path / "w"
    run, state, results = run_lib.train_and_sample(TINY, str(workdir), sample=False, quiet=True, on_phase=phases.append)
    assert phases == [run_lib.PREPARING, run_lib.TRAINING] and results is None
    assert int(state.step) == TINY.num_steps and run.config == TINY  # user_set=None: the config as given
    saved = json.loads((workdir / "config.json").read_text())
    assert Config.from_dict(saved["config"]) == TINY and saved["resolved"] == run.resolved
    loaded, params = run_lib.load_trained(workdir)
    assert loaded.config == TINY
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.ema_params), strict=False)
    )
    assert not (workdir / "samples.npz").exists()


def test_a_failed_check_changes_nothing_and_reports_no_phase(tmp_path):
    phases = []
    with pytest.raises(errors.UserError, match="num_sigmas=1 cannot work"):
        run_lib.train_and_sample(dataclasses.replace(TINY, num_sigmas=1), tmp_path / "w", on_phase=phases.append)
    assert phases == [] and not (tmp_path / "w").exists()


def test_the_digits_preset_passes_the_shape_rules_unchanged():
    # experiments/_digits.py trains the preset with user_set=frozenset(), as `dsm-jax train --preset digits`
    # does: the run it caches is the command's only if the shape rules keep every field of the preset.
    digits = config_lib.get_preset("digits")
    cfg, _ = run_lib.fit_to_data(digits, (8, 8, 1), frozenset())
    assert cfg == digits
