"""Projections of the decoder with LoRA: one input through one or more linears (q/k/v share theirs, o_proj has
its own), and the whole gated MLP (gate/up -> SwiGLU or GeGLU -> down).

For one projection with a frozen base W (out x in, 16-bit, or 4-bit and dequantized on use), bias b, and the
adapter A (r x in), B (out x r), scale s = alpha / r (rsLoRA: alpha / sqrt r)  [Hu et al. 2021, arXiv:2106.09685]:

    y  = x W^T + b + s (x A^T) B^T
    dx = dy W + s (dy B) A
    dA = s (dy B)^T x          (r x in)
    dB = s dy^T (x A^T)        (out x r)
    no dW, no db: the base is frozen.

Projections sharing one input add their dx into one buffer (addmm_ into the same (tokens, in) tensor: no
per-projection dx, no sum afterwards). When all their adapters share a rank and a scale (q/k/v, gate/up as
apply_lora makes them), the adapters run stacked: x [A_1; ...; A_n]^T is one GEMM (x read once, not n times), and
in backward the (dy_i B_i)^T are row blocks of one matrix D, so that the dx term s D^T [A_i] and all the dA_i = s D x
are one GEMM each (two passes over the (tokens, in) dx and two over x fewer per q/k/v backward).

The gated MLP, with act = SwiGLU (silu(g) u) or GeGLU (gelu(g) u), whose fwd/bwd are the kernels of
kernels/swiglu.py and kernels/geglu.py:

    g = proj_gate(x), u = proj_up(x), h = act(g, u), y = proj_down(h)
    dh = dy W_d + s_d (dy B_d) A_d,  dA_d = s_d (dy B_d)^T h,  dB_d = s_d dy^T (h A_d^T)
    dg, du = act_bwd(dh, g, u)
    dx = dg W_g + s_g (dg B_g) A_g + du W_u + s_u (du B_u) A_u,  and dA/dB of gate and up as above.

What the fused functions keep for backward: x, g, u, A, B and the small (tokens x r) products x A^T; the base
weights are referenced, never copied: a 16-bit W is the parameter itself, a 4-bit W stays packed and is
dequantized again in backward into a temporary that dies right after its GEMM (the MLP of a checkpoint
recomputation keeps only x: its backward runs the gate / up GEMMs itself, in blocks of tokens, with the three
weights dequantized once: LoRAMLPFunction). h is not stored (it is a
(tokens x intermediate) tensor per layer): the activation's backward kernel writes it, with dg and du, over
dh, g and u, which nothing needs afterwards. Plain autograd over the same ops would keep x, g, u, h and every
dequantized W, and allocate dg, du and dh beside them.

Gate's and up's adapter terms s (x A^T) B^T are folded into the activation kernels (fwd and bwd): g and u are
kept as the base outputs x W^T + b, and the kernels add the rank-r product tile by tile (a tl.dot with K = r)
before the activation. The alternative, y.addmm_(x A^T, B^T), is a GEMM whose cost is reading and writing the
whole (tokens x intermediate) output once more: 0.18 ms per call at 8192 x 14336 bf16 on an H200, 24 ms per
training step of Llama-3.1-8B (BENCHMARKS.md, profile). The sum is then formed in fp32 and not rounded to the
compute dtype before the activation: one rounding fewer than the reference, never one more.
down_proj's input-gradient term s_d (dy B_d) A_d is folded the same way into the activation's backward, which reads
dh anyway (dy_fold): dh = dy W_d stays the GEMM's output, and the dh.addmm_ pass it replaces read and wrote the
whole (tokens x intermediate) dh once more (see BENCHMARKS.md, session 10, for its measured cost and saving).
The other order (the adapter product first, y = s (x A^T) B^T, then the base GEMM adding x W^T onto it with cuBLAS's
beta = 1, no folding) was timed against this one and removed (H200, 2026-11-29, run S9-2, BENCHMARKS.md): 1B QLoRA
graphed 67.4k / 67.3k tok/s vs 67.6k / 68.5k, 8B QLoRA offload 13,539 vs 13,622, 8B "auto" graphed 16,702 vs
16,641 (noise).

Dtypes (the one place they are decided): the compute dtype is the input's (bf16 on the GPU). A 16-bit base must
already be in it; a 4-bit base is dequantized to it. Adapters may be kept in fp32 (master weights for the
optimizer): they are cast to the compute dtype at use, and their gradients are returned in their own dtype.
GEMMs accumulate in fp32 (cuBLAS / the CPU BLAS) and round once.

Dropout > 0 on an adapter: its input is dropout(x), not x, so the fused functions (which share x between base and
adapter) do not apply; that projection takes the slower correct path: the base through the fused function (still
dequantized in backward) plus the adapter branch under plain autograd.

Backends: "triton" = the fused autograd functions above (GEMMs on cuBLAS, activations on the Triton kernels);
"ref" = the same math composed from the `_ref` ops under plain autograd (the spec and the test oracle).
backend=None picks "triton" for CUDA tensors and "ref" otherwise. A LoRA module carries its choice in
`module.backend` (set by engine.lora.apply_lora; None by default).

The module protocol read here (nothing else is assumed): a projection module has `weight` (a tensor, or a 4-bit
container with `.dequantize(dtype)`) and `bias` (tensor or None); a LoRA module also has `lora_A` and `lora_B`
(modules whose `.weight` is A and B), `scaling` (s), `dropout` (probability) and `backend`. A plain
`nn.Linear` is run as itself. An MLP module may set `rows` (lora_mlp's, default MLP_ROWS).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..quant.linear import linear_nf4
from ..quant.nf4 import NF4Weight
from ._dispatch import pick_backend
from .geglu import geglu, geglu_bwd, geglu_fwd
from .swiglu import swiglu, swiglu_bwd, swiglu_fwd


# Tokens per block of the MLP where nothing is kept for a backward (lora_mlp's `rows`): at 8192 the GEMMs are as
# efficient as at any larger count (H200: 780-797 TFLOP/s for 8192 x 4096 -> 6144 / 14336, BENCHMARKS.md run
# S4-1), and the anchors' 2048 x 4 step is one block, unchanged.
MLP_ROWS = 8192


# ---------------------------------------------------------------------------------------------------------------
# Weights and the module protocol
# ---------------------------------------------------------------------------------------------------------------

def dense(weight, dtype):
    """The base weight as a dense (out, in) matrix in `dtype`: a 16-bit tensor as it is (it must already be in
    the compute dtype: a silent cast would copy every weight on every call), a 4-bit container dequantized into a
    temporary."""
    if isinstance(weight, torch.Tensor):
        if weight.dtype != dtype:
            raise ValueError(f"weight dtype {weight.dtype} differs from the input dtype {dtype}: load the model "
                             f"in the dtype you compute in")
        return weight
    return weight.dequantize(dtype)


def is_plain(module) -> bool:
    """A frozen 16-bit nn.Linear without adapters: run as itself (the fused path would do the same GEMM)."""
    return type(module) is nn.Linear


def spec(module):
    """(weight, bias, A, B, scale, dropout) of a projection module; A = B = None without an adapter."""
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None:
        return module.weight, module.bias, None, None, 0.0, 0.0
    return module.weight, module.bias, lora_a.weight, module.lora_B.weight, module.scaling, module.dropout


def _backend_of(modules, x):
    choices = {getattr(m, "backend", None) for m in modules} - {None}
    if len(choices) > 1:
        raise ValueError(f"modules sharing one input ask for different backends: {sorted(choices)}")
    return pick_backend(choices.pop() if choices else None, x)


# ---------------------------------------------------------------------------------------------------------------
# References (the spec)
# ---------------------------------------------------------------------------------------------------------------

def lora_linear_ref(x, weight, bias=None, A=None, B=None, scale=1.0, x_lora=None):
    """y = x W^T + b + s (x_lora A^T) B^T with x_lora = x unless given (dropout(x)); plain autograd."""
    W = dense(weight, x.dtype)
    y = F.linear(x, W, bias)
    if A is None:
        return y
    xl = x if x_lora is None else x_lora
    return y + scale * F.linear(F.linear(xl, A.to(x.dtype)), B.to(x.dtype))


def _approximate(act):
    """gelu_pytorch_tanh / gelu_new / gelu_fast are the tanh approximation; "gelu" is the exact erf."""
    return "none" if act == "gelu" else "tanh"


def _act(act, g, u, backend=None):
    """The gated activation as an autograd op (its own Triton function, or the ref)."""
    if act == "silu":
        return swiglu(g, u, backend=backend)
    return geglu(g, u, approximate=_approximate(act), backend=backend)


def lora_mlp_ref(x, gate, up, down, act):
    """down(act(gate(x), up(x))) with each of gate/up/down a (weight, bias, A, B, scale) tuple."""
    g = lora_linear_ref(x, *gate)
    u = lora_linear_ref(x, *up)
    return lora_linear_ref(_act(act, g, u, "ref"), *down)


# ---------------------------------------------------------------------------------------------------------------
# Fused autograd functions
# ---------------------------------------------------------------------------------------------------------------

def _stacks(ab, scales):
    """Whether the adapters of projections sharing one input run stacked: all present, one rank, one scale, one
    dtype. Then x A^T of all of them is one GEMM against the rows of their A's stacked (x read once, not once per
    projection), and in backward their dA's and their dx term are one GEMM each."""
    As = ab[0::2]
    return (len(As) > 1 and all(A is not None for A in As) and len({A.shape for A in As}) == 1
            and len({A.dtype for A in As}) == 1 and len(set(scales)) == 1)


