"""NF4 dequantization: both quantization levels undone in one pass over the packed bytes.

  absmax_b = fp32(fp32(nested_quant_map[code_b] * nested_absmax[b // nested_blocksize]) + offset)
  w_i      = dtype(fp32(quant_map[index_i] * absmax_{i // blocksize}))

(without double quantization absmax_b is stored in fp32). These are the roundings of bitsandbytes'
dequantize_4bit (dequantize_blockwise of the codes, then `absmax += offset`, then the NF4 product rounded once
to the output dtype), so both backends here reproduce its output bit for bit. The kernel is launched with
enable_fp_fusion=False: fusing the product and the sum into one fma would skip a rounding and change the last
bit of absmax.

Layout: the flat weight is a sequence of blocks of `blocksize` values = blocksize/8 little-endian 32-bit words
of packed bytes. One program takes NBLK whole blocks as a (NBLK, blocksize/8) tile of words, so its absmax
values are one short vector broadcast along the tile (no per-element gather). Word j holds elements 8j..8j+7:
element 8j+s is in byte s//2 (bits 8*(s//2)..), high nibble for even s, so a (NBLK, words, 8) tile of shifts
decodes 8 consecutive outputs per word; reshaped to (NBLK, blocksize) they are stored as contiguous 16-byte
vectors. (Measured on an H200, 4096 x 14336 to bf16: 42.7 us with words, 51.4 us decoding byte tiles and
interleaving hi/lo with tl.join; a 16-way select tree instead of the 16-entry table gather: 70.7 us.)
"""
import torch
import triton
import triton.language as tl

from ..kernels._dispatch import interpreting, pick_backend
from ..kernels._triton import cast

# Output elements per program ~ NBLK * blocksize: 64 blocks of 64 = 4096 values (8 KiB of bf16 written, 2 KiB
# read), >14k programs at the 4096 x 14336 benchmark shape, 2 warps each. Chosen by tools/bench_nf4.py --sweep
# on an H200 (see BENCH notes in the report of issue 4).
ELEMENTS_PER_PROGRAM = 4096
NUM_WARPS = 2


@triton.jit
def load_absmax(absmax_ptr, nabsmax_ptr, nqmap_ptr, offset_ptr, blk, mask, NESTED: tl.constexpr,
                NESTED_BS: tl.constexpr):
    """fp32 absmax of blocks `blk` (any shape): the stored value, or the double-quantized one decoded."""
    if NESTED:
        code = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scaled = tl.load(nqmap_ptr + code)
        nested = tl.load(nabsmax_ptr + blk // NESTED_BS, mask=mask, other=0.0)
        # two roundings, as bitsandbytes (the launchers disable fp fusion, so this is no fma)
        absmax = scaled * nested + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return absmax


@triton.jit
def nf4_words(w, qmap_ptr):
    """(..., 8) NF4 values of the 8 elements packed in each int32 word of `w` (...), in element order."""
    s = tl.arange(0, 8)
    shift = 8 * (s // 2) + 4 * (1 - s % 2)  # element 8j+s: byte s//2 of the word, high nibble when s is even
    q = (tl.expand_dims(w, -1) >> shift) & 15  # an arithmetic shift's sign bits are masked off
    return tl.load(qmap_ptr + q)


@triton.jit
def _dequant_nf4_kernel(
    words_ptr,  # int32 (ceil(n/8),): the packed bytes as little-endian words (readable up to a whole word)
    absmax_ptr,  # uint8 codes (NESTED) or fp32 values, one per block
    nabsmax_ptr,  # fp32 (ceil(blocks / NESTED_BS),): second-level absmax (read when NESTED)
    nqmap_ptr,  # fp32 (256,): the dynamic 8-bit map (read when NESTED)
    offset_ptr,  # fp32 (): mean subtracted from the absmax values before their quantization (NESTED)
    qmap_ptr,  # fp32 (16,): the NF4 values
    out_ptr,  # (n,) output, contiguous, in the requested dtype
    n,  # number of weight elements
    WB: tl.constexpr,  # blocksize // 8: words per block
    NBLK: tl.constexpr,  # blocks per program
    NESTED: tl.constexpr,  # double quantization
    NESTED_BS: tl.constexpr,  # absmax values per nested block (256)
    INTERPRET: tl.constexpr,  # launched on the interpreter: casts to bf16 round by hand (kernels/_triton.py)
):
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: embedding-sized tensors pass 2^31 elements
    blk = pid * NBLK + tl.arange(0, NBLK)  # (NBLK,) block ids
    nblocks = (n + 8 * WB - 1) // (8 * WB)
    absmax = load_absmax(absmax_ptr, nabsmax_ptr, nqmap_ptr, offset_ptr, blk, blk < nblocks, NESTED, NESTED_BS)
    word = blk[:, None] * WB + tl.arange(0, WB)[None, :]  # (NBLK, WB)
    w = tl.load(words_ptr + word, mask=word < (n + 7) // 8, other=0)
    vals = nf4_words(w, qmap_ptr) * absmax[:, None, None]  # (NBLK, WB, 8)
    vals = tl.reshape(vals, (NBLK, 8 * WB))
    elem = blk[:, None] * (8 * WB) + tl.arange(0, 8 * WB)[None, :]
    tl.store(out_ptr + elem, cast(vals, out_ptr.dtype.element_ty, INTERPRET), mask=elem < n)


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
    launch_dequant(w, out, ELEMENTS_PER_PROGRAM, NUM_WARPS)
    return out


def launch_dequant(w, out, elements_per_program, num_warps):
    """Runs the kernel into `out` (w.shape, contiguous) with an explicit tile size (tools/bench_nf4.py sweeps)."""
    nblk = triton.next_power_of_2(max(1, elements_per_program // w.blocksize))
    nblocks = w.absmax.numel()
    _dequant_nf4_kernel[(triton.cdiv(nblocks, nblk),)](
        packed_words(w.packed), *absmax_buffers(w), w.quant_map, out, w.numel,
        WB=w.blocksize // 8, NBLK=nblk, NESTED=w.double_quant, NESTED_BS=w.nested_blocksize,
        INTERPRET=interpreting(out),
        num_warps=num_warps, enable_fp_fusion=False,
    )
