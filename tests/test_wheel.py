"""The package as users install it: the wheel, built once per session, installed into clean virtual
environments (no system site-packages, nothing of this checkout on the path).

* core only (``pip install gradclip``): ``import gradclip`` imports no framework, NumPy clipping
  works, and every command that needs an extra exits with status 2 and one line naming it;
* with ``[cli,torch]``: ``gradclip compare --quick`` runs. PyTorch comes from the local wheel
  (``PIP_FIND_LINKS``), the other packages at the versions of requirements/dev.txt.

The environments are built with this interpreter's pip (``pip --python``), so they need no pip of
their own. Everything runs from a temporary directory: the checkout is never importable there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 900
# Installing PyTorch into a fresh environment takes a minute on an idle two-core machine, several
# on a loaded one: more than the suite's default per-test limit (pyproject.toml).
pytestmark = pytest.mark.timeout(TIMEOUT + 300)


def _pip(python: Path, *args: str, cwd: Path) -> None:
    command = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
               "--disable-pip-version-check", *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=TIMEOUT)
    if result.returncode != 0:
        pytest.fail(f"pip install failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built once from a copy of the sources (the checkout stays untouched by build/)."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools (requirements/dev.txt)")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(ROOT / "gradclip", source / "gradclip", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(work / "dist")],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (built,) = (work / "dist").glob("gradclip-*.whl")
    return built


def _venv(directory: Path) -> Path:
    # A real, clean environment: no --system-site-packages, so only what is installed is there.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(directory)], check=True, timeout=120)
    python = directory / "bin" / "python"
    config = (directory / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in config
    return python


def _run(python: Path, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def test_the_wheel_holds_the_package_and_its_metadata(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "gradclip/__init__.py" in names and "gradclip/experiments/tasks/gpt.py" in names
    assert not any(n.startswith(("tests/", "examples/", "docs/")) for n in names)
    assert "gradclip = gradclip.cli:main" in entry_points
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert [r for r in requires if "extra ==" not in r] == ["Requires-Dist: numpy>=1.23"]
    for extra in ("cli", "torch", "ray"):
        assert f"Provides-Extra: {extra}" in metadata


@pytest.fixture(scope="session")
def core_env(wheel, tmp_path_factory) -> tuple[Path, Path]:
    home = tmp_path_factory.mktemp("core")
    python = _venv(home / "venv")
    _pip(python, str(wheel), "-c", str(ROOT / "requirements" / "dev.txt"), cwd=home)
    return python, home


CORE_CHECK = r"""
import json, sys
import numpy as np
import gradclip
frameworks = sorted(m for m in sys.modules if m.split(".")[0] in
                    ("torch", "tensorflow", "keras", "jax", "optax", "rich", "matplotlib", "sklearn", "ray"))
grads = [np.array([3.0, 4.0]), np.array([12.0])]
clipped, info = gradclip.GlobalNorm(1.0).clip(grads)
import gradclip.experiments          # the experiment API imports no framework either
later = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "rich", "matplotlib", "ray"))
print(json.dumps({"frameworks": frameworks, "later": later, "norm": float(info.norm),
                  "clipped": [c.tolist() for c in clipped], "file": gradclip.__file__}))
"""


def test_core_only_imports_without_frameworks_and_clips_numpy(core_env):
    python, home = core_env
    result = _run(python, "-c", CORE_CHECK, cwd=home)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["frameworks"] == [] and report["later"] == []
    assert report["norm"] == 13.0
    # GlobalNorm's coefficient is max_norm / (norm + eps), eps = 1e-6.
    assert sum(report["clipped"], []) == pytest.approx([3 / 13, 4 / 13, 12 / 13], rel=1e-6)
    assert "site-packages" in report["file"] and str(ROOT) not in report["file"]  # the wheel, not the checkout


@pytest.mark.parametrize(
    "args, extras",
    [
        (["compare", "--quick"], "cli,torch"),
        (["compare", "--task", "digits", "--quick"], "cli,torch"),
        (["compare", "--quick", "--backend", "ray"], "cli,ray,torch"),
        (["suggest", "log.jsonl"], "cli"),
        (["report", "log.jsonl"], "cli"),
        (["bench", "--quick"], "torch"),
    ],
)
def test_core_only_commands_name_the_extra_to_install(core_env, args, extras):
    python, home = core_env
    (home / "log.jsonl").write_text('{"step": 0, "norm": 1.0}\n')
    result = _run(python.parent / "gradclip", *args, cwd=home)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith(f"gradclip {args[0]}: error: this needs ")
    assert lines[0].endswith(f"pip install 'gradclip[{extras}]'")
    assert not (home / "runs").exists()


def test_core_only_help_and_python_api_errors(core_env):
    python, home = core_env
    result = _run(python.parent / "gradclip", "--help", cwd=home)
    assert result.returncode == 0 and "compare" in result.stdout


def test_with_cli_and_torch_extras_compare_runs(wheel, tmp_path_factory):
    home = tmp_path_factory.mktemp("full")
    python = _venv(home / "venv")
    # torch==2.13.0 resolves to the CPU wheel on local disk (PIP_FIND_LINKS), as in make test.
    _pip(python, f"{wheel}[cli,torch]", "torch==2.13.0", "-c", str(ROOT / "requirements" / "dev.txt"), cwd=home)
    out = home / "run"
    result = _run(python.parent / "gradclip", "compare", "--quick", "--no-progress", "--out", str(out), cwd=home,
                  timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("Verdict\n")
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 5 * 2 and all(r["status"] in ("ok", "diverged") for r in records)
    assert {p.name for p in out.iterdir()} >= {"summary.csv", "report.md", "report.html", "loss.png"}
    # Still no Ray, TensorFlow or JAX there: --backend ray names its extra.
    result = _run(python.parent / "gradclip", "compare", "--quick", "--backend", "ray", cwd=home)
    assert result.returncode == 2 and result.stderr.strip().endswith("pip install 'gradclip[ray]'")
