"""Fused ops, one per file. Each public op takes backend=None (auto: Triton on CUDA, `_ref` elsewhere)."""
from .attention import attention, attention_doc_tables, attention_ref
from .cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from .geglu import geglu, geglu_ref
from .rms_norm import rms_norm, rms_norm_ref, rms_norm_residual, rms_norm_residual_ref
from .rope import apply_rope, rope_ref
from .swiglu import swiglu, swiglu_ref
