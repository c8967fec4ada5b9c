"""geglu (tanh-approximate and exact gelu): the Triton kernels (interpreter on CPU) vs geglu_ref evaluated in
fp64, with the tolerance derived from the ref run in the kernel's own dtype (tests/tolerance.py)."""
import pytest
import torch

from hare.kernels.geglu import GeGLUFunction, geglu, geglu_ref
from tests.tolerance import assert_close_to_ref

pytestmark = [
    # the interpreter runs exp in numpy: exp overflowing to inf for g << 0 is intended (sigmoid -> 0)
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# CPU: the Triton interpreter (tests/conftest.py); on a GPU machine the same tests run the compiled kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
APPROX = ["tanh", "none"]


def _gate_up(shape, dtype, gen):
    gate = torch.randn(shape, generator=gen) * 3
    gate.view(-1)[:6] = torch.tensor([-100.0, -20.0, -1e-3, 0.0, 20.0, 60.0])  # saturation and zero
    return gate.to(dtype), torch.randn(shape, generator=gen).to(dtype)


def _compare(gate, up, dy, approximate, view=None):
    """y, dgate, dup of the kernel vs geglu_ref in fp64; control: geglu_ref in the inputs' dtype.
    `view(gate, up) -> (gate, up)` is applied to the leaves inside the graph (e.g. halves of a fused tensor)."""
    view = view or (lambda g, u: (g, u))

    def run(fn, gate, up, dy):
        gate = gate.detach().to(DEVICE, copy=True).requires_grad_()
        up, dy = up.detach().to(DEVICE, copy=True).requires_grad_(), dy.to(DEVICE)
        y = fn(*view(gate, up))
        return [y, *torch.autograd.grad(y, [gate, up], dy)]

    got = run(lambda g, u: geglu(g, u, approximate, backend="triton"), gate, up, dy)
    want = run(lambda g, u: geglu_ref(g, u, approximate), gate.double(), up.double(), dy.double())
    control = run(lambda g, u: geglu_ref(g, u, approximate), gate, up, dy)
    for name, g, w, c in zip(["y", "dgate", "dup"], got, want, control):
        assert g.dtype == c.dtype, f"{name}: dtype {g.dtype} != ref's {c.dtype}"
        assert_close_to_ref(g, w, c, name)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_geglu(dtype, approximate):
    gen = torch.Generator().manual_seed(0)
    gate, up = _gate_up((5, 61, 123), dtype, gen)  # 123 columns: a masked tail in every row
    _compare(gate, up, torch.randn(gate.shape, generator=gen).to(dtype), approximate)


@pytest.mark.parametrize("approximate", APPROX)
def test_geglu_halves_of_fused_gate_up(approximate):
    # gate and up as the two halves of one (tokens, 2 * I) projection output: strided rows (2 * I), I > BLOCK
    gen = torch.Generator().manual_seed(1)
    gate, up = _gate_up((3, 7, 1100), torch.bfloat16, gen)

    def halves(g, u):
        fused = torch.cat([g, u], dim=-1)
        return fused[..., :1100], fused[..., 1100:]

    assert not halves(gate, up)[0].is_contiguous()
    _compare(gate, up, torch.randn(gate.shape, generator=gen).to(torch.bfloat16), approximate, view=halves)


def test_geglu_single_token_1d():
    gen = torch.Generator().manual_seed(2)
    gate, up = _gate_up((37,), torch.float32, gen)
    _compare(gate, up, torch.randn(37, generator=gen), "tanh")


def test_backend_dispatch():
    g, u = torch.randn(3, 10, requires_grad=True), torch.randn(3, 10)
    for approximate in APPROX:
        y = geglu(g, u, approximate)  # CPU, backend=None: the ref path, bit for bit
        assert torch.equal(y, geglu_ref(g, u, approximate))
        assert "GeGLUFunction" not in type(y.grad_fn).__name__
    gd, ud = g.to(DEVICE), u.to(DEVICE)
    assert type(geglu(gd, ud, backend="triton").grad_fn).__name__ == GeGLUFunction.__name__ + "Backward"
    if DEVICE == "cuda":  # backend=None on CUDA tensors: the kernel
        assert type(geglu(gd, ud).grad_fn).__name__ == GeGLUFunction.__name__ + "Backward"
    with pytest.raises(ValueError, match="backend"):
        geglu(g, u, backend="torch")


def test_preconditions():
    g = torch.randn(3, 10)
    with pytest.raises(ValueError, match="approximate"):
        geglu(g, g, approximate="erf", backend="triton")
    with pytest.raises(ValueError, match="gate and up"):
        geglu(g, torch.randn(3, 11), backend="triton")


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_inplace_backward_also_gives_the_activation(approximate):
    """geglu_bwd(inplace=True) writes (dgate, dup, h) over (gate, up, dy), equal to the two-pass results."""
    from hare.kernels.geglu import geglu_bwd, geglu_fwd
    g = torch.Generator().manual_seed(0)
    gate, up, dy = ((torch.randn(5, 123, generator=g) * 3).to(DEVICE) for _ in range(3))
    dg, du = geglu_bwd(dy, gate, up, approximate)
    h = geglu_fwd(gate, up, approximate)
    bufs = (gate.clone(), up.clone(), dy.clone())
    out = geglu_bwd(bufs[2], bufs[0], bufs[1], approximate, inplace=True)
    for got, want, buf in zip(out, (dg, du, h), bufs):
        assert torch.equal(got, want) and got.data_ptr() == buf.data_ptr()
