"""The Ops protocol: the few multi-tensor primitives every clipping algorithm is written against.

Each algorithm in :mod:`gradclip.clippers` is written once, against this protocol; each file in
:mod:`gradclip.backends` implements it for one framework (einops' lesson). A backend is chosen
from the type of the arrays it is given, and its framework is imported only then, so
``import gradclip`` imports no deep-learning framework.

Conventions every backend keeps:

* "Scalars" are 0-d arrays of the backend on the gradients' device. Nothing here converts them
  to Python numbers except :meth:`Ops.to_host`, which exists for the paths that must read a value
  (the ``"raise"`` policy) and is never called on the default path (DESIGN.md rule 1).
* Norms accumulate in fp32 whatever the gradient dtype, fp64 for fp64 gradients (rule 2).
* Multi-tensor operations take and return lists of arrays. An ``Ops`` built with
  ``inplace=True`` writes the results into the input arrays and returns them; otherwise it
  returns new arrays and leaves its inputs alone.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from gradclip._core.errors import BackendError

__all__ = ["Ops", "backend_name_of", "get_ops", "framework_of"]

Array = Any


@runtime_checkable
class Ops(Protocol):
    """Multi-tensor primitives, implemented once per framework."""

    #: Short backend name: ``"numpy"``, ``"torch"``, ``"tensorflow"`` or ``"jax"``.
    name: str
    #: Whether multi-tensor operations write into their inputs.
    inplace: bool

    def context(self) -> Any: ...

    # -- scalars on the device ------------------------------------------------------------
    def scalar(self, value: float | bool, dtype: str = "float32") -> Array: ...
    def where(self, cond: Array, a: Array, b: Array) -> Array: ...
    def minimum(self, a: Array, b: Array) -> Array: ...
    def maximum(self, a: Array, b: Array) -> Array: ...
    def sqrt(self, x: Array) -> Array: ...
    def exp(self, x: Array) -> Array: ...
    def log(self, x: Array) -> Array: ...
    def isfinite(self, x: Array) -> Array: ...
    def stack(self, xs: Sequence[Array]) -> Array: ...
    def any(self, x: Array) -> Array: ...
    def to_host(self, x: Array) -> Any: ...
    def array(self, value: Any, dtype: str = "float32") -> Array: ...
    def to_list(self, x: Array) -> Any: ...

    # -- multi-tensor --------------------------------------------------------------------
    def norms(self, grads: list[Array], norm_type: float) -> Array: ...
    def combine_norms(self, norms: Array, norm_type: float) -> Array: ...
    def global_norm(self, grads: list[Array], norm_type: float) -> Array: ...
    def scale(self, grads: list[Array], coef: Array) -> list[Array]: ...
    def scale_each(self, grads: list[Array], coefs: Array) -> list[Array]: ...
    def clamp(self, grads: list[Array], low: float, high: float) -> list[Array]: ...
    def zero_above(self, grads: list[Array], threshold: float) -> list[Array]: ...
    def sign_where(self, grads: list[Array], magnitude: float, cond: Array) -> list[Array]: ...
    def zero_nonfinite(self, grads: list[Array]) -> list[Array]: ...
    def finite_each(self, grads: list[Array]) -> Array: ...
    def extrema(self, grads: list[Array]) -> tuple[Array, Array]: ...
    def numel(self, grad: Array) -> int: ...


# Maps the top-level module of an array type to the backend module that handles it.
_FRAMEWORK_OF_MODULE = {
    "numpy": "numpy",
    "torch": "torch",
    "tensorflow": "tensorflow",
    "keras": "tensorflow",
    "jax": "jax",
    "jaxlib": "jax",
}
_framework_cache: dict[type, str] = {}
_backend_cache: dict[str, type] = {}


def framework_of(array: Any) -> str:
    """Name the framework an array belongs to, from its type (cached per type).

    Raises:
        BackendError: The type belongs to no supported framework.
    """
    kind = type(array)
    cached = _framework_cache.get(kind)
    if cached is not None:
        return cached
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
    names: dict[str, str] = {}
    for array in arrays:
        framework = framework_of(array)
        names.setdefault(framework, f"{type(array).__module__}.{type(array).__qualname__}")
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

    Returns:
        An object implementing :class:`Ops`, bound to the device of the first array.

    Raises:
        BackendError: Unknown array type or mixed frameworks.
    """
    name = backend_name_of(arrays, where) if arrays else (framework or "numpy")
    if framework is not None and arrays and name != framework:
        raise BackendError(f"{where}: expected {framework} arrays, got {name} arrays")
    cls = _backend_cache.get(name)
    if cls is None:
        module = importlib.import_module(f"gradclip.backends.{name}")
        cls = module.BACKEND
        _backend_cache[name] = cls
    return cls(arrays, inplace=inplace, foreach=foreach, where=where)
