"""``ClippedOptimizer``: unscale once, clip once per optimizer step, skip when asked, then step.

::

    import gradclip, gradclip.torch as gct

    opt = gct.ClippedOptimizer(torch.optim.AdamW(model.parameters(), fused=True),
                               gradclip.GlobalNorm(1.0), scaler=scaler)
    for batch in loader:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(batch)
        scaler.scale(loss).backward()
        opt.step()            # unscale (once), clip, skip on inf or info.skip, step
        scaler.update()       # as with a plain GradScaler: once per iteration, by you
        opt.zero_grad()

What ``step()`` does, in order:

1. **Unscale** the gradients with the ``torch.amp.GradScaler`` given as ``scaler``, exactly once:
   when you already called ``scaler.unscale_(optimizer)`` (to inspect the gradients yourself) it
   is not done again.
2. **Clip** with the clipper, once per optimizer step. With ``accumulation_steps=k`` only every
   k-th call to ``step()`` clips and steps; the calls in between (and their ``zero_grad()``) do
   nothing, so gradients accumulate over k micro-batches and the clipper's state advances once.
3. **Skip** the inner step when ``info.skip`` is set (``nonfinite="skip"``, ``SkipOnSpike``) or the
   scaler found inf/NaN; **step** otherwise.

Folding (``fold=``)
-------------------
A fused optimizer (``Adam``, ``AdamW``, ``SGD``, ``Adagrad`` built with ``fused=True``) already
divides every gradient by a ``grad_scale`` tensor and skips its update where a ``found_inf`` tensor
is non-zero: that is how ``GradScaler`` unscales for it without a pass of its own. ``fold`` uses
the same input for the clip coefficient ``c``: the norm is *measured* without rewriting any
gradient (divided by the AMP scale ``S`` when the gradients are still scaled), and the optimizer is
stepped with ``grad_scale = S / c``. The result equals unscale-then-clip-then-step up to fp32
rounding, and two full read+write passes over the gradients disappear. Everything stays on the
device: no host-device synchronisation.

The hook is public: ``GradScaler.step`` multiplies a ``grad_scale`` that is already set on the
optimizer into its own, and fused optimizers read ``grad_scale``/``found_inf`` in ``step()``.
``ClippedOptimizer`` sets them from a step pre-hook (``Optimizer.register_step_pre_hook``),
registered for the one call and removed after it.

* ``fold=None`` (default): fold when the optimizer is fused and the clipper produces a single
  global coefficient (``GlobalNorm``, ``AutoClip``, ``ZClip``, ``QuantileNorm``, chains of
  those...); otherwise clip in place, silently.
* ``fold=True``: fold or raise :class:`~gradclip.InvalidArgumentError` saying why not (a per-tensor
  or element-wise clipper such as ``Norm``, ``Value``, ``AGC``; the ``"zero"`` non-finite policy,
  which must rewrite gradients; an optimizer that is not fused).
* ``fold=False``: always clip in place.

With a fold, ``ClippedOptimizer`` never writes a gradient: the fused kernel divides each one by
``grad_scale`` as it reads it and, as torch's fused kernels do, stores the divided value back in
the same pass. So after a step ``.grad`` holds the clipped, unscaled gradient, as on the unfolded
path; after a step skipped on overflow it is left as it was (still scaled).

Host-device synchronisation: none on the folded path and none for clippers that never ask to skip.
Skipping the step of a non-fused optimizer is a host decision, so for clippers that can set
``info.skip`` (``nonfinite="skip"``, ``SkipOnSpike``) a non-fused optimizer reads one bool per step;
a fused optimizer takes the flag on the device (``found_inf``) instead. A ``GradScaler`` with a
non-fused optimizer synchronises once per step on its own, as it always does.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from gradclip._core.clipper import Clipper, check_keys
from gradclip._core.errors import InvalidArgumentError, StateError
from gradclip._core.ops import get_ops
from gradclip._core.tree import collect_gradients
from gradclip._core.types import ClipInfo

__all__ = ["ClippedOptimizer", "fold_unsupported_reason"]

_FORMAT = "gradclip.ClippedOptimizer"
_FORMAT_VERSION = 1
#: The top-level keys of a ClippedOptimizer checkpoint, no more and no fewer.
_STATE_KEYS = frozenset({"format", "version", "optimizer", "clipper", "micro_step"})


class _CannotFold(Exception):
    """Raised by :class:`_MeasureOps` when a clipper needs to rewrite gradients element-wise."""

    def __init__(self, operation: str):
        super().__init__(operation)
        self.operation = operation


# Ops methods that only touch scalars: they pass through unchanged.
_SCALAR_METHODS = frozenset(
    {
        "context", "scalar", "where", "minimum", "maximum", "sqrt", "exp", "log", "isfinite",
        "stack", "any", "to_host", "array", "to_list", "combine_norms", "numel", "sum", "arange",
        "cast", "floor", "sort", "take", "cumsum", "uniform",
        # Reads host-side version counters of the gradients, never their values.
        "version_token",
    }
)
# Ops methods that must rewrite gradients element-wise or per tensor: no single coefficient.
_REWRITING_METHODS = frozenset(
    {"scale_each", "clamp", "zero_above", "sign_where", "zero_nonfinite", "scale_units", "select", "unit_norms"}
)


class _MeasureOps:
    """Ops that measure the gradients without rewriting them, for folding.

    Wraps the torch backend. ``scale(grads, coef)`` records ``coef`` instead of multiplying, and
    later measurements see the gradients as if they had been scaled (``norm * coef``); measured
    values are divided by the AMP scale ``S`` when the gradients are still scaled. Any operation
    that would rewrite gradients other than by one global factor raises :class:`_CannotFold`
    before anything is modified.
    """

    def __init__(self, inner: Any, amp_scale: torch.Tensor | None):
        self._inner = inner
        self._amp_scale = amp_scale
        #: Product of every coefficient the clipper asked to apply (None: none was applied).
        self.coef: torch.Tensor | None = None
        #: Per-tensor norms of the unscaled, unclipped gradients, from the first measurement,
        #: and the order of that norm.
        self.first_norms: torch.Tensor | None = None
        self.first_norm_type: float | None = None
        self.name = inner.name
        self.inplace = False

    def _adjust(self, values: torch.Tensor, norm_type: float | None = None) -> torch.Tensor:
        if self._amp_scale is not None:
            values = values / self._amp_scale.to(values.device, values.dtype)
        if norm_type is not None and self.first_norms is None and self.coef is None:
            self.first_norms, self.first_norm_type = values, float(norm_type)
        if self.coef is not None:
            values = values * self.coef.to(values.device, values.dtype)
        return values

    def norms(self, grads, norm_type):
        return self._adjust(self._inner.norms(grads, norm_type), norm_type)

    def global_norm(self, grads, norm_type):
        return self._inner.combine_norms(self.norms(grads, norm_type), norm_type)

    def extrema(self, grads):
        highs, lows = self._inner.extrema(grads)
        return self._adjust(highs), self._adjust(lows)

    def finite_each(self, grads):
        return self._inner.finite_each(grads)  # scale-invariant

    def scale(self, grads, coef):
        coef = torch.as_tensor(coef, device=self._inner.device)
        self.coef = coef if self.coef is None else self.coef * coef
        return grads

    def __getattr__(self, name: str):
        if name in _REWRITING_METHODS:
            def refuse(*args, **kwargs):
                raise _CannotFold(name)

            return refuse
        attribute = getattr(self._inner, name)
        if not callable(attribute) or name in _SCALAR_METHODS:
            return attribute

        # An operation this wrapper does not know: refuse it when it takes a list of gradients.
        def guarded(*args, **kwargs):
            if args and isinstance(args[0], (list, tuple)):
                raise _CannotFold(name)
            return attribute(*args, **kwargs)

        return guarded


def fold_unsupported_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Say why a clip coefficient cannot be folded into ``optimizer``'s step (None: it can).

    An optimizer can take the coefficient when it reads ``grad_scale``/``found_inf`` in its step
    (``_step_supports_amp_scaling``, set by torch's fused Adam, AdamW, SGD and Adagrad).
    """
    name = type(optimizer).__name__
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return (
            f"{name} does not read a gradient scale in its step; construct it with fused=True "
            "(torch.optim.Adam, AdamW, SGD and Adagrad support it)"
        )
    try:
        parameters = inspect.signature(optimizer.step).parameters
    except (TypeError, ValueError):
        parameters = {}
    if "grad_scaler" in parameters:
        return f"{name}.step takes the older grad_scaler= argument instead of reading grad_scale"
    if any(group.get("fused", True) is False for group in optimizer.param_groups):
        return f"a parameter group of {name} has fused=False"
    return None


