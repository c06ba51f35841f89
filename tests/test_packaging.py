"""Packaging as issue 2 specifies it: pyproject.toml's metadata, the installed ``gradclip`` console
script, and the Makefile's install stamp (editing any install input reinstalls)."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _requirement_name(requirement: str) -> str:
    # PEP 508: the distribution name comes first, then extras, version specifiers or markers.
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"not a requirement: {requirement!r}"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


# -- pyproject.toml -------------------------------------------------------------------------------


def test_name_and_python_version():
    assert PROJECT["name"] == "gradclip"
    assert PROJECT["requires-python"] == ">=3.10"
    assert sys.version_info >= (3, 10)


def test_core_depends_on_numpy_only():
    assert [_requirement_name(r) for r in PROJECT["dependencies"]] == ["numpy"]


def test_extras():
    extras = PROJECT["optional-dependencies"]
    assert {"torch", "tf", "jax", "cli", "all", "dev"} <= set(extras)
    names = {extra: {_requirement_name(r) for r in requirements} for extra, requirements in extras.items()}
    assert names["torch"] == {"torch"}
    assert "tensorflow-cpu" in names["tf"] or "tensorflow" in names["tf"]
    assert {"jax", "optax"} <= names["jax"]
    # "all" is the four framework/cli extras, spelled as a self-reference.
    (everything,) = extras["all"]
    assert _requirement_name(everything) == "gradclip"
    assert set(re.search(r"\[(.*)\]", everything).group(1).replace(" ", "").split(",")) == {"torch", "tf", "jax", "cli"}
    assert {"pytest", "hypothesis"} <= names["dev"]


def test_console_script_points_to_a_callable():
    target = PROJECT["scripts"]["gradclip"]
    module_name, _, attribute = target.partition(":")
    function = getattr(importlib.import_module(module_name), attribute)
    assert callable(function)


def test_dev_requirements_are_pinned():
    # The CI environment is reproducible: every requirement line is name==version, torch 2.13.0.
    pins = {}
    for path in ("requirements/dev.txt", "requirements/nodeps.txt", "requirements/megatron.txt"):
        for line in (ROOT / path).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                name, separator, version = line.partition("==")
                assert separator and version, f"{path}: {line!r} is not pinned with =="
                pins[_requirement_name(name)] = version
    assert pins["torch"] == "2.13.0"


# -- the installed entry point ----------------------------------------------------------------------


def _installed():
    try:
        return importlib.metadata.distribution("gradclip")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gradclip is not installed in this interpreter (make test installs it)")


def test_installed_metadata_matches_pyproject():
    distribution = _installed()
    scripts = {ep.name: ep.value for ep in distribution.entry_points if ep.group == "console_scripts"}
    assert scripts == PROJECT["scripts"], "stale install: run make install (or pip install -e .)"
    assert distribution.version == PROJECT["version"]


def test_gradclip_command_runs():
    _installed()
    # pip puts console scripts in the interpreter's scripts directory: .venv/bin under make.
    script = Path(sysconfig.get_path("scripts")) / ("gradclip.exe" if os.name == "nt" else "gradclip")
    assert script.exists(), f"no {script}: the [project.scripts] entry was not installed"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: gradclip")
    for command in ("compare", "suggest", "report", "bench"):
        assert command in result.stdout


# -- Makefile: the install stamp ----------------------------------------------------------------------

INSTALL_INPUTS = ["requirements/dev.txt", "requirements/nodeps.txt", "requirements/megatron.txt", "pyproject.toml"]
# Fixed timestamps (file systems stamp at a coarse clock: "now" twice in a row can be equal).
OLD, INSTALLED, NEWER = 1_000_000_000, 1_500_000_000, 1_600_000_000


@pytest.fixture
def make_tree(tmp_path):
    """A copy of the Makefile and its install inputs, with an up-to-date install stamp."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    (tmp_path / "requirements").mkdir()
    for name in ["Makefile", *INSTALL_INPUTS]:
        shutil.copyfile(ROOT / name, tmp_path / name)
        os.utime(tmp_path / name, (OLD, OLD))
    stamp = _make(tmp_path, "--eval", "print-stamp: ; @echo $(STAMP)", "print-stamp").stdout.strip()
    assert stamp.startswith(".venv/.installed-"), stamp
    (tmp_path / ".venv").mkdir()
    (tmp_path / stamp).touch()
    os.utime(tmp_path / stamp, (INSTALLED, INSTALLED))
    return tmp_path


def _make(directory, *args):
    return subprocess.run(
        ["make", "--no-print-directory", "-s", *args], cwd=directory, capture_output=True, text=True, timeout=60
    )


def _up_to_date(directory) -> bool:
    # make -q: exit 0 when the target is up to date, 1 when it would run the install recipe.
    result = _make(directory, "-q", "install")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def test_install_is_skipped_when_nothing_changed(make_tree):
    assert _up_to_date(make_tree)


@pytest.mark.parametrize("name", INSTALL_INPUTS)
def test_editing_an_install_input_reinstalls(make_tree, name):
    path = make_tree / name
    # A content change under the old timestamp: caught by the checksum in the stamp's name.
    path.write_text(path.read_text() + "\n# edited\n")
    os.utime(path, (OLD, OLD))
    assert not _up_to_date(make_tree)


@pytest.mark.parametrize("name", INSTALL_INPUTS)
def test_touching_an_install_input_reinstalls(make_tree, name):
    # A newer timestamp with the same content: caught by the stamp's prerequisites.
    os.utime(make_tree / name, (NEWER, NEWER))
    assert not _up_to_date(make_tree)
