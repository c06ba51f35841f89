"""Property-based fuzzing (hypothesis) of every registered clipper on every installed backend.

Driven by the registry, like the conformance suite: a clipper registered later is fuzzed with no
change here. Two kinds of input:

* **Drawn examples**: 0 to 4 tensors, each 0-d to 3-d with sides 0 to 4 (so empty tensors and
  empty lists occur), one dtype out of fp16/bf16/fp32/fp64, with magnitudes from the dtype's
  smallest denormal up to 1e30 (beyond fp16's range: those become inf on conversion), sometimes
  all zero, with NaN/±inf sprinkled in. Hypothesis draws the structure and a seed; NumPy fills in
  the values from that seed (shrinking then works on the structure, and an example stays cheap to
  build). The non-finite policy (``"propagate"``, ``"zero"``, ``"skip"``) of the clippers that
  take one, in place or not, and the number of ordinary steps before the fuzzed one (1, inside
  the shortened warm-ups, or 4, past most of them) are drawn too.
* **Edge cases**, for every clipper x backend x dtype, so no cell depends on luck: a 0-d tensor
  and an empty one in every case, beside denormals (alone, and next to values that get
  clipped), 1e30 (inf in fp16) and NaN/±inf. On NumPy and torch they run under each non-finite
  policy, in place and not; on TensorFlow and JAX under the default policy (their tensor shapes
  are fixed, so the compiled kernels are reused from cell to cell).

Invariants, on every step:

* the call succeeds: valid floating-point input never raises with these configurations (no
  error is whitelisted; none of the documented errors depends on the values of valid input);
* finite elements stay finite (clipping scales, clamps or zeroes; it never creates NaN/inf),
  and under ``"zero"`` no output element is non-finite;
* under ``"skip"`` a step with NaN/inf is flagged and left untouched; a skipped step (any
  clipper) leaves the gradients untouched; a non-finite step under ``"propagate"`` passes
  unclipped through the global-coefficient methods;
* the post-clip rule of each method holds, whenever the gradients as measured (after
  ``"zero"``) are finite and their norm is within the accumulator's range: above its bound a
  norm is pulled down to the bound (within rounding of the dtype), under it the gradients are
  bit-for-bit unchanged — globally (``global_norm``, ``autoclip``/``zclip``/``quantile_norm``
  against their reported ``info.threshold``, AdaGC's warm-up), per tensor (``norm``,
  ``average_norm``, ``block_rms``, AdaGC against ``clip_ratio·γ_i`` from the state before the
  step), per unit (AGC: ``clip_factor·max(‖W_i‖, eps)``), per element (``value``,
  ``zero_outliers``); ``norm_sign`` turns every element into ``±ε`` or 0 when ``‖g‖ > ε``;
  ``subset`` takes the wrapped clipper's result (which meets its own rule) exactly where the
  counter-based stream recomputed from the state selects, and leaves the rest unchanged.

Failures are provoked on purpose as well, on every backend: an integer gradient appended last,
the ``"raise"`` non-finite policy with a NaN in the last gradient, and chains whose later link
raises after an earlier link would already have written in place. The gradients (in place:
NumPy arrays, torch ``p.grad``) and the state (``state_dict()``, on TensorFlow read from its
``tf.Variable``s) come back exactly as they were, and the next step equals that of a clipper that
never saw the failure.

``GRADCLIP_FUZZ_EXAMPLES`` (default 6 drawn examples per clipper on NumPy and torch, a third
of that on TensorFlow and JAX, where each new shape compiles) raises the number of drawn
examples for a longer local run.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradclip
from gradclip.clippers import autoclip, quantile, zclip  # their divisors' eps (_EPS)
from _frameworks import BACKENDS, DTYPES, convert, dtype_name, numpy_dtype, to64, tolerance
from test_conformance import _x64, make_clipper, need

CLIPPERS = gradclip.available()
EXAMPLES = int(os.environ.get("GRADCLIP_FUZZ_EXAMPLES", "6"))
#: TensorFlow and JAX compile every new shape (seconds per example under JAX); the edge cases
#: below give each of their cells the full coverage, so fewer drawn examples suffice there.
EXAMPLES_TF_JAX = max(1, EXAMPLES // 3)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Ordinary steps each clipper takes before the fuzzed one (past the shortened warm-ups of
#: ``test_conformance.KWARGS`` for some methods, inside them for others).
WARM_STEPS = 4
SPECIALS = (math.nan, math.inf, -math.inf)
#: The non-finite policies fuzzed ("raise" is provoked on purpose in test_failures_*).
POLICIES = ("propagate", "zero", "skip")
#: Relative margin around a bound inside which the host's fp64 norm and the clipper's fp32 norm
#: may disagree on which side the gradients are; no rule is asserted there.
MARGIN = 1e-5


def _finfo(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.finfo(numpy_dtype(dtype))
    return np.finfo(numpy_dtype(dtype))


def _rounded(arrays: list[np.ndarray], dtype: str) -> list[np.ndarray]:
    """What the clipper really sees: values rounded into the dtype (1e30 is inf in fp16)."""
    with np.errstate(over="ignore"):
        return [np.asarray(a, dtype=np.float64).astype(numpy_dtype(dtype)).astype(np.float64) for a in arrays]


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
    return dtype, _rounded(arrays, dtype)


#: The shapes of every edge case: a 0-d tensor, an empty one, a matrix and a vector.
EDGE_SHAPES = [(), (0, 3), (2, 3), (4,)]


def edge_cases(dtype: str) -> dict[str, list[np.ndarray]]:
    """Fixed gradients in :data:`EDGE_SHAPES`, rounded into ``dtype``, one list per feature."""
    tiny = float(_finfo(dtype).smallest_subnormal)
    empty = np.zeros((0, 3))
    cases = {
        # Nothing to clip, everything below the smallest normal: denormals must survive as such.
        "denormals": [np.array(tiny), empty, tiny * np.array([[1.0, -2.0, 3.0], [0.0, -5.0, 7.0]]),
                      tiny * np.array([-1.0, 2.0, 0.0, 9.0])],
        # Denormals next to values every method clips: they are scaled with the rest.
        "clipped-with-denormals": [np.array(0.5), empty, np.array([[3.0, -4.0, 0.5], [-2.0, 6.0, -1.0]]),
                                   np.array([tiny, -tiny, 3 * tiny, 0.0])],
        "1e30": [np.array(-2.0), empty, np.array([[1e30, -1.0, 2.0], [0.5, -1e30, 3.0]]),
                 np.array([1.0, -2.0, 1e-3, 4.0])],
        "nan-inf": [np.array(math.nan), empty, np.array([[math.inf, 5.0, -7.0], [0.25, math.nan, -3.0]]),
                    np.array([-math.inf, 2.0, tiny, -1.0])],
    }
    return {label: _rounded(arrays, dtype) for label, arrays in cases.items()}


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
                return self.current(), info.to_dict()
            if self.inplace:  # NumPy: the arrays themselves are clipped (no separate weights)
                info = clipper.clip_(self.grads)
                return self.current(), info.to_dict()
            out, info = clipper.clip(self.grads, params=self.params)
        return [to64(o) for o in out], info.to_dict()

    def current(self) -> list[np.ndarray]:
        """The gradients as they are now: for torch in place each parameter's ``.grad`` as it
        is now (a call that re-assigned ``p.grad`` is seen, not the tensors given)."""
        if self.inplace and self.backend == "torch":
            return [to64(p.grad) for p in self.params]
        return [to64(g) for g in self.grads]


def _inplace_ok(backend: str, name: str) -> bool:
    # AGC needs weights apart from the gradients; NumPy clip_ has none (a documented error,
    # exercised in test_failures_change_nothing).
    return backend in ("numpy", "torch") and not (backend == "numpy" and name == "agc")


def _policy_key(name: str) -> str | None:
    """The argument that sets ``name``'s non-finite policy, or None (no policy)."""
    config = make_clipper(name).config()
    return "nonfinite" if "nonfinite" in config else "policy" if name == "non_finite" else None


