"""SpikeAware: SPAM's spike-aware element-wise clip against the optimizer's second moment.

The reference is the SPAM optimizer of TianjinYellow/SPAM-Optimizer, ``galore_torch/SPAM.py`` at
commit e8185fbe695fdc449953b4a1f96121df5bf0d268: its ``AdamW.step`` (without GaLore's random
``density`` masks, which are not part of the clip) is transcribed below as
:func:`reference_spam_step`, the masking lines verbatim. Replaying it against SpikeAware plus the
same Adam update, with the momentum resets driven by :meth:`SpikeAware.reset_due`, gives the same
parameters bit for bit; the deviations named in :mod:`gradclip.clippers.spam` are
``test_deviation_*``.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import test_conformance as conformance
from _frameworks import convert

import gradclip

torch = pytest.importorskip("torch")


class CosineDecay:
    """The reference's CosineDecay (SPAM.py), transcribed: CosineAnnealingLR over a dummy SGD."""

    def __init__(self, death_rate, T_max, eta_min=0, last_epoch=-1):
        self.sgd = torch.optim.SGD(torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(1))]), lr=death_rate)
        self.cosine_stepper = torch.optim.lr_scheduler.CosineAnnealingLR(self.sgd, T_max + 1, eta_min, last_epoch)
        self.T_max, self.eta_min = T_max, eta_min

    def get_dr(self, current_step):
        if current_step >= self.T_max:
            return self.eta_min
        with warnings.catch_warnings():  # the reference's scheduler use is deprecated in torch
            warnings.simplefilter("ignore", UserWarning)
            self.cosine_stepper.step(current_step)
        return self.sgd.param_groups[0]["lr"]


