"""Keras 3 adapter: train with any gradclip clipper inside ``model.fit``.

    import keras, gradclip
    from gradclip.keras import ClippingOptimizer

    optimizer = ClippingOptimizer(keras.optimizers.Adam(1e-3), gradclip.ZClip())
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=5)
    optimizer.last_info().to_dict()        # what the last step measured and did

:class:`ClippingOptimizer` wraps a Keras optimizer the way ``keras.optimizers.LossScaleOptimizer``
does: every ``apply``/``apply_gradients`` clips the gradients with the clipper (its one
implementation in ``gradclip/clippers``, run on the backend of the gradient tensors), then hands
them to the wrapped optimizer. The clipper's state lives in Keras variables owned by the wrapper,
so adaptive clippers (ZClip, AutoClip, ...) keep advancing inside the compiled (``tf.function``,
XLA, ``jax.jit``) train step, and the state is saved with the optimizer's variables in
checkpoints. When the clipper asks for the step to be skipped (``info.skip``), the wrapped
optimizer does not run: the weights, its moments and its ``iterations`` stay as they were.

What is clipped is the gradient the wrapped optimizer would apply, never a part of it:

* **Under** ``tf.distribute`` (``MirroredStrategy``, ``MultiWorkerMirroredStrategy``,
  ``TPUStrategy``) each replica computes the gradient of its share of the batch, and Keras sums
  them across replicas only inside the wrapped optimizer's update (``_all_reduce_sum_gradients``),
  so clipping before it would clip every replica's part by its own norm (why TensorFlow long
  refused ``clipnorm`` under strategies). Here every replica all-reduces (sums) the gradients
  first, in its replica context, exactly as Keras would, clips that sum (the norm is the norm of
  the whole batch's gradient, identical on every replica, and so is every adaptive decision and
  state), and the wrapped optimizer applies it without summing again (its all-reduce is replaced
  by the identity: one all-reduce per step, as without clipping). The update equals one replica's
  on the whole batch. Strategies that do not aggregate by all-reduce (``ParameterServerStrategy``,
  ``CentralStorageStrategy``) or that have no device are refused with an error naming them.
* **Gradient accumulation** (``gradient_accumulation_steps=k`` on the wrapped optimizer): the
  wrapper takes the accumulation over (the wrapped optimizer then steps once per ``k`` batches), so
  the clip acts once per optimizer step, on the average of the ``k`` micro-batch gradients, summed
  across replicas once: equal to an unaccumulated run on the ``k``-times batch. Under a strategy
  each replica accumulates its own gradients (replica-local variables).
* **Loss scaling**: nest ``LossScaleOptimizer(ClippingOptimizer(optimizer, clipper))`` (what
  ``model.compile`` builds under a ``mixed_float16`` policy). The loss-scale optimizer unscales the
  gradients before this one sees them, and on an overflow it never calls it: the step is skipped
  and the clipper's state does not advance. The other nesting order would clip scaled gradients
  and is refused; a static ``loss_scale_factor`` on the wrapped optimizer is taken over (the
  gradients are unscaled before clipping).

On the JAX and PyTorch Keras backends (``KERAS_BACKEND=jax|torch``) the same clipping runs in the
jitted (stateless) or eager train step; a skipped or accumulating step is masked with ``where``
(JAX has no stateful conditional). ``tf.distribute`` exists on the TensorFlow backend only: a
strategy scope around another backend's optimizer is refused. With ``keras.distribution`` on JAX
the gradients are global arrays and their norms are those of the whole gradient already.

Use the clipper *instead of* Keras' own ``clipnorm``/``global_clipnorm``/``clipvalue``: for
``ClippingOptimizer(opt, gradclip.Norm(c))`` and ``gradclip.GlobalNorm(c, eps=0)`` the results
equal ``clipnorm=c`` and ``global_clipnorm=c`` (``tests/test_keras.py`` checks it).

Variables without a gradient (``None``, e.g. a layer the loss does not use) are given a zero
gradient for the clipper's bookkeeping only: the clipper's state keeps one position per trainable
variable (AdaGC's per-tensor thresholds stay with their variables), a zero tensor adds nothing to
any norm and leaves AdaGC's threshold for it unchanged, and the inner optimizer still receives
``None`` for that variable, so it is not updated (Keras warns, as it does without clipping).
Sparse ``tf.IndexedSlices`` gradients (embeddings) are densified before clipping.

**The loss** of the step reaches the clipper (``SkipOnSpike(signal="loss")``) with nothing to turn
on: Keras' own ``train_step`` hands it to ``optimizer.scale_loss`` before taking the gradients,
and ``ClippingOptimizer.scale_loss`` keeps it for its ``apply`` in the same step (see
:mod:`gradclip.keras._signals`). Under gradient accumulation the clipper gets the mean loss of the
micro-batches, under ``tf.distribute`` the loss of the whole batch (summed across replicas with
the gradients). A ``train_step`` of your own passes it the same way: call
``loss = self.optimizer.scale_loss(loss)`` before taking the gradient, as Keras' does. Not
available: on the JAX backend (the loss cannot leave ``jax.value_and_grad``; a clipper that needs
it is refused there), and with a ``LossScaleOptimizer`` around this one (it does not pass the
loss on; a clipper that needs it then raises when the step is traced).

**Skip streaks.** ``ClippingOptimizer(..., max_consecutive_skips=N)`` counts the steps skipped in a
row in a variable inside the compiled step (``last_info().consecutive_skips``) and keeps the last
N norms and losses. Add ``gradclip.keras.StopOnDivergence()`` to ``fit``'s callbacks: after the
N-th skipped step in a row it sets ``model.stop_training = True`` and raises
:class:`gradclip.DivergenceError` out of ``fit`` (one integer read per batch). In a training loop
of your own call ``optimizer.check_divergence()`` after each step instead.

**Saving.** ``model.save``/``keras.models.load_model`` keep the clipper: ``get_config`` holds its
configuration as the plain data of its ``state_dict()`` (a schedule threshold as its settings, in
a chain or ``Subset`` too) and the state lives in the optimizer's variables. A plain function
given as a schedule is saved by name only and cannot be rebuilt by ``load_model`` (its error says
so): use a schedule object of :mod:`gradclip.schedules`, or rebuild the optimizer and load the
weights.

Importing this module imports keras.
"""

