"""The ``dsm-jax`` command end to end on a tiny setting, and its one-line user errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from _tiny import tiny_sets

from dsm_jax import cli
from dsm_jax.checkpoint import load_params
from dsm_jax.config import PRESETS, Config, apply_overrides

TINY = ["--dataset", "two_clusters", "--quiet", *tiny_sets()]


def _train(workdir, *extra, steps=40):
    return cli.main(["train", "--workdir", str(workdir), "--num-steps", str(steps), *TINY, *extra])


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=False)
    )


@pytest.fixture(scope="module")
def run40(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cli") / "run"
    assert _train(workdir) == 0
    return workdir


def test_train_writes_every_output(run40):
    for name in (
        "config.json",
        "metrics.jsonl",
        "samples.npz",
        "metrics.json",
        "samples.png",
        "score_field.png",
        "losses.png",
        "checkpoints",
    ):
        assert (run40 / name).exists(), name
    saved = json.loads((run40 / "config.json").read_text())
    assert saved["config"]["dataset"] == "two_clusters" and saved["config"]["num_steps"] == 40
    assert len(saved["resolved"]["sigmas"]) == 4
    metrics = json.loads((run40 / "metrics.json").read_text())
    for key in ("mmd2", "mmd2_floor", "sliced_wasserstein", "relative_fisher_mean", "mode_weights"):
        assert np.all(np.isfinite(metrics[key])), key
    assert metrics["mmd2_floor"] > 0 and metrics["nfe"] == 4 * 10 + 1
    samples = np.load(run40 / "samples.npz")["samples"]
    assert samples.shape == (256, 2) and samples.dtype == np.float32
    records = [json.loads(line) for line in (run40 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-1] == 40


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(run40, tmp_path):
    # Copy the 40-step run, extend it to 60 steps (resume), and compare with 60 steps from scratch.
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(run40, resumed)
    assert _train(resumed, steps=60) == 0
    straight = tmp_path / "straight"
    assert _train(straight, steps=60) == 0
    for ema in (True, False):
        assert _leaves_equal(
            load_params(resumed / "checkpoints", ema=ema), load_params(straight / "checkpoints", ema=ema)
        )
    a, b = np.load(resumed / "samples.npz")["samples"], np.load(straight / "samples.npz")["samples"]
    assert np.array_equal(a, b)
    events = [json.loads(line).get("event") for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert "resume" in events


def test_a_different_config_is_refused_unless_overwrite(run40, tmp_path, capsys):
    import shutil

    workdir = tmp_path / "w"
    shutil.copytree(run40, workdir)
    before = (workdir / "config.json").read_bytes()
    capsys.readouterr()
    assert _train(workdir, "--set", "width=48", "--no-sample") == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "width" in err and "--overwrite" in err
    assert (workdir / "config.json").read_bytes() == before  # nothing touched
    assert _train(workdir, "--set", "width=48", "--no-sample", "--overwrite", steps=10) == 0
    assert json.loads((workdir / "config.json").read_text())["config"]["width"] == 48


@pytest.mark.parametrize("sampler", ["em", "pc", "ode"])
def test_sample_with_each_sde_sampler(run40, sampler):
    assert cli.main(["sample", "--workdir", str(run40), "--sampler", sampler, "--num", "32"]) == 0
    out = np.load(run40 / f"samples_{sampler}_n32_seed0.npz")
    assert out["samples"].shape == (32, 2) and np.isfinite(out["samples"]).all() and int(out["nfe"]) > 0


def test_sample_with_heun_on_a_sigma_grid(run40, capsys):
    argv = ["sample", "--workdir", str(run40), "--sampler", "heun", "--steps", "5", "--num", "32"]
    assert cli.main(argv) == 0
    out = np.load(run40 / "samples_heun_n32_seed0.npz")
    assert out["samples"].shape == (32, 2) and np.isfinite(out["samples"]).all()
    assert int(out["nfe"]) == 2 * 5 - 1
    assert "(9 model evaluations per sample)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv[:-4], "--steps", "0"])
    assert exit_info.value.code == cli.EXIT_USER_ERROR
    assert "--steps: must be a positive integer, got '0'" in capsys.readouterr().err


def test_evaluate_reproduces_the_training_metrics(run40):
    # Same seed, same sampler, same params: evaluate recomputes metrics.json bitwise.
    before = json.loads((run40 / "metrics.json").read_text())
    assert cli.main(["evaluate", "--workdir", str(run40)]) == 0
    after = json.loads((run40 / "metrics.json").read_text())
    for key in ("mmd2", "mmd2_floor", "sliced_wasserstein", "relative_fisher_mean"):
        assert after[key] == before[key], key


def test_denoise_matches_tweedie_with_the_saved_model(run40, tmp_path):
    from dsm_jax.tweedie import denoise

    rng = np.random.RandomState(0)
    noisy = (rng.randn(10, 2) * 2).astype(np.float32)
    np.save(tmp_path / "noisy.npy", noisy)
    out = tmp_path / "clean.npy"
    assert (
        cli.main(
            [
                "denoise",
                "--workdir",
                str(run40),
                "--input",
                str(tmp_path / "noisy.npy"),
                "--sigma",
                "0.5",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    run, params = cli.load_trained(run40)
    want = np.asarray(denoise(run.model_fn(params), noisy, 0.5))
    np.testing.assert_allclose(np.load(out), want, rtol=1e-5, atol=1e-6)


def _user_error(argv, capsys, needle):
    capsys.readouterr()
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsm-jax"), captured.err
    assert "Traceback" not in captured.err
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--preset", "nope"], "nope"),
        (["train", "--dataset", "no_such_set"], "no_such_set"),
        (["train", "--dataset", "/no/such/file.npy"], "/no/such/file.npy"),
        (["train", "--set", "no_such_key=1"], "no_such_key"),
        (["train", "--set", "learning_rate=abc"], "learning_rate"),
        (["train", "--set", "num_steps=-3"], "num_steps"),
        (["train", "--set", "sigma_min=0"], "sigma_min"),
        (["train", "--set", "sampler=mcmc"], "sampler"),
        (["train", "--set", "width"], "key=value"),
        (["sample", "--workdir", "/no/such/run"], "/no/such/run"),
        (["evaluate", "--workdir", "/no/such/run"], "/no/such/run"),
    ],
)
def test_user_errors_are_one_line(argv, needle, capsys, tmp_path):
    argv = [a.replace("/no/such/run", str(tmp_path / "missing")) for a in argv]
    needle = needle.replace("/no/such/run", str(tmp_path / "missing"))
    _user_error(argv, capsys, needle)


def test_bad_arrays_and_workdirs_are_refused(run40, tmp_path, capsys):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([[1.0, np.nan], [0.0, 1.0]], np.float32))
    _user_error(["train", "--dataset", str(bad), "--workdir", str(tmp_path / "w")], capsys, "bad.npy")
    np.save(bad, np.arange(6).reshape(3, 2))  # integers
    _user_error(["train", "--dataset", str(bad), "--workdir", str(tmp_path / "w")], capsys, "bad.npy")
    small = tmp_path / "small.npy"
    np.save(small, np.zeros((20, 2), np.float32))
    _user_error(["train", "--dataset", str(small), "--workdir", str(tmp_path / "w")], capsys, "batch_size")
    # A non-empty directory that is not a run is never touched.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    _user_error(["train", "--workdir", str(other), "--overwrite"], capsys, "not empty")
    assert (other / "notes.txt").read_text() == "keep me"
    # denoise: wrong shape, bad sigma, output over the input.
    np.save(tmp_path / "img.npy", np.zeros((4, 3), np.float32))
    _user_error(
        [
            "denoise",
            "--workdir",
            str(run40),
            "--input",
            str(tmp_path / "img.npy"),
            "--sigma",
            "0.1",
            "--output",
            str(tmp_path / "o.npy"),
        ],
        capsys,
        "shape",
    )
    np.save(tmp_path / "ok.npy", np.zeros((4, 2), np.float32))
    _user_error(
        [
            "denoise",
            "--workdir",
            str(run40),
            "--input",
            str(tmp_path / "ok.npy"),
            "--sigma",
            "-1",
            "--output",
            str(tmp_path / "o.npy"),
        ],
        capsys,
        "--sigma",
    )
    _user_error(
        [
            "denoise",
            "--workdir",
            str(run40),
            "--input",
            str(tmp_path / "ok.npy"),
            "--sigma",
            "0.1",
            "--output",
            str(tmp_path / "ok.npy"),
        ],
        capsys,
        "input",
    )
    assert not (tmp_path / "o.npy").exists()


def test_help_and_list(capsys):
    for command in ("train", "sample", "evaluate", "denoise"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        assert command in capsys.readouterr().out
    assert cli.main(["train", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS) and "digits" in out


def test_config_overrides_parse_by_type():
    cfg = apply_overrides(
        Config(), {"sigma_max": "none", "channel_mults": "1,2,2", "final_denoise": "false", "learning_rate": "3e-4"}
    )
    assert cfg.sigma_max is None and cfg.channel_mults == (1, 2, 2) and cfg.final_denoise is False
    assert cfg.learning_rate == 3e-4
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # Optional fields parse by their inner type (``int | None`` annotations too), "none" gives None.
    cfg = apply_overrides(Config(), {"num_train": "512", "sigma_max": "3.5", "grad_clip_norm": "none"})
    assert cfg.num_train == 512 and cfg.sigma_max == 3.5 and cfg.grad_clip_norm is None


def test_the_installed_command_exits_non_zero_without_a_traceback():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "dsm_jax", "train", "--preset", "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == cli.EXIT_USER_ERROR
    assert "Traceback" not in proc.stderr and "unknown preset 'nope'" in proc.stderr
