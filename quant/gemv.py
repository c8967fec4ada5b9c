"""Fused 4-bit GEMV for batch-1 decoding: y = x @ dequant(W)^T with the dequantization inside the kernel.

At batch 1 a linear layer is a matrix-vector product, bound by reading the weight. Dequantizing first writes
and re-reads a 16-bit copy (4 + 16 + 16 bits moved per weight); this kernel reads the 4-bit bytes once
(4 bits + absmax per weight), so the ideal speed-up is ~8x on the weight traffic.

Math: y_n = sum_k x_k * W_nk with W_nk = dtype(fp32(quant_map[index_nk] * absmax_block(n,k))) -- exactly the
weight `NF4Weight.dequantize(x.dtype)` returns -- and the products summed in fp32, then rounded to x.dtype.
So the kernel is the 16-bit model's matmul up to the order of the fp32 sum.

Layout. W (N, K) is stored flat: element (n, k) is number n*K + k, its byte is that // 2 (high nibble when
even) and its absmax block that // blocksize. When K is a multiple of the blocksize (every real model), a row
is a run of K/8 little-endian 32-bit words and K/blocksize whole blocks; a program reads (BLOCK_N, BLOCK_W)
tiles of words, decodes each into its 8 elements in order (the dequant kernel's nf4_words) and multiplies a
(BLOCK_N, BLOCK_W, 8) tile by the matching (BLOCK_W, 8) slice of x (ALIGNED). Otherwise (odd test shapes) the
kernel indexes element by element (gathers; correct for any K).
Measured on an H200 (14336 x 4096, bf16 x): 44 us with word tiles, 62 us with byte tiles whose absmax and x
were reshaped/split to match (layout shuffles through shared memory), 98 us for dequantize + matmul.
"""
import torch
import triton
import triton.language as tl

from ..kernels._dispatch import interpreting, pick_backend
from ..kernels._triton import cast
from .dequant import absmax_buffers, load_absmax, nf4_words, packed_words

# Rows per program and words (8 weights each) of a row per loop step on the ALIGNED path, measured on an H200
# (.bench sweep, bf16 x): 2 x 256 with 4 warps gives 10.6 us at 1024 x 4096 and 45 us at 14336 x 4096 (best
# seen: 10.0 and 44.1). Few rows per program matter for small N: 8 rows leave 1024-row k/v projections with
# 128 programs for 132 SMs (30 us).
BLOCK_N = 2
BLOCK_W = 256
NUM_WARPS = 4
# General path (K not a multiple of the blocksize): elements per row per step.
BLOCK_K_GENERAL = 128


@triton.jit
def _gemv_nf4_kernel(
    x_ptr,  # (K,) input row, contiguous
    packed_ptr,  # uint8 (ceil(N*K/2),): W's 4-bit indices, element 2i in the high nibble (general path)
    words_ptr,  # int32 view of the same bytes (ALIGNED path)
    absmax_ptr, nabsmax_ptr, nqmap_ptr, offset_ptr,  # absmax (codes or fp32) and its nested statistics
    qmap_ptr,  # fp32 (16,): NF4 values
    y_ptr,  # (N,) output in x's dtype
    N, K,  # W is (N, K)
    KW,  # K // 8: words per row (ALIGNED)
    BS: tl.constexpr,  # blocksize: weights per absmax
    NESTED: tl.constexpr, NESTED_BS: tl.constexpr,  # double quantization, absmax values per nested block
    ALIGNED: tl.constexpr,  # K % blocksize == 0: rows are whole words and whole blocks
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # ALIGNED: words of a row per step; else elements per step
    INTERPRET: tl.constexpr,  # launched on the interpreter: casts to bf16 round by hand (kernels/_triton.py)
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if ALIGNED:
        for w0 in range(0, KW, BLOCK_K):
            cols = w0 + tl.arange(0, BLOCK_K)  # word columns of the row
            col_ok = cols < KW
            mask = row_ok[:, None] & col_ok[None, :]
            word = rows[:, None] * KW + cols[None, :]  # (BLOCK_N, BLOCK_K) flat word ids
            w = tl.load(words_ptr + word, mask=mask, other=0)
            a = load_absmax(absmax_ptr, nabsmax_ptr, nqmap_ptr, offset_ptr, word // (BS // 8), mask, NESTED,
                            NESTED_BS)
            v = nf4_words(w, qmap_ptr) * a[:, :, None]  # (BLOCK_N, BLOCK_K, 8)
            # the 16-bit weight, as dequantize(x.dtype) returns it
            v = cast(v, x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
            xk = cols[:, None] * 8 + tl.arange(0, 8)[None, :]  # (BLOCK_K, 8): x of those words' elements
            xs = tl.load(x_ptr + xk, mask=col_ok[:, None], other=0.0).to(tl.float32)
            acc += tl.sum(v * xs[None, :, :], axis=2)
    else:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = row_ok[:, None] & (ks < K)[None, :]
            flat = rows[:, None] * K + ks[None, :]
            q = tl.load(packed_ptr + flat // 2, mask=mask, other=0)
            idx = (q >> (4 - 4 * (flat % 2)).to(tl.uint8)) & 15
            a = load_absmax(absmax_ptr, nabsmax_ptr, nqmap_ptr, offset_ptr, flat // BS, mask, NESTED, NESTED_BS)
            v = tl.load(qmap_ptr + idx.to(tl.int32)) * a
            v = cast(v, x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
            acc += v * tl.load(x_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + rows, cast(y, y_ptr.dtype.element_ty, INTERPRET), mask=row_ok)


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
    launch_gemv(x.contiguous(), w, y, BLOCK_N, BLOCK_W, NUM_WARPS)
    return y


def launch_gemv(x, w, y, block_n, block_w, num_warps):
    """Runs the kernel into `y` with an explicit tile (tools/bench_nf4.py sweeps). block_w: words (8 weights)
    of a row per step on the aligned path."""
    n, k = w.shape
    aligned = k % w.blocksize == 0
    words = packed_words(w.packed) if aligned else w.packed  # rows of whole words: a view (aligned storage)
    _gemv_nf4_kernel[(triton.cdiv(n, block_n),)](
        x, w.packed, words, *absmax_buffers(w), w.quant_map, y, n, k, k // 8,
        BS=w.blocksize, NESTED=w.double_quant, NESTED_BS=w.nested_blocksize, ALIGNED=aligned,
        BLOCK_N=block_n, BLOCK_K=block_w if aligned else BLOCK_K_GENERAL,
        INTERPRET=interpreting(x), num_warps=num_warps, enable_fp_fusion=False,
    )
