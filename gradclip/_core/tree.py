"""Flattening the containers users pass gradients in, and collecting gradients from parameters.

Clippers work on flat lists. Users pass one array, a list or tuple, a dict of named arrays (or
nestings of those), or, for in-place clipping, a module or an iterable of parameters. This module
turns each into a flat list plus names, and puts results back in the user's structure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from gradclip._core.errors import BackendError
from gradclip._core.tracing import collect_traced, compiling

__all__ = ["flatten", "flatten_like", "Collected", "collect_gradients", "path_name", "position_names"]


#: Types whose class defines ``shape`` and ``dtype`` (every framework's array and parameter
#: types): then every instance is an array, and the per-element test is one dict lookup. Clipping
#: calls this for each parameter and gradient, thousands of times per step.
_ARRAY_TYPES: dict[type, bool] = {}


def _is_array(value: Any) -> bool:
    kind = type(value)
    known = _ARRAY_TYPES.get(kind)
    if known is not None:
        return known
    if hasattr(kind, "shape") and hasattr(kind, "dtype"):
        _ARRAY_TYPES[kind] = True
        return True
    # Attributes set on instances only (a user's wrapper object): decide per object, uncached.
    return hasattr(value, "shape") and hasattr(value, "dtype")


#: "#0", "#1", ...: the names of unnamed gradients, built once and sliced (a list of 2,000
#: f-strings per step was a measurable part of clipping many small tensors).
_POSITION_NAMES: list[str] = []


def position_names(count: int) -> list[str]:
    """``["#0", ..., f"#{count - 1}"]``, from a cache that grows as needed (built afresh while
    dynamo traces: a global that grows would become a guard)."""
    if compiling():
        return ["#" + str(i) for i in range(count)]
    if len(_POSITION_NAMES) < count:
        _POSITION_NAMES.extend(f"#{i}" for i in range(len(_POSITION_NAMES), count))
    return _POSITION_NAMES[:count]


def flatten(tree: Any) -> tuple[list[Any], Callable[[list[Any]], Any], list[str]]:
    """Flatten an array, or nested lists/tuples/dicts of arrays, into a list.

    ``None`` leaves are kept (as ``None``) so the structure can be rebuilt; clippers skip them.

    Args:
        tree: The gradients.

    Returns:
        ``(leaves, unflatten, names)``: the leaves in order, a function rebuilding the structure
        from a list of the same length, and a readable name per leaf (dict keys joined by ``.``,
        list positions as ``#i``).

    Raises:
        BackendError: A leaf is neither an array nor None.
    """
    leaves: list[Any] = []
    names: list[str] = []

    def walk(node: Any, prefix: str):
        if node is None or _is_array(node):
            leaves.append(node)
            names.append(prefix or "#0")
            return lambda it: next(it)
        if isinstance(node, Mapping):
            keys = list(node.keys())
            builders = [walk(node[k], f"{prefix}.{k}" if prefix else str(k)) for k in keys]
            kind = type(node)

            def build_mapping(it):
                values = {k: b(it) for k, b in zip(keys, builders)}
                return values if kind is dict else kind(values)

            return build_mapping
        if isinstance(node, (list, tuple)):
            builders = [walk(v, f"{prefix}#{i}" if prefix else f"#{i}") for i, v in enumerate(node)]
            kind = type(node)

            def build_sequence(it):
                values = [b(it) for b in builders]
                if kind is list:
                    return values
                if kind is tuple:
                    return tuple(values)
                return kind(*values)  # NamedTuple

            return build_sequence
        jax_builder = _jax_node(node, prefix, leaves, names)
        if jax_builder is not None:
            return jax_builder
        raise BackendError(
            f"gradclip: cannot clip a {type(node).__module__}.{type(node).__qualname__} "
            f"at {prefix or 'the top level'}; pass arrays, or lists/tuples/dicts of arrays"
        )

    builder = walk(tree, "")

    def unflatten(values: list[Any]) -> Any:
        return builder(iter(values))

    return leaves, unflatten, names


def flatten_like(tree: Any, like: Any) -> list[Any]:
    """The leaves of ``tree`` in the order :func:`flatten` gives for ``like``.

    Used for ``params`` beside ``grads``: dict entries are matched by key, not by position, so
    parameters and gradients whose dicts list the same keys in different orders still pair up
    (``jax.tree_util`` returns dicts with sorted keys, a user's dict keeps its own order).

    Raises:
        BackendError: ``tree`` lacks a key or an entry that ``like`` has, or a sequence differs
            in length.
    """
    out: list[Any] = []

    def walk(node: Any, ref: Any, prefix: str) -> None:
        if ref is None or _is_array(ref):
            out.append(node)
            return
        if isinstance(ref, Mapping):
            if not isinstance(node, Mapping) or any(k not in node for k in ref):
                missing = [k for k in ref if not isinstance(node, Mapping) or k not in node]
                raise BackendError(
                    f"gradclip: params lack the entries {missing[:5]} of grads at {prefix or 'the top level'}"
                )
            for key in ref:
                walk(node[key], ref[key], f"{prefix}.{key}" if prefix else str(key))
            return
        if isinstance(ref, (list, tuple)) and isinstance(node, (list, tuple)) and len(node) == len(ref):
            for i, (n, r) in enumerate(zip(node, ref)):
                walk(n, r, f"{prefix}#{i}" if prefix else f"#{i}")
            return
        out.extend(flatten(node)[0])  # other containers: the same flattening as the gradients'

    walk(tree, like, "")
    return out


def path_name(path: Any) -> str:
    """A ``jax.tree_util`` key path spelled as :func:`flatten` names leaves: dict keys and
    attributes joined by ``.``, list and tuple positions as ``#i`` (``{"head": {"w": ..}}`` →
    ``head.w``, ``[w, b]`` → ``#0``, ``#1``; the root leaf ``#0``). Name patterns (AGC's
    ``exclude``, Subset's) then match the same leaf whichever entry point flattened it."""
    name = ""
    for key in path:
        if hasattr(key, "key"):  # DictKey
            part = str(key.key)
        elif hasattr(key, "name"):  # GetAttrKey (dataclasses, flax structs)
            part = str(key.name)
        else:  # SequenceKey, FlattenedIndexKey
            name += f"#{getattr(key, 'idx', getattr(key, 'key', ''))}"
            continue
        name = f"{name}.{part}" if name else part
    return name or "#0"


def _jax_node(node: Any, prefix: str, leaves: list[Any], names: list[str]):
    """Flatten any other JAX pytree node (dataclasses, flax structs, custom nodes) with
    ``jax.tree_util``; None when jax is not loaded or ``node`` is not a pytree node.

    Only consulted for nodes the walk above does not know, so lists, tuples and dicts keep
    their own order and names. jax is never imported here: a custom pytree node exists only
    once its program has imported jax.
    """
    import sys

    tree_util = sys.modules.get("jax.tree_util")
    if tree_util is None:
        return None
    flat, treedef = tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is None or _is_array(x))
    if treedef.num_nodes == 1 and treedef.num_leaves == 1 and not flat[0][0]:
        return None  # a leaf to jax too: not a container
    for path, leaf in flat:
        if leaf is not None and not _is_array(leaf):
            return None  # let the caller raise about this node
        leaves.append(leaf)
        name = path_name(path)  # one spelling for every entry point (as_optax, clip_then too)
        names.append(name if not prefix else f"{prefix}{name}" if name.startswith("#") else f"{prefix}.{name}")
    count = len(flat)

    def build_jax(it):
        return treedef.unflatten([next(it) for _ in range(count)])

    return build_jax


class Collected(NamedTuple):
    """Gradients gathered for in-place clipping."""

    #: The gradient arrays to clip in place (no None).
    grads: list[Any]
    #: The matching parameters (the arrays themselves for NumPy, which has no ``.grad``).
    params: list[Any]
    #: A readable name per gradient: the module's parameter names, or ``#i`` positions.
    names: list[str]
    #: How many parameters were seen in total, with or without a gradient.
    seen: int
    #: The one framework of everything seen, gradients or not (None when no array was seen):
    #: it picks the backend of the ClipInfo when no parameter has a gradient yet.
    framework: str | None = None


def _all_arrays(values: list[Any]) -> bool:
    """Whether every value is an array (:func:`_is_array`), with one dictionary lookup per
    distinct type once :func:`_is_array` has cached it."""
    for kind in set(map(type, values)):
        if not _ARRAY_TYPES.get(kind) and not all(_is_array(v) for v in values if type(v) is kind):
            return False
    return True


def _named_items(target: Any) -> tuple[list[str], list[Any]]:
    """The names and the objects of everything ``target`` holds, in order (duplicates kept)."""
    if hasattr(target, "named_parameters") and callable(target.named_parameters):
        # remove_duplicate (the default) drops tied weights, which must be counted once.
        items = list(target.named_parameters())
        return [name for name, _ in items], [param for _, param in items]
    if _is_array(target):
        return ["#0"], [target]
    if isinstance(target, Mapping):
        if "params" in target:  # one optimizer parameter group
            return _named_items(target["params"])
        return [str(k) for k in target], list(target.values())
    if isinstance(target, Iterable) and not isinstance(target, (str, bytes)):
        values = list(target)
        if _all_arrays(values):  # the common case, a list of parameters: no per-item tests
            return position_names(len(values)), values
        names: list[str] = []
        objects: list[Any] = []
        for position, item in enumerate(values):
            if isinstance(item, Mapping) and "params" in item:  # optimizer.param_groups
                inner_names, inner = _named_items(item["params"])
                names.extend(inner_names)
                objects.extend(inner)
            elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                names.append(item[0])  # model.named_parameters()
                objects.append(item[1])
            else:
                names.append(f"#{position}")
                objects.append(item)
        return names, objects
    raise BackendError(
        f"gradclip: expected a module, parameters or arrays to clip, got {type(target).__qualname__}"
    )


def collect_gradients(target: Any, where: str = "gradclip") -> Collected:
    """Gather the gradients to clip in place from a module, parameters or arrays.

    Objects with a ``grad`` attribute (torch parameters, tf-like wrappers) contribute their
    gradient when it is not None; plain arrays without one (NumPy) are clipped themselves. The
    same parameter listed twice (tied weights) is counted once.

    Args:
        target: A module, parameters, optimizer parameter groups, or arrays.
        where: The public entry point, for error messages.

    Returns:
        A :class:`Collected`.

    Raises:
        BackendError: ``target`` is not something holding gradients, or mixes frameworks.
    """
    if compiling():  # the traced form: no caches, no type-name parsing (_core/tracing.py)
        return collect_traced(target, where)
    # Imported here: ops imports nothing from this module, but keep the import graph obvious.
    from gradclip._core.ops import backend_name_of

    names, objects = _named_items(target)
    if len(set(map(id, objects))) != len(objects):
        # The same parameter twice (tied weights listed by hand): keep its first occurrence.
        first: dict[int, int] = {}
        for position, item in enumerate(objects):
            first.setdefault(id(item), position)
        kept = sorted(first.values())
        names, objects = [names[i] for i in kept], [objects[i] for i in kept]
    # A parameter's gradient, or a plain array itself (NumPy arrays have no .grad).
    candidates = [None if item is None else getattr(item, "grad", item) for item in objects]
    present = [i for i, grad in enumerate(candidates) if grad is not None]
    if len(present) == len(candidates):
        grads, params = candidates, objects
    else:
        grads = [candidates[i] for i in present]
        params = [objects[i] for i in present]
        names = [names[i] for i in present]
    if not _all_arrays(grads):
        position = next(i for i, grad in enumerate(grads) if not _is_array(grad))
        raise BackendError(
            f"{where}: {names[position]} is a {type(params[position]).__qualname__}, not a parameter or array"
        )
    # The frameworks of every array seen, not only of the gradients found: in
    # [numpy_array, torch_tensor] the tensor's .grad is None, and the call must still refuse the
    # mix rather than clip the NumPy array alone. Mixed frameworks raise BackendError, naming both.
    arrays_seen = objects if _all_arrays(objects) else [item for item in objects if _is_array(item)]
    framework = backend_name_of(arrays_seen + grads, where) if arrays_seen or grads else None
    return Collected(grads, params, names, len(objects), framework)
