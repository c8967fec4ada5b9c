"""Qwen2 / Qwen2.5 (model_type "qwen2") and Qwen3 dense (model_type "qwen3").

Qwen2: bias on q/k/v but not on o_proj nor the MLP (hard-coded in Qwen2Attention / Qwen2MLP); small sizes tie
the embeddings. Qwen3: per-head RMSNorm on q and k (Llama-style casting, no offset) before RoPE, head_dim from the
config (128 when absent, Qwen3Config's default), biases only where `attention_bias` says (all four projections).
Both: a sliding window only when `use_sliding_window` is true (released checkpoints have it false although they
carry a `sliding_window` value), on layers i >= max_window_layers unless `layer_types` lists them; long-context
variants use yarn rope scaling (config.py / rope.py).
"""
MODEL_TYPES = ("qwen2", "qwen3")

IGNORED_KEYS = (r"(^|\.)rotary_emb\.inv_freq$",)

RENAMES = ()

SPLITS = {}


def _sliding(hf: dict) -> dict:
    """transformers' Qwen2Config / Qwen3Config __post_init__: window only when use_sliding_window; layer kinds from
    layer_types, else sliding from max_window_layers (default 28) on."""
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first = hf.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                       for i in range(int(hf["num_hidden_layers"]))]
    return dict(sliding_window=window, layer_types=tuple(layer_types))


def config_flags(hf: dict, where: str) -> dict:
    flags = _sliding(hf)
    flags["mlp_bias"] = False
    if hf["model_type"] == "qwen2":
        flags.update(qkv_bias=True, o_bias=False)
    else:  # qwen3
        flags.update(qk_norm=True, head_dim=int(hf.get("head_dim") or 128))
    return flags
