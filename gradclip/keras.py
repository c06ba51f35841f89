"""Keras 3 adapter: train with any gradclip clipper inside ``model.fit``.

    import keras, gradclip
    from gradclip.keras import ClippingOptimizer

    optimizer = ClippingOptimizer(keras.optimizers.Adam(1e-3), gradclip.ZClip())
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=5)
    optimizer.last_info().to_dict()        # what the last step measured and did

:class:`ClippingOptimizer` wraps a Keras optimizer the way ``keras.optimizers.LossScaleOptimizer``
does: every ``apply``/``apply_gradients`` first clips the gradients with the clipper (its one
implementation in ``gradclip/clippers``, run on the backend of the gradient tensors), then hands
them to the wrapped optimizer. The clipper's state lives in Keras variables owned by the wrapper,
so adaptive clippers (ZClip, AutoClip, ...) keep advancing inside the compiled (``tf.function``,
XLA) train step, and the state is saved with the optimizer's variables in checkpoints. When the
clipper asks for the step to be skipped (``info.skip``), the wrapped optimizer does not run: the
weights, its moments and its ``iterations`` stay as they were.

Use the clipper *instead of* Keras' own ``clipnorm``/``global_clipnorm``/``clipvalue``: for
``ClippingOptimizer(opt, gradclip.Norm(c))`` and ``gradclip.GlobalNorm(c, eps=0)`` the results
equal ``clipnorm=c`` and ``global_clipnorm=c`` (``tests/test_keras.py`` checks it).

Variables without a gradient (``None``, e.g. a layer the loss does not use) are given a zero
gradient for the clipper's bookkeeping only: the clipper's state keeps one position per trainable
variable (AdaGC's per-tensor thresholds stay with their variables), a zero tensor adds nothing to
any norm and leaves AdaGC's threshold for it unchanged, and the inner optimizer still receives
``None`` for that variable, so it is not updated (Keras warns, as it does without clipping).
AdaGC reports ``info.threshold = inf`` while any variable has no threshold yet, so with a
variable that never gets a gradient its threshold stays ``inf`` (its clipping is unaffected).

Limits: the wrapped optimizer's ``gradient_accumulation_steps`` accumulates gradients that were
already clipped per micro-batch (Keras clips the accumulated sum); sparse ``tf.IndexedSlices``
gradients (embeddings) are densified before clipping.

Importing this module imports keras.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from gradclip._core.clipper import Clipper
from gradclip._core.errors import InvalidArgumentError
from gradclip._core.registry import from_config
from gradclip._core.tree import flatten
from gradclip._core.types import ClipInfo

__all__ = ["ClippingOptimizer"]

_INFO_FIELDS = ClipInfo._fields
_FLAG_FIELDS = ("clipped", "finite", "skip")


def _flatten_state(state: Any) -> tuple[list[Any], Any]:
    """Leaves of a (nested) NamedTuple state and a function rebuilding it."""
    leaves, unflatten, _ = flatten(state)
    return leaves, unflatten


@keras.saving.register_keras_serializable(package="gradclip")
class ClippingOptimizer(keras.optimizers.Optimizer):
    """A Keras 3 optimizer that clips gradients with a gradclip clipper, then steps another.

    Args:
        inner_optimizer: The ``keras.optimizers.Optimizer`` that applies the clipped gradients.
            Leave its ``clipnorm``/``global_clipnorm``/``clipvalue`` unset.
        clipper: Any gradclip clipper, stateless or adaptive (or a ``gradclip.chain``).
        name: Optional name.

    Raises:
        InvalidArgumentError: ``inner_optimizer`` is not a Keras optimizer, ``clipper`` is not a
            gradclip clipper, or the inner optimizer clips by itself as well.
    """

    def __init__(self, inner_optimizer, clipper: Clipper, name: str | None = None, **kwargs):
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise InvalidArgumentError(
                "ClippingOptimizer: inner_optimizer must be a keras.optimizers.Optimizer, got "
                f"{type(inner_optimizer).__name__}"
            )
        if not isinstance(clipper, Clipper):
            raise InvalidArgumentError(
                f"ClippingOptimizer: clipper must be a gradclip clipper, got {type(clipper).__name__}"
            )
        for option in ("clipnorm", "global_clipnorm", "clipvalue"):
            if getattr(inner_optimizer, option, None) is not None:
                raise InvalidArgumentError(
                    f"ClippingOptimizer: the inner optimizer also clips ({option}="
                    f"{getattr(inner_optimizer, option)!r}); clip with the gradclip clipper only"
                )
        if kwargs:
            raise InvalidArgumentError(
                f"ClippingOptimizer: unsupported arguments {sorted(kwargs)}; set them on the inner optimizer"
            )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.clipper = clipper
        self._state_like = None
        self._state_variables: list[Any] = []
        self._info_variables: list[Any] = []

    # -- building -----------------------------------------------------------------------------
    def build(self, var_list):
        # The clipper's initial state for gradients shaped like the variables (eager: Keras
        # builds optimizers before tracing the train step).
        with _eager_scope():
            values = [keras.ops.convert_to_tensor(v) for v in var_list]
            state = self.clipper.init(values)
            leaves, self._state_like = _flatten_state(state)
            arrays = [_to_numpy(leaf) for leaf in leaves]
        self._state_variables = []
        for position, array in enumerate(arrays):
            self._state_variables.append(
                self.add_variable(
                    shape=array.shape,
                    initializer=lambda shape, dtype, value=array: keras.ops.convert_to_tensor(value, dtype),
                    dtype=str(array.dtype),
                    name=f"clipper_state_{position}",
                )
            )
        self._info_variables = [
            self.add_variable(
                shape=(),
                initializer="ones" if field in ("coef", "finite") else "zeros",
                dtype="bool" if field in _FLAG_FIELDS else "float32",
                name=f"clip_{field}",
            )
            for field in _INFO_FIELDS
        ]
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    # -- stepping -----------------------------------------------------------------------------
    def _clip(self, grads, trainable_variables):
        """Clip ``grads`` and store the clipper's next state and info; return (grads, info)."""
        grads = [
            keras.ops.convert_to_tensor(g) if g is not None and not hasattr(g, "shape") else g
            for g in grads
        ]
        grads = [_densify(g) for g in grads]
        if len(grads) != len(trainable_variables):
            raise InvalidArgumentError(
                f"ClippingOptimizer.apply: got {len(grads)} gradient(s) for {len(trainable_variables)} "
                "trainable variable(s); pass one gradient (or None) per variable"
            )
        # A variable without a gradient (None: it took no part in the loss) gets a zero gradient
        # for the clipper only, so every position the state was built for (AdaGC keeps one
        # threshold per variable) still holds that variable. A zero tensor adds nothing to any
        # norm, and AdaGC leaves a tensor's threshold alone on a zero norm, so the statistics are
        # those of the gradients given; the zeros are dropped again below (None reaches the inner
        # optimizer, which skips that variable as Keras does).
        given = [g is not None for g in grads]
        grads = [
            g if g is not None else keras.ops.zeros(v.shape, dtype=v.dtype)
            for g, v in zip(grads, trainable_variables)
        ]
        # Read every variable up front, before this step assigns to any of them.
        state = self._state_like([keras.ops.convert_to_tensor(v) for v in self._state_variables])
        params = None
        if self.clipper.needs_params:
            params = [keras.ops.convert_to_tensor(v) for v in trainable_variables]
        clipped, new_state, info = self.clipper.update(grads, state, params=params)
        clipped = [c if keep else None for c, keep in zip(clipped, given)]
        new_leaves, _ = _flatten_state(new_state)
        for variable, value in zip(self._state_variables, new_leaves):
            variable.assign(keras.ops.cast(value, variable.dtype))
        for variable, field in zip(self._info_variables, _INFO_FIELDS):
            variable.assign(keras.ops.cast(getattr(info, field), variable.dtype))
        return clipped, info

    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "ClippingOptimizer: call optimizer.build(trainable_variables) first, or pass "
                    "trainable_variables"
                )
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        clipped, info = self._clip(list(grads), trainable_variables)
        if keras.backend.backend() == "tensorflow":
            self._tf_step(clipped, trainable_variables, info.skip)
        else:
            self._masked_step(clipped, trainable_variables, info.skip)

    def _tf_step(self, grads, trainable_variables, skip):
        import tensorflow as tf

        if not tf.__internal__.distribute.strategy_supports_no_merge_call():
            raise NotImplementedError(
                "ClippingOptimizer: distribution strategies that need merge_call are not supported"
            )
        keras.ops.cond(
            skip,
            lambda: None,
            lambda: self.inner_optimizer.apply(grads, trainable_variables),
        )

    def _masked_step(self, grads, trainable_variables, skip):
        # Backends without a stateful cond (JAX traces both branches): step, then put back the
        # old values where the step is skipped.
        kept = list(trainable_variables) + list(self.inner_optimizer.variables)
        before = [keras.ops.convert_to_tensor(v) for v in kept]
        self.inner_optimizer.apply(grads, trainable_variables)
        for variable, old in zip(kept, before):
            variable.assign(keras.ops.where(skip, old, variable.value))

    # -- reading what happened ----------------------------------------------------------------
    def last_info(self) -> ClipInfo:
        """The :class:`~gradclip.ClipInfo` of the last step (reads variables: call when logging)."""
        if not self.built:
            raise ValueError("ClippingOptimizer.last_info: no step has been taken yet")
        return ClipInfo(**{f: _to_numpy(v) for f, v in zip(_INFO_FIELDS, self._info_variables)})

    def clipper_state_dict(self) -> dict[str, Any]:
        """The clipper's ``state_dict()`` with the state held in this optimizer's variables."""
        if not self.built:
            return self.clipper.state_dict()
        return self.clipper.state_dict(self._state_like([_to_numpy(v) for v in self._state_variables]))

    def load_clipper_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a clipper ``state_dict`` into this optimizer's variables (build it first)."""
        if not self.built:
            raise ValueError("ClippingOptimizer.load_clipper_state_dict: build the optimizer first")
        state = self.clipper.state_from_dict(state_dict)
        self.clipper.load_state_dict(state_dict)
        leaves, _ = _flatten_state(state)
        for variable, value in zip(self._state_variables, leaves):
            variable.assign(np.asarray(value).astype(variable.dtype))

    # -- delegation, as keras.optimizers.LossScaleOptimizer does --------------------------------
    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        from keras.saving import serialize_keras_object

        return {
            "name": self.name,
            "inner_optimizer": serialize_keras_object(self.inner_optimizer),
            "clipper": {"clipper": self.clipper.name, "config": self.clipper.config()},
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        from keras.saving import deserialize_keras_object

        config = dict(config)
        inner = deserialize_keras_object(config.pop("inner_optimizer"), custom_objects=custom_objects)
        clipper = from_config(config.pop("clipper"))
        return cls(inner, clipper, **config)


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "numpy"):
        x = x.numpy()
    return np.asarray(x)


def _eager_scope():
    """Outside any graph being traced (Keras may build the optimizer inside ``tf.function``)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.init_scope()
    import contextlib

    return contextlib.nullcontext()


def _densify(grad):
    if grad is None or keras.backend.backend() != "tensorflow":
        return grad
    import tensorflow as tf

    if isinstance(grad, tf.IndexedSlices):
        return tf.convert_to_tensor(grad)
    return grad
