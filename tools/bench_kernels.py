"""GPU benchmark of hare's fused kernels (issue 3) at Llama-3.1-8B shapes, vs eager PyTorch (`<op>_ref`) and
vs `torch.compile(<op>_ref)`. CUDA only, except --cpu-smoke.

    python -m hare.tools.bench_kernels --out bench_kernels.json     (markdown table on stdout, all numbers in JSON)
    python -m hare.tools.bench_kernels --sweep --out sweep.json     (block / warp sweep behind the kernels' constants)
    python -m hare.tools.bench_kernels --cpu-smoke                  (tiny shapes, ref path, CPU: checks the wiring)

Layout: one `bench_<op>(ctx)` per op, listed in SECTIONS; each returns rows
    {"op", "tokens", "pass": "fwd" | "fwd+bwd", "impl": "hare" | "eager" | "compile", "ms", "bytes", "gbps",
     "copy_frac", "peak_mib"}
and main() prints them pivoted into one table. "hare" is the public op (Triton), "eager" the `_ref` in eager
PyTorch, "compile" `torch.compile(_ref)`; all three run the same inputs through the same harness.

Bytes are those of the minimal algorithm (each input read once, each output written once; bf16 = 2 bytes);
fwd+bwd counts both passes over their summed time. GB/s are compared with a device-to-device copy measured in the
same run (`dst.copy_(src)` on 1 GiB: 2 * bytes / time). Peak memory is the allocator's peak above what was
allocated before the call (outputs and saved tensors included), one call, in MiB.
Targets (issue 3): each memory-bound kernel >= 80% of copy bandwidth and faster than torch.compile of its ref;
main() lists the misses under the table.
"""
import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# Llama-3.1-8B (config.json of meta-llama/Llama-3.1-8B)
LLAMA_8B = dict(hidden=4096, intermediate=14336, head_dim=128, q_heads=32, kv_heads=8)
SMOKE = dict(hidden=256, intermediate=384, head_dim=32, q_heads=4, kv_heads=2)
TOKENS = (8192, 16384)
IMPLS = ("hare", "eager", "compile")
BF16 = 2  # bytes


class Ctx:
    """What every section needs: shapes, device, backend for "hare", the timer and the copy bandwidth."""

    def __init__(self, smoke, tokens, skip_compile=False):
        self.smoke = smoke
        self.skip_compile = skip_compile
        self.device = "cpu" if smoke else "cuda"
        self.dtype = torch.bfloat16
        self.shape = SMOKE if smoke else LLAMA_8B
        self.tokens = tokens
        self.backend = "ref" if smoke else "triton"  # no interpreter in the smoke run: the wiring is what's checked
        self.copy_gbps = None

    def randn(self, *shape, scale=1.0, requires_grad=False):
        t = (torch.randn(*shape, device=self.device, dtype=torch.float32) * scale).to(self.dtype)
        return t.requires_grad_(requires_grad)

    def time_ms(self, fn, graph=True):
        if self.smoke:
            fn()
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        import triton.testing

        fn()  # compile / autotune / warm up outside the timed region
        torch.cuda.synchronize()
        # GPU time: the calls are replayed from a CUDA graph, so Python, autograd and launch overhead (~0.1-0.2 ms
        # per fwd+bwd on the H200 machine, larger than a 64 MiB kernel) stay out; in training they overlap the
        # GPU work of the matmuls. No L2 flush between replays: every timed working set is >= 2x the 60 MB L2.
        if not graph:
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception as e:  # an impl that cannot be captured is timed with launches (and says so)
            print(f"  (graph capture failed: {type(e).__name__}: {e}; timing with launches)", file=sys.stderr)
            torch.cuda.synchronize()
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def peak_mib(self, fn):
        if self.smoke:
            return None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak / 2**20

    def compile(self, fn):
        if self.smoke or self.skip_compile:
            return None  # torch.compile on CPU needs a C++ toolchain; the GPU run is the one that matters
        return torch.compile(fn, dynamic=False)


def copy_bandwidth(ctx):
    """Device-to-device copy of 1 GiB: GB/s = 2 * bytes / time (read + write). Timed with launches, not a graph:
    a captured copy_ becomes a copy-engine memcpy node, which ran at 2.8 TB/s against 4.2 TB/s launched (H200)."""
    n = (2**30 if not ctx.smoke else 2**24) // BF16
    src = torch.randn(n, device=ctx.device, dtype=torch.float32).to(ctx.dtype)
    dst = torch.empty_like(src)
    ms = ctx.time_ms(lambda: dst.copy_(src), graph=False)
    return 2 * n * BF16 / ms / 1e6


def _fwd(fn, args):
    def run():
        with torch.no_grad():
            return fn(*args)
    return run


