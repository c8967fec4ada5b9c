"""Mistral 7B v0.1 / v0.2 / v0.3, Mistral NeMo, Ministral-style dense checkpoints (model_type "mistral").

A Llama with a sliding window on every layer: v0.1 has `sliding_window` 4096, v0.2+ have null (full attention).
transformers' MistralConfig defaults sliding_window to 4096 when the key is absent. Projections carry no bias
whatever the config says (MistralAttention / MistralMLP hard-code bias=False). NeMo's explicit head_dim (128 with
hidden 5120 and 32 heads) is a common field.
"""
MODEL_TYPES = ("mistral",)

IGNORED_KEYS = (r"(^|\.)rotary_emb\.inv_freq$",)

RENAMES = ()

SPLITS = {}


def config_flags(hf: dict, where: str) -> dict:
    return dict(
        sliding_window=hf.get("sliding_window", 4096),  # every layer slides (layer_types None)
        qkv_bias=False, o_bias=False, mlp_bias=False,
    )
