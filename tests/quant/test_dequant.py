"""The Triton dequant kernel (interpreter on CPU) equals dequantize_nf4_ref bit for bit; both levels, every
output dtype, block sizes, ragged tails."""
import pytest
import torch

from hare.quant import NF4Weight, dequantize_nf4, dequantize_nf4_ref, nf4_map, quantize_nf4
from hare.quant.dequant import DequantConfig, launch_dequant
from tests.quant.bnb_oracle import DEVICE

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 0.02).to(DEVICE)


def _bits_equal(a, b):
    """Same dtype, shape and bit patterns (torch.equal would take -0.0 == 0.0)."""
    ints = {2: torch.int16, 4: torch.int32}
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(ints[a.element_size()]), b.reshape(-1).view(ints[b.element_size()])))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((64, 64), 64), ((37, 70), 64), ((3, 5, 7), 64), ((300, 257), 64),
                                             ((1,), 64), ((129, 576), 32), ((33, 100), 128), ((5, 1000), 4096)],
                         ids=str)
def test_triton_equals_ref_bitwise(shape, blocksize, double_quant, dtype):
    w = quantize_nf4(_weight(shape), blocksize=blocksize, double_quant=double_quant)
    got = dequantize_nf4(w, dtype, backend="triton")
    want = dequantize_nf4_ref(w, dtype)
    assert got.shape == w.shape and got.dtype == dtype
    assert _bits_equal(got, want)


def test_several_programs_and_nested_blocks():
    # > 256 blocks (several nested blocks) and several programs with a ragged last one
    w = quantize_nf4(_weight((130, 300), seed=1))
    assert w.absmax.numel() > 2 * 256
    assert _bits_equal(dequantize_nf4(w, torch.bfloat16, backend="triton"), dequantize_nf4_ref(w, torch.bfloat16))


# Every code path of the kernel, as tools/sweep_nf4.py launches them: table lookup by global load or tl.gather;
# one tile per program or a persistent grid whose programs loop over several tiles (on the CPU sm_count is 1, so
# programs_per_sm=3 makes 3 programs striding over the 11 tiles of 4 blocks of 64 below, the last one ragged);
# pipelined loops; streaming hints.
CONFIGS = [DequantConfig(256, 2, "load"), DequantConfig(256, 2, "gather"), DequantConfig(256, 4, "gather", 3, 1),
           DequantConfig(128, 2, "gather", 3, 3, True), DequantConfig(512, 1, "load", 2, 2, True),
           DequantConfig(16, 1, "gather")]  # 16 elements: less than a block, so one block per tile


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_every_config_bitwise(config, dtype):
    w = quantize_nf4(_weight((37, 70), seed=2))  # 2590 values: 41 blocks, the last one partial
    out = torch.full(w.shape, float("nan"), dtype=dtype, device=DEVICE)
    launch_dequant(w, out, config)
    assert _bits_equal(out, dequantize_nf4_ref(w, dtype))


def test_config_preconditions():
    w = quantize_nf4(_weight((4, 64)))
    out = torch.empty(w.shape, device=DEVICE)
    for bad, match in [(DequantConfig(96, 2), "power of 2"), (DequantConfig(4, 2, "select"), "lut"),
                       (DequantConfig(256, 2, "pairs"), "'load' or 'gather'"),  # removed (quant/dequant.py)
                       (DequantConfig(4, 2, "load", -1), "programs_per_sm"), ((64, 2), "DequantConfig")]:
        with pytest.raises(ValueError, match=match):
            launch_dequant(w, out, bad)


def test_rounding_of_bf16_is_to_nearest_even():
    # values whose fp32 product sits exactly between two bf16 numbers, and just above: RNE both backends
    q = torch.tensor([0xFF] * 2, dtype=torch.uint8)  # index 15 -> 1.0, so the output is absmax itself
    for a in [1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20, -(1.0 + 3 * 2 ** -8)]:
        w = NF4Weight(packed=q.to(DEVICE), absmax=torch.tensor([a], device=DEVICE),
                      quant_map=nf4_map(DEVICE),
                      shape=(4,), dtype=torch.float32, blocksize=64)
        want = torch.tensor([a] * 4, dtype=torch.float32).to(torch.bfloat16)
        for backend in ("ref", "triton"):
            assert torch.equal(w.dequantize(torch.bfloat16, backend=backend).cpu(), want), (a, backend)


def test_default_backend_and_preconditions():
    w = quantize_nf4(_weight((4, 64)))
    assert _bits_equal(w.dequantize(), dequantize_nf4_ref(w, torch.bfloat16))  # default dtype bf16
    with pytest.raises(ValueError, match="dtype"):
        w.dequantize(torch.int8)
    with pytest.raises(ValueError, match="backend"):
        w.dequantize(torch.float32, backend="cuda")
