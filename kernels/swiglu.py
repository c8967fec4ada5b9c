"""SwiGLU: y = silu(gate) * up, computed in fp32 and rounded once to gate's dtype.

With s = sigmoid(g), silu(g) = g s and silu'(g) = s + g s (1 - s) = s (1 + g (1 - s)), so
  dup   = dy * silu(g)
  dgate = dy * up * s (1 + g (1 - s))
s and 1 - s are both taken from t = exp(-|g|) (never overflows): for g >= 0, s = 1 / (1 + t), 1 - s = t / (1 + t),
mirrored for g < 0. Forming 1 - s by subtraction instead loses all relative accuracy once s rounds near 1
(g > ~10), and g * (1 - s) then carries an error of ~g * eps; seen as 4x the control's dgate error in fp32.
The backward recomputes s from gate instead of storing the activation: it reads gate and up anyway, and a
stored activation would cost one more (tokens x intermediate) tensor per layer.

Shapes: any leading shape, flattened to (rows, N) with N = the last dim. gate and up may be strided row views
(e.g. the two halves of a fused gate_up projection) as long as the last dim is contiguous.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import interpreting, pick_backend
from ._triton import cast

# Elementwise tiles of BLOCK elements (rows x columns; short rows share a program): 1024 over 4 warps is 8 per
# thread, one 16-byte load of bf16 per tensor per thread; the grid then has ~100k programs at Llama-3-8B sizes,
# plenty to hide memory latency.
# Measured (H200, 16384 x 14336 bf16, 1-D grid, runs S3-1 / S3-4): forward 0.321 ms, forward + backward 0.864 ms,
# 104-105% of the copy measurement and equal to torch.compile of swiglu_ref; the best forward and backward of
# the sweep's tiles (`tools/bench_kernels.py --sweep --only swiglu`: 1024-4096 elements, 4-8 warps).
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _sigmoid_pair(x):
    """fp32 (sigmoid(x), 1 - sigmoid(x)), both with full relative accuracy, no overflow."""
    t = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + t)
    pos = x >= 0
    return tl.where(pos, r, t * r), tl.where(pos, t * r, r)


@triton.jit
def tile(N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(rows, cols) of this program's tile on a 1-D grid, column tiles fastest: consecutive programs read
    consecutive addresses (a 2-D grid with rows on axis 0 sends neighbouring programs a whole row apart)."""
    pid = tl.program_id(0)
    col_tiles = tl.cdiv(N, BLOCK_N)
    return ((pid // col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M),
            (pid % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N))


@triton.jit
def lora_term(xa_ptr, bt_ptr, rows, cols, M, N, r, xa_row, bt_k, bt_n,
              R: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) tile of xa[rows, :r] @ Bt[:r, cols]: the low-rank part of a LoRA product, for a
    kernel that reads the base tensor anyway. xa (M, r) row-major (row stride xa_row); Bt (r, N) with strides
    bt_k, bt_n: B^T as a view of a row-major B (N, r) (bt_k = 1, bt_n = r), or A (r, N) itself. One tl.dot (R >=
    16: the rank padded; UPCAST on the interpreter, whose tl.dot on bf16 is garbage; PREC "ieee" for fp32 inputs,
    never tf32). r fp32 FMAs per element instead (each k's xa column and Bt row loaded as vectors in the tile's
    own layout, no shared-memory conversion) ran 1.6-1.9x slower at its best tiles (H200, run S10-2,
    BENCHMARKS.md): issue-bound."""
    row = rows.to(tl.int64)
    k = tl.arange(0, R)
    xa = tl.load(xa_ptr + row[:, None] * xa_row + k[None, :], mask=(rows < M)[:, None] & (k < r)[None, :], other=0.0)
    b = tl.load(bt_ptr + k[:, None] * bt_k + cols[None, :] * bt_n, mask=(k < r)[:, None] & (cols < N)[None, :],
                other=0.0)
    if UPCAST:
        return tl.dot(xa.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    else:
        return tl.dot(xa, b, input_precision=PREC)


@triton.jit
def load_gate_up(g_ptr, u_ptr, rows, cols, M, N, g_row, u_row,
                 ag_ptr, bg_ptr, au_ptr, bu_ptr, r, ag_row, bg_k, bg_n, au_row, bu_k, bu_n, scale_g, scale_u,
                 LORA_G: tl.constexpr, LORA_U: tl.constexpr, R: tl.constexpr, UPCAST: tl.constexpr,
                 PREC: tl.constexpr):
    """fp32 tiles of gate and up, each base output plus scale * (x A^T) B^T when its adapter is folded in
    (LORA_G / LORA_U). The forward and backward kernels both load through here, so they see the same g and u
    bit for bit."""
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    row = rows.to(tl.int64)[:, None]  # row * stride can pass 2^31
    g = tl.load(g_ptr + row * g_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if LORA_G:
        g += scale_g * lora_term(ag_ptr, bg_ptr, rows, cols, M, N, r, ag_row, bg_k, bg_n, R, UPCAST, PREC)
    if LORA_U:
        u += scale_u * lora_term(au_ptr, bu_ptr, rows, cols, M, N, r, au_row, bu_k, bu_n, R, UPCAST, PREC)
    return g, u


@triton.jit
def load_dy(dy_ptr, rows, cols, M, N, dy_row, ad_ptr, bd_ptr, rd, ad_row, bd_k, bd_n, scale_d,
            LORA_DY: tl.constexpr, RD: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """fp32 tile of the activation's output gradient: dy, plus scale_d * (dy_down B_d) A_d when the next
    projection's adapter term is folded in (LORA_DY: the fused MLP's down_proj, whose input gradient is
    dh = dy W_d + s_d (dy B_d) A_d; ad = dy B_d (M, rd), bd = A_d (rd, N))."""
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    dy = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if LORA_DY:
        dy += scale_d * lora_term(ad_ptr, bd_ptr, rows, cols, M, N, rd, ad_row, bd_k, bd_n, RD, UPCAST, PREC)
    return dy


@triton.jit
def _swiglu_fwd_kernel(
    g_ptr,  # (M, N) gate rows, row stride g_row, last dim contiguous
    u_ptr,  # (M, N) up rows, row stride u_row
    y_ptr,  # (M, N) out, row stride y_row
    M, N,  # rows, row length
    g_row, u_row, y_row,  # row strides in elements
    ag_ptr, bg_ptr, au_ptr, bu_ptr,  # folded adapters (LORA_G / LORA_U): x A^T (M, r) and B^T (r, N) of gate, up
    r, ag_row, bg_k, bg_n, au_row, bu_k, bu_n, scale_g, scale_u,  # their rank, strides (lora_term), scales
    LORA_G: tl.constexpr, LORA_U: tl.constexpr, R: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # tile: rows x columns per program
    INTERPRET: tl.constexpr,  # launched on the interpreter: casts to bf16 round by hand (_triton.cast)
):
    rows, cols = tile(N, BLOCK_M, BLOCK_N)
    g, u = load_gate_up(g_ptr, u_ptr, rows, cols, M, N, g_row, u_row, ag_ptr, bg_ptr, au_ptr, bu_ptr, r,
                        ag_row, bg_k, bg_n, au_row, bu_k, bu_n, scale_g, scale_u, LORA_G, LORA_U, R, UPCAST, PREC)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    out = rows.to(tl.int64)[:, None] * y_row + cols[None, :]
    s, _ = _sigmoid_pair(g)
    tl.store(y_ptr + out, cast(g * s * u, y_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr,  # (M, N) gradient of y, row stride dy_row
    g_ptr,  # (M, N) gate, row stride g_row
    u_ptr,  # (M, N) up, row stride u_row
    dg_ptr,  # (M, N) out: gradient of gate, row stride dg_row
    du_ptr,  # (M, N) out: gradient of up, row stride du_row
    h_ptr,  # (M, N) out when STORE_H: the activation act(g) * u, row stride h_row
    M, N,  # rows, row length
    dy_row, g_row, u_row, dg_row, du_row, h_row,  # row strides in elements
    ag_ptr, bg_ptr, au_ptr, bu_ptr,  # folded adapters, as in the forward
    r, ag_row, bg_k, bg_n, au_row, bu_k, bu_n, scale_g, scale_u,
    ad_ptr, bd_ptr, rd, ad_row, bd_k, bd_n, scale_d,  # the next projection's adapter term in dy (LORA_DY, load_dy)
    LORA_G: tl.constexpr, LORA_U: tl.constexpr, R: tl.constexpr, LORA_DY: tl.constexpr, RD: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    STORE_H: tl.constexpr,  # also write the forward's output (the fused MLP needs it for down_proj's adapter)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # tile: rows x columns per program
    INTERPRET: tl.constexpr,  # launched on the interpreter: casts to bf16 round by hand (_triton.cast)
):
    rows, cols = tile(N, BLOCK_M, BLOCK_N)
    g, u = load_gate_up(g_ptr, u_ptr, rows, cols, M, N, g_row, u_row, ag_ptr, bg_ptr, au_ptr, bu_ptr, r,
                        ag_row, bg_k, bg_n, au_row, bu_k, bu_n, scale_g, scale_u, LORA_G, LORA_U, R, UPCAST, PREC)
    dy = load_dy(dy_ptr, rows, cols, M, N, dy_row, ad_ptr, bd_ptr, rd, ad_row, bd_k, bd_n, scale_d, LORA_DY, RD,
                 UPCAST, PREC)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    row = rows.to(tl.int64)[:, None]
    cols = cols[None, :]
    s, one_minus_s = _sigmoid_pair(g)
    # dup = dy silu(g) ; dgate = dy up s (1 + g (1 - s))
    tl.store(du_ptr + row * du_row + cols, cast(dy * g * s, du_ptr.dtype.element_ty, INTERPRET), mask=mask)
    if STORE_H:
        tl.store(h_ptr + row * h_row + cols, cast(g * s * u, h_ptr.dtype.element_ty, INTERPRET), mask=mask)
    tl.store(dg_ptr + row * dg_row + cols,
             cast(dy * u * s * (1.0 + g * one_minus_s), dg_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _rows(t, n):
    """2-D (rows, n) view of `t` with a contiguous last dim; copies only when no such view exists."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or t2.numel() == 0 else t2.contiguous()


