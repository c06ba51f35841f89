"""Hugging Face transformers integration: clip with any gradclip clipper inside ``Trainer.train``.

::

    import gradclip
    from gradclip.transformers import GradClipCallback

    args = TrainingArguments(..., max_grad_norm=0)      # turn the Trainer's own clipping off
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[GradClipCallback(gradclip.get("zclip"))])
    trainer.train()

Requires ``transformers >= 4.45``: the callback clips in ``on_pre_optimizer_step``, the event the
Trainer fires after gradient accumulation and its own (disabled) clipping, right before
``optimizer.step()``. Older versions have no such event; constructing the callback there raises.

Set ``max_grad_norm=0`` (the Trainer's default is 1.0, which would clip first and hide the norms
the clipper should see; a warning says so). Under fp16 mixed precision the gradients are
unscaled once, through the accelerate optimizer's ``GradScaler``, before clipping.

Logging: every time the Trainer logs, the callback adds ``grad_norm`` (pre-clip global norm of the
last step, measured by gradclip), ``grad_norm_clipped``, ``clip_coef``, ``clip_threshold`` and
``clip_rate`` (fraction of the steps since the previous log that were clipped) to the logs and to
``trainer.state.log_history``. The values stay on the device between logs and are fetched in one
batch then. With a ``Monitor(updates=True)`` the callback brackets each optimizer step with the
monitor's ``before_step``/``after_step`` and adds ``update_ratio/<name>`` (each parameter's
``‖ΔW‖ / ‖W‖`` at the last step) to the logs. The Trainer runs reporting callbacks (TensorBoard, W&B...) before callbacks passed in
``callbacks=``; to have them receive these keys too, add the callback with
:meth:`GradClipCallback.attach` instead.

When the clipper asks to skip a step (``info.skip``), the gradients are cleared so the optimizer
leaves the parameters alone (one host read per step, only for clippers able to skip).

**The loss.** The Trainer gives callbacks no loss before the optimizer step. Add the callback with
:meth:`GradClipCallback.attach` and it also wraps ``trainer.training_step``, catching each
micro-batch's (detached) loss as the Trainer returns it; the clipper gets the step's loss
(``clip_(..., loss=...)``: the sum of the micro-batch losses, which the Trainer has normalised for
gradient accumulation, as the loss it logs), so ``SkipOnSpike(signal="loss")`` judges the step it
would skip. A clipper that needs the loss is refused when training begins if the callback was not
attached. (Under DeepSpeed ZeRO the engine clips inside the last ``backward``, before the loss is
returned: no loss is passed there.)

**Skip streaks.** With ``max_consecutive_skips=N`` the callback counts the optimizer steps skipped
in a row (``ClipInfo.consecutive_skips``; added to the logs as ``consecutive_skips``). At the N-th
it sets ``control.should_training_stop = True`` and raises :class:`gradclip.DivergenceError`
(naming the streak, its gradient norms and losses) out of ``trainer.train()``; the weights are
those of the last step taken (the skipped steps changed nothing), and the last checkpoint resumes
as usual. Checking the bound reads the count on the host once per step.
"""

from __future__ import annotations

import warnings
from typing import Any

from gradclip._core.clipper import Clipper
from gradclip._core.errors import InvalidArgumentError, StateError
from gradclip._core.registry import from_config
from gradclip._core.streaks import SkipStreak
from gradclip.torch.trainer_signals import StepLoss, count_skips, loss_across_ranks, monitor_hook, watches_loss

try:
    import transformers as _transformers
    from transformers import TrainerCallback as _TrainerCallback
    from transformers.trainer_callback import ExportableState as _ExportableState
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("gradclip.transformers needs transformers >= 4.45: pip install 'transformers>=4.45'") from error

__all__ = ["GradClipCallback", "MIN_TRANSFORMERS_VERSION"]

#: The first transformers release whose Trainer fires ``on_pre_optimizer_step``.
MIN_TRANSFORMERS_VERSION = (4, 45)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


