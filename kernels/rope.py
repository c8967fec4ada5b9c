"""Rotary position embedding, rotate-half convention (Hugging Face's):
  out = x * cos + rotate_half(x) * sin,  rotate_half([x1, x2]) = [-x2, x1]
q: (B, T, Hq, D), k: (B, T, Hk, D); cos, sin: (P, D // 2) fp32 tables (any rope scaling already applied,
attention scaling folded in); position_ids: (B, T) (or (1, T), shared by the batch) integer rows into the tables,
so packed sequences simply restart at 0.

Per pair (x1_j, x2_j) = (x_j, x_{j + D/2}) with c = cos[pos, j], s = sin[pos, j] this is a plane rotation:
  out1 = x1 c - x2 s,   out2 = x2 c + x1 s            (forward: rotate by +angle)
Backward: the Jacobian is the rotation matrix R; the gradient is R^T dout, the rotation by -angle:
  dx1 = dout1 c + dout2 s,   dx2 = dout2 c - dout1 s  (= the forward with s -> -s)
So one kernel does both, with the sign of sin as a compile-time flag. Math in fp32, rounded once to x's dtype.

One launch handles q and k: each program owns one token, reads its position and its cos/sin row once, and
rotates all Hq query heads and all Hk key heads (GQA: Hq != Hk is fine). q and k may be strided views (e.g.
slices of a fused qkv projection) as long as head_dim is contiguous; outputs are new contiguous tensors.
Not in place: rotating q in place would corrupt a fused qkv buffer that autograd may still hold, and the
out-of-place version moves the same bytes.

Contract not checked on the device (it would cost a host sync per layer): 0 <= position_ids < P. The ref
raises an IndexError on CPU for a bad id; the kernel would read outside the table.
"""
import torch
import triton
import triton.language as tl

from ._dispatch import interpreting, pick_backend
from ._triton import cast

# Elements per half-tile (heads x D/2) per loop step: 4096 keeps q for Llama-3-8B (32 heads x 64) in one step
# with 32 fp32 values per thread per half at 4 warps. Measured (H200, 32 + 8 heads x 128, bf16): forward
# 3.4-3.6 TB/s = 81-87% of the 4.2 TB/s copy; other configurations: tools/bench_kernels.py --sweep.
HALF_TILE_ELEMENTS = 4096
NUM_WARPS = 4


