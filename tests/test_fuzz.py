"""Property-based fuzzing (hypothesis) of every registered clipper on every installed backend.

Driven by the registry, like the conformance suite: a clipper registered later is fuzzed with no
change here. Each example draws a list of gradients — 0 to 4 tensors, each 0-d to 3-d with sides
0 to 4 (so empty tensors and empty lists occur), one dtype out of fp16/bf16/fp32/fp64 — with
magnitudes from the dtype's smallest denormal up to 1e30 (beyond fp16's range: those become inf
on conversion), sometimes all zero, with NaN/±inf sprinkled in. Hypothesis draws the structure
and a seed; NumPy fills in the values from that seed (shrinking then works on the structure,
and an example stays cheap to build).

Invariants, on every clipper x backend:

* the clipper first takes a few ordinary steps on the same shapes (its adaptive state is then
  non-trivial), and the fuzzed step either succeeds or raises a :class:`gradclip.GradClipError`;
* finite inputs give finite outputs, and a finite input element never becomes NaN/inf
  (clipping scales, clamps or zeroes; it never creates a non-finite value);
* post-clip bounds hold for every clipper with a bound (fixed thresholds, and the adaptive
  methods' reported ``info.threshold``) whenever the norm was measured finite;
* a failed call leaves the gradients (in place: NumPy arrays, torch ``.grad``) and the state
  (``state_dict()``) exactly as they were: validation comes before mutation.

Failures are provoked on purpose as well: an integer gradient appended last, the ``"raise"``
non-finite policy with a NaN in the last gradient, and chains whose later link raises after an
earlier link would already have written in place.

``GRADCLIP_FUZZ_EXAMPLES`` (default 6 per clipper and backend, about a minute in all) raises
the number of examples for a longer local run.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradclip
from _frameworks import BACKENDS, DTYPES, convert, numpy_dtype, to64, tolerance
from test_conformance import _x64, make_clipper, need

CLIPPERS = gradclip.available()
EXAMPLES = int(os.environ.get("GRADCLIP_FUZZ_EXAMPLES", "6"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Ordinary steps each clipper takes before the fuzzed one (past the shortened warm-ups of
#: ``test_conformance.KWARGS`` for some methods, inside them for others).
WARM_STEPS = 4
SPECIALS = (math.nan, math.inf, -math.inf)


def _finfo(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.finfo(numpy_dtype(dtype))
    return np.finfo(numpy_dtype(dtype))


# -- drawing examples ---------------------------------------------------------------------------
@st.composite
def examples(draw):
    """``(dtype, arrays)``: float64 host arrays, already rounded through ``dtype``."""
    dtype = draw(st.sampled_from(DTYPES))
    shapes = draw(st.lists(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4), max_size=4))
    smallest = math.log10(float(_finfo(dtype).smallest_subnormal))
    regime = draw(st.sampled_from(["unit", "denormal", "large", "everything", "zeros"]))
    low, high = {
        "unit": (-3.0, 3.0),
        "denormal": (smallest, smallest + 3.0),
        "large": (3.0, 30.0),
        "everything": (smallest, 30.0),
        "zeros": (0.0, 0.0),
    }[regime]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    arrays = []
    for shape in shapes:
        magnitude = 10.0 ** rng.uniform(low, high, size=shape)
        values = np.where(rng.random(size=shape) < 0.5, -magnitude, magnitude)
        arrays.append(np.zeros(shape) if regime == "zeros" else np.asarray(values, dtype=np.float64))
    sized = [i for i, a in enumerate(arrays) if a.size]
    if sized:
        for _ in range(draw(st.integers(0, 3))):
            target = arrays[draw(st.sampled_from(sized))]
            target.reshape(-1)[draw(st.integers(0, target.size - 1))] = draw(st.sampled_from(SPECIALS))
    # What the clipper really sees: values rounded into the dtype (1e30 is inf in fp16).
    with np.errstate(over="ignore"):
        rounded = [a.astype(numpy_dtype(dtype)).astype(np.float64) for a in arrays]
    return dtype, rounded


# -- running one clipper ----------------------------------------------------------------------------
class Subject:
    """Gradients (and weights) of one backend in one dtype, clipped in place or functionally."""

    def __init__(self, backend: str, dtype: str, host: list[np.ndarray], inplace: bool):
        self.backend, self.dtype, self.inplace = backend, dtype, inplace
        self.host = host
        self.weights = [np.full(a.shape, 0.5) + np.arange(a.size).reshape(a.shape) % 3 for a in host]
        if backend == "torch" and inplace:
            import torch

            self.params = []
            for g, w in zip(host, self.weights):
                p = torch.nn.Parameter(convert("torch", w, dtype))
                p.grad = convert("torch", g, dtype)
                self.params.append(p)
            self.grads = [p.grad for p in self.params]
        else:
            self.grads = [convert(backend, g, dtype) for g in host]
            self.params = [convert(backend, w, dtype) for w in self.weights]

    def clip(self, clipper):
        """Returns the outputs as float64 NumPy arrays, and the info as Python values."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # clip_ on no gradients warns
            if self.inplace and self.backend == "torch":
                info = clipper.clip_(self.params)
                out = self.grads
            elif self.inplace:  # NumPy: the arrays themselves are clipped (no separate weights)
                info = clipper.clip_(self.grads)
                out = self.grads
            else:
                out, info = clipper.clip(self.grads, params=self.params)
        return [to64(o) for o in out], info.to_dict()

    def current(self) -> list[np.ndarray]:
        return [to64(g) for g in self.grads]


