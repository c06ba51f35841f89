"""Safe loading: checkpoints are plain data of one schema; nothing gradclip loads can run code.

* ``load_state_dict`` accepts exactly ``{format, version, clipper, config, state}``: the version
  is the int 1 (not ``True``, ``1.0`` or ``"1"``), no key more or less, state fields of their
  declared dtype and range (no bool for a count, no int beyond int64, no 1e300 for an fp32
  value). Anything else is a :class:`gradclip.StateError`, and the clipper keeps its state —
  checked on every stateful registered clipper, on chains and on Subset, and for arbitrary
  JSON-like garbage (hypothesis).
* ``state_dict()`` passes strict JSON (``allow_nan=False``) even when the configuration holds an
  infinite argument (``norm_type=inf``, a one-sided ``Value``); older checkpoints that wrote the
  float still load. Checkpoints load with ``torch.load(weights_only=True)``.
* The package source uses no pickle, marshal, shelve, eval or exec; every ``torch.load`` in it
  passes ``weights_only=True``.
* Integer (and bool, complex) gradients are refused on every backend with a TypeError-based
  :class:`gradclip.BackendError` naming the position and the dtype; nothing is changed.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradclip
from _frameworks import BACKENDS
from test_conformance import make_clipper, need

PACKAGE = pathlib.Path(gradclip.__file__).resolve().parent
STATEFUL = [name for name in gradclip.available() if make_clipper(name).keeps_state]


def _advanced(name_or_clipper, steps: int = 3):
    clipper = make_clipper(name_or_clipper) if isinstance(name_or_clipper, str) else name_or_clipper
    rng = np.random.default_rng(0)
    params = [rng.normal(size=(4, 3)), rng.normal(size=(3,))]
    for step in range(steps):
        clipper.clip([rng.normal(size=p.shape) * (1 + step) for p in params], params=params)
    return clipper


def _compositions():
    return {
        "chain": gradclip.chain(gradclip.NonFinite("zero"), gradclip.AutoClip(history=4), gradclip.GlobalNorm(2.0)),
        "subset": gradclip.Subset(gradclip.ZClip(warmup_steps=2), 0.5, seed=3),
    }


def _all_subjects():
    subjects = {name: _advanced(name) for name in STATEFUL}
    subjects.update({name: _advanced(clipper) for name, clipper in _compositions().items()})
    return subjects


def _assert_rejected(clipper, bad, label=""):
    before = json.dumps(clipper.state_dict(), sort_keys=True)
    with pytest.raises(gradclip.StateError):
        clipper.load_state_dict(bad)
    assert json.dumps(clipper.state_dict(), sort_keys=True) == before, f"{label}: the state changed"


# -- the header ---------------------------------------------------------------------------------
BAD_VERSIONS = [True, 1.0, "1", 2, 0, -1, None, [1], 1 + 0j]


@pytest.mark.parametrize("name", STATEFUL + ["chain", "subset", "global_norm"])
def test_version_must_be_the_int_one(name):
    clipper = _advanced(_compositions()[name] if name in ("chain", "subset") else name)
    saved = clipper.state_dict()
    assert type(saved["version"]) is int
    for version in BAD_VERSIONS:
        _assert_rejected(clipper, {**copy.deepcopy(saved), "version": version}, f"version={version!r}")
    clipper.load_state_dict(saved)  # the genuine one still loads


@pytest.mark.parametrize("name", STATEFUL + ["chain", "subset", "global_norm"])
def test_top_level_keys_are_exactly_the_schema(name):
    clipper = _advanced(_compositions()[name] if name in ("chain", "subset") else name)
    saved = clipper.state_dict()
    assert set(saved) == {"format", "version", "clipper", "config", "state"}
    _assert_rejected(clipper, {**copy.deepcopy(saved), "extra": 1}, "extra key")
    _assert_rejected(clipper, {**copy.deepcopy(saved), "__reduce__": "os.system"}, "dunder key")
    for key in saved:
        _assert_rejected(clipper, {k: v for k, v in copy.deepcopy(saved).items() if k != key}, f"without {key}")


def test_the_message_names_what_is_wrong():
    clipper = _advanced("autoclip")
    saved = clipper.state_dict()
    with pytest.raises(gradclip.StateError, match=r"version=True of type bool; expected .* the int 1"):
        clipper.load_state_dict({**saved, "version": True})
    with pytest.raises(gradclip.StateError, match=r"unexpected: 'extra'; missing: none"):
        clipper.load_state_dict({**saved, "extra": 0})
    with pytest.raises(gradclip.StateError, match=r"'count' is stored as int64, which cannot hold True"):
        clipper.load_state_dict({**saved, "state": {**saved["state"], "count": True}})


# -- state fields of their declared dtype ---------------------------------------------------------
def _dtype_violations(dtype: str):
    """Values a field of ``dtype`` must refuse (each an ordinary JSON/pickle-free value)."""
    if dtype == "bool":
        return [1, 0.0]
    if dtype.startswith("int"):
        return [True, 2**63, -(2**63) - 1, 1.0]
    return [True, 1e300, 10**400]


@pytest.mark.parametrize("name", [n for n in STATEFUL if n != "subset"])
def test_state_fields_refuse_values_their_dtype_cannot_hold(name):
    clipper = _advanced(name)
    saved = clipper.state_dict()
    count = 0
    for field, dtype in clipper.state_dtypes.items():
        value = saved["state"][field]
        for bad_item in _dtype_violations(dtype):
            bad = copy.deepcopy(saved)
            bad["state"][field] = [bad_item] + value[1:] if isinstance(value, list) and value else bad_item
            _assert_rejected(clipper, bad, f"{field}={bad_item!r}")
            count += 1
    assert count >= 3


def test_subset_counters_refuse_values_beyond_int64():
    clipper = _advanced(_compositions()["subset"])
    saved = clipper.state_dict()
    for field, bad in (("step", 2**63), ("key", 2**62), ("step", True), ("key", -1)):
        _assert_rejected(clipper, {**saved, "state": {**saved["state"], field: bad}}, f"{field}={bad!r}")


# -- arbitrary garbage ------------------------------------------------------------------------------
class _Exploit:
    """Stands for an object a pickle could smuggle in; loading must refuse it, not call it."""

    def __reduce__(self):
        return (print, ("this must never run",))


_SUBJECTS = _all_subjects()

json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(where=st.sampled_from(["whole", "state", "field", "config"]), garbage=json_like, which=st.integers(0, 100))
def test_garbage_is_refused_with_state_error_and_changes_nothing(where, garbage, which):
    name = sorted(_SUBJECTS)[which % len(_SUBJECTS)]
    clipper = _SUBJECTS[name]
    saved = clipper.state_dict()
    if where == "whole":
        bad = garbage
    elif where == "config":
        bad = {**saved, "config": garbage}
    elif where == "state":
        bad = {**saved, "state": garbage}
    else:
        fields = dict(saved["state"])
        fields[sorted(fields)[which % len(fields)]] = garbage
        bad = {**saved, "state": fields}
    before = json.dumps(saved, sort_keys=True)
    try:
        clipper.load_state_dict(bad)
    except gradclip.StateError:
        assert json.dumps(clipper.state_dict(), sort_keys=True) == before
    else:
        # Garbage that happens to be a valid checkpoint (e.g. a None state) is loaded as such;
        # then the clipper must still work and checkpoint plain data.
        _advanced(clipper, 1)
        json.dumps(clipper.state_dict(), allow_nan=False)
        clipper.load_state_dict(copy.deepcopy(saved))



@pytest.mark.parametrize("name", sorted(_SUBJECTS))
def test_objects_are_refused_without_being_called(name, capsys):
    clipper = _SUBJECTS[name]
    saved = clipper.state_dict()
    for bad in (_Exploit(), {**saved, "state": _Exploit()}, {**saved, "config": _Exploit()},
                {**saved, "state": {k: _Exploit() for k in saved["state"]}}):
        _assert_rejected(clipper, bad, name)
    assert "must never run" not in capsys.readouterr().out


# -- strict JSON, including infinite configuration values --------------------------------------------
INFINITE_CONFIGS = {
    "global_norm-p-inf": lambda: gradclip.GlobalNorm(1.0, norm_type=math.inf),
    "global_norm-max-inf": lambda: gradclip.GlobalNorm(math.inf),
    "norm-p-inf": lambda: gradclip.Norm(0.5, norm_type="inf"),
    "value-one-sided": lambda: gradclip.Value(-math.inf, 0.5),
    "subset-of-one-sided": lambda: gradclip.Subset(gradclip.Value(0.0, math.inf), 0.5, seed=1),
    "chain-with-inf": lambda: gradclip.chain(gradclip.NonFinite("zero"), gradclip.GlobalNorm(2.0, norm_type=math.inf)),
}


@pytest.mark.parametrize("name", list(INFINITE_CONFIGS))
def test_state_dict_with_infinite_config_is_strict_json(name):
    clipper = _advanced(INFINITE_CONFIGS[name]())
    saved = clipper.state_dict()
    text = json.dumps(saved, allow_nan=False)  # raises ValueError on inf/NaN anywhere
    assert '"inf"' in text or '"-inf"' in text
    fresh = INFINITE_CONFIGS[name]()
    fresh.load_state_dict(json.loads(text))
    assert fresh.state_dict() == saved
    assert math.inf in fresh.config().values() or -math.inf in fresh.config().values() or name.startswith(("subset", "chain"))
    # A checkpoint written before the encoding (float inf in the config) still loads.
    old = json.loads(json.dumps(saved).replace('"inf"', "Infinity").replace('"-inf"', "-Infinity"))
    INFINITE_CONFIGS[name]().load_state_dict(old)
    # And a different infinite argument is still a different configuration.
    other = gradclip.GlobalNorm(1.0, norm_type=2.0).state_dict() if name.startswith("global_norm-p") else None
    if other is not None:
        _assert_rejected(fresh, {**saved, "config": other["config"]}, name)


@pytest.mark.parametrize("name", STATEFUL)
def test_checkpoints_load_with_torch_weights_only(name, tmp_path):
    torch = pytest.importorskip("torch")
    clipper = _advanced(name)
    torch.save({"clipper": clipper.state_dict()}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["clipper"]
    fresh = make_clipper(name)
    fresh.load_state_dict(loaded)
    assert fresh.state_dict() == clipper.state_dict()


# -- nothing in the package can execute data -----------------------------------------------------------
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
FORBIDDEN_CALLS = {"eval", "exec", "compile"}
#: (file, call) pairs that load code on purpose, with the reason.
ALLOWED = {
    # The backend module for a framework name taken from a fixed table, not from data.
    ("_core/ops.py", "__import__"),
    # `gradclip bench` loads timm's own agc.py by file path (the reference it is timed against);
    # importing timm itself pulls in torchvision. Not a gradclip format.
    ("bench/workloads.py", "exec_module"),
    # `gradclip compare --task path/to/file.py:factory` runs the user's own task file, as
    # `python file.py` would: code the user named on the command line, never data gradclip reads.
    ("experiments/loading.py", "exec"),
    ("experiments/loading.py", "compile"),
    # `--task package.module:factory`: the module the user named, imported as Python would.
    ("experiments/loading.py", "import_module"),
}
#: (file, module) pairs that import a forbidden module on purpose, with the reason.
ALLOWED_IMPORTS = {
    # pickle.dumps only: it tells, before worker processes start, whether a task object passed
    # from Python can be sent to them (a clear error instead of a pool failure). Nothing is ever
    # unpickled there; the check below keeps it so.
    ("experiments/loading.py", "pickle"),
}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """What each imported name stands for: ``{"t": "torch", "np": "numpy", "load": "torch.load",
    "import_module": "importlib.import_module"}`` for ``import torch as t``, ``import numpy as
    np``, ``from torch import load``, ``from importlib import import_module``."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:  # `import a.b` binds `a`
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _qualified(func: ast.expr, aliases: dict[str, str]) -> str:
    """The dotted name a call's function resolves to through the imports (``t.load`` with
    ``import torch as t`` is ``torch.load``); a bare name not imported stays as it is."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return ""
    parts.append(aliases.get(func.id, func.id))
    return ".".join(reversed(parts))


def _violations(path: pathlib.Path, root: pathlib.Path = PACKAGE) -> list[str]:
    relative = path.relative_to(root).as_posix()
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        else:
            names = []
        found += [
            f"{relative}:{node.lineno}: imports {n}"
            for n in names
            if n in FORBIDDEN_MODULES and (relative, n) not in ALLOWED_IMPORTS
        ]
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            # An allowed import may only serialise: any loading function of it is refused.
            module = aliases.get(node.value.id, node.value.id)
            if module in FORBIDDEN_MODULES and node.attr.startswith("load"):
                found.append(f"{relative}:{node.lineno}: calls {module}.{node.attr}")
        if not isinstance(node, ast.Call):
            continue
        called = _qualified(node.func, aliases)
        short = called.rsplit(".", 1)[-1]
        keywords = {k.arg: k.value for k in node.keywords}  # **kwargs appear under None
        # Builtins by bare name (or builtins.eval); re.compile and the like are not builtins.
        builtin = called in FORBIDDEN_CALLS | {"__import__"} or called.startswith("builtins.")
        if (builtin and short in FORBIDDEN_CALLS) or short == "exec_module":
            if (relative, short) not in ALLOWED:
                found.append(f"{relative}:{node.lineno}: calls {short}")
        if called in ("__import__", "builtins.__import__", "importlib.import_module"):
            # An import by name: a forbidden module by its literal name, or a name computed at run
            # time (reviewed case by case in ALLOWED).
            target = node.args[0] if node.args else keywords.get("name")
            if isinstance(target, ast.Constant) and isinstance(target.value, str):
                if target.value.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"{relative}:{node.lineno}: imports {target.value} through {called}")
            elif (relative, short) not in ALLOWED:
                found.append(f"{relative}:{node.lineno}: imports a computed module name through {called}")
        if called == "torch.load":
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{relative}:{node.lineno}: torch.load without weights_only=True")
        if called == "numpy.load" and ("allow_pickle" in keywords or None in keywords or len(node.args) >= 3):
            # allow_pickle is np.load's third parameter; **kwargs may carry it unseen.
            found.append(f"{relative}:{node.lineno}: numpy.load with allow_pickle (or arguments that may set it)")
        if called in ("yaml.load", "yaml.unsafe_load"):
            found.append(f"{relative}:{node.lineno}: {called}")
    return found


def test_package_source_has_no_pickle_marshal_eval_or_exec():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20 and any(f.name == "clipper.py" for f in files)
    violations = [v for path in files for v in _violations(path)]
    assert violations == [], "\n".join(violations)


#: One forbidden use per line, each of which the scanner must report (line number -> what).
BAD_SOURCE = {
    "import pickle": "imports pickle",
    "from marshal import loads": "imports marshal",
    "eval('1')": "calls eval",
    "exec('x = 1')": "calls exec",
    "builtins.compile('1', 'f', 'eval')": "calls compile",
    "torch.load('f')": "torch.load without weights_only=True",
    "torch.load('f', weights_only=False)": "torch.load without weights_only=True",
    "torch.load('f', **options)": "torch.load without weights_only=True",
    "t.load('f')": "torch.load without weights_only=True",
    "load('f')": "torch.load without weights_only=True",
    "loader('f', weights_only=None)": "torch.load without weights_only=True",
    "np.load('f', allow_pickle=True)": "numpy.load with allow_pickle",
    "np.load('f', **options)": "numpy.load with allow_pickle",
    "np.load('f', None, True)": "numpy.load with allow_pickle",
    "npload('f', allow_pickle=True)": "numpy.load with allow_pickle",
    "importlib.import_module('pickle')": "imports pickle through importlib.import_module",
    "import_module('cloudpickle.cloudpickle')": "imports cloudpickle.cloudpickle through importlib.import_module",
    "importlib.import_module(name)": "imports a computed module name",
    "__import__('marshal')": "imports marshal through __import__",
    "yaml.load(text)": "yaml.load",
    "spec.loader.exec_module(module)": "calls exec_module",
}
#: Uses that look alike but are safe: none may be reported.
GOOD_SOURCE = [
    "import torch, numpy as np, re, importlib, builtins, yaml",
    "import torch as t",
    "from torch import load",
    "from torch import load as loader",
    "from numpy import load as npload",
    "from importlib import import_module",
    "re.compile('fine')",
    "torch.load('f', weights_only=True)",
    "t.load('f', weights_only=True, **options)",
    "np.load('f')",
    "np.load('f', None)",
    "held.load(state)",
    "json.load(stream)",
    "importlib.import_module('gradclip.clippers')",
    "yaml.safe_load(text)",
]


def test_the_scanner_catches_what_it_looks_for(tmp_path):
    """The scan is not vacuous: each forbidden use is reported, on its own line and for the
    reason it is forbidden (aliases, ``from`` imports, ``**kwargs`` and importlib included),
    and none of the look-alike safe uses is."""
    good = tmp_path / "good.py"
    good.write_text("\n".join(GOOD_SOURCE) + "\n")
    assert _violations(good, root=tmp_path) == []
    bad = tmp_path / "bad.py"
    bad.write_text("\n".join(GOOD_SOURCE + list(BAD_SOURCE)) + "\n")
    found = _violations(bad, root=tmp_path)
    offset = len(GOOD_SOURCE) + 1
    by_line: dict[int, list[str]] = {}
    for violation in found:
        _, line, message = violation.split(":", 2)
        by_line.setdefault(int(line), []).append(message.strip())
    for number, (source, reason) in enumerate(BAD_SOURCE.items(), start=offset):
        assert any(reason in message for message in by_line.pop(number, [])), f"not reported: {source!r} ({reason})"
    assert by_line == {}, f"reported more than expected: {by_line}"


# -- integer gradients ----------------------------------------------------------------------------------
def _integers(backend: str, dtype: str = "int64"):
    values = (np.arange(6) % 2).astype(dtype).reshape(2, 3)
    if backend == "numpy":
        return values
    if backend == "torch":
        import torch

        return torch.from_numpy(values)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.constant(values)
    import jax.numpy as jnp

    return jnp.asarray(values)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["int64", "int32", "bool"])
def test_integer_gradients_are_a_clear_type_error(backend, dtype):
    need(backend)
    floats = np.ones((3,), np.float32) * 5
    if backend != "numpy":
        from _frameworks import convert

        floats = convert(backend, floats.astype(np.float64), "float32")
    integers = _integers(backend, dtype)
    clipper = _advanced("zclip")
    before = json.dumps(clipper.state_dict(), sort_keys=True)
    calls = {
        "clip": lambda: clipper.clip([floats, integers]),
        "update": lambda: clipper.update([floats, integers], clipper.init([floats])),
        "global_norm": lambda: gradclip.global_norm([floats, integers]),
        "clip_by_global_norm": lambda: gradclip.clip_by_global_norm([floats, integers], 1.0),
    }
    for label, call in calls.items():
        with pytest.raises(gradclip.BackendError, match=r"gradient #1 has dtype .*(int|bool).* not floating point") as caught:
            call()
        assert isinstance(caught.value, TypeError), label
        assert "float16, bfloat16, float32 or float64" in str(caught.value), label
    assert json.dumps(clipper.state_dict(), sort_keys=True) == before


def test_integer_numpy_gradients_in_place_are_untouched():
    grads = [np.full((3,), 7.0), np.array([3, 4, 12])]
    clipper = gradclip.GlobalNorm(1.0)
    with pytest.raises(gradclip.BackendError, match="gradient #1 has dtype int64"):
        clipper.clip_(grads)
    np.testing.assert_array_equal(grads[0], np.full((3,), 7.0))
    np.testing.assert_array_equal(grads[1], [3, 4, 12])


def test_complex_gradients_are_refused_too():
    with pytest.raises(gradclip.BackendError, match="complex128"):
        gradclip.GlobalNorm(1.0).clip([np.ones(3, np.complex128)])
