"""Recording every host read of a torch tensor's value (DESIGN.md rule 1: no host-device sync).

Each way Python code reads a tensor's value on the host (``.item()``, ``bool(t)``, ``float(t)``,
``int(t)``, ``.tolist()``, ``operator.index(t)``, ``.numpy()``, ``.cpu()``) is replaced, for the
duration of the block, by a wrapper that records its name. On a GPU each of these waits for the
device; on the CPU they are free, which is why they are counted rather than timed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

READS = ("item", "__bool__", "__float__", "__int__", "tolist", "__index__", "numpy", "cpu")


@contextlib.contextmanager
def record_host_reads(names: Sequence[str] = READS) -> Iterator[list[str]]:
    """Yield a list that receives the name of every host read of a tensor value, in order.

    The original ``torch.Tensor`` methods are restored on exit, also after an exception.
    """
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def recording(name, original):
        def wrapper(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, recording(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
