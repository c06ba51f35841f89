"""TensorFlow backend: the Ops protocol on ``tf.Tensor`` and ``tf.Variable``.

Every primitive is a TensorFlow op, so the same code runs eagerly and inside ``tf.function``
(with or without XLA): scalars are 0-d tensors, conditions are applied with ``tf.where``, and
nothing reads a tensor value on the host except :meth:`TensorFlowOps.to_host`, which only the
``"raise"`` non-finite policy calls (and which refuses inside a graph with a clear error).

Reductions accumulate in fp32 whatever the gradient dtype (fp64 for fp64 gradients): an fp16
gradient of 300 has norm 300, not ``inf`` as ``tf.clip_by_norm`` and ``tf.clip_by_global_norm``
compute it in fp16.

``tf.Tensor`` is immutable, so ``inplace=True`` (``clipper.clip_``) needs ``tf.Variable``\\ s (or
Keras variables) and writes with ``assign``. Stateful clippers keep their state in
``tf.Variable``\\ s through :class:`StateStore`, so that ``clipper.clip`` inside a ``tf.function``
advances the state on every call instead of freezing it into the trace.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from gradclip._core.errors import BackendError, SparseGradientError
from gradclip._core.ops import Ops
from gradclip.backends._hashing import Words, hash_streams
from gradclip.backends.tensorflow_state import StateStore

try:  # Keep autograph out of gradclip's code: it has no Python control flow on tensor values.
    from tensorflow.python.autograph.core import config as _autograph_config

    if not any(getattr(r, "_prefix", None) == "gradclip" for r in _autograph_config.CONVERSION_RULES):
        _autograph_config.CONVERSION_RULES = (
            _autograph_config.DoNotConvert("gradclip"),
            *_autograph_config.CONVERSION_RULES,
        )
except Exception:  # noqa: BLE001 - an internal module; without it autograph merely converts us
    pass

__all__ = ["BACKEND", "StateStore", "TensorFlowOps"]

_DTYPES = {
    "float16": tf.float16,
    "bfloat16": tf.bfloat16,
    "float32": tf.float32,
    "float64": tf.float64,
    "bool": tf.bool,
    "int32": tf.int32,
    "int64": tf.int64,
}


def _accumulation_dtype(dtype: tf.dtypes.DType) -> tf.dtypes.DType:
    return tf.float64 if dtype == tf.float64 else tf.float32


def _num_elements(array: Any) -> int | None:
    return tf.TensorShape(array.shape).num_elements()


def _value(array: Any) -> Any:
    """The tensor behind a Keras variable (a ``tf.Variable`` or ``tf.Tensor`` passes through)."""
    if hasattr(array, "value") and not isinstance(array, (tf.Tensor, tf.Variable)):
        return array.value  # keras.Variable
    return array


class TensorFlowOps(Ops):
    """Ops over lists of ``tf.Tensor`` / ``tf.Variable``.

    Args:
        arrays: The gradients the operations will see; they fix the accumulation dtype (fp64 if
            any gradient is fp64, else fp32).
        inplace: Write results into the inputs with ``assign``; every input must then be a
            ``tf.Variable`` (or a Keras variable).
        foreach: Ignored (TensorFlow has no multi-tensor kernels to choose); kept for the
            common constructor signature.
        where: The public entry point, for error messages.

    Raises:
        SparseGradientError: A gradient is a ``tf.IndexedSlices`` or ``tf.SparseTensor``.
        BackendError: ``inplace=True`` with an immutable ``tf.Tensor``.
    """

    name = "tensorflow"
    #: Keras/TF weights are input-major (``(in, out)`` dense kernels, ``HWIO`` convolutions):
    #: output units index the last axis (see ``Ops.unit_axis``).
    unit_axis = -1
    #: State lives in ``tf.Variable``s (:meth:`state_store`), so traced functions advance it.
    holds_state = True

    def __init__(
        self,
        arrays: Sequence[Any] = (),
        *,
        inplace: bool = False,
        foreach: bool | None = None,
        where: str = "gradclip",
    ):
        del foreach
        self.inplace = inplace
        self.caller = where
        for index, array in enumerate(arrays):
            if isinstance(array, (tf.IndexedSlices, tf.SparseTensor)):
                raise SparseGradientError(
                    f"{where}: gradient #{index} is a {type(array).__name__}; sparse gradients are "
                    "not supported (densify it first with tf.convert_to_tensor, as "
                    "tf.clip_by_global_norm does)"
                )
            if inplace and not hasattr(array, "assign"):
                raise BackendError(
                    f"{where}: gradient #{index} is an immutable {type(array).__name__}, which cannot "
                    "be clipped in place; use `grads, info = clipper.clip(grads)` for tf.Tensor "
                    "gradients, or pass tf.Variables"
                )
        self.acc = tf.float64 if any(a.dtype == tf.float64 for a in arrays) else tf.float32

    def context(self):
        """Nothing to guard: gradients here are values, not ``.grad`` attributes."""
        return contextlib.nullcontext()

    # -- scalars ------------------------------------------------------------------------------
    def scalar(self, value, dtype: str = "float32"):
        if tf.is_tensor(value):
            # A threshold given as a tensor (built inside the traced function: a schedule's
            # value at this step); tf.constant refuses a symbolic tensor.
            return tf.reshape(tf.cast(value, _DTYPES[dtype]), ())
        return tf.constant(value, dtype=_DTYPES[dtype])

    @staticmethod
    def _pair(a, b):
        """Give two operands one dtype, as NumPy's promotion would (TensorFlow does not promote).

        Python numbers take the other operand's dtype; of two tensors, a float wins over an
        integer or bool, and the wider of two floats (or two integers) wins.
        """
        a_is, b_is = tf.is_tensor(a), tf.is_tensor(b)
        if a_is and not b_is:
            return a, tf.constant(b, dtype=a.dtype)
        if b_is and not a_is:
            return tf.constant(a, dtype=b.dtype), b
        if not a_is and not b_is:
            return tf.constant(a, tf.float32), tf.constant(b, tf.float32)
        if a.dtype == b.dtype:
            return a, b

        def rank(dtype):
            return (dtype.is_floating, dtype.size)

        target = a.dtype if rank(a.dtype) >= rank(b.dtype) else b.dtype
        return tf.cast(a, target), tf.cast(b, target)

    def where(self, cond, a, b):
        a, b = self._pair(a, b)
        return tf.where(cond, a, b)

    def minimum(self, a, b):
        return tf.minimum(*self._pair(a, b))

    def maximum(self, a, b):
        return tf.maximum(*self._pair(a, b))

    def sqrt(self, x):
        return tf.sqrt(x)

    def exp(self, x):
        return tf.exp(x)

    def log(self, x):
        return tf.math.log(x)

    def isfinite(self, x):
        return tf.math.is_finite(x)

    def stack(self, xs):
        if len(xs) == 0:
            return tf.zeros((0,), dtype=self.acc)
        return tf.stack([tf.convert_to_tensor(x) for x in xs])

    def any(self, x):
        return tf.reduce_any(x)

    def to_host(self, x):
        if not tf.executing_eagerly() or not hasattr(x, "numpy"):
            raise BackendError(
                f"{self.caller}: this step needs to read a value on the host (nonfinite='raise'), "
                "which cannot happen inside tf.function; use nonfinite='skip' or 'zero' there, or "
                "call it eagerly"
            )
        return x.numpy().item()

    def array(self, value, dtype: str = "float32"):
        return tf.constant(value, dtype=_DTYPES[dtype])

    def to_list(self, x):
        if not tf.executing_eagerly():
            raise BackendError(f"{self.caller}: state can be read as plain data only eagerly")
        return np.asarray(x.numpy() if hasattr(x, "numpy") else x).tolist()

    # -- multi-tensor -------------------------------------------------------------------------
    def _norm(self, grad, norm_type: float):
        grad = _value(grad)
        acc = _accumulation_dtype(grad.dtype)
        if _num_elements(grad) == 0:
            return tf.zeros((), acc)
        values = tf.cast(tf.reshape(grad, [-1]), acc)
        if norm_type == math.inf:
            return tf.reduce_max(tf.abs(values))
        if norm_type == 2.0:
            return tf.sqrt(tf.reduce_sum(tf.square(values)))
        if norm_type == 1.0:
            return tf.reduce_sum(tf.abs(values))
        return tf.pow(tf.reduce_sum(tf.pow(tf.abs(values), norm_type)), 1.0 / norm_type)

    def norms(self, grads, norm_type):
        return self.stack([tf.cast(self._norm(g, norm_type), self.acc) for g in grads])

    def combine_norms(self, norms, norm_type):
        norms = tf.cast(norms, self.acc)
        if _num_elements(norms) == 0:
            return tf.zeros((), self.acc)
        if norm_type == math.inf:
            return tf.reduce_max(norms)
        if norm_type == 2.0:
            return tf.sqrt(tf.reduce_sum(tf.square(norms)))
        return tf.pow(tf.reduce_sum(tf.pow(norms, norm_type)), 1.0 / norm_type)

    def global_norm(self, grads, norm_type):
        return self.combine_norms(self.norms(grads, norm_type), norm_type)

    def _out(self, grad, result):
        result = tf.cast(result, grad.dtype)
        if self.inplace:
            grad.assign(result)
            return grad
        return result

    def _mul(self, grad, coef):
        # Multiply in fp32 (fp64 when the gradient or the coefficient is fp64) and round once
        # into the gradient's dtype, as NumPy's reference does.
        value = _value(grad)
        coef = tf.convert_to_tensor(coef)
        wide = tf.float64 if tf.float64 in (coef.dtype, tf.as_dtype(value.dtype)) else tf.float32
        return self._out(grad, tf.cast(value, wide) * tf.cast(coef, wide))

    def scale(self, grads, coef):
        return [self._mul(g, coef) for g in grads]

    def scale_each(self, grads, coefs):
        return [self._mul(g, coefs[i]) for i, g in enumerate(grads)]

    def clamp(self, grads, low, high):
        out = []
        for g in grads:
            value = _value(g)
            # An infinite bound is a no-op: leave it out (NaN elements stay NaN either way).
            if math.isfinite(low):
                value = tf.maximum(value, tf.constant(low, value.dtype))
            if math.isfinite(high):
                value = tf.minimum(value, tf.constant(high, value.dtype))
            out.append(self._out(g, value) if self.inplace else tf.identity(value))
        return out

    def zero_above(self, grads, threshold):
        out = []
        for g in grads:
            value = _value(g)
            out.append(self._out(g, tf.where(tf.abs(value) > threshold, tf.zeros_like(value), value)))
        return out

    def sign_where(self, grads, magnitude, cond):
        out = []
        for g in grads:
            value = _value(g)
            signed = tf.sign(value) * tf.constant(magnitude, value.dtype)
            out.append(self._out(g, tf.where(cond, signed, value)))
        return out

    def zero_nonfinite(self, grads):
        out = []
        for g in grads:
            value = _value(g)
            out.append(self._out(g, tf.where(tf.math.is_finite(value), value, tf.zeros_like(value))))
        return out

    def finite_each(self, grads):
        if len(grads) == 0:
            return tf.zeros((0,), dtype=tf.bool)
        return tf.stack([tf.reduce_all(tf.math.is_finite(_value(g))) for g in grads])

    def extrema(self, grads):
        highs, lows = [], []
        for g in grads:
            if _num_elements(g) == 0:
                highs.append(tf.constant(-math.inf, tf.float32))
                lows.append(tf.constant(math.inf, tf.float32))
            else:
                values = tf.cast(_value(g), tf.float32)
                highs.append(tf.reduce_max(values))
                lows.append(tf.reduce_min(values))
        if not grads:
            empty = tf.zeros((0,), tf.float32)
            return empty, empty
        return tf.stack(highs), tf.stack(lows)

    def numel(self, grad):
        count = _num_elements(grad)
        if count is None:
            raise BackendError(
                f"{self.caller}: a gradient has shape {grad.shape} with unknown dimensions; give "
                "tf.function an input_signature with static shapes"
            )
        return count

    # -- small-vector math for adaptive state -------------------------------------------------
    def sum(self, x):
        x = tf.convert_to_tensor(x)
        if x.dtype == tf.bool or x.dtype.is_integer:
            return tf.reduce_sum(tf.cast(x, tf.int64))
        return tf.reduce_sum(x)

    def arange(self, n, dtype="int64"):
        return tf.range(n, dtype=_DTYPES[dtype])

    def cast(self, x, dtype):
        return tf.cast(x, _DTYPES[dtype])

    def floor(self, x):
        return tf.floor(x)

    def sort(self, x):
        return tf.sort(x)

    def take(self, x, index):
        return tf.gather(x, index)

    def cumsum(self, x):
        return tf.cumsum(x)

    def unit_norms(self, arrays, axes):
        out = []
        for array, kept in zip(arrays, axes):
            value = _value(array)
            acc = _accumulation_dtype(value.dtype)
            ndim = len(value.shape)
            values = tf.cast(value, acc)
            if kept is None:
                if _num_elements(value) == 0:
                    out.append(tf.zeros((1,) * ndim, acc))
                else:
                    squares = tf.reduce_sum(tf.square(values))
                    out.append(tf.reshape(tf.sqrt(squares), (1,) * ndim))
                continue
            reduce = [d for d in range(ndim) if d not in kept]
            if not reduce:
                out.append(tf.abs(values))
                continue
            out.append(tf.sqrt(tf.reduce_sum(tf.square(values), axis=reduce, keepdims=True)))
        return out

    def scale_units(self, grads, coefs):
        return [self._mul(g, c) for g, c in zip(grads, coefs)]

    def write_back(self, targets, values):
        return [self._out(t, v) for t, v in zip(targets, values)]

    def flat_concat(self, arrays):
        if not arrays:
            return tf.zeros((0,), dtype=self.acc)
        values = [tf.reshape(_value(a), [-1]) for a in arrays]
        # tf.concat does not promote: the widest float dtype, as NumPy's concatenate gives.
        widest = max((v.dtype for v in values), key=lambda d: d.size)
        return tf.concat([tf.cast(v, widest) for v in values], 0)

    def split_as(self, vector, like):
        shapes = [_value(a).shape for a in like]
        pieces = tf.split(vector, [shape.num_elements() for shape in shapes])
        return [tf.reshape(piece, shape) for piece, shape in zip(pieces, shapes)]

    def uniform(self, key, counter, shapes):
        return [
            tf.cast(tf.bitwise.right_shift(h, tf.constant(8, tf.uint32)), tf.float32) * (2.0**-24)
            for h in hash_streams(key, counter, shapes, _WORDS)
        ]

    def select(self, grads, replacements, masks):
        out = []
        for g, r, m in zip(grads, replacements, masks):
            value = _value(g)
            out.append(self._out(g, tf.where(m, tf.cast(r, value.dtype), value)))
        return out

    # -- persistent state ------------------------------------------------------------------------
    def state_store(self, template):
        """Variables holding a clipper's state across calls; see :class:`StateStore`."""
        return StateStore(template)


def _u32(value: int):
    return tf.constant(value & 0xFFFFFFFF, tf.uint32)


class _Uint32Words(Words):
    """32-bit words in uint32 tensors (multiplication wraps modulo 2**32); TensorFlow's bitwise
    operators on them are functions of ``tf.bitwise``."""

    def xor(self, a, b):
        return tf.bitwise.bitwise_xor(a, b)

    def shr(self, x, bits):
        return tf.bitwise.right_shift(x, _u32(bits))

    def mul(self, x, constant):
        return x * _u32(constant)

    def const(self, value, like):
        del like
        return _u32(value)

    def index(self, n):
        return tf.cast(tf.range(n, dtype=tf.int64), tf.uint32)

    def halves(self, x):
        x = tf.cast(x, tf.int64)
        low = tf.cast(tf.bitwise.bitwise_and(x, tf.constant(0xFFFFFFFF, tf.int64)), tf.uint32)
        high = tf.cast(tf.bitwise.right_shift(x, tf.constant(32, tf.int64)), tf.uint32)
        return low, high

    def reshape(self, x, shape):
        return tf.reshape(x, shape)


_WORDS = _Uint32Words()


BACKEND = TensorFlowOps
