"""A clipper written against the contract, in this file alone, gets everything the library offers.

``TwiceTheMean`` below is a complete adaptive method in ~40 lines: it declares its state and
implements ``init_state`` and ``decide`` (``measure`` and ``apply`` are the generic ones). With no
change anywhere else it works through ``clip_`` (torch, in place), ``clip`` (NumPy, TensorFlow,
JAX), the pure ``init``/``update``, ``as_optax`` under ``jax.jit``, Keras' ``model.fit`` through
``ClippingOptimizer``, ``ClippedOptimizer``'s fold into a fused AdamW step, checkpoints (JSON,
nested in a chain), ``from_config`` — and, once registered, the registry-driven conformance suite
(every backend and dtype against the NumPy reference, compiled paths, state round trips).
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import numpy as np
import pytest
import test_conformance as conformance
from _frameworks import BACKENDS, DTYPES

import gradclip
from gradclip._core import registry
from gradclip._core.clipper import make_info
from gradclip._core.contract import NO_SIGNALS, Decision
from gradclip._core.measure import check_policy, settle
from gradclip._core.ops import accumulation
from gradclip._core.validation import check_number
from gradclip.clippers._adaptive import check_field, fp32_finite

NAME = "twice_the_mean"


class TwiceTheMeanState(NamedTuple):
    count: Any  # int64 0-d: finite norms seen
    mean: Any  # fp32 0-d: their running mean


class TwiceTheMean(gradclip.Clipper):
    """Clip the global norm at ``factor`` times the mean of the finite norms seen before."""

    state_type = TwiceTheMeanState
    state_dtypes = {"count": "int64", "mean": "float32"}

    def __init__(self, factor: float = 2.0, nonfinite: str = "propagate"):
        super().__init__()
        self.factor = check_number("TwiceTheMean", "factor", factor, low=0.0, low_inclusive=False)
        self.nonfinite = check_policy("TwiceTheMean", nonfinite)

    def init_state(self, ops, grads):
        return TwiceTheMeanState(ops.scalar(0, "int64"), ops.scalar(0.0, "float32"))

    def decide(self, ops, measured, state, signals=NO_SIGNALS):
        norm, finite = measured.norm, measured.finite
        acc = accumulation(norm)
        bound = ops.where(state.count > 0, state.mean * self.factor, ops.scalar(math.inf, "float32"))
        threshold = ops.cast(bound, acc)
        coef, skip = settle(ops, ops.clip_coefficient(norm, threshold, 1e-6), finite, self.nonfinite)
        accept = fp32_finite(ops, norm, finite)
        x = ops.where(accept, ops.cast(norm, "float32"), ops.scalar(0.0, "float32"))
        count = state.count + ops.cast(accept, "int64")
        total = state.mean * ops.cast(state.count, "float32") + x
        mean = ops.where(accept, total / ops.cast(ops.maximum(count, ops.scalar(1, "int64")), "float32"), state.mean)
        info = make_info(ops, norm, threshold, coef, coef < 1, measured.given_finite, skip)
        return Decision(coef, TwiceTheMeanState(count, mean), info)

    def validate_state(self, where, state):
        check_field(where, state, "count", "int", low=0)
        check_field(where, state, "mean", "float", low=0.0)


@pytest.fixture
def registered():
    """Register the clipper for one test only (the rest of the suite sees the built-ins)."""
    registry.register(NAME)(TwiceTheMean)
    yield NAME
    registry._REGISTRY.pop(NAME, None)


def _norms(grads):
    return math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads))


# -- the conformance suite, driven through the registry ----------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
def test_every_backend_and_dtype_matches_the_numpy_reference(registered, backend, dtype):
    conformance.test_backend_matches_numpy_reference(registered, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_round_trips_on_every_backend(registered, backend):
    conformance.test_state_round_trip(registered, backend)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_paths_equal_eager(registered, dtype):
    conformance.test_tf_function_equals_eager(registered, dtype)
    conformance.test_jax_jit_equals_eager(registered, dtype)


# -- the front ends ------------------------------------------------------------------------------------
def test_the_stateful_api_clips_and_advances_as_the_rule_says():
    clipper = TwiceTheMean()
    first, info = clipper.clip([np.array([3.0, 4.0], np.float32)])
    assert not info.to_dict()["clipped"] and np.allclose(first[0], [3.0, 4.0])
    _, info = clipper.clip([np.array([30.0, 40.0], np.float32)])
    assert info.to_dict()["clipped"] and info.to_dict()["threshold"] == pytest.approx(10.0)
    assert clipper.state_dict()["state"] == {"count": 2, "mean": pytest.approx(27.5)}
    with pytest.raises(gradclip.InvalidArgumentError, match="factor"):
        TwiceTheMean(factor=-1.0)


def test_torch_clip_in_place_and_the_repeat_guard():
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 2)
    clipper = TwiceTheMean()
    for scale in (1.0, 50.0):
        model.zero_grad()
        (model(torch.ones(4, 3)).sum() * scale).backward()
        before = _norms([p.grad.numpy() for p in model.parameters()])
        info = clipper.clip_(model)
    after = _norms([p.grad.numpy() for p in model.parameters()])
    assert bool(info.clipped) and after == pytest.approx(2 * before / 50.0, rel=1e-5)
    with pytest.raises(gradclip.StateError, match="called again"):
        clipper.clip_(model)


def test_checkpoints_alone_and_inside_a_chain_resume_exactly():
    grads = [[np.full(3, float(s + 1), np.float32)] for s in range(4)]
    whole = gradclip.chain(gradclip.NonFinite("skip"), TwiceTheMean())
    for g in grads[:2]:
        whole.clip(g)
    saved = json.loads(json.dumps(whole.state_dict()))
    resumed = gradclip.chain(gradclip.NonFinite("skip"), TwiceTheMean())
    resumed.load_state_dict(saved)
    for g in grads[2:]:
        a, info_a = whole.clip(g)
        b, info_b = resumed.clip(g)
        np.testing.assert_array_equal(a[0], b[0])
        assert info_a.to_dict() == info_b.to_dict()
    bad = json.loads(json.dumps(saved))
    bad["state"]["links"][1]["state"]["mean"] = -1.0
    with pytest.raises(gradclip.StateError, match="mean"):
        resumed.load_state_dict(bad)


def test_from_config_rebuilds_it_once_registered(registered):
    rebuilt = registry.from_config({"clipper": registered, "config": {"factor": 3.0, "nonfinite": "skip"}})
    assert isinstance(rebuilt, TwiceTheMean) and rebuilt.config() == {"factor": 3.0, "nonfinite": "skip"}
    assert rebuilt.may_skip and rebuilt.keeps_state and rebuilt.one_coefficient


def test_as_optax_under_jit():
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    pytest.importorskip("optax")
    tx = TwiceTheMean().as_optax()
    grads = {"w": jnp.ones((2, 2))}
    state = tx.init(grads)
    update = jax.jit(tx.update)
    _, state = update(grads, state)
    out, state = update(jax.tree_util.tree_map(lambda g: g * 100.0, grads), state)
    assert float(jnp.linalg.norm(out["w"])) == pytest.approx(4.0, rel=1e-5)
    assert bool(gradclip.optax.clip_info(state).clipped)


def test_keras_model_fit():
    keras = pytest.importorskip("keras")
    from gradclip.keras import ClippingOptimizer

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    optimizer = ClippingOptimizer(keras.optimizers.SGD(0.01), TwiceTheMean())
    model.compile(optimizer=optimizer, loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(32, 4)), rng.normal(size=(32, 1)), epochs=2, batch_size=8, verbose=0)
    assert optimizer.clipper_state_dict()["state"]["count"] == 8


def test_clipped_optimizer_folds_it_into_a_fused_step_like_clipping_in_place():
    torch = pytest.importorskip("torch")
    import gradclip.torch as gct

    def train(fold):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = gct.ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1, fused=True), TwiceTheMean(), fold=fold)
        for step in range(5):
            opt.zero_grad()
            (model(torch.ones(2, 4)).pow(2).sum() * (30.0 if step == 3 else 1.0)).backward()
            opt.step()
            assert opt.folded is fold
        return [p.detach().clone() for p in model.parameters()], opt.clipper.state_dict()

    folded, folded_state = train(True)
    in_place, in_place_state = train(False)
    for a, b in zip(folded, in_place):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert folded_state["state"]["count"] == in_place_state["state"]["count"] == 5
