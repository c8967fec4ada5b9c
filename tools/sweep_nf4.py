"""GPU sweep of the NF4 kernels' launch configs (issue 4): one run, < 90 s on an H200 with a cold Triton cache.

    python -m hare.tools.sweep_nf4 [--out sweep_nf4.json] [--budget 75]

Every variant is the library's own kernel (quant/dequant.py, quant/gemv.py) launched with another DequantConfig /
GemvConfig, so adopting a winner is a constant change: the run ends with the lines to paste (DEQUANT_CONFIG,
GEMV_CONFIGS). Before it is timed, each variant's output is checked: dequant bit for bit against
dequantize_nf4_ref; GEMV against the fp64 reference with the tests' rule (max error <= 2x that of the reference
run in bf16, plus a 1e-3 ulp floor). A variant that fails to compile or is wrong is listed and never chosen.
Times: triton.testing.do_bench medians with the L2 flushed before every run (as tools/bench_nf4.py; the weight
comes from HBM as in a real decode step), shorter repetitions than bench_nf4 to fit the budget.
Also measured in the same run: copy bandwidth (the dequant ceiling, bytes read + written), a write-only fill of
the dequant output (what stores alone reach) and the launch floor (a GEMV on an 8 x 64 weight: the time no
kernel of this shape goes below, which bounds any speedup of the small projections).
--budget: seconds after which the remaining variants are skipped (listed as such), so the run stays inside a
device call's limit even if compiles are slow.
"""
import argparse
import json
import sys
import time

import torch

from .bench_nf4 import DEQUANT_SHAPES, LLAMA_8B, _weight, copy_bandwidth

# the k/v projections first: their target (2x) is the one furthest from met; the first layer of each shape gets
# the full list of variants, a repeated shape (v, o, up) only the default and that shape's best
SWEEP_ORDER = ["k_proj", "v_proj", "q_proj", "o_proj", "down_proj", "gate_proj", "up_proj"]
DEVICE = "cuda"  # a module constant so that a CPU smoke test of this script's logic can point it elsewhere


def _sync():
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.synchronize()


# (config, why). Knob meanings: quant/dequant.py docstring. Per element of the sm_90a SASS loop (offline):
# (elements x warps) 4096x2 load 8.9 instr (66 regs), 4096x2 gather 6.6 (111 regs), 2048x2 / 4096x4 gather 7.9
# (32 regs: full occupancy), 8192x4 gather 6.5 (95 regs), persistent + 2-3 stages gather 7.0-7.3 (40-48 regs,
# cp.async prefetch).
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


