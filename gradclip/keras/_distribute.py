"""``tf.distribute`` for :class:`gradclip.keras.ClippingOptimizer`: which strategies, the
cross-replica sum, and conditionals taken from a replica context.

See :mod:`gradclip.keras` for why the sum is taken before clipping. Nothing here imports
TensorFlow unless a strategy is in use (it is only looked up in ``sys.modules`` or imported on
the TensorFlow backend).
"""

from __future__ import annotations

import sys
from typing import Any

import keras

from gradclip._core.errors import InvalidArgumentError

__all__ = ["all_reduce_sum", "already_reduced", "assign_each", "check_strategy", "nothing", "replica_cond"]

# -- TensorFlow distribution --------------------------------------------------------------------------
_SUPPORTED = "MirroredStrategy, MultiWorkerMirroredStrategy, TPUStrategy, OneDeviceStrategy, or none"


def check_strategy(where: str, replica: bool = False) -> None:
    """Refuse a ``tf.distribute`` strategy under which the aggregated gradient cannot be clipped.

    Raises:
        InvalidArgumentError: A strategy that does not aggregate by all-reduce, one without
            devices, a strategy scope around another Keras backend, or (``replica``) a call in
            a cross-replica context.
    """
    tf = sys.modules.get("tensorflow")
    if tf is None or not tf.distribute.has_strategy():
        return  # no strategy: nothing is distributed (tensorflow not even imported, perhaps)
    strategy = tf.distribute.get_strategy()
    kind = type(strategy).__name__
    if keras.backend.backend() != "tensorflow":
        raise InvalidArgumentError(
            f"{where}: a tf.distribute.{kind} scope is active, but Keras runs on the "
            f"{keras.backend.backend()} backend, where tf.distribute does not aggregate its gradients; "
            "use KERAS_BACKEND=tensorflow, or keras.distribution on JAX"
        )
    supported = (
        tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy,
        tf.distribute.OneDeviceStrategy, tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy,
    )
    if not isinstance(strategy, supported):
        why = (
            "its workers apply their own gradients to the variables, so there is no aggregated gradient to clip"
            if "ParameterServer" in kind
            else "gradclip clips the cross-replica sum, which it takes with a replica-context all-reduce"
        )
        raise InvalidArgumentError(
            f"{where}: tf.distribute strategy {kind} is not supported: {why}; supported: {_SUPPORTED}. "
            "Nothing was changed."
        )
    replicas = strategy.num_replicas_in_sync
    if replicas < 1 or not strategy.extended.worker_devices:
        raise InvalidArgumentError(
            f"{where}: tf.distribute.{kind} has no devices (num_replicas_in_sync={replicas}, worker "
            f"devices {list(strategy.extended.worker_devices)}); give it at least one device"
        )
    if replica and tf.distribute.in_cross_replica_context():
        raise InvalidArgumentError(
            f"{where}: called in the cross-replica context of {kind}; call it inside strategy.run "
            "(model.fit does), where each replica passes its own gradients"
        )


def all_reduce_sum(grads: list[Any]) -> list[Any]:
    """The gradients summed across replicas (Keras' own reduction), None kept in place."""
    if keras.backend.backend() != "tensorflow":
        return grads
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    present = [g for g in grads if g is not None]
    if context is None or context.num_replicas_in_sync == 1 or not present:
        return grads
    reduced = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
    return [None if g is None else next(reduced) for g in grads]


def assign_each(variables: list[Any], values: list[Any]) -> None:
    """Assign ``values`` (the same on every replica) to ``variables``, each replica writing its
    own copy, as Keras' optimizers write their slots: no cross-replica communication, so no
    collective whose order could differ between replicas."""
    tf = sys.modules.get("tensorflow")
    if keras.backend.backend() != "tensorflow" or not tf.distribute.has_strategy():
        for variable, value in zip(variables, values):
            variable.assign(value)
        return

    def update(distribution, variables, values):
        for variable, value in zip(variables, values):
            distribution.extended.update(variable.value, lambda v, x: v.assign(x), args=(value,), group=False)

    tf.__internal__.distribute.interim.maybe_merge_call(update, tf.distribute.get_strategy(), variables, values)


def already_reduced(grads_and_vars):
    """Stands in for the wrapped optimizer's ``_all_reduce_sum_gradients``: the wrapper has
    summed the gradients across replicas already."""
    return list(grads_and_vars)


def nothing(*args):
    del args


def replica_cond(pred, true_fn, false_fn, *args) -> None:
    """``true_fn(*args)`` if ``pred`` else ``false_fn(*args)``, from a replica context.

    ``pred`` is the same on every replica (from summed gradients or the step counter). Strategies
    that synchronise through ``merge_call`` (MirroredStrategy on CPUs, or without XLA) cannot run a
    ``cond`` whose branch merges from a replica context: the ``cond`` then runs in the cross-replica
    context and each branch on every replica, as ``LossScaleOptimizer`` does.
    """
    import tensorflow as tf

    if tf.__internal__.distribute.strategy_supports_no_merge_call():
        tf.cond(pred, lambda: _none(true_fn(*args)), lambda: _none(false_fn(*args)))
        return

    def cross_replica(distribution, flag, *values):
        first = distribution.experimental_local_results(flag)[0]
        each = distribution.extended.call_for_each_replica
        tf.cond(first, lambda: _none(each(true_fn, args=values)), lambda: _none(each(false_fn, args=values)))

    tf.distribute.get_replica_context().merge_call(cross_replica, args=(pred,) + tuple(args))


def _none(value: Any) -> None:
    """A ``tf.cond`` branch's output: nothing (the branches act on variables)."""
    del value