class Spam:
    """The state SPAM's ``AdamW`` keeps: per parameter exp_avg, exp_avg_sq and step; globally
    total_step, current_step and the warm-up after a reset."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, warmup_steps=150, threshold=5000, DeltaT=500, grad_accu_steps=20):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.state = {id(p): {} for p in params}
        self.total_step, self.current_step = 0, warmup_steps + 1
        self.DeltaT, self.warmup_steps, self.thres, self.grad_accu_steps = DeltaT, warmup_steps, threshold, grad_accu_steps
        self.warmup = CosineDecay(0.99, warmup_steps)


def reference_spam_step(opt: Spam, clip: bool = True) -> None:
    """``AdamW.step`` of SPAM.py for parameters without ``density``; ``clip=False`` leaves out
    only the threshold masking (the gradients were clipped before, by SpikeAware)."""
    with torch.no_grad():
        scale_factor = 1 - opt.warmup.get_dr(opt.current_step)
        for p in opt.params:
            grad = p.grad
            state = opt.state[id(p)]
            if "step" not in state:
                state["step"] = 0
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
            if (opt.total_step + 1) % opt.DeltaT == 0:
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            beta1, beta2 = opt.betas
            state["step"] += 1
            if clip and opt.thres != 0:
                current_step = opt.total_step + 1
                if current_step >= opt.grad_accu_steps:
                    exp_avg_sq1 = exp_avg_sq
                    mask = (grad**2) > (opt.thres * exp_avg_sq1)
                    if opt.DeltaT != 0:
                        if current_step % opt.DeltaT >= opt.grad_accu_steps:
                            grad[mask] = grad[mask].sign() * torch.sqrt(exp_avg_sq1[mask] * opt.thres)
                    else:
                        grad[mask] = grad[mask].sign() * torch.sqrt(exp_avg_sq1[mask] * opt.thres)
            exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = exp_avg_sq.sqrt().add_(opt.eps)
            step_size = opt.lr
            bias_correction1 = 1.0 - beta1 ** state["step"]
            bias_correction2 = 1.0 - beta2 ** state["step"]
            step_size *= math.sqrt(bias_correction2) / bias_correction1
            p.add_(exp_avg / denom, alpha=-step_size * scale_factor)
        opt.total_step += 1
        opt.current_step += 1
        if opt.total_step != 0 and (opt.total_step + 1) % opt.DeltaT == 0:
            opt.current_step = 0
            opt.warmup = CosineDecay(0.99, opt.warmup_steps)


def _problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(6, 5, generator=generator)), torch.nn.Parameter(torch.randn(6, generator=generator))]
    data = [(torch.randn(8, 5, generator=generator), torch.randn(8, 6, generator=generator)) for _ in range(16)]
    return params, data


def _backward(params, x, y, step, spikes):
    for p in params:
        p.grad = None
    loss = ((x @ params[0].T + params[1] - y) ** 2).mean() * (300.0 if step in spikes else 1.0)
    loss.backward()


@pytest.mark.parametrize("delta_t", [15, 0])
def test_spike_aware_with_adam_replays_the_spam_reference_bit_for_bit(delta_t):
    """SPAM with θ = 50 (so quiet steps clip too), resets every 15 steps (or none), 5 steps of
    warm-up: the reference clipping inside its step, and SpikeAware before the same step given
    ``exp_avg_sq``, the moments reset where ``reset_due`` says, end at the same parameters."""
    steps, spikes = 60, {12, 31, 44}
    kwargs = {"lr": 1e-2, "warmup_steps": 10, "threshold": 50, "DeltaT": delta_t or 10**9, "grad_accu_steps": 5}
    ref_params, data = _problem()
    reference = Spam(ref_params, **kwargs)
    our_params, _ = _problem()
    ours = Spam(our_params, **kwargs)
    clipper = gradclip.SpikeAware(theta=50.0, warmup_steps=5, reset_interval=delta_t or None)
    clipped_steps = 0
    for step in range(steps):
        x, y = data[step % len(data)]
        _backward(ref_params, x, y, step, spikes)
        reference_spam_step(reference)
        _backward(our_params, x, y, step, spikes)
        if clipper.reset_due(step + 1):  # SPAM resets before the clip of step t = step + 1
            for p in our_params:
                state = ours.state[id(p)]
                if "exp_avg" in state:
                    state["exp_avg"].zero_(), state["exp_avg_sq"].zero_()
        moments = [ours.state[id(p)].get("exp_avg_sq") for p in our_params]
        info = clipper.clip_(our_params, optimizer_state=moments)
        clipped_steps += bool(info.clipped)
        reference_spam_step(ours, clip=False)
    for a, b in zip(ref_params, our_params):
        assert torch.equal(a, b)
    assert clipped_steps >= 10
    assert clipper.state_dict()["state"] == {"step": steps}


def test_the_rule_and_its_warm_up():
    clipper = gradclip.SpikeAware(theta=4.0, warmup_steps=3)
    v = [np.array([1.0, 1.0, 0.0, 4.0], np.float32)]
    g = np.array([3.0, -3.0, 0.0, 3.0], np.float32)  # g² > 4v, < -, 0 vs 0, 9 < 16
    for step in range(1, 5):
        (out,), info = clipper.clip([g.copy()], optimizer_state=v)
        if step < 3:  # steps 1 and 2: warm-up, untouched
            np.testing.assert_array_equal(out, g)
            assert not bool(info.clipped) and float(info.coef) == 1.0
        else:
            np.testing.assert_array_equal(out, [2.0, -2.0, 0.0, 3.0])
            assert bool(info.clipped)
            assert float(info.coef) == pytest.approx(np.linalg.norm(out) / np.linalg.norm(g), rel=1e-6)
    assert math.isinf(float(info.threshold))


def test_periodic_resets_pause_the_clip_after_each():
    clipper = gradclip.SpikeAware(theta=1.0, warmup_steps=2, reset_interval=5)
    clipped = []
    for _ in range(12):
        _, info = clipper.clip([np.array([10.0], np.float32)], optimizer_state=[np.array([1.0], np.float32)])
        clipped.append(bool(info.clipped))
    # t = 1..12: t >= 2 and t % 5 >= 2 -> 2, 3, 4, 7, 8, 9, 12
    assert [t for t, c in enumerate(clipped, start=1) if c] == [2, 3, 4, 7, 8, 9, 12]
    assert [t for t in range(1, 13) if clipper.reset_due(t)] == [5, 10]
    assert bool(clipper.reset_due(torch.tensor(10))) and not bool(clipper.reset_due(torch.tensor(11)))
    assert gradclip.SpikeAware().reset_due(500) is False  # no reset_interval: never


def test_without_optimizer_state_or_for_a_none_entry_gradients_pass_through():
    clipper = gradclip.SpikeAware(theta=1.0, warmup_steps=0)
    g = [np.array([100.0], np.float32), np.array([100.0], np.float32)]
    out, info = clipper.clip([x.copy() for x in g])
    assert [float(o[0]) for o in out] == [100.0, 100.0] and not bool(info.clipped)
    out, info = clipper.clip([x.copy() for x in g], optimizer_state=[None, np.ones(1, np.float32)])
    assert [float(o[0]) for o in out] == [100.0, 1.0] and bool(info.clipped)
    assert clipper.state_dict()["state"] == {"step": 2}  # the count advances either way


def test_nonfinite_elements():
    clipper = gradclip.SpikeAware(theta=1.0, warmup_steps=0)
    (out,), info = clipper.clip([np.array([np.nan, np.inf, -np.inf, 0.5], np.float32)], optimizer_state=[np.ones(4, np.float32)])
    assert np.isnan(out[0]) and list(out[1:]) == [1.0, -1.0, 0.5]
    assert not bool(info.finite) and bool(info.clipped)
    skipping = gradclip.SpikeAware(theta=1.0, warmup_steps=0, nonfinite="skip")
    (out,), info = skipping.clip([np.array([np.nan, 5.0], np.float32)], optimizer_state=[np.ones(2, np.float32)])
    assert bool(info.skip) and out[1] == 5.0  # a skipped step is left alone


# -- every backend, compiled ---------------------------------------------------------------------------
def _moments_for(steps):
    rng = np.random.default_rng(5)
    return [[np.abs(rng.normal(size=g.shape)) * 0.05 for g in grads] for grads in steps]


def _run(backend, dtype, compiled=False):
    steps, _ = conformance.sequence()
    moments = _moments_for(steps)
    clipper = gradclip.SpikeAware(theta=20.0, warmup_steps=2)
    results = []
    if compiled and backend == "tensorflow":
        import tensorflow as tf

        call = tf.function(lambda g, v: clipper.clip(g, optimizer_state=v))
        for grads, v in zip(steps, moments):
            results.append(conformance.record(*call([convert(backend, x, dtype) for x in grads], [convert(backend, x, "float32") for x in v])))
        assert call.experimental_get_tracing_count() <= 2
        return results
    if compiled and backend == "jax":
        import jax

        update = jax.jit(lambda g, s, v: clipper.update(g, s, optimizer_state=v))
        state = clipper.init([convert(backend, x, dtype) for x in steps[0]])
        for grads, v in zip(steps, moments):
            out, state, info = update([convert(backend, x, dtype) for x in grads], state, [convert(backend, x, "float32") for x in v])
            results.append(conformance.record(out, info))
        return results
    for grads, v in zip(steps, moments):
        out, info = clipper.clip([convert(backend, x, dtype) for x in grads], optimizer_state=[convert(backend, x, "float32") for x in v])
        results.append(conformance.record(out, info))
    return results


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("backend", ["torch", "tensorflow", "jax"])
def test_every_backend_matches_numpy(backend, dtype):
    conformance.need(backend)
    with conformance._x64(backend, dtype):
        got = _run(backend, dtype)
    expected = _run("numpy", dtype)
    assert any(info["clipped"] for _, info, _ in expected)
    conformance.assert_same(got, expected, dtype, f"spike_aware on {backend} {dtype}")


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_compiled_paths_equal_eager(backend):
    conformance.need(backend)
    conformance.assert_same(_run(backend, "float32", compiled=True), _run(backend, "float32"), "float32", f"spike_aware compiled on {backend}")


def test_optax_adam_second_moments_under_jit():
    """JAX: the ``nu`` leaves of ``optax.scale_by_adam``'s state, in the order of the gradient
    leaves, are the optimizer state."""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    params = {"b": jnp.zeros(3), "w": jnp.zeros((2, 3))}
    adam = optax.scale_by_adam()
    adam_state = adam.init(params)
    clipper = gradclip.SpikeAware(theta=10.0, warmup_steps=2)
    clip_state = clipper.init(params)

    @jax.jit
    def step(grads, clip_state, adam_state):
        nu = jax.tree_util.tree_leaves(adam_state.nu)
        grads, clip_state, info = clipper.update(grads, clip_state, optimizer_state=nu)
        updates, adam_state = adam.update(grads, adam_state)
        return grads, clip_state, adam_state, info

    quiet = {"b": jnp.ones(3), "w": jnp.ones((2, 3))}
    for _ in range(3):
        _, clip_state, adam_state, info = step(quiet, clip_state, adam_state)
    spike = {"b": jnp.full(3, 100.0), "w": jnp.ones((2, 3))}
    nu = {k: np.asarray(v) for k, v in adam_state.nu.items()}
    out, clip_state, adam_state, info = step(spike, clip_state, adam_state)
    assert bool(info.clipped)
    # "b" is bounded at sqrt(θ·nu) of its own entries, "w" (whose ones are under its bound
    # after being bounded on the quiet steps: nu is tiny there) is bounded the same way.
    np.testing.assert_allclose(np.asarray(out["b"]), np.sqrt(10.0 * nu["b"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["w"]), np.minimum(1.0, np.sqrt(10.0 * nu["w"])), rtol=1e-6)


# -- deviations ---------------------------------------------------------------------------------------
def test_deviation_bf16_compares_in_fp32():
    """The reference squares a bf16 gradient in bf16: (1 + 2⁻⁷)² rounds to exactly v and is not
    above it. Here the comparison runs in fp32, where it is: the element is bounded (its new
    value rounds back to the same bf16 number)."""
    g = torch.tensor([1.0078125], dtype=torch.bfloat16)
    v = torch.tensor([1.015625], dtype=torch.bfloat16)
    assert not bool(((g**2) > (1 * v))[0])  # the reference's mask, in bf16
    (out,), info = gradclip.SpikeAware(theta=1.0, warmup_steps=0).clip([g.clone()], optimizer_state=[v])
    assert bool(info.clipped) and out.dtype == torch.bfloat16 and float(out[0]) == pytest.approx(1.0078125)


# -- bad input --------------------------------------------------------------------------------------------
def test_bad_optimizer_state_is_refused_before_anything_changes():
    clipper = gradclip.SpikeAware(theta=1.0, warmup_steps=0)
    clipper.clip([torch.ones(2)], optimizer_state=[torch.ones(2)])
    saved = clipper.state_dict()
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    for p in params:
        p.grad = torch.full(p.shape, 50.0)
    cases = [
        ([torch.ones(2)], r"optimizer_state has 1 entries for 2 gradient\(s\)"),
        ([torch.ones(2), torch.ones(4)], r"optimizer_state entry for #1 has shape \(4,\) but the gradient has shape \(3,\)"),
        ({"a": torch.ones(2)}, r"optimizer_state must be a list \(or tuple\) with one entry per gradient.*got dict"),
        (torch.ones(2), r"optimizer_state must be a list \(or tuple\).*got Tensor"),
        ([torch.ones(2), 1.0], r"optimizer_state\[1\] must be an array or None, got float"),
        ([torch.ones(2), np.ones(3, np.float32)], r"optimizer_state\[1\] is a numpy array but the gradients are torch arrays"),
    ]
    for state, pattern in cases:
        with pytest.raises(gradclip.InvalidArgumentError, match=pattern):
            clipper.clip_(params, optimizer_state=state)
        for p in params:
            assert torch.equal(p.grad, torch.full(p.shape, 50.0))
        assert clipper.state_dict() == saved


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"theta": 0.0}, r"SpikeAware: theta must be in \(0, inf\), got 0.0"),
        ({"theta": float("inf")}, r"SpikeAware: theta must be in \(0, inf\), got inf"),
        ({"warmup_steps": -1}, r"SpikeAware: warmup_steps must be an integer >= 0, got -1"),
        ({"reset_interval": 0}, r"SpikeAware: reset_interval must be an integer >= 1 or None, got 0"),
        ({"warmup_steps": 20, "reset_interval": 20}, r"warmup_steps must be below reset_interval=20 \(no step would ever clip\), got 20"),
        ({"nonfinite": "ignore"}, r"nonfinite must be one of"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(gradclip.InvalidArgumentError, match=pattern):
        gradclip.SpikeAware(**kwargs)


def test_reset_due_refuses_a_step_that_is_not_an_integer():
    for step in (2.5, True, "3"):
        with pytest.raises(gradclip.InvalidArgumentError, match="SpikeAware.reset_due: step must be an integer"):
            gradclip.SpikeAware(warmup_steps=2, reset_interval=10).reset_due(step)


def test_checkpoint_round_trip_keeps_the_reset_phase():
    make = lambda: gradclip.SpikeAware(theta=1.0, warmup_steps=2, reset_interval=5)  # noqa: E731
    v = [np.ones(1, np.float32)]
    whole = make()
    expected = [bool(whole.clip([np.array([10.0], np.float32)], optimizer_state=v)[1].clipped) for _ in range(12)]
    first = make()
    for _ in range(6):
        first.clip([np.array([10.0], np.float32)], optimizer_state=v)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got = [bool(resumed.clip([np.array([10.0], np.float32)], optimizer_state=v)[1].clipped) for _ in range(6)]
    assert got == expected[6:]
    with pytest.raises(gradclip.StateError, match="'step' holds -1"):
        resumed.load_state_dict({**first.state_dict(), "state": {"step": -1}})