def gemv_variants():
    """{name: config without split} and, per distinct shape, the (name, split_k) pairs to time. Rows x words
    per step x warps; all 'gather' + fp fusion unless named. Static cost (SASS loop, per weight): 12.6-13.0
    instructions for every tile below (48-96 regs, no spills), 13.9 without fusion, 14.3 with neither (16.4 before)."""
    from hare.quant.gemv import GemvConfig as G
    v = {  # names are only keys of the lists below; printed names come from gemv_name
        "2x256/4": G(2, 256, 4, lut="gather", fp_fusion=True),
        "1x512/4": G(1, 512, 4, lut="gather", fp_fusion=True),
        "1x512/8": G(1, 512, 8, lut="gather", fp_fusion=True),
        "1x256/2": G(1, 256, 2, lut="gather", fp_fusion=True),
        "2x128/2": G(2, 128, 2, lut="gather", fp_fusion=True),
        "2x512/8": G(2, 512, 8, lut="gather", fp_fusion=True),
        "4x128/4": G(4, 128, 4, lut="gather", fp_fusion=True),
        "4x256/8": G(4, 256, 8, lut="gather", fp_fusion=True),
        "8x64/4": G(8, 64, 4, lut="gather", fp_fusion=True),
        "8x128/8": G(8, 128, 8, lut="gather", fp_fusion=True),
        "16x64/8": G(16, 64, 8, lut="gather", fp_fusion=True),
        "2x256/4 st2": G(2, 256, 4, lut="gather", num_stages=2, fp_fusion=True),
        "4x128/4 st2": G(4, 128, 4, lut="gather", num_stages=2, fp_fusion=True),
        # one knob at a time at the previous best tile
        "2x256/4 load nofma": G(2, 256, 4),
        "2x256/4 gather nofma": G(2, 256, 4, lut="gather"),
        "2x256/4 load fma": G(2, 256, 4, fp_fusion=True),
    }
    knobs = [("2x256/4 load nofma", 1), ("2x256/4 gather nofma", 1), ("2x256/4 load fma", 1)]
    # k/v: 1024 rows cannot fill 132 SMs with 2 rows per program at full K: split-K or 1 row per program
    small = [("2x256/4", 1), ("2x256/4", 2), ("2x256/4", 4), ("1x512/4", 1), ("1x512/4", 2), ("1x512/8", 1),
             ("1x512/8", 2), ("1x256/2", 1), ("1x256/2", 2), ("2x128/2", 1), ("2x128/2", 2), ("2x128/2", 4),
             ("4x128/4", 2), ("4x128/4", 4), ("4x256/8", 2), ("4x256/8", 4), ("2x512/8", 1), ("2x512/8", 2),
             ("2x256/4 st2", 1)]
    square = [("2x256/4", 1), ("2x256/4", 2), ("1x512/4", 1), ("1x512/8", 1), ("1x256/2", 1), ("2x128/2", 1),
              ("4x128/4", 1), ("4x128/4", 2), ("4x256/8", 1), ("8x128/8", 1), ("8x64/4", 1), ("2x512/8", 1),
              ("2x256/4 st2", 1), ("4x128/4 st2", 1)]
    tall = [("2x256/4", 1), ("1x512/4", 1), ("1x256/2", 1), ("2x128/2", 1), ("4x128/4", 1), ("4x256/8", 1),
            ("8x128/8", 1), ("8x64/4", 1), ("16x64/8", 1), ("2x256/4 st2", 1), ("4x128/4 st2", 1), ("1x512/8", 1)]
    wide = square + [("16x64/8", 1), ("8x64/4", 2)]
    per_shape = {(1024, 4096): small + knobs, (4096, 4096): square + knobs, (14336, 4096): tall + knobs,
                 (4096, 14336): wide + knobs}
    return v, per_shape