@triton.jit
def _rotate_heads(
    x_ptr, o_ptr,  # this token's first head in the input / output
    x_sh, o_sh,  # head strides (elements) of input / output
    H,  # number of heads
    c, s,  # (1, BLOCK_HALF) fp32 cos and (signed) sin of this token
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    INTERPRET: tl.constexpr,  # launched on the interpreter: casts to bf16 round by hand (_triton.cast)
):
    j = tl.arange(0, BLOCK_HALF)[None, :]
    for h0 in range(0, H, BLOCK_H):
        h = (h0 + tl.arange(0, BLOCK_H))[:, None]
        mask = (h < H) & (j < HALF)
        x1 = tl.load(x_ptr + h * x_sh + j, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + h * x_sh + j + HALF, mask=mask, other=0.0).to(tl.float32)
        # out1 = x1 c - x2 s ; out2 = x2 c + x1 s   (s already carries the direction's sign)
        tl.store(o_ptr + h * o_sh + j, cast(x1 * c - x2 * s, o_ptr.dtype.element_ty, INTERPRET), mask=mask)
        tl.store(o_ptr + h * o_sh + j + HALF, cast(x2 * c + x1 * s, o_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,  # (B, T, Hq, D) input, strides q_sb, q_st, q_sh, 1
    k_ptr,  # (B, T, Hk, D) input, strides k_sb, k_st, k_sh, 1
    qo_ptr,  # (B, T, Hq, D) out, strides qo_sb, qo_st, qo_sh, 1
    ko_ptr,  # (B, T, Hk, D) out, strides ko_sb, ko_st, ko_sh, 1
    cos_ptr, sin_ptr,  # (P, D/2) fp32 tables, row stride tab_row, contiguous rows
    pos_ptr,  # (B, T) integer positions, strides pos_sb, pos_st (pos_sb = 0 when shared by the batch)
    T, HQ, HK,
    q_sb, q_st, q_sh, k_sb, k_st, k_sh,
    qo_sb, qo_st, qo_sh, ko_sb, ko_st, ko_sh,
    tab_row, pos_sb, pos_st,
    INVERSE: tl.constexpr,  # backward: rotate by -angle
    HALF: tl.constexpr,  # D / 2
    BLOCK_HALF: tl.constexpr,  # next power of two >= HALF
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,  # heads per loop step
    INTERPRET: tl.constexpr,  # launched on the interpreter: casts to bf16 round by hand (_triton.cast)
):
    tok = tl.program_id(0).to(tl.int64)  # int64: token * stride can pass 2^31
    b = tok // T
    t = tok % T
    pos = tl.load(pos_ptr + b * pos_sb + t * pos_st).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    c = tl.load(cos_ptr + pos * tab_row + j, mask=j < HALF, other=0.0)
    s = tl.load(sin_ptr + pos * tab_row + j, mask=j < HALF, other=0.0)
    if INVERSE:
        s = -s
    _rotate_heads(q_ptr + b * q_sb + t * q_st, qo_ptr + b * qo_sb + t * qo_st, q_sh, qo_sh, HQ, c, s,
                  HALF, BLOCK_HALF, BLOCK_HQ, INTERPRET)
    _rotate_heads(k_ptr + b * k_sb + t * k_st, ko_ptr + b * ko_sb + t * ko_st, k_sh, ko_sh, HK, c, s,
                  HALF, BLOCK_HALF, BLOCK_HK, INTERPRET)


def _check(q, k, cos, sin, position_ids):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, T, H, D), got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} must share B, T and D with q {tuple(q.shape)}")
    if D % 2:
        raise ValueError(f"head_dim must be even, got {D}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"q and k need a contiguous head_dim (stride 1), got strides {q.stride()}, {k.stride()}")
    for name, tab in (("cos", cos), ("sin", sin)):
        if tab.dim() != 2 or tab.shape[1] != D // 2 or tab.dtype != torch.float32 or tab.stride(-1) != 1:
            raise ValueError(f"{name} must be an fp32 (P, {D // 2}) table with contiguous rows, "
                             f"got {tuple(tab.shape)} {tab.dtype} strides {tab.stride()}")
        if tab.requires_grad:
            raise ValueError(f"{name} requires grad; the rope tables are constants (no gradient is computed)")
    if cos.shape != sin.shape or cos.stride() != sin.stride():
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape and strides")
    if position_ids.dim() != 2 or position_ids.shape[1] != T or position_ids.shape[0] not in (1, B) \
            or position_ids.dtype.is_floating_point or position_ids.dtype.is_complex:
        raise ValueError(f"position_ids must be an integer ({B} or 1, {T}) tensor, "
                         f"got {tuple(position_ids.shape)} {position_ids.dtype}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin), ("position_ids", position_ids)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")


def rope_fwd(q, k, cos, sin, position_ids, inverse=False, half_tile=None, num_warps=None):
    """Rotates q and k by the angles of position_ids (by minus them when inverse). Returns new (q, k).
    `half_tile`, `num_warps` override the tuning constants (tools/bench_kernels.py --sweep)."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if B * T == 0:
        return qo, ko
    pos = position_ids.expand(B, T)  # stride 0 over the batch when shared
    half = D // 2
    block_half = triton.next_power_of_2(half)
    heads_per_step = max(1, (half_tile or HALF_TILE_ELEMENTS) // block_half)
    block_hq = min(triton.next_power_of_2(Hq), heads_per_step)
    block_hk = min(triton.next_power_of_2(Hk), heads_per_step)
    _rope_kernel[(B * T,)](
        q, k, qo, ko, cos, sin, pos, T, Hq, Hk,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        cos.stride(0), pos.stride(0), pos.stride(1),
        INVERSE=inverse, HALF=half, BLOCK_HALF=block_half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        INTERPRET=interpreting(q), num_warps=num_warps or NUM_WARPS,
    )
    return qo, ko


def _head_dim_contiguous(t):
    # autograd may hand an expanded or otherwise strided gradient; the kernel needs stride 1 on head_dim only
    return t if t.stride(-1) == 1 else t.contiguous()


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids):
        ctx.save_for_backward(cos, sin, position_ids)
        return rope_fwd(q, k, cos, sin, position_ids)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, position_ids = ctx.saved_tensors
        dq, dk = rope_fwd(_head_dim_contiguous(dq), _head_dim_contiguous(dk), cos, sin, position_ids, inverse=True)
        return dq, dk, None, None, None


def _rotate(x, cos, sin):
    # cos/sin: (B, T, 1, D/2); computed in fp32 (fp64 for an fp64 oracle with fp64 tables) and rounded once.
    d = x.shape[-1] // 2
    up = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x[..., :d].to(up), x[..., d:].to(up)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rope_ref(q, k, cos, sin, position_ids):
    c = cos[position_ids].unsqueeze(2)
    s = sin[position_ids].unsqueeze(2)
    return _rotate(q, c, s), _rotate(k, c, s)


def apply_rope(q, k, cos, sin, position_ids, backend=None):
    if pick_backend(backend, q) == "ref":
        return rope_ref(q, k, cos, sin, position_ids)
    _check(q, k, cos, sin, position_ids)
    return RoPEFunction.apply(q, k, cos, sin, position_ids)
