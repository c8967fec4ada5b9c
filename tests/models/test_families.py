"""Every family and every quirk against transformers (the reference nobody here wrote), on tiny random configs
saved with transformers' own save_pretrained and loaded through hare.load_model: fp32 logits and loss, greedy
generation (batched and left-padded here, one prompt at a time there), and export -> load round trips.

Sliding windows are shorter than the sequences (and than prompt + generated tokens), longrope's original context
is shorter than the long tests and longer than the short ones, softcaps are small enough to bend the logits.
"Legacy" cases rewrite the saved config.json into the spelling of older released configs (Gemma's hidden_act
"gelu", Gemma 3's rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern, Phi-3's "su"); each
first checks that transformers itself reads the rewritten file as the same model.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from hare import generate_ids, load_model, save_model  # noqa: E402

BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)


def _longrope(n, seed):
    g = torch.Generator().manual_seed(seed)
    short = (1.0 + torch.rand(n, generator=g)).tolist()
    long = (1.0 + 8 * torch.rand(n, generator=g)).tolist()
    return dict(rope_type="longrope", rope_theta=10000.0, short_factor=short, long_factor=long)


def _gemma_legacy_gelu(hf):
    hf["hidden_act"] = "gelu"  # the official Gemma 1 configs; transformers maps it to the tanh GELU


def _gemma3_legacy(hf):
    del hf["layer_types"], hf["rope_parameters"]
    hf.update(sliding_window_pattern=3, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
              rope_scaling={"rope_type": "linear", "factor": 8.0})


def _phi3_su(hf):
    # The first Phi-3 releases spelled longrope "su". (transformers 5.24 cannot read such a file unless the dict
    # also names original_max_position_embeddings, which it then overrides with the top-level value anyway.)
    rope = hf.pop("rope_parameters")
    hf["rope_scaling"] = dict(type="su", short_factor=rope["short_factor"], long_factor=rope["long_factor"],
                              original_max_position_embeddings=1000)
    hf["rope_theta"] = rope["rope_theta"]


def _lm_class(arch):
    return getattr(transformers, {"Gemma3Text": "Gemma3"}.get(arch, arch) + "ForCausalLM")


# name: (transformers architecture, config overrides, legacy config.json rewrite or None)
CASES = {
    # sliding window on every layer (v0.1), shorter than the sequence
    "mistral_window": ("Mistral", dict(sliding_window=7), None),
    # v0.3: no window; NeMo-style explicit head_dim != hidden / heads
    "mistral_v03_head_dim": ("Mistral", dict(sliding_window=None, head_dim=24), None),
    # (1 + w) fp32 norm, sqrt(hidden) embedding scale, GeGLU-tanh, explicit head_dim, tied embeddings, GQA
    "gemma": ("Gemma", dict(head_dim=24), None),
    "gemma_legacy_gelu": ("Gemma", dict(head_dim=24, num_key_value_heads=1), _gemma_legacy_gelu),
    # softcaps (small: they bend these logits), query_pre_attn_scalar != head_dim, alternating windows, 4 norms
    "gemma2": ("Gemma2", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6, num_hidden_layers=3,
                              attn_logit_softcapping=1.0, final_logit_softcapping=1.5, initializer_range=0.1), None),
    # q/k norm, layer_types, local rope 10k unscaled vs global 1M with linear scaling, no softcaps
    "gemma3": ("Gemma3Text", dict(head_dim=16, query_pre_attn_scalar=20, sliding_window=6, num_hidden_layers=3,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                  rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0,
                                                                          rope_theta=1_000_000.0),
                                                   "sliding_attention": dict(rope_type="default",
                                                                             rope_theta=10_000.0)}), None),
    "gemma3_legacy": ("Gemma3Text", dict(head_dim=16, query_pre_attn_scalar=20, sliding_window=6,
                                         num_hidden_layers=3,
                                         layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                         rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0,
                                                                                 rope_theta=1_000_000.0),
                                                          "sliding_attention": dict(rope_type="default",
                                                                                    rope_theta=10_000.0)}),
                      _gemma3_legacy),
    # bias on q/k/v only, tied, sliding window on layers >= max_window_layers
    "qwen2_bias_window": ("Qwen2", dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=6,
                                        num_hidden_layers=3, max_window_layers=1), None),
    # Qwen2.5 long-context yarn scaling (attention factor on cos/sin)
    "qwen2_yarn": ("Qwen2", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                      original_max_position_embeddings=16)), None),
    # q/k norm before rope, head_dim from config, attention_bias on all four projections, tied
    "qwen3": ("Qwen3", dict(head_dim=24, attention_bias=True, tie_word_embeddings=True), None),
    # fused qkv / gate_up, longrope (long factors at 37 > 16 positions, short at 12)
    "phi3_longrope": ("Phi3", dict(max_position_embeddings=64, original_max_position_embeddings=16,
                                   rope_parameters=_longrope(8, 0)), None),
    "phi3_su_legacy": ("Phi3", dict(max_position_embeddings=64, original_max_position_embeddings=16,
                                    rope_parameters=_longrope(8, 1)), _phi3_su),
    # Phi-4-mini shape: partial rotary (half of each head), longrope, tied; Phi-3-mini-4k's window on every layer
    "phi4_mini_partial": ("Phi3", dict(max_position_embeddings=64, original_max_position_embeddings=16,
                                       partial_rotary_factor=0.5, tie_word_embeddings=True, sliding_window=7,
                                       rope_parameters=_longrope(4, 2)), None),
}
SHORT = {"phi3_longrope", "phi3_su_legacy", "phi4_mini_partial"}  # also tested below original_max_position


def hf_attention(config):
    """transformers' attention for the oracle of a config (a dict, e.g. a config.json): eager where Gemma 2's
    attention-logit softcap is set. The cap exists only in transformers' eager attention; transformers 5.17 (the
    GPU machine's) picks sdpa for Gemma 2, which drops it (hare was 10-20x the control's error there, H200,
    2026-11-28, and the LoRA-vs-PEFT losses differed by 0.03, 2026-11-29), 5.24 picks eager itself."""
    return dict(attn_implementation="eager") if config.get("attn_logit_softcapping") is not None else {}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name -> (transformers model, checkpoint dir); built once per module."""
    root = tmp_path_factory.mktemp("families")
    built = {}

    def get(name):
        if name in built:
            return built[name]
        arch, over, legacy = CASES[name]
        torch.manual_seed(0)
        cfg = getattr(transformers, arch + "Config")(**dict(BASE, **over), **hf_attention(over))
        ref = _lm_class(arch)(cfg).eval()
        with torch.no_grad():  # random init leaves biases at 0 and norms at 1 (0 for Gemma): give them values
            for n, p in ref.named_parameters():
                if n.endswith("bias") or "norm" in n:
                    p.add_(torch.randn_like(p) * 0.1)
        path = root / name
        ref.save_pretrained(path)
        if legacy is not None:
            hf = json.loads((path / "config.json").read_text())
            legacy(hf)
            (path / "config.json").write_text(json.dumps(hf))
        built[name] = (ref, path)
        return built[name]

    return get


