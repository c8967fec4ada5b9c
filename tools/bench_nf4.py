"""GPU benchmark of the NF4 kernels (issue 4). CUDA only.

    python -m hare.tools.bench_nf4 --out bench_nf4.json

1. Ceilings: device-to-device copy bandwidth (bytes read + written), measured in the same run: a 2 GiB copy (the
   steady-state rate) and, per dequant shape, a copy of the same bytes the dequant moves (copy_same_bytes: a bf16
   tensor of moved // 4 elements into another), timed exactly like the dequant. A ~150 MB copy pays what a
   ~40 us dequant pays (one launch, the ramp-up and the drain of the grid), which the 2 GiB copy amortizes away,
   so the same-bytes copy is the like-for-like ceiling and the 2 GiB one the stricter.
2. Dequantization at 4096 x 14336 and 14336 x 4096 (bf16 out): GB/s counting the bytes the kernel must move
   (packed 4-bit + absmax codes + nested statistics read, 16-bit weight written), as a fraction of both copy
   ceilings (target >= 85% of copy), and bitsandbytes' dequantize_4bit on the same weight when it imports with
   CUDA (target: faster).
3. Batch-1 decoding on the Llama-3.1-8B linear shapes (q, k, v, o, gate, up, down): fused 4-bit GEMV vs
   dequantize + matmul (target >= 2x), and bitsandbytes' own 4-bit GEMV (matmul_4bit at one row) for scale.
4. The same comparison timed from CUDA graphs (bench_decode_graph), per layer shape and for a whole decode step.
5. Dequantization in its steady state, from CUDA graphs (bench_dequant_graph): 8 distinct weights dequantized
   back to back, as the layers of a training step run them, against a copy and a write-only fill of the same
   bytes timed the same way. A do_bench time of a ~40 us kernel starts from the L2 that do_bench's flush left
   full of dirty lines (a 256 MB memset) and so also pays their write-back, and pays the launch and the grid's
   ramp and drain once; the 2 GiB copy ceiling amortizes all of that away. The graph puts the dequant under the
   same steady state as that ceiling. (1-2) stay the conservative figures.
Before timing, each kernel is checked against its reference on the same inputs (dequant: bit for bit, also
against bitsandbytes; GEMV: relative error vs fp64), and hare's quantization against bitsandbytes' CUDA bytes.
Times (1-3): triton.testing.do_bench medians (it clears the L2 cache between runs, so the weight comes from HBM as
it does in a real decode step). The kernels run with the library's configs (quant/dequant.py DEQUANT_CONFIG,
quant/gemv.py GEMV_CONFIGS); tools/sweep_nf4.py times the alternatives. Writes --out (JSON) and the markdown
table next to it (.md); prints the table last.

Why graphs (4). A do_bench time is one launch from Python, host launch overhead included: a ~5 us floor (the
sweep's launch floor, 5.3 us on the H200) that dominates the small projections (k/v run in ~8 us) and charges the
unfused baseline's two launches and the fused kernel's one alike, hiding part of the difference. A real decoder
replays CUDA graphs, where a launch costs next to nothing on the host. So per layer shape C distinct NF4 weights
are made (C = max(32, ceil(256 MiB / weight bytes)): together far more than the H200's 60 MB L2, and walked in
the same cycle on every replay, so the L2 only ever holds the weights furthest from the next use and every weight
comes from HBM, as in a decode step over 32 layers; no flush needed) and one graph runs the fused gemv_nf4(x, w)
once per weight back to back, another dequantize + F.linear once per weight. Both sides are captured and timed
the same way: one warmup pass on a side stream (Triton compiles, the allocator makes its pools), capture, 3
untimed replays, then the median of 20 replays between CUDA events; per call = replay / C. Before timing, the
replay's output for the last weight (NaN-filled first) is compared with a direct call (torch.equal), so the graph
is known to run the kernel. The whole decode step is one graph of the 7 projections x 32 layers (224 distinct
weights, ~3.6 GB at 4 bits). A capture that fails is reported with its error and the run goes on. The do_bench
table (3) stays as the conservative figure.
"""
import argparse
import json
import math
import statistics
import sys

import torch

