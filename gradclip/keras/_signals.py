"""The step's loss and the streak of skipped steps for :class:`gradclip.keras.ClippingOptimizer`.

**The loss.** Keras 3 optimizers never see the loss: ``apply_gradients`` takes gradients only.
But every backend's built-in ``Model.train_step`` (TensorFlow, torch and JAX alike) passes the
loss through ``optimizer.scale_loss(loss)`` before taking its gradient, in the same traced step
as ``apply_gradients`` (``keras/src/backend/tensorflow/trainer.py``). ``ClippingOptimizer``
overrides ``scale_loss`` to keep that tensor (:class:`LossOfTheStep`) and hands it to the clipper
in ``apply``: the loss of the very step being judged, not the previous batch's, with no
variable written and no host read. The loss is kept per thread (``tf.distribute``'s
``MirroredStrategy`` runs each replica's step in its own thread) and used only inside the graph
it belongs to, so a loss recorded by one traced function never leaks into another.

On the JAX backend ``scale_loss`` runs inside ``jax.value_and_grad``, whose tracer cannot leave
it: the loss is not available there (a clipper that needs it is refused when the optimizer is
built).

**The streak.** Counted in a Keras variable inside the compiled step (``where(skip, n + 1, 0)``);
:class:`StopOnDivergence` reads it once per batch, after the step, and stops ``fit``.
"""

from __future__ import annotations

import threading
from typing import Any

import keras
import numpy as np

from gradclip._core.errors import BackendError, DivergenceError, InvalidArgumentError
from gradclip._core.ops import framework_of

__all__ = ["LossOfTheStep", "StopOnDivergence", "check_loss", "watches_loss"]

#: The gradclip framework of each Keras backend's tensors.
_FRAMEWORK_OF_BACKEND = {"tensorflow": "tensorflow", "torch": "torch", "jax": "jax", "numpy": "numpy"}


def _graph_now() -> Any:
    """The graph being traced (TensorFlow), or None when running eagerly or on another backend."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    return None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()


def check_loss(where: str, loss: Any) -> Any:
    """``loss`` if it is a number or an array of the backend's framework (or NumPy, which Keras
    converts); the shape is checked where the clipper takes it.

    Raises:
        InvalidArgumentError: An array of another framework.
    """
    if not hasattr(loss, "shape") or isinstance(loss, np.ndarray | np.generic):
        return loss
    backend = keras.backend.backend()
    try:
        kind = framework_of(loss)
    except BackendError:
        kind = type(loss).__module__.split(".", 1)[0]
    if kind != _FRAMEWORK_OF_BACKEND.get(backend, backend):
        raise InvalidArgumentError(
            f"{where}: loss is a {kind} array, but Keras runs on the {backend} backend; "
            "pass the loss the train step computed; nothing was recorded"
        )
    return loss


class LossOfTheStep:
    """The loss ``scale_loss`` saw, until ``apply`` takes it (one per thread)."""

    def __init__(self) -> None:
        self._held: dict[int, tuple[Any, Any]] = {}

    def record(self, loss: Any) -> None:
        """Keep ``loss`` (without its gradient) for this thread's next :meth:`take`."""
        self._held[threading.get_ident()] = (_graph_now(), keras.ops.stop_gradient(loss))

    def take(self) -> Any:
        """The loss recorded by this thread in the graph being traced (or an enclosing one), or
        None; forgets it either way."""
        graph, loss = self._held.pop(threading.get_ident(), (None, None))
        if loss is None:
            return None
        now = _graph_now()
        if graph is None:  # an eager loss belongs to an eager step
            return loss if now is None else None
        # A traced loss belongs to its graph and the graphs inside it (a tf.cond branch).
        while now is not None and now is not graph:
            now = getattr(now, "outer_graph", None)
        return loss if now is graph else None


def watches_loss(clipper: Any) -> bool:
    """Whether ``clipper`` or a clipper it wraps decides on the loss (``SkipOnSpike(signal="loss")``)."""
    return bool(getattr(clipper, "watches_loss", False)) or any(watches_loss(c) for c in clipper.children())


class StopOnDivergence(keras.callbacks.Callback):
    """Stop ``model.fit`` when its :class:`~gradclip.keras.ClippingOptimizer` has skipped
    ``max_consecutive_skips`` steps in a row.

    After each batch it reads the optimizer's streak (one integer: Keras reads the batch's logs
    then anyway; on the JAX backend the trainer's state is written back to the variables for it,
    as for any callback that reads the model); at the bound it sets ``model.stop_training = True`` and raises
    :class:`~gradclip.DivergenceError`, naming the streak and its gradient norms and losses, out
    of ``fit``. ``model.optimizer`` may be the ``ClippingOptimizer`` or a
    ``LossScaleOptimizer`` around one.

    Raises:
        InvalidArgumentError: (when training begins) the model's optimizer is no
            ``ClippingOptimizer`` with ``max_consecutive_skips`` set.
    """

    def on_train_begin(self, logs: Any = None) -> None:
        optimizer = getattr(self.model, "optimizer", None)
        inner = getattr(optimizer, "inner_optimizer", None)
        found = next(
            (o for o in (optimizer, inner) if getattr(o, "max_consecutive_skips", None) is not None
             and callable(getattr(o, "check_divergence", None))),
            None,
        )
        if found is None:
            raise InvalidArgumentError(
                "StopOnDivergence: the model's optimizer must be a gradclip.keras.ClippingOptimizer with "
                f"max_consecutive_skips set (or a LossScaleOptimizer around one), got {type(optimizer).__name__}"
            )
        self._optimizer = found
        found.divergence_watched = True

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        # Reading self.model first makes Keras' JAX trainer write its state back into the
        # variables, which it otherwise does only at the end of an epoch.
        model = self.model
        try:
            self._optimizer.check_divergence()
        except DivergenceError:
            model.stop_training = True
            raise
