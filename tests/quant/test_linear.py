"""The frozen 4-bit linear: forward and dx vs a dense linear on the dequantized weight (fp64 oracle, control
in the input dtype), no gradient for the weight, no 16-bit copy kept between forward and backward."""
import pytest
import torch
from torch import nn

from hare.quant import Linear4bit, NF4Weight, linear_nf4, quantize_nf4
from tests.quant.bnb_oracle import DEVICE, bnb_quantize, bnb_tensors
from tests.tolerance import assert_close_to_ref

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _dense_ref(x, wd, b):
    return torch.nn.functional.linear(x, wd, b)


def _run(fn, x, b, dy):
    x = x.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = fn(x, b)
    grads = torch.autograd.grad(y, [x] + ([b] if b is not None else []), dy)
    return [y, *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(5, 3, 70), (4, 128)], ids=str)
def test_forward_and_dx_match_dense(shape, bias, dtype):
    gen = torch.Generator().manual_seed(0)
    n = 37
    k = shape[-1]
    w = quantize_nf4((torch.randn(n, k, generator=gen) * 0.1).to(dtype).to(DEVICE))
    x = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype).to(DEVICE) if bias else None
    dy = torch.randn(*shape[:-1], n, generator=gen).to(dtype).to(DEVICE)
    wd = w.dequantize(dtype, backend="ref")  # the 16-bit model's weight
    got = _run(lambda x, b: linear_nf4(x, w, b, backend="triton"), x, b, dy)
    want = _run(lambda x, b: _dense_ref(x, wd.double(), b), x.double(), None if b is None else b.double(),
                dy.double())
    control = _run(lambda x, b: _dense_ref(x, wd, b), x, b, dy)
    for name, g, r, c in zip(["y", "dx", "db"], got, want, control):
        assert g.dtype == dtype, name
        assert_close_to_ref(g, r, c, name)


def test_module_weight_has_no_grad_and_no_16bit_copy_is_saved():
    gen = torch.Generator().manual_seed(1)
    dense = nn.Linear(64, 24, bias=True).to(DEVICE)
    m = Linear4bit.from_linear(dense)
    assert [n for n, _ in m.named_parameters()] == ["bias"] and not m.bias.requires_grad
    assert isinstance(m.weight, NF4Weight) and m.weight.shape == (24, 64)
    x = torch.randn(6, 64, generator=gen).to(DEVICE).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = m(x)
    assert saved == [], "the 4-bit linear saved tensors for backward (a 16-bit weight copy?)"
    y.sum().backward()
    assert x.grad is not None and m.bias.grad is None
    assert all(getattr(m, "weight_" + n) is None or not getattr(m, "weight_" + n).requires_grad
               for n in Linear4bit._BUFFERS)


def test_single_row_takes_the_gemv_and_matches():
    gen = torch.Generator().manual_seed(2)
    m = Linear4bit.from_linear(nn.Linear(128, 40, bias=True).to(DEVICE))
    x = torch.randn(1, 1, 128, generator=gen).to(DEVICE)
    with torch.no_grad():
        y1 = m(x, backend="triton")
        y_rows = m(torch.cat([x, x], 1), backend="triton")[:, :1]  # two rows: dequantize + matmul
    assert y1.shape == (1, 1, 40)
    wd = m.weight.dequantize(torch.float32, backend="ref").double()
    ref = torch.nn.functional.linear(x.double(), wd, m.bias.double())
    assert_close_to_ref(y1, ref, y_rows, "y")


def test_module_dtype_cast_keeps_statistics_and_moves_with_to():
    m = Linear4bit.from_linear(nn.Linear(64, 8).to(DEVICE))
    before = m.weight.dequantize(torch.float32)
    m.to(torch.bfloat16)  # casts the bias, not the fp32 statistics (kept as int32 bit patterns)
    assert m.bias.dtype == torch.bfloat16 and m.weight.quant_map.dtype == torch.float32
    assert torch.equal(m.weight.dequantize(torch.float32), before)
    assert m.state_dict().keys() == {"bias"}  # the 4-bit format on disk is bitsandbytes' (to_bnb)
    assert m.to("meta").weight.device.type == "meta"


def test_from_bnb_with_bias_and_preconditions():
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(16, 64, generator=gen) * 0.1).to(DEVICE)
    packed, st = bnb_quantize(w)
    t = bnb_tensors(packed, st, "l.")
    t["l.bias"] = torch.randn(16, generator=gen).to(DEVICE)
    m = Linear4bit.from_bnb(t, "l.")
    assert torch.equal(m.bias, t["l.bias"]) and m.in_features == 64 and m.out_features == 16
    with pytest.raises(ValueError, match="bias must have shape"):
        Linear4bit(quantize_nf4(w), torch.zeros(3))
    with pytest.raises(ValueError, match="2-D NF4Weight"):
        Linear4bit(quantize_nf4(w.reshape(4, 4, 64)))
    with pytest.raises(ValueError, match="in_features"):
        m(torch.randn(2, 32, device=DEVICE))
