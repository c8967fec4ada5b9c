"""Causal attention with GQA, packed documents, sliding window and logit softcapping.

q: (B, T, Hq, D), k/v: (B, T, Hk, D) with Hq % Hk == 0. doc_ids: optional (B, T) integers; a query attends
only to keys of the same document. window: a key j is visible to query i iff i - window < j <= i (the
convention of transformers' sliding-window masks). softcap: s -> cap * tanh(s / cap) on the scaled logits.

The Triton path is flash attention (Dao et al., "FlashAttention-2", arXiv 2307.08691): never materialize the
T x T scores; stream key blocks past a block of queries with an online softmax, save only the log-sum-exp.

Forward, for one query row i (visible keys j in V(i), all math in fp32):
    x_ij = scale * q_i.k_j                         (logit; with softcap: x_ij = cap * tanh(scale * q_i.k_j / cap))
    m_i  = max_j x_ij,  l_i = sum_j exp(x_ij - m_i),  o_i = sum_j exp(x_ij - m_i) v_j / l_i
    lse_i = m_i + log(l_i)                          (saved; P_ij = exp(x_ij - lse_i) is recomputed in backward)
  m and l are updated block by block: m' = max(m, rowmax(x_blk)), l' = l * exp(m - m') + rowsum(exp(x_blk - m')),
  acc' = acc * exp(m - m') + exp(x_blk - m') @ v_blk. Exponentials are base 2 (exp2 is the hardware op): the
  kernel carries x * log2(e) and lse * log2(e).

Backward, with dO the gradient of O:
    dV_j  = sum_i P_ij dO_i                         (summed over the q heads of a kv group: GQA)
    dP_ij = dO_i . v_j
    dX_ij = P_ij (dP_ij - delta_i),  delta_i = sum_j P_ij dP_ij = dO_i . O_i      (softmax Jacobian)
    dS_ij = dX_ij * dx/ds                           s = q.k; dx/ds = scale, or scale * (1 - tanh^2) with softcap
    dQ_i  = sum_j dS_ij k_j,    dK_j = sum_i dS_ij q_i  (dK summed over the q heads of the group)
  Two kernels, no atomics, bit-reproducible: dQ (one program per query block and q head, looping over key blocks;
  it also computes delta from its O and dO tiles and stores it), then dK/dV (one program per key block and kv head,
  looping over the group's q heads and over query blocks). The dQ kernel recomputes q.k and dO.v (two extra
  matmuls, one extra exponential) in exchange for no atomic adds and no fp32 dQ buffer; adding dQ with fp32
  atomics in the dK/dV kernel instead was measured slower and removed (below).

Block skipping: a query block [m0, m1) needs only keys [lo, min(m1, T)) with lo = max(m0 - W + 1, first index of
  the earliest document among its queries); a key block [n0, n1) is needed only by queries [n0, hi) with
  hi = min(T, n1 - 1 + W, one past the last index of the latest document among its keys). Other tiles are never
  loaded. Of the tiles in range, only those that straddle a causal, window or document edge build the mask:
  without documents the edge tiles are known from the block's position, so the range splits into edge loops and
  an interior loop that has no mask code at all (section "Tile loops"); with documents each tile is tested.
  Document bounds come from `attention_doc_tables` (a sort, so ids need not be contiguous runs).

Launch variants (KernelConfig: block shape, warps, pipeline stages, the split) are the same kernels with other
constexprs; tools/sweep_attention.py times them on the H200 and `_config` holds the choice (its docstring has the
numbers). Two other variants lost that sweep (H200, 2026-11-28: bf16, B 4 x T 8192, 32 q / 8 kv heads, D 128,
causal with a 4096 window; all variants passed their accuracy checks) and were removed:
  - K/V (forward, dQ) or q/dO (dK/dV) tiles loaded through Hopper TMA tensor descriptors: each kernel's best TMA
    variant was within 1% of, or slower than, its best pointer-load variant: forward 3.683 vs 3.655 ms, dQ 4.490 vs
    4.361, dK/dV 7.059 vs 6.986.
  - dQ accumulated with fp32 atomic adds in the dK/dV kernel (no dQ kernel; a delta pass first; dQ's last bits
    varied with the order of the adds): whole backward 13.26-15.03 ms vs 11.39 for the best dQ + dK/dV kernels.
"""
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._dispatch import device_properties, interpreting, pick_backend
from ._triton import cast

# ---------------------------------------------------------------------------------------------------------------
# Reference (the spec)
# ---------------------------------------------------------------------------------------------------------------


def attention_mask_ref(T, device, doc_ids=None, window=None):
    i = torch.arange(T, device=device)
    m = i[None, :] <= i[:, None]
    if window is not None:
        m = m & (i[None, :] > i[:, None] - window)
    m = m[None]
    if doc_ids is not None:
        m = m & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return m  # (1 or B, T, T)


