"""RoPE frequencies for every scaling type, as tensors (no host sync: dynamic NTK reads the sequence length
from position_ids on the device).

Formulas follow transformers' modeling_rope_utils (default, linear, dynamic, llama3, yarn, longrope), which in turn
cite: linear = Chen et al. 2023 (position interpolation); dynamic = /u/emozilla's dynamic NTK; llama3 = Meta's
Llama 3.1 reference code; yarn = Peng et al. 2023; longrope = Ding et al. 2024 / Phi-3. Every float expression is
evaluated in the same order and dtype as there, so fp32 results agree bit for bit.
"""
import math

import torch


def _base_inv_freq(base, dim, device):
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def rope_inv_freq(rope: dict, head_dim: int, max_position_embeddings: int, position_ids=None, device=None):
    """Returns (inv_freq fp32 (head_dim/2,), attention_scaling python float)."""
    kind = rope["rope_type"]
    base = rope["rope_theta"]
    dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    if kind == "default":
        return _base_inv_freq(base, dim, device), 1.0
    if kind == "linear":
        return _base_inv_freq(base, dim, device) / rope["factor"], 1.0
    if kind == "dynamic":
        # base' = base * (factor * L / max_pos - (factor - 1)) ** (dim / (dim - 2)), L = max(seq_len, max_pos).
        # L is a device tensor, as in transformers' forward-time update, so there is no .item().
        factor = rope["factor"]
        if position_ids is None:
            return _base_inv_freq(base, dim, device), 1.0
        seq_len = position_ids.max() + 1
        seq_len = torch.maximum(seq_len, torch.tensor(max_position_embeddings, dtype=seq_len.dtype,
                                                      device=seq_len.device))
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim, device), 1.0
    if kind == "llama3":
        inv_freq = _base_inv_freq(base, dim, device)
        factor = rope["factor"]
        low, high = rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise NotImplementedError(f"rope_type {kind!r}")  # yarn / longrope arrive with the families that use them


def rope_tables(inv_freq, attention_scaling, positions):
    """cos, sin of positions[..., None] * inv_freq, fp32, times the attention scaling (longrope / yarn)."""
    freqs = positions.float()[..., None] * inv_freq
    return freqs.cos() * attention_scaling, freqs.sin() * attention_scaling
