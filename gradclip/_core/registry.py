"""The registry of clipping methods: one name per class, one place the CLI and tests read.

Names are the class names in snake case as written in API.md (``global_norm``, ``zclip``...).
``get(name)`` with no keyword arguments builds a usable default for every method: each class
declares its own ``defaults`` for the arguments that have no default in its signature.
:func:`from_config` rebuilds any clipper, nested ones included, from ``{"clipper": name,
"config": {...}}`` (what ``config()`` and checkpoints hold): Keras, ``Subset`` and the CLI use it.

The built-in methods register themselves when :mod:`gradclip.clippers` is imported, which
``import gradclip`` does; this module imports no clipper.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from gradclip._core.errors import InvalidArgumentError, UnknownNameError

__all__ = ["register", "get", "available", "registered_class", "from_config", "UnknownArgumentError"]

class UnknownArgumentError(UnknownNameError, TypeError):
    """:func:`get` was given a keyword argument the method does not take: an
    :class:`~gradclip.UnknownNameError`, and a ``TypeError`` as Python's own error for an
    unexpected keyword argument is (code catching that keeps working)."""


_REGISTRY: dict[str, type] = {}
#: Registered names left out of :func:`available` (composites built by a function: ``chain``).
_UNLISTED: set[str] = set()


def register(name: str, *, listed: bool = True):
    """Class decorator adding a clipper class to the registry under ``name``.

    Args:
        name: The registry name.
        listed: Whether :func:`available` lists it (``chain`` is only rebuilt from configs).

    Raises:
        InvalidArgumentError: ``name`` is already taken by another class.
    """

    def decorate(cls: type) -> type:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise InvalidArgumentError(
                f"register: name {name!r} is already used by {existing.__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        if not listed:
            _UNLISTED.add(name)
        return cls

    return decorate


def available() -> list[str]:
    """Return the registered method names, sorted."""
    return sorted(set(_REGISTRY) - _UNLISTED)


def registered_class(name: str) -> type:
    """Return the class registered under ``name``.

    Raises:
        UnknownNameError: The name is not registered; the message lists every valid name.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownNameError(
            f"gradclip.get: unknown clipper name {name!r}; valid names: {', '.join(available())}"
        )
    return _REGISTRY[name]


def get(name: str, **kwargs: Any):
    """Build a clipper from its registry name.

    Args:
        name: A name from :func:`available`, e.g. ``"global_norm"``.
        **kwargs: Constructor arguments; those left out take the method's registry defaults
            (e.g. ``max_norm=1.0`` for ``global_norm``) and then the class's own defaults.
            ``process_group=`` is accepted for every method (see ``Clipper.process_group``).

    Returns:
        A new clipper instance.

    Raises:
        UnknownNameError: Unknown name (lists the valid ones), or a keyword argument the method
            does not take (:class:`UnknownArgumentError`, also a ``TypeError`` as Python's own
            error; it names the method, the keyword and the valid ones).
        InvalidArgumentError: A bad argument value (from the constructor).
    """
    cls = registered_class(name)
    _check_keywords(name, cls, kwargs)
    # Every clipper takes a process group (torch.distributed), whatever its signature.
    group = kwargs.pop("process_group", None)
    clipper = cls(**cls.with_defaults(kwargs))
    if group is not None:
        clipper.process_group = group
    return clipper


def _check_keywords(name: str, cls: type, kwargs: Mapping[str, Any], *, complete: bool = False) -> None:
    """Refuse keyword arguments the constructor of ``cls`` does not take (Python's own error
    would be a bare ``TypeError`` naming ``__init__``, not a gradclip error).

    With ``complete`` (``from_config``'s settings): a ``*clippers`` parameter is
    named by its name, and a required one that is missing is refused too (``get`` fills the
    registry's defaults first).

    Raises:
        UnknownArgumentError: Naming the method, the bad keywords and the valid ones.
    """
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # after self
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    valid = [p.name for p in parameters if p.kind in kinds]
    valid += [] if "process_group" in valid else ["process_group"]
    where = "from_config" if complete else "gradclip.get"
    if complete:  # a config names a *clippers parameter (Chain's links) by its name
        valid += [p.name for p in parameters if p.kind is inspect.Parameter.VAR_POSITIONAL]
    unknown = [key for key in kwargs if key not in valid]
    if unknown:
        raise UnknownArgumentError(
            f"{where}: {name!r} ({cls.__qualname__}) has no argument{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; its arguments: {', '.join(valid)}"
        )
    missing = [p.name for p in parameters if p.kind in kinds and p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing and complete:
        raise InvalidArgumentError(
            f"{where}: {name!r} ({cls.__qualname__}) needs {', '.join(map(repr, missing))}; the config gives "
            f"{', '.join(map(repr, kwargs)) or 'nothing'}"
        )


def _decode(value: Any) -> Any:
    """A config value as the constructor takes it: nested clipper configs rebuilt, the strings
    ``"inf"``/``"-inf"`` of :func:`~gradclip._core.checkpoint.plain_config` as floats."""
    if isinstance(value, Mapping) and isinstance(value.get("clipper"), str) and set(value) <= {"clipper", "config"}:
        return from_config(value)
    if isinstance(value, list) and value and all(isinstance(v, Mapping) and "clipper" in v for v in value):
        return [from_config(v) for v in value]
    if value == "inf" or value == "-inf":
        return float(value)
    return value


def from_config(spec: Any):
    """Build a clipper from ``{"clipper": name, "config": {...}}`` (or a bare registry name).

    The inverse of ``{"clipper": c.name, "config": c.config()}``, recursively: wrapped clippers
    (``Chain`` links, ``Subset``'s clipper) are rebuilt the same way.

    Args:
        spec: The mapping, or a name (then the method's registry defaults apply).

    Returns:
        A new clipper instance.

    Raises:
        UnknownNameError: An unknown clipper name.
        InvalidArgumentError: ``spec`` is not of that form, or a constructor refuses a value.
    """
    if isinstance(spec, str):
        return get(spec)
    if not isinstance(spec, Mapping) or not isinstance(spec.get("clipper"), str):
        raise InvalidArgumentError(
            f"from_config: expected {{'clipper': name, 'config': {{...}}}} or a registry name, got {spec!r}"
        )
    config = spec.get("config") or {}
    if not isinstance(config, Mapping):
        raise InvalidArgumentError(f"from_config: clipper['config'] must be a mapping, got {config!r}")
    cls = registered_class(spec["clipper"])
    _check_keywords(spec["clipper"], cls, config, complete=True)
    arguments = {key: _decode(value) for key, value in config.items()}
    parameters = inspect.signature(cls.__init__).parameters.values()
    positional = next((p.name for p in parameters if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    if positional is not None:
        return cls(*arguments.pop(positional, ()), **arguments)
    return cls(**arguments)
