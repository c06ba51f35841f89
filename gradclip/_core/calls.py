"""The ways to call a clipper: the pure ``init``/``update``, the stateful ``clip``/``clip_``,
``fold_`` (measure and decide without writing) and checkpoints.

Each entry point turns what the user passed (a module, parameters, a tree of arrays) into a flat
list of gradients and one Ops, checks what must be refused before anything changes (repeated
calls, a changed tensor layout, bad signals), runs the clipper's contract
(:meth:`gradclip.Clipper.run`, or measure and decide alone for ``fold_``) and puts results back in
the user's structure. The state such calls keep lives in :class:`~gradclip._core.keeping.KeptState`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

from gradclip._core.checkpoint import (
    checkpoint,
    state_from_plain,
    state_to_plain,
    validate_checkpoint,
)
from gradclip._core.contract import Measured, signals_from
from gradclip._core.errors import InvalidArgumentError, StateError
from gradclip._core.keeping import home_of
from gradclip._core.ops import Ops, get_ops
from gradclip._core.tracing import compiling, distinct_positions
from gradclip._core.tree import collect_gradients, flatten, flatten_like
from gradclip._core.types import ClipInfo

__all__ = ["CallsMixin", "Folded"]


class Folded(NamedTuple):
    """What :meth:`Clipper.fold_` decided without writing a gradient."""

    coef: Any  # the one scalar coefficient (device, accumulation dtype)
    info: ClipInfo
    measured: Measured  # the measurement the decision came from (AMP scale divided out)


class CallsMixin:
    """The entry points of :class:`gradclip.Clipper` (see the module documentation)."""

    # -- the pure interface ---------------------------------------------------------------------
    def init(self, grads: Any) -> Any:
        """Return the initial state for gradients shaped like ``grads``.

        Args:
            grads: An array or a list/tuple/dict of arrays (None entries are ignored; the same
                array twice counts once, as in :meth:`update`).

        Returns:
            A NamedTuple of arrays on the gradients' device.
        """
        leaves, _, _ = flatten(grads)
        present = list({id(g): g for g in leaves if g is not None}.values())
        return self.init_state(get_ops(present, where=f"{type(self).__name__}.init"), present)

    def update(self, grads: Any, state: Any, params: Any = None, *, axis_name: Any = None, **signals: Any):
        """Clip ``grads`` without modifying them and return the new state.

        Args:
            grads: An array or a list/tuple/dict of arrays; ``None`` entries are passed through.
            state: The state from :meth:`init` or a previous :meth:`update`.
            params: The parameters, in the same structure, for methods that need them (AGC).
            axis_name: JAX inside ``jax.pmap``/``jax.shard_map``: the axis name (or tuple of
                names) the gradients are split over; every statistic is reduced over it, so each
                device measures the whole gradient (see :mod:`gradclip.backends._jax_axes`).
            **signals: Optional ``loss=``, ``step=``, ``sample_norms=``, ``optimizer_state=``
                (see :class:`~gradclip._core.contract.Signals`).

        Returns:
            ``(clipped_grads, new_state, info)``: clipped gradients in the input's structure, the
            next state, and a :class:`~gradclip.ClipInfo`. With no gradient at all (and nothing
            to reduce with: no process group, no ``axis_name``) ``new_state`` is ``state`` itself
            and the info is computed on its framework (see :meth:`clip_`).
        """
        return self._run_tree(grads, state, params, signals, inplace=False, axis_name=axis_name)

    # -- the stateful conveniences ------------------------------------------------------------
    def clip(self, grads: Any, params: Any = None, *, allow_repeat: bool = False, **signals: Any):
        """Clip gradients functionally (new arrays), advancing this clipper's own state.

        Args:
            grads: An array or a list/tuple/dict of arrays (torch, NumPy, ...).
            params: The matching parameters, for methods that need them.
            allow_repeat: Let a stateful clipper advance again on the very gradients of its
                previous call (see :meth:`clip_`).
            **signals: As for :meth:`update`.

        Returns:
            ``(clipped_grads, info)``.

        Raises:
            StateError: A stateful clipper called again on the same, unchanged gradients.
        """
        clipped, _, info = self._run_tree(
            grads, None, params, signals, inplace=False, own_state=True, allow_repeat=allow_repeat
        )
        return clipped, info

    def clip_(self, parameters: Any, *, allow_repeat: bool = False, **signals: Any) -> ClipInfo:
        """Clip gradients in place and return what was measured and done.

        Adaptive state advances exactly once per optimizer step (DESIGN.md rule 6). A stateful
        clipper remembers the gradient arrays it clipped (weak references) and their version
        token (torch: each tensor's ``_version`` counter, bumped by every in-place write; NumPy:
        a fingerprint of the bytes). Called again on the same arrays, unchanged since, it raises
        :class:`~gradclip.StateError` before touching gradients or state: the second call would
        count one step's gradient twice in the statistics. New gradients from the next
        ``backward()`` (fresh tensors, or the old ones written or zeroed) pass. The check reads
        host-side counters only, never a device value. Stateless clippers never check.

        A call that finds no gradient at all (every parameter frozen or without ``.grad``, an
        empty list, ``clip_`` before ``backward()``) warns and changes nothing: no state is
        advanced, created or placed, and the info says norm 0, coefficient 1 at the threshold in
        force, in the framework (and on the device) of the state kept. With a process group such
        a rank still joins the reduction, silently, and steps with the others.

        Args:
            parameters: A ``torch.nn.Module``, an iterable of parameters (their ``.grad`` is
                clipped), optimizer parameter groups, or NumPy arrays (clipped themselves).
            allow_repeat: Skip that check, for a deliberate second update on the same
                gradients (e.g. replaying one fixed gradient in a test).
            **signals: Optional ``loss=``, ``step=``, ``sample_norms=``, ``optimizer_state=``.

        Returns:
            A :class:`~gradclip.ClipInfo` whose fields stay on the gradients' device.

        Raises:
            StateError: A stateful clipper called again on the same, unchanged gradients.
        """
        where = f"{type(self).__name__}.clip_"
        collected, ops, params, quiet = self._collect(parameters, where, inplace=True, stacklevel=3)
        signal_values = signals_from(where, signals, ops.name)
        if quiet:  # no gradient: nothing to clip, the state stays as it is (see _quiet_state)
            with ops.context():
                _, _, info = self.run(ops, [], self._quiet_state(ops), params, [], signal_values)
                return ops.finish_info(info)
        self._before_own_step(ops, collected, where, allow_repeat)
        with ops.context():
            state = self._kept.current(self, ops, collected.grads)
            _, new_state, info = self.run(ops, collected.grads, state, params, collected.names, signal_values)
            info = ops.finish_info(info)
            self._kept.commit(ops, new_state, where)
        self._kept.remember(self, ops, collected.grads)
        return info

    def fold_(
        self, parameters: Any, *, divide_by: Any = None, allow_repeat: bool = False, where: str | None = None, **signals: Any
    ) -> Folded:
        """Measure and decide one step without writing any gradient, advancing the state as
        :meth:`clip_` would: the coefficient for a fused optimizer's step.

        Args:
            parameters: As for :meth:`clip_`.
            divide_by: A positive device scalar the gradients are still multiplied by (an AMP
                loss scale): the measurement is divided by it, no gradient is read twice.
            allow_repeat: As for :meth:`clip_`.
            where: The public entry point, for messages (default ``"Class.fold_"``).
            **signals: As for :meth:`clip_`.

        Returns:
            A :class:`Folded`: the scalar coefficient, the info and the measurement.

        Raises:
            InvalidArgumentError: The clipper's decisions are not one scalar (:attr:`one_coefficient`).
            StateError: As for :meth:`clip_`.
        """
        where = where or f"{type(self).__name__}.fold_"
        reason = self.cannot_fold_reason()
        if reason is not None:
            raise InvalidArgumentError(f"{where}: the clip cannot be folded: {reason}")
        collected, ops, params, quiet = self._collect(parameters, where, inplace=False, stacklevel=4)
        signal_values = signals_from(where, signals, ops.name)
        if not quiet:
            self._before_own_step(ops, collected, where, allow_repeat)
        with ops.context():
            # No gradient: decided as on any step, but the state stays as it is (_quiet_state).
            state = self._quiet_state(ops) if quiet else self._kept.current(self, ops, collected.grads)
            self.check_fits(state, collected.grads)
            measured = self.measure(ops, collected.grads, collected.names, params)
            if divide_by is not None:
                measured = measured.scaled(ops, 1.0 / divide_by)
            decision = self.decide(ops, measured, state, signal_values)
            info = ops.finish_info(decision.info)
            if not quiet:
                self._kept.commit(ops, decision.state, where)
        if not quiet:
            self._kept.remember(self, ops, collected.grads)
        return Folded(decision.coef, info, measured)

    def as_optax(self, axis_name: Any = None):
        """This clipper as an ``optax.GradientTransformation`` (JAX).

        Its state is a pytree (the clipper's state plus the last :class:`~gradclip.ClipInfo`),
        so it works inside ``jax.jit`` and ``optax.chain``; read the info for logging with
        :func:`gradclip.optax.clip_info`. See :func:`gradclip.optax.as_optax`.

        Args:
            axis_name: Inside ``jax.pmap``/``jax.shard_map``, the axis (or axes) the gradients
                are split over: statistics are reduced over it (see :meth:`update`).

        Raises:
            ImportError: optax or jax is not installed.
        """
        # The one import from a higher layer (an adapter) in the core: a convenience method on
        # the core type, importing the adapter (and jax) only when called.
        from gradclip.optax import as_optax

        return as_optax(self, axis_name=axis_name)

    # -- the machinery of the entry points ----------------------------------------------------------
    def _collect(self, parameters: Any, where: str, *, inplace: bool, stacklevel: int):
        traced = compiling()
        collected = collect_gradients(parameters, where)
        group = self.distributed_group()
        if "torch.distributed.fsdp" in sys.modules and not traced:
            # FSDP1's flat parameters imply their shard group; the torch backend reads it from
            # the module (imported by name, as get_ops imports backends).
            __import__("gradclip.backends.torch_fsdp")
            fsdp = sys.modules["gradclip.backends.torch_fsdp"]
            group = fsdp.implied_group(self, parameters, collected.params, collected.grads, group, where, collected.names)
        # With a process group, ranks without gradients are expected (pipeline stages, uneven
        # partitions): they still join the reduction, silently. Dynamo cannot trace a warning.
        # Without one, a call with no gradient is quiet: nothing is clipped or kept.
        quiet = not collected.grads and group is None
        if quiet and not traced:
            warnings.warn(
                f"{where}: found no gradients among {collected.seen} parameter(s); was it called "
                "before backward()? Nothing was clipped.",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
        framework = device = None
        if not collected.grads:
            # No gradient at all: the state kept decides the backend (its arrays are what the
            # step reads), else the parameters seen (a torch module before backward() gets a
            # torch ClipInfo; collected.params only holds those with a gradient), else NumPy.
            framework, device = self._kept.home()
            framework = framework or collected.framework
        ops = get_ops(
            collected.grads, inplace=inplace, framework=framework, where=where, process_group=group, device=device
        )
        params = collected.params if self.needs_params else None
        return collected, ops, params, quiet

    def _quiet_state(self, ops: Ops) -> Any:
        """The state a call with no gradient reads, changing nothing (no initial state kept, no
        checkpoint placed, no layout recorded, the last call's gradients still remembered).

        Such a call (every parameter frozen, ``clip_`` before ``backward()``, a stage with
        nothing to train) clips nothing and informs no statistic: the next step goes on as if it
        had not happened. Its ClipInfo is what the current state decides for a norm of 0, as for
        a stateless clipper: the threshold in force, a coefficient of 1. A state holding one entry
        per tensor fits no empty list; the info then comes from the initial state for none.
        """
        return self._fitting_none(ops, self._kept.peek(self, ops))

    def _fitting_none(self, ops: Ops, state: Any) -> Any:
        """``state`` if it fits an empty list of gradients, else the initial state for none."""
        if state is None:
            return self.init_state(ops, [])
        try:
            self.check_fits(state, [])  # host-side shapes only
        except StateError:
            return self.init_state(ops, [])
        return state

    def _before_own_step(self, ops: Ops, collected: Any, where: str, allow_repeat: bool) -> None:
        # Before anything changes: the kept state's framework, a repeat, the tensors' layout.
        # Traced, version counters are the fake tensors' (see gradclip/_core/tracing.py).
        self._kept.check_home(ops, where)
        if not allow_repeat and not compiling():
            self._kept.guard_repeat(self, ops, collected.grads, where)
        self._kept.check_layout(self, collected.names, collected.grads, where)

    def _run_tree(self, grads, state, params, signals, *, inplace: bool, own_state: bool = False, allow_repeat: bool = False, axis_name: Any = None):
        where = f"{type(self).__name__}.{'clip' if own_state else 'update'}"
        leaves, unflatten, names = flatten(grads)
        # The same array given twice (tied weights passed as grads) is clipped and counted once;
        # every position it held gets the one result.
        positions, repeats = distinct_positions(leaves)
        present = [leaves[i] for i in positions]
        present_names = [names[i] for i in positions]
        param_leaves = None
        if params is not None:
            flat_params = flatten_like(params, grads)  # dict entries paired by key
            if len(flat_params) != len(leaves):
                raise InvalidArgumentError(
                    f"{where}: params must have the same structure as grads; got {len(flat_params)} "
                    f"parameter(s) for {len(leaves)} gradient(s)"
                )
            param_leaves = [flat_params[i] for i in positions]
        group = self.distributed_group()
        framework = device = None
        if not present:
            # No array to infer the framework from: the state's (kept or given) decides.
            framework, device = self._kept.home() if own_state else home_of(state)
        ops = get_ops(
            present, inplace=inplace, framework=framework, where=where, process_group=group,
            axis_name=axis_name, device=device,
        )
        signal_values = signals_from(where, signals, ops.name)
        if not present and group is None and axis_name is None:
            # Nothing to clip and nobody to reduce with: the state stays as it is (see
            # _quiet_state); update() hands back the state it was given.
            read = self._quiet_state(ops) if own_state else self._fitting_none(ops, state)
            _, _, info = self.run(ops, [], read, param_leaves, [], signal_values)
            kept = state if state is not None or own_state else self.init_state(ops, [])
            return unflatten(list(leaves)), kept, ops.finish_info(info)
        if own_state:
            self._kept.check_home(ops, where)
            if not allow_repeat:
                self._kept.guard_repeat(self, ops, present, where)
            self._kept.check_layout(self, present_names, present, where)
            state = self._kept.current(self, ops, present)
        elif state is None:
            state = self.init_state(ops, present)
        else:
            check_given_state(self, state, ops, where)
        new, new_state, info = self.run(ops, present, state, param_leaves, present_names, signal_values)
        info = ops.finish_info(info)
        if own_state:
            self._kept.commit(ops, new_state, where)
            self._kept.remember(self, ops, present)
        out = list(leaves)
        for position, value in zip(positions, new):
            out[position] = value
        for position, original in repeats:
            out[position] = out[original]
        return unflatten(out), new_state, info

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self, state: Any = None) -> dict[str, Any]:
        """Return the clipper's configuration and state as plain, JSON-serialisable data.

        The result holds only dicts, lists, strings, numbers, bools and None, so it can be saved
        with ``json.dump`` or ``torch.save`` and read back with ``torch.load(weights_only=True)``.

        Args:
            state: A state from the pure API (:meth:`init`/:meth:`update`, an optax or Keras
                adapter) to save instead of the one this object keeps.

        Returns:
            ``{"format": "gradclip", "version": 1, "clipper": name, "config": {...},
            "state": {...} or None}``; ``state`` is None before the first step. The config is
            :func:`plain_config` of :meth:`config` (infinite arguments such as
            ``norm_type=inf`` appear as the strings ``"inf"``/``"-inf"``), so the whole result
            passes strict JSON (``json.dumps(..., allow_nan=False)``).
        """
        plain = self._kept.plain(self) if state is None else state_to_plain(self, state)
        return checkpoint(self, plain)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict`.

        The data is validated completely before anything changes: on error the clipper keeps
        its current state. Arrays are rebuilt on the device of the next gradients seen.

        Args:
            state_dict: A mapping as returned by :meth:`state_dict`.

        Raises:
            StateError: Wrong format or version (an ``int``; ``True`` or ``1.0`` are refused),
                unexpected top-level keys, another clipper's state, a different
                configuration, missing or extra fields, or values of the wrong type or out of
                their dtype's range.
        """
        validate_checkpoint(self, state_dict)
        self._kept.load(self, state_dict["state"])

    def state_from_dict(self, state_dict: Mapping[str, Any], like: Any = None) -> Any:
        """Validate a checkpoint and return its state for the pure API, changing nothing here.

        Args:
            state_dict: A mapping as returned by :meth:`state_dict`.
            like: Gradients (any structure) fixing the backend and device of the arrays and the
                initial state of parts saved before their first step; None gives NumPy arrays.

        Returns:
            A state NamedTuple (:meth:`init` for ``like`` when the checkpoint holds none).

        Raises:
            StateError: As for :meth:`load_state_dict`.
        """
        validate_checkpoint(self, state_dict)
        leaves = [] if like is None else [g for g in flatten(like)[0] if g is not None]
        ops = get_ops(leaves, where=f"{type(self).__name__}.state_from_dict")
        plain = state_dict["state"]
        return self.init_state(ops, leaves) if plain is None else state_from_plain(self, ops, plain, leaves)

    def reset(self) -> None:
        """Forget all state; the next step starts as the first did."""
        self._kept.reset(self)


def check_given_state(clipper: Any, state: Any, ops: Ops, where: str) -> None:
    """Refuse a state given to :meth:`Clipper.update` that is not this clipper's, or that holds
    another framework's arrays than the gradients (a NumPy state is taken by JAX and TensorFlow,
    which read host arrays as constants: what ``flax.serialization`` restores is NumPy).

    Raises:
        InvalidArgumentError: Naming the state's type or framework and what was expected.
    """
    expected = clipper.state_type
    if not isinstance(state, expected):
        raise InvalidArgumentError(
            f"{where}: state must be the {expected.__name__} that {type(clipper).__name__}.init (or a previous "
            f"update) returned, got {type(state).__name__}; a state belongs to the clipper that made it"
        )
    framework, _ = home_of(state)
    if framework is None or framework == ops.name or (framework == "numpy" and ops.name in ("jax", "tensorflow")):
        return
    raise InvalidArgumentError(
        f"{where}: state holds {framework} arrays but the gradients are {ops.name} arrays; make the state "
        f"from these gradients ({type(clipper).__name__}.init(grads)), or convert a saved one with "
        "state_dict(state) and state_from_dict"
    )
