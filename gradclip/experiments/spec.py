"""Clipper specifications on the command line: ``name[:key=value,key=value]``.

Examples: ``global_norm:max_norm=1.0``, ``value:min_value=-0.5,max_value=0.5``, ``zclip``, and
``none`` for training without clipping (the gradient norm is still measured).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

from gradclip._core.errors import InvalidArgumentError, UnknownNameError
from gradclip._core.registry import available, get, registered_class

__all__ = ["ClipperSpec", "parse_spec", "NONE"]

#: The spec name meaning "no clipping".
NONE = "none"


@dataclass(frozen=True)
class ClipperSpec:
    """A parsed clipper specification.

    Attributes:
        text: The canonical text (``name:key=value,...`` with keys sorted), used as a label.
        name: The registry name, or ``"none"``.
        kwargs: Constructor keyword arguments.
    """

    text: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self):
        """Construct the clipper (None for ``"none"``)."""
        if self.name == NONE:
            return None
        return get(self.name, **self.kwargs)


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("inf", "+inf", "-inf"):
        return -math.inf if lowered.startswith("-") else math.inf
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if "|" in text:  # tuples, e.g. exclude=fc.weight|head.weight
        return tuple(part for part in text.split("|") if part)
    return text.strip()


def _expected_type(parameter: inspect.Parameter) -> str:
    annotation = parameter.annotation
    if annotation is not inspect.Parameter.empty:
        return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    if parameter.default is not inspect.Parameter.empty and parameter.default is not None:
        return type(parameter.default).__name__
    return "a value"


def parse_spec(text: str) -> ClipperSpec:
    """Parse ``name[:key=value,...]`` into a :class:`ClipperSpec`, checking it builds.

    Args:
        text: The specification.

    Returns:
        The parsed spec.

    Raises:
        UnknownNameError: Unknown clipper name (the message lists the valid ones), or a
            parameter the clipper does not take (the message lists the ones it does).
        InvalidArgumentError: Malformed text, or a value the clipper rejects (the message names
            the parameter and its expected type).
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgumentError(f"clipper spec must be a non-empty string like 'global_norm:max_norm=1.0', got {text!r}")
    name, _, rest = text.strip().partition(":")
    name = name.strip().replace("-", "_")
    if name == NONE:
        if rest.strip():
            raise InvalidArgumentError(f"clipper spec {text!r}: 'none' takes no parameters")
        return ClipperSpec(NONE, NONE, {})
    if name not in available():
        raise UnknownNameError(
            f"unknown clipper {name!r} in spec {text!r}; valid names: {', '.join(dict.fromkeys([NONE, *available()]))}"
        )
    cls = registered_class(name)
    parameters = {
        p.name: p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, raw = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise InvalidArgumentError(f"clipper spec {text!r}: expected key=value, got {item!r}")
        if key not in parameters:
            raise UnknownNameError(
                f"clipper spec {text!r}: {name} has no parameter {key!r}; its parameters: "
                f"{', '.join(parameters) or '(none)'}"
            )
        kwargs[key] = _parse_value(raw)
    try:
        get(name, **kwargs)  # the constructor validates every value
    except (InvalidArgumentError, TypeError) as error:
        hints = "; ".join(f"{k} expects {_expected_type(parameters[k])}" for k in kwargs)
        raise InvalidArgumentError(f"clipper spec {text!r}: {error} ({hints})") from error
    canonical = name + (":" + ",".join(f"{k}={_format(v)}" for k, v in sorted(kwargs.items())) if kwargs else "")
    return ClipperSpec(canonical, name, kwargs)


def _format(value: Any) -> str:
    if isinstance(value, tuple):
        return "|".join(str(v) for v in value)
    return str(value)
