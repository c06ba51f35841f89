"""Defects a new user found at the edges of the integrations, each pinned by a test.

* ``ClippingOptimizer`` with a schedule threshold (alone, in a chain, in a ``Subset``) survives
  ``model.save``/``load_model``: the same config, clipper state and next training step.
* optax's clipping drop-ins (``gradclip.optax.clip_by_global_norm``, ``clip``,
  ``clip_by_block_rms``, ``adaptive_grad_clip``) refuse integer, bool and ``float0`` update
  leaves with gradclip's ``BackendError`` naming the leaf (eagerly and when ``jax.jit`` traces),
  and refuse arguments optax would fail on only at ``update`` (a string, None, a schedule) when
  they are built.
* ``gradclip.get`` refuses an unknown keyword with ``UnknownNameError``, not a bare ``TypeError``.
* ``float0`` gradients (``jax.grad(..., allow_int=True)``) reaching ``clipper.clip`` or
  ``as_optax()`` are refused by name, not with NumPy's "setting an array element with a
  sequence".
"""

from __future__ import annotations

import numpy as np
import pytest

import gradclip
from gradclip._core.checkpoint import plain_config
from gradclip.schedules import CosineDecay, Linear

# -- gradclip.get: unknown keywords -------------------------------------------------------------


def test_get_refuses_an_unknown_keyword_with_a_gradclip_error():
    with pytest.raises(gradclip.UnknownNameError, match=r"'global_norm' \(GlobalNorm\) has no argument 'foo'; its arguments: max_norm, norm_type, eps, nonfinite, process_group"):
        gradclip.get("global_norm", foo=1)
    with pytest.raises(gradclip.UnknownNameError, match=r"has no arguments 'foo', 'bar'"):
        gradclip.get("zclip", foo=1, bar=2)
    # What every caller catching a bad argument catches (the spec parser: InvalidArgumentError),
    # and Python's own TypeError for an unexpected keyword (tests/test_bad_input.py).
    with pytest.raises(gradclip.InvalidArgumentError):
        gradclip.get("global_norm", foo=1)
    with pytest.raises(TypeError, match="foo"):
        gradclip.get("global_norm", foo=1)
    # Valid keywords, defaults and process_group still pass.
    assert gradclip.get("global_norm", max_norm=2.0, process_group=None).max_norm == 2.0
    assert gradclip.get("value", clip_value=2.0).config() == {"min_value": -2.0, "max_value": 2.0}


def test_every_registered_method_still_builds_from_its_defaults_and_refuses_unknown_keywords():
    for name in gradclip.available():
        gradclip.get(name)
        with pytest.raises(gradclip.UnknownNameError, match=f"{name!r}.*no argument 'not_an_argument'"):
            gradclip.get(name, not_an_argument=1)


def test_a_spec_with_an_unknown_parameter_is_still_refused():
    from gradclip.experiments.spec import parse_spec

    with pytest.raises(gradclip.InvalidArgumentError, match="foo"):
        parse_spec("global_norm:foo=1")


# -- JAX and optax ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jo():
    jax = pytest.importorskip("jax", reason="needs jax")
    optax = pytest.importorskip("optax", reason="needs optax")
    import gradclip.optax as gco

    return jax, optax, gco


def _dropins(gco):
    return {
        "clip_by_global_norm": gco.clip_by_global_norm,
        "clip": gco.clip,
        "clip_by_block_rms": gco.clip_by_block_rms,
        "adaptive_grad_clip": gco.adaptive_grad_clip,
    }


DROPINS = ["clip_by_global_norm", "clip", "clip_by_block_rms", "adaptive_grad_clip"]


@pytest.mark.parametrize("name", DROPINS)
@pytest.mark.parametrize("dtype", ["int32", "bool", "uint8"])
def test_dropins_refuse_integer_and_bool_leaves(jo, name, dtype):
    """optax.clip_by_global_norm raises a TypeError on such a leaf; optax.clip,
    clip_by_block_rms and adaptive_grad_clip turn it into a float (documented deviation): every
    drop-in refuses it, eagerly and when jax.jit traces, with nothing computed."""
    jax, _optax, gco = jo
    jnp = jax.numpy
    updates = {"w": jnp.array([3.0, 4.0, 0.0]), "count": jnp.array(5).astype(dtype)}
    params = {"w": jnp.ones(3), "count": jnp.array(2).astype(dtype)}
    tx = _dropins(gco)[name](1.0)
    state = tx.init(params)
    message = rf"{name}: update leaf count has dtype {dtype}, not floating point.*optax.masked"
    with pytest.raises(gradclip.BackendError, match=message):
        tx.update(updates, state, params)
    with pytest.raises(gradclip.BackendError, match=message):
        jax.jit(tx.update)(updates, state, params)
    assert issubclass(gradclip.BackendError, TypeError)  # what optax raises for clip_by_global_norm


