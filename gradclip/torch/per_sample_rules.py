"""Per-example gradient rules: each layer's per-example gradient norms and clipped sum.

A layer's per-example gradient is a function of what the layer saw in the forward pass (its
input ``a``) and the gradient of the loss with respect to its output (``g``). Writing it that way
never builds the autograd graph of ``B`` separate backward passes:

* **Outer products** (Linear, Conv as a Linear over unfolded patches, one product per group): the
  gradient of example ``i`` is ``Σ_t g_it a_itᵀ``. Its squared norm is either the *ghost norm*
  ``⟨a_i a_iᵀ, g_i g_iᵀ⟩`` (Goodfellow 2015; Li et al. 2022, "Large language models can be strong
  differentially private learners"), costing ``O(T²(d + p))``, or the norm of the instantiated
  ``p × d`` matrix, costing ``O(T p d)``; :func:`ghost_cheaper` chooses per layer (Bu et al.
  2023, "Differentially private optimization on large model at small cost", ICML, the
  *book-keeping* rule). The clipped sum is one matmul on the rescaled ``g``: ``Σ_i c_i g_iᵀ a_i``
  (a ghost-normed layer), or the instantiated gradients weighted by ``c``. A convolution's
  per-example gradient is instantiated by its own weight-gradient kernel with the batch folded
  into the groups where that kernel is fast, instead of from unfolded patches.
* **Rows** (Embedding): the gradient of example ``i`` adds ``g_it`` to row ``id_it``; its ghost
  norm is ``Σ_{t,s} [id_it = id_is] ⟨g_it, g_is⟩`` over non-padding positions (any ids, repeated
  or not, contiguous or not).
* **Direct** (biases, LayerNorm, GroupNorm, RMSNorm, the ``torch.func`` fallback): the
  per-example gradient is small or has no structure to exploit; it is instantiated.

Every rule here is checked against ``torch.func`` per-example gradients in fp64
(``tests/test_per_sample_layers.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradclip._core.errors import InvalidArgumentError

__all__ = ["ConvWeight", "Direct", "Outer", "Rows", "contributions", "ghost_cheaper", "refusal", "rule_for"]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision values are widened: per-example norms accumulate in fp32 (DESIGN rule 2)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


#: Elements of the largest full-size temporary a rule makes at once (unfolded patches, a
#: recomputed normalization and its product with the output gradient): 1 MiB in fp32. Such
#: temporaries are built a chunk of examples at a time, so a layer's per-example work adds a
#: bounded amount to the backward pass's peak memory (ghost mode takes norms while the whole
#: graph is retained).
_CHUNK_ELEMENTS = 1 << 18


def _smaller(a: Any, g: Any, samples: Any) -> tuple[Any, Any, Any]:
    """``(a, g, samples)`` with either the instantiated per-example gradients or the input and
    output gradient dropped, whichever holds more (both give the weighted sum)."""
    if samples is None or a is None:
        return a, g, samples
    if samples.numel() <= a.numel() + g.numel():
        return None, None, samples
    return a, g, None


def _chunks(x: torch.Tensor, elements_per_example: int | None = None) -> list[slice]:
    """Slices of the batch (dim 0 of ``x``) whose temporaries hold about ``_CHUNK_ELEMENTS``."""
    batch = x.shape[0]
    per = elements_per_example if elements_per_example is not None else x[0].numel()
    step = max(1, _CHUNK_ELEMENTS // max(per, 1))
    return [slice(i, i + step) for i in range(0, batch, step)]


def _sq_norms(samples: torch.Tensor) -> torch.Tensor:
    """``(B,)`` squared norms of instantiated per-example gradients (one fused reduction, no
    ``B × P`` temporary of squares)."""
    return torch.linalg.vector_norm(samples.reshape(samples.shape[0], -1), dim=1).square()


def _weighted_sum(c: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """``Σ_i c_i samples_i``: one matrix-vector product."""
    b = samples.shape[0]
    return (c.to(samples.dtype) @ samples.reshape(b, -1)).view(samples.shape[1:])


def ghost_cheaper(t: int, p: int, d: int) -> bool:
    """Book-keeping's choice for a weight whose gradient per example (and group) is
    ``Σ_t g_t a_tᵀ``: ``t`` positions, ``g_t`` of size ``p``, ``a_t`` of size ``d``.

    Per example, the ghost norm costs ``T²(p + d)`` (two Gram matrices) and the clipped sum then
    needs the weight-gradient matmul over every position (``T·p·d``); instantiating costs ``T·p·d``
    once and then serves both the norm and the clipped sum (``p·d`` each). Instantiation is
    therefore the faster unless ``T²(p + d) < p·d`` (a handful of positions), but it keeps ``p·d``
    numbers per example until every norm is known, where the ghost path keeps the layer's input
    and output gradient, ``T·(p + d)``. So the ghost norm exactly when ``p·d > T·(p + d)``: that
    covers the faster-ghost case, and implies Bu et al.'s space rule (2023, Sec. 3),
    ``2T² < p·d`` (``p·d > T(p + d) >= 2T·sqrt(p·d)`` gives ``p·d > 4T²``).
    """
    return p * d > t * (p + d)


class Outer:
    """One parameter's gradient per example as ``Σ_t g_t a_tᵀ`` per group.

    Args:
        param: The parameter.
        g: Output gradients, ``(B, G, T, p)``.
        a: Inputs, ``(B, G, T, d)``.
    """

    def __init__(self, param: torch.Tensor, g: torch.Tensor, a: torch.Tensor):
        self.param, self.g, self.a = param, g, a
        self._samples: torch.Tensor | None = None

    def norm_sq(self, how: str = "auto") -> torch.Tensor:
        b, groups, t, p = self.g.shape
        if how == "ghost" or (how == "auto" and ghost_cheaper(t, p, self.a.shape[-1])):
            a = _wide(self.a).reshape(b * groups, t, -1)
            g = _wide(self.g).reshape(b * groups, t, p)
            # ⟨a aᵀ, g gᵀ⟩ per example and group, as two batched matmuls and one reduction.
            gram = torch.bmm(a, a.transpose(1, 2)).mul_(torch.bmm(g, g.transpose(1, 2)))
            return gram.view(b, -1).sum(1)
        return _sq_norms(self.grad_sample())

    def grad_sample(self) -> torch.Tensor:
        if self._samples is None:
            b, groups, t, p = self.g.shape
            g = _wide(self.g).reshape(b * groups, t, p)
            a = _wide(self.a).reshape(b * groups, t, -1)
            if a.stride(-1) != 1:
                # Unfolded patches, stored position-last: the product read with aᵀ contiguous
                # is the faster one (0.68 against 0.99 ms for a 64x3x32x32 input, 3x3 kernel).
                samples = torch.bmm(a.transpose(1, 2), g).transpose(1, 2)
            else:
                samples = torch.bmm(g.transpose(1, 2), a)
            self._samples = samples.reshape(b, *self.param.shape)
        return self._samples

    def weighted(self, c: torch.Tensor) -> torch.Tensor:
        if self._samples is not None:  # instantiated anyway: B·p·d is less than B·T·p·d
            return _weighted_sum(c, self._samples)
        _, groups, _, p = self.g.shape
        g = self.g * c.to(self.g.dtype).view(-1, 1, 1, 1)
        if groups == 1:  # one weight-gradient matmul over all examples and positions
            out = g.reshape(-1, p).t().mm(self.a.reshape(-1, self.a.shape[-1]))
        else:
            out = torch.einsum("bgtp,bgtd->gpd", g, self.a)
        return out.reshape(self.param.shape)

    def compact(self) -> None:
        """Keep only what :meth:`weighted` needs: the instantiated gradients if they were made
        and are the smaller, else ``a`` and ``g`` (ghost mode keeps the pieces above its cut
        until the coefficients are known)."""
        self.a, self.g, self._samples = _smaller(self.a, self.g, self._samples)

    def release(self) -> None:
        self.g = self.a = self._samples = None  # type: ignore[assignment]


class Rows:
    """An embedding table's gradient per example: ``g_t`` added to row ``ids_t``.

    Args:
        param: The ``(V, d)`` table.
        ids: ``(B, T)`` token ids.
        g: ``(B, T, d)`` output gradients.
        padding_idx: Row that receives no gradient, or None.
    """

    def __init__(self, param: torch.Tensor, ids: torch.Tensor, g: torch.Tensor, padding_idx: int | None):
        self.param, self.ids, self.g = param, ids, g
        if padding_idx is not None:
            # Positions holding the padding id get no gradient (nn.Embedding's rule).
            self.g = g * (ids != padding_idx).unsqueeze(-1).to(g.dtype)

    def norm_sq(self, how: str = "auto") -> torch.Tensor:
        if how == "instantiate":
            return self.grad_sample().flatten(1).pow(2).sum(1)
        g = _wide(self.g)
        same = (self.ids.unsqueeze(2) == self.ids.unsqueeze(1)).to(g.dtype)
        return (same * (g @ g.transpose(1, 2))).sum(dim=(1, 2))

    def grad_sample(self) -> torch.Tensor:
        b = self.ids.shape[0]
        rows, d = self.param.shape
        g = _wide(self.g)
        out = torch.zeros(b * rows, d, dtype=g.dtype, device=g.device)
        offsets = (torch.arange(b, device=g.device) * rows).unsqueeze(1)
        out.index_add_(0, (self.ids + offsets).reshape(-1), g.reshape(-1, d))
        return out.view(b, rows, d)

    def weighted(self, c: torch.Tensor) -> torch.Tensor:
        d = self.param.shape[1]
        g = self.g * c.to(self.g.dtype).view(-1, 1, 1)
        out = torch.zeros(self.param.shape, dtype=g.dtype, device=g.device)
        return out.index_add_(0, self.ids.reshape(-1), g.reshape(-1, d))

    def compact(self) -> None:
        """Nothing to drop: ids and output gradients are all :meth:`weighted` reads."""

    def release(self) -> None:
        self.ids = self.g = None  # type: ignore[assignment]


class Direct:
    """An instantiated per-example gradient ``(B, *param.shape)``."""

    def __init__(self, param: torch.Tensor, samples: torch.Tensor):
        self.param, self.samples = param, samples

    def norm_sq(self, how: str = "auto") -> torch.Tensor:
        return _sq_norms(_wide(self.samples))

    def grad_sample(self) -> torch.Tensor:
        return _wide(self.samples)

    def weighted(self, c: torch.Tensor) -> torch.Tensor:
        return _weighted_sum(c, self.samples)

    def compact(self) -> None:
        """Nothing to drop: the gradients are all it holds."""

    def release(self) -> None:
        self.samples = None  # type: ignore[assignment]


# -- the layers ------------------------------------------------------------------------------


def _trainable(p: torch.Tensor | None) -> bool:
    return p is not None and p.requires_grad


def _linear(m: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> list[Any]:
    b = a.shape[0]
    a3 = a.reshape(b, 1, -1, a.shape[-1])  # any number of leading dims: positions are T
    g3 = g.reshape(b, 1, -1, g.shape[-1])
    out: list[Any] = []
    if _trainable(m.weight):
        out.append(Outer(m.weight, g3, a3))
    if _trainable(m.bias):
        out.append(Direct(m.bias, g3.sum(dim=(1, 2))))
    return out


def _embedding(m: nn.Embedding, ids: torch.Tensor, g: torch.Tensor) -> list[Any]:
    if not _trainable(m.weight):
        return []
    b = ids.shape[0]
    return [Rows(m.weight, ids.reshape(b, -1), g.reshape(b, -1, g.shape[-1]), m.padding_idx)]


def _padded(m: nn.modules.conv._ConvNd, a: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The input and the padding to hand a convolution kernel: the module's own symmetric zero
    padding as is (the kernel pads on the fly), any other (``'same'`` with an odd total,
    reflect, circular) applied to a copy of the input."""
    pads = m._reversed_padding_repeated_twice  # (left, right) per spatial dim, last dim first
    nd = a.dim() - 2
    if m.padding_mode == "zeros" and pads[0::2] == pads[1::2]:
        return a, [pads[2 * (nd - 1 - i)] for i in range(nd)]
    return _pad(m, a), [0] * nd