def _check(gate, up):
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"gate and up must match in shape, dtype and device, got {tuple(gate.shape)} "
                         f"{gate.dtype} {gate.device} and {tuple(up.shape)} {up.dtype} {up.device}")
    if not gate.dtype.is_floating_point or gate.dim() == 0:
        raise ValueError(f"gate must be a floating tensor with at least one dim, got {gate.dtype} {tuple(gate.shape)}")


def _launch(m, n, block=None, num_warps=None, folded=False, fold_tile=None):
    """grid and tile for (m, n) rows: `block` elements per program (short rows share a program); the arguments
    override BLOCK and NUM_WARPS (tools/bench_kernels.py --sweep). With folded adapters the tile is FOLD_TILE
    (or `fold_tile`): tl.dot needs >= 16 rows and columns."""
    if folded:
        block_m, block_n = fold_tile or FOLD_TILE
        num_warps = num_warps or FOLD_WARPS
    else:
        block = block or BLOCK
        block_n = min(triton.next_power_of_2(n), block)
        block_m = block // block_n
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    return grid, dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps or NUM_WARPS)


# Tile when adapters are folded in (rows x columns): the low-rank product is a (16 x 16) @ (16 x 128) tl.dot per
# tile, one MMA deep (rank 16), so the forward and backward compute the same g and u whatever their warps (a CPU
# test checks that every tile gives the same bits). Swept on the H200 (2026-11-29, run S9-3, `bash
# tools/gpu_suite.sh K swiglu`, i.e. `python -m hare.tools.bench_kernels --sweep --only swiglu geglu`, 16384 x
# 14336 bf16, rank 16, 1-D grid; copy 4228 GB/s): 16 x 128 with 4 warps is the best backward (0.92 ms, 72% of
# copy; the former 32 x 128 / 8 warps 0.99, 64 x 64: 1.19-1.30, 64 x 128 / 32 x 256: 1.36-1.88) and within 5% of the
# best forward (0.575 vs 0.549 ms for 64 x 64 / 8 warps; 32 x 128 / 4 warps: 0.596). 16-row tiles compile to 62-72
# registers against 113-155 for 32 rows (offline SASS, session 8). Fewer warps per tile also served the 8B step
# before (runs E3 / S3-3: forward 9.4 ms with 4 warps vs 10.2 with 8). With down_proj's term folded into the
# backward too (dy_fold, run S10-6): 1.191 ms at 16 x 128 / 4 warps, 1.166 with 2 warps (whose forward is 0.601 ms
# against 0.570), 1.181 at 16 x 64 / 4 warps (forward 0.643), 1.19-2.15 for the other tiles: kept.
FOLD_TILE = (16, 128)
FOLD_WARPS = 4  # forward and backward alike