def _ids(vocab, T, seed=1):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_and_loss_match_transformers(checkpoint, name):
    ref, path = checkpoint(name)
    model = load_model(str(path), dtype=torch.float32)
    for T in ((37, 12) if name in SHORT else (37,)):
        ids = _ids(ref.config.vocab_size, T)
        labels = ids.clone()
        labels[0, :5] = -100
        with torch.no_grad():
            want = ref(ids, labels=labels)
            got = model(ids, labels=labels, return_logits=True)
        err = (got.logits - want.logits).abs().max().item()
        assert err <= 1e-4, f"T={T}: logits max abs error {err}"
        assert abs(got.loss.item() - want.loss.item()) <= 1e-5


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c[2] is not None))
def test_legacy_config_is_the_same_model_for_transformers(checkpoint, name):
    """The rewritten config.json means the same model to transformers (so the parity above tests the spelling)."""
    ref, path = checkpoint(name)
    again = _lm_class(CASES[name][0]).from_pretrained(str(path)).eval()
    ids = _ids(ref.config.vocab_size, 37)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref(ids).logits)


def test_quirks_are_exercised(checkpoint):
    """Guards against the parity tests passing for the wrong reason: the softcaps change these logits, and
    longrope's long factors are in use at 37 positions but not at 12."""
    model = load_model(str(checkpoint("gemma2")[1]), dtype=torch.float32)
    ids = _ids(model.config.vocab_size, 37)
    with torch.no_grad():
        capped = model(ids).logits
        assert capped.abs().max() > 0.75 * model.config.final_softcap  # in tanh's bend, not its linear part
        for layer in model.model.layers:
            layer.self_attn.softcap = None
        assert (model(ids).logits - capped).abs().max() > 0.1
    model = load_model(str(checkpoint("phi3_longrope")[1]), dtype=torch.float32)
    cos_long = model.rope(torch.arange(37)[None], "cpu")["global"][0]
    cos_short = model.rope(torch.arange(12)[None], "cpu")["global"][0]
    assert (cos_long[:12] - cos_short).abs().max() > 0.1


