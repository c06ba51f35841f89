"""The Lightning callback's signals (issue 17): the step's loss, one clipper per optimizer, skip
streaks, in real ``Trainer.fit`` runs on CPU.

Models are tiny and trained with SGD at ``lr=1`` so a step moves the parameters by the clipped
gradient: the distance travelled proves what the optimizer got.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning")

from _signal_helpers import record_losses

import gradclip
from gradclip.lightning import GradClipCallback

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*LeafSpec.*", "ignore:.*does not have many workers.*")


class Tiny(L.LightningModule):
    """Records every loss it returns (``self.losses``); a small learning rate keeps them calm."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)
        self.losses = []

    def training_step(self, batch, batch_index):
        x, y = batch
        loss = ((self.lin(x).squeeze(-1) - y) ** 2).mean()
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class TwoOptimizers(L.LightningModule):
    """Manual optimization with two optimizers, GAN-style: each steps on its own loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 1)
        self.b = torch.nn.Linear(4, 1)
        self.automatic_optimization = False

    def training_step(self, batch, batch_index):
        x, y = batch
        for optimizer, layer in zip(self.optimizers(), (self.a, self.b)):
            loss = ((layer(x).squeeze(-1) - y) ** 2).mean() * 100
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=1.0), torch.optim.SGD(self.b.parameters(), lr=1.0)


def _loader(batches=4, spike_at=None, nan_from=None):
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(8 * batches, 4, generator=generator), torch.randn(8 * batches, generator=generator)
    if spike_at is not None:
        y[8 * spike_at : 8 * spike_at + 8] *= 100
    if nan_from is not None:
        x[8 * nan_from :] = float("nan")
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _trainer(callbacks, tmp_path, steps, **kwargs):
    options = {"max_steps": steps, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                   "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path)}
    options.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), **options)


def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def _distance(module, before):
    return math.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in zip(module.parameters(), before)))


class Moves(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_index):
        self.before = _snapshot(pl_module)
        self.moves = getattr(self, "moves", [])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_index):
        self.moves.append(_distance(pl_module, self.before))


# -- the loss ------------------------------------------------------------------------------------
def test_the_clipper_gets_the_loss_of_the_step_it_clips(tmp_path):
    clipper = gradclip.GlobalNorm(100.0)
    seen = record_losses(clipper)
    model = Tiny()
    _trainer([GradClipCallback(clipper)], tmp_path, 4).fit(model, _loader())
    assert seen == pytest.approx(model.losses, rel=1e-6)


def test_under_accumulation_the_loss_is_the_mean_of_the_micro_batches(tmp_path):
    clipper = gradclip.GlobalNorm(100.0)
    seen = record_losses(clipper)
    model = Tiny()
    _trainer([GradClipCallback(clipper)], tmp_path, 2, accumulate_grad_batches=2).fit(model, _loader())
    want = [(model.losses[0] + model.losses[1]) / 2, (model.losses[2] + model.losses[3]) / 2]
    assert seen == pytest.approx(want, rel=1e-6)


def test_the_fp16_loss_scale_is_divided_out(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    clipper = gradclip.GlobalNorm(100.0)
    seen = record_losses(clipper)
    model = Tiny()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _trainer([GradClipCallback(clipper)], tmp_path, 3, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(
        model, _loader()
    )
    assert seen == pytest.approx(model.losses, rel=1e-2)  # the losses were computed in fp16 autocast


def test_a_loss_spike_skips_that_step(tmp_path):
    """SkipOnSpike(signal="loss") skips the step whose own loss spiked: the parameters do not
    move in that step, and move in the others."""
    model = Tiny()
    moves = Moves()
    clipper = gradclip.SkipOnSpike(window=8, min_history=3, sigma=3.0, signal="loss")
    _trainer([GradClipCallback(clipper), moves], tmp_path, 6).fit(model, _loader(6, spike_at=4))
    assert [m == 0.0 for m in moves.moves] == [False, False, False, False, True, False]


@pytest.mark.parametrize(
    "loss, match",
    [
        (torch.ones(3), r"QuantileNorm.clip_: loss must be a scalar \(one element\), got an array of shape \(3,\)"),
        (np.float32(1.0), r"QuantileNorm.clip_: loss is a numpy array but the gradients are torch arrays"),
    ],
    ids=["shape", "numpy"],
)
def test_a_bad_loss_is_refused_before_clipping(loss, match):
    """Lightning hands a scalar torch loss; one of another shape or framework (a hook of one's
    own calling the callback) is refused and nothing changes."""
    model = Tiny()
    ((model.lin(torch.ones(2, 4)) ** 2).sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    clipper = gradclip.QuantileNorm()
    callback = GradClipCallback(clipper)
    trainer = SimpleNamespace(optimizers=[optimizer], precision_plugin=None, global_step=0, strategy=None)
    callback.on_fit_start(trainer, model)
    callback.on_before_backward(trainer, model, loss)
    with pytest.raises(gradclip.InvalidArgumentError, match=match):
        callback.on_before_optimizer_step(trainer, model, optimizer)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert clipper.state_dict()["state"] is None and callback.last_info is None


# -- one clipper per optimizer -----------------------------------------------------------------
def test_each_optimizer_is_clipped_by_its_own_clipper(tmp_path):
    model = TwoOptimizers()
    before_a, before_b = _snapshot(model.a), _snapshot(model.b)
    first, second = gradclip.QuantileNorm(), gradclip.QuantileNorm(initial_norm=0.05)
    callback = GradClipCallback({0: first, 1: second})
    trainer = _trainer([callback], tmp_path, 2)
    trainer.fit(model, _loader(1))  # one batch: each optimizer steps once
    # QuantileNorm starts at threshold 1.0 (the first) and 0.05 (the second); SGD lr=1 moves by it.
    assert _distance(model.a, before_a) == pytest.approx(1.0, rel=1e-5)
    assert _distance(model.b, before_b) == pytest.approx(0.05, rel=1e-5)
    assert set(callback.last_infos) == {0, 1}
    assert float(callback.last_infos[1].threshold) == pytest.approx(0.05)
    # Each state advanced on its own optimizer's gradients (once each).
    for clipper in (first, second):
        assert clipper.state_dict()["state"] is not None
    assert first.state_dict()["state"] != second.state_dict()["state"]
    for key in ("grad_norm/0", "grad_norm/1", "clip_coef/1"):
        assert key in trainer.callback_metrics


def test_an_optimizer_mapped_to_none_is_not_clipped(tmp_path):
    model = TwoOptimizers()
    before_b = _snapshot(model.b)
    callback = GradClipCallback({0: gradclip.GlobalNorm(0.01), 1: None})
    _trainer([callback], tmp_path, 2).fit(model, _loader(1))
    assert _distance(model.b, before_b) > 1.0  # the unclipped gradient (loss x100)
    assert set(callback.last_infos) == {0}


def test_a_mapping_index_beyond_the_optimizers_is_refused_before_training(tmp_path):
    model = TwoOptimizers()
    before = _snapshot(model)
    with pytest.raises(gradclip.InvalidArgumentError, match=r"names optimizer index\(es\) \[2\], but configure_optimizers returned 2"):
        _trainer([GradClipCallback({0: gradclip.GlobalNorm(1.0), 2: gradclip.GlobalNorm(1.0)})], tmp_path, 2).fit(
            model, _loader(1)
        )
    assert _distance(model, before) == 0.0


@pytest.mark.parametrize(
    "mapping, match",
    [
        ({"0": gradclip.GlobalNorm(1.0)}, r"keys must be optimizer indices \(ints >= 0.*got '0'"),
        ({-1: gradclip.GlobalNorm(1.0)}, r"got -1"),
        ({True: gradclip.GlobalNorm(1.0)}, r"got True"),
        ({0: "global_norm"}, r"the clipper for optimizer 0 must be a gradclip clipper or None \(not clipped\), got str"),
        ({0: None}, r"names no clipper"),
    ],
    ids=["str_key", "negative", "bool", "not_a_clipper", "no_clipper"],
)
def test_bad_mappings_are_refused(mapping, match):
    with pytest.raises(gradclip.InvalidArgumentError, match=match):
        GradClipCallback(mapping)


def test_one_clipper_mapped_to_two_optimizers_is_refused():
    shared = gradclip.ZClip()
    with pytest.raises(gradclip.InvalidArgumentError, match=r"same ZClip object is mapped to optimizers 0 and 1"):
        GradClipCallback({0: shared, 1: shared})


def test_mapping_checkpoints_round_trip_and_refuse_other_indices(tmp_path):
    model = TwoOptimizers()
    callback = GradClipCallback({0: gradclip.QuantileNorm(), 1: gradclip.QuantileNorm(initial_norm=0.5)})
    _trainer([callback], tmp_path, 2).fit(model, _loader(1))
    saved = callback.state_dict()
    assert set(saved) == {"clippers", "consecutive_skips"} and set(saved["clippers"]) == {"0", "1"}
    restored = GradClipCallback({0: gradclip.QuantileNorm(), 1: gradclip.QuantileNorm(initial_norm=0.5)})
    restored.load_state_dict(saved)
    assert restored.state_dict() == saved
    other = GradClipCallback({0: gradclip.QuantileNorm(), 3: gradclip.QuantileNorm(initial_norm=0.5)})
    with pytest.raises(gradclip.StateError, match=r"unexpected: '1'; missing: 3"):
        other.load_state_dict(saved)
    assert other.clippers[0].state_dict()["state"] is None  # nothing was loaded


# -- streaks -----------------------------------------------------------------------------------
def test_consecutive_skips_are_counted_and_logged(tmp_path):
    """Non-finite inputs from batch 2 on: steps 2 and 3 are skipped in a row."""
    callback = GradClipCallback(gradclip.GlobalNorm(1.0, nonfinite="skip"))
    trainer = _trainer([callback], tmp_path, 4)
    trainer.fit(Tiny(), _loader(4, nan_from=2))
    assert int(callback.last_info.consecutive_skips) == 2
    assert float(trainer.callback_metrics["consecutive_skips"]) == 2.0
    assert callback.state_dict()["consecutive_skips"] == 2


def test_a_streak_of_max_consecutive_skips_stops_fit_with_divergence_error(tmp_path):
    model = Tiny()
    moves = Moves()
    callback = GradClipCallback(gradclip.GlobalNorm(1.0, nonfinite="skip"), max_consecutive_skips=3)
    trainer = _trainer([callback, moves], tmp_path, 8)
    with pytest.raises(gradclip.DivergenceError, match=r"3 optimizer steps in a row were skipped") as caught:
        trainer.fit(model, _loader(8, nan_from=2))
    assert trainer.should_stop and trainer.global_step == 4  # steps 0, 1 taken; 2, 3 skipped; 4 raised
    assert caught.value.streak == 3 and len(caught.value.losses) == 3
    # The NaN inputs' losses (SkipStreak keeps NaN for "no value", so it may report them as None).
    assert all(v is None or math.isnan(v) for v in caught.value.losses)
    assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_max_consecutive_skips_below_one_is_refused(bad):
    with pytest.raises(gradclip.InvalidArgumentError, match="max_consecutive_skips"):
        GradClipCallback(gradclip.GlobalNorm(1.0), max_consecutive_skips=bad)


def test_the_streak_is_checkpointed():
    callback = GradClipCallback(gradclip.GlobalNorm(1.0, nonfinite="skip"), max_consecutive_skips=5)
    state = callback.state_dict()
    assert state == {"clipper": gradclip.GlobalNorm(1.0, nonfinite="skip").state_dict(), "consecutive_skips": 0}
    callback.load_state_dict({**state, "consecutive_skips": 4})
    assert callback.state_dict()["consecutive_skips"] == 4
    with pytest.raises(gradclip.StateError, match=r"consecutive_skips must be an int >= 0, got -1"):
        callback.load_state_dict({**state, "consecutive_skips": -1})
    assert callback.state_dict()["consecutive_skips"] == 4
    # A clipper that never skips saves no streak (the checkpoints of earlier versions).
    assert set(GradClipCallback(gradclip.GlobalNorm(1.0)).state_dict()) == {"clipper"}
