"""Steps that carry no information: no gradient at all, or only zero gradients.

1. A call with no gradient (``clip_([])``, a module without parameters, every parameter frozen or
   without ``.grad``, ``clip([])``, ``update([], state)``, ``fold_([])``) has no array to infer the
   framework from. It used to run on NumPy against a torch/TensorFlow/JAX state and crash inside
   the algorithm (``"bitwise_and_cpu" not implemented for 'Float'``), and a fresh clipper kept a
   NumPy state that the next torch step crashed on. Now the kept (or given) state decides the
   backend and its device, and such a call is a no-op: the "found no gradients" warning
   (``clip_``), a ClipInfo of norm 0 and coefficient 1 at the threshold in force, and the state,
   the repeat guard and a pending checkpoint left exactly as they were. With a process group, a
   rank without gradients still joins the reduction as before.
2. QuantileNorm's bound no longer moves on a zero or non-finite norm of the step (ZClip, AutoClip
   and SkipOnSpike ignore such steps too); per-sample norms keep the paper's query, where an
   example with a zero gradient is an observation. Steps with a positive finite norm are
   unchanged bit for bit.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import gradclip
from gradclip._core.ops import framework_of
from _frameworks import convert, to64
from test_conformance import make_clipper, need, sequence

torch = pytest.importorskip("torch")

STATEFUL = [name for name in gradclip.available() if make_clipper(name).keeps_state]
#: The clippers whose state holds one entry per tensor (their quiet info comes from a state for none).
PER_TENSOR = [name for name in STATEFUL if make_clipper(name).per_tensor_state]


def _leaves(state):
    pending = [state]
    while pending:
        value = pending.pop()
        if isinstance(value, (tuple, list)):
            pending.extend(reversed(value))
        elif value is not None:
            yield value


def state_bits(clipper) -> list:
    """The kept state, leaf by leaf, as (dtype, shape, bytes) of its values (the checkpoint too)."""
    state = clipper._kept.state
    bits = []
    for leaf in _leaves(state):
        array = np.asarray(to64(leaf)) if not isinstance(leaf, (bool, int, float)) else np.asarray(leaf)
        bits.append((str(getattr(leaf, "dtype", type(leaf))), array.shape, array.tobytes()))
    return [bits, clipper.state_dict()]


def torch_params(grads, params):
    out = []
    for g, p in zip(grads, params):
        param = torch.nn.Parameter(torch.from_numpy(np.array(p, np.float32)))
        param.grad = torch.from_numpy(np.array(g, np.float32))
        out.append(param)
    return out


def assert_quiet_info(info, framework="torch"):
    """Norm 0, coefficient 1, nothing clipped or skipped, arrays of the state's framework."""
    fields = info.to_dict()
    assert fields["norm"] == 0.0 and fields["coef"] == 1.0
    assert not fields["clipped"] and fields["finite"] and not fields["skip"]
    assert {framework_of(getattr(info, k)) for k in ("norm", "threshold", "coef", "skip")} == {framework}


def same_step(a, b):
    """Two (outputs, info) results are identical bit for bit."""
    (out_a, info_a), (out_b, info_b) = a, b
    assert len(out_a) == len(out_b)
    for x, y in zip(out_a, out_b):
        assert np.asarray(to64(x)).tobytes() == np.asarray(to64(y)).tobytes()
    assert info_a.to_dict() == info_b.to_dict()


def _no_gradient(kind: str, params):
    if kind == "[]":
        return []
    if kind == "Module()":
        return torch.nn.Module()
    if kind == "Identity()":
        return torch.nn.Identity()
    frozen = [torch.nn.Parameter(p.detach().clone()) for p in params]  # .grad is None
    return frozen if kind == "grad None" else torch.nn.ParameterList(frozen)


