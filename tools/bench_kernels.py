"""GPU benchmark of hare's fused kernels (issue 3) at Llama-3.1-8B shapes, vs eager PyTorch (`<op>_ref`) and
vs `torch.compile(<op>_ref)`. CUDA only, except --cpu-smoke.

    python -m hare.tools.bench_kernels --out bench_kernels.json     (markdown table on stdout, all numbers in JSON)
    python -m hare.tools.bench_kernels --sweep --out sweep.json     (launch configurations behind the constants)
    python -m hare.tools.bench_kernels --sweep --only rms_norm      (one op's sweep: rms_norm, rope, swiglu, geglu)
    python -m hare.tools.bench_kernels --cpu-smoke                  (tiny shapes, ref path, CPU: checks the wiring,
                                                                     torch.compile of every ref included)

Layout: one `bench_<op>(ctx)` per op, listed in SECTIONS; each returns rows
    {"op", "tokens", "pass": "fwd" | "fwd+bwd", "impl": "hare" | "eager" | "compile", "ms", "bytes", "gbps",
     "copy_frac", "peak_mib"}
and main() prints them pivoted into one table. "hare" is the public op (Triton), "eager" the `_ref` in eager
PyTorch, "compile" `torch.compile(_ref)`; all three run the same inputs through the same harness.

Bytes are those of the minimal algorithm (each input read once, each output written once; bf16 = 2 bytes);
fwd+bwd counts both passes over their summed time. GB/s are compared with a device-to-device copy measured in the
same run (`dst.copy_(src)` on 1 GiB: 2 * bytes / time), once before and once after the kernels, the higher of
the two taken as the ceiling (one run's single measurement once read 2773 GB/s on a GPU that copies at 4241).
Peak memory is the allocator's peak above what was allocated before the call (outputs and saved tensors
included), one call, in MiB.

Run time: the torch.compile comparison compiles each ref once per token count and grad mode (24 graphs, static
shapes; cold caches on a fresh machine: 33 s for all 24 with inductor's CPU backend on 2 shared cores, the GPU
run adds Triton compilations in parallel workers; expected ~2-3 min in all, not yet measured); 72 timings from
CUDA graphs of BENCH_REP_MS of work each. Per-section seconds go to stderr; --skip-compile or --only cut it.
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
# ms of GPU work per CUDA graph replay (triton.testing.do_bench_cudagraph replays it 10 times and the median is
# reported): 40 ms is >= 15 calls of the slowest eager ref here, hundreds of the fused kernels.
BENCH_REP_MS = 40
SWEEP_REP_MS = 10  # the rms_norm sweep alone times ~110 configs, in one run of < 60 s


class Ctx:
    """What every section needs: shapes, device, backend for "hare", the timer and the copy bandwidth."""

    def __init__(self, smoke, tokens, skip_compile=False, rep_ms=BENCH_REP_MS):
        self.smoke = smoke
        self.rep_ms = rep_ms
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
            return triton.testing.do_bench_cudagraph(fn, rep=self.rep_ms, return_mode="median")
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
        """torch.compile(fn), static shapes (the refs compiled for exactly the shapes timed). The smoke run
        compiles too (inductor's CPU backend, which needs a C++ compiler) so that tracing the refs and the
        harness's autograd calls are checked before a GPU run."""
        if self.skip_compile:
            return None
        return torch.compile(fn, dynamic=False)


def copy_bandwidth(ctx):
    """Device-to-device copy of 1 GiB: GB/s = 2 * bytes / time (read + write). Timed with launches, not a graph:
    a captured copy_ becomes a copy-engine memcpy node, which ran at 2.8 TB/s against 4.2 TB/s launched (H200)."""
    n = (2**30 if not ctx.smoke else 2**24) // BF16
    src = torch.randn(n, device=ctx.device, dtype=torch.float32).to(ctx.dtype)
    dst = torch.empty_like(src)
    ms = ctx.time_ms(lambda: dst.copy_(src), graph=False)
    del src, dst
    return 2 * n * BF16 / ms / 1e6


def _dynamo_limits():
    """Each ref is compiled for 2 token counts x grad on/off (x frozen/trainable weight), all on one code object:
    8 graphs for rms_norm, exactly dynamo's default recompile limit, past which it would silently run eager
    (and time eager as "compile"). Raised here, and hitting it made an error where torch has the switch."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(64, getattr(cfg, name)))
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True


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


def kernel_resources(jit_fn, num_warps, **constexprs):
    """(registers per thread, spilled registers, shared-memory bytes, resident programs per SM) of the compiled
    variant of `jit_fn` with these num_warps and constexpr values, launched at least once in this process; None
    if not found. Reads Triton's JIT cache (triton 3.6: JITFunction.device_caches[device][0] maps keys to
    CompiledKernel objects, whose .src.constants holds the constexprs), so another Triton may answer None.
    Residency: the smallest of the register file (allocated per warp in units of 256 registers), the thread
    limit and the shared memory (1 KiB reserved per program) per SM."""
    try:
        cache = jit_fn.device_caches[torch.cuda.current_device()][0]
        for k in list(cache.values()):
            consts = {jit_fn.arg_names[path[0]]: v for path, v in k.src.constants.items()}
            if k.metadata.num_warps != num_warps or any(consts.get(n) != v for n, v in constexprs.items()):
                continue
            if k.function is None:
                k._init_handles()
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            regs_sm = getattr(props, "regs_per_multiprocessor", 65536)
            threads_sm = getattr(props, "max_threads_per_multi_processor", 2048)
            smem_sm = getattr(props, "shared_memory_per_multiprocessor", 233472)
            regs_warp = -(-k.n_regs * 32 // 256) * 256
            resident = min(regs_sm // regs_warp // num_warps, threads_sm // (32 * num_warps),
                           smem_sm // (k.metadata.shared + 1024), 32)
            return k.n_regs, k.n_spills, k.metadata.shared, resident
    except Exception:  # introspection only: never fail the sweep over it
        return None
    return None


class Sweep:
    """Collects timings of launch configurations: `add` times one, `best` summarizes a kernel at a token count."""

    def __init__(self, ctx):
        self.ctx, self.rows = ctx, []

    def add(self, kernel, tokens, config, nbytes, fn, resources=None):
        """Times fn(); resources = (jit function, num_warps, {constexpr: value}) names the compiled kernel whose
        registers / shared memory / residency to print (kernel_resources)."""
        ms = self.ctx.time_ms(fn)
        row = dict(kernel=kernel, tokens=tokens, config=config, ms=ms, bytes=nbytes, gbps=nbytes / ms / 1e6)
        res = kernel_resources(resources[0], resources[1], **resources[2]) if resources else None
        if res:
            row.update(regs=res[0], spills=res[1], smem=res[2], resident_per_sm=res[3])
        self.rows.append(row)
        extra = (f"  regs {res[0]} spill {res[1]} smem {res[2] / 1024:.0f}K resident/SM {res[3]}" if res else "")
        print(f"{kernel:24s} {tokens:6d} {config:44s} {ms:8.4f} ms {row['gbps']:6.0f} GB/s"
              f" {row['gbps'] / self.ctx.copy_gbps:5.0%}{extra}", flush=True)
        return row

    def best(self, kernel, tokens):
        rows = [r for r in self.rows if r["kernel"] == kernel and r["tokens"] == tokens]
        return min(rows, key=lambda r: r["ms"]) if rows else None


def sweep_rms_norm(ctx, sw):
    """Forward warps; frozen-weight backward warps; the backward with dw (plain and residual): rows per loop step,
    warps, software-pipeline stages and programs per SM (kernels/rms_norm.py BWD_DW_* constants), each with the
    compiled kernel's registers, shared memory and resident programs per SM. "default" is the launcher with no
    overrides, i.e. what training runs. 112 timings (10 ms each) and ~23 compilations: expected < 60 s."""
    R = importlib.import_module("hare.kernels.rms_norm")
    n, eps = ctx.shape["hidden"], 1e-5
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    bwd = R._rms_norm_bwd_kernel
    for tokens in ctx.tokens:
        x, dy, dh = ctx.randn(tokens, n), ctx.randn(tokens, n), ctx.randn(tokens, n)
        w = 1 + 0.1 * ctx.randn(n)
        _, _, rstd = R.rms_norm_fwd(x, w, eps, 0.0, "llama")
        fwd_b, bwd_b, res_b = 2 * tokens * n * BF16, 3 * tokens * n * BF16, 4 * tokens * n * BF16
        sw.add("rms_norm fwd", tokens, "default", fwd_b, lambda: R.rms_norm_fwd(x, w, eps, 0.0, "llama"))
        for nw in (4, 8, 16):
            sw.add("rms_norm fwd", tokens, f"num_warps={nw}", fwd_b,
                   lambda: R.rms_norm_fwd(x, w, eps, 0.0, "llama", num_warps=nw))
        sw.add("rms_norm_residual fwd", tokens, "default", res_b,
               lambda: R.rms_norm_fwd(x, w, eps, 0.0, "llama", residual=dh))
        sw.add("rms_norm bwd (frozen)", tokens, "default", bwd_b,
               lambda: R.rms_norm_bwd(dy, None, x, w, rstd, 0.0, "llama", False))
        for nw in (4, 8, 16):
            sw.add("rms_norm bwd (frozen)", tokens, f"num_warps={nw}", bwd_b,
                   lambda: R.rms_norm_bwd(dy, None, x, w, rstd, 0.0, "llama", False, num_warps=nw))
        # plain: every (rows, warps) that ptxas fits in <= 128 registers, 1-4 stages; residual (one tensor more
        # per step): the default's rows and warps, 2-4 stages. ~23 kernels to compile in all (~1 s each).
        for kernel, d, nbytes, shapes, stage_counts in (
                ("rms_norm bwd (dw)", None, bwd_b, ((1, 8), (1, 16), (2, 16)), (1, 2, 3, 4)),
                ("rms_norm_residual bwd (dw)", dh, res_b, ((1, 16),), (2, 3, 4))):
            sw.add(kernel, tokens, "default", nbytes,
                   lambda: R.rms_norm_bwd(dy, d, x, w, rstd, 0.0, "llama", True))
            for rows, nw in shapes:
                for stages in stage_counts:
                    for per_sm in (1, 2, 4):
                        sw.add(kernel, tokens, f"rows={rows} num_warps={nw} stages={stages} programs/SM={per_sm}",
                               nbytes,
                               lambda: R.rms_norm_bwd(dy, d, x, w, rstd, 0.0, "llama", True, rows=rows,
                                                      num_warps=nw, stages=stages, programs=sms * per_sm),
                               resources=(bwd, nw, dict(BLOCK_M=rows, STAGES=stages, COMPUTE_DW=True,
                                                        HAS_DH=d is not None)))
        del x, dy, dh, d, rstd
        torch.cuda.empty_cache()


def sweep_rope(ctx, sw):
    P = importlib.import_module("hare.kernels.rope")
    d, hq, hk = ctx.shape["head_dim"], ctx.shape["q_heads"], ctx.shape["kv_heads"]
    tokens = max(ctx.tokens)
    q, k = ctx.randn(1, tokens, hq, d), ctx.randn(1, tokens, hk, d)
    ang = torch.rand(tokens, d // 2, device=ctx.device) * 100
    cos, sin, pos = ang.cos(), ang.sin(), torch.arange(tokens, device=ctx.device)[None]
    for nw in (2, 4, 8):
        for half_tile in (2048, 4096):
            sw.add("rope", tokens, f"num_warps={nw} half_tile={half_tile}", 2 * tokens * (hq + hk) * d * BF16,
                   lambda: P.rope_fwd(q, k, cos, sin, pos, half_tile=half_tile, num_warps=nw))


def _sweep_glu(ctx, sw, name, fwd, bwd):
    i, tokens = ctx.shape["intermediate"], max(ctx.tokens)
    g, u, dy = ctx.randn(tokens, i, scale=2.0), ctx.randn(tokens, i), ctx.randn(tokens, i)
    for block in (1024, 2048, 4096):
        for nw in (4, 8):
            cfg = f"block={block} num_warps={nw}"
            sw.add(f"{name} fwd", tokens, cfg, 3 * tokens * i * BF16, lambda: fwd(g, u, block=block, num_warps=nw))
            sw.add(f"{name} bwd", tokens, cfg, 5 * tokens * i * BF16,
                   lambda: bwd(dy, g, u, block=block, num_warps=nw))


def sweep_swiglu(ctx, sw):
    S = importlib.import_module("hare.kernels.swiglu")
    _sweep_glu(ctx, sw, "swiglu", S.swiglu_fwd, S.swiglu_bwd)
    # adapters folded in as kernels/lora.py's MLP runs them (rank 16): gate's and up's terms in both passes, and
    # in the in-place backward down_proj's input-gradient term (dy_fold); for scale, the backward without dy_fold
    # plus the GEMM pass over dh that it replaces
    i, tokens, r = ctx.shape["intermediate"], max(ctx.tokens), 16
    g, u, dy = ctx.randn(tokens, i, scale=2.0), ctx.randn(tokens, i), ctx.randn(tokens, i)
    fold = (ctx.randn(tokens, r), ctx.randn(i, r, scale=0.1).t(), 1.0, ctx.randn(tokens, r),
            ctx.randn(i, r, scale=0.1).t(), 1.0)  # B^T as kernels/lora.py passes it: a view of B (i, r)
    dy_fold = (ctx.randn(tokens, r), ctx.randn(r, i, scale=0.1), 1.0)
    for tile in ((16, 64), (16, 128), (16, 256), (32, 128), (64, 64)):
        for nw in (2, 4, 8):
            cfg = f"fold tile={tile[0]}x{tile[1]} num_warps={nw}"
            sw.add("swiglu folded fwd", tokens, cfg, 3 * tokens * i * BF16,
                   lambda: S.swiglu_fwd(g, u, num_warps=nw, fold=fold, fold_tile=tile))
            sw.add("swiglu folded bwd (in place, dy_fold)", tokens, cfg, 6 * tokens * i * BF16,
                   lambda: S.swiglu_bwd(dy, g, u, num_warps=nw, inplace=True, fold=fold, fold_tile=tile,
                                        dy_fold=dy_fold))
    sw.add("swiglu folded bwd (in place, dy_fold)", tokens, "default tile, no dy_fold, + dh.addmm_",
           6 * tokens * i * BF16,
           lambda: (dy.addmm_(dy_fold[0], dy_fold[1]), S.swiglu_bwd(dy, g, u, inplace=True, fold=fold)))
    sw.add("swiglu folded bwd (in place)", tokens, "default tile, no dy_fold", 6 * tokens * i * BF16,
           lambda: S.swiglu_bwd(dy, g, u, inplace=True, fold=fold))


def sweep_geglu(ctx, sw):
    G = importlib.import_module("hare.kernels.geglu")
    _sweep_glu(ctx, sw, "geglu", lambda g, u, **kw: G.geglu_fwd(g, u, "tanh", **kw),
               lambda dy, g, u, **kw: G.geglu_bwd(dy, g, u, "tanh", **kw))


SWEEPS = [sweep_rms_norm, sweep_rope, sweep_swiglu, sweep_geglu]


def sweep_summary(sw, copy_gbps):
    """Per kernel and token count: the best configuration and the default's, in % of the copy bandwidth; for
    rms_norm also the fwd+bwd that the best forward and backward add up to (the issue's target: >= 80%)."""
    out = [f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)", "",
           "| kernel | tokens | best config | best ms | % of copy | default ms | % of copy |",
           "|---|---:|---|---:|---:|---:|---:|"]
    for kernel, tokens in dict.fromkeys((r["kernel"], r["tokens"]) for r in sw.rows):
        b = sw.best(kernel, tokens)
        dflt = next((r for r in sw.rows if (r["kernel"], r["tokens"], r["config"]) == (kernel, tokens, "default")),
                    None)
        out.append(f"| {kernel} | {tokens} | {b['config']} | {b['ms']:.4f} | {100 * b['gbps'] / copy_gbps:.0f} | "
                   f"{_fmt(dflt and dflt['ms'], '.4f')} | "
                   f"{_fmt(dflt and 100 * dflt['gbps'] / copy_gbps, '.0f')} |")
    for pair in (("rms_norm fwd", "rms_norm bwd (dw)"), ("rms_norm fwd", "rms_norm bwd (frozen)"),
                 ("rms_norm_residual fwd", "rms_norm_residual bwd (dw)")):
        for tokens in dict.fromkeys(r["tokens"] for r in sw.rows):
            f, b = sw.best(pair[0], tokens), sw.best(pair[1], tokens)
            if f and b:
                gbps = (f["bytes"] + b["bytes"]) / (f["ms"] + b["ms"]) / 1e6
                out.append(f"{pair[0]} + {pair[1]}, {tokens} tokens, best configs: {f['ms'] + b['ms']:.4f} ms, "
                           f"{gbps:.0f} GB/s = {100 * gbps / copy_gbps:.0f}% of copy")
    return "\n".join(out)


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
    ap.add_argument("--only", nargs="+", help="section names to run, e.g. rms_norm swiglu (also with --sweep)")
    ap.add_argument("--sweep", action="store_true", help="sweep launch configurations instead")
    ap.add_argument("--skip-compile", action="store_true", help="leave out torch.compile (saves minutes)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU through the ref path")
    args = ap.parse_args(argv)
    if args.sweep and args.cpu_smoke:
        raise SystemExit("--sweep times the Triton launchers and needs a CUDA device")
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA device (or --cpu-smoke)")
    t_start = time.perf_counter()
    ctx = Ctx(args.cpu_smoke, tuple(args.tokens or ((64,) if args.cpu_smoke else TOKENS)),
              args.skip_compile or args.sweep, SWEEP_REP_MS if args.sweep else BENCH_REP_MS)
    if not ctx.skip_compile:
        _dynamo_limits()
    torch.manual_seed(0)
    copy_before = copy_bandwidth(ctx)
    ctx.copy_gbps = copy_before
    env = dict(device=torch.cuda.get_device_name() if not ctx.smoke else "cpu", torch=torch.__version__,
               shape=ctx.shape, tokens=ctx.tokens, smoke=ctx.smoke)
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    names = {f.__name__.split("_", 1)[1] for f in SECTIONS + SWEEPS}
    unknown = set(args.only or ()) - names
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {sorted(unknown)}; known: {sorted(names)}")
    chosen = [f for f in (SWEEPS if args.sweep else SECTIONS)
              if not args.only or f.__name__.split("_", 1)[1] in args.only]
    rows, sw = [], Sweep(ctx)
    for section in chosen:
        t0 = time.perf_counter()
        if args.sweep:
            section(ctx, sw)
        else:
            rows += section(ctx)
        if not ctx.smoke:
            torch.cuda.empty_cache()
        print(f"[{section.__name__}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
    # the copy again, now that the GPU is warm: the ceiling is the higher of the two
    copy_after = copy_bandwidth(ctx)
    ctx.copy_gbps = max(copy_before, copy_after)
    env.update(copy_gbps=ctx.copy_gbps, copy_gbps_before=copy_before, copy_gbps_after=copy_after)
    print(f"{env['device']}, torch {env['torch']}, triton {env.get('triton')}; copy {copy_before:.0f} GB/s before, "
          f"{copy_after:.0f} GB/s after the kernels")
    for r in rows + sw.rows:
        r["copy_frac"] = r["gbps"] / ctx.copy_gbps
    if args.sweep:
        print(sweep_summary(sw, ctx.copy_gbps))
        result = dict(env, sweep=sw.rows)
    else:
        print(table(rows, ctx.copy_gbps))
        result = dict(env, rows=rows)
    print(f"[total: {time.perf_counter() - t_start:.1f} s]", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
