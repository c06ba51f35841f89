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
