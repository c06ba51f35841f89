"""20,000 plain gradients in one process: gradclip against torch's foreach clip_grad_norm_.

Cost is checked by counting the aten operations each side issues (a TorchDispatchMode), never by
timing: gradclip's count grows at most linearly with the number of tensors (with foreach kernels
and stacked small-tensor norms it grows far slower), and stays within a small factor of torch's
foreach path. The wall-clock comparison lives in ``benchmarks/bench_many_tensors.py``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import gradclip  # noqa: E402


class _Ops:
    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                outer.count += 1
                return func(*args, **(kwargs or {}))

        self.count = 0
        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def _params(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Mixed shapes, as in a model with LoRA adapters: several foreach groups, stacked norms.
    shapes = [(4, 3), (3,), (2, 2, 2), (5,)]
    params = []
    for i in range(n):
        p = torch.nn.Parameter(torch.zeros(shapes[i % 4]))
        p.grad = torch.randn(shapes[i % 4], generator=g)
        params.append(p)
    return params


def _count(fn, params):
    with _Ops() as ops:
        result = fn(params)
    return ops.count, result


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_20000_plain_tensors_linear_and_close_to_torch_foreach(norm_type):
    counts = {}
    for n in (2_000, 20_000):
        ours = _params(n)
        theirs = _params(n)
        ours_ops, info = _count(lambda ps: gradclip.GlobalNorm(0.01, norm_type=norm_type).clip_(ps), ours)
        torch_ops, total = _count(lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.01, norm_type=norm_type, foreach=True), theirs)
        torch.testing.assert_close(info.norm, total, rtol=1e-5, atol=0)
        for a, b in zip(ours[:: max(1, n // 500)], theirs[:: max(1, n // 500)]):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8)
        counts[n] = (ours_ops, torch_ops)
    (small, small_torch), (large, large_torch) = counts[2_000], counts[20_000]
    assert large <= 10 * small + 50, f"gradclip: {small} ops for 2,000 tensors, {large} for 20,000 (worse than linear)"
    assert large <= 3 * large_torch + 100, f"gradclip {large} ops vs torch's foreach {large_torch} for 20,000 tensors"
