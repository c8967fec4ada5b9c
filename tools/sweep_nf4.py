"""GPU sweep of the NF4 kernels' launch configs (issue 4): one run, < 90 s on an H200 with a cold Triton cache.

    python -m hare.tools.sweep_nf4 [--out sweep_nf4.json] [--budget 75] [--threads 16]

Every variant is the library's own kernel (quant/dequant.py, quant/gemv.py) launched with another DequantConfig /
GemvConfig, so adopting a winner is a constant change: the run ends with the lines to paste (DEQUANT_CONFIG,
GEMV_CONFIGS). Before it is timed, each variant's output is checked: dequant bit for bit against
dequantize_nf4_ref; GEMV against the fp64 reference with the tests' rule (max error <= 2x that of the reference
run in bf16, plus a 1e-3 ulp floor). A variant that fails to compile or is wrong is listed and never chosen.

Times.
- GEMV: from CUDA graphs, as tools/bench_nf4.py bench_decode_graph (its "Why graphs"). A do_bench time includes
  the host launch (~5 us, the launch floor below), which dominates the small batch-1 shapes and made this
  sweep's pick for them unreliable; a decoder replays graphs. Per shape, C distinct NF4 weights are made once
  (C = max(32, ceil(256 MiB / weight bytes)), bench_nf4's count and seeds: together > 4x the L2, so every weight
  comes from HBM) and shared by all variants of that shape. Per variant one graph runs the variant's launch once
  per weight, back to back (bench_nf4.graph_seconds: warmup pass on a side stream, then capture); the replay's output
  for the last weight is compared with a direct launch (torch.equal); per call = median replay between CUDA
  events (bench_nf4._replay_seconds: 3 untimed + 20 timed replays) / C. The dequant + matmul baseline (this
  run's best dequant config, then F.linear) is timed the same way per layer: every speedup is graph vs graph.
- Dequant: triton.testing.do_bench medians with the L2 flushed before every run (a ~40 us kernel: the launch is a
  small part), shorter repetitions than bench_nf4 to fit the budget; shown as a fraction of the 2 GiB copy and of a
  copy of the same bytes (bench_nf4.copy_same_bytes, the like-for-like ceiling).
Also measured in the same run: copy bandwidth (bytes read + written), a write-only fill of the dequant output
(what stores alone reach) and the launch floor: a GEMV on an 8 x 64 weight, by do_bench (host launch included)
and from a graph (the per-kernel cost no GEMV goes below, which bounds any speedup of the small projections).
Compiles: before the checks, every variant is launched once from a thread pool (--threads) so Triton compiles
them in parallel (its compiler releases the GIL; as tools/sweep_attention.py); those launches' results are dropped.
--budget: seconds after which the remaining variants are skipped (listed as such), so the run stays inside a
device call's limit (tools/gpu_suite.sh runs it with --budget 130 under `timeout 150`) even if compiles are slow.
"""
import argparse
import functools
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .bench_nf4 import (DEQUANT_SHAPES, GRAPH_MIN_WEIGHTS, LLAMA_8B, _num, _weight, copy_bandwidth, copy_same_bytes,
                        error_line, graph_seconds, graph_weights)

# the k/v projections first: their target (2x) is the one furthest from met; the first layer of each shape gets
# the full list of variants, a repeated shape (v, o, up) only the default and that shape's best (timed again on the
# same weights: the difference between the two runs is the noise)
SWEEP_ORDER = ["k_proj", "v_proj", "q_proj", "o_proj", "down_proj", "gate_proj", "up_proj"]
DEVICE = "cuda"  # a module constant so that a CPU smoke test of this script's logic can point it elsewhere


def _sync():
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.synchronize()


