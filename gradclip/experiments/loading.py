"""Finding a task: a built-in name, ``path/to/file.py:factory``, ``package.module:factory``, or
an object given from Python.

What the reference names (after the colon; dotted names reach into classes) may be:

* a :class:`~gradclip.experiments.Task` subclass — the runner builds one per seed;
* a :class:`~gradclip.experiments.TrainTask`, or a function
  ``train(clipper, seed, steps, report) -> metrics``;
* a factory: a function called with no arguments that returns one of the above.

Runs happen in other processes (``--jobs``) or on other machines (``--backend ray``), so a task
is shipped as a :class:`TaskSource` that each worker resolves again: the built-in name, the
module name, or a file's path and source text (a Ray worker on another node has no copy of the
file), and only for objects given from Python the object itself (pickled).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import pickle
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradclip.experiments.tasks import TASKS, task_names
from gradclip.experiments.tasks.base import Task, TaskDefaults, TaskError
from gradclip.experiments.train import TrainTask

__all__ = ["TaskSource", "LoadedTask", "load_task", "resolve_source", "check_picklable"]

_EXPECTED = (
    "a gradclip.experiments.Task subclass, a gradclip.experiments.TrainTask, or a "
    "train(clipper, seed, steps, report) function"
)


@dataclass(frozen=True)
class TaskSource:
    """How a worker finds a task again (picklable).

    Attributes:
        reference: The text the user gave (``"adding"``, ``"my_task.py:make"``...) or, for an
            object, its ``module:qualname``.
        kind: ``"builtin"``, ``"file"``, ``"module"`` or ``"object"``.
        path: The file's absolute path (``"file"``).
        code: The file's source text (``"file"``): executed by the worker.
        attribute: The dotted name after the colon.
        obj: The object itself (``"object"``).
    """

    reference: str
    kind: str
    path: str | None = None
    code: str | None = None
    attribute: str | None = None
    obj: Any = None


@dataclass(frozen=True)
class LoadedTask:
    """A resolved task and what the comparison needs to know about it.

    Attributes:
        source: The :class:`TaskSource` workers resolve.
        target: The :class:`Task` subclass or the :class:`TrainTask`.
    """

    source: TaskSource
    target: Any

    @property
    def is_train_function(self) -> bool:
        """True for the train-function form, False for a :class:`Task` subclass."""
        return isinstance(self.target, TrainTask)

    @property
    def label(self) -> str:
        """The task's name in reports: the built-in name or the reference given."""
        return self.source.reference

    @property
    def steps(self) -> int:
        """Optimizer steps of a full run."""
        return self.target.steps if self.is_train_function else self.target.defaults.steps

    @property
    def quick_steps(self) -> int:
        """Optimizer steps of a ``--quick`` run."""
        return self.target.quick_steps if self.is_train_function else self.target.defaults.quick_steps

    @property
    def defaults(self) -> TaskDefaults | None:
        """The :class:`TaskDefaults` of a :class:`Task` (None for a train function)."""
        return None if self.is_train_function else self.target.defaults

    @property
    def default_clippers(self) -> tuple[str, ...] | None:
        """The task's own default clipper specs, if it declares any."""
        return self.target.default_clippers

    @property
    def options(self) -> list[str]:
        """The keyword options the task takes (a :class:`Task`'s constructor arguments)."""
        if self.is_train_function:
            return []
        return sorted(set(inspect.signature(self.target.__init__).parameters) - {"self", "seed"})


def _file_module(path: str, code: str) -> types.ModuleType:
    """Execute a task file's source as a module (once per process and content)."""
    digest = hashlib.sha1(f"{path}\0{code}".encode()).hexdigest()[:10]
    name = f"gradclip_task_{Path(path).stem.replace('-', '_')}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module = types.ModuleType(name)
    module.__file__ = path
    # The task's own folder is importable, as when the file is run as a script.
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module  # dataclasses and pickle look the module up while it executes
    try:
        exec(compile(code, path, "exec"), module.__dict__)  # noqa: S102 - the user's own task file
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _attribute(module: Any, dotted: str, reference: str) -> Any:
    obj = module
    for part in dotted.split("."):
        if not hasattr(obj, part):
            defined = sorted(k for k in vars(obj) if not k.startswith("_")) if hasattr(obj, "__dict__") else []
            shown = ", ".join(defined[:12]) + (", ..." if len(defined) > 12 else "")
            raise TaskError(f"task {reference!r}: {getattr(obj, '__name__', obj)!s} has no attribute {part!r} (it defines: {shown or 'nothing'})")
        obj = getattr(obj, part)
    return obj


def _binds(function: Any, count: int) -> bool:
    try:
        inspect.signature(function).bind(*([None] * count))
    except TypeError:
        return False
    except ValueError:  # no signature (some builtins): not ours to call
        return False
    return True


def _describe(obj: Any) -> str:
    text = repr(obj)
    return f"{type(obj).__name__} ({text[:60]}{'...' if len(text) > 60 else ''})"


