"""hare.models.gguf against its oracles.

- A tiny Llama written to GGUF the way llama.cpp writes it (names, q/k row permutation, quantized types), then
  converted back: all-F32 tensors must come back bit-identical and give the original model's logits; quantized
  ones must equal what transformers (its own dequantizer and un-permute) reads from the same file.
- The real SmolLM2-135M-Instruct GGUF: config, every weight, the tokenizer and its chat template against
  transformers loading the same file.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from hare.models.errors import CheckpointError, TokenizerError, UnsupportedModelError  # noqa: E402
from hare.models.gguf import convert_gguf, smollm2_gguf_path, unpermute_rows  # noqa: E402
from hare.models.tokenizer import load_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType

# HF -> llama.cpp tensor names, written out here independently of the converter's table.
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name):
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, *module, kind = hf_name.split(".")
    return f"blk.{layer}.{BLOCK_NAMES['.'.join(module)]}.{kind}"


def llamacpp_permute(w, n_head):
    """The export direction, as llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) applies it: each head's
    rows go from rotate-half order to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_kquant_bytes(qtype, rows, cols, rng):
    """Random K-quant blocks with sane fp16 scales (gguf-py cannot quantize K types). Block layouts from
    ggml-common.h: Q4_K/Q5_K start with fp16 d and dmin; Q6_K ends with fp16 d."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = rng.uniform(1e-3, 2e-2, size=(rows, cols // block)).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    offsets = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    for off in offsets:
        raw[:, :, off:off + 2] = scale
    return raw.reshape(rows, -1)


def tokenizer_metadata(writer, sp_model_path):
    """The sentencepiece vocabulary as llama.cpp stores it (tokenizer.ggml.model = "llama")."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model_path)
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template("{% for m in messages %}{{ bos_token + m['content'] + eos_token }}{% endfor %}")
    return n


def tiny_llama(vocab, tie=False, rope_scaling=None, theta=10000.0, max_positions=256, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    # hidden/intermediate are multiples of 256 so that every row is whole K-quant blocks.
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      rms_norm_eps=1e-5, rope_theta=theta, tie_word_embeddings=tie,
                      rope_scaling=dict(rope_scaling) if rope_scaling else None)  # HF edits the dict it gets
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))  # non-trivial norms, so a swapped norm is caught
    return model


