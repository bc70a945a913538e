"""Executes every notebook with DSM_JAX_QUICK=1 (tiny budgets) and checks the committed files are clean.

Also: each notebook's first cell installs dsm_jax from the repository that
pyproject declares (or ``DSM_JAX_SOURCE``) only where it does not import, and
each executed notebook shows its figures as images.
"""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _code_cells(path):
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def _repository():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def test_the_notebooks_are_numbered():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_stripped_and_has_the_install_cell(path):
    book = json.loads(path.read_text())
    for cell in book["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, path.name
    assert _code_cells(path)[0] == _code_cells(NOTEBOOKS[0])[0]  # one install cell, tested below
    assert "/work/" not in path.read_text() and "/home/" not in path.read_text()  # no local paths
    repository = _repository().split("github.com/")[1]
    colab = f"https://colab.research.google.com/github/{repository}/blob/main/notebooks/{path.name}"
    assert colab in path.read_text() and colab in (ROOT / "README.md").read_text()


def _run_install_cell(monkeypatch, *, importable, source=None):
    """Runs the first cell with pip replaced by a recorder; returns the requirements it would install."""
    import dsm_jax

    calls = []

    def fake_run(args, check):
        calls.append(args)
        monkeypatch.setitem(sys.modules, "dsm_jax", dsm_jax)  # "installed": the next import finds it

    monkeypatch.setattr(subprocess, "run", fake_run)
    if source is None:
        monkeypatch.delenv("DSM_JAX_SOURCE", raising=False)
    else:
        monkeypatch.setenv("DSM_JAX_SOURCE", str(source))
    if not importable:
        monkeypatch.setitem(sys.modules, "dsm_jax", None)  # import dsm_jax raises ImportError
    exec(_code_cells(NOTEBOOKS[0])[0], {})
    assert all(a[:4] == [sys.executable, "-m", "pip", "install"] for a in calls)
    return [a[-1] for a in calls]


def test_install_cell_installs_from_the_repository_only_where_dsm_jax_is_missing(monkeypatch, tmp_path, capsys):
    from packaging.requirements import Requirement

    assert _run_install_cell(monkeypatch, importable=True) == []
    (requirement,) = _run_install_cell(monkeypatch, importable=False)
    parsed = Requirement(requirement)
    assert (parsed.name, parsed.extras, parsed.url) == ("dsm_jax", {"plots"}, "git+" + _repository())
    (requirement,) = _run_install_cell(monkeypatch, importable=False, source="git+https://example.org/fork/dsm_jax@dev")
    assert Requirement(requirement).url == "git+https://example.org/fork/dsm_jax@dev"
    (requirement,) = _run_install_cell(monkeypatch, importable=False, source=tmp_path)  # a local clone
    assert requirement == f"{tmp_path}[plots]"
    monkeypatch.chdir(tmp_path.parent)  # a relative path: made absolute, so pip cannot take it for a package name
    (requirement,) = _run_install_cell(monkeypatch, importable=False, source=tmp_path.name)
    assert requirement == f"{tmp_path}[plots]"
    import dsm_jax

    assert f"dsm_jax {dsm_jax.__version__}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "path",
    # The digits notebook compiles a U-Net train step, a sampler and a denoiser (~45 s): -m slow.
    [pytest.param(p, marks=pytest.mark.slow) if "digits" in p.stem else p for p in NOTEBOOKS],
    ids=lambda p: p.stem,
)
def test_notebook_runs_in_quick_mode_and_shows_figures(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("DSM_JAX_QUICK", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # Agg, as in a script: the figures must show without an inline backend (a plain Jupyter kernel).
    monkeypatch.setenv("MPLBACKEND", "Agg")
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on any error
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    texts = [o["data"]["text/plain"] for o in outputs if "text/plain" in o.get("data", {})]
    assert images, f"{path.name} shows no figure; its text outputs: {texts}"
