"""ModelConfig: everything the one decoder needs, read from a Hugging Face config.json.

Common fields are read here; a family file (models/llama.py, ...) returns only the flags where it deviates from
Llama. Every flag is read in exactly one place in decoder.py.
"""
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from .errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int                       # explicit in config.json for some models (e.g. Gemma 256, Qwen3 128)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    # RoPE: {"rope_type": "default"|"linear"|"dynamic"|"llama3"|..., "rope_theta": ..., + the type's fields}
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"            # silu -> SwiGLU; gelu_pytorch_tanh / gelu -> GeGLU (tanh / erf)
    qkv_bias: bool = False              # bias on q/k/v projections (Llama attention_bias, Qwen2)
    o_bias: bool = False                # bias on o_proj (Llama attention_bias; not Qwen2)
    mlp_bias: bool = False
    # --- family quirks, all off for Llama ---
    norm_offset: float = 0.0            # Gemma: RMSNorm scales by (1 + w)
    norm_casting: str = "llama"         # "llama": cast before * w; "gemma": all fp32 (kernels/rms_norm.py)
    embed_scale: bool = False           # Gemma: embeddings * sqrt(hidden), the scale rounded to the model dtype
    qk_norm: bool = False               # Qwen3, Gemma3: per-head RMSNorm on q and k before RoPE
    sandwich_norms: bool = False        # Gemma2/3: post-attention and pre/post-feedforward norms
    sliding_window: Optional[int] = None
    layer_types: Optional[tuple] = None  # per layer "full_attention" | "sliding_attention"; None: all full
    rope_local: Optional[dict] = None   # Gemma3: rope of sliding layers (10k base, no scaling)
    attn_softcap: Optional[float] = None   # Gemma2: cap * tanh(s / cap) on attention logits
    final_softcap: Optional[float] = None  # Gemma2: the same on the final logits
    query_pre_attn_scalar: Optional[float] = None  # Gemma2/3: attention scale = this ** -0.5
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[object] = None  # int or list of ints
    pad_token_id: Optional[int] = None
    torch_dtype: Optional[str] = None
    hf: dict = field(default_factory=dict, compare=False, repr=False)  # the raw config.json, for export

    @property
    def attention_scale(self) -> float:
        d = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return float(d) ** -0.5

    def layer_is_sliding(self, i: int) -> bool:
        if self.sliding_window is None:
            return False
        if self.layer_types is None:
            return True
        return self.layer_types[i] == "sliding_attention"

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def read_rope(hf: dict, where: str) -> dict:
    """Both spellings: transformers 5's `rope_parameters` dict, and the classic `rope_theta` + `rope_scaling`
    (whose type key is `rope_type`, or `type` in older files)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and ("rope_type" in params or "rope_theta" in params):
        rope = dict(params)
    else:
        rope = dict(hf.get("rope_scaling") or {})
        if "rope_theta" in hf:
            rope["rope_theta"] = hf["rope_theta"]
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", 10000.0)
    rope["rope_theta"] = float(rope["rope_theta"])
    if rope["rope_type"] not in ("default", "linear", "dynamic", "llama3", "yarn", "longrope", "su"):
        raise ConfigError(f"{where}: unsupported rope type {rope['rope_type']!r}")
    return rope


def common_fields(hf: dict, where: str) -> dict:
    """The fields every family spells the same way."""
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        kv = hf.get("num_key_value_heads") or heads
        head_dim = hf.get("head_dim") or hidden // heads
        return dict(
            model_type=hf["model_type"],
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(kv),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rope=read_rope(hf, where),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            hidden_act=hf.get("hidden_act") or hf.get("hidden_activation") or "silu",
            qkv_bias=bool(hf.get("attention_bias", False)),
            o_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            torch_dtype=hf.get("torch_dtype") or hf.get("dtype"),
            hf=hf,
        )
    except KeyError as e:
        raise ConfigError(f"{where}: missing required field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: bad value: {e}") from None


def config_from_dict(hf: dict, where: str = "config.json") -> ModelConfig:
    from .registry import family_for

    if "model_type" not in hf:
        raise ConfigError(f"{where}: no 'model_type' field")
    family = family_for(hf["model_type"], where)
    kw = common_fields(hf, where)
    kw.update(family.config_flags(hf, where))
    cfg = ModelConfig(**kw)
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(f"{where}: num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                          f"num_key_value_heads {cfg.num_key_value_heads}")
    if cfg.hidden_act not in ("silu", "gelu_pytorch_tanh", "gelu", "gelu_new", "gelu_fast"):
        raise ConfigError(f"{where}: unsupported hidden_act {cfg.hidden_act!r}")
    return cfg


def load_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not found (a Hugging Face checkpoint directory has a config.json)")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable: {e}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config_from_dict(hf, path)
