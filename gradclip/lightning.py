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

Needs ``lightning`` (``pip install lightning``; ``pytorch_lightning`` works too).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from typing import Any

from gradclip._core.clipper import Clipper, check_keys
from gradclip._core.errors import InvalidArgumentError, StateError

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

#: The keys of the state the callback checkpoints.
_STATE_KEYS = frozenset({"clipper"})


class GradClipCallback(_Callback):
    """Clip gradients with a gradclip clipper in every optimizer step of ``Trainer.fit``.

    Args:
        clipper: Any gradclip clipper.
        monitor: A :class:`gradclip.Monitor`, observed after each clip with the trainer's global
            step; flushed when fitting ends (closing it stays yours). With
            ``Monitor(updates=True)`` the callback also brackets each optimizer step with
            ``before_step``/``after_step`` and, with ``log``, logs ``update_ratio/<name>`` (each
            parameter's ``‖ΔW‖ / ‖W‖``).
        log: Log ``grad_norm`` (pre-clip), ``grad_norm_clipped``, ``clip_coef`` and ``clipped`` to
            the Lightning loggers through ``pl_module.log`` (values stay tensors: Lightning fetches
            them when it logs).

    The clipper's state is saved in Lightning checkpoints and restored from them (a state that
    is not this callback's raises :class:`~gradclip.StateError`, see :meth:`load_state_dict`).

    Raises:
        InvalidArgumentError: ``clipper`` is not a gradclip clipper or ``monitor`` has no
            ``observe``.
    """

    def __init__(self, clipper: Clipper, monitor: Any = None, log: bool = True):
        super().__init__()
        if not isinstance(clipper, Clipper):
            raise InvalidArgumentError(
                f"GradClipCallback: clipper must be a gradclip clipper, got {type(clipper).__qualname__}"
            )
        if monitor is not None and not callable(getattr(monitor, "observe", None)):
            raise InvalidArgumentError(
                f"GradClipCallback: monitor must have an observe(info) method, got {type(monitor).__qualname__}"
            )

        self.clipper = clipper
        self.monitor = monitor
        self.log = bool(log)
        self.last_info = None
        self._may_skip = clipper.may_skip

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "gradient_clip_val", None):
            warnings.warn(
                f"GradClipCallback: Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips too; "
                "gradients would be clipped twice. Leave gradient_clip_val unset.",
                UserWarning,
                stacklevel=2,
            )

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        inner = getattr(optimizer, "_optimizer", optimizer)
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
        if self.clipper.distributed_group() is None and "torch.distributed.fsdp" in sys.modules:
            # strategy="fsdp" (FSDP1): the parameters alone do not tell their shard groups; the
            # wrapped model does (gradclip.torch.fsdp). Set once; FSDP2 needs nothing.
            from gradclip.torch.fsdp import find

            layout = find(getattr(trainer.strategy, "model", None)) or find(pl_module)
            if layout is not None:
                self.clipper.process_group = layout
        info = self.clipper.clip_(named)
        self.last_info = info
        if self.monitor is not None:
            self.monitor.observe(info, step=int(trainer.global_step))
            before_step = getattr(self.monitor, "before_step", None)  # a duck-typed monitor may lack it
            if callable(before_step):
                before_step()
        if self.log:
            norm = info.norm.detach().float()
            coef = info.coef.detach().float()
            pl_module.log_dict(
                {
                    "grad_norm": norm,
                    "grad_norm_clipped": norm * coef,
                    "clip_coef": coef,
                    "clipped": info.clipped.detach().float(),
                },
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )
        if self._may_skip and bool(info.skip):
            for _, param in named:
                param.grad = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        after_step = getattr(self.monitor, "after_step", None)
        measured = after_step() if callable(after_step) else None
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

    def state_dict(self) -> dict[str, Any]:
        """What Lightning saves in a checkpoint for this callback.

        Returns:
            ``{"clipper": clipper.state_dict()}``.
        """
        return {"clipper": self.clipper.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the clipper from a checkpoint (Lightning calls it on ``fit(ckpt_path=...)``).

        Lightning calls this only when the checkpoint holds a state for this callback; a state
        without ``"clipper"`` is therefore not one this callback saved, and is refused rather than
        ignored (ignoring it would silently restart an adaptive clipper from scratch).

        Raises:
            StateError: ``state_dict`` is not a mapping with exactly the key ``"clipper"``, or the
                clipper refuses its part (another clipper, another configuration, bad values).
                The clipper is unchanged then.
        """
        where = "GradClipCallback.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise StateError(
                f"{where}: expected the mapping GradClipCallback.state_dict() returned ({{'clipper': ...}}), "
                f"got {type(state_dict).__name__}"
            )
        check_keys(where, state_dict, _STATE_KEYS, "a GradClipCallback state (saved by this callback)")
        self.clipper.load_state_dict(state_dict["clipper"])
