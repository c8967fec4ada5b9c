"""GPU benchmark of the NF4 kernels (issue 4). CUDA only.

    python -m hare.tools.bench_nf4 --out bench_nf4.json

1. Ceiling: device-to-device copy bandwidth (bytes read + written), measured in the same run.
2. Dequantization at 4096 x 14336 and 14336 x 4096 (bf16 out): GB/s counting the bytes the kernel must move
   (packed 4-bit + absmax codes + nested statistics read, 16-bit weight written), as a fraction of the copy
   ceiling (target >= 85%), and bitsandbytes' dequantize_4bit on the same weight when it imports with CUDA
   (target: faster).
3. Batch-1 decoding on the Llama-3.1-8B linear shapes (q, k, v, o, gate, up, down): fused 4-bit GEMV vs
   dequantize + matmul (target >= 2x), and bitsandbytes' own 4-bit GEMV (matmul_4bit at one row) for scale.
Before timing, each kernel is checked against its reference on the same inputs (dequant: bit for bit, also
against bitsandbytes; GEMV: relative error vs fp64), and hare's quantization against bitsandbytes' CUDA bytes.
Times: triton.testing.do_bench medians (it clears the L2 cache between runs, so the weight comes from HBM as it
does in a real decode step). The kernels run with the library's configs (quant/dequant.py DEQUANT_CONFIG,
quant/gemv.py GEMV_CONFIGS); tools/sweep_nf4.py times the alternatives. Writes --out (JSON) and the markdown
table next to it (.md); prints the table last.
"""
import argparse
import json
import sys

import torch

LLAMA_8B = {  # (out_features, in_features) of Llama-3.1-8B: hidden 4096, 32 q heads / 8 kv heads x 128, MLP 14336
    "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336),
}
DEQUANT_SHAPES = [(4096, 14336), (14336, 4096)]


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
    a = torch.randn(2 ** 30, dtype=torch.bfloat16, device="cuda")  # 2 GiB
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
        ref = dequantize_nf4_ref(q4, torch.bfloat16)
        cfg = dq.DEQUANT_CONFIG
        out.fill_(float("nan"))
        dq.launch_dequant(q4, out, cfg)
        exact = torch.equal(out.view(torch.int16), ref.view(torch.int16))
        t = _bench(lambda: dq.launch_dequant(q4, out, cfg))
        results.append({"op": "dequant", "shape": list(shape), "config": cfg._asdict(), "bit_exact_vs_ref": exact,
                        "us": t * 1e6, "GBps": moved / t / 1e9, "of_copy": moved / t / 1e9 / ceiling})
        if F is not None:
            qb, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            mine = NF4Weight.from_bnb({"weight": qb, **{"weight." + k: v for k, v in
                                                        st.as_dict(packed=True).items()}})
            theirs = F.dequantize_4bit(qb, st, quant_type="nf4")
            same = torch.equal(mine.dequantize(torch.bfloat16).view(torch.int16), theirs.view(torch.int16))
            t = _bench(lambda: F.dequantize_4bit(qb, st, quant_type="nf4"))
            results.append({"op": "dequant_bitsandbytes", "shape": list(shape), "us": t * 1e6,
                            "GBps": moved / t / 1e9, "of_copy": moved / t / 1e9 / ceiling,
                            "hare_equals_bnb_on_bnb_bytes": same})
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

        def unfused():
            return torch.nn.functional.linear(x, q4.dequantize(torch.bfloat16))

        t_unfused = _bench(unfused)
        unfused_err = ((unfused().double() - truth).norm() / truth.norm()).item()
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


def markdown(report):
    lines = [f"NF4 kernels on {report['device']} (torch {report['torch']}, triton {report['triton']}, "
             f"bitsandbytes {report['bitsandbytes']}); copy ceiling {report['copy_GBps']:.0f} GB/s (read+written)",
             "", "| dequant (bf16 out) | hare us | hare GB/s | of copy | bnb us | bnb GB/s | hare vs bnb |",
             "|---|---|---|---|---|---|---|"]
    deq = [r for r in report["results"] if r["op"] == "dequant"]
    for r in deq:
        b = next((x for x in report["results"] if x["op"] == "dequant_bitsandbytes" and x["shape"] == r["shape"]),
                 None)
        lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {r['us']:.1f} | {r['GBps']:.0f} | "
                     f"{100 * r['of_copy']:.1f}% | {b['us'] if b else float('nan'):.1f} | "
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
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    md = markdown(report)
    with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
