"""Sharded JAX: global norms of arrays sharded across two host CPU devices equal the unsharded ones.

``XLA_FLAGS=--xla_force_host_platform_device_count=2`` must be set before jax initialises, so the
check runs in a subprocess (this test process may already have jax loaded with one device). The
child shards every gradient's first axis over a 1-D mesh of the two devices and compares, under
``jax.jit`` and eagerly: ``gradclip.global_norm``, ``GlobalNorm.clip``, ``Norm.clip`` and
``as_optax()`` in an ``optax.chain``, against the same computations on unsharded arrays and a
float64 NumPy reference. It also checks that the clipped gradients keep their sharding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("jax", reason="sharding needs jax")
pytest.importorskip("optax", reason="the optax part needs optax")

CHILD = textwrap.dedent(
    """
    import json
    import numpy as np
    import jax, jax.numpy as jnp, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import gradclip

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("x",))
    rng = np.random.default_rng(0)
    host = [rng.normal(size=s).astype(np.float32) * 3 for s in [(8, 6), (10,), (4, 4, 2), (6, 3)]]
    host[3] *= 1e3  # one large tensor: the clip is active
    sharding = NamedSharding(mesh, P("x"))
    sharded = [jax.device_put(h, sharding) for h in host]
    plain = [jnp.asarray(h) for h in host]
    reference = float(np.sqrt(sum(np.sum(h.astype(np.float64) ** 2) for h in host)))

    out = {"devices": len(devices), "reference": reference,
           "shards": [len(s.addressable_shards) for s in sharded]}
    norm = jax.jit(gradclip.global_norm)
    out["jit_sharded"] = float(norm(sharded))
    out["jit_plain"] = float(norm(plain))
    out["eager_sharded"] = float(gradclip.global_norm(sharded))
    out["inf_sharded"] = float(jax.jit(lambda g: gradclip.global_norm(g, norm_type="inf"))(sharded))
    out["inf_reference"] = float(max(np.abs(h).max() for h in host))

    clip = jax.jit(gradclip.GlobalNorm(1.0, eps=0.0).clip)
    clipped_s, info_s = clip(sharded)
    clipped_p, info_p = clip(plain)
    out["clip_norm_sharded"] = float(info_s.norm)
    out["clip_max_diff"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(clipped_s, clipped_p))
    out["clipped_norm_after"] = float(np.sqrt(sum(np.sum(np.asarray(c, np.float64) ** 2) for c in clipped_s)))
    out["sharding_kept"] = all(c.sharding.is_equivalent_to(sharding, c.ndim) for c in clipped_s)

    per_s, _ = jax.jit(gradclip.Norm(1.0).clip)(sharded)
    per_p, _ = jax.jit(gradclip.Norm(1.0).clip)(plain)
    out["norm_max_diff"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(per_s, per_p))

    tx = optax.chain(gradclip.GlobalNorm(1.0).as_optax(), optax.sgd(0.1))
    state_s = tx.init(sharded)
    updates_s, state_s = jax.jit(tx.update)(sharded, state_s, sharded)
    updates_p, state_p = jax.jit(tx.update)(plain, tx.init(plain), plain)
    from gradclip.optax import clip_info
    out["optax_norm_sharded"] = float(clip_info(state_s).norm)
    out["optax_max_diff"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(updates_s, updates_p))
    print("RESULT " + json.dumps(out))
    """
)


def test_global_norm_of_sharded_arrays_equals_unsharded():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=240, cwd=root
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert out["devices"] == 2 and out["shards"] == [2, 2, 2, 2]
    rel = 2e-6
    for key in ("jit_sharded", "jit_plain", "eager_sharded", "clip_norm_sharded", "optax_norm_sharded"):
        assert out[key] == pytest.approx(out["reference"], rel=rel), key
    assert out["jit_sharded"] == pytest.approx(out["jit_plain"], rel=1e-6)
    assert out["inf_sharded"] == out["inf_reference"]
    assert out["clipped_norm_after"] == pytest.approx(1.0, rel=1e-5)
    assert out["sharding_kept"]
    assert out["clip_max_diff"] < 1e-6 and out["norm_max_diff"] < 1e-6 and out["optax_max_diff"] < 1e-7


MAPPED_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import jax, jax.numpy as jnp, optax
    from jax import lax
    from jax.sharding import Mesh, PartitionSpec as P
    sys.path.insert(0, "tests")
    import gradclip, gradclip.optax as gco
    from test_conformance import make_clipper

    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(1)
    # Sorted keys: shard_map rebuilds dicts in sorted order, and tensor positions must agree.
    grads = {"a_bias": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
             "b_kernel": jnp.asarray(rng.normal(size=(8, 5)) * 4, jnp.float32),
             "c_conv": jnp.asarray(rng.normal(size=(4, 3, 3)), jnp.float32)}
    params = jax.tree_util.tree_map(lambda g: g * 0.5 + 1.0, grads)
    out = {"devices": len(jax.devices()), "clippers": {}}

    def leaves(t):
        return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(t)]

    def compare(want, got):  # largest difference, relative where the values exceed 1
        return max([float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(a)))) for a, b in zip(leaves(want), leaves(got))] or [0.0])

    steps = [jax.tree_util.tree_map(lambda g, s=s: g * s, grads) for s in (1.0, 1.2, 0.9, 30.0)]
    for name in gradclip.available():
        # AGC with JAX's own layout (units on the last axis): every device holds part of every
        # unit (the conformance suite's axis=0 would put whole, different units on each device).
        clipper = make_clipper(name, axis=None) if name == "agc" else make_clipper(name)
        state = clipper.init(grads)
        mapped = jax.jit(jax.shard_map(
            lambda g, p, s: clipper.update(g, s, params=p, axis_name="data"),
            mesh=mesh, in_specs=(P("data"), P("data"), P()), out_specs=(P("data"), P(), P())))
        ref_state, got_state, diffs, infos = state, state, [], []
        for g in steps:
            want, ref_state, want_info = clipper.update(g, ref_state, params=params)
            got, got_state, got_info = mapped(g, params, got_state)
            diffs.append(compare(want, got))
            infos.append([float(want_info.norm), float(got_info.norm), bool(want_info.clipped), bool(got_info.clipped)])
        out["clippers"][name] = {"diff": max(diffs), "infos": infos, "state": compare(ref_state, got_state)}

    # pmap: every leaf split along the mapped axis; inf norm through pmax.
    shards = jax.tree_util.tree_map(lambda x: x.reshape((4, -1) + x.shape[1:]), grads)
    for norm_type in (2.0, float("inf")):
        c = gradclip.GlobalNorm(1.0, norm_type=norm_type)
        norms = jax.pmap(lambda g: c.update(g, c.init(g), axis_name="i")[2].norm, axis_name="i")(shards)
        out[f"pmap_{norm_type}"] = [np.asarray(norms).tolist(), float(gradclip.global_norm(grads, norm_type=norm_type))]

    # A replicated leaf (P()) is whole on every device: counted once, not four times.
    c = gradclip.GlobalNorm(1.0)
    mixed = jax.jit(jax.shard_map(lambda a, b: c.update({"a": a, "b": b}, c.init({"a": a, "b": b}), axis_name="data")[2].norm,
                                  mesh=mesh, in_specs=(P("data"), P()), out_specs=P()))
    out["replicated"] = [float(mixed(grads["b_kernel"], grads["a_bias"])),
                         float(gradclip.global_norm([grads["b_kernel"], grads["a_bias"]]))]

    # ZeRO-style data parallel step: per-device batches, psum_scatter, clip the shards with
    # as_optax(axis_name) inside optax.chain, against one device on the whole batch.
    w = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 2)) * 5, jnp.float32)
    loss = lambda w, x, y: jnp.mean(jnp.sum((x @ w - y) ** 2, axis=1))
    tx = optax.chain(gradclip.ZClip(warmup_steps=1, z_thresh=0.5, max_grad_norm=0.5).as_optax(axis_name="data"), optax.sgd(0.1))
    ref_tx = optax.chain(gradclip.ZClip(warmup_steps=1, z_thresh=0.5, max_grad_norm=0.5).as_optax(), optax.sgd(0.1))

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P("data"), P("data"), P("data"), P()), out_specs=(P("data"), P()))
    def step(w_slice, x, y, state):
        w_full = lax.all_gather(w_slice, "data", tiled=True)
        g = lax.psum_scatter(jax.grad(loss)(w_full, x, y), "data", tiled=True) / 4  # this device's slice of the mean
        updates, state = tx.update(g, state)
        return w_slice + updates, state

    state, ref_state, ref_w = tx.init(w), ref_tx.init(w), w
    for _ in range(3):
        w, state = step(w, x, y, state)
        updates, ref_state = ref_tx.update(jax.grad(loss)(ref_w, x, y), ref_state)
        ref_w = ref_w + updates
    out["zero"] = {"diff": compare(ref_w, w), "norm": [float(gco.clip_info(state).norm), float(gco.clip_info(ref_state).norm)],
                   "clipped": bool(gco.clip_info(ref_state).clipped)}

    def refused(fn):
        try:
            fn()
        except gradclip.InvalidArgumentError as error:
            return str(error)
        return None

    out["unbound"] = refused(lambda: jax.jit(jax.shard_map(lambda g: c.update(g, c.init(g), axis_name="model")[2].norm,
                                                   mesh=mesh, in_specs=P("data"), out_specs=P()))(grads))
    out["no_axis"] = refused(lambda: jax.jit(jax.shard_map(lambda g: c.update(g, c.init(g))[2].norm,
                                                   mesh=mesh, in_specs=P("data"), out_specs=P()))(grads))
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def mapped():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", MAPPED_CHILD], env=env, capture_output=True, text=True, timeout=280, cwd=root)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_every_clipper_under_shard_map_with_axis_name_equals_unsharded(mapped):
    """Each leaf split over 4 devices (its first axis), ``clipper.update(..., axis_name="data")``
    inside ``shard_map`` for four steps (the last a spike): the clipped gradients, the norm, the
    clipped flag and the final state equal the unsharded run's, for every registered clipper."""
    assert mapped["devices"] == 4
    for name, result in mapped["clippers"].items():
        assert result["diff"] < 2e-5, name
        assert result["state"] < 1e-4, name
        for want_norm, got_norm, want_clipped, got_clipped in result["infos"]:
            assert got_norm == pytest.approx(want_norm, rel=1e-5), name
            assert got_clipped == want_clipped, name