def dequant_variants():
    from hare.quant.dequant import DequantConfig as D
    return [
        (D(4096, 2, "load"), "the previous launch (42.7 us), now with 16-byte word loads"),
        (D(4096, 2, "gather"), "register table + tl.gather: fewer instructions"),
        (D(2048, 2, "gather"), "32 regs: 32 programs/SM"),
        (D(4096, 4, "gather"), "32 regs: 16 programs/SM x 4 warps"),
        (D(8192, 4, "gather"), "fewest instructions, 95 regs"),
        (D(2048, 2, "load"), ""),
        (D(8192, 4, "load"), ""),
        (D(4096, 2, "gather", 8, 1), "persistence alone"),
        (D(2048, 2, "gather", 16, 1), ""),
        (D(4096, 2, "gather", 8, 2), "prefetch the next tile"),
        (D(4096, 2, "gather", 16, 2), ""),
        (D(4096, 2, "gather", 8, 3), ""),
        (D(2048, 2, "gather", 16, 3), ""),
        (D(4096, 4, "gather", 8, 2), ""),
        (D(4096, 2, "gather", 0, 1, True), "evict-first loads, .cs stores"),
        (D(2048, 2, "gather", 0, 1, True), ""),
        (D(4096, 2, "gather", 8, 3, True), ""),
        (D(4096, 2, "load", 0, 1, True), ""),
    ]


def dequant_name(c):
    """elements x warps, lut, persistent programs per SM, pipeline stages, streaming hints."""
    return (f"{c.elements_per_program}x{c.num_warps} {c.lut}" + (f" pps{c.programs_per_sm}" if c.programs_per_sm else "")
            + (f" st{c.num_stages}" if c.num_stages > 1 else "") + (" stream" if c.streaming else ""))


def gemv_name(c):
    """rows x words per step / warps, lut, fma or not, split-K, pipeline stages."""
    return (f"{c.block_n}x{c.block_k}/{c.num_warps} {c.lut} {'fma' if c.fp_fusion else 'nofma'} s{c.split_k}"
            + (f" st{c.num_stages}" if c.num_stages > 1 else ""))


def _g(block_n, block_k, num_warps, split_k=1, num_stages=1, lut="gather", fp_fusion=True):
    """A GemvConfig with this sweep's usual knobs (gather + fp fusion: the fewest instructions) unless named."""
    from hare.quant.gemv import GemvConfig
    return GemvConfig(block_n, block_k, num_warps, split_k=split_k, lut=lut, num_stages=num_stages,
                      fp_fusion=fp_fusion)


