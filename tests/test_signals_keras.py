"""Keras' ``ClippingOptimizer`` with the step's loss and skip streaks (issue 17), in real
``model.fit`` runs on the TensorFlow backend.

The loss reaches the clipper through ``optimizer.scale_loss`` (Keras' own train step calls it):
the loss of the very batch being judged, which the tests recompute from the weights each batch
started from; a spike in it skips that batch only. Streaks are counted in a variable inside the
compiled step, and ``StopOnDivergence`` stops ``fit`` with a ``DivergenceError``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the Keras adapter is tested on the TensorFlow backend")
keras = pytest.importorskip("keras", reason="the Keras adapter needs keras")

import gradclip
from gradclip.keras import ClippingOptimizer, StopOnDivergence

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="KERAS_BACKEND is not tensorflow")

BATCH = 8


def _data(batches=6, spike_at=None, nan_from=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * batches, 6)).astype(np.float32)
    y = rng.normal(size=(BATCH * batches, 2)).astype(np.float32)
    if spike_at is not None:
        y[BATCH * spike_at : BATCH * (spike_at + 1)] *= 100
    if nan_from is not None:
        x[BATCH * nan_from :] = np.nan
    return x, y


def _model(optimizer, **compile_options):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
    model.compile(optimizer=optimizer, loss="mse", **compile_options)
    return model


class Batches(keras.callbacks.Callback):
    """Per batch: the loss of the weights it started from (recomputed here) and whether the
    weights moved."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y
        self.losses, self.moved = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.before = [np.array(w) for w in self.model.get_weights()]
        xb, yb = self.x[BATCH * batch : BATCH * (batch + 1)], self.y[BATCH * batch : BATCH * (batch + 1)]
        self.losses.append(float(np.mean((xb @ self.before[0] + self.before[1] - yb) ** 2)))

    def on_train_batch_end(self, batch, logs=None):
        self.moved.append(any(not np.array_equal(a, b) for a, b in zip(self.model.get_weights(), self.before)))


def _loss_spike_clipper():
    return gradclip.SkipOnSpike(window=8, min_history=3, sigma=3.0, signal="loss")


# -- the loss ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [{"jit_compile": True}, {"jit_compile": False}, {"run_eagerly": True}], ids=["xla", "tf_function", "eager"])
def test_a_loss_spike_skips_that_batch_in_fit(mode):
    x, y = _data(spike_at=4)
    optimizer = ClippingOptimizer(keras.optimizers.SGD(0.01), _loss_spike_clipper())
    batches = Batches(x, y)
    _model(optimizer, **mode).fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[batches])
    assert batches.moved == [True, True, True, True, False, True]
    # The losses the clipper recorded (its window keeps the accepted ones, in order) are those
    # of each batch at the weights it started from: the current step's, not the previous one's.
    state = optimizer.clipper_state_dict()["state"]
    accepted = [loss for loss, moved in zip(batches.losses, batches.moved) if moved]
    np.testing.assert_allclose(state["loss_window"][: len(accepted)], accepted, rtol=1e-5)
    assert state["skipped"] == 1


def test_under_accumulation_the_clipper_gets_the_mean_loss_of_the_micro_batches():
    x, y = _data(batches=4)
    optimizer = ClippingOptimizer(keras.optimizers.SGD(0.01, gradient_accumulation_steps=2), _loss_spike_clipper())
    batches = Batches(x, y)
    _model(optimizer).fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[batches])
    # The weights do not move within an accumulation: each pair of micro-batch losses is taken
    # at the same weights, and the clipper sees their mean once per optimizer step.
    assert batches.moved == [False, True, False, True]
    want = [(batches.losses[0] + batches.losses[1]) / 2, (batches.losses[2] + batches.losses[3]) / 2]
    window = optimizer.clipper_state_dict()["state"]["loss_window"]
    np.testing.assert_allclose(window[:2], want, rtol=1e-5)


