"""The documentation site: ``mkdocs build --strict`` passes (so a broken reference fails the tests),
the pages taken from README.md are there, and every code block of the guides runs as written.

A guide's ``python`` blocks run in order in one namespace (a page reads like one script), in a
temporary directory. A block that cannot run here is preceded by ``<!-- not-run: REASON -->``
and the reason is required; a block importing a framework that is not installed is skipped.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GUIDES = sorted((DOCS / "guides").glob("*.md"))
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->\s*$")


def _mkdocs(config: Path, site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="the site needs mkdocs-material and mkdocstrings-python (requirements/dev.txt)",
)


@needs_mkdocs
def test_the_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    result = _mkdocs(ROOT / "mkdocs.yml", site, ROOT)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "WARNING" not in result.stderr, result.stderr[-5000:]
    pages = {p.relative_to(site).as_posix() for p in site.rglob("index.html")}
    for page in ("tour/index.html", "evidence/index.html", "reliability/index.html", "architecture/index.html",
                 "guides/choosing-a-threshold/index.html", "guides/compiled/index.html", "guides/private/index.html",
                 "reference/clippers/index.html", "reference/experiments/index.html"):
        assert page in pages, page
    # The API reference comes from the docstrings; the tour and distributed guide from README.md.
    clippers = (site / "reference" / "clippers" / "index.html").read_text()
    assert "max_norm" in clippers and "ZClip" in clippers and "AdaGC" in clippers
    experiments = (site / "reference" / "experiments" / "index.html").read_text()
    assert "train(clipper, seed, steps, report)" in experiments and "plan_comparison" in experiments
    tour = (site / "tour" / "index.html").read_text()
    assert "clip_grad_norm_" in tour and "README section" not in tour
    assert "torchrun" in (site / "guides" / "distributed" / "index.html").read_text()


@needs_mkdocs
def test_a_broken_reference_fails_the_build(tmp_path):
    # The site's own configuration, on a copy whose home page links a page that does not exist
    # (the API pages emptied, so the build takes seconds).
    shutil.copytree(DOCS, tmp_path / "docs", ignore=shutil.ignore_patterns("evidence"))
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    for page in (tmp_path / "docs" / "reference").glob("*.md"):
        page.write_text("# " + page.stem + "\n")
    index = tmp_path / "docs" / "index.md"
    index.write_text(index.read_text() + "\nSee [the missing guide](guides/missing.md).\n")
    result = _mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site", tmp_path)
    assert result.returncode != 0
    assert "guides/missing.md" in result.stderr


def _blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """(line, source, reason it does not run) of each python block."""
    text = page.read_text()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        before = text[: match.start()].rstrip("\n").splitlines()
        reason = NOT_RUN.match(before[-1]) if before else None
        blocks.append((len(before) + 2, match.group(1), reason.group(1) if reason else None))
    return blocks


def _imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_guide_has_code_and_every_skip_a_reason():
    assert {p.name for p in GUIDES} >= {"choosing-a-threshold.md", "training-loops.md", "distributed.md",
                                        "compiled.md", "private.md"}
    for page in GUIDES:
        for line, _, reason in _blocks(page):
            assert reason is None or reason.strip(), f"{page.name}:{line}: not-run needs a reason"


@pytest.mark.parametrize("page", [p for p in GUIDES if _blocks(p)], ids=lambda p: p.stem)
def test_guide_code_blocks_run(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    saved = dict(os.environ)
    namespace = {"__name__": "__guide__"}
    try:
        for line, source, reason in _blocks(page):
            if reason:
                continue
            for module in sorted(_imports(source) - {"gradclip"}):
                pytest.importorskip(module, reason=f"{page.name}:{line} imports {module}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # frameworks' deprecation notices are not the guide's
                exec(compile(source, f"{page}:{line}", "exec"), namespace)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert capsys.readouterr().out.strip(), "the guide's blocks print what they show"


def test_the_readme_sections_the_site_takes_exist():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    for page, heading in hooks.SECTIONS.items():
        section = hooks.readme_section(heading)
        assert len(section) > 500 and "\n## " not in section, page
        assert hooks.MARKER in (DOCS / page).read_text(), page
    assert "](docs/" not in hooks.readme_section("## A tour")  # links rewritten for the site


def test_the_architecture_page_s_new_clipper_runs_as_written(tmp_path):
    # The page's "Adding a clipper" block is a complete clipper; run in a fresh process (it
    # registers a name), it clips as tests/test_new_clipper.py's twin does.
    text = (DOCS / "architecture.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class TwiceTheMean" in b)
    script = tmp_path / "twice_the_mean.py"
    script.write_text(block + textwrap.dedent("""
        import numpy as np
        clipper = gradclip.get("twice_the_mean")
        first = clipper.clip([np.ones(3, np.float32)])[1]
        out, second = clipper.clip([np.full(3, 10.0, np.float32)])
        assert float(first.coef) == 1.0 and abs(float(second.threshold) - 2 * 3 ** 0.5) < 1e-5
        np.testing.assert_allclose(np.linalg.norm(out[0]), 2 * 3 ** 0.5, rtol=1e-5)
        print("ok")
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
