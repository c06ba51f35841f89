"""Every example in examples/ runs, briefly, and produces what it says it does.

The examples are run in this process through their ``main(argv)`` (the frameworks are imported
once for the whole suite); one is also run as a script, the way a user starts it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")

from gradclip.monitor import read_log  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name):
    path = os.path.join(EXAMPLES, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"gradclip_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name, argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the examples may warn (clip rate, deprecations): not failures
        _load(name).main(argv)


def test_every_example_has_a_test():
    found = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(EXAMPLES, "*.py"))}
    assert found == {"clipped_optimizer", "monitor_and_suggest", "lightning_callback", "transformers_callback",
                     # run by tests/test_examples_keras_jax.py
                     "keras_mirrored_strategy", "flax_nnx_optimizer", "jax_shard_map_step"}


def test_clipped_optimizer_example(tmp_path, capsys):
    _run("clipped_optimizer", ["--steps", "12", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "folded into the fused step: True" in out
    assert "Suggested max_norm" in out
    assert len(read_log(tmp_path / "clip.jsonl")) == 12
    header, *rows = (tmp_path / "clip.csv").read_text().splitlines()
    assert len(rows) == 12
    # One column per parameter of the example's model, from the first row on.
    layers = [c for c in header.split(",") if c.startswith("layer_norm/")]
    assert layers == [f"layer_norm/{n}" for n in ("0.weight", "0.bias", "2.weight", "2.bias")]
    assert "nonfinite_layers" in header.split(",")
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    state = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    # torch's optimizer format at the top level (plain optimizers load it), gradclip's under one key.
    assert {"state", "param_groups", "gradclip"} <= set(state) and "clipper" in state["gradclip"]


def test_clipped_optimizer_example_with_accumulation(tmp_path, capsys):
    _run("clipped_optimizer", ["--steps", "4", "--accumulation-steps", "3", "--out", str(tmp_path)])
    assert len(read_log(tmp_path / "clip.jsonl")) == 4  # one record per optimizer step


def test_monitor_and_suggest_example(tmp_path, capsys):
    _run("monitor_and_suggest", ["--steps", "30", "--every", "7", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "30 steps logged" in out and "suggested max_norm" in out
    assert len(read_log(tmp_path / "clip.jsonl")) == 30


def test_lightning_example(tmp_path, capsys):
    pytest.importorskip("lightning")
    _run("lightning_callback", ["--steps", "5", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "steps: 5" in out and "grad_norm" in out
    assert len(read_log(tmp_path / "clip.jsonl")) == 5


def test_transformers_example(tmp_path, capsys):
    pytest.importorskip("transformers")
    _run("transformers_callback", ["--steps", "10", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("logged at step") == 2  # logging_steps=5
    assert "'clip_rate'" in out and "Suggested max_norm" in out


def test_an_example_runs_as_a_script(tmp_path):
    script = os.path.join(EXAMPLES, "monitor_and_suggest.py")
    result = subprocess.run(
        [sys.executable, script, "--steps", "10", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "suggested max_norm" in result.stdout