from __future__ import annotations

import warnings
from typing import Any

import keras
import numpy as np

from gradclip._core.clipper import Clipper
from gradclip._core.checkpoint import plain_config
from gradclip._core.errors import InvalidArgumentError
from gradclip._core.registry import from_config
from gradclip._core.streaks import divergence_error
from gradclip._core.tree import flatten
from gradclip._core.types import ClipInfo
from gradclip._core.validation import check_int
from gradclip.keras._distribute import (
    all_reduce_sum,
    already_reduced,
    assign_each,
    check_strategy,
    nothing,
    replica_cond,
)
from gradclip.keras._signals import (
    LossOfTheStep,
    StopOnDivergence,
    check_loss,
    watches_loss,
)

__all__ = ["ClippingOptimizer", "StopOnDivergence"]

# The six measured fields, and consecutive_skips, counted by this optimizer's step.
_INFO_FIELDS = ClipInfo._fields
_INFO_DTYPES = {"clipped": "bool", "finite": "bool", "skip": "bool", "consecutive_skips": "int32"}
#: What the wrapper takes over from the wrapped optimizer (and gives back in ``get_config``).
_TAKEN = ("gradient_accumulation_steps", "loss_scale_factor")


def _flatten_state(state: Any) -> tuple[list[Any], Any]:
    """Leaves of a (nested) NamedTuple state and a function rebuilding it."""
    leaves, unflatten, _ = flatten(state)
    return leaves, unflatten