def gemv_variants():
    """{(n, k): [GemvConfig, ...]}: the variants timed on the first layer of each shape (the library's current
    config is timed in front of them). Names: rows x words per step / warps.

    Why these. Every shape is far from HBM bandwidth (q/o: 0.7 TB/s of 4.2 with gather). They were first read as
    latency-bound (too few bytes in flight per SM; the whole kernel lasts a few round trips); a probe in run S9-4
    showed the gather loop issue-bound instead (quant/gemv.py's docstring), which lut "prmt" answers (its list
    at the end). The gather lists stay as they were: the small shapes try what requests more of a
    program's bytes at once and what makes more programs: block_k 512 covers a K = 4096 row (512 words) in one step
    (every load of a program issued together), 256 in 2 steps, 128 in 4; 1-row programs double the grid of the 2-row
    default; split_k 2/4 multiplies it again at the cost of a second kernel (launch_gemv adds the fp32 partials in
    _sum_splits_kernel; it caps split_k at the number of steps, so split needs block_k <= 256 for split 2, <= 128
    for split 4 at K = 4096); num_stages 2/3 prefetch the next step (cp.async; only worth it with several steps).
    Elements per thread per step (block_n * block_k * 8 / (32 * num_warps)) stay <= 64. Compiled offline for sm_90a
    (triton.compile with a GPUTarget, no GPU): none spills; 48-96 registers and 12.7-14.4 SASS instructions per
    weight in the loop at <= 32 elements per thread, 160-204 registers (fewer programs per SM) and 10.2-10.5
    instructions at 64; lut "load" or no fp fusion add ~1 instruction. The big shapes keep a shorter list around
    their current configs. (lut "pairs", timed here on 2026-11-29, was slower everywhere: quant/dequant.py.)"""
    g = _g
    small = [  # k/v 1024 x 4096: the 2 x 256 / 4 default makes 512 programs, < 4 per SM of 132
        # one step per row: 1024 (1 row) or 512 / 256 programs, each with all its loads in flight at once
        g(1, 512, 2), g(1, 512, 4), g(1, 512, 8), g(2, 512, 4), g(2, 512, 8), g(4, 512, 8),
        # two steps
        g(1, 256, 1), g(1, 256, 2), g(1, 256, 4), g(2, 256, 4), g(2, 256, 8), g(4, 256, 8),
        g(1, 256, 2, split_k=2), g(1, 256, 4, split_k=2), g(2, 256, 4, split_k=2), g(4, 256, 8, split_k=2),
        # four steps: more programs per SM (smaller tiles), split-K up to 4, prefetch
        g(1, 128, 1), g(1, 128, 2), g(2, 128, 2), g(2, 128, 4), g(4, 128, 4),
        g(1, 128, 2, split_k=4), g(2, 128, 2, split_k=4), g(4, 128, 4, split_k=4), g(2, 128, 2, split_k=2),
        g(2, 128, 2, num_stages=2), g(4, 128, 4, num_stages=2), g(2, 128, 4, num_stages=3),
        # eight steps
        g(8, 64, 4), g(4, 64, 2, num_stages=3),
        # one knob at a time: table by global load, no fp fusion
        g(1, 512, 4, lut="load"), g(1, 512, 4, fp_fusion=False), g(2, 256, 4, lut="load"),
        g(2, 256, 4, fp_fusion=False),
    ]
    square = [  # q/o 4096 x 4096: 1.74x with the default (2 x 256 / 4, 2048 programs, ~16 per SM), the one short
        g(1, 512, 2), g(1, 512, 4), g(1, 512, 8), g(2, 512, 4), g(2, 512, 8), g(4, 512, 8),
        g(1, 256, 1), g(1, 256, 2), g(1, 256, 4), g(2, 256, 2), g(2, 256, 4), g(2, 256, 8), g(4, 256, 4),
        g(4, 256, 8), g(8, 256, 8), g(2, 256, 4, num_stages=2), g(4, 256, 8, num_stages=2),
        g(2, 128, 2), g(2, 128, 4), g(4, 128, 2), g(4, 128, 4), g(8, 128, 4), g(8, 128, 8),
        g(4, 128, 4, num_stages=2), g(4, 128, 4, num_stages=3), g(8, 128, 8, num_stages=2), g(2, 128, 2, num_stages=3),
        g(8, 64, 4), g(16, 64, 8), g(8, 64, 4, num_stages=3),
        g(1, 256, 2, split_k=2), g(2, 256, 4, split_k=2), g(4, 256, 8, split_k=2), g(4, 128, 4, split_k=2),
        g(8, 128, 8, split_k=4),
        g(1, 512, 4, lut="load"), g(1, 512, 4, fp_fusion=False), g(2, 256, 4, lut="load"),
        g(2, 256, 4, lut="load", fp_fusion=False),
    ]
    tall = [  # gate/up 14336 x 4096: 2.17x with the default (2 x 128 / 2); 7168 programs already fill the GPU
        g(2, 128, 2), g(1, 512, 2), g(1, 512, 4), g(2, 512, 8), g(1, 256, 2), g(2, 256, 4), g(4, 256, 8),
        g(4, 128, 4), g(8, 128, 8), g(8, 64, 4), g(2, 128, 2, num_stages=2), g(4, 128, 4, num_stages=2),
        g(2, 128, 2, lut="load"), g(2, 128, 2, fp_fusion=False),
    ]
    wide = [  # down 4096 x 14336 (1792 words per row): 2.01x with the default (2 x 256 / 4, no fusion)
        g(2, 256, 4), g(2, 256, 4, fp_fusion=False), g(1, 512, 4), g(1, 512, 8), g(2, 512, 8), g(4, 256, 8),
        g(1, 256, 2), g(4, 128, 4), g(8, 128, 8), g(2, 256, 4, num_stages=2), g(2, 256, 4, num_stages=3),
        g(4, 128, 4, num_stages=2), g(1, 512, 4, num_stages=2), g(2, 256, 4, split_k=2), g(4, 256, 8, split_k=2),
        g(2, 256, 4, lut="load"),
    ]
    # lut "prmt" (byte permutes, quant/gemv.py): the launch shapes that served gather well, per shape
    prmt = [g(1, 512, 2), g(1, 512, 4), g(2, 512, 4), g(2, 512, 8), g(1, 256, 2), g(2, 256, 2), g(2, 256, 4),
            g(4, 256, 4), g(4, 256, 8), g(2, 128, 2), g(4, 128, 4), g(8, 128, 8), g(2, 256, 4, num_stages=2)]
    prmt = [c._replace(lut="prmt") for c in prmt]
    small += prmt + [c._replace(split_k=2) for c in prmt if c.block_k <= 256][:4]
    square += prmt + [c._replace(split_k=2) for c in prmt if c.block_k <= 256][:4]
    tall += prmt
    wide += prmt
    return {(1024, 4096): small, (4096, 4096): square, (14336, 4096): tall, (4096, 14336): wide}


