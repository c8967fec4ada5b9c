"""ModelConfig: everything the one decoder needs, read from a Hugging Face config.json.

Common fields are read here; a family file (models/llama.py, ...) returns only the flags where it deviates from
Llama. Every flag is read in exactly one place in decoder.py.
"""
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from .errors import ConfigError, UnsupportedModelError
from .rope import rotary_dim


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
    qkv_bias: bool = False              # bias on q/k/v projections (Llama attention_bias, Qwen2 always)
    o_bias: bool = False                # bias on o_proj (Llama attention_bias; not Qwen2)
    mlp_bias: bool = False
    # --- family quirks, all off for Llama ---
    norm_offset: float = 0.0            # Gemma: RMSNorm scales by (1 + w)
    norm_casting: str = "llama"         # "llama": cast before * w; "gemma": all fp32 (kernels/rms_norm.py)
    embed_scale: bool = False           # Gemma: embeddings * sqrt(hidden), the scale rounded to the model dtype
    qk_norm: bool = False               # Qwen3, Gemma3: per-head RMSNorm on q and k before RoPE
    sandwich_norms: bool = False        # Gemma2/3: post-attention and pre/post-feedforward norms
    sliding_window: Optional[int] = None  # key j visible to query i iff i - window < j <= i (transformers' masks)
    # per layer "full_attention" | "sliding_attention"; None: every layer slides when sliding_window is set
    # (Mistral, Phi-3), none otherwise
    layer_types: Optional[tuple] = None
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

    @property
    def rotary_dim(self) -> int:
        """Channels per head that RoPE rotates (< head_dim with partial_rotary_factor, e.g. Phi-4-mini)."""
        return rotary_dim(self.rope, self.head_dim)

    def layer_is_sliding(self, i: int) -> bool:
        if self.sliding_window is None:
            return False
        if self.layer_types is None:
            return True
        return self.layer_types[i] == "sliding_attention"

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
# Required keys of each scaling type (rope_theta and rope_type are always there after read_rope).
ROPE_KEYS = {"linear": ("factor",), "dynamic": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
             "yarn": ("original_max_position_embeddings",),
             "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}


def read_rope(hf: dict, where: str, params: Optional[dict] = None, default_theta: float = 10000.0) -> dict:
    """One rope spec in transformers 5's normalized form ({"rope_type", "rope_theta", + the type's fields}).

    Reads both spellings: `rope_parameters`, and the classic `rope_theta` + `rope_scaling` (type key `rope_type`,
    or `type` in older files); `params` overrides the dict to read (Gemma 3 nests one per layer type). As in
    transformers' RotaryEmbeddingConfigMixin: `rope_scaling` wins over `rope_parameters`, values inside the dict win
    over top-level `rope_theta` / `partial_rotary_factor`, and a top-level `original_max_position_embeddings` (Phi-3
    keeps it there) wins over the dict's; otherwise it defaults to max_position_embeddings."""
    if params is None:
        params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: rope parameters must be a JSON object, got {params!r}")
    rope = dict(params)
    if "type" in rope:
        rope.setdefault("rope_type", rope.pop("type"))
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", hf.get("rope_theta", default_theta))
    if hf.get("partial_rotary_factor") is not None:
        rope.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    if rope["rope_type"] in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in hf:
            rope["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
    try:
        rope["rope_theta"] = float(rope["rope_theta"])
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: bad rope_theta {rope['rope_theta']!r}") from None
    return rope


def check_rope(rope: dict, head_dim: int, where: str):
    """Reject what rope.py cannot compute, naming the field."""
    kind = rope["rope_type"]
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{where}: unsupported rope type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
    missing = [k for k in ROPE_KEYS.get(kind, ()) if rope.get(k) is None]
    if missing:
        raise ConfigError(f"{where}: rope type {kind!r} needs {missing}")
    dim = rotary_dim(rope, head_dim)
    if dim % 2 or not 0 < dim <= head_dim:
        raise ConfigError(f"{where}: rotary dimension {dim} (head_dim {head_dim} x partial_rotary_factor "
                          f"{rope.get('partial_rotary_factor', 1.0)}) must be even and in (0, head_dim]")
    if kind == "longrope":
        for k in ("short_factor", "long_factor"):
            if len(rope[k]) != dim // 2:
                raise ConfigError(f"{where}: rope {k} has {len(rope[k])} entries, expected {dim // 2}")


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
    if isinstance(hf.get("text_config"), dict):
        # A multimodal wrapper (Gemma 3 4B+): hare is a text model and loads its text tower, as its own model
        # type, so that export writes a text-only checkpoint.
        text_tower = getattr(family, "text_tower", None)
        if text_tower is None:
            raise UnsupportedModelError(f"{where}: model_type {hf['model_type']!r} has a text_config, and hare "
                                        f"does not know how to take its text tower")
        hf = text_tower(hf, where)
        family = family_for(hf["model_type"], where)
    kw = common_fields(hf, where)
    kw.update(family.config_flags(hf, where))
    cfg = ModelConfig(**kw)
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(f"{where}: num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                          f"num_key_value_heads {cfg.num_key_value_heads}")
    if cfg.hidden_act not in ("silu", "gelu_pytorch_tanh", "gelu", "gelu_new", "gelu_fast"):
        raise ConfigError(f"{where}: unsupported hidden_act {cfg.hidden_act!r}")
    check_rope(cfg.rope, cfg.head_dim, where)
    if cfg.rope_local is not None:
        check_rope(cfg.rope_local, cfg.head_dim, where)
    if cfg.sliding_window is not None and (not isinstance(cfg.sliding_window, int) or cfg.sliding_window < 1):
        raise ConfigError(f"{where}: sliding_window must be null or a positive integer, got {cfg.sliding_window!r}")
    if cfg.layer_types is not None:
        bad = sorted(set(cfg.layer_types) - {"full_attention", "sliding_attention"})
        if bad or len(cfg.layer_types) != cfg.num_hidden_layers:
            raise ConfigError(f"{where}: layer_types must list 'full_attention' / 'sliding_attention' for each of "
                              f"the {cfg.num_hidden_layers} layers, got {list(cfg.layer_types)}")
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
