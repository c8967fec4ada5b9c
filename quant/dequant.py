"""NF4 dequantization: both quantization levels undone in one pass over the packed bytes.

  absmax_b = fp32(fp32(nested_quant_map[code_b] * nested_absmax[b // nested_blocksize]) + offset)
  w_i      = dtype(fp32(quant_map[index_i] * absmax_{i // blocksize}))

(without double quantization absmax_b is stored in fp32). These are the roundings of bitsandbytes'
dequantize_4bit (dequantize_blockwise of the codes, then `absmax += offset`, then the NF4 product rounded once
to the output dtype), so both backends here reproduce its output bit for bit. The product of absmax_b is a
`mul.rn` (load_absmax): fusing it with the sum into one fma would skip a rounding and change the last bit of
absmax, and the explicit rounding mode keeps it unfused whatever the launch's enable_fp_fusion (the GEMV turns
fusion on for its own multiply-adds).

Layout: the flat weight is a sequence of blocks of `blocksize` values = blocksize/8 little-endian 32-bit words
of packed bytes. A tile is NBLK whole blocks as a (NBLK, blocksize/8) tile of words, so its absmax values are
one short vector broadcast along the tile (no per-element gather). Word j holds elements 8j..8j+7: element 8j+s
is in byte s//2 (bits 8*(s//2)..), high nibble for even s, so a (NBLK, words, 8) tile of shifts decodes 8
consecutive outputs per word; reshaped to (NBLK, blocksize) they are stored as contiguous 16-byte vectors.
(Measured on an H200, 4096 x 14336 to bf16: 42.7 us with words, 51.4 us decoding byte tiles and interleaving
hi/lo with tl.join; a 16-way select tree instead of the 16-entry table lookup: 70.7 us.)

Launch parameters are a DequantConfig; tools/sweep_nf4.py times the variants on the GPU, and DEQUANT_CONFIG holds
the one used. What each knob changes, from the sm_90a SASS of the kernel's loop (compiled offline with triton's
ptxas; per output element, 4096 elements (64 blocks of 64) x 2 warps unless said):
- lut="gather": the 16 NF4 values are loaded once into registers and looked up with tl.gather, which Triton
  serves from shared memory with 32-bit addresses: 6.6 instructions instead of 8.9 for lut="load", a global
  load of quant_map[code] per element (64-bit address arithmetic, served by L1). Registers: 111 vs 66 at 4096 x 2,
  32 at 2048 x 2 or 4096 x 4 (7.9 instructions). With 1 warp Triton does the gather with warp shuffles instead.
- programs_per_sm > 0: a persistent grid (that many programs per SM, each striding over the tiles) instead of
  one program per tile; with num_stages > 1 Triton's pipeliner then prefetches the next tiles' words and
  absmax (cp.async into shared memory) while the current tile is decoded and stored (7.0-7.3 instructions,
  40-48 registers). With lut="load" it also turns the table lookups into cp.async: avoid that pairing.
- streaming: the packed words are loaded evict-first and the output stored with .cs (streaming), so the
  write-once output does not displace other lines from L2.
The word loads are 16-byte vectors only when their mask is provably uniform per 4 words: the launcher passes the
word count (`nwords`, divisible by 16 at real shapes, which the JIT specializes on); computing it in the kernel
from n made them scalar loads (seen in the PTX).
lut="pairs" (byte tiles, a 256-entry table of 64-bit value pairs; in the GEMV too) was tried and removed: fewer SASS
instructions per weight (GEMV loop 7.8 vs 12.9) but 10-30% slower on an H200 (2026-11-29, gpu_suite.sh K nf4sweep,
commit 3ec3fba): dequant 4096 x 14336 -> bf16 46.0 us at best vs 42.2, GEMV k_proj 5.50 vs 4.93 us, gate_proj 44.0
vs 34.7 us. Hypothesis: per-lane random gathers from that table bank-conflict; the 16 fp32 values sit in 16 banks.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..kernels._dispatch import interpreting, pick_backend, sm_count
from ..kernels._triton import cast


class DequantConfig(NamedTuple):
    elements_per_program: int  # per tile (a power of 2): elements_per_program / blocksize whole blocks, >= 1
    num_warps: int
    lut: str = "load"  # "load": quant_map[code] from global memory; "gather": a register table via tl.gather
    programs_per_sm: int = 0  # 0: one program per tile; k > 0: k programs per SM loop over the tiles
    num_stages: int = 1  # software pipelining depth of the tile loop (useful with programs_per_sm > 0)
    streaming: bool = False  # evict-first loads of the packed words, streaming (.cs) stores


# Measured on an H200, 2026-11-28, `python -m hare.tools.sweep_nf4` (copy 4275 GB/s; torch's own write-only fill
# of the output reached 3038-3074 GB/s): every one-program-per-tile variant lands at 41.3-42.4 us (82-84% of copy)
# at 4096 x 14336 and 14336 x 4096 -> bf16, this default 42.1 / 42.0 us (82.1 / 82.2%), the best 41.3 us (8192
# elements x 4 warps, lut "load"): within the run's noise. Persistent programs (with or without prefetch stages)
# and streaming hints were slower (43.5-47 us). The previous launch (4096 x 2 warps, scalar word loads): 42.7 us.
# Confirmed 2026-11-29 (run S6-1, commit 3ec3fba): this default 42.2 / 41.6 us, the best gather or load variant
# ~41.6 us at 4096 x 14336. In its steady state (8 distinct weights back to back in a CUDA graph, tools/bench_nf4.py
# bench_dequant_graph; run S7-4): 40.3 us at both shapes, 3667 GB/s = 86.4% of the 2 GiB copy (4243 GB/s).
DEQUANT_CONFIG = DequantConfig(elements_per_program=2048, num_warps=2, lut="gather")


@triton.jit
def load_absmax(absmax_ptr, nabsmax_ptr, nqmap_ptr, offset_ptr, blk, mask, NESTED: tl.constexpr,
                NESTED_BS: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 absmax of blocks `blk` (any shape): the stored value, or the double-quantized one decoded."""
    if NESTED:
        code = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scaled = tl.load(nqmap_ptr + code)
        nested = tl.load(nabsmax_ptr + blk // NESTED_BS, mask=mask, other=0.0)
        # two roundings, as bitsandbytes: mul.rn (explicit rounding mode) is never contracted into an fma with
        # the add, even when the launch enables fp fusion. The interpreter (numpy) never fuses.
        if INTERPRET:
            prod = scaled * nested
        else:
            prod = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [scaled, nested],
                                             dtype=tl.float32, is_pure=True, pack=1)
        absmax = prod + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return absmax


