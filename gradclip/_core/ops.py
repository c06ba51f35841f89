"""The Ops base class: the few multi-tensor primitives every clipping algorithm is written against.

Each algorithm in :mod:`gradclip.clippers` is written once, against this base; each file in
:mod:`gradclip.backends` implements it for one framework (einops' lesson). A backend is chosen
from the type of the arrays it is given, and its framework is imported only then, so
``import gradclip`` imports no deep-learning framework.

Conventions every backend keeps:

* "Scalars" are 0-d arrays on the gradients' device; only :meth:`Ops.to_host` reads one on the
  host, never on the default path (the ``"raise"`` policy; DESIGN.md rule 1).
* Norms accumulate in fp32 whatever the gradient dtype, fp64 for fp64 gradients (rule 2).
* Multi-tensor operations take and return lists of arrays; built with ``inplace=True`` an
  ``Ops`` writes the results into its inputs and returns them, else it leaves them alone.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Sequence
from typing import Any

from gradclip._core.dtypes import accumulation, dtype_label, largest_finite
from gradclip._core.errors import BackendError
from gradclip._core.tracing import check_tensors, compiling, torch_backend

__all__ = [
    "Ops",
    "accumulation",
    "backend_name_of",
    "check_floating",
    "dtype_label",
    "framework_of",
    "get_ops",
    "largest_finite",
    "out_of_place",
]

Array = Any


class Ops:
    """Multi-tensor primitives, implemented once per framework: the base of every backend.

    A backend must provide :attr:`name` and every method of the sections marked "required"
    below (the base raises :class:`NotImplementedError`). The rest has a default, correct for
    a single-process backend that keeps clipper state as Python attributes:

    ==========================  =================================================================
    ``inplace``                 False (set by the constructor from its ``inplace`` argument)
    ``unit_axis``               0 (torch's output-major layout)
    ``holds_state``             False, and ``state_store`` is None
    ``distributed``             False: norms are never reduced across processes
    ``context()``               a null context
    ``global_norm``             ``combine_norms(norms(grads))``
    ``clip_coefficient``        the generic ``where`` formula (torch overrides it, fewer kernels)
    ``count_up`` and the like   compositions of the primitives above (``abs``, ``clamp_values``,
                                ``ratio_or_one``, ``count_at_most``; torch: one kernel each)
    ``unit_totals``             the local sum of each value vector (nothing to reduce)
    ``world_size()``            1
    ``finish_info(info)``       ``info`` unchanged
    ``check_state``             accepts everything
    ``version_token``           None (repeated-call detection off)
    ``out_of_place()``          ``self`` when not in place, else a copy with ``inplace=False``
    ==========================  =================================================================

    A backend is built once per call from the call's arrays and never changed afterwards: every
    attribute is set by its constructor (caches a backend keeps for itself live in containers
    made there). Algorithms use only the names declared here, never ``getattr(ops, ...)``.
    """

    #: Short backend name: ``"numpy"``, ``"torch"``, ``"tensorflow"`` or ``"jax"``.
    name: str = "ops"
    #: Whether multi-tensor operations write into their inputs.
    inplace: bool = False
    #: The axis indexing output units in the framework's weight layout (AGC's default): 0 for
    #: torch and NumPy (``(out, in, *k)``), -1 for TensorFlow/Keras and JAX/Flax (``HWIO``).
    unit_axis: int = 0
    #: Whether clipper state lives in framework variables (so a traced function advances it):
    #: then ``state_store(template)`` builds the store for a state shaped like ``template``.
    #: Elsewhere ``state_store`` is None and clippers keep their state as Python attributes.
    holds_state: bool = False
    state_store: Callable[[Any], Any] | None = None
    #: Whether norms are reduced across processes (torch with a process group or DTensors);
    #: :meth:`combine_norms` and :meth:`unit_totals` reduce, so algorithms never branch on it.
    distributed: bool = False

    def _missing(self, what: str) -> NotImplementedError:
        return NotImplementedError(f"{type(self).__qualname__} does not implement Ops.{what}")

    def context(self) -> Any:
        """A context for in-place work (torch: ``no_grad``); a null context by default."""
        return contextlib.nullcontext()

    # -- scalars on the device (required) ---------------------------------------------------
    def scalar(self, value: float | bool, dtype: str = "float32") -> Array:
        """A 0-d array on the gradients' device."""
        raise self._missing("scalar")

    def where(self, cond: Array, a: Array, b: Array) -> Array:
        raise self._missing("where")

    def minimum(self, a: Array, b: Array) -> Array:
        raise self._missing("minimum")

    def maximum(self, a: Array, b: Array) -> Array:
        raise self._missing("maximum")

    def sqrt(self, x: Array) -> Array:
        raise self._missing("sqrt")

    def exp(self, x: Array) -> Array:
        raise self._missing("exp")

    def log(self, x: Array) -> Array:
        raise self._missing("log")

    def isfinite(self, x: Array) -> Array:
        raise self._missing("isfinite")

    def finite_norm(self, norm: Array) -> Array:
        """:meth:`isfinite` of a norm (``>= 0`` or NaN), which backends may test in fewer
        operations (torch: one comparison with ``inf``)."""
        return self.isfinite(norm)

    def stack(self, xs: Sequence[Array]) -> Array:
        """A 1-D array of 0-d arrays; empty input gives an empty accumulation-dtype array."""
        raise self._missing("stack")

    def any(self, x: Array) -> Array:
        raise self._missing("any")

    def to_host(self, x: Array) -> Any:
        """A Python number: the only device read, never on the default path."""
        raise self._missing("to_host")

    def array(self, value: Any, dtype: str = "float32") -> Array:
        raise self._missing("array")

    def to_list(self, x: Array) -> Any:
        raise self._missing("to_list")

    # -- multi-tensor (required) ---------------------------------------------------------------
    def norms(self, grads: list[Array], norm_type: float) -> Array:
        """The p-norm of each array, a 1-D accumulation-dtype array aligned with ``grads``."""
        raise self._missing("norms")

    def combine_norms(self, norms: Array, norm_type: float) -> Array:
        """The global p-norm from the per-tensor norms of :meth:`norms` on the same list
        (reduced across processes when :attr:`distributed`)."""
        raise self._missing("combine_norms")

    def global_norm(self, grads: list[Array], norm_type: float) -> Array:
        """The p-norm of all ``grads`` together."""
        return self.combine_norms(self.norms(grads, norm_type), norm_type)

    def scale(self, grads: list[Array], coef: Array) -> list[Array]:
        raise self._missing("scale")

    def scale_each(self, grads: list[Array], coefs: Array) -> list[Array]:
        raise self._missing("scale_each")

    def clamp(self, grads: list[Array], low: float, high: float) -> list[Array]:
        raise self._missing("clamp")

    def zero_above(self, grads: list[Array], threshold: float) -> list[Array]:
        raise self._missing("zero_above")

    def sign_where(self, grads: list[Array], magnitude: float, cond: Array) -> list[Array]:
        raise self._missing("sign_where")

    def zero_nonfinite(self, grads: list[Array]) -> list[Array]:
        raise self._missing("zero_nonfinite")

    def finite_each(self, grads: list[Array]) -> Array:
        raise self._missing("finite_each")

    def extrema(self, grads: list[Array]) -> tuple[Array, Array]:
        raise self._missing("extrema")

    def numel(self, grad: Array) -> int:
        raise self._missing("numel")

    # -- small-vector math for adaptive state (required) ------------------------------------
    def sum(self, x: Array) -> Array:
        """Sum of all elements of ``x`` as a 0-d array: float input keeps its dtype; bool and
        integer input sum to int64 (a count)."""
        raise self._missing("sum")

    def arange(self, n: int, dtype: str = "int64") -> Array:
        """``[0, 1, ..., n-1]`` on the device (``n`` is a Python int)."""
        raise self._missing("arange")

    def cast(self, x: Array, dtype: str) -> Array:
        """``x`` converted to ``dtype`` (``"float32"``, ``"float64"``, ``"int64"``, ``"bool"``);
        float to int truncates toward zero."""
        raise self._missing("cast")

    def floor(self, x: Array) -> Array:
        """Element-wise floor, same dtype."""
        raise self._missing("floor")

    def sort(self, x: Array) -> Array:
        """A 1-D array sorted ascending (``+inf`` last); a new array."""
        raise self._missing("sort")

    def take(self, x: Array, index: Array) -> Array:
        """``x[index]`` for a 1-D ``x`` and a device integer array ``index`` (any shape, values
        in ``[0, len(x))``), without reading ``index`` on the host."""
        raise self._missing("take")

    def cumsum(self, x: Array) -> Array:
        """Inclusive cumulative sum of a 1-D array, same dtype."""
        raise self._missing("cumsum")

    def version_token(self, grads: list[Array]) -> Any:
        """A hashable host-side token that changes whenever any of ``grads`` is written (to
        detect a second ``clip_`` of unchanged gradients), read without touching the device:
        torch's version counters, NumPy's XOR fingerprint of the bytes. None (the default): the
        backend cannot tell (immutable arrays), and repeated-call detection is off."""
        del grads
        return None

    def unit_norms(self, arrays: list[Array], axes: list[tuple[int, ...] | None]) -> list[Array]:
        """Unit-wise L2 norms (AGC, Brock et al. 2021), fp32 accumulation (fp64 for fp64).

        For ``arrays[i]``, ``axes[i]`` names the non-negative axes that index units (kept); the
        norm is taken over every other axis with ``keepdims``, so the result broadcasts against
        the array. ``None`` takes the norm of the whole array (shape ``(1,) * ndim``). An empty
        tuple makes every element its own unit (``abs``). Never records autograd history. A unit
        split across processes (a sharded DTensor) gets the norm of the whole unit.
        """
        raise self._missing("unit_norms")

    def unit_totals(self, values: list[Array], arrays: list[Array], axes: list[tuple[int, ...] | None]) -> list[Array]:
        """Totals over every unit of every array, each unit counted once over all processes.

        Each ``values[k]`` is a 1-D vector laid out as ``flat_concat(unit_norms(arrays, axes))``
        (one entry per unit, the units of ``arrays[0]`` first) holding an additive per-unit
        quantity (a squared norm, a 0/1 flag). Returns one 0-d accumulation-dtype total per
        vector, identical on every rank. The default, for one process: each vector's sum.
        """
        del arrays, axes
        return [self.sum(v) for v in values]

    def scale_units(self, grads: list[Array], coefs: list[Array]) -> list[Array]:
        """Multiply each gradient by a coefficient array that broadcasts against it (a result
        of :meth:`unit_norms`), computing in the accumulation dtype and rounding once; in place
        when ``inplace``."""
        raise self._missing("scale_units")

    def write_back(self, targets: list[Array], values: list[Array]) -> list[Array]:
        """Copy ``values[i]`` (same shape and dtype) into ``targets[i]`` when ``inplace``, and
        return the targets; out of place, return the values. One copy pass, for results computed
        out of place that must land in the gradients (an in-place :class:`~gradclip.Chain`)."""
        raise self._missing("write_back")

    def flat_concat(self, arrays: list[Array]) -> Array:
        """Every element of ``arrays`` in one 1-D array, in order (row-major within each), in
        their common (widest) dtype; an empty list gives an empty accumulation-dtype array.
        With :meth:`split_as`, per-unit arithmetic over many small arrays runs as a few
        operations on one vector (on a GPU each is a kernel launch)."""
        raise self._missing("flat_concat")

    def split_as(self, vector: Array, like: list[Array]) -> list[Array]:
        """The inverse of :meth:`flat_concat`: consecutive pieces of a 1-D ``vector`` shaped like
        each array of ``like`` (views where the framework has them)."""
        raise self._missing("split_as")

    def uniform(self, key: Array, counter: Array, shapes: list[tuple[int, ...]]) -> list[Array]:
        """Counter-based uniform numbers in ``[0, 1)``, fp32, one array per shape.

        A pure function of ``(key, counter, tensor position, element position)`` — no generator
        state — so a clipper's randomness is checkpointed by two integers and is identical on
        every backend and device. ``key`` and ``counter`` are int64 0-d device arrays >= 0.
        Element ``j`` (row-major) of shape ``i`` is ``(h >> 8) * 2**-24`` for the 32-bit hash
        ``h`` that :mod:`gradclip.backends._hashing` defines (once, for every backend).
        """
        raise self._missing("uniform")

    def select(self, grads: list[Array], replacements: list[Array], masks: list[Array]) -> list[Array]:
        """``where(mask_i, replacement_i, grad_i)`` per tensor; ``mask_i`` is a 0-d bool or a
        bool array of the gradient's shape. Written into ``grads`` when ``inplace``."""
        raise self._missing("select")

    # -- optional capabilities, with their defaults --------------------------------------------
    # The five below are compositions of the primitives above, which a backend may replace by
    # one operation with the same results: adaptive state math is a few scalars, so on a GPU
    # its cost is the number of launches, not their work.
    def count_up(self, counter: Array, flag: Array) -> Array:
        """``counter + 1`` where ``flag``: an int64 counter (0-d, or a vector of counts) and a
        bool array of its shape. The default casts the flag (TensorFlow adds no bool to an
        integer); torch adds it as it is."""
        return counter + self.cast(flag, "int64")

    def abs(self, x: Array) -> Array:
        """``|x|`` element-wise (the default, ``maximum(x, -x)``, may keep the sign of a zero)."""
        return self.maximum(x, -x)

    def clamp_values(self, x: Array, low: Array, high: Array) -> Array:
        """``minimum(maximum(x, low), high)`` of a 0-d or 1-D array, with 0-d array bounds."""
        return self.minimum(self.maximum(x, low), high)

    def ratio_or_one(self, cond: Array, num: Array, den: Array) -> Array:
        """``num / den`` where ``cond``, else exactly 1 (in ``num``'s dtype); ``den`` may be 0 or
        non-finite where ``cond`` does not hold. The default divides by 1 there, so NumPy never
        warns about a quotient that is thrown away; torch divides as it is (no warnings)."""
        one = self.scalar(1.0, accumulation(num))
        return self.where(cond, num / self.where(cond, den, one), one)

    def count_at_most(self, ascending: Array, values: Array) -> Array:
        """For each entry ``v`` of the 1-D ``values`` (of static length), how many entries of the
        non-decreasing 1-D ``ascending`` are ``<= v``: ``searchsorted(ascending, values,
        side="right")``, int64. The default compares and counts once per value."""
        return self.stack([self.sum(ascending <= values[i]) for i in range(values.shape[0])])

    def clip_coefficient(self, norm: Array, threshold: Array, eps: float = 0.0) -> Array:
        """``threshold / (norm + eps)`` where ``norm > threshold``, else exactly 1: formed as
        ``threshold * (1 / divisor)`` as torch does (torch's override gives the same bits), with
        the divisor 1 wherever the coefficient is not used (a zero norm never divides by 0)."""
        one = self.scalar(1.0, accumulation(norm))
        above = norm > threshold
        divisor = self.where(above, norm + eps, one)
        return self.where(above, threshold * (1.0 / divisor), one)

    def world_size(self) -> int:
        """How many processes train together; 1 by default. Clippers whose state must agree
        across ranks without communicating (a random key) read it."""
        return 1

    def finish_info(self, info: Any) -> Any:
        """The :class:`~gradclip.ClipInfo` of a whole clipper call, made to agree across
        processes (torch with a process group: ``clipped`` anywhere); ``info`` by default.
        Called once per clipper call, on every rank."""
        return info

    def check_state(self, state: Any, where: str) -> None:
        """Refuse a state that cannot be kept on the Python object (JAX: tracers inside
        ``jit``); accepts everything by default."""
        del state, where

    def out_of_place(self) -> Ops:
        """An Ops like this one that returns new arrays: ``self`` when not in place, else a
        shallow copy with ``inplace=False``, built without touching this object (caches made by
        the constructor are shared: they depend on the arrays, never on ``inplace``)."""
        if not self.inplace:
            return self
        twin = copy.copy(self)
        vars(twin)["inplace"] = False  # part of building the copy: nobody holds it yet
        return twin


# Maps the top-level module of an array type to the backend module that handles it.
_FRAMEWORK_OF_MODULE = {
    "numpy": "numpy", "torch": "torch", "tensorflow": "tensorflow", "keras": "tensorflow",
    "jax": "jax", "jaxlib": "jax",
}
_framework_cache: dict[type, str] = {}
_backend_cache: dict[str, type] = {}
#: Whether each dtype seen is floating point (dtypes of every framework are hashable).
_floating_cache: dict[Any, bool] = {}


def _is_floating(dtype: Any) -> bool:
    # One spelling test covers every framework: str() of a float dtype names it ("float32",
    # "torch.bfloat16", "<dtype: 'float16'>", Keras' plain "float32"); integer, bool and complex
    # dtypes never contain "float".
    known = _floating_cache.get(dtype)
    if known is None:
        known = "float" in str(dtype).lower()
        _floating_cache[dtype] = known
    return known


def check_floating(arrays: Sequence[Any], where: str = "gradclip") -> None:
    """Refuse arrays whose dtype is not floating point, before anything reads or writes them:
    clipping would truncate integers (a coefficient of 0.4 turns every element into 0) and drop
    imaginary parts, so every backend refuses them up front, with the same message.

    Raises:
        BackendError: An integer, bool or complex array (the message names its position, its
            dtype and the valid dtypes; ``where`` names the entry point). A ``TypeError``.
    """
    # One test per distinct dtype (a model has a handful), not per array.
    dtypes = {getattr(array, "dtype", None) for array in arrays}
    if all(dtype is None or _is_floating(dtype) for dtype in dtypes):
        return
    for index, array in enumerate(arrays):
        dtype = getattr(array, "dtype", None)
        if dtype is not None and not _is_floating(dtype):
            raise BackendError(
                f"{where}: gradient #{index} has dtype {dtype}, which is not floating point; "
                "gradients must be float16, bfloat16, float32 or float64 (cast integer or bool "
                "arrays first, e.g. .float() or .astype(numpy.float32)). Nothing was changed."
            )


def framework_of(array: Any) -> str:
    """Name the framework an array belongs to, from its type (cached per type).

    Raises:
        BackendError: The type belongs to no supported framework.
    """
    kind = type(array)
    if compiling():  # no read of a growing cache while dynamo traces (see _core/tracing.py)
        return "torch" if isinstance(array, sys.modules["torch"].Tensor) else _framework_of_type(kind)
    cached = _framework_cache.get(kind)
    return cached if cached is not None else _framework_of_type(kind)


def _framework_of_type(kind: type) -> str:
    root = kind.__module__.split(".", 1)[0]
    framework = _FRAMEWORK_OF_MODULE.get(root)
    if framework is None:
        raise BackendError(
            f"gradclip: cannot clip an object of type {kind.__module__}.{kind.__qualname__}; "
            "expected torch.Tensor, numpy.ndarray, tf.Tensor/tf.Variable or jax.Array"
        )
    _framework_cache[kind] = framework
    return framework


def backend_name_of(arrays: Sequence[Any], where: str = "gradclip") -> str:
    """Return the one framework all ``arrays`` belong to.

    Raises:
        BackendError: The arrays mix frameworks (the message names each type found).
    """
    # One lookup per distinct type: a step over thousands of gradients sees one or two types.
    names: dict[str, str] = {}
    for kind in dict.fromkeys(map(type, arrays)):  # first-seen order, for the message
        framework = _framework_cache.get(kind)
        if framework is None:
            framework = _framework_of_type(kind)
        names.setdefault(framework, f"{kind.__module__}.{kind.__qualname__}")
    if len(names) > 1:
        found = ", ".join(f"{fw} ({tp})" for fw, tp in names.items())
        raise BackendError(
            f"{where}: all gradients in one call must come from one framework, found {found}"
        )
    return next(iter(names), "numpy")


def get_ops(
    arrays: Sequence[Any],
    *,
    inplace: bool = False,
    foreach: bool | None = None,
    framework: str | None = None,
    where: str = "gradclip",
    process_group: Any = None,
    torch_kernels: bool = False,
    axis_name: Any = None,
    device: Any = None,
) -> Ops:
    """Build the Ops for these arrays.

    Args:
        arrays: The gradients (no ``None`` entries). Empty is allowed: the backend then comes
            from ``framework`` (NumPy when that is None too).
        inplace: Whether multi-tensor operations write into their inputs.
        foreach: Three-state fast-path flag (``None`` auto, ``True`` required, ``False`` off);
            only the torch backend has a multi-tensor fast path.
        framework: Force a backend by name (used when the list may be empty).
        where: The public entry point, for error messages.
        process_group: torch only: the group (or ``DeviceMesh``) over which plain tensors are
            sharded (:mod:`gradclip.torch.distributed`); DTensors need none.
        torch_kernels: torch only: torch's own norm kernels everywhere (the drop-ins' promise
            of torch's bits); other backends have no alternative kernels and ignore it.
        axis_name: jax only: the ``pmap``/``shard_map`` axis (or tuple of axes) the gradients are
            split over; statistics are reduced over it (:mod:`gradclip.backends._jax_axes`).
        device: torch only: the device of an Ops built for no arrays (where a clipper's kept
            state lives), instead of the CPU; ignored when there are arrays.

    Returns:
        An :class:`Ops`, bound to the device of the first array (else ``device``).

    Raises:
        BackendError: Unknown array type or mixed frameworks; an array that is not floating
            point; ``process_group`` with arrays of another framework than torch.
    """
    if compiling():  # dynamo traces torch only: no framework lookup (see _core/tracing.py)
        check_tensors(arrays, where)
        return torch_backend()(
            arrays, inplace=inplace, foreach=foreach, where=where, process_group=process_group,
            torch_kernels=torch_kernels, device=device,
        )
    if process_group is not None and not arrays and framework is None:
        framework = "torch"  # a rank without gradients still joins the reduction
    name = backend_name_of(arrays, where) if arrays else (framework or "numpy")
    check_floating(arrays, where)
    if framework is not None and arrays and name != framework:
        raise BackendError(f"{where}: expected {framework} arrays, got {name} arrays")
    cls = _backend_cache.get(name)
    if cls is None:
        # The builtin __import__ rather than importlib: the first call may happen while
        # tf.function traces with autograph, which tries (noisily) to convert importlib's
        # Python functions but calls builtins as they are.
        __import__(f"gradclip.backends.{name}")
        module = sys.modules[f"gradclip.backends.{name}"]
        cls = module.BACKEND
        _backend_cache[name] = cls
    if axis_name is not None and name != "jax":
        raise BackendError(f"{where}: axis_name= names a JAX mapped axis (pmap, shard_map); got {name} arrays")
    if name != "torch":
        if process_group is not None:
            raise BackendError(
                f"{where}: process_group= is supported for torch tensors only (torch.distributed), "
                f"got {name} arrays"
            )
        options = {} if axis_name is None else {"axis_name": axis_name}
        return cls(arrays, inplace=inplace, foreach=foreach, where=where, **options)
    # The torch backend picks its Reducer from the arrays (DTensors) and the process group.
    return cls(
        arrays, inplace=inplace, foreach=foreach, where=where, process_group=process_group,
        torch_kernels=torch_kernels, device=device,
    )


def out_of_place(ops: Ops) -> Ops:
    """``ops.out_of_place()``: an Ops like ``ops`` that returns new arrays (see
    :meth:`Ops.out_of_place`), for clippers that compute a result before deciding where it goes
    (:class:`~gradclip.Subset`, an in-place :class:`~gradclip.Chain`)."""
    return ops.out_of_place()
