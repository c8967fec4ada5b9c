"""Frozen 4-bit linear layer: y = x W^T + b with W held as an NF4Weight and never stored in 16 bits.

Forward: W = dequantize(x.dtype) into a temporary, y = x W^T (+ b), the temporary freed.
Backward (W frozen, so no dW):
  y = x W^T + b  =>  dx = dy W      (W dequantized again, in dy's dtype)
                     db = sum over all leading dims of dy   (only when the bias requires grad)
Only the NF4Weight (packed bytes and statistics) is kept for the backward: no 16-bit copy of W persists
between the passes, which is the memory saving of QLoRA.

A single input row (batch-1 decoding) without autograd takes the fused 4-bit GEMV (quant/gemv.py) instead of
dequantize + matmul; the result is the same math up to the order of the fp32 sum.
"""
import torch
from torch import nn

from ..kernels._dispatch import pick_backend
from .gemv import gemv_nf4
from .nf4 import NF4Weight, quantize_nf4


class LinearNF4Function(torch.autograd.Function):
    """Glue only: the math is in the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, backend):
        ctx.weight, ctx.backend = weight, backend
        ctx.has_bias = bias is not None
        w = weight.dequantize(x.dtype, backend=backend)
        return torch.nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, dy):
        dx = db = None
        if ctx.needs_input_grad[0]:
            # dx = dy W
            dx = dy @ ctx.weight.dequantize(dy.dtype, backend=ctx.backend)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            # db = sum of dy over every leading dim
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, None, db, None


def linear_nf4_ref(x, weight: NF4Weight, bias=None):
    """Pure torch: F.linear on the weight dequantized (reference backend) to x.dtype."""
    return torch.nn.functional.linear(x, weight.dequantize(x.dtype, backend="ref"), bias)


def linear_nf4(x, weight: NF4Weight, bias=None, backend=None):
    """y = x @ dequant(weight)^T + bias, differentiable in x (and bias), never in the weight.
    backend: None (Triton for CUDA tensors, the torch reference elsewhere), "triton" or "ref"."""
    if x.shape[-1] != weight.shape[-1] or len(weight.shape) != 2:
        raise ValueError(f"x.shape[-1]={x.shape[-1]} does not match the weight's in_features "
                         f"(weight shape {tuple(weight.shape)})")
    backend = pick_backend(backend, x)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if x.numel() == x.shape[-1] > 0 and not needs_grad:  # one row: batch-1 decoding
        y = gemv_nf4(x, weight, backend=backend)
        return y + bias.to(y.dtype) if bias is not None else y
    return LinearNF4Function.apply(x, weight, bias, backend)


class Linear4bit(nn.Module):
    """A frozen linear layer on an NF4 weight (bitsandbytes' Linear4bit layout), with an optional bias.

    The NF4 buffers are registered as non-persistent module buffers (so `.to(device)`/`.cuda()` move them) and
    `self.weight` rebuilds the NF4Weight view over them. The fp32 statistics are registered as their int32 bit
    patterns: `module.to(torch.bfloat16)` casts every floating-point buffer and would round them. The buffers
    stay out of `state_dict()`: the 4-bit format on disk is bitsandbytes', written by
    `self.weight.to_bnb(prefix)` and read by `Linear4bit.from_bnb`.
    """

    _BUFFERS = ("packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")

    def __init__(self, weight: NF4Weight, bias=None):
        super().__init__()
        if not isinstance(weight, NF4Weight) or len(weight.shape) != 2:
            raise ValueError(f"weight must be a 2-D NF4Weight, got {type(weight).__name__} "
                             f"{getattr(weight, 'shape', '')}")
        self.out_features, self.in_features = weight.shape
        self._meta = dict(shape=weight.shape, dtype=weight.dtype, blocksize=weight.blocksize,
                          nested_blocksize=weight.nested_blocksize)
        for name in self._BUFFERS:
            t = getattr(weight, name)
            if t is not None and t.dtype == torch.float32:
                t = t.view(torch.int32)  # bit pattern, immune to module dtype casts
            self.register_buffer("weight_" + name, t, persistent=False)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.bias = bias

    @property
    def weight(self) -> NF4Weight:
        bufs = {}
        registered = self._buffers  # a plain dict: nn.Module.__getattr__ costs ~3 us a name, once per forward
        for name in self._BUFFERS:
            t = registered["weight_" + name]
            bufs[name] = t.view(torch.float32) if t is not None and t.dtype == torch.int32 else t
        # validated in __init__; .to(device) moves every buffer together and dtype casts skip them (int/uint8)
        return NF4Weight._trusted(**self._meta, **bufs)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize=64, double_quant=True) -> "Linear4bit":
        """Quantizes a dense nn.Linear (on its own device); the bias is kept as it is."""
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        return cls(quantize_nf4(linear.weight.detach(), blocksize, double_quant), bias)

    @classmethod
    def from_bnb(cls, tensors: dict, prefix: str = "", bias=None) -> "Linear4bit":
        """From bitsandbytes-format tensors (`prefix + "weight"`, `prefix + "weight.absmax"`, ...); the bias, a
        plain 16-bit tensor in those checkpoints, is `tensors[prefix + "bias"]` when present."""
        if bias is None and prefix + "bias" in tensors:
            bias = tensors[prefix + "bias"]
        return cls(NF4Weight.from_bnb(tensors, prefix), bias)

    def forward(self, x, backend=None):
        return linear_nf4(x, self.weight, self.bias, backend=backend)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self._meta['blocksize']}")
