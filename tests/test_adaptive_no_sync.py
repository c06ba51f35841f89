"""No host-device synchronisation on the default path of the adaptive clippers.

Every way Python reads a torch tensor's value on the host (``.item()``, ``bool(t)``, ``float(t)``,
``int(t)``, ``operator.index(t)``, ``.tolist()``) is counted while ``clip_`` runs, and so are the
operators that read values inside torch's C++ (``aten._local_scalar_dense`` — what indexing with
a 0-d integer tensor does — and data-dependent shapes such as ``nonzero``), seen through a
``TorchDispatchMode``. Both counts must be zero. The controls show that each counter sees each
kind of read.
"""

from __future__ import annotations

import collections
import contextlib

import pytest

import gradclip

torch = pytest.importorskip("torch")
from _host_reads import record_host_reads  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist")
#: aten operators that wait for the device: a value read, or an output shape that depends on data.
_SYNCING_OPS = (
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.masked_select",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.repeat_interleave",
    "aten.equal",
    "aten.is_nonzero",
)


class _SyncingOps(TorchDispatchMode):
    """Counts dispatched aten operators that synchronise with the device."""

    def __init__(self):
        super().__init__()
        self.found: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if name in _SYNCING_OPS:
            self.found[name] = self.found.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_reads():
    """Counts Python-level value reads into the yielded dict; C++-level ones under "aten:..."."""
    counts: dict[str, int] = {}
    mode = _SyncingOps()
    try:
        with record_host_reads(_READS) as calls, mode:
            yield counts
    finally:
        counts.update(collections.Counter(calls))
        # Python-level reads also reach the dispatcher (.item() -> _local_scalar_dense): only
        # report the dispatcher's count when Python saw nothing, so each read counts once.
        if not counts:
            counts.update({f"aten:{k}": v for k, v in mode.found.items()})


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def _backward(model, step):
    model.zero_grad()
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(5, 6, generator=generator) * (30.0 if step in (22, 31) else 1.0)
    model(x).pow(2).sum().backward()


CLIPPERS = {
    "agc": lambda: gradclip.AGC(),
    "agc_exclude": lambda: gradclip.AGC(clip_factor=0.05, exclude=("2.*",)),
    "autoclip": lambda: gradclip.AutoClip(),
    "autoclip_window": lambda: gradclip.AutoClip(history=8),
    "zclip": lambda: gradclip.ZClip(warmup_steps=5),
    "zclip_percentile_cap": lambda: gradclip.ZClip(warmup_steps=5, mode="percentile", max_grad_norm=50.0),
    "adagc": lambda: gradclip.AdaGC(start_clip_steps=5),
    "quantile_norm": lambda: gradclip.QuantileNorm(),
    "skip_on_spike": lambda: gradclip.SkipOnSpike(window=16, min_history=4),
    "non_finite_skip": lambda: gradclip.NonFinite(max_consecutive=3),
    "non_finite_zero": lambda: gradclip.NonFinite("zero"),
    "subset_element": lambda: gradclip.Subset(gradclip.ZClip(warmup_steps=3), 0.5, seed=1),
    "subset_tensor": lambda: gradclip.Subset("global_norm", 0.5, by="tensor"),
    "chain": lambda: gradclip.chain(gradclip.NonFinite("zero"), gradclip.AutoClip(history=6)),
    "zclip_mean_warmup": lambda: gradclip.ZClip(warmup_steps=5, warmup="mean"),
    "skip_above": lambda: gradclip.SkipAbove(50.0),
    "ada_clip": lambda: gradclip.AdaClip(),
    "ada_gn": lambda: gradclip.AdaGN(),
    "ada_gn_global": lambda: gradclip.AdaGN(scope="global"),
    "stable_spam": lambda: gradclip.chain(gradclip.AdaClip(), gradclip.AdaGN()),
    "global_norm_cosine": lambda: gradclip.GlobalNorm(gradclip.schedules.CosineDecay(5.0, 20, end_value=0.5)),
    "zclip_scheduled_cap": lambda: gradclip.ZClip(warmup_steps=5, max_grad_norm=gradclip.schedules.Piecewise([10], [50.0, 5.0])),
    "agc_scheduled": lambda: gradclip.AGC(clip_factor=gradclip.schedules.warmup_cosine(0.01, 0.1, 5, 30, end_value=0.02)),
}


