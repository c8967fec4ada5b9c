"""`make bench`: hare's LoRA / QLoRA training step, measured exactly like the anchor harness
(../shared/bench-anchors/bench_lora.py) so that one GPU run compares hare with Unsloth / HF+PEFT side by side.

Same setup as the anchors: a checkpoint written by the anchors' make_ckpt.py (Llama-3.1-8B or 3.2-1B shapes,
seeded random bf16 weights), LoRA r=16 alpha=16 dropout 0 on q,k,v,o,gate,up,down, bf16 base, torch AdamW (fused)
lr 2e-4, random token ids with labels = inputs from the same seeded generator, 3 warm-up + 10 timed steps,
the LoRA A drawn from --seed as PEFT draws it after torch.manual_seed(seed) (B = 0),
tokens/s of the median step, peak max_memory_allocated. Appends one JSON line with the anchors' field names.

    python -m hare.tools.bench_train --ckpt /tmp/ckpt_8b --quant 4bit --out results.jsonl [--seq 2048 --bs 4]
"""
import argparse
import json
import os
import statistics
import sys
import time
import traceback


def gib(x):
    return round(x / 2**30, 3)


def profile_step(run_step, top):
    """One more training step under torch.profiler: the top GPU kernels by total time and their share of the
    step's GPU time, and the step's GPU idle gaps (stretches with no kernel running, where the host is behind):
    their total and the largest, each with the kernels around it and the innermost host op running at its middle
    (what the host was doing instead of launching). Printed and returned (for BENCHMARKS.md)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_step()
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    kernels = [e for e in prof.key_averages() if e.device_type == cuda]
    total = sum(e.self_device_time_total for e in kernels) or 1.0
    rows = sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]
    out = [dict(kernel=e.key[:120], calls=e.count, ms=round(e.self_device_time_total / 1000, 2),
                share=round(e.self_device_time_total / total, 4)) for e in rows]
    print(f"profile: GPU time {total / 1000:.1f} ms in {sum(e.count for e in kernels)} kernel launches")
    for r in out:
        print(f"  {r['share'] * 100:5.1f}%  {r['ms']:8.2f} ms  x{r['calls']:<5d} {r['kernel']}")
    return dict(gpu_ms=round(total / 1000, 1), top=out, gaps=_gaps(prof.events(), cuda, top))


def _gaps(events, cuda, top, min_us=10.0):
    """GPU idle stretches longer than min_us between the first and last kernel (any stream), largest first."""
    ks = sorted((e for e in events if e.device_type == cuda), key=lambda e: e.time_range.start)
    host = [e for e in events if e.device_type != cuda]
    gaps, end, last = [], None, None
    for k in ks:
        if end is not None and k.time_range.start - end > min_us:
            gaps.append((k.time_range.start - end, end, last.name, k.name))
        if end is None or k.time_range.end > end:
            end, last = k.time_range.end, k
    gaps.sort(reverse=True)
    rows = []
    for us, start, before, after in gaps[:top]:
        mid = start + us / 2
        around = [e for e in host if e.time_range.start <= mid <= e.time_range.end]
        inner = min(around, key=lambda e: e.time_range.end - e.time_range.start).name if around else "-"
        rows.append(dict(us=round(us, 1), before=before[:60], after=after[:60], host=inner[:60]))
    idle = sum(g[0] for g in gaps)
    print(f"GPU idle gaps > {min_us:.0f} us: {len(gaps)}, {idle / 1000:.1f} ms in all; largest:")
    for r in rows:
        print(f"  {r['us']:8.1f} us  host in {r['host']}  | after {r['before']} | before {r['after']}")
    return dict(count=len(gaps), ms=round(idle / 1000, 1), largest=rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory (the anchors' make_ckpt.py output)")
    p.add_argument("--model", default="8b", help="label only: 8b / 1b / tiny")
    p.add_argument("--quant", default="4bit", choices=["4bit", "16bit"])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--gc", default="on", choices=["on", "off", "offload", "auto"],
                   help="gradient checkpointing per layer: on (the anchor table), off, on with the layer inputs "
                        "offloaded to CPU, or auto (keep the activations that fit --budget-gib)")
    p.add_argument("--budget-gib", type=float, default=None, help="--gc auto: memory budget (default: the GPU's)")
    p.add_argument("--stash", default="auto", choices=["auto", "none", "all", "attention", "mlp"],
                   help="--gc offload: blocks sent to the host instead of recomputed (engine/offload.py)")
    p.add_argument("--vocab", type=int, default=128256, help="token ids are drawn below this")
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default="")
    p.add_argument("--profile", type=int, default=0,
                   help="after the timed steps, profile one more step and print the top N GPU kernels")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the LoRA init (apply_lora(seed=...)): the same adapters in every process, and "
                        "PEFT's for torch.manual_seed(seed) just before get_peft_model (engine/lora.py peft_lora_A)")
    p.add_argument("--graph", action="store_true",
                   help="replay each step from a CUDA graph (hare.CUDAGraphStep, captured in the last warm-up step; "
                        "AdamW with capturable=True); with --gc offload or auto give --warmup 4 (the link planner "
                        "times and plans in the first three forwards)")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True): bit-reproducible steps (attention on hare's "
                        "kernel instead of cuDNN's, models/decoder.py attend)")
    args = p.parse_args(argv)
    if args.graph and args.warmup < 2:
        p.error("--graph needs --warmup >= 2 (eager warm-up steps, then the step that captures the graph)")
    if args.graph and args.gc in ("offload", "auto") and args.warmup < 4:
        p.error(f"--graph with --gc {args.gc} needs --warmup >= 4: the link planner times the first two forwards "
                f"and plans in the third, all before the capture in the last warm-up step")
    if args.deterministic:
        # cuBLAS's condition for reproducible results when streams share its workspace (CUDA docs, cuBLAS
        # "Results reproducibility"; torch refuses deterministic GEMMs without it): set before CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    rec = dict(system=f"hare_{args.quant}", gc=args.gc, stash=args.stash if args.gc == "offload" else None,
               model=args.model, seq=args.seq, bs=args.bs,
               tokens_per_step=args.seq * args.bs, warmup=args.warmup, steps=args.steps, tag=args.tag,
               lora_seed=args.seed, graph=args.graph, status="started")
    t0 = time.time()
    try:
        import torch

        import hare

        if args.deterministic:
            torch.use_deterministic_algorithms(True)
        rec["deterministic"] = args.deterministic
        cuda = torch.cuda.is_available()
        dev = "cuda" if cuda else "cpu"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        rec.update(torch=torch.__version__, hare=hare.__version__)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        tl = time.time()
        model = hare.load_model(args.ckpt, dtype=torch.bfloat16 if cuda else torch.float32, device=dev,
                                load_in_4bit=args.quant == "4bit")
        hare.apply_lora(model, r=16, alpha=16, dropout=0.0, seed=args.seed,
                        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
        hook = None
        if args.gc != "off":
            stash = {"stash": args.stash} if args.gc == "offload" else {}
            hook = hare.enable_checkpointing(model, args.gc, args.budget_gib, **stash)
        sync()
        rec["load_s"] = round(time.time() - tl, 1)
        if cuda:
            rec["load_peak_alloc_gib"] = gib(torch.cuda.max_memory_allocated())
            rec["after_load_alloc_gib"] = gib(torch.cuda.memory_allocated())
        params = [q for q in model.parameters() if q.requires_grad]
        rec["trainable_params"] = sum(q.numel() for q in params)
        rec["trainable_dtypes"] = sorted({str(q.dtype) for q in params})
        model.train()
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=cuda, capturable=args.graph)
        if args.graph:  # the last warm-up step captures the graph (and runs it)
            graphed = hare.CUDAGraphStep(model, opt, warmup=args.warmup - 1)

            def run_step(ids):
                return graphed(ids, labels=ids)
        else:
            def run_step(ids):
                loss = model(ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss
        g = torch.Generator(device=dev).manual_seed(1234)
        n = args.warmup + args.steps
        batches = torch.randint(0, args.vocab, (n, args.bs, args.seq), device=dev, generator=g)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        losses, times = [], []
        for i in range(n):
            ids = batches[i]
            sync()
            t = time.perf_counter()
            loss = run_step(ids)
            sync()
            times.append(time.perf_counter() - t)
            losses.append(float(loss.detach().float().item()))
            if i == 0:
                rec["first_step_s_since_start"] = round(time.time() - t0, 1)
            print(f"step {i} {'warm' if i < args.warmup else 'timed'} {times[-1] * 1000:.1f} ms "
                  f"loss {losses[-1]:.5f}", flush=True)
        med = statistics.median(times[args.warmup:])
        rec.update(status="ok", step_times_s=[round(x, 4) for x in times], losses=losses,
                   median_step_s=round(med, 4), tokens_per_s=round(args.seq * args.bs / med, 1),
                   mean_tokens_per_s=round(args.seq * args.bs * args.steps / sum(times[args.warmup:]), 1),
                   first_loss=losses[0], last_loss=losses[-1])
        if cuda:
            rec.update(peak_alloc_gib=gib(torch.cuda.max_memory_allocated()),
                       peak_reserved_gib=gib(torch.cuda.max_memory_reserved()))
        if hasattr(hook, "report"):
            rec["checkpointing"] = hook.report()
            print(rec["checkpointing"], flush=True)
        print("RESULT tok/s", rec["tokens_per_s"], "peak alloc", rec.get("peak_alloc_gib"), flush=True)
        if args.profile and cuda:
            rec["profile"] = profile_step(lambda: run_step(batches[-1]), args.profile)
    except BaseException as e:  # record OOM / errors in the same JSON shape, then fail
        rec["status"] = "oom" if "out of memory" in str(e).lower() else "error"
        rec["error"] = f"{type(e).__name__}: {str(e)[:800]}"
        rec["traceback_tail"] = traceback.format_exc()[-3000:]
        print(rec["traceback_tail"], flush=True)
        rc = 1
    else:
        rc = 0
    rec["wall_s"] = round(time.time() - t0, 1)
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
