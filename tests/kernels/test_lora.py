"""Fused LoRA autograd functions (kernels/lora.py) vs their references: outputs and every gradient, against the
reference in fp64 with the tolerance derived from the reference run in the same dtype (tests/tolerance.py)."""
import gc
import weakref

import pytest
import torch

from hare.kernels import lora
from tests.tolerance import assert_close_to_ref

# interpreter noise: it converts 1-element arrays to loop bounds with int()
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

IN, R = 37, 5
# the Triton paths run on the GPU when there is one, through the interpreter (CPU tensors) otherwise
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _proj(out, inp=IN, r=R, bias=False, adapter=True, seed=0, scale=1.7):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64) / inp ** 0.5
    b = torch.randn(out, generator=g, dtype=torch.float64) if bias else None
    if not adapter:
        return [W, b, None, None, 0.0]
    A = torch.randn(r, inp, generator=g, dtype=torch.float64) / inp ** 0.5
    B = torch.randn(out, r, generator=g, dtype=torch.float64) / r ** 0.5  # nonzero: gradients of A are tested
    return [W, b, A, B, scale]


def _cast(projections, dtype, adapter_dtype=None):
    """Base weights in the compute dtype; adapters in adapter_dtype (fp32 masters) and trainable."""
    out = []
    for W, b, A, B, s in projections:
        cast = [W.to(DEVICE, dtype), None if b is None else b.to(DEVICE, dtype)]
        for t in (A, B):
            cast.append(None if t is None else
                        t.detach().to(DEVICE, adapter_dtype or dtype).clone().requires_grad_(True))
        out.append(cast + [s])
    return out


def _leaves(x, projections):
    return [x] + [t for p in projections for t in (p[2], p[3]) if t is not None]


def _run(fn, x, projections, dys, dtype, adapter_dtype=None):
    xs = x.detach().to(DEVICE, dtype).clone().requires_grad_(True)
    ps = _cast(projections, dtype, adapter_dtype)
    outs = fn(xs, ps)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [dy.to(DEVICE, o.dtype) for dy, o in zip(dys, outs)])
    return list(outs), [t.grad for t in _leaves(xs, ps)]


def _compare(fn_fused, fn_ref, x, projections, out_dims, dtype, adapter_dtype=None, outputs=True):
    """outputs=False: the fused function's outputs are not values (need_output=False), only its gradients count."""
    g = torch.Generator().manual_seed(9)
    dys = [torch.randn(*x.shape[:-1], d, generator=g, dtype=torch.float64) for d in out_dims]
    got_o, got_g = _run(fn_fused, x, projections, dys, dtype, adapter_dtype)
    ref_o, ref_g = _run(fn_ref, x, projections, dys, torch.float64)
    ctl_o, ctl_g = _run(fn_ref, x, projections, dys, dtype, adapter_dtype)
    for i, (a, b, c) in enumerate(zip(got_o, ref_o, ctl_o)):
        if outputs:
            assert_close_to_ref(a, b, c, f"output {i}")
    names = ["dx"] + [f"d{n}{i}" for i, p in enumerate(projections) for n, t in (("A", p[2]), ("B", p[3]))
                      if t is not None]
    assert len(got_g) == len(names)
    for n, a, b, c in zip(names, got_g, ref_g, ctl_g):
        assert a is not None, f"{n}: no gradient"
        assert a.dtype == c.dtype, f"{n}: gradient dtype {a.dtype}, expected {c.dtype}"
        assert_close_to_ref(a, b, c, n)


