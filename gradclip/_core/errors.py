"""The exception hierarchy.

Every error gradclip raises on purpose derives from :class:`GradClipError` and from the built-in
exception a Python user would reach for first (``ValueError`` for a bad value, ``TypeError`` for
a bad type), so ``except ValueError`` in existing code keeps working. Messages follow one shape:
the function, the argument, the bad value and what would have been valid.
"""

from __future__ import annotations

__all__ = [
    "GradClipError",
    "InvalidArgumentError",
    "UnknownNameError",
    "BackendError",
    "SparseGradientError",
    "ReadOnlyArrayError",
    "NonFiniteError",
    "StateError",
    "DivergenceError",
]


class GradClipError(Exception):
    """Base class of every error raised by gradclip on purpose.

    Every gradclip error is constructible from its message alone, with ``Exception``'s own
    ``__init__``: TensorFlow's autograph re-raises an error from inside ``tf.function`` as a new
    instance of its type built from one message argument when the type's ``__init__`` is
    ``Exception.__init__``, and as its own ``StagingError`` otherwise.
    """

    __init__ = Exception.__init__


class InvalidArgumentError(GradClipError, ValueError):
    """An argument has a value outside its valid range (negative threshold, unknown policy...)."""


class UnknownNameError(InvalidArgumentError):
    """A registry or option name is not known; the message lists the valid names."""


class BackendError(GradClipError, TypeError):
    """The arrays cannot be handled: unknown type, or several frameworks mixed in one call."""


class SparseGradientError(BackendError):
    """A sparse gradient reached a clipper that cannot clip it without densifying it."""


class ReadOnlyArrayError(BackendError, ValueError):
    """An array that must be written in place (``clip_``, ``clip_weights_``) is read-only.

    Raised before anything is written, so the other arrays of the call are untouched. It is also
    a ``ValueError`` because that is what NumPy raises on a write to a read-only array; code
    written against NumPy keeps catching it.
    """


class NonFiniteError(GradClipError, ValueError, RuntimeError):
    """Gradients hold NaN or inf under the ``"raise"`` policy.

    It is also a ``RuntimeError`` because that is what ``torch.nn.utils.clip_grad_norm_`` raises
    with ``error_if_nonfinite=True``; code written against torch keeps catching it.
    """

    # The offenders go through __new__, so that __init__ stays Exception's (see GradClipError).
    def __new__(cls, message: str = "", offenders: list[str] | None = None):
        self = super().__new__(cls, message)
        #: Names (or ``"#index"`` labels) of the tensors holding non-finite values.
        self.offenders = list(offenders or [])
        return self

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StateError(GradClipError, ValueError):
    """Clipper state is malformed, does not match the clipper, or was advanced twice in one step."""


class DivergenceError(GradClipError, RuntimeError):
    """Too many optimizer steps in a row were skipped: training has stopped making progress.

    Raised by :class:`gradclip.torch.ClippedOptimizer` (``max_consecutive_skips=N``) and the
    trainer integrations when the N-th consecutive step is skipped (``SkipOnSpike``,
    ``SkipAbove``, ``nonfinite="skip"``), instead of skipping forever. The message names the
    streak and the last norms and losses; they are also attributes. It is a ``RuntimeError``
    because a diverged run is one.
    """

    # The details go through __new__, so that __init__ stays Exception's (see GradClipError).
    def __new__(
        cls,
        message: str = "",
        streak: int = 0,
        norms: list[float] | None = None,
        losses: list[float | None] | None = None,
    ):
        self = super().__new__(cls, message)
        #: The number of consecutive skipped steps when the error was raised.
        self.streak = int(streak)
        #: The gradient norms of the skipped steps, oldest first.
        self.norms = list(norms or [])
        #: The losses of the skipped steps, oldest first (None where no loss was given).
        self.losses = list(losses or [])
        return self

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