def test_pmap_psum_and_pmax(mapped):
    for key in ("pmap_2.0", "pmap_inf"):
        norms, want = mapped[key]
        assert norms == pytest.approx([want] * 4, rel=1e-6), key


def test_replicated_leaf_counted_once(mapped):
    got, want = mapped["replicated"]
    assert got == pytest.approx(want, rel=1e-6)


def test_zero_style_data_parallel_step_with_as_optax(mapped):
    """psum_scatter'd gradient slices clipped with ``as_optax(axis_name="data")`` inside
    ``optax.chain`` give the weights one device gets on the whole batch, with the same norm."""
    zero = mapped["zero"]
    assert zero["diff"] < 1e-5 and zero["clipped"]
    assert zero["norm"][0] == pytest.approx(zero["norm"][1], rel=1e-5)


def test_unbound_axis_and_unreduced_shards_are_refused(mapped):
    assert "axis 'model' is not bound here" in mapped["unbound"] and "'data'" in mapped["unbound"]
    assert "varies along the mapped axis ['data']" in mapped["no_axis"] and "axis_name=None" in mapped["no_axis"]


def test_axis_name_bad_input_in_process():
    import jax.numpy as jnp
    import numpy as np

    import gradclip

    grads = [jnp.ones((3,))]
    clipper = gradclip.GlobalNorm(1.0)
    with pytest.raises(gradclip.InvalidArgumentError, match="axis 'data' is not bound here.*not inside jax.pmap"):
        clipper.update(grads, clipper.init(grads), axis_name="data")
    with pytest.raises(gradclip.InvalidArgumentError, match="axis_name must be"):
        clipper.as_optax(axis_name=3)
    with pytest.raises(gradclip.InvalidArgumentError, match="axis_name must be"):
        clipper.update(grads, clipper.init(grads), axis_name=("data", "data"))
    with pytest.raises(gradclip.BackendError, match="axis_name= names a JAX mapped axis.*numpy"):
        clipper.update([np.ones(3)], (), axis_name="data")
