"""SkipOnSpike on the loss (signal="loss" | "both", log_space): the rule, OLMo-core's parity, state.

The reference is OLMo-core's ``SkipStepOptimizer.get_step_factor`` (allenai/OLMo-core,
``src/olmo_core/optim/skip_step_optimizer.py`` at commit 067267cab2aecb935b1dab1dbfcecc1a5754b1e0),
ported below as :class:`OlmoSkipStep`; the deviations named in :mod:`gradclip.clippers.spike` are
each a ``test_deviation_*``.
"""

from __future__ import annotations

import collections
import json
import math

import numpy as np
import pytest
from _frameworks import convert

import gradclip


class OlmoSkipStep:
    """OLMo-core's rule, transcribed: every value is appended (spikes too) to a deque of
    ``rolling_interval_length + 1``; no skip before ``max(20, length // 2)`` losses; otherwise
    skip when ``|x - mean| / std > sigma`` for the loss, or for the grad norm when one is given,
    with ``torch.std_mean`` (ddof=1) over the values before the current one."""

    def __init__(self, rolling_interval_length=128, sigma_factor=6):
        self.length, self.sigma = rolling_interval_length, sigma_factor
        self.losses = collections.deque(maxlen=rolling_interval_length + 1)
        self.norms = collections.deque(maxlen=rolling_interval_length + 1)

    def step(self, loss, grad_norm=None):
        torch = pytest.importorskip("torch")
        self.losses.append(torch.tensor(loss, dtype=torch.float32))
        if grad_norm is not None:
            self.norms.append(torch.tensor(grad_norm, dtype=torch.float32))
        if len(self.losses) < max(20, self.length // 2):
            return False
        std, mean = torch.std_mean(torch.stack(list(self.losses)[:-1]))
        ok = bool((self.losses[-1] - mean).abs().div(std) <= self.sigma)
        if self.norms:
            std, mean = torch.std_mean(torch.stack(list(self.norms)[:-1]))
            ok = ok and bool((self.norms[-1] - mean).abs().div(std) <= self.sigma)
        return not ok


def _ours(window, sigma, signal, **kwargs):
    """Ours configured as OLMo-core: its warm-up of max(20, window // 2) values counts the
    current one; no spread floor."""
    return gradclip.SkipOnSpike(
        window=window, sigma=sigma, min_history=max(20, window // 2) - 1, std_floor=0.0, signal=signal, **kwargs
    )


def _feed(clipper, losses, norms=None, backend="numpy"):
    out = []
    for i, loss in enumerate(losses):
        norm = 1.0 if norms is None else norms[i]
        g = [convert(backend, np.array([0.0, norm]), "float32")]
        loss_value = convert(backend, np.array(loss), "float32") if backend != "numpy" else loss
        out.append(clipper.clip(g, loss=loss_value)[1].to_dict())
    return out


def _losses(n=120, seed=0, spikes=(), scale=1.0):
    rng = np.random.default_rng(seed)
    values = 2.0 * np.exp(-np.arange(n) / 200.0) + 0.05 * rng.standard_normal(n)
    for step, factor in spikes:
        values[step] *= factor
    return [float(np.float32(v * scale)) for v in values]


# -- OLMo-core parity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [32, 64])
def test_loss_decisions_match_olmo_core_up_to_the_first_skip(window):
    """With rises only, both rules agree step by step until the first skip, that one included
    (after it the windows differ by design: test_deviation_skipped_values_stay_out_of_the_window)."""
    losses = _losses(spikes=[(70, 2.5)])
    reference = OlmoSkipStep(window, 6)
    expected = [reference.step(loss) for loss in losses]
    first = expected.index(True)
    assert first == 70
    got = [info["skip"] for info in _feed(_ours(window, 6.0, "loss"), losses)]
    assert got[: first + 1] == expected[: first + 1]


def test_both_signals_match_olmo_core_up_to_the_first_skip():
    losses = _losses(seed=1)
    rng = np.random.default_rng(2)
    norms = [float(np.float32(x)) for x in 1.0 + 0.05 * rng.standard_normal(len(losses))]
    norms[80] = 3.0  # a grad-norm spike with a quiet loss: skipped by either rule
    reference = OlmoSkipStep(64, 6)
    expected = [reference.step(loss, norm) for loss, norm in zip(losses, norms)]
    assert expected.index(True) == 80
    got = [info["skip"] for info in _feed(_ours(64, 6.0, "both"), losses, norms)]
    assert got[:81] == expected[:81]


def test_deviation_one_sided():
    """OLMo-core tests |z|: a sudden drop of the loss skips the step. Only rises skip here."""
    losses = _losses(spikes=[(60, 0.5)])
    reference = OlmoSkipStep(64, 6)
    assert [reference.step(loss) for loss in losses][60] is True
    assert not any(info["skip"] for info in _feed(_ours(64, 6.0, "loss"), losses))


def test_deviation_skipped_values_stay_out_of_the_window():
    """OLMo-core appends the spike to its window, which widens its band: a smaller spike two
    steps later passes there. Here skipped values never enter the window: it is skipped too."""
    losses = _losses(spikes=[(60, 3.0), (62, 1.8)])
    reference = OlmoSkipStep(64, 6)
    olmo = [reference.step(loss) for loss in losses]
    assert [i for i, skip in enumerate(olmo) if skip] == [60]
    ours = [info["skip"] for info in _feed(_ours(64, 6.0, "loss"), losses)]
    assert [i for i, skip in enumerate(ours) if skip] == [60, 62]


def test_deviation_spread_floor_on_identical_values():
    """A window of identical losses has std 0: OLMo-core's z is then inf (or 0/0 = NaN for the
    same value), and it skips every step, the unchanged loss included. The floor (1% of |mean|
    by default) keeps such steps."""
    losses = [1.0] * 40 + [1.0, 1.001, 1.05]
    reference = OlmoSkipStep(32, 6)
    assert [reference.step(loss) for loss in losses][-3:] == [True, True, True]
    skips = [info["skip"] for info in _feed(gradclip.SkipOnSpike(window=32, sigma=6.0, signal="loss"), losses)]
    assert skips[-3:] == [False, False, False]


# -- the rule ------------------------------------------------------------------------------------------
def reference_rule(values, window, sigma, min_history, std_floor, log_space=False, signed=True):
    """Float64: window of accepted values (current excluded, ddof=1), spread floored at
    std_floor·|mean| (log space: std_floor), non-finite skipped; log space: statistics of log x,
    values <= 0 accepted and not recorded."""
    accepted, out = [], []
    for x in values:
        recent = np.asarray(accepted[-window:], np.float64)
        if len(recent) >= min_history:
            data = np.log(recent) if log_space else recent
            floor = std_floor if log_space else std_floor * abs(data.mean())
            level = data.mean() + sigma * max(data.std(ddof=1), floor)
            limit = math.exp(level) if log_space else level
        else:
            limit = math.inf
        skip = not math.isfinite(x) or x > limit
        out.append((skip, limit))
        if not skip and (x > 0 or (not log_space and not signed)):
            accepted.append(x)
    return out


@pytest.mark.parametrize("backend", ["numpy", "torch", "tensorflow", "jax"])
@pytest.mark.parametrize("log_space", [False, True])
def test_loss_rule_on_every_backend(backend, log_space):
    pytest.importorskip({"numpy": "numpy", "torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}[backend])
    losses = _losses(n=60, spikes=[(30, 3.0), (31, 0.2), (45, 10.0)])
    losses[40] = math.nan
    losses[41] = math.inf
    clipper = gradclip.SkipOnSpike(window=16, sigma=3.0, min_history=5, signal="loss", log_space=log_space)
    expected = reference_rule(losses, 16, 3.0, 5, 0.01, log_space=log_space, signed=False)
    for step, (info, (skip, limit)) in enumerate(zip(_feed(clipper, losses, backend=backend), expected)):
        assert info["skip"] == skip, step
        assert info["threshold"] == pytest.approx(limit, rel=1e-5), step
        assert info["coef"] == 1.0 and not info["clipped"]
    assert sum(s for s, _ in expected) >= 4
    state = clipper.state_dict()["state"]
    assert set(state) == {"loss_window", "loss_count", "skipped"}
    assert state["skipped"] == sum(s for s, _ in expected)


def test_negative_losses_in_linear_space_and_the_floor_on_their_magnitude():
    """A loss may be negative (a log-likelihood, an RL objective): it is recorded, and the floor
    uses |mean| so a window of identical negative values does not skip forever."""
    losses = [-5.0] * 10 + [-4.99, -4.0]
    skips = [i["skip"] for i in _feed(gradclip.SkipOnSpike(window=8, sigma=3.0, min_history=4, signal="loss"), losses)]
    assert skips == [False] * 11 + [True]


def test_log_space_ignores_non_positive_losses_and_skips_on_ratios():
    """In log space a spike is a ratio: the same x3 jump is caught at every loss scale; a loss
    <= 0 (no logarithm) is accepted and not recorded."""
    for scale in (1e-3, 1.0, 1e3):
        losses = _losses(n=50, spikes=[(40, 3.0)], scale=scale)
        losses[20] = 0.0
        clipper = gradclip.SkipOnSpike(window=16, sigma=4.0, min_history=5, signal="loss", log_space=True)
        infos = _feed(clipper, losses)
        assert [i for i, info in enumerate(infos) if info["skip"]] == [40], scale
        assert clipper.state_dict()["state"]["loss_count"] == 48


def test_both_skips_on_either_and_records_neither_on_a_skipped_step():
    clipper = gradclip.SkipOnSpike(window=8, sigma=3.0, min_history=4, signal="both")
    quiet = _feed(clipper, [1.0, 1.01, 0.99, 1.0, 1.02], [2.0, 2.1, 1.9, 2.0, 2.05])
    assert not any(info["skip"] for info in quiet)
    before = clipper.state_dict()["state"]
    loss_spike = _feed(clipper, [5.0], [2.0])[0]
    norm_spike = _feed(clipper, [1.0], [20.0])[0]
    assert loss_spike["skip"] and norm_spike["skip"]
    after = clipper.state_dict()["state"]
    assert (after["count"], after["loss_count"]) == (before["count"], before["loss_count"]) == (5, 5)
    assert after["skipped"] == 2
    # The reported threshold is the gradient norm's (in the units of info.norm).
    assert norm_spike["threshold"] < 20.0 and norm_spike["norm"] == pytest.approx(20.0)


def test_loss_only_still_skips_non_finite_gradients():
    clipper = gradclip.SkipOnSpike(window=8, min_history=4, signal="loss")
    (info,) = _feed(clipper, [1.0], [math.nan])
    assert info["skip"] and not info["finite"]
    assert clipper.state_dict()["state"]["loss_count"] == 0


def test_a_torch_loss_with_history_is_detached_and_clip_in_place_works():
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 1)
    clipper = gradclip.SkipOnSpike(window=8, min_history=4, signal="both")
    for step in range(6):
        model.zero_grad()
        loss = (model(torch.ones(2, 3)) ** 2).mean() * (50.0 if step == 5 else 1.0)
        loss.backward()
        info = clipper.clip_(model, loss=loss)
    assert bool(info.skip)
    assert clipper._kept.state.loss_window.requires_grad is False
    assert clipper.state_dict()["state"]["loss_count"] == 5


def test_compiled_paths_take_the_loss_as_an_input():
    tf = pytest.importorskip("tensorflow")
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    losses = _losses(n=30, spikes=[(25, 4.0)])
    expected = [i["skip"] for i in _feed(gradclip.SkipOnSpike(window=8, min_history=4, signal="loss"), losses)]
    clipper = gradclip.SkipOnSpike(window=8, min_history=4, signal="loss")
    step = tf.function(lambda g, loss: clipper.clip([g], loss=loss)[1].skip)
    got = [bool(step(tf.constant([1.0, 2.0]), tf.constant(loss))) for loss in losses]
    assert got == expected and step.experimental_get_tracing_count() <= 2
    clipper = gradclip.SkipOnSpike(window=8, min_history=4, signal="loss")
    update = jax.jit(lambda g, s, loss: clipper.update(g, s, loss=loss))
    state = clipper.init([jnp.ones(2)])
    got = []
    for loss in losses:
        _, state, info = update([jnp.ones(2)], state, jnp.float32(loss))
        got.append(bool(info.skip))
    assert got == expected


# -- state and checkpoints ---------------------------------------------------------------------------
def test_the_state_holds_the_windows_the_signal_needs():
    g = [np.ones(2, np.float32)]
    assert set(gradclip.SkipOnSpike().init(g)._fields) == {"window", "count", "skipped"}
    assert set(gradclip.SkipOnSpike(signal="loss").init(g)._fields) == {"loss_window", "loss_count", "skipped"}
    assert set(gradclip.SkipOnSpike(signal="both").init(g)._fields) == {"window", "count", "loss_window", "loss_count", "skipped"}


def test_checkpoints_of_earlier_versions_load_and_the_config_names_new_settings_only_when_set():
    old = {
        "format": "gradclip", "version": 1, "clipper": "skip_on_spike",
        "config": {"window": 4, "sigma": 6.0, "min_history": 2, "std_floor": 0.01},
        "state": {"window": [1.0, 2.0, 0.0, 0.0], "count": 2, "skipped": 0},
    }
    clipper = gradclip.SkipOnSpike(window=4, min_history=2)
    clipper.load_state_dict(old)
    assert clipper.state_dict() == old
    loss = gradclip.SkipOnSpike(window=4, min_history=2, signal="loss", log_space=True)
    assert loss.config()["signal"] == "loss" and loss.config()["log_space"] is True
    with pytest.raises(gradclip.StateError, match="config"):
        loss.load_state_dict(old)
    _feed(loss, [1.0, 2.0, 1.5])
    saved = json.loads(json.dumps(loss.state_dict()))
    again = gradclip.SkipOnSpike(window=4, min_history=2, signal="loss", log_space=True)
    again.load_state_dict(saved)
    assert _feed(again, [1.7]) == _feed(loss, [1.7])


@pytest.mark.parametrize(
    "change,pattern",
    [
        ({"loss_window": [1.0, 0.0, 0.0, 2.0]}, r"'loss_window' must hold 2 positive value\(s\) followed by zeros"),
        ({"loss_window": [1.0, -1.0, 0.0, 0.0]}, r"'loss_window' must hold 2 positive value"),
        ({"loss_count": -1}, r"'loss_count' holds -1"),
        ({"loss_window": [1.0, math.inf, 0.0, 0.0]}, r"finite float"),
    ],
)
def test_a_bad_loss_window_is_refused_and_nothing_changes(change, pattern):
    clipper = gradclip.SkipOnSpike(window=4, min_history=2, signal="loss", log_space=True)
    _feed(clipper, [1.0, 2.0])
    good = clipper.state_dict()
    with pytest.raises(gradclip.StateError, match=pattern):
        clipper.load_state_dict({**good, "state": {**good["state"], **change}})
    assert clipper.state_dict() == good


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("signal", ["loss", "both"])
def test_no_loss_is_a_clear_error_that_changes_nothing(signal):
    clipper = gradclip.SkipOnSpike(window=4, min_history=2, signal=signal)
    _feed(clipper, [1.0, 1.1])
    saved = clipper.state_dict()
    g = np.array([3.0, 4.0], np.float32)
    with pytest.raises(gradclip.InvalidArgumentError, match=r"signal='%s' needs the step's loss: pass it as clip_\(model, loss=loss\)" % signal):
        clipper.clip([g])
    with pytest.raises(gradclip.InvalidArgumentError, match="needs the step's loss"):
        clipper.update([g], clipper.init([g]))
    assert clipper.state_dict() == saved
    np.testing.assert_array_equal(g, [3.0, 4.0])


def test_bad_loss_signals_are_refused():
    torch = pytest.importorskip("torch")
    clipper = gradclip.SkipOnSpike(signal="loss")
    g = [torch.ones(2)]
    cases = [
        (torch.ones(2), r"loss must be a scalar \(one element\), got an array of shape \(2,\)"),
        (np.float32(1.0), r"loss is a numpy array but the gradients are torch arrays"),
        ("1.0", r"loss must be a number or an array, got str"),
        (True, r"loss must be a number or an array, got bool"),
    ]
    for loss, pattern in cases:
        with pytest.raises(gradclip.InvalidArgumentError, match=pattern):
            clipper.clip(g, loss=loss)
    with pytest.raises(gradclip.InvalidArgumentError, match=r"unknown argument\(s\) \['losses'\]"):
        clipper.clip(g, losses=1.0)
    assert clipper.state_dict()["state"] is None


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"signal": "gradnorm"}, r"signal must be one of 'grad_norm', 'loss', 'both'; got 'gradnorm'"),
        ({"log_space": 1}, r"log_space must be True or False, got 1"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(gradclip.InvalidArgumentError, match=pattern):
        gradclip.SkipOnSpike(**kwargs)
