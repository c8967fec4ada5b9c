"""Gemma 1 ("gemma"), Gemma 2 ("gemma2") and Gemma 3 text ("gemma3_text"; 270M, 1B).

All three (transformers' modeling_gemma*.py):
- RMSNorm scales by (1 + w), all in fp32, cast at the end (norm_offset 1, norm_casting "gemma").
- embeddings times sqrt(hidden_size), that normalizer rounded to the model dtype first (embed_scale).
- GeGLU MLP with the tanh GELU; head_dim explicit (256 in the released sizes, and the config default); tied
  embeddings by default.
Gemma 1 reads `hidden_act` and maps the legacy "gelu" of the official configs to the tanh approximation
(GemmaConfig.__post_init__); Gemma 2 / 3 read `hidden_activation`.
Gemma 2: attention-logit softcap (50) and final-logit softcap (30), attention scale query_pre_attn_scalar ** -0.5,
sliding window (4096) on alternate layers starting with layer 0, norms after attention and around the MLP.
Gemma 3: per-head q/k RMSNorm before RoPE (same (1 + w) norm), no softcaps, sliding layers from `layer_types`
or the legacy `sliding_window_pattern` (default 6: five sliding, one global), and two RoPEs: sliding layers use
`rope_local_base_freq` (10k) unscaled, global layers `rope_theta` (1M) with the config's scaling (linear 8 on the
4B+ text towers). transformers 5 writes them nested: rope_parameters {"full_attention": ..., "sliding_attention": ...}.
"""
from .config import read_rope
from .errors import ConfigError

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")  # gemma3: the multimodal wrapper, see text_tower

# The vision tower and projector of a Gemma 3 multimodal checkpoint carry nothing the text model needs.
IGNORED_KEYS = (r"(^|\.)rotary_emb\.inv_freq$", r"^(model\.)?vision_tower\.", r"^(model\.)?multi_modal_projector\.")

# Checkpoint key prefix -> module prefix: the text tower of a Gemma 3 multimodal checkpoint, as transformers 5
# saves it (model.language_model.*) and as the released checkpoints store it (language_model.model.*).
RENAMES = ((r"^model\.language_model\.", "model."), (r"^language_model\.model\.", "model."),
           (r"^language_model\.lm_head\.", "lm_head."))

SPLITS = {}

# Gemma3TextConfig's defaults (transformers 5 configuration_gemma3.py): the text_config of the released 4B
# checkpoint names only what differs from them (hidden/intermediate size, layers, rope_scaling, sliding_window).
GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072,
    rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
    attention_bias=False, query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=None,
    attn_logit_softcapping=None)


def text_tower(hf: dict, where: str) -> dict:
    """Gemma 3 multimodal config (model_type "gemma3") -> the config.json of its text tower as a Gemma3ForCausalLM
    (what hare loads, and what export writes): the text_config over Gemma3TextConfig's defaults, with the
    wrapper's token ids, tying and dtype where it names them (Gemma3ForConditionalGeneration ties by the
    wrapper's tie_word_embeddings)."""
    text = dict(GEMMA3_TEXT_DEFAULTS, **hf["text_config"])
    text.setdefault("model_type", "gemma3_text")
    if text["model_type"] != "gemma3_text":
        raise ConfigError(f"{where}: text_config.model_type is {text['model_type']!r}, expected 'gemma3_text'")
    text["architectures"] = ["Gemma3ForCausalLM"]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "torch_dtype", "dtype"):
        if key in hf:
            text[key] = hf[key]
    return text


def _common(hf: dict) -> dict:
    return dict(norm_offset=1.0, norm_casting="gemma", embed_scale=True,
                head_dim=int(hf.get("head_dim") or 256),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
                mlp_bias=False)


def _gemma(hf: dict, where: str) -> dict:
    act = hf.get("hidden_act") or "gelu_pytorch_tanh"
    return dict(_common(hf), hidden_act="gelu_pytorch_tanh" if act == "gelu" else act)


def _gemma2(hf: dict, where: str) -> dict:
    n = int(hf["num_hidden_layers"])
    layer_types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                            for i in range(n)]
    return dict(_common(hf), hidden_act=hf.get("hidden_activation") or "gelu_pytorch_tanh", sandwich_norms=True,
                attn_softcap=hf.get("attn_logit_softcapping", 50.0),
                final_softcap=hf.get("final_logit_softcapping", 30.0),
                query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                sliding_window=hf.get("sliding_window", 4096), layer_types=tuple(layer_types))


def _gemma3(hf: dict, where: str) -> dict:
    if hf.get("use_bidirectional_attention"):
        raise ConfigError(f"{where}: use_bidirectional_attention (EmbeddingGemma) is not a causal LM; not supported")
    n = int(hf["num_hidden_layers"])
    layer_types = hf.get("layer_types")
    if layer_types is None:  # transformers: kwargs sliding_window_pattern, default 6
        pattern = hf.get("sliding_window_pattern", 6)
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    # Gemma3TextConfig.convert_rope_params_to_dict: a nested rope_parameters dict per layer type; else
    # rope_scaling (applied to global layers only) with rope_theta (default 1M) and rope_local_base_freq (10k).
    params = hf.get("rope_parameters")
    nested = isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params)
    full = dict((params.get("full_attention") if nested else None) or {"rope_type": "default"})
    local = dict((params.get("sliding_attention") if nested else None) or {"rope_type": "default"})
    if hf.get("rope_scaling"):
        full.update(hf["rope_scaling"])
    full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
    bare = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling", "rope_parameters")}
    return dict(_common(hf), hidden_act=hf.get("hidden_activation") or "gelu_pytorch_tanh", sandwich_norms=True,
                qk_norm=True,
                attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"),
                query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                sliding_window=hf.get("sliding_window", 4096), layer_types=tuple(layer_types),
                rope=read_rope(bare, where, full), rope_local=read_rope(bare, where, local))


_FLAGS = {"gemma": _gemma, "gemma2": _gemma2, "gemma3_text": _gemma3}


def config_flags(hf: dict, where: str) -> dict:
    if hf["model_type"] not in _FLAGS:  # "gemma3" reaches here only without a text_config
        raise ConfigError(f"{where}: a {hf['model_type']!r} config needs a text_config")
    return _FLAGS[hf["model_type"]](hf, where)
