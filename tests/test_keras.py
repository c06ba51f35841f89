"""``gradclip.keras.ClippingOptimizer``: any clipper inside Keras 3 ``model.fit``.

Parity with Keras' own ``clipnorm``, ``global_clipnorm`` and ``clipvalue`` (eagerly and inside a
compiled step), skipped steps that leave weights, moments and ``iterations`` alone, adaptive
state kept in optimizer variables (advancing inside the compiled train step, saved with the
model), every registered clipper in an XLA-compiled step against eager clipping, variables
without a gradient, and a real ``model.fit`` on scikit-learn's digits with ``GlobalNorm`` and
``ZClip`` in which the clipping demonstrably acts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the Keras adapter is tested on the TensorFlow backend")
keras = pytest.importorskip("keras", reason="the Keras adapter needs keras")

import gradclip  # noqa: E402
from gradclip.keras import ClippingOptimizer  # noqa: E402
from test_conformance import NONFINITE_AT, make_clipper, sequence  # noqa: E402

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="KERAS_BACKEND is not tensorflow")


def _variables(shapes=((4, 3), (3,), (2, 2, 3))):
    return [keras.Variable(np.zeros(s, np.float32)) for s in shapes]


def _grads(seed, shapes=((4, 3), (3,), (2, 2, 3)), scale=3.0):
    rng = np.random.default_rng(seed)
    return [tf.constant(rng.normal(size=s).astype(np.float32) * scale) for s in shapes]


def _apply(optimizer, steps=3, compiled=False):
    variables = _variables()
    optimizer.build(variables)

    def step(grads):
        optimizer.apply(grads, variables)

    run = tf.function(step) if compiled else step
    for seed in range(steps):
        run(_grads(seed))
    return [np.asarray(v.numpy()) for v in variables]


# -- parity with Keras' own clipping options ----------------------------------------------------------
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize(
    "option,clipper",
    [
        ({"clipnorm": 2.0}, lambda: gradclip.Norm(2.0)),
        ({"global_clipnorm": 2.0}, lambda: gradclip.GlobalNorm(2.0, eps=0.0)),
        ({"clipvalue": 0.5}, lambda: gradclip.Value(clip_value=0.5)),
    ],
    ids=["clipnorm", "global_clipnorm", "clipvalue"],
)
def test_parity_with_keras_clipping_options(option, clipper, compiled):
    want = _apply(keras.optimizers.SGD(learning_rate=0.1, **option), compiled=compiled)
    got = _apply(ClippingOptimizer(keras.optimizers.SGD(learning_rate=0.1), clipper()), compiled=compiled)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)


def test_deviation_keras_global_clipnorm_turns_an_inf_into_nan_weights():
    """Keras scales every gradient by ``clip_norm * min(1/inf, 1/clip_norm) + (inf - inf)``: one
    inf makes every weight NaN. With ``nonfinite="skip"`` the step does not happen at all."""
    grads = _grads(0)
    grads[1] = tf.constant([np.inf, 0.0, 1.0], tf.float32)
    keras_opt = keras.optimizers.SGD(learning_rate=0.1, global_clipnorm=1.0)
    variables = _variables()
    keras_opt.apply(grads, variables)
    assert np.isnan(variables[0].numpy()).all()
    ours = ClippingOptimizer(keras.optimizers.SGD(learning_rate=0.1), gradclip.GlobalNorm(1.0, nonfinite="skip"))
    variables = _variables()
    ours.apply(grads, variables)
    assert all((v.numpy() == 0).all() for v in variables)
    assert int(ours.iterations.numpy()) == 0 and ours.last_info().to_dict()["skip"]


def test_skipped_step_leaves_weights_moments_and_iterations():
    ours = ClippingOptimizer(keras.optimizers.Adam(1e-2), gradclip.GlobalNorm(1.0, nonfinite="skip"))
    variables = _variables()
    step = tf.function(lambda g: ours.apply(g, variables))
    step(_grads(0))
    before = [np.array(v.numpy()) for v in variables + list(ours.inner_optimizer.variables)]
    bad = _grads(1)
    bad[0] = tf.tensor_scatter_nd_update(bad[0], [[0, 0]], [np.nan])
    step(bad)
    after = [np.array(v.numpy()) for v in variables + list(ours.inner_optimizer.variables)]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert int(ours.iterations.numpy()) == 1
    step(_grads(2))
    assert int(ours.iterations.numpy()) == 2


def test_adaptive_state_lives_in_optimizer_variables():
    if "zclip" not in gradclip.available():
        pytest.skip("needs the zclip clipper")
    ours = ClippingOptimizer(keras.optimizers.SGD(0.1), gradclip.get("zclip", warmup_steps=3))
    variables = _variables()
    step = tf.function(lambda g: ours.apply(g, variables))
    for seed in range(5):
        step(_grads(seed))
    state = ours.clipper_state_dict()
    assert state["clipper"] == "zclip" and state["state"]["step"] == 5
    # the same sequence through the clipper itself gives the same state
    reference = gradclip.get("zclip", warmup_steps=3)
    for seed in range(5):
        reference.clip(_grads(seed))
    assert reference.state_dict()["state"]["mean"] == pytest.approx(state["state"]["mean"], rel=1e-6)
    # and a checkpoint can be loaded back into the variables
    fresh = ClippingOptimizer(keras.optimizers.SGD(0.1), gradclip.get("zclip", warmup_steps=3))
    fresh.build(_variables())
    fresh.load_clipper_state_dict(state)
    assert fresh.clipper_state_dict()["state"] == state["state"]


def _assert_close(got, want, where: str):
    """Nested state_dict data equal: floats within fp32 rounding, everything else exactly."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for key in want:
            _assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_close(a, b, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), where
    else:
        assert got == want, where