def attention_ref(q, k, v, scale=None, doc_ids=None, window=None, softcap=None):
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    # fp32 math for low-precision inputs; fp64 stays fp64 (the tests' truth).
    ct = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = (t.transpose(1, 2).to(ct) for t in (q, k, v))
    kf = kf.repeat_interleave(Hq // Hk, dim=1)
    vf = vf.repeat_interleave(Hq // Hk, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    mask = attention_mask_ref(T, q.device, doc_ids, window)[:, None]
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p @ vf).transpose(1, 2).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton helpers
# ---------------------------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634


@triton.jit
def _tanh(x):
    """fp32 tanh to ~1 ulp, from exp only (the interpreter has no libdevice). Source: Cephes tanhf.c
    (S. L. Moshier): |x| < 0.625 uses x + x^3 P(x^2) with P's minimax coefficients below; otherwise
    1 - 2 / (exp(2|x|) + 1), which has no cancellation there (tanh >= 0.55); exp overflow gives exactly 1."""
    ax = tl.abs(x)
    z = x * x
    p = (((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
    small = x + x * (p - 3.33332819422e-1) * z
    big = 1.0 - 2.0 / (tl.exp(2.0 * ax) + 1.0)
    big = tl.where(x < 0, -big, big)
    return tl.where(ax < 0.625, small, big)


@triton.jit
def _mm(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST (interpreter only): its tl.dot on bf16 returns garbage, so
    both operands go to fp32 first; callers round them to the input dtype before (with _triton.cast, which
    rounds to nearest even there as the GPU does), so the numbers are the GPU's."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _logits(s, sc, SOFTCAP: tl.constexpr):
    """Base-2 logits from raw scores s = q.k: x * log2(e). sc: (scale * log2(e), cap * log2(e), scale / cap).
    Returns (x2, t) where t = tanh(.) for the softcap derivative (t is s itself, unused, without softcap)."""
    scale_log2, cap_log2, inv_cap_scale = sc
    if SOFTCAP:
        t = _tanh(s * inv_cap_scale)
        return t * cap_log2, t
    else:
        return s * scale_log2, s


@triton.jit
def _visible(q_pos, k_pos, doc_q, doc_k, W, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Mask of the pairs (query i, key j) that attend: causal, window, same document. Positions and doc ids come as
    broadcastable 2-D index tensors (queries along rows in the forward and dQ tiles, along columns in dK/dV's)."""
    ok = k_pos <= q_pos
    if HAS_WINDOW:
        ok = ok & (k_pos > q_pos - W)
    if HAS_DOCS:
        ok = ok & (doc_k == doc_q)
    return ok


@triton.jit
def _tile_is_full(m0, m1, n0, n1, W, HAS_WINDOW: tl.constexpr):
    """True when the causal and window masks keep every pair of queries [m0, m1) x keys [n0, n1) (bounds
    unclamped, so a tile holding padding rows or columns past T is never 'full' for a real query)."""
    full = (n1 - 1) <= m0
    if HAS_WINDOW:
        full = full & ((m1 - 1) - n0 < W)
    return full


@triton.jit
def _same_doc(ROW, TS, T, a0, a1, uni, doc):
    """True when tokens [a0, a1) (a0 < T) are all in document `doc` and `uni` (the other side of the tile is
    all in `doc`) holds. Plane 3 of the doc tables is the start of each token's run of equal ids, so [a0, a1)
    is one run iff the run of its last token starts at or before a0: two scalar loads per tile."""
    return uni & (tl.load(ROW + 3 * TS + tl.minimum(a1, T) - 1) <= a0) & (tl.load(ROW + a0) == doc)


# ---------------------------------------------------------------------------------------------------------------
# Tile loops
#
# Every kernel holds one block (queries, or keys for dK/dV) and walks a range of tiles of the other side. Without
# documents the range splits at compile-time-known places into edge tiles, which straddle the causal diagonal, the
# window's far edge or the end of the row and build the mask, and interior tiles, which every pair of the tile sees:
# the interior loop carries no mask code, no row bounds and no per-tile test (SPLIT). With documents (or SPLIT off)
# one loop tests each tile at run time and masks the tiles that are not full.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(base, r0, stride, T, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Rows [r0, r0 + BLOCK_R) x columns [0, BLOCK_D) of a (T, D) view at `base` (rows `stride` elements apart,
    the last dim contiguous), zero past D and (CHECK_ROWS) past T."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + offs_r[:, None] * stride + offs_d[None, :]
    if CHECK_ROWS:
        return tl.load(ptrs, mask=(offs_r[:, None] < T) & (offs_d[None, :] < D), other=0.0)
    elif D == BLOCK_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)


@triton.jit
def _key_range(m0, T, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key tiles (starts: multiples of BLOCK_N) of queries [m0, m0 + BLOCK_M), m0 < T: [lo, a) cross the window's far
    edge, [a, b) are interior, [b, hi) cross the causal diagonal. A tile [n0, n0 + BLOCK_N) is interior iff its last
    key is visible to the first query, n0 + BLOCK_N - 1 <= m0 (so every key is < T), and its first key to the last
    query, (m0 + BLOCK_M - 1) - n0 < W."""
    hi = tl.minimum(m0 + BLOCK_M, T)
    lo = 0
    a = 0
    if HAS_WINDOW:
        lo = tl.maximum(m0 - W + 1, 0) // BLOCK_N * BLOCK_N
        a = tl.cdiv(tl.maximum(m0 + BLOCK_M - W, 0), BLOCK_N) * BLOCK_N
    b = (m0 + 1) // BLOCK_N * BLOCK_N
    a = tl.minimum(tl.maximum(a, lo), hi)
    b = tl.maximum(b, a)  # b <= m0 + 1 <= hi
    return lo, a, b, hi


@triton.jit
def _query_range(n0, T, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query tiles (starts: multiples of BLOCK_M) that see keys [n0, n0 + BLOCK_N): [lo, a) cross the causal diagonal,
    [a, b) are interior, [b, hi) cross the window's far edge or hold rows past T (interior tiles have none, so their
    loads need no row bounds). Interior iff m0 >= n0 + BLOCK_N - 1 and (m0 + BLOCK_M - 1) - n0 < W."""
    lo = n0 // BLOCK_M * BLOCK_M
    hi = T
    b = T // BLOCK_M * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(hi, n0 + BLOCK_N - 1 + W)
        b = tl.minimum(b, tl.cdiv(tl.maximum(n0 + W - BLOCK_M + 1, 0), BLOCK_M) * BLOCK_M)
    a = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    a = tl.minimum(tl.maximum(a, lo), hi)
    b = tl.maximum(tl.minimum(b, hi), a)
    return lo, a, b, hi


@triton.jit
def _fwd_tiles(acc, m_i, l_i, n_lo, n_hi,
               MASK: tl.constexpr,  # 0: interior tiles, no mask; 1: edge tiles, always masked; 2: test each tile
               HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
               q, k_base, v_base, skt, svt, m0, T, W,
               sc,                  # (scale * log2 e, cap * log2 e, scale / cap)
               docs,                # (ROW, TS, doc_q, q_doc, q_uni), read with MASK 2 only: see _attn_fwd_kernel
               D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
               INTERPRET: tl.constexpr):
    """The online softmax (module docstring) of queries [m0, m0 + BLOCK_M) over key tiles [n_lo, n_hi)."""
    ROW, TS, doc_q, q_doc, q_uni = docs
    offs_m = m0 + tl.arange(0, BLOCK_M)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, n0, skt, T, D, BLOCK_N, BLOCK_D, MASK != 0)
        v = _load_rows(v_base, n0, svt, T, D, BLOCK_N, BLOCK_D, MASK != 0)
        s = _mm(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, PREC)
        x, t = _logits(s, sc, SOFTCAP)
        if MASK == 1:
            x = tl.where(_visible(offs_m[:, None], offs_n[None, :], 0, 0, W, HAS_WINDOW, False), x, float("-inf"))
        elif MASK == 2:
            full = _tile_is_full(m0, m0 + BLOCK_M, n0, n0 + BLOCK_N, W, HAS_WINDOW)
            if HAS_DOCS:
                full = full & _same_doc(ROW, TS, T, n0, n0 + BLOCK_N, q_uni, q_doc)
            if not full:
                doc_k = offs_n
                if HAS_DOCS:
                    doc_k = tl.load(ROW + tl.minimum(offs_n, T - 1))
                ok = _visible(offs_m[:, None], offs_n[None, :], doc_q[:, None], doc_k[None, :], W, HAS_WINDOW,
                              HAS_DOCS)
                x = tl.where(ok, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        p = tl.math.exp2(x - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mm(cast(p, v.dtype, INTERPRET), v, acc * alpha[:, None], UPCAST, PREC)
        m_i = m_new
    return acc, m_i, l_i


# ---------------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,            # q (B,T,Hq,D), k/v (B,T,Hk,D), o like q; LSE (B,Hq,T) fp32, base 2
    DOC, TS,                    # doc tables (4,B,T) int32 (attention_doc_tables), TS = B*T: plane stride
    sqb, sqt, sqh,              # q strides (last dim contiguous); o is contiguous
    skb, skt, skh,              # k strides
    svb, svt, svh,              # v strides
    T, Hq,
    scale_log2, cap_log2, inv_cap_scale, W,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr,        # interior key tiles in their own loop, without mask code (section "Tile loops")
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    INTERPRET: tl.constexpr,    # launched on the interpreter: casts to bf16 round by hand (_triton.cast)
):
    # Causal work grows with the query block; launching the last blocks first evens out the tail of the grid.
    mb = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    m0 = mb * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    q = _load_rows(Q + b64 * sqb + h * sqh, m0, sqt, T, D, BLOCK_M, BLOCK_D, True)
    k_base = K + b64 * skb + hk * skh
    v_base = V + b64 * svb + hk * svh
    lo, a, c, hi = _key_range(m0, T, W, BLOCK_M, BLOCK_N, HAS_WINDOW)

    # m starts finite (not -inf) so a row whose first tiles are all masked gives exp2(-inf - m) = 0, never NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    sc = (scale_log2, cap_log2, inv_cap_scale)
    if HAS_DOCS:
        # Padding rows read token T-1's entries (clamped), so they change no min and stay finite.
        ROW = DOC + b64 * T
        offs_mc = tl.minimum(offs_m, T - 1)
        # start at the first index of the earliest document among the block's queries
        lo = tl.maximum(lo, tl.min(tl.load(ROW + TS + offs_mc), 0) // BLOCK_N * BLOCK_N)
        q_uni = tl.load(ROW + 3 * TS + tl.minimum(m0 + BLOCK_M, T) - 1) <= m0
        docs = (ROW, TS, tl.load(ROW + offs_mc), tl.load(ROW + m0), q_uni)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, lo, hi, 2, HAS_WINDOW, True, q, k_base, v_base, skt, svt, m0, T, W,
                                   sc, docs, D, BLOCK_D, BLOCK_M, BLOCK_N, SOFTCAP, UPCAST, PREC, INTERPRET)
    else:
        docs = (DOC, TS, offs_m, 0, False)  # unread
        if SPLIT:
            if HAS_WINDOW:
                acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, lo, a, 1, True, False, q, k_base, v_base, skt, svt, m0, T,
                                           W, sc, docs, D, BLOCK_D, BLOCK_M, BLOCK_N, SOFTCAP, UPCAST, PREC,
                                           INTERPRET)
            acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, a, c, 0, HAS_WINDOW, False, q, k_base, v_base, skt, svt, m0, T,
                                       W, sc, docs, D, BLOCK_D, BLOCK_M, BLOCK_N, SOFTCAP, UPCAST, PREC, INTERPRET)
            acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, c, hi, 1, HAS_WINDOW, False, q, k_base, v_base, skt, svt, m0, T,
                                       W, sc, docs, D, BLOCK_D, BLOCK_M, BLOCK_N, SOFTCAP, UPCAST, PREC, INTERPRET)
        else:
            acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, lo, hi, 2, HAS_WINDOW, False, q, k_base, v_base, skt, svt, m0, T,
                                       W, sc, docs, D, BLOCK_D, BLOCK_M, BLOCK_N, SOFTCAP, UPCAST, PREC, INTERPRET)

    # Every real query sees at least itself, so l_i > 0 on the rows that are stored; the guard keeps padding
    # rows (never stored) free of 0/0.
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_i[:, None]
    tl.store(O + (b64 * T + offs_m[:, None]) * (Hq * D) + h * D + offs_d[None, :],
             cast(out, O.dtype.element_ty, INTERPRET), mask=(offs_m[:, None] < T) & (offs_d[None, :] < D))
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)


# ---------------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _dkdv_tiles(dk, dv, m_lo, m_hi,
                MASK: tl.constexpr,  # as in _fwd_tiles
                HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                k, v, q_base, do_base, sqt, sdt, n0, T, W,
                LSE_ROW, DELTA_ROW,  # this q head's lse and delta, indexed by query
                sc,                  # (scale * log2 e, cap * log2 e, scale / cap)
                docs,                # (ROW, TS, doc_k, k_doc, k_uni), MASK 2 only: see _attn_bwd_dkdv_kernel
                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """dK, dV of keys [n0, n0 + BLOCK_N) from query tiles [m_lo, m_hi) of one q head (module docstring)."""
    ROW, TS, doc_k, k_doc, k_uni = docs
    offs_n = n0 + tl.arange(0, BLOCK_N)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        m0 = tl.multiple_of(m0, BLOCK_M)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, m0, sqt, T, D, BLOCK_M, BLOCK_D, MASK != 0)
        do = _load_rows(do_base, m0, sdt, T, D, BLOCK_M, BLOCK_D, MASK != 0)
        # Padding rows (>= T): q = 0, dO = 0, lse 0 and delta 0, so their P is 1 (finite) and every product with
        # dO vanishes.
        if MASK == 0:
            lse = tl.load(LSE_ROW + offs_m)
            delta = tl.load(DELTA_ROW + offs_m)
        else:
            lse = tl.load(LSE_ROW + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(DELTA_ROW + offs_m, mask=offs_m < T, other=0.0)
        # Transposed tile (keys x queries) so the accumulations below are plain (BN, BM) @ (BM, D) products.
        sT = _mm(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), UPCAST, PREC)
        xT, tT = _logits(sT, sc, SOFTCAP)
        pT = tl.math.exp2(xT - lse[None, :])
        if MASK == 1:
            pT = tl.where(_visible(offs_m[None, :], offs_n[:, None], 0, 0, W, HAS_WINDOW, False), pT, 0.0)
        elif MASK == 2:
            full = _tile_is_full(m0, m0 + BLOCK_M, n0, n0 + BLOCK_N, W, HAS_WINDOW)
            if HAS_DOCS:
                full = full & _same_doc(ROW, TS, T, m0, m0 + BLOCK_M, k_uni, k_doc)
            if not full:
                doc_q = offs_m
                if HAS_DOCS:
                    doc_q = tl.load(ROW + tl.minimum(offs_m, T - 1))
                ok = _visible(offs_m[None, :], offs_n[:, None], doc_q[None, :], doc_k[:, None], W, HAS_WINDOW,
                              HAS_DOCS)
                pT = tl.where(ok, pT, 0.0)
        # dV_j += sum_i P_ij dO_i
        dv = _mm(cast(pT, do.dtype, INTERPRET), do, dv, UPCAST, PREC)
        # dP_ij = dO_i . v_j ; dX = P (dP - delta) ; softcap: dX *= 1 - tanh^2 (scale applied at the end)
        dpT = _mm(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), UPCAST, PREC)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dsT = cast(dsT, q.dtype, INTERPRET)
        # dK_j += sum_i dS_ij q_i
        dk = _mm(dsT, q, dk, UPCAST, PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA,    # q/do (B,T,Hq,D) (do has its own strides), k/v (B,T,Hk,D), LSE/DELTA (B,Hq,T)
    DK, DV,                     # outputs (B,T,Hk,D) contiguous, in k's dtype
    DOC, TS,                    # as in the forward
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
    T, Hq, Hk,
    scale, scale_log2, cap_log2, inv_cap_scale, W,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr,        # as in the forward (interior query tiles)
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    INTERPRET: tl.constexpr,    # launched on the interpreter: casts to bf16 round by hand (_triton.cast)
):
    # One program owns keys [n0, n0 + BLOCK_N) of one kv head and sums over its GROUP q heads: no atomics for dK/dV.
    # Causal work shrinks with the key block, and block 0 (the most work) launches first.
    nb = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // Hk
    hk = bhk % Hk
    b64 = b.to(tl.int64)
    n0 = nb * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b64 * skb + hk * skh, n0, skt, T, D, BLOCK_N, BLOCK_D, True)
    v = _load_rows(V + b64 * svb + hk * svh, n0, svt, T, D, BLOCK_N, BLOCK_D, True)
    lo, a, c, hi = _query_range(n0, T, W, BLOCK_M, BLOCK_N, HAS_WINDOW)
    sc = (scale_log2, cap_log2, inv_cap_scale)
    docs = (DOC, TS, offs_n, 0, False)  # unread without documents
    if HAS_DOCS:
        ROW = DOC + b64 * T
        offs_nc = tl.minimum(offs_n, T - 1)
        hi = tl.minimum(hi, tl.max(tl.load(ROW + 2 * TS + offs_nc), 0) + 1)  # past the latest document's end
        k_uni = tl.load(ROW + 3 * TS + tl.minimum(n0 + BLOCK_N, T) - 1) <= n0
        docs = (ROW, TS, tl.load(ROW + offs_nc), tl.load(ROW + n0), k_uni)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b64 * sqb + h * sqh
        do_base = DO + b64 * sdb + h * sdh
        lse_row = LSE + (b64 * Hq + h) * T
        delta_row = DELTA + (b64 * Hq + h) * T
        if HAS_DOCS or not SPLIT:
            dk, dv = _dkdv_tiles(dk, dv, lo, hi, 2, HAS_WINDOW, HAS_DOCS, k, v, q_base, do_base, sqt, sdt, n0, T, W,
                                 lse_row, delta_row, sc, docs, D, BLOCK_D, BLOCK_M, BLOCK_N, SOFTCAP, UPCAST, PREC,
                                 INTERPRET)
        else:
            dk, dv = _dkdv_tiles(dk, dv, lo, a, 1, HAS_WINDOW, False, k, v, q_base, do_base, sqt, sdt, n0, T, W,
                                 lse_row, delta_row, sc, docs, D, BLOCK_D, BLOCK_M, BLOCK_N, SOFTCAP, UPCAST, PREC,
                                 INTERPRET)
            dk, dv = _dkdv_tiles(dk, dv, a, c, 0, HAS_WINDOW, False, k, v, q_base, do_base, sqt, sdt, n0, T, W,
                                 lse_row, delta_row, sc, docs, D, BLOCK_D, BLOCK_M, BLOCK_N, SOFTCAP, UPCAST, PREC,
                                 INTERPRET)
            dk, dv = _dkdv_tiles(dk, dv, c, hi, 1, HAS_WINDOW, False, k, v, q_base, do_base, sqt, sdt, n0, T, W,
                                 lse_row, delta_row, sc, docs, D, BLOCK_D, BLOCK_M, BLOCK_N, SOFTCAP, UPCAST, PREC,
                                 INTERPRET)

    out_off = (b64 * T + offs_n[:, None]) * (Hk * D) + hk * D + offs_d[None, :]
    kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
    tl.store(DK + out_off, cast(dk * scale, DK.dtype.element_ty, INTERPRET), mask=kv_mask)
    tl.store(DV + out_off, cast(dv, DV.dtype.element_ty, INTERPRET), mask=kv_mask)


