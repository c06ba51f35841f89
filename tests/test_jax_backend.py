"""The JAX backend: primitives against NumPy (fp64 with ``jax_enable_x64``), ``jax.jit`` and
``vmap``, pytrees of every kind, state kept on the object (and refused inside ``jit``), and the
errors for what JAX cannot do (in-place clipping, host reads under ``jit``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="the JAX backend needs jax")
jnp = pytest.importorskip("jax.numpy", reason="the JAX backend needs jax")

import gradclip  # noqa: E402
from gradclip._core.ops import get_ops  # noqa: E402
from gradclip.backends.jax import JaxOps  # noqa: E402
from _frameworks import convert, tolerance  # noqa: E402
from _ops_cases import CASES, case_ids, compare  # noqa: E402

CASE_PARAMS, CASE_IDS = case_ids()


def jx(array, dtype="float32"):
    return convert("jax", np.asarray(array, dtype=np.float64), dtype)


# -- primitives against the NumPy reference -------------------------------------------------------
@pytest.mark.parametrize("index,dtype", CASE_PARAMS, ids=CASE_IDS)
def test_primitive_matches_numpy(index, dtype):
    name, _dtypes, fn = CASES[index]
    expected = fn(get_ops([convert("numpy", [0.0], dtype)]), lambda a, d: convert("numpy", a, d), dtype)
    # fp64 needs jax_enable_x64; without it JAX's integers are 32-bit (accepted below).
    with jax.enable_x64(dtype == "float64"):
        result = fn(JaxOps([jx([0.0], dtype)]), lambda a, d: convert("jax", a, d), dtype)
        compare(result, expected, tolerance(dtype), name, x32=dtype != "float64")


# Host reads and Python ints ("scalar-math", "numel") are eager only: not traced.
_JIT_PARAMS = [(p, i) for p, i in zip(CASE_PARAMS, CASE_IDS)
               if p[1] == "float32" and CASES[p[0]][0] not in ("scalar-math", "numel")]


@pytest.mark.parametrize("index,dtype", [p for p, _ in _JIT_PARAMS], ids=[i for _, i in _JIT_PARAMS])
def test_primitive_under_jit_equals_eager(index, dtype):
    name, _dtypes, fn = CASES[index]
    eager = fn(JaxOps(), lambda a, d: convert("jax", a, d), dtype)
    compiled = jax.jit(lambda: fn(JaxOps(), lambda a, d: convert("jax", a, d), dtype))()
    compare(compiled, eager, 2e-7, name)


def test_uniform_with_x64_equals_numpy_for_64_bit_keys():
    shapes = [(3, 5), (7,)]
    with jax.enable_x64(True):
        for key, counter in [(2**40 + 5, 2**33 + 1), (2**62 - 1, 17)]:
            want = get_ops([], framework="numpy").uniform(np.asarray(key, np.int64), np.asarray(counter, np.int64), shapes)
            got = JaxOps().uniform(jnp.asarray(key, jnp.int64), jnp.asarray(counter, jnp.int64), shapes)
            for w, g in zip(want, got):
                np.testing.assert_array_equal(np.asarray(g), w)


def test_int64_beyond_int32_keeps_low_bits_without_x64():
    """A Subset key drawn below 2**62 still fits JAX's 32-bit integers (documented deviation)."""
    assert int(JaxOps().scalar(2**40 + 5, "int64")) == 5
    assert int(JaxOps().scalar(12345, "int64")) == 12345
    out, _ = gradclip.get("subset").clip([jx(np.full(8, 5.0))])  # random key, any size
    assert out[0].shape == (8,)


# -- clipping JAX arrays ------------------------------------------------------------------------------
def test_fp16_gradient_of_300_is_clipped_to_one_not_zero():
    grads, info = gradclip.GlobalNorm(1.0).clip([jx([300.0, 0.0], "float16")])
    assert grads[0].dtype == jnp.float16 and abs(float(grads[0][0]) - 1.0) < 1e-3
    assert info.norm.dtype == jnp.float32 and float(info.norm) == 300.0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_under_threshold_is_bit_for_bit_unchanged(dtype):
    g = [jx(np.linspace(-0.1, 0.1, 11), dtype), jx([[0.01, -0.02]], dtype)]
    for clipper in (gradclip.GlobalNorm(10.0), gradclip.Norm(10.0), gradclip.BlockRMS(10.0)):
        out, info = jax.jit(clipper.clip)(g)
        assert not bool(info.clipped) and float(info.coef) == 1.0
        for a, b in zip(out, g):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fp64_with_x64_accumulates_in_fp64():
    with jax.enable_x64(True):
        g = [jnp.asarray(np.array([3.0, 4.0]) * 1e150)]  # squares beyond fp32, within fp64
        out, info = gradclip.GlobalNorm(1.0, eps=0.0).clip(g)
        assert info.norm.dtype == jnp.float64 and float(info.norm) == pytest.approx(5e150)
        np.testing.assert_allclose(np.asarray(out[0]), [0.6, 0.8])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Dense:
    kernel: Any
    bias: Any