def _pad(m: nn.modules.conv._ConvNd, a: torch.Tensor) -> torch.Tensor:
    """The input padded as the convolution pads it (any ``padding_mode``, ``'same'`` included)."""
    pads = m._reversed_padding_repeated_twice
    if not any(pads):
        return a
    return F.pad(a, pads, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)


def _unfold(m: nn.modules.conv._ConvNd, a: torch.Tensor) -> torch.Tensor:
    """Patches ``(B, C_in·K, L)`` in the order of ``weight.reshape(C_out, -1)``, for 1-3 spatial
    dims: padding (any ``padding_mode``, ``'same'`` included), stride and dilation as the
    convolution applies them. Strided windows and one copy: faster than ``F.unfold``'s im2col
    on CPU (10 ms against 18 ms for a 64x16x32x32 input), and any number of spatial dims."""
    x = _pad(m, a)
    nd = a.dim() - 2
    for i in range(nd):
        k, s, d = m.kernel_size[i], m.stride[i], m.dilation[i]
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
    # (B, C, L1..Ln, k1..kn) -> (B, C, k1..kn, L1..Ln)
    order = [0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd)]
    return x.permute(order).reshape(a.shape[0], a.shape[1] * math.prod(m.kernel_size), -1)


def _conv_weight_grad(m: nn.modules.conv._ConvNd, a: torch.Tensor, g: torch.Tensor, per_example: bool) -> torch.Tensor:
    """The weight gradient of one call of ``m`` (input ``a``, output gradient ``g``) by the
    convolution's own backward kernel, the one autograd runs.

    ``per_example``: the batch is folded into the channels, ``B·G`` groups of one example each,
    so the kernel returns every example's gradient, ``(B, *weight.shape)`` (Rochette et al. 2019,
    "Efficient per-example gradient computations in convolutional neural networks"): the same
    multiply-adds as the batch's weight gradient, and no unfolded patches."""
    a, padding = _padded(m, a)
    shape, groups, b = m.weight.shape, m.groups, a.shape[0]
    if per_example:
        a = a.reshape(1, -1, *a.shape[2:])
        g = g.reshape(1, -1, *g.shape[2:])
        shape, groups = (b * shape[0], *shape[1:]), b * groups
    weight = g.new_empty(shape)  # only its shape is read (an expanded one would be copied)
    nd = len(m.kernel_size)
    out = torch.ops.aten.convolution_backward(
        g, a, weight, None, list(m.stride), padding, list(m.dilation), False, [0] * nd, groups, [False, True, False]
    )[1]
    return out.view(b, *m.weight.shape) if per_example else out