def _rank(xa, bt, what, ref):
    """Rank of one folded product xa @ bt: xa (rows, r) row-major and bt (r, N) of any strides, in ref's dtype."""
    for t in (xa, bt):
        if t.dim() != 2 or t.dtype != ref.dtype or (t is xa and t.stride(-1) != 1):
            raise ValueError(f"{what}: folded adapter tensors must be 2-D in {ref.dtype}, xa row-major, got "
                             f"{t.dtype} {tuple(t.shape)} strides {t.stride()}")
    if xa.shape[0] != ref.shape[0] or bt.shape != (xa.shape[1], ref.shape[1]):
        raise ValueError(f"{what}: xa {tuple(xa.shape)} and Bt {tuple(bt.shape)} do not fit a "
                         f"{tuple(ref.shape)} tile ((rows, r) and (r, N) expected)")
    return xa.shape[1]


def _padded(r):
    """The R constexpr of lora_term: the rank padded to a tl.dot size (>= 16)."""
    return max(16, triton.next_power_of_2(r))


def fold_args(fold, ref):
    """(arguments, constexprs) of the kernels for adapters folded into the activation.
    fold: None, or (xa_g, Bt_g, scale_g, xa_u, Bt_u, scale_u) with xa = x A^T (rows, r) row-major and Bt = B^T
    (r, N) (e.g. B.t(), no copy) in the compute dtype, either side's pair None (no adapter there); both sides
    share the rank."""
    ag, bg, sg, au, bu, su = fold if fold is not None else (None,) * 6
    ranks = {_rank(a, b, name, ref) for a, b, name in ((ag, bg, "gate"), (au, bu, "up")) if a is not None}
    if len(ranks) > 1:
        raise ValueError(f"gate and up adapters folded into one activation must share a rank, got {sorted(ranks)}")
    r = ranks.pop() if ranks else 1
    ag, bg = (ag, bg) if ag is not None else (ref, ref)
    au, bu = (au, bu) if au is not None else (ref, ref)
    args = [ag, bg, au, bu, r, ag.stride(0), *bg.stride(), au.stride(0), *bu.stride(), float(sg or 0.0),
            float(su or 0.0)]
    meta = dict(LORA_G=fold is not None and fold[0] is not None, LORA_U=fold is not None and fold[3] is not None,
                R=_padded(r), UPCAST=interpreting(ref),
                PREC="ieee" if ref.dtype == torch.float32 else "tf32")
    return args, meta