@pytest.mark.parametrize("name", gradclip.available())
def test_compiled_step_equals_eager_clip_for_every_clipper(name):
    """Every registered clipper through ``ClippingOptimizer`` in one XLA-compiled step
    (``tf.function(jit_compile=True)``, as ``model.fit`` compiles it): the weights after each
    step, the step's ClipInfo and the clipper's final state equal eager ``clipper.clip`` on the
    same gradients with the current weights as parameters (AGC), followed by the SGD step. The
    conformance sequence's first steps hold a spike that the adaptive methods clip."""
    steps, params = sequence()
    steps = steps[:NONFINITE_AT]  # finite steps: a NaN would reach the weights
    lr = 0.1
    optimizer = ClippingOptimizer(keras.optimizers.SGD(lr), make_clipper(name))
    variables = [keras.Variable(p.astype(np.float32)) for p in params]
    optimizer.build(variables)
    step = tf.function(lambda g: optimizer.apply(g, variables), jit_compile=True)
    reference = make_clipper(name)
    weights = [p.astype(np.float32) for p in params]
    acted = 0  # steps clipped or skipped
    for index, grads in enumerate(steps):
        grads = [tf.constant(g.astype(np.float32)) for g in grads]
        out, info = reference.clip(grads, params=[tf.constant(w) for w in weights])
        if not bool(info.skip):
            weights = [w - lr * o.numpy() for w, o in zip(weights, out)]
        step(grads)
        want = info.to_dict()
        got = optimizer.last_info().to_dict()
        for field, value in want.items():
            if isinstance(value, bool):
                assert got[field] == value, f"{name}: info.{field} at step {index}"
            else:
                np.testing.assert_allclose(got[field], value, rtol=1e-5, err_msg=f"{name}: info.{field} at step {index}")
        for variable, w in zip(variables, weights):
            np.testing.assert_allclose(variable.numpy(), w, rtol=1e-5, atol=1e-6, err_msg=f"{name}: weights at step {index}")
        acted += int(want["clipped"] or want["skip"])
    _assert_close(optimizer.clipper_state_dict(), reference.state_dict(), f"{name}: state")
    # non_finite changes nothing on finite gradients; spike_aware needs the optimizer's second
    # moments (optimizer_state), which ClippingOptimizer does not pass: it passes through; none
    # never clips (clipping off, as a clipper).
    if name not in ("non_finite", "spike_aware", "none"):
        assert acted > 0, f"{name} never clipped nor skipped"


