"""Llama parity with transformers (the reference nobody here wrote) on tiny random configs of every quirk:
checkpoints saved by transformers' own save_pretrained, loaded through hare.load_model."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from hare import generate_ids, load_model  # noqa: E402

BASE = dict(vocab_size=1001, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5)

CONFIGS = {
    "gqa": dict(num_key_value_heads=2),
    "tied_odd_vocab": dict(tie_word_embeddings=True, vocab_size=997),
    "llama3_rope": dict(num_key_value_heads=1, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "linear_rope": dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    # dynamic NTK only changes anything past max_position_embeddings: test at 80 > 64 positions
    "dynamic_rope": dict(max_position_embeddings=32, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0,
                                                                           factor=2.0)),
    "head_dim_bias": dict(head_dim=24, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
}


def _save(tmp_path, name, **over):
    kw = dict(BASE, **CONFIGS[name], **over)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**kw)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    # random init leaves biases at zero: give them values so that they are tested
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path / name)
    return ref, tmp_path / name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_loss_match_transformers(tmp_path, name):
    ref, path = _save(tmp_path, name)
    model = load_model(str(path), dtype=torch.float32)
    T = 80 if name == "dynamic_rope" else 37
    ids = torch.randint(0, ref.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        want = ref(ids, labels=labels)
        got = model(ids, labels=labels, return_logits=True)
    assert (got.logits - want.logits).abs().max().item() <= 1e-4
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5


@pytest.mark.parametrize("name", ["gqa", "llama3_rope", "tied_odd_vocab"])
def test_greedy_generation_matches_transformers(tmp_path, name):
    ref, path = _save(tmp_path, name, max_position_embeddings=128)
    model = load_model(str(path), dtype=torch.float32)
    prompts = [[5, 17, 300, 2, 9], [44, 1, 7]]
    # reference: one prompt at a time (no padding involved on its side); no EOS so all 32 tokens are compared
    want = []
    for p in prompts:
        out = ref.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        want.append(out[0, len(p):].tolist())
    got = generate_ids(model, prompts, max_new_tokens=32)  # batched, left padded
    assert got == want
