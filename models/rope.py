"""RoPE frequencies for every scaling type, as tensors (no host sync: dynamic NTK and longrope read the sequence
length from position_ids on the device).

Formulas follow transformers' modeling_rope_utils (default, linear, dynamic, llama3, yarn, longrope), which in turn
cite: linear = Chen et al. 2023 (position interpolation); dynamic = /u/emozilla's dynamic NTK; llama3 = Meta's
Llama 3.1 reference code; yarn = Peng et al. 2023 (arXiv 2309.00071); longrope = Ding et al. 2024 (arXiv
2402.13753) as shipped with Phi-3. Every float expression is evaluated in the same order and dtype as there, so
fp32 results agree bit for bit.

Partial rotary (Phi-4-mini's partial_rotary_factor): frequencies cover only the first
int(head_dim * partial_rotary_factor) channels of a head; the decoder rotates that slice and passes the rest.
"""
import math

import torch


def rotary_dim(rope: dict, head_dim: int) -> int:
    """Channels of each head that RoPE rotates (transformers: int(head_dim * partial_rotary_factor))."""
    return int(head_dim * rope.get("partial_rotary_factor", 1.0))


def _base_inv_freq(base, dim, device):
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def _yarn(rope, base, dim, max_position_embeddings, device):
    """YaRN: interpolate low frequencies (by `factor`), keep high ones, blend linearly in between; the cos/sin
    tables are multiplied by an attention factor 0.1 ln(factor) + 1 (or mscale ratio, DeepSeek style)."""
    old_len = rope["original_max_position_embeddings"]
    factor = rope.get("factor")
    if factor is None:  # DeepSeek-V3 style configs: the ratio of the context lengths
        factor = max_position_embeddings / old_len

    def get_mscale(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations):  # the channel whose wavelength fits `rotations` times in the old context
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    # written as transformers does ((1 - ramp) twice), which is not bitwise the same as using `ramp` directly
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, attention_factor


def _longrope(rope, base, dim, max_position_embeddings, device):
    """LongRoPE: per-channel rescaling factors, `short_factor` while the sequence fits the pretraining context
    and `long_factor` beyond it, and cos/sin times sqrt(1 + ln(factor) / ln(original context)). Returns
    ((short, long) inv_freq, attention factor); _longrope_select picks per row.

    transformers picks the factor set per forward call from max(position_ids) + 1 > original (so during
    generation it switches once the sequence crosses the original length; cached keys keep the rotation they were
    made with). Here the choice is per batch row (each row's own max position): identical to transformers for a
    single sequence, and a left-padded batch behaves like each of its prompts run alone."""
    old_len = rope["original_max_position_embeddings"]
    factor = rope.get("factor")
    if factor is None:  # Phi-3: the ratio of the extended to the original context
        factor = max_position_embeddings / old_len
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    short = 1.0 / (torch.tensor(rope["short_factor"], dtype=torch.float32, device=device) * base ** shape)
    long = 1.0 / (torch.tensor(rope["long_factor"], dtype=torch.float32, device=device) * base ** shape)
    return (short, long), attention_factor


def _longrope_select(rope, short, long, position_ids):
    if position_ids is None:
        return short
    seq_len = position_ids.amax(-1, keepdim=True)[..., None] + 1  # (B, 1, 1)
    return torch.where(seq_len > rope["original_max_position_embeddings"], long, short)  # (B, 1, dim/2)


def rope_static(rope: dict, head_dim: int, max_position_embeddings: int, device=None):
    """The part of the rotary frequencies that does not depend on the positions: (tables, attention scaling),
    tables = inv_freq fp32 (rotary_dim/2,), or longrope's (short, long) pair. A model computes it once per device
    (models/decoder.py); rope_select finishes it per forward."""
    kind = rope["rope_type"]
    base = rope["rope_theta"]
    dim = rotary_dim(rope, head_dim)
    if kind in ("default", "dynamic"):
        return _base_inv_freq(base, dim, device), 1.0
    if kind == "linear":
        return _base_inv_freq(base, dim, device) / rope["factor"], 1.0
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
    if kind == "yarn":
        return _yarn(rope, base, dim, max_position_embeddings, device)
    if kind == "longrope":
        return _longrope(rope, base, dim, max_position_embeddings, device)
    raise NotImplementedError(f"rope_type {kind!r}")  # config.py rejects unknown types before this point


def rope_select(rope: dict, tables, head_dim: int, max_position_embeddings: int, position_ids=None):
    """inv_freq for these positions from rope_static's tables: (rotary_dim/2,), or (B, 1, rotary_dim/2) when it
    depends on each row's length (longrope with position_ids (B, T))."""
    kind = rope["rope_type"]
    if kind == "longrope":
        return _longrope_select(rope, *tables, position_ids)
    if kind == "dynamic" and position_ids is not None:
        # base' = base * (factor * L / max_pos - (factor - 1)) ** (dim / (dim - 2)), L = max(seq_len, max_pos).
        # L is a device tensor, as in transformers' forward-time update, so there is no .item().
        factor, dim = rope["factor"], rotary_dim(rope, head_dim)
        seq_len = position_ids.max() + 1
        seq_len = torch.maximum(seq_len, torch.tensor(max_position_embeddings, dtype=seq_len.dtype,
                                                      device=seq_len.device))
        base = rope["rope_theta"] * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim, tables.device)
    return tables


def rope_inv_freq(rope: dict, head_dim: int, max_position_embeddings: int, position_ids=None, device=None):
    """Returns (inv_freq fp32, attention_scaling python float). inv_freq is (rotary_dim/2,), or (B, 1, rotary_dim/2)
    when it depends on each row's length (longrope with position_ids (B, T))."""
    tables, scaling = rope_static(rope, head_dim, max_position_embeddings, device)
    return rope_select(rope, tables, head_dim, max_position_embeddings, position_ids), scaling


def rope_tables(inv_freq, attention_scaling, positions):
    """cos, sin of positions[..., None] * inv_freq, fp32, times the attention scaling (longrope / yarn).
    positions (B, T); inv_freq (d,) or (B, 1, d). Returns (B * T, d) tables, row b * T + t for token (b, t)."""
    freqs = positions.float()[..., None] * inv_freq
    freqs = freqs.reshape(-1, freqs.shape[-1])
    return freqs.cos() * attention_scaling, freqs.sin() * attention_scaling
