"""rms_norm / rms_norm_residual: the Triton kernels (interpreter on CPU) vs rms_norm_ref evaluated in fp64, with
the tolerance derived from the ref run in the kernel's own dtype (tests/tolerance.py)."""
import pytest
import torch

from hare.kernels.rms_norm import (DW_SUM_ROWS, RMSNormFunction, rms_norm, rms_norm_bwd, rms_norm_fwd, rms_norm_ref,
                                   rms_norm_residual, rms_norm_residual_ref)
from tests.tolerance import assert_close_to_ref

# interpreter noise: it converts 1-element arrays to loop bounds with int()
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

EPS = 1e-6
# CPU: the Triton interpreter (tests/conftest.py); on a GPU machine the same tests run the compiled kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _outputs_and_grads(fn, inputs, douts):
    """Runs fn on fresh leaves made from `inputs` (those with requires_grad get gradients) and returns
    outputs + gradients of the grad-requiring inputs, in order."""
    leaves = [t.detach().to(DEVICE, copy=True).requires_grad_(t.requires_grad) for t in inputs]
    douts = [d.to(DEVICE) if d is not None else None for d in douts]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    used = [(o, d) for o, d in zip(outs, douts) if d is not None]
    grads = torch.autograd.grad([o for o, _ in used], [t for t in leaves if t.requires_grad], [d for _, d in used])
    return list(outs) + list(grads)


def _compare(kernel, ref, inputs, douts, names):
    """kernel vs ref in fp64, tolerance from ref in the inputs' own dtypes."""
    got = _outputs_and_grads(kernel, inputs, douts)
    want = _outputs_and_grads(ref, [t.double().requires_grad_(t.requires_grad) for t in inputs],
                              [d.double() if d is not None else None for d in douts])
    control = _outputs_and_grads(ref, inputs, douts)
    assert len(got) == len(names) == len(want) == len(control)
    for name, g, w, c in zip(names, got, want, control):
        assert g.dtype == c.dtype, f"{name}: dtype {g.dtype} != ref's {c.dtype}"
        assert_close_to_ref(g, w, c, name)