def write_llama_gguf(path, model, sp_model_path=None, types=None, rope_freqs=None, extra=None, drop=(), seed=0,
                     vocabulary=None):
    """Write `model` as llama.cpp would. types: HF name -> GGMLQuantizationType (default F32). K types get random
    blocks; the returned dict holds, for every tensor written from the model's values, the HF-layout values a
    faithful reader must recover."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if vocabulary is not None:
        vocabulary(w)
    else:
        tokenizer_metadata(w, sp_model_path)
    expected = {}
    for name, value in model.state_dict().items():
        if name in drop or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        value = value.float().numpy()
        rows = np.arange(value.shape[0])
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            rows = llamacpp_permute(rows, heads)
            value = value[rows]
        qtype = (types or {}).get(name, Q.F32)
        if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            data = random_kquant_bytes(qtype, *value.shape, rng)
        elif qtype == Q.F32:
            data = value
            expected[name] = np.empty_like(value)
            expected[name][rows] = value  # undo the permutation by index, independently of unpermute_rows
        else:
            data = gguf.quants.quantize(value, qtype)
            stored = gguf.quants.dequantize(data, qtype)
            expected[name] = np.empty_like(stored)
            expected[name][rows] = stored
        w.add_tensor(gguf_name(name), data, raw_dtype=qtype if qtype not in (Q.F32,) else None)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: torch.from_numpy(v) for k, v in expected.items()}


def load_dir(directory):
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    out = {}
    for f in files:
        out.update(load_file(os.path.join(directory, f)))
    return out


@pytest.fixture(scope="module")
def sp_vocab(sp_model_path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=sp_model_path).get_piece_size()


# ------------------------------------------------------------------------------------------- synthetic

def test_unpermute_inverts_llamacpp_permutation():
    for heads in (1, 2, 3):
        w = torch.randn(heads * 8, 5)
        assert torch.equal(unpermute_rows(torch.from_numpy(llamacpp_permute(w.numpy(), heads)), heads), w)
        b = torch.randn(heads * 8)
        assert torch.equal(unpermute_rows(torch.from_numpy(llamacpp_permute(b.numpy(), heads)), heads), b)
    with pytest.raises(CheckpointError):
        unpermute_rows(torch.randn(6, 2), 2)


def test_float_round_trip_is_exact(tmp_path, sp_model_path, sp_vocab):
    """All-F32 GGUF (untied, GQA): weights bit-identical, and transformers on the converted directory gives the
    original logits."""
    from transformers import LlamaForCausalLM

    model = tiny_llama(sp_vocab)
    expected = write_llama_gguf(tmp_path / "m.gguf", model, sp_model_path)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    cfg = json.load(open(os.path.join(out, "config.json")))
    for key, value in dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=64, max_position_embeddings=256, rms_norm_eps=1e-5,
                           rope_theta=10000.0, vocab_size=sp_vocab, tie_word_embeddings=False,
                           model_type="llama", architectures=["LlamaForCausalLM"]).items():
        assert cfg[key] == value, key
    assert "rope_scaling" not in cfg
    ours = load_dir(out)
    assert set(ours) == set(model.state_dict())
    for name, value in model.state_dict().items():
        assert torch.equal(ours[name], value), name
        assert torch.equal(expected[name], value), name  # the test's own bookkeeping agrees
    ids = torch.randint(0, sp_vocab, (2, 17), generator=torch.Generator().manual_seed(1))
    converted = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, model(ids).logits)


MIXED_TYPES = {
    "model.embed_tokens.weight": Q.Q8_0,
    "lm_head.weight": Q.Q6_K,
    "model.layers.0.self_attn.q_proj.weight": Q.Q4_K,
    "model.layers.0.self_attn.k_proj.weight": Q.Q5_K,
    "model.layers.0.self_attn.v_proj.weight": Q.Q6_K,
    "model.layers.0.self_attn.o_proj.weight": Q.Q4_0,
    "model.layers.0.mlp.gate_proj.weight": Q.Q4_1,
    "model.layers.0.mlp.up_proj.weight": Q.F16,
    "model.layers.0.mlp.down_proj.weight": Q.BF16,
    "model.layers.1.self_attn.q_proj.weight": Q.Q8_0,
    "model.layers.1.self_attn.k_proj.weight": Q.Q4_0,
    "model.layers.1.mlp.down_proj.weight": Q.Q6_K,
}


def test_quantized_types_match_transformers(tmp_path, sp_model_path, sp_vocab):
    """Every supported type but Q5_0 (transformers has no Q5_0 reader): equal to transformers' own dequantize +
    un-permute of the same file."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama(sp_vocab)
    write_llama_gguf(tmp_path / "q.gguf", model, sp_model_path, types=MIXED_TYPES)
    ours = load_dir(convert_gguf(tmp_path / "q.gguf", tmp_path / "hf"))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q.gguf", dtype=torch.float32).state_dict()
    assert set(ours) == set(ref)
    for name in ref:
        assert torch.equal(ours[name], ref[name]), (name, (ours[name] - ref[name]).abs().max())


