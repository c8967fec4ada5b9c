"""apply_rope: the Triton kernel (interpreter on CPU) vs rope_ref evaluated in fp64, with the tolerance derived
from the ref run in the kernel's own dtype (tests/tolerance.py)."""
import pytest
import torch

from hare.kernels.rope import RoPEFunction, apply_rope, rope_ref
from tests.tolerance import assert_close_to_ref

# interpreter noise: it converts 1-element arrays to loop bounds with int()
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# CPU: the Triton interpreter (tests/conftest.py); on a GPU machine the same tests run the compiled kernel
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D = 64
P = 40  # table rows


def _tables(d=D, p=P, base=10000.0):
    # built in fp64 and stored as fp32; the fp64 oracle gets the same fp32 values upcast
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(p, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return ang.cos().float(), ang.sin().float()


def _compare(q, k, position_ids, gen, view=None):
    """Output and dq, dk of the kernel vs rope_ref in fp64; control: rope_ref in q's dtype.
    `view(q, k) -> (q, k)` is applied to the leaves inside the graph (e.g. slicing a fused qkv)."""
    cos, sin = _tables()
    view = view or (lambda q, k: (q, k))
    position_ids = position_ids.to(DEVICE)

    def run(fn, q, k, cos, sin, dq, dk):
        q, k = q.detach().to(DEVICE, copy=True).requires_grad_(), k.detach().to(DEVICE, copy=True).requires_grad_()
        cos, sin, dq, dk = cos.to(DEVICE), sin.to(DEVICE), dq.to(DEVICE), dk.to(DEVICE)
        qo, ko = fn(*view(q, k), cos, sin, position_ids)
        return [qo, ko, *torch.autograd.grad([qo, ko], [q, k], [dq, dk])]

    qv, kv = view(q, k)
    dq = torch.randn(qv.shape, generator=gen).to(q.dtype)
    dk = torch.randn(kv.shape, generator=gen).to(k.dtype)
    got = run(lambda *a: apply_rope(*a, backend="triton"), q, k, cos, sin, dq, dk)
    want = run(rope_ref, q.double(), k.double(), cos.double(), sin.double(), dq.double(), dk.double())
    control = run(rope_ref, q, k, cos, sin, dq, dk)
    for name, g, w, c in zip(["q_out", "k_out", "dq", "dk"], got, want, control):
        assert g.dtype == c.dtype, f"{name}: dtype {g.dtype} != ref's {c.dtype}"
        assert_close_to_ref(g, w, c, name)


def _qk(B, T, Hq, Hk, dtype, gen):
    q = (torch.randn(B, T, Hq, D, generator=gen) * 2).to(dtype)
    k = (torch.randn(B, T, Hk, D, generator=gen) * 2).to(dtype)
    return q, k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_gqa_random_positions(dtype):
    gen = torch.Generator().manual_seed(0)
    q, k = _qk(2, 7, 9, 3, dtype, gen)  # odd tokens and heads, Hq != Hk
    pos = torch.randint(0, P, (2, 7), generator=gen)
    _compare(q, k, pos, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_packed_positions_restart_at_zero(dtype):
    gen = torch.Generator().manual_seed(1)
    q, k = _qk(2, 11, 5, 1, dtype, gen)
    # row 0 packs three documents (5 + 4 + 2 tokens), row 1 one document; int32 ids
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1], list(range(11))], dtype=torch.int32)
    _compare(q, k, pos, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_single_token(dtype):
    gen = torch.Generator().manual_seed(2)
    q, k = _qk(3, 1, 7, 7, dtype, gen)  # decode step: one token per sequence, each at its own position
    _compare(q, k, torch.tensor([[39], [0], [17]]), gen)


def test_rope_positions_shared_by_batch():
    gen = torch.Generator().manual_seed(3)
    q, k = _qk(3, 5, 4, 2, torch.bfloat16, gen)
    _compare(q, k, torch.arange(3, 8)[None, :], gen)  # (1, T), broadcast over B as in the ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_views_of_fused_qkv(dtype):
    # q and k sliced from one fused projection output: strided over tokens, head_dim contiguous
    gen = torch.Generator().manual_seed(4)
    B, T, Hq, Hk = 2, 5, 6, 2
    qkv = (torch.randn(B, T, (Hq + 2 * Hk) * D, generator=gen) * 2).to(dtype)
    q0, k0 = qkv[..., : Hq * D], qkv[..., Hq * D:(Hq + Hk) * D]

    def view(q, k):
        return q.view(B, T, Hq, D), k.view(B, T, Hk, D)

    assert not view(q0, k0)[0].is_contiguous()
    _compare(q0, k0, torch.randint(0, P, (B, T), generator=gen), gen, view=view)


def test_backend_dispatch():
    gen = torch.Generator().manual_seed(5)
    q, k = _qk(1, 3, 2, 1, torch.float32, gen)
    q.requires_grad_()
    cos, sin = _tables()
    pos = torch.arange(3)[None]
    qo, ko = apply_rope(q, k, cos, sin, pos)  # CPU, backend=None: the ref path, bit for bit
    rq, rk = rope_ref(q, k, cos, sin, pos)
    assert torch.equal(qo, rq) and torch.equal(ko, rk)
    assert "RoPEFunction" not in type(qo.grad_fn).__name__
    dev = [t.to(DEVICE) for t in (q, k, cos, sin, pos)]
    qo, _ = apply_rope(*dev, backend="triton")
    assert type(qo.grad_fn).__name__ == RoPEFunction.__name__ + "Backward"
    if DEVICE == "cuda":  # backend=None on CUDA tensors: the kernel
        assert type(apply_rope(*dev)[0].grad_fn).__name__ == RoPEFunction.__name__ + "Backward"
    with pytest.raises(ValueError, match="backend"):
        apply_rope(q, k, cos, sin, pos, backend="gpu")


def test_preconditions():
    gen = torch.Generator().manual_seed(6)
    q, k = _qk(2, 3, 4, 2, torch.float32, gen)
    cos, sin = _tables()
    pos = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="k"):
        apply_rope(q, k[:, :2], cos, sin, pos, backend="triton")
    with pytest.raises(ValueError, match="head_dim"):
        apply_rope(torch.randn(2, 3, 4, 2 * D)[..., ::2], k, cos, sin, pos, backend="triton")  # head_dim stride 2
    with pytest.raises(ValueError, match="cos"):
        apply_rope(q, k, cos.double(), sin, pos, backend="triton")
    with pytest.raises(ValueError, match="cos"):
        apply_rope(q, k, cos.requires_grad_(), sin, pos, backend="triton")
    cos.requires_grad_(False)
    with pytest.raises(ValueError, match="position_ids"):
        apply_rope(q, k, cos, sin, pos.float(), backend="triton")
    with pytest.raises(ValueError, match="position_ids"):
        apply_rope(q, k, cos, sin, pos[:, :2], backend="triton")
