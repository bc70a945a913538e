"""What a newcomer meets on the command line: outputs named by what made them, the model chosen by the
data's shape, default work directories, the config keys and files, what a metric means, the README's commands."""

import dataclasses
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from _tiny import tiny_sets

from dsm_jax import cli, plotting
from dsm_jax import config as config_lib
from dsm_jax import run as run_lib
from dsm_jax.config import Config

TINY = ["--quiet", *tiny_sets()]
RECORD = ("samples.npz", "samples.png", "metrics.json", "score_field.png", "losses.png", "config.json")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny trained run, made with the default work directory of `--dataset two_clusters`."""
    root = tmp_path_factory.mktemp("cli_outputs")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert cli.main(["train", "--dataset", "two_clusters", "--num-steps", "20", *TINY]) == 0
    finally:
        os.chdir(cwd)
    return root / "runs" / "default-two_clusters"


def _snapshot(workdir):
    return {name: (workdir / name).read_bytes() for name in RECORD}


# -- 1. outputs named by what produced them ---------------------------------------------------------------


def test_sample_titles_its_figure_by_the_sampler_used_and_lists_every_file(run, monkeypatch, capsys):
    titles = []
    original = plotting.plot_samples
    monkeypatch.setattr(plotting, "plot_samples", lambda *a, **k: titles.append(k["titles"]) or original(*a, **k))
    capsys.readouterr()
    assert cli.main(["sample", "--workdir", str(run), "--sampler", "ode", "--num", "32"]) == 0
    out = capsys.readouterr().out
    assert titles == [("held-out data", "samples (ode)")]  # the run's config says "ald"
    for name in ("samples_ode_n32_seed0.npz", "samples_ode_n32_seed0_metrics.json", "samples_ode_n32_seed0.png"):
        assert (run / name).exists() and name in out, name


def test_evaluate_with_another_sampler_keeps_the_training_record(run, capsys):
    before = _snapshot(run)
    capsys.readouterr()
    assert cli.main(["evaluate", "--workdir", str(run), "--sampler", "em", "--num", "32", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert _snapshot(run) == before
    for name in ("eval_em_n32_seed3.json", "eval_em_n32_seed3.npz", "eval_em_n32_seed3.png"):
        assert (run / name).exists() and name in out, name
    assert "metrics.json and samples are kept" in out
    saved = json.loads((run / "eval_em_n32_seed3.json").read_text())
    assert (saved["sampler"], saved["num_samples"], saved["seed"]) == ("em", 32, 3)


def test_evaluate_with_the_training_settings_says_whether_the_record_changed(run, capsys):
    before = json.loads((run / "metrics.json").read_text())
    capsys.readouterr()
    assert cli.main(["evaluate", "--workdir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "metrics.json: the same values as before" in out
    after = json.loads((run / "metrics.json").read_text())
    assert {k: v for k, v in after.items() if k != "sampling_seconds"} == {
        k: v for k, v in before.items() if k != "sampling_seconds"
    }
    # A record that differs is reported with the changed values.
    (run / "metrics.json").write_text(json.dumps(dict(before, mmd2=123.0)))
    assert cli.main(["evaluate", "--workdir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "changed: mmd2 123.0 ->" in out


# -- 2. the model chosen by the data's shape ---------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, user_set, model, sampling, per_call, says",
    [
        ((8, 8, 1), set(), "unet", "random", 1, ["'unet' chosen for images", "10x the cost", "steps_per_call=1"]),
        ((8, 8, 1), {"sigma_sampling"}, "unet", "stratified", 1, ["'unet' chosen", "note:", "10x the cost"]),
        ((8, 8, 1), {"model"}, "mlp", "stratified", 50, []),
        ((8, 8, 1), {"steps_per_call"}, "unet", "random", 50, ["'unet' chosen"]),
        ((2,), set(), "mlp", "stratified", 50, []),
        ((8, 8), set(), "mlp", "stratified", 50, ["[N, H, W, C] for the U-Net"]),
    ],
)
def test_fit_to_data_chooses_by_shape_and_says_why(shape, user_set, model, sampling, per_call, says):
    cfg, chosen = cli.fit_to_data(Config(), shape, frozenset(user_set))
    assert (cfg.model, cfg.sigma_sampling, cfg.steps_per_call) == (model, sampling, per_call)
    text = " ".join(chosen)
    assert all(s in text for s in says), text
    if not says:
        assert chosen == ()


def test_an_explicit_unet_keeps_its_settings_with_cost_notes():
    cfg, chosen = cli.fit_to_data(dataclasses.replace(Config(), model="unet"), (8, 8, 1), frozenset({"model"}))
    assert (cfg.sigma_sampling, cfg.steps_per_call) == ("stratified", 50)
    assert len(chosen) == 2 and all(c.startswith("note:") for c in chosen)
    assert "10x the cost" in chosen[0] and "steps_per_call=1" in chosen[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "imgs.npy"
    rng = np.random.RandomState(0)
    np.save(path, np.tanh(rng.randn(80, 8, 8, 1)).astype(np.float32))
    return path


def test_train_on_images_picks_the_unet_and_one_level_per_image(images, tmp_path, capsys):
    capsys.readouterr()
    argv = [
        "train",
        "--dataset",
        str(images),
        "--workdir",
        str(tmp_path / "w"),
        "--num-steps",
        "0",
        "--no-sample",
        "--quiet",
        "--set",
        "channels=8",
        "--set",
        "channel_mults=1",
        "--set",
        "batch_size=16",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "w" / "config.json").read_text())["config"]
    assert (saved["model"], saved["sigma_sampling"], saved["steps_per_call"]) == ("unet", "random", 1)
    assert "'unet' chosen for images" in out and "sigma_sampling='random'" in out
    # The saved config.json reproduces the run: the same command resumes it instead of being refused.
    assert cli.main(argv) == 0
    assert "resuming" in capsys.readouterr().out


def test_an_explicit_mlp_trains_on_flattened_images(images, tmp_path):
    from dsm_jax.checkpoint import load_params

    argv = [
        "train",
        "--dataset",
        str(images),
        "--workdir",
        str(tmp_path / "w"),
        "--num-steps",
        "1",
        "--quiet",
        "--no-sample",
        "--set",
        "model=mlp",
        "--set",
        "width=16",
        "--set",
        "depth=1",
        "--set",
        "batch_size=16",
        "--set",
        "num_sigmas=3",
    ]
    assert cli.main(argv) == 0
    saved = json.loads((tmp_path / "w" / "config.json").read_text())["config"]
    assert saved["model"] == "mlp"
    shapes = {tuple(np.shape(p)) for p in jax.tree.leaves(load_params(tmp_path / "w" / "checkpoints", ema=True))}
    assert (64, 16) in shapes and (16, 64) in shapes  # 8 x 8 x 1 pixels in and out


# -- 3. default work directories ---------------------------------------------------------------------------


def test_the_default_workdir_is_named_after_the_preset_and_dataset(run):
    assert (run / "checkpoints").is_dir()  # the fixture trained --dataset two_clusters with no --workdir
    with_dataset = lambda preset, dataset: run_lib.default_workdir(
        preset, config_lib.apply_overrides(config_lib.get_preset(preset), {"dataset": dataset})
    )
    assert with_dataset("default", "eight_gaussians") == Path("runs/default")
    assert with_dataset("digits", "digits") == Path("runs/digits")
    assert with_dataset("default", "moons") == Path("runs/default-moons")
    assert with_dataset("two_clusters", "data/my_points.npy") == Path("runs/two_clusters-my_points")


# -- 4. config keys, config files, what metrics mean -------------------------------------------------------


def test_every_config_field_has_a_meaning_and_list_keys_prints_it(capsys):
    fields = config_lib.describe_fields()
    assert [f[0] for f in fields] == [f.name for f in dataclasses.fields(Config)]
    assert all(len(meaning) > 10 for _, _, _, meaning in fields), [f[0] for f in fields if len(f[3]) <= 10]
    assert cli.main(["train", "--list-keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, type_name, _, meaning in fields:
        assert any(line.split()[:1] == [name] and type_name in line and meaning in line for line in lines), name
    assert any(re.match(r"\s+channel_mults\s+ints, e.g. 1,2\s+1,2\s", line) for line in lines)
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "--list-keys" in capsys.readouterr().out


def _resolve(*argv):
    return cli.resolve_config(cli.build_parser().parse_args(["train", *argv]))


def test_a_saved_config_json_reproduces_the_run(run, tmp_path, capsys):
    saved = Config.from_dict(json.loads((run / "config.json").read_text())["config"])
    assert _resolve("--config", str(run / "config.json")) == saved
    assert _resolve("--config", str(run / "config.json"), "--preset", "digits") == saved  # every field is in it
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    capsys.readouterr()
    assert cli.main(["train", "--config", str(run / "config.json"), "--workdir", str(copy), "--no-sample"]) == 0
    assert "resuming" in capsys.readouterr().out  # the same training config: nothing refused


def test_a_bare_config_file_applies_before_set(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"dataset": "moons", "width": 64, "channel_mults": [1, 2, 2]}))
    cfg = _resolve("--config", str(path), "--set", "width=32")
    assert (cfg.dataset, cfg.width, cfg.channel_mults, cfg.depth) == ("moons", 32, (1, 2, 2), Config().depth)


@pytest.mark.parametrize(
    "content, needle",
    [
        ({"widht": 3}, "widht"),
        ({"config": {"width": -1}}, "width"),
        ({"channel_mults": 3}, "channel_mults"),
        ([1, 2], "JSON object"),
        ("not json", "not a JSON file"),
    ],
)
def test_bad_config_files_are_one_line_errors(content, needle, tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    capsys.readouterr()
    assert cli.main(["train", "--config", str(path), "--workdir", str(tmp_path / "w")]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "run.json" in err[0], err
    assert not (tmp_path / "w").exists()


def _metrics(ratio, n=2000):
    return {
        "mmd2": ratio * 2e-4,
        "mmd2_floor": 2e-4,
        "mmd2_over_floor": ratio,
        "mmd_n": n,
        "sliced_wasserstein": 0.09,
        "sliced_wasserstein_data_floor": 0.03,
        "fraction_finite": 1.0,
        "relative_fisher": {"1": 0.1, "0.1": 0.3},
        "relative_fisher_mean": 0.2,
        "mode_weights": [0.6, 0.4],
        "true_weights": [0.5, 0.5],
    }


@pytest.mark.parametrize(
    "ratio, says",
    [(-0.5, "at the floor"), (0.8, "within 3 floors"), (10.0, "10 times the spread between two data samples")],
)
def test_print_metrics_says_what_the_values_mean(ratio, says, capsys):
    run_lib.print_metrics(_metrics(ratio))
    out = capsys.readouterr().out
    assert says in out
    assert "3.0x its floor 0.0300" in out and "distance between two data samples" in out
    assert "1 as far off as a zero score" in out and "largest error 0.100" in out


# -- 5. str and os.PathLike paths --------------------------------------------------------------------------


def test_load_trained_takes_str_and_pathlike(run):
    from dsm_jax.data import load_array

    a_run, a_params = cli.load_trained(str(run))
    b_run, b_params = cli.load_trained(run)
    assert a_run.config == b_run.config
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a_params), jax.tree.leaves(b_params), strict=False))
    samples = np.load(run / "samples.npz")["samples"]
    np.save(run.parent / "s.npy", samples)
    assert np.array_equal(load_array(str(run.parent / "s.npy")), load_array(run.parent / "s.npy"))


# -- the README's own commands -----------------------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
# Appended to every README `dsm-jax train` line: tiny settings, the last --set wins.
SMALL_TRAIN = [
    "--quiet",
    "--set",
    "num_steps=20",
    "--set",
    "num_samples=64",
    "--set",
    "steps_per_sigma=5",
    "--set",
    "fisher_samples=64",
    "--set",
    "width=16",
    "--set",
    "channels=8",
    "--set",
    "batch_size=32",
    "--set",
    "save_every=10",
    "--set",
    "log_every=10",
]


def readme_commands(text):
    """Every `dsm-jax ...` command of the README's bash blocks, in order, as argument lists."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == ["dsm-jax"]:
                    commands.append(words[1:])
    return commands


def test_readme_commands_are_found():
    commands = readme_commands(README.read_text())
    assert ["train"] in commands and any(c[:1] == ["denoise"] for c in commands), commands


@pytest.mark.slow
def test_the_readme_commands_run_in_sequence_on_a_fresh_tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.RandomState(0)
    np.save("my_points.npy", rng.randn(200, 2).astype(np.float32))
    np.save("noisy.npy", (rng.randn(10, 2) * 2).astype(np.float32))
    commands = readme_commands(README.read_text())
    assert len(commands) >= 8
    for argv in commands:
        if argv[0] == "train" and "--list" not in argv and "--list-keys" not in argv:
            argv = argv + SMALL_TRAIN
        if argv[0] in ("sample", "evaluate") and "--num" in argv:
            argv[argv.index("--num") + 1] = "64"
        assert cli.main(argv) == 0, argv
    assert (tmp_path / "clean.npy").exists() and (tmp_path / "runs" / "default" / "metrics.json").exists()
