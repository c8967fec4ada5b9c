"""Llama 2 / 3 / 3.1 / 3.2 (and SmolLM2, which is a Llama): the baseline every other family deviates from.

Quirks covered by common fields: GQA (num_key_value_heads), explicit head_dim, tied embeddings, attention_bias,
mlp_bias, rope scaling (llama3, linear, dynamic) read in config.py / rope.py.
"""
MODEL_TYPES = ("llama",)

# Checkpoint keys that carry nothing we need (old checkpoints saved the rotary buffer).
IGNORED_KEYS = (r"(^|\.)rotary_emb\.inv_freq$",)

# Checkpoint key prefix -> module prefix, as (regex, replacement) (none: the keys are the module paths already;
# Gemma 3's multimodal checkpoints use this).
RENAMES = ()

# Fused checkpoint tensors that load into separate modules (none for Llama; Phi-3 uses this).
SPLITS = {}


def config_flags(hf: dict, where: str) -> dict:
    return {}
