"""Triton attention vs attention_ref (fp64 truth; control = the ref in the kernel's dtype).

On CPU the kernels run in the Triton interpreter with 32 x 16 blocks (kernels/attention.py: _config), so
T = 129 crosses several query and key blocks, diagonal tiles, interior tiles, skipped tiles and document edges.
The GPU runs the same tests with its own blocks, plus the long and wide cases the interpreter is too slow for.
test_launch_variants runs the launch variants that tools/sweep_attention.py may pick (no split, other block
shapes) through the same checks.
"""
import importlib

import pytest
import torch

from hare.kernels.attention import attention, attention_doc_tables, attention_ref
from tests.tolerance import assert_close_to_ref

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
# fp32 checks the algorithm to ~1e-6; fp16/bf16 check the rounding of P and dS to the input dtype before the
# tensor-core products. The interpreter's bf16 runs through the fp32 upcast (see kernels/_dispatch.py).
LOW = [torch.float16, torch.bfloat16] if CUDA else [torch.float16]
DTYPES = [torch.float32] + LOW
gpu_only = pytest.mark.skipif(not CUDA, reason="too slow for the Triton interpreter")


def docs_from_lengths(rows):
    """(B, T) document ids from per-row document lengths (each row's lengths sum to T)."""
    return torch.tensor([[d for d, n in enumerate(lens) for _ in range(n)] for lens in rows], device=DEV)


# the module (hare.kernels re-exports the function under the same name), for the launch variants
A = importlib.import_module("hare.kernels.attention")