def test_dropin_int_leaf_repro_and_masking_it_out(jo):
    jax, optax, gco = jo
    jnp = jax.numpy
    updates = {"w": jnp.array([3.0, 4.0, 0.0]), "count": jnp.array(5, jnp.int32)}
    with pytest.raises(TypeError):  # optax refuses it too
        optax.clip_by_global_norm(1.0).update(updates, None)
    # The way out the message names: optax.masked leaves the integer leaf alone.
    tx = optax.masked(gco.clip_by_global_norm(1.0), {"w": True, "count": False})
    out, _ = tx.update(updates, tx.init(updates))
    np.testing.assert_allclose(np.asarray(out["w"]), [0.6, 0.8, 0.0], rtol=1e-6)
    assert int(out["count"]) == 5 and out["count"].dtype == jnp.int32


def test_dropins_still_take_floating_and_complex_leaves(jo):
    jax, optax, gco = jo
    jnp = jax.numpy
    updates = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0], jnp.bfloat16), "c": jnp.array([1 + 1j], jnp.complex64)}
    for name in ("clip_by_global_norm", "clip_by_block_rms"):
        ours, _ = _dropins(gco)[name](1.0).update(updates, None)
        theirs, _ = getattr(optax, name)(1.0).update(updates, None)
        for key in updates:
            np.testing.assert_allclose(np.asarray(ours[key], np.complex64), np.asarray(theirs[key], np.complex64), rtol=1e-2)


@pytest.mark.parametrize("name", DROPINS)
def test_dropins_refuse_float0_leaves(jo, name):
    """optax's transformations raise a TypeError on float0 too ("Called square with a float0
    array"): gradclip says what the leaf is and what to do."""
    jax, _optax, gco = jo
    jnp = jax.numpy
    params = {"w": jnp.ones(3), "step": jnp.array(3, jnp.int32)}
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2), allow_int=True)(params)
    tx = _dropins(gco)[name](1.0)
    message = rf"{name}: update leaf step has dtype float0, the empty gradient jax.grad\(..., allow_int=True\)"
    with pytest.raises(gradclip.BackendError, match=message):
        tx.update(grads, tx.init(params), params)
    with pytest.raises(gradclip.BackendError, match=message):
        jax.jit(tx.update)(grads, tx.init(params), params)


ARGUMENTS = {"clip_by_global_norm": "max_norm", "clip": "max_delta", "clip_by_block_rms": "threshold", "adaptive_grad_clip": "clipping"}


@pytest.mark.parametrize("name", DROPINS)
def test_dropins_refuse_bad_arguments_when_built(jo, name):
    jax, optax, gco = jo
    jnp = jax.numpy
    build, argument = _dropins(gco)[name], ARGUMENTS[name]
    for bad in ("1", None, True, [1.0], jnp.array(1 + 1j), jnp.array(True)):
        with pytest.raises(gradclip.InvalidArgumentError, match=rf"{name}: {argument} must be a real number, got .*valid: a number >= 0"):
            build(bad)
    for bad in (-1.0, float("nan"), np.float32(-1.0), jnp.float32(-1.0), jnp.array([1.0, float("nan")])):
        with pytest.raises(gradclip.InvalidArgumentError, match=rf"{name}: {argument} must"):
            build(bad)
    with pytest.raises(gradclip.InvalidArgumentError, match="take no schedule.*inject_hyperparams"):
        build(optax.linear_schedule(1.0, 0.1, 10))
    if name == "adaptive_grad_clip":
        with pytest.raises(gradclip.InvalidArgumentError, match="adaptive_grad_clip: eps must"):
            build(1.0, eps="0.001")
    # What optax takes still builds and runs: numbers, NumPy and JAX scalars and arrays.
    params = {"w": jnp.full((3,), 2.0)}
    for good in (1, 1.0, float("inf"), np.float32(1.0), jnp.float32(1.0), jnp.array(1.0, jnp.bfloat16)):
        tx = build(good)
        out, _ = tx.update({"w": jnp.array([3.0, 4.0, 0.0])}, tx.init(params), params)
        assert np.all(np.isfinite(np.asarray(out["w"])))


def test_inject_hyperparams_still_works_eagerly_and_under_jit(jo):
    """inject_hyperparams builds the drop-in inside update, with concrete arrays eagerly and
    tracers under jax.jit (taken as given)."""
    jax, optax, gco = jo
    jnp = jax.numpy
    tx = optax.inject_hyperparams(gco.clip_by_global_norm)(max_norm=optax.linear_schedule(1.0, 2.0, 3))
    updates = {"w": jnp.array([3.0, 4.0])}
    state = tx.init(updates)
    eager, _ = tx.update(updates, state)
    jitted, _ = jax.jit(tx.update)(updates, state)
    np.testing.assert_allclose(np.asarray(eager["w"]), [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jitted["w"]), [0.6, 0.8], rtol=1e-6)


