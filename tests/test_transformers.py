"""``gradclip.transformers.GradClipCallback`` in a real transformers ``Trainer.train``.

The model is defined here (no download): a linear regression wrapped as a ``PreTrainedModel``.
The Trainer's own clipping is off (``max_grad_norm=0``); the callback clips in
``on_pre_optimizer_step`` and adds ``grad_norm`` and the clipping statistics to the logs.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import gradclip  # noqa: E402
from gradclip._core.contract import Decision  # noqa: E402
from gradclip.transformers import MIN_TRANSFORMERS_VERSION, GradClipCallback  # noqa: E402


class TinyConfig(transformers.PretrainedConfig):
    model_type = "gradclip_tiny"

    def __init__(self, features=4, **kwargs):
        super().__init__(**kwargs)
        self.features = features


class TinyModel(transformers.PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.lin = torch.nn.Linear(config.features, 1)
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, x=None, labels=None):
        out = self.lin(x).squeeze(-1)
        loss = ((out - labels) ** 2).mean() * 100
        return {"loss": loss, "logits": out}


class Data(torch.utils.data.Dataset):
    def __init__(self, n=32):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=generator)
        self.y = torch.randn(n, generator=generator)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _model():
    torch.manual_seed(0)
    return TinyModel(TinyConfig())


def _trainer(model, callbacks, tmp_path, steps=4, **overrides):
    options = dict(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        logging_steps=1,
        max_grad_norm=0.0,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    options.update(overrides)
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**options), train_dataset=Data(),
                                callbacks=callbacks)


class StepMeter(transformers.TrainerCallback):
    """How far each optimizer step moved the parameters."""

    def __init__(self):
        self.moves = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._before = [p.detach().clone() for p in model.parameters()]

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.moves.append(math.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in zip(model.parameters(), self._before))))


class NormMeter(transformers.TrainerCallback):
    """The global gradient norm each optimizer step starts from, measured here in fp64."""

    def __init__(self):
        self.norms = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad.detach().double().flatten() for p in model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.cat(grads))))


_TRAINER_GRAD_NORM = -123.0  # what the Trainer's own grad-norm is stubbed to report


def test_train_clips_through_on_pre_optimizer_step_and_logs_grad_norm(tmp_path):
    model = _model()
    monitor = gradclip.Monitor(model, warn=False)
    callback = GradClipCallback(gradclip.GlobalNorm(0.01), monitor=monitor)
    meter, norms = StepMeter(), NormMeter()
    trainer = _trainer(model, [norms, callback, meter], tmp_path)
    # The Trainer logs a grad_norm of its own (computed with clip_grad_norm_(..., inf) even with
    # max_grad_norm=0), equal to ours: stubbed to a sentinel, so the logged value must be ours.
    stub_calls = []
    trainer._get_grad_norm = lambda model, grad_norm=None: stub_calls.append(1) or _TRAINER_GRAD_NORM
    trainer.train()
    assert len(stub_calls) == 4  # the stub is what the Trainer used
    # SGD at lr=1 moves by the clipped gradient: 0.01 per step (unclipped: hundreds).
    assert meter.moves == pytest.approx([0.01] * 4, rel=1e-3)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4 == len(norms.norms)
    assert monitor.norms() == pytest.approx(norms.norms, rel=1e-5)
    for entry, norm in zip(logs, norms.norms):
        assert entry["grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert entry["grad_norm"] > 1.0
        assert entry["grad_norm_clipped"] == pytest.approx(0.01, rel=1e-4)
        assert entry["clip_threshold"] == pytest.approx(0.01)
        assert entry["clip_rate"] == 1.0
        assert entry["clip_coef"] == pytest.approx(0.01 / entry["grad_norm"], rel=1e-4)
    assert monitor.summary()["steps"] == 4


def test_gradient_accumulation_clips_once_per_optimizer_step(tmp_path):
    model = _model()
    monitor = gradclip.Monitor(model, warn=False)
    trainer = _trainer(model, [GradClipCallback(gradclip.GlobalNorm(0.01), monitor=monitor)], tmp_path,
                       steps=2, gradient_accumulation_steps=2, logging_steps=2)
    trainer.train()
    assert monitor.summary()["steps"] == 2
    (entry,) = [e for e in trainer.state.log_history if "loss" in e]
    assert entry["clip_rate"] == 1.0  # the rate covers both steps since the last log


def test_bf16_training_clips(tmp_path):
    model = _model()
    meter = StepMeter()
    trainer = _trainer(model, [GradClipCallback(gradclip.GlobalNorm(0.01)), meter], tmp_path, bf16=True)
    trainer.train()
    assert meter.moves == pytest.approx([0.01] * 4, rel=1e-2)


@pytest.mark.parametrize(
    "clipper",
    [gradclip.Norm(0.005), gradclip.Value(clip_value=0.002), gradclip.chain(gradclip.GlobalNorm(1.0), gradclip.GlobalNorm(0.01))],
    ids=["norm", "value", "chain"],
)
def test_any_clipper(clipper, tmp_path):
    callback = GradClipCallback(clipper)
    trainer = _trainer(_model(), [callback], tmp_path, steps=2)
    trainer.train()
    assert callback.last_info is not None and callback.last_info.to_dict()["clipped"]


class AlwaysSkip(gradclip.GlobalNorm):
    may_skip = True

    def decide(self, ops, measured, state, signals=None):
        coef, state, info = super().decide(ops, measured, state)
        return Decision(coef, state, info._replace(skip=ops.scalar(True, "bool")))


def test_a_skip_request_leaves_parameters_alone(tmp_path):
    model = _model()
    meter = StepMeter()
    trainer = _trainer(model, [GradClipCallback(AlwaysSkip(1.0)), meter], tmp_path, steps=2)
    trainer.train()
    assert meter.moves == [0.0, 0.0]


def test_attach_puts_the_callback_first_so_reporting_callbacks_see_its_keys(tmp_path):
    seen = []

    class Reporter(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                seen.append(dict(logs))

    trainer = _trainer(_model(), [Reporter()], tmp_path, steps=2)
    GradClipCallback(gradclip.GlobalNorm(0.01)).attach(trainer)
    trainer.train()
    assert seen and all("grad_norm_clipped" in entry for entry in seen)


def test_max_grad_norm_left_on_is_warned_about(tmp_path):
    trainer = _trainer(_model(), [GradClipCallback(gradclip.GlobalNorm(0.01))], tmp_path, steps=1, max_grad_norm=1.0)
    with pytest.warns(UserWarning, match="clipped twice"):
        trainer.train()


def test_pre_optimizer_step_without_a_model_is_refused_and_changes_nothing(tmp_path):
    clipper = gradclip.QuantileNorm()
    clipper.clip([torch.full((3,), 50.0)])
    before = clipper.state_dict()
    callback = GradClipCallback(clipper)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    for bad, shown in ((None, "NoneType"), (object(), "object")):
        with pytest.raises(gradclip.InvalidArgumentError,
                           match=rf"on_pre_optimizer_step: model must be the torch.nn.Module being trained .*got {shown}"):
            callback.on_pre_optimizer_step(args, state, control, model=bad)
    assert callback.last_info is None and callback._pending == []
    assert clipper.state_dict() == before


def test_version_requirement_and_bad_arguments(monkeypatch):
    assert MIN_TRANSFORMERS_VERSION == (4, 45)
    with pytest.raises(gradclip.InvalidArgumentError, match="clipper must be a gradclip clipper"):
        GradClipCallback(None)
    with pytest.raises(gradclip.InvalidArgumentError, match="monitor must have an observe"):
        GradClipCallback(gradclip.GlobalNorm(1.0), monitor=1)
    monkeypatch.setattr(transformers, "__version__", "4.44.2")
    with pytest.raises(RuntimeError, match=r"transformers >= 4.45"):
        GradClipCallback(gradclip.GlobalNorm(1.0))


def test_a_monitor_with_updates_gets_each_step_update_and_the_logs_its_ratio(tmp_path):
    model = _model()
    log = tmp_path / "updates.jsonl"
    monitor = gradclip.Monitor(model, updates=True, warn=False, writers=[gradclip.monitor.JsonlWriter(log)])
    meter = StepMeter()
    trainer = _trainer(model, [GradClipCallback(gradclip.GlobalNorm(0.01), monitor=monitor), meter], tmp_path)
    trainer.train()
    monitor.close()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    names = [n for n, _ in model.named_parameters()]
    records = gradclip.monitor.read_log(log)
    assert len(logs) == len(records) == 4
    for entry, record, move in zip(logs, records, meter.moves):
        # The Trainer's logs carry each parameter's ratio; the monitor's update norms are the moves.
        assert {f"update_ratio/{n}" for n in names} <= set(entry)
        for name in names:
            assert entry[f"update_ratio/{name}"] == pytest.approx(record["update_ratios"][name], rel=1e-6)
        total = math.sqrt(sum(v * v for v in record["update_norms"].values()))
        assert total == pytest.approx(move, rel=1e-4)


def _resumable_trainer(model, callback, tmp_path, steps, **overrides):
    return _trainer(model, [callback], tmp_path, steps=steps, save_strategy="steps", save_steps=2, **overrides)


def _zclip():
    return gradclip.ZClip(warmup_steps=2)


@pytest.mark.parametrize("rebuild", [False, True], ids=["this_callback_loads", "trainer_rebuilds"])
def test_adaptive_state_survives_resume_from_checkpoint(rebuild, tmp_path):
    """Train 4 steps straight; train 2, save, resume from the checkpoint for 2 more: the clipper
    ends in the same state (and gives the same parameters) as the uninterrupted run."""
    straight_model, straight = _model(), GradClipCallback(_zclip())
    _resumable_trainer(straight_model, straight, tmp_path / "straight", steps=4).train()

    first_model = _model()
    _resumable_trainer(first_model, GradClipCallback(_zclip()), tmp_path / "run", steps=2).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert checkpoint.is_dir()
    resumed_callback = GradClipCallback(_zclip())
    trainer = _resumable_trainer(
        _model(), resumed_callback, tmp_path / "run", steps=4, restore_callback_states_from_checkpoint=rebuild
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    live = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GradClipCallback)]
    assert len(live) == 1 and (live[0] is not resumed_callback) == rebuild
    assert live[0].clipper.state_dict() == straight.clipper.state_dict()
    assert live[0].clipper.state_dict()["state"]["step"] == 4
    for a, b in zip(trainer.model.parameters(), straight_model.parameters()):
        torch.testing.assert_close(a, b)


def test_resuming_with_another_clipper_is_refused(tmp_path):
    _resumable_trainer(_model(), GradClipCallback(_zclip()), tmp_path, steps=2).train()
    other = GradClipCallback(gradclip.ZClip(warmup_steps=3))
    trainer = _resumable_trainer(_model(), other, tmp_path, steps=4)
    with pytest.raises(gradclip.StateError, match="resume with the clipper the run was trained with"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert other.clipper.state_dict()["state"] is None
