"""The example tasks in examples/tasks/ run under ``gradclip.experiments.compare`` as their
docstrings say: a plain PyTorch loop, a ``Task`` subclass, a ``transformers.Trainer``, Keras
``model.fit`` and an optax loop. Each is trained briefly under ``none`` and a tight global-norm
bound: the traces show the clipper measured every step, clipped where the norm passed the bound
and nowhere under ``none``, and that clipping changed the training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gradclip.experiments import compare

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "tasks"

CASES = {
    "torch_loop.py:task": ("torch",),
    "torch_task.py:Regression": ("torch",),
    "transformers_trainer.py:task": ("torch", "transformers", "accelerate"),
    "keras_fit.py:task": ("keras", "tensorflow"),
    "optax_loop.py:task": ("jax", "optax"),
}


def test_every_example_task_has_a_test():
    assert {p.name for p in EXAMPLES.glob("*.py")} == {case.split(":")[0] for case in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_example_task_runs_under_compare(case, tmp_path):
    for module in CASES[case]:
        pytest.importorskip(module)
    steps = 6
    # One case writes the whole report (plots cost seconds); the others keep the records only.
    out = tmp_path / "run" if case == "torch_task.py:Regression" else None
    result = compare(f"{EXAMPLES / case}", ["none", "global_norm:max_norm=0.01"], seeds=1, steps=steps, out=out)
    none, clipped = result.records
    for record in (none, clipped):
        assert record["status"] == "ok", record.get("traceback")
        assert record["steps_run"] == steps and len(record["history"]["norm"]) == steps
        assert all(math.isfinite(n) and n > 0 for n in record["history"]["norm"])
        assert math.isfinite(record["metric"]) and record["metric_name"] in ("accuracy", "r2")
    assert not any(none["history"]["clipped"]) and none["history"]["threshold"][0] == math.inf
    assert clipped["history"]["threshold"][0] == pytest.approx(0.01)
    assert clipped["history"]["clipped"] == [n > 0.01 for n in clipped["history"]["norm"]]
    assert any(clipped["history"]["clipped"])
    # The first step sees the same model and data; afterwards the clip changed the training.
    assert none["history"]["norm"][0] == pytest.approx(clipped["history"]["norm"][0], rel=1e-6)
    assert none["history"]["loss"][1:] != clipped["history"]["loss"][1:]
    assert out is None or (out / "report.html").is_file()