#: Beyond ``test_conformance.KWARGS``: an ε other than 1, so that ±1 in place of ±ε shows.
FUZZ_KWARGS = {"norm_sign": {"threshold": 0.5}}


def make_with_policy(name: str, policy: str | None):
    """The fuzzed configuration of ``name`` (``test_conformance.KWARGS``, :data:`FUZZ_KWARGS`)
    with the non-finite ``policy`` (None: its default)."""
    base = make_clipper(name)
    config = {**base.config(), **FUZZ_KWARGS.get(name, {})}
    key = _policy_key(name)
    if policy is not None and key is not None:
        config[key] = policy
    return type(base)(**config)


def _policy_of(clipper) -> str | None:
    config = clipper.config()
    return config.get("nonfinite", config.get("policy"))


def _state(clipper) -> str:
    # JSON text compares NaN equal to NaN, unlike == on the dicts.
    return json.dumps(clipper.state_dict(), sort_keys=True)


def _warm_up(clipper, backend, dtype, shapes, inplace, steps=WARM_STEPS, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        host = _rounded([rng.normal(size=s) for s in shapes], dtype)
        Subject(backend, dtype, host, inplace).clip(clipper)


@functools.lru_cache(maxsize=None)
def _warmed_state(name: str, policy: str | None, dtype: str) -> str:
    """The state (JSON) of ``name`` after :data:`WARM_STEPS` ordinary NumPy steps on
    :data:`EDGE_SHAPES`; any backend loads it (state is backend-neutral plain data)."""
    clipper = make_with_policy(name, policy)
    _warm_up(clipper, "numpy", dtype, EDGE_SHAPES, inplace=False)
    return _state(clipper)


def _warmed(name: str, policy: str | None, dtype: str):
    clipper = make_with_policy(name, policy)
    clipper.load_state_dict(json.loads(_warmed_state(name, policy, dtype)))
    return clipper


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b))


