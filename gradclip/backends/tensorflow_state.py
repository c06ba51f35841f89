"""A clipper's state kept in ``tf.Variable``\\ s (the TensorFlow backend's ``state_store``).

Stateful clippers keep their state in variables on TensorFlow so that ``clipper.clip`` inside a
``tf.function`` advances the state on every call instead of freezing it into the trace.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["StateStore"]


class StateStore:
    """A clipper's state kept in ``tf.Variable``\\ s, one per array of the state.

    Created on the clipper's first TensorFlow step (in ``tf.init_scope``, so also on the first
    trace of a ``tf.function``). Each step reads the state with :meth:`read` and writes the next
    one with :meth:`write`, both as graph ops: a traced function keeps advancing the same
    variables on every call. ``ready`` is False until the first write (and again after
    ``reset()``), and :meth:`read` then returns the freshly initialised state instead.

    Args:
        template: The clipper's initial state (a NamedTuple, possibly nested); its tensor leaves
            fix the shapes and dtypes of the variables.
    """

    #: The backend whose Ops rebuild checkpoints for this store.
    framework = "tensorflow"

    def __init__(self, template):
        leaves = tf.nest.flatten(template)
        self._slots = [i for i, leaf in enumerate(leaves) if tf.is_tensor(leaf)]
        # The structure alone (tensor leaves dropped: they may belong to a graph being traced).
        self._like = tf.nest.map_structure(lambda x: None if tf.is_tensor(x) else x, template)
        self._variables: list[tf.Variable] = []
        self._ready = None
        if not self._slots:
            return  # a stateless clipper: nothing to keep
        with tf.init_scope():
            self._ready = tf.Variable(False, trainable=False, name="gradclip_state_ready")
            for i in self._slots:
                leaf = leaves[i]
                self._variables.append(
                    tf.Variable(
                        tf.zeros(leaf.shape, leaf.dtype),
                        trainable=False,
                        shape=leaf.shape,
                        name="gradclip_state",
                    )
                )

    @property
    def variables(self) -> list[tf.Variable]:
        """The variables, in the order of the state's tensor leaves."""
        return list(self._variables)

    def _pack(self, like, values):
        leaves = list(tf.nest.flatten(like))
        for slot, value in zip(self._slots, values):
            leaves[slot] = value
        return tf.nest.pack_sequence_as(like, leaves)

    def read(self, fresh):
        """The current state: the variables' values once written, else ``fresh``."""
        if not self._slots:
            return fresh
        leaves = tf.nest.flatten(fresh)
        values = [tf.where(self._ready, v, leaves[i]) for v, i in zip(self._variables, self._slots)]
        return self._pack(fresh, values)

    def current(self):
        """The state structure with the variables in place of its arrays."""
        return self._pack(self._like, self._variables)

    @staticmethod
    def eager_scope():
        """Where checkpoints are rebuilt and loaded: outside any graph being traced."""
        return tf.init_scope()

    def write(self, new_state) -> None:
        """Store the next state (graph ops inside ``tf.function``, immediate eagerly)."""
        if not self._slots:
            return
        leaves = tf.nest.flatten(new_state)
        for variable, i in zip(self._variables, self._slots):
            variable.assign(tf.cast(leaves[i], variable.dtype))
        self._ready.assign(True)

    def load(self, state) -> None:
        """Overwrite the variables with ``state`` now (eagerly), and mark them ready."""
        with tf.init_scope():
            self.write(state)

    def reset(self) -> None:
        """Forget the stored state: the next step starts from a fresh initial state."""
        if self._ready is not None:
            with tf.init_scope():
                self._ready.assign(False)

    def is_ready(self) -> bool:
        """Whether a state has been written since creation or the last reset (reads a flag)."""
        if self._ready is None:
            return True
        with tf.init_scope():
            return bool(self._ready.numpy())