def _cast_adapters(ab, dt, stack):
    """The adapters in the compute dtype (fp32 masters -> bf16), cast once per forward and saved that way (the
    backward then casts nothing). With `stack`, the A's are row blocks of one cast (n r, in) matrix, also
    returned (else None)."""
    if not stack:
        return [None if t is None else t.to(dt) for t in ab], None
    A_cat = torch.cat(ab[0::2]).to(dt)
    As = A_cat.split(ab[0].shape[0])
    return [t for A, B in zip(As, ab[1::2]) for t in (A, B.to(dt))], A_cat


def _products(x2, ab, A_cat):
    """The (tokens, r) products x A_i^T (None for a projection without an adapter); with A_cat, column blocks of
    one GEMM's output."""
    if A_cat is not None:
        return list((x2 @ A_cat.t()).split(ab[0].shape[0], dim=1))
    return [None if A is None else x2 @ A.t() for A in ab[0::2]]


def _forward_one(x2, weight, bias, xa, B, s):
    """(tokens, out) output x W^T + b + s xa B^T; a dequantized W is a temporary, freed on return."""
    W = dense(weight, x2.dtype)
    y = F.linear(x2, W, bias)
    return y if xa is None else y.addmm_(xa, B.t(), alpha=s)


def _adapter_grad(a, b, s, dtype):
    """s (a @ b) in the adapter parameter's dtype (fp32 masters). On CUDA with 16-bit operands and an fp32
    parameter, the GEMM writes fp32 directly (cuBLAS's out_dtype): no bf16 rounding of the gradient before it
    is widened, and one kernel instead of GEMM + scale + cast (s = 1, alpha = r, needs no scale at all);
    elsewhere the product is rounded to the operands' dtype first, as before."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and dtype == torch.float32:
        g = torch.mm(a, b, out_dtype=torch.float32)
    else:
        g = (a @ b).to(dtype)
    return g if s == 1.0 else g.mul_(s)


def _backward_shared(x2, dys, weights, ab, xas, scales, need_dx, need_ab, ab_dtypes, A_cat=None):
    """Gradients of projections sharing the input x2 (tokens, in), from their output gradients dys.

    dx = sum_i dy_i W_i + s_i (dy_i B_i) A_i,  dA_i = s_i (dy_i B_i)^T x,  dB_i = s_i dy_i^T (x A_i^T).
    ab: the adapters in the compute dtype; ab_dtypes: their parameters' dtypes, which the gradients take.
    A_cat (stacked adapters, _cast_adapters): the (dy_i B_i)^T are written as row blocks of one (n r, tokens)
    matrix D, so that sum_i s (dy_i B_i) A_i = s D^T A_cat and [dA_i] = s D x are one GEMM each.
    Returns (dx or None, [dA_0, dB_0, dA_1, ...])."""
    dt = x2.dtype
    dx = None
    grads = [None] * len(ab)
    for i, dy in enumerate(dys):
        if dy is not None and need_dx:
            W = dense(weights[i], dt)
            dx = dy @ W if dx is None else dx.addmm_(dy, W)
            del W  # a dequantized weight dies here, before the next one is made
    if A_cat is not None and all(dy is not None for dy in dys):
        r, s = ab[0].shape[0], scales[0]
        D = x2.new_empty(A_cat.shape[0], x2.shape[0])
        for i, dy in enumerate(dys):
            torch.mm(ab[2 * i + 1].t(), dy.t(), out=D[i * r:(i + 1) * r])  # (dy_i B_i)^T
        if need_dx:
            dx.addmm_(D.t(), A_cat, alpha=s)
        if any(need_ab[0::2]):
            dA = _adapter_grad(D, x2, s, ab_dtypes[0]).split(r)
            for i, g in enumerate(dA):
                grads[2 * i] = g if need_ab[2 * i] else None
        for i, dy in enumerate(dys):
            if need_ab[2 * i + 1]:
                grads[2 * i + 1] = _adapter_grad(dy.t(), xas[i], s, ab_dtypes[2 * i + 1])
        return dx, grads
    for i, dy in enumerate(dys):
        A, B, s = ab[2 * i], ab[2 * i + 1], scales[i]
        if dy is None or A is None:
            continue
        dyb = dy @ B  # (tokens, r)
        if need_dx:
            dx.addmm_(dyb, A, alpha=s)
        if need_ab[2 * i]:
            grads[2 * i] = _adapter_grad(dyb.t(), x2, s, ab_dtypes[2 * i])
        if need_ab[2 * i + 1]:
            grads[2 * i + 1] = _adapter_grad(dy.t(), xas[i], s, ab_dtypes[2 * i + 1])
    return dx, grads


class LoRALinearsFunction(torch.autograd.Function):
    """y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T for n projections sharing x (n = 1: one linear; n = 3: q/k/v).

    apply(x, weights, biases, scales, need_output, A_0, B_0, A_1, B_1, ...): weights/biases/scales are tuples
    (frozen, not differentiated); A_i = B_i = None for a projection without an adapter. need_output=False
    (checkpoint recomputation, as in LoRAMLPFunction): only the graph is wanted, the base GEMMs are skipped and
    the outputs are uninitialised; the (tokens x r) products x A^T that the backward needs are still computed."""

    @staticmethod
    def forward(ctx, x, weights, biases, scales, need_output, *ab):
        ctx.set_materialize_grads(False)  # an unused output (e.g. no loss through v) sends None: skip it
        x2 = x.reshape(-1, x.shape[-1])
        ctx.ab_dtypes = [None if t is None else t.dtype for t in ab]
        ab, A_cat = _cast_adapters(ab, x2.dtype, _stacks(ab, scales))
        xas = _products(x2, ab, A_cat)  # the backward needs these even when the outputs are not computed
        outs = []
        for i, (w, b, s) in enumerate(zip(weights, biases, scales)):
            if need_output:
                y = _forward_one(x2, w, b, xas[i], ab[2 * i + 1], s)
                outs.append(y.view(*x.shape[:-1], y.shape[-1]))
            else:
                outs.append(x2.new_empty(1).expand(*x.shape[:-1], w.shape[0]))
        ctx.weights, ctx.scales, ctx.x_shape = weights, scales, x.shape
        ctx.save_for_backward(x2, A_cat, *ab, *xas)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        n = len(ctx.weights)
        x2, A_cat, *rest = ctx.saved_tensors
        ab, xas = rest[:2 * n], rest[2 * n:]
        dys = [None if dy is None else dy.reshape(-1, dy.shape[-1]) for dy in dys]
        dx, grads = _backward_shared(x2, dys, ctx.weights, ab, xas, ctx.scales, ctx.needs_input_grad[0],
                                     ctx.needs_input_grad[5:], ctx.ab_dtypes, A_cat)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return (dx, None, None, None, None, *grads)


def _act_fwd(act, g, u, fold=None):
    return swiglu_fwd(g, u, fold=fold) if act == "silu" else geglu_fwd(g, u, _approximate(act), fold=fold)


def _act_bwd_inplace(act, dh, g, u, fold=None, dy_fold=None):
    """(dg, du, h) written over (g, u, dh): one pass, no new (tokens x intermediate) buffer."""
    if act == "silu":
        return swiglu_bwd(dh, g, u, inplace=True, fold=fold, dy_fold=dy_fold)
    return geglu_bwd(dh, g, u, _approximate(act), inplace=True, fold=fold, dy_fold=dy_fold)


def _foldable(x2):
    """Whether adapter terms can go into the activation kernels (kernels/swiglu.py fold_args) instead of GEMM
    passes over (tokens x intermediate) tensors: the kernels' dtypes."""
    return x2.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _gate_up_fold(x2, ab):
    """Whether gate's and up's adapter terms s (x A^T) B^T are folded into the activation kernels instead of a GEMM
    pass adding each to its (tokens x intermediate) output: the kernels' dtypes and one shared rank."""
    ranks = {A.shape[0] for A in (ab[0], ab[2]) if A is not None}
    return _foldable(x2) and len(ranks) == 1


