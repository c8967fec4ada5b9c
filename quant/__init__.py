"""4-bit NF4 weights in bitsandbytes' layout: quantize, dequantize (Triton), a frozen 4-bit linear, a fused
4-bit GEMV for batch-1 decoding. See quant/nf4.py for the format and its rounding rules."""
from .dequant import dequantize_nf4, dequantize_nf4_ref
from .gemv import gemv_nf4, gemv_nf4_ref
from .linear import Linear4bit, LinearNF4Function, linear_nf4, linear_nf4_ref
from .nf4 import NF4_VALUES, NF4Weight, QuantFormatError, dynamic_map, nf4_map, quantize_nf4

__all__ = ["NF4_VALUES", "NF4Weight", "QuantFormatError", "quantize_nf4", "dequantize_nf4", "dequantize_nf4_ref",
           "gemv_nf4", "gemv_nf4_ref", "Linear4bit", "LinearNF4Function", "linear_nf4", "linear_nf4_ref",
           "dynamic_map", "nf4_map"]