@pytest.mark.parametrize("name", ["phi3_longrope", "phi4_mini_partial"])
def test_longrope_factors_are_chosen_per_row(checkpoint, name):
    """A batch whose rows end before and after original_max_position_embeddings (16): each row gets the factors
    transformers gives it when run alone (there the choice is per call), so left-padded generation is exact."""
    ref, path = checkpoint(name)
    model = load_model(str(path), dtype=torch.float32)
    ids = _ids(ref.config.vocab_size, 10)
    pos = torch.stack([torch.arange(10), torch.arange(10) + 12])  # last positions 9 (short) and 21 (long)
    with torch.no_grad():
        got = model(ids, position_ids=pos).logits
        for row in range(2):
            want = ref(ids[row:row + 1], position_ids=pos[row:row + 1]).logits
            assert (got[row:row + 1] - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_generation_matches_transformers(checkpoint, name):
    ref, path = checkpoint(name)
    model = load_model(str(path), dtype=torch.float32)
    prompts = [[5, 17, 200, 2, 9, 33, 4, 150, 61], [44, 1, 7]]  # windows and original contexts are crossed
    want = []
    for p in prompts:  # one prompt at a time there (no padding); no EOS so all 32 tokens are compared
        out = ref.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        want.append(out[0, len(p):].tolist())
    assert generate_ids(model, prompts, max_new_tokens=32) == want  # batched, left-padded


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_round_trip(checkpoint, name, tmp_path):
    """hare's export has transformers' key names and tensors (Phi-3: the fused ones), and export -> load ->
    export is byte-identical."""
    ref, path = checkpoint(name)
    model = load_model(str(path), dtype=torch.float32)
    save_model(model, str(tmp_path / "a"))
    again = load_model(str(tmp_path / "a"))
    save_model(again, str(tmp_path / "b"))
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    theirs, ours = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "a" / "model.safetensors"))
    assert sorted(theirs) == sorted(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    if CASES[name][0] == "Phi3":
        assert "model.layers.0.self_attn.qkv_proj.weight" in ours and "model.layers.0.mlp.gate_up_proj.weight" in ours


def test_fused_tensor_errors_are_named(checkpoint, tmp_path):
    """Strict loading through SPLITS: a fused tensor of the wrong size, and a missing one, are named."""
    from safetensors.torch import save_file

    from hare import CheckpointError

    _, path = checkpoint("phi3_longrope")
    tensors = load_file(str(path / "model.safetensors"))
    bad = dict(tensors)
    bad["model.layers.1.self_attn.qkv_proj.weight"] = bad["model.layers.1.self_attn.qkv_proj.weight"][:-1]
    del bad["model.layers.0.mlp.gate_up_proj.weight"]
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_model(str(tmp_path))
    msg = str(e.value)
    assert "model.layers.1.self_attn.qkv_proj.weight: checkpoint (127, 64) vs model (128, 64)" in msg
    assert "missing (2): model.layers.0.mlp.gate_proj.weight, model.layers.0.mlp.up_proj.weight" in msg


YARN = {
    "yarn": dict(factor=4.0, original_max_position_embeddings=16),
    "yarn_untruncated_betas": dict(factor=3.0, original_max_position_embeddings=20, truncate=False, beta_fast=16,
                                   beta_slow=2),
    "yarn_mscale": dict(factor=8.0, original_max_position_embeddings=16, mscale=0.707, mscale_all_dim=1.0),
    "yarn_attention_factor": dict(factor=2.0, original_max_position_embeddings=64, attention_factor=1.25),
}


@pytest.mark.parametrize("name", sorted(YARN))
def test_yarn_frequencies_bit_exact(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from hare.models import config_from_dict
    from hare.models.rope import rope_inv_freq

    cfg = transformers.Qwen2Config(**dict(BASE, rope_parameters=dict(YARN[name], rope_type="yarn",
                                                                      rope_theta=50000.0)))
    want, want_scale = ROPE_INIT_FUNCTIONS["yarn"](cfg, None)
    ours = config_from_dict(cfg.to_dict())
    got, scale = rope_inv_freq(ours.rope, ours.head_dim, ours.max_position_embeddings)
    assert torch.equal(got, want) and scale == want_scale


def test_longrope_frequencies_bit_exact():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from hare.models import config_from_dict
    from hare.models.rope import rope_inv_freq

    cfg = transformers.Phi3Config(**dict(BASE, max_position_embeddings=64, original_max_position_embeddings=16,
                                         rope_parameters=_longrope(8, 3)))
    ours = config_from_dict(cfg.to_dict())
    for T, seq_len in ((16, None), (17, 17)):  # transformers: short at init, long for seq_len > original
        want, want_scale = ROPE_INIT_FUNCTIONS["longrope"](cfg, None, seq_len=seq_len)
        got, scale = rope_inv_freq(ours.rope, ours.head_dim, ours.max_position_embeddings,
                                   torch.arange(T)[None])
        assert torch.equal(got[0, 0], want) and scale == want_scale


def _config_error(hf, match):
    from hare import ConfigError
    from hare.models import config_from_dict

    with pytest.raises(ConfigError, match=match):
        config_from_dict(hf, "cfg.json")


def test_bad_family_configs_are_named():
    phi = transformers.Phi3Config(**dict(BASE, original_max_position_embeddings=16,
                                         rope_parameters=_longrope(8, 3))).to_dict()
    phi["rope_parameters"]["long_factor"] = phi["rope_parameters"]["long_factor"][:5]
    _config_error(phi, "long_factor has 5 entries, expected 8")
    qwen = transformers.Qwen2Config(**BASE).to_dict()
    _config_error(dict(qwen, rope_parameters={"rope_type": "ntk-by-parts", "rope_theta": 1.0}),
                  "unsupported rope type 'ntk-by-parts'")
    _config_error(dict(qwen, rope_parameters={"rope_type": "linear", "rope_theta": 1.0}), "needs \\['factor'\\]")
    _config_error(dict(qwen, layer_types=["full_attention"]), "layer_types must list")
    gemma3 = transformers.Gemma3TextConfig(**BASE).to_dict()
    _config_error(dict(gemma3, use_bidirectional_attention=True), "use_bidirectional_attention")


@pytest.fixture(scope="module")
def gemma3_multimodal(tmp_path_factory):
    """A tiny Gemma 3 vision-language checkpoint (text tower: windows, q/k norm, two ropes, linear scaling) as
    transformers saves it (the released layout: language_model.model.*, vision_tower.*, multi_modal_projector.*),
    and a copy whose text_config names only what differs from Gemma3TextConfig's defaults, as the released 4B
    config.json does."""
    text = dict(BASE, head_dim=16, sliding_window=6, num_hidden_layers=3, sliding_window_pattern=3,
                rope_scaling={"rope_type": "linear", "factor": 8.0})
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    boi_token_index=208, eoi_token_index=209, image_token_index=210)
    torch.manual_seed(0)
    ref = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "norm" in n and "language_model" in n:
                p.add_(torch.randn_like(p) * 0.1)
    full = tmp_path_factory.mktemp("gemma3_mm") / "full"
    ref.save_pretrained(full)
    sparse = full.parent / "sparse"
    sparse.mkdir()
    (sparse / "model.safetensors").write_bytes((full / "model.safetensors").read_bytes())
    hf = json.loads((full / "config.json").read_text())
    defaults = transformers.Gemma3TextConfig().to_dict()
    hf["text_config"] = {k: v for k, v in hf["text_config"].items()
                         if k == "model_type" or k not in defaults or defaults[k] != v}
    assert "query_pre_attn_scalar" not in hf["text_config"] and "hidden_activation" not in hf["text_config"]
    (sparse / "config.json").write_text(json.dumps(hf))
    return ref, full, sparse


@pytest.mark.parametrize("which", ["full", "sparse"])
def test_gemma3_multimodal_text_tower(gemma3_multimodal, which, tmp_path):
    """The text tower of a Gemma 3 vision-language checkpoint loads (vision weights ignored), matches
    transformers' text-only forward and generation, and exports as a text-only Gemma3ForCausalLM."""
    ref, full, sparse = gemma3_multimodal
    path = full if which == "full" else sparse
    ids = _ids(ref.config.text_config.vocab_size, 37)
    with torch.no_grad():
        want = ref(ids)
        if which == "sparse":  # transformers reads the sparse config as the same model
            again = transformers.Gemma3ForConditionalGeneration.from_pretrained(str(path)).eval()
            assert torch.equal(again(ids).logits, want.logits)
        model = load_model(str(path), dtype=torch.float32)
        assert model.config.model_type == "gemma3_text"
        assert model.config.layer_types == ("sliding_attention", "sliding_attention", "full_attention")
        got = model(ids).logits
    assert (got - want.logits).abs().max().item() <= 1e-4
    prompt = [5, 17, 200, 2, 9, 33, 4, 150, 61]
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                       pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert generate_ids(model, [prompt], max_new_tokens=32) == [out[0, len(prompt):].tolist()]
    save_model(model, str(tmp_path / "text"))
    text_only = transformers.Gemma3ForCausalLM.from_pretrained(str(tmp_path / "text")).eval()
    with torch.no_grad():
        assert (text_only(ids).logits - want.logits).abs().max().item() <= 1e-4


def _factors(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [round(x, 4) for x in (1.0 + 4 * torch.rand(n, generator=g)).tolist()]


# config.json files shaped like the released ones (field sets and values of the published checkpoints; longrope
# factor lists are placeholders of the right length): what each family file must read as transformers does.
RELEASED = {
    "Mistral-7B-v0.1": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                            rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False,
                            vocab_size=32000, hidden_act="silu", torch_dtype="bfloat16"),
    "Mistral-7B-v0.3": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                            rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None,
                            tie_word_embeddings=False, vocab_size=32768, hidden_act="silu"),
    "gemma-2b": dict(model_type="gemma", attention_bias=False, head_dim=256, hidden_act="gelu", hidden_size=2048,
                     intermediate_size=16384, max_position_embeddings=8192, num_attention_heads=8,
                     num_hidden_layers=18, num_key_value_heads=1, rms_norm_eps=1e-6, rope_scaling=None,
                     rope_theta=10000.0, vocab_size=256000),
    "gemma-2-2b": dict(model_type="gemma2", attention_bias=False, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, head_dim=256, hidden_act="gelu_pytorch_tanh",
                       hidden_activation="gelu_pytorch_tanh", hidden_size=2304, intermediate_size=9216,
                       max_position_embeddings=8192, num_attention_heads=8, num_hidden_layers=26,
                       num_key_value_heads=4, query_pre_attn_scalar=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                       sliding_window=4096, vocab_size=256000),
    "gemma-3-1b": dict(model_type="gemma3_text", attn_logit_softcapping=None, final_logit_softcapping=None,
                       head_dim=256, hidden_activation="gelu_pytorch_tanh", hidden_size=1152,
                       intermediate_size=6912, max_position_embeddings=32768, num_attention_heads=4,
                       num_hidden_layers=26, num_key_value_heads=1, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
                       rope_local_base_freq=10000, rope_scaling=None, rope_theta=1000000, sliding_window=512,
                       sliding_window_pattern=6, vocab_size=262144),
    "gemma-3-27b": dict(model_type="gemma3", eos_token_id=[1, 106], mm_tokens_per_image=256,
                        text_config=dict(head_dim=128, hidden_size=5376, intermediate_size=21504,
                                         model_type="gemma3_text", num_attention_heads=32, num_hidden_layers=62,
                                         num_key_value_heads=16, query_pre_attn_scalar=168,
                                         rope_scaling={"factor": 8.0, "rope_type": "linear"}, sliding_window=1024,
                                         sliding_window_pattern=6),
                        vision_config=dict(model_type="siglip_vision_model")),
    "Qwen2.5-0.5B": dict(model_type="qwen2", hidden_act="silu", hidden_size=896, intermediate_size=4864,
                         max_position_embeddings=32768, max_window_layers=24, num_attention_heads=14,
                         num_hidden_layers=24, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         sliding_window=32768, tie_word_embeddings=True, use_sliding_window=False,
                         vocab_size=151936),
    "Qwen2.5-7B-yarn": dict(model_type="qwen2", hidden_act="silu", hidden_size=3584, intermediate_size=18944,
                            max_position_embeddings=32768, max_window_layers=28, num_attention_heads=28,
                            num_hidden_layers=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
                            sliding_window=131072, tie_word_embeddings=False, use_sliding_window=False,
                            vocab_size=152064, rope_scaling={"factor": 4.0, "original_max_position_embeddings": 32768,
                                                             "type": "yarn"}),
    "Qwen3-0.6B": dict(model_type="qwen3", attention_bias=False, head_dim=128, hidden_act="silu", hidden_size=1024,
                       intermediate_size=3072, max_position_embeddings=40960, max_window_layers=28,
                       num_attention_heads=16, num_hidden_layers=28, num_key_value_heads=8, rms_norm_eps=1e-6,
                       rope_scaling=None, rope_theta=1000000, sliding_window=None, tie_word_embeddings=True,
                       use_sliding_window=False, vocab_size=151936),
    "Phi-3-mini-4k": dict(model_type="phi3", hidden_act="silu", hidden_size=3072, intermediate_size=8192,
                          max_position_embeddings=4096, num_attention_heads=32, num_hidden_layers=32,
                          num_key_value_heads=32, original_max_position_embeddings=4096, rms_norm_eps=1e-5,
                          rope_scaling=None, rope_theta=10000.0, sliding_window=2047, tie_word_embeddings=False,
                          vocab_size=32064, pad_token_id=32000, eos_token_id=32000),
    "Phi-3.5-mini": dict(model_type="phi3", hidden_act="silu", hidden_size=3072, intermediate_size=8192,
                         max_position_embeddings=131072, num_attention_heads=32, num_hidden_layers=32,
                         num_key_value_heads=32, original_max_position_embeddings=4096, rms_norm_eps=1e-5,
                         rope_scaling={"long_factor": _factors(48, 4), "short_factor": _factors(48, 5),
                                       "type": "longrope"},
                         rope_theta=10000.0, sliding_window=262144, tie_word_embeddings=False, vocab_size=32064),
    "Phi-4-mini": dict(model_type="phi3", hidden_act="silu", hidden_size=3072, intermediate_size=8192,
                       max_position_embeddings=131072, num_attention_heads=24, num_hidden_layers=32,
                       num_key_value_heads=8, original_max_position_embeddings=4096, partial_rotary_factor=0.75,
                       rms_norm_eps=1e-5, rope_scaling={"long_factor": _factors(48, 6),
                                                        "short_factor": _factors(48, 7), "type": "longrope"},
                       rope_theta=10000.0, sliding_window=262144, tie_word_embeddings=True, vocab_size=200064),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configs_read_as_transformers_reads_them(name):
    """Every field the decoder uses, against transformers' config class and its rotary embedding module (inverse
    frequencies and attention scaling, short and long for longrope, local and global for Gemma 3)."""
    import importlib

    from hare.models import config_from_dict
    from hare.models.rope import rope_inv_freq

    hf = RELEASED[name]
    ours = config_from_dict(json.loads(json.dumps(hf)), name)
    top = transformers.AutoConfig.for_model(**json.loads(json.dumps(hf)))
    theirs = getattr(top, "text_config", None) or top
    n = theirs.num_hidden_layers
    assert ours.head_dim == (getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads)
    assert ours.tie_word_embeddings == top.tie_word_embeddings
    assert ours.hidden_act == (getattr(theirs, "hidden_activation", None) or theirs.hidden_act)
    assert ours.rms_norm_eps == theirs.rms_norm_eps and ours.num_key_value_heads == theirs.num_key_value_heads
    assert ours.attn_softcap == getattr(theirs, "attn_logit_softcapping", None)
    assert ours.final_softcap == getattr(theirs, "final_logit_softcapping", None)
    assert ours.attention_scale == getattr(theirs, "query_pre_attn_scalar", ours.head_dim) ** -0.5
    window = getattr(theirs, "sliding_window", None)
    kinds = getattr(theirs, "layer_types", None) or ["sliding_attention"] * n
    sliding = [ours.layer_is_sliding(i) for i in range(n)]
    assert sliding == [window is not None and k == "sliding_attention" for k in kinds]
    assert not any(sliding) or ours.sliding_window == window
    family = theirs.model_type.replace("_text", "")
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    rotary = next(getattr(modeling, c) for c in dir(modeling) if c.endswith("RotaryEmbedding"))(config=theirs)
    for spec, prefix in ((ours.rope, "full_attention_"), (ours.rope_local, "sliding_attention_")):
        if spec is None:
            continue
        if not hasattr(rotary, prefix + "inv_freq"):
            prefix = ""
        for T in (8, ours.max_position_embeddings):
            pos = torch.arange(T)[None]
            rotary(torch.zeros(1, dtype=torch.float32), pos, **({"layer_type": prefix[:-1]} if prefix else {}))
            want = getattr(rotary, prefix + "inv_freq")
            got, scale = rope_inv_freq(spec, ours.head_dim, ours.max_position_embeddings, pos)
            assert torch.equal(got.reshape(-1), want)
            assert scale == getattr(rotary, prefix + "attention_scaling", getattr(rotary, "attention_scaling", None))