@triton.jit
def _dq_tiles(dq, n_lo, n_hi,
              MASK: tl.constexpr,  # as in _fwd_tiles
              HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
              q, do, lse, delta, k_base, v_base, skt, svt, m0, T, W,
              sc, docs,            # as in _fwd_tiles
              D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
              INTERPRET: tl.constexpr):
    """dQ of queries [m0, m0 + BLOCK_M) from key tiles [n_lo, n_hi) (unscaled; the caller multiplies by scale)."""
    ROW, TS, doc_q, q_doc, q_uni = docs
    offs_m = m0 + tl.arange(0, BLOCK_M)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, n0, skt, T, D, BLOCK_N, BLOCK_D, MASK != 0)
        v = _load_rows(v_base, n0, svt, T, D, BLOCK_N, BLOCK_D, MASK != 0)
        s = _mm(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, PREC)
        x, t = _logits(s, sc, SOFTCAP)
        p = tl.math.exp2(x - lse[:, None])
        if MASK == 1:
            p = tl.where(_visible(offs_m[:, None], offs_n[None, :], 0, 0, W, HAS_WINDOW, False), p, 0.0)
        elif MASK == 2:
            full = _tile_is_full(m0, m0 + BLOCK_M, n0, n0 + BLOCK_N, W, HAS_WINDOW)
            if HAS_DOCS:
                full = full & _same_doc(ROW, TS, T, n0, n0 + BLOCK_N, q_uni, q_doc)
            if not full:
                doc_k = offs_n
                if HAS_DOCS:
                    doc_k = tl.load(ROW + tl.minimum(offs_n, T - 1))
                ok = _visible(offs_m[:, None], offs_n[None, :], doc_q[:, None], doc_k[None, :], W, HAS_WINDOW,
                              HAS_DOCS)
                p = tl.where(ok, p, 0.0)
        # dP = dO v^T ; dX = P (dP - delta) ; softcap: dX *= 1 - tanh^2 ; dQ += dX k (scale applied at the end)
        dp = _mm(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, PREC)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _mm(cast(ds, k.dtype, INTERPRET), k, dq, UPCAST, PREC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, O, LSE,        # O like q (the forward's output, for delta)
    DELTA, DQ,                  # outputs: DELTA (B,Hq,T) fp32 = rowsum(dO * O), read by the dK/dV kernel
                                # afterwards; DQ (B,T,Hq,D) contiguous, in q's dtype
    DOC, TS,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, sob, sot, soh,
    T, Hq,
    scale, scale_log2, cap_log2, inv_cap_scale, W,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr,        # as in the forward
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    INTERPRET: tl.constexpr,    # launched on the interpreter: casts to bf16 round by hand (_triton.cast)
):
    # Same walk as the forward: one query block of one q head, over the key blocks it needs.
    mb = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    b64 = b.to(tl.int64)
    m0 = mb * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b64 * sqb + h * sqh, m0, sqt, T, D, BLOCK_M, BLOCK_D, True)
    do = _load_rows(DO + b64 * sdb + h * sdh, m0, sdt, T, D, BLOCK_M, BLOCK_D, True)
    o = _load_rows(O + b64 * sob + h * soh, m0, sot, T, D, BLOCK_M, BLOCK_D, True)
    # delta_i = dO_i . O_i (fp32), the row term of the softmax Jacobian, computed here instead of in a pass of its
    # own, and stored for the dK/dV kernel.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    k_base = K + b64 * skb + hk * skh
    v_base = V + b64 * svb + hk * svh
    lo, a, c, hi = _key_range(m0, T, W, BLOCK_M, BLOCK_N, HAS_WINDOW)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    sc = (scale_log2, cap_log2, inv_cap_scale)
    if HAS_DOCS:
        # as in the forward
        ROW = DOC + b64 * T
        offs_mc = tl.minimum(offs_m, T - 1)
        lo = tl.maximum(lo, tl.min(tl.load(ROW + TS + offs_mc), 0) // BLOCK_N * BLOCK_N)
        q_uni = tl.load(ROW + 3 * TS + tl.minimum(m0 + BLOCK_M, T) - 1) <= m0
        docs = (ROW, TS, tl.load(ROW + offs_mc), tl.load(ROW + m0), q_uni)
        dq = _dq_tiles(dq, lo, hi, 2, HAS_WINDOW, True, q, do, lse, delta, k_base, v_base, skt, svt, m0, T, W, sc, docs,
                       D, BLOCK_D, BLOCK_M, BLOCK_N, SOFTCAP, UPCAST, PREC, INTERPRET)
    else:
        docs = (DOC, TS, offs_m, 0, False)  # unread
        if SPLIT:
            if HAS_WINDOW:
                dq = _dq_tiles(dq, lo, a, 1, True, False, q, do, lse, delta, k_base, v_base, skt, svt, m0, T, W, sc,
                               docs, D, BLOCK_D, BLOCK_M, BLOCK_N, SOFTCAP, UPCAST, PREC, INTERPRET)
            dq = _dq_tiles(dq, a, c, 0, HAS_WINDOW, False, q, do, lse, delta, k_base, v_base, skt, svt, m0, T, W, sc,
                           docs, D, BLOCK_D, BLOCK_M, BLOCK_N, SOFTCAP, UPCAST, PREC, INTERPRET)
            dq = _dq_tiles(dq, c, hi, 1, HAS_WINDOW, False, q, do, lse, delta, k_base, v_base, skt, svt, m0, T, W, sc,
                           docs, D, BLOCK_D, BLOCK_M, BLOCK_N, SOFTCAP, UPCAST, PREC, INTERPRET)
        else:
            dq = _dq_tiles(dq, lo, hi, 2, HAS_WINDOW, False, q, do, lse, delta, k_base, v_base, skt, svt, m0, T, W, sc,
                           docs, D, BLOCK_D, BLOCK_M, BLOCK_N, SOFTCAP, UPCAST, PREC, INTERPRET)

    tl.store(DQ + (b64 * T + offs_m[:, None]) * (Hq * D) + h * D + offs_d[None, :],
             cast(dq * scale, DQ.dtype.element_ty, INTERPRET), mask=(offs_m[:, None] < T) & (offs_d[None, :] < D))


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


class KernelConfig(NamedTuple):
    """How one kernel launches. block_m / block_n: queries / keys per tile; warps, stages: Triton's num_warps and
    num_stages (shared-memory buffers of the streamed tiles); split: interior tiles in a loop without mask code
    (section "Tile loops"; no effect with documents)."""
    block_m: int
    block_n: int
    warps: int
    stages: int
    split: bool = True


# The tuned GPU configs of _config fill up to 224 KB of shared memory per block (the D 128 forward: 32 KB of q +
# 3 stages x 2 x 32 KB of K/V), which a Hopper GPU gives a block (232448 bytes opt-in on the H100 / H200). A GPU
# that gives less (A100: 166912 bytes; consumer Ampere / Ada: ~100 KB) would refuse to launch them, so it takes
# _small_config for every kernel instead: ~50 KB (a 64-row q tile + 2 stages of 32-key K/V tiles at D 128, or the
# mirror for dK/dV; 32-row tiles past D 128), untuned on those GPUs.
TUNED_SMEM = 232448


def _small_config(D):
    K = KernelConfig(32, 32, 4, 1, split=False) if D > 128 else KernelConfig(64, 32, 4, 2, split=False)
    return dict(fwd=K, dkdv=K, dq=K)


def _device_smem(x):
    """Shared memory a block may opt in to on x's device (bytes); None for CPU tensors (the interpreter) and where
    torch does not report it (the property exists on CUDA builds since torch 2.7, pytorch PR 143226)."""
    return getattr(device_properties(x.device), "shared_memory_per_block_optin", None) if x.is_cuda else None


def _config(D, interp, dtype=torch.bfloat16, docs=False, smem=None):
    """{"fwd", "dkdv", "dq"}: KernelConfig of the forward, dK/dV and dQ kernels, by head dim and case.

    GPU (H200, sm_90). D <= 128 (80 and 96 pad to 128): tools/sweep_attention.py, 2026-11-28 (bf16, B 4 x T 8192,
    32 q / 8 kv heads, D 128, causal with a 4096 window; every variant passed its accuracy check), kernel ms, 8 warps
    unless noted:
      forward: 128 x 128, 3 stages, split: 3.655 (chosen); 128 x 128 s2 4.344; 128 x 64 s3 3.778, s4 3.911 (the
        former default), s4 unsplit 3.898, s5 4.000; 64 x 64 x 4 warps s3 4.031. A 128-query block gives two
        64-row warpgroups sharing each K/V tile; 32 KB of q + 3 stages x 2 x 32 KB of K/V = 224 KB of the 227 KB
        of shared memory a block may have.
      dQ: 128 x 64, 3 stages, split: 4.361 (chosen); s4 4.420 (former default), s4 unsplit 4.706; 128 x 128 s2
        4.781; 128 x 32 s4 5.346; 64 x 64 x 4 warps s2 4.806.
      dK/dV: 64 x 128, 3 stages, unsplit: 6.986 (chosen); split 7.616 (former default), split s2 7.290; 32 x 128
        s3 8.286, s4 8.466; 64 x 64 x 4 warps s3 8.613. 128 keys per program keep dK, dV (2 x 128 x 128 fp32) in
        registers. Compiled offline for sm_90a (ptxas -v, triton 3.6, bf16, 2026-11-29): all three kernels use 255
        registers; dK/dV spills (176 bytes stored, 220 loaded per thread), with 33 local loads in each iteration
        of its main loop (24 wgmma); the forward's 24 bytes of spill sit outside its loops, and dQ has none. Spills
        are not what limits dK/dV: the 32 x 128 tile spills 8 bytes and reloads nothing in its loop, and it timed
        slower above (8.286 ms); reloading k and v in the loop instead of holding them still spills 156 bytes.
        Marking the forward's key loop `tl.range(..., warp_specialize=True)` compiles to the same SASS on sm_90a
        (offline, triton 3.6, 2026-11-29): upstream's automatic warp specialization does not act on Hopper, so
        FA3-style producer/consumer warpgroups would need Gluon's explicit intrinsics.
      Whole forward + backward: 15.811 ms with the three chosen in that run, 15.514 with all three unsplit;
        a re-run (S3-4, commit a9c4bd3, the chosen set as the library default) gave 15.068 ms chosen,
        15.391 all unsplit, 15.543 for its own per-kernel best, FlexAttention 15.935; forward 3.562 chosen vs
        3.852 unsplit. Run-to-run spread of a whole step is ~3%, so the chosen set stays.
    D <= 64 and D = 256: tools/bench_attention.py --sweep (bf16, B 4, T 8192, 32 q / 8 kv heads, causal) on the
    kernels before the interior/edge split (every tile tested at run time), the backward as whole-backward TFLOP/s
    with the other backward kernel at its default; split=True there is unmeasured (that sweep times both):
    D <= 64: forward 64 x 64, 4 warps (388 vs 383 for 128 x 64 x 8 warps); dK/dV 64 x 64, 4 warps (344 vs
      314 for 64 x 128 x 8); dQ 128 x 64, 8 warps (314).
    D = 256: the accumulators double: forward 64 x 64, 4 warps, 3 stages (431; 128 x 64 x 3 stages needs 256 KB
      of shared memory); dK/dV 64 x 64 x 8 warps x 1 stage (252; 32 x 64 x 2 stages: 220); dQ 128 x 32 (222).
    Interpreter: small blocks (32 x 16) so tests with T ~ 100 cross several blocks, masks and skips.
    smem: the device's shared memory per block (_device_smem); below TUNED_SMEM every kernel takes _small_config.
    """
    if interp:
        return dict(fwd=KernelConfig(32, 16, 4, 1), dkdv=KernelConfig(16, 32, 4, 1), dq=KernelConfig(32, 16, 4, 1))
    if smem is not None and smem < TUNED_SMEM:
        return _small_config(D)
    if dtype == torch.float32:
        # fp32 inputs (tests, not a fast path): tiles take twice the shared memory and the ieee products run
        # without tensor cores, so small blocks; the bf16 blocks need twice their shared memory here (the D 128
        # forward's 224 KB would be 448 KB; limit 227 KB).
        # Unsplit: the split kernels' extra copies of the FMA-built products spill 30-80 KB per thread (ptxas -v).
        K = functools.partial(KernelConfig, split=False)
        if D <= 128:
            return dict(fwd=K(64, 32, 4, 2), dkdv=K(32, 64, 4, 2), dq=K(64, 32, 4, 2))
        return dict(fwd=K(32, 32, 4, 1), dkdv=K(16, 32, 4, 1), dq=K(32, 32, 4, 1))
    if docs and D <= 128:
        # Packed rows: a block that straddles a document edge computes its earlier document's keys for all its
        # rows, so smaller blocks waste less. 16 documents per 8k row, D 128, doc tables precomputed: forward
        # 64 x 32 x 4 warps 0.69 ms vs 0.93 ms with the causal blocks; dK/dV 32 x 64 and dQ 64 x 32 (4 warps)
        # cut the backward by 0.33 and 0.14 ms (of 2.5). (Documents always test each tile: split has no effect.)
        return dict(fwd=KernelConfig(64, 32, 4, 3), dkdv=KernelConfig(32, 64, 4, 3), dq=KernelConfig(64, 32, 4, 3))
    if D <= 64:
        return dict(fwd=KernelConfig(64, 64, 4, 3), dkdv=KernelConfig(64, 64, 4, 3), dq=KernelConfig(128, 64, 8, 3))
    if D <= 128:
        # the sweep's fastest of each kernel (docstring): forward 3.655 ms (was 128 x 64 s4: 3.911), dQ 4.361 (was
        # s4: 4.420), dK/dV unsplit 6.986 (was split: 7.616)
        return dict(fwd=KernelConfig(128, 128, 8, 3), dkdv=KernelConfig(64, 128, 8, 3, split=False),
                    dq=KernelConfig(128, 64, 8, 3))
    return dict(fwd=KernelConfig(64, 64, 4, 3), dkdv=KernelConfig(64, 64, 8, 1), dq=KernelConfig(128, 32, 8, 2))


def _check(q, k, v, scale, doc_ids, window, softcap):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, T, H, D); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, T, Hq, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in B, T or D")
    if Hq % k.shape[2] != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of kv heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if D > 256:
        raise ValueError(f"head dim must be <= 256, got {D}")
    if doc_ids is not None and (doc_ids.shape != (B, T) or doc_ids.is_floating_point() or doc_ids.is_complex()
                                or doc_ids.device != q.device):
        raise ValueError(f"doc_ids must be integer (B, T) = {(B, T)} on q's device, got {doc_ids.dtype} "
                         f"{tuple(doc_ids.shape)} on {doc_ids.device}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap!r}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be None or a Python number, got {type(scale).__name__}")