def dy_fold_args(dy_fold, ref):
    """The backward kernels' (arguments, constexprs) for dy_fold: None, or (dy_d B_d (rows, rd), A_d (rd, N),
    scale_d), the next projection's adapter term in the incoming gradient (load_dy)."""
    ad, bd, sd = dy_fold if dy_fold is not None else (ref, ref, 0.0)
    rd = _rank(ad, bd, "dy", ref) if dy_fold is not None else 1
    return ([ad, bd, rd, ad.stride(0), *bd.stride(), float(sd)],
            dict(LORA_DY=dy_fold is not None, RD=_padded(rd)))


def bwd_buffers(dy, gate, up, inplace):
    """2-D views of (dy, gate, up) and the outputs (dg, du, h) of a gated activation's backward: new buffers, or
    with inplace the inputs themselves (h over dy; not written without inplace)."""
    n = gate.shape[-1]
    dy2, g2, u2 = _rows(dy, n), _rows(gate, n), _rows(up, n)
    if inplace:
        return dy2, g2, u2, g2, u2, dy2
    dg2 = torch.empty((g2.shape[0], n), dtype=gate.dtype, device=gate.device)
    du2 = torch.empty((u2.shape[0], n), dtype=up.dtype, device=up.device)
    return dy2, g2, u2, dg2, du2, dg2


