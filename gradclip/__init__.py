"""gradclip: gradient clipping for PyTorch, TensorFlow/Keras, JAX/optax and NumPy.

Every clipping technique behind one API: pick a clipper, then clip in place (PyTorch) or
functionally (any framework)::

    import gradclip
    clipper = gradclip.GlobalNorm(max_norm=1.0)
    info = clipper.clip_(model)          # after loss.backward(), before optimizer.step()

``import gradclip`` imports no deep-learning framework: a backend is chosen from the type of the
arrays it is given and its framework is imported then.
"""

from gradclip._core.errors import (
    BackendError,
    DivergenceError,
    GradClipError,
    InvalidArgumentError,
    NonFiniteError,
    ReadOnlyArrayError,
    SparseGradientError,
    StateError,
    UnknownNameError,
)
from gradclip._core.clipper import Clipper
from gradclip._core.registry import available, get, register
from gradclip._core.types import ClipInfo
from gradclip.clippers import (
    AGC,
    AdaClip,
    AdaGC,
    AdaGN,
    AutoClip,
    AverageNorm,
    BlockRMS,
    Chain,
    GlobalNorm,
    NoClip,
    NonFinite,
    Norm,
    NormSign,
    QuantileNorm,
    SkipAbove,
    SkipOnSpike,
    SpikeAware,
    Subset,
    Value,
    ZClip,
    ZeroOutliers,
    chain,
)
from gradclip.functional import (
    clip_by_global_norm,
    clip_by_norm,
    clip_by_value,
    clip_weights_,
    global_norm,
    zero_outliers,
)
from gradclip.monitor import Monitor, suggest_threshold
from gradclip import schedules
from gradclip._core.tracing import register_torch_backend


def _load_torch_backend():
    # A plain import statement, which dynamo executes when torch.compile traces a first clip
    # (it refuses importlib): see gradclip/_core/tracing.py.
    import gradclip.backends.torch as backend

    return backend


register_torch_backend(_load_torch_backend)

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "AdaClip",
    "AdaGC",
    "AdaGN",
    "AutoClip",
    "AverageNorm",
    "BackendError",
    "BlockRMS",
    "Chain",
    "ClipInfo",
    "Clipper",
    "DivergenceError",
    "GlobalNorm",
    "GradClipError",
    "InvalidArgumentError",
    "Monitor",
    "NoClip",
    "NonFinite",
    "NonFiniteError",
    "Norm",
    "NormSign",
    "QuantileNorm",
    "ReadOnlyArrayError",
    "SkipAbove",
    "SkipOnSpike",
    "SparseGradientError",
    "SpikeAware",
    "StateError",
    "Subset",
    "UnknownNameError",
    "Value",
    "ZClip",
    "ZeroOutliers",
    "available",
    "chain",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "clip_weights_",
    "get",
    "global_norm",
    "register",
    "schedules",
    "suggest_threshold",
    "zero_outliers",
]
