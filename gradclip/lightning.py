"""Lightning integration: clip with any gradclip clipper inside ``Trainer.fit``.

::

    import lightning as L, gradclip
    from gradclip.lightning import GradClipCallback

    trainer = L.Trainer(callbacks=[GradClipCallback(gradclip.get("zclip"), monitor=gradclip.Monitor(model))])
    trainer.fit(model, loader)

The callback clips in ``on_before_optimizer_step``: once per optimizer step (after gradient
accumulation), after Lightning's precision plugin has unscaled the gradients of a ``"16-mixed"``
run, before the optimizer steps. It works with every precision (``"32"``, ``"bf16-mixed"``,
``"16-mixed"``), including fused optimizers under ``"16-mixed"`` (which Lightning's own
``gradient_clip_val`` refuses): their gradients are unscaled here, once.

Do not also set ``Trainer(gradient_clip_val=...)``: that would clip a second time (a warning says
so). When the clipper asks to skip a step (``info.skip``), the gradients are cleared so the
optimizer leaves the parameters and its state alone; deciding that reads one bool on the host,
which happens only for clippers able to skip (``nonfinite="skip"``, ``SkipOnSpike``).

**The loss.** The clipper receives the step's training loss (``clip_(..., loss=...)``), so
``SkipOnSpike(signal="loss")`` judges the step it would skip: the callback takes each loss that
reaches ``backward`` (``on_before_backward``, fired before the clip of the same step), divides out
a ``"16-mixed"`` loss scale, and under ``accumulate_grad_batches=k`` gives the loss of the k
micro-batches together (Lightning divides each by k; the mean, in manual optimization).

**Several optimizers** (a GAN's generator and discriminator, ``configure_optimizers`` returning
several, manual optimization): give ``{optimizer_index: clipper}``; each optimizer's parameters
are clipped by their own clipper, with its own state, in that optimizer's steps (indices as in
``trainer.optimizers``; an optimizer not named is not clipped). One clipper for several
optimizers would mix their gradients in one state.

**Skip streaks.** With ``max_consecutive_skips=N`` the callback counts the optimizer steps
skipped in a row (``ClipInfo.consecutive_skips``, logged as ``consecutive_skips``). At the N-th it
sets ``trainer.should_stop = True`` and raises :class:`gradclip.DivergenceError` (naming the
streak, its gradient norms and losses) out of ``trainer.fit``: Lightning finalises the loggers
and callbacks as for any failed run, and no checkpoint of the diverged weights is written by the
callback's step. Checking the bound reads the count on the host once per step.

Needs ``lightning`` (``pip install lightning``; ``pytorch_lightning`` works too).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from typing import Any

from gradclip._core.checkpoint import check_keys, validate_checkpoint
from gradclip._core.clipper import Clipper
from gradclip._core.errors import InvalidArgumentError, StateError
from gradclip._core.streaks import SkipStreak
from gradclip._core.types import EmptyState
from gradclip.torch.optim_groups import check_mapped_clipper
from gradclip.torch.trainer_signals import StepLoss, count_skips, loss_across_ranks, monitor_hook

try:  # the unified package first, then the standalone one
    from lightning.pytorch import Callback as _Callback
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from pytorch_lightning import Callback as _Callback
    except ImportError as error:
        raise ImportError(
            "gradclip.lightning needs Lightning: pip install lightning (or pytorch_lightning)"
        ) from error

__all__ = ["GradClipCallback"]

#: The keys of the state the callback checkpoints (one clipper; ``consecutive_skips`` only for
#: a clipper able to skip), and with a mapping of optimizers to clippers.
_STATE_KEYS = frozenset({"clipper"})
_STREAK_KEYS = frozenset({"clipper", "consecutive_skips"})
_MAPPING_KEYS = frozenset({"clippers", "consecutive_skips"})


class _Slot:
    """One optimizer's clipper and its streak of skipped steps."""

    def __init__(self, clipper: Clipper, max_consecutive_skips: int | None, where: str):
        self.clipper = clipper
        self.streak = SkipStreak(max_consecutive_skips, where)
        self.streak.warn_if_never_skips(clipper)
        self.may_skip = clipper.may_skip


