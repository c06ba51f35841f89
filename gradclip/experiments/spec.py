"""Clipper specifications on the command line: ``name[:key=value,key=value]``, chained with ``+``.

Examples: ``global_norm:max_norm=1.0``, ``value:min_value=-0.5,max_value=0.5``, ``zclip``, and
``none`` for training without clipping (the gradient norm is still measured).

A **chain** joins specs with ``+`` and applies them left to right as one clipper
(:func:`gradclip.chain`): ``zclip+skip_on_spike:sigma=3``,
``non_finite:policy=zero+global_norm:max_norm=1.0``. A link's parameters are separated by
``,``, so a ``+`` ends the link, with one exception: within a link's parameters, a ``+`` that
is part of a value stays in it. A ``+`` there starts the next link only when what follows is a
clipper name (followed by ``:``, ``+`` or the end), any name followed by ``:``, or nothing (an
empty link, refused), so ``global_norm:max_norm=1e+3`` and ``max_norm=+inf`` are single
clippers. ``none`` cannot be a link (a chain that clips nothing is no chain); a chain of one
link is that link.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any

from gradclip._core.errors import InvalidArgumentError, UnknownNameError
from gradclip._core.registry import available, get, registered_class
from gradclip.clippers.chain import chain

__all__ = ["CHAIN", "NONE", "ClipperSpec", "parse_spec", "split_links"]

#: The spec name meaning "no clipping".
NONE = "none"
#: The name of a chained spec (the registry name of :class:`~gradclip.clippers.chain.Chain`).
CHAIN = "chain"

# A name after a "+" inside a link's parameters, and what follows it (":", "+" or the end).
_NEXT_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_-]*)\s*(:|\+|$)")


@dataclass(frozen=True)
class ClipperSpec:
    """A parsed clipper specification.

    Attributes:
        text: The canonical text (``name:key=value,...`` with keys sorted; for a chain the
            links' canonical texts joined by ``+``), used as a label.
        name: The registry name, ``"none"``, or ``"chain"`` for a chain.
        kwargs: Constructor keyword arguments (empty for a chain: see ``links``).
        links: A chain's links, in order, each a single-clipper spec; empty for one clipper.
    """

    text: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    links: tuple[ClipperSpec, ...] = ()

    def build(self):
        """Construct the clipper: None for ``"none"``, a :class:`~gradclip.clippers.chain.Chain`
        of the links' clippers for a chain."""
        if self.links:
            return chain(*(link.build() for link in self.links))
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


def _starts_link(rest: str) -> bool:
    """Whether ``rest``, the text after a ``+`` inside a link's parameters, is the next link.

    Values may hold a ``+`` (``1e+3``, ``+inf``), so only text that cannot continue a value
    starts a link: nothing (an empty link, reported as such), a clipper name (or ``none``)
    followed by ``:``, ``+`` or the end, or any name followed by ``:`` (reported as unknown).
    """
    if not rest.strip() or rest.lstrip().startswith("+"):
        return True
    match = _NEXT_NAME.match(rest)
    if match is None:
        return False
    name, after = match.groups()
    return after == ":" or name.replace("-", "_") in (NONE, *available())


def split_links(text: str) -> list[str]:
    """Split a spec into its links' texts (one for a single clipper), stripped.

    In a link's name a ``+`` always separates (names hold none); in its parameters only where
    the next link begins: before nothing, a clipper name followed by ``:``, ``+`` or the end,
    or any name followed by ``:`` (``1e+3`` and ``+inf`` stay values).

    Args:
        text: The specification.

    Returns:
        The links' texts, in order; an empty string for an empty link (``zclip+``).
    """
    links, start, in_parameters = [], 0, False
    for position, char in enumerate(text):
        if char == ":" and not in_parameters:
            in_parameters = True
        elif char == "+" and (not in_parameters or _starts_link(text[position + 1:])):
            links.append(text[start:position].strip())
            start, in_parameters = position + 1, False
    links.append(text[start:].strip())
    return links


def parse_spec(text: str) -> ClipperSpec:
    """Parse ``name[:key=value,...]``, or links of that form joined by ``+`` (a chain), into a
    :class:`ClipperSpec`, checking it builds.

    Args:
        text: The specification.

    Returns:
        The parsed spec; for a chain, its ``links`` hold each link's spec.

    Raises:
        UnknownNameError: Unknown clipper name (the message lists the valid ones), or a
            parameter the clipper does not take (the message lists the ones it does); in a
            chain the message names the link.
        InvalidArgumentError: Malformed text, a parameter given twice, a value the clipper
            rejects (the message names the parameter and its expected type), or in a chain an
            empty link or ``none``.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgumentError(f"clipper spec must be a non-empty string like 'global_norm:max_norm=1.0', got {text!r}")
    texts = split_links(text.strip())
    if len(texts) == 1:
        return _parse_one(texts[0], f"clipper spec {text!r}")
    links = []
    for number, link in enumerate(texts, start=1):
        where = f"clipper spec {text!r}, link {number} {link!r}"
        if not link:
            raise InvalidArgumentError(
                f"clipper spec {text!r}: link {number} is empty; join clippers with '+' as in "
                "'zclip+skip_on_spike:sigma=3'"
            )
        parsed = _parse_one(link, where)
        if parsed.name == NONE:
            raise InvalidArgumentError(
                f"{where}: 'none' cannot be a link of a chain (it clips nothing); leave it out, or "
                "compare 'none' as a clipper of its own"
            )
        links.append(parsed)
    return ClipperSpec("+".join(link.text for link in links), CHAIN, {}, tuple(links))


def _parse_one(text: str, where: str) -> ClipperSpec:
    """Parse one clipper's ``name[:key=value,...]``; ``where`` opens every error message."""
    name, _, rest = text.strip().partition(":")
    name = name.strip().replace("-", "_")
    if name == NONE:
        if rest.strip():
            raise InvalidArgumentError(f"{where}: 'none' takes no parameters")
        return ClipperSpec(NONE, NONE, {})
    if name not in available():
        raise UnknownNameError(
            f"{where}: unknown clipper {name!r}; valid names: {', '.join(dict.fromkeys([NONE, *available()]))}"
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
            raise InvalidArgumentError(f"{where}: expected key=value, got {item!r}")
        if key not in parameters:
            raise UnknownNameError(
                f"{where}: {name} has no parameter {key!r}; its parameters: {', '.join(parameters) or '(none)'}"
            )
        if key in kwargs:
            # Silently keeping the last value would run another clipper than one of those typed.
            raise InvalidArgumentError(f"{where}: {key} is given twice; give each parameter once")
        kwargs[key] = _parse_value(raw)
    try:
        get(name, **kwargs)  # the constructor validates every value
    except (InvalidArgumentError, TypeError) as error:
        hints = "; ".join(f"{k} expects {_expected_type(parameters[k])}" for k in kwargs)
        raise InvalidArgumentError(f"{where}: {error} ({hints})") from error
    canonical = name + (":" + ",".join(f"{k}={_format(v)}" for k, v in sorted(kwargs.items())) if kwargs else "")
    return ClipperSpec(canonical, name, kwargs)


def _format(value: Any) -> str:
    if isinstance(value, tuple):
        return "|".join(str(v) for v in value)
    return str(value)