def _bench(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e-3  # seconds


class Clock:
    """Elapsed time and the budget after which variants are skipped."""

    def __init__(self, budget):
        self.t0, self.budget, self.skipped = time.time(), budget, 0

    def over(self):
        return time.time() - self.t0 > self.budget


def precompile(launches, clock, threads):
    """Runs every launch once from a thread pool, so that Triton compiles them in parallel (much of a compile runs
    outside the GIL: this sweep's 54 GEMV kernels took 16.3 s in one thread, 10.9 s in two on a 2-core CPU,
    compiled offline for sm_90a). A warm-up only: results and errors are dropped, and the checked run of each
    variant launches it again on the main thread (compiling there whatever failed here: its first_call_s then
    shows the compile). Launches left when the budget is spent are not started. Returns the seconds taken."""
    t = time.time()

    def job(launch):
        if clock.over():
            return
        try:
            launch()
        except Exception:  # noqa: BLE001 - the main thread's run of this variant reports the error
            pass

    with ThreadPoolExecutor(max(1, threads)) as ex:
        list(ex.map(job, launches))
    _sync()  # every warm-up kernel done before anything is checked or timed
    return time.time() - t


def sweep_dequant(clock, ceiling, rows, threads):
    from hare.quant import dequantize_nf4_ref, quantize_nf4
    from hare.quant import dequant as dq
    variants = dequant_variants()
    if dq.DEQUANT_CONFIG not in [c for c, _ in variants]:
        variants.insert(0, (dq.DEQUANT_CONFIG, "the library's current config"))
    for i, shape in enumerate(DEQUANT_SHAPES):
        if clock.over():
            clock.skipped += len(variants)
            continue
        q4 = quantize_nf4(_weight(shape, 0))
        out = torch.empty(shape, dtype=torch.bfloat16, device=DEVICE)
        if i == 0:  # both shapes have the same element count: one compile per config serves both
            sec = precompile([functools.partial(dq.launch_dequant, q4, out, cfg) for cfg, _ in variants], clock,
                             threads)
            print(f"\ndequant: {len(variants)} variants compiled in {sec:.1f} s ({threads} threads)", flush=True)
        ref = dequantize_nf4_ref(q4, torch.bfloat16).view(torch.int16)
        moved = q4.nbytes() + out.numel() * out.element_size()
        same = copy_same_bytes(moved)  # the like-for-like ceiling: a copy of as many bytes, one launch
        print(f"\ndequant {shape[0]} x {shape[1]} -> bf16, {moved / 1e6:.1f} MB moved; target <= "
              f"{moved / (0.85 * ceiling * 1e9) * 1e6:.1f} us (85% of copy); copy of the same bytes {same:.0f} GB/s",
              flush=True)
        t_fill = _bench(lambda: out.fill_(1.0))
        rows.append({"op": "write_only_fill", "shape": list(shape), "us": t_fill * 1e6,
                     "GBps": out.numel() * 2 / t_fill / 1e9})
        print(f"  write-only fill of the output (torch): {rows[-1]['GBps']:.0f} GB/s", flush=True)
        print(f"  {'variant':29s} {'us':>6s}    {'GB/s':>5s} {'copy':>6s} {'same-bytes copy':>15s}", flush=True)
        for cfg, why in variants:
            row = {"op": "dequant", "shape": list(shape), "variant": dequant_name(cfg), "config": cfg._asdict(),
                   "default": cfg == dq.DEQUANT_CONFIG, "copy_same_bytes_GBps": same}
            rows.append(row)
            if clock.over():
                row["status"], clock.skipped = "skipped (budget)", clock.skipped + 1
                _print_dequant(row)
                continue
            try:
                t = time.time()
                out.fill_(float("nan"))
                dq.launch_dequant(q4, out, cfg)
                _sync()
                row["first_call_s"] = time.time() - t  # the run (and a compile the pool did not do)
                if not torch.equal(out.view(torch.int16), ref):
                    row["status"] = "WRONG (not bit-exact)"
                else:
                    sec = _bench(lambda: dq.launch_dequant(q4, out, cfg))
                    gbps = moved / sec / 1e9
                    row.update(status="ok", us=sec * 1e6, GBps=gbps, of_copy=gbps / ceiling, of_same_copy=gbps / same)
            except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result, not a crash
                row["status"] = "FAILED " + error_line(e)
            _print_dequant(row, why)
        del q4, out, ref
        torch.cuda.empty_cache()


def _print_dequant(r, why=""):
    mark = "*" if r["default"] else " "
    if r.get("status") == "ok":
        print(f" {mark}{r['variant']:29s} {r['us']:6.1f} us {r['GBps']:5.0f} {100 * r['of_copy']:5.1f}% "
              f"{100 * r['of_same_copy']:14.1f}% {r['first_call_s']:.1f}s {why}", flush=True)
    else:
        print(f" {mark}{r['variant']:29s} {r['status']}", flush=True)


def best_dequant(rows):
    """The config with the least total time over the dequant shapes, among those exact and timed on all."""
    by_cfg = {}
    for r in rows:
        if r["op"] == "dequant":
            by_cfg.setdefault(json.dumps(r["config"]), []).append(r)
    done = [rs for rs in by_cfg.values()
            if len(rs) == len(DEQUANT_SHAPES) and all(r.get("status") == "ok" for r in rs)]
    return min(done, key=lambda rs: sum(r["us"] for r in rs)) if done else None


def graph_seconds_per_call(call, weights):
    """Seconds per call of call(q4) -> output from a CUDA graph that runs it once per weight (bench_nf4.
    graph_seconds); raises when the replay's output differs from a direct call."""
    seconds, same = graph_seconds(call, [(q4,) for q4 in weights])
    if not same:
        raise RuntimeError("the graph's replay differs from a direct call")
    return seconds / len(weights)


def _gemv_call(gv, x, cfg, q4):
    """One fused GEMV launch into a fresh output (inside a capture it comes from the graph's pool: every weight
    gets its own, as in a decode step)."""
    y = torch.empty(1, q4.shape[0], dtype=x.dtype, device=x.device)
    gv.launch_gemv(x, q4, y, cfg)
    return y


def _unfused_call(dq, x, wbuf, deq_config, q4):
    """The baseline: what a 4-bit linear does without the GEMV: dequantize into a 16-bit buffer, then a bf16
    matmul (the buffer is reused weight after weight, as the allocator would hand back the same block)."""
    dq.launch_dequant(q4, wbuf, deq_config)
    return torch.nn.functional.linear(x, wbuf)


def sweep_gemv(clock, rows, deq_config, threads, lut=None):
    from hare.quant import gemv_nf4_ref, quantize_nf4
    from hare.quant import dequant as dq
    from hare.quant import gemv as gv
    per_shape = {shape: [c for c in cs if lut in (None, c.lut)] for shape, cs in gemv_variants().items()}
    eps = torch.finfo(torch.bfloat16).eps
    # compile every config once (on the k/v shape, K = 4096: the same kernel specializations as every shape here,
    # split or not), all in parallel, before anything is timed
    configs = list(dict.fromkeys([gv.gemv_config(*LLAMA_8B[layer]) for layer in SWEEP_ORDER]
                                 + [c for cs in per_shape.values() for c in cs]))
    n0, k0 = LLAMA_8B["k_proj"]
    q0, x0 = quantize_nf4(_weight((n0, k0), 1)), torch.randn(1, k0, device=DEVICE, dtype=torch.bfloat16)
    y0 = torch.empty(1, n0, device=DEVICE, dtype=torch.bfloat16)
    sec = precompile([functools.partial(gv.launch_gemv, x0, q0, y0, cfg) for cfg in configs], clock, threads)
    print(f"\ngemv: {len(configs)} configs compiled in {sec:.1f} s ({threads} threads)", flush=True)
    del q0, x0, y0
    tried = {}  # shapes whose full list was timed (on the first layer of that shape in SWEEP_ORDER)
    weights, weights_shape = None, None  # the graph weights of the current shape (SWEEP_ORDER keeps shapes adjacent)
    for layer in SWEEP_ORDER:
        n, k = LLAMA_8B[layer]
        if clock.over():
            clock.skipped += 1
            print(f"\ngemv {layer}: skipped (budget)", flush=True)
            continue
        if weights_shape != (n, k):  # made once per shape, shared by every variant and layer of it
            weights = None  # the previous shape's weights go first
            torch.cuda.empty_cache()
            weights, weights_shape = graph_weights(n, k), (n, k)
        q4 = quantize_nf4(_weight((n, k), 1))  # the correctness check's weight, as before
        x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
        y = torch.empty(1, n, device=DEVICE, dtype=torch.bfloat16)
        wbuf = torch.empty((n, k), device=DEVICE, dtype=torch.bfloat16)
        truth = gemv_nf4_ref(x.double(), q4, weight_dtype=torch.bfloat16)
        ctrl = (gemv_nf4_ref(x, q4).double() - truth).abs().max().item()
        bound = 2 * ctrl + 1e-3 * eps * truth.abs().max().item()
        try:
            t_unfused = graph_seconds_per_call(functools.partial(_unfused_call, dq, x, wbuf, deq_config), weights)
            print(f"\ngemv {layer} {n} x {k}, {len(weights)} weights per graph: dequant+matmul "
                  f"{t_unfused * 1e6:.1f} us; target <= {t_unfused * 5e5:.1f} us (2x)", flush=True)
        except Exception as e:  # noqa: BLE001 - the variants are still timed; their speedups stay empty
            t_unfused = None
            print(f"\ngemv {layer} {n} x {k}: dequant+matmul graph FAILED {error_line(e)}", flush=True)
        default = gv.gemv_config(n, k)
        if (n, k) in tried:  # a repeated shape (v, o, up): the default and the best of its first layer again
            best = min((r for r in rows if r["op"] == "gemv" and tuple(r["shape"]) == (n, k)
                        and r.get("status") == "ok"), key=lambda r: r["us"], default=None)
            todo = [default] + ([gv.GemvConfig(**best["config"])] if best else [])
        else:
            todo = [default] + per_shape[(n, k)]
            tried[(n, k)] = True
        for cfg in dict.fromkeys(todo):  # in order, without repeats
            row = {"op": "gemv", "layer": layer, "shape": [n, k], "variant": gemv_name(cfg), "config": cfg._asdict(),
                   "default": cfg == default, "unfused_us": t_unfused * 1e6 if t_unfused else None,
                   "weights_per_graph": len(weights)}
            rows.append(row)
            if clock.over():
                row["status"], clock.skipped = "skipped (budget)", clock.skipped + 1
                _print_gemv(row)
                continue
            try:
                t = time.time()
                y.fill_(float("nan"))
                gv.launch_gemv(x, q4, y, cfg)
                _sync()
                row["first_call_s"] = time.time() - t  # the run (and a compile the pool did not do)
                err = (y.double() - truth).abs().max().item()
                row.update(err=err, control_err=ctrl, rel_err=((y.double() - truth).norm() / truth.norm()).item())
                if not err <= bound:  # NaN fails too
                    row["status"] = f"WRONG (err {err:.2e} > {bound:.2e})"
                else:
                    sec = graph_seconds_per_call(functools.partial(_gemv_call, gv, x, cfg), weights)
                    row.update(status="ok", us=sec * 1e6, speedup=t_unfused / sec if t_unfused else None,
                               weight_GBps=weights[0].nbytes() / sec / 1e9)
            except Exception as e:  # noqa: BLE001
                row["status"] = "FAILED " + error_line(e)
            _print_gemv(row)
        del q4, x, y, wbuf
    weights = None
    torch.cuda.empty_cache()


def _print_gemv(r):
    mark = "*" if r["default"] else " "
    if r.get("status") == "ok":
        print(f" {mark}{r['variant']:28s} {r['us']:6.1f} us {_num(r['speedup'], '5.2f', 'x')} "
              f"{r['weight_GBps']:5.0f} GB/s err/bf16-ref {r['err'] / max(r['control_err'], 1e-30):.2f} "
              f"{r['first_call_s']:.1f}s", flush=True)
    else:
        print(f" {mark}{r['variant']:28s} {r['status']}", flush=True)


def graph_floor_us():
    """Per-call time of the smallest GEMV (8 x 64) from a graph of GRAPH_MIN_WEIGHTS launches: what a kernel costs
    with no host launch and no data, the floor under every shape's graph time. None if the graph fails."""
    from hare.quant import quantize_nf4
    from hare.quant import gemv as gv
    tiny, x = quantize_nf4(_weight((8, 64), 2)), torch.randn(1, 64, device=DEVICE, dtype=torch.bfloat16)
    try:
        # one tiny weight repeated: nothing to read from HBM, so no need for distinct ones
        return graph_seconds_per_call(functools.partial(_gemv_call, gv, x, gv.gemv_config(8, 64)),
                                      [tiny] * GRAPH_MIN_WEIGHTS) * 1e6
    except Exception as e:  # noqa: BLE001 - the floor is context, not a result the sweep needs
        print(f"graph launch floor FAILED {error_line(e)}", file=sys.stderr)
        return None


def _cfg_src(cls, cfg):
    return f"{cls}(" + ", ".join(f"{k}={v!r}" for k, v in cfg.items()) + ")"


# GEMV_CONFIGS rows (first match wins: small N, then N <= 8192 by K, the rest) and the layer of SWEEP_ORDER that
# had the full sweep of the shape each row serves; the second layer of a shape is its repeat
GEMV_TABLE = [(2048, None, "k_proj", "v_proj"), (8192, 8192, "q_proj", "o_proj"), (8192, None, "down_proj", None),
              (None, None, "gate_proj", "up_proj")]


def summary(report):
    """Kept to <= 20 lines: tools/gpu_suite.sh shows the run's last 20."""
    from hare.quant import gemv as gv
    rows = report["rows"]
    lines = ["", f"== summary: copy {report['copy_GBps']:.0f} GB/s, launch floor {report['floor_us']:.1f} us "
                 f"(do_bench) / {_num(report['graph_floor_us'], '.1f')} us (graph), {report['elapsed_s']:.0f} s, "
                 f"{report['skipped']} variants skipped; GEMV times from CUDA graphs, speedup vs dequant+matmul "
                 f"graphs"]
    bd = best_dequant(rows)
    if bd:
        lines.append("best dequant: " + "; ".join(f"{r['shape'][0]}x{r['shape'][1]} {r['us']:.1f} us "
                                                   f"{100 * r['of_copy']:.1f}% of copy, {100 * r['of_same_copy']:.1f}%"
                                                   f" of same-bytes copy" for r in bd))
        lines.append("  quant/dequant.py:  DEQUANT_CONFIG = " + _cfg_src("DequantConfig", bd[0]["config"]))
    ok = [r for r in rows if r["op"] == "gemv" and r.get("status") == "ok"]
    table = []  # (max_n, max_k, config, comment) for GEMV_CONFIGS
    for max_n, max_k, layer, again in GEMV_TABLE:
        n, k = LLAMA_8B[layer]
        mine = [r for r in ok if r["layer"] == layer]
        if not mine:
            lines.append(f"gemv {n:5d} x {k:5d} ({layer}): nothing timed; the table keeps the current config")
            table.append((max_n, max_k, gv.gemv_config(n, k)._asdict(), f"{layer}: not timed, the current config"))
            continue
        b = min(mine, key=lambda r: r["us"])
        d = next((r for r in mine if r["default"]), None)
        met = "" if b["speedup"] is None else (" (>= 2x)" if b["speedup"] >= 2 else " (< 2x)")
        line = (f"gemv {n:5d} x {k:5d} ({layer}): best {b['variant']} {b['us']:.1f} us vs dequant+matmul "
                f"{_num(b['unfused_us'], '.1f')} us = {_num(b['speedup'], '.2f', 'x')}{met}")
        if d:
            line += f" | current {d['us']:.1f} us {_num(d['speedup'], '.2f', 'x')}"
        rep = [r for r in ok if r["layer"] == again]  # the same weights, timed again: the run's noise
        rb = next((r for r in rep if r["config"] == b["config"]), None)
        rd = next((r for r in rep if r["default"]), None)
        if rb or rd:
            line += f" | {again}: best {_num(rb and rb['us'], '.1f')}, current {_num(rd and rd['us'], '.1f')} us"
        lines.append(line)
        table.append((max_n, max_k, b["config"], f"{layer} {n} x {k}: {b['us']:.1f} us graph, "
                                                 f"{_num(b['speedup'], '.2f', 'x')} dequant+matmul"))
    lines.append("  quant/gemv.py:  GEMV_CONFIGS = (")
    for max_n, max_k, cfg, comment in table:
        lines.append(f"    ({max_n}, {max_k}, {_cfg_src('GemvConfig', cfg)}),  # {comment}")
    lines.append("  )")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="sweep_nf4.json", help="every row as JSON")
    ap.add_argument("--budget", type=float, default=75.0, help="seconds after which remaining variants are skipped")
    ap.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1), help="parallel Triton compiles")
    ap.add_argument("--gemv-only", action="store_true", help="skip the dequant sweep (its baseline: DEQUANT_CONFIG)")
    ap.add_argument("--lut", choices=["load", "gather", "prmt"], help="only the GEMV variants with this lut "
                    "(the library's config is timed first either way)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("sweep_nf4 needs a CUDA GPU")
    import triton
    from hare.quant import quantize_nf4
    from hare.quant import dequant as dq
    from hare.quant import gemv as gv
    clock = Clock(args.budget)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
              "rows": []}
    report["copy_GBps"] = copy_bandwidth()
    tiny, xt = quantize_nf4(_weight((8, 64), 2)), torch.randn(1, 64, device=DEVICE, dtype=torch.bfloat16)
    yt = torch.empty(1, 8, device=DEVICE, dtype=torch.bfloat16)
    tiny_config = gv.gemv_config(8, 64)  # looked up once: the floor is the launch alone
    gv.launch_gemv(xt, tiny, yt, tiny_config)
    report["floor_us"] = _bench(lambda: gv.launch_gemv(xt, tiny, yt, tiny_config)) * 1e6
    report["graph_floor_us"] = graph_floor_us()
    print(f"{report['device']}, torch {report['torch']}, triton {report['triton']}: copy {report['copy_GBps']:.0f} "
          f"GB/s (read+written), launch floor {report['floor_us']:.1f} us (do_bench) / "
          f"{_num(report['graph_floor_us'], '.1f')} us (graph); * = the library's current config", flush=True)
    if not args.gemv_only:
        sweep_dequant(clock, report["copy_GBps"], report["rows"], args.threads)
    bd = best_dequant(report["rows"])
    deq_config = dq.DequantConfig(**bd[0]["config"]) if bd else dq.DEQUANT_CONFIG
    print(f"\ndequant+matmul below uses the best dequant config of this run: {deq_config}", flush=True)
    sweep_gemv(clock, report["rows"], deq_config, args.threads, args.lut)
    report.update(elapsed_s=time.time() - clock.t0, skipped=clock.skipped)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(summary(report))


if __name__ == "__main__":
    main()
