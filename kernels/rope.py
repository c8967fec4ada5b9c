"""Rotary position embedding, rotate-half convention (Hugging Face's):
  out = x * cos + rotate_half(x) * sin,  rotate_half([x1, x2]) = [-x2, x1]
q: (B, T, Hq, D), k: (B, T, Hk, D); cos, sin: (P, D // 2) fp32 tables (any rope scaling already applied,
attention scaling folded in); position_ids: (B, T) integer rows into the tables.
"""
import torch

from ._dispatch import pick_backend


def _rotate(x, cos, sin):
    # cos/sin: (B, T, 1, D/2); computed in fp32 and rounded once.
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rope_ref(q, k, cos, sin, position_ids):
    c = cos[position_ids].unsqueeze(2)
    s = sin[position_ids].unsqueeze(2)
    return _rotate(q, c, s), _rotate(k, c, s)


def apply_rope(q, k, cos, sin, position_ids, backend=None):
    if pick_backend(backend, q) == "ref":
        return rope_ref(q, k, cos, sin, position_ids)
    raise NotImplementedError("Triton rope: issue 3")