def _fwd_bwd(fn, args, douts):
    """Forward, then gradients of every input that requires grad (torch.autograd.grad: no .grad accumulation)."""
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def run():
        outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return torch.autograd.grad(outs, leaves, douts)
    return run


def _measure(ctx, op, tokens, impls, args, douts, fwd_bytes, bwd_bytes):
    """impls: {"hare": fn, "eager": fn, "compile": fn or None}; each fn(*args) -> output(s)."""
    rows = []
    for impl, fn in impls.items():
        if fn is None:
            continue
        for pas, run, nbytes in (("fwd", _fwd(fn, args), fwd_bytes),
                                 ("fwd+bwd", _fwd_bwd(fn, args, douts), fwd_bytes + bwd_bytes)):
            ms = ctx.time_ms(run)
            gbps = nbytes / ms / 1e6
            print(f"  {op} {tokens} {pas} {impl}: {ms:.4f} ms {gbps:.0f} GB/s", file=sys.stderr, flush=True)
            rows.append(dict(op=op, tokens=tokens, impl=impl, ms=ms, bytes=nbytes, gbps=gbps,
                             copy_frac=gbps / ctx.copy_gbps if ctx.copy_gbps else None,
                             peak_mib=ctx.peak_mib(run), **{"pass": pas}))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Sections: one per op
# ----------------------------------------------------------------------------------------------------------------


def bench_rms_norm(ctx):
    """Llama casting, offset 0. Trainable weight (dx and the two-stage dw) and frozen weight (LoRA: dx only)."""
    from hare.kernels.rms_norm import rms_norm, rms_norm_ref

    n, eps = ctx.shape["hidden"], 1e-5
    rows = []
    for tokens in ctx.tokens:
        for frozen in (False, True):
            x = ctx.randn(tokens, n, requires_grad=True)
            w = (1 + 0.1 * ctx.randn(n)).requires_grad_(not frozen)
            dy = ctx.randn(tokens, n)
            # fwd: read x, write y; bwd: read x, dy, write dx (+ write dw); weight reads are N-sized, counted too
            fwd = (2 * tokens * n + n) * BF16
            bwd = (3 * tokens * n + (n if frozen else 2 * n)) * BF16

            def ref(x, w):
                return rms_norm_ref(x, w, eps)
            impls = dict(hare=lambda x, w: rms_norm(x, w, eps, backend=ctx.backend), eager=ref,
                         compile=ctx.compile(ref))
            rows += _measure(ctx, "rms_norm" + (" (frozen w)" if frozen else ""), tokens, impls, (x, w), (dy,),
                             fwd, bwd)
    return rows


def bench_rms_norm_residual(ctx):
    """h = x + residual, y = rms_norm(h), both returned; trainable weight."""
    from hare.kernels.rms_norm import rms_norm_residual, rms_norm_residual_ref

    n, eps = ctx.shape["hidden"], 1e-5
    rows = []
    for tokens in ctx.tokens:
        x = ctx.randn(tokens, n, requires_grad=True)
        r = ctx.randn(tokens, n, requires_grad=True)
        w = (1 + 0.1 * ctx.randn(n)).requires_grad_()
        dy, dh = ctx.randn(tokens, n), ctx.randn(tokens, n)
        # fwd: read x, r, write h, y; bwd: read dy, dh, h, write dx (= dresidual, one tensor) and dw
        fwd = (4 * tokens * n + n) * BF16
        bwd = (4 * tokens * n + 2 * n) * BF16

        def ref(x, r, w):
            return rms_norm_residual_ref(x, r, w, eps)
        impls = dict(hare=lambda x, r, w: rms_norm_residual(x, r, w, eps, backend=ctx.backend), eager=ref,
                     compile=ctx.compile(ref))
        rows += _measure(ctx, "rms_norm_residual", tokens, impls, (x, r, w), (dy, dh), fwd, bwd)
    return rows


