"""swiglu: the Triton kernels (interpreter on CPU) vs swiglu_ref evaluated in fp64, with the tolerance derived
from the ref run in the kernel's own dtype (tests/tolerance.py)."""
import pytest
import torch

from hare.kernels.swiglu import SwiGLUFunction, swiglu, swiglu_ref
from tests.tolerance import assert_close_to_ref

pytestmark = [
    # the interpreter runs exp in numpy: exp(-g) overflowing to inf for g << 0 is intended (sigmoid -> 0)
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# CPU: the Triton interpreter (tests/conftest.py); on a GPU machine the same tests run the compiled kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _gate_up(shape, dtype, gen):
    gate = torch.randn(shape, generator=gen) * 3
    gate.view(-1)[:6] = torch.tensor([-100.0, -20.0, -1e-3, 0.0, 20.0, 60.0])  # saturation and zero
    return gate.to(dtype), torch.randn(shape, generator=gen).to(dtype)


def _compare(gate, up, dy, view=None):
    """y, dgate, dup of the kernel vs swiglu_ref in fp64; control: swiglu_ref in the inputs' dtype.
    `view(gate, up) -> (gate, up)` is applied to the leaves inside the graph (e.g. halves of a fused tensor)."""
    view = view or (lambda g, u: (g, u))

    def run(fn, gate, up, dy):
        gate = gate.detach().to(DEVICE, copy=True).requires_grad_()
        up, dy = up.detach().to(DEVICE, copy=True).requires_grad_(), dy.to(DEVICE)
        y = fn(*view(gate, up))
        return [y, *torch.autograd.grad(y, [gate, up], dy)]

    got = run(lambda g, u: swiglu(g, u, backend="triton"), gate, up, dy)
    want = run(swiglu_ref, gate.double(), up.double(), dy.double())
    control = run(swiglu_ref, gate, up, dy)
    for name, g, w, c in zip(["y", "dgate", "dup"], got, want, control):
        assert g.dtype == c.dtype, f"{name}: dtype {g.dtype} != ref's {c.dtype}"
        assert_close_to_ref(g, w, c, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu(dtype):
    gen = torch.Generator().manual_seed(0)
    gate, up = _gate_up((5, 123, 123), dtype, gen)  # 123 columns: a masked tail in every row
    _compare(gate, up, torch.randn(gate.shape, generator=gen).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_swiglu_halves_of_fused_gate_up(dtype):
    # gate and up as the two halves of one (tokens, 2 * I) projection output: strided rows (2 * I), I > BLOCK
    gen = torch.Generator().manual_seed(1)
    gate, up = _gate_up((3, 7, 1100), dtype, gen)

    def halves(g, u):
        fused = torch.cat([g, u], dim=-1)
        return fused[..., :1100], fused[..., 1100:]

    assert not halves(gate, up)[0].is_contiguous()
    _compare(gate, up, torch.randn(gate.shape, generator=gen).to(dtype), view=halves)


def test_swiglu_single_token_1d():
    gen = torch.Generator().manual_seed(2)
    gate, up = _gate_up((37,), torch.bfloat16, gen)
    _compare(gate, up, torch.randn(37, generator=gen).to(torch.bfloat16))


def test_backend_dispatch():
    g, u = torch.randn(3, 10, requires_grad=True), torch.randn(3, 10)
    y = swiglu(g, u)  # CPU, backend=None: the ref path, bit for bit
    assert torch.equal(y, swiglu_ref(g, u))
    assert "SwiGLUFunction" not in type(y.grad_fn).__name__
    gd, ud = g.to(DEVICE), u.to(DEVICE)
    assert type(swiglu(gd, ud, backend="triton").grad_fn).__name__ == SwiGLUFunction.__name__ + "Backward"
    if DEVICE == "cuda":  # backend=None on CUDA tensors: the kernel
        assert type(swiglu(gd, ud).grad_fn).__name__ == SwiGLUFunction.__name__ + "Backward"
    with pytest.raises(ValueError, match="backend"):
        swiglu(g, u, backend="cpu")


def test_preconditions():
    g = torch.randn(3, 10)
    with pytest.raises(ValueError, match="gate and up"):
        swiglu(g, torch.randn(3, 11), backend="triton")
    with pytest.raises(ValueError, match="gate and up"):
        swiglu(g, torch.randn(3, 10, dtype=torch.float64), backend="triton")


def test_inplace_backward_also_gives_the_activation():
    """swiglu_bwd(inplace=True) writes (dgate, dup, h) over (gate, up, dy), equal to the two-pass results."""
    from hare.kernels.swiglu import swiglu_bwd, swiglu_fwd
    g = torch.Generator().manual_seed(0)
    gate, up, dy = ((torch.randn(5, 123, generator=g) * 3).to(DEVICE) for _ in range(3))
    dg, du = swiglu_bwd(dy, gate, up)
    h = swiglu_fwd(gate, up)
    bufs = (gate.clone(), up.clone(), dy.clone())
    out = swiglu_bwd(bufs[2], bufs[0], bufs[1], inplace=True)
    for got, want, buf in zip(out, (dg, du, h), bufs):
        assert torch.equal(got, want) and got.data_ptr() == buf.data_ptr()


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_folded_adapters_match_ref(dtype, act):
    """Adapter terms folded into the activation kernels (the fused MLP's path): gate' = gate + s_g xa_g Bt_g,
    up' likewise, and in the backward dy' = dy + s_d ad bd (down_proj's input-gradient term). y, dgate, dup and
    the in-place h against the ref in fp64 on (gate', up', dy'); control: the same composed in the inputs' dtype
    (each product rounded, as the GEMM passes the fold replaces). Ranks that are no power of two (the tl.dot's
    padding masked), 37 x 200: masked row and column tails."""
    from hare.kernels.geglu import geglu_bwd, geglu_fwd, geglu_ref
    from hare.kernels.swiglu import swiglu_bwd, swiglu_fwd
    g = torch.Generator().manual_seed(3)
    M, N, r, rd = 37, 200, 12, 5

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    gate, up, dy = rnd(M, N, scale=2.0), rnd(M, N), rnd(M, N)
    # gate's B^T as kernels/lora.py passes it (a view of the row-major (N, r) B), up's as a row-major (r, N)
    xa_g, bt_g, xa_u, bt_u = rnd(M, r), rnd(N, r, scale=0.1).t(), rnd(M, r), rnd(r, N, scale=0.1)
    ad, bd = rnd(M, rd), rnd(rd, N, scale=0.1)
    fold, dy_fold = (xa_g, bt_g, 2.0, xa_u, bt_u, 0.5), (ad, bd, 1.5)
    if act == "silu":
        fwd, bwd, ref = swiglu_fwd, swiglu_bwd, swiglu_ref
    else:
        approx = "tanh" if act == "gelu_tanh" else "none"
        fwd = lambda *a, **k: geglu_fwd(*a, approx, **k)  # noqa: E731
        bwd = lambda *a, **k: geglu_bwd(*a, approx, **k)  # noqa: E731
        ref = lambda a, b: geglu_ref(a, b, approx)  # noqa: E731
    y = fwd(gate, up, fold=fold)
    dg, du, h = bwd(dy.clone(), gate.clone(), up.clone(), inplace=True, fold=fold, dy_fold=dy_fold)

    def composed(t):
        """(y, dgate, dup, h) of the ref on the folded inputs, every tensor first cast by t."""
        gp = t(gate) + 2.0 * (t(xa_g) @ t(bt_g))
        up_ = t(up) + 0.5 * (t(xa_u) @ t(bt_u))
        dyp = t(dy) + 1.5 * (t(ad) @ t(bd))
        gp, up_ = gp.detach().requires_grad_(), up_.detach().requires_grad_()
        out = ref(gp, up_)
        return [out, *torch.autograd.grad(out, [gp, up_], dyp), out]

    want, control = composed(lambda t: t.double()), composed(lambda t: t)
    for name, got, w, c in zip(("y", "dgate", "dup", "h"), (y, dg, du, h), want, control):
        assert_close_to_ref(got, w, c, name)


@pytest.mark.parametrize("tile", [(16, 64), (32, 128), (64, 64)], ids=str)
def test_folded_adapters_same_bits_on_every_tile(tile):
    """Adapters folded into the kernels (fold_args, dy_fold_args; the fused MLP's path): each output element's
    low-rank terms are rank-16 products one MMA deep however the tiles fall, so another tile (tools/bench_kernels.py
    sweeps them) must give the default's results bit for bit, forward and in-place backward. 37 x 200: masked row
    and column tails on every tile."""
    from hare.kernels.swiglu import FOLD_TILE, swiglu_bwd, swiglu_fwd
    g = torch.Generator().manual_seed(0)
    M, N, r = 37, 200, 16

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16).to(DEVICE)

    gate, up, dy = rnd(M, N, scale=2.0), rnd(M, N), rnd(M, N)
    fold = (rnd(M, r), rnd(r, N, scale=0.1), 2.0, rnd(M, r), rnd(r, N, scale=0.1), 0.5)
    dy_fold = (rnd(M, r), rnd(r, N, scale=0.1), 1.5)
    runs = []
    for t in (FOLD_TILE, tile):
        y = swiglu_fwd(gate, up, fold=fold, fold_tile=t)
        bwd = swiglu_bwd(dy.clone(), gate.clone(), up.clone(), inplace=True, fold=fold, fold_tile=t,
                         dy_fold=dy_fold)
        runs.append((y, *bwd))
    for name, a, b in zip(("y", "dgate", "dup", "h"), *runs):
        assert torch.equal(a, b), f"{name}: tile {tile} differs from {FOLD_TILE}"