def _bench(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e-3  # seconds


class Clock:
    """Elapsed time and the budget after which variants are skipped."""

    def __init__(self, budget):
        self.t0, self.budget, self.skipped = time.time(), budget, 0

    def over(self):
        return time.time() - self.t0 > self.budget


def sweep_dequant(clock, ceiling, rows):
    from hare.quant import dequantize_nf4_ref, quantize_nf4
    from hare.quant import dequant as dq
    variants = dequant_variants()
    if dq.DEQUANT_CONFIG not in [c for c, _ in variants]:
        variants.insert(0, (dq.DEQUANT_CONFIG, "the library's current config"))
    for shape in DEQUANT_SHAPES:
        if clock.over():
            clock.skipped += len(variants)
            continue
        q4 = quantize_nf4(_weight(shape, 0))
        out = torch.empty(shape, dtype=torch.bfloat16, device=DEVICE)
        ref = dequantize_nf4_ref(q4, torch.bfloat16).view(torch.int16)
        moved = q4.nbytes() + out.numel() * out.element_size()
        print(f"\ndequant {shape[0]} x {shape[1]} -> bf16, {moved / 1e6:.1f} MB moved; target <= "
              f"{moved / (0.85 * ceiling * 1e9) * 1e6:.1f} us (85% of copy)", flush=True)
        t_fill = _bench(lambda: out.fill_(1.0))
        rows.append({"op": "write_only_fill", "shape": list(shape), "us": t_fill * 1e6,
                     "GBps": out.numel() * 2 / t_fill / 1e9})
        print(f"  write-only fill of the output (torch): {rows[-1]['GBps']:.0f} GB/s", flush=True)
        for cfg, why in variants:
            row = {"op": "dequant", "shape": list(shape), "variant": dequant_name(cfg), "config": cfg._asdict(),
                   "default": cfg == dq.DEQUANT_CONFIG}
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
                row["first_call_s"] = time.time() - t  # compile + run
                if not torch.equal(out.view(torch.int16), ref):
                    row["status"] = "WRONG (not bit-exact)"
                else:
                    sec = _bench(lambda: dq.launch_dequant(q4, out, cfg))
                    row.update(status="ok", us=sec * 1e6, GBps=moved / sec / 1e9, of_copy=moved / sec / 1e9 / ceiling)
            except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result, not a crash
                row["status"] = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            _print_dequant(row, why)
        del q4, out, ref
        torch.cuda.empty_cache()


def _print_dequant(r, why=""):
    mark = "*" if r["default"] else " "
    if r.get("status") == "ok":
        print(f" {mark}{r['variant']:26s} {r['us']:6.1f} us {r['GBps']:5.0f} GB/s {100 * r['of_copy']:5.1f}% "
              f"{r['first_call_s']:.1f}s {why}", flush=True)
    else:
        print(f" {mark}{r['variant']:26s} {r['status']}", flush=True)


def best_dequant(rows):
    """The config with the least total time over the dequant shapes, among those exact and timed on all."""
    by_cfg = {}
    for r in rows:
        if r["op"] == "dequant":
            by_cfg.setdefault(json.dumps(r["config"]), []).append(r)
    done = [rs for rs in by_cfg.values()
            if len(rs) == len(DEQUANT_SHAPES) and all(r.get("status") == "ok" for r in rs)]
    return min(done, key=lambda rs: sum(r["us"] for r in rs)) if done else None


def sweep_gemv(clock, rows, deq_config):
    from hare.quant import gemv_nf4_ref, quantize_nf4
    from hare.quant import dequant as dq
    from hare.quant import gemv as gv
    variants, per_shape = gemv_variants()
    eps = torch.finfo(torch.bfloat16).eps
    tried = {}  # shapes whose full list was timed (on the first layer of that shape in SWEEP_ORDER)
    for layer in SWEEP_ORDER:
        n, k = LLAMA_8B[layer]
        if clock.over():
            clock.skipped += 1
            print(f"\ngemv {layer}: skipped (budget)", flush=True)
            continue
        q4 = quantize_nf4(_weight((n, k), 1))
        x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
        y = torch.empty(1, n, device=DEVICE, dtype=torch.bfloat16)
        wbuf = torch.empty((n, k), device=DEVICE, dtype=torch.bfloat16)
        truth = gemv_nf4_ref(x.double(), q4, weight_dtype=torch.bfloat16)
        ctrl = (gemv_nf4_ref(x, q4).double() - truth).abs().max().item()
        bound = 2 * ctrl + 1e-3 * eps * truth.abs().max().item()

        def unfused():  # what a 4-bit linear does without the GEMV: dequantize, then a bf16 matmul
            dq.launch_dequant(q4, wbuf, deq_config)
            return torch.nn.functional.linear(x, wbuf)

        t_unfused = _bench(unfused)
        print(f"\ngemv {layer} {n} x {k}: dequant+matmul {t_unfused * 1e6:.1f} us; target <= "
              f"{t_unfused * 5e5:.1f} us (2x)", flush=True)
        default = gv.gemv_config(n, k)
        if (n, k) in tried:  # a repeated shape (v, o, up): the default and the best of its first layer again
            best = min((r for r in rows if r["op"] == "gemv" and tuple(r["shape"]) == (n, k)
                        and r.get("status") == "ok"), key=lambda r: r["us"], default=None)
            todo = [default] + ([gv.GemvConfig(**best["config"])] if best else [])
        else:
            todo = [default] + [variants[name]._replace(split_k=s) for name, s in per_shape[(n, k)]]
            tried[(n, k)] = True
        for cfg in dict.fromkeys(todo):  # in order, without repeats
            row = {"op": "gemv", "layer": layer, "shape": [n, k], "variant": gemv_name(cfg), "config": cfg._asdict(),
                   "default": cfg == default, "unfused_us": t_unfused * 1e6}
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
                row["first_call_s"] = time.time() - t
                err = (y.double() - truth).abs().max().item()
                row.update(err=err, control_err=ctrl, rel_err=((y.double() - truth).norm() / truth.norm()).item())
                if not err <= bound:  # NaN fails too
                    row["status"] = f"WRONG (err {err:.2e} > {bound:.2e})"
                else:
                    sec = _bench(lambda: gv.launch_gemv(x, q4, y, cfg))
                    row.update(status="ok", us=sec * 1e6, speedup=t_unfused / sec, weight_GBps=q4.nbytes() / sec / 1e9)
            except Exception as e:  # noqa: BLE001
                row["status"] = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            _print_gemv(row)
        del q4, wbuf
        torch.cuda.empty_cache()


def _print_gemv(r):
    mark = "*" if r["default"] else " "
    if r.get("status") == "ok":
        print(f" {mark}{r['variant']:28s} {r['us']:6.1f} us {r['speedup']:5.2f}x {r['weight_GBps']:5.0f} GB/s "
              f"err/bf16-ref {r['err'] / max(r['control_err'], 1e-30):.2f} {r['first_call_s']:.1f}s", flush=True)
    else:
        print(f" {mark}{r['variant']:28s} {r['status']}", flush=True)


def _cfg_src(cls, cfg):
    return f"{cls}(" + ", ".join(f"{k}={v!r}" for k, v in cfg.items()) + ")"


def summary(report):
    rows = report["rows"]
    lines = ["", f"== summary: copy {report['copy_GBps']:.0f} GB/s, launch floor {report['floor_us']:.1f} us, "
                 f"{report['elapsed_s']:.0f} s, {report['skipped']} variants skipped"]
    bd = best_dequant(rows)
    if bd:
        lines.append("best dequant: " + "; ".join(f"{r['shape'][0]}x{r['shape'][1]} {r['us']:.1f} us "
                                                   f"{100 * r['of_copy']:.1f}% of copy" for r in bd))
        lines.append("  quant/dequant.py:  DEQUANT_CONFIG = " + _cfg_src("DequantConfig", bd[0]["config"]))
    best = {}  # layer -> its fastest row
    for layer, shape in LLAMA_8B.items():
        ok = [r for r in rows if r["op"] == "gemv" and r["layer"] == layer and r.get("status") == "ok"]
        if not ok:
            lines.append(f"gemv {layer}: nothing timed")
            continue
        b = min(ok, key=lambda r: r["us"])
        d = next((r for r in ok if r["default"]), None)
        best[layer] = b
        lines.append(f"gemv {layer:9s} {shape[0]:5d} x {shape[1]:5d}: best {b['variant']:28s} {b['us']:6.1f} us "
                     f"{b['speedup']:4.2f}x" + (f" | default {d['us']:6.1f} us {d['speedup']:4.2f}x" if d else "")
                     + f" | dequant+matmul {b['unfused_us']:.1f} us")
    # the GEMV_CONFIGS rows that reproduce these bests (first match wins: small N, then N <= 8192 by K, the
    # rest), from the layer of each shape that had the full sweep (the first of its shape in SWEEP_ORDER)
    table = [(2048, None, "k_proj"), (8192, 8192, "q_proj"), (8192, None, "down_proj"), (None, None, "gate_proj")]
    if all(layer in best for _, _, layer in table):
        lines.append("  quant/gemv.py:  GEMV_CONFIGS = (")
        for max_n, max_k, layer in table:
            b = best[layer]
            lines.append(f"    ({max_n}, {max_k}, {_cfg_src('GemvConfig', b['config'])}),  # {layer} "
                         f"{b['shape'][0]} x {b['shape'][1]}: {b['us']:.1f} us, {b['speedup']:.2f}x dequant+matmul")
        lines.append("  )")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="sweep_nf4.json", help="every row as JSON")
    ap.add_argument("--budget", type=float, default=75.0, help="seconds after which remaining variants are skipped")
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
    gv.launch_gemv(xt, tiny, yt, gv.gemv_config(8, 64))
    report["floor_us"] = _bench(lambda: gv.launch_gemv(xt, tiny, yt, gv.gemv_config(8, 64))) * 1e6
    print(f"{report['device']}, torch {report['torch']}, triton {report['triton']}: copy {report['copy_GBps']:.0f} "
          f"GB/s (read+written), launch floor {report['floor_us']:.1f} us; * = the library's current config",
          flush=True)
    sweep_dequant(clock, report["copy_GBps"], report["rows"])
    bd = best_dequant(report["rows"])
    deq_config = dq.DequantConfig(**bd[0]["config"]) if bd else dq.DEQUANT_CONFIG
    print(f"\ndequant+matmul below uses the best dequant config of this run: {deq_config}", flush=True)
    sweep_gemv(clock, report["rows"], deq_config)
    report.update(elapsed_s=time.time() - clock.t0, skipped=clock.skipped)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(summary(report))


if __name__ == "__main__":
    main()
