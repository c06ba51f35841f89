"""Framework backends implementing :class:`gradclip._core.ops.Ops`, one module per framework.

Modules here are imported lazily by :func:`gradclip._core.ops.get_ops`, the first time arrays of
that framework are seen, so importing gradclip never imports a framework.
"""
