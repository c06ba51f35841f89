"""The Keras ``MirroredStrategy``, flax ``nnx.Optimizer`` and ``shard_map`` examples run as scripts
(each configures devices before its framework starts) and print what they promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script(name, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    done = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), *args], env=env,
                          capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_keras_mirrored_strategy_example():
    pytest.importorskip("tensorflow")
    out = _script("keras_mirrored_strategy", "--devices", "2", "--epochs", "1")
    assert "replicas: 2, optimizer steps: 4" in out  # 8 batches, 2 accumulated per step
    assert "'step': 4" in out  # the clipper advanced once per optimizer step


def test_flax_nnx_optimizer_example():
    pytest.importorskip("flax")
    out = _script("flax_nnx_optimizer", "--steps", "30")
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < first
    assert int(re.search(r"clipped on (\d+)", out).group(1)) > 0


def test_jax_shard_map_example():
    pytest.importorskip("optax")
    out = _script("jax_shard_map_step", "--devices", "4", "--steps", "5")
    got, want = map(float, re.search(r"every device ([\d.]+), one device on the whole batch ([\d.]+)", out).groups())
    assert got == pytest.approx(want, rel=1e-4)
    assert "4 devices, step 5" in out and "clipped True" in out