# -- 1. no gradient at all ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["[]", "Module()", "Identity()", "grad None", "ParameterList"])
@pytest.mark.parametrize("name", STATEFUL)
def test_clip__without_gradients_after_torch_steps_changes_nothing(name, kind):
    steps, params = sequence()
    clipper, twin = make_clipper(name), make_clipper(name)
    for grads in steps[:2]:
        clipper.clip_(torch_params(grads, params))
        twin.clip_(torch_params(grads, params))
    kept, before = clipper._kept.state, state_bits(clipper)
    with pytest.warns(RuntimeWarning, match="found no gradients .* Nothing was clipped"):
        info = clipper.clip_(_no_gradient(kind, torch_params(steps[0], params)))
    assert_quiet_info(info)
    assert clipper._kept.state is kept and state_bits(clipper) == before
    # The next real step is the one an uninterrupted run takes.
    a, b = torch_params(steps[2], params), torch_params(steps[2], params)
    info_a, info_b = clipper.clip_(a), twin.clip_(b)
    same_step(([p.grad for p in a], info_a), ([p.grad for p in b], info_b))
    assert state_bits(clipper) == state_bits(twin)


@pytest.mark.parametrize("backend", ["numpy", "torch", "tensorflow", "jax"])
@pytest.mark.parametrize("name", STATEFUL)
def test_clip_without_gradients_keeps_the_state_on_every_backend(name, backend):
    need(backend)
    steps, params = sequence()
    p = [convert(backend, x, "float32") for x in params]
    clipper, twin = make_clipper(name), make_clipper(name)
    for grads in steps[:2]:
        clipper.clip([convert(backend, x, "float32") for x in grads], params=p)
        twin.clip([convert(backend, x, "float32") for x in grads], params=p)
    before = state_bits(clipper)
    for empty in ([], [None, None], {"w": None}):
        out, info = clipper.clip(empty)
        assert out == empty and state_bits(clipper) == before
        assert_quiet_info(info, backend)
    grads = [convert(backend, x, "float32") for x in steps[2]]
    same_step(clipper.clip(grads, params=p), twin.clip(grads, params=p))
    assert state_bits(clipper) == state_bits(twin)


@pytest.mark.parametrize("backend", ["numpy", "torch", "tensorflow", "jax"])
@pytest.mark.parametrize("name", STATEFUL)
def test_update_without_gradients_returns_the_state_it_was_given(name, backend):
    need(backend)
    steps, params = sequence()
    clipper = make_clipper(name)
    p = [convert(backend, x, "float32") for x in params]
    state = clipper.init([convert(backend, x, "float32") for x in steps[0]])
    for grads in steps[:2]:
        _, state, _ = clipper.update([convert(backend, x, "float32") for x in grads], state, params=p)
    out, same, info = clipper.update([None, None], state)
    assert out == [None, None] and same is state
    assert_quiet_info(info, backend)
    grads = [convert(backend, x, "float32") for x in steps[2]]
    after_quiet = clipper.update(grads, same, params=p)
    straight = clipper.update(grads, state, params=p)
    same_step(after_quiet[::2], straight[::2])


@pytest.mark.parametrize("name", [n for n in STATEFUL if make_clipper(n).cannot_fold_reason() is None])
def test_fold__without_gradients_decides_coefficient_one_and_changes_nothing(name):
    steps, params = sequence()
    clipper = make_clipper(name)
    clipper.fold_(torch_params(steps[0], params))
    before = state_bits(clipper)
    with pytest.warns(RuntimeWarning, match="found no gradients"):
        folded = clipper.fold_([], divide_by=torch.tensor(1024.0))
    assert float(folded.coef) == 1.0 and state_bits(clipper) == before
    assert_quiet_info(folded.info)