def bench_rope(ctx):
    """q (1, T, 32, 128), k (1, T, 8, 128), positions 0..T-1, fp32 tables of T rows."""
    from hare.kernels.rope import apply_rope, rope_ref

    d, hq, hk = ctx.shape["head_dim"], ctx.shape["q_heads"], ctx.shape["kv_heads"]
    rows = []
    for tokens in ctx.tokens:
        q = ctx.randn(1, tokens, hq, d, requires_grad=True)
        k = ctx.randn(1, tokens, hk, d, requires_grad=True)
        dq, dk = ctx.randn(1, tokens, hq, d), ctx.randn(1, tokens, hk, d)
        inv_freq = 1.0 / 500000.0 ** (torch.arange(0, d, 2, device=ctx.device, dtype=torch.float32) / d)
        ang = torch.arange(tokens, device=ctx.device, dtype=torch.float32)[:, None] * inv_freq[None]
        cos, sin = ang.cos(), ang.sin()
        pos = torch.arange(tokens, device=ctx.device)[None]
        # each pass: read q, k, write q', k' (bf16); read the two fp32 tables once and the int64 positions
        qk = tokens * (hq + hk) * d
        per_pass = 2 * qk * BF16 + 2 * tokens * (d // 2) * 4 + tokens * 8
        impls = dict(hare=lambda q, k, c, s, p: apply_rope(q, k, c, s, p, backend=ctx.backend), eager=rope_ref,
                     compile=ctx.compile(rope_ref))
        rows += _measure(ctx, "rope", tokens, impls, (q, k, cos, sin, pos), (dq, dk), per_pass, per_pass)
    return rows


def _bench_glu(ctx, op, public, ref):
    i = ctx.shape["intermediate"]
    rows = []
    for tokens in ctx.tokens:
        g = ctx.randn(tokens, i, scale=2.0, requires_grad=True)
        u = ctx.randn(tokens, i, requires_grad=True)
        dy = ctx.randn(tokens, i)
        # fwd: read gate, up, write y; bwd: read dy, gate, up, write dgate, dup
        impls = dict(hare=lambda g, u: public(g, u, backend=ctx.backend), eager=ref, compile=ctx.compile(ref))
        rows += _measure(ctx, op, tokens, impls, (g, u), (dy,), 3 * tokens * i * BF16, 5 * tokens * i * BF16)
    return rows


def bench_swiglu(ctx):
    from hare.kernels.swiglu import swiglu, swiglu_ref

    return _bench_glu(ctx, "swiglu", swiglu, swiglu_ref)


def bench_geglu(ctx):
    """tanh approximation (Gemma's gelu_pytorch_tanh); the exact-erf variant moves the same bytes."""
    from hare.kernels.geglu import geglu, geglu_ref

    return _bench_glu(ctx, "geglu (tanh)", lambda g, u, backend: geglu(g, u, "tanh", backend=backend),
                      lambda g, u: geglu_ref(g, u, "tanh"))


SECTIONS = [bench_rms_norm, bench_rms_norm_residual, bench_rope, bench_swiglu, bench_geglu]


# ----------------------------------------------------------------------------------------------------------------
# Sweep: the launch configurations behind the kernels' tuning constants, hare kernels only
# ----------------------------------------------------------------------------------------------------------------


def sweep(ctx):
    # the modules (hare.kernels re-exports functions of the same names)
    G, R, P, S = (importlib.import_module(f"hare.kernels.{m}") for m in ("geglu", "rms_norm", "rope", "swiglu"))

    tokens = max(ctx.tokens)
    n, i = ctx.shape["hidden"], ctx.shape["intermediate"]
    d, hq, hk = ctx.shape["head_dim"], ctx.shape["q_heads"], ctx.shape["kv_heads"]
    rows = []

    def add(kernel, config, nbytes, fn):
        ms = ctx.time_ms(fn)
        rows.append(dict(kernel=kernel, config=config, ms=ms, gbps=nbytes / ms / 1e6,
                         copy_frac=nbytes / ms / 1e6 / ctx.copy_gbps))
        print(f"{kernel:22s} {config:32s} {ms:8.4f} ms {rows[-1]['gbps']:7.0f} GB/s {rows[-1]['copy_frac']:5.0%}",
              flush=True)

    x, dy = ctx.randn(tokens, n), ctx.randn(tokens, n)
    w = 1 + 0.1 * ctx.randn(n)
    _, _, rstd = R.rms_norm_fwd(x, w, 1e-5, 0.0, "llama")
    for nw in (4, 8, 16):
        add("rms_norm fwd", f"num_warps={nw}", 2 * tokens * n * BF16,
            lambda: R.rms_norm_fwd(x, w, 1e-5, 0.0, "llama", num_warps=nw))
    for nw in (4, 8, 16):
        add("rms_norm bwd (frozen)", f"num_warps={nw}", 3 * tokens * n * BF16,
            lambda: R.rms_norm_bwd(dy, None, x, w, rstd, 0.0, "llama", False, num_warps=nw))
    for nw in (8, 16):
        for per_sm in (2, 4, 8):
            for tile in (n, 2 * n):  # one or two rows per loop step
                add("rms_norm bwd (dw)", f"num_warps={nw} programs/SM={per_sm} rows/step={tile // n}",
                    3 * tokens * n * BF16,
                    lambda: R.rms_norm_bwd(dy, None, x, w, rstd, 0.0, "llama", True, tile=tile, num_warps=nw,
                                           programs_per_sm=per_sm))
    del x, dy, rstd

    q, k = ctx.randn(1, tokens, hq, d), ctx.randn(1, tokens, hk, d)
    ang = torch.rand(tokens, d // 2, device=ctx.device) * 100
    cos, sin, pos = ang.cos(), ang.sin(), torch.arange(tokens, device=ctx.device)[None]
    for nw in (2, 4, 8):
        for half_tile in (2048, 4096):
            add("rope", f"num_warps={nw} half_tile={half_tile}", 2 * tokens * (hq + hk) * d * BF16,
                lambda: P.rope_fwd(q, k, cos, sin, pos, half_tile=half_tile, num_warps=nw))
    del q, k

    g, u, dy = ctx.randn(tokens, i, scale=2.0), ctx.randn(tokens, i), ctx.randn(tokens, i)
    for block in (1024, 2048, 4096):
        for nw in (4, 8):
            cfg = f"block={block} num_warps={nw}"
            add("swiglu fwd", cfg, 3 * tokens * i * BF16, lambda: S.swiglu_fwd(g, u, block=block, num_warps=nw))
            add("swiglu bwd", cfg, 5 * tokens * i * BF16,
                lambda: S.swiglu_bwd(dy, g, u, block=block, num_warps=nw))
            add("geglu fwd", cfg, 3 * tokens * i * BF16,
                lambda: G.geglu_fwd(g, u, "tanh", block=block, num_warps=nw))
            add("geglu bwd", cfg, 5 * tokens * i * BF16,
                lambda: G.geglu_bwd(dy, g, u, "tanh", block=block, num_warps=nw))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(rows, copy_gbps):
    """One line per (op, tokens, pass), impls side by side."""
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["tokens"], r["pass"]), {})[r["impl"]] = r
    out = [f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)", "",
           "| op | tokens | pass | hare ms | eager ms | compile ms | hare GB/s | % of copy | vs compile | "
           "peak MiB hare / eager / compile |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    misses = []
    for (op, tokens, pas), by in groups.items():
        h, e, c = (by.get(i) for i in IMPLS)
        ms = [_fmt(x["ms"] if x else None, ".3f") for x in (h, e, c)]
        speed = c["ms"] / h["ms"] if h and c else None
        peaks = " / ".join(_fmt(x["peak_mib"] if x else None, ".0f") for x in (h, e, c))
        out.append(f"| {op} | {tokens} | {pas} | {' | '.join(ms)} | {_fmt(h and h['gbps'], '.0f')} | "
                   f"{_fmt(h and h['copy_frac'] and 100 * h['copy_frac'], '.0f')} | "
                   f"{_fmt(speed, '.2f')}{'x' if speed else ''} | {peaks} |")
        if h and h["copy_frac"] is not None and h["copy_frac"] < 0.8:
            misses.append(f"{op} {tokens} {pas}: {100 * h['copy_frac']:.0f}% of copy bandwidth (< 80%)")
        if speed is not None and speed < 1.0:
            misses.append(f"{op} {tokens} {pas}: {1 / speed:.2f}x slower than torch.compile of the ref")
    out.append("")
    out.append("targets: all met" if not misses else "targets missed:\n  " + "\n  ".join(misses))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="write all rows as JSON here")
    ap.add_argument("--tokens", type=int, nargs="+", help=f"token counts (default {TOKENS})")
    ap.add_argument("--only", nargs="+", help="section names to run, e.g. rms_norm swiglu")
    ap.add_argument("--sweep", action="store_true", help="sweep launch configurations instead")
    ap.add_argument("--skip-compile", action="store_true", help="leave out torch.compile (saves minutes)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU through the ref path")
    args = ap.parse_args(argv)
    if args.sweep and args.cpu_smoke:
        raise SystemExit("--sweep times the Triton launchers and needs a CUDA device")
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA device (or --cpu-smoke)")
    ctx = Ctx(args.cpu_smoke, tuple(args.tokens or ((64,) if args.cpu_smoke else TOKENS)), args.skip_compile)
    torch.manual_seed(0)
    ctx.copy_gbps = copy_bandwidth(ctx)
    env = dict(device=torch.cuda.get_device_name() if not ctx.smoke else "cpu", torch=torch.__version__,
               copy_gbps=ctx.copy_gbps, shape=ctx.shape, tokens=ctx.tokens, smoke=ctx.smoke)
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if args.sweep:
        result = dict(env, sweep=sweep(ctx))
    else:
        sections = [s for s in SECTIONS if not args.only or s.__name__.removeprefix("bench_") in args.only]
        rows = []
        for section in sections:
            rows += section(ctx)
            if not ctx.smoke:
                torch.cuda.empty_cache()
        print(f"{env['device']}, torch {env['torch']}, triton {env.get('triton')}")
        print(table(rows, ctx.copy_gbps))
        result = dict(env, rows=rows)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