def attention_doc_tables(doc_ids):
    """(4, B, T) int32 planes from doc ids (B, T): compact ids; each token's document's first and last index
    in its row; the start of the token's run of equal ids.

    A decoder computes them once per batch and passes them to every layer's `attention(..., doc_tables=)`:
    on an H200 (4 x 8192 tokens, 16 documents a row, 32 q heads, D 128) they add 0.27 ms to a 0.69 ms forward,
    about 25 small launches.
    Ids need not form contiguous runs (the mask is "same id"), so first/last come from a stable sort: in
    sorted order a document is one group, its first member has the smallest original index, its last the
    largest. Computed once per forward and saved for the backward.
    """
    B, T = doc_ids.shape
    sd, idx = torch.sort(doc_ids, dim=1, stable=True)
    pos = torch.arange(T, device=doc_ids.device).expand(B, T)
    new = torch.ones_like(sd, dtype=torch.bool)
    new[:, 1:] = sd[:, 1:] != sd[:, :-1]
    end = torch.ones_like(new)
    end[:, :-1] = new[:, 1:]
    g_start = torch.where(new, pos, 0).cummax(1).values
    g_end = torch.where(end, pos, T).flip(1).cummin(1).values.flip(1)
    sorted_planes = torch.stack([new.cumsum(1) - 1, idx.gather(1, g_start), idx.gather(1, g_end)])
    out = torch.empty(4, B, T, dtype=torch.int32, device=doc_ids.device)
    out[:3].scatter_(2, idx.expand(3, B, T), sorted_planes.to(torch.int32))
    run = torch.ones_like(new)
    run[:, 1:] = out[0, :, 1:] != out[0, :, :-1]
    out[3] = torch.where(run, pos, 0).cummax(1).values
    return out