# -- the rules ---------------------------------------------------------------------------------------
class Case(NamedTuple):
    """Where a step ran: the backend, the dtype, and the weights (AGC's parameters)."""

    backend: str
    dtype: str
    weights: list[np.ndarray]


#: TensorFlow's CPU kernels and JAX's eager CPU ops flush denormal results to zero (FTZ/DAZ):
#: there a denormal multiplied by a coefficient of exactly 1, clamped or cast comes out as 0,
#: so "bit-for-bit unchanged" (DESIGN.md rule 4) holds for every element except nonzero fp32/
#: fp64 denormals, which may become 0. fp16 is computed in fp32, where its denormals are normal.
#: NumPy and torch keep denormals. (Reported: /tmp/reliability/denormal_flush.py.)
FLUSH_DENORMALS = {"tensorflow", "jax"}


def _agrees(given: np.ndarray, got: np.ndarray, expected: np.ndarray, case: Case) -> np.ndarray:
    """Element-wise: ``got`` is ``expected`` (NaN equal to NaN), or, on a backend that flushes
    denormals, 0 where the ``given`` element was a nonzero denormal."""
    same = (got == expected) | (np.isnan(got) & np.isnan(expected))
    if case.backend in FLUSH_DENORMALS and case.dtype != "float16":
        denormal = (given != 0) & (np.abs(given) < float(_finfo(case.dtype).tiny))
        same |= denormal & (got == 0)
    return same


def _unchanged(inputs, outputs, case: Case) -> bool:
    return len(inputs) == len(outputs) and all(_agrees(e, o, e, case).all() for e, o in zip(inputs, outputs))


def _norm(arrays, p=2.0) -> float:
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    if not flat.size:
        return 0.0
    return float(np.max(np.abs(flat))) if p == math.inf else float(np.sum(np.abs(flat) ** p) ** (1.0 / p))


def _measurable_limit(dtype: str) -> float:
    # Norms accumulate in fp32 (fp64 for fp64 gradients): squares overflow fp32 beyond ~1.8e19,
    # and such a step counts as non-finite (docs/reliability.md). Below this, it is measured.
    return 1e150 if dtype == "float64" else 1e18