def _fold(ab, xa_g, xa_u, scales):
    """The activation kernels' fold tuple (xa_g, B_g^T, s_g, xa_u, B_u^T, s_u), None for a side without adapter."""
    bt = [None if B is None else B.t() for B in (ab[1], ab[3])]
    return xa_g, bt[0], scales[0], xa_u, bt[1], scales[1]


def _mlp_backward(x2, g, u, dy2, ab, A_cat, xa_g, xa_u, ha_d, weights, scales, act, folded, need, ab_dtypes):
    """The MLP's gradients for a block of rows: (dx, [dA_g, dB_g, dA_u, dB_u, dA_d, dB_d]). g and u (the saved
    gate / up outputs) are consumed: dg, du and h are written over them and dh."""
    A_d, B_d, s_d = ab[4], ab[5], scales[2]
    # down: dh = dy W_d + s_d (dy B_d) A_d, the second term added inside the activation's backward (dy_fold) where
    # the kernels take the dtype, else by a GEMM pass over dh
    W = dense(weights[2], dy2.dtype)
    dh = dy2 @ W
    del W
    dy_fold = None
    if A_d is not None:
        dyb = dy2 @ B_d
        if _foldable(dh):
            dy_fold = (dyb, A_d, s_d)
        else:
            dh.addmm_(dyb, A_d, alpha=s_d)
    # the activation's backward, with h (down's input, needed by its adapter) from the same pass
    fold = _fold(ab, xa_g, xa_u, scales) if folded else None
    dg, du, h = _act_bwd_inplace(act, dh, g, u, fold, dy_fold)
    del g, u, dh
    dA_d = dB_d = None
    if A_d is not None:
        # dA_d = s_d (dy B_d)^T h ;  dB_d = s_d dy^T (h A_d^T)
        if need[4]:
            dA_d = _adapter_grad(dyb.t(), h, s_d, ab_dtypes[4])
        if need[5]:
            if ha_d is None:
                ha_d = h @ A_d.t()
            dB_d = _adapter_grad(dy2.t(), ha_d, s_d, ab_dtypes[5])
    del h
    dx, grads = _backward_shared(x2, [dg, du], weights[:2], ab[:4], [xa_g, xa_u], scales[:2], need[6], need[:4],
                                 ab_dtypes[:4], A_cat)
    return dx, grads + [dA_d, dB_d]