class GradClipCallback(_TrainerCallback, _ExportableState):
    """Clip gradients with a gradclip clipper before every optimizer step of ``Trainer.train``.

    The clipper's state is part of every Trainer checkpoint (transformers' ``ExportableState``:
    ``trainer_state.json``, under ``stateful_callbacks``) and comes back with
    ``trainer.train(resume_from_checkpoint=...)``: by default this callback object, with your
    clipper and monitor, loads it when training begins; with
    ``TrainingArguments(restore_callback_states_from_checkpoint=True)`` the Trainer rebuilds the
    callback from the saved configuration and state instead (a monitor is not carried over then).

    Args:
        clipper: Any gradclip clipper, or its configuration ``{"clipper": name, "config": {...}}``.
        monitor: A :class:`gradclip.Monitor`, observed after each clip with the Trainer's global
            step; flushed when training ends (closing it stays yours).
        max_consecutive_skips: Stop training when this many optimizer steps in a row were
            skipped: ``control.should_training_stop = True`` and
            :class:`~gradclip.DivergenceError` out of ``train()`` (an int ``>= 1``; None: never).

    Raises:
        InvalidArgumentError: ``clipper`` is not a gradclip clipper, ``monitor`` has no
            ``observe``, or ``max_consecutive_skips`` is not None or an int ``>= 1``; when
            training begins, a clipper that needs the loss in a callback not added with
            :meth:`attach`.
        RuntimeError: transformers is older than 4.45.
    """

    def __init__(self, clipper: Clipper, monitor: Any = None, max_consecutive_skips: int | None = None):
        version = getattr(_transformers, "__version__", "0")
        if _version_tuple(version) < MIN_TRANSFORMERS_VERSION:
            raise RuntimeError(
                f"gradclip.transformers.GradClipCallback needs transformers >= 4.45 (the Trainer event "
                f"on_pre_optimizer_step); found {version}"
            )
        if isinstance(clipper, dict) and "clipper" in clipper:
            clipper = from_config(clipper)  # the Trainer rebuilding this callback from a checkpoint
        if not isinstance(clipper, Clipper):
            raise InvalidArgumentError(
                f"GradClipCallback: clipper must be a gradclip clipper, got {type(clipper).__qualname__}"
            )
        if monitor is not None and not callable(getattr(monitor, "observe", None)):
            raise InvalidArgumentError(
                f"GradClipCallback: monitor must have an observe(info) method, got {type(monitor).__qualname__}"
            )

        self.streak = SkipStreak(max_consecutive_skips, "GradClipCallback")
        self.streak.warn_if_never_skips(clipper)
        self.max_consecutive_skips = max_consecutive_skips
        self.clipper = clipper
        # A clipper checkpoint to load when training begins (set by the Trainer's restore).
        self.clipper_state: dict[str, Any] | None = None
        # The streak to restore likewise (an int).
        self.consecutive_skips: int | None = None
        self.monitor = monitor
        self.last_info = None
        self._may_skip = clipper.may_skip
        # The steps since the last training log, folded on the device into one row (at most one
        # entry, O(1) memory however long nothing logs): the last step's norm, norm after, coef,
        # threshold, clipped, streak, then the clipped count and the step count since the log.
        self._pending: list[Any] = []
        self._last_update: tuple[list[str], Any] | None = None
        self._loss = StepLoss()
        self._attached = False

    def attach(self, trainer: Any) -> GradClipCallback:
        """Add this callback to ``trainer`` ahead of the others, so reporting callbacks see its
        logs, and give the clipper the step's loss (module documentation).

        ``trainer.training_step`` is wrapped (once, on this Trainer object): it runs as before
        and its returned, detached loss is recorded for the next optimizer step.

        With ``TrainingArguments(restore_callback_states_from_checkpoint=True)`` the Trainer
        replaces each stateful callback by a new one built from the checkpoint; this callback
        takes the place of its replacement again, with the restored clipper state and streak, so
        it stays attached (and keeps its monitor) on resume.

        Returns:
            This callback.
        """
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        step = trainer.training_step
        if getattr(step, "_gradclip_callback", None) is not self:
            losses = self._loss

            def training_step(*args: Any, **kwargs: Any) -> Any:
                loss = step(*args, **kwargs)
                losses.add(loss)
                return loss

            training_step._gradclip_callback = self  # type: ignore[attr-defined]
            trainer.training_step = training_step
        load = getattr(trainer, "_load_callback_state", None)
        if callable(load) and getattr(load, "_gradclip_callback", None) is not self:

            def load_callback_state(*args: Any, **kwargs: Any) -> Any:
                before = list(trainer.callback_handler.callbacks)
                result = load(*args, **kwargs)
                self._take_back(trainer, before)
                return result

            load_callback_state._gradclip_callback = self  # type: ignore[attr-defined]
            trainer._load_callback_state = load_callback_state
        self._attached = True
        return self

    def _take_back(self, trainer: Any, before: list[Any]) -> None:
        """After the Trainer rebuilt the callbacks from a checkpoint: put this (attached) callback
        back in place of the one rebuilt for it, with the state restored into that one."""
        callbacks = trainer.callback_handler.callbacks
        if any(c is self for c in callbacks):
            return  # not replaced (no state saved for it, or the option is off)
        rebuilt = [c for c in callbacks if isinstance(c, GradClipCallback) and not any(c is b for b in before)]
        if not rebuilt:
            return
        mine = {"clipper": self.clipper.name, "config": self.clipper.config()}
        same = [c for c in rebuilt if c.state()["args"]["clipper"] == mine]
        # Another configuration: take its place all the same; on_train_begin names the mismatch.
        replacement = (same or rebuilt)[0]
        if same:
            self.clipper_state, self.consecutive_skips = replacement.clipper_state, replacement.consecutive_skips
        callbacks.remove(replacement)
        callbacks.insert(0, self)

    # -- checkpoints (transformers' ExportableState) ------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What the Trainer writes into ``trainer_state.json`` for this callback.

        Returns:
            ``{"args": {"clipper": {"clipper": name, "config": {...}}}, "attributes":
            {"clipper_state": clipper.state_dict()}}`` (plain JSON data); ``args`` also holds
            ``max_consecutive_skips`` when one is set, so a callback the Trainer rebuilds keeps it,
            and ``attributes`` the streak (``"consecutive_skips"``) for a clipper able to skip.
        """
        args: dict[str, Any] = {"clipper": {"clipper": self.clipper.name, "config": self.clipper.config()}}
        if self.max_consecutive_skips is not None:
            args["max_consecutive_skips"] = self.max_consecutive_skips
        attributes: dict[str, Any] = {"clipper_state": self.clipper.state_dict()}
        if self._may_skip:
            attributes["consecutive_skips"] = self.streak.state_dict()
        return {"args": args, "attributes": attributes}

    def _restore(self, state: Any) -> None:
        """Load the clipper state and streak saved in a resumed checkpoint's ``stateful_callbacks``.

        Raises:
            StateError: The saved state does not fit this clipper (another clipper, another
                configuration, bad values), or the streak is not an int ``>= 0``; nothing is
                loaded then.
        """
        saved, streak = self.clipper_state, self.consecutive_skips
        if saved is None:
            if getattr(state, "global_step", 0) == 0:
                return  # not a resumed run: the entry is this callback's own state at Trainer creation
            entries = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
            entries = entries if isinstance(entries, list) else [entries] if entries else []
            mine = {"clipper": self.clipper.name, "config": self.clipper.config()}
            # Several callbacks of this class: the entry saved for a clipper of this configuration.
            matching = [e for e in entries if isinstance(e, dict) and e.get("args", {}).get("clipper") == mine]
            if not matching:
                if entries:
                    raise StateError(
                        f"GradClipCallback: the checkpoint being resumed holds the state of "
                        f"{[e.get('args', {}).get('clipper') for e in entries if isinstance(e, dict)]}, not of "
                        f"{mine}; resume with the clipper the run was trained with"
                    )
                return
            attributes = matching[0].get("attributes", {})
            saved, streak = attributes.get("clipper_state"), attributes.get("consecutive_skips")
        self.clipper_state = self.consecutive_skips = None
        if streak is not None and (isinstance(streak, bool) or not isinstance(streak, int) or streak < 0):
            raise StateError(f"GradClipCallback: the checkpoint's consecutive_skips must be an int >= 0, got {streak!r}")
        if saved is not None:
            self.clipper.load_state_dict(saved)  # validated whole before anything changes
        if streak is not None:
            self.streak.load_state_dict(streak)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._attached and watches_loss(self.clipper):
            raise InvalidArgumentError(
                f"GradClipCallback: {type(self.clipper).__name__} needs the step's loss, which the Trainer "
                "gives callbacks only through GradClipCallback.attach(trainer); add the callback with "
                "callback.attach(trainer) instead of callbacks=[...]; nothing was trained"
            )
        self._restore(state)
        self._loss.clear()
        self._pending = []  # values of an earlier train() are not this run's
        self._last_update = None
        # DeepSpeed ZeRO: p.grad stays None and the engine steps inside accelerate's backward,
        # before on_pre_optimizer_step; clip at the engine's own clip point instead.
        from gradclip.deepspeed import attach, zero_optimizer_of

        zero = zero_optimizer_of(kwargs.get("optimizer"))
        if zero is not None and getattr(self, "_zero", None) is None:
            self._zero = attach(zero, self.clipper)
        max_grad_norm = getattr(args, "max_grad_norm", None)
        if max_grad_norm is not None and max_grad_norm > 0:
            warnings.warn(
                f"GradClipCallback: TrainingArguments(max_grad_norm={max_grad_norm}) makes the Trainer "
                "clip before this callback; gradients are clipped twice. Pass max_grad_norm=0.",
                UserWarning,
                stacklevel=2,
            )

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        if model is None or not callable(getattr(model, "named_parameters", None)):
            raise InvalidArgumentError(
                "GradClipCallback.on_pre_optimizer_step: model must be the torch.nn.Module being trained "
                f"(the Trainer passes it as model=), got {type(model).__qualname__}; nothing was clipped"
            )
        zero = getattr(self, "_zero", None)
        loss = self._loss.take(mean=False)  # the Trainer normalised each for accumulation
        if zero is not None:
            # Clipped inside the engine's step already: report that step's info.
            if zero.last_info is None:
                return
            info, named = zero.last_info, []
        else:
            self._unscale_once(optimizer)
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            loss = loss_across_ranks(loss, self.clipper)  # DDP: the same loss, so the same decision, on every rank
            info = self.clipper.clip_(named, loss=loss)
        self.last_info = info

        def stop() -> None:
            control.should_training_stop = True

        def keep(counted: Any) -> None:
            self.last_info = counted

        info = self.last_info = count_skips(self.streak, info, loss, self._may_skip, named, stop, keep)
        if self.monitor is not None:
            # The Trainer numbers this step global_step + 1 (it counts it after the update), as
            # its logs and checkpoints do.
            self.monitor.observe(info, step=int(state.global_step) + 1)
            monitor_hook(self.monitor, "before_step")
        import torch

        norm = info.norm.detach().to(torch.float32)
        coef = info.coef.detach().to(norm.device, torch.float32)
        clipped = info.clipped.detach().to(norm.device, torch.float32)
        row = torch.stack(
            [
                norm,
                norm * coef,
                coef,
                info.threshold.detach().to(norm.device, torch.float32),
                clipped,
                info.consecutive_skips.detach().to(norm.device, torch.float32),
                clipped,
                torch.ones_like(norm),
            ]
        )
        if self._pending:  # add this step's counts to those since the last log; keep its values
            row = torch.cat([row[:6], row[6:] + self._pending[0].to(row.device)[6:]])
        self._pending[:] = [row]
        if self._may_skip and bool(info.skip):
            for _, param in named:
                param.grad = None

    @staticmethod
    def _unscale_once(optimizer: Any) -> None:
        """Unscale fp16 gradients through accelerate's GradScaler unless that was done already."""
        scaler = getattr(optimizer, "scaler", None)
        inner = getattr(optimizer, "optimizer", None)
        if scaler is None or inner is None:
            return
        is_enabled = getattr(scaler, "is_enabled", None)
        if callable(is_enabled) and not is_enabled():
            return
        from gradclip.torch.scaling import scaler_stage

        if scaler_stage(scaler, inner) not in ("ready", None):
            return
        try:
            scaler.unscale_(inner)
        except RuntimeError as error:
            if "already been called" not in str(error):
                raise

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        measured = monitor_hook(self.monitor, "after_step")
        if measured is not None:
            self._last_update = (measured[0], measured[3])

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not self._pending or logs is None or "loss" not in logs:
            return  # only training logs carry the clipping values
        pending, self._pending = self._pending, []
        norm, norm_after, coef, threshold, _, streak, clipped, steps = pending[0].cpu().tolist()  # one sync
        added = {
            "grad_norm": norm,
            "grad_norm_clipped": norm_after,
            "clip_coef": coef,
            "clip_threshold": threshold,
            "clip_rate": clipped / steps,
        }
        if self._may_skip:
            added["consecutive_skips"] = int(streak)
        if self._last_update is not None:
            names, ratios = self._last_update
            self._last_update = None
            added.update({f"update_ratio/{n}": float(r) for n, r in zip(names, ratios.cpu().tolist())})
        logs.update(added)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step and "loss" in history[-1]:
            history[-1].update(added)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None and callable(getattr(self.monitor, "flush", None)):
            self.monitor.flush()
