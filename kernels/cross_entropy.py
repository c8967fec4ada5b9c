"""Fused linear + cross-entropy: the loss from hidden states and the lm_head weight without the full logits.

For N target positions with hidden states h (N, H), lm_head weight W (V, H) and labels y (N,):

    x = h @ W^T                                   (N, V) raw logits
    z = cap * tanh(x / cap)    (or z = x)         Gemma 2 final-logit softcapping
    loss_i = logsumexp(z_i) - z_i[y_i]            0 where y_i == ignore_index
    loss_sum = sum_i loss_i,  n_target_tokens = #{i : y_i != ignore_index}

Gradients, all computed in the forward pass (the backward only scales them by d out / d loss_sum):

    d loss_i / d z_ij = softmax(z_i)_j - [j == y_i]                   (0 for an ignored row)
    d z_ij / d x_ij   = 1 - tanh^2(x_ij / cap)                        (1 without softcap)
    g = d loss_sum / d x    (N, V),  computed a chunk of rows at a time
    d loss_sum / d h = g @ W          d loss_sum / d W = g^T @ h

The full (N, V) logits never exist: rows are processed in chunks of `chunk_size` tokens. For each chunk,
cuBLAS computes the logits in the input dtype (fp32 accumulation, rounded once, exactly as the reference's
`hidden @ weight.t()`), one Triton program per row turns them in place into g (two passes over the row:
an online log-sum-exp, then softmax - onehot), and two more GEMMs fold g into d h and d W. The chunk's logit
buffer is reused. In low precision d W is accumulated over the chunks in fp32 and rounded once, after the
backward's scaling, to the weight's dtype: the reference's one rounding. (Accumulating in bf16 with `addmm_`
added one rounding per chunk: on the H200 at 8192 x 4096 x 128256 with softcap 30 the max error of d W reached
1.99x the bf16 reference's, and 2.08x in tests/kernels/test_cross_entropy.py's 3-chunk case, run of 2026-11-28:
past the project's 2x.) The fp32 accumulator lives in DW_SLABS vocab slabs so that the backward can round and
free them one at a time: extra memory 4 V H bytes at the peak (+ a chunk's logits), 2 GiB for Llama-3.1-8B's
head, instead of the 6 V H bytes an fp32 d W plus its bf16 copy would need at once. A frozen head (LoRA)
computes no d W at all.

Why tokens and not vocab: a vocab chunk needs the row's full log-sum-exp before any gradient can be written, so
it either recomputes the logits GEMM (4 GEMMs instead of 3) or keeps per-chunk statistics and a second pass over
stored logits. Token chunks bound the memory just as well with 3 GEMMs and no recomputation, so hare does not
chunk the vocab.

Why no host synchronization: `loss_sum` and `n_target_tokens` stay on the device as tensors, so the trainer can
normalize over gradient-accumulation micro-batches without a `.item()`. For the same reason labels outside
[0, V) (other than ignore_index) are not checked on the host: their row's loss is NaN, which the trainer sees.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import interpreting, pick_backend
from ._triton import cast


def linear_cross_entropy_ref(hidden, weight, labels, ignore_index=-100, softcap=None):
    """Returns (summed loss over target tokens, number of target tokens). The logits are computed in the input
    dtype and the loss in fp32 (fp64 when the inputs are fp64, so that the test oracle is truly fp64)."""
    logits = hidden @ weight.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    labels = labels.reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()


@triton.jit
def _tanh(y):
    """tanh in fp32 from exp alone (libdevice is not available under the interpreter).

    |y| < 0.55: the odd Taylor series y * (1 + sum_k c_k y^2k) through y^17, with c_k = 2^2n (2^2n - 1) B_2n / (2n)!
    (Abramowitz & Stegun 4.5.64); its truncation error there is < 5e-9 relative (checked against math.tanh).
    |y| >= 0.55: 1 - 2 / (exp(2|y|) + 1); there tanh >= 0.5 and the rounding of exp moves it by < 2 ulp. For
    |y| > 44 exp overflows to inf and the formula gives exactly 1, never NaN.
    """
    a = tl.abs(y)
    y2 = y * y
    p = 6404582.0 / 10854718875.0
    p = p * y2 - 929569.0 / 638512875.0
    p = p * y2 + 21844.0 / 6081075.0
    p = p * y2 - 1382.0 / 155925.0
    p = p * y2 + 62.0 / 2835.0
    p = p * y2 - 17.0 / 315.0
    p = p * y2 + 2.0 / 15.0
    p = p * y2 - 1.0 / 3.0
    small = y + y * (y2 * p)
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    big = tl.where(y < 0, -big, big)
    return tl.where(a < 0.55, small, big)


@triton.jit
def _ce_rows_kernel(
    logits_ptr,     # (rows, V) raw logits x of this chunk, in the input dtype; overwritten with g = d loss / d x
    stride_row,     # elements between consecutive rows of logits_ptr (the last dim is contiguous)
    labels_ptr,     # (rows,) integer labels of this chunk
    loss_ptr,       # (rows,) fp32 per-row loss out
    V,              # vocab size (row length)
    ignore_index,
    softcap,        # the cap (fp32); read only when HAS_SOFTCAP
    HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,   # False when no gradient is wanted: only the loss is computed, logits untouched
    BLOCK_V: tl.constexpr,
    INTERPRET: tl.constexpr,    # launched on the interpreter: casts to bf16 round by hand (_triton.cast)
):
    row = tl.program_id(0)
    ptr = logits_ptr + row.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + row)   # kept in its own width: a huge int64 must not wrap into [0, V)
    cols = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        # Ignored row: zero loss and zero gradient (the buffer holds logits, so the zeros must be written).
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                tl.store(ptr + offs, tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty), mask=offs < V)
    else:
        # Pass 1, online log-sum-exp over vocab blocks: with m the running max and s = sum exp(z - m),
        # a new block b gives m' = max(m, max b), s' = s * exp(m - m') + sum exp(b - m'); lse = m + log s.
        m = tl.full([], -float("inf"), tl.float32)
        s = tl.full([], 0.0, tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            z = tl.load(ptr + offs, mask=offs < V, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            z = tl.where(offs < V, z, -float("inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))   # finite: every block holds at least one real column
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)

        # loss = lse - z[label]; a label outside [0, V) gives NaN instead of reading out of bounds.
        in_range = (label >= 0) & (label < V)
        z_label = tl.load(ptr + tl.where(in_range, label, 0)).to(tl.float32)
        if HAS_SOFTCAP:
            z_label = softcap * _tanh(z_label / softcap)
        tl.store(loss_ptr + row, tl.where(in_range, lse - z_label, float("nan")))

        if WRITE_GRAD:
            # Pass 2: g = (softmax(z) - onehot(label)) * dz/dx, with softmax(z) = exp(z - lse) and, under the
            # softcap, dz/dx = 1 - tanh^2(x / cap). Written over x in place, rounded to the input dtype.
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                x = tl.load(ptr + offs, mask=offs < V, other=0.0).to(tl.float32)
                onehot = tl.where(offs == label, 1.0, 0.0)
                if HAS_SOFTCAP:
                    t = _tanh(x / softcap)
                    g = (tl.exp(softcap * t - lse) - onehot) * (1.0 - t * t)
                else:
                    g = tl.exp(x - lse) - onehot
                tl.store(ptr + offs, cast(g, logits_ptr.dtype.element_ty, INTERPRET), mask=offs < V)


# Vocab block per loop step and warps of the row kernel; one program streams one row twice and writes it once.
# Measured on an H200 (tools/bench_cross_entropy.py --sweep, 2048 x 128256 bf16, copy 3818 GB/s read + write):
# BLOCK_V 4096 with 8 warps was the best of {1024..16384} x {4, 8, 16}: 0.435 ms, 95% of copy bandwidth
# (2048/4: 93%, 8192/8: 89%, 1024/16: 42%). With softcap it was also the best, 0.87 ms (47%): the two tanh per
# element (one per pass) make that variant compute-bound, about 4% of the whole op at 16384 tokens.
_BLOCK_V = 4096
_NUM_WARPS = 8


def _ce_rows(logits, labels, losses, ignore_index, softcap, write_grad, block_v=None, num_warps=None):
    """Per-row loss into `losses` and, when write_grad, g = d loss / d logits over `logits` in place."""
    rows, V = logits.shape
    if rows == 0:
        return
    block_v = block_v or min(_BLOCK_V, triton.next_power_of_2(V))
    num_warps = num_warps or _NUM_WARPS
    _ce_rows_kernel[(rows,)](
        logits, logits.stride(0), labels, losses, V, ignore_index,
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, WRITE_GRAD=write_grad, BLOCK_V=block_v,
        INTERPRET=interpreting(logits), num_warps=num_warps,
    )


def default_chunk_size(n_rows):
    """Rows per chunk. A chunk's logits take chunk_size * V elements of the input dtype; we keep that at most
    1/8 of the full N x V logits (the unfused path holds those logits several times over in fp32, so the fused
    op stays far below 1/8 of its extra memory) and at most 2048 rows (so that the buffer, 0.5 GiB at V = 128256
    in bf16, does not grow with the sequence: at 1/8 of 64k tokens it would be 2 GiB), but take at least 1024
    rows so that each GEMM is big enough to run at full speed.
    Measured on an H200 at N = 16384, H = 4096, V = 128256, bf16, trainable head (bench --sweep), chunk:
    fwd+bwd ms / extra peak GiB = 512: 90.9 / 1.23, 1024: 83.9 / 1.35, 2048: 84.5 / 1.59, 4096: 80.8 / 2.08;
    below 1024 rows the GEMMs slow down, above it the gain is within a few percent and the memory grows."""
    return max(1, min(n_rows, 2048, max(1024, -(-n_rows // 8))))


# fp32 d W accumulator slabs (vocab rows split in this many parts; see the module docstring)
DW_SLABS = 8


def _dw_accumulate(slabs, g, h):
    """slabs[k] += g[:, rows of slab k]^T h, accumulated in the slabs' dtype (fp32 for low-precision inputs:
    cuBLAS's out_dtype GEMM on CUDA takes the bf16 operands and adds into fp32 without an intermediate
    rounding; elsewhere the operands are widened first, which computes the same products exactly)."""
    start = 0
    for slab in slabs:
        g_k = g[:, start:start + slab.shape[0]].t()
        start += slab.shape[0]
        if slab.dtype == g.dtype:
            slab.addmm_(g_k, h)
        elif g.is_cuda:
            torch.addmm(slab, g_k, h, out_dtype=slab.dtype, out=slab)
        else:
            slab.addmm_(g_k.to(slab.dtype), h.to(slab.dtype))


def linear_cross_entropy_fwd(hidden, weight, labels, ignore_index, softcap, need_dh, need_dw,
                             chunk_size=None, block_v=None):
    """Loss, token count and the gradients of loss_sum w.r.t. hidden (if need_dh) and weight (if need_dw); d W
    as a list of row slabs in the accumulation dtype (`_dw_slabs_to_grad` finishes it)."""
    N, H = hidden.shape
    V = weight.shape[0]
    need_grad = need_dh or need_dw
    chunk = chunk_size or default_chunk_size(N)
    losses = torch.empty(N, device=hidden.device, dtype=torch.float32)
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dh else None
    dw = None
    if need_dw:
        acc = torch.promote_types(weight.dtype, torch.float32)
        rows = -(-V // DW_SLABS) if acc != weight.dtype else V
        dw = [torch.zeros(min(rows, V - a), H, device=weight.device, dtype=acc) for a in range(0, V, rows)]
    buf = torch.empty(min(chunk, N), V, device=hidden.device, dtype=hidden.dtype)
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        h_c = hidden[start:end]
        g = buf[: end - start]
        torch.mm(h_c, weight.t(), out=g)                          # x = h W^T, raw logits of the chunk
        _ce_rows(g, labels[start:end], losses[start:end], ignore_index, softcap, need_grad, block_v)
        if need_dh:
            torch.mm(g, weight, out=dh[start:end])                # d h = g W
        if need_dw:
            _dw_accumulate(dw, g, h_c)                            # d W = sum over chunks of g^T h
    return losses.sum(), (labels != ignore_index).sum(), dh, dw


def _dw_slabs_to_grad(slabs, scale, dtype):
    """scale * d W in `dtype`, one rounding; each slab is freed as soon as it is rounded (the list is emptied)."""
    parts = []
    while slabs:
        parts.append(slabs.pop(0).mul_(scale).to(dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Glue: the forward computes the loss and both gradients; the backward applies the chain rule
    d out / d h = (d out / d loss_sum) * (d loss_sum / d h), the first factor being the scalar grad_loss."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, softcap, chunk_size, block_v):
        loss, count, dh, dw = linear_cross_entropy_fwd(
            hidden, weight, labels, ignore_index, softcap, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            chunk_size, block_v)
        # d hidden is saved (not kept as an attribute) so that autograd's version check turns a second backward
        # through a retained graph into an error: the first backward scales it in place. The d W slabs are
        # consumed by the first backward (the list is emptied), which the backward checks.
        ctx.save_for_backward(dh)
        ctx.dw, ctx.w_dtype = dw, weight.dtype
        ctx.mark_non_differentiable(count)
        return loss, count

    @staticmethod
    def backward(ctx, grad_loss, grad_count):
        dh, = ctx.saved_tensors
        if dh is not None:
            dh.mul_(grad_loss)  # in place: in low precision this adds one rounding, as the reference's backward
        dw = None
        if ctx.dw is not None:
            if not ctx.dw:
                raise RuntimeError("linear_cross_entropy: the weight gradient was consumed by an earlier backward; "
                                   "a second backward through this graph is not supported")
            dw = _dw_slabs_to_grad(ctx.dw, grad_loss, ctx.w_dtype)
        return dh, dw, None, None, None, None, None


def _check(hidden, weight, labels, softcap):
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., H) and weight (V, H) required, got hidden {tuple(hidden.shape)} and "
                         f"weight {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError(f"hidden, weight and labels must be on one device, got {hidden.device}, "
                         f"{weight.device}, {labels.device}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.numel() != hidden.numel() // hidden.shape[-1]:
        raise ValueError(f"labels must hold one label per hidden row, got {labels.numel()} labels for hidden "
                         f"{tuple(hidden.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap!r}")


def fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, softcap=None, chunk_size=None,
                               block_v=None):
    """The Triton path of `linear_cross_entropy`, with its tuning knobs exposed for tests and benchmarks."""
    _check(hidden, weight, labels, softcap)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if block_v is not None and (block_v < 16 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    if hidden2.stride(-1) != 1:
        hidden2 = hidden2.contiguous()
    labels = labels.reshape(-1).contiguous()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropyFunction.apply(hidden2, weight, labels, ignore_index, softcap, chunk_size, block_v)
    # No autograd: the loss alone (inside Function.apply, needs_input_grad follows requires_grad even under
    # torch.no_grad, which would compute unwanted gradients: 2-3x the time of an evaluation loss).
    loss, count, _, _ = linear_cross_entropy_fwd(hidden2, weight, labels, ignore_index, softcap, False, False,
                                                 chunk_size, block_v)
    return loss, count


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, softcap=None, backend=None):
    """(loss_sum fp32, n_target_tokens int64), both 0-dim device tensors. hidden (N, H) already shifted,
    weight (V, H), labels (N,). Differentiable w.r.t. hidden and weight (whichever require grad)."""
    if pick_backend(backend, hidden) == "ref":
        return linear_cross_entropy_ref(hidden, weight, labels, ignore_index, softcap)
    return fused_linear_cross_entropy(hidden, weight, labels, ignore_index, softcap)