def _tolerances(dtype: str, size: int) -> tuple[float, float]:
    """``(rtol, atol)`` of a norm of ``size`` elements computed, scaled and rounded into ``dtype``:
    a few units in the last place per element, and half a denormal per element in absolute terms
    (a scaled denormal rounds to a multiple of the smallest one)."""
    return 8 * tolerance(dtype) + 1e-6, max(size, 1) * float(_finfo(dtype).smallest_subnormal)


def _norm_rule(what: str, inputs, outputs, bound: float, case: Case, p: float = 2.0, eps: float = 0.0) -> None:
    """Above ``bound`` the norm is pulled down to ``bound`` (``bound·‖g‖ / (‖g‖ + eps)`` for the
    methods that add ``eps`` to the divisor); under it nothing changes."""
    rtol, atol = _tolerances(case.dtype, sum(a.size for a in inputs))
    norm_in, norm_out = _norm(inputs, p), _norm(outputs, p)
    assert norm_out <= bound * (1 + rtol) + atol, f"{what}: norm {norm_out!r} after clipping exceeds {bound!r} (before: {norm_in!r})"
    if norm_in > bound * (1 + MARGIN):
        lowest = bound * norm_in / (norm_in + eps) * (1 - rtol) - atol
        assert norm_out >= lowest, f"{what}: norm {norm_in!r} was clipped to {norm_out!r}, below the bound {bound!r}"
    elif norm_in < bound * (1 - MARGIN):
        assert _unchanged(inputs, outputs, case), f"{what}: norm {norm_in!r} is under the bound {bound!r}, yet the gradients changed"


