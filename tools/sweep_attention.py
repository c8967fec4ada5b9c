"""GPU sweep of kernels/attention.py's launch variants vs SDPA and FlexAttention (issue 7). CUDA only.

    python -m hare.tools.sweep_attention [--out sweep_attention.json] [--no-flex]

Two cases, bf16, B 4 x T 8192, 32 q / 8 kv heads, head dim 128: causal, and causal with a 4096 window. For each,
every variant below (the library's own kernels, chosen by `KernelConfig`: block shape, warps, stages, interior/edge
split) is compiled (in parallel threads, triton compiles release the GIL), checked and timed, kernel by kernel: the
forward; the dQ kernel (which also computes delta); the dK/dV kernel. Then the forward + backward of: the defaults
before the split (no split), the library's current `_config`, and the best variant of each kernel put together;
and SDPA (cuDNN, flash; causal only) and FlexAttention in the same run. (The 2026-11-28 run, window case, chose
`_config`'s D 128 entries; TMA loads and an atomic-dQ backward were swept then too and removed: kernels/attention.py's
module docstring has their numbers.)

Check before timing: output and gradients on batch 0, kv head 0 and its q heads (the dK/dV of one kv head needs
only its group) against `attention_ref` in fp64; a variant passes when its max error is <= 2x the control's, the
control being the larger of the ref run in bf16 (the tests' control) and the errors of SDPA / FlexAttention (bf16
flash kernels with the same roundings of P and dS). Failing variants are shown and never picked.

FLOPs as tools/bench_attention.py: visible pairs only, fwd+bwd = 3.5x the forward. Kernel rows show ms; the
`bwd` column of a dQ / dK/dV row adds the other backward kernel at the library default, so it reads as a whole
backward time.
"""
import argparse
import gc
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

B, T, HQ, HK, D = 4, 8192, 32, 8, 128
WINDOW = 4096


def _modules():
    import importlib
    return (importlib.import_module("hare.kernels.attention"), importlib.import_module("hare.tools.bench_attention"))


def variants(K):
    """Candidate KernelConfigs per kernel (D 128, bf16). The first of each list is the default before the split
    (every tile tested at run time); shared-memory sizes are for the bf16 tiles. ms: the 2026-11-28 H200 run,
    window case."""
    fwd = [
        K(128, 64, 8, 4, split=False),  # 3.898
        K(128, 64, 8, 4),              # 3.911, the former default: 32 KB q + 4 x 32 KB k/v
        K(128, 64, 8, 3),              # 3.778
        K(128, 64, 8, 5),              # 4.000; 192 KB
        K(128, 128, 8, 3),             # 3.655, library default; 224 KB; 128 x 128 fp32 scores: spills outside the
                                       # loop only
        K(128, 128, 8, 2),             # 4.344
        K(64, 64, 4, 3),               # 4.031; 112 KB, 168 registers: two programs per SM, one's softmax under the
                                       # other's MMA
    ]
    dq = [
        K(128, 64, 8, 4, split=False),  # 4.706
        K(128, 64, 8, 4),              # 4.420, the former default
        K(128, 64, 8, 3),              # 4.361, library default
        K(128, 128, 8, 2),             # 4.781
        K(128, 32, 8, 4),              # 5.346
        K(64, 64, 4, 2),               # 4.806; 96 KB: two programs per SM
    ]
    dkdv = [
        K(64, 128, 8, 3, split=False),  # 6.986, library default
        K(64, 128, 8, 3),              # 7.616, the former default (spills 0 in the interior loop, some outside)
        K(64, 128, 8, 2),              # 7.290
        K(32, 128, 8, 3),              # 8.286
        K(32, 128, 8, 4),              # 8.466
        K(64, 64, 4, 3),               # 8.613
    ]
    return dict(fwd=fwd, dq=dq, dkdv=dkdv)


def name(kc):
    return f"{kc.block_m}x{kc.block_n} w{kc.warps} s{kc.stages}" + ("" if kc.split else " nosplit")


