"""``gradclip.lightning.GradClipCallback`` in a real Lightning ``Trainer.fit`` on CPU.

The model is tiny and trained with plain SGD at ``lr=1``, so each optimizer step moves the
parameters by exactly the clipped gradient: the distance travelled proves what the optimizer saw.
"""

from __future__ import annotations

import math
import warnings

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning")

import gradclip  # noqa: E402
from gradclip._core.contract import Decision  # noqa: E402
from gradclip.lightning import GradClipCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*LeafSpec.*", "ignore:.*does not have many workers.*")


class Tiny(L.LightningModule):
    def __init__(self, lr=1.0, fused=False):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)
        self.lr, self.fused = lr, fused

    def training_step(self, batch, batch_index):
        x, y = batch
        return ((self.lin(x).squeeze(-1) - y) ** 2).mean() * 100

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, fused=self.fused)


def _loader():
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=generator), torch.randn(32, generator=generator))
    return torch.utils.data.DataLoader(data, batch_size=8)


def _fit(model, callback, tmp_path, steps=4, **trainer_kwargs):
    options = dict(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    options.update(trainer_kwargs)
    callbacks = list(callback) if isinstance(callback, (list, tuple)) else [callback]
    trainer = L.Trainer(callbacks=callbacks, **options)
    trainer.fit(model, _loader())
    return trainer


def _distance(model, before):
    return math.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in zip(model.parameters(), before)))


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


# Settings under which each clipper clips in the run below (norms there are in the tens to
# hundreds): zclip gets a short warm-up and the spike of the last batch to react to.
CLIPPERS = {
    "global_norm": lambda: gradclip.GlobalNorm(0.01),
    "norm": lambda: gradclip.Norm(0.005),
    "value": lambda: gradclip.Value(clip_value=0.002),
    "chain": lambda: gradclip.chain(gradclip.GlobalNorm(1.0), gradclip.GlobalNorm(0.01)),
}
_ADAPTIVE = {
    "autoclip": {},
    "zclip": {"warmup_steps": 3},
    "quantile_norm": {},
    "agc": {},
}
for _name, _kwargs in _ADAPTIVE.items():
    if _name in gradclip.available():
        CLIPPERS[_name] = lambda _n=_name, _k=_kwargs: gradclip.get(_n, **_k)


class GradRecorder(L.Callback):
    """Copies the gradients (and parameters) at ``on_before_optimizer_step``: placed before the
    GradClipCallback it sees what the clipper got, placed after it what the optimizer gets."""

    def __init__(self):
        self.grads, self.params = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.detach().clone() for p in pl_module.parameters()])
        self.params.append(_snapshot(pl_module))