def test_a_loss_recorded_in_another_traced_function_is_not_used():
    """``scale_loss`` in one ``tf.function`` and ``apply`` in another: the loss does not leak
    (a symbolic tensor of another graph); a clipper that needs it says it got none."""
    optimizer = ClippingOptimizer(keras.optimizers.SGD(0.01), _loss_spike_clipper())
    variables = [keras.Variable(np.zeros(3, np.float32))]
    optimizer.build(variables)
    tf.function(lambda: optimizer.scale_loss(tf.constant(1.0)))()
    with pytest.raises(gradclip.InvalidArgumentError, match=r"ClippingOptimizer.apply: SkipOnSpike needs the step's loss.*scale_loss"):
        tf.function(lambda: optimizer.apply([tf.ones(3)], variables))()
    assert np.array_equal(variables[0].numpy(), np.zeros(3))


def test_a_loss_clipper_inside_a_loss_scale_optimizer_is_refused_clearly():
    """``LossScaleOptimizer`` (mixed_float16) does not pass the loss on: the step says so."""
    x, y = _data(batches=2)
    optimizer = keras.optimizers.LossScaleOptimizer(ClippingOptimizer(keras.optimizers.SGD(0.01), _loss_spike_clipper()))
    model = _model(optimizer)
    before = [np.array(w) for w in model.get_weights()]
    with pytest.raises(gradclip.InvalidArgumentError, match="a LossScaleOptimizer around this optimizer does not pass it on"):
        model.fit(x, y, batch_size=BATCH, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before))


def test_a_loss_of_the_wrong_shape_is_refused_and_nothing_changes():
    optimizer = ClippingOptimizer(keras.optimizers.SGD(0.01), _loss_spike_clipper())
    variables = [keras.Variable(np.zeros(3, np.float32))]
    optimizer.build(variables)

    @tf.function
    def step():
        optimizer.scale_loss(tf.ones(3))
        optimizer.apply([tf.ones(3)], variables)

    with pytest.raises(gradclip.InvalidArgumentError, match=r"loss must be a scalar \(one element\), got an array of shape \(3,\)"):
        step()
    assert np.array_equal(variables[0].numpy(), np.zeros(3)) and int(optimizer.iterations.numpy()) == 0


def test_a_loss_of_another_framework_is_refused():
    torch = pytest.importorskip("torch")
    optimizer = ClippingOptimizer(keras.optimizers.SGD(0.01), _loss_spike_clipper())
    with pytest.raises(gradclip.InvalidArgumentError, match="loss is a torch array, but Keras runs on the tensorflow backend"):
        optimizer.scale_loss(torch.tensor(1.0))


# -- streaks -----------------------------------------------------------------------------------
def test_last_info_carries_the_consecutive_skips():
    x, y = _data(batches=5, nan_from=2)
    optimizer = ClippingOptimizer(keras.optimizers.SGD(0.01), gradclip.GlobalNorm(1.0, nonfinite="skip"))
    counts = []

    class Count(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            counts.append(optimizer.last_info().to_dict()["consecutive_skips"])

    _model(optimizer).fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[Count()])
    assert counts == [0, 0, 1, 2, 3]
    assert optimizer.last_info().consecutive_skips.dtype == np.int64


def test_stop_on_divergence_stops_fit_with_divergence_error():
    x, y = _data(batches=8, nan_from=2)
    optimizer = ClippingOptimizer(
        keras.optimizers.SGD(0.01), gradclip.GlobalNorm(1.0, nonfinite="skip"), max_consecutive_skips=3
    )
    model = _model(optimizer)
    batches = Batches(x, y)
    with pytest.raises(gradclip.DivergenceError, match=r"ClippingOptimizer: 3 optimizer steps in a row were skipped") as caught:
        model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[batches, StopOnDivergence()])
    assert model.stop_training and len(batches.moved) == 5  # batches 2, 3, 4 skipped; stopped after 4
    assert caught.value.streak == 3 and len(caught.value.norms) == 3 == len(caught.value.losses)
    assert all(math.isnan(v) for v in caught.value.losses)  # the NaN inputs' losses
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_a_bound_that_nothing_watches_warns_once_and_a_watched_one_does_not():
    """max_consecutive_skips without StopOnDivergence would let fit skip forever: say so."""
    import warnings

    x, y = _data(batches=3)

    def fit(callbacks):
        optimizer = ClippingOptimizer(keras.optimizers.SGD(0.01), gradclip.GlobalNorm(1.0), max_consecutive_skips=3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _model(optimizer).fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=callbacks)
        return [w for w in caught if "no gradclip.keras.StopOnDivergence() callback watches it" in str(w.message)]

    assert len(fit([])) == 1
    assert fit([StopOnDivergence()]) == []