def test_pytrees_dicts_dataclass_nodes_and_none_leaves():
    grads = {"layer": Dense(jx(np.full((2, 2), 3.0)), jx([4.0, 0.0])), "head": [jx([0.0]), None]}
    out, info = gradclip.GlobalNorm(1.0, eps=0.0).clip(grads)
    assert isinstance(out["layer"], Dense) and out["head"][1] is None
    assert float(info.norm) == pytest.approx(math.sqrt(4 * 9 + 16))
    leaves = jax.tree_util.tree_leaves(out)
    assert math.sqrt(sum(float(jnp.sum(x * x)) for x in leaves)) == pytest.approx(1.0, rel=1e-6)
    # the same through jit, and the one-shot functions
    out2, _ = jax.jit(gradclip.GlobalNorm(1.0, eps=0.0).clip)(grads)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(out2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-7)
    assert float(gradclip.global_norm(grads)) == pytest.approx(math.sqrt(52.0))
    # AGC's exclude patterns see pytree paths as names
    names = gradclip._core.tree.flatten(grads)[2]
    assert names == ["layer.kernel", "layer.bias", "head#0", "head#1"]


def test_vmap_gives_per_example_clipping():
    clipper = gradclip.GlobalNorm(1.0, eps=0.0)
    state = clipper.init([jx([0.0, 0.0])])
    per_example = jax.vmap(lambda g: clipper.update([g], state)[0][0])
    batch = jx([[3.0, 4.0], [0.3, 0.4], [0.0, 10.0]])
    np.testing.assert_allclose(np.asarray(per_example(batch)), [[0.6, 0.8], [0.3, 0.4], [0.0, 1.0]], rtol=1e-6)


# -- state ---------------------------------------------------------------------------------------------
def test_stateful_clip_keeps_state_eagerly_and_refuses_inside_jit():
    if "zclip" not in gradclip.available():
        pytest.skip("needs the zclip clipper")
    clipper = gradclip.get("zclip", warmup_steps=2)
    for scale in (1.0, 1.1, 1.2):
        clipper.clip([jx([scale, 0.0])])
    assert clipper.state_dict()["state"]["step"] == 3
    with pytest.raises(gradclip.BackendError, match=r"inside jax.jit.*clipper.update.*as_optax"):
        jax.jit(gradclip.get("zclip").clip)([jx([1.0])])


def test_pure_update_is_jittable_and_state_is_a_pytree():
    if "zclip" not in gradclip.available():
        pytest.skip("needs the zclip clipper")
    clipper = gradclip.get("zclip", warmup_steps=2)
    state = clipper.init([jx([0.0, 0.0])])
    update = jax.jit(clipper.update)
    for scale in (1.0, 1.1, 30.0):
        out, new_state, info = update([jx([scale, 0.0])], state)
        assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
        assert [x.dtype for x in jax.tree_util.tree_leaves(new_state)] == [
            x.dtype for x in jax.tree_util.tree_leaves(state)
        ]
        state = new_state
    assert bool(info.clipped) and float(out[0][0]) < 30.0


# -- errors ----------------------------------------------------------------------------------------------
def test_clip_in_place_is_a_clear_error():
    with pytest.raises(gradclip.BackendError, match=r"immutable.*clipper\.clip\(grads\).*as_optax"):
        gradclip.GlobalNorm(1.0).clip_([jx([1.0, 2.0])])


def test_raise_policy_inside_jit_is_a_clear_error():
    bad = [jx([1.0, np.nan])]
    with pytest.raises(gradclip.NonFiniteError):
        gradclip.GlobalNorm(1.0, nonfinite="raise").clip(bad)
    with pytest.raises(gradclip.BackendError, match="inside jax.jit.*'skip' or 'zero'"):
        jax.jit(gradclip.GlobalNorm(1.0, nonfinite="raise").clip)(bad)


def test_skip_policy_under_jit():
    out, info = jax.jit(gradclip.GlobalNorm(1.0, nonfinite="skip").clip)([jx([3.0, np.nan]), jx([4.0])])
    assert bool(info.skip) and not bool(info.finite) and float(out[1][0]) == 4.0