def check(B, T, Hq, Hk, D, dtype, seed=0, cfg=None, **kw):
    """Output and gradients of the Triton path vs the fp64 ref, control = the ref in `dtype`. cfg: a launch
    configuration (kernels/attention.py `_config`) run through the internal launchers instead of the default."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, T, h, D, generator=g).to(DEV) for h in (Hq, Hk, Hk, Hq))

    def run(fn, dt):
        leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
        o = fn(*leaves, **kw)
        return (o, *torch.autograd.grad(o, leaves, do.to(dt)))

    if cfg is None:
        out = run(lambda *a, **k_: attention(*a, backend="triton", **k_), dtype)
    else:
        out = run_config(cfg, *(t.to(dtype) for t in (q, k, v, do)), **kw)
    ref64 = run(attention_ref, torch.float64)
    control = run(attention_ref, dtype)
    self_only = T == 1 or kw.get("window") == 1
    for name, a, r, c in zip(("out", "dq", "dk", "dv"), out, ref64, control):
        assert a.dtype == dtype, name
        if self_only and name in ("dq", "dk"):
            bound = _self_only_residue_bound(q, k, v, do, dtype, kw.get("scale"))[name]
            assert r.abs().max() == 0 and c.abs().max() == 0, name
            assert (a.double().abs() <= bound).all(), f"{name}: {a.abs().max():.3e} > fp32 residue bound"
        else:
            assert_close_to_ref(a, r, c, name=name)


def run_config(cfg, q, k, v, do, scale=None, doc_ids=None, window=None, softcap=None):
    """(o, dq, dk, dv) from the launchers with launch configuration `cfg`."""
    tables = None if doc_ids is None else attention_doc_tables(doc_ids)
    o, lse = A._attention_fwd(q, k, v, scale, tables, window, softcap, cfg)
    return (o, *A._attention_bwd(do, q, k, v, o, lse, scale, tables, window, softcap, cfg))


def _self_only_residue_bound(q, k, v, do, dtype, scale=None):
    """Each query sees only itself (T = 1 or window = 1): dq = dk = 0 exactly, and the control is exactly 0 too
    (torch's softmax backward p (g - sum p g) with p = 1), so 2x the control allows nothing. The kernel forms
    dS = P (dP - delta) from dP = dO.v (a dot) and delta = dO.O (a row sum; O = v here): the same D exact products
    summed in two orders in fp32, so |dS| <= 2 gamma_D sum_d |dO_d v_d|, gamma_D = D u / (1 - D u), u = 2^-24
    (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5). Then dq = scale dS k and
    dk = scale sum over the group's q heads of dS q; dS and the result are each rounded to `dtype` (relative eps,
    plus half the subnormal spacing for fp16)."""
    D, group = q.shape[-1], q.shape[2] // k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    qd, kd, vd, dod = (t.to(dtype).double() for t in (q, k, v, do))
    u = 2.0 ** -24
    gamma = D * u / (1 - D * u)
    fi = torch.finfo(dtype)
    rnd = lambda x: x * (1 + fi.eps) * (1 + 4 * u) + fi.smallest_normal * fi.eps / 2
    ds = rnd(2 * gamma * (dod.abs() * vd.repeat_interleave(group, 2).abs()).sum(-1, keepdim=True))  # (B, T, Hq, 1)
    dq = rnd(scale * ds * kd.repeat_interleave(group, 2).abs())
    dk = rnd(scale * (ds * qd.abs()).unflatten(2, (k.shape[2], group)).sum(3))
    return {"dq": dq, "dk": dk}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 17, 129])
def test_lengths(T, dtype):
    check(1, T, 2, 1, 64, dtype)


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 80, 96, 128, 256])
def test_long_head_dims(D, dtype):
    check(2, 1000, 4, 2, D, dtype)


@gpu_only
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("D", [64, 128, 256])
def test_long_all_features(D, dtype):
    docs = docs_from_lengths([[300, 1, 99, 600], [1000]])
    check(2, 1000, 8, 1, D, dtype, doc_ids=docs, window=257, softcap=20.0, scale=0.2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_documents_unequal(dtype):
    # Row 0: four documents, one of length 1 and one shorter than a block; row 1: two documents.
    docs = docs_from_lengths([[50, 3, 1, 75], [10, 119]])
    check(2, 129, 2, 1, 64, dtype, doc_ids=docs)


def test_precomputed_doc_tables():
    # The decoder computes the tables once per batch; same results as computing them inside the call.
    docs = docs_from_lengths([[7, 26]])
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 33, h, 16, generator=g).to(DEV) for h in (2, 1))
    a = attention(q, k, k, doc_ids=docs, backend="triton")
    b = attention(q, k, k, doc_ids=docs, backend="triton", doc_tables=attention_doc_tables(docs))
    assert torch.equal(a, b)
    # and the given tables are the ones read: another layout's tables change the result
    c = attention(q, k, k, doc_ids=docs, backend="triton", doc_tables=attention_doc_tables(docs_from_lengths([[20, 13]])))
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="doc_tables"):
        attention(q, k, k, backend="triton", doc_tables=attention_doc_tables(docs))


def test_documents_interleaved_ids():
    # The mask is "same id", not "same contiguous run": ids that reappear later must still see each other.
    g = torch.Generator().manual_seed(1)
    docs = torch.randint(0, 3, (2, 65), generator=g).to(DEV) - 7
    check(2, 65, 2, 2, 32, torch.float32, doc_ids=docs)


def test_doc_tables():
    docs = torch.tensor([[5, 5, 9, 9, 9, 5, -1]], device=DEV)
    doc, first, last, run = attention_doc_tables(docs).cpu()
    assert doc.tolist() == [[1, 1, 2, 2, 2, 1, 0]]
    assert first.tolist() == [[0, 0, 2, 2, 2, 0, 6]]
    assert last.tolist() == [[5, 5, 4, 4, 4, 5, 6]]
    assert run.tolist() == [[0, 0, 2, 2, 2, 5, 6]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [2, 16, 40, 200])
def test_window(window, dtype):
    check(1, 129, 2, 1, 64, dtype, window=window)


@pytest.mark.parametrize("dtype", LOW)
def test_window_one(dtype):
    # Each query sees only itself: out = v, and dq = dk = 0 exactly, since dS = P (dP - delta) with dP = delta.
    # The kernel forms dP = dO.v (a tensor-core dot) and delta = dO.O (a row sum) in different orders, so it
    # returns a residue of a few fp32 ulps of |dO||v| (~1e-6), which the fp32 floor (4 ulps of max(|ref|, 1) =
    # 1) cannot see; in fp16/bf16 the floor covers it. fp32 windows start at 2 (test_window).
    check(1, 129, 2, 1, 64, dtype, window=1)


@pytest.mark.parametrize("Hq,Hk", [(2, 2), (4, 1), (8, 1), (8, 2)])
def test_gqa(Hq, Hk):
    check(1, 65, Hq, Hk, 32, torch.float32)


def test_gqa_low_precision():
    check(1, 65, 8, 1, 32, LOW[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap,scale", [(5.0, None), (5.0, 0.5), (None, 0.37)])
def test_softcap_and_scale(softcap, scale, dtype):
    # scale 0.5 makes logits of a few units, so cap 5 is well into tanh's nonlinear range.
    check(1, 129, 2, 1, 64, dtype, softcap=softcap, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_head_dim_80_all_features(dtype):
    docs = docs_from_lengths([[60, 2, 67]])
    check(1, 129, 2, 1, 80, dtype, doc_ids=docs, window=33, softcap=8.0, scale=0.3)


def test_bf16_all_features():
    docs = docs_from_lengths([[20, 45]])
    check(1, 65, 4, 2, 64, torch.bfloat16, doc_ids=docs, window=24, softcap=10.0)


def test_noncontiguous_inputs():
    # q/k/v as slices of a fused qkv projection (row stride != H * D), the layout a fused projection gives.
    g = torch.Generator().manual_seed(2)
    B, T, D = 1, 33, 32
    qkv = torch.randn(B, T, 4 + 2 + 2, D, generator=g).to(DEV)
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    out = attention(q, k, v, backend="triton", window=9)
    ref64 = attention_ref(q.double(), k.double(), v.double(), window=9)
    assert_close_to_ref(out, ref64, attention_ref(q, k, v, window=9))


def test_backend_choice():
    q = torch.randn(1, 5, 2, 16)
    k = torch.randn(1, 5, 1, 16)
    assert torch.equal(attention(q, k, k), attention_ref(q, k, k))  # CPU tensors, backend=None: ref
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, k, backend="cuda")


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=0), "window"),
    (dict(window=2.5), "window"),
    (dict(softcap=0.0), "softcap"),
    (dict(doc_ids=torch.zeros(1, 5)), "doc_ids"),
    (dict(doc_ids=torch.zeros(1, 4, dtype=torch.long)), "doc_ids"),
])
def test_errors(kwargs, match):
    q = torch.randn(1, 5, 2, 16, device=DEV)
    k = torch.randn(1, 5, 1, 16, device=DEV)
    kwargs = {n: (a.to(DEV) if torch.is_tensor(a) else a) for n, a in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        attention(q, k, k, backend="triton", **kwargs)


def test_shape_errors():
    q = torch.randn(1, 5, 3, 16, device=DEV)
    with pytest.raises(ValueError, match="multiple"):
        attention(q, torch.randn(1, 5, 2, 16, device=DEV), torch.randn(1, 5, 2, 16, device=DEV), backend="triton")
    with pytest.raises(ValueError, match="dtype"):
        attention(q, q.half(), q, backend="triton")
    with pytest.raises(ValueError, match="head dim"):
        big = torch.randn(1, 2, 1, 320, device=DEV)
        attention(big, big, big, backend="triton")


# Launch variants (kernels/attention.py KernelConfig), each of which tools/sweep_attention.py may time and pick:
# without the interior/edge split (the D 128 GPU default's dK/dV), and block shapes with the other side larger
# (BLOCK_N > BLOCK_M in the forward and dQ, BLOCK_M > BLOCK_N in dK/dV) than the default interpreter blocks, so
# every boundary formula of _key_range / _query_range meets both orders.
K = A.KernelConfig
VARIANTS = {
    "unsplit": dict(fwd=K(32, 16, 4, 1, split=False), dkdv=K(16, 32, 4, 1, split=False),
                    dq=K(32, 16, 4, 1, split=False)),
    "swapped_blocks": dict(fwd=K(16, 32, 4, 1), dkdv=K(32, 16, 4, 1), dq=K(16, 32, 4, 1)),
}
VARIANT_CASES = {
    "causal_gqa": dict(B=1, T=100, Hq=4, Hk=1, D=32),
    "window_softcap_d80": dict(B=1, T=100, Hq=2, Hk=1, D=80, window=40, softcap=8.0, scale=0.3),
    "small_window": dict(B=1, T=100, Hq=2, Hk=2, D=32, window=7),
    "docs_window": dict(B=2, T=97, Hq=2, Hk=1, D=32, window=33),
}


@pytest.mark.parametrize("case", list(VARIANT_CASES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_launch_variants(variant, case):
    kw = dict(VARIANT_CASES[case])
    if case == "docs_window":
        kw["doc_ids"] = docs_from_lengths([[40, 1, 56], [97]])
    shape = [kw.pop(n) for n in ("B", "T", "Hq", "Hk", "D")]
    check(*shape, LOW[0], cfg=VARIANTS[variant], **kw)


def test_launch_variant_fp32():
    # fp32 runs the ieee products, and its tighter control catches a wrong mask or range more easily.
    check(1, 90, 4, 2, 32, torch.float32, cfg=VARIANTS["unsplit"], window=50)
    check(1, 90, 4, 2, 32, torch.float32, cfg=VARIANTS["swapped_blocks"], window=50)


@pytest.mark.parametrize("D", [64, 128, 256])
def test_devices_with_less_shared_memory_take_the_small_config(D):
    """The tuned configs need a Hopper's 227 KB of shared memory per block; an A100 (166912 bytes) or a consumer
    GPU gets the small ones (~50 KB), the H200 the tuned ones."""
    small, tuned = A._small_config(D), A._config(D, False, torch.bfloat16, smem=A.TUNED_SMEM)
    for smem in (166912, 101376):
        assert A._config(D, False, torch.bfloat16, smem=smem) == small
        assert A._config(D, False, torch.bfloat16, docs=True, smem=smem) == small
    assert tuned != small and A._config(D, False, torch.bfloat16) == tuned
    assert all(c.block_m * c.block_n <= 64 * 32 and c.stages <= 2 for c in small.values())
