"""Every clipping method, one module per family, each written once against the Ops protocol.

Importing this package registers every built-in method with :mod:`gradclip._core.registry`.
"""

from gradclip.clippers.chain import Chain, chain
from gradclip.clippers.norm import AverageNorm, BlockRMS, GlobalNorm, Norm, NormSign
from gradclip.clippers.outliers import ZeroOutliers
from gradclip.clippers.value import Value

__all__ = [
    "AverageNorm",
    "BlockRMS",
    "Chain",
    "GlobalNorm",
    "Norm",
    "NormSign",
    "Value",
    "ZeroOutliers",
    "chain",
]
