"""GeGLU: y = gelu(gate) * up, gelu tanh-approximate (Gemma's gelu_pytorch_tanh) or exact (erf); computed in
fp32 and rounded once to gate's dtype.

tanh (Hendrycks & Gimpel 2016, arXiv:1606.08415, eq. after (2); torch.nn.functional.gelu(approximate="tanh")):
  z = k (g + a g^3), k = sqrt(2 / pi), a = 0.044715
  gelu(g) = 0.5 g (1 + tanh z) = g * sigmoid(2 z)             (0.5 (1 + tanh z) = sigmoid(2 z))
  gelu'(g) = sigmoid(2z) + g * 2 sigmoid(2z) (1 - sigmoid(2z)) * k (1 + 3 a g^2)
  The sigmoid form needs only exp (the interpreter has no tanh) and keeps relative accuracy for g << 0,
  where 1 + tanh z would cancel. sigmoid(2z) and 1 - sigmoid(2z) both come from t = exp(-|2z|) (no overflow):
  1 - s formed by subtraction loses its relative accuracy once s rounds near 1, which showed as 4x the
  control's fp32 dgate error (H200, torch 2.11).
exact:
  gelu(g) = 0.5 g (1 + erf(g / sqrt 2)) = g Phi(g)
  gelu'(g) = Phi(g) + g phi(g),  phi(g) = exp(-g^2 / 2) / sqrt(2 pi)
Then dup = dy * gelu(g), dgate = dy * up * gelu'(g). The backward recomputes gelu from gate instead of storing
it (it reads gate and up anyway; a stored activation would cost one more tokens x intermediate tensor).

Shapes: any leading shape, flattened to (rows, N); gate and up may be strided row views (halves of a fused
gate_up projection) as long as the last dim is contiguous.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import pick_backend
from ._triton import cast
# The host side (2-D row views, the gate/up checks, the 1-D grid of tiles) is swiglu's, with the forward's own
# tile size (FWD_BLOCK below). Measured (H200, 16384 x 14336 bf16, tanh, run S3-4): forward 0.322 ms and forward +
# backward 0.861 ms, 104% of that run's copy measurement, equal to torch.compile of geglu_ref.
from .swiglu import _check as _check_pair
from .swiglu import _sigmoid_pair, launch_bwd, launch_fwd, load_dy, load_gate_up, tile

APPROXIMATIONS = ("tanh", "none")
# The forward's own tile (elements per program, warps): gelu's extra arithmetic per element hides better behind
# more loads in flight. H200 sweep of 2026-11-28 (16384 x 14336 bf16, tanh, `python -m hare.tools.bench_kernels
# --sweep --only geglu`): fwd 1024/4 warps 0.328 ms, 2048/4 0.322, 4096/8 0.320; the backward's best stays
# swiglu's 1024/4 (0.542 ms; the others 0.545-0.553).
FWD_BLOCK, FWD_WARPS = 4096, 8


@triton.jit
def _gelu_and_grad(g, TANH: tl.constexpr):
    """fp32 gelu(g) and gelu'(g)."""
    if TANH:
        k: tl.constexpr = 0.7978845608028654  # sqrt(2 / pi)
        a: tl.constexpr = 0.044715
        z = k * (g + a * g * g * g)
        s, one_minus_s = _sigmoid_pair(2.0 * z)
        act = g * s
        grad = s + 2.0 * g * s * one_minus_s * k * (1.0 + 3.0 * a * g * g)
    else:
        rsqrt2: tl.constexpr = 0.7071067811865476  # 1 / sqrt(2)
        rsqrt2pi: tl.constexpr = 0.3989422804014327  # 1 / sqrt(2 pi)
        cdf = 0.5 * (1.0 + tl.math.erf(g * rsqrt2))
        act = g * cdf
        grad = cdf + g * rsqrt2pi * tl.exp(-0.5 * g * g)
    return act, grad