def _inplace_ok(backend: str, name: str) -> bool:
    # AGC needs weights apart from the gradients; NumPy clip_ has none (a documented error,
    # exercised in test_failures_change_nothing).
    return backend in ("numpy", "torch") and not (backend == "numpy" and name == "agc")


def _state(clipper) -> str:
    # JSON text compares NaN equal to NaN, unlike == on the dicts.
    return json.dumps(clipper.state_dict(), sort_keys=True)


def _warm_up(clipper, backend, dtype, shapes, inplace, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(WARM_STEPS):
        host = [rng.normal(size=s) for s in shapes]
        Subject(backend, dtype, [h.astype(numpy_dtype(dtype)).astype(np.float64) for h in host], inplace).clip(
            clipper
        )


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b))


# -- the bounds ---------------------------------------------------------------------------------------
def _norm(arrays, p=2.0) -> float:
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    if not flat.size:
        return 0.0
    return float(np.max(np.abs(flat))) if p == math.inf else float(np.sum(np.abs(flat) ** p) ** (1.0 / p))


def check_bounds(name: str, clipper, inputs, outputs, info, dtype: str) -> None:
    """Assert the post-clip bound of ``name`` (methods without a bound: nothing to check)."""
    if not info["finite"] or info["skip"]:
        return  # gradients pass untouched (propagate/skip): no bound is promised
    # The result is rounded into the dtype once per element; a norm over n elements can then
    # exceed the bound by a few units in the last place.
    rtol = 8 * tolerance(dtype) + 1e-6
    config = clipper.config()
    if name == "global_norm":
        assert _norm(outputs, config["norm_type"]) <= config["max_norm"] * (1 + rtol)
    elif name in ("norm", "average_norm", "block_rms"):
        for o in outputs:
            if not o.size:
                continue
            measured = _norm([o], config.get("norm_type", 2.0))
            if name == "average_norm":
                measured /= o.size
            elif name == "block_rms":
                measured /= math.sqrt(o.size)
            assert measured <= config.get("max_norm", config.get("threshold")) * (1 + rtol)
    elif name == "value":
        for o in outputs:
            assert np.all((o >= config["min_value"]) & (o <= config["max_value"]))
    elif name == "zero_outliers":
        for o in outputs:
            assert np.all(np.abs(o) <= config["threshold"])
    elif name in ("autoclip", "zclip", "quantile_norm"):
        # The adaptive global-norm methods: the result's norm is at most the threshold they
        # report (fp32), or they left the gradients as they were.
        if not _same(inputs, outputs):
            assert _norm(outputs) <= info["threshold"] * (1 + rtol) + 1e-30
    elif name in ("skip_on_spike", "non_finite"):
        assert _same(inputs, outputs)  # they flag or count; finite gradients are never changed


