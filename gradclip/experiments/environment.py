"""The numerical environment every run is pinned to, so a seed gives the same table anywhere.

Training the adding RNN for 4,000 steps amplifies a difference in the last bit of one matrix
product into a different outcome: on the same versions and seeds, an AVX-512 machine and an
AVX2 machine solved 3/3 and 2/3 seeds with ``global_norm:max_norm=1.0`` (and 2/3, 3/3 with
ZClip), because PyTorch, MKL and oneDNN each pick their kernels from the processor's vector
instructions. The runner therefore pins, before PyTorch is imported in a worker process:

* one thread per run (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``torch.set_num_threads(1)``):
  a reduction split over a different number of threads adds in a different order;
* PyTorch's own kernels to their AVX2 versions (``ATEN_CPU_CAPABILITY=avx2``), MKL's to its
  conditional-numerical-reproducibility AVX2 branch in strict mode (``MKL_CBWR=AVX2,STRICT``)
  and oneDNN's to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``): AVX2 is the widest set every x86-64 server
  and desktop of the last decade has, so every such machine runs the same kernels;
* deterministic algorithms (``torch.use_deterministic_algorithms(True, warn_only=True)``,
  cuDNN's deterministic mode, ``CUBLAS_WORKSPACE_CONFIG``) for tasks on a GPU.

The price, measured on an AVX-512 Xeon: about 13 % more CPU time on the adding and gpt tasks
than the processor's own AVX-512 kernels. Each variable is only set where the user has not set it (an explicit choice wins) and each run
records the kernels it actually used (:func:`cpu_capability`). What still varies is listed in
``docs/evidence.md``: wall times, and results on other processor families (ARM, or x86 without
AVX2), which run other kernels.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterator

__all__ = ["PINNED_ENVIRONMENT", "pinned_environment", "apply_pinned_environment", "cpu_capability", "pinned_torch"]

#: Environment variables every run is started with (x86-64; the ISA pins are left out elsewhere).
PINNED_ENVIRONMENT: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}
# Not pinned: TF_DETERMINISTIC_OPS. It makes TensorFlow refuse every unseeded random op, which
# would break a user's Keras task that builds its model before seeding; a train function that
# wants TensorFlow's determinism calls tf.config.experimental.enable_op_determinism() itself.

_ISA_KEYS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def pinned_environment() -> dict[str, str]:
    """The variables to pin on this machine: all of :data:`PINNED_ENVIRONMENT` on x86-64; on
    other processors (ARM...) the thread and GPU pins only, since the x86 kernel names mean
    nothing there."""
    machine = platform.machine().lower()
    x86 = machine in ("x86_64", "amd64", "x64")
    return {k: v for k, v in PINNED_ENVIRONMENT.items() if x86 or k not in _ISA_KEYS}


def apply_pinned_environment() -> dict[str, str]:
    """Set the pinned variables in ``os.environ`` where the user has not set them.

    Call it before PyTorch is imported (the ISA choices are read when its kernels are first
    dispatched); worker processes started afterwards inherit the variables.

    Returns:
        The variables as they are now in force (the user's own values where they set them).
    """
    in_force = {}
    for key, value in pinned_environment().items():
        in_force[key] = os.environ.setdefault(key, value)
    return in_force


def cpu_capability() -> str | None:
    """The vector instruction set PyTorch dispatches its CPU kernels for (``"AVX2"``,
    ``"AVX512"``, ``"DEFAULT"``...), or None when PyTorch is not imported (it is not imported
    here just to ask)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # an older torch without the query: the record says unknown  # noqa: BLE001
        return None


@contextlib.contextmanager
def pinned_torch() -> Iterator[None]:
    """Within the block: one intra-op thread and deterministic algorithms; afterwards the
    caller's settings back (a library call must not leave the process slower or stricter than
    it found it). Does nothing when PyTorch is not installed."""
    try:
        import torch
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.set_num_threads(1)
    # warn_only: an operation without a deterministic version warns instead of failing the
    # user's task; the run still records what happened.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