def _last_contig(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _scalars(D, scale, softcap, window, T):
    scale = D ** -0.5 if scale is None else float(scale)
    cap = float(softcap) if softcap is not None else 1.0
    has_window = window is not None and window < T  # a window >= T masks nothing
    return dict(scale=scale, scale_log2=scale * LOG2E, cap_log2=cap * LOG2E, inv_cap_scale=scale / cap,
                W=int(window) if has_window else T, HAS_WINDOW=has_window, SOFTCAP=softcap is not None)


def _common(q, k, sc, tables, kc):
    """Constexpr launch arguments shared by the kernels."""
    interp = interpreting(q)
    D = q.shape[3]
    return dict(GROUP=q.shape[2] // k.shape[2], D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                BLOCK_M=kc.block_m, BLOCK_N=kc.block_n, HAS_WINDOW=sc["HAS_WINDOW"], HAS_DOCS=tables is not None,
                SOFTCAP=sc["SOFTCAP"], SPLIT=kc.split and tables is None,  # documents test every tile anyway
                UPCAST=interp,
                PREC="ieee" if q.dtype == torch.float32 else "tf32", INTERPRET=interp,
                num_warps=kc.warps, num_stages=kc.stages)


def _attention_fwd(q, k, v, scale, tables, window, softcap, cfg=None):
    """(o, lse) with lse (B, Hq, T) fp32 in base 2. cfg: a `_config` dict (tools/sweep_attention.py passes its own)."""
    B, T, Hq, D = q.shape
    kc = (cfg or _config(D, interpreting(q), q.dtype, tables is not None, _device_smem(q)))["fwd"]
    sc = _scalars(D, scale, softcap, window, T)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    args = (q, k, v, o, lse, tables if tables is not None else lse, B * T,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            T, Hq, sc["scale_log2"], sc["cap_log2"], sc["inv_cap_scale"], sc["W"])
    _attn_fwd_kernel[(triton.cdiv(T, kc.block_m), B * Hq)](*args, **_common(q, k, sc, tables, kc))
    return o, lse


def _bwd_dq(do, q, k, v, o, lse, sc, tables, kc):
    """(dq, delta): the dQ kernel, which also computes and stores delta for the dK/dV kernel."""
    B, T, Hq, D = q.shape
    delta = torch.empty_like(lse)
    dq = torch.empty(B, T, Hq, D, device=q.device, dtype=q.dtype)
    args = (q, k, v, do, o, lse, delta, dq, tables if tables is not None else lse, B * T,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *o.stride()[:3],
            T, Hq, sc["scale"], sc["scale_log2"], sc["cap_log2"], sc["inv_cap_scale"], sc["W"])
    _attn_bwd_dq_kernel[(triton.cdiv(T, kc.block_m), B * Hq)](*args, **_common(q, k, sc, tables, kc))
    return dq, delta


def _bwd_dkdv(do, q, k, v, lse, delta, sc, tables, kc):
    """(dk, dv): the dK/dV kernel."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    dk = torch.empty(B, T, Hk, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, T, Hk, D, device=q.device, dtype=v.dtype)
    args = (q, k, v, do, lse, delta, dk, dv, tables if tables is not None else lse, B * T,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
            T, Hq, Hk, sc["scale"], sc["scale_log2"], sc["cap_log2"], sc["inv_cap_scale"], sc["W"])
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, kc.block_n), B * Hk)](*args, **_common(q, k, sc, tables, kc))
    return dk, dv


def _attention_bwd(do, q, k, v, o, lse, scale, tables, window, softcap, cfg=None):
    B, T, Hq, D = q.shape
    cfg = cfg or _config(D, interpreting(q), q.dtype, tables is not None, _device_smem(q))
    sc = _scalars(D, scale, softcap, window, T)
    do = _last_contig(do)
    dq, delta = _bwd_dq(do, q, k, v, o, lse, sc, tables, cfg["dq"])
    dk, dv = _bwd_dkdv(do, q, k, v, lse, delta, sc, tables, cfg["dkdv"])
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, tables, window, softcap):
        q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
        cfg = _config(q.shape[3], interpreting(q), q.dtype, tables is not None, _device_smem(q))
        o, lse = _attention_fwd(q, k, v, scale, tables, window, softcap, cfg)
        ctx.save_for_backward(q, k, v, o, lse, *(() if tables is None else (tables,)))
        ctx.args = (scale, window, softcap, cfg)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *tables = ctx.saved_tensors
        scale, window, softcap, cfg = ctx.args
        dq, dk, dv = _attention_bwd(do, q, k, v, o, lse, scale, tables[0] if tables else None, window, softcap, cfg)
        return dq, dk, dv, None, None, None, None


def attention(q, k, v, scale=None, doc_ids=None, window=None, softcap=None, backend=None, doc_tables=None):
    """Causal attention; see the module docstring. backend: None (Triton on CUDA, ref otherwise), "triton", "ref".

    doc_tables: optional `attention_doc_tables(doc_ids)`, computed once and shared by all layers of a batch;
    the Triton path then skips recomputing them. doc_ids must still be given (the ref path uses it).
    """
    if pick_backend(backend, q) == "ref":
        return attention_ref(q, k, v, scale, doc_ids, window, softcap)
    _check(q, k, v, scale, doc_ids, window, softcap)
    if doc_tables is not None and (doc_ids is None or doc_tables.dtype != torch.int32
                                   or doc_tables.shape != (4, *doc_ids.shape) or doc_tables.device != q.device):
        raise ValueError("doc_tables must be attention_doc_tables(doc_ids) (int32 (4, B, T) on q's device), "
                         "given together with doc_ids")
    if doc_ids is not None and doc_tables is None:
        doc_tables = attention_doc_tables(doc_ids)
    return AttentionFunction.apply(q, k, v, scale, doc_tables, window, softcap)