def _gate_up(x2, weights, biases, ab, xa_g, xa_u, scales, folded):
    """g and u of rows x2: the base outputs when the adapter terms are folded into the activation kernels."""
    if folded:
        return (_forward_one(x2, weights[0], biases[0], None, None, 0.0),
                _forward_one(x2, weights[1], biases[1], None, None, 0.0))
    return (_forward_one(x2, weights[0], biases[0], xa_g, ab[1], scales[0]),
            _forward_one(x2, weights[1], biases[1], xa_u, ab[3], scales[1]))


class LoRAMLPFunction(torch.autograd.Function):
    """y = down(act(gate(x), up(x))), each projection with an optional adapter; see the module docstring.

    apply(x, weights(3), biases(3), scales(3), act, need_output, rows, A_g, B_g, A_u, B_u, A_d, B_d).

    need_output=False is for checkpoint recomputation, where the layer is run again only to rebuild its
    autograd graph and y's value is never read (its gradient arrives from outside, at once): the forward then
    computes nothing but the (tokens x r) products x A^T and returns y uninitialised; the backward runs gate's
    and up's GEMMs itself, `rows` tokens at a time, each block's gradients taken before the next block's g and
    u exist. The (tokens x intermediate) tensors g, u, dh then never exceed `rows` tokens however long the
    sequence (at Llama-3.1-8B's MLP, 86 kB per token: 5.3 GiB at 64k tokens, 0.66 GiB as 8192-token blocks), for
    the same GEMMs as the unchunked backward, and the gate / up / down weights of a 4-bit base are dequantized
    once for all blocks. The adapters' gradients are the sums of the blocks' (in fp32 for fp32 masters); x's
    rows are independent, so dx is the same.

    The backward consumes its saved g and u in place (dg, du and h are written over g, u and dh), so it can run
    only once: retain_graph=True through this function raises; the "ref" backend has no such limit."""

    @staticmethod
    def forward(ctx, x, weights, biases, scales, act, need_output, rows, *ab):
        x2 = x.reshape(-1, x.shape[-1])
        dt = x2.dtype
        ctx.ab_dtypes = [None if t is None else t.dtype for t in ab]
        gu, A_cat = _cast_adapters(ab[:4], dt, _stacks(ab[:4], scales[:2]))
        ab = gu + _cast_adapters(ab[4:], dt, False)[0]
        xa_g, xa_u = _products(x2, gu, A_cat)
        ctx.folded = _gate_up_fold(x2, ab)  # g and u stay the base outputs; the kernels add the adapter terms
        ctx.weights, ctx.biases, ctx.scales, ctx.act, ctx.x_shape = weights, biases, scales, act, x.shape
        ctx.rows, ctx.consumed = rows, False
        if need_output:
            g, u = _gate_up(x2, weights, biases, ab, xa_g, xa_u, scales, ctx.folded)
            fold = _fold(ab, xa_g, xa_u, scales) if ctx.folded else None
            h = _act_fwd(act, g, u, fold)
            ha_d = _products(h, ab[4:], None)[0]
            y = _forward_one(h, weights[2], biases[2], ha_d, ab[5], scales[2])
            del h  # recomputed in backward from g and u
            ctx.save_for_backward(x2, g, u, A_cat, *ab, xa_g, xa_u, ha_d)
            return y.view(*x.shape[:-1], y.shape[-1])
        ctx.save_for_backward(x2, None, None, A_cat, *ab, xa_g, xa_u, None)
        # one element broadcast to y's shape: no (tokens x hidden) allocation for a value nobody reads
        return x2.new_empty(1).expand(*x.shape[:-1], weights[2].shape[0])

    @staticmethod
    def backward(ctx, dy):
        if ctx.consumed:
            raise RuntimeError("the fused LoRA MLP's backward ran twice: it overwrites its saved activations, so "
                               "retain_graph=True is not supported through it (use backend='ref')")
        ctx.consumed = True
        x2, g, u, A_cat, *rest = ctx.saved_tensors
        ab, (xa_g, xa_u, ha_d) = rest[:6], rest[6:]
        need = ctx.needs_input_grad[7:] + ctx.needs_input_grad[:1]  # A_g B_g A_u B_u A_d B_d, then x
        dy2 = dy.reshape(-1, dy.shape[-1])
        shared = (ctx.scales, ctx.act, ctx.folded, need, ctx.ab_dtypes)
        if g is not None:  # saved by a forward with output
            dx, grads = _mlp_backward(x2, g, u, dy2, ab, A_cat, xa_g, xa_u, ha_d, ctx.weights, *shared)
        else:  # deferred (need_output=False): gate / up in blocks of rows (docstring)
            n, step = x2.shape[0], ctx.rows
            # dequantized once for all blocks (a 4-bit base); down's only when there are several blocks, else
            # it is made and freed around its one GEMM
            weights = (*[dense(w, dy2.dtype) for w in ctx.weights[:2]],
                       ctx.weights[2] if n <= step else dense(ctx.weights[2], dy2.dtype))
            dx = x2.new_empty(x2.shape) if need[6] and n > step else None
            grads = None
            for i in range(0, n, step):
                part = [None if t is None else t[i:i + step] for t in (x2, xa_g, xa_u, dy2)]
                g, u = _gate_up(part[0], weights, ctx.biases, ab, part[1], part[2], ctx.scales, ctx.folded)
                dxb, gb = _mlp_backward(part[0], g, u, part[3], ab, A_cat, *part[1:3], None, weights, *shared)
                del g, u
                if n <= step:
                    dx = dxb
                elif dx is not None:
                    dx[i:i + step] = dxb
                grads = gb if grads is None else [a if b is None else a.add_(b) for a, b in zip(grads, gb)]
            del weights
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return (dx, None, None, None, None, None, None, *grads)


