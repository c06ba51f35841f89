"""PyTorch front end: drop-ins for ``torch.nn.utils`` and in-place helpers.

``import gradclip.torch as gct`` imports torch (this module is the one place where that is
expected). The drop-ins give the same results as ``torch.nn.utils.clip_grad_norm_`` and
``clip_grad_value_`` on finite inputs, with the fixes listed in DESIGN.md.
"""

from gradclip.torch.clip import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
from gradclip.torch.optim import ClippedOptimizer, fold_unsupported_reason
from gradclip.torch.dp import DPOptimizer, PoissonBatchSampler, poisson_loader
from gradclip.torch.per_sample import PerSample

__all__ = [
    "ClippedOptimizer",
    "DPOptimizer",
    "PerSample",
    "PoissonBatchSampler",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "fold_unsupported_reason",
    "get_total_norm",
    "poisson_loader",
]