LLAMA_8B = {  # (out_features, in_features) of Llama-3.1-8B: hidden 4096, 32 q heads / 8 kv heads x 128, MLP 14336
    "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336),
}
LLAMA_8B_LAYERS = 32
DEQUANT_SHAPES = [(4096, 14336), (14336, 4096)]
# CUDA-graph timing (module docstring, "Why graphs"): weights per layer-shape graph, at least this many and at
# least GRAPH_BYTES of them (> 4x the H200's 60 MB L2); replays timed (median).
GRAPH_MIN_WEIGHTS = 32
GRAPH_BYTES = 256 * 2 ** 20
GRAPH_REPS = 20


def _bench(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3  # seconds


def _bnb():
    """bitsandbytes.functional with a working CUDA backend, or None (the comparison columns stay empty)."""
    try:
        import bitsandbytes
        import bitsandbytes.functional as F
        q, st = F.quantize_4bit(torch.ones(64, device="cuda"), quant_type="nf4")
        F.dequantize_4bit(q, st, quant_type="nf4")
        return F, bitsandbytes.__version__
    except Exception as e:  # noqa: BLE001 - any failure means "not available here"; report why
        print(f"bitsandbytes unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return None, None


def copy_bandwidth():
    """The steady-state copy ceiling: 2 GiB of bf16 copied (4 GiB read + written)."""
    return copy_same_bytes(2 ** 32)


def copy_same_bytes(moved):
    """Copy ceiling at a kernel's own size (module docstring, 1): a bf16 tensor of moved // 4 elements copied into
    another reads and writes `moved` bytes (to 4 bytes), timed by _bench like the kernel. Returns GB/s."""
    a = torch.randn(moved // 4, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    t = _bench(lambda: b.copy_(a))
    return 2 * a.numel() * a.element_size() / t / 1e9


def _weight(shape, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(shape, generator=g, device="cuda") * 0.02).to(torch.bfloat16)


def check_quantization(F, rows):
    """hare's bytes vs bitsandbytes' CUDA quantize_4bit on the benchmark shapes and a few ragged ones."""
    from hare.quant import quantize_nf4
    for shape in DEQUANT_SHAPES + [(37, 70), (300, 257), (3, 5, 7), (4096 + 3, 65)]:
        w = _weight(shape, 7)
        q, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        ours = quantize_nf4(w)
        same = {"packed": torch.equal(ours.packed, q.reshape(-1)), "absmax_codes": torch.equal(ours.absmax, st.absmax),
                "offset": torch.equal(ours.offset, st.offset),
                "nested_absmax": torch.equal(ours.nested_absmax, st.state2.absmax)}
        rows.append({"check": "quantize vs bitsandbytes CUDA", "shape": list(shape), **same})
    z = torch.zeros(2, 64, device="cuda", dtype=torch.bfloat16)
    z[1] = 1.0
    q, _ = F.quantize_4bit(z, blocksize=64, compress_statistics=True, quant_type="nf4")
    rows.append({"check": "bitsandbytes CUDA byte of an all-zero block", "byte": int(q.reshape(-1)[0]),
                 "hare": int(quantize_nf4(z).packed[0])})


def bench_dequant(F, ceiling):
    from hare.quant import NF4Weight, dequantize_nf4_ref, quantize_nf4
    from hare.quant import dequant as dq
    results = []
    for shape in DEQUANT_SHAPES:
        w = _weight(shape, 0)
        q4 = quantize_nf4(w)
        out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
        moved = q4.nbytes() + out.numel() * out.element_size()
        same_ceiling = copy_same_bytes(moved)
        ref = dequantize_nf4_ref(q4, torch.bfloat16)
        cfg = dq.DEQUANT_CONFIG
        out.fill_(float("nan"))
        dq.launch_dequant(q4, out, cfg)
        exact = torch.equal(out.view(torch.int16), ref.view(torch.int16))
        t = _bench(lambda: dq.launch_dequant(q4, out, cfg))
        results.append({"op": "dequant", "shape": list(shape), "config": cfg._asdict(), "bit_exact_vs_ref": exact,
                        "us": t * 1e6, "GBps": moved / t / 1e9, "of_copy": moved / t / 1e9 / ceiling,
                        "copy_same_bytes_GBps": same_ceiling, "of_copy_same_bytes": moved / t / 1e9 / same_ceiling})
        if F is not None:
            qb, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            mine = NF4Weight.from_bnb({"weight": qb, **{"weight." + k: v for k, v in
                                                        st.as_dict(packed=True).items()}})
            theirs = F.dequantize_4bit(qb, st, quant_type="nf4")
            equal = torch.equal(mine.dequantize(torch.bfloat16).view(torch.int16), theirs.view(torch.int16))
            t = _bench(lambda: F.dequantize_4bit(qb, st, quant_type="nf4"))
            results.append({"op": "dequant_bitsandbytes", "shape": list(shape), "us": t * 1e6,
                            "GBps": moved / t / 1e9, "of_copy": moved / t / 1e9 / ceiling,
                            "of_copy_same_bytes": moved / t / 1e9 / same_ceiling,
                            "hare_equals_bnb_on_bnb_bytes": equal})
    return results


DEQUANT_GRAPH_WEIGHTS = 8  # distinct weights per dequant graph: 8 x (29 MB read + 117 MB written), > 20x the L2


def bench_dequant_graph(ceiling):
    """Dequantization in its steady state (module docstring, 5): one CUDA graph runs the library's dequant of
    DEQUANT_GRAPH_WEIGHTS distinct weights into fresh outputs back to back, another copies as many bytes per call
    with an elementwise kernel on the SMs (a bf16 tensor of moved // 4 elements times 1; a clone reached only 61%
    of the ceiling there in run S7-4, likely as a memcpy node served by the copy engines), a
    third fills the outputs (write only); per call = replay / calls. Each replay is first checked against a direct
    call (bit for bit)."""
    from hare.quant import dequantize_nf4, quantize_nf4
    results = []
    for shape in DEQUANT_SHAPES:
        weights = [quantize_nf4(_weight(shape, 200 + i)) for i in range(DEQUANT_GRAPH_WEIGHTS)]
        moved = weights[0].nbytes() + math.prod(shape) * 2
        srcs = [torch.randn(moved // 4, dtype=torch.bfloat16, device="cuda") for _ in weights]
        row = {"op": "dequant_graph", "shape": list(shape), "calls_per_graph": len(weights), "moved_bytes": moved}
        cases = (("dequant", lambda q4: dequantize_nf4(q4, torch.bfloat16), [(q4,) for q4 in weights], moved),
                 ("copy", lambda a: a * 1, [(a,) for a in srcs], 4 * (moved // 4)),
                 ("fill", lambda q4: torch.empty(shape, dtype=torch.bfloat16, device="cuda").fill_(1.0),
                  [(q4,) for q4 in weights], math.prod(shape) * 2))
        for name, call, args, nbytes in cases:
            try:
                sec, same = graph_seconds(call, args)
                per = sec / len(args)
                row.update({f"{name}_us": per * 1e6, f"{name}_GBps": nbytes / per / 1e9,
                            f"{name}_of_copy": nbytes / per / 1e9 / ceiling, f"{name}_equals_direct": same})
            except Exception as e:  # noqa: BLE001 - a failed capture is a result; the other cases still run
                row[f"{name}_error"] = error_line(e)
        results.append(row)
        del weights, srcs
        torch.cuda.empty_cache()
    return results


def bench_gemv(F):
    from hare.quant import gemv_nf4, gemv_nf4_ref, quantize_nf4
    from hare.quant import gemv as gv
    results = []
    for name, (n, k) in LLAMA_8B.items():
        w = _weight((n, k), 1)
        q4 = quantize_nf4(w)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        truth = gemv_nf4_ref(x.double(), q4, weight_dtype=torch.bfloat16)

        t_unfused = _bench(lambda: _unfused(x, q4))
        unfused_err = ((_unfused(x, q4).double() - truth).norm() / truth.norm()).item()
        y = gemv_nf4(x, q4)  # what decoding runs: the config of GEMV_CONFIGS for this shape
        err = ((y.double() - truth).norm() / truth.norm()).item()
        t = _bench(lambda: gemv_nf4(x, q4))
        results.append({"op": "gemv", "layer": name, "shape": [n, k], "config": gv.gemv_config(n, k)._asdict(),
                        "us": t * 1e6, "rel_err": err, "unfused_rel_err": unfused_err, "unfused_us": t_unfused * 1e6,
                        "speedup": t_unfused / t, "weight_GBps": q4.nbytes() / t / 1e9})
        if F is not None:
            qb, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            import bitsandbytes
            t = _bench(lambda: bitsandbytes.matmul_4bit(x, qb.t(), quant_state=st))
            results.append({"op": "gemv_bitsandbytes", "layer": name, "shape": [n, k], "us": t * 1e6})
    return results


def _fused(x, q4):
    """One batch-1 projection as decoding runs it: the fused 4-bit GEMV."""
    from hare.quant import gemv_nf4
    return gemv_nf4(x, q4)


def _unfused(x, q4):
    """The baseline: dequantize to bf16, then torch's matmul (two launches, the 16-bit weight written and read)."""
    return torch.nn.functional.linear(x, q4.dequantize(torch.bfloat16))


def _run_all(call, xs, weights):
    """call(xs[i], weights[i]) for every weight, back to back: the work of one graph."""
    return [call(x, q4) for x, q4 in zip(xs, weights)]


def _capture(fn):
    """A CUDA graph of fn() and the outputs of the captured call (they hold the replay's results). One warmup call
    on a side stream first, as the PyTorch docs ask: Triton compiles its kernels and the allocator makes its pools
    there, not during the capture."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = fn()
    return g, outs


def _replay_seconds(g):
    """Median seconds of one replay of g, between CUDA events on the replaying stream."""
    for _ in range(3):  # untimed: clocks up, the weights' cycle through the L2 in its steady state
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(GRAPH_REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)  # elapsed_time is in ms
    return statistics.median(times)


def error_line(e):
    """One line naming an exception; a failure inside a graph capture often surfaces as capture_end's error, so
    its first cause (the context) is named too."""
    first = str(e).splitlines()[0][:120] if str(e) else ""
    cause = e.__context__
    if cause is not None:
        first += f" (during: {type(cause).__name__}: {str(cause).splitlines()[0][:120] if str(cause) else ''})"
    return f"{type(e).__name__}: {first}"


def graph_weights(n, k):
    """The distinct NF4 weights an (n, k) shape's graphs run, once each per replay: at least GRAPH_MIN_WEIGHTS and
    GRAPH_BYTES of them (> 4x the L2 together, so each replay reads every weight from HBM)."""
    from hare.quant import quantize_nf4
    first = quantize_nf4(_weight((n, k), 100))
    count = max(GRAPH_MIN_WEIGHTS, math.ceil(GRAPH_BYTES / first.nbytes()))
    # one bf16 weight at a time (quantized, then dropped): only the 4-bit copies stay
    return [first] + [quantize_nf4(_weight((n, k), 100 + i)) for i in range(1, count)]


def graph_seconds(call, args):
    """(seconds per replay, replay == direct) of a CUDA graph that runs call(*a) for every a in args, back to
    back: _capture (warmup on a side stream, then capture); the replay's output for the last call, NaN-filled
    first so that a replay that wrote nothing differs, is compared with a direct call once; then the median replay
    (_replay_seconds). Raises when the capture fails. The graph and its memory pool go when this returns."""
    g, outs = _capture(lambda: [call(*a) for a in args])
    outs[-1].fill_(float("nan"))
    g.replay()
    same = torch.equal(outs[-1], call(*args[-1]))
    return _replay_seconds(g), same


def _graph_times(xs, weights):
    """Seconds per replay of a graph running the fused GEMV once per weight (weights[i] on xs[i]) and of one
    running the unfused baseline, as {fused_s, unfused_s}, with {fused,unfused}_equals_direct. A side whose
    capture or replay fails gets {side}_error instead of its time, and the other side still runs."""
    result = {}
    for side, call in (("fused", _fused), ("unfused", _unfused)):
        try:
            result[side + "_s"], result[side + "_equals_direct"] = graph_seconds(call, list(zip(xs, weights)))
        except Exception as e:  # noqa: BLE001 - report what broke (e.g. a sync or allocation the capture refuses)
            result[side + "_error"] = error_line(e)
            print(f"graph {side} failed: {result[side + '_error']}", file=sys.stderr)
    return result


def _summary(t, calls, nbytes, scale, unit):
    """Fused and unfused time per call in `unit` (seconds x scale), speedup, weight GB/s (fused); None where a
    side failed. t is _graph_times' result for a graph of `calls` calls reading `nbytes` of 4-bit weight."""
    f, u = t.get("fused_s"), t.get("unfused_s")
    return {unit: f / calls * scale if f else None, "unfused_" + unit: u / calls * scale if u else None,
            "speedup": u / f if f and u else None, "weight_GBps": nbytes / f / 1e9 if f else None}


def bench_decode_graph():
    """Batch-1 decoding timed from CUDA graphs (module docstring, "Why graphs"): per Llama-3.1-8B layer shape,
    C distinct weights run once each per replay, fused vs unfused (us per call); then one whole decode step, the 7
    projections of 32 layers with distinct weights (ms per step)."""
    from hare.quant import quantize_nf4
    results = []
    for name, (n, k) in LLAMA_8B.items():
        weights = graph_weights(n, k)
        count = len(weights)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        nbytes = sum(q4.nbytes() for q4 in weights)
        t = _graph_times([x] * count, weights)
        results.append({"op": "gemv_graph", "layer": name, "shape": [n, k], "weights_per_graph": count,
                        "graph_weight_MB": nbytes / 1e6, **_summary(t, count, nbytes, 1e6, "us"), **t})
        del weights, x
        torch.cuda.empty_cache()  # the next shape's weights start from a clean pool
    # the whole step: x of the hidden size for q/k/v/o/gate/up, of the MLP size for down
    x_by_k = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _, k in LLAMA_8B.values()}
    weights, xs = [], []
    for layer in range(LLAMA_8B_LAYERS):
        for j, (n, k) in enumerate(LLAMA_8B.values()):
            weights.append(quantize_nf4(_weight((n, k), 1000 + len(LLAMA_8B) * layer + j)))
            xs.append(x_by_k[k])
    nbytes = sum(q4.nbytes() for q4 in weights)
    t = _graph_times(xs, weights)
    results.append({"op": "decode_step_graph", "layers": LLAMA_8B_LAYERS, "weights": len(weights),
                    "weight_GB": nbytes / 1e9, **_summary(t, 1, nbytes, 1e3, "ms"), **t})
    del weights, xs, x_by_k
    torch.cuda.empty_cache()
    return results


def _num(v, spec, suffix=""):
    """v formatted by spec and suffixed, or n/a where the measurement failed (None in the JSON)."""
    return "n/a" if v is None else format(v, spec) + suffix


def markdown(report):
    lines = [f"NF4 kernels on {report['device']} (torch {report['torch']}, triton {report['triton']}, "
             f"bitsandbytes {report['bitsandbytes']}); copy ceiling {report['copy_GBps']:.0f} GB/s (read+written)",
             "", "| dequant (bf16 out) | hare us | hare GB/s | of copy | of same-bytes copy (its GB/s) | bnb us | "
             "bnb GB/s | hare vs bnb |", "|---|---|---|---|---|---|---|---|"]
    deq = [r for r in report["results"] if r["op"] == "dequant"]
    for r in deq:
        b = next((x for x in report["results"] if x["op"] == "dequant_bitsandbytes" and x["shape"] == r["shape"]),
                 None)
        lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {r['us']:.1f} | {r['GBps']:.0f} | "
                     f"{100 * r['of_copy']:.1f}% | {100 * r['of_copy_same_bytes']:.1f}% "
                     f"({r['copy_same_bytes_GBps']:.0f}) | {b['us'] if b else float('nan'):.1f} | "
                     f"{b['GBps'] if b else float('nan'):.0f} | "
                     f"{(b['us'] / r['us']) if b else float('nan'):.2f}x |")
    lines += ["", "| batch-1 layer (N x K) | fused GEMV us | dequant+matmul us | speedup | weight GB/s | "
              "bnb GEMV us | rel err (fused / unfused) |", "|---|---|---|---|---|---|---|"]
    for r in [r for r in report["results"] if r["op"] == "gemv"]:
        b = next((x for x in report["results"] if x["op"] == "gemv_bitsandbytes" and x["layer"] == r["layer"]),
                 None)
        lines.append(f"| {r['layer']} {r['shape'][0]} x {r['shape'][1]} | {r['us']:.1f} | {r['unfused_us']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['weight_GBps']:.0f} | {b['us'] if b else float('nan'):.1f} | "
                     f"{r['rel_err']:.1e} / {r['unfused_rel_err']:.1e} |")
    graph = [r for r in report["results"] if r["op"] == "gemv_graph"]
    step = [r for r in report["results"] if r["op"] == "decode_step_graph"]
    if graph or step:
        lines += ["", "Batch-1 decoding from CUDA graphs (no host launch overhead; each graph runs its distinct "
                  "weights once each, from HBM; per call = replay / weights):", "",
                  "| batch-1 layer (N x K) | weights per graph | fused GEMV us | dequant+matmul us | speedup | "
                  "weight GB/s | replay = direct call (fused / unfused) |", "|---|---|---|---|---|---|---|"]
        for r in graph:
            lines.append(f"| {r['layer']} {r['shape'][0]} x {r['shape'][1]} | {r['weights_per_graph']} | "
                         f"{_num(r['us'], '.1f')} | {_num(r['unfused_us'], '.1f')} | "
                         f"{_num(r['speedup'], '.2f', 'x')} | {_num(r['weight_GBps'], '.0f')} | "
                         f"{r.get('fused_equals_direct')} / "
                         f"{r.get('unfused_equals_direct')} |")
        lines += ["", "| whole decode step (q k v o gate up down per layer) | 4-bit weight GB | fused ms | "
                  "dequant+matmul ms | speedup | weight GB/s | replay = direct call (fused / unfused) |",
                  "|---|---|---|---|---|---|---|"]
        for r in step:
            lines.append(f"| {r['layers']} layers, {r['weights']} weights | {r['weight_GB']:.2f} | "
                         f"{_num(r['ms'], '.2f')} | {_num(r['unfused_ms'], '.2f')} | "
                         f"{_num(r['speedup'], '.2f', 'x')} | {_num(r['weight_GBps'], '.0f')} | "
                         f"{r.get('fused_equals_direct')} / "
                         f"{r.get('unfused_equals_direct')} |")
        errors = [f"{r.get('layer', 'decode step')} {key}: {r[key]}" for r in graph + step for key in
                  ("fused_error", "unfused_error") if key in r]
        if errors:
            lines += ["", "Graph failures: " + "; ".join(errors)]
    dg = [r for r in report["results"] if r["op"] == "dequant_graph"]
    if dg:
        lines += ["", "Dequantization in its steady state, from CUDA graphs (distinct weights back to back, per call = "
                  "replay / calls; GB/s of the bytes each call moves, % of the 2 GiB copy ceiling):", "",
                  "| dequant (bf16 out) | calls per graph | hare us | hare GB/s (of copy) | copy of the same bytes "
                  "GB/s (of copy) | write-only fill GB/s | replay = direct (dequant / copy / fill) |",
                  "|---|---|---|---|---|---|---|"]
        for r in dg:
            def pct(k, r=r):
                share = r.get(k + "_of_copy")
                return f"{_num(r.get(k + '_GBps'), '.0f')} ({_num(share and 100 * share, '.1f', '%')})"
            lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {r['calls_per_graph']} | "
                         f"{_num(r.get('dequant_us'), '.1f')} | {pct('dequant')} | {pct('copy')} | "
                         f"{_num(r.get('fill_GBps'), '.0f')} | {r.get('dequant_equals_direct')} / "
                         f"{r.get('copy_equals_direct')} / {r.get('fill_equals_direct')} |")
        errors = [f"{r['shape']} {k}: {v}" for r in dg for k, v in r.items() if k.endswith("_error")]
        if errors:
            lines += ["", "Graph failures: " + "; ".join(errors)]
    checks = report.get("checks", [])
    if checks:
        lines += ["", "Checks: " + "; ".join(json.dumps(c) for c in checks)]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_nf4.json", help="JSON results; the markdown table goes to .md beside")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_nf4 needs a CUDA GPU")
    import triton
    F, bnb_version = _bnb()
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
              "bitsandbytes": bnb_version, "checks": []}
    report["copy_GBps"] = copy_bandwidth()
    if F is not None:
        check_quantization(F, report["checks"])
    report["results"] = bench_dequant(F, report["copy_GBps"]) + bench_gemv(F)
    torch.cuda.empty_cache()  # the graph section allocates its own weights (up to ~3.6 GB at once)
    report["results"] += bench_decode_graph()
    report["results"] += bench_dequant_graph(report["copy_GBps"])
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    md = markdown(report)
    with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