def _spiky_loader(batches=6):
    """Like _loader, with targets 30x larger in the last batch: a gradient spike."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(8 * batches, 4, generator=generator), torch.randn(8 * batches, generator=generator)
    y[-8:] *= 30
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


@pytest.mark.parametrize("clipper", sorted(CLIPPERS))
def test_fit_clips_with_any_clipper(clipper, tmp_path):
    """The optimizer gets exactly what the clipper makes of the gradients, and it clipped.

    The gradients before and after the callback are recorded in the real run; a fresh clipper,
    replayed on the recorded gradients (and parameters, for AGC), must give the gradients the
    optimizer saw, and must have changed them in some step.
    """
    model = Tiny(lr=0.01)
    monitor = gradclip.Monitor(model, warn=False)
    raw, clipped = GradRecorder(), GradRecorder()
    callback = GradClipCallback(CLIPPERS[clipper](), monitor=monitor)
    trainer = L.Trainer(callbacks=[raw, callback, clipped], max_steps=6, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(model, _spiky_loader())
    summary = monitor.summary()
    assert summary["steps"] == 6 == trainer.global_step == len(raw.grads) == len(clipped.grads)
    for key in ("grad_norm", "grad_norm_clipped", "clip_coef", "clipped"):
        assert key in trainer.callback_metrics
    assert summary["clip_rate"] > 0
    reference = CLIPPERS[clipper]()
    changed = 0
    for grads, params, seen in zip(raw.grads, raw.params, clipped.grads):
        expected, _ = reference.clip([g.clone() for g in grads], params=params)
        for want, got in zip(expected, seen):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        changed += any(not torch.equal(g, s) for g, s in zip(grads, seen))
    assert changed >= 1
    if clipper in ("global_norm", "chain"):
        assert summary["clip_rate"] == 1.0 and summary["norm_percentiles"]["p10"] > 10


class StepMeter(L.Callback):
    """Measures how far each optimizer step moved the parameters."""

    def __init__(self):
        self.moves = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_index):
        self._before = _snapshot(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_index):
        self.moves.append(_distance(pl_module, self._before))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_every_step_is_clipped_in_fp32_and_bf16_autocast(precision, tmp_path):
    model = Tiny()
    monitor = gradclip.Monitor(model, warn=False)
    meter = StepMeter()
    _fit(model, [GradClipCallback(gradclip.GlobalNorm(0.01), monitor=monitor), meter], tmp_path, precision=precision)
    assert monitor.summary()["steps"] == 4 and monitor.summary()["clip_rate"] == 1.0
    # SGD with lr=1 moves by the clipped gradient: norm 0.01 each step (unclipped: hundreds).
    assert meter.moves == pytest.approx([0.01] * 4, rel=1e-3)


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_grad_scaler_gradients_are_unscaled_once_before_clipping(fused, tmp_path):
    """16-bit AMP with a GradScaler (on CPU through Lightning's MixedPrecision plugin).

    Lightning unscales a non-fused optimizer's gradients itself and leaves a fused optimizer's
    scaled; either way the clipper must see unscaled norms, and the two runs must agree.
    """
    from lightning.pytorch.plugins import MixedPrecision

    results = {}
    for is_fused in (False, fused):
        model = Tiny(fused=is_fused)
        monitor = gradclip.Monitor(model, warn=False)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        _fit(model, GradClipCallback(gradclip.GlobalNorm(0.01), monitor=monitor), tmp_path,
             plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
        results[is_fused] = (monitor.norms(), _snapshot(model))
    norms, params = results[fused]
    reference_norms, reference_params = results[False]
    finite = [n for n in norms if math.isfinite(n)]
    assert finite and max(finite) < 1000  # unscaled: the scale is 1024
    assert norms == pytest.approx(reference_norms, rel=1e-4, nan_ok=True)
    for a, b in zip(params, reference_params):
        torch.testing.assert_close(a, b)


def test_accumulated_batches_clip_once_per_optimizer_step(tmp_path):
    model = Tiny()
    monitor = gradclip.Monitor(model, warn=False)
    trainer = _fit(model, GradClipCallback(gradclip.GlobalNorm(0.01), monitor=monitor), tmp_path,
                   steps=2, accumulate_grad_batches=2)
    assert trainer.global_step == 2
    assert monitor.summary()["steps"] == 2


class AlwaysSkip(gradclip.GlobalNorm):
    """Asks every step to be skipped (what SkipOnSpike does on a spike)."""

    may_skip = True

    def decide(self, ops, measured, state, signals=None):
        coef, state, info = super().decide(ops, measured, state)
        return Decision(coef, state, info._replace(skip=ops.scalar(True, "bool")))


def test_a_skip_request_leaves_parameters_alone(tmp_path):
    model = Tiny()
    before = _snapshot(model)
    _fit(model, GradClipCallback(AlwaysSkip(1.0)), tmp_path, steps=3)
    assert _distance(model, before) == 0.0


def test_clipper_state_goes_into_lightning_checkpoints(tmp_path):
    """An adaptive clipper's state is saved and restored (a fresh one would differ)."""
    clipper = gradclip.QuantileNorm()
    callback = GradClipCallback(clipper)
    trainer = _fit(Tiny(lr=0.01), callback, tmp_path, steps=2)
    path = tmp_path / "ckpt.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # plain data only
    saved = [v for k, v in checkpoint["callbacks"].items() if "GradClipCallback" in k]
    assert saved and saved[0]["clipper"] == clipper.state_dict()
    assert saved[0]["clipper"] != gradclip.QuantileNorm().state_dict()  # it has state to restore
    restored = GradClipCallback(gradclip.QuantileNorm())
    restored.load_state_dict(saved[0])
    assert restored.clipper.state_dict() == clipper.state_dict()
    with pytest.raises(gradclip.StateError):
        GradClipCallback(gradclip.QuantileNorm(target_quantile=0.9)).load_state_dict(saved[0])


@pytest.mark.parametrize(
    "bad, match",
    [
        ([1, 2], r"expected the mapping GradClipCallback.state_dict\(\) returned .*got list"),
        (None, r"got NoneType"),
        ({}, r"exactly the keys \['clipper'\]; unexpected: none; missing: clipper"),
        ({"clipper_state": {}}, r"unexpected: 'clipper_state'; missing: clipper"),
        ({"extra": 1, "clipper": None}, r"unexpected: 'extra'; missing: none"),
        ({"clipper": [1]}, r"QuantileNorm.load_state_dict: expected a mapping"),
        ({"clipper": "plain text"}, r"QuantileNorm.load_state_dict"),
    ],
    ids=["list", "none", "empty", "missing_clipper", "extra_key", "clipper_not_a_mapping", "clipper_a_string"],
)
def test_checkpoint_hook_refuses_a_state_that_is_not_its_own(bad, match):
    callback = GradClipCallback(gradclip.QuantileNorm())
    callback.clipper.clip([torch.full((3,), 50.0)])  # some state to lose
    before = callback.clipper.state_dict()
    assert before["state"] is not None
    with pytest.raises(gradclip.StateError, match=match):
        callback.load_state_dict(bad)
    assert callback.clipper.state_dict() == before


def test_gradient_clip_val_too_is_warned_about(tmp_path):
    with pytest.warns(UserWarning, match="clipped twice"):
        _fit(Tiny(), GradClipCallback(gradclip.GlobalNorm(1.0)), tmp_path, steps=1, gradient_clip_val=1.0)


def test_bad_arguments():
    with pytest.raises(gradclip.InvalidArgumentError, match="clipper must be a gradclip clipper"):
        GradClipCallback(1.0)
    with pytest.raises(gradclip.InvalidArgumentError, match="monitor must have an observe"):
        GradClipCallback(gradclip.GlobalNorm(1.0), monitor=object())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradClipCallback(gradclip.GlobalNorm(1.0), log=False)


class LoggedKeys(L.Callback):
    """The metrics Lightning received from the callback, step by step."""

    def __init__(self):
        self.keys = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.keys.append(set(trainer.callback_metrics))


def test_a_monitor_with_updates_measures_every_step_and_logs_its_ratio(tmp_path):
    model = Tiny(lr=1.0)
    log = tmp_path / "updates.jsonl"
    monitor = gradclip.Monitor(model, updates=True, warn=False, writers=[gradclip.monitor.JsonlWriter(log)])
    recorder = GradRecorder()
    keys = LoggedKeys()
    _fit(model, [GradClipCallback(gradclip.GlobalNorm(0.01), monitor=monitor), recorder, keys], tmp_path, steps=3)
    monitor.close()
    names = [n for n, _ in model.named_parameters()]
    assert {f"update_ratio/{n}" for n in names} <= keys.keys[-1]
    # SGD at lr=1 with the gradient clipped to 0.01: each update has norm 0.01, as the monitor saw.
    params = recorder.params + [_snapshot(model)]
    moves = [_distance_between(a, b) for a, b in zip(params, params[1:])]
    records = gradclip.monitor.read_log(log)
    assert len(records) == 3
    assert moves == pytest.approx([0.01] * 3, rel=1e-3)
    for record, move in zip(records, moves):
        assert math.sqrt(sum(v * v for v in record["update_norms"].values())) == pytest.approx(move, rel=1e-4)


def _distance_between(a, b):
    return math.sqrt(sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b)))
