"""The registry (``available``, ``get``), ``import gradclip`` staying framework-free, backend
selection (cached; the torch backend on its foreach kernels), and checkpoints:
``state_dict``/``load_state_dict`` round trips and rejections that change nothing."""

from __future__ import annotations

import copy
import io
import json
import math
import re
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import pytest

import gradclip
from gradclip._core.clipper import make_info
from gradclip._core.contract import Coefficient, Decision

FOUNDATION = ["average_norm", "block_rms", "global_norm", "norm", "norm_sign", "value", "zero_outliers"]


# -- import gradclip imports no framework -------------------------------------------------------


def _modules_after(code: str) -> set[str]:
    script = code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


FRAMEWORKS = ("torch", "tensorflow", "jax", "jaxlib", "keras", "optax", "flax")


def _frameworks_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in FRAMEWORKS)


def test_import_gradclip_imports_no_framework():
    modules = _modules_after("import gradclip")
    assert "gradclip" in modules
    assert _frameworks_in(modules) == []


def test_numpy_clipping_and_registry_import_no_framework():
    code = (
        "import numpy as np, gradclip\n"
        "names = gradclip.available()\n"
        "for name in names:\n"
        "    gradclip.get(name)\n"
        "g = [np.ones(3, np.float32) * 5]\n"
        "gradclip.GlobalNorm(1.0).clip(g)\n"
        "gradclip.Value(-1.0, 1.0).clip_(g)\n"
        "gradclip.global_norm(g)\n"
        "gradclip.GlobalNorm(1.0).state_dict()\n"
    )
    assert _frameworks_in(_modules_after(code)) == []


def test_control_subprocess_sees_a_framework_import():
    pytest.importorskip("torch", reason="the control imports torch")
    assert "torch" in _frameworks_in(_modules_after("import gradclip.torch"))


# -- backend selection: cached per framework and per array type --------------------------------


def test_backend_class_is_cached_not_imported_again(monkeypatch):
    import gradclip.backends
    from gradclip._core import ops

    first = ops.get_ops([np.ones(2, np.float32)])
    module = sys.modules["gradclip.backends.numpy"]
    assert type(first) is module.BACKEND
    # With the module gone from sys.modules, a lookup that imported it again would bring it back
    # with a new class object; the cache hands out the class it already has.
    monkeypatch.delitem(sys.modules, "gradclip.backends.numpy")
    monkeypatch.setattr(gradclip.backends, "numpy", module)  # restored if re-imported below
    assert type(ops.get_ops([np.zeros(3, np.float64)])) is type(first)
    assert "gradclip.backends.numpy" not in sys.modules
    # Control: without the cache entry the backend module is imported again.
    monkeypatch.delitem(ops._backend_cache, "numpy")
    reimported = ops.get_ops([np.ones(2, np.float32)])
    assert sys.modules["gradclip.backends.numpy"] is not module
    assert type(reimported) is not type(first)


def test_framework_of_an_array_type_is_cached(monkeypatch):
    from gradclip._core import ops

    ops.get_ops([np.ones(2, np.float32)])
    assert ops._framework_cache[np.ndarray] == "numpy"
    # Once cached, the type is not looked up again: with the module table emptied, the cached
    # type still resolves ...
    monkeypatch.setattr(ops, "_FRAMEWORK_OF_MODULE", {})
    assert ops.get_ops([np.ones(2, np.float32)]).name == "numpy"
    # ... and an uncached type (the control) does not.
    monkeypatch.delitem(ops._framework_cache, np.ndarray)
    with pytest.raises(gradclip.BackendError, match="numpy.ndarray"):
        ops.get_ops([np.ones(2, np.float32)])


def test_torch_backend_class_is_cached():
    torch = pytest.importorskip("torch", reason="torch backend")
    from gradclip._core import ops

    first = ops.get_ops([torch.ones(2)])
    assert type(ops.get_ops([torch.ones(3, dtype=torch.float64)])) is type(first)
    assert ops._backend_cache["torch"] is type(first)


