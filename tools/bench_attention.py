"""GPU benchmark: hare's Triton attention vs SDPA's backends and FlexAttention (issue 7). CUDA only.

    python -m hare.tools.bench_attention --out bench_attention.json      (also writes bench_attention.md)
    python -m hare.tools.bench_attention --sweep --out sweep.json        (block-size sweep for kernels/attention.py,
                                                                          head dims 128/64/256; for D 128 the
                                                                          fuller variant sweep with checks is
                                                                          tools/sweep_attention.py)

FLOPs: a causal forward counts half of dense, 4 * B * Hq * T^2 * D / 2; masked cases (documents, windows) count
only the visible pairs, 4 * B * Hq * D * n_visible, so TFLOP/s are comparable across providers of one case.
Forward+backward counts 3.5x the forward (the backward is 2.5x: FlashAttention-2's convention, Dao 2023); time
in ms is in the table too. GQA in SDPA: enable_gqa=True where the backend takes it, else k/v are
repeat_interleave'd inside the timed function (as a model would have to), marked "rep" in the table.
"""
import argparse
import gc
import json
import time
from pathlib import Path

import torch


def _import_hare():
    # Needs hare importable (`make install`, i.e. pip install -e .). The module, not the function that
    # hare.kernels re-exports under the same name.
    import importlib
    return importlib.import_module("hare.kernels.attention")


def bench(fn, grad_to_none=None):
    import triton.testing

    fn()  # compile / warm up outside the timed region
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none)


def make_inputs(B, T, Hq, Hk, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, T, Hk, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, T, Hk, D, device="cuda", dtype=dtype, generator=g)
    do = torch.randn(B, T, Hq, D, device="cuda", dtype=dtype, generator=g)
    return q, k, v, do


