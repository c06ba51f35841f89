"""Value types shared by every clipper."""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["ClipInfo", "EmptyState"]


class ClipInfo(NamedTuple):
    """What one clipping step measured and did.

    Every field is an array on the gradients' device (a 0-d tensor for torch, a 0-d ndarray for
    NumPy), so building a ``ClipInfo`` never forces a host-device synchronisation. Reading the
    values is the caller's choice: :meth:`to_dict` does it in one go.

    Attributes:
        norm: Global norm of the gradients before clipping (fp32, or fp64 for fp64 gradients).
        threshold: The bound actually used this step (``max_norm`` for norm clippers, the
            adaptive threshold for adaptive ones, the largest magnitude allowed for value clipping).
        coef: The scale applied. Exactly 1 when the gradients were left untouched. For methods
            that do not scale uniformly (per-tensor or element-wise clipping) it is the effective
            scale ``norm_after / norm``.
        clipped: True when the gradients were changed by clipping.
        finite: True when every gradient element was finite.
        skip: True when the optimizer step should be skipped (non-finite gradients under the
            ``"skip"`` policy, or a spike detected by a spike-skipping clipper).
        consecutive_skips: Optimizer steps skipped in a row, this one included (an int64 0-d
            array; 0 when this step was not skipped). Counted by the wrappers that own the
            optimizer step (:class:`gradclip.torch.ClippedOptimizer`, the trainer callbacks,
            Keras' ``ClippingOptimizer``); None from a bare ``clip_``/``clip``/``update``, which
            cannot know whether the caller skipped.
    """

    norm: Any
    threshold: Any
    coef: Any
    clipped: Any
    finite: Any
    skip: Any
    consecutive_skips: Any = None

    def to_dict(self) -> dict[str, float | bool]:
        """Return the fields as Python floats and bools.

        This synchronises host and device once per field; call it when you log, not every step
        on an accelerator.

        Returns:
            A dict with the six measured fields as keys, and ``consecutive_skips`` (an int) when
            a wrapper counted it.
        """
        out: dict[str, float | bool] = {}
        for key, value in self._asdict().items():
            if key == "consecutive_skips" and value is None:
                continue
            as_python = value.item() if hasattr(value, "item") else value
            if key == "consecutive_skips":
                out[key] = int(as_python)
            elif key in ("clipped", "finite", "skip"):
                out[key] = bool(as_python)
            else:
                out[key] = float(as_python)
        return out


class EmptyState(NamedTuple):
    """The state of a stateless clipper: nothing to carry between steps."""
