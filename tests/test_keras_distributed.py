"""``ClippingOptimizer`` under ``tf.distribute``: the clip acts on the cross-replica sum.

Each device count (2 and 4 logical CPU devices) and each strategy runs in its own process
(``tests/_keras_distributed_child.py``): devices are configured before TensorFlow starts, and two
strategies in one process would share collective keys. Against one replica on the whole batch
(the same global batch, no strategy): ``model.fit`` under ``MirroredStrategy`` and
``MultiWorkerMirroredStrategy`` gives the same weights, the same norm at every step (the norm of
the summed gradient, so the clip acts where one replica's would), every replica's copy of the
weights and of the clipper's state identical, for a scalar, an adaptive, a unit-wise and a
per-tensor clipper, and for a skipped step whose NaN sits in one replica's share only. With
``gradient_accumulation_steps=2`` under the strategy the run equals the unaccumulated one on the
whole batch; ``LossScaleOptimizer(ClippingOptimizer(...))`` equals the unscaled run. Refused by
name: ``ParameterServerStrategy`` (a real in-process cluster), ``CentralStorageStrategy``, a
strategy without devices, and a call from the cross-replica context.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="tf.distribute needs tensorflow")
pytest.importorskip("keras", reason="the Keras adapter needs keras")

ROOT = Path(__file__).resolve().parent.parent


def _child(devices: int, mode: str) -> dict:
    env = dict(os.environ, KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_keras_distributed_child.py"), str(devices), mode],
        env=env, capture_output=True, text=True, timeout=280, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _weights_close(got, want):
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _same_run(run, reference, name):
    _weights_close(run["weights"], reference["weights"])
    np.testing.assert_allclose(run["norms"], reference["norms"], rtol=1e-5, err_msg=f"{name}: norms")
    assert run["spread"] == 0.0, f"{name}: the replicas' weights differ"
    assert run["state_spread"] == 0.0, f"{name}: the replicas' clipper states differ"
    assert run["clipped"] == reference["clipped"] and run["iterations"] == reference["iterations"], name


@pytest.fixture(scope="module", params=[2, 4], ids=["2_devices", "4_devices"])
def mirrored(request):
    return _child(request.param, "mirrored")


def test_mirrored_strategy_clips_the_summed_gradient(mirrored):
    assert mirrored["replicas"] == mirrored["devices"]
    for name, runs in mirrored["cases"].items():
        _same_run(runs["mirrored"], runs["one"], name)
    cases = mirrored["cases"]
    assert cases["global_norm"]["one"]["clipped"] == cases["global_norm"]["one"]["iterations"] > 0
    # The NaN in one replica's share reaches every replica through the sum: the step is skipped.
    assert cases["skip"]["mirrored"]["iterations"] == cases["global_norm"]["one"]["iterations"] - 1
    for field in ("step", "mean", "var"):
        assert cases["zclip"]["mirrored"]["state"][field] == pytest.approx(cases["zclip"]["one"]["state"][field], rel=1e-5)
    if "adagc" in cases:
        assert cases["adagc"]["mirrored"]["state"]["gamma"] == pytest.approx(cases["adagc"]["one"]["state"]["gamma"], rel=1e-5)


def test_accumulation_under_the_strategy_equals_the_whole_batch(mirrored):
    runs = mirrored["accumulation"]
    pairs = [("one_big", "mirrored_accumulated"), ("zclip_one_big", "zclip_mirrored_accumulated")]
    for big, accumulated in pairs[: 2 if "zclip_one_big" in runs else 1]:
        _weights_close(runs[accumulated]["weights"], runs[big]["weights"])
        assert runs[accumulated]["iterations"] == runs[big]["iterations"]
        assert runs[accumulated]["spread"] == 0.0 and runs[accumulated]["state_spread"] == 0.0
    if "zclip_one_big" not in runs:
        return
    want, got = runs["zclip_one_big"]["state"], runs["zclip_mirrored_accumulated"]["state"]
    assert got["step"] == want["step"] == runs["zclip_one_big"]["iterations"]  # one clip per step
    assert got["mean"] == pytest.approx(want["mean"], rel=1e-5)


def test_loss_scale_optimizer_outside_under_the_strategy(mirrored):
    _weights_close(mirrored["loss_scaled"], mirrored["cases"]["global_norm"]["one"]["weights"])


def test_strategies_that_cannot_be_handled_are_refused_by_name(mirrored):
    refused = mirrored["refused"]
    assert "CentralStorageStrategy is not supported" in refused["central_storage"]
    assert "has no devices" in refused["no_devices"] and "num_replicas_in_sync=0" in refused["no_devices"]
    assert "cross-replica context of MirroredStrategy" in refused["cross_replica"]
    if mirrored["devices"] == 2:
        assert "ParameterServerStrategy" in refused["parameter_server"]
        assert "no aggregated gradient to clip" in refused["parameter_server"]


def test_multi_worker_mirrored_strategy_on_one_machine():
    out = _child(2, "multi_worker")
    assert out["replicas"] == 2
    for name, runs in out["cases"].items():
        _same_run(runs["multi_worker"], runs["one"], name)