@triton.jit
def _geglu_fwd_kernel(
    g_ptr,  # (M, N) gate rows, row stride g_row, last dim contiguous
    u_ptr,  # (M, N) up rows, row stride u_row
    y_ptr,  # (M, N) out, row stride y_row
    M, N,  # rows, row length
    g_row, u_row, y_row,  # row strides in elements
    ag_ptr, bg_ptr, au_ptr, bu_ptr,  # folded adapters (LORA_G / LORA_U), as in swiglu
    r, ag_row, bg_k, bg_n, au_row, bu_k, bu_n, scale_g, scale_u,
    LORA_G: tl.constexpr, LORA_U: tl.constexpr, R: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    TANH: tl.constexpr,  # tanh approximation vs exact erf
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # tile: rows x columns per program
    INTERPRET: tl.constexpr,  # launched on the interpreter: casts to bf16 round by hand (_triton.cast)
):
    rows, cols = tile(N, BLOCK_M, BLOCK_N)
    g, u = load_gate_up(g_ptr, u_ptr, rows, cols, M, N, g_row, u_row, ag_ptr, bg_ptr, au_ptr, bu_ptr, r,
                        ag_row, bg_k, bg_n, au_row, bu_k, bu_n, scale_g, scale_u, LORA_G, LORA_U, R, UPCAST, PREC)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    out = rows.to(tl.int64)[:, None] * y_row + cols[None, :]  # row * stride can pass 2^31
    act, _ = _gelu_and_grad(g, TANH)  # the unused derivative is dead code, removed by the compiler
    tl.store(y_ptr + out, cast(act * u, y_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _geglu_bwd_kernel(
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
    ad_ptr, bd_ptr, rd, ad_row, bd_k, bd_n, scale_d,  # the next projection's adapter term in dy (swiglu.load_dy)
    LORA_G: tl.constexpr, LORA_U: tl.constexpr, R: tl.constexpr, LORA_DY: tl.constexpr, RD: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    STORE_H: tl.constexpr,  # also write the forward's output (the fused MLP needs it for down_proj's adapter)
    TANH: tl.constexpr,  # tanh approximation vs exact erf
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
    act, grad = _gelu_and_grad(g, TANH)
    # dup = dy gelu(g) ; dgate = dy up gelu'(g)
    tl.store(du_ptr + row * du_row + cols, cast(dy * act, du_ptr.dtype.element_ty, INTERPRET), mask=mask)
    if STORE_H:
        tl.store(h_ptr + row * h_row + cols, cast(act * u, h_ptr.dtype.element_ty, INTERPRET), mask=mask)
    tl.store(dg_ptr + row * dg_row + cols, cast(dy * u * grad, dg_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _check(gate, up, approximate):
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    _check_pair(gate, up)


def geglu_fwd(gate, up, approximate, block=None, num_warps=None, fold=None):
    """gelu(gate) * up; fold: adapters added to gate and up inside the kernel (swiglu.fold_args)."""
    if fold is None:  # the folded kernel keeps swiglu's FOLD_TILE
        block, num_warps = block or FWD_BLOCK, num_warps or FWD_WARPS
    return launch_fwd(_geglu_fwd_kernel, gate, up, fold, block, num_warps, TANH=approximate == "tanh")


def geglu_bwd(dy, gate, up, approximate, block=None, num_warps=None, inplace=False, fold=None, dy_fold=None):
    """(dgate, dup); with inplace=True, (dgate, dup, h) written over (gate, up, dy), h = gelu(g) up; fold,
    dy_fold: see swiglu_bwd."""
    return launch_bwd(_geglu_bwd_kernel, dy, gate, up, inplace, fold, block, num_warps, dy_fold=dy_fold,
                      TANH=approximate == "tanh")


class GeGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, approximate):
        ctx.save_for_backward(gate, up)
        ctx.approximate = approximate
        return geglu_fwd(gate, up, approximate)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dg, du = geglu_bwd(dy, gate, up, ctx.approximate)
        return dg, du, None


def geglu_ref(gate, up, approximate="tanh"):
    # "fp32" is promote(dtype, fp32): the same for low-precision inputs, true fp64 for the test oracle
    f = torch.promote_types(gate.dtype, torch.float32)
    return (F.gelu(gate.to(f), approximate=approximate) * up.to(f)).to(gate.dtype)


def geglu(gate, up, approximate="tanh", backend=None):
    if pick_backend(backend, gate) == "ref":
        return geglu_ref(gate, up, approximate)
    _check(gate, up, approximate)
    return GeGLUFunction.apply(gate, up, approximate)