# ---------------------------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------------------------

def _check(x, projections, widths=None):
    """widths: the input width of each projection (default: x's)."""
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating tensor, got {x.dtype}")
    for i, (weight, bias, A, B, scale) in enumerate(projections):
        width = x.shape[-1] if widths is None else widths[i]
        if (A is None) != (B is None):
            raise ValueError("A and B must both be given or both be None")
        frozen = [t for t in (weight, bias) if isinstance(t, torch.Tensor) and t.requires_grad]
        if frozen:
            raise ValueError("the fused LoRA path trains adapters only: a base weight or bias requires grad "
                             "(use backend='ref', or freeze it)")
        if A is not None and (A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[1] != width):
            raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} do not fit an input of width {width}")


def lora_linears(x, projections, backend=None, need_output=True):
    """Outputs of several projections of the same input; each projection is (weight, bias, A, B, scale).
    need_output=False: only the autograd graph is wanted (see LoRALinearsFunction); a hint the "ref" path
    ignores."""
    projections = [tuple(p) for p in projections]
    if pick_backend(backend, x) == "ref":
        return tuple(lora_linear_ref(x, *p) for p in projections)
    _check(x, projections)
    weights, biases, As, Bs, scales = zip(*projections)
    ab = [t for pair in zip(As, Bs) for t in pair]
    return LoRALinearsFunction.apply(x, weights, biases, tuple(float(s) for s in scales), need_output, *ab)


