"""JAX backend: the Ops protocol on ``jax.Array`` (and tracers inside ``jax.jit``).

Every primitive is a ``jax.numpy`` op, so the same code runs eagerly and under ``jax.jit``,
``vmap`` and ``pjit``/sharding: scalars are 0-d arrays, conditions go through ``jnp.where``, and
nothing reads a value on the host except :meth:`JaxOps.to_host` (only the ``"raise"`` non-finite
policy calls it; inside ``jit`` it fails with a clear error). For arrays sharded across devices,
the reductions are XLA reductions over the global array, so the global norm is the one of the
whole, unsharded gradient.

Reductions accumulate in fp32 whatever the gradient dtype (fp64 for fp64 gradients, which JAX
only has with ``jax_enable_x64``); ``optax.clip_by_global_norm`` computes fp16 norms in fp16, where
300² is already ``inf``.

JAX arrays are immutable: ``inplace`` is always False here, and ``clipper.clip_`` is refused with
an error that points to ``clipper.clip`` and ``clipper.as_optax()``.

Inside ``jax.pmap`` and ``jax.shard_map`` each device traces its own piece of every gradient,
and a reduction over its arrays sees only that piece. Built with ``axis_name=`` (the mapped axis
or axes the gradients are split over), the backend reduces each statistic over those axes
(:mod:`gradclip.backends._jax_axes`): ``psum`` of every tensor's local ``sum |g|^p`` (``pmax``
for ``inf`` and for the extrema), of AGC's unit-wise sums, and element counts times the axis
size, so every device measures the whole gradient and decides the same coefficient and state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradclip._core.errors import BackendError
from gradclip.backends._array_api import ArrayApiOps
from gradclip.backends._hashing import Words, hash_streams
from gradclip.backends._jax_axes import MappedAxes, OffsetWords

__all__ = ["BACKEND", "JaxOps"]


def _dtype(name: str):
    # Without jax_enable_x64, ask for what JAX will actually give (no truncation warnings).
    if name == "bfloat16":
        return jnp.bfloat16
    return jax.dtypes.canonicalize_dtype(np.dtype(name))


def _host_value(value: Any, dtype: str) -> np.ndarray:
    """``value`` as a NumPy array of the dtype JAX will hold it in.

    Without ``jax_enable_x64`` JAX's integers are 32-bit. An int64 value outside that range
    (in practice only a random-stream key, e.g. :class:`~gradclip.Subset`'s, drawn below 2**62)
    keeps its low 31 bits: still deterministic, but a stream seeded at or above 2**31 then
    differs from the one NumPy, torch and TensorFlow draw (they agree bit for bit below 2**31).
    """
    target = _dtype(dtype)
    if dtype == "int64" and target != np.int64:
        wide = np.asarray(value, dtype=np.int64)
        fits = (wide >= -(2**31)) & (wide < 2**31)
        return np.where(fits, wide, wide & 0x7FFFFFFF).astype(target)
    return np.asarray(value, dtype=target)


def _accumulation_dtype(dtype) -> Any:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def refuse_float0(where: str, dtypes: Sequence[Any], names: Sequence[str] | None = None) -> None:
    """Refuse the ``float0`` gradients of ``jax.grad(..., allow_int=True)``, naming the first.

    Their dtype's name contains "float", but they hold no values and no operation takes them
    (optax's transformations raise a ``TypeError`` on them too).

    Raises:
        BackendError: A ``float0`` among ``dtypes`` (named by ``names``, else by position).
    """
    for index, dtype in enumerate(dtypes):
        if dtype == jax.dtypes.float0:
            label = f"gradient {names[index]}" if names is not None else f"gradient #{index}"
            raise BackendError(
                f"{where}: {label} has dtype float0, the empty gradient jax.grad(..., allow_int=True) "
                "gives for an integer input (it holds no values); clip only the floating-point "
                "gradients: leave integer inputs out of what you differentiate, or drop their "
                "float0 leaves (optax.masked in an optax chain). Nothing was changed."
            )


class JaxOps(ArrayApiOps):
    """Ops over lists of ``jax.Array``.

    Args:
        arrays: The gradients; they fix the accumulation dtype (fp64 if any gradient is fp64).
        inplace: Must be False: JAX arrays cannot be written in place.
        foreach: Ignored (XLA fuses the per-tensor loops under ``jit``).
        where: The public entry point, for error messages.
        axis_name: The ``pmap``/``shard_map`` axis name, or a tuple of names, over which each
            gradient is split (see :class:`~gradclip.backends._jax_axes.MappedAxes`); None: the
            arrays are whole (a global array sharded under ``jit`` is whole: XLA reduces it).

    Raises:
        BackendError: ``inplace=True`` (``clip_`` on JAX arrays).
        InvalidArgumentError: ``axis_name`` is not a name or tuple of names bound here.
    """

    name = "jax"
    inplace = False
    #: JAX/Flax weights are input-major (``(in, out)`` dense kernels, ``HWIO`` convolutions):
    #: output units index the last axis, as optax's AGC assumes (see ``Ops.unit_axis``).
    unit_axis = -1
    xp = jnp

    def __init__(
        self,
        arrays: Sequence[Any] = (),
        *,
        inplace: bool = False,
        foreach: bool | None = None,
        where: str = "gradclip",
        axis_name: Any = None,
    ):
        del foreach
        self.caller = where
        # Validated (bound here?) before anything is read; None: nothing to reduce.
        self.mapped = MappedAxes(axis_name, where)
        self.arrays = list(arrays) if self.mapped.names else []  # for per-element draws
        if inplace:
            raise BackendError(
                f"{where}: JAX arrays are immutable and cannot be clipped in place; use "
                "`grads, info = clipper.clip(grads)`, or `clipper.as_optax()` inside an optax chain"
            )
        dtypes = {a.dtype for a in arrays}  # a model has a handful
        if any(d == jax.dtypes.float0 for d in dtypes):
            refuse_float0(where, [a.dtype for a in arrays])
        self.acc = jnp.float64 if any(d == jnp.float64 for d in dtypes) else jnp.float32

    def _dtype(self, name):
        return _dtype(name)

    def _out(self, grad, result):
        del grad  # never in place
        return result

    def _words(self):
        return _WORDS

    # -- scalars ------------------------------------------------------------------------------
    def scalar(self, value, dtype: str = "float32"):
        if dtype == "int64":
            return jnp.asarray(_host_value(value, dtype))
        return jnp.asarray(value, dtype=_dtype(dtype))

    def to_host(self, x):
        if _is_tracer(x):
            raise BackendError(
                f"{self.caller}: this step needs to read a value on the host (nonfinite='raise'), "
                "which cannot happen inside jax.jit; use nonfinite='skip' or 'zero' there, or "
                "call it outside jit"
            )
        return np.asarray(x).item()

    def array(self, value, dtype: str = "float32"):
        return jnp.asarray(_host_value(value, dtype))

    def to_list(self, x):
        if _is_tracer(x):
            raise BackendError(f"{self.caller}: state can be read as plain data only outside jax.jit")
        return np.asarray(x).tolist()

    # -- multi-tensor -------------------------------------------------------------------------
    def _norm(self, grad, norm_type: float):
        acc = _accumulation_dtype(grad.dtype)
        if grad.size == 0:
            return jnp.zeros((), acc)
        values = jnp.abs(grad.astype(acc).reshape(-1))
        if norm_type == math.inf:
            return jnp.max(values)
        if norm_type == 2.0:
            return jnp.sqrt(jnp.sum(jnp.square(values)))
        if norm_type == 1.0:
            return jnp.sum(values)
        return jnp.sum(values**norm_type) ** (1.0 / norm_type)

    def norms(self, grads, norm_type):
        if self.mapped.reduces(grads):
            return self.mapped.norms(self, grads, norm_type)
        return self.stack([self._norm(g, norm_type).astype(self.acc) for g in grads])

    def combine_norms(self, norms, norm_type):
        norms = jnp.asarray(norms, self.acc)
        if norms.size == 0:
            return jnp.zeros((), self.acc)
        if norm_type == math.inf:
            return jnp.max(norms)
        if norm_type == 2.0:
            return jnp.sqrt(jnp.sum(jnp.square(norms)))
        return jnp.sum(norms**norm_type) ** (1.0 / norm_type)

    @staticmethod
    def _mul(grad, coef):
        # Multiply in fp32 (fp64 when the gradient or the coefficient is fp64) and round once
        # into the gradient's dtype, as NumPy's reference does.
        coef = jnp.asarray(coef)
        wide = jnp.float64 if jnp.float64 in (coef.dtype, grad.dtype) else jnp.float32
        return (grad.astype(wide) * coef.astype(wide)).astype(grad.dtype)

    def scale(self, grads, coef):
        return [self._mul(g, coef) for g in grads]

    def scale_each(self, grads, coefs):
        return [self._mul(g, coefs[i]) for i, g in enumerate(grads)]

    def clamp(self, grads, low, high):
        out = []
        for g in grads:
            value = g
            # An infinite bound is a no-op: leave it out (NaN elements stay NaN either way).
            if math.isfinite(low):
                value = jnp.maximum(value, jnp.asarray(low, g.dtype))
            if math.isfinite(high):
                value = jnp.minimum(value, jnp.asarray(high, g.dtype))
            out.append(value)
        return out

    # -- small-vector math for adaptive state -------------------------------------------------
    def sort(self, x):
        return jnp.sort(x, stable=True)

    def scale_units(self, grads, coefs):
        return [self._mul(g, c) for g, c in zip(grads, coefs)]

    # -- statistics of gradients split over mapped axes (pmap, shard_map) ---------------------
    def unit_norms(self, arrays, axes):
        local = super().unit_norms
        return self.mapped.unit_norms(local, arrays, axes) if self.mapped.reduces(arrays) else local(arrays, axes)

    def extrema(self, grads):
        local = super().extrema
        return self.mapped.extrema(local, grads) if self.mapped.reduces(grads) else local(grads)

    def numel(self, grad):
        return int(grad.size) * self.mapped.size_of(grad)

    def uniform(self, key, counter, shapes):
        offsets = self.mapped.element_offsets(self.arrays, shapes)
        if offsets is None:
            return super().uniform(key, counter, shapes)
        words = OffsetWords(_WORDS, offsets)  # each element numbered by its place in the whole tensor
        return [words.shr(h, 8).astype(jnp.float32) * jnp.float32(2.0**-24) for h in hash_streams(key, counter, shapes, words)]

    # -- optional capabilities ------------------------------------------------------------------
    def finish_info(self, info):
        """Under ``axis_name``: ``info.clipped`` agreed over the axes (element-wise methods and
        random subsets decide it from each device's own elements); everything else is reduced."""
        return info._replace(clipped=self.mapped.agree(info.clipped)) if self.mapped.names else info

    def check_state(self, state, where: str) -> None:
        """Refuse to keep traced state on the Python object (it would leak out of ``jit``)."""
        if any(_is_tracer(leaf) for leaf in jax.tree_util.tree_leaves(state)):
            raise BackendError(
                f"{where}: a stateful clipper cannot keep its state on the Python object inside "
                "jax.jit (the state would be a leaked tracer); use the pure "
                "`grads, state, info = clipper.update(grads, state)` or `clipper.as_optax()`"
            )


class _Uint32Words(Words):
    """32-bit words in uint32 arrays: multiplication wraps modulo 2**32, and the same numbers
    come out with or without ``jax_enable_x64``."""

    def xor(self, a, b):
        return a ^ b

    def shr(self, x, bits):
        return x >> jnp.uint32(bits)

    def mul(self, x, constant):
        return x * jnp.uint32(constant)

    def const(self, value, like):
        del like
        return jnp.uint32(value)

    def index(self, n):
        return jnp.arange(n, dtype=jnp.uint32)

    def halves(self, x):
        # Without jax_enable_x64 integers are 32-bit, so the high word is 0.
        x = jnp.asarray(x)
        if x.dtype.itemsize == 8:
            return (x & 0xFFFFFFFF).astype(jnp.uint32), (x >> 32).astype(jnp.uint32)
        return x.astype(jnp.uint32), jnp.zeros((), jnp.uint32)


_WORDS = _Uint32Words()


BACKEND = JaxOps