def _may_skip(clipper: Clipper) -> bool:
    """Whether ``clipper`` can ever set ``info.skip`` (decided from its type and configuration)."""
    explicit = getattr(clipper, "may_skip", None)
    if isinstance(explicit, bool):
        return explicit
    if callable(explicit):
        return bool(explicit())
    if getattr(clipper, "name", "") == "skip_on_spike":
        return True
    links = getattr(clipper, "clippers", None)
    if isinstance(links, (list, tuple)) and links and all(isinstance(c, Clipper) for c in links):
        return any(_may_skip(c) for c in links)
    inner = getattr(clipper, "clipper", None)
    if isinstance(inner, Clipper) and inner is not clipper and _may_skip(inner):
        return True

    def mentions_skip(value: Any) -> bool:
        if isinstance(value, str):
            return value == "skip"
        if isinstance(value, dict):
            return any(mentions_skip(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return any(mentions_skip(v) for v in value)
        return False

    try:
        if mentions_skip(clipper.config()):
            return True
    except Exception:  # noqa: BLE001 - an odd config: be conservative
        return True
    # A clipper defined outside gradclip may do anything: assume it can ask to skip.
    return not type(clipper).__module__.startswith("gradclip.")


def _scaler_enabled(scaler: Any) -> bool:
    if scaler is None:
        return False
    is_enabled = getattr(scaler, "is_enabled", None)
    return bool(is_enabled()) if callable(is_enabled) else True


def _scaler_stage(scaler: Any, optimizer: torch.optim.Optimizer) -> str | None:
    """``"ready"``, ``"unscaled"`` or ``"stepped"`` for this optimizer; None if unknowable."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict):
        return None
    state = states.get(id(optimizer))  # .get: a defaultdict must not grow an entry here
    if state is None:
        return "ready"
    stage = getattr(state.get("stage"), "name", None)
    return {"READY": "ready", "UNSCALED": "unscaled", "STEPPED": "stepped"}.get(stage or "", None)


class ClippedOptimizer(torch.optim.Optimizer):
    """A torch optimizer that unscales (AMP), clips and skips before it steps.

    It is a ``torch.optim.Optimizer`` (so LR schedulers accept it) that forwards ``param_groups``,
    ``state``, ``defaults``, ``add_param_group`` and hook registration to the optimizer it wraps.

    Args:
        optimizer: Any ``torch.optim.Optimizer``.
        clipper: Any gradclip clipper (``gradclip.GlobalNorm(1.0)``, ``gradclip.get("zclip")``...).
        scaler: A ``torch.amp.GradScaler`` (or None). You still call ``scaler.scale(loss)`` before
            ``backward()`` and ``scaler.update()`` after ``step()``, as with a plain scaler.
        fold: ``None`` fold the clip coefficient into a fused optimizer's step when possible,
            ``True`` require it, ``False`` never (see the module documentation).
        accumulation_steps: Micro-batches per optimizer step, ``>= 1``. Call ``step()`` and
            ``zero_grad()`` after every backward: only every k-th call clips and steps.
        monitor: A :class:`gradclip.Monitor`; ``monitor.observe(info)`` is called after each clip.

    Attributes:
        last_info: The :class:`~gradclip.ClipInfo` of the last optimizer step (None before it).
        stepped: True when the last ``step()`` call reached an optimizer-step boundary (clipped,
            then stepped or skipped); with a scaler, call ``scaler.update()`` only then.
        folded: True when the last optimizer step folded the coefficient into the optimizer.

    Raises:
        InvalidArgumentError: A bad argument, or ``fold=True`` where folding is impossible.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        clipper: Clipper,
        scaler: Any = None,
        fold: bool | None = None,
        accumulation_steps: int = 1,
        monitor: Any = None,
    ):
        # torch.optim.Optimizer.__init__ is deliberately not called: this object owns no
        # parameters of its own; param_groups/state/defaults are the wrapped optimizer's.
        where = "ClippedOptimizer"
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidArgumentError(
                f"{where}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__qualname__}"
            )
        if isinstance(optimizer, ClippedOptimizer):
            raise InvalidArgumentError(f"{where}: optimizer is already a ClippedOptimizer; wrap the inner one once")
        if not isinstance(clipper, Clipper):
            raise InvalidArgumentError(
                f"{where}: clipper must be a gradclip clipper (e.g. gradclip.GlobalNorm(1.0)), "
                f"got {type(clipper).__qualname__}"
            )
        if scaler is not None and not all(hasattr(scaler, a) for a in ("scale", "unscale_", "step", "update")):
            raise InvalidArgumentError(
                f"{where}: scaler must be a torch.amp.GradScaler or None, got {type(scaler).__qualname__}"
            )
        if not (fold is None or fold is True or fold is False):
            raise InvalidArgumentError(f"{where}: fold must be None, True or False, got {fold!r}")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise InvalidArgumentError(
                f"{where}: accumulation_steps must be an integer >= 1, got {accumulation_steps!r}"
            )
        if monitor is not None and not callable(getattr(monitor, "observe", None)):
            raise InvalidArgumentError(
                f"{where}: monitor must have an observe(info) method (gradclip.Monitor), "
                f"got {type(monitor).__qualname__}"
            )
        self.optimizer = optimizer
        self.clipper = clipper
        self.scaler = scaler
        self.fold = fold
        self.accumulation_steps = accumulation_steps
        self.monitor = monitor
        self.last_info: ClipInfo | None = None
        self.stepped = False
        self.folded = False
        self._micro = 0
        # The last optimizer-step boundary raised: the next zero_grad() discards its gradients.
        self._failed_boundary = False
        self._may_skip = _may_skip(clipper)
        self._optimizer_reason = fold_unsupported_reason(optimizer)
        self._clipper_reason: str | None = None
        if fold is not False and self._optimizer_reason is None:
            self._clipper_reason = _probe_clipper(clipper)
        if fold is True:
            reason = self._optimizer_reason or self._clipper_reason
            if reason is not None:
                raise InvalidArgumentError(f"{where}: fold=True, but the clip cannot be folded: {reason}")
        self._fold_active = fold is not False and self._optimizer_reason is None and self._clipper_reason is None

    # -- the wrapped optimizer's view -------------------------------------------------------------
    @property
    def param_groups(self):  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    def __getattr__(self, name: str):
        # Only reached for attributes this object lacks (hook dicts, grad_scale...): forward them.
        if name == "optimizer" or "optimizer" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["optimizer"], name)

    def __getstate__(self):
        return dict(self.__dict__)

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"ClippedOptimizer({self.optimizer!r}, clipper={self.clipper!r}, "
            f"fold={self.fold!r}, accumulation_steps={self.accumulation_steps})"
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    @property
    def will_step(self) -> bool:
        """True when the next ``step()`` call is an optimizer-step boundary (clips and steps).

        Useful to skip gradient all-reduce on the other micro-batches (``DDP.no_sync``).
        """
        return self._micro + 1 >= self.accumulation_steps

    @property
    def fold_active(self) -> bool:
        """Whether the next optimizer step will fold the clip coefficient into the optimizer."""
        return self._fold_active

    # -- the step --------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients, except between the micro-batches of one accumulated step.

        After a ``step()`` that raised at an optimizer-step boundary, it discards the gradients
        accumulated for that step and starts a new accumulation (the loop that catches the error
        and carries on recovers instead of accumulating onto the bad gradients).
        """
        if self._micro == 0 or self._failed_boundary:
            self.optimizer.zero_grad(set_to_none=set_to_none)
            self._micro, self._failed_boundary = 0, False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Unscale once, clip once, then step the optimizer unless the step must be skipped.

        Args:
            closure: Re-evaluates the model and returns the loss (LBFGS needs it). With a closure
                the gradients are clipped in place after every evaluation (no folding), and a
                skipped step clears the gradients so the optimizer leaves the parameters alone.
                Not supported together with a ``GradScaler``, as in torch.

        Returns:
            The loss returned by ``closure`` (or the inner optimizer's step), else None.

        Raises:
            StateError: The GradScaler already stepped this optimizer since its last
                ``update()``; raised before the gradients are unscaled or clipped.
            InvalidArgumentError: A closure together with a GradScaler, or ``fold=True`` where
                the clipper turns out not to fold.

        A call that raises (these errors, or one from the clipper such as ``nonfinite="raise"``)
        leaves the micro-batch count, :attr:`stepped` and :attr:`folded` as they were. Then
        either fix the cause and call ``step()`` again (the same optimizer step; a clipper that
        already advanced on these gradients, say before a Monitor writer failed, refuses the
        repeat with :class:`~gradclip.StateError`), or call :meth:`zero_grad`, which discards the
        step's gradients and starts a new accumulation.
        """
        if closure is not None and _scaler_enabled(self.scaler):
            raise InvalidArgumentError(
                "ClippedOptimizer.step: closures are not supported together with a GradScaler "
                "(torch.amp.GradScaler.step does not support them either)"
            )
        if self.will_step:
            self._check_scaler_not_stepped()  # before anything changes: gradients, state, counters
        # A step() that raises counts for nothing: the counters go back to what they were, so a
        # retry after fixing the cause is the same call again. (The counters change up front
        # because a closure's zero_grad() looks at them.)
        counters = (self._micro, self.stepped, self.folded)
        boundary = self.will_step
        try:
            result = self._count_and_step(closure)
        except BaseException:
            self._micro, self.stepped, self.folded = counters
            self._failed_boundary = boundary
            raise
        self._failed_boundary = False
        return result

    def _count_and_step(self, closure: Callable[[], Any] | None) -> Any:
        self._micro += 1
        if self._micro < self.accumulation_steps:
            self.stepped = False
            if closure is None:
                return None
            with torch.enable_grad():
                return closure()
        self._micro = 0
        self.stepped = True
        if closure is not None:
            self.folded = False
            return self.optimizer.step(self._clipping_closure(closure))
        if self._fold_active:
            try:
                result = self._folded_step()
            except _CannotFold as refused:
                reason = _cannot_fold_message(self.clipper, refused.operation)
                if self.fold is True:
                    raise InvalidArgumentError(
                        f"ClippedOptimizer.step: fold=True, but the clip cannot be folded: {reason}"
                    ) from None
                self._fold_active = False
                self._clipper_reason = reason
            else:
                self.folded = True
                return result
        self.folded = False
        return self._unfolded_step()

    def _check_scaler_not_stepped(self) -> None:
        """Refuse a second optimizer step before ``scaler.update()``, as ``GradScaler.step`` would
        (but before the gradients are unscaled or clipped, so that nothing has changed)."""
        if _scaler_enabled(self.scaler) and _scaler_stage(self.scaler, self.optimizer) == "stepped":
            raise StateError(
                "ClippedOptimizer.step: the GradScaler already stepped this optimizer since its last "
                "update(); call scaler.update() once after every optimizer step (nothing was changed)"
            )

    def _named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """The optimizer's parameters with names: the monitor's model's, else the param groups'."""
        names = self.__dict__.get("_model_names")
        if names is None:
            model = getattr(self.monitor, "model", None)
            names = {}
            if model is not None and hasattr(model, "named_parameters"):
                names = {id(p): n for n, p in model.named_parameters()}
            self._model_names = names
        pairs = []
        position = 0
        for group in self.optimizer.param_groups:
            group_names = group.get("param_names")
            for index, param in enumerate(group["params"]):
                name = names.get(id(param))
                if name is None and group_names is not None and index < len(group_names):
                    name = group_names[index]
                pairs.append((name or f"#{position}", param))
                position += 1
        return pairs

    def _observe(self, info: ClipInfo, layer_norms: Any = None) -> None:
        self.last_info = info
        if self.monitor is not None:
            if layer_norms is None:
                self.monitor.observe(info)
            else:
                self.monitor.observe(info, layer_norms=layer_norms)

    def _unscale_once(self) -> None:
        if not _scaler_enabled(self.scaler):
            return
        if _scaler_stage(self.scaler, self.optimizer) == "unscaled":
            return
        try:
            self.scaler.unscale_(self.optimizer)
        except RuntimeError as error:
            if "already been called" not in str(error):
                raise

    def _unfolded_step(self) -> Any:
        self._unscale_once()
        info = self.clipper.clip_(self._named_parameters())
        self._observe(info)
        return self._inner_step(info, divisor=None)

    def _inner_step(self, info: ClipInfo, divisor: torch.Tensor | None) -> Any:
        """Step (through the scaler when there is one), skipping on ``info.skip``."""
        takes_flags = self._optimizer_reason is None
        skip = info.skip if self._may_skip else None
        if skip is not None and not takes_flags:
            # A non-fused optimizer cannot skip on the device: one host read decides.
            if bool(skip):
                return None
            skip = None
        with self._step_flags(divisor, skip):
            if _scaler_enabled(self.scaler):
                return self.scaler.step(self.optimizer)
            return self.optimizer.step()

    @contextmanager
    def _step_flags(self, divisor: torch.Tensor | None, skip: torch.Tensor | None) -> Iterator[None]:
        """Have the optimizer's step divide gradients by ``divisor`` and skip where ``skip``.

        A step pre-hook combines them with whatever ``GradScaler.step`` set on the optimizer just
        before calling its step (``grad_scale = S``, ``found_inf``); without a scaler the
        attributes it creates are removed after the step, as ``GradScaler`` does.
        """
        if divisor is None and skip is None:
            yield
            return
        created: list[str] = []

        def hook(optimizer, args, kwargs):
            if divisor is not None:
                current = getattr(optimizer, "grad_scale", None)
                if current is None:
                    optimizer.grad_scale = divisor
                    created.append("grad_scale")
                else:
                    optimizer.grad_scale = current * divisor.to(current.device, current.dtype)
            if skip is not None:
                flag = skip.to(torch.float32)
                current = getattr(optimizer, "found_inf", None)
                if current is None:
                    optimizer.found_inf = flag
                    created.append("found_inf")
                else:
                    # A logical or: fused kernels skip only where found_inf == 1 exactly.
                    optimizer.found_inf = torch.maximum(current, flag.to(current.device, current.dtype))
            return None

        handle = self.optimizer.register_step_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()
            for name in created:
                if name in self.optimizer.__dict__:
                    delattr(self.optimizer, name)

    def _folded_step(self) -> Any:
        named = self._named_parameters()
        collected = collect_gradients(named)
        where = "ClippedOptimizer.step"
        group = self.clipper._distributed_group()
        if not collected.grads and group is None:
            warnings.warn(
                f"{where}: found no gradients among {collected.seen} parameter(s); was it called "
                "before backward()? Nothing was clipped.",
                RuntimeWarning,
                stacklevel=3,
            )
        amp_scale = None
        if _scaler_enabled(self.scaler) and collected.grads:
            if _scaler_stage(self.scaler, self.optimizer) != "unscaled":
                # GradScaler.scale of a 1 gives the current scale as a device tensor, without a sync.
                one = torch.ones((), dtype=torch.float32, device=collected.grads[0].device)
                amp_scale = self.scaler.scale(one)
        # torch.distributed: DTensor gradients and process_group= reduce norms as in clip_.
        inner = get_ops(collected.grads, inplace=False, framework="torch", where=where, process_group=group)
        ops = _MeasureOps(inner, amp_scale)
        info = _measure_with(self.clipper, ops, inner, collected, where)
        coef = ops.coef
        layer_norms = None
        if ops.first_norm_type == 2.0 and len(collected.names) == len(ops.first_norms):
            post = ops.first_norms if coef is None else ops.first_norms * coef.to(ops.first_norms.dtype)
            layer_norms = (list(collected.names), post)
        self._observe(info, layer_norms)
        divisor = None
        if coef is not None:
            divisor = torch.reciprocal(coef.to(torch.float32))
        return self._inner_step(info, divisor=divisor)

    def _clipping_closure(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        def clipped():
            with torch.enable_grad():
                loss = closure()
            named = self._named_parameters()
            info = self.clipper.clip_(named)
            self._observe(info)
            if self._may_skip and bool(info.skip):
                for _, param in named:
                    param.grad = None
            return loss

        return clipped

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state and the clipper's, in one dict.

        Returns:
            ``{"format": "gradclip.ClippedOptimizer", "version": 1, "optimizer": ...,
            "clipper": ..., "micro_step": int}``; loads with ``torch.load(weights_only=True)``.
        """
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "optimizer": self.optimizer.state_dict(),
            "clipper": self.clipper.state_dict(),
            "micro_step": self._micro,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore what :meth:`state_dict` returned; on any error nothing changes.

        Validated like a clipper checkpoint (see :func:`gradclip._core.clipper.check_header`):
        exactly the keys of :meth:`state_dict`, the format name, the version as the int 1 (``True``
        and ``1.0`` compare equal to 1 in Python and are refused), ``micro_step`` an int in
        ``[0, accumulation_steps)``, the clipper's part as its own ``load_state_dict`` checks it, and
        the optimizer's part as torch checks it (parameter groups and sizes must match).

        Raises:
            StateError: Anything of the above does not hold. The optimizer, the clipper and the
                micro-batch count are then as they were.
        """
        where = "ClippedOptimizer.load_state_dict"
        if not isinstance(state_dict, Mapping) or state_dict.get("format") != _FORMAT:
            raise StateError(
                f"{where}: expected a dict from ClippedOptimizer.state_dict() (format {_FORMAT!r}), got "
                f"{_describe(state_dict)}; to load a plain optimizer state use opt.optimizer.load_state_dict(...)"
            )
        check_keys(where, state_dict, _STATE_KEYS, "a ClippedOptimizer checkpoint")
        version = state_dict["version"]
        if type(version) is not int or version != _FORMAT_VERSION:
            raise StateError(
                f"{where}: unsupported version {version!r} of type {type(version).__name__}; expected the int "
                f"{_FORMAT_VERSION}"
            )
        micro = state_dict["micro_step"]
        if type(micro) is not int or not 0 <= micro < self.accumulation_steps:
            raise StateError(
                f"{where}: micro_step must be an int in [0, {self.accumulation_steps}) (accumulation_steps="
                f"{self.accumulation_steps}), got {micro!r} of type {type(micro).__name__}"
            )
        optimizer_state = state_dict["optimizer"]
        if not isinstance(optimizer_state, Mapping) or not {"state", "param_groups"} <= set(optimizer_state):
            raise StateError(
                f"{where}: 'optimizer' must be a torch optimizer state_dict (a mapping with 'state' and "
                f"'param_groups'), got {_describe(optimizer_state)}"
            )
        # torch's own check, made here so that it fails before the clipper is touched.
        sizes = _group_sizes(self.optimizer.param_groups)
        saved_sizes = _group_sizes(optimizer_state["param_groups"])
        if saved_sizes != sizes:
            raise StateError(
                f"{where}: the optimizer's part does not fit {type(self.optimizer).__name__}: it has parameter "
                f"groups of sizes {saved_sizes}, this optimizer {sizes}"
            )
        # The clipper validates its part completely before it changes (gradclip's checkpoint rule);
        # the optimizer last: should torch (or a load hook) still refuse its part, the clipper's
        # previous state goes back.
        previous_clipper = self.clipper.state_dict()
        self.clipper.load_state_dict(state_dict["clipper"])
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except Exception as error:
            self.clipper.load_state_dict(previous_clipper)
            raise StateError(
                f"{where}: the optimizer's part does not fit {type(self.optimizer).__name__}: {error}"
            ) from error
        self._micro, self._failed_boundary = micro, False


def _group_sizes(groups: Any) -> list[int | None] | None:
    """The number of parameters of each group in ``param_groups`` (None where it is malformed)."""
    if not isinstance(groups, (list, tuple)):
        return None
    return [
        len(group["params"]) if isinstance(group, Mapping) and isinstance(group.get("params"), (list, tuple)) else None
        for group in groups
    ]


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a mapping with keys {sorted(map(str, value))}"
    return type(value).__name__


def _measure_with(clipper: Clipper, ops: _MeasureOps, inner: Any, collected: Any, where: str) -> ClipInfo:
    """Run one step of ``clipper`` through measure-only ``ops``: the sequence of ``Clipper.clip_``.

    Refuses a repeated call on unchanged gradients, reads and commits the clipper's own state
    exactly as ``clip_`` does (the hooks are looked up so that older cores work too).
    """
    grads = collected.grads
    params = collected.params if clipper._uses_params() else None
    guard = getattr(clipper, "_guard_repeat", None)
    if guard is not None:
        guard(inner, grads, where, False)
    own_state = getattr(clipper, "_own_state", None) or clipper._current_state
    commit = getattr(clipper, "_commit_state", None)
    with ops.context():
        state = own_state(ops, grads)
        _, new_state, info = clipper._update(ops, grads, state, params, collected.names)
        finish = getattr(inner, "finish_info", None)  # torch.distributed process groups
        if finish is not None:
            info = finish(info)
        if commit is not None:
            commit(ops, new_state, where)
        else:
            clipper._state = new_state
    remember = getattr(clipper, "_remember_grads", None)
    if remember is not None:
        remember(inner, grads)
    return info


def _probe_clipper(clipper: Clipper) -> str | None:
    """Try the clipper on a copy with small gradients: why it cannot be folded, or None."""
    grads = [torch.ones(2, 2), torch.ones(3)]
    params = [torch.ones(2, 2), torch.ones(3)]
    inner = get_ops(grads, inplace=False, framework="torch", where="ClippedOptimizer")
    ops = _MeasureOps(inner, None)
    try:
        probe = copy.deepcopy(clipper)
        probe.reset()
        with ops.context():
            probe._update(ops, grads, probe._init(ops, grads), params if probe._uses_params() else None, ["a", "b"])
    except _CannotFold as refused:
        return _cannot_fold_message(clipper, refused.operation)
    except Exception:  # noqa: BLE001 - undecidable here; the first real step decides
        return None
    return None


def _cannot_fold_message(clipper: Clipper, operation: str) -> str:
    return (
        f"{clipper!r} works per tensor or per element (it needs ops.{operation}), so no single "
        "coefficient can be passed to the optimizer; use fold=None or False"
    )