def lora_linear(x, weight, bias=None, A=None, B=None, scale=1.0, backend=None):
    """y = x W^T + b + s (x A^T) B^T (A = B = None: the frozen base alone, dequantized again in backward)."""
    return lora_linears(x, [(weight, bias, A, B, scale)], backend)[0]


def lora_mlp(x, gate, up, down, act="silu", backend=None, need_output=True, rows=MLP_ROWS):
    """down(act(gate(x), up(x))); gate/up/down are (weight, bias, A, B, scale); act: "silu" (SwiGLU), "gelu"
    (exact GeGLU) or a tanh-approximate gelu name (gelu_pytorch_tanh, gelu_new, gelu_fast).
    need_output=False: the caller uses the result only for its autograd graph, never its value (checkpoint
    recomputation); the fused path then skips down_proj's forward and returns uninitialised values.
    rows: the most tokens whose (tokens x intermediate) tensors exist at once where nothing is kept for a
    backward: a deferred backward (need_output=False, LoRAMLPFunction) and a forward without autograd (a
    checkpointed layer's first pass, generation's prefill), which runs `rows` tokens at a time."""
    projections = [tuple(gate), tuple(up), tuple(down)]
    if pick_backend(backend, x) == "ref":
        return lora_mlp_ref(x, *projections, act)
    inter = projections[0][0].shape[0]
    _check(x, projections, [x.shape[-1], x.shape[-1], inter])
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    weights, biases, As, Bs, scales = zip(*projections)
    ab = [t for pair in zip(As, Bs) for t in pair]
    scales = tuple(float(s) for s in scales)
    x2 = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() or x2.shape[0] <= rows:
        return LoRAMLPFunction.apply(x, weights, biases, scales, act, need_output, rows, *ab)
    # no autograd, more tokens than `rows`: block by block into one output, the weights dequantized once
    weights = tuple(dense(w, x.dtype) for w in weights)
    y = x2.new_empty(x2.shape[0], weights[2].shape[0])
    for i in range(0, x2.shape[0], rows):
        y[i:i + rows] = LoRAMLPFunction.apply(x2[i:i + rows], weights, biases, scales, act, True, rows, *ab)
    return y.view(*x.shape[:-1], y.shape[-1])


