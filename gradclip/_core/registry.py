"""The registry of clipping methods: one name per class, one place the CLI and tests read.

Names are the class names in snake case as written in API.md (``global_norm``, ``zclip``...).
``get(name)`` with no keyword arguments builds a usable default for every method: each class
declares its own ``defaults`` for the arguments that have no default in its signature.
"""

from __future__ import annotations

import importlib
from typing import Any

from gradclip._core.errors import InvalidArgumentError, UnknownNameError

__all__ = ["register", "get", "available", "registered_class"]

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator adding a clipper class to the registry under ``name``.

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
        return cls

    return decorate


def _load_all() -> None:
    # Importing the clippers package registers every built-in method.
    importlib.import_module("gradclip.clippers")


def available() -> list[str]:
    """Return the registered method names, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def registered_class(name: str) -> type:
    """Return the class registered under ``name``.

    Raises:
        UnknownNameError: The name is not registered; the message lists every valid name.
    """
    _load_all()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownNameError(
            f"gradclip.get: unknown clipper name {name!r}; valid names: {', '.join(sorted(_REGISTRY))}"
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
        UnknownNameError: Unknown name (lists the valid ones).
        InvalidArgumentError: A bad argument value (from the constructor).
    """
    cls = registered_class(name)
    # Every clipper takes a process group (torch.distributed), whatever its signature.
    group = kwargs.pop("process_group", None)
    clipper = cls(**cls.with_defaults(kwargs))
    if group is not None:
        clipper.process_group = group
    return clipper
