"""kernels/_triton.py: `cast` rounds fp32 -> bf16 to nearest even under the interpreter exactly as torch (and
the GPU's cvt.rn) does, including ties, subnormals, overflow to inf, infinities and NaNs; other dtypes are
plain casts."""
import pytest
import torch
import triton
import triton.language as tl

from hare.kernels._triton import cast

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, cast(x, y_ptr.dtype.element_ty, INTERPRET), mask=offs < n)


def _values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g) * torch.exp(torch.randn(20000, generator=g) * 8)  # 1e-30 .. 1e30
    bf16_ulp = 2.0 ** -7
    special = [1 + bf16_ulp / 2, 1 + 3 * bf16_ulp / 2, -(1 + 3 * bf16_ulp / 2),  # ties: to even, both ways
               1 + bf16_ulp / 2 + 2.0 ** -20, 2 - 2.0 ** -24,  # just above a tie; carry into the exponent
               1e-40, -1e-40, 3e-39, 2.0 ** -133, 2.0 ** -149,  # fp32 subnormals
               3.3895314e38, 3.4028235e38, -3.4028235e38,  # bf16 max, fp32 max -> inf
               0.0, -0.0, float("inf"), float("-inf")]
    return torch.cat([x, torch.tensor(special)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cast_matches_torch_bitwise(dtype):
    x = _values().to(DEVICE)
    y = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024, INTERPRET=not x.is_cuda)
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    assert torch.equal(y.view(bits), x.to(dtype).view(bits))


def test_cast_keeps_nans():
    # NaNs whose payload sits in the low bits only: truncating them would give inf (or -0.0 after a carry)
    x = torch.tensor([0x7F800001, 0x7FFFFFFF, -1, 0x7FC00000], dtype=torch.int32).view(torch.float32).to(DEVICE)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _cast_kernel[(1,)](x, y, x.numel(), BLOCK=16, INTERPRET=not x.is_cuda)
    assert torch.isnan(y).all()