def test_arguments_are_checked():
    with pytest.raises(gradclip.InvalidArgumentError, match="also clips.*clipnorm"):
        ClippingOptimizer(keras.optimizers.SGD(0.1, clipnorm=1.0), gradclip.GlobalNorm(1.0))
    with pytest.raises(gradclip.InvalidArgumentError, match="gradclip clipper"):
        ClippingOptimizer(keras.optimizers.SGD(0.1), "global_norm")
    with pytest.raises(gradclip.InvalidArgumentError, match="keras.optimizers.Optimizer"):
        ClippingOptimizer(object(), gradclip.GlobalNorm(1.0))


def test_config_round_trip():
    chain = gradclip.chain(gradclip.Value(clip_value=2.0), gradclip.GlobalNorm(1.0, eps=0.0))
    opt = ClippingOptimizer(keras.optimizers.Adam(3e-3), chain)
    clone = ClippingOptimizer.from_config(opt.get_config())
    assert clone.clipper.config() == chain.config()
    assert float(clone.learning_rate) == pytest.approx(3e-3)
    assert isinstance(clone.inner_optimizer, keras.optimizers.Adam)


# -- model.fit on digits ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets", reason="the digits data ships with scikit-learn")
    x, y = datasets.load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))  # the file is sorted by writer
    x, y = x[order], y[order].astype(np.int64)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def _model():
    return keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)]
    )


class _CountClipped(keras.callbacks.Callback):
    """Counts the batches on which the optimizer's clipper clipped (reads its info variables)."""

    def __init__(self, optimizer):
        super().__init__()
        self.optimizer_to_watch = optimizer
        self.clipped = 0

    def on_train_batch_end(self, batch, logs=None):
        self.clipped += int(self.optimizer_to_watch.last_info().to_dict()["clipped"])


def _fit_digits(digits, optimizer, callbacks=()):
    """5 epochs of the 64-64-10 MLP at batch 32 from seed 0; the model."""
    (x, y), _ = digits
    keras.utils.set_random_seed(0)
    model = _model()
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x, y, epochs=5, batch_size=32, verbose=0, callbacks=list(callbacks))
    return model


@pytest.fixture(scope="module")
def unclipped_weights(digits):
    """The weights of the same run with plain Adam."""
    return [np.asarray(w) for w in _fit_digits(digits, keras.optimizers.Adam(1e-2)).get_weights()]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # keras' model.save