#: Clippers fed signals each step: (factory, signals(model, step) -> keywords).
WITH_SIGNALS = {
    "skip_on_loss_log": (
        lambda: gradclip.SkipOnSpike(window=16, min_history=4, signal="both", log_space=True),
        lambda model, step: {"loss": torch.tensor(1.0 + 0.01 * step + (30.0 if step == 25 else 0.0))},
    ),
    "spike_aware": (
        lambda: gradclip.SpikeAware(theta=10.0, warmup_steps=2, reset_interval=10),
        lambda model, step: {"optimizer_state": [torch.full_like(p, 0.01) for p in model.parameters()]},
    ),
    "global_norm_step_signal": (
        lambda: gradclip.GlobalNorm(gradclip.schedules.Linear(1.0, 10.0, 20)),
        lambda model, step: {"step": torch.tensor(step)},
    ),
}


@pytest.mark.parametrize("name", sorted(WITH_SIGNALS))
def test_clip_in_place_with_signals_never_reads_a_device_value(name):
    factory, signals = WITH_SIGNALS[name]
    clipper, model, infos = factory(), _model(), []
    for step in range(35):
        _backward(model, step)
        given = signals(model, step)  # made outside the counted region
        with count_host_reads() as counts:
            infos.append(clipper.clip_(model, **given))
        assert counts == {}, f"step {step}: host reads {counts}"
    assert any(info.to_dict()["clipped"] or info.to_dict()["skip"] for info in infos)


@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_clip_in_place_never_reads_a_device_value(name):
    clipper = CLIPPERS[name]()
    model = _model()
    infos = []
    for step in range(35):
        _backward(model, step)
        with count_host_reads() as counts:
            infos.append(clipper.clip_(model))
        assert counts == {}, f"step {step}: host reads {counts}"
    # The run did something (outside the counted region, reading is allowed).
    assert any(info.to_dict()["norm"] > 0 for info in infos)


def test_quantile_norm_with_sample_norms_never_reads_a_device_value():
    clipper = gradclip.QuantileNorm()
    model = _model()
    for step in range(10):
        _backward(model, step)
        samples = torch.rand(8) * 3
        with count_host_reads() as counts:
            clipper.clip_(model, sample_norms=samples)
        assert counts == {}


def test_functional_clip_never_reads_a_device_value():
    clipper = gradclip.ZClip(warmup_steps=3)
    for step in range(8):
        grads = [torch.randn(4, 4), torch.randn(4)]
        with count_host_reads() as counts:
            clipper.clip(grads)
        assert counts == {}


def test_control_the_counter_sees_every_kind_of_read():
    t = torch.tensor(2.0)
    with count_host_reads() as counts:
        t.item()
        bool(t)
        float(t)
        int(t)
        [0, 1, 2][t.long()]  # operator.index
        t.reshape(1).tolist()
        if t > 1:  # a Python branch on a device value
            pass
    assert set(counts) == set(_READS)
    assert counts["__bool__"] == 2


def test_control_the_dispatcher_sees_reads_inside_torch():
    """Reads that never pass through Python: indexing with a 0-d integer tensor, nonzero."""
    x = torch.arange(5.0)
    index = torch.tensor(2)
    with count_host_reads() as counts:
        x[index]
    assert counts == {"aten:aten._local_scalar_dense": 1}
    with count_host_reads() as counts:
        torch.nonzero(x)
    assert counts == {"aten:aten.nonzero": 1}
    with count_host_reads() as counts:
        torch.take(x, index)  # the sync-free gather the backends use
    assert counts == {}


def test_control_to_dict_reads_and_is_counted():
    clipper = gradclip.AutoClip()
    model = _model()
    _backward(model, 0)
    with count_host_reads() as counts:
        clipper.clip_(model).to_dict()
    assert counts.get("item", 0) == 6


def test_control_raise_policy_reads_and_is_counted():
    """The documented exception: nonfinite='raise' must read the norm."""
    clipper = gradclip.AutoClip(nonfinite="raise")
    model = _model()
    _backward(model, 0)
    with count_host_reads() as counts:
        clipper.clip_(model)
    assert sum(counts.values()) >= 1
