"""Fused 4-bit GEMV for batch-1 decoding: y = x @ dequant(W)^T with the dequantization inside the kernel.

At batch 1 a linear layer is a matrix-vector product, bound by reading the weight. Dequantizing first writes
and re-reads a 16-bit copy (4 + 16 + 16 bits moved per weight); this kernel reads the 4-bit bytes once
(4 bits + absmax per weight), so the ideal speed-up is ~8x on the weight traffic.

Math: y_n = sum_k x_k * W_nk with W_nk = dtype(fp32(quant_map[index_nk] * absmax_block(n,k))) -- exactly the
weight `NF4Weight.dequantize(x.dtype)` returns -- and the products summed in fp32, then rounded to x.dtype.
So the kernel is the 16-bit model's matmul up to the order of the fp32 sum (and, with fp_fusion, each product
added to the sum with one rounding (fma) instead of two; the absmax decoding stays unfused: dequant.py).

Layout. W (N, K) is stored flat: element (n, k) is number n*K + k, its byte is that // 2 (high nibble when
even) and its absmax block that // blocksize. When K is a multiple of the blocksize (every real model), a row
is K/blocksize whole blocks of blocksize/8 little-endian 32-bit words. A program takes BLOCK_N rows; per loop
step it reads BLOCK_K words of each row as a 2-D tile of R = BLOCK_N * BLOCK_K/(blocksize/8) row-blocks by
blocksize/8 words, the dequant kernel's tile: one absmax per tile row (not per word: 8x fewer absmax loads),
decoded by the same nf4_tile, times the matching slices of x (ALIGNED); or, with lut="prmt" (the default for
bf16 x on a GPU), decoded by byte permutes from per-block tables of bf16 weights (below). Otherwise (odd test
shapes) the kernel indexes element by element (gathers; correct for any K).
Split-K (ALIGNED only): with split_k > 1 the K range of a row is cut into split_k chunks handled by separate
programs, each writing an fp32 partial sum; a second small kernel adds the partials in a fixed order (so the
result is deterministic, unlike fp32 atomics) and rounds to x.dtype. It lets a 1024-row projection fill an H200's
132 SMs without giving each program a single row.
Measured on an H200 (14336 x 4096, bf16 x), previous version (3-D word tiles, absmax per word): 44 us with word
tiles, 62 us with byte tiles, 98 us for dequantize + matmul; 1024 x 4096: 10.6 us vs 14.8 us.
Static cost per weight, from the sm_90a SASS of the loop (compiled offline): 16.4 instructions for that version,
14.3 with one absmax per block (this tile), 13.9 with lut="gather", 12.9 adding fp_fusion. tools/sweep_nf4.py
times them; GEMV_CONFIGS holds the choice per shape.
lut="pairs" (a 256-entry table of byte -> two values) lost on the H200 and was removed: quant/dequant.py's docstring.
Also tried and not kept (2026-11-29, run S7-4, BENCHMARKS.md): 4-D tiles (rows, blocks, words, bytes) with x read
as bf16 pairs, which keep every tensor of the loop in one layout (no shared-memory round trip; 8.8-10.0 SASS
instructions per weight instead of 12.9) but load one word per thread instead of 16-byte vectors: slower on the
H200 at every shape (q/o best 12.6 us vs 12.4, gate/up 37.9 vs 34.7, the 2 x 256 / 4 config 15.5 us).
What the loop is bound by (H200, 2026-11-29, run S9-4, a scratch copy of the loop with parts of its math removed,
graph-timed): the gather loop took 11.8 us at 4096 x 4096 and 31.7 us at 14336 x 4096; without its table lookup
11.6 / 31.2; without the bf16 rounding of each weight 10.9 / 28.2; without any decoding (the same loads, one
convert per word) 6.9 / 16.0. So the decoding's instructions cost about 40% of the time: the kernel is
issue-bound, not bound by bytes in flight as the 4-D experiment was read to say. lut="prmt" (below) cuts the loop
to 8.2 instructions per weight and is 20-25% faster at every shape (GEMV_CONFIGS).
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..kernels._dispatch import interpreting, pick_backend
from ..kernels._triton import cast
from .dequant import absmax_buffers, load_absmax, nf4_tile, packed_words


class GemvConfig(NamedTuple):
    block_n: int  # rows per program (a power of 2)
    block_k: int  # words (8 weights) of a row per loop step (a power of 2; raised to one absmax block)
    num_warps: int
    split_k: int = 1  # programs along K per row range; > 1: fp32 partial sums + a deterministic second kernel
    lut: str = "load"  # "load": quant_map[code] from global memory; "gather": a register table (dequant.py);
    # "prmt": per-block bf16 tables and byte permutes (bf16 x on a GPU; below)
    num_stages: int = 1  # software pipelining of the K loop
    fp_fusion: bool = False  # x * w + acc as one fma (the launch's enable_fp_fusion)


# Configs by shape: the first row with N <= max_n and K <= max_k applies (None: no bound). Measured on an H200,
# 2026-11-29 (run S9-6, `python -m hare.tools.sweep_nf4 --gemv-only --lut prmt`): every variant and the
# dequantize + matmul baseline timed from CUDA graphs (C distinct weights per graph, all from HBM; graph launch
# floor 2.0 us), bf16 x, each checked against the fp64 reference first. lut="prmt" beat the former "gather"
# configs at every shape:
#   k/v 1024 x 4096:     4.1 us vs 10.2-10.3 dequant + matmul = 2.49x / 2.51x (gather 2 x 256 / 4: 4.9-5.0 us)
#   q/o 4096 x 4096:     9.8 us vs 21.8-21.9 = 2.22x / 2.23x (gather: 12.4 us, 1.77x; the best of 39 gather
#                        variants in run S3-4 was that one)
#   down 4096 x 14336:  26.7 us vs 73.6 = 2.75x (gather: 35.1 us)
#   gate/up 14336 x 4096: 26.4 / 26.6 us vs 75.5 = 2.86x / 2.84x (gather: 34.6-34.7 us)
# Other x dtypes (and the interpreter) run the same tiles with lut="gather" (gemv_nf4, through `runnable`).
GEMV_CONFIGS = (
    # k/v (N <= 2048): 1 row x 512 words (a whole K = 4096 row in one step), 4 warps
    (2048, None, GemvConfig(block_n=1, block_k=512, num_warps=4, lut="prmt", fp_fusion=True)),
    # q/o (N, K <= 8192): 8 rows x 128 words, 8 warps
    (8192, 8192, GemvConfig(block_n=8, block_k=128, num_warps=8, lut="prmt", fp_fusion=True)),
    # down (N <= 8192, K > 8192): 1 row x 256 words, 2 warps
    (8192, None, GemvConfig(block_n=1, block_k=256, num_warps=2, lut="prmt", fp_fusion=True)),
    # gate/up: 2 rows x 128 words, 2 warps
    (None, None, GemvConfig(block_n=2, block_k=128, num_warps=2, lut="prmt", fp_fusion=True)),
)
# General path (K not a multiple of the blocksize): elements per row per step.
BLOCK_K_GENERAL = 128
# Rows per program of the split-K sum.
SUM_BLOCK = 256


# lut="prmt": the lookup by byte permutes (PTX prmt, lop3; bf16 x; GPU only: the interpreter runs no PTX).
# A block's 16 possible weights are bf16(fp32(quant_map[i] * absmax)) -- the bits dequantize returns. prmt_tables
# makes them once per block (16 mul.rn + 8 cvt.rn.bf16x2, as dequant.py's roundings) and splits their bytes into
# two 16-byte tables, lo (low bytes of weights 0..15) and hi (high bytes), 4 registers each. prmt_dot then decodes a
# packed word (8 indices) with 4 byte permutes per 4 indices: prmt picks, per output byte, one of 8 bytes by a
# 3-bit selector, so the low 3 bits of 4 indices (w & 0x7777) select from tables 0-7 and 8-15 at once, and the
# 4th bit chooses between them through a byte mask (prmt's sign-replicating mode copies a byte's top bit over
# it: the 4th bits of w and w << 4 sit at byte tops). Two more permutes interleave lo and hi bytes into bf16
# pairs in element order (element 8j+s is byte s//2 of word j, high nibble first), which are widened to fp32
# (shift / mask) and multiplied into the fp32 sum (fma), as are the bf16 pairs of x. The lookup costs ~2.6
# integer instructions per weight where lut="gather" spends ~8 on unpacking, the shared-memory lookup, the scaling
# and the rounding: the loop is 8.2 SASS instructions per weight against 12.9 (sm_90a, `python -m
# hare.tools.sass_nf4 --gemv 2,256,4,prmt`). The weights are exactly dequantize's, so the result is the 16-bit
# model's matmul up to the order of the fp32 sum, as for the other luts. On the CPU, tests/quant/test_gemv.py runs
# these PTX strings through a small interpreter (every code, to dequantize's bits); the GPU tests run the kernel.
_PRMT_TABLES = tl.constexpr("""{
.reg .b32 v<16>, p<8>;
""" + "".join(f"mul.rn.f32 v{i}, ${9 + i}, $8;\n" for i in range(16)) + \
    "".join(f"cvt.rn.bf16x2.f32 p{j}, v{2 * j + 1}, v{2 * j};\n" for j in range(8)) + \
    "".join(f"prmt.b32 ${j}, p{2 * j}, p{2 * j + 1}, 0x6420;\nprmt.b32 ${4 + j}, p{2 * j}, p{2 * j + 1}, 0x7531;\n"
            for j in range(4)) + "}")


def _prmt_half(sel, mask_sel, x_lo, x_hi):
    """PTX of 4 weights of a word: indices from selector register `sel`, their 4th bits by mask selector
    `mask_sel`; their bf16 pairs times x's pairs x_lo, x_hi (register names) into acc."""
    out = (f"prmt.b32 la, $5, $6, {sel};\nprmt.b32 lb, $7, $8, {sel};\n"
           f"prmt.b32 ha, $9, $10, {sel};\nprmt.b32 hb, $11, $12, {sel};\n"
           f"prmt.b32 m, u, $2, {mask_sel};\nlop3.b32 lo, la, lb, m, 0xD8;\nlop3.b32 hi, ha, hb, m, 0xD8;\n")
    for pair, x in ((0x4051, x_lo), (0x6273, x_hi)):
        out += (f"prmt.b32 o, lo, hi, {pair:#x};\nshl.b32 t, o, 16;\nshl.b32 y, {x}, 16;\n"
                f"fma.rn.f32 acc, t, y, acc;\nand.b32 t, o, 0xFFFF0000;\nand.b32 y, {x}, 0xFFFF0000;\n"
                f"fma.rn.f32 acc, t, y, acc;\n")
    return out


# $0 = acc out; $1 acc, $2 word, $3 address of x's 8 values of the word (16 bytes, read when $4 != 0, else
# zeros), $5..$8 lo tables, $9..$12 hi tables. x is read here as one 16-byte vector per word: four 4-byte
# loads per word from Triton (one per bf16 pair) were issued one by one between the arithmetic and made the
# kernel 3x slower than lut="gather" (H200, 2026-11-29).
_PRMT_DOT = tl.constexpr(
    "{\n.reg .pred ok;\n.reg .b32 s, sh, u, la, lb, ha, hb, m, lo, hi, o, t, y, acc, x0, x1, x2, x3;\n"
    "mov.b32 acc, $1;\nmov.b32 x0, 0;\nmov.b32 x1, 0;\nmov.b32 x2, 0;\nmov.b32 x3, 0;\n"
    "setp.ne.b32 ok, $4, 0;\n@ok ld.global.nc.v4.b32 {x0, x1, x2, x3}, [$3];\n"
    "and.b32 s, $2, 0x77777777;\nshr.u32 sh, s, 16;\nshl.b32 u, $2, 4;\n"
    + _prmt_half("s", "0xD9C8", "x0", "x1") + _prmt_half("sh", "0xFBEA", "x2", "x3")
    + "mov.b32 $0, acc;\n}")
_PRMT_TABLES_IO = tl.constexpr("=r," * 8 + ",".join(["r"] * 17))  # 8 outputs; absmax and the 16 quant_map values
_PRMT_DOT_IO = tl.constexpr("=r,r,r,l," + ",".join(["r"] * 9))


@triton.jit
def prmt_tables(a, qmap_ptr):
    """(lo0..lo3, hi0..hi3): the byte tables of the 16 bf16 weights of blocks with absmax `a` (fp32)."""
    return tl.inline_asm_elementwise(
        _PRMT_TABLES, _PRMT_TABLES_IO,
        [a, tl.load(qmap_ptr), tl.load(qmap_ptr + 1), tl.load(qmap_ptr + 2), tl.load(qmap_ptr + 3),
         tl.load(qmap_ptr + 4), tl.load(qmap_ptr + 5), tl.load(qmap_ptr + 6), tl.load(qmap_ptr + 7),
         tl.load(qmap_ptr + 8), tl.load(qmap_ptr + 9), tl.load(qmap_ptr + 10), tl.load(qmap_ptr + 11),
         tl.load(qmap_ptr + 12), tl.load(qmap_ptr + 13), tl.load(qmap_ptr + 14), tl.load(qmap_ptr + 15)],
        dtype=(tl.int32,) * 8, is_pure=True, pack=1)


@triton.jit
def prmt_dot(acc, w, x_addr, ok, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3):
    """acc + the 8 products of word w's weights (byte tables lo/hi) with the 8 bf16 values of x at x_addr (int64,
    16-byte aligned; zeros where ok == 0), in fp32."""
    return tl.inline_asm_elementwise(_PRMT_DOT, _PRMT_DOT_IO,
                                     [acc, w, x_addr, ok, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _gemv_nf4_kernel(
    x_ptr,  # (K,) input row, contiguous
    packed_ptr,  # uint8 (ceil(N*K/2),): W's 4-bit indices, element 2i in the high nibble (general path)
    words_ptr,  # int32 view of the same bytes (ALIGNED path)
    absmax_ptr, nabsmax_ptr, nqmap_ptr, offset_ptr,  # absmax (codes or fp32) and its nested statistics
    qmap_ptr,  # fp32 (16,): NF4 values
    out_ptr,  # (split, N): y in x's dtype when not split, else fp32 partial sums, one row per K chunk
    N, K,  # W is (N, K)
    KW,  # K // 8: words per row (ALIGNED)
    chunk,  # words of a row per program along K, a multiple of BLOCK_K (ALIGNED)
    BS: tl.constexpr,  # blocksize: weights per absmax
    NESTED: tl.constexpr, NESTED_BS: tl.constexpr,  # double quantization, absmax values per nested block
    ALIGNED: tl.constexpr,  # K % blocksize == 0: rows are whole words and whole blocks
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # ALIGNED: words of a row per step (a multiple of BS // 8); else elements per step
    LUT_GATHER: tl.constexpr,  # GemvConfig.lut == "gather"
    LUT_PRMT: tl.constexpr,  # GemvConfig.lut == "prmt" (ALIGNED, bf16 x, compiled for a GPU only)
    NUM_STAGES: tl.constexpr,  # software pipelining of the K loop
    INTERPRET: tl.constexpr,  # launched on the interpreter: casts to bf16 round by hand (kernels/_triton.py)
):
    out_ptr += tl.program_id(1) * N  # this K chunk's row of partial sums (row 0 = y when not split)
    if ALIGNED:
        WB: tl.constexpr = BS // 8  # words per absmax block
        NB: tl.constexpr = BLOCK_K // WB  # blocks of a row per step
        R: tl.constexpr = BLOCK_N * NB  # tile rows: (row, block) pairs
        r = tl.arange(0, R)
        rows = tl.program_id(0) * BLOCK_N + r // NB  # (R,) weight row of each tile row
        row_ok = rows < N
        rows = rows.to(tl.int64)
        k_lo = tl.program_id(1) * chunk
        k_hi = tl.minimum(k_lo + chunk, KW)
        table = tl.load(qmap_ptr + tl.arange(0, 16))  # read only by the gather variant
        acc = tl.zeros((R, 8 * WB) if not LUT_PRMT else (R, WB), dtype=tl.float32)
        for w0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
            bcol = w0 // WB + r % NB  # (R,) block column within the row
            ok = row_ok & (bcol < KW // WB)  # chunks are whole steps: only a row's end cuts a step short
            blk = rows * (KW // WB) + bcol  # flat block id
            a = load_absmax(absmax_ptr, nabsmax_ptr, nqmap_ptr, offset_ptr, blk, ok, NESTED, NESTED_BS,
                            INTERPRET)
            word = blk[:, None] * WB + tl.arange(0, WB)[None, :]  # (R, WB)
            w = tl.load(words_ptr + word, mask=ok[:, None], other=0)
            if LUT_PRMT:
                # each tile row's block as 16 bf16 weights, then 8 weights per word looked up by byte permutes
                lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3 = prmt_tables(a[:, None], qmap_ptr)
                xw = x_ptr + bcol[:, None] * (8 * WB) + 8 * tl.arange(0, WB)[None, :]  # x of word 0..WB-1
                acc = prmt_dot(acc, w, xw.to(tl.int64), ok[:, None].to(tl.int32), lo0, lo1, lo2, lo3,
                               hi0, hi1, hi2, hi3)
            else:
                # the 16-bit weight, as dequantize(x.dtype) returns it
                v = cast(nf4_tile(w, a, qmap_ptr, table, LUT_GATHER), x_ptr.dtype.element_ty,
                         INTERPRET).to(tl.float32)
                xk = bcol[:, None] * (8 * WB) + tl.arange(0, 8 * WB)[None, :]  # (R, blocksize): x of those weights
                xs = tl.load(x_ptr + xk, mask=ok[:, None], other=0.0).to(tl.float32)
                acc += v * xs
        y = tl.sum(tl.reshape(tl.sum(acc, axis=1), (BLOCK_N, NB)), axis=1)
        rows_out = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    else:
        rows_out = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows_out < N
        rows = rows_out.to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = row_ok[:, None] & (ks < K)[None, :]
            flat = rows[:, None] * K + ks[None, :]
            q = tl.load(packed_ptr + flat // 2, mask=mask, other=0)
            idx = (q >> (4 - 4 * (flat % 2)).to(tl.uint8)) & 15
            a = load_absmax(absmax_ptr, nabsmax_ptr, nqmap_ptr, offset_ptr, flat // BS, mask, NESTED, NESTED_BS,
                            INTERPRET)
            v = tl.load(qmap_ptr + idx.to(tl.int32)) * a
            v = cast(v, x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
            acc += v * tl.load(x_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
    tl.store(out_ptr + rows_out, cast(y, out_ptr.dtype.element_ty, INTERPRET), mask=rows_out < N)


@triton.jit
def _sum_splits_kernel(
    part_ptr,  # fp32 (SPLIT, N): partial sums of each K chunk
    y_ptr,  # (N,) output in x's dtype
    N, SPLIT,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):  # a fixed order: the same bits on every run
        acc += tl.load(part_ptr + s * N + n, mask=n < N, other=0.0)
    tl.store(y_ptr + n, cast(acc, y_ptr.dtype.element_ty, INTERPRET), mask=n < N)


def _check(x, w):
    if len(w.shape) != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    n, k = w.shape
    if x.shape[-1] != k or x.numel() != k:
        raise ValueError(f"x must hold one row of in_features={k} values (shape (..., {k}) with one row), got "
                         f"shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device}, the weight on {w.device}")


def _check_config(config):
    if not isinstance(config, GemvConfig):
        raise ValueError(f"config must be a GemvConfig, got {type(config).__name__}")
    for name in ("block_n", "block_k"):
        v = getattr(config, name)
        if v < 1 or v & (v - 1):
            raise ValueError(f"config.{name} must be a power of 2, got {v}")
    if config.lut not in ("load", "gather", "prmt"):
        raise ValueError(f"config.lut must be 'load', 'gather' or 'prmt', got {config.lut!r}")
    if config.split_k < 1 or config.num_stages < 1:
        raise ValueError(f"config.split_k and config.num_stages must be >= 1, got {config}")


def runnable(config, x) -> GemvConfig:
    """`config` as it can run on x: lut="prmt" only with bf16 x on a GPU (the byte tables hold bf16 weights, and
    only a GPU runs PTX); elsewhere the same tile with lut="gather"."""
    if config.lut == "prmt" and (x.dtype != torch.bfloat16 or interpreting(x)):
        return config._replace(lut="gather")
    return config


def gemv_config(n, k) -> GemvConfig:
    """The launch config for an (n, k) weight: the first GEMV_CONFIGS row that bounds both."""
    for max_n, max_k, config in GEMV_CONFIGS:
        if (max_n is None or n <= max_n) and (max_k is None or k <= max_k):
            return config
    raise ValueError(f"no GEMV_CONFIGS row for shape ({n}, {k}); the last row must bound nothing")


def gemv_nf4_ref(x, w, weight_dtype=None):
    """Pure torch: x (..., K) holding one row, NF4Weight w (N, K) -> (..., N) in x.dtype. The weight is
    dequantized to `weight_dtype` (default x.dtype, the kernel's math) and the products are summed in fp32, or
    in fp64 when x is fp64 (the test oracle: pass the kernel's weight_dtype)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    wd = w.dequantize(weight_dtype or x.dtype, backend="ref")
    return (x.to(acc) @ wd.to(acc).t()).to(x.dtype)


def gemv_nf4(x, w, backend=None):
    """y = x @ dequant(w)^T for a single row x (..., K) -> (..., N) in x.dtype. backend: None (Triton for CUDA
    tensors, the torch reference elsewhere), "triton" or "ref"."""
    _check(x, w)
    if pick_backend(backend, x) == "ref":
        return gemv_nf4_ref(x, w)
    y = torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype, device=x.device)
    launch_gemv(x.contiguous(), w, y, runnable(gemv_config(*w.shape), x))
    return y


def launch_gemv(x, w, y, config):
    """Runs the kernel(s) into `y` with an explicit GemvConfig (tools/sweep_nf4.py sweeps them; the tests run
    every path). block_k: words (8 weights) of a row per step on the aligned path, at least one absmax block;
    split_k applies to the aligned path only (the general one is for odd test shapes)."""
    _check_config(config)
    n, k = w.shape
    aligned = k % w.blocksize == 0
    words = packed_words(w.packed) if aligned else w.packed  # rows of whole words: a view (aligned storage)
    kw = k // 8
    if aligned:
        block_k = max(config.block_k, w.blocksize // 8)  # whole absmax blocks per step
        steps = triton.cdiv(kw, block_k)
        chunk = triton.cdiv(steps, min(config.split_k, steps)) * block_k  # words per K chunk, whole steps
        split = triton.cdiv(kw, chunk)  # chunks that hold words (rounding up the chunk can leave fewer)
    else:
        block_k, chunk, split = BLOCK_K_GENERAL, 0, 1
    out = y if split == 1 else torch.empty((split, n), dtype=torch.float32, device=y.device)
    interpret = interpreting(x)
    prmt = config.lut == "prmt" and aligned  # the general path looks the table up from memory whatever lut says
    if prmt and runnable(config, x) != config:
        raise ValueError(f"config.lut='prmt' needs bf16 x on a GPU (PTX byte permutes), got {x.dtype} on "
                         f"{'the interpreter' if interpret else x.device}")
    if prmt and x.data_ptr() % 16:
        x = x.clone()  # it reads x in 16-byte vectors (a fresh tensor is aligned; x is one row, a few KB)
    _gemv_nf4_kernel[(triton.cdiv(n, config.block_n), split)](
        x, w.packed, words, *absmax_buffers(w), w.quant_map, out, n, k, kw, chunk,
        BS=w.blocksize, NESTED=w.double_quant, NESTED_BS=w.nested_blocksize, ALIGNED=aligned,
        BLOCK_N=config.block_n, BLOCK_K=block_k, LUT_GATHER=config.lut == "gather", LUT_PRMT=prmt,
        NUM_STAGES=config.num_stages, INTERPRET=interpret, num_warps=config.num_warps,
        enable_fp_fusion=config.fp_fusion,
    )
    if split > 1:
        _sum_splits_kernel[(triton.cdiv(n, SUM_BLOCK),)](out, y, n, split, BLOCK=SUM_BLOCK, INTERPRET=interpret,
                                                         num_warps=4)
