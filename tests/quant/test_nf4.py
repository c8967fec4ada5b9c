"""NF4 quantization and its bitsandbytes layout: tables, bytes, statistics, nibble order, (de)serialization."""
import json
from statistics import NormalDist

import pytest
import torch

from hare.quant import NF4_VALUES, NF4Weight, QuantFormatError, dynamic_map, nf4_map, quantize_nf4
from hare.quant.nf4 import _midpoints, _nearest_dynamic, _nearest_nf4
from tests.quant.bnb_oracle import DEVICE, assert_codes_match, bnb_functional, bnb_quantize, bnb_tensors

# numel: a multiple of 64 and of 64*256; not a multiple of 64 (2590); odd (105); 1205 blocks (not a multiple
# of 256); a single element; 1161 blocks over rows of 576.
SHAPES = [(64, 64), (37, 70), (3, 5, 7), (300, 257), (1,), (129, 576), (64 * 256 + 64, 2)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 0.05).to(dtype).to(DEVICE)


def test_nf4_table_is_the_qlora_quantiles():
    # QLoRA appendix E: quantiles of N(0, 1) at linspace(0.9677083, 0.5, 9)[:-1] (positive half) and
    # linspace(0.9677083, 0.5, 8)[:-1] (negative), plus 0, over the largest (probabilities in fp32, as
    # bitsandbytes' create_normal_map takes them from torch.linspace)
    nd = NormalDist()
    pos = [nd.inv_cdf(p) for p in torch.linspace(0.9677083, 0.5, 9)[:-1].tolist()]
    neg = [-nd.inv_cdf(p) for p in torch.linspace(0.9677083, 0.5, 8)[:-1].tolist()]
    t = torch.tensor(sorted(pos + [0.0] + neg), dtype=torch.float32)
    assert torch.equal(t / t.max(), nf4_map())
    assert torch.equal(nf4_map(), bnb_functional().get_4bit_type("nf4", device="cpu"))