@pytest.mark.parametrize(
    "name,kwargs,least_clipped",
    [("global_norm", {"max_norm": 0.5}, 0.25), ("zclip", {"warmup_steps": 10, "z_thresh": 1.0}, 0.05)],
    ids=["global_norm", "zclip"],
)
def test_model_fit_on_digits(digits, unclipped_weights, name, kwargs, least_clipped, tmp_path):
    """A 64-64-10 MLP, 5 epochs of Adam(1e-2) at batch 32 through ``model.fit``: >= 95% test
    accuracy on 397 held-out digits (96.5% and 96.2% here; 97.2% without clipping), and the
    clipper acted: ``GlobalNorm(0.5)`` clipped 127 of the 220 batches here and ``ZClip``
    (``z_thresh=1``) 42, and at least ``least_clipped`` of them is asserted. The weights differ
    from those of the same run without clipping; ZClip's state advanced once per batch inside
    the compiled train step, and survives ``model.save``/``load_model``."""
    if name not in gradclip.available():
        pytest.skip(f"needs the {name} clipper")
    (x, _y), (x_test, y_test) = digits
    optimizer = ClippingOptimizer(keras.optimizers.Adam(1e-2), gradclip.get(name, **kwargs))
    counter = _CountClipped(optimizer)
    model = _fit_digits(digits, optimizer, [counter])
    _loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    assert accuracy >= 0.95, accuracy
    batches = 5 * math.ceil(len(x) / 32)
    assert int(optimizer.iterations.numpy()) == batches
    assert counter.clipped >= least_clipped * batches, f"{name} clipped {counter.clipped} of {batches} batches"
    info = optimizer.last_info().to_dict()
    assert info["finite"] and info["norm"] > 0
    difference = max(float(np.max(np.abs(a - b))) for a, b in zip(model.get_weights(), unclipped_weights))
    assert difference > 1e-3, f"{name}: the weights equal those trained without clipping"
    if name == "zclip":
        state = optimizer.clipper_state_dict()["state"]
        assert state["step"] == batches and state["mean"] > 0
        path = tmp_path / "model.keras"
        model.save(path)
        loaded = keras.models.load_model(path)
        assert isinstance(loaded.optimizer, ClippingOptimizer)
        assert loaded.optimizer.clipper_state_dict()["state"] == state


def test_a_clipper_that_never_acts_trains_like_the_inner_optimizer(digits, unclipped_weights):
    """The baseline of the test above means what it says: through ``ClippingOptimizer`` with a
    clipper that never clips, ``model.fit`` gives the weights plain Adam gives (so a difference
    there comes from the clipping, not from the wrapper or the random stream)."""
    optimizer = ClippingOptimizer(keras.optimizers.Adam(1e-2), gradclip.GlobalNorm(1e9))
    counter = _CountClipped(optimizer)
    model = _fit_digits(digits, optimizer, [counter])
    assert counter.clipped == 0
    for a, b in zip(model.get_weights(), unclipped_weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# -- variables without a gradient -----------------------------------------------------------------------
class ModelWithUnusedWeight(keras.Model):
    """Two Dense layers and, between their variables, a weight the loss never reads: its gradient
    in ``model.fit`` is None."""

    def __init__(self, unused: bool):
        super().__init__()
        self.first = keras.layers.Dense(5, activation="tanh")
        self.unused = self.add_weight(shape=(2,), initializer="ones", name="unused") if unused else None
        self.second = keras.layers.Dense(3)

    def call(self, x):
        return self.second(self.first(x))


@pytest.mark.filterwarnings("ignore:Gradients do not exist:UserWarning")  # Keras' own, as without clipping
@pytest.mark.parametrize(
    "name,kwargs",
    [("adagc", {"start_clip_steps": 3, "clip_ratio": 1.0, "beta": 0.5}), ("global_norm", {"max_norm": 0.05})],
    ids=["adagc", "global_norm"],
)
def test_model_fit_with_a_variable_that_gets_no_gradient(name, kwargs):
    """A trainable variable outside the loss (None gradient) is left alone, and the clipper sees
    the other variables exactly as if it did not exist: the weights equal those of the same
    model without it, AdaGC's per-tensor state keeps one position per variable (the unused
    one: no threshold, never seen; the others equal to the reference's) and the clipper clipped."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = rng.normal(size=(64, 3)).astype(np.float32)

    def fit(unused: bool):
        model = ModelWithUnusedWeight(unused)
        model(x[:1])
        for layer, seed in ((model.first, 1), (model.second, 2)):
            layer.set_weights([np.random.default_rng(seed).normal(size=w.shape).astype(np.float32)
                               for w in layer.get_weights()])
        optimizer = ClippingOptimizer(keras.optimizers.SGD(0.1), gradclip.get(name, **kwargs))
        counter = _CountClipped(optimizer)
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0, callbacks=[counter])
        return model, optimizer, counter.clipped

    model, optimizer, clipped = fit(unused=True)
    reference, reference_optimizer, reference_clipped = fit(unused=False)
    np.testing.assert_array_equal(model.unused.numpy(), np.ones(2, np.float32))
    for layer, want in ((model.first, reference.first), (model.second, reference.second)):
        for a, b in zip(layer.get_weights(), want.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert clipped == reference_clipped and clipped > 0
    assert int(optimizer.iterations.numpy()) == 16
    if name == "adagc":
        state = optimizer.clipper_state_dict()["state"]
        want = reference_optimizer.clipper_state_dict()["state"]
        position = next(i for i, v in enumerate(model.trainable_variables) if v is model.unused)
        assert len(state["gamma"]) == len(model.trainable_variables) == len(want["gamma"]) + 1
        assert state["gamma"][position] == 0.0 and state["seen"][position] is False
        del state["gamma"][position], state["seen"][position]
        assert state["seen"] == want["seen"] and state["step"] == want["step"] == 16
        np.testing.assert_allclose(state["gamma"], want["gamma"], rtol=1e-5)


KERAS_JAX_CHILD = """
import json
import numpy as np
import keras
import gradclip
from gradclip.keras import ClippingOptimizer
from sklearn.datasets import load_digits

x, y = load_digits(return_X_y=True)
x = (x / 16.0).astype("float32")
order = np.random.default_rng(0).permutation(len(x))
x, y = x[order], y[order]
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])
optimizer = ClippingOptimizer(keras.optimizers.Adam(1e-2), gradclip.get("zclip", warmup_steps=10))
model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=["accuracy"])
model.fit(x[:1400], y[:1400], epochs=5, batch_size=32, verbose=0)
accuracy = float(model.evaluate(x[1400:], y[1400:], verbose=0)[1])
step = optimizer.clipper_state_dict()["state"]["step"]

