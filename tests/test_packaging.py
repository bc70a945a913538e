"""The package is publishable: sdist and wheel build, their metadata pass ``twine check``, they hold every module.

``python -m build`` builds the sdist and then the wheel *from the sdist*, so a
module missing from the sdist fails the wheel check too. It runs without an
isolated environment (the build backend comes from the ``test`` extra), on a
copy of the project so the work tree gets no ``build/`` or ``*.egg-info``.
"""

import email.parser
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
pytest.importorskip("build")

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
# Every module of the package, as a path relative to the project root.
MODULES = sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "dsm_jax").rglob("*.py") if "__pycache__" not in p.parts
)
# What a work tree may hold that is not the project (caches, runs, earlier builds): caches anywhere, the
# rest only at the top (a pattern such as "workdir*" must not drop the module dsm_jax/workdir.py).
_ANYWHERE = shutil.ignore_patterns("__pycache__", ".pytest_cache", ".ipynb_checkpoints", "*.egg-info")
_AT_TOP = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "workdir*")


def _not_project(directory, names):
    ignored = _ANYWHERE(directory, names)
    return ignored | _AT_TOP(directory, names) if pathlib.Path(directory) == ROOT else ignored


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(sdist path, wheel path, build output)`` of a fresh build of a copy of the project."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=_not_project)
    out = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    version = PROJECT["version"]
    sdist, wheel = tmp / "dist" / f"dsm_jax-{version}.tar.gz", tmp / "dist" / f"dsm_jax-{version}-py3-none-any.whl"
    assert sdist.is_file() and wheel.is_file(), sorted(p.name for p in (tmp / "dist").iterdir())
    return sdist, wheel, out.stdout + out.stderr


def _wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        return email.parser.Parser().parsestr(z.read(f"dsm_jax-{PROJECT['version']}.dist-info/METADATA").decode())


def test_build_has_no_deprecation_warnings(built):
    _, _, log = built
    assert "deprecated" not in log.lower(), log


def test_twine_check_passes(built):
    pytest.importorskip("twine")
    sdist, wheel, _ = built
    out = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("PASSED") == 2, out.stdout


def test_wheel_metadata_matches_pyproject(built):
    meta = _wheel_metadata(built[1])
    assert meta["Name"] == PROJECT["name"] and meta["Version"] == PROJECT["version"]
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().startswith("# dsm_jax")  # the README is the long description
    assert meta["License-Expression"] == "Apache-2.0" and meta.get_all("License-File") == ["LICENSE"]
    assert meta["Requires-Python"] == PROJECT["requires-python"]
    requires = meta.get_all("Requires-Dist")
    assert {r for r in requires if "extra ==" not in r} == set(PROJECT["dependencies"])
    assert set(meta.get_all("Provides-Extra")) == set(PROJECT["optional-dependencies"])
    assert any(r.startswith("matplotlib") and 'extra == "notebooks"' in r for r in requires)
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert urls == PROJECT["urls"]


def test_sdist_and_wheel_hold_every_module(built):
    sdist, wheel, _ = built
    prefix = f"dsm_jax-{PROJECT['version']}/"
    with tarfile.open(sdist) as t:
        in_sdist = {n[len(prefix) :] for n in t.getnames() if n.startswith(prefix)}
    assert {"pyproject.toml", "README.md", "LICENSE", *MODULES} <= in_sdist, sorted(set(MODULES) - in_sdist)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(f"dsm_jax-{PROJECT['version']}.dist-info/entry_points.txt").decode()
    assert set(MODULES) <= set(names), sorted(set(MODULES) - set(names))
    assert f"dsm_jax-{PROJECT['version']}.dist-info/licenses/LICENSE" in names  # the license text ships
    # Only the package and its metadata: no tests, experiments or notebooks installed into site-packages.
    assert {n.split("/")[0] for n in names} == {"dsm_jax", f"dsm_jax-{PROJECT['version']}.dist-info"}
    assert "dsm-jax = dsm_jax.cli:main" in entry_points
