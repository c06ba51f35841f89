"""Clipping inside ``torch.compile``: what the call path does differently while dynamo traces it.

Dynamo runs the Python of a compiled function once, symbolically, keeps its tensor operations as
a graph and installs guards on what the Python read; the graph then runs on every call until a
guard fails. So host-side work (collecting gradients, checking arguments, choosing the backend)
costs nothing per compiled step: it runs at trace time, once per parameter set, and its
results are constants of the graph. Three rules follow for gradclip's entry points:

* **Nothing read from a cache that grows.** A module-level dict read at trace time becomes a
  guard, and an eager call that adds an entry later would force a recompile. While tracing, the
  backend is the torch backend (dynamo only traces torch) and array tests are ``isinstance``
  checks against ``torch.Tensor``, fixed for the life of the process.
* **Nothing dynamo cannot trace.** ``warnings.warn``, ``importlib`` and string methods on type
  names break a ``fullgraph=True`` trace; the traced path uses none of them.
* **No host-side check that reads runtime values.** The repeated-call guard compares tensors'
  version counters: at trace time those belong to fake tensors, so the guard is off in a
  compiled region (each run of the graph is one call; the caller owns the step structure). The
  layout check of per-tensor state reads names and shapes, which are trace-time constants and
  guarded by dynamo: a changed layout retraces, and the retrace raises the usual
  :class:`~gradclip.StateError`.

An error raised while tracing (a bad argument, a changed layout) is gradclip's own: with
``fullgraph=True`` dynamo reports it as ``torch._dynamo.exc.Unsupported`` carrying gradclip's
message (``raised exception InvalidArgumentError(...)``); without ``fullgraph`` the graph breaks
and the call raises gradclip's error itself. Either way nothing has run, so nothing changed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from gradclip._core.errors import BackendError

__all__ = [
    "check_tensors",
    "collect_traced",
    "compiling",
    "distinct_positions",
    "register_torch_backend",
    "torch_backend",
]

_TORCH_BACKEND: list[Callable[[], Any]] = []


def compiling() -> bool:
    """Whether dynamo (``torch.compile``) is tracing the current call.

    Never imports torch: without torch loaded nothing can be compiled.
    """
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def register_torch_backend(loader: Callable[[], Any]) -> None:
    """Record how to import the torch backend module from inside a trace.

    ``gradclip/__init__.py`` (above every layer) registers a function holding a plain ``import``
    statement, which dynamo executes while tracing; ``importlib`` and ``__import__`` it refuses.
    """
    _TORCH_BACKEND[:] = [loader]


def torch_backend() -> type:
    """The torch backend class (its module imported on first use, also while tracing)."""
    # Always through the import statement: a sys.modules lookup would become a guard that the
    # import itself invalidates.
    return _TORCH_BACKEND[0]().BACKEND


def check_tensors(arrays: list[Any], where: str) -> None:
    """The traced form of the floating-point check of ``get_ops`` (torch tensors only).

    Raises:
        BackendError: An array is not a torch tensor, or not floating point.
    """
    torch = sys.modules["torch"]
    for index, array in enumerate(arrays):
        if not isinstance(array, torch.Tensor):
            raise BackendError(
                f"{where}: inside torch.compile every gradient must be a torch.Tensor, got "
                f"{type(array).__qualname__} at position {index}"
            )
        if not array.is_floating_point():
            raise BackendError(
                f"{where}: gradient #{index} has dtype {array.dtype}, which is not floating point; "
                "gradients must be float16, bfloat16, float32 or float64. Nothing was changed."
            )


def distinct_positions(leaves: list[Any]) -> tuple[list[int], list[tuple[int, int]]]:
    """Where each distinct array first appears among ``leaves`` (None skipped), and
    ``(position, first position)`` for every repeat: the same array given twice counts once.

    Eagerly by ``id``. While tracing, ``id`` of a gradient would become a guard on that very
    tensor object, and a fresh gradient every step (``zero_grad(set_to_none=True)``) would
    retrace every step; identity tests (``is``) are resolved by dynamo without a guard, and
    only arrays of one shape and dtype can be the same array, so each is compared with those.
    """
    if not compiling():
        first: dict[int, int] = {}
        positions = []
        for i, leaf in enumerate(leaves):
            if leaf is not None and id(leaf) not in first:
                first[id(leaf)] = i
                positions.append(i)
        repeats = [(i, first[id(g)]) for i, g in enumerate(leaves) if g is not None and first[id(g)] != i]
        return positions, repeats
    buckets: dict[Any, list[int]] = {}
    positions, repeats = [], []
    for i, leaf in enumerate(leaves):
        if leaf is None:
            continue
        bucket = buckets.setdefault((tuple(leaf.shape), leaf.dtype), [])
        original = next((j for j in bucket if leaves[j] is leaf), None)
        if original is None:
            bucket.append(i)
            positions.append(i)
        else:
            repeats.append((i, original))
    return positions, repeats


def collect_traced(target: Any, where: str) -> Any:
    """:func:`gradclip._core.tree.collect_gradients` for a traced call: the same containers
    (a module, a tensor, parameters, ``named_parameters()`` pairs, optimizer parameter groups, a
    dict of tensors), the same names and the same de-duplication of tied parameters, written
    with what dynamo traces.

    Raises:
        BackendError: ``target`` holds something that is not a torch tensor.
    """
    from gradclip._core.tree import Collected  # tree imports this module

    torch = sys.modules["torch"]
    names, objects = _items(target, torch, where)
    seen: dict[int, bool] = {}
    grads, params, kept_names = [], [], []
    for name, item in zip(names, objects):
        if item is None or id(item) in seen:
            continue
        seen[id(item)] = True
        if not isinstance(item, torch.Tensor):
            raise BackendError(f"{where}: {name} is a {type(item).__qualname__}, not a parameter or tensor")
        if item.grad is not None:
            grads.append(item.grad)
            params.append(item)
            kept_names.append(name)
    return Collected(grads, params, kept_names, len(seen), "torch")


def _items(target: Any, torch: Any, where: str) -> tuple[list[str], list[Any]]:
    if isinstance(target, torch.nn.Module):
        pairs = list(target.named_parameters())
        return [name for name, _ in pairs], [param for _, param in pairs]
    if isinstance(target, torch.Tensor):
        return ["#0"], [target]
    if isinstance(target, Mapping):
        if "params" in target:
            return _items(target["params"], torch, where)
        return [str(key) for key in target], list(target.values())
    if isinstance(target, (str, bytes)) or not hasattr(target, "__iter__"):
        raise BackendError(f"gradclip: expected a module, parameters or tensors to clip, got {type(target).__qualname__}")
    names: list[str] = []
    objects: list[Any] = []
    for position, item in enumerate(list(target)):
        if isinstance(item, Mapping) and "params" in item:
            inner_names, inner = _items(item["params"], torch, where)
            names.extend(inner_names)
            objects.extend(inner)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            names.append(item[0])
            objects.append(item[1])
        else:
            names.append("#" + str(position))
            objects.append(item)
    return names, objects
