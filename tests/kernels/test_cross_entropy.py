"""Fused linear cross-entropy vs F.cross_entropy(h @ W.T, y) in fp64; tolerances from the same-dtype control.

On a CPU-only machine the Triton kernel runs under the interpreter (tests/conftest.py); with a GPU the same
tests run on it.
"""
import pytest
import torch
import triton
import triton.language as tl

from hare.kernels import linear_cross_entropy, linear_cross_entropy_ref
from hare.kernels.cross_entropy import _tanh, default_chunk_size, fused_linear_cross_entropy
from tests.tolerance import assert_close_to_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(n, h, v, dtype, n_ignored=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    # Logits of standard deviation ~2: softmax neither uniform nor one-hot, and a cap of 3 bends them.
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (2.0 / h**0.5)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.randperm(n, generator=gen)[:n_ignored]] = -100
    # Every dtype sees the same values: the low-precision copy, then fp64 of exactly those.
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    return hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE)


def run(fn, hidden, weight, labels, dtype, h_grad=True, w_grad=True, upstream=1.0, **kw):
    """loss, count, d hidden, d weight of `fn` on copies of the inputs cast to `dtype`, for out = upstream * loss."""
    h = hidden.detach().to(dtype).requires_grad_(h_grad)
    w = weight.detach().to(dtype).requires_grad_(w_grad)
    loss, count = fn(h, w, labels, **kw)
    if h_grad or w_grad:
        (loss * upstream).backward()
    return loss.detach(), count, h.grad, w.grad


def check(hidden, weight, labels, h_grad=True, w_grad=True, upstream=1.0, softcap=None, **kw):
    """Fused (Triton) vs fp64 truth, with the reference run in the input dtype as control."""
    dtype = hidden.dtype
    args = dict(h_grad=h_grad, w_grad=w_grad, upstream=upstream, softcap=softcap)
    out = run(fused_linear_cross_entropy, hidden, weight, labels, dtype, **args, **kw)
    ref = run(linear_cross_entropy_ref, hidden, weight, labels, torch.float64, **args)
    ctl = run(linear_cross_entropy_ref, hidden, weight, labels, dtype, **args)
    assert out[0].dtype == torch.float32 and out[0].shape == ()
    assert out[1].dtype == torch.int64 and out[1].shape == () and out[1].device == hidden.device
    assert out[1].item() == ref[1].item() == (labels != -100).sum().item()
    assert_close_to_ref(out[0], ref[0], ctl[0], "loss")
    for i, name, wanted in ((2, "d hidden", h_grad), (3, "d weight", w_grad)):
        if wanted:
            assert out[i].dtype == dtype
            assert_close_to_ref(out[i], ref[i], ctl[i], name)
        else:
            assert out[i] is None
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("w_grad", [True, False], ids=["w_trainable", "w_frozen"])
def test_matches_fp64(dtype, softcap, w_grad):
    # vocab 1000 in blocks of 256 (the last one partial); 37 rows in chunks of 16, 16, 5; some rows ignored.
    hidden, weight, labels = make_inputs(37, 24, 1000, dtype, n_ignored=9)
    check(hidden, weight, labels, w_grad=w_grad, softcap=softcap, chunk_size=16, block_v=256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_upstream_grad_scales(dtype):
    # out = 0.37 * loss_sum: the stored gradients must be multiplied by the incoming gradient, not returned as is.
    hidden, weight, labels = make_inputs(21, 16, 300, dtype, n_ignored=4, seed=1)
    out = check(hidden, weight, labels, upstream=0.37, softcap=5.0, chunk_size=8, block_v=128)
    unit = run(fused_linear_cross_entropy, hidden, weight, labels, dtype, chunk_size=8, block_v=128, softcap=5.0)
    # Not the unscaled gradient (the control tolerance alone could not tell 0.37 g from g only if g were ~0).
    assert (out[2].double() - unit[2].double()).abs().max() > 0.1 * unit[2].double().abs().max()


def test_many_chunks_round_d_weight_once():
    # One row per chunk: d W summed over 128 chunks, upstream 1 / n as the trainer's normalization. Accumulated
    # in bf16 (one rounding per chunk) its max error was 2.8x the reference's here; in fp32, rounded once, 1.0x.
    hidden, weight, labels = make_inputs(128, 16, 64, torch.bfloat16, seed=5)
    check(hidden, weight, labels, h_grad=False, upstream=1 / 128, chunk_size=1)


def test_second_backward_of_weight_gradient_raises():
    hidden, weight, labels = make_inputs(5, 16, 100, torch.bfloat16)
    w = weight.requires_grad_()
    loss, _ = fused_linear_cross_entropy(hidden, w, labels, chunk_size=2)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="consumed"):
        loss.backward()


def test_all_ignored():
    hidden, weight, labels = make_inputs(7, 16, 100, torch.float32)
    labels[:] = -100
    loss, count, dh, dw = run(fused_linear_cross_entropy, hidden, weight, labels, torch.float32, chunk_size=3)
    assert loss.item() == 0.0 and count.item() == 0
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_token(dtype):
    hidden, weight, labels = make_inputs(1, 16, 1000, dtype, seed=2)
    check(hidden, weight, labels, softcap=3.0, block_v=512)


def test_no_rows():
    hidden, weight, labels = make_inputs(0, 16, 100, torch.float32)
    loss, count, dh, dw = run(fused_linear_cross_entropy, hidden, weight, labels, torch.float32)
    assert loss.item() == 0.0 and count.item() == 0 and dh.shape == (0, 16)
    assert torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("v", [151936])
