"""The transformers callback's signals (issue 17): the step's loss through ``attach(trainer)``,
and skip streaks, in real ``Trainer.train`` runs on CPU (the model of test_transformers.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _signal_helpers import record_losses
from test_transformers import Data, StepMeter, _model, _trainer

import gradclip
from gradclip.transformers import GradClipCallback


class Spiky(Data):
    """``Data`` in a fixed order, with 100x larger labels in batch ``spike_at`` (of 8) and
    non-finite inputs from batch ``nan_from`` on."""

    def __init__(self, n=48, spike_at=None, nan_from=None):
        super().__init__(n)
        if spike_at is not None:
            self.y[8 * spike_at : 8 * spike_at + 8] *= 100
        if nan_from is not None:
            self.x[8 * nan_from :] = float("nan")


def _in_order(trainer, dataset):
    """The Trainer's batches in the dataset's order (it shuffles by default)."""
    trainer.train_dataset = dataset
    trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(dataset)
    return trainer


def _logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry and "loss" in entry]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_clipper_gets_the_loss_the_trainer_logs_for_the_step(accumulation, tmp_path):
    """Attached, the callback passes each step's loss: the sum of the micro-batch losses the
    Trainer normalised for accumulation, the value it logs as ``loss`` (logging every step)."""
    clipper = gradclip.GlobalNorm(0.01)
    seen = record_losses(clipper)
    callback = GradClipCallback(clipper)
    trainer = _trainer(_model(), [], tmp_path, steps=3, gradient_accumulation_steps=accumulation)
    callback.attach(trainer)
    callback.attach(trainer)  # twice: still one wrapper, each loss recorded once
    trainer.train()
    assert len(seen) == 3 and None not in seen
    assert seen == pytest.approx(_logged(trainer, "loss"), rel=1e-4)


def test_without_attach_no_loss_is_passed(tmp_path):
    clipper = gradclip.GlobalNorm(0.01)
    seen = record_losses(clipper)
    _trainer(_model(), [GradClipCallback(clipper)], tmp_path, steps=2).train()
    assert seen == [None, None]


def test_a_loss_spike_skips_that_step(tmp_path):
    meter = StepMeter()
    callback = GradClipCallback(gradclip.SkipOnSpike(window=8, min_history=3, sigma=3.0, signal="loss"))
    trainer = _in_order(_trainer(_model(), [meter], tmp_path, steps=6, learning_rate=1e-4), Spiky(spike_at=4))
    callback.attach(trainer)
    trainer.train()
    assert [m == 0.0 for m in meter.moves] == [False, False, False, False, True, False]


def test_a_loss_clipper_without_attach_is_refused_before_training(tmp_path):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    clipper = gradclip.chain(gradclip.GlobalNorm(1.0), gradclip.SkipOnSpike(signal="both"))
    trainer = _trainer(model, [GradClipCallback(clipper)], tmp_path, steps=2)
    with pytest.raises(gradclip.InvalidArgumentError, match=r"Chain needs the step's loss.*callback.attach\(trainer\)"):
        trainer.train()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize(
    "loss, match",
    [
        (torch.ones(2), r"loss must be a scalar \(one element\), got an array of shape \(2,\)"),
        (pytest.importorskip("numpy").float32(1.0), r"loss is a numpy array but the gradients are torch arrays"),
    ],
    ids=["shape", "numpy"],
)
def test_a_bad_loss_from_an_overridden_training_step_is_refused(loss, match):
    """A ``training_step`` of one's own may return anything; a loss that is not one torch value
    is refused by the clip, before gradients or state change."""
    model = _model()
    (model(x=torch.ones(2, 4), labels=torch.zeros(2))["loss"]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    clipper = gradclip.QuantileNorm()
    callback = GradClipCallback(clipper)
    trainer = SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[]), training_step=lambda *a, **k: loss)
    callback.attach(trainer)
    trainer.training_step()
    with pytest.raises(gradclip.InvalidArgumentError, match=match):
        callback.on_pre_optimizer_step(None, SimpleNamespace(global_step=0), SimpleNamespace(), model=model)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert clipper.state_dict()["state"] is None


# -- streaks -----------------------------------------------------------------------------------
def test_consecutive_skips_are_logged(tmp_path):
    """Non-finite inputs from batch 2 on: steps 2 and 3 are skipped, in a row."""
    callback = GradClipCallback(gradclip.GlobalNorm(1.0, nonfinite="skip"))
    trainer = _in_order(_trainer(_model(), [callback], tmp_path, steps=4, learning_rate=1e-3), Spiky(32, nan_from=2))
    trainer.train()
    assert _logged(trainer, "consecutive_skips") == [0, 0, 1, 2]
    assert int(callback.last_info.consecutive_skips) == 2


def test_a_streak_of_max_consecutive_skips_stops_training_with_divergence_error(tmp_path):
    model = _model()
    meter = StepMeter()
    callback = GradClipCallback(gradclip.GlobalNorm(1.0, nonfinite="skip"), max_consecutive_skips=2)
    trainer = _in_order(_trainer(model, [callback, meter], tmp_path, steps=6, learning_rate=1e-3), Spiky(nan_from=2))
    callback.attach(trainer)
    with pytest.raises(gradclip.DivergenceError, match=r"GradClipCallback: 2 optimizer steps in a row were skipped") as caught:
        trainer.train()
    assert trainer.control.should_training_stop
    assert caught.value.streak == 2 and len(caught.value.losses) == 2
    # The NaN inputs' losses (SkipStreak keeps NaN for "no value", so it may report them as None).
    assert all(v is None or math.isnan(v) for v in caught.value.losses)
    assert all(p.isfinite().all() for p in model.parameters())
    assert len(meter.moves) == 3 and meter.moves[2] == 0.0  # steps 0, 1 moved; 2 skipped; 3 raised


@pytest.mark.parametrize("bad", [0, -2, 2.0, False])
def test_max_consecutive_skips_below_one_is_refused(bad):
    with pytest.raises(gradclip.InvalidArgumentError, match="max_consecutive_skips"):
        GradClipCallback(gradclip.GlobalNorm(1.0), max_consecutive_skips=bad)


def test_a_rebuilt_callback_keeps_max_consecutive_skips():
    """``restore_callback_states_from_checkpoint=True`` rebuilds the callback from ``args``."""
    state = GradClipCallback(gradclip.ZClip(), max_consecutive_skips=7).state()
    assert GradClipCallback(**state["args"]).max_consecutive_skips == 7
    assert "max_consecutive_skips" not in GradClipCallback(gradclip.ZClip()).state()["args"]


@pytest.mark.parametrize("rebuild", [False, True], ids=["this_callback_loads", "trainer_rebuilds"])
def test_the_streak_survives_resume_from_checkpoint(rebuild, tmp_path):
    """Non-finite batches from batch 2 on: steps 2 and 3 are skipped before the checkpoint at
    step 4; the resumed run's first step is the third skipped in a row, which
    max_consecutive_skips=3 does not let pass (whether this callback or the Trainer's rebuilt
    one restores the streak)."""
    def trainer_for(steps):
        callback = GradClipCallback(gradclip.GlobalNorm(1.0, nonfinite="skip"), max_consecutive_skips=3)
        trainer = _trainer(_model(), [callback], tmp_path, steps=steps, learning_rate=1e-3, save_strategy="steps",
                           save_steps=4, restore_callback_states_from_checkpoint=rebuild)
        return _in_order(trainer, Spiky(nan_from=2)), callback

    first, callback = trainer_for(4)
    first.train()
    assert callback.streak.state_dict() == 2
    resumed, _ = trainer_for(6)
    with pytest.raises(gradclip.DivergenceError, match="3 optimizer steps in a row"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert resumed.state.global_step == 4  # the first resumed step raised


def test_a_bad_streak_in_a_checkpoint_is_refused_and_nothing_is_loaded(tmp_path):
    callback = GradClipCallback(gradclip.ZClip(nonfinite="skip"))
    callback.clipper_state = gradclip.ZClip(nonfinite="skip").state_dict()
    callback.consecutive_skips = -1
    with pytest.raises(gradclip.StateError, match=r"consecutive_skips must be an int >= 0, got -1"):
        callback._restore(SimpleNamespace(global_step=3))
    assert callback.streak.state_dict() == 0