def test_clip_and_as_optax_refuse_float0_gradients(jo):
    jax, optax, _gco = jo
    jnp = jax.numpy
    params = {"w": jnp.ones(3), "step": jnp.array(3, jnp.int32)}
    grad = jax.grad(lambda p: jnp.sum(p["w"] ** 2), allow_int=True)
    message = r"has dtype float0, the empty gradient jax.grad\(..., allow_int=True\).*Nothing was changed"
    with pytest.raises(gradclip.BackendError, match=r"GlobalNorm.clip: gradient #0 " + message):
        gradclip.GlobalNorm(1.0).clip(grad(params))
    with pytest.raises(gradclip.BackendError, match=message):  # traced inside jax.jit
        jax.jit(lambda p: gradclip.GlobalNorm(1.0).clip(grad(p)))(params)
    with pytest.raises(TypeError):  # optax's own transformation raises on float0 too
        optax.clip_by_global_norm(1.0).update(grad(params), None)
    float_params = {"w": jnp.ones(3), "step": jnp.array(3.0)}
    for clipper in (gradclip.GlobalNorm(1.0), gradclip.ZClip()):
        tx = clipper.as_optax()
        state = tx.init(float_params)
        where = rf"{type(clipper).__name__}.as_optax\(\).update: gradient step "
        with pytest.raises(gradclip.BackendError, match=where + message):
            tx.update(grad(params), state)
        with pytest.raises(gradclip.BackendError, match=where + message):
            jax.jit(tx.update)(grad(params), state)
    # The floating-point part alone clips as before.
    clipped, info = gradclip.GlobalNorm(1.0).clip({"w": grad(params)["w"]})
    np.testing.assert_allclose(float(info.norm), np.sqrt(12.0), rtol=1e-6)


# -- Keras: schedules survive model.save -------------------------------------------------------


@pytest.fixture(scope="module")
def keras_tf():
    pytest.importorskip("tensorflow", reason="the Keras adapter is tested on the TensorFlow backend")
    keras = pytest.importorskip("keras", reason="needs keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("KERAS_BACKEND is not tensorflow")
    return keras


def _scheduled_clippers():
    return {
        "global_norm": gradclip.GlobalNorm(Linear(init_value=10.0, end_value=0.05, transition_steps=5)),
        "chain": gradclip.chain(
            gradclip.Value(clip_value=float("inf")), gradclip.GlobalNorm(CosineDecay(1.0, 10, 0.05))
        ),
        "subset": gradclip.Subset(gradclip.GlobalNorm(Linear(1.0, 0.05, 4)), fraction=0.5, seed=3),
    }


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # keras' model.save
@pytest.mark.parametrize("kind", ["global_norm", "chain", "subset"])
def test_keras_model_with_a_schedule_threshold_saves_and_loads(keras_tf, kind, tmp_path):
    """The repro: ``model.save`` raised ``TypeError: Cannot serialize object Linear(...)``.
    The config now holds the schedule as its settings (what ``state_dict()`` holds), and the
    loaded model has the same config and clipper state and takes the same next step."""
    keras = keras_tf
    from gradclip.keras import ClippingOptimizer

    clipper = _scheduled_clippers()[kind]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer=ClippingOptimizer(keras.optimizers.SGD(0.05), clipper), loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 4)).astype(np.float32), rng.normal(size=(16, 2)).astype(np.float32) * 5
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    config = model.optimizer.get_config()
    assert config["clipper"] == {"clipper": clipper.name, "config": plain_config(clipper.config())}
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, ClippingOptimizer)
    assert plain_config(loaded.optimizer.clipper.config()) == plain_config(clipper.config())
    assert loaded.optimizer.get_config()["clipper"] == config["clipper"]
    state = model.optimizer.clipper_state_dict()
    assert loaded.optimizer.clipper_state_dict() == state
    # The next step: same weights and the same schedule position in both.
    model.train_on_batch(x[:8], y[:8])
    loaded.train_on_batch(x[:8], y[:8])
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert loaded.optimizer.clipper_state_dict() == model.optimizer.clipper_state_dict()
    np.testing.assert_allclose(
        loaded.optimizer.last_info().to_dict()["threshold"], model.optimizer.last_info().to_dict()["threshold"]
    )


def test_keras_config_round_trip_of_a_schedule_without_saving(keras_tf):
    keras = keras_tf
    from gradclip.keras import ClippingOptimizer

    for clipper in _scheduled_clippers().values():
        optimizer = ClippingOptimizer(keras.optimizers.Adam(1e-3), clipper)
        clone = ClippingOptimizer.from_config(optimizer.get_config())
        assert plain_config(clone.clipper.config()) == plain_config(clipper.config())
        assert clone.clipper.state_dict() == clipper.state_dict()
