"""GPU benchmark of the fused linear cross-entropy (kernels/cross_entropy.py), Llama-3.1-8B head by default.

    python -m hare.tools.bench_cross_entropy --out ce.json     # the table of issue 3 (H 4096, V 128256, bf16)
    python -m hare.tools.bench_cross_entropy --sweep           # + chunk size, kernel BLOCK_V x num_warps
    python -m hare.tools.bench_cross_entropy --check           # + errors vs fp64 at full scale (err / control)

Paths, each on the same bf16 inputs with the hidden states requiring grad (LoRA sits under the head):
  fused     linear_cross_entropy(..., backend="triton")
  eager     linear_cross_entropy_ref: logits = h @ W.T in bf16, F.cross_entropy(logits.float(), reduction="sum")
  compiled  torch.compile(linear_cross_entropy_ref)
Per (tokens, weight trainable or frozen):
  fwd+bwd ms   median over CUDA-event-timed runs of: forward, loss.backward() (grads reset to None before each)
  fwd ms       the forward alone under torch.no_grad (evaluation loss)
  extra peak   max_memory_allocated during one forward+backward minus memory_allocated just before it (inputs
               allocated; the gradients it produces count, for every path alike)
Targets (issue 3): at 16384 tokens, fused extra peak <= 1/8 of eager's and fused fwd+bwd time <= eager's.
"""
import argparse
import json
import statistics

import torch

from hare.kernels.cross_entropy import (_ce_rows, default_chunk_size, fused_linear_cross_entropy,
                                        linear_cross_entropy, linear_cross_entropy_ref)

GIB = 2**30


