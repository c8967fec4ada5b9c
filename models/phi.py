"""Phi-3 / Phi-3.5 mini and medium, Phi-4 and Phi-4-mini (all model_type "phi3").

- q/k/v and gate/up are fused in the checkpoint (`self_attn.qkv_proj`, rows q then k then v; `mlp.gate_up_proj`,
  rows gate then up: Phi3MLP does `gate, up = chunk(2)`). They load into the separate modules the decoder has
  and export concatenates them back, both from SPLITS (models/weights.py); row counts come from the model.
- RoPE `longrope` (`su` in the first releases, and `yarn` in some: Phi3Config maps both to longrope) with
  short/long factors chosen by sequence length against original_max_position_embeddings (kept top-level in
  Phi-3 configs, and it wins over the rope dict's), and the attention factor on cos/sin (models/rope.py).
- partial_rotary_factor (Phi-4-mini 0.75): only the first channels of each head rotate.
- `sliding_window` on every layer when set (Phi-3-mini-4k: 2047); RMSNorm eps default 1e-5; no biases.
- embd_pdrop / resid_pdrop are training dropouts of the base model (0.0 in the released configs); not applied.
"""
from .config import read_rope

MODEL_TYPES = ("phi3",)

IGNORED_KEYS = (r"(^|\.)rotary_emb\.inv_freq$",)

RENAMES = ()

# fused checkpoint tensor (key suffix) -> the module tensors it holds, in row order
SPLITS = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


def config_flags(hf: dict, where: str) -> dict:
    # Phi3Config declares original_max_position_embeddings and max_position_embeddings (both default 4096), so
    # the top-level value always exists there and takes priority over the rope dict's.
    hf = dict(hf, original_max_position_embeddings=hf.get("original_max_position_embeddings", 4096),
              max_position_embeddings=hf.get("max_position_embeddings", 4096))
    rope = read_rope(hf, where)
    if rope["rope_type"] in ("su", "yarn"):  # Phi3Config.convert_rope_params_to_dict
        rope = read_rope(hf, where, params=dict(rope, rope_type="longrope"))
    return dict(rope=rope, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                max_position_embeddings=int(hf["max_position_embeddings"]),
                sliding_window=hf.get("sliding_window"),
                qkv_bias=False, o_bias=False, mlp_bias=False)