def doc_lengths(T, n, seed):
    """n documents of unequal lengths summing to T (lengths from a seeded Dirichlet-like split)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g) + 0.2
    lens = (w / w.sum() * T).floor().long().clamp(min=1)
    lens[-1] = T - lens[:-1].sum()
    assert lens.min() > 0 and lens.sum() == T
    return lens.tolist()


def visible_pairs(T, window=None, lens=None):
    if lens is not None:
        return sum(n * (n + 1) // 2 for n in lens)
    if window is None or window >= T:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


# ------------------------------------------------------------------------------------------------------------------
# Providers: each returns a function (q, k, v) -> out taking hare's (B, T, H, D) layout.
# ------------------------------------------------------------------------------------------------------------------


def hare_fn(A, doc_ids=None, window=None, doc_tables=None):
    return lambda q, k, v: A.attention(q, k, v, doc_ids=doc_ids, window=window, backend="triton",
                                       doc_tables=doc_tables)


def sdpa_fn(backend, gqa_mode, mask=None):
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def f(q, k, v):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # views: SDPA's (B, H, T, D)
        kw = {}
        if gqa_mode == "gqa":
            kw["enable_gqa"] = True
        elif gqa_mode == "rep":
            r = q.shape[2] // k.shape[2]
            kt, vt = kt.repeat_interleave(r, 1), vt.repeat_interleave(r, 1)
        with sdpa_kernel(backend):
            if mask is None:
                o = sdpa(qt, kt, vt, is_causal=True, **kw)
            else:
                o = sdpa(qt, kt, vt, attn_mask=mask, **kw)
        return o.transpose(1, 2)

    return f


def flex_fn(B, T, Hq, mask_mod):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # _compile: build the block mask blockwise; the eager path materializes B x T x T intermediates (OOM at 8k).
    block_mask = create_block_mask(mask_mod, B, None, T, T, device="cuda", _compile=True)
    compiled = torch.compile(flex_attention, dynamic=False)

    def f(q, k, v):
        o = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                     enable_gqa=True)
        return o.transpose(1, 2)

    return f


def masks(doc_ids=None, window=None):
    def mask_mod(b, h, qi, ki):
        m = ki <= qi
        if window is not None:
            m = m & (qi - ki < window)
        if doc_ids is not None:
            m = m & (doc_ids[b, qi] == doc_ids[b, ki])
        return m

    return mask_mod


def time_provider(fn, q, k, v, do, modes):
    res = {}
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    for mode in modes:
        if mode == "fwd":
            with torch.no_grad():
                ms = bench(lambda: fn(q, k, v))
        else:
            ms = bench(lambda: fn(*leaves).backward(do), grad_to_none=leaves)
        res[mode] = ms
    return res


def run_case(A, name, B, T, Hq, Hk, D, dtype, providers, modes, flops_fwd, ref_provider="hare"):
    q, k, v, do = make_inputs(B, T, Hq, Hk, D, dtype)
    rows = []
    outs = {}
    for pname, make in providers:
        row = dict(case=name, provider=pname, B=B, T=T, Hq=Hq, Hk=Hk, D=D)
        try:
            fn = make()
            with torch.no_grad():
                outs[pname] = fn(q, k, v).float()
            for mode, ms in time_provider(fn, q, k, v, do, modes).items():
                mult = 1.0 if mode == "fwd" else 3.5
                row[f"{mode}_ms"] = ms
                row[f"{mode}_tflops"] = flops_fwd * mult / ms / 1e9
        except Exception as e:  # a backend that refuses the case (e.g. GQA or a mask) is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if pname in outs and ref_provider in outs and pname != ref_provider:
            row["max_abs_diff_vs_hare"] = (outs[pname] - outs[ref_provider]).abs().max().item()
        rows.append(row)
        print(json.dumps(row), flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main_bench(args):
    A = _import_hare()
    from torch.nn.attention import SDPBackend

    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16)[args.dtype]
    Hq, Hk, D = 32, 8, 128
    modes = ["fwd", "fwd_bwd"]
    rows = []
    sdpa_backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)]

    # 1. Causal GQA, ~32k tokens per batch.
    for T in (args.seqs if "causal" in args.cases else []):
        B = max(1, 32768 // T)
        fl = 4 * B * Hq * D * visible_pairs(T)
        providers = [("hare", lambda: hare_fn(A))]
        for bname, be in sdpa_backends:
            providers.append((f"sdpa-{bname}[gqa]", lambda be=be: sdpa_fn(be, "gqa")))
            providers.append((f"sdpa-{bname}[rep]", lambda be=be: sdpa_fn(be, "rep")))
        if not args.no_flex:
            providers.append(("flex", lambda B=B, T=T: flex_fn(B, T, Hq, masks())))
        rows += run_case(A, f"causal T={T}", B, T, Hq, Hk, D, dtype, providers, modes, fl)

    # 2. Packed rows: 16 documents of unequal length in each 8k row.
    if "packed" in args.cases:
        rows += packed_case(A, args, dtype, Hq, Hk, D, modes, sdpa_backends)

    # 3. Sliding window 4096.
    for T in [t for t in args.seqs if t > 4096 and "window" in args.cases]:
        B = max(1, 32768 // T)
        W = 4096
        fl = 4 * B * Hq * D * visible_pairs(T, window=W)
        providers = [("hare", lambda W=W: hare_fn(A, window=W))]
        if not args.no_flex:
            providers.append(("flex+window", lambda B=B, T=T, W=W: flex_fn(B, T, Hq, masks(window=W))))
        rows += run_case(A, f"window {W} T={T}", B, T, Hq, Hk, D, dtype, providers, modes, fl)
    return rows


def packed_case(A, args, dtype, Hq, Hk, D, modes, sdpa_backends):
    T, B = 8192, 4
    lens = [doc_lengths(T, 16, seed=b) for b in range(B)]
    doc_ids = torch.tensor([[d for d, n in enumerate(ls) for _ in range(n)] for ls in lens], device="cuda")
    fl = 4 * Hq * D * sum(visible_pairs(T, lens=ls) for ls in lens)
    dense = (doc_ids[:, :, None] == doc_ids[:, None, :]) & torch.ones(T, T, dtype=torch.bool, device="cuda").tril()
    dense = dense[:, None]  # (B, 1, T, T) boolean block-diagonal causal mask
    tables = A.attention_doc_tables(doc_ids)
    providers = [("hare", lambda: hare_fn(A, doc_ids=doc_ids)),
                 ("hare, doc tables precomputed", lambda: hare_fn(A, doc_ids=doc_ids, doc_tables=tables))]
    for bname, be in sdpa_backends:
        providers.append((f"sdpa-{bname}[rep]+mask", lambda be=be: sdpa_fn(be, "rep", mask=dense)))
    if not args.no_flex:
        providers.append(("flex+docmask", lambda: flex_fn(B, T, Hq, masks(doc_ids=doc_ids))))
    rows = run_case(A, "packed 16 docs T=8192", B, T, Hq, Hk, D, dtype, providers, modes, fl)
    # The doc tables (a sort and a few scans, computed once per forward) are inside hare's times above.
    ms = bench(lambda: A.attention_doc_tables(doc_ids))
    rows.append(dict(case="packed 16 docs T=8192", provider="hare: attention_doc_tables alone", B=B, T=T,
                     Hq=Hq, Hk=Hk, D=D, fwd_ms=ms))
    print(json.dumps(rows[-1]), flush=True)
    return rows


def main_sweep(args):
    """Time each kernel config of kernels/attention.py: forward, and the backward with one kernel varied."""
    A = _import_hare()
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16)[args.dtype]
    rows = []
    # (BLOCK_M, BLOCK_N, warps, stages) per kernel; each is timed with the interior/edge split and without
    # (kernels/attention.py KernelConfig.split). D 128 has a fuller sweep in tools/sweep_attention.py.
    cands = {
        128: dict(fwd=[(128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3)],
                  dkdv=[(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3)],
                  dq=[(128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 2)]),
        64: dict(fwd=[(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4)],
                 dkdv=[(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3)],
                 dq=[(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3)]),
        256: dict(fwd=[(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
                  dkdv=[(32, 64, 8, 2), (64, 64, 8, 1), (32, 64, 8, 1)],
                  dq=[(128, 32, 8, 2), (64, 32, 4, 2), (64, 64, 4, 2)]),
    }
    if args.packed:  # the packed-rows case of the comparison, doc tables precomputed (documents never split)
        cands = {128: dict(fwd=[(128, 64, 8, 4), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 8, 3)],
                           dkdv=[(64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 8, 3)],
                           dq=[(128, 64, 8, 4), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3)])}
    splits = (True,) if args.packed else (True, False)
    T = 8192
    for D in args.dims:
        B = 4
        Hq, Hk = 32, 8
        q, k, v, do = make_inputs(B, T, Hq, Hk, D, dtype)
        base = A._config(D, False, dtype, args.packed)
        tables = None
        fl = 4 * B * Hq * D * visible_pairs(T)
        if args.packed:
            lens = [doc_lengths(T, 16, seed=b) for b in range(B)]
            tables = A.attention_doc_tables(torch.tensor(
                [[d for d, n in enumerate(ls) for _ in range(n)] for ls in lens], device="cuda"))
            fl = 4 * Hq * D * sum(visible_pairs(T, lens=ls) for ls in lens)
        o, lse = A._attention_fwd(q, k, v, None, tables, None, None, base)
        for part in ("fwd", "dkdv", "dq"):
            for c, split in ((c, split) for c in cands[D][part] for split in splits):
                cfg = dict(base, **{part: A.KernelConfig(*c, split=split)})
                row = dict(D=D, part=part, cfg=c, split=split, T=T, B=B)
                try:
                    if part == "fwd":
                        ms = bench(lambda: A._attention_fwd(q, k, v, None, tables, None, None, cfg))
                        row["tflops"] = fl / ms / 1e9
                    else:
                        ms = bench(lambda: A._attention_bwd(do, q, k, v, o, lse, None, tables, None, None, cfg))
                        row["bwd_tflops"] = 2.5 * fl / ms / 1e9
                    row["ms"] = ms
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def to_markdown(rows, sweep):
    if sweep:
        lines = ["| D | kernel | BLOCK_M, BLOCK_N, warps, stages | split | ms | TFLOP/s |", "|---|---|---|---|---|---|"]
        for r in rows:
            tf = r.get("tflops", r.get("bwd_tflops"))
            lines.append(f"| {r['D']} | {r['part']} | {r['cfg']} | {r['split']} | {r.get('ms', float('nan')):.3f} | "
                         f"{tf if tf is None else round(tf, 1)} {r.get('error', '')} |")
        return "\n".join(lines) + "\n"
    lines = ["| case | provider | B | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key, nd=2):
            return f"{r[key]:.{nd}f}" if key in r else "-"
        note = r.get("error", "")
        if "max_abs_diff_vs_hare" in r:
            note = f"max diff vs hare {r['max_abs_diff_vs_hare']:.1e}"
        lines.append(f"| {r['case']} | {r['provider']} | {r['B']} | {f('fwd_ms', 3)} | {f('fwd_tflops', 1)} | "
                     f"{f('fwd_bwd_ms', 3)} | {f('fwd_bwd_tflops', 1)} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_attention.json"))
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles take minutes)")
    p.add_argument("--cases", nargs="+", default=["causal", "packed", "window"],
                   choices=["causal", "packed", "window"])
    p.add_argument("--sweep", action="store_true", help="block-size sweep instead of the comparison")
    p.add_argument("--dims", type=int, nargs="+", default=[128, 64, 256], help="head dims for --sweep")
    p.add_argument("--packed", action="store_true", help="--sweep on the packed-rows case (D 128)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA GPU")
    t0 = time.time()
    rows = main_sweep(args) if args.sweep else main_bench(args)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, dtype=args.dtype,
                seconds=round(time.time() - t0, 1))
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    md = to_markdown(rows, args.sweep)
    args.out.with_suffix(".md").write_text(f"{json.dumps(meta)}\n\n{md}")
    print(md)


if __name__ == "__main__":
    main()
