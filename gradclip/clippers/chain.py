"""Composition: several clippers applied left to right as one."""

from __future__ import annotations

from typing import NamedTuple

from gradclip._core.checkpoint import CHILDREN
from gradclip._core.clipper import Clipper, make_info
from gradclip._core.contract import NO_SIGNALS, Coefficient, Decision, Measured, Signals
from gradclip._core.errors import InvalidArgumentError
from gradclip._core.registry import register

__all__ = ["Chain", "ChainState", "chain"]


class ChainState(NamedTuple):
    """One state per link, in order."""

    links: tuple


@register("chain", listed=False)
class Chain(Clipper):
    """Apply clippers one after the other; built by :func:`chain`.

    The combined :class:`~gradclip.ClipInfo` reports the first link's norm (the gradients as they
    came in), the last link's threshold, the product of the coefficients, and ``clipped``/``skip``
    if any link clipped/asked to skip; ``finite`` is the first link's.

    A chain composes its links' whole steps (each link measures what the previous one wrote).
    When every link decides one scalar, the chain does too, and folds: the links are then
    measured once per norm order, each seeing the measurement scaled by the coefficients before
    it, and no gradient is written.
    """

    state_type = ChainState
    state_dtypes = {"links": CHILDREN}

    def __init__(self, *clippers: Clipper):
        super().__init__()
        if not clippers:
            raise InvalidArgumentError("chain: give at least one clipper, got none")
        for position, clipper in enumerate(clippers):
            if not isinstance(clipper, Clipper):
                raise InvalidArgumentError(
                    f"chain: argument #{position} must be a gradclip clipper, got {type(clipper).__name__}"
                )
        self.clippers = tuple(clippers)

    # -- capabilities: those of the links ---------------------------------------------------------
    def children(self) -> tuple[Clipper, ...]:
        return self.clippers

    @property
    def needs_params(self) -> bool:  # type: ignore[override]
        return any(c.needs_params for c in self.clippers)

    @property
    def needs_optimizer_state(self) -> bool:  # type: ignore[override]
        return any(c.needs_optimizer_state for c in self.clippers)

    @property
    def per_tensor_state(self) -> bool:  # type: ignore[override]
        return any(c.per_tensor_state for c in self.clippers)

    @property
    def one_coefficient(self) -> bool:
        return all(c.one_coefficient for c in self.clippers)

    @property
    def coefficient(self) -> str:  # type: ignore[override]
        return Coefficient.SCALAR if self.one_coefficient else Coefficient.ELEMENTWISE

    def cannot_fold_reason(self) -> str | None:
        return next((r for r in (c.cannot_fold_reason() for c in self.clippers) if r is not None), None)

    # -- the steps ----------------------------------------------------------------------------------
    def init_state(self, ops, grads):
        return ChainState(tuple(c.init_state(ops, grads) for c in self.clippers))

    def check_fits(self, state, grads):
        for clipper, link_state in zip(self.clippers, state.links):
            clipper.check_fits(link_state, grads)

    def run(self, ops, grads, state, params=None, names=None, signals: Signals = NO_SIGNALS):
        if names is None:
            names = [f"#{i}" for i in range(len(grads))]
        self.check_fits(state, grads)
        # In place, a later link may still raise (a "raise" policy on non-finite values, AGC
        # without parameters) after an earlier link has written into the gradients, leaving them
        # half clipped. So with two or more links the links work out of place and the result is
        # written back once, after the last link has succeeded: one more copy pass, and up to two
        # gradient-sized temporaries (a link's input and output) while the links run.
        targets = None
        link_ops = ops
        if ops.inplace and len(self.clippers) > 1 and grads:
            targets, link_ops = grads, ops.out_of_place()
        infos = []
        new_states = []
        for clipper, link_state in zip(self.clippers, state.links):
            grads, link_state, info = clipper.run(link_ops, grads, link_state, params, names, signals)
            new_states.append(link_state)
            infos.append(info)
        if targets is not None:
            grads = ops.write_back(targets, grads)
        return grads, ChainState(tuple(new_states)), _combined(ops, infos)

    def measure(self, ops, grads, names, params) -> Measured:
        """The first link's measurement (used when the chain folds: every link is one scalar)."""
        return self.clippers[0].measure(ops, grads, names, params)

    def decide(self, ops, measured: Measured, state, signals: Signals = NO_SIGNALS) -> Decision:
        """Each link decides on the measurement scaled by the coefficients before it; a link
        measuring another norm order measures the (unwritten) gradients once more."""
        if not self.one_coefficient:
            raise InvalidArgumentError(f"{self!r}: decide() without apply needs links that decide one scalar each")
        coef = None
        infos, new_states = [], []
        first = measured
        for clipper, link_state in zip(self.clippers, state.links):
            seen = first
            # The first measurement serves every link of its norm order; another order, or a
            # "raise" policy the first link does not have, measures the gradients again.
            raising = clipper.nonfinite == "raise" and self.clippers[0].nonfinite != "raise"
            if clipper.norm_type != first.norm_type or raising:
                seen = clipper.measure(ops, first.grads, first.names, first.params)
                if first.factor is not None:
                    seen = seen.scaled(ops, first.factor)
            if coef is not None:
                seen = seen.scaled(ops, coef)
            decision = clipper.decide(ops, seen, link_state, signals)
            coef = decision.info.coef if coef is None else coef * decision.info.coef
            new_states.append(decision.state)
            infos.append(decision.info)
        return Decision(coef, ChainState(tuple(new_states)), _combined(ops, infos))


def _combined(ops, infos):
    coef = infos[0].coef
    clipped, skip = infos[0].clipped, infos[0].skip
    for info in infos[1:]:
        coef = coef * info.coef
        clipped = clipped | info.clipped
        skip = skip | info.skip
    return make_info(ops, infos[0].norm, infos[-1].threshold, coef, clipped, infos[0].finite, skip)


def chain(*clippers: Clipper) -> Chain:
    """Compose clippers left to right: ``chain(NonFinite("zero"), GlobalNorm(1.0))``.

    Args:
        *clippers: Two or more clipper instances (one is allowed, and behaves as itself).

    Returns:
        A :class:`Chain`, itself a clipper.

    Raises:
        InvalidArgumentError: No clippers, or an argument that is not a clipper.
    """
    return Chain(*clippers)
