"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * (offset + w), optionally fused with the residual add before it.

Casting rules (`casting`), as the reference models do it:
  "llama": statistics in fp32, normalized x cast back to x.dtype, then multiplied by (offset + w) in w's dtype
           (transformers LlamaRMSNorm: `weight * hidden.to(input_dtype)`); output dtype = promote(w, x).
  "gemma": everything in fp32, `(offset + w.float())`, cast to x.dtype at the end (transformers GemmaRMSNorm).
Offset 1 is Gemma's `1 + w` parametrization; other families use offset 0.

Fused residual variant (`rms_norm_residual`): h = x + residual (rounded to x.dtype, as the decoder's `residual +
hidden` does), y = rms_norm(h); one pass returns both, so h is never re-read just to normalize it.

Backward. With r = (mean(x^2) + eps)^(-1/2), xhat = x r, weff = offset + w and g = dy * weff (all fp32):
  dr/dx_i = -r^3 x_i / N, so
  dx_i = sum_j g_j d(x_j r)/dx_i = r g_i - r^3 x_i / N * sum_j g_j x_j = r * (g_i - xhat_i * mean_j(g_j xhat_j))
  dw_j = sum_rows dy_j * xhat_j
The casts in the forward are identity for the gradient (autograd treats `.to` as identity), and the kernels
keep xhat and g in fp32 rather than re-rounding them, which only brings the result closer to the fp64 truth.
In the residual variant h feeds both y and the caller, so dx = dresidual = dh + (the dx above).
dw is reduced over rows in two stages: each backward program sums its rows into one fp32 row of a
(programs, N) buffer, and a small kernel sums those rows in a fixed order (deterministic, no atomics).
"""
import torch
import triton
import triton.language as tl

from ._dispatch import interpreting, pick_backend, sm_count
from ._triton import cast

CASTINGS = ("llama", "gemma")

# Largest row we normalize in one tile (elements). A row lives in registers: 64K fp32 values over 16 warps is
# 128 per thread, the edge before spilling; hidden sizes of current models are <= 16384.
MAX_BLOCK_N = 65536
# Elements per program in the forward when rows are short (q/k norms over head_dim 128): several rows share a
# program so each one moves >= 8 KiB of bf16, instead of launching a program per 256-byte row.
TILE_ELEMENTS = 4096
# Backward with dw (trainable weight). Each program walks the row tiles p, p + P, p + 2P, ... and sums its
# dy * xhat into one fp32 row of a (P, N) buffer; a small kernel sums the P rows (deterministic, no atomics).
# History: the first version (BLOCK_M 1, 8 warps, 4 programs per SM, plain loop) reached only 2.9-3.3 TB/s =
# 69-78% of the 4.2 TB/s copy (H200, hidden 4096 bf16, fwd+bwd), against 96-99% without dw (frozen weight, one
# tile per program). ptxas gave it 122 registers per thread (2 x (256, 4096) tiles live in the loop plus weff and
# the dw accumulator), so only 2 of its 8-warp programs fit an SM's 64K registers (the launch asked 4: two
# waves), and each program had one row's loads in flight between reductions: too few bytes in flight per SM to
# cover DRAM latency (Little's law: ~4.5 TB/s x ~1.5 us / 132 SMs ~ 50 KiB per SM).
# Now: 8 elements of a row per thread (16 warps for 4096: 64 registers, sm_90 ptxas from triton 3.6, no spills,
# so 2 programs x 16 warps per SM) and a software-pipelined row loop (tl.range num_stages): the x / dy / rstd
# tiles of the next STAGES-1 steps are copied into shared memory asynchronously, 2 x 16 KiB per program with 3
# stages (32 KiB of shared memory per program, 48 KiB with the residual's dh), ~64 KiB in flight per SM.
# The same ptxas gives 64 registers for every tile of 8 elements per thread from 1024 to 8192 elements (1024:
# 4 warps; 2048: 8 warps; 8192 needs 32 warps for it, so at the 16-warp cap it takes 126 and one program per SM).
# Measured (H200, 2026-11-28, `python -m hare.tools.bench_kernels --sweep --only rms_norm`, copy 4249 GB/s):
# 16 warps, 1 row per step, 2 programs per SM: 3 stages 87% / 88% of copy (plain dw, 8192 / 16384 tokens) and
# 90% / 95% (residual), the best config that is good at all four; 4 stages 82% / 81% / 88% / 93%. Fwd + bwd with dw
# then 88% (8192) and 93% (16384) against 69-78% before.
BWD_DW_ELEMENTS_PER_THREAD = 8
# Rows per loop step: one unless a row is shorter than this (q/k norms over head_dim 128: 8 rows per step), the
# smallest tile that gives 4 warps 8 elements each.
BWD_DW_MIN_TILE = 1024
BWD_DW_STAGES = 3
# Shared memory for one program's pipeline buffers ((STAGES - 1) x tile x (x + dy (+ dh)) bytes): stages are cut
# to fit, so two programs still share an SM's 228 KiB (sm_90) and rows up to 64K elements compile (1 stage).
BWD_DW_SMEM = 100 * 1024
# Programs per SM = BWD_DW_ELEMENTS_PER_SM / tile elements (at least 1): the register file holds two 4096-element
# programs at 64 registers, i.e. 2 per SM at hidden 4096, 4 at 2048, 1 at 8192.
BWD_DW_ELEMENTS_PER_SM = 8192
# On the interpreter any count is correct; a few programs with uneven row counts exercise the two-stage sum.
BWD_PROGRAMS_CPU = 4
# Stage 2 (sum of the (P, N) partial rows): a program owns 32 columns (128 bytes of fp32 per partial row, one
# cache line) and walks the partial rows DW_SUM_ROWS at a time. 4096 columns: 128 programs reading 4 MiB that
# the backward just wrote (in L2).
DW_SUM_COLS = 32
DW_SUM_ROWS = 128


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,  # (M, N) input rows; last dim contiguous, row stride x_row
    r_ptr,  # (M, N) residual rows, row stride r_row (read only when HAS_RESIDUAL)
    h_ptr,  # (M, N) out: x + residual in x's dtype, row stride h_row (written only when HAS_RESIDUAL)
    w_ptr,  # (N,) weight, contiguous
    y_ptr,  # (M, N) out: normalized rows, row stride y_row
    rstd_ptr,  # (M,) out fp32: 1 / sqrt(mean(h^2) + eps), kept for the backward
    M, N,  # rows, row length
    x_row, r_row, h_row, y_row,  # row strides in elements
    eps, offset,  # fp32 scalars
    HAS_RESIDUAL: tl.constexpr,  # fuse h = x + residual
    GEMMA: tl.constexpr,  # casting "gemma" (all fp32) vs "llama" (round xhat to x.dtype, weff to w.dtype)
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # next power of two >= N: the whole row is one tile
    INTERPRET: tl.constexpr,  # launched on the interpreter: casts to bf16 round by hand (_triton.cast)
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows = rows.to(tl.int64)  # rows * stride can pass 2^31 on long sequences
    x = tl.load(x_ptr + rows[:, None] * x_row + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(r_ptr + rows[:, None] * r_row + cols[None, :], mask=mask, other=0.0)
        # one rounding to x's dtype, as torch's `x + residual` (it adds in fp32 and rounds)
        x = cast(x.to(tl.float32) + res.to(tl.float32), x_ptr.dtype.element_ty, INTERPRET)
        tl.store(h_ptr + rows[:, None] * h_row + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / N + eps)
    xhat = xf * rstd[:, None]
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if GEMMA:
        y = xhat * (offset + w)[None, :]
    else:
        # llama: (offset + w) rounded in w's dtype, xhat rounded to x's dtype, product rounded once to y's
        # dtype (exact in fp32 before that rounding: two <= 11-bit mantissas fit in 24 bits).
        weff = cast(w + offset, w_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
        y = weff[None, :] * cast(xhat, x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * y_row + cols[None, :], cast(y, y_ptr.dtype.element_ty, INTERPRET), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,  # (M, N) gradient of y, row stride dy_row
    dh_ptr,  # (M, N) gradient arriving at h (residual variant), row stride dh_row; read only when HAS_DH
    x_ptr,  # (M, N) the normalized input (h in the residual variant), row stride x_row
    w_ptr,  # (N,) weight
    rstd_ptr,  # (M,) fp32 from the forward
    dx_ptr,  # (M, N) out: gradient of x (and of residual), row stride dx_row
    dw_part_ptr,  # (programs, N) fp32 out: this program's partial sum of dw over its rows (when COMPUTE_DW)
    M, N,  # rows, row length
    dy_row, dh_row, x_row, dx_row,  # row strides in elements
    offset,  # fp32 scalar
    HAS_DH: tl.constexpr,  # add dh into dx
    GEMMA: tl.constexpr,  # casting, as in the forward (decides how weff is rounded)
    COMPUTE_DW: tl.constexpr,  # False when the weight is frozen (LoRA): no partial buffer at all
    BLOCK_M: tl.constexpr,  # rows per loop step: one (BLOCK_M, BLOCK_N) tile, its row reductions side by side
    BLOCK_N: tl.constexpr,  # next power of two >= N
    STAGES: tl.constexpr,  # software pipeline depth: loads of the next STAGES-1 steps fly while one computes
    INTERPRET: tl.constexpr,  # launched on the interpreter: casts to bf16 round by hand (_triton.cast)
):
    # Program p takes the tiles p, p + P, p + 2P, ... (P = programs): counts differ by at most one tile.
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_M
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if GEMMA:
        weff = offset + w
    else:
        weff = cast(w + offset, w_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # STAGES > 1: Triton's software pipeliner (tl.range num_stages) copies the x / dy / rstd tiles of the next
    # steps into shared memory asynchronously (cp.async on sm_80+), so a program keeps several rows of loads in
    # flight without holding them in registers; on the interpreter this is a plain loop.
    for r0 in tl.range(pid * BLOCK_M, M, step, num_stages=STAGES):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows = rows.to(tl.int64)  # rows * stride can pass 2^31 on long sequences
        x = tl.load(x_ptr + rows[:, None] * x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        if COMPUTE_DW:
            # dw_j = sum_rows dy_j * xhat_j (masked rows load zeros and add nothing). Taken before the row
            # reduction below so dy is dead across it (with dh, ptxas then needs 64 registers instead of 91 at
            # 16 warps: 2 programs per SM instead of 1). The sum over the tile's rows stays inside each thread:
            # Triton lays a (BLOCK_M, >= 32 * 8 * warps) tile out with every warp along the row, so one thread
            # holds all BLOCK_M rows of its columns.
            dw_acc += tl.sum(dy * xhat, axis=0)
        # g = dy * weff;  dx = r * (g - xhat * mean(g * xhat))
        g = dy * weff[None, :]
        c = tl.sum(g * xhat, axis=1) / N
        dx = rstd[:, None] * (g - xhat * c[:, None])
        if HAS_DH:
            # h = x + residual also leaves the op: its gradient adds straight through
            dx += tl.load(dh_ptr + rows[:, None] * dh_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * dx_row + cols[None, :], cast(dx, dx_ptr.dtype.element_ty, INTERPRET),
                 mask=mask)
    if COMPUTE_DW:
        tl.store(dw_part_ptr + pid * N + cols, dw_acc, mask=col_ok)


@triton.jit
def _rms_norm_dw_kernel(
    part_ptr,  # (P, N) fp32 partial sums of dw, one row per backward program, contiguous
    dw_ptr,  # (N,) out: dw in the weight's dtype
    P, N,  # partial rows, row length
    BLOCK_P: tl.constexpr,  # partial rows per loop step
    BLOCK_COLS: tl.constexpr,  # columns per program
    INTERPRET: tl.constexpr,  # launched on the interpreter: casts to bf16 round by hand (_triton.cast)
):
    # stage 2 of the dw reduction: a fixed order over the partial rows (deterministic), one rounding at the end
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_P, BLOCK_COLS), dtype=tl.float32)
    for p0 in tl.range(0, P, BLOCK_P, num_stages=3):
        parts = p0 + tl.arange(0, BLOCK_P)
        mask = (parts < P)[:, None] & col_ok[None, :]
        acc += tl.load(part_ptr + parts[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(dw_ptr + cols, cast(tl.sum(acc, axis=0), dw_ptr.dtype.element_ty, INTERPRET), mask=col_ok)


def _rows(t, n):
    """2-D (rows, n) view of `t` with a contiguous last dim; copies only when no such view exists."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or t2.numel() == 0 else t2.contiguous()


def _config(n, tile=None, num_warps=None):
    """(BLOCK_M, BLOCK_N, num_warps) for rows of length n; `tile` and `num_warps` override the defaults
    (tools/bench_kernels.py --sweep)."""
    block_n = triton.next_power_of_2(n)
    if block_n > MAX_BLOCK_N:
        raise ValueError(f"rms_norm: x.shape[-1]={n} is longer than the {MAX_BLOCK_N} a tile holds")
    block_m = max(1, (tile or TILE_ELEMENTS) // block_n)
    # 16 elements per thread for the tile (2 x 16-byte loads of bf16), between 4 and 16 warps. Measured (H200,
    # hidden 4096 bf16, 8 warps): forward 3.5-3.7 TB/s = 84-89% of the 4.2 TB/s copy; other counts: --sweep.
    num_warps = num_warps or min(16, max(4, block_m * block_n // 512))
    return block_m, block_n, num_warps


def _check(x, weight, casting, residual=None):
    if casting not in CASTINGS:
        raise ValueError(f"casting must be 'llama' or 'gemma', got {casting!r}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape ({x.shape[-1]},) to match x.shape[-1], got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        raise ValueError(f"residual must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), got "
                         f"{tuple(residual.shape)}, {residual.dtype}, {residual.device}")


def rms_norm_fwd(x, weight, eps, offset, casting, residual=None, tile=None, num_warps=None):
    """Returns (y, h or None, rstd). y, h have x's shape; rstd is (rows,) fp32."""
    n = x.shape[-1]
    x2 = _rows(x, n)
    m = x2.shape[0]
    gemma = casting == "gemma"
    y_dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(x.shape, dtype=y_dtype, device=x.device)
    y2 = y.view(-1, n)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = _rows(residual, n)
        h = torch.empty_like(x, memory_format=torch.contiguous_format)
        h2 = h.view(-1, n)
    else:
        r2 = h2 = x2  # unused by the kernel (HAS_RESIDUAL=False)
        h = None
    if m == 0:
        return y, h, rstd
    block_m, block_n, num_warps = _config(n, tile, num_warps)
    _rms_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
        x2, r2, h2, weight.contiguous(), y2, rstd, m, n,
        x2.stride(0), r2.stride(0), h2.stride(0), y2.stride(0), float(eps), float(offset),
        HAS_RESIDUAL=residual is not None, GEMMA=gemma, BLOCK_M=block_m, BLOCK_N=block_n,
        INTERPRET=interpreting(x), num_warps=num_warps,
    )
    return y, h, rstd


def _bwd_config(x, dy, dh, compute_dw, rows, num_warps, stages, programs):
    """(BLOCK_M, BLOCK_N, num_warps, stages, programs) of the backward; arguments not None override the defaults
    (tools/bench_kernels.py --sweep). Programs may exceed the row tiles: the launcher clamps them."""
    for name, v in (("rows", rows), ("num_warps", num_warps), ("stages", stages), ("programs", programs)):
        if v is not None and v < 1:
            raise ValueError(f"rms_norm_bwd: {name}={v} must be >= 1")
    if rows is not None and rows & (rows - 1):
        raise ValueError(f"rms_norm_bwd: rows={rows} must be a power of two (a tile dimension)")
    n = x.shape[-1]
    block_m, block_n, warps = _config(n)
    m = x.numel() // n if n else 0
    if not compute_dw:
        # no reduction: by default one tile per program and as many programs as tiles, no pipelining (the
        # forward's tile and warps: 96-99% of the copy, see the constants)
        block_m = rows or block_m
        return block_m, block_n, num_warps or warps, stages or 1, programs or triton.cdiv(m, block_m)
    block_m = rows or max(1, BWD_DW_MIN_TILE // block_n)
    tile = block_m * block_n
    warps = num_warps or min(16, max(4, tile // BWD_DW_ELEMENTS_PER_THREAD // 32))
    if stages is None:
        per_stage = tile * (x.element_size() + dy.element_size() + (dh.element_size() if dh is not None else 0))
        stages = max(1, min(BWD_DW_STAGES, 1 + BWD_DW_SMEM // per_stage))
    if programs is None:
        programs = (sm_count(x.device) * max(1, BWD_DW_ELEMENTS_PER_SM // tile)
                    if x.is_cuda else BWD_PROGRAMS_CPU)
    return block_m, block_n, warps, stages, programs


def rms_norm_bwd(dy, dh, x, weight, rstd, offset, casting, compute_dw, rows=None, num_warps=None, stages=None,
                 programs=None):
    """dy: gradient of y; dh: gradient of h (residual variant) or None; x: the normalized input (h).
    Returns (dx, dw or None). The keyword arguments override the tuning constants (tools/bench_kernels.py
    --sweep): rows per loop step (BLOCK_M), warps, software-pipeline stages, and the number of programs."""
    block_m, block_n, warps, stages, programs = _bwd_config(x, dy, dh, compute_dw, rows, num_warps, stages,
                                                            programs)
    n = x.shape[-1]
    x2 = _rows(x, n)
    dy2 = _rows(dy, n)
    dh2 = _rows(dh, n) if dh is not None else dy2
    m = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx2 = dx.view(-1, n)
    if m == 0:
        return dx, (torch.zeros_like(weight) if compute_dw else None)
    grid = min(programs, triton.cdiv(m, block_m))
    dw_part = torch.empty((grid, n) if compute_dw else (1,), dtype=torch.float32, device=x.device)
    interpret = interpreting(x)
    _rms_norm_bwd_kernel[(grid,)](
        dy2, dh2, x2, weight.contiguous(), rstd, dx2, dw_part, m, n,
        dy2.stride(0), dh2.stride(0), x2.stride(0), dx2.stride(0), float(offset),
        HAS_DH=dh is not None, GEMMA=casting == "gemma", COMPUTE_DW=compute_dw,
        BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, INTERPRET=interpret, num_warps=warps,
    )
    if not compute_dw:
        return dx, None
    # stage 2 of the dw reduction: (programs, N) fp32 -> (N,), rounded once to w's dtype, in one small launch
    # (torch's dw_part.sum(0).to(w.dtype) took two)
    dw = torch.empty(n, dtype=weight.dtype, device=x.device)
    _rms_norm_dw_kernel[(triton.cdiv(n, DW_SUM_COLS),)](
        dw_part, dw, grid, n, BLOCK_P=min(DW_SUM_ROWS, triton.next_power_of_2(grid)), BLOCK_COLS=DW_SUM_COLS,
        INTERPRET=interpret, num_warps=4,
    )
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, casting):
        y, _, rstd = rms_norm_fwd(x, weight, eps, offset, casting)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset, ctx.casting = offset, casting
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy, None, x, weight, rstd, ctx.offset, ctx.casting, ctx.needs_input_grad[1])
        return dx, dw, None, None, None


class RMSNormResidualFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, offset, casting, total=None):
        if total is None:
            y, h, rstd = rms_norm_fwd(x, weight, eps, offset, casting, residual=residual)
        else:  # the sum is known: normalize it, x and residual are not read (see rms_norm_residual)
            y, _, rstd = rms_norm_fwd(total, weight, eps, offset, casting)
            h = total.view_as(total)
        ctx.save_for_backward(h, weight, rstd)
        ctx.offset, ctx.casting = offset, casting
        ctx.set_materialize_grads(False)  # an unused h (or y) arrives as None: skip reading zeros
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        h, weight, rstd = ctx.saved_tensors
        if dy is None:  # only h was used: y contributes nothing
            dx = dh if dh is not None else torch.zeros_like(h)
            dw = torch.zeros_like(weight) if ctx.needs_input_grad[2] else None
        else:
            dx, dw = rms_norm_bwd(dy, dh, h, weight, rstd, ctx.offset, ctx.casting, ctx.needs_input_grad[2])
        # h = x + residual: both inputs receive the same gradient (as torch's own add backward returns it twice)
        return dx, dx, dw, None, None, None, None


def rms_norm_ref(x, weight, eps, offset=0.0, casting="llama"):
    # "fp32" below is promote(dtype, fp32): the same for low-precision inputs, true fp64 for the test oracle
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "gemma":
        return (xf * (offset + weight.to(torch.promote_types(weight.dtype, torch.float32)))).to(x.dtype)
    if casting == "llama":
        w = weight + offset if offset else weight
        return w * xf.to(x.dtype)
    raise ValueError(f"casting must be 'llama' or 'gemma', got {casting!r}")


class KnownSum(torch.autograd.Function):
    """apply(x, residual, total) = total, with the gradient of x + residual: the sum's value is known, its
    inputs' values are not read."""

    @staticmethod
    def forward(ctx, x, residual, total):
        return total.view_as(total)

    @staticmethod
    def backward(ctx, d):
        return d, d, None


def rms_norm_residual_ref(x, residual, weight, eps, offset=0.0, casting="llama", total=None):
    h = x + residual if total is None else KnownSum.apply(x, residual, total)
    return rms_norm_ref(h, weight, eps, offset, casting), h


def rms_norm(x, weight, eps, offset=0.0, casting="llama", backend=None):
    if pick_backend(backend, x) == "ref":
        return rms_norm_ref(x, weight, eps, offset, casting)
    _check(x, weight, casting)
    return RMSNormFunction.apply(x, weight, eps, offset, casting)


def rms_norm_residual(x, residual, weight, eps, offset=0.0, casting="llama", backend=None, total=None):
    """Returns (y, h): h = x + residual (the new residual stream), y = rms_norm(h).
    total: the value of x + residual when it is already known (checkpoint recomputation with the sum saved,
    models/decoder.py DecoderLayer.recompute): it is normalized and returned as h, and the values of x and
    residual are not read (they may be uninitialised); the gradients are those of the sum, computed as without."""
    if pick_backend(backend, x) == "ref":
        return rms_norm_residual_ref(x, residual, weight, eps, offset, casting, total)
    _check(x, weight, casting, residual)
    return RMSNormResidualFunction.apply(x, residual, weight, eps, offset, casting, total)
