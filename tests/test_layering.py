"""The layer contract of pyproject.toml ([tool.importlinter]) holds: imports point down only.

DESIGN.md ("Layers"): _core <- backends <- clippers <- front ends <- monitor <- experiments and
bench <- cli. ``lint-imports`` reads the import graph from the source (nothing is imported or
run), so the check is cheap and independent of which frameworks are installed. It runs in a
subprocess from the repository root so that it analyses this checkout, whatever is installed.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: lint-imports' console entry point, called with this interpreter (no PATH lookup).
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def test_every_package_directory_is_a_regular_package():
    """lint-imports (grimp) skips a directory without ``__init__.py`` inside a regular package, so
    a namespace package there would leave its modules, and every import from them, unchecked."""
    package = ROOT / "gradclip"
    missing = sorted(
        directory.relative_to(ROOT).as_posix()
        for directory in [package, *package.rglob("*")]
        if directory.is_dir() and directory.name != "__pycache__" and any(directory.glob("*.py"))
        and not (directory / "__init__.py").exists()
    )
    assert missing == [], f"package directories without __init__.py (invisible to lint-imports): {missing}"


def test_imports_respect_the_layer_contract():
    if importlib.util.find_spec("importlinter") is None:
        pytest.skip("import-linter is not installed (pip install -r requirements/dev.txt)")
    result = subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"lint-imports failed (exit status {result.returncode}):\n{output}"
    summary = re.search(r"Contracts: (\d+) kept, (\d+) broken", output)
    assert summary and int(summary[1]) >= 1 and summary[2] == "0", output