skipper = ClippingOptimizer(keras.optimizers.Adam(1e-2), gradclip.GlobalNorm(1.0, nonfinite="skip"))
weights = [keras.Variable(np.ones(3, np.float32))]
skipper.apply([np.array([1.0, np.nan, 1.0], np.float32)], weights)
skipped = bool(np.all(np.asarray(weights[0].numpy()) == 1.0)) and int(skipper.iterations.numpy()) == 0
skipper.apply([np.array([1.0, 2.0, 1.0], np.float32)], weights)
stepped = bool(np.all(np.asarray(weights[0].numpy()) < 1.0)) and int(skipper.iterations.numpy()) == 1
print("RESULT " + json.dumps({"backend": keras.backend.backend(), "accuracy": accuracy, "step": step,
                              "skipped": skipped, "stepped": stepped}))
"""


def test_model_fit_with_the_jax_keras_backend():
    """The same adapter under ``KERAS_BACKEND=jax`` (a subprocess: Keras picks its backend on
    import): the jitted stateless train step carries the clipper's variables, and skipped steps
    are masked with ``where`` (JAX has no stateful cond). Reaches 98% here."""
    pytest.importorskip("jax", reason="the JAX Keras backend needs jax")
    pytest.importorskip("sklearn", reason="the digits data ships with scikit-learn")
    if "zclip" not in gradclip.available():
        pytest.skip("needs the zclip clipper")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", KERAS_JAX_CHILD], env=env, capture_output=True, text=True,
                          timeout=240, cwd=root)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    assert out["backend"] == "jax" and out["accuracy"] >= 0.95 and out["step"] == 5 * 44
    assert out["skipped"] and out["stepped"]


# -- accumulation, loss scaling, nesting ---------------------------------------------------------------
def _fit_small(optimizer, batch, x=None, epochs=1):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(32, 6)).astype(np.float32) if x is None else x
    y = rng.normal(size=(32, 2)).astype(np.float32) * 3
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(2)])
    model.set_weights([np.random.default_rng(4 + i).normal(size=w.shape).astype(np.float32) for i, w in enumerate(model.get_weights())])
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize("name", ["global_norm", "zclip"])
def test_accumulation_clips_once_on_the_accumulated_gradient(name):
    """``gradient_accumulation_steps=4`` on the wrapped optimizer, batches of 4: the same weights
    as batches of 16 without accumulation (the clip acts on the mean of the 4 micro-batch
    gradients, not on each), one clipper step per optimizer step, and ``iterations`` counts
    optimizer steps. Keras' own accumulation with a clip inside each micro-batch differs."""
    make = {"global_norm": lambda: gradclip.GlobalNorm(0.3), "zclip": lambda: gradclip.get("zclip", warmup_steps=1, z_thresh=0.5)}[name]
    big = ClippingOptimizer(keras.optimizers.SGD(0.1, momentum=0.5), make())
    want = _fit_small(big, 16, epochs=2)
    small = ClippingOptimizer(keras.optimizers.SGD(0.1, momentum=0.5, gradient_accumulation_steps=4), make())
    got = _fit_small(small, 4, epochs=2)
    for a, b in zip(got.get_weights(), want.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(small.iterations.numpy()) == int(big.iterations.numpy()) == 4
    np.testing.assert_allclose(small.last_info().to_dict()["norm"], big.last_info().to_dict()["norm"], rtol=1e-5)
    if name == "zclip":
        assert small.clipper_state_dict()["state"]["step"] == 4
    else:
        assert big.last_info().to_dict()["clipped"]
    # The accumulation setting survives a config round trip (it goes back on the inner optimizer).
    clone = ClippingOptimizer.from_config(small.get_config())
    assert clone.accumulation_steps == 4 and clone.inner_optimizer.gradient_accumulation_steps is None


def test_loss_scale_optimizer_outside_clips_unscaled_gradients_and_skips_overflows():
    """``LossScaleOptimizer(ClippingOptimizer(...))``: the clip sees the unscaled gradient (its
    norm is that of the gradient divided by the scale), and an overflowing step is skipped by the
    loss-scale optimizer without reaching the clipper: ZClip's state and ``iterations`` stay,
    the scale halves."""
    clipping = ClippingOptimizer(keras.optimizers.SGD(0.1), gradclip.get("zclip", warmup_steps=1))
    scaled = keras.optimizers.LossScaleOptimizer(clipping, initial_scale=1024.0)
    variables = _variables()
    scaled.build(variables)
    grads = _grads(0)
    scaled.apply([g * 1024.0 for g in grads], variables)
    norm = float(np.sqrt(sum(np.sum(g.numpy().astype(np.float64) ** 2) for g in grads)))
    assert clipping.last_info().to_dict()["norm"] == pytest.approx(norm, rel=1e-6)
    state = clipping.clipper_state_dict()["state"]
    bad = [g * 1024.0 for g in grads]
    bad[0] = tf.fill(bad[0].shape, np.inf)
    scaled.apply(bad, variables)
    assert clipping.clipper_state_dict()["state"] == state and state["step"] == 1
    assert int(clipping.iterations.numpy()) == 1
    assert float(scaled.dynamic_scale.numpy()) == 512.0


def test_loss_scale_in_model_fit_equals_the_unscaled_run():
    want = _fit_small(ClippingOptimizer(keras.optimizers.SGD(0.1), gradclip.GlobalNorm(0.3)), 8)
    got = _fit_small(keras.optimizers.LossScaleOptimizer(ClippingOptimizer(keras.optimizers.SGD(0.1), gradclip.GlobalNorm(0.3))), 8)
    for a, b in zip(got.get_weights(), want.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_static_loss_scale_factor_is_taken_over():
    want = _fit_small(ClippingOptimizer(keras.optimizers.SGD(0.1), gradclip.GlobalNorm(0.3)), 8)
    optimizer = ClippingOptimizer(keras.optimizers.SGD(0.1, loss_scale_factor=128.0), gradclip.GlobalNorm(0.3))
    assert optimizer.loss_scale_factor == 128.0 and optimizer.inner_optimizer.loss_scale_factor is None
    got = _fit_small(optimizer, 8)
    for a, b in zip(got.get_weights(), want.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_nesting_and_accumulation_mistakes_are_refused():
    inner = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    with pytest.raises(gradclip.InvalidArgumentError, match=r"LossScaleOptimizer\(ClippingOptimizer"):
        ClippingOptimizer(inner, gradclip.GlobalNorm(1.0))
    built = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    built.build(_variables())
    with pytest.raises(gradclip.InvalidArgumentError, match="already built with gradient_accumulation_steps=2"):
        ClippingOptimizer(built, gradclip.GlobalNorm(1.0))
    assert built.gradient_accumulation_steps == 2  # nothing was changed


OTHER_BACKEND_CHILD = """
import json, sys
import numpy as np
import keras
sys.path.insert(0, "tests")
import gradclip
from gradclip.keras import ClippingOptimizer
from test_conformance import NONFINITE_AT, make_clipper, sequence

out = {"backend": keras.backend.backend(), "clippers": {}}
rng = np.random.default_rng(0)
x = rng.normal(size=(32, 6)).astype("float32")
y = rng.normal(size=(32, 2)).astype("float32") * 3
steps, params = sequence()
for name in gradclip.available():
    # The conformance sequence through optimizer.apply, against eager clip + SGD (numpy).
    optimizer = ClippingOptimizer(keras.optimizers.SGD(0.1), make_clipper(name))
    variables = [keras.Variable(p.astype("float32")) for p in params]
    reference, weights, worst = make_clipper(name), [p.astype("float32") for p in params], 0.0
    for grads in steps[:NONFINITE_AT]:
        grads = [g.astype("float32") for g in grads]
        clipped, info = reference.clip(grads, params=[w.copy() for w in weights])
        if not bool(info.skip):
            weights = [w - 0.1 * c for w, c in zip(weights, clipped)]
        optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
        worst = max([worst] + [float(np.max(np.abs(np.asarray(keras.ops.convert_to_numpy(v)) - w))) for v, w in zip(variables, weights)])
    # And model.fit, with accumulation over 2 batches.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(2)])
    fitted = ClippingOptimizer(keras.optimizers.SGD(0.05, gradient_accumulation_steps=2), make_clipper(name))
    model.compile(optimizer=fitted, loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    finite = all(bool(np.all(np.isfinite(w))) for w in model.get_weights())
    out["clippers"][name] = {"worst": worst, "iterations": int(keras.ops.convert_to_numpy(fitted.iterations)), "finite": finite}
try:
    import tensorflow as tf
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        ClippingOptimizer(keras.optimizers.SGD(0.1), gradclip.GlobalNorm(1.0))
    out["strategy"] = None
except gradclip.InvalidArgumentError as error:
    out["strategy"] = str(error)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_every_clipper_on_the_other_keras_backends(backend):
    """``KERAS_BACKEND=jax`` and ``torch`` (a subprocess each): every registered clipper through
    ``optimizer.apply`` equals eager clipping plus SGD step by step, and trains in ``model.fit``
    with ``gradient_accumulation_steps=2`` (2 optimizer steps from 4 batches); a tf.distribute
    strategy scope there is refused by name."""
    pytest.importorskip(backend)
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", OTHER_BACKEND_CHILD], env=env, capture_output=True, text=True,
                          timeout=280, cwd=root)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    assert out["backend"] == backend
    assert set(out["clippers"]) >= set(gradclip.available())
    for name, result in out["clippers"].items():
        assert result["worst"] < 1e-4, f"{backend} {name}: weights differ from eager clipping by {result['worst']}"
        assert result["iterations"] == 2 and result["finite"], f"{backend} {name}: {result}"
    assert "MirroredStrategy scope is active" in out["strategy"] and backend in out["strategy"]
