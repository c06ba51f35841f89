"""Privacy accounting for DP-SGD, by an existing library: Opacus' accountants.

The privacy loss of the subsampled Gaussian mechanism is computed by Opacus (``opacus.accountants``:
Rényi DP, Mironov 2017 and Mironov, Talwar & Zhang 2019; the PRV accountant, Gopi, Lee & Wutschitz
2021), never by hand here. Install with ``pip install gradclip[privacy]`` (Opacus; its accountants
need only numpy/scipy).
"""

from __future__ import annotations

import math
from typing import Any

from gradclip._core.errors import InvalidArgumentError

__all__ = ["Accountant", "noise_multiplier_for"]

_KINDS = ("rdp", "prv", "gdp")


def _opacus_accountant(kind: str) -> Any:
    try:
        from opacus.accountants import create_accountant
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "gradclip's privacy accounting uses Opacus' accountants: pip install 'gradclip[privacy]'"
        ) from error
    return create_accountant(kind)


class Accountant:
    """Tracks the (σ, q) of every DP-SGD step and reports ε for a δ.

    Args:
        kind: ``"rdp"`` (Rényi DP, the default and Opacus' default), ``"prv"`` (privacy loss
            random variables: tighter) or ``"gdp"`` (Gaussian DP, the CLT approximation).

    Raises:
        InvalidArgumentError: An unknown kind.
        ImportError: Opacus is not installed.
    """

    def __init__(self, kind: str = "rdp"):
        if kind not in _KINDS:
            raise InvalidArgumentError(f"Accountant: kind must be one of {_KINDS}, got {kind!r}")
        self.kind = kind
        self._inner = _opacus_accountant(kind)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` steps of the subsampled Gaussian mechanism.

        Args:
            noise_multiplier: σ, the noise std over the clipping bound, ``>= 0``.
            sample_rate: q, the Poisson sampling probability, in ``(0, 1]``.
            steps: How many such steps, ``>= 1``.

        Raises:
            InvalidArgumentError: An argument out of range.
        """
        check_noise("Accountant.step", noise_multiplier)
        if not (0 < sample_rate <= 1):
            raise InvalidArgumentError(f"Accountant.step: sample_rate must be in (0, 1], got {sample_rate!r}")
        if not isinstance(steps, int) or steps < 1:
            raise InvalidArgumentError(f"Accountant.step: steps must be an int >= 1, got {steps!r}")
        history = self._inner.history
        if history and history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, n = history[-1]
            history[-1] = (sigma, q, n + steps)  # Opacus' own compaction of equal steps
        else:
            history.append((noise_multiplier, sample_rate, steps))

    @property
    def steps(self) -> int:
        """Steps recorded."""
        return sum(n for _, _, n in self._inner.history)

    def epsilon(self, delta: float) -> float:
        """ε of everything recorded, at this δ (``inf`` before any noise: σ = 0).

        Raises:
            InvalidArgumentError: δ outside ``(0, 1)``.
        """
        if not (0 < delta < 1):
            raise InvalidArgumentError(f"Accountant.epsilon: delta must be in (0, 1), got {delta!r}")
        if not self._inner.history:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in self._inner.history):
            return math.inf
        return float(self._inner.get_epsilon(delta=delta))

    def state_dict(self) -> dict[str, Any]:
        """The recorded history, plain data (checkpointable)."""
        return {"kind": self.kind, "history": [list(h) for h in self._inner.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            InvalidArgumentError: A state of another kind.
        """
        if state.get("kind") != self.kind:
            raise InvalidArgumentError(f"Accountant.load_state_dict: state is for {state.get('kind')!r}, not {self.kind!r}")
        self._inner.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]


def check_noise(where: str, noise_multiplier: Any) -> float:
    """σ as a float ``>= 0`` (finite), or a clear error."""
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)):
        raise InvalidArgumentError(f"{where}: noise_multiplier must be a number >= 0, got {noise_multiplier!r}")
    if not (0 <= noise_multiplier < math.inf):
        raise InvalidArgumentError(f"{where}: noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    return float(noise_multiplier)


def noise_multiplier_for(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str = "rdp"
) -> float:
    """The smallest σ reaching ``target_epsilon`` at ``delta`` after ``steps`` steps at rate q
    (Opacus' ``get_noise_multiplier``, a bisection over its accountant).

    Raises:
        InvalidArgumentError: An argument out of range.
    """
    if not target_epsilon > 0:
        raise InvalidArgumentError(f"noise_multiplier_for: target_epsilon must be > 0, got {target_epsilon!r}")
    if not (0 < delta < 1) or not (0 < sample_rate <= 1) or not (isinstance(steps, int) and steps >= 1):
        raise InvalidArgumentError(
            f"noise_multiplier_for: need 0 < delta < 1, 0 < sample_rate <= 1, steps >= 1; got "
            f"delta={delta!r}, sample_rate={sample_rate!r}, steps={steps!r}"
        )
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant=kind
        )
    )
