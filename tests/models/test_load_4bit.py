"""4-bit loading: quantize while streaming, read and write bitsandbytes' 4-bit checkpoint format (transformers +
bitsandbytes are the oracles), and refuse what would be misread."""
import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from hare import CheckpointError, load_model, save_model  # noqa: E402
from hare.quant import Linear4bit  # noqa: E402

# Every in_features a multiple of 64: bitsandbytes' CPU dequantize is wrong for rows that are a multiple of 16 but
# not of 64 (see tests/quant), and it is the oracle here.
CFG = dict(vocab_size=301, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck4") / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).save_pretrained(d)
    return d


IDS = torch.randint(0, 301, (2, 19), generator=torch.Generator().manual_seed(3))


def test_4bit_model_equals_dense_model_on_dequantized_weights(ckpt):
    q = load_model(str(ckpt), dtype=torch.float32, load_in_4bit=True)
    dense = load_model(str(ckpt), dtype=torch.float32)
    quantized = {n: m for n, m in q.named_modules() if isinstance(m, Linear4bit)}
    assert len(quantized) == 2 * 7
    assert not any(isinstance(m, Linear4bit) for n, m in q.named_modules() if "lm_head" in n or "embed" in n)
    for name, m in quantized.items():
        dense.get_submodule(name).weight.data = m.weight.dequantize(torch.float32, backend="ref")
    with torch.no_grad():
        assert torch.equal(q(IDS).logits, dense(IDS).logits)


def test_4bit_save_load_round_trip_is_byte_identical(ckpt, tmp_path):
    q = load_model(str(ckpt), dtype=torch.float32, load_in_4bit=True)
    save_model(q, str(tmp_path / "a"))
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    sd = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in sd
    q2 = load_model(str(tmp_path / "a"), dtype=torch.float32)  # pre-quantized: 4-bit without asking
    assert isinstance(q2.model.layers[1].mlp.down_proj, Linear4bit)
    save_model(q2, str(tmp_path / "b"))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    with torch.no_grad():
        assert torch.equal(q(IDS).logits, q2(IDS).logits)


def _bnb_model(path):
    pytest.importorskip("bitsandbytes")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.float32,
                                                             device_map="cpu")


def _same_weights(ref, ours):
    """Every weight of the transformers + bitsandbytes model equals ours: 4-bit ones after each side's own
    dequantization (bitsandbytes' dequantize_4bit vs ours), the rest exactly. (Logits are not compared:
    bitsandbytes' CPU 4-bit matmul rounds through a lower precision, off by ~3e-3 from F.linear on its own
    dequantized weight.)"""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    n4 = 0
    for name, m in ref.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            want = bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            got = ours.get_submodule(name).weight.dequantize(torch.float32, backend="ref")
            assert torch.equal(want, got), name
            n4 += 1
    assert n4 == 2 * 7
    theirs = {n: p for n, p in ref.named_parameters() if p.dtype != torch.uint8}
    mine = dict(ours.named_parameters())
    assert theirs.keys() == mine.keys()
    assert all(torch.equal(theirs[n].float(), mine[n].float()) for n in mine)


def test_transformers_reads_our_4bit_checkpoint(ckpt, tmp_path):
    pytest.importorskip("bitsandbytes")
    q = load_model(str(ckpt), dtype=torch.float32, load_in_4bit=True)
    save_model(q, str(tmp_path / "ours"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32,
                                                            device_map="cpu")
    _same_weights(ref, q)


def test_we_read_a_checkpoint_transformers_quantized(ckpt, tmp_path):
    ref = _bnb_model(ckpt)
    ref.save_pretrained(tmp_path / "theirs")
    ours = load_model(str(tmp_path / "theirs"), dtype=torch.float32)
    assert isinstance(ours.model.layers[0].self_attn.k_proj, Linear4bit)
    _same_weights(ref, ours)


@pytest.mark.parametrize("change, match", [
    (dict(bnb_4bit_quant_type="fp4"), "'fp4' is not supported"),
    (dict(load_in_4bit=False, load_in_8bit=True), "8-bit"),
    (dict(quant_method="gptq"), "'gptq' is not supported"),
])
def test_other_quantizations_refused(ckpt, tmp_path, change, match):
    q = load_model(str(ckpt), dtype=torch.float32, load_in_4bit=True)
    save_model(q, str(tmp_path / "x"))
    cfg = json.loads((tmp_path / "x" / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (tmp_path / "x" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        load_model(str(tmp_path / "x"))