def test_check_divergence_in_a_loop_of_ones_own():
    optimizer = ClippingOptimizer(
        keras.optimizers.SGD(0.01), gradclip.GlobalNorm(1.0, nonfinite="skip"), max_consecutive_skips=2
    )
    variables = [keras.Variable(np.zeros(3, np.float32))]
    step = tf.function(lambda g: optimizer.apply(g, variables))
    with pytest.warns(UserWarning, match="call optimizer.check_divergence"):  # traced before the first check
        step([tf.constant([np.nan, 0.0, 0.0])])
    optimizer.check_divergence()  # one skipped step: not yet
    step([tf.constant([np.nan, 0.0, 0.0])])
    with pytest.raises(gradclip.DivergenceError, match=r"last losses: \[-, -\]") as caught:
        optimizer.check_divergence()
    assert caught.value.losses == [None, None] and caught.value.streak == 2
    step([tf.constant([1.0, 0.0, 0.0])])  # a step taken ends the streak
    optimizer.check_divergence()
    assert int(optimizer.last_info().consecutive_skips) == 0


def test_stop_on_divergence_needs_a_bound_and_check_divergence_too():
    x, y = _data(batches=2)
    model = _model(ClippingOptimizer(keras.optimizers.SGD(0.01), gradclip.GlobalNorm(1.0)))
    before = [np.array(w) for w in model.get_weights()]
    with pytest.raises(gradclip.InvalidArgumentError, match="StopOnDivergence: the model's optimizer must be a gradclip.keras.ClippingOptimizer with max_consecutive_skips"):
        model.fit(x, y, batch_size=BATCH, verbose=0, callbacks=[StopOnDivergence()])
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before))
    with pytest.raises(gradclip.InvalidArgumentError, match="check_divergence: no max_consecutive_skips was set"):
        model.optimizer.check_divergence()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_max_consecutive_skips_below_one_is_refused_before_anything_changes(bad):
    inner = keras.optimizers.SGD(0.01, gradient_accumulation_steps=2)
    with pytest.raises(gradclip.InvalidArgumentError, match="ClippingOptimizer: max_consecutive_skips"):
        ClippingOptimizer(inner, gradclip.GlobalNorm(1.0), max_consecutive_skips=bad)
    assert inner.gradient_accumulation_steps == 2  # not taken over


def test_max_consecutive_skips_survives_a_config_round_trip():
    optimizer = ClippingOptimizer(keras.optimizers.SGD(0.01), gradclip.GlobalNorm(1.0), max_consecutive_skips=4)
    assert ClippingOptimizer.from_config(optimizer.get_config()).max_consecutive_skips == 4
    assert "max_consecutive_skips" not in ClippingOptimizer(keras.optimizers.SGD(0.01), gradclip.GlobalNorm(1.0)).get_config()


# -- other processes: logical devices, other backends --------------------------------------------
def _run_child(code, backend):
    """Run ``code`` in a fresh interpreter with ``KERAS_BACKEND=backend`` (Keras picks its backend,
    TensorFlow its devices, once per process); the JSON of its ``RESULT`` line."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])


MIRRORED_CHILD = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import gradclip
from gradclip.keras import ClippingOptimizer

rng = np.random.default_rng(0)
x = rng.normal(size=(64, 6)).astype(np.float32)
y = rng.normal(size=(64, 2)).astype(np.float32)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
    optimizer = ClippingOptimizer(keras.optimizers.SGD(0.01),
                                  gradclip.SkipOnSpike(window=8, min_history=7, sigma=3.0, signal="loss"))
    model.compile(optimizer=optimizer, loss="mse")
losses = []
class Losses(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        w, b = (np.array(v) for v in self.model.get_weights())
        xb, yb = x[16 * batch : 16 * (batch + 1)], y[16 * batch : 16 * (batch + 1)]
        losses.append(float(np.mean((xb @ w + b - yb) ** 2)))
model.fit(x, y, batch_size=16, shuffle=False, verbose=0, callbacks=[Losses()])
window = optimizer.clipper_state_dict()["state"]["loss_window"]
print("RESULT " + json.dumps({"want": losses, "got": window[: len(losses)]}))
"""