# ---------------------------------------------------------------------------------------------------------------
# Module dispatch: what the decoder calls
# ---------------------------------------------------------------------------------------------------------------

def _dropped(m, x):
    """A projection whose adapter has dropout: base through the fused function, adapter under plain autograd."""
    weight, bias, A, B, scale, p = spec(m)
    backend = _backend_of([m], x)
    xl = F.dropout(x, p, m.training)
    if backend == "ref":
        return lora_linear_ref(x, weight, bias, A, B, scale, x_lora=xl)
    return lora_linear(x, weight, bias, backend=backend) + scale * F.linear(F.linear(xl, A.to(x.dtype)),
                                                                          B.to(x.dtype))


def has_dropout(m):
    """Module m is a projection whose adapter draws a dropout mask in this mode (training, p > 0)."""
    return getattr(m, "lora_A", None) is not None and m.dropout > 0 and m.training


def _decoding(x, mods):
    """Batch-1 decoding of 4-bit projections: one row, no autograd, NF4 bases. These take the fused GEMV
    (quant/gemv.py: the weight read once at 4 bits, never dequantized whole) instead of the fused functions."""
    return (x.numel() == x.shape[-1] and not torch.is_grad_enabled()
            and all(isinstance(m.weight, NF4Weight) and not has_dropout(m) for m in mods))