#: Fewest input channels per group for which the folded kernel beats unfolded patches and a
#: batched matmul. Measured on CPU (oneDNN, which blocks channels by 8 or 16: with fewer it takes
#: a slow path): 4.3x faster at 8 channels, 17x at 16 for 3x3 kernels; 2x slower at 1-4 channels,
#: and for 1x1 kernels, whose patches are the input itself.
_FOLD_MIN_CHANNELS = 8


class ConvWeight:
    """A convolution's weight gradient per example: :class:`Outer` over unfolded patches for the
    ghost norm, the folded weight-gradient kernel (:func:`_conv_weight_grad`) to instantiate
    where it is faster, and the ordinary weight-gradient kernel on the rescaled output gradients
    for the clipped sum of a ghost-normed layer: patches are built only for a ghost norm or
    where folding is slow.

    Args:
        module: The convolution.
        a: Its input, ``(B, C_in, *S)``.
        g: Its output gradient, ``(B, C_out, *L)``.
    """

    def __init__(self, module: nn.modules.conv._ConvNd, a: torch.Tensor, g: torch.Tensor):
        self.module, self.param, self.a, self.g = module, module.weight, a, g
        self._samples: torch.Tensor | None = None

    def _outers(self) -> Iterator[Outer]:
        """:class:`Outer` over the unfolded patches, one chunk of examples at a time."""
        m, groups = self.module, self.module.groups
        patch_elements = self.param[0].numel() * groups * math.prod(self.g.shape[2:])  # C_in K L
        for rows in _chunks(self.a, patch_elements):
            a, g = self.a[rows], self.g[rows]
            b = a.shape[0]
            patches = _unfold(m, a)  # (b, C_in K, L)
            length = patches.shape[-1]
            # Transposed views, no copies: the batched matmuls read them with strides.
            patches = patches.view(b, groups, -1, length).transpose(2, 3)  # (b, G, L, C_in/G K)
            gg = g.reshape(b, groups, m.out_channels // groups, -1).transpose(2, 3)  # (b, G, L, C_out/G)
            yield Outer(self.param, gg, patches)

    def norm_sq(self, how: str = "auto") -> torch.Tensor:
        m = self.module
        t = math.prod(self.g.shape[2:])
        p, d = m.out_channels // m.groups, self.param[0].numel()
        if how == "ghost" or (how == "auto" and ghost_cheaper(t, p, d)):
            return torch.cat([outer.norm_sq("ghost") for outer in self._outers()])
        return _sq_norms(self.grad_sample())

    def grad_sample(self) -> torch.Tensor:
        if self._samples is None:
            m = self.module
            if m.in_channels // m.groups >= _FOLD_MIN_CHANNELS and math.prod(m.kernel_size) > 1:
                self._samples = _conv_weight_grad(m, _wide(self.a), _wide(self.g), per_example=True)
            else:
                self._samples = torch.cat([outer.grad_sample() for outer in self._outers()])
        return self._samples

    def weighted(self, c: torch.Tensor) -> torch.Tensor:
        if self._samples is not None:
            return _weighted_sum(c, self._samples)
        g = self.g * c.to(self.g.dtype).view(-1, *([1] * (self.g.dim() - 1)))
        return _conv_weight_grad(self.module, self.a, g, per_example=False)

    def compact(self) -> None:
        """As :meth:`Outer.compact`."""
        self.a, self.g, self._samples = _smaller(self.a, self.g, self._samples)

    def release(self) -> None:
        self.a = self.g = self._samples = None  # type: ignore[assignment]


def _conv(m: nn.modules.conv._ConvNd, a: torch.Tensor, g: torch.Tensor) -> list[Any]:
    nd = len(m.kernel_size)
    if a.dim() != nd + 2:
        raise InvalidArgumentError(
            f"PerSample: {type(m).__name__} got an unbatched input of shape {tuple(a.shape)}; per-example "
            "clipping needs a leading batch dimension"
        )
    b = a.shape[0]
    out: list[Any] = []
    if _trainable(m.weight):
        out.append(ConvWeight(m, a, g))
    if _trainable(m.bias):
        out.append(Direct(m.bias, g.reshape(b, m.out_channels, -1).sum(2)))
    return out


def _affine(m: nn.Module, normalize: Any, a: torch.Tensor, g: torch.Tensor, keep: int) -> list[Any]:
    """Weight and bias of a normalization layer: ``Σ g·x̂`` and ``Σ g`` over the dims that the
    affine parameters broadcast across (all but the batch and the ``keep`` trailing ones, or the
    channel dim for GroupNorm: ``keep = -1``). ``x̂ = normalize(a)`` is recomputed a chunk of
    examples at a time (each example is normalized on its own)."""
    if keep == -1:  # GroupNorm: parameters per channel, dim 1
        dims = tuple(range(2, g.dim()))
    else:
        dims = tuple(range(1, g.dim() - keep))
    out: list[Any] = []
    weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
    if _trainable(weight):
        sums = []
        for rows in _chunks(a):
            prod = _wide(g[rows]) * _wide(normalize(a[rows]))
            sums.append(prod.sum(dims) if dims else prod)
        out.append(Direct(weight, torch.cat(sums)))
    if _trainable(bias):
        out.append(Direct(bias, _wide(g).sum(dims) if dims else _wide(g)))
    return out


def _layer_norm(m: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor) -> list[Any]:
    return _affine(m, lambda x: F.layer_norm(x, m.normalized_shape, None, None, m.eps), a, g, len(m.normalized_shape))


def _rms_norm(m: nn.Module, a: torch.Tensor, g: torch.Tensor) -> list[Any]:
    return _affine(m, lambda x: F.rms_norm(x, m.normalized_shape, None, m.eps), a, g, len(m.normalized_shape))


def _group_norm(m: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor) -> list[Any]:
    return _affine(m, lambda x: F.group_norm(x, m.num_groups, None, None, m.eps), a, g, -1)


_RULES: dict[type, Any] = {
    nn.Linear: _linear,
    nn.Embedding: _embedding,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: _group_norm,
}
if hasattr(nn, "RMSNorm"):
    _RULES[nn.RMSNorm] = _rms_norm


def rule_for(module: nn.Module) -> Any:
    """The rule for this module's exact type (a subclass may change ``forward``), or None.

    ``NonDynamicallyQuantizableLinear`` (the output projection of ``nn.MultiheadAttention``) is a
    Linear in every way that matters here."""
    rule = _RULES.get(type(module))
    if rule is None and type(module).__name__ == "NonDynamicallyQuantizableLinear":
        rule = _linear
    return rule


#: Layers whose output for one example depends on the others in training mode, or whose
#: per-example gradients are not supported: the reason given in the error.
_MIXING = (nn.modules.batchnorm._BatchNorm,)
_RECURRENT = (nn.RNNBase,)


def refusal(name: str, module: nn.Module) -> str | None:
    """Why per-example clipping cannot handle this module (None when it can).

    BatchNorm mixes the examples of a batch (its statistics), so one example's gradient depends
    on every other example and no per-example bound holds (Opacus refuses it for the same
    reason); recurrent layers run fused kernels whose per-step inputs are not visible."""
    label = f"{name or 'the model'} ({type(module).__name__})"
    if isinstance(module, _MIXING) and any(p.requires_grad for p in module.parameters(recurse=False)):
        return (
            f"{label} mixes the examples of a batch (batch statistics), so per-example gradients are not "
            "defined; replace it with GroupNorm or LayerNorm (or freeze it and use eval mode)"
        )
    if isinstance(module, _MIXING) and module.training and module.track_running_stats:
        return (
            f"{label} normalizes with batch statistics in training mode, which mixes examples; replace it "
            "with GroupNorm or LayerNorm, or put it in eval mode"
        )
    if isinstance(module, _RECURRENT):
        return (
            f"{label} is a fused recurrent layer whose per-step inputs are not visible to hooks; per-example "
            "clipping does not support it (use opacus.layers.DPLSTM/DPGRU, built from Linear layers)"
        )
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return f"{label} has max_norm={module.max_norm}, which rewrites the table during the forward pass"
    if isinstance(module, nn.Embedding) and module.sparse:
        return f"{label} has sparse=True; per-example clipping writes dense gradients"
    if isinstance(module, nn.EmbeddingBag):
        return f"{label} has no per-example rule (an EmbeddingBag pools examples' rows)"
    return None


def contributions(module: nn.Module, rule: Any, args: tuple, grads: tuple) -> list[Any]:
    """The per-parameter contributions of one call of a module with a rule."""
    return rule(module, args[0].detach(), grads[0])
