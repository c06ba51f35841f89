"""Edges of the core API a new user hit (each test fails on the code before its fix):

* ``AGC(exclude=...)`` excluded nothing under ``as_optax()``: optax leaves were named
  ``['head']['w']``, not ``head.w`` as ``clip()`` names them.
* A stateful clipper that had clipped could not be pickled (weak references in its memory of the
  last call): ``torch.save`` of an object holding one, multiprocessing and Ray failed.
* ``Subset`` reported a 2-norm ratio as the coefficient of a clipper measuring another p-norm.
* ``from_config`` let Python's bare ``TypeError`` out for an unknown or missing setting.
* A callable schedule returning NaN turned clipping off silently; ``-inf`` was accepted as a
  schedule value; ``step=2**70`` overflowed instead of being refused.
"""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest

import gradclip
from gradclip._core.registry import from_config
from gradclip._core.tree import path_name
from gradclip.schedules import Constant, Linear, Piecewise


def test_optax_leaves_are_named_as_clip_names_them():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    pytest.importorskip("optax")
    grads = {"enc": {"w": jnp.full((2, 3), 10.0)}, "head": {"w": jnp.full((2, 2), 10.0)}}
    params = {"enc": {"w": jnp.ones((2, 3))}, "head": {"w": jnp.ones((2, 2))}}
    clipped, _ = gradclip.AGC(0.1, exclude=("head.*",)).clip(grads, params=params)
    tx = gradclip.AGC(0.1, exclude=("head.*",)).as_optax()
    eager, _ = tx.update(grads, tx.init(params), params)
    jitted, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for out in (clipped, eager, jitted):
        np.testing.assert_array_equal(np.asarray(out["head"]["w"]), 10.0)  # excluded
        assert float(out["enc"]["w"][0, 0]) < 10.0  # clipped
    # The spelling of flatten(): keys joined by ".", positions as "#i".
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path({"a": [1.0, {"b": 2.0}], "c": 3.0})[0]]
    assert [path_name(p) for p in paths] == ["a#0", "a#1.b", "c"]
    assert path_name(()) == "#0"


def test_custom_pytree_nodes_are_named_with_the_same_spelling():
    # flatten() (clip, update) and the optax entry points name a dict or tuple inside a custom
    # node (a flax struct) alike: a name pattern matches the same leaf through either.
    jnp = pytest.importorskip("jax.numpy")
    struct = pytest.importorskip("flax.struct")
    from gradclip._core.tree import flatten

    @struct.dataclass
    class Params:
        w: object
        d: dict
        t: tuple

    tree = {"m": Params(jnp.ones(2), {"a": jnp.ones(1)}, (jnp.ones(1),))}
    assert flatten(tree)[2] == ["m.w", "m.d.a", "m.t#0"]
    clipper = gradclip.AGC(0.1, exclude=("m.d.*",))
    grads = {"m": Params(jnp.full(2, 10.0), {"a": jnp.full(1, 10.0)}, (jnp.full(1, 10.0),))}
    clipped, _ = clipper.clip(grads, params=tree)
    tx = gradclip.AGC(0.1, exclude=("m.d.*",)).as_optax()
    updated, _ = tx.update(grads, tx.init(tree), tree)
    for out in (clipped, updated):
        assert float(out["m"].d["a"][0]) == 10.0 and float(out["m"].w[0]) < 10.0


@pytest.mark.parametrize("name", ["zclip", "autoclip", "adagc", "quantile_norm", "skip_on_spike", "subset"])
def test_a_clipper_that_has_clipped_pickles_with_its_state(name):
    clipper = gradclip.get(name)
    grads = [np.full(4, 2.0, np.float32), np.full(3, -1.0, np.float32)]
    for scale in (1.0, 2.0, 3.0):
        clipper.clip([g * scale for g in grads])
    copied = pickle.loads(pickle.dumps(clipper))
    assert copied.state_dict() == clipper.state_dict()
    # Both continue identically from there.
    out_a, info_a = clipper.clip([g * 4.0 for g in grads])
    out_b, info_b = copied.clip([g * 4.0 for g in grads])
    for a, b in zip(out_a, out_b):
        np.testing.assert_array_equal(a, b)
    assert info_a.to_dict() == info_b.to_dict()
    assert copy.deepcopy(clipper).state_dict() == clipper.state_dict()


def test_a_clipper_holding_tensorflow_variables_refuses_pickling_by_name():
    tf = pytest.importorskip("tensorflow")
    clipper = gradclip.ZClip()
    clipper.clip([tf.ones(3)])
    with pytest.raises(TypeError, match="TensorFlow variables cannot be pickled; save clipper.state_dict"):
        pickle.dumps(clipper)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf])
def test_subset_reports_the_coefficient_in_the_wrapped_clippers_norm(norm_type):
    grads = [np.array([3.0, 4.0], np.float32), np.array([12.0], np.float32)]
    out_a, bare = gradclip.GlobalNorm(1.0, norm_type=norm_type).clip(grads)
    out_b, subset = gradclip.Subset(gradclip.GlobalNorm(1.0, norm_type=norm_type), 1.0, seed=0).clip(grads)
    for a, b in zip(out_a, out_b):
        np.testing.assert_array_equal(a, b)
    assert float(subset.coef) == pytest.approx(float(bare.coef), rel=1e-6)


@pytest.mark.parametrize(
    "spec, error, pattern",
    [
        ({"clipper": "zclip", "config": {"bogus": 2}}, gradclip.UnknownNameError, r"from_config: 'zclip' \(ZClip\) has no argument 'bogus'"),
        ({"clipper": "global_norm", "config": {}}, gradclip.InvalidArgumentError, r"from_config: 'global_norm' \(GlobalNorm\) needs 'max_norm'"),
        ({"clipper": "chain", "config": {"clippers": [{"clipper": "global_norm", "config": {"max_norm": 1.0, "extra": 0}}]}},
         gradclip.UnknownNameError, "has no argument 'extra'"),
        ({"clipper": "subset", "config": {"clipper": {"clipper": "value", "config": {"nope": 1}}, "fraction": 0.5}},
         gradclip.UnknownNameError, "'value' .* has no argument 'nope'"),
    ],
)
def test_from_config_refuses_bad_settings_with_gradclip_errors(spec, error, pattern):
    with pytest.raises(error, match=pattern):
        from_config(spec)


def test_from_config_still_rebuilds_every_registered_clipper_and_chains():
    for name in gradclip.available():
        clipper = gradclip.get(name)
        assert from_config({"clipper": name, "config": clipper.config()}).config() == clipper.config()
    chain = gradclip.chain(gradclip.NonFinite("zero"), gradclip.GlobalNorm(1.0))
    assert from_config({"clipper": "chain", "config": chain.config()}).config() == chain.config()


def test_a_callable_schedule_returning_nan_is_refused():
    clipper = gradclip.GlobalNorm(lambda step: float("nan"))
    grads = [np.full(4, 100.0, np.float32)]
    with pytest.raises(gradclip.InvalidArgumentError, match="returned NaN at step 0"):
        clipper.clip(grads)
    np.testing.assert_array_equal(grads[0], 100.0)


@pytest.mark.parametrize("make", [lambda: Constant(-math.inf), lambda: Linear(-math.inf, 1.0, 10),
                                  lambda: Piecewise([5], [1.0, -math.inf])])
def test_schedule_values_must_be_finite_on_both_sides(make):
    with pytest.raises(gradclip.InvalidArgumentError, match=r"must be in \(-inf, inf\), got -inf"):
        make()