def _decode_one(m, x):
    """One 4-bit projection of a single row: GEMV for the base, the adapter (if any) added as in training."""
    weight, bias, A, B, scale, _ = spec(m)
    y = linear_nf4(x, weight, bias)
    if A is None:
        return y
    return y.add_(F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype)), alpha=scale)


def linear(module, x, need_output=True):
    """One projection module applied to x (the forward of engine.lora.LoRALinear); need_output=False: see
    lora_linears (only the fused path uses the hint)."""
    if is_plain(module):
        return module(x)
    if has_dropout(module):
        return _dropped(module, x)
    if _decoding(x, [module]):
        return _decode_one(module, x)
    return lora_linears(x, [spec(module)[:5]], _backend_of([module], x), need_output)[0]


def qkv(attn, x, need_output=True):
    """q, k and v of one input; need_output=False: see lora_linears (only the fused path uses the hint)."""
    mods = (attn.q_proj, attn.k_proj, attn.v_proj)
    if all(is_plain(m) for m in mods):
        return tuple(m(x) for m in mods)
    if any(has_dropout(m) for m in mods):
        return tuple(linear(m, x) for m in mods)
    if _decoding(x, mods):
        return tuple(_decode_one(m, x) for m in mods)
    return lora_linears(x, [spec(m)[:5] for m in mods], _backend_of(mods, x), need_output)


def mlp(module, x, need_output=True):
    """The MLP of a decoder layer; need_output=False: see lora_mlp (only the fused path uses the hint)."""
    mods = (module.gate_proj, module.up_proj, module.down_proj)
    if all(is_plain(m) for m in mods):
        return module.down_proj(_act(module.act, module.gate_proj(x), module.up_proj(x)))
    if any(has_dropout(m) for m in mods):
        h = _act(module.act, linear(mods[0], x), linear(mods[1], x), _backend_of(mods, x))
        return linear(mods[2], h)
    if _decoding(x, mods):
        h = _act(module.act, _decode_one(mods[0], x), _decode_one(mods[1], x), _backend_of(mods, x))
        return _decode_one(mods[2], h)
    return lora_mlp(x, *[spec(m)[:5] for m in mods], act=module.act, backend=_backend_of(mods, x),
                    need_output=need_output, rows=getattr(module, "rows", MLP_ROWS))