def _agc_rule(clipper, inputs, outputs, case: Case) -> None:
    """Per unit ``i``: ``‖G_i‖ <= clip_factor·max(‖W_i‖, eps)``, unchanged when under it."""
    config = clipper.config()
    axes = config["axis"] if config["axis"] is not None else [0 if case.backend in ("numpy", "torch") else -1]
    for position, (e, o, w) in enumerate(zip(inputs, outputs, case.weights)):
        if not e.size:
            continue
        kept = {axis % e.ndim for axis in axes} if e.ndim >= 2 else set()
        reduce = tuple(d for d in range(e.ndim) if d not in kept)
        g_in = np.sqrt(np.sum(e * e, axis=reduce, keepdims=True))
        g_out = np.sqrt(np.sum(o * o, axis=reduce, keepdims=True))
        limit = config["clip_factor"] * np.maximum(np.sqrt(np.sum(w * w, axis=reduce, keepdims=True)), config["eps"])
        rtol, atol = _tolerances(case.dtype, e.size // g_in.size)
        what = f"agc, gradient #{position}"
        assert np.all(g_out <= limit * (1 + rtol) + atol), f"{what}: unit norms {g_out.ravel()} exceed {limit.ravel()}"
        above = g_in > limit * (1 + MARGIN)
        assert np.all(g_out[above] >= limit[above] * (1 - rtol) - atol), f"{what}: units clipped below their bound"
        changed = ~np.all(_agrees(e, o, e, case), axis=reduce, keepdims=True)
        assert not np.any(changed & (g_in < limit * (1 - MARGIN))), f"{what}: a unit under its bound changed"


def _adagc_rule(clipper, before, inputs, outputs, case: Case) -> None:
    """Warm-up (``step < start_clip_steps`` in the state before the step): the global norm
    against ``warmup_max_norm``. Afterwards, per tensor with a ``γ_i``: against
    ``clip_ratio·γ_i``; a tensor without one is not clipped."""
    config, state = clipper.config(), before["state"]
    if state is None or state["step"] < config["start_clip_steps"]:
        _norm_rule("adagc (warm-up)", inputs, outputs, config["warmup_max_norm"], case, eps=config["eps"])
        return
    for position, (e, o) in enumerate(zip(inputs, outputs)):
        if state["seen"][position]:
            # The limit as the clipper forms it: fp32 γ times the ratio, in fp32.
            limit = float(np.float32(state["gamma"][position]) * np.float32(config["clip_ratio"]))
            _norm_rule(f"adagc, gradient #{position}", [e], [o], limit, case, eps=config["eps"])
        else:
            assert _unchanged([e], [o], case), f"adagc, gradient #{position}: no γ yet, yet it changed"


def _norm_sign_rule(clipper, inputs, outputs, case: Case) -> None:
    """``ε·sign(g)`` element by element when ``‖g‖ > ε`` (0 stays 0), else unchanged."""
    epsilon = clipper.config()["threshold"]
    norm_in = _norm(inputs)
    if norm_in > epsilon * (1 + MARGIN):
        rounded = float(_rounded([np.array(epsilon)], case.dtype)[0])
        for position, (e, o) in enumerate(zip(inputs, outputs)):
            assert _agrees(e, o, rounded * np.sign(e), case).all(), (
                f"norm_sign, gradient #{position}: norm {norm_in!r} > ε={epsilon!r}, but the result is not "
                f"±ε or 0: {o.ravel()[:6]} from {e.ravel()[:6]}"
            )
    elif norm_in < epsilon * (1 - MARGIN):
        assert _unchanged(inputs, outputs, case), f"norm_sign: norm {norm_in!r} <= ε={epsilon!r}, yet the gradients changed"


def _subset_masks(clipper, before, inputs) -> list[np.ndarray]:
    """The selection of this step, recomputed from the state before it: ``Ops.uniform`` is a pure
    function of (key, step) and identical on every backend."""
    from gradclip._core.ops import get_ops

    ops = get_ops([], framework="numpy")
    key, step = np.array(before["state"]["key"], np.int64), np.array(before["state"]["step"], np.int64)
    config = clipper.config()
    if config["by"] == "tensor":
        chosen = np.asarray(ops.uniform(key, step, [(len(inputs),)])[0]) < config["fraction"]
        return [np.full(e.shape, bool(c)) for e, c in zip(inputs, chosen)]
    return [np.asarray(u) < config["fraction"] for u in ops.uniform(key, step, [e.shape for e in inputs])]


def _subset_rule(clipper, before, inputs, outputs, case: Case) -> None:
    """The wrapped clipper's result, which meets its own rule, exactly where selected; the
    unselected elements as they were."""
    if not inputs:
        return  # no gradient: nothing to select (and, every call so far empty, no state kept)
    inner, inner_before = clipper.clipper, before["state"]["inner"]
    wrapped = type(inner)(**inner.config())
    wrapped.load_state_dict(inner_before)
    expected, inner_info = Subject("numpy", case.dtype, inputs, inplace=False).clip(wrapped)
    check_rules(inner.name, wrapped, inner_before, inputs, expected, inner_info, case._replace(backend="numpy"))
    rtol = tolerance(case.dtype)
    for position, (e, o, x, m) in enumerate(zip(inputs, outputs, expected, _subset_masks(clipper, before, inputs))):
        what = f"subset, gradient #{position}"
        assert _agrees(e[~m], o[~m], e[~m], case).all(), f"{what}: an element not selected changed"
        close = np.isclose(o[m], x[m], rtol=rtol, atol=0) | _agrees(e[m], o[m], x[m], case)
        assert close.all(), f"{what}: selected elements {o[m][~close][:4]} are not the wrapped clipper's {x[m][~close][:4]}"


def check_rules(name: str, clipper, before, inputs, outputs, info, case: Case) -> None:
    """Assert the post-clip rule of ``name`` on measurable ``inputs`` (finite, their norm
    within the accumulator's range, after the ``"zero"`` policy), on a step not skipped."""
    config = clipper.config()
    if name == "global_norm":
        _norm_rule("global_norm", inputs, outputs, config["max_norm"], case, config["norm_type"], config["eps"])
    elif name in ("norm", "average_norm", "block_rms"):
        threshold = config.get("max_norm", config.get("threshold"))
        for position, (e, o) in enumerate(zip(inputs, outputs)):
            if e.size:
                # The statistic is ‖g_i‖ / d_i: d_i = 1, the element count, or its square root.
                divisor = {"norm": 1.0, "average_norm": float(e.size), "block_rms": math.sqrt(e.size)}[name]
                _norm_rule(f"{name}, gradient #{position}", [e], [o], threshold * divisor, case, config.get("norm_type", 2.0))
    elif name in ("autoclip", "zclip", "quantile_norm"):
        # The adaptive global-norm methods clip to the threshold they report (fp32).
        eps = {"autoclip": autoclip._EPS, "zclip": zclip._EPS, "quantile_norm": quantile._EPS}[name]
        _norm_rule(f"{name} (threshold {info['threshold']!r})", inputs, outputs, info["threshold"], case, eps=eps)
    elif name == "agc":
        _agc_rule(clipper, inputs, outputs, case)
    elif name == "adagc":
        _adagc_rule(clipper, before, inputs, outputs, case)
    elif name == "norm_sign":
        _norm_sign_rule(clipper, inputs, outputs, case)
    elif name == "subset":
        _subset_rule(clipper, before, inputs, outputs, case)
    elif name in ("skip_on_spike", "skip_above", "non_finite"):
        assert _unchanged(inputs, outputs, case), f"{name}: finite gradients changed"  # they flag or count
    # value and zero_outliers: element-wise rules, checked on every step in check_step.


#: Methods that scale every gradient by one coefficient from the global norm: a non-finite step
#: under "propagate" passes through them as it is (gradclip.clippers.nonfinite).
GLOBAL_COEFFICIENT = {"global_norm", "autoclip", "zclip", "quantile_norm", "norm_sign", "adagc"}


def check_step(name: str, clipper, before, subject: Subject, outputs, info) -> None:
    """Every invariant of one successful step (module docstring)."""
    host, case = subject.host, Case(subject.backend, subject.dtype, subject.weights)
    assert [o.shape for o in outputs] == [a.shape for a in host]
    finite_in = [np.isfinite(a) for a in host]
    for position, (o, ok) in enumerate(zip(outputs, finite_in)):
        created = ok & ~np.isfinite(o)
        assert not created.any(), f"gradient #{position}: a finite element became {o[created][:3]}"
    all_finite = all(ok.all() for ok in finite_in)
    policy = _policy_of(clipper)
    config = clipper.config()
    # Element-wise rules hold on every element, NaN/inf included.
    if name in ("value", "zero_outliers"):
        for position, (e, o) in enumerate(zip(host, outputs)):
            if name == "value":
                expected = np.clip(e, config["min_value"], config["max_value"])
            else:
                expected = np.where(np.abs(e) > config["threshold"], 0.0, e)
            assert _agrees(e, o, expected, case).all(), f"{name}, gradient #{position}: {o.ravel()[:6]} != {expected.ravel()[:6]}"
    if policy == "zero":
        assert all(np.isfinite(o).all() for o in outputs), "nonfinite='zero' left a NaN/inf element"
        effective = [np.where(np.isfinite(a), a, 0.0) for a in host]
    else:
        effective = host
    if info["skip"]:
        assert _unchanged(host, outputs, case), f"{name}: a skipped step changed the gradients"
    if not all_finite:
        # info.finite describes the gradients as given, under every policy ("zero" included).
        assert not info["finite"], f"{name}: info.finite is True although the gradients held NaN/inf"
        if policy == "skip":
            assert info["skip"], f"{name}: nonfinite='skip' did not flag a step with NaN/inf"
        elif policy == "propagate" and name in GLOBAL_COEFFICIENT:
            assert _unchanged(host, outputs, case), f"{name}: a non-finite step under 'propagate' was changed"
    measurable = all(np.isfinite(a).all() for a in effective) and _norm(effective) <= _measurable_limit(case.dtype)
    if not measurable:
        return  # no bound is promised: the step is non-finite (handled by the policy above)
    if all_finite:
        assert info["finite"], "finite, in-range gradients reported non-finite"
        if name not in ("skip_on_spike", "skip_above"):  # they skip finite steps by design
            assert not info["skip"], f"{name}: a finite step was skipped"
    if not info["skip"]:
        check_rules(name, clipper, before, effective, outputs, info, case)


def run_step(name: str, clipper, backend: str, dtype: str, host, inplace: bool) -> None:
    """Clip ``host`` once and check every invariant; any exception fails the test."""
    subject = Subject(backend, dtype, host, inplace)
    before = clipper.state_dict()
    outputs, info = subject.clip(clipper)
    check_step(name, clipper, before, subject, outputs, info)


# -- the fuzz tests ---------------------------------------------------------------------------------
def _fuzz(name, backend, example, inplace, policy, warm):
    need(backend)
    dtype, host = example
    inplace = inplace and _inplace_ok(backend, name)
    with _x64(backend, dtype):
        clipper = make_with_policy(name, policy)
        _warm_up(clipper, backend, dtype, [a.shape for a in host], inplace, steps=warm)
        run_step(name, clipper, backend, dtype, host, inplace)


_DRAWN = dict(
    example=examples(),
    inplace=st.booleans(),
    policy=st.sampled_from(POLICIES),
    warm=st.sampled_from([1, WARM_STEPS]),
)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("name", CLIPPERS)
@FUZZ
@given(**_DRAWN)
def test_fuzzed_step_keeps_the_invariants(name, backend, example, inplace, policy, warm):
    _fuzz(name, backend, example, inplace, policy, warm)


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
@pytest.mark.parametrize("name", CLIPPERS)
@settings(FUZZ, max_examples=EXAMPLES_TF_JAX)
@given(**_DRAWN)
def test_fuzzed_step_keeps_the_invariants_tf_jax(name, backend, example, inplace, policy, warm):
    _fuzz(name, backend, example, inplace, policy, warm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CLIPPERS)
def test_edge_cases_keep_the_invariants(name, backend, dtype):
    """0-d, empty, denormals, 1e30 and NaN/inf in every clipper x backend x dtype; on NumPy and
    torch under each non-finite policy and in place too."""
    need(backend)
    broad = backend in ("numpy", "torch")
    policies = POLICIES if broad and _policy_key(name) else (None,)
    modes = (False, True) if _inplace_ok(backend, name) else (False,)
    with _x64(backend, dtype):
        for policy in policies:
            for label, host in edge_cases(dtype).items():
                for inplace in modes:
                    try:
                        run_step(name, _warmed(name, policy, dtype), backend, dtype, host, inplace)
                    except AssertionError as error:
                        raise AssertionError(f"case {label!r}, policy {policy}, in place {inplace}: {error}") from error


def test_the_edge_cases_cover_what_they_promise():
    for dtype in DTYPES:
        cases = edge_cases(dtype)
        smallest_normal = float(_finfo(dtype).tiny)
        for label, arrays in cases.items():
            assert [a.shape for a in arrays] == EDGE_SHAPES, label
        denormal = [v for a in cases["denormals"] for v in np.abs(a).ravel() if v]
        assert denormal and all(v < smallest_normal for v in denormal), dtype
        assert any(0 < abs(v) < smallest_normal for v in cases["clipped-with-denormals"][3]), dtype
        huge = np.abs(cases["1e30"][2])
        assert (np.isinf(huge).any() if dtype == "float16" else np.isclose(huge.max(), 1e30, rtol=0.01)), dtype
        specials = np.concatenate([a.ravel() for a in cases["nan-inf"]])
        assert np.isnan(specials).any() and np.isposinf(specials).any() and np.isneginf(specials).any()


# -- provoked failures ------------------------------------------------------------------------------
def _raising_variants(name: str):
    """Clippers of ``name`` that must raise on a NaN: its ``"raise"`` policy when it has one, and
    a chain whose first link writes in place before its last link raises (fresh objects each
    call, in the same order)."""
    if _policy_key(name):
        yield make_with_policy(name, "raise")
    yield gradclip.chain(gradclip.Value(clip_value=1e-3), make_with_policy(name, None), gradclip.NonFinite("raise"))


def _integer_like(backend: str, shape=(6,)):
    values = np.arange(int(np.prod(shape))).reshape(shape)
    if backend == "torch":
        import torch

        return torch.from_numpy(values)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.constant(values)
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(values)
    return values


def _provoke(name: str, backend: str, dtype: str, host: list[np.ndarray], fault: str, warm) -> None:
    """Provoke ``fault`` on every failing variant of ``name``: the call raises, the gradients and
    the state are as before, and the next step equals that of a twin loaded with the state from
    before the failure. ``warm(clipper, inplace)`` brings a clipper to its pre-failure state."""
    if fault == "nonfinite":
        host[-1].reshape(-1)[-1] = math.nan
    make = (lambda: [make_with_policy(name, None)]) if fault == "integer" else (lambda: list(_raising_variants(name)))
    # TensorFlow and JAX arrays are immutable: only NumPy and torch clip in place.
    inplace = backend == "numpy" or (backend == "torch" and fault == "nonfinite")
    for clipper, twin in zip(make(), make()):
        warm(clipper, inplace and _inplace_ok(backend, name))
        subject = Subject(backend, dtype, host, inplace=inplace)
        before_state, before = _state(clipper), subject.current()
        if fault == "integer":
            integer = _integer_like(backend)  # int64; int32 on JAX without jax_enable_x64
            grads = subject.grads + [integer]
            params = subject.params + [_integer_like(backend)]
            call = (lambda: clipper.clip_(grads)) if inplace else (lambda: clipper.clip(grads, params=params))
        elif inplace:
            call = lambda: clipper.clip_(subject.params if backend == "torch" else subject.grads)  # noqa: E731
        else:
            call = lambda: clipper.clip(subject.grads, params=subject.params)  # noqa: E731
        with pytest.raises(gradclip.GradClipError) as caught:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                call()
        if fault == "integer":
            assert isinstance(caught.value, TypeError) and dtype_name(integer) in str(caught.value)
        assert _same(subject.current(), before), f"{clipper!r}: a failed call changed the gradients"
        assert _state(clipper) == before_state, f"{clipper!r}: a failed call changed the state"
        # The state really is the one from before (not only its checkpoint): the next step is
        # that of a clipper that never saw the failure.
        twin.load_state_dict(json.loads(before_state))
        following = _rounded([np.linspace(-3.0, 3.0, a.size).reshape(a.shape) for a in host], dtype)
        after, info = Subject(backend, dtype, following, inplace=False).clip(clipper)
        expected, expected_info = Subject(backend, dtype, following, inplace=False).clip(twin)
        assert _same(after, expected) and json.dumps(info) == json.dumps(expected_info), f"{clipper!r}: the failure changed the next step"


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("name", CLIPPERS)
@FUZZ
@given(example=examples(), fault=st.sampled_from(["integer", "nonfinite"]))
def test_failures_change_nothing(name, backend, example, fault):
    """Provoked failures on drawn gradients (NumPy and torch, in place where they can).

    ``"integer"`` appends an int64 gradient after the float ones (a BackendError, on the
    functional path for torch, whose parameters cannot hold integer gradients); ``"nonfinite"``
    puts a NaN in the last gradient of a clipper that must raise on it (in place).
    """
    need(backend)
    dtype, host = example
    host = [np.where(np.isfinite(a), a, 1.0) for a in host if a.size] or [np.ones((2, 3))]
    _provoke(name, backend, dtype, host, fault, lambda c, inplace: _warm_up(c, backend, dtype, [a.shape for a in host], inplace))


@pytest.mark.parametrize("fault", ["integer", "nonfinite"])
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
@pytest.mark.parametrize("name", CLIPPERS)
def test_failures_change_nothing_tf_jax(name, backend, fault):
    """The same on TensorFlow (state held in ``tf.Variable``s) and JAX, on the edge-case shapes:
    the clipper takes a step on the backend (so its variables exist and hold state) before the
    failing call."""
    need(backend)
    dtype = "float32"
    host = [np.where(np.isfinite(a), a, 1.0) for a in edge_cases(dtype)["clipped-with-denormals"]]

    def warm(clipper, inplace):
        if clipper.name != "chain":  # the chains take their one step from scratch
            clipper.load_state_dict(json.loads(_warmed_state(name, _policy_of(clipper), dtype)))
        _warm_up(clipper, backend, dtype, EDGE_SHAPES, inplace, steps=1)

    _provoke(name, backend, dtype, host, fault, warm)
