"""Every clipping method, one module per family, each written once against the Ops protocol.

Importing this package registers every built-in method with :mod:`gradclip._core.registry`.
"""

from gradclip.clippers.adagc import AdaGC
from gradclip.clippers.agc import AGC
from gradclip.clippers.autoclip import AutoClip
from gradclip.clippers.chain import Chain, chain
from gradclip.clippers.nonfinite import NonFinite
from gradclip.clippers.none import NoClip
from gradclip.clippers.norm import AverageNorm, BlockRMS, GlobalNorm, Norm, NormSign
from gradclip.clippers.outliers import ZeroOutliers
from gradclip.clippers.quantile import QuantileNorm
from gradclip.clippers.skip_above import SkipAbove
from gradclip.clippers.spam import SpikeAware
from gradclip.clippers.spike import SkipOnSpike
from gradclip.clippers.stable_spam import AdaClip, AdaGN
from gradclip.clippers.subset import Subset
from gradclip.clippers.value import Value
from gradclip.clippers.zclip import ZClip

__all__ = [
    "AGC",
    "AdaClip",
    "AdaGC",
    "AdaGN",
    "AutoClip",
    "AverageNorm",
    "BlockRMS",
    "Chain",
    "GlobalNorm",
    "NoClip",
    "NonFinite",
    "Norm",
    "NormSign",
    "QuantileNorm",
    "SkipAbove",
    "SkipOnSpike",
    "SpikeAware",
    "Subset",
    "Value",
    "ZClip",
    "ZeroOutliers",
    "chain",
]