def test_dynamic_map_matches_bitsandbytes():
    d = dynamic_map()
    assert d.shape == (256,) and torch.equal(d, d.sort().values) and d[-1] == 1.0 and (d == 0).sum() == 1
    assert torch.equal(d, bnb_functional().create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bytes_and_statistics_match_bitsandbytes(shape, dtype):
    w = _weight(shape, dtype)
    packed, st = bnb_quantize(w)
    ours = quantize_nf4(w)
    assert ours.shape == w.shape and ours.dtype == dtype and ours.blocksize == 64
    assert torch.equal(ours.packed, packed.reshape(-1)), "packed 4-bit bytes differ"
    assert torch.equal(ours.quant_map, st.code)
    assert torch.equal(ours.offset, st.offset), "offset (mean absmax) differs"
    assert torch.equal(ours.nested_absmax, st.state2.absmax), "nested absmax differs"
    assert torch.equal(ours.nested_quant_map, st.state2.code)
    assert ours.nested_blocksize == st.state2.blocksize == 256
    # the nested codes, against the values they quantize (first-level absmax from bitsandbytes itself)
    _, st_plain = bnb_quantize(w, double_quant=False)
    absmax = st_plain.absmax
    blk = torch.arange(absmax.numel(), device=absmax.device) // 256
    values = (absmax - st.offset) * (1.0 / st.state2.absmax)[blk]
    assert_codes_match(ours.absmax, st.absmax, values, st.state2.code)


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
@pytest.mark.parametrize("shape", [(37, 70), (129, 576)], ids=str)
def test_single_level_matches_bitsandbytes(shape, blocksize):
    w = _weight(shape, torch.bfloat16, seed=1)
    packed, st = bnb_quantize(w, blocksize=blocksize, double_quant=False)
    ours = quantize_nf4(w, blocksize=blocksize, double_quant=False)
    assert not ours.double_quant and ours.offset is None
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(ours.absmax, st.absmax)


def test_zero_blocks():
    # an all-zero 4-bit block: CUDA bitsandbytes computes 0 * (1/0) = NaN and stores index 0 (0x00 bytes), its CPU
    # path 0x77 (bench_nf4 checks the CUDA byte); hare follows CUDA. Both dequantize to zero.
    w = _weight((4, 128), torch.float32)
    w[1] = 0.0
    w[3, 64:] = 0.0
    packed, st = bnb_quantize(w)
    ours = quantize_nf4(w)
    zero = torch.zeros(4, 64, dtype=torch.bool, device=DEVICE)
    zero[1], zero[3, 32:] = True, True
    assert (ours.packed.view(4, 64)[zero] == 0).all()
    assert torch.equal(ours.packed.view(4, 64)[~zero], packed.view(4, 64)[~zero])
    if DEVICE == "cuda":
        assert torch.equal(ours.packed, packed.reshape(-1))
    # index 0 is -1.0: without double quantization the block's absmax is 0 and so is the weight; with it, the
    # decoded absmax is only near 0 and the row comes back as -absmax, as it does from bitsandbytes on CUDA
    assert (quantize_nf4(w, double_quant=False).dequantize(torch.float32)[1] == 0).all()
    # odd count whose last block is zero: the pad nibble is the NaN index 0 too; else the index of 0.0 (7)
    assert quantize_nf4(torch.tensor([1.0] * 64 + [0.0]), double_quant=False).packed[-1] == 0x00
    assert quantize_nf4(torch.tensor([1.0, 0.5, 1.0]), double_quant=False).packed[-1] == 0xF7
    # absmax values all equal: the nested block is zero after the offset -> code 0, bitsandbytes' on CPU and CUDA
    flat = torch.ones(256, device=DEVICE)
    packed, st = bnb_quantize(flat)
    ours = quantize_nf4(flat)
    assert torch.equal(ours.packed, packed.reshape(-1)) and torch.equal(ours.absmax, st.absmax)
    assert ours.dequantize(torch.float32).eq(1.0).all()


def test_nibble_order_hand_built_byte():
    # element 2i in the high nibble: 0x7F is (index 7 = 0.0, index 15 = 1.0), 0x0F is (-1.0, 1.0)
    w = NF4Weight(packed=torch.tensor([0x7F, 0x0F], dtype=torch.uint8), absmax=torch.tensor([2.0]),
                  quant_map=nf4_map(), shape=(4,), dtype=torch.float32, blocksize=64).to(DEVICE)
    assert w.dequantize(torch.float32, backend="ref").tolist() == [0.0, 2.0, -2.0, 2.0]
    assert w.dequantize(torch.float32, backend="triton").tolist() == [0.0, 2.0, -2.0, 2.0]
    q = quantize_nf4(torch.tensor([0.0, 1.0, -1.0, 1.0]), double_quant=False)
    assert q.packed.tolist() == [0x7F, 0x0F] and q.absmax.tolist() == [1.0]
    packed, _ = bnb_quantize(torch.tensor([0.0, 1.0, -1.0, 1.0]), double_quant=False)
    assert packed.reshape(-1).tolist() == [0x7F, 0x0F]


def test_rounding_on_midpoints():
    # NF4: a value exactly on a midpoint takes the lower index (CUDA dQuantizeNF4 goes up only on x > m)
    mids4 = _midpoints(nf4_map())
    assert _nearest_nf4(mids4, mids4).tolist() == list(range(15))
    # dynamic map: on the midpoint of (j, j+1) the even one of the two (end state of CUDA dQuantize)
    dyn = dynamic_map()
    mids8 = _midpoints(dyn)
    want = [j if j % 2 == 0 else j + 1 for j in range(255)]
    assert _nearest_dynamic(mids8, mids8).tolist() == want
    # off the midpoints: the nearest value, whatever the parity
    below = torch.nextafter(mids8, torch.tensor(-2.0))
    above = torch.nextafter(mids8, torch.tensor(2.0))
    assert _nearest_dynamic(below, mids8).tolist() == list(range(255))
    assert _nearest_dynamic(above, mids8).tolist() == list(range(1, 256))


@pytest.mark.skipif(DEVICE != "cuda", reason="bitsandbytes' CUDA kernel is the oracle of the tie rule")
def test_dynamic_ties_match_bitsandbytes_cuda():
    f = bnb_functional()
    mids = _midpoints(dynamic_map())
    x = torch.cat([mids, torch.tensor([1.0])]).to(DEVICE)  # the 1.0 makes the block's absmax exactly 1
    codes, _ = f.quantize_blockwise(x, blocksize=256)
    assert torch.equal(codes, _nearest_dynamic(x, mids.to(DEVICE)).to(torch.uint8))


def test_to_bnb_matches_bitsandbytes_state_dict():
    w = _weight((37, 70), torch.bfloat16)
    packed, st = bnb_quantize(w)
    theirs = bnb_tensors(packed, st, "model.layers.0.mlp.up_proj.")
    ours = quantize_nf4(w).to_bnb("model.layers.0.mlp.up_proj.")
    assert list(ours) == list(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
    qs = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    assert bytes(ours[qs].tolist()) == bytes(theirs[qs].tolist())  # same JSON, same bytes
    assert json.loads(bytes(ours[qs].tolist()))["shape"] == [37, 70]


@pytest.mark.parametrize("double_quant", [True, False])
def test_from_bnb_round_trip_and_bitsandbytes_reads_ours(double_quant):
    f = bnb_functional()
    w = _weight((300, 257), torch.float16)
    ours = quantize_nf4(w, double_quant=double_quant)
    tensors = ours.to_bnb("p.")
    back = NF4Weight.from_bnb(tensors, "p.")
    assert back.shape == ours.shape and back.dtype == ours.dtype and back.blocksize == ours.blocksize
    for name, t in ours.tensors().items():
        assert torch.equal(getattr(back, name), t), name
    # bitsandbytes rebuilds its QuantState from our tensors and dequantizes them as we do
    qs = f.QuantState.from_dict({k[len("p.weight."):]: v for k, v in tensors.items() if k != "p.weight"},
                                device=w.device)
    assert torch.equal(f.dequantize_4bit(tensors["p.weight"], qs, quant_type="nf4"), ours.dequantize(w.dtype))


# bitsandbytes 0.50's CPU dequantize_4bit is wrong when the last dim is a multiple of 16 but not of the
# blocksize (its AVX-512 path takes one absmax row per weight row), e.g. (64, 96); these shapes avoid that path.
@pytest.mark.parametrize("shape", [(129, 576), (37, 70), (3, 5, 7)], ids=str)
def test_from_bnb_reads_bitsandbytes_and_dequantizes_identically(shape):
    f = bnb_functional()
    for dtype in DTYPES:
        w = _weight(shape, dtype, seed=2)
        packed, st = bnb_quantize(w)
        ours = NF4Weight.from_bnb(bnb_tensors(packed, st, "m."), "m.")
        assert ours.dtype == dtype and ours.shape == w.shape
        want = f.dequantize_4bit(packed, st, quant_type="nf4")
        assert torch.equal(ours.dequantize(dtype, backend="ref"), want)
        assert torch.equal(ours.dequantize(dtype, backend="triton"), want)


def test_from_bnb_quant_storage_is_reinterpreted():
    # bnb_4bit_quant_storage=bfloat16 (FSDP) stores the same bytes in a bf16 tensor
    w = _weight((64, 64), torch.bfloat16)
    t = quantize_nf4(w).to_bnb()
    t["weight"] = t["weight"].reshape(-1).view(torch.bfloat16).reshape(-1, 1)
    assert torch.equal(NF4Weight.from_bnb(t).packed, quantize_nf4(w).packed)


def test_from_bnb_errors_name_the_key():
    packed, st = bnb_quantize(_weight((64, 64), torch.float32), quant_type="fp4")
    with pytest.raises(QuantFormatError, match=r"x\.weight\.quant_state\.bitsandbytes__fp4.*FP4"):
        NF4Weight.from_bnb(bnb_tensors(packed, st, "x."), "x.")
    good = quantize_nf4(_weight((64, 64), torch.float32)).to_bnb("x.")
    with pytest.raises(QuantFormatError, match=r"x\.weight\.absmax: missing"):
        NF4Weight.from_bnb({k: v for k, v in good.items() if k != "x.weight.absmax"}, "x.")
    with pytest.raises(QuantFormatError, match=r"x\.weight: packed must be"):
        NF4Weight.from_bnb({**good, "x.weight": good["x.weight"][:-1]}, "x.")
    with pytest.raises(QuantFormatError, match=r"x\.weight\.nested_absmax: nested_absmax must be"):
        NF4Weight.from_bnb({**good, "x.weight.nested_absmax": torch.zeros(2)}, "x.")
    with pytest.raises(QuantFormatError, match=r"y\.weight\.quant_state\.bitsandbytes__nf4: missing"):
        NF4Weight.from_bnb(good, "y.")
    assert isinstance(QuantFormatError("k"), ValueError)


def test_quantize_preconditions():
    with pytest.raises(ValueError, match="weight must be"):
        quantize_nf4(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.ones(4), blocksize=48)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_nf4(torch.tensor([1.0, float("inf")]))


def test_roundtrip_error_bound():
    # |w - dequant(quant(w))| <= half the widest NF4 gap times the block absmax (+ the nested absmax error)
    w = _weight((129, 576), torch.float32, seed=3)
    q = quantize_nf4(w, double_quant=False)
    err = (q.dequantize(torch.float32) - w).abs().view(-1, 64).amax(1)
    half_gap = (nf4_map().diff().max() / 2).item()
    assert (err <= half_gap * q.absmax * (1 + 1e-6)).all()


def test_nf4weight_to_device_and_values():
    q = quantize_nf4(_weight((3, 5, 7), torch.float16))
    assert q.to(DEVICE) is q
    moved = q.to("meta")
    assert moved.device.type == "meta" and moved.shape == q.shape
    assert tuple(NF4_VALUES) == tuple(nf4_map().tolist())


def test_transformers_checkpoint_layout(tmp_path):
    # transformers' save_pretrained of a bitsandbytes 4-bit model: the keys of each Linear are those of
    # to_bnb, and from_bnb reads them into the weights bitsandbytes itself dequantizes
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    f = bnb_functional()
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=qcfg,
                                                          device_map=DEVICE)
    m.save_pretrained(tmp_path / "q4")
    sd = load_file(tmp_path / "q4" / "model.safetensors")
    config = json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"]
    assert config["bnb_4bit_quant_type"] == "nf4" and config["bnb_4bit_use_double_quant"]
    assert sd["lm_head.weight"].dtype != torch.uint8  # lm_head stays 16/32-bit
    prefix = "model.layers.0.mlp.down_proj."
    assert sorted(k for k in sd if k.startswith(prefix)) == sorted(quantize_nf4(torch.ones(64, 128)).to_bnb(prefix))
    ours = NF4Weight.from_bnb(sd, prefix)
    mod = m.model.layers[0].mlp.down_proj
    want = f.dequantize_4bit(mod.weight.data, mod.weight.quant_state, quant_type="nf4")
    assert ours.shape == (64, 128)
    assert torch.equal(ours.dequantize(want.dtype).to(want.device), want)