# -- the fuzz tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CLIPPERS)
@FUZZ
@given(example=examples(), inplace=st.booleans())
def test_fuzzed_step_keeps_the_invariants(name, backend, example, inplace):
    need(backend)
    dtype, host = example
    inplace = inplace and _inplace_ok(backend, name)
    with _x64(backend, dtype):
        clipper = make_clipper(name)
        _warm_up(clipper, backend, dtype, [a.shape for a in host], inplace)
        subject = Subject(backend, dtype, host, inplace)
        before_state = _state(clipper)
        try:
            outputs, info = subject.clip(clipper)
        except gradclip.GradClipError:
            assert _same(subject.current(), host), "a failed call changed the gradients"
            assert _state(clipper) == before_state, "a failed call changed the state"
            return
    finite_in = [np.isfinite(a) for a in host]
    assert [o.shape for o in outputs] == [a.shape for a in host]
    for position, (o, ok) in enumerate(zip(outputs, finite_in)):
        created = ok & ~np.isfinite(o)
        assert not created.any(), f"gradient #{position}: a finite element became {o[created][:3]}"
    if all(ok.all() for ok in finite_in):
        assert info["finite"] or _norm(host) > 1e18, "finite, in-range gradients reported non-finite"
    check_bounds(name, clipper, host, outputs, info, dtype)


def _raising_variants(name: str):
    """Clippers of ``name`` that must raise on a NaN: its ``"raise"`` policy when it has one, and
    a chain whose first link writes in place before its last link raises."""
    base = make_clipper(name)
    config = base.config()
    if "nonfinite" in config:
        yield type(base)(**{**config, "nonfinite": "raise"})
    elif name == "non_finite":
        yield gradclip.NonFinite("raise")
    yield gradclip.chain(gradclip.Value(clip_value=1e-3), base, gradclip.NonFinite("raise"))


def _integer_like(backend: str, shape=(6,)):
    values = np.arange(int(np.prod(shape))).reshape(shape)
    if backend == "torch":
        import torch

        return torch.from_numpy(values)
    return values


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("name", CLIPPERS)
@FUZZ
@given(example=examples(), fault=st.sampled_from(["integer", "nonfinite"]))
def test_failures_change_nothing(name, backend, example, fault):
    """Provoked failures: the gradients (in place) and the state come back exactly as they were.

    ``"integer"`` appends an int64 gradient after the float ones (a BackendError, on the
    functional path for torch, whose parameters cannot hold integer gradients); ``"nonfinite"``
    puts a NaN in the last gradient of a clipper that must raise on it (in place).
    """
    need(backend)
    dtype, host = example
    host = [np.where(np.isfinite(a), a, 1.0) for a in host if a.size] or [np.ones((2, 3))]
    if fault == "nonfinite":
        host[-1].reshape(-1)[-1] = math.nan
    clippers = [make_clipper(name)] if fault == "integer" else list(_raising_variants(name))
    for clipper in clippers:
        inplace = fault == "nonfinite" or backend == "numpy"
        _warm_up(clipper, backend, dtype, [a.shape for a in host], inplace and _inplace_ok(backend, name))
        subject = Subject(backend, dtype, host, inplace=inplace)
        before_state, before = _state(clipper), subject.current()
        if fault == "integer":
            grads = subject.grads + [_integer_like(backend)]
            params = subject.params + [_integer_like(backend)]
            call = (lambda: clipper.clip_(grads)) if inplace else (lambda: clipper.clip(grads, params=params))
        else:
            call = lambda: clipper.clip_(subject.params if backend == "torch" else subject.grads)  # noqa: E731
        with pytest.raises(gradclip.GradClipError) as caught:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                call()
        if fault == "integer":
            assert isinstance(caught.value, TypeError) and "int64" in str(caught.value)
        assert _same(subject.current(), before), f"{clipper!r}: a failed call changed the gradients"
        assert _state(clipper) == before_state, f"{clipper!r}: a failed call changed the state"