@pytest.mark.parametrize("name", STATEFUL)
def test_a_fresh_clipper_keeps_no_state_from_a_call_without_gradients(name):
    """It used to keep a NumPy initial state, on which the next torch step crashed."""
    steps, params = sequence()
    clipper = make_clipper(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert_quiet_info(clipper.clip_([]), "numpy")
        assert_quiet_info(clipper.clip_(torch.nn.Linear(2, 1)))  # before backward(): a torch info
    assert clipper.state_dict()["state"] is None and clipper._kept.layout is None
    a, b = torch_params(steps[0], params), torch_params(steps[0], params)
    info_a, info_b = clipper.clip_(a), make_clipper(name).clip_(b)
    same_step(([p.grad for p in a], info_a), ([p.grad for p in b], info_b))


@pytest.mark.parametrize("name", STATEFUL)
def test_a_pending_checkpoint_stays_pending(name):
    steps, params = sequence()
    source = make_clipper(name)
    for grads in steps[:2]:
        source.clip_(torch_params(grads, params))
    saved = source.state_dict()
    resumed = make_clipper(name)
    resumed.load_state_dict(saved)
    with pytest.warns(RuntimeWarning):
        resumed.clip_([])
    assert resumed._kept.pending is not None and resumed.state_dict() == saved
    a, b = torch_params(steps[2], params), torch_params(steps[2], params)
    info_a, info_b = resumed.clip_(a), source.clip_(b)
    same_step(([p.grad for p in a], info_a), ([p.grad for p in b], info_b))


def test_the_repeat_guard_survives_a_call_without_gradients():
    steps, params = sequence()
    clipper = gradclip.ZClip(warmup_steps=2)
    model = torch_params(steps[0], params)
    clipper.clip_(model)
    with pytest.warns(RuntimeWarning):
        clipper.clip_([])
    with pytest.raises(gradclip.StateError, match="called again on the same"):
        clipper.clip_(model)


@pytest.mark.parametrize("name", STATEFUL)
def test_the_step_runs_on_the_state_s_device(name):
    """The meta device stands in for an accelerator: an Ops built for no gradient on the CPU
    would mix devices with the kept state (``Tensor on device meta is not on the expected
    device cpu``)."""
    clipper = make_clipper(name)
    params = [torch.nn.Parameter(torch.empty(6, 4, device="meta")), torch.nn.Parameter(torch.empty(5, device="meta"))]
    for p in params:
        p.grad = torch.empty_like(p)
    clipper.clip_(params)
    with pytest.warns(RuntimeWarning):
        info = clipper.clip_([])
    assert all(getattr(info, k).device.type == "meta" for k in ("norm", "threshold", "coef", "skip"))


def test_the_info_reports_the_threshold_in_force():
    clipper = gradclip.QuantileNorm(initial_norm=2.0)
    clipper.clip_(torch_params([np.full(3, 10.0)], [np.zeros(3)]))  # clipped: C grows
    bound = clipper.state_dict()["state"]["norm"]
    with pytest.warns(RuntimeWarning):
        assert clipper.clip_([]).to_dict()["threshold"] == bound
    with pytest.warns(RuntimeWarning):
        assert gradclip.GlobalNorm(3.0).clip_([]).to_dict()["threshold"] == 3.0


def test_tensorflow_state_inside_tf_function():
    tf = pytest.importorskip("tensorflow")
    steps, _ = sequence()
    clipper = gradclip.ZClip(warmup_steps=2)
    grads = [tf.Variable(convert("tensorflow", x, "float32")) for x in steps[0]]
    tf.function(lambda: clipper.clip_(grads))()
    before = state_bits(clipper)
    _, info = tf.function(lambda: clipper.clip([]))()
    assert float(info.coef) == 1.0 and state_bits(clipper) == before


@pytest.mark.parametrize("name", PER_TENSOR)
def test_per_tensor_state_still_refuses_a_partial_layout(name):
    steps, params = sequence()
    clipper = make_clipper(name)
    clipper.clip_(torch_params(steps[0], params))
    with pytest.warns(RuntimeWarning):
        clipper.clip_([])  # nothing to match against the per-tensor entries: a no-op
    before = state_bits(clipper)
    with pytest.raises(gradclip.StateError, match="keeps one threshold per tensor"):
        clipper.clip_(torch_params(steps[1][:2], params[:2]))
    assert state_bits(clipper) == before


def test_bad_arguments_are_still_refused_without_gradients():
    clipper = gradclip.ZClip()
    clipper.clip_(torch_params([np.ones(3)], [np.zeros(3)]))
    before = state_bits(clipper)
    with pytest.raises(gradclip.InvalidArgumentError, match="unknown argument"), pytest.warns(RuntimeWarning):
        clipper.clip_([], bogus=1.0)
    with pytest.raises(gradclip.InvalidArgumentError, match="unknown argument"):
        clipper.clip([], bogus=1.0)
    assert state_bits(clipper) == before


def test_a_chain_holding_a_per_tensor_link():
    steps, _ = sequence()
    chain = gradclip.chain(gradclip.ZClip(warmup_steps=2), gradclip.AdaGC(start_clip_steps=2))
    twin = gradclip.chain(gradclip.ZClip(warmup_steps=2), gradclip.AdaGC(start_clip_steps=2))
    for grads in steps[:3]:
        chain.clip([torch.from_numpy(x) for x in grads])
        twin.clip([torch.from_numpy(x) for x in grads])
    before = state_bits(chain)
    assert_quiet_info(chain.clip([])[1])
    assert state_bits(chain) == before
    grads = [torch.from_numpy(x) for x in steps[3]]
    same_step(chain.clip(grads), twin.clip(grads))


# -- 2. QuantileNorm ignores zero and non-finite norms of the step ---------------------------------
@pytest.mark.parametrize("kind", ["no gradient", "zero gradients"])
def test_quantile_norm_bound_does_not_move_without_signal(kind):
    """The reported case: 100 such calls shrank C from 1 to 4.5e-5."""
    model = torch.nn.Linear(4, 1)
    clipper, twin = gradclip.QuantileNorm(), gradclip.QuantileNorm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(100):
            if kind == "no gradient":
                model.zero_grad(set_to_none=True)
            else:
                for p in model.parameters():
                    p.grad = torch.zeros_like(p)
            clipper.clip_(model)
    assert clipper.state_dict()["state"] in (None, {"norm": 1.0})
    model.zero_grad()
    (model(torch.ones(8, 4)).sum() * 0.5).backward()
    info = clipper.clip_(model)
    assert info.to_dict()["threshold"] == 1.0 and float(info.norm * info.coef) == pytest.approx(1.0, rel=1e-6)
    model.zero_grad()
    (model(torch.ones(8, 4)).sum() * 0.5).backward()
    twin_info = twin.clip_(model)
    assert twin_info.to_dict() == info.to_dict() and twin.state_dict() == clipper.state_dict()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_quantile_norm_zero_norm_in_every_entry_point(backend):
    def zero():
        return [convert(backend, np.zeros(3), "float32")]

    clipper = gradclip.QuantileNorm(initial_norm=2.0)
    clipper.clip([convert(backend, np.full(3, 5.0), "float32")])
    before = state_bits(clipper)
    clipper.clip(zero())
    if backend == "torch":  # torch tensors given to clip_ are parameters: their .grad is clipped
        param = torch.nn.Parameter(torch.ones(3))
        param.grad = torch.zeros(3)
        clipper.clip_([param])
        param.grad = torch.zeros(3)
        clipper.fold_([param])
    else:
        clipper.clip_(zero())
    assert state_bits(clipper) == before
    state = clipper.init(zero())
    _, after, info = clipper.update(zero(), state)
    assert float(after.norm) == float(state.norm) == 2.0 and not bool(info.clipped)


def test_quantile_norm_nonfinite_norms_do_not_move_the_bound_under_any_policy():
    for policy in ("propagate", "zero", "skip"):
        clipper = gradclip.QuantileNorm(nonfinite=policy)
        clipper.clip([np.ones(2, np.float32)])
        before = clipper.state_dict()["state"]
        clipper.clip([np.asarray([np.inf, np.nan], np.float32)])
        assert clipper.state_dict()["state"] == before, policy


def test_quantile_norm_per_sample_zero_norms_are_observations():
    """DP (Andrew et al. 2021): an example whose gradient is zero is unclipped, b counts it."""
    q, lr = 0.5, 0.2
    clipper = gradclip.QuantileNorm(target_quantile=q, learning_rate=lr, initial_norm=1.0)
    clipper.clip([np.zeros(3, np.float32)], sample_norms=np.zeros(4, np.float32))
    assert clipper.state_dict()["state"]["norm"] == pytest.approx(math.exp(-lr * (1 - q)), rel=1e-6)


def test_quantile_norm_per_sample_torch_zero_example_gradients_move_the_bound():
    gct = pytest.importorskip("gradclip.torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    ps = gct.PerSample(model, gradclip.QuantileNorm(target_quantile=0.5, learning_rate=0.5, initial_norm=1.0))
    ps.backward(model(torch.randn(6, 4)).pow(2).sum(1) * 0.0)  # every example's gradient is zero
    assert float(ps.state.norm) == pytest.approx(math.exp(-0.5 * 0.5), rel=1e-6)


def _generic_bounds(backend, norms, q, lr, initial, low=1e-12, high=1e12):
    """The update as computed before the change, in the backend's own fp32 arithmetic:
    b = fp32(norm <= C) in the norm's dtype, C <- clamp(C * exp((b - q) * -lr))."""
    if backend == "torch":
        bound, out = torch.tensor(initial, dtype=torch.float32), []
        for n in norms:
            out.append(float(bound))
            b = (n <= bound.double()).float()
            bound = torch.clamp(bound * torch.exp((b - q) * -lr), torch.tensor(low), torch.tensor(high))
        return out
    bound, out = np.asarray(np.float32(initial)), []
    for n in norms:
        out.append(float(bound))
        b = np.asarray(n <= bound.astype(np.float64)).astype(np.float32)
        bound = np.clip(bound * np.exp((b - q) * -lr), np.float32(low), np.float32(high))
    return out


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("q,lr,initial", [(0.5, 0.2, 1.0), (0.1, 0.05, 3.0), (0.9, 1.3, 0.1), (1 / 3, 0.7, 2.5), (1.0, 2.0, 1.0), (0.0, 0.0, 1.0)])
def test_quantile_norm_positive_norms_unchanged_bit_for_bit(backend, q, lr, initial):
    rng = np.random.default_rng(7)
    grads = [rng.normal(size=4) * rng.lognormal(0.0, 1.5) for _ in range(40)]
    clipper = gradclip.QuantileNorm(target_quantile=q, learning_rate=lr, initial_norm=initial)
    ours, norms = [], []
    for g in grads:
        _, info = clipper.clip([convert(backend, g, "float64")])
        ours.append(info.to_dict()["threshold"])
        norms.append(info.norm)  # the backend's own fp64 norm, compared as the clipper compares it
    assert ours == _generic_bounds(backend, norms, q, lr, initial)


@pytest.mark.parametrize("q", [0.0, 0.5, 1.0, 0.1, 0.9, 1 / 3, 0.999999, 1e-30])
@pytest.mark.parametrize("lr", [0.0, 0.2, 0.05, 1.0, 7.3, 1e-8, 1e30])
def test_quantile_norm_exponents_are_the_device_arithmetic(q, lr):
    from gradclip.clippers.quantile import _exponents

    for b, want in zip((1.0, 0.0), _exponents(q, lr)):
        device = (torch.tensor(b, dtype=torch.float32) - q) * -lr
        host = (np.asarray(np.float32(b)) - q) * -lr
        assert np.float32(want).tobytes() == device.numpy().tobytes() == np.asarray(host, np.float32).tobytes()