def test_large_vocab_many_blocks(v):
    # Qwen2's vocab (not a multiple of any block): 3 rows, default block, many vocab blocks per row.
    hidden, weight, labels = make_inputs(3, 8, v, torch.float32, seed=3)
    check(hidden, weight, labels)


@pytest.mark.parametrize("h_grad,w_grad", [(False, True), (True, False), (False, False)])
def test_which_grads(h_grad, w_grad):
    hidden, weight, labels = make_inputs(13, 16, 200, torch.bfloat16, n_ignored=2, seed=4)
    check(hidden, weight, labels, h_grad=h_grad, w_grad=w_grad, chunk_size=5, block_v=64)


def test_no_grad_mode_and_default_chunking():
    # The public entry point on the Triton backend, default chunk size and block, under torch.no_grad.
    hidden, weight, labels = make_inputs(19, 16, 1000, torch.float32, n_ignored=3, seed=5)
    ref = linear_cross_entropy_ref(hidden.double(), weight.double(), labels, softcap=3.0)[0]
    ctl = linear_cross_entropy_ref(hidden, weight, labels, softcap=3.0)[0]
    with torch.no_grad():
        loss, count = linear_cross_entropy(hidden.requires_grad_(), weight, labels, softcap=3.0, backend="triton")
    assert not loss.requires_grad and count.item() == 16
    assert_close_to_ref(loss, ref, ctl, "loss")


def test_evaluation_does_one_gemm_per_chunk():
    # Under no_grad (or with nothing requiring grad) only the logits GEMM runs: no d hidden / d weight GEMMs.
    hidden, weight, labels = make_inputs(10, 16, 100, torch.float32, seed=7)
    h, w = hidden.requires_grad_(), weight.requires_grad_()

    def gemms(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))

    with torch.no_grad():
        assert gemms(lambda: fused_linear_cross_entropy(h, w, labels, chunk_size=4)) == 3
    assert gemms(lambda: fused_linear_cross_entropy(h.detach(), w.detach(), labels, chunk_size=4)) == 3
    assert gemms(lambda: fused_linear_cross_entropy(h, w, labels, chunk_size=4)) == 9


def test_batched_hidden():
    # (B, T, H) hidden with (B, T) labels: flattened inside, d hidden keeps the (B, T, H) shape.
    hidden, weight, labels = make_inputs(12, 16, 100, torch.float32, n_ignored=2, seed=6)
    h3, y2 = hidden.view(3, 4, 16), labels.view(3, 4)
    out = run(fused_linear_cross_entropy, h3, weight, y2, torch.float32, chunk_size=5)
    ref = run(linear_cross_entropy_ref, h3, weight, y2, torch.float64)
    ctl = run(linear_cross_entropy_ref, h3, weight, y2, torch.float32)
    for i, name in ((0, "loss"), (2, "d hidden"), (3, "d weight")):
        assert_close_to_ref(out[i], ref[i], ctl[i], name)


def test_invalid_label_gives_nan():
    hidden, weight, labels = make_inputs(4, 16, 100, torch.float32)
    for bad in (100, -1, 2**32 + 5):   # the last one would wrap to a valid label in int32
        labels[2] = bad
        loss, count = fused_linear_cross_entropy(hidden, weight, labels)
        assert torch.isnan(loss) and count.item() == 4


def test_second_backward_raises():
    # The first backward scales the stored gradients in place; a second one through a retained graph must fail.
    hidden, weight, labels = make_inputs(5, 16, 100, torch.float32)
    h = hidden.requires_grad_()
    loss, _ = fused_linear_cross_entropy(h, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_preconditions():
    hidden, weight, labels = make_inputs(5, 16, 100, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        fused_linear_cross_entropy(hidden.double(), weight, labels)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(hidden, weight, labels[:4])
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="softcap"):
        fused_linear_cross_entropy(hidden, weight, labels, softcap=0.0)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_cross_entropy(hidden, weight.t(), labels)
    with pytest.raises(ValueError, match="block_v"):
        fused_linear_cross_entropy(hidden, weight, labels, block_v=100)
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy(hidden, weight, labels, backend="cuda")


def test_default_chunk_size():
    assert default_chunk_size(16384) == 2048     # 1/8 of the rows
    assert default_chunk_size(65536) == 2048     # the cap: a buffer that does not grow with the sequence
    assert default_chunk_size(4096) == 1024      # the floor
    assert default_chunk_size(300) == 300        # never more than N
    assert default_chunk_size(0) == 1


@triton.jit
def _tanh_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, _tanh(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


def test_tanh_helper():
    # Both branches and their seam at |y| = 0.55, tiny and huge arguments: within 4 fp32 ulps of tanh.
    y = torch.cat([torch.linspace(-3, 3, 2001), torch.tensor([0.5499999, 0.55, -0.55, 1e-30, -1e-8, 50.0, -1e4])])
    y = y.to(torch.float32)
    out = torch.full_like(y, float("nan"), device=DEVICE)
    _tanh_kernel[(triton.cdiv(y.numel(), 1024),)](y.to(DEVICE), out, y.numel(), BLOCK=1024)
    truth = torch.tanh(y.double())
    ulp = torch.finfo(torch.float32).eps * truth.abs().clamp(min=torch.finfo(torch.float32).tiny)
    assert ((out.cpu().double() - truth).abs() <= 4 * ulp).all()