@triton.jit
def nf4_tile(w, scale, qmap_ptr, table, LUT_GATHER: tl.constexpr):
    """fp32 (R, 8*WB) values of the 8 elements packed in each int32 word of `w` (R, WB), in element order,
    row r times scale[r]: fp32(quant_map[code] * scale), the product that the callers round once.
    LUT_GATHER: look the codes up in `table` (the 16 values, in registers) instead of loading quant_map[code]."""
    R: tl.constexpr = w.shape[0]
    WB: tl.constexpr = w.shape[1]
    s = tl.arange(0, 8)
    shift = 8 * (s // 2) + 4 * (1 - s % 2)  # element 8j+s: byte s//2 of the word, high nibble when s is even
    q = (tl.expand_dims(w, 2) >> shift) & 15  # (R, WB, 8); an arithmetic shift's sign bits are masked off
    if LUT_GATHER:
        v = tl.reshape(tl.gather(table, tl.reshape(q, (R * WB * 8,)), 0), (R, WB, 8))
    else:
        v = tl.load(qmap_ptr + q)
    return tl.reshape(v * scale[:, None, None], (R, WB * 8))


@triton.jit
def _dequant_nf4_kernel(
    words_ptr,  # int32 (nwords,): the packed bytes as little-endian words (zero-padded to a whole word)
    absmax_ptr,  # uint8 codes (NESTED) or fp32 values, one per block
    nabsmax_ptr,  # fp32 (ceil(blocks / NESTED_BS),): second-level absmax (read when NESTED)
    nqmap_ptr,  # fp32 (256,): the dynamic 8-bit map (read when NESTED)
    offset_ptr,  # fp32 (): mean subtracted from the absmax values before their quantization (NESTED)
    qmap_ptr,  # fp32 (16,): the NF4 values
    out_ptr,  # (n,) output, contiguous, in the requested dtype
    n,  # number of weight elements
    nwords,  # words in words_ptr = ceil(n / 8) (from the host: see the module docstring)
    WB: tl.constexpr,  # blocksize // 8: words per block
    NBLK: tl.constexpr,  # blocks per tile
    NESTED: tl.constexpr,  # double quantization
    NESTED_BS: tl.constexpr,  # absmax values per nested block (256)
    LUT_GATHER: tl.constexpr,  # DequantConfig.lut == "gather"
    NUM_STAGES: tl.constexpr,  # software pipelining of the tile loop
    STREAMING: tl.constexpr,  # eviction / cache hints for data touched once
    INTERPRET: tl.constexpr,  # launched on the interpreter: casts to bf16 round by hand (kernels/_triton.py)
):
    nblocks = tl.cdiv(n, 8 * WB)
    table = tl.load(qmap_ptr + tl.arange(0, 16))  # read only by the gather variant (dead code otherwise)
    # one tile per program, or a grid-stride loop when the launcher makes fewer programs than tiles
    for tile in tl.range(tl.program_id(0), tl.cdiv(nblocks, NBLK), tl.num_programs(0), num_stages=NUM_STAGES):
        # (NBLK,) block ids (< 2^31 up to 2^37 elements); word and element offsets in 64 bits: >2^31 elements
        blk = (tile * NBLK + tl.arange(0, NBLK)).to(tl.int64)
        absmax = load_absmax(absmax_ptr, nabsmax_ptr, nqmap_ptr, offset_ptr, blk, blk < nblocks, NESTED,
                             NESTED_BS, INTERPRET)
        word = blk[:, None] * WB + tl.arange(0, WB)[None, :]  # (NBLK, WB)
        if STREAMING:
            w = tl.load(words_ptr + word, mask=word < nwords, other=0, eviction_policy="evict_first")
        else:
            w = tl.load(words_ptr + word, mask=word < nwords, other=0)
        vals = cast(nf4_tile(w, absmax, qmap_ptr, table, LUT_GATHER), out_ptr.dtype.element_ty, INTERPRET)
        elem = blk[:, None] * (8 * WB) + tl.arange(0, 8 * WB)[None, :]
        if STREAMING:
            tl.store(out_ptr + elem, vals, mask=elem < n, cache_modifier=".cs")
        else:
            tl.store(out_ptr + elem, vals, mask=elem < n)


def packed_words(packed):
    """The packed bytes as int32 words for the kernels: a view when the byte count is a multiple of 4 and the
    data 4-byte aligned (every real weight: its numel is a multiple of 8), else a zero-padded copy (odd
    shapes), so the kernels never read past the tensor."""
    if packed.numel() % 4 == 0 and packed.data_ptr() % 4 == 0:
        return packed.view(torch.int32)
    return torch.nn.functional.pad(packed, (0, -packed.numel() % 4)).view(torch.int32)


def absmax_buffers(w):
    """(absmax, nested_absmax, nested_quant_map, offset) kernel arguments of NF4Weight `w`; without double
    quantization the quant_map stands in for the three nested buffers, which the kernels then never read."""
    if w.double_quant:
        return w.absmax, w.nested_absmax, w.nested_quant_map, w.offset
    return w.absmax, w.quant_map, w.quant_map, w.quant_map


def _check(w, dtype):
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")


def _check_config(config):
    if not isinstance(config, DequantConfig):
        raise ValueError(f"config must be a DequantConfig, got {type(config).__name__}")
    if config.lut not in ("load", "gather"):
        raise ValueError(f"config.lut must be 'load' or 'gather', got {config.lut!r}")
    e = config.elements_per_program
    if e < 1 or e & (e - 1):
        raise ValueError(f"config.elements_per_program must be a power of 2, got {e}")
    if config.programs_per_sm < 0 or config.num_stages < 1:
        raise ValueError(f"config.programs_per_sm must be >= 0 and num_stages >= 1, got {config}")


def dequantize_nf4_ref(w, dtype=torch.bfloat16) -> torch.Tensor:
    """Pure torch: the spec, the test oracle, the benchmark baseline. `w` is an NF4Weight."""
    _check(w, dtype)
    n = w.numel
    absmax = w.absmax
    if w.double_quant:
        blk = torch.arange(absmax.numel(), device=absmax.device) // w.nested_blocksize
        absmax = w.nested_quant_map[absmax.long()] * w.nested_absmax[blk]
        absmax = absmax + w.offset
    idx = torch.stack([w.packed >> 4, w.packed & 15], dim=1).reshape(-1)[:n].long()
    scale = absmax.repeat_interleave(w.blocksize)[:n]
    return (w.quant_map[idx] * scale).to(dtype).reshape(w.shape)


def dequantize_nf4(w, dtype=torch.bfloat16, backend=None) -> torch.Tensor:
    """The weight of NF4Weight `w` in `dtype` and w.shape. backend: None (Triton for CUDA buffers, the torch
    reference elsewhere), "triton" or "ref"."""
    _check(w, dtype)
    if pick_backend(backend, w.packed) == "ref":
        return dequantize_nf4_ref(w, dtype)
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    launch_dequant(w, out, DEQUANT_CONFIG)
    return out


def launch_dequant(w, out, config):
    """Runs the kernel into `out` (w.shape, contiguous) with an explicit DequantConfig (tools/sweep_nf4.py
    sweeps them; the tests run every code path)."""
    _check_config(config)
    words = packed_words(w.packed)
    nblk = max(1, config.elements_per_program // w.blocksize)  # whole blocks per tile (blocksizes are powers of 2)
    ntiles = triton.cdiv(w.absmax.numel(), nblk)
    programs = ntiles
    if config.programs_per_sm:
        programs = min(ntiles, config.programs_per_sm * sm_count(out.device))
    _dequant_nf4_kernel[(programs,)](
        words, *absmax_buffers(w), w.quant_map, out, w.numel, words.numel(),
        WB=w.blocksize // 8, NBLK=nblk, NESTED=w.double_quant,
        NESTED_BS=w.nested_blocksize, LUT_GATHER=config.lut == "gather", NUM_STAGES=config.num_stages,
        STREAMING=config.streaming, INTERPRET=interpreting(out),
        num_warps=config.num_warps, enable_fp_fusion=False,
    )
