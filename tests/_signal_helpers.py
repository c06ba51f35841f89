"""What the trainer-signal tests share (tests/test_signals_lightning.py, test_signals_transformers.py)."""

from __future__ import annotations


def record_losses(clipper):
    """Wrap ``clipper.clip_`` to record the ``loss=`` each call receives (a float, or None).

    Returns:
        The list the losses are appended to.
    """
    seen, original = [], clipper.clip_

    def clip_(parameters, **signals):
        seen.append(None if signals.get("loss") is None else float(signals["loss"]))
        return original(parameters, **signals)

    clipper.clip_ = clip_
    return seen
