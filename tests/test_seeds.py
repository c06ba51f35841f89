"""Each seed article's example, reproduced with the article's own numbers (SEEDS.md).

Where an article leaves a number unspecified (seed 002's ε and η, seed 003's T and C) the test says
which value it picked.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import gradclip
from _reference import ref_global_norm, ref_norm_sign

# ---------------------------------------------------------------------------------------------
# seed 000: θ ← θ − η·clip(∇L, c1, c2), asymmetric range (0.5, 1.5), TensorFlow, lr 0.01,
# loss = (x − y)², x = y = 0, 1000 steps.
# ---------------------------------------------------------------------------------------------
SEED000_RANGE = (0.5, 1.5)
SEED000_LR = 0.01
SEED000_STEPS = 1000


def test_seed000_asymmetric_range_numpy():
    low, high = SEED000_RANGE
    grads = np.array([-1.0, 0.0, 0.2, 0.7, 1.5, 2.0, 10.0], dtype=np.float32)
    before = grads.copy()
    clipped, info = gradclip.Value(low, high).clip(grads)
    np.testing.assert_array_equal(clipped, np.array([0.5, 0.5, 0.5, 0.7, 1.5, 1.5, 1.5], np.float32))
    # Asymmetric: a zero (or negative) gradient is pushed *up* to c1 = 0.5.
    assert bool(info.clipped)
    np.testing.assert_array_equal(grads, before)  # input untouched
    np.testing.assert_array_equal(gradclip.clip_by_value(grads, low, high), clipped)


def _seed000_numpy_training():
    # The article's model: x = y = 0, loss = (x − y)², gradient 2(x − y) w.r.t. x.
    x, y = np.float64(0.0), np.float64(0.0)
    clipper = gradclip.Value(*SEED000_RANGE)
    first = None
    for _ in range(SEED000_STEPS):
        grad = np.asarray([2.0 * (x - y)])
        clipped, _ = clipper.clip(grad)
        if first is None:
            first = float(clipped[0])
        x = x - SEED000_LR * clipped[0]
    return first, x, y


def test_seed000_training_loop_numpy():
    first, x, y = _seed000_numpy_training()
    # ∇L = 0 at x = y = 0, clipped up to 0.5; x then only moves down, ∇L < 0, clipped to 0.5 again.
    assert first == 0.5
    assert x == pytest.approx(-SEED000_LR * 0.5 * SEED000_STEPS, abs=1e-9)  # -5.0
    assert y == 0.0


def test_seed000_training_loop_torch():
    torch = pytest.importorskip("torch", reason="seed 000 on the torch backend needs torch")
    x = torch.nn.Parameter(torch.tensor(0.0))
    y = torch.tensor(0.0)
    opt = torch.optim.SGD([x], lr=SEED000_LR)
    clipper = gradclip.Value(*SEED000_RANGE)
    seen = []
    for _ in range(SEED000_STEPS):
        opt.zero_grad()
        loss = torch.square(x - y)
        loss.backward()
        clipper.clip_([x])
        seen.append(x.grad.clone())
        opt.step()
    assert seen[0].item() == 0.5
    assert all(0.5 <= g.item() <= 1.5 for g in seen)
    assert x.item() == pytest.approx(-5.0, rel=1e-4)
    _, x_numpy, _ = _seed000_numpy_training()
    assert x.item() == pytest.approx(x_numpy, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# seed 001: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0) on the article's
# Net (784 → 128 → 10), CrossEntropyLoss, SGD lr 0.01; and formula (2), ε·sign(g) when ‖g‖ > ε.
# ---------------------------------------------------------------------------------------------


def _net(torch):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(784, 128)
            self.fc2 = torch.nn.Linear(128, 10)

        def forward(self, x):
            x = torch.flatten(x, 1)
            x = torch.relu(self.fc1(x))
            return self.fc2(x)

    return Net()


def _backward(torch, model, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(16, 1, 28, 28, generator=generator) * 4.0
    target = torch.randint(0, 10, (16,), generator=generator)
    loss = torch.nn.CrossEntropyLoss()(model(data), target) * scale
    loss.backward()


def test_seed001_clip_grad_norm_max_norm_1():
    torch = pytest.importorskip("torch", reason="seed 001 is a PyTorch example")
    import gradclip.torch as gct

    torch.manual_seed(1)
    reference = _net(torch)
    ours = copy.deepcopy(reference)
    via_clipper = copy.deepcopy(reference)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (reference, ours, via_clipper)]
    for step in range(3):
        for m, opt in zip((reference, ours, via_clipper), opts):
            opt.zero_grad()
            _backward(torch, m, scale=50.0, seed=step)
        norm_ref = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=1.0)
        norm_ours = gct.clip_grad_norm_(ours.parameters(), max_norm=1.0)
        info = gradclip.GlobalNorm(max_norm=1.0).clip_(via_clipper)
        assert norm_ref.item() > 1.0, "the example must actually clip"
        assert torch.equal(norm_ours, norm_ref)
        assert torch.equal(info.norm, norm_ref)
        for a, b, c in zip(reference.parameters(), ours.parameters(), via_clipper.parameters()):
            assert torch.equal(a.grad, b.grad)
            assert torch.equal(a.grad, c.grad)
        clipped_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ours.parameters()]))
        assert clipped_norm.item() == pytest.approx(1.0, rel=1e-5)
        for opt in opts:
            opt.step()
    for a, b in zip(reference.parameters(), ours.parameters()):
        assert torch.equal(a, b)


def test_seed001_formula2_sign_clip_numbers():
    eps = 1.0
    big = np.array([3.0, -4.0, 0.0], np.float32)  # ‖g‖ = 5 > ε
    small = np.array([0.3, -0.4, 0.0], np.float32)  # ‖g‖ = 0.5 ≤ ε
    clipped, info = gradclip.NormSign(eps).clip([big])
    np.testing.assert_array_equal(clipped[0], [1.0, -1.0, 0.0])
    assert float(info.norm) == pytest.approx(5.0)
    assert bool(info.clipped)
    unchanged, info = gradclip.NormSign(eps).clip([small])
    np.testing.assert_array_equal(unchanged[0], small)
    assert not bool(info.clipped)
    np.testing.assert_array_equal(clipped[0], ref_norm_sign([big], eps)[0])


# ---------------------------------------------------------------------------------------------
# seed 002: NumPy. theta = np.random.rand(10, 1); loss = sum(theta²); clip the gradient with
# np.clip(g, −ε, ε); theta_new = theta − g. The article calls np.gradient on a scalar (wrong, see
# SEEDS.md); the analytic gradient is 2·theta. ε and η are not given: ε = 0.5, η = 1 (the code has
# no learning rate) and η = 0.1 (formula θ − η·g).
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [1.0, 0.1])
def test_seed002_numpy_clip_and_update(lr):
    epsilon = 0.5
    theta = np.random.default_rng(2).random((10, 1))
    gradient = 2.0 * theta  # d/dθ sum(θ²)
    before = gradient.copy()
    expected = np.clip(gradient, -epsilon, epsilon)
    assert (np.abs(gradient) > epsilon).any() and (np.abs(gradient) <= epsilon).any()

    via_function = gradclip.clip_by_value(gradient, -epsilon, epsilon)
    via_clipper, info = gradclip.Value(clip_value=epsilon).clip(gradient)
    for clipped in (via_function, via_clipper):
        assert isinstance(clipped, np.ndarray) and clipped.dtype == gradient.dtype
        np.testing.assert_array_equal(clipped, expected)  # np.clip semantics, bit for bit
    np.testing.assert_array_equal(gradient, before)  # functional: input unchanged
    assert bool(info.clipped)

    theta_new = theta - lr * via_clipper
    np.testing.assert_allclose(theta_new, theta - lr * np.clip(2.0 * theta, -epsilon, epsilon))
    assert np.all(theta - theta_new <= lr * epsilon + 1e-15)

    # In place on the NumPy gradient itself.
    in_place = gradient.copy()
    gradclip.Value(clip_value=epsilon).clip_([in_place])
    np.testing.assert_array_equal(in_place, expected)


# ---------------------------------------------------------------------------------------------
# seed 003: weight clipping w ← clamp(w, −T, T) on p.data and element-wise gradient clipping
# g ← clamp(g, −C, C) on p.grad, on the same Net. T and C are not given: T = 0.05, C = 0.01.
# ---------------------------------------------------------------------------------------------
SEED003_T = 0.05
SEED003_C = 0.01


def test_seed003_weight_and_gradient_clamp():
    torch = pytest.importorskip("torch", reason="seed 003 is a PyTorch example")
    import gradclip.torch as gct

    torch.manual_seed(3)
    reference = _net(torch)
    ours = copy.deepcopy(reference)
    via_function = copy.deepcopy(reference)
    for m in (reference, ours, via_function):
        _backward(torch, m, seed=3)

    # The article's loop, literally.
    for param in reference.parameters():
        param.data = torch.clamp(param.data, -SEED003_T, SEED003_T)
        param.grad.data = torch.clamp(param.grad.data, -SEED003_C, SEED003_C)

    gradclip.clip_weights_(ours, -SEED003_T, SEED003_T)
    info = gradclip.Value(clip_value=SEED003_C).clip_(ours)
    gradclip.clip_weights_(list(via_function.parameters()), -SEED003_T, SEED003_T)
    gct.clip_grad_value_(via_function.parameters(), SEED003_C)

    assert bool(info.clipped)
    for a, b, c in zip(reference.parameters(), ours.parameters(), via_function.parameters()):
        assert torch.equal(a.data, b.data) and torch.equal(a.data, c.data)
        assert torch.equal(a.grad, b.grad) and torch.equal(a.grad, c.grad)
        assert b.requires_grad and b.grad_fn is None  # still a leaf, autograd did not record
    assert any((p.data.abs() == SEED003_T).any() for p in ours.parameters())


def test_seed003_numpy_weights():
    weights = np.array([[-0.2, 0.01], [0.05, 0.3]], np.float32)
    gradclip.clip_weights_([weights], -SEED003_T, SEED003_T)
    np.testing.assert_array_equal(weights, np.array([[-0.05, 0.01], [0.05, 0.05]], np.float32))


# ---------------------------------------------------------------------------------------------
# seed 004: ∇L ← 0 where |∇L| > ε, threshold = 1.0, via torch.where on p.grad.
# ---------------------------------------------------------------------------------------------
SEED004_THRESHOLD = 1.0


def test_seed004_zero_outliers_torch():
    torch = pytest.importorskip("torch", reason="seed 004 is a PyTorch example")
    torch.manual_seed(4)
    reference = _net(torch)
    ours = copy.deepcopy(reference)
    for m in (reference, ours):
        _backward(torch, m, scale=200.0, seed=4)
    grads_before = [p.grad.clone() for p in ours.parameters()]
    snapshot = [g.clone() for g in grads_before]
    functional = gradclip.zero_outliers(grads_before, SEED004_THRESHOLD)

    threshold = SEED004_THRESHOLD
    for param in reference.parameters():  # the article's loop, literally
        if param.grad is not None:
            param.grad[:] = torch.where(torch.abs(param.grad) > threshold, torch.zeros_like(param.grad), param.grad)
    info = gradclip.ZeroOutliers(SEED004_THRESHOLD).clip_(ours)

    assert bool(info.clipped)
    assert any((g.abs() > threshold).any() for g in grads_before), "the example must zero something"
    for a, b, f, before, kept in zip(reference.parameters(), ours.parameters(), functional, grads_before, snapshot):
        assert torch.equal(a.grad, b.grad)
        assert torch.equal(a.grad, f)
        assert torch.equal(before, kept)  # the functional form left its input alone
    assert float(info.norm) == pytest.approx(ref_global_norm(grads_before), rel=1e-5)


def test_seed004_numbers_numpy():
    grads = [np.array([0.5, -1.0, 1.0001, -3.0, np.inf], np.float32)]
    out = gradclip.zero_outliers(grads, SEED004_THRESHOLD)
    # |g| == ε is kept (strict >); ±inf is zeroed.
    np.testing.assert_array_equal(out[0], np.array([0.5, -1.0, 0.0, 0.0, 0.0], np.float32))
    np.testing.assert_array_equal(grads[0], np.array([0.5, -1.0, 1.0001, -3.0, np.inf], np.float32))


def test_seed001_formula2_norm_one_ulp_above_threshold():
    # ‖g‖ > ε by a single ulp still takes the sign step (decided by comparing the norm with ε,
    # not by a clip coefficient that can round to exactly 1 there).
    found = 0
    for t in np.linspace(0.37, 900.0, 4000, dtype=np.float32):
        x = np.nextafter(t, np.float32(np.inf))
        g = np.array([x, 0.0], np.float32)
        if float(gradclip.global_norm([g])) != float(x):
            continue
        out, info = gradclip.NormSign(float(t)).clip([g])
        assert bool(info.clipped), (t, x)
        np.testing.assert_array_equal(out[0], np.array([t, 0.0], np.float32))
        found += 1
    assert found > 1000