def time_ms(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def extra_peak_bytes(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def make_inputs(n, hidden, vocab, ignored=0.0, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(n, hidden, device="cuda", generator=gen).to(torch.bfloat16)
    # Logits of standard deviation ~3, like a trained head's (a 0.02-init head gives near-uniform softmax).
    w = (torch.randn(vocab, hidden, device="cuda", generator=gen) * (3.0 / hidden**0.5)).to(torch.bfloat16)
    y = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    y[torch.rand(n, device="cuda", generator=gen) < ignored] = -100
    return h, w, y


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def bench(args):
    paths = {"eager": linear_cross_entropy_ref,
             "fused": lambda h, w, y: linear_cross_entropy(h, w, y, backend="triton")}
    if not args.no_compile:
        paths["compiled"] = torch.compile(linear_cross_entropy_ref)
    rows = []
    for n in args.tokens:
        h, w, y = make_inputs(n, args.hidden, args.vocab)
        for w_grad in (True, False):
            h.requires_grad_(True)
            w.requires_grad_(w_grad)
            outs = {}
            for name, fn in paths.items():
                def step():
                    h.grad = None
                    w.grad = None
                    loss, _ = fn(h, w, y)
                    loss.backward()
                    return loss

                def forward():
                    with torch.no_grad():
                        return fn(h, w, y)

                loss = step()                                     # warm-up / compile, and the values to compare
                outs[name] = (loss.detach(), h.grad.clone(), w.grad.clone() if w_grad else None)
                fwd_bwd = time_ms(step, args.reps)
                fwd = time_ms(forward, args.reps)
                h.grad = None
                w.grad = None
                peak = extra_peak_bytes(step)
                h.grad = None
                w.grad = None
                row = dict(tokens=n, hidden=args.hidden, vocab=args.vocab, weight="trainable" if w_grad else "frozen",
                           path=name, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, extra_peak_gib=peak / GIB)
                if name != "eager":
                    e = outs["eager"]
                    row["rel_diff_vs_eager"] = dict(loss=rel(outs[name][0], e[0]), d_hidden=rel(outs[name][1], e[1]),
                                                    d_weight=rel(outs[name][2], e[2]) if w_grad else None)
                rows.append(row)
                print(f"  {n} {row['weight']:9s} {name:8s} fwd {fwd:8.2f} ms  fwd+bwd {fwd_bwd:8.2f} ms  "
                      f"extra peak {peak / GIB:7.2f} GiB", flush=True)
            del outs
        del h, w, y
        torch.cuda.empty_cache()
    return rows


def table(rows):
    eager = {(r["tokens"], r["weight"]): r for r in rows if r["path"] == "eager"}
    lines = ["| tokens | lm_head | path | fwd ms | fwd+bwd ms | extra peak GiB | peak / eager | time / eager | "
             "rel diff vs eager (loss, dh, dW) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = eager[(r["tokens"], r["weight"])]
        d = r.get("rel_diff_vs_eager")
        diff = "" if d is None else ", ".join("-" if v is None else f"{v:.1e}" for v in d.values())
        lines.append(f"| {r['tokens']} | {r['weight']} | {r['path']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                     f"{r['extra_peak_gib']:.2f} | {r['extra_peak_gib'] / e['extra_peak_gib']:.3f} | "
                     f"{r['fwd_bwd_ms'] / e['fwd_bwd_ms']:.2f} | {diff} |")
    return "\n".join(lines)


def targets(rows, tokens):
    out = []
    for weight in ("trainable", "frozen"):
        get = {r["path"]: r for r in rows if r["tokens"] == tokens and r["weight"] == weight}
        if "fused" not in get:
            continue
        f, e = get["fused"], get["eager"]
        mem_ok = f["extra_peak_gib"] <= e["extra_peak_gib"] / 8
        time_ok = f["fwd_bwd_ms"] <= e["fwd_bwd_ms"]
        out.append(dict(tokens=tokens, weight=weight, memory_le_eighth=mem_ok, no_slower=time_ok))
        print(f"target @ {tokens} tokens, {weight} lm_head: extra peak {f['extra_peak_gib']:.2f} <= "
              f"{e['extra_peak_gib'] / 8:.2f} GiB: {'PASS' if mem_ok else 'FAIL'};  fwd+bwd {f['fwd_bwd_ms']:.1f} <= "
              f"{e['fwd_bwd_ms']:.1f} ms: {'PASS' if time_ok else 'FAIL'}")
    return out


def copy_bandwidth_gbs():
    x = torch.empty(2 * GIB // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), 10)
    return 2 * x.numel() * x.element_size() / ms / 1e6


def sweep(args):
    """Chunk size of the full op, then the row kernel alone (BLOCK_V x num_warps) against copy bandwidth."""
    out = dict(chunk=[], kernel=[])
    n = max(args.tokens)
    h, w, y = make_inputs(n, args.hidden, args.vocab)
    h.requires_grad_(True)
    w.requires_grad_(True)
    print(f"chunk size sweep at {n} tokens, trainable lm_head (default {default_chunk_size(n)}):")
    for chunk in (512, 1024, 2048, 4096):
        def step():
            h.grad = None
            w.grad = None
            fused_linear_cross_entropy(h, w, y, chunk_size=chunk)[0].backward()
        ms = time_ms(step, args.reps)
        h.grad = None
        w.grad = None
        peak = extra_peak_bytes(step)
        out["chunk"].append(dict(tokens=n, chunk=chunk, fwd_bwd_ms=ms, extra_peak_gib=peak / GIB))
        print(f"  chunk {chunk:5d}: fwd+bwd {ms:8.2f} ms, extra peak {peak / GIB:.2f} GiB", flush=True)
    del h, w
    torch.cuda.empty_cache()

    bw = copy_bandwidth_gbs()
    rows = 2048
    logits = torch.randn(rows, args.vocab, device="cuda").mul_(3).to(torch.bfloat16)
    labels = y[:rows]
    losses = torch.empty(rows, device="cuda")
    nbytes = 3 * logits.numel() * logits.element_size()       # two reads of each row, one write of g
    print(f"row kernel alone, {rows} x {args.vocab} bf16, vs copy {bw:.0f} GB/s (read + write):")
    for softcap in (None, 30.0):
        for block_v in (1024, 2048, 4096, 8192, 16384):
            for warps in (4, 8, 16):
                # In place, run after run: after the first the buffer holds g (finite, in [-1, 1]); the cost
                # does not depend on the values.
                ms = time_ms(lambda: _ce_rows(logits, labels, losses, -100, softcap, True, block_v, warps),
                             args.reps * 4)
                gbs = nbytes / ms / 1e6
                out["kernel"].append(dict(softcap=softcap, block_v=block_v, num_warps=warps, ms=ms, gbs=gbs,
                                          frac_copy=gbs / bw))
                print(f"  softcap {softcap}  BLOCK_V {block_v:5d}  warps {warps:2d}: {ms:6.3f} ms  {gbs:6.0f} GB/s "
                      f"({gbs / bw:.0%} of copy)", flush=True)
    out["copy_gbs"] = bw
    return out


def check(args):
    """Errors at full scale vs fp64, against the control (the reference in bf16), as the CPU tests do."""
    n = min(args.tokens)
    h, w, y = make_inputs(n, args.hidden, args.vocab, ignored=0.2, seed=1)
    results = []

    def grads(fn, dtype, **kw):
        hh = h.detach().to(dtype).requires_grad_(True)
        ww = w.detach().to(dtype).requires_grad_(True)
        loss, count = fn(hh, ww, y, **kw)
        (loss / count).backward()          # as the decoder normalizes: upstream grad 1 / n_tokens, not 1
        return loss.detach(), hh.grad, ww.grad

    for softcap in (None, 30.0):
        ref = grads(linear_cross_entropy_ref, torch.float64, softcap=softcap)
        ctl = grads(linear_cross_entropy_ref, torch.bfloat16, softcap=softcap)
        for chunk in (None, 512):
            out = grads(fused_linear_cross_entropy, torch.bfloat16, softcap=softcap, chunk_size=chunk)
            for i, name in enumerate(("loss", "d_hidden", "d_weight")):
                err = (out[i].double() - ref[i]).abs().max().item()
                ctrl = (ctl[i].double() - ref[i]).abs().max().item()
                results.append(dict(tokens=n, softcap=softcap, chunk=chunk or default_chunk_size(n),
                                    what=name, err=err, control=ctrl, ratio=err / ctrl if ctrl else float("inf")))
                print(f"  softcap {softcap} chunk {results[-1]['chunk']:5d} {name:8s}: err {err:.3e} "
                      f"control {ctrl:.3e} ratio {results[-1]['ratio']:.2f}", flush=True)
            del out
        del ref, ctl
        torch.cuda.empty_cache()
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    p.add_argument("--sweep", action="store_true", help="also sweep chunk size and kernel block/warps")
    p.add_argument("--check", action="store_true", help="also compare errors vs fp64 at full scale")
    p.add_argument("--skip-bench", action="store_true", help="only --sweep / --check")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_cross_entropy needs a CUDA GPU")
    import triton
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    if args.check:
        result["check"] = check(args)
    if args.sweep:
        result["sweep"] = sweep(args)
    if not args.skip_bench:
        rows = bench(args)
        result["rows"] = rows
        print()
        print(table(rows))
        result["targets"] = targets(rows, max(args.tokens))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