class GradClipCallback(_Callback):
    """Clip gradients with a gradclip clipper in every optimizer step of ``Trainer.fit``.

    Args:
        clipper: Any gradclip clipper, or ``{optimizer_index: clipper or None}`` for several
            optimizers (module documentation): each index that of an optimizer in
            ``trainer.optimizers``, each clipper used for one optimizer only; None (or an
            index left out) leaves that optimizer's gradients alone.
        monitor: A :class:`gradclip.Monitor`, observed after each clip with the trainer's global
            step; flushed when fitting ends (closing it stays yours). With
            ``Monitor(updates=True)`` the callback also brackets each optimizer step with
            ``before_step``/``after_step`` and, with ``log``, logs ``update_ratio/<name>`` (each
            parameter's ``‖ΔW‖ / ‖W‖``).
        log: Log ``grad_norm`` (pre-clip), ``grad_norm_clipped``, ``clip_coef``, ``clipped`` and,
            for a clipper able to skip, ``consecutive_skips`` to the Lightning loggers through
            ``pl_module.log`` (values stay tensors: Lightning fetches them when it logs). With a
            mapping each key ends in ``/<optimizer_index>`` (``grad_norm/0``).
        max_consecutive_skips: Stop the run when this many optimizer steps of one optimizer in
            a row were skipped: ``trainer.should_stop = True`` and
            :class:`~gradclip.DivergenceError` out of ``fit`` (an int ``>= 1``; None: never).

    The clippers' states and the streaks are saved in Lightning checkpoints and restored from
    them (a state that is not this callback's raises :class:`~gradclip.StateError`, see
    :meth:`load_state_dict`).

    Attributes:
        clipper: The clipper (None when a mapping was given: see ``clippers``).
        clippers: ``{optimizer_index: clipper}`` (one clipper: ``{0: clipper}``).
        last_info: The :class:`~gradclip.ClipInfo` of the last clipped step (any optimizer),
            with ``consecutive_skips`` counted.
        last_infos: ``{optimizer_index: ClipInfo}`` of each optimizer's last clipped step.

    Raises:
        InvalidArgumentError: ``clipper`` is not a gradclip clipper or a mapping of optimizer
            indices (ints ``>= 0``) to clippers or None, maps one clipper to two optimizers or
            none at all; ``monitor`` has no ``observe``; ``max_consecutive_skips`` is not None or
            an int ``>= 1``. When fitting starts: an index beyond the optimizers of
            ``configure_optimizers``.
    """

    def __init__(
        self,
        clipper: Clipper | Mapping[int, Clipper | None],
        monitor: Any = None,
        log: bool = True,
        max_consecutive_skips: int | None = None,
    ):
        super().__init__()
        where = "GradClipCallback"
        mapped = isinstance(clipper, Mapping)
        clippers = _clippers_by_index(where, clipper) if mapped else {0: clipper}
        if not mapped and not isinstance(clipper, Clipper):
            raise InvalidArgumentError(
                f"{where}: clipper must be a gradclip clipper or a mapping {{optimizer_index: clipper}}, "
                f"got {type(clipper).__qualname__}"
            )
        if monitor is not None and not callable(getattr(monitor, "observe", None)):
            raise InvalidArgumentError(
                f"{where}: monitor must have an observe(info) method, got {type(monitor).__qualname__}"
            )
        self._slots = {
            index: _Slot(c, max_consecutive_skips, f"{where}(optimizer {index})" if mapped else where)
            for index, c in clippers.items()
        }
        self.mapped = mapped
        self.clipper = None if mapped else clipper
        self.clippers = dict(clippers)
        self.max_consecutive_skips = max_consecutive_skips
        self.monitor = monitor
        self.log = bool(log)
        self.last_info = None
        self.last_infos: dict[int, Any] = {}
        self._loss = StepLoss()
        self._index_of: dict[int, int] = {}  # id(optimizer) -> its index in trainer.optimizers

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(getattr(trainer, "optimizers", None) or [])
        if self.mapped and optimizers:
            beyond = sorted(index for index in self._slots if index >= len(optimizers))
            if beyond:
                raise InvalidArgumentError(
                    f"GradClipCallback: the clipper mapping names optimizer index(es) {beyond}, but "
                    f"configure_optimizers returned {len(optimizers)} optimizer(s) (indices 0 to "
                    f"{len(optimizers) - 1}); nothing was clipped"
                )
        self._index_of = {id(getattr(o, "_optimizer", o)): i for i, o in enumerate(optimizers)}
        self._loss.clear()
        if getattr(trainer, "gradient_clip_val", None):
            warnings.warn(
                f"GradClipCallback: Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips too; "
                "gradients would be clipped twice. Leave gradient_clip_val unset.",
                UserWarning,
                stacklevel=2,
            )

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        # Under "16-mixed" Lightning hands the hook the scaled loss; the scale does not change
        # before the optimizer step (the scaler updates after it), so it is divided out here.
        # The scale stays on the device (GradScaler.get_scale() would read it on the host).
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        scale = None
        if scaler is not None and scaler.is_enabled():
            scale = getattr(scaler, "_get_scale_async", lambda: getattr(scaler, "_scale", None))()
        self._loss.add(loss, scale)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        inner = getattr(optimizer, "_optimizer", optimizer)
        # Automatic optimization divides each micro-batch's loss by accumulate_grad_batches.
        loss = self._loss.take(mean=not getattr(pl_module, "automatic_optimization", True))
        index = self._optimizer_index(trainer, inner) if self.mapped else 0
        slot = self._slots.get(index)
        if slot is None:
            return  # an optimizer the mapping leaves unclipped
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is not None and getattr(inner, "_step_supports_amp_scaling", False):
            # Lightning leaves a fused optimizer's gradients scaled; unscale them here, once.
            from gradclip.torch.scaling import scaler_stage

            if scaler_stage(scaler, inner) in ("ready", None):
                try:
                    scaler.unscale_(inner)
                except RuntimeError as error:
                    if "already been called" not in str(error):
                        raise
        members = {id(p) for group in inner.param_groups for p in group["params"]}
        named = [(n, p) for n, p in pl_module.named_parameters() if id(p) in members]
        clipper = slot.clipper
        loss = loss_across_ranks(loss, clipper)  # DDP: the same loss, so the same decision, on every rank
        if clipper.distributed_group() is None and "torch.distributed.fsdp" in sys.modules:
            # strategy="fsdp" (FSDP1): the parameters alone do not tell their shard groups; the
            # wrapped model does (gradclip.torch.fsdp). Set once; FSDP2 needs nothing.
            from gradclip.torch.fsdp import find

            layout = find(getattr(trainer.strategy, "model", None)) or find(pl_module)
            if layout is not None:
                clipper.process_group = layout
        info = clipper.clip_(named, loss=loss)
        self.last_info = self.last_infos[index] = info  # kept if the streak raises below

        def stop() -> None:
            trainer.should_stop = True

        def keep(counted: Any) -> None:
            self.last_info = self.last_infos[index] = counted

        info = count_skips(slot.streak, info, loss, slot.may_skip, named, stop, keep)
        self.last_info = self.last_infos[index] = info
        if self.monitor is not None:
            self.monitor.observe(info, step=int(trainer.global_step))
            monitor_hook(self.monitor, "before_step")
        if self.log:
            norm = info.norm.detach().float()
            coef = info.coef.detach().float()
            values = {
                "grad_norm": norm,
                "grad_norm_clipped": norm * coef,
                "clip_coef": coef,
                "clipped": info.clipped.detach().float(),
            }
            if slot.may_skip:
                values["consecutive_skips"] = info.consecutive_skips.float()
            suffix = f"/{index}" if self.mapped else ""
            pl_module.log_dict(
                {key + suffix: value for key, value in values.items()}, on_step=True, on_epoch=False, batch_size=1
            )
        if slot.may_skip and bool(info.skip):
            for _, param in named:
                param.grad = None

    def _optimizer_index(self, trainer: Any, optimizer: Any) -> int:
        """The position of ``optimizer`` in ``trainer.optimizers`` (they may be replaced after
        fitting starts: looked up again then)."""
        index = self._index_of.get(id(optimizer))
        if index is None:
            optimizers = list(getattr(trainer, "optimizers", None) or [])
            self._index_of = {id(getattr(o, "_optimizer", o)): i for i, o in enumerate(optimizers)}
            index = self._index_of.get(id(optimizer))
        if index is None:
            raise InvalidArgumentError(
                f"GradClipCallback: the optimizer stepping ({type(optimizer).__name__}) is not among "
                f"trainer.optimizers, so its clipper cannot be chosen; nothing was clipped"
            )
        return index

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        measured = monitor_hook(self.monitor, "after_step")
        if measured is not None and self.log:
            names, _, _, ratios = measured
            pl_module.log_dict(
                {f"update_ratio/{name}": ratio for name, ratio in zip(names, ratios.unbind())},
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None and callable(getattr(self.monitor, "flush", None)):
            self.monitor.flush()

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Warn when the checkpoint resumed holds no state of this callback (a run trained without
        it, or under another ``state_key``): an adaptive clipper, and the skip streak, then start
        afresh, as :class:`~gradclip.torch.ClippedOptimizer` warns for a plain optimizer state."""
        if self.state_key in (checkpoint.get("callbacks") or {}):
            return
        fresh = [
            type(slot.clipper).__name__
            for slot in self._slots.values()
            if getattr(slot.clipper, "state_type", EmptyState) is not EmptyState or slot.streak.max_consecutive_skips is not None
        ]
        if fresh:
            warnings.warn(
                f"GradClipCallback: the checkpoint resumed holds no GradClipCallback state (saved without "
                f"this callback?): {', '.join(fresh)} starts fresh (no adaptive history) and the skip "
                "streak at 0",
                UserWarning,
                stacklevel=2,
            )

    def state_dict(self) -> dict[str, Any]:
        """What Lightning saves in a checkpoint for this callback.

        Returns:
            ``{"clipper": clipper.state_dict()}``, with ``"consecutive_skips": int`` for a clipper
            able to skip; with a mapping ``{"clippers": {"<index>": state_dict},
            "consecutive_skips": {"<index>": int}}``.
        """
        if self.mapped:
            return {
                "clippers": {str(i): slot.clipper.state_dict() for i, slot in self._slots.items()},
                "consecutive_skips": {str(i): slot.streak.state_dict() for i, slot in self._slots.items()},
            }
        slot = self._slots[0]
        state: dict[str, Any] = {"clipper": slot.clipper.state_dict()}
        if slot.may_skip:
            state["consecutive_skips"] = slot.streak.state_dict()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the clippers and streaks from a checkpoint (Lightning calls it on
        ``fit(ckpt_path=...)``).

        Lightning calls this only when the checkpoint holds a state for this callback; a state
        without the keys :meth:`state_dict` writes is therefore not one this callback saved, and
        is refused rather than ignored (ignoring it would silently restart an adaptive clipper
        from scratch). Everything is validated before anything is loaded.

        Raises:
            StateError: ``state_dict`` is not the mapping :meth:`state_dict` returns (other keys,
                other optimizer indices, a streak that is not an int ``>= 0``), or a clipper
                refuses its part (another clipper, another configuration, bad values). Nothing
                changes then.
        """
        where = "GradClipCallback.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise StateError(
                f"{where}: expected the mapping GradClipCallback.state_dict() returned "
                f"({{'clippers': ...}} or {{'clipper': ...}}), got {type(state_dict).__name__}"
            )
        if self.mapped:
            check_keys(where, state_dict, _MAPPING_KEYS, "a GradClipCallback state (saved by this callback)")
            indices = {str(i) for i in self._slots}
            for key in _MAPPING_KEYS:
                part = state_dict[key]
                if not isinstance(part, Mapping):
                    raise StateError(f"{where}: {key!r} must be a mapping of optimizer indices, got {type(part).__name__}")
                check_keys(where, part, frozenset(indices), f"{key!r} (one entry per mapped optimizer)")
            pairs = [(slot, state_dict["clippers"][str(i)], state_dict["consecutive_skips"][str(i)]) for i, slot in self._slots.items()]
        else:
            slot = self._slots[0]
            expected = _STREAK_KEYS if "consecutive_skips" in state_dict else _STATE_KEYS
            check_keys(where, state_dict, expected, "a GradClipCallback state (saved by this callback)")
            pairs = [(slot, state_dict["clipper"], state_dict.get("consecutive_skips", 0))]
        for slot, saved, streak in pairs:
            validate_checkpoint(slot.clipper, saved)
            if isinstance(streak, bool) or not isinstance(streak, int) or streak < 0:
                raise StateError(f"{where}: consecutive_skips must be an int >= 0, got {streak!r}")
        for slot, saved, streak in pairs:
            slot.clipper.load_state_dict(saved)
            slot.streak.load_state_dict(streak)


def _clippers_by_index(where: str, mapping: Mapping[Any, Any]) -> dict[int, Clipper]:
    """Validate ``{optimizer_index: clipper or None}``; return the entries with a clipper.

    Raises:
        InvalidArgumentError: A key that is not an int ``>= 0``, a value that is neither a
            clipper nor None, one clipper under two indices, or no clipper at all.
    """
    clippers: dict[int, Clipper] = {}
    owners: dict[int, Any] = {}
    for index, clipper in mapping.items():
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise InvalidArgumentError(
                f"{where}: the clipper mapping's keys must be optimizer indices (ints >= 0, positions in "
                f"trainer.optimizers), got {index!r}"
            )
        check_mapped_clipper(where, index, clipper, owners, unit="optimizer")
        if clipper is not None:
            clippers[index] = clipper
    if not clippers:
        raise InvalidArgumentError(f"{where}: the clipper mapping {dict(mapping)!r} names no clipper")
    return dict(sorted(clippers.items()))
