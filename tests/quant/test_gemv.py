"""Fused 4-bit GEMV (interpreter on CPU) vs gemv_nf4_ref in fp64, tolerance from the ref in the input dtype.

The oracle dequantizes the weight to the input dtype (the kernel's definition: the 16-bit model's weight) and
sums in fp64; the control is the same reference summing in fp32 and rounding to the input dtype."""
import math
import struct

import pytest
import torch

from hare.quant import gemv_nf4, gemv_nf4_ref, quantize_nf4
from hare.quant.gemv import GEMV_CONFIGS, GemvConfig, gemv_config, launch_gemv, runnable
from tests.quant.bnb_oracle import DEVICE
from tests.tolerance import assert_close_to_ref

# triton 3.6's interpreter itself warns when a loop bound is a kernel argument (its scalars are 1-element arrays)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# aligned: K a multiple of the blocksize (every real model; K=1088 takes 3 steps of 512 bytes, the last ragged);
# general: K not a multiple (K=70), or odd (K=33: rows share bytes)
CASES = [((37, 128), 64), ((20, 1088), 64), ((9, 256), 128), ((13, 70), 64), ((5, 33), 64), ((3, 4096), 4096)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", CASES, ids=str)
def test_gemv_matches_ref(shape, blocksize, double_quant, dtype):
    gen = torch.Generator().manual_seed(0)
    n, k = shape
    w = quantize_nf4((torch.randn(shape, generator=gen) * 0.05).to(DEVICE), blocksize, double_quant)
    x = torch.randn(1, 1, k, generator=gen).to(dtype).to(DEVICE)
    y = gemv_nf4(x, w, backend="triton")
    assert y.shape == (1, 1, n) and y.dtype == dtype
    # the kernel sums K fp32 products in its own order (per-tile partial sums, then a tree), whose rounding
    # bound grows as log2(K) ulps of the result; cuBLAS (the GPU control) can sum more exactly than that, which
    # once failed the default 4-ulp floor at K=4096 in fp32 (err 7 ulps). The floor follows the bound.
    ulps = max(4, math.ceil(math.log2(k)))
    assert_close_to_ref(y, gemv_nf4_ref(x.double(), w, weight_dtype=dtype), gemv_nf4_ref(x, w), "y", ulps=ulps)


# Every code path, as tools/sweep_nf4.py launches them. Split-K: K = 320 is 40 words; 8-word steps in 3 chunks
# of 2 steps = 16, 16 and 8 words; K = 1088 is 136 words: 16-word steps, split 4 -> chunks of 3 steps = 48, 48, 40
# words (3 chunks: K is not a multiple of the split). N = 1 leaves most of a program's rows out of range;
# block_k 8 words on blocksize 128 is raised to one block (16 words); K = 70 takes the general path, which
# ignores split_k.
SPLIT_CASES = [((1, 320), 64, GemvConfig(2, 8, 2, split_k=3)),
               ((1, 320), 64, GemvConfig(1, 16, 1, split_k=8, lut="gather", fp_fusion=True)),
               ((37, 1088), 64, GemvConfig(4, 16, 2, split_k=4, lut="gather", num_stages=2)),
               ((37, 1088), 64, GemvConfig(16, 32, 4, split_k=2, fp_fusion=True)),
               ((9, 256), 128, GemvConfig(4, 8, 2, split_k=2, lut="gather")),
               ((5, 1088), 64, GemvConfig(2, 64, 4, lut="gather", num_stages=3, fp_fusion=True)),
               ((13, 70), 64, GemvConfig(2, 8, 2, split_k=3, lut="gather", fp_fusion=True))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,blocksize,config", SPLIT_CASES, ids=str)
def test_gemv_configs_match_ref(shape, blocksize, config, dtype):
    gen = torch.Generator().manual_seed(1)
    n, k = shape
    w = quantize_nf4((torch.randn(shape, generator=gen) * 0.05).to(DEVICE), blocksize)
    x = torch.randn(1, k, generator=gen).to(dtype).to(DEVICE)
    y = torch.full((1, n), float("nan"), dtype=dtype, device=DEVICE)
    launch_gemv(x, w, y, config)
    ulps = max(4, math.ceil(math.log2(k)))
    assert_close_to_ref(y, gemv_nf4_ref(x.double(), w, weight_dtype=dtype), gemv_nf4_ref(x, w), "y", ulps=ulps)


# lut="prmt" (PTX byte permutes; bf16 x on a GPU): the aligned path with steps of 1 to 64 words, a ragged last step,
# split-K, blocksize 128 and 4096 (one table per 4096 weights), prefetch stages; K = 70 takes the general path
PRMT_CASES = [((37, 1088), 64, GemvConfig(2, 256, 4, lut="prmt")),
              ((1, 320), 64, GemvConfig(2, 8, 2, split_k=3, lut="prmt", fp_fusion=True)),
              ((9, 256), 128, GemvConfig(4, 8, 2, lut="prmt")),
              ((3, 4096), 4096, GemvConfig(1, 512, 4, lut="prmt")),
              ((64, 4096), 64, GemvConfig(2, 128, 2, lut="prmt", num_stages=2, fp_fusion=True)),
              ((13, 70), 64, GemvConfig(2, 8, 2, lut="prmt"))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="lut='prmt' is PTX: GPU only")
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize,config", PRMT_CASES, ids=str)
def test_gemv_prmt_matches_ref(shape, blocksize, config, double_quant):
    gen = torch.Generator().manual_seed(2)
    n, k = shape
    w = quantize_nf4((torch.randn(shape, generator=gen) * 0.05).cuda(), blocksize, double_quant)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16).cuda()
    y = torch.full((1, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    launch_gemv(x, w, y, config)
    ulps = max(4, math.ceil(math.log2(k)))
    assert_close_to_ref(y, gemv_nf4_ref(x.double(), w, weight_dtype=torch.bfloat16), gemv_nf4_ref(x, w), "y",
                        ulps=ulps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="lut='prmt' is PTX: GPU only")
def test_gemv_prmt_weights_are_dequantize_bits():
    """x = e_k makes y column k of the weight exactly (one product with 1.0, the rest zeros): every position of a
    word, every block and both table halves must give dequantize's bf16 bits, with and without double quant."""
    gen = torch.Generator().manual_seed(3)
    for double_quant in (True, False):
        w = quantize_nf4((torch.randn(24, 256, generator=gen) * 0.05).cuda(), 64, double_quant)
        want = w.dequantize(torch.bfloat16)
        assert set(torch.unique(torch.cat([w.packed >> 4, w.packed & 15])).tolist()) == set(range(16))
        cols = []
        for k in range(256):
            x = torch.zeros(1, 256, dtype=torch.bfloat16, device="cuda")
            x[0, k] = 1.0
            y = torch.empty(1, 24, dtype=torch.bfloat16, device="cuda")
            launch_gemv(x, w, y, GemvConfig(2, 32, 2, lut="prmt"))
            cols.append(y[0])
        assert torch.equal(torch.stack(cols, 1), want)


def _f32(v):
    return struct.unpack("<f", struct.pack("<I", v))[0]


def _bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _prmt(a, b, c):
    """PTX prmt.b32 (default mode): byte k of the result is byte (c's nibble k & 7) of b:a, or, with that
    nibble's bit 3 set, the top bit of that byte copied over all 8 bits."""
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for k in range(4):
        sel = (c >> 4 * k) & 0xF
        byte = src[sel & 7]
        out |= ((0xFF if byte & 0x80 else 0) if sel & 8 else byte) << 8 * k
    return out


def _run_ptx(asm, n_out, args):
    """A small interpreter of the PTX that quant/gemv.py's lut="prmt" path uses, so that CPU tests check its byte
    tricks (Triton's interpreter runs no inline PTX). Values are 32-bit patterns (ints); args[i] is operand
    $(n_out + i); a 16-byte load's address operand is the list of the 4 words it reads. Returns $0..$(n_out-1)."""
    f32 = lambda v: torch.tensor(_f32(v), dtype=torch.float32)  # noqa: E731
    bf16 = lambda v: f32(v).to(torch.bfloat16).view(torch.int16).item() & 0xFFFF  # noqa: E731 (cvt.rn: RNE)
    ops = {"mov.b32": lambda a: a, "and.b32": lambda a, b: a & b, "shr.u32": lambda a, b: a >> b,
           "shl.b32": lambda a, b: (a << b) & 0xFFFFFFFF, "setp.ne.b32": lambda a, b: a != b,
           "mul.rn.f32": lambda a, b: _bits((f32(a) * f32(b)).item()),
           # an fma rounds once: the fp64 product of two fp32 values is exact, and the sum's double rounding
           # (fp64, then fp32) can differ from one rounding only in ties this test's values do not produce
           "fma.rn.f32": lambda a, b, c: _bits(torch.tensor(_f32(a) * _f32(b) + _f32(c), dtype=torch.float64)
                                               .float().item()),
           "cvt.rn.bf16x2.f32": lambda a, b: bf16(a) << 16 | bf16(b),
           "lop3.b32": lambda a, b, c, lut: sum(((lut >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1))) & 1)
                                                << i for i in range(32)),
           "prmt.b32": _prmt}
    regs = {}

    def val(op):
        return args[int(op[1:]) - n_out] if op.startswith("$") else regs[op] if op in regs else int(op, 0)

    for line in asm.split("\n"):
        line = line.strip().rstrip(";")
        if line in ("{", "}", "") or line.startswith(".reg"):
            continue
        if line.startswith("@"):
            guard, line = line[1:].split(None, 1)
            if not regs[guard]:
                continue
        op, rest = line.split(None, 1)
        if op == "ld.global.nc.v4.b32":
            dst, addr = rest.split("}, [")
            regs.update(zip(dst.strip("{ ").split(", "), val(addr.rstrip("]"))))
            continue
        d, *src = [x.strip() for x in rest.split(",")]
        regs[d] = ops[op](*(val(x) for x in src))
    return [regs[f"${i}"] for i in range(n_out)]


def test_prmt_ptx_gives_dequantize_bits():
    """The PTX strings of lut="prmt" through _run_ptx: for one-hot x, each element of each word comes out as the
    bf16 bits that dequantize returns (all 16 codes, with and without double quantization, blocksize 64 and 128);
    a masked word (ok = 0) reads zeros and leaves the sum as it was."""
    from hare.quant import gemv as gv
    from hare.quant.dequant import packed_words
    gen = torch.Generator().manual_seed(4)
    for double_quant, blocksize in ((True, 64), (False, 128)):
        w = quantize_nf4(torch.randn(3, 256, generator=gen) * 0.05, blocksize, double_quant)
        want = w.dequantize(torch.bfloat16).view(torch.int16).reshape(-1).tolist()
        assert set(torch.cat([w.packed >> 4, w.packed & 15]).unique().tolist()) == set(range(16))
        absmax = w.absmax  # fp32 per block, the roundings of dequant.py's load_absmax
        if double_quant:
            nested = w.nested_absmax[torch.arange(absmax.numel()) // w.nested_blocksize]
            absmax = w.nested_quant_map[absmax.long()] * nested + w.offset
        qmap = [_bits(v) for v in w.quant_map.tolist()]
        for j, word in enumerate(packed_words(w.packed).tolist()):
            tables = _run_ptx(gv._PRMT_TABLES.value, 8, [_bits(absmax[8 * j // blocksize].item())] + qmap)
            for s in range(8):
                x = [0, 0, 0, 0]
                x[s // 2] = 0x3F80 << (16 * (s % 2))  # bf16 1.0 as element 8j + s (x[2i] in a pair's low half)
                (acc,) = _run_ptx(gv._PRMT_DOT.value, 1, [0, word, x, 1] + tables)
                assert acc >> 16 == want[8 * j + s] & 0xFFFF and acc & 0xFFFF == 0, (j, s)
        (acc,) = _run_ptx(gv._PRMT_DOT.value, 1, [_bits(0.5), word, [0x3F803F80] * 4, 0] + tables)
        assert _f32(acc) == 0.5


def test_gemv_prmt_needs_bf16_on_a_gpu():
    """The library's table names lut="prmt"; gemv_nf4 then runs other dtypes and the interpreter with the same
    tile and the gather table, while an explicit launch_gemv refuses."""
    w = quantize_nf4(torch.randn(4, 128, device=DEVICE))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        if dtype == torch.bfloat16 and DEVICE != "cpu":
            continue
        with pytest.raises(ValueError, match="prmt"):
            launch_gemv(torch.randn(1, 128, device=DEVICE, dtype=dtype), w,
                        torch.empty(1, 4, device=DEVICE, dtype=dtype), GemvConfig(2, 16, 2, lut="prmt"))
        x = torch.randn(1, 128, device=DEVICE, dtype=dtype)
        assert_close_to_ref(gemv_nf4(x, w, backend="triton"), gemv_nf4_ref(x.double(), w, weight_dtype=dtype),
                            gemv_nf4_ref(x, w), "y", ulps=7)


def test_config_table_and_preconditions():
    x, w = torch.randn(1, 64, device=DEVICE), quantize_nf4(torch.randn(2, 64, device=DEVICE))
    for _, _, config in GEMV_CONFIGS:  # a table edited after a sweep still holds valid configs
        y = torch.full((1, 2), float("nan"), device=DEVICE)
        launch_gemv(x, w, y, runnable(config, x))  # fp32 x: prmt rows run as gather
        assert_close_to_ref(y, gemv_nf4_ref(x.double(), w, weight_dtype=x.dtype), gemv_nf4_ref(x, w), "y", ulps=6)
    assert gemv_config(2 ** 20, 2 ** 20) == GEMV_CONFIGS[-1][2]  # the last row bounds nothing
    w = quantize_nf4(torch.randn(2, 64, device=DEVICE))
    for bad, match in [(GemvConfig(3, 8, 2), "power of 2"), (GemvConfig(2, 8, 2, lut="select"), "lut"),
                       (GemvConfig(2, 8, 2, lut="pairs"), "'load', 'gather' or 'prmt'"),  # removed (dequant.py)
                       (GemvConfig(2, 8, 2, split_k=0), "split_k"), ((2, 8, 2), "GemvConfig")]:
        with pytest.raises(ValueError, match=match):
            launch_gemv(torch.randn(1, 64, device=DEVICE), w, torch.empty(1, 2, device=DEVICE), bad)


def test_gemv_preconditions():
    w = quantize_nf4(torch.randn(8, 64, device=DEVICE))
    with pytest.raises(ValueError, match="one row"):
        gemv_nf4(torch.randn(2, 64, device=DEVICE), w)
    with pytest.raises(ValueError, match="in_features=64"):
        gemv_nf4(torch.randn(1, 32, device=DEVICE), w)
    with pytest.raises(ValueError, match="2-D"):
        gemv_nf4(torch.randn(64, device=DEVICE), quantize_nf4(torch.randn(2, 4, 64, device=DEVICE)))


def test_offline_sass_counts(tmp_path):
    """tools/sass_nf4.py compiles the kernels for sm_90a without a GPU (the ptxas in triton's wheel) and counts the
    SASS instructions of their loop per weight: it keeps working as the kernels' signatures change, the loop it
    finds holds the table lookups (one shared-memory load per weight for lut "gather", a global one for "load"),
    and "gather" issues fewer instructions per weight than "load" in both kernels, as their docstrings say. In a
    process of its own: this one runs Triton's interpreter, whose kernels cannot be compiled."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "sass.json"
    subprocess.run([sys.executable, "-m", "hare.tools.sass_nf4", "--gemv", "2,256,4,gather", "2,256,4,load",
                    "2,256,4,prmt", "--dequant", "2048,2,gather", "2048,2,load", "--out", str(out)], env=env,
                   check=True, capture_output=True)
    rows = {(r["kernel"], r["config"]["lut"]): r for r in json.loads(out.read_text())}
    assert len(rows) == 5, rows.keys()
    for (kernel, lut), row in rows.items():
        assert row["registers"] > 0, (kernel, lut)
        if lut == "prmt":  # the lookup is byte permutes, ~2 PRMT per weight; shared memory only moves each tile
            # row's absmax into the word tile's layout (1/16 LDS per weight against 1 for "gather")
            assert row["opcodes_per_weight"].get("PRMT", 0) >= 2, row
            assert row["opcodes_per_weight"].get("LDS", 0) < 0.25, row
        else:
            assert row["opcodes_per_weight"].get("LDS" if lut == "gather" else "LDG", 0) >= 1, (kernel, lut, row)
    per_weight = {key: row["loop_per_weight"] for key, row in rows.items()}
    for kernel in ("gemv", "dequant"):
        assert per_weight[kernel, "gather"] < per_weight[kernel, "load"], per_weight
    assert per_weight["gemv", "prmt"] < per_weight["gemv", "gather"], per_weight
