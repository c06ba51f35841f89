"""The checkpoint format of every clipper: a header, the configuration and the state as plain data.

``state_dict()`` returns ``{"format": "gradclip", "version": 1, "clipper": name, "config": {...},
"state": {...} or None}`` holding only dicts, lists, strings, numbers, bools and None, so it passes
strict JSON and ``torch.load(weights_only=True)``. Everything here is generic over the clipper's
declared ``state_type`` and ``state_dtypes``: a field whose dtype is :data:`CHILD` holds the
checkpoint of the one clipper this one wraps (``Subset``), a field of dtype :data:`CHILDREN` the
list of checkpoints of the clippers it wraps, in order (``Chain``), so each wrapped clipper
validates its own part and no composite writes its own checkpoint code.

Loading validates everything before anything changes: the header, exact keys, each field's
dtype and range, and the clipper's own invariants (``Clipper.validate_state``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gradclip._core.errors import StateError
from gradclip._core.ops import framework_of, get_ops, largest_finite

if TYPE_CHECKING:  # the Clipper type only annotates; clipper.py imports this module
    from gradclip._core.clipper import Clipper

__all__ = [
    "CHILD",
    "CHILDREN",
    "HEADER_KEYS",
    "STATE_FORMAT_VERSION",
    "check_header",
    "check_keys",
    "checkpoint",
    "plain_config",
    "state_from_plain",
    "state_to_plain",
    "validate_checkpoint",
    "validate_plain",
]

#: Version of the ``state_dict`` schema; bumped whenever its layout changes.
STATE_FORMAT_VERSION = 1

#: ``state_dtypes`` entry of a field holding the state of ``clipper.children()[0]``.
CHILD = "clipper"
#: ``state_dtypes`` entry of a field holding a tuple: the states of ``clipper.children()``.
CHILDREN = "clippers"

#: The top-level keys of every checkpoint, no more and no fewer.
HEADER_KEYS = frozenset({"format", "version", "clipper", "config", "state"})


def plain_config(value: Any) -> Any:
    """A clipper's :meth:`~Clipper.config` as strict-JSON data.

    ``float("inf")`` is a valid argument value (``norm_type=inf``, a one-sided ``Value``
    range) but not valid JSON: ``json.dumps(..., allow_nan=False)`` refuses it and other JSON
    readers choke on the ``Infinity`` token Python writes by default. ±inf become the strings
    ``"inf"``/``"-inf"`` and tuples become lists (what a JSON round trip gives back anyway).
    A config holding float inf and one holding the strings normalise to the same data.
    """
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, Mapping):
        return {key: plain_config(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(item) for item in value]
    return value


def check_keys(where: str, mapping: Mapping[str, Any], expected: frozenset[str], what: str) -> None:
    """Refuse a checkpoint mapping whose keys are not exactly ``expected``.

    Raises:
        StateError: Naming the unexpected and the missing keys.
    """
    keys = set(mapping)
    if keys != expected:
        unexpected = sorted(map(repr, keys - expected))
        missing = sorted(expected - keys)
        raise StateError(
            f"{where}: {what} has exactly the keys {sorted(expected)}; "
            f"unexpected: {', '.join(unexpected) or 'none'}; missing: {', '.join(missing) or 'none'}"
        )


def check_header(where: str, state_dict: Any, name: str, config: Mapping[str, Any]) -> None:
    """Validate everything of a checkpoint but its ``state``; raise before anything changes.

    Args:
        where: ``"Class.load_state_dict"``, for the message.
        state_dict: What the caller passed.
        name: The loading clipper's registry name.
        config: The loading clipper's :meth:`~Clipper.config`.

    Raises:
        StateError: Not a mapping, unexpected or missing top-level keys, a format other than
            ``"gradclip"``, a version that is not the int :data:`STATE_FORMAT_VERSION` (``True``
            and ``1.0`` compare equal to 1 in Python, and are refused), another clipper's name,
            or another configuration.
    """
    if not isinstance(state_dict, Mapping):
        raise StateError(f"{where}: expected a mapping from state_dict(), got {type(state_dict).__name__}")
    check_keys(where, state_dict, HEADER_KEYS, "a checkpoint")
    version = state_dict["version"]
    if state_dict["format"] != "gradclip" or type(version) is not int or version != STATE_FORMAT_VERSION:
        raise StateError(
            f"{where}: not a gradclip state (format={state_dict['format']!r}, version={version!r} of "
            f"type {type(version).__name__}; expected format 'gradclip' and the int {STATE_FORMAT_VERSION})"
        )
    if state_dict["clipper"] != name:
        raise StateError(f"{where}: state belongs to clipper {state_dict['clipper']!r}, not {name!r}")
    if plain_config(state_dict["config"]) != plain_config(config):
        raise StateError(
            f"{where}: state was saved with config {state_dict['config']!r}, but this "
            f"clipper has {plain_config(config)!r}"
        )


#: The range of each integer dtype a state field may be stored in.
_INT_RANGE = {"int64": (-(2**63), 2**63 - 1), "int32": (-(2**31), 2**31 - 1)}


def _check_plain(where: str, name: str, value: Any, dtype: str | None = None) -> None:
    """Accept only numbers, bools and (nested) lists of them, of the field's declared dtype:
    nothing that could run code, and nothing its array would silently change.

    ``dtype`` is the field's entry in ``state_dtypes``: ``"bool"`` fields take bools only,
    integer fields ints (not bools) within the dtype's range, float fields ints or floats (not
    bools) whose magnitude the dtype holds (1e300 would become inf in fp32). NaN and inf pass
    here; methods that need finite values refuse them in ``_validate_state``.
    """
    if isinstance(value, list):
        for item in value:
            _check_plain(where, name, item, dtype)
        return
    if not isinstance(value, (bool, int, float)):
        raise StateError(
            f"{where}: state field {name!r} must hold numbers or lists of numbers, got {type(value).__name__}"
        )
    if dtype is None:
        return
    if dtype == "bool":
        ok = isinstance(value, bool)
    elif dtype in _INT_RANGE:
        low, high = _INT_RANGE[dtype]
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    else:
        limit = largest_finite(dtype)
        if isinstance(value, bool):
            ok = False
        elif isinstance(value, int):  # exact: math.isfinite(10**400) would overflow
            ok = abs(value) <= limit
        else:
            ok = not math.isfinite(value) or abs(value) <= limit
    if not ok:
        raise StateError(
            f"{where}: state field {name!r} is stored as {dtype}, which cannot hold {value!r} "
            f"of type {type(value).__name__}"
        )


def checkpoint(clipper: Clipper, plain_state: Any) -> dict[str, Any]:
    """The full checkpoint of ``clipper`` around its plain state (None before the first step)."""
    return {
        "format": "gradclip",
        "version": STATE_FORMAT_VERSION,
        "clipper": clipper.name,
        "config": plain_config(clipper.config()),
        "state": plain_state,
    }


def _to_plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float)):
        return value
    # The backend by type alone: 0-d NumPy arithmetic yields NumPy scalars, which are not arrays
    # a backend would be built for, but whose framework is known.
    ops = get_ops([], framework=framework_of(value), where="state_dict")
    return ops.to_list(value)


def state_to_plain(clipper: Clipper, state: Any) -> dict[str, Any] | None:
    """``state`` (a NamedTuple of arrays of any backend) as plain data, recursively.

    Returns:
        ``{field: value}`` with nested lists for arrays and full checkpoints for the states of
        wrapped clippers; None when ``state`` is None.
    """
    if state is None:
        return None
    out: dict[str, Any] = {}
    children = clipper.children()
    for name in clipper.state_type._fields:
        kind = clipper.state_dtypes.get(name)
        value = getattr(state, name)
        if kind == CHILD:
            out[name] = checkpoint(children[0], state_to_plain(children[0], value))
        elif kind == CHILDREN:
            out[name] = [checkpoint(child, state_to_plain(child, part)) for child, part in zip(children, value)]
        else:
            out[name] = _to_plain(value)
    return out


def state_from_plain(clipper: Clipper, ops: Any, plain: Mapping[str, Any], grads: list[Any]) -> Any:
    """Rebuild a state NamedTuple on ``ops``' device from validated plain data.

    A wrapped clipper's checkpoint whose state is None (saved before its first step) gives its
    initial state for ``grads``.
    """
    children = clipper.children()

    def child_state(child: Clipper, saved: Mapping[str, Any]) -> Any:
        inner = saved.get("state")
        return child.init_state(ops, grads) if inner is None else state_from_plain(child, ops, inner, grads)

    fields = {}
    for name in clipper.state_type._fields:
        kind = clipper.state_dtypes.get(name)
        if kind == CHILD:
            fields[name] = child_state(children[0], plain[name])
        elif kind == CHILDREN:
            fields[name] = tuple(child_state(c, p) for c, p in zip(children, plain[name]))
        else:
            fields[name] = ops.array(plain[name], clipper.state_dtypes[name])
    return clipper.state_type(**fields)


def validate_plain(clipper: Clipper, where: str, plain: Any) -> None:
    """Check plain state completely: exact fields, dtypes and ranges, wrapped clippers' parts
    (each by its own rules), then the clipper's own invariants.

    Raises:
        StateError: Naming the field and what was wrong.
    """
    fields = clipper.state_type._fields
    if not isinstance(plain, Mapping) or set(plain) != set(fields):
        raise StateError(
            f"{where}: state fields must be {sorted(fields)}, got "
            f"{sorted(map(str, plain)) if isinstance(plain, Mapping) else type(plain).__name__}"
        )
    children = clipper.children()
    for name in fields:
        kind = clipper.state_dtypes.get(name)
        if kind == CHILD:
            validate_checkpoint(children[0], plain[name])
        elif kind == CHILDREN:
            parts = plain[name]
            if not isinstance(parts, list) or len(parts) != len(children):
                raise StateError(
                    f"{where}: expected {len(children)} link states under state[{name!r}], got "
                    f"{len(parts) if isinstance(parts, list) else type(parts).__name__}"
                )
            for child, part in zip(children, parts):
                validate_checkpoint(child, part)
        else:
            _check_plain(where, name, plain[name], clipper.state_dtypes.get(name))
    clipper.validate_state(where, plain)


def validate_checkpoint(clipper: Clipper, state_dict: Any) -> None:
    """Validate a whole checkpoint for ``clipper`` (header and state); change nothing.

    Raises:
        StateError: From :func:`check_header` or :func:`validate_plain`.
    """
    where = f"{type(clipper).__name__}.load_state_dict"
    check_header(where, state_dict, clipper.name, clipper.config())
    if state_dict["state"] is not None:
        validate_plain(clipper, where, state_dict["state"])
