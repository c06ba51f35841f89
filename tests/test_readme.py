"""The README's Python examples run as written.

Every fenced ``python`` block of README.md is executed in a fresh namespace, in a temporary
directory, unless it is one of the :data:`FRAGMENTS`, with the reason it cannot run here. The tour's
blocks build on one another (the drop-ins clip the ``model`` of the first example), which
:data:`CONTINUES` states; :data:`STAND_INS` gives the few names a block leaves to the reader
(a data ``loader``), and :data:`CHECKS` verifies what a block's comments promise. A new block runs
by default, and a key that no longer matches exactly one block fails, so this list cannot go
stale silently.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

import gradclip

README = Path(__file__).resolve().parent.parent / "README.md"


class Block(NamedTuple):
    line: int  # of the block's first code line in README.md
    heading: str
    source: str


def _blocks() -> list[Block]:
    text = README.read_text()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        before = text[: match.start()]
        headings = re.findall(r"^#+ (.*)$", before, re.M)
        blocks.append(Block(before.count("\n") + 2, headings[-1] if headings else "", match.group(1)))
    return blocks


BLOCKS = _blocks()

# Each block is named by a line of code only it contains.
TOUR = "clipper = gradclip.GlobalNorm(max_norm=1.0)"
DROP_INS = "norm = gct.clip_grad_norm_(model.parameters(), max_norm=1.0)"
FUNCTIONAL = "clipped, norm = gradclip.clip_by_global_norm(grads, max_norm=1.0)"
KERAS = "from gradclip.keras import ClippingOptimizer"
JAX = "tx = optax.chain(gradclip.ZClip().as_optax(), optax.adam(1e-3))"
ADAPTIVE = 'clipper = gradclip.chain(gradclip.NonFinite("skip"), gradclip.ZClip())'
TRAINING_LOOP = "for batch in loader:\n    with torch.autocast("
DISTRIBUTED = "dist.init_process_group()"
COMPILED = "clip = torch.compile(lambda: clipper.clip_(model), fullgraph=True)"

#: Fragments by nature, with the reason they cannot run in the test suite: not collected as
#: tests (a skip would look like a missing framework), but each must still name a block.
REDUCTION_SPEC = "spec = ReductionSpec(model, {"
FRAGMENTS = {
    DISTRIBUTED: "needs torchrun's environment and a real model (model = ...); tests/distributed/ runs it",
    REDUCTION_SPEC: "needs a model and tensor/pipeline/expert process groups; tests/distributed/test_sharding.py runs it",
}

#: Blocks that continue the namespace an earlier block left (the tour's model and its gradients).
CONTINUES = {DROP_INS: TOUR, ADAPTIVE: TOUR, TRAINING_LOOP: TOUR}

#: Names a block leaves to the reader, defined before it runs.
STAND_INS = {
    # Batches for the tour's 64-input model, on the GPU the block's CUDA autocast is meant for;
    # without one, autocast and GradScaler disable themselves with a warning and it runs on CPU.
    TRAINING_LOOP: (
        "device = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
        "model.to(device)\n"
        "loader = [torch.randn(4, 64, device=device) for _ in range(8)]\n"
    ),
}

#: Warnings a block is expected to raise on this machine (regexes matched from the start).
EXPECTED_WARNINGS = {TRAINING_LOOP: (".*CUDA is not available",)}


def _check_tour(namespace):
    torch, info = namespace["torch"], namespace["info"]
    assert isinstance(info, gradclip.ClipInfo)
    assert set(info.to_dict()) == {"norm", "threshold", "coef", "clipped", "finite", "skip"}
    grads = [p.grad for p in namespace["model"].parameters()]
    assert all(g is not None for g in grads)
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) <= 1.0 + 1e-5


def _check_drop_ins(namespace):
    torch = namespace["torch"]
    assert isinstance(namespace["norm"], torch.Tensor) and namespace["norm"].ndim == 0
    assert all(p.grad.abs().max() <= 0.5 for p in namespace["model"].parameters())


def _check_functional(namespace):
    grads = namespace["grads"]
    np.testing.assert_array_equal(grads[0], [3.0, 4.0])  # "inputs untouched"
    np.testing.assert_array_equal(grads[1], [12.0])
    assert float(namespace["norm"]) == 13.0
    clipped = namespace["clipped"]
    assert float(np.sqrt(sum(np.sum(c**2) for c in clipped))) == pytest.approx(1.0, rel=1e-5)


def _check_adaptive(namespace):
    torch = namespace["torch"]
    saved = torch.load("ckpt.pt", weights_only=True)  # the README says it loads this way
    assert saved["clipper"] == namespace["clipper"].state_dict()
    json.dumps(saved["clipper"])


def _check_training_loop(namespace):
    assert namespace["opt"].stepped  # 8 batches, 4 accumulation steps: the last call stepped
    records = [json.loads(line) for line in Path("clip.jsonl").read_text().splitlines()]
    assert records, "the Monitor wrote nothing"
    assert list(Path("tb").glob("events.out.tfevents.*")), "no TensorBoard event file"


def _check_keras(namespace):
    optimizer = namespace["model"].optimizer
    assert optimizer.iterations.numpy() == 4  # 2 epochs of 2 batches, each through the clipper
    assert optimizer.clipper_state_dict()["state"]["step"] == 4  # ZClip saw every batch


def _check_jax(namespace):
    info = namespace["gradclip"].optax.clip_info(namespace["opt_state"]).to_dict()
    assert info["norm"] == pytest.approx(float(np.sqrt(8) * 2 * 8 * 4), rel=1e-6)  # ‖2·X^T X w‖
    assert info["finite"] and not info["skip"]
    assert set(namespace["updates"]) == {"w"}


def _check_compiled(namespace):
    torch, clipper, info = namespace["torch"], namespace["clipper"], namespace["info"]
    assert isinstance(info, gradclip.ClipInfo) and info.norm.ndim == 0
    assert clipper.state_dict()["state"]["step"] == 6  # the state advanced once per compiled call
    assert all(torch.isfinite(p).all() for p in namespace["model"].parameters())


CHECKS = {
    COMPILED: _check_compiled,
    KERAS: _check_keras,
    JAX: _check_jax,
    TOUR: _check_tour,
    DROP_INS: _check_drop_ins,
    FUNCTIONAL: _check_functional,
    ADAPTIVE: _check_adaptive,
    TRAINING_LOOP: _check_training_loop,
}


def _find(key: str) -> Block:
    found = [block for block in BLOCKS if key in block.source]
    assert len(found) == 1, f"{key!r} matches {len(found)} README blocks, expected exactly one"
    return found[0]


def _key_of(block: Block) -> str | None:
    keys = [key for key in (*FRAGMENTS, *CONTINUES, *STAND_INS, *CHECKS) if key in block.source]
    return keys[0] if keys else None


def _top_level_imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def _execute(block: Block, namespace: dict) -> None:
    key = _key_of(block)
    if key in CONTINUES:
        _execute(_find(CONTINUES[key]), namespace)
    for module in sorted(_top_level_imports(block.source) - {"gradclip"}):
        pytest.importorskip(module, reason=f"README block at line {block.line} imports {module}")
    if key in STAND_INS:
        exec(STAND_INS[key], namespace)
    with warnings.catch_warnings():
        for message in EXPECTED_WARNINGS.get(key, ()):
            warnings.filterwarnings("ignore", message=message)
        exec(compile(block.source, f"{README}:{block.line}", "exec"), namespace)


def _block_id(block: Block) -> str:
    return f"line{block.line}-" + re.sub(r"[^a-z0-9]+", "-", block.heading.lower()).strip("-")


def test_markers_name_existing_blocks():
    assert BLOCKS, "README.md has no python blocks"
    for key in {*FRAGMENTS, *CONTINUES, *CONTINUES.values(), *STAND_INS, *CHECKS, *EXPECTED_WARNINGS}:
        _find(key)
    assert not set(FRAGMENTS) & (set(CHECKS) | set(CONTINUES)), "a fragment cannot be checked"
    assert len(RUNNABLE) == len(BLOCKS) - len(FRAGMENTS)


RUNNABLE = [block for block in BLOCKS if _key_of(block) not in FRAGMENTS]


@pytest.mark.parametrize("block", RUNNABLE, ids=_block_id)
def test_readme_block_runs(block, tmp_path, monkeypatch):
    key = _key_of(block)
    monkeypatch.chdir(tmp_path)  # blocks write files (ckpt.pt, clip.jsonl, tb/)
    namespace = {"__name__": "__readme__"}
    if "torch" in _top_level_imports(block.source) or key in CONTINUES:
        pytest.importorskip("torch").manual_seed(0)
    _execute(block, namespace)
    if key in CHECKS:
        CHECKS[key](namespace)