@keras.saving.register_keras_serializable(package="gradclip")
class ClippingOptimizer(keras.optimizers.Optimizer):
    """A Keras 3 optimizer that clips gradients with a gradclip clipper, then steps another.

    Args:
        inner_optimizer: The ``keras.optimizers.Optimizer`` that applies the clipped gradients.
            Leave its ``clipnorm``/``global_clipnorm``/``clipvalue`` unset. Its
            ``gradient_accumulation_steps`` and ``loss_scale_factor`` are taken over (module
            documentation): set them there, before the first step.
        clipper: Any gradclip clipper, stateless or adaptive (or a ``gradclip.chain``).
        name: Optional name.
        max_consecutive_skips: Count the steps skipped in a row and keep the last ones' norms and
            losses, for :class:`StopOnDivergence` or :meth:`check_divergence` to raise
            :class:`~gradclip.DivergenceError` at this many (an int ``>= 1``; None: count only).

    Raises:
        InvalidArgumentError: ``inner_optimizer`` is not a Keras optimizer, is a
            ``LossScaleOptimizer`` (nest it outside instead) or already built with gradient
            accumulation; ``clipper`` is not a gradclip clipper; the inner optimizer clips by
            itself as well; created under a ``tf.distribute`` strategy gradclip cannot clip
            after aggregation, or on a backend other than TensorFlow inside a strategy scope;
            ``max_consecutive_skips`` is not None or an int ``>= 1``; a clipper that needs the
            loss on the JAX backend (module documentation).
    """

    def __init__(self, inner_optimizer, clipper: Clipper, name: str | None = None, max_consecutive_skips: int | None = None, **kwargs):
        where = "ClippingOptimizer"
        check_int(where, "max_consecutive_skips", max_consecutive_skips, low=1, allow_none=True)
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise InvalidArgumentError(
                f"{where}: inner_optimizer must be a keras.optimizers.Optimizer, got "
                f"{type(inner_optimizer).__name__}"
            )
        if isinstance(inner_optimizer, keras.optimizers.LossScaleOptimizer):
            raise InvalidArgumentError(
                f"{where}: inner_optimizer is a LossScaleOptimizer, whose gradients are still scaled "
                "when they would be clipped; nest the other way: "
                "LossScaleOptimizer(ClippingOptimizer(optimizer, clipper))"
            )
        if not isinstance(clipper, Clipper):
            raise InvalidArgumentError(
                f"{where}: clipper must be a gradclip clipper, got {type(clipper).__name__}"
            )
        for option in ("clipnorm", "global_clipnorm", "clipvalue"):
            if getattr(inner_optimizer, option, None) is not None:
                raise InvalidArgumentError(
                    f"{where}: the inner optimizer also clips ({option}="
                    f"{getattr(inner_optimizer, option)!r}); clip with the gradclip clipper only"
                )
        if kwargs:
            raise InvalidArgumentError(
                f"{where}: unsupported arguments {sorted(kwargs)}; set them on the inner optimizer"
            )
        if keras.backend.backend() == "jax" and watches_loss(clipper):
            raise InvalidArgumentError(
                f"{where}: {type(clipper).__name__} needs the step's loss, which Keras' JAX train step keeps "
                "inside jax.value_and_grad; use the TensorFlow or torch backend, or a gradient-norm signal"
            )
        steps = inner_optimizer.gradient_accumulation_steps
        if steps and inner_optimizer.built:
            raise InvalidArgumentError(
                f"{where}: the inner optimizer is already built with gradient_accumulation_steps="
                f"{steps}; wrap it before its first step"
            )
        check_strategy(where)
        super().__init__(learning_rate=0.0, name=name, loss_scale_factor=inner_optimizer.loss_scale_factor)
        # Taken over: the clip must see the whole accumulated, unscaled gradient (module docs).
        inner_optimizer.gradient_accumulation_steps = None
        inner_optimizer.loss_scale_factor = None
        self.accumulation_steps = steps or None
        self.inner_optimizer = inner_optimizer
        self.clipper = clipper
        self.max_consecutive_skips = max_consecutive_skips
        #: Set by StopOnDivergence when it watches this optimizer in fit.
        # Set by StopOnDivergence (and check_divergence): the streak's bound is checked by someone.
        self.divergence_watched = False
        self._warned_unwatched = False
        self._loss = LossOfTheStep()
        self._loss_accumulator = None
        self._streak_rings: list[Any] = []
        if keras.backend.backend() == "tensorflow":
            # This wrapper sums the gradients across replicas before clipping; the wrapped
            # optimizer applies that sum as it is (its own all-reduce would sum it again).
            if not hasattr(inner_optimizer, "_all_reduce_sum_gradients"):
                raise NotImplementedError(
                    f"{where}: this Keras version ({keras.__version__}) has no "
                    "Optimizer._all_reduce_sum_gradients; gradclip cannot clip after aggregation"
                )
            inner_optimizer._all_reduce_sum_gradients = already_reduced
        self._state_like = None
        self._state_variables: list[Any] = []
        self._info_variables: list[Any] = []
        self._accumulators: list[Any] = []

    # -- building -----------------------------------------------------------------------------
    def build(self, var_list):
        # The clipper's initial state for gradients shaped like the variables (eager: Keras
        # builds optimizers before tracing the train step).
        with _eager_scope():
            values = [keras.ops.convert_to_tensor(v) for v in var_list]
            state = self.clipper.init(values)
            leaves, self._state_like = _flatten_state(state)
            arrays = [_to_numpy(leaf) for leaf in leaves]
        # Every replica computes the same state and info from the same summed gradients, and
        # writes it into its own copy (assign_each), as the wrapped optimizer writes its slots.
        self._state_variables = [
            self.add_variable(
                shape=array.shape,
                initializer=lambda shape, dtype, value=array: keras.ops.convert_to_tensor(value, dtype),
                dtype=str(array.dtype),
                name=f"clipper_state_{position}",
            )
            for position, array in enumerate(arrays)
        ]
        self._info_variables = [
            self.add_variable(
                shape=(),
                initializer="ones" if field in ("coef", "finite") else "zeros",
                dtype=_INFO_DTYPES.get(field, "float32"),
                name=f"clip_{field}",
            )
            for field in _INFO_FIELDS
        ]
        self._streak_rings = []
        if self.max_consecutive_skips is not None:
            # The norms, losses and whether a loss was given, of the last max_consecutive_skips
            # steps, newest last: what DivergenceError names.
            self._streak_rings = [
                self.add_variable(shape=(self.max_consecutive_skips,), initializer="zeros", dtype=dtype, name=f"streak_{kind}")
                for kind, dtype in (("norms", "float32"), ("losses", "float32"), ("loss_given", "bool"))
            ]
        self._accumulators = []
        if self.accumulation_steps:
            # Replica-local ("on_read") sums of each replica's own micro-batch gradients, summed
            # across replicas once, at the optimizer step.
            with keras.name_scope(self.name, caller=self):
                for v in var_list:
                    accumulator = keras.Variable(
                        initializer="zeros", shape=v.shape, dtype=v.dtype, trainable=False,
                        synchronization="on_read", aggregation="sum", name="gradient_accumulator",
                    )
                    self._track_variable(accumulator)
                    self._accumulators.append(accumulator)
                # The micro-batches' losses, summed like their gradients (tracked as an
                # attribute: Keras' optimizers track the variables set on them).
                self._loss_accumulator = keras.Variable(
                    initializer="zeros", shape=(), dtype="float32", trainable=False,
                    synchronization="on_read", aggregation="sum", name="loss_accumulator",
                )
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    # -- stepping -----------------------------------------------------------------------------
    def apply(self, grads, trainable_variables=None):
        """Clip ``grads`` (after summing them across replicas, and accumulating them when the
        wrapped optimizer accumulates) and apply them with the wrapped optimizer.

        Args:
            grads: One gradient (or None) per trainable variable.
            trainable_variables: The variables; optional once the optimizer is built.

        Raises:
            InvalidArgumentError: A gradient count that differs from the variables'; called in
                a cross-replica context or under a strategy gradclip cannot handle; a clipper
                that needs the loss, and no loss given to :meth:`scale_loss` in this step.
        """
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "ClippingOptimizer: call optimizer.build(trainable_variables) first, or pass "
                    "trainable_variables"
                )
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        grads = [_densify(g) for g in grads]
        if len(grads) != len(trainable_variables):
            raise InvalidArgumentError(
                f"ClippingOptimizer.apply: got {len(grads)} gradient(s) for {len(trainable_variables)} "
                "trainable variable(s); pass one gradient (or None) per variable"
            )
        check_strategy("ClippingOptimizer.apply", replica=True)
        loss = self._loss.take()  # this step's, from scale_loss (module documentation)
        if loss is None and watches_loss(self.clipper):
            raise InvalidArgumentError(
                f"ClippingOptimizer.apply: {type(self.clipper).__name__} needs the step's loss, and none was "
                "given to scale_loss in this step. Keras' train_step gives it; a train_step of your own must call "
                "loss = self.optimizer.scale_loss(loss) before taking the gradients; a LossScaleOptimizer "
                "around this optimizer does not pass it on. Nothing was changed"
            )
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        if self.loss_scale_factor is not None:
            grads = [None if g is None else g / self.loss_scale_factor for g in grads]
        if loss is not None:
            loss = keras.ops.cast(keras.ops.reshape(loss, ()) if _size(loss) == 1 else loss, "float32")
        if keras.backend.backend() == "tensorflow":
            if self.accumulation_steps:
                update = keras.ops.equal((self._iterations + 1) % self.accumulation_steps, 0)
                replica_cond(update, self._update_from_accumulated, self._accumulate, grads, trainable_variables, loss)
            else:
                self._tf_update(grads, trainable_variables, loss)
        else:
            self._masked_update(grads, trainable_variables, loss)
        self._iterations.assign_add(1)

    def scale_loss(self, loss):
        """Keep ``loss`` for this step's :meth:`apply` (the clipper's loss signal), then scale it
        as Keras does (``loss_scale_factor``). Keras' ``train_step`` calls it before taking the
        gradients; so should a ``train_step`` of your own.

        Raises:
            InvalidArgumentError: ``loss`` is an array of another framework than the backend's
                (a torch tensor on the TensorFlow backend); nothing is recorded.
        """
        if keras.backend.backend() != "jax":  # see the module documentation
            self._loss.record(check_loss("ClippingOptimizer.scale_loss", loss))
        return super().scale_loss(loss)

    def _accumulators_for(self, trainable_variables):
        return [self._accumulators[self._get_variable_index(v)] for v in trainable_variables]

    def _accumulate(self, grads, trainable_variables, loss=None):
        for g, accumulator in zip(grads, self._accumulators_for(trainable_variables)):
            if g is not None:
                accumulator.assign_add(keras.ops.cast(g, accumulator.dtype))
        if loss is not None:
            self._loss_accumulator.assign_add(loss)

    def _update_from_accumulated(self, grads, trainable_variables, loss=None):
        # Keras' own formula: the mean of the k micro-batch gradients of this replica (and the
        # mean of their losses).
        steps = self.accumulation_steps
        accumulators = self._accumulators_for(trainable_variables)
        averaged = [None if g is None else (g + a.value) / steps for g, a in zip(grads, accumulators)]
        for accumulator in accumulators:
            accumulator.assign(keras.ops.zeros(accumulator.shape, accumulator.dtype))
        if loss is not None:
            loss = (loss + self._loss_accumulator.value) / steps
            self._loss_accumulator.assign(keras.ops.zeros((), "float32"))
        self._tf_update(averaged, trainable_variables, loss)

    def _tf_update(self, grads, trainable_variables, loss=None):
        # The loss is summed across replicas with the gradients (one all-reduce): each replica's
        # is its share of the batch's mean loss, as Keras scales it for distribution.
        *grads, loss = all_reduce_sum([*grads, loss])
        clipped, info = self._clip(grads, trainable_variables, loss=loss)
        if self.clipper.may_skip:
            replica_cond(info.skip, nothing, self.inner_optimizer.apply, clipped, trainable_variables)
        else:
            self.inner_optimizer.apply(clipped, trainable_variables)

    def _masked_update(self, grads, trainable_variables, loss=None):
        # Backends without a stateful conditional (JAX traces both branches): compute
        # everything, and keep each new value only where the step happens.
        active = None
        if self.accumulation_steps:
            steps = self.accumulation_steps
            active = keras.ops.equal((self._iterations + 1) % steps, 0)
            accumulators = self._accumulators_for(trainable_variables)
            averaged = [None if g is None else (g + a.value) / steps for g, a in zip(grads, accumulators)]
            for g, a in zip(grads, accumulators):
                if g is not None:
                    a.assign(keras.ops.where(active, keras.ops.zeros_like(a.value), a.value + g))
            grads = averaged
            if loss is not None:
                total = self._loss_accumulator.value + loss
                self._loss_accumulator.assign(keras.ops.where(active, keras.ops.zeros_like(total), total))
                loss = total / steps
        clipped, info = self._clip(grads, trainable_variables, active, loss)
        run = keras.ops.logical_not(info.skip) if self.clipper.may_skip else None
        if active is not None:
            run = active if run is None else keras.ops.logical_and(active, run)
        if run is None:
            self.inner_optimizer.apply(clipped, trainable_variables)
            return
        kept = list(trainable_variables) + list(self.inner_optimizer.variables)
        # Copies: on the torch backend a variable's tensor is updated in place, so a plain
        # conversion would alias the new value and the restore below would keep it.
        before = [keras.ops.copy(keras.ops.convert_to_tensor(v)) for v in kept]
        self.inner_optimizer.apply(clipped, trainable_variables)
        for variable, old in zip(kept, before):
            variable.assign(keras.ops.where(run, variable.value, old))

    def _clip(self, grads, trainable_variables, active=None, loss=None):
        """Clip ``grads`` and store the clipper's next state, info and streak (only where
        ``active``, when given); return (grads, info)."""
        grads = [keras.ops.convert_to_tensor(g) if g is not None and not hasattr(g, "shape") else g for g in grads]
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
        streak = keras.ops.convert_to_tensor(self._info_variables[_INFO_FIELDS.index("consecutive_skips")])
        if self.max_consecutive_skips is not None and not self.divergence_watched and not self._warned_unwatched:
            # Python, so once per trace: a bound nobody checks would let fit skip forever, silently.
            self._warned_unwatched = True
            warnings.warn(
                f"ClippingOptimizer: max_consecutive_skips={self.max_consecutive_skips} is set, but no "
                "gradclip.keras.StopOnDivergence() callback watches it, so fit will not stop on a streak "
                "of skipped steps; add it to fit's callbacks (in a loop of your own, call "
                "optimizer.check_divergence() after each step)",
                UserWarning,
                stacklevel=2,
            )
        params = None
        if self.clipper.needs_params:
            params = [keras.ops.convert_to_tensor(v) for v in trainable_variables]
        clipped, new_state, info = self.clipper.update(grads, state, params=params, loss=loss)
        clipped = [c if keep else None for c, keep in zip(clipped, given)]
        # The streak: where(skip, n + 1, 0), on the device (never counts for a clipper that cannot skip).
        zero = keras.ops.zeros((), streak.dtype)
        skipped = keras.ops.cast(info.skip, "bool") if self.clipper.may_skip else keras.ops.zeros((), "bool")
        info = info._replace(consecutive_skips=keras.ops.where(skipped, streak + 1, zero))
        new_leaves, _ = _flatten_state(new_state)
        values = list(zip(self._state_variables, new_leaves))
        values += [(v, getattr(info, field)) for v, field in zip(self._info_variables, _INFO_FIELDS)]
        if self._streak_rings:
            # Shift in this step's norm and loss.
            newest = (info.norm, 0.0 if loss is None else loss, loss is not None)
            for ring, value in zip(self._streak_rings, newest):
                value = keras.ops.reshape(keras.ops.cast(value, ring.dtype), (1,))
                values.append((ring, keras.ops.concatenate([ring.value[1:], value])))
        cast = [keras.ops.cast(value, variable.dtype) for variable, value in values]
        if active is not None:
            cast = [keras.ops.where(active, value, variable.value) for (variable, _), value in zip(values, cast)]
        assign_each([variable for variable, _ in values], cast)
        return clipped, info

    # -- reading what happened ----------------------------------------------------------------
    def last_info(self) -> ClipInfo:
        """The :class:`~gradclip.ClipInfo` of the last step (reads variables: call when logging),
        with ``consecutive_skips``, the steps skipped in a row up to it (an int64 0-d array)."""
        if not self.built:
            raise ValueError("ClippingOptimizer.last_info: no step has been taken yet")
        info = ClipInfo(**{f: _to_numpy(v) for f, v in zip(_INFO_FIELDS, self._info_variables)})
        return info._replace(consecutive_skips=info.consecutive_skips.astype(np.int64))

    def check_divergence(self) -> None:
        """Raise when the last ``max_consecutive_skips`` steps were all skipped (reads one
        variable; :class:`StopOnDivergence` calls it after each batch of ``fit``).

        Raises:
            DivergenceError: The streak reached ``max_consecutive_skips``; it names the streak
                and the gradient norms and losses of its steps.
            InvalidArgumentError: ``max_consecutive_skips`` was not set.
        """
        limit = self.max_consecutive_skips
        if limit is None:
            raise InvalidArgumentError(
                "ClippingOptimizer.check_divergence: no max_consecutive_skips was set; "
                "pass ClippingOptimizer(..., max_consecutive_skips=N)"
            )
        self.divergence_watched = True
        if not self.built:
            return
        streak = int(_to_numpy(self._info_variables[_INFO_FIELDS.index("consecutive_skips")]))
        if streak >= limit:
            norms, losses, given = (_to_numpy(ring) for ring in self._streak_rings)
            raise divergence_error("ClippingOptimizer", limit, streak, norms, np.where(given, losses, None))

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
        """The wrapped optimizer's steps (one per ``gradient_accumulation_steps`` batches)."""
        return self.inner_optimizer.iterations

    def load_own_variables(self, store):
        """Restore the variables Keras saved (``model.save``, ``save_weights``).

        A checkpoint of an earlier gradclip, saved before the optimizer kept the skip streak
        (``clip_consecutive_skips``, the streak's norms and losses) and the accumulated loss,
        loads too: every other variable keeps its position, and the new ones start at zero.
        """
        added = [self._info_variables[_INFO_FIELDS.index("consecutive_skips")], *self._streak_rings]
        if self._loss_accumulator is not None:
            added.append(self._loss_accumulator)
        if self.built and len(store.keys()) == len(self.variables) - len(added):
            kept = [v for v in self.variables if all(v is not a for a in added)]
            for position, variable in enumerate(kept):
                variable.assign(store[str(position)])
            for variable in added:
                variable.assign(keras.ops.zeros(variable.shape, variable.dtype))
            return
        super().load_own_variables(store)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        from keras.saving import serialize_keras_object

        inner = serialize_keras_object(self.inner_optimizer)
        # What was taken over goes back where the user set it.
        inner["config"].update(gradient_accumulation_steps=self.accumulation_steps, loss_scale_factor=self.loss_scale_factor)
        config = {
            "name": self.name,
            "inner_optimizer": inner,
            # As plain data, as in the clipper's state_dict(): schedule thresholds (nested in a
            # chain's or Subset's clipper too) become their settings mappings, which Keras can
            # write and gradclip's from_config rebuilds.
            "clipper": {"clipper": self.clipper.name, "config": plain_config(self.clipper.config())},
        }
        if self.max_consecutive_skips is not None:
            config["max_consecutive_skips"] = self.max_consecutive_skips
        return config

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


def _size(x) -> int | None:
    """The number of elements of ``x`` when its shape is known (None otherwise)."""
    shape = tuple(getattr(x, "shape", ()))
    return None if any(d is None for d in shape) else int(np.prod(shape, dtype=np.int64))


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