DTYPES = [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
def test_qkv_shared_input_matches_ref(dtype, adapter_dtype):
    # q with bias and adapter, k without adapter, v with adapter: the mix q/k/v can have
    projections = [_proj(41, bias=True, seed=1), _proj(23, adapter=False, seed=2), _proj(23, seed=3, scale=0.5)]
    x = torch.randn(3, 7, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _compare(lambda x, p: lora.lora_linears(x, p, backend="triton"),
             lambda x, p: lora.lora_linears(x, p, backend="ref"), x, projections, [41, 23, 23], dtype, adapter_dtype)


@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
def test_qkv_stacked_adapters_match_ref(dtype, adapter_dtype):
    # every projection with an adapter of one rank and scale: x A^T, dA and the dx term run stacked (one GEMM each)
    projections = [_proj(41, bias=True, seed=11), _proj(23, seed=12), _proj(23, seed=13)]
    assert lora._stacks([t for p in projections for t in p[2:4]], [p[4] for p in projections])
    x = torch.randn(3, 7, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    _compare(lambda x, p: lora.lora_linears(x, p, backend="triton"),
             lambda x, p: lora.lora_linears(x, p, backend="ref"), x, projections, [41, 23, 23], dtype, adapter_dtype)


@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
def test_mlp_stacked_gate_up_match_ref(act, dtype, adapter_dtype):
    inter = 53
    projections = [_proj(inter, seed=15), _proj(inter, bias=True, seed=16), _proj(IN, inp=inter, seed=17)]
    assert lora._stacks([t for p in projections[:2] for t in p[2:4]], [p[4] for p in projections[:2]])
    x = torch.randn(2, 9, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(18))
    _compare(lambda x, p: lora.lora_mlp(x, *p, act=act, backend="triton"),
             lambda x, p: lora.lora_mlp(x, *p, act=act, backend="ref"), x, projections, [IN], dtype, adapter_dtype)


@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
def test_single_linear_matches_ref(dtype, adapter_dtype):
    projections = [_proj(19, seed=5)]
    x = torch.randn(11, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    _compare(lambda x, p: lora.lora_linear(x, *p[0], backend="triton"),
             lambda x, p: lora.lora_linear(x, *p[0], backend="ref"), x, projections, [19], dtype, adapter_dtype)


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", "gelu"])
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
def test_mlp_matches_ref(act, dtype, adapter_dtype):
    inter = 53
    # gate with adapter and bias, up without adapter, down with adapter
    projections = [_proj(inter, bias=True, seed=7), _proj(inter, adapter=False, seed=8),
                   _proj(IN, inp=inter, seed=9, scale=2.0)]
    x = torch.randn(2, 9, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    _compare(lambda x, p: lora.lora_mlp(x, *p, act=act, backend="triton"),
             lambda x, p: lora.lora_mlp(x, *p, act=act, backend="ref"), x, projections, [IN], dtype, adapter_dtype)


def test_unused_output_and_frozen_input():
    """Only q used in the loss, x not requiring grad: no dx, no gradient for v's adapter, q's correct."""
    projections = _cast([_proj(13, seed=1), _proj(13, seed=2)], torch.float64)
    x = torch.randn(4, IN, dtype=torch.float64, device=DEVICE)
    q, v = lora.lora_linears(x, projections, backend="triton")
    q.sum().backward()
    assert projections[1][2].grad is None and projections[1][3].grad is None
    ref = _cast([_proj(13, seed=1)], torch.float64)
    lora.lora_linear(x, *ref[0], backend="ref").sum().backward()
    assert torch.allclose(projections[0][2].grad, ref[0][2].grad, rtol=1e-12, atol=1e-12)


class CountingQuant:
    """A stand-in 4-bit container: dequantize() hands out fresh tensors and remembers them weakly."""

    def __init__(self, W):
        self.W, self.shape, self.alive, self.calls = W, W.shape, [], 0

    def dequantize(self, dtype):
        self.calls += 1
        w = self.W.to(dtype).clone()
        self.alive.append(weakref.ref(w))
        return w

    def live(self):
        gc.collect()
        return sum(r() is not None for r in self.alive)


def test_quantized_base_is_dequantized_again_and_never_kept():
    W, b, A, B, s = _cast([_proj(29, seed=3)], torch.float32)[0]
    q = CountingQuant(W)
    x = torch.randn(2, 5, IN, device=DEVICE, requires_grad=True)
    y = lora.lora_linear(x, q, b, A, B, s, backend="triton")
    assert q.calls == 1 and q.live() == 0, "a dequantized weight outlived the forward"
    y.square().sum().backward()
    assert q.calls == 2 and q.live() == 0, "backward must dequantize again, and drop it"
    # same gradients as the dense base
    A2, B2 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    lora.lora_linear(x2, W, b, A2, B2, s, backend="triton").square().sum().backward()
    for got, want in ((x.grad, x2.grad), (A.grad, A2.grad), (B.grad, B2.grad)):
        assert torch.equal(got, want)


def test_quantized_mlp_keeps_no_dequantized_weight():
    ps = _cast([_proj(17, seed=1), _proj(17, seed=2), _proj(IN, inp=17, seed=3)], torch.float32)
    qs = [CountingQuant(p[0]) for p in ps]
    x = torch.randn(6, IN, device=DEVICE, requires_grad=True)
    y = lora.lora_mlp(x, *[[q] + p[1:] for q, p in zip(qs, ps)], backend="triton")
    assert all(q.live() == 0 for q in qs)
    y.sum().backward()
    assert all(q.live() == 0 and q.calls == 2 for q in qs)


@pytest.mark.parametrize("rows", [64, 2])
def test_recomputed_quantized_mlp_defers_gate_up_to_its_backward(rows):
    """need_output=False (checkpoint recomputation, followed at once by the backward): the forward dequantizes
    nothing and keeps no weight; the backward dequantizes each weight once, also when it runs in blocks of `rows`
    tokens (6 tokens: one block, or three), and frees them all; gradients as with need_output=True (bit for bit
    in one block; blocks: test_mlp_in_row_blocks_matches_ref)."""
    ps = _cast([_proj(17, seed=1), _proj(17, seed=2), _proj(IN, inp=17, seed=3)], torch.float32)
    x = torch.randn(6, IN, device=DEVICE)
    dy = torch.randn(6, IN, device=DEVICE)
    grads = []
    for need_output in (True, False):
        qs = [CountingQuant(p[0]) for p in ps]
        ab = [t.detach().clone().requires_grad_() for p in ps for t in p[2:4]]
        specs = [[q, p[1], ab[2 * i], ab[2 * i + 1], p[4]] for i, (q, p) in enumerate(zip(qs, ps))]
        x_ = x.clone().requires_grad_()
        y = lora.lora_mlp(x_, *specs, backend="triton", need_output=need_output, rows=rows)
        if not need_output:
            assert [q.calls for q in qs] == [0, 0, 0] and [q.live() for q in qs] == [0, 0, 0]
        y.backward(dy)
        want_calls = [2, 2, 2] if need_output else [1, 1, 1]
        assert [q.calls for q in qs] == want_calls and all(q.live() == 0 for q in qs)
        grads.append([x_.grad] + [t.grad for t in ab])
    if rows >= 6:
        for got, want in zip(*grads):
            assert torch.equal(got, want)


MLP_CASES = {  # gate / up / down projections
    "mixed": lambda inter: [_proj(inter, bias=True, seed=7), _proj(inter, adapter=False, seed=8),
                            _proj(IN, inp=inter, seed=9, scale=2.0)],
    "stacked": lambda inter: [_proj(inter, seed=15), _proj(inter, bias=True, seed=16), _proj(IN, inp=inter, seed=17)],
}


@pytest.mark.parametrize("case", sorted(MLP_CASES))
@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
def test_mlp_in_row_blocks_matches_ref(case, act, dtype, adapter_dtype):
    """The deferred backward (need_output=False) in blocks of 4 of 18 tokens (4, 4, 4, 4, 2): x's gradient and
    every adapter's (sums over the blocks) against the reference, with the control's tolerance."""
    projections = MLP_CASES[case](53)
    x = torch.randn(2, 9, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(18))
    _compare(lambda x, p: lora.lora_mlp(x, *p, act=act, backend="triton", need_output=False, rows=4),
             lambda x, p: lora.lora_mlp(x, *p, act=act, backend="ref"), x, projections, [IN], dtype, adapter_dtype,
             outputs=False)


@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
def test_mlp_without_autograd_runs_in_row_blocks(dtype, adapter_dtype):
    """Without autograd (a checkpointed layer's first pass), more tokens than `rows` run block by block: the
    output against the reference with the control's tolerance, each 4-bit weight dequantized once for all
    blocks and none kept."""
    projections = MLP_CASES["mixed"](53)
    x = torch.randn(2, 9, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(19))
    with torch.no_grad():
        got = lora.lora_mlp(x.to(DEVICE, dtype), *_cast(projections, dtype, adapter_dtype), backend="triton", rows=4)
        ref = lora.lora_mlp(x.to(DEVICE), *_cast(projections, torch.float64), backend="ref")
        ctl = lora.lora_mlp(x.to(DEVICE, dtype), *_cast(projections, dtype, adapter_dtype), backend="ref")
        assert_close_to_ref(got, ref, ctl, "output")
        ps = _cast(projections, dtype, adapter_dtype)
        qs = [CountingQuant(p[0]) for p in ps]
        lora.lora_mlp(x.to(DEVICE, dtype), *[[q] + p[1:] for q, p in zip(qs, ps)], backend="triton", rows=4)
        assert [q.calls for q in qs] == [1, 1, 1] and all(q.live() == 0 for q in qs)


def test_nf4_base_gradients_equal_dense_dequantized_base():
    """QLoRA: gradients with a real NF4 base equal those with the dense dequantized weight."""
    nf4 = pytest.importorskip("hare.quant.nf4")
    W, b, A, B, s = _cast([_proj(64, seed=4)], torch.float32)[0]
    w4 = nf4.quantize_nf4(W)
    dense = w4.dequantize(torch.float32)
    x = torch.randn(3, 4, IN, device=DEVICE)
    grads = []
    for base in (w4, dense):
        A_, B_ = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
        x_ = x.clone().requires_grad_()
        y = lora.lora_linear(x_, base, b, A_, B_, s, backend="triton")
        y.square().sum().backward()
        grads.append((y.detach(), x_.grad, A_.grad, B_.grad))
    for got, want in zip(*grads):
        assert torch.equal(got, want)


def test_preconditions():
    W, b, A, B, s = _cast([_proj(8, seed=1)], torch.float32)[0]
    x = torch.randn(3, IN, device=DEVICE)
    with pytest.raises(ValueError, match="both"):
        lora.lora_linear(x, W, b, A, None, s, backend="triton")
    with pytest.raises(ValueError, match="dtype"):
        lora.lora_linear(x.double(), W, b, A, B, s, backend="triton")
    with pytest.raises(ValueError, match="requires grad"):
        lora.lora_linear(x, W.clone().requires_grad_(), b, A, B, s, backend="triton")
    with pytest.raises(ValueError, match="width"):
        lora.lora_linear(torch.randn(3, IN + 1), torch.randn(8, IN + 1), b, A, B, s, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        lora.lora_linear(x, W, b, A, B, s, backend="cuda")


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", "gelu"])
def test_mlp_without_output_gives_the_same_gradients(act):
    """need_output=False (checkpoint recomputation) skips down_proj's forward; the backward, fed the same dy,
    gives bit-identical gradients for x and every adapter, and a second backward is refused."""
    inter = 53
    grads = []
    for need_output in (True, False):
        projections = _cast([_proj(inter, seed=7), _proj(inter, seed=8), _proj(IN, inp=inter, seed=9)],
                            torch.float32)
        x = torch.randn(2, 9, IN, dtype=torch.float32, generator=torch.Generator().manual_seed(10)).to(DEVICE)
        x.requires_grad_()
        y = lora.lora_mlp(x, *projections, act=act, backend="triton", need_output=need_output)
        dy = torch.randn(y.shape, dtype=torch.float32, generator=torch.Generator().manual_seed(11)).to(DEVICE)
        y.backward(dy, retain_graph=True)
        grads.append([x.grad] + [t.grad for p in projections for t in p[2:4]])
        with pytest.raises(RuntimeError, match="retain_graph"):
            y.backward(dy)
    for a, b in zip(*grads):
        assert torch.equal(a, b)