def launch_fwd(kernel, gate, up, fold, block, num_warps, fold_tile=None, **constexprs):
    """y = act(gate) * up through a gated activation's forward kernel (this file's or geglu.py's, which take the
    same arguments): the row views, the folded adapters' arguments (fold_args), the tile and grid (_launch);
    constexprs: the kernel's own (e.g. GeGLU's TANH)."""
    n = gate.shape[-1]
    g2, u2 = _rows(gate, n), _rows(up, n)
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    y2 = y.view(-1, n)
    if y.numel():
        lora_args, meta = fold_args(fold, g2)
        grid, cfg = _launch(g2.shape[0], n, block, num_warps, folded=fold is not None, fold_tile=fold_tile)
        kernel[grid](g2, u2, y2, g2.shape[0], n, g2.stride(0), u2.stride(0), y2.stride(0),
                     *lora_args, INTERPRET=interpreting(y), **constexprs, **meta, **cfg)
    return y


def launch_bwd(kernel, dy, gate, up, inplace, fold, block, num_warps, fold_tile=None, dy_fold=None, **constexprs):
    """(dgate, dup), or with inplace (dgate, dup, h) over (gate, up, dy), through a gated activation's backward
    kernel; as launch_fwd, with dy_fold (dy_fold_args)."""
    dy2, g2, u2, dg2, du2, h2 = bwd_buffers(dy, gate, up, inplace)
    n = g2.shape[1]
    if dg2.numel():
        lora_args, meta = fold_args(fold, g2)
        dy_args, dy_meta = dy_fold_args(dy_fold, g2)
        folded = fold is not None or dy_fold is not None
        grid, cfg = _launch(g2.shape[0], n, block, num_warps, folded=folded, fold_tile=fold_tile)
        kernel[grid](dy2, g2, u2, dg2, du2, h2, g2.shape[0], n,
                     dy2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), du2.stride(0), h2.stride(0),
                     *lora_args, *dy_args, STORE_H=inplace, INTERPRET=interpreting(dg2), **constexprs, **meta,
                     **dy_meta, **cfg)
    shape = gate.shape
    if inplace:
        return dg2.view(shape), du2.view(shape), h2.view(shape)
    return dg2.view(shape), du2.view(shape)


def swiglu_fwd(gate, up, block=None, num_warps=None, fold=None, fold_tile=None):
    """silu(gate) * up; fold: adapters added to gate and up inside the kernel (see fold_args)."""
    return launch_fwd(_swiglu_fwd_kernel, gate, up, fold, block, num_warps, fold_tile)


def swiglu_bwd(dy, gate, up, block=None, num_warps=None, inplace=False, fold=None, fold_tile=None, dy_fold=None):
    """(dgate, dup); with inplace=True, (dgate, dup, h) written over (gate, up, dy): each element is read before
    it is written by the same thread, so no extra (tokens x intermediate) buffer is needed, and h = silu(g) up
    (the forward's output) comes out of the same pass. The inputs are consumed: the fused MLP's backward uses
    this (kernels/lora.py), where gate, up and dy are its own temporaries. fold: as in swiglu_fwd (gate and
    up are then the base outputs; the gradients are those of the full gate and up); dy_fold: the next
    projection's adapter term added to dy (dy_fold_args; the gradients are then those of dy plus it)."""
    return launch_bwd(_swiglu_bwd_kernel, dy, gate, up, inplace, fold, block, num_warps, fold_tile, dy_fold)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return swiglu_bwd(dy, gate, up)


def swiglu_ref(gate, up):
    # "fp32" is promote(dtype, fp32): the same for low-precision inputs, true fp64 for the test oracle
    f = torch.promote_types(gate.dtype, torch.float32)
    return (F.silu(gate.to(f)) * up.to(f)).to(gate.dtype)


def swiglu(gate, up, backend=None):
    if pick_backend(backend, gate) == "ref":
        return swiglu_ref(gate, up)
    _check(gate, up)
    return SwiGLUFunction.apply(gate, up)