def test_under_mirrored_strategy_the_clipper_gets_the_whole_batch_loss():
    """Two replicas (logical CPUs, a subprocess: devices are fixed before TensorFlow starts):
    each computes its half of the batch's loss; the clipper gets their sum, the loss of the
    whole batch, identical on both replicas."""
    out = _run_child(MIRRORED_CHILD, "tensorflow")
    assert len(out["want"]) == 4
    np.testing.assert_allclose(out["got"], out["want"], rtol=1e-5)


JAX_CHILD = r"""
import json
import numpy as np
import keras
import gradclip
from gradclip.keras import ClippingOptimizer, StopOnDivergence

try:
    ClippingOptimizer(keras.optimizers.SGD(0.01), gradclip.SkipOnSpike(signal="loss"))
    refused = ""
except gradclip.InvalidArgumentError as error:
    refused = str(error)
rng = np.random.default_rng(0)
x, y = rng.normal(size=(64, 6)).astype(np.float32), rng.normal(size=(64, 2)).astype(np.float32)
x[16:] = np.nan
model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
model.compile(optimizer=ClippingOptimizer(keras.optimizers.SGD(0.01), gradclip.GlobalNorm(1.0, nonfinite="skip"),
                                          max_consecutive_skips=3), loss="mse")
try:
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[StopOnDivergence()])
    streak = None
except gradclip.DivergenceError as error:
    streak = error.streak
print("RESULT " + json.dumps({"backend": keras.backend.backend(), "refused": refused, "streak": streak,
                              "stopped": bool(model.stop_training)}))
"""


def test_on_the_jax_backend_streaks_stop_fit_and_a_loss_clipper_is_refused():
    """``KERAS_BACKEND=jax`` (a subprocess: Keras picks its backend on import): the loss cannot
    leave ``jax.value_and_grad`` there, so a clipper that needs it is refused when built; the
    streak is counted in the jitted step and stops ``fit``."""
    pytest.importorskip("jax", reason="the JAX Keras backend needs jax")
    out = _run_child(JAX_CHILD, "jax")
    assert out["backend"] == "jax"
    assert "SkipOnSpike needs the step's loss, which Keras' JAX train step keeps inside jax.value_and_grad" in out["refused"]
    assert out["streak"] == 3 and out["stopped"]


def test_an_optimizer_saved_before_the_streak_variables_loads():
    """Keras saves optimizer variables by position: a checkpoint written before the streak
    counter and the accumulated loss existed still restores every other variable (the
    clipper's state included), and the streak starts at 0."""
    def built():
        optimizer = ClippingOptimizer(keras.optimizers.Adam(1e-2, gradient_accumulation_steps=2), gradclip.ZClip(warmup_steps=1))
        variables = [keras.Variable(np.zeros(3, np.float32))]
        optimizer.build(variables)
        return optimizer, variables

    optimizer, variables = built()
    step = tf.function(lambda g: optimizer.apply(g, variables))
    for seed in range(4):
        step([tf.constant(np.random.default_rng(seed).normal(size=3).astype(np.float32))])
    store = {}
    optimizer.save_own_variables(store)
    added = {"clip_consecutive_skips", "loss_accumulator"}
    old = [store[str(i)] for i, v in enumerate(optimizer.variables) if v.name not in added]
    assert len(old) == len(store) - 2
    fresh, _ = built()
    fresh.load_own_variables({str(i): value for i, value in enumerate(old)})
    assert fresh.clipper_state_dict() == optimizer.clipper_state_dict()
    assert int(fresh.iterations.numpy()) == 2 and int(fresh.last_info().consecutive_skips) == 0
    again, _ = built()
    again.load_own_variables(store)  # a checkpoint of this version: every variable
    assert again.clipper_state_dict() == optimizer.clipper_state_dict()
