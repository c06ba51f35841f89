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
from gradclip._core.clipper import make_info  # noqa: E402
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


CLIPPERS = {
    "global_norm": lambda: gradclip.GlobalNorm(0.01),
    "norm": lambda: gradclip.Norm(0.005),
    "value": lambda: gradclip.Value(clip_value=0.002),
    "chain": lambda: gradclip.chain(gradclip.GlobalNorm(1.0), gradclip.GlobalNorm(0.01)),
}
for _name in ("autoclip", "zclip", "quantile_norm", "agc"):
    if _name in gradclip.available():
        CLIPPERS[_name] = lambda _n=_name: gradclip.get(_n)


@pytest.mark.parametrize("clipper", sorted(CLIPPERS))
def test_fit_clips_with_any_clipper(clipper, tmp_path):
    model = Tiny()
    before = _snapshot(model)
    monitor = gradclip.Monitor(model, warn=False)
    callback = GradClipCallback(CLIPPERS[clipper](), monitor=monitor)
    trainer = _fit(model, callback, tmp_path)
    summary = monitor.summary()
    assert summary["steps"] == 4 == trainer.global_step
    assert callback.last_info is not None
    for key in ("grad_norm", "grad_norm_clipped", "clip_coef", "clipped"):
        assert key in trainer.callback_metrics
    if clipper in ("global_norm", "chain"):
        # Unclipped, the gradient norms are in the hundreds; each step moved by at most 0.01.
        assert summary["norm_percentiles"]["p10"] > 10
        assert summary["clip_rate"] == 1.0
        assert _distance(model, before) <= 4 * 0.01 + 1e-6


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

    def _update(self, ops, grads, state, params, names):
        grads, state, info = super()._update(ops, grads, state, params, names)
        return grads, state, make_info(ops, info.norm, info.threshold, info.coef, info.clipped, info.finite,
                                       ops.scalar(True, "bool"))


def test_a_skip_request_leaves_parameters_alone(tmp_path):
    model = Tiny()
    before = _snapshot(model)
    _fit(model, GradClipCallback(AlwaysSkip(1.0)), tmp_path, steps=3)
    assert _distance(model, before) == 0.0


def test_clipper_state_goes_into_lightning_checkpoints(tmp_path):
    clipper = gradclip.GlobalNorm(0.01)
    callback = GradClipCallback(clipper)
    trainer = _fit(Tiny(), callback, tmp_path, steps=2)
    path = tmp_path / "ckpt.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    saved = [v for k, v in checkpoint["callbacks"].items() if "GradClipCallback" in k]
    assert saved and saved[0]["clipper"] == clipper.state_dict()
    restored = GradClipCallback(gradclip.GlobalNorm(0.01))
    restored.load_state_dict(saved[0])
    with pytest.raises(gradclip.StateError):
        GradClipCallback(gradclip.GlobalNorm(0.5)).load_state_dict(saved[0])


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