def _inputs(shape, dtype, offset, w_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = (torch.randn(shape, generator=gen) * 2).to(dtype).requires_grad_()
    # with offset 1 (Gemma) the stored weight is w - 1, small around 0; otherwise around 1
    w = (torch.randn(n, generator=gen) * 0.3 + (0.0 if offset else 1.0)).to(w_dtype or dtype).requires_grad_()
    res = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    return gen, x, w, res


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("casting", ["llama", "gemma"])
def test_rms_norm(dtype, offset, casting):
    gen, x, w, _ = _inputs((5, 123, 123), dtype, offset)
    dy = torch.randn(x.shape, generator=gen).to(dtype)
    _compare(lambda x, w: rms_norm(x, w, EPS, offset, casting, backend="triton"),
             lambda x, w: rms_norm_ref(x, w, EPS, offset, casting),
             [x, w], [dy], ["y", "dx", "dw"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("casting", ["llama", "gemma"])
def test_rms_norm_residual(dtype, offset, casting):
    gen, x, w, res = _inputs((5, 123, 123), dtype, offset, seed=1)
    dy = torch.randn(x.shape, generator=gen).to(dtype)
    dh = torch.randn(x.shape, generator=gen).to(dtype)
    _compare(lambda x, r, w: rms_norm_residual(x, r, w, EPS, offset, casting, backend="triton"),
             lambda x, r, w: rms_norm_residual_ref(x, r, w, EPS, offset, casting),
             [x, res, w], [dy, dh], ["y", "h", "dx", "dresidual", "dw"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_long_rows_one_row_per_program(dtype):
    # N = 5000 > the 4096-element tile: BLOCK_N = 8192, one row per program, masked tail
    gen, x, w, _ = _inputs((3, 7, 5000), dtype, 0.0, seed=2)
    dy = torch.randn(x.shape, generator=gen).to(dtype)
    _compare(lambda x, w: rms_norm(x, w, EPS, 0.0, "llama", backend="triton"),
             lambda x, w: rms_norm_ref(x, w, EPS, 0.0, "llama"),
             [x, w], [dy], ["y", "dx", "dw"])


@pytest.mark.parametrize("casting", ["llama", "gemma"])
def test_rms_norm_fp32_weight_bf16_input(casting):
    # llama promotes the output to fp32 (w * x_bf16 in torch); gemma returns x's dtype
    gen, x, w, _ = _inputs((4, 37, 123), torch.bfloat16, 1.0, w_dtype=torch.float32, seed=3)
    out_dtype = torch.float32 if casting == "llama" else torch.bfloat16
    dy = torch.randn(x.shape, generator=gen).to(out_dtype)
    _compare(lambda x, w: rms_norm(x, w, EPS, 1.0, casting, backend="triton"),
             lambda x, w: rms_norm_ref(x, w, EPS, 1.0, casting),
             [x, w], [dy], ["y", "dx", "dw"])


@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_frozen_weight_single_token(residual):
    # LoRA: the norm weight is frozen, so no dw and no partial buffer; one token (decode shape)
    gen, x, w, res = _inputs((1, 1, 123), torch.bfloat16, 0.0, seed=4)
    w.requires_grad_(False)
    dy = torch.randn(x.shape, generator=gen).to(torch.bfloat16)
    if residual:
        dh = torch.randn(x.shape, generator=gen).to(torch.bfloat16)
        _compare(lambda x, r, w: rms_norm_residual(x, r, w, EPS, backend="triton"),
                 lambda x, r, w: rms_norm_residual_ref(x, r, w, EPS), [x, res, w], [dy, dh],
                 ["y", "h", "dx", "dresidual"])
    else:
        _compare(lambda x, w: rms_norm(x, w, EPS, backend="triton"), lambda x, w: rms_norm_ref(x, w, EPS),
                 [x, w], [dy], ["y", "dx"])


def test_rms_norm_residual_only_y_used():
    # h unused downstream: its gradient arrives as None and dx must equal the plain norm's dx
    gen, x, w, res = _inputs((3, 11, 123), torch.float32, 0.0, seed=5)
    dy = torch.randn(x.shape, generator=gen)
    _compare(lambda x, r, w: rms_norm_residual(x, r, w, EPS, backend="triton"),
             lambda x, r, w: rms_norm_residual_ref(x, r, w, EPS), [x, res, w], [dy, None],
             ["y", "h", "dx", "dresidual", "dw"])


def test_rms_norm_strided_rows():
    # a row-strided view (every other token) is read in place through the row stride
    gen, x, w, _ = _inputs((2, 14, 123), torch.float32, 0.0, seed=6)
    dy = torch.randn(2, 7, 123, generator=gen)
    _compare(lambda x, w: rms_norm(x[:, ::2], w, EPS, backend="triton"),
             lambda x, w: rms_norm_ref(x[:, ::2], w, EPS), [x, w], [dy], ["y", "dx", "dw"])


def test_backend_dispatch():
    x = torch.randn(3, 64)
    w = torch.randn(64, requires_grad=True)
    y = rms_norm(x, w, EPS)  # CPU tensor, backend=None: the ref path, bit for bit, no kernel Function
    assert torch.equal(y, rms_norm_ref(x, w, EPS))
    assert "RMSNormFunction" not in type(y.grad_fn).__name__
    y = rms_norm(x.to(DEVICE), w.to(DEVICE), EPS, backend="triton")
    assert type(y.grad_fn).__name__ == RMSNormFunction.__name__ + "Backward"
    if DEVICE == "cuda":  # backend=None on CUDA tensors: the kernel
        assert type(rms_norm(x.cuda(), w.cuda(), EPS).grad_fn).__name__ == RMSNormFunction.__name__ + "Backward"
    y, h = rms_norm_residual(x, x, w, EPS)
    assert torch.equal(h, x + x) and torch.equal(y, rms_norm_ref(x + x, w, EPS))
    with pytest.raises(ValueError, match="backend"):
        rms_norm(x, w, EPS, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        rms_norm_residual(x, x, w, EPS, backend="Triton")


def test_preconditions():
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="casting"):
        rms_norm(x, torch.ones(64), EPS, casting="qwen", backend="triton")
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(63), EPS, backend="triton")
    with pytest.raises(ValueError, match="residual"):
        rms_norm_residual(x, torch.randn(3, 64, dtype=torch.float64), torch.ones(64), EPS, backend="triton")
    with pytest.raises(ValueError, match="x.shape"):
        rms_norm(torch.randn(1, 70000), torch.ones(70000), EPS, backend="triton")


# Launch configurations of the backward with dw (kernels/rms_norm.py: rows per step, stages, programs): each
# program takes the row tiles p, p + P, ...; a tile may hang over the last row; a program may get no tile at all
# (more programs than tiles are clamped) or one more than another; stage 2 sums P partial rows in chunks of
# DW_SUM_ROWS. On the interpreter `stages` is a plain loop, but every value must still trace and run.
BWD_CONFIGS = {
    # 7 rows, tiles of 2: 4 tiles, the last hangs over; 3 programs: program 0 takes tiles 0 and 3
    "rows2_uneven": ((7, 123), dict(rows=2, programs=3, stages=2)),
    # 7 rows, tiles of 4: 2 tiles, the second has 3 real rows
    "rows4_tail": ((7, 123), dict(rows=4, programs=2, stages=3, num_warps=4)),
    # a single row, more programs asked than tiles
    "single_row": ((1, 123), dict(rows=1, programs=4, stages=4)),
    # many programs with one row each: 130 partial rows, more than one stage-2 chunk of DW_SUM_ROWS
    "many_programs": ((130, 40), dict(rows=1, programs=200, stages=2)),
    # rows longer than a stage-2 column block (32) and not a multiple of it, one program for all rows
    "one_program": ((9, 77), dict(rows=2, programs=1, stages=3)),
}


def _bwd_case(shape, dtype, cfg, residual, casting, offset, compute_dw=True, seed=7):
    """dx (and dw) of rms_norm_bwd under launch overrides `cfg`, vs the ref's gradients in fp64, tolerance
    from the ref's gradients in the inputs' own dtype."""
    gen, x, w, res = _inputs(shape, dtype, offset, seed=seed)
    dy = torch.randn(shape, generator=gen).to(dtype)
    dh = torch.randn(shape, generator=gen).to(dtype) if residual else None
    w.requires_grad_(compute_dw)
    with torch.no_grad():
        xd, wd, rd = x.detach().to(DEVICE), w.detach().to(DEVICE), res.detach().to(DEVICE)
        y, h, rstd = rms_norm_fwd(xd, wd, EPS, offset, casting, residual=rd if residual else None)
        dx, dw = rms_norm_bwd(dy.to(DEVICE), dh.to(DEVICE) if residual else None, h if residual else xd, wd, rstd,
                              offset, casting, compute_dw, **cfg)
    assert (dw is None) == (not compute_dw)
    if residual:
        fn, inputs, douts = (lambda x, r, w: rms_norm_residual_ref(x, r, w, EPS, offset, casting),
                             [x, res, w], [dy, dh])
    else:
        fn, inputs, douts = lambda x, w: rms_norm_ref(x, w, EPS, offset, casting), [x, w], [dy]
    want = _outputs_and_grads(fn, [t.double().requires_grad_(t.requires_grad) for t in inputs],
                              [d.double() for d in douts])
    control = _outputs_and_grads(fn, inputs, douts)
    n_out = len(douts)
    got = [dx, dx] if residual else [dx]  # dresidual == dx
    got += [dw] if compute_dw else []
    names = (["dx", "dresidual"] if residual else ["dx"]) + (["dw"] if compute_dw else [])
    for name, g, wnt, c in zip(names, got, want[n_out:], control[n_out:], strict=True):
        assert g.dtype == c.dtype, f"{name}: dtype {g.dtype} != ref's {c.dtype}"
        assert_close_to_ref(g.cpu(), wnt.cpu(), c.cpu(), name)


@pytest.mark.parametrize("case", list(BWD_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_bwd_launch_configs(case, dtype):
    shape, cfg = BWD_CONFIGS[case]
    if case == "many_programs":  # keeps covering a second stage-2 chunk if the constant changes
        assert shape[0] > DW_SUM_ROWS
    _bwd_case(shape, dtype, cfg, residual=False, casting="llama", offset=0.0)


@pytest.mark.parametrize("case", ["rows2_uneven", "single_row", "one_program"])
@pytest.mark.parametrize("casting", ["llama", "gemma"])
def test_rms_norm_residual_bwd_launch_configs(case, casting):
    shape, cfg = BWD_CONFIGS[case]
    _bwd_case(shape, torch.bfloat16, cfg, residual=True, casting=casting, offset=1.0, seed=8)


@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_bwd_frozen_strided_programs(residual):
    # frozen weight with fewer programs than tiles: the same strided row loop, no partial buffer
    _bwd_case((7, 123), torch.bfloat16, dict(rows=2, programs=2, stages=2), residual=residual, casting="llama",
              offset=0.0, compute_dw=False, seed=9)


def test_rms_norm_bwd_config_preconditions():
    x = torch.randn(4, 64, device=DEVICE)
    w = torch.ones(64, device=DEVICE)
    _, _, rstd = rms_norm_fwd(x, w, EPS, 0.0, "llama")
    for bad, match in ((dict(rows=3), "power of two"), (dict(rows=0), "rows"), (dict(stages=0), "stages"),
                       (dict(programs=0), "programs")):
        with pytest.raises(ValueError, match=match):
            rms_norm_bwd(x, None, x, w, rstd, 0.0, "llama", True, **bad)


@pytest.mark.parametrize("backend", ["triton", "ref"])
def test_residual_with_known_total_reads_neither_input(backend):
    """total= (checkpoint recomputation): normalizes the given sum, never reads x or residual (here NaN), and the
    gradients reaching x and residual are bit-identical to those of the run that adds them."""
    g = torch.Generator().manual_seed(0)
    x, r, dy, dh = (torch.randn(5, 123, generator=g).to(DEVICE) for _ in range(4))
    w = torch.randn(123, generator=g).to(DEVICE)
    runs = []
    for known in (False, True):
        xs = (torch.full_like(x, float("nan")) if known else x).requires_grad_()
        rs = (torch.full_like(r, float("nan")) if known else r).requires_grad_()
        y, h = rms_norm_residual(xs, rs, w, 1e-6, backend=backend, total=(x + r) if known else None)
        torch.autograd.backward([y, h], [dy, dh])
        runs.append([y, h, xs.grad, rs.grad])
    for a, b in zip(*runs):
        assert torch.isfinite(a).all() and torch.equal(a, b)