def bench(fn, setup=None, budget_ms=120.0, max_reps=40):
    """Median ms of fn() over repetitions that fill about budget_ms, L2 flushed before each (as triton's do_bench)."""
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    reps = int(max(3, min(max_reps, budget_ms / max(est, 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        if setup is not None:
            setup()
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[reps // 2]


class Case:
    """Inputs, the fp64 reference on the checked slice, and the control errors of one case."""

    def __init__(self, A, BA, window):
        self.window = window
        self.label = "causal" if window is None else f"window {window}"
        self.q, self.k, self.v, self.do = BA.make_inputs(B, T, HQ, HK, D, torch.bfloat16)
        self.group = HQ // HK
        self.flops = 4 * B * HQ * D * BA.visible_pairs(T, window=window)
        self.sc = A._scalars(D, None, None, window, T)
        ref = self._ref_slice(A, torch.float64)
        self.ref = ref
        self.control = dict(zip(("out", "dq", "dk", "dv"), self.errors(self._ref_slice(A, torch.bfloat16))))
        self.scale = {n: r.abs().max().item() for n, r in zip(("out", "dq", "dk", "dv"), ref)}

    def slices(self, out=None, dq=None, dk=None, dv=None):
        """The checked slice (batch 0, kv head 0, its q heads) of whichever tensors are given."""
        g = self.group
        return [None if t is None else t[:1, :, :(g if n in ("out", "dq") else 1)]
                for n, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv))]

    def _ref_slice(self, A, dtype):
        g = self.group
        qs, ks, vs, dos = self.q[:1, :, :g], self.k[:1, :, :1], self.v[:1, :, :1], self.do[:1, :, :g]
        leaves = [t.to(dtype).requires_grad_() for t in (qs, ks, vs)]
        o = A.attention_ref(*leaves, window=self.window)
        grads = torch.autograd.grad(o, leaves, dos.to(dtype))
        res = [o.detach(), *grads]
        del o, leaves
        gc.collect()
        torch.cuda.empty_cache()
        return res

    def errors(self, got):
        """Max abs error vs the fp64 reference per tensor (None where not given)."""
        return [None if a is None else (a.double() - r).abs().max().item() for a, r in zip(got, self.ref)]

    def add_control(self, errs):
        """A flash-style provider's errors raise the control (module docstring)."""
        for n, e in zip(("out", "dq", "dk", "dv"), errs):
            if e is not None:
                self.control[n] = max(self.control[n], e)

    def verdict(self, got):
        """(ok, worst ratio err / control) over the given tensors."""
        ratios = []
        ok = True
        for n, e in zip(("out", "dq", "dk", "dv"), self.errors(got)):
            if e is None:
                continue
            floor = 1e-3 * 2 ** -7 * self.scale[n]  # tests/tolerance.py's 16-bit floor
            ok = ok and e <= 2 * self.control[n] + floor and e == e
            ratios.append(e / max(self.control[n], 1e-30))
        return ok, max(ratios)


def provider_rows(case, BA, no_flex):
    """SDPA (causal only) and FlexAttention: check on the slice, time fwd and fwd+bwd."""
    from torch.nn.attention import SDPBackend

    provs = []
    if case.window is None:
        provs += [("sdpa-cudnn", lambda: BA.sdpa_fn(SDPBackend.CUDNN_ATTENTION, "gqa")),
                  ("sdpa-flash", lambda: BA.sdpa_fn(SDPBackend.FLASH_ATTENTION, "gqa"))]
    if not no_flex:
        provs.append(("flex", lambda: BA.flex_fn(B, T, HQ, BA.masks(window=case.window))))
    rows = []
    for pname, make in provs:
        row = dict(case=case.label, kind="provider", name=pname)
        t0 = time.perf_counter()
        try:
            fn = make()
            leaves = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
            o = fn(*leaves)
            o.backward(case.do)
            errs = case.errors(case.slices(o, *(t.grad for t in leaves)))
            case.add_control(errs)
            row["err"] = errs

            def zero():
                for t in leaves:
                    t.grad = None

            # The forward of the training graph (it also saves what the backward needs, as hare's forward
            # saves lse): one compile for FlexAttention instead of two.
            row["fwd_ms"] = bench(lambda: fn(*leaves))
            row["fwd_bwd_ms"] = bench(lambda: fn(*leaves).backward(case.do), setup=zero)
        except Exception as e:  # a backend that refuses the case is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def compile_all(A, case, cands, base, o, lse, delta, threads):
    """Launch every variant once from a thread pool, so Triton compiles them in parallel (its compiler releases the
    GIL). A warm-up only: results and errors are dropped, the checked runs below launch every variant again on the
    main thread (compiling there whatever failed here)."""
    def job(kind, kc):
        try:
            run_kernel(A, case, kind, kc, base, o, lse, delta)
        except Exception:
            pass

    jobs = [(kind, kc) for kind, lst in cands.items() for kc in lst]
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(lambda j: job(*j), jobs))
    torch.cuda.synchronize()


def run_kernel(A, case, kind, kc, base, o, lse, delta):
    """One launch of one kernel variant; returns what it computes (slices are taken by the caller)."""
    q, k, v, do, sc = case.q, case.k, case.v, case.do, case.sc
    if kind == "fwd":
        return A._attention_fwd(q, k, v, None, None, case.window, None, dict(base, fwd=kc))
    if kind == "dq":
        return A._bwd_dq(do, q, k, v, o, lse, sc, None, kc)
    return A._bwd_dkdv(do, q, k, v, lse, delta, sc, None, kc)


def sweep_case(A, BA, case, args):
    K = A.KernelConfig
    base = A._config(D, False, torch.bfloat16, False)
    cands = variants(K)
    rows = []
    t0 = time.perf_counter()
    with torch.no_grad():
        o, lse = A._attention_fwd(case.q, case.k, case.v, None, None, case.window, None, base)
        _, delta = A._bwd_dq(case.do, case.q, case.k, case.v, o, lse, case.sc, None, base["dq"])
        compile_all(A, case, cands, base, o, lse, delta, args.threads)
    print(f"[{case.label}] compiled {sum(len(v) for v in cands.values())} variants in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    # Default times of the other backward kernel, to show each backward variant as a whole backward.
    other = dict(dq=bench(lambda: A._bwd_dkdv(case.do, case.q, case.k, case.v, lse, delta, case.sc, None,
                                              base["dkdv"])),
                 dkdv=bench(lambda: A._bwd_dq(case.do, case.q, case.k, case.v, o, lse, case.sc, None, base["dq"])))
    for kind, lst in cands.items():
        for kc in lst:
            row = dict(case=case.label, kind=kind, name=name(kc), cfg=list(kc))
            try:
                with torch.no_grad():
                    res = run_kernel(A, case, kind, kc, base, o, lse, delta)
                    if kind == "fwd":
                        got = case.slices(out=res[0])
                    elif kind == "dq":
                        got = case.slices(dq=res[0])
                    else:
                        got = case.slices(None, None, *res)
                    del res
                    row["ok"], row["err_ratio"] = case.verdict(got)
                    row["ms"] = bench(lambda: run_kernel(A, case, kind, kc, base, o, lse, delta))
                if kind == "fwd":
                    row["tflops"] = case.flops / row["ms"] / 1e9
                else:
                    row["bwd_ms"] = row["ms"] + other[kind]
                    row["bwd_tflops"] = 2.5 * case.flops / row["bwd_ms"] / 1e9
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            rows.append(row)
            print(json.dumps(row), flush=True)

    # Forward + backward of whole configurations.
    def best(kind):
        ok = [(r["ms"], K(*r["cfg"])) for r in rows if r["kind"] == kind and r.get("ok")]
        return min(ok, key=lambda x: x[0])[1] if ok else None

    f_kc, q_kc, kv_kc = best("fwd"), best("dq"), best("dkdv")
    configs = [("default before the split (no split)",
                dict(fwd=cands["fwd"][0], dq=cands["dq"][0], dkdv=cands["dkdv"][0])),
               ("library default", base)]
    if f_kc is not None and q_kc is not None and kv_kc is not None:
        configs.append(("best of each kernel", dict(fwd=f_kc, dq=q_kc, dkdv=kv_kc)))
    for label, cfg in configs:
        row = dict(case=case.label, kind="total", name=label, cfg={k_: list(v) for k_, v in cfg.items()})
        try:
            def step():
                out, l_ = A._attention_fwd(case.q, case.k, case.v, None, None, case.window, None, cfg)
                A._attention_bwd(case.do, case.q, case.k, case.v, out, l_, None, None, case.window, None, cfg)
            with torch.no_grad():
                row["fwd_ms"] = bench(lambda: A._attention_fwd(case.q, case.k, case.v, None, None, case.window,
                                                               None, cfg))
                row["fwd_bwd_ms"] = bench(step)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows, cases):
    """Markdown: per case, providers and whole configurations, then each kernel's variants (best marked)."""
    out = []
    for case in cases:
        fl = case.flops
        rs = [r for r in rows if r["case"] == case.label]
        out += [f"\n### {case.label}, bf16, {B} x {T}, {HQ}/{HK} heads, D {D}\n",
                "| run | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | check |", "|---|---|---|---|---|---|"]
        for r in rs:
            if r["kind"] not in ("provider", "total"):
                continue
            if "error" in r:
                out.append(f"| {r['name']} | - | - | - | - | {r['error'][:80]} |")
                continue
            chk = "" if "err" not in r else "errors " + "/".join(f"{e:.1e}" for e in r["err"])
            out.append(f"| {r['name']} | {r['fwd_ms']:.3f} | {fl / r['fwd_ms'] / 1e9:.0f} | {r['fwd_bwd_ms']:.3f} | "
                       f"{3.5 * fl / r['fwd_bwd_ms'] / 1e9:.0f} | {chk} |")
        out += ["", "| kernel | variant | ms | TFLOP/s (fwd) or whole bwd ms / TFLOP/s | err / control |",
                "|---|---|---|---|---|"]
        for kind in ("fwd", "dq", "dkdv"):
            ks = [r for r in rs if r["kind"] == kind]
            good = [r for r in ks if r.get("ok")]
            # backward variants compare as whole backwards (the other kernel at the library default)
            fastest = min(good, key=lambda r: r.get("bwd_ms", r["ms"])) if good else None
            for r in ks:
                mark = " **best**" if r is fastest else ""
                if "error" in r:
                    out.append(f"| {kind} | {r['name']} | - | - | {r['error'][:80]} |")
                    continue
                perf = (f"{r['tflops']:.0f}" if kind == "fwd" else f"{r['bwd_ms']:.3f} / {r['bwd_tflops']:.0f}")
                chk = f"{r['err_ratio']:.2f}" + ("" if r["ok"] else " FAIL")
                out.append(f"| {kind} | {r['name']}{mark} | {r['ms']:.3f} | {perf} | {chk} |")
        out.append("\n" + targets(rs))
    return "\n".join(out) + "\n"


def targets(rs):
    """Issue 7's targets: causal >= SDPA's best; window >= 1.3x FlexAttention (fwd and fwd+bwd, by time)."""
    def fastest(names, key):
        ms = [r[key] for r in rs if r["name"] in names and key in r]
        return min(ms) if ms else None

    hare = [r["name"] for r in rs if r["kind"] == "total"]
    causal = rs[0]["case"] == "causal"
    rivals, factor = ((["sdpa-cudnn", "sdpa-flash"], 1.0) if causal else (["flex"], 1.3))
    parts = []
    for key, label in (("fwd_ms", "fwd"), ("fwd_bwd_ms", "fwd+bwd")):
        h, r = fastest(hare, key), fastest(rivals, key)
        if h is None or r is None:
            parts.append(f"{label}: not measured")
            continue
        speedup = r / h
        parts.append(f"{label}: hare's best {h:.3f} ms = {speedup:.2f}x {'/'.join(rivals)}'s best "
                     f"(target {factor}x: {'met' if speedup >= factor else 'NOT met'})")
    return "Targets: " + "; ".join(parts) + "."


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="also write the rows (json) and the table (.md)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles take most of the time)")
    p.add_argument("--cases", nargs="+", default=["causal", "window"], choices=["causal", "window"])
    p.add_argument("--threads", type=int, default=16, help="parallel Triton compiles")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("sweep_attention needs a CUDA GPU")
    t_start = time.perf_counter()
    A, BA = _modules()
    rows, cases = [], []
    for c in args.cases:
        t0 = time.perf_counter()
        case = Case(A, BA, None if c == "causal" else WINDOW)
        cases.append(case)
        rows += provider_rows(case, BA, args.no_flex)
        print(f"[{case.label}] reference and providers: {time.perf_counter() - t0:.1f} s", flush=True)
        rows += sweep_case(A, BA, case, args)
        print(f"[{case.label}] done at {time.perf_counter() - t_start:.1f} s", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                seconds=round(time.perf_counter() - t_start, 1))
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    md = table(rows, cases)
    print(json.dumps(meta))
    print(md)
    if args.out is not None:
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        args.out.with_suffix(".md").write_text(f"{json.dumps(meta)}\n{md}")


if __name__ == "__main__":
    main()