def _coerce(obj: Any, reference: str, *, called: bool = False) -> Any:
    """A Task subclass or TrainTask from what a reference names (calling a factory once)."""
    if isinstance(obj, type) and issubclass(obj, Task):
        if inspect.isabstract(obj):
            missing = ", ".join(sorted(obj.__abstractmethods__))
            raise TaskError(f"task {reference!r}: Task subclass {obj.__name__} does not implement {missing}")
        return obj
    if isinstance(obj, TrainTask):
        return obj
    if isinstance(obj, Task):
        what = "the factory returned" if called else "names"
        raise TaskError(
            f"task {reference!r}: {what} a Task instance (of {type(obj).__name__}); give the class: "
            "the runner builds one per seed"
        )
    if callable(obj) and not isinstance(obj, type):
        if _binds(obj, 4) and not _binds(obj, 0):
            return TrainTask(obj)
        if not called and _binds(obj, 0):
            try:
                result = obj()
            except Exception as error:  # the user's factory failed: say so in one line
                raise TaskError(f"task {reference!r}: the factory raised {type(error).__name__}: {error}") from error
            return _coerce(result, reference, called=True)
    what = "the factory returned" if called else "names"
    raise TaskError(f"task {reference!r}: {what} {_describe(obj)}; expected {_EXPECTED}")


def _import_error(reference: str, error: BaseException) -> TaskError:
    return TaskError(f"task {reference!r} cannot be imported: {type(error).__name__}: {error}")


def resolve_source(source: TaskSource) -> Any:
    """The Task subclass or TrainTask a :class:`TaskSource` names (in any process).

    Raises:
        TaskError: The file or module cannot be imported, the attribute is missing, or it names
            the wrong thing.
    """
    if source.kind == "builtin":
        return TASKS[source.reference]
    if source.kind == "object":
        return _coerce(source.obj, source.reference)
    try:
        if source.kind == "file":
            module = _file_module(source.path, source.code)
        else:
            module = importlib.import_module(source.reference.rpartition(":")[0])
    except TaskError:
        raise
    except (Exception, SystemExit) as error:  # SyntaxError, ImportError, whatever the module raises
        raise _import_error(source.reference, error) from error
    return _coerce(_attribute(module, source.attribute, source.reference), source.reference)


def _object_reference(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or type(obj).__module__
    name = getattr(obj, "__qualname__", None) or getattr(obj, "name", None) or type(obj).__qualname__
    return f"{module}:{name}"


def load_task(task: Any) -> LoadedTask:
    """Resolve a task given on the command line or from Python.

    Args:
        task: A built-in name (``"adding"``), ``"path/to/file.py:factory"``,
            ``"package.module:factory"``, a :class:`Task` subclass, a :class:`TrainTask`, a
            train function or a factory.

    Returns:
        The :class:`LoadedTask`.

    Raises:
        TaskError: An unknown name, a file or module that cannot be imported, a missing
            attribute, a factory that raises or returns the wrong thing.
    """
    if not isinstance(task, str):
        return LoadedTask(TaskSource(_object_reference(task), "object", obj=task), _coerce(task, _object_reference(task)))
    reference = task.strip()
    if reference in TASKS:
        return LoadedTask(TaskSource(reference, "builtin"), TASKS[reference])
    if ":" not in reference:
        hint = " (a file needs its factory: path.py:factory)" if reference.endswith(".py") else ""
        raise TaskError(
            f"unknown task {reference!r}{hint}; valid tasks: {', '.join(task_names())}, "
            "path/to/file.py:factory or package.module:factory"
        )
    target, _, attribute = reference.rpartition(":")
    if not target or not attribute:
        raise TaskError(f"task {reference!r}: expected path/to/file.py:factory or package.module:factory")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = os.path.abspath(os.path.expanduser(target))
        if not os.path.isfile(path):
            raise TaskError(f"task {reference!r}: file {target!r} does not exist")
        try:
            code = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise TaskError(f"task {reference!r}: cannot read {target!r}: {error}") from error
        source = TaskSource(reference, "file", path=path, code=code, attribute=attribute)
    else:
        source = TaskSource(reference, "module", attribute=attribute)
    return LoadedTask(source, resolve_source(source))


def check_picklable(loaded: LoadedTask) -> None:
    """Refuse, before any run, an object task that worker processes cannot receive.

    Raises:
        TaskError: ``pickle`` cannot send it (a lambda, a function defined inside another).
    """
    if loaded.source.kind != "object":
        return
    try:
        pickle.dumps(loaded.source.obj)
    except Exception as error:  # noqa: BLE001 - pickle raises many types
        raise TaskError(
            f"task {loaded.label!r} cannot be sent to worker processes ({type(error).__name__}: {error}); "
            "define it at a module's top level, pass it as 'package.module:factory' or 'file.py:factory', "
            "or run with jobs=1"
        ) from error