def _count_calls(monkeypatch, module, names):
    """Wrap ``module.<name>`` for each name with a call counter; returns the live counts."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def _two_dtype_params(torch):
    # Two (device, dtype) groups: three fp32 tensors and two fp64 tensors, small, norm >> 1.
    generator = torch.Generator().manual_seed(0)
    params = []
    f32, f64 = torch.float32, torch.float64
    for shape, dtype in [((4, 3), f32), ((5,), f32), ((2, 2), f32), ((3,), f64), ((6,), f64)]:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = torch.randn(shape, generator=generator, dtype=dtype) * 10
        params.append(p)
    return params


# (entry point, foreach flag); Clipper.clip_ has no flag and always runs with foreach=None.
FOREACH_CALLS = [("GlobalNorm.clip_", None), ("clip_grad_norm_", None), ("clip_grad_norm_", True), ("clip_grad_norm_", False)]


@pytest.mark.parametrize("call,foreach", FOREACH_CALLS, ids=[f"{c}-foreach={f}" for c, f in FOREACH_CALLS])
def test_torch_backend_runs_one_foreach_kernel_per_group(monkeypatch, call, foreach):
    # Small tensors give the same numbers through a Python loop; only counting the kernel calls
    # shows the foreach path is taken: one _foreach_norm and one _foreach_mul_ per (device, dtype).
    torch = pytest.importorskip("torch", reason="torch backend")
    import gradclip.torch as gct

    params = _two_dtype_params(torch)
    expected = [p.grad.clone() for p in _two_dtype_params(torch)]
    reference = [torch.nn.Parameter(torch.zeros_like(g)) for g in expected]
    for p, g in zip(reference, expected):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(reference, 1.0, foreach=False)
    calls = _count_calls(monkeypatch, torch, ["_foreach_norm", "_foreach_mul_", "_foreach_mul"])
    if call == "GlobalNorm.clip_":
        gradclip.GlobalNorm(1.0).clip_(params)
    else:
        gct.clip_grad_norm_(params, 1.0, foreach=foreach)
    groups = 0 if foreach is False else 2
    assert calls == {"_foreach_norm": groups, "_foreach_mul_": groups, "_foreach_mul": 0}
    for p, want in zip(params, reference):
        torch.testing.assert_close(p.grad, want.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("foreach", [None, True, False], ids=["foreach-auto", "foreach-on", "foreach-off"])
def test_torch_clamp_runs_foreach_kernels(monkeypatch, foreach):
    torch = pytest.importorskip("torch", reason="torch backend")
    import gradclip.torch as gct

    params = _two_dtype_params(torch)
    expected = [p.grad.clamp(-0.5, 0.5) for p in params]
    calls = _count_calls(monkeypatch, torch, ["_foreach_clamp_min_", "_foreach_clamp_max_"])
    gct.clip_grad_value_(params, 0.5, foreach=foreach)
    groups = 0 if foreach is False else 2
    assert calls == {"_foreach_clamp_min_": groups, "_foreach_clamp_max_": groups}
    for p, want in zip(params, expected):
        assert torch.equal(p.grad, want)


# -- registry -----------------------------------------------------------------------------------


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()  # BlockRMS -> block_rms


def test_available_lists_the_names():
    names = gradclip.available()
    assert names == sorted(names) and len(set(names)) == len(names)
    assert set(FOUNDATION) <= set(names)
    for name in names:
        cls = type(gradclip.get(name))
        assert cls.name == name
        assert _snake(cls.__name__) == name or name in ("autoclip", "zclip", "adagc", "agc", "none")


def _grads(seed, scale=10.0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in [(4, 3), (5,), (2, 2)]]


def _params_like(grads):
    rng = np.random.default_rng(99)
    return [rng.standard_normal(g.shape).astype(np.float32) for g in grads]


@pytest.mark.parametrize("name", gradclip.available())
def test_get_without_arguments_gives_a_working_clipper(name):
    clipper = gradclip.get(name)
    assert isinstance(clipper, gradclip.Clipper)
    assert repr(clipper).startswith(type(clipper).__name__ + "(")
    for step in range(3):  # new gradients every step (stateful clippers advance once per step)
        grads = _grads(step)
        before = [g.copy() for g in grads]
        out, info = clipper.clip(grads, params=_params_like(grads))
        for g, b in zip(grads, before):
            np.testing.assert_array_equal(g, b)
        assert [o.shape for o in out] == [g.shape for g in grads]
        assert all(np.isfinite(o).all() for o in out)
        assert set(info._fields) == {"norm", "threshold", "coef", "clipped", "finite", "skip", "consecutive_skips"}
        assert info.consecutive_skips is None  # counted only by the wrappers that own the step
        assert float(info.norm) == pytest.approx(float(gradclip.global_norm(grads)), rel=1e-5)
    # The foundation methods' defaults (API.md): all clip gradients of norm ~35 somewhat.
    if name in FOUNDATION:
        assert bool(info.clipped)
    json.dumps(clipper.state_dict())


@pytest.mark.parametrize("name", gradclip.available())
def test_get_default_clips_torch(name):
    torch = pytest.importorskip("torch", reason="torch variant")
    clipper = gradclip.get(name)
    params = []
    for g in _grads(0):
        p = torch.nn.Parameter(torch.from_numpy(g).clone() * 0.01)
        p.grad = torch.from_numpy(g.copy())
        params.append(p)
    info = clipper.clip_(params)
    assert isinstance(info.norm, torch.Tensor)
    assert all(torch.isfinite(p.grad).all() for p in params)


def test_documented_defaults():
    assert gradclip.get("global_norm").config()["max_norm"] == 1.0
    assert gradclip.get("value").config() == {"min_value": -1.0, "max_value": 1.0}
    assert gradclip.get("value", min_value=0.5, max_value=1.5).config() == {"min_value": 0.5, "max_value": 1.5}
    assert gradclip.get("global_norm", max_norm=2.0, norm_type="inf").config()["norm_type"] == math.inf


# -- checkpoints --------------------------------------------------------------------------------


class _CounterState(NamedTuple):
    count: object
    total: object
    history: object


class _Counter(gradclip.Clipper):
    """A small stateful clipper (not registered) to exercise the checkpoint machinery."""

    name = "test_counter"
    state_type = _CounterState
    state_dtypes = {"count": "int64", "total": "float32", "history": "float32"}

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    coefficient = Coefficient.NONE

    def init_state(self, ops, grads):
        return _CounterState(ops.scalar(0, "int64"), ops.scalar(0.0), ops.array([0.0, 0.0, 0.0]))

    def decide(self, ops, measured, state, signals=None):
        norm = measured.norm
        history = ops.stack([state.history[1], state.history[2], norm])
        new = _CounterState(state.count + 1, state.total + norm * self.scale, history)
        info = make_info(ops, norm, ops.scalar(math.inf), ops.scalar(1.0), ops.scalar(False, "bool"), ops.isfinite(norm))
        return Decision(info.coef, new, info)


def _stepped(clipper, steps, backend="numpy"):
    for step in range(steps):
        grads = _grads(step)
        if backend == "torch":
            import torch

            grads = [torch.from_numpy(g) for g in grads]
        clipper.clip(grads)
    return clipper


def _roundtrip_json(state):
    return json.loads(json.dumps(state))


def _roundtrip_torch(state):
    torch = pytest.importorskip("torch", reason="torch.save / torch.load")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("roundtrip", [_roundtrip_json, _roundtrip_torch], ids=["json", "torch.save"])
def test_stateful_round_trip(roundtrip, backend):
    if backend == "torch":
        pytest.importorskip("torch", reason="torch backend")
    clipper = _stepped(_Counter(0.5), 3, backend)
    saved = clipper.state_dict()
    assert saved["format"] == "gradclip" and saved["version"] == 1 and saved["clipper"] == "test_counter"
    assert saved["config"] == {"scale": 0.5}
    assert saved["state"]["count"] == 3 and isinstance(saved["state"]["count"], int)
    assert isinstance(saved["state"]["history"], list) and len(saved["state"]["history"]) == 3
    loaded = roundtrip(copy.deepcopy(saved))
    assert loaded == saved
    fresh = _Counter(0.5)
    fresh.load_state_dict(loaded)
    assert fresh.state_dict() == saved  # pending state reads back unchanged
    # Both continue identically.
    _stepped(clipper, 1, backend)
    fresh.clip(_grads(0) if backend == "numpy" else [__import__("torch").from_numpy(g) for g in _grads(0)])
    assert fresh.state_dict() == clipper.state_dict()
    assert fresh.state_dict()["state"]["count"] == 4


def test_state_before_first_step_is_none_and_reset():
    clipper = _Counter()
    assert clipper.state_dict()["state"] is None
    _stepped(clipper, 2)
    clipper.reset()
    assert clipper.state_dict()["state"] is None
    fresh = _Counter()
    fresh.load_state_dict(_Counter().state_dict())
    assert fresh.state_dict()["state"] is None


def _bad_variants(saved):
    """(label, bad state dict) pairs, each wrong in exactly one way."""
    variants = []

    def with_(label, **changes):
        bad = copy.deepcopy(saved)
        bad.update(changes)
        variants.append((label, bad))

    def with_state(label, field, value):
        bad = copy.deepcopy(saved)
        bad["state"][field] = value
        variants.append((label, bad))

    with_("wrong clipper", clipper="global_norm")
    with_("wrong config", config={"scale": 2.0})
    with_("extra config", config={**saved["config"], "other": 1})
    with_("wrong version", version=2)
    with_("version as string", version="1")
    with_("wrong format", format="optax")
    variants.append(("missing version", {k: v for k, v in copy.deepcopy(saved).items() if k != "version"}))
    with_("state not a mapping", state=[1, 2, 3])
    with_state("numpy array", "total", np.array(1.0))
    with_state("string", "count", "3")
    with_state("None", "count", None)
    with_state("dict", "history", {"a": 1.0})
    with_state("string in list", "history", [1.0, "x", 2.0])
    with_state("object", "total", object())
    missing = copy.deepcopy(saved)
    del missing["state"]["history"]
    variants.append(("missing field", missing))
    extra = copy.deepcopy(saved)
    extra["state"]["extra"] = 1
    variants.append(("extra field", extra))
    variants.append(("not a mapping", [("format", "gradclip")]))
    return variants


def test_rejections_leave_state_unchanged():
    clipper = _stepped(_Counter(), 2)
    saved = clipper.state_dict()
    torch = None
    try:
        import torch
    except ImportError:
        pass
    variants = _bad_variants(saved)
    if torch is not None:
        bad = copy.deepcopy(saved)
        bad["state"]["total"] = torch.tensor(1.0)
        variants.append(("torch tensor", bad))
    for label, bad in variants:
        with pytest.raises(gradclip.StateError):
            clipper.load_state_dict(bad)
        assert clipper.state_dict() == saved, label
    # Still usable, and still on its own trajectory.
    _stepped(clipper, 1)
    assert clipper.state_dict()["state"]["count"] == 3


def test_rejections_of_a_pending_state_leave_it_unchanged():
    # A loaded-but-not-yet-used checkpoint is state too.
    source = _stepped(_Counter(), 2).state_dict()
    clipper = _Counter()
    clipper.load_state_dict(source)
    for label, bad in _bad_variants(source):
        with pytest.raises(gradclip.StateError):
            clipper.load_state_dict(bad)
        assert clipper.state_dict() == source, label


@pytest.mark.parametrize("name", gradclip.available())
def test_registered_state_round_trip_and_rejections(name):
    clipper = gradclip.get(name)
    for step in range(2):
        grads = _grads(step)
        clipper.clip(grads, params=_params_like(grads))
    saved = clipper.state_dict()
    assert _roundtrip_json(saved) == saved
    assert json.dumps(saved, allow_nan=True)
    fresh = gradclip.get(name)
    fresh.load_state_dict(_roundtrip_json(saved))
    assert fresh.state_dict() == saved
    other = "global_norm" if name != "global_norm" else "norm"
    for bad in (
        {**saved, "clipper": other},
        {**saved, "version": saved["version"] + 1},
        {**saved, "config": {**saved["config"], "unexpected": 1}},
        gradclip.get(other).state_dict(),
    ):
        with pytest.raises(gradclip.StateError):
            clipper.load_state_dict(bad)
        assert clipper.state_dict() == saved


@pytest.mark.parametrize("name", gradclip.available())
def test_registered_state_loads_with_torch_weights_only(name):
    clipper = gradclip.get(name)
    grads = _grads(0)
    clipper.clip(grads, params=_params_like(grads))
    saved = clipper.state_dict()
    loaded = _roundtrip_torch(saved)
    assert loaded == saved
    gradclip.get(name).load_state_dict(loaded)


def test_config_mismatch_names_both_configs():
    saved = gradclip.GlobalNorm(1.0).state_dict()
    with pytest.raises(gradclip.StateError) as caught:
        gradclip.GlobalNorm(2.0).load_state_dict(saved)
    assert "1.0" in str(caught.value) and "2.0" in str(caught.value)
    with pytest.raises(gradclip.StateError, match="global_norm.*norm|norm.*global_norm"):
        gradclip.Norm(1.0).load_state_dict(saved)


def test_chain_round_trip_with_a_stateful_link():
    chain = gradclip.chain(_Counter(2.0), gradclip.GlobalNorm(1.0))
    _stepped(chain, 2)
    saved = chain.state_dict()
    assert saved["clipper"] == "chain"
    assert [link["clipper"] for link in saved["state"]["links"]] == ["test_counter", "global_norm"]
    assert saved["state"]["links"][0]["state"]["count"] == 2
    assert _roundtrip_json(saved) == saved
    fresh = gradclip.chain(_Counter(2.0), gradclip.GlobalNorm(1.0))
    fresh.load_state_dict(_roundtrip_json(saved))
    assert fresh.state_dict() == saved
    _stepped(fresh, 1)
    _stepped(chain, 1)
    assert fresh.state_dict() == chain.state_dict()
    assert chain.state_dict()["state"]["links"][0]["state"]["count"] == 3


def test_chain_rejections_leave_state_unchanged():
    chain = _stepped(gradclip.chain(_Counter(2.0), gradclip.GlobalNorm(1.0)), 2)
    saved = chain.state_dict()
    bad_link_config = copy.deepcopy(saved)
    bad_link_config["state"]["links"][0]["config"] = {"scale": 3.0}
    bad_link_value = copy.deepcopy(saved)
    bad_link_value["state"]["links"][0]["state"]["count"] = "two"
    second_link_wrong = copy.deepcopy(saved)
    second_link_wrong["state"]["links"][1]["version"] = 7
    too_few = copy.deepcopy(saved)
    too_few["state"]["links"] = too_few["state"]["links"][:1]
    for label, bad in [
        ("link config", bad_link_config),
        ("link value", bad_link_value),
        ("second link version", second_link_wrong),
        ("too few links", too_few),
        ("chain version", {**copy.deepcopy(saved), "version": 2}),
        ("state not a mapping", {**copy.deepcopy(saved), "state": [1]}),
        ("state missing", {k: v for k, v in copy.deepcopy(saved).items() if k != "state"}),
        ("not a mapping", ["links"]),
    ]:
        with pytest.raises(gradclip.StateError):
            chain.load_state_dict(bad)
        assert chain.state_dict() == saved, label
    _stepped(chain, 1)
    assert chain.state_dict()["state"]["links"][0]["state"]["count"] == 3


def test_chain_rejection_after_unsaved_steps_keeps_the_live_state():
    # Steps taken after the last state_dict() live only in the chain's own state: a rejected
    # load must not reset it (the links' copies are stale at that point).
    chain = _stepped(gradclip.chain(_Counter(2.0), gradclip.GlobalNorm(1.0)), 2)
    saved = chain.state_dict()
    _stepped(chain, 1)  # count 3, not saved
    bad = copy.deepcopy(saved)
    bad["state"]["links"][0]["state"]["count"] = "two"
    with pytest.raises(gradclip.StateError):
        chain.load_state_dict(bad)
    assert chain.state_dict()["state"]["links"][0]["state"]["count"] == 3
    _stepped(chain, 1)
    assert chain.state_dict()["state"]["links"][0]["state"]["count"] == 4