def test_q5_0_and_llama3_rope_scaling(tmp_path, sp_model_path, sp_vocab):
    """Q5_0 against gguf-py's round trip placed by index; Llama 3.1 rope scaling recovered from rope_freqs (the only
    place llama.cpp keeps it) and the converted model's logits equal to the original's where all else is F32."""
    from transformers import LlamaForCausalLM

    for params in ({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
                   {"factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0}):
        scaling = {"rope_type": "llama3", "original_max_position_embeddings": 8192, **params}
        model = tiny_llama(sp_vocab, tie=True, rope_scaling=scaling, theta=500000.0, max_positions=65536)
        # llama.cpp's rope_freqs (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors): per frequency, the
        # divisor Llama 3 scaling applies to it.
        factor, low, high, original = params["factor"], params["low_freq_factor"], params["high_freq_factor"], 8192
        base = 1.0 / 500000.0 ** (np.arange(0, 64, 2, dtype=np.float64) / 64)
        wavelen = 2 * np.pi / base
        smooth = (original / wavelen - low) / (high - low)
        freqs = np.where(wavelen < original / high, 1.0,
                         np.where(wavelen > original / low, factor, 1 / ((1 - smooth) / factor + smooth)))
        # the same thing transformers computes: unscaled over scaled inverse frequencies
        np.testing.assert_allclose(freqs, base / model.model.rotary_emb.inv_freq.double().numpy(), rtol=1e-6)
        assert ((freqs > 1.001) & (freqs < factor * 0.999)).sum() >= 2  # a real interpolated band
        name = "model.layers.1.self_attn.k_proj.weight"
        expected = write_llama_gguf(tmp_path / "r.gguf", model, sp_model_path, types={name: Q.Q5_0},
                                    rope_freqs=freqs)
        out = convert_gguf(tmp_path / "r.gguf", tmp_path / f"hf{params['factor']:g}")
        cfg = json.load(open(os.path.join(out, "config.json")))
        assert cfg["rope_scaling"] == scaling and cfg["tie_word_embeddings"] is True
        ours = load_dir(out)
        assert torch.equal(ours[name], expected[name])
        assert (ours[name] - model.state_dict()[name]).abs().max() > 0  # it was really quantized
        with torch.no_grad():
            model.get_parameter(name).copy_(expected[name])  # the reference sees the same quantized weight
            ids = torch.randint(0, sp_vocab, (1, 40), generator=torch.Generator().manual_seed(2))
            converted = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            assert torch.equal(converted(ids).logits, model(ids).logits)


def test_sharded_output(tmp_path, sp_model_path, sp_vocab):
    model = tiny_llama(sp_vocab)
    write_llama_gguf(tmp_path / "m.gguf", model, sp_model_path)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "sharded", max_shard_bytes=1_500_000)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not os.path.exists(os.path.join(out, "model.safetensors"))
    ours = load_dir(out)
    assert set(index["weight_map"]) == set(ours) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in ours.values())
    for name, value in model.state_dict().items():
        assert torch.equal(ours[name], value)
    # bfloat16 output is the float32 result rounded once
    bf = load_dir(convert_gguf(tmp_path / "m.gguf", tmp_path / "bf16", dtype="bfloat16"))
    assert all(bf[k].dtype == torch.bfloat16 and torch.equal(bf[k], ours[k].bfloat16()) for k in ours)


def test_sentencepiece_vocabulary(tmp_path, sp_model_path, sp_vocab):
    """A "llama" (sentencepiece) GGUF vocabulary becomes a tokenizer.json that encodes as sentencepiece itself,
    as hare's sentencepiece backend on the original model, and as transformers' reading of the GGUF."""
    import shutil

    import sentencepiece as spm
    from transformers import AutoTokenizer

    from .conftest import SP_TEXTS

    write_llama_gguf(tmp_path / "m.gguf", tiny_llama(sp_vocab), sp_model_path)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    ours = load_tokenizer(out)
    sp = spm.SentencePieceProcessor(model_file=sp_model_path)
    spdir = tmp_path / "spdir"
    spdir.mkdir()
    shutil.copy(sp_model_path, spdir / "tokenizer.model")
    (spdir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    sp_backend = load_tokenizer(str(spdir))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    texts = SP_TEXTS + ["".join(chr(c) for c in range(32, 127)), "mixed: ñ, ß, 東京, 🦊🦊"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == [1] + sp.encode(text) == sp_backend.encode(text), text
        assert ours.decode(ids) == sp.decode(sp.encode(text)) == ref.decode(ids, skip_special_tokens=True)
        # transformers' Metaspace pre-tokenizer adds no "▁" to text that already starts with a space, where
        # sentencepiece (and llama.cpp) always add the dummy prefix; elsewhere all agree.
        if not text.startswith(" "):
            assert ids == ref.encode(text), text
    # special tokens inside text: the same segmentation as the sentencepiece backend (llama.cpp's rule)
    for text in ("Hello</s>world", "<s>fox <s> hare</s>"):
        assert ours.encode(text) == sp_backend.encode(text)
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == \
            sp_backend.decode(sp_backend.encode(text), skip_special_tokens=False)
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi</s>"


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path, pre):
    """A byte-level BPE ("gpt2") vocabulary under each pre-tokenizer of the table, against transformers' own
    reading of the same GGUF (its split regexes are its own copy of llama.cpp's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    from .conftest import CORPUS, TEXTS

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(CORPUS.splitlines() + ["2024 12345 678 90"], trainer)
    state = json.loads(bpe.to_str())
    vocab = sorted(state["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]

    def vocabulary(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list([t for t, _ in vocab])
        w.add_token_types([3 if t.startswith("<|") else 1 for t, _ in vocab])
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)

    write_llama_gguf(tmp_path / "b.gguf", tiny_llama(len(vocab)), vocabulary=vocabulary)
    ours = load_tokenizer(convert_gguf(tmp_path / "b.gguf", tmp_path / "hf"))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="b.gguf")
    texts = TEXTS + ["numbers 2024 and 1234567", "it's THEY'LL we've\r\n  x"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False) == text


def test_unknown_pre_tokenizer_is_refused(tmp_path, sp_vocab):
    def vocabulary(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("mystery-bpe")
        w.add_token_list([f"t{i}" for i in range(sp_vocab)])
        w.add_token_merges(["t 1"])

    write_llama_gguf(tmp_path / "p.gguf", tiny_llama(sp_vocab), vocabulary=vocabulary)
    with pytest.raises(TokenizerError, match="pre-tokenizer 'mystery-bpe'"):
        convert_gguf(tmp_path / "p.gguf", tmp_path / "out")


# --------------------------------------------------------------------------------------------- families
# Tiny random models of every other family, written the way llama.cpp's convert_hf_to_gguf.py writes them: the
# metadata keys of each converter class (llamacpp_metadata below, one branch per class), the tensor names of
# gguf-py's own TensorNameMap (llama.cpp's table, not the converter's), and its transforms (+1 on Gemma norms,
# Phi-3's fused q/k/v and gate/up kept, LongRoPE factors as tensors). All F32 except where a test quantizes.

FAMILY_BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, pad_token_id=0,
                   bos_token_id=1, eos_token_id=2)


def _dyadic(n, seed, top):
    """LongRoPE factors in 1 + k/8: exact in float32 (what the GGUF stores) and in short decimals, so the
    converted config.json can name the very numbers the original did."""
    g = torch.Generator().manual_seed(seed)
    return (1 + torch.randint(0, 8 * top, (n,), generator=g) / 8).tolist()


# name: (GGUF architecture, transformers class prefix, config overrides). Windows (6, 7) are shorter than the
# 37-token sequences; Gemma 2's softcaps are small enough to bend these logits; longrope's original context (16)
# is shorter than the sequences, so the long factors are in use.
FAMILIES = {
    "qwen2": ("qwen2", "Qwen2", dict(tie_word_embeddings=True)),
    # head_dim 128 != hidden / heads, as in every released Qwen3 (and the only one transformers' GGUF reader knows)
    "qwen3": ("qwen3", "Qwen3", dict(head_dim=128, tie_word_embeddings=True)),
    "qwen3_bias": ("qwen3", "Qwen3", dict(head_dim=24, attention_bias=True)),
    "gemma": ("gemma", "Gemma", dict(head_dim=24, num_key_value_heads=1)),
    # query_pre_attn_scalar = head_dim: the file does not carry it, and below 27B llama.cpp scales by head_dim
    "gemma2": ("gemma2", "Gemma2", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                                        attn_logit_softcapping=1.0, final_logit_softcapping=1.5,
                                        initializer_range=0.1)),
    # 6 layers: llama.cpp's fixed pattern (and transformers' default) makes 0-4 sliding with the local rope (10k)
    # and 5 global (1M, linear scaling 8)
    "gemma3": ("gemma3", "Gemma3Text", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                                            num_hidden_layers=6,
                                            rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0,
                                                                                    rope_theta=1_000_000.0),
                                                             "sliding_attention": dict(rope_type="default",
                                                                                       rope_theta=10_000.0)})),
    # the optional keys: a final softcap, and a local rope base other than 10000 in rope.freq_base_swa (what
    # TextModel writes; the llama.cpp runtime read here hard-codes 10000 for Gemma 3's local layers, the
    # released models' value)
    "gemma3_keys": ("gemma3", "Gemma3Text", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                                                 num_hidden_layers=6, final_logit_softcapping=2.0,
                                                 rope_parameters={"full_attention": dict(rope_type="default",
                                                                                         rope_theta=500_000.0),
                                                                  "sliding_attention": dict(rope_type="default",
                                                                                            rope_theta=20_000.0)})),
    # Phi-4-mini's shape (partial rotary, longrope, tied) with Phi-3-mini-4k's window on every layer
    "phi3": ("phi3", "Phi3", dict(max_position_embeddings=64, original_max_position_embeddings=16,
                                  partial_rotary_factor=0.5, tie_word_embeddings=True, sliding_window=7,
                                  rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                       short_factor=_dyadic(4, 0, 1), long_factor=_dyadic(4, 1, 8)))),
}
GGUF_ARCH = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


def tiny_family(name, vocab, seed=0, **over):
    import transformers

    arch, prefix, overrides = FAMILIES[name]
    cfg = getattr(transformers, prefix + "Config")(vocab_size=vocab, **{**FAMILY_BASE, **overrides, **over})
    torch.manual_seed(seed)
    model = getattr(transformers, {"Gemma3Text": "Gemma3"}.get(prefix, prefix) + "ForCausalLM")(cfg).eval()
    with torch.no_grad():  # random init leaves biases at 0 and norms at 1 (0 for Gemma): give them values
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
                # bf16-representable, as a released checkpoint's: then llama.cpp's float32 w + 1 is exact and the
                # round trip can be bit-exact (the converter's comment says when it is).
                p.copy_(p.bfloat16().float())
    return arch, model


def llamacpp_metadata(w, arch, h):
    """The keys each converter class of llama.cpp's convert_hf_to_gguf.py writes, from the config values `h`."""
    rope = h["rope_parameters"]
    full, local = rope.get("full_attention", rope), rope.get("sliding_attention")
    if arch == "phi3":  # Phi3MiniModel.set_gguf_parameters (not TextModel's)
        w.add_context_length(h["max_position_embeddings"])
        w.add_rope_scaling_orig_ctx_len(h["original_max_position_embeddings"])
        w.add_embedding_length(h["hidden_size"])
        w.add_feed_forward_length(h["intermediate_size"])
        w.add_block_count(h["num_hidden_layers"])
        w.add_head_count(h["num_attention_heads"])
        w.add_head_count_kv(h["num_key_value_heads"])
        w.add_layer_norm_rms_eps(h["rms_norm_eps"])
        rotary = int(h.get("partial_rotary_factor", 1.0) * h["hidden_size"]) // h["num_attention_heads"]
        w.add_rope_dimension_count(rotary)
        w.add_rope_freq_base(full["rope_theta"])
        w.add_sliding_window(h["sliding_window"] or 0)
        if full["rope_type"] == "longrope":  # generate_extra_tensors: the factors go in as tensors
            original = h["original_max_position_embeddings"]
            scale = h["max_position_embeddings"] / original
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        return
    w.add_context_length(h["max_position_embeddings"])
    w.add_embedding_length(h["hidden_size"])
    w.add_block_count(h["num_hidden_layers"])
    w.add_feed_forward_length(h["intermediate_size"])
    w.add_head_count(h["num_attention_heads"])
    w.add_head_count_kv(h["num_key_value_heads"])
    w.add_layer_norm_rms_eps(h["rms_norm_eps"])
    if h.get("head_dim") is not None:  # TextModel, Gemma*Model (Qwen2's config has no head_dim)
        w.add_key_length(h["head_dim"])
        w.add_value_length(h["head_dim"])
    if arch in ("gemma", "gemma2"):  # GemmaModel / Gemma2Model.set_gguf_parameters: no rope base at all
        if arch == "gemma2":
            w.add_attn_logit_softcapping(h["attn_logit_softcapping"])
            w.add_final_logit_softcapping(h["final_logit_softcapping"])
            w.add_sliding_window(h["sliding_window"])
        return
    # TextModel.set_gguf_parameters (Qwen2Model, Qwen3Model add nothing), then Gemma3Model's additions
    if full.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    w.add_rope_freq_base(full["rope_theta"])
    if local is not None:
        w.add_rope_freq_base_swa(local["rope_theta"])
    if arch == "gemma3":
        if h.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(h["final_logit_softcapping"])
        w.add_sliding_window(h["sliding_window"])


def write_family_gguf(path, arch, model, sp_model_path, types=None, drop=(), extra=None):
    """Write `model` as llama.cpp would. types: HF name -> GGMLQuantizationType (default F32); drop: GGUF names left
    out. Returns, per HF name written, the values a faithful reader must recover (the original for F32)."""
    h = model.config.to_dict()
    w = gguf.GGUFWriter(str(path), arch)
    llamacpp_metadata(w, arch, h)
    tokenizer_metadata(w, sp_model_path)
    w.add_pad_token_id(h["pad_token_id"])
    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], h["num_hidden_layers"])
    out, expected = {}, {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and (h["tie_word_embeddings"] or arch in ("gemma", "gemma2")):
            continue  # tied: not in the checkpoint (and Gemma(2)Model.modify_tensors drops lm_head anyway)
        base, kind = name.rsplit(".", 1)
        assert names.get_name(base) is not None, name
        value = value.float()
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            value = value + 1  # Gemma*Model.modify_tensors: ggml's RMSNorm is x * w, HF's x * (1 + w)
        qtype = (types or {}).get(name, Q.F32)
        if qtype == Q.F32:
            data = value.numpy()
            expected[name] = model.state_dict()[name]
        else:
            data = gguf.quants.quantize(value.numpy(), qtype)
            expected[name] = torch.from_numpy(gguf.quants.dequantize(data, qtype))
        out[f"{names.get_name(base)}.{kind}"] = (data, qtype)
    rope = h["rope_parameters"]
    if arch == "phi3" and rope["rope_type"] == "longrope":  # Phi3MiniModel.generate_extra_tensors
        out["rope_factors_long.weight"] = (np.array(rope["long_factor"], dtype=np.float32), Q.F32)
        out["rope_factors_short.weight"] = (np.array(rope["short_factor"], dtype=np.float32), Q.F32)
    out.update({k: (v, Q.F32) for k, v in (extra or {}).items()})
    for gname, (data, qtype) in out.items():
        if gname not in drop:
            w.add_tensor(gname, data, raw_dtype=None if qtype == Q.F32 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _family_ids(vocab):
    return torch.randint(0, vocab, (2, 37), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_round_trip_is_exact(tmp_path, sp_model_path, sp_vocab, name):
    """All-F32 GGUF of each family: config.json reads as the original's ModelConfig, every tensor comes back
    bit-identical (Gemma's norms included), hare on the converted directory gives transformers' logits on the
    original, and transformers on the converted directory gives them exactly."""
    from transformers import AutoModelForCausalLM

    from hare import load_model
    from hare.models import config_from_dict

    arch, ref = tiny_family(name, sp_vocab)
    ref.save_pretrained(tmp_path / "original")
    write_family_gguf(tmp_path / "m.gguf", arch, ref, sp_model_path)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    original = json.loads((tmp_path / "original" / "config.json").read_text())
    converted = json.load(open(os.path.join(out, "config.json")))
    assert converted["model_type"] == original["model_type"]
    assert config_from_dict(converted) == config_from_dict(original)

    ours = load_dir(out)
    state = {k: v for k, v in ref.state_dict().items()
             if not (k == "lm_head.weight" and ref.config.tie_word_embeddings)}
    assert set(ours) == set(state)
    for k, v in state.items():
        assert torch.equal(ours[k], v), k

    ids = _family_ids(sp_vocab)
    with torch.no_grad():
        want = ref(ids).logits
        got = load_model(out, dtype=torch.float32)(ids).logits
        assert (got - want).abs().max().item() <= 1e-4
        again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert torch.equal(again(ids).logits, want)


# Architectures transformers reads from GGUF (transformers/integrations/ggml.py, GGUF_CONFIG_MAPPING; no "gemma").
TRANSFORMERS_GGUF = {"qwen2", "qwen3", "gemma2", "gemma3", "phi3"}
# Those whose key map covers these tiny configs, so its whole model can agree; it does not read Gemma 2's softcaps
# and window pattern, Gemma 3's rope scaling, nor Phi-3's longrope / window / partial rotary from the file.
TRANSFORMERS_GGUF_COMPLETE = {"qwen2", "qwen3"}


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3", "phi3", "qwen2", "qwen3"])
def test_family_quantized(tmp_path, sp_model_path, sp_vocab, name):
    """Layer 0 and the embedding in Q8_0 (norms stay F32, as llama.cpp keeps them): each tensor equals gguf-py's
    round trip placed by name and, where transformers reads the architecture, transformers' own reading of the
    file (its dequantizer, its -1 on Gemma norms); where its key map is complete, its logits too."""
    from transformers import AutoModelForCausalLM

    from hare import load_model

    arch, ref = tiny_family(name, sp_vocab)
    types = {k: Q.Q8_0 for k, v in ref.state_dict().items() if v.ndim == 2 and (".layers.0." in k or "embed" in k)}
    expected = write_family_gguf(tmp_path / "q.gguf", arch, ref, sp_model_path, types=types)
    out = convert_gguf(tmp_path / "q.gguf", tmp_path / "hf")
    ours = load_dir(out)
    assert set(ours) == set(expected)
    for k, v in expected.items():
        assert torch.equal(ours[k], v), k
    assert all((ours[k] - ref.state_dict()[k]).abs().max() > 0 for k in types)  # really quantized
    if arch not in TRANSFORMERS_GGUF:
        return
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q.gguf", dtype=torch.float32).eval()
    state = theirs.state_dict()
    assert set(ours) <= set(state)
    for k in ours:
        assert torch.equal(ours[k], state[k]), k
    if name in TRANSFORMERS_GGUF_COMPLETE:
        ids = _family_ids(sp_vocab)
        with torch.no_grad():
            got = load_model(out, dtype=torch.float32)(ids).logits
            assert (got - theirs(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name,layers", [("gemma2", 46), ("gemma3", 62)])
def test_gemma_27b_attention_scale(tmp_path, sp_model_path, sp_vocab, name, layers):
    """The file has no query_pre_attn_scalar: at the 27B block counts llama.cpp scales by hidden / heads (here 16,
    != head_dim 8), and so must the converted config (the released 27B configs say 144 and 168 the same way)."""
    from hare.models import config_from_dict

    arch, ref = tiny_family(name, sp_vocab, num_hidden_layers=layers, hidden_size=32, intermediate_size=16,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=16)
    ref.save_pretrained(tmp_path / "original")
    write_family_gguf(tmp_path / "m.gguf", arch, ref, sp_model_path)
    converted = json.load(open(os.path.join(convert_gguf(tmp_path / "m.gguf", tmp_path / "hf"), "config.json")))
    assert converted["query_pre_attn_scalar"] == 16
    original = json.loads((tmp_path / "original" / "config.json").read_text())
    assert config_from_dict(converted) == config_from_dict(original)


def test_family_strictness(tmp_path, sp_model_path, sp_vocab):
    """Qwen2 without a q/k/v bias, a bias Gemma has no place for, half of Phi-3's LongRoPE pair: named errors."""
    _, qwen2 = tiny_family("qwen2", sp_vocab)
    write_family_gguf(tmp_path / "q.gguf", "qwen2", qwen2, sp_model_path, drop={"blk.1.attn_k.bias"})
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.1\.self_attn\.k_proj\.bias"):
        convert_gguf(tmp_path / "q.gguf", tmp_path / "out")
    _, gemma = tiny_family("gemma", sp_vocab)
    write_family_gguf(tmp_path / "g.gguf", "gemma", gemma, sp_model_path,
                      extra={"blk.0.attn_q.bias": np.zeros(96, np.float32)})
    with pytest.raises(CheckpointError, match=r"no Hugging Face name \(gemma\): blk\.0\.attn_q\.bias"):
        convert_gguf(tmp_path / "g.gguf", tmp_path / "out")
    _, phi3 = tiny_family("phi3", sp_vocab)
    write_family_gguf(tmp_path / "p.gguf", "phi3", phi3, sp_model_path, drop={"rope_factors_short.weight"})
    with pytest.raises(CheckpointError, match="come in pairs"):
        convert_gguf(tmp_path / "p.gguf", tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


# ----------------------------------------------------------------------------------------------- errors

def _minimal_gguf(path, arch):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture(tmp_path):
    _minimal_gguf(tmp_path / "other.gguf", "falcon")
    with pytest.raises(UnsupportedModelError, match=r"other\.gguf: GGUF architecture 'falcon' is not supported"):
        convert_gguf(tmp_path / "other.gguf", tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_bad_inputs(tmp_path, sp_model_path, sp_vocab):
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.gguf: not a readable GGUF file"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "out")
    model = tiny_llama(sp_vocab)
    write_llama_gguf(tmp_path / "m.gguf", model, sp_model_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not an empty directory"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "busy")
    # a truncated file
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.gguf"):
        convert_gguf(tmp_path / "cut.gguf", tmp_path / "out")
    # strict tensor accounting: a missing tensor and an unknown one are named
    write_llama_gguf(tmp_path / "missing.gguf", model, sp_model_path, drop={"model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    write_llama_gguf(tmp_path / "extra.gguf", model, sp_model_path,
                     extra={"blk.0.attn_mystery.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(CheckpointError, match=r"no Hugging Face name \(llama\): blk\.0\.attn_mystery\.weight"):
        convert_gguf(tmp_path / "extra.gguf", tmp_path / "out")
    # a type outside the supported list is refused by name
    write_llama_gguf(tmp_path / "q51.gguf", model, sp_model_path, types={"model.layers.0.mlp.up_proj.weight": Q.Q5_1})
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.ffn_up\.weight has type Q5_1"):
        convert_gguf(tmp_path / "q51.gguf", tmp_path / "out")
    # nothing is left behind by the failures
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["busy", "cut.gguf", "extra.gguf", "junk.gguf", "m.gguf", "missing.gguf", "q51.gguf"])


def test_missing_gguf_package_is_explained(tmp_path):
    code = ("import sys; sys.modules['gguf'] = None\n"  # makes `import gguf` fail in this child process only
            "from hare.models.gguf import convert_gguf\n"
            "try:\n    convert_gguf('x.gguf', 'out')\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert "pip install 'hare[gguf]'" in out.stdout


# --------------------------------------------------------------------------------------------- SmolLM2

def test_smollm2_path():
    path = smollm2_gguf_path()
    assert os.path.isfile(path) and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_smollm2_config(smollm2_dir):
    cfg = json.load(open(os.path.join(smollm2_dir, "config.json")))
    assert {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                "head_dim", "intermediate_size", "max_position_embeddings", "vocab_size",
                                "rope_theta", "rms_norm_eps", "tie_word_embeddings", "model_type")} == dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        intermediate_size=1536, max_position_embeddings=8192, vocab_size=49152, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, model_type="llama")
    assert "rope_scaling" not in cfg
    gen = json.load(open(os.path.join(smollm2_dir, "generation_config.json")))
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_smollm2_weights_match_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).state_dict()
    ours = load_dir(smollm2_dir)
    assert set(ref) - set(ours) == {"lm_head.weight"}  # tied: transformers materializes it, the file need not
    assert set(ours) <= set(ref)
    for name, value in ours.items():
        assert value.dtype == torch.float32 and torch.equal(value, ref[name]), name


SMOL_TEXTS = ["Hello world!", "What is 12345 + 6?", "  spaces\n\nnewlines\tTabs", "ünïcödé 中文 🙂",
              "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x**2  # ok", "I'm sure they'll've done it", ""]


def test_smollm2_tokenizer_matches_transformers(smollm2_dir):
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    ours = load_tokenizer(smollm2_dir)
    from_dir = AutoTokenizer.from_pretrained(smollm2_dir)  # transformers reads our tokenizer.json the same way
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                         ref.pad_token_id) == (1, 2, 2)
    assert ours.eos_token_ids == {2} and ours.vocab_size == len(ref) == 49152 and not ours.add_bos_token
    for text in SMOL_TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text) == from_dir.encode(text), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    for gen in (False, True):
        text = ours.apply_chat_template(chat, add_generation_prompt=gen)
        assert text == ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
        assert ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True) == \
            ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
