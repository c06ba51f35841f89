"""No host-device synchronisation on the default clipping path (DESIGN.md rule 1).

On a GPU, tests/test_cuda.py checks the same with CUDA's sync debug mode.

Every way Python code reads a tensor's value on the host (``.item()``, ``bool(t)``, ``float(t)``,
``int(t)``, ``.tolist()``, ``operator.index(t)``, ``.numpy()``, ``.cpu()``) is replaced by a
counting wrapper on ``torch.Tensor`` while a clipper runs; the count must stay at zero. Control
tests prove the counter catches deliberate reads, including one made inside a clipper.
"""

from __future__ import annotations

import math
import operator

import pytest

torch = pytest.importorskip("torch", reason="host-device syncs are a torch concern")

import gradclip  # noqa: E402
import gradclip.torch as gct  # noqa: E402
from _host_reads import record_host_reads  # noqa: E402

def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)
    model(torch.randn(4, 6, dtype=dtype)).pow(2).sum().mul(50).backward()
    return model


def test_control_counter_catches_every_deliberate_read():
    t = torch.tensor(2.0)
    with record_host_reads() as calls:
        t.item()
        bool(t)
        float(t)
        int(t)
        t.tolist()
        operator.index(torch.tensor(3))
        t.numpy()
        t.cpu()
        if t > 1:  # a Python branch on a device value is a __bool__ call
            pass
    assert calls == ["item", "__bool__", "__float__", "__int__", "tolist", "__index__", "numpy", "cpu", "__bool__"]
    # Undone afterwards: reads are no longer counted.
    t.item()
    assert len(calls) == 9


class _SyncingGlobalNorm(gradclip.GlobalNorm):
    """A deliberately bad clipper that branches on the norm in Python."""

    def decide(self, ops, measured, state, signals=None):
        if measured.norm.item() > self.max_norm:  # the sync the real clippers must never do
            pass
        return super().decide(ops, measured, state)


def test_control_counter_catches_a_read_inside_clip_():
    model = _model()
    clipper = _SyncingGlobalNorm(1.0)
    with record_host_reads() as calls:
        clipper.clip_(model)
    assert calls == ["item"]


def test_control_raise_policy_does_read():
    # "raise" is documented to synchronise once: the counter must see it.
    model = _model()
    clipper = gradclip.GlobalNorm(1.0, nonfinite="raise")
    with record_host_reads() as calls:
        clipper.clip_(model)
    assert len(calls) >= 1


CLIPPERS = {
    "GlobalNorm": lambda: gradclip.GlobalNorm(1.0),
    "GlobalNorm-inf": lambda: gradclip.GlobalNorm(0.5, norm_type=math.inf),
    "GlobalNorm-l1-skip": lambda: gradclip.GlobalNorm(0.5, norm_type=1.0, nonfinite="skip"),
    "GlobalNorm-zero": lambda: gradclip.GlobalNorm(0.5, nonfinite="zero"),
    "Norm": lambda: gradclip.Norm(0.5),
    "Norm-skip": lambda: gradclip.Norm(0.5, nonfinite="skip"),
    "Value": lambda: gradclip.Value(clip_value=0.1),
    "Value-asymmetric": lambda: gradclip.Value(-0.05, 0.2),
    "AverageNorm": lambda: gradclip.AverageNorm(0.01),
    "BlockRMS": lambda: gradclip.BlockRMS(0.1),
    "NormSign": lambda: gradclip.NormSign(0.5),
    "ZeroOutliers": lambda: gradclip.ZeroOutliers(0.5),
    "chain": lambda: gradclip.chain(gradclip.Value(clip_value=1.0), gradclip.GlobalNorm(1.0)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(CLIPPERS))
def test_clip_in_place_reads_nothing(name, dtype):
    model = _model(dtype)
    before = [p.grad.clone() for p in model.parameters()]
    clipper = CLIPPERS[name]()  # constructed outside: construction may validate on the host
    with record_host_reads() as calls:
        info = clipper.clip_(model)
        info = clipper.clip_(model)  # a second step too (stateless: allowed)
    assert calls == [], f"{name} read tensor values on the host: {calls}"
    # It really clipped (checked after the counting window).
    assert info.clipped.item() in (True, False)
    assert any(not torch.equal(p.grad, b) for p, b in zip(model.parameters(), before)) or name.endswith("skip")


@pytest.mark.parametrize("name", ["GlobalNorm", "Norm", "Value"])
def test_functional_clip_and_update_read_nothing(name):
    model = _model()
    grads = [p.grad.clone() for p in model.parameters()]
    clipper = CLIPPERS[name]()
    with record_host_reads() as calls:
        clipper.clip(grads)
        state = clipper.init(grads)
        clipper.update(grads, state)
        clipper.update({"a": grads[0], "b": [grads[1], None]}, state)
    assert calls == []


@pytest.mark.parametrize("foreach", [None, True, False])
def test_torch_drop_ins_read_nothing(foreach):
    model = _model()
    with record_host_reads() as calls:
        gct.clip_grad_norm_(model.parameters(), 1.0, foreach=foreach)
        gct.clip_grad_norm_(model.parameters(), 1.0, norm_type=math.inf, foreach=foreach)
        gct.clip_grad_value_(model.parameters(), 0.1, foreach=foreach)
        gct.get_total_norm([p.grad for p in model.parameters()], foreach=foreach)
        gradclip.global_norm([p.grad for p in model.parameters()])
        gradclip.clip_by_global_norm([p.grad for p in model.parameters()], 1.0)
    assert calls == []


def test_nonfinite_steps_read_nothing():
    model = _model()
    next(model.parameters()).grad[0, 0] = float("nan")
    clippers = [gradclip.GlobalNorm(1.0, nonfinite=p) for p in ("propagate", "skip", "zero")]
    clippers += [gradclip.Norm(1.0, nonfinite="skip"), gradclip.NormSign(1.0, nonfinite="skip")]
    with record_host_reads() as calls:
        infos = [c.clip_(model) for c in clippers]
    assert calls == []
    assert infos[1].skip.item() is True
