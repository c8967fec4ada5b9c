"""GPU benchmark (H200): how long a context a Llama-3.1-8B-shaped QLoRA model trains at with per-layer gradient
checkpointing, with and without offloading the checkpointed layer inputs to pinned CPU memory.

    python -m hare.tools.bench_offload                      # default sweep of sequence lengths
    python -m hare.tools.bench_offload --seq 65536 131072   # chosen lengths
    python -m hare.tools.bench_offload --memory-gib 24 --seq 32768 49152 65536   # a capped GPU: cheap lengths

Random weights (the shapes are what matters): NF4 projections (quant/linear.py Linear4bit) made layer by layer on
the GPU, bf16 embeddings and head, LoRA r=16 on all seven projections. One training step (forward, backward,
AdamW) per (length, mode) after one warmup step of the same length; prints tokens/s and peak memory, or OOM. Paste the table into
BENCHMARKS.md.
"""
import argparse
import time

import torch
from torch import nn

LLAMA_31_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                   max_position_embeddings=131072, rope_theta=500000.0,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192), tie_word_embeddings=False)


def build(layers=None, device="cuda", **shape):
    from ..engine.lora import apply_lora
    from ..models.config import config_from_dict
    from ..models.decoder import CausalLM
    from ..quant.linear import Linear4bit

    hf = dict(LLAMA_31_8B, num_hidden_layers=layers or LLAMA_31_8B["num_hidden_layers"], **shape)
    with torch.device("meta"):
        model = CausalLM(config_from_dict(hf))
    g = torch.Generator(device=device).manual_seed(0)
    for path, m in list(model.named_modules()):
        if isinstance(m, nn.Linear):
            w = torch.randn(m.out_features, m.in_features, device=device, dtype=torch.bfloat16, generator=g)
            w.mul_(m.in_features ** -0.5)
            dense = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
            dense.weight = nn.Parameter(w, requires_grad=False)
            new = dense if path == "lm_head" else Linear4bit.from_linear(dense)
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    emb = model.model.embed_tokens
    emb.weight = nn.Parameter(torch.randn(emb.weight.shape, device=device, dtype=torch.bfloat16, generator=g) * 0.02,
                              requires_grad=False)
    for name, p in list(model.named_parameters()):
        if p.is_meta:  # norms
            mod, _, attr = name.rpartition(".")
            setattr(model.get_submodule(mod), attr,
                    nn.Parameter(torch.ones(p.shape, device=device, dtype=torch.bfloat16), requires_grad=False))
    return apply_lora(model, r=16, alpha=16, seed=0)


def step(model, opt, T):
    ids = torch.randint(0, 128256, (1, T), device="cuda")
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def main(argv=None):
    from ..engine.lora import trainable_parameters
    from ..engine.offload import enable_checkpointing

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="*", default=[32768, 65536, 98304, 131072, 163840, 196608])
    p.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="cap this process's GPU memory (torch's per-process fraction): finds the lengths where each "
                        "mode runs out at short, cheap sequences instead of at the whole GPU's")
    args = p.parse_args(argv)
    if args.memory_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total))
        print(f"memory capped at {args.memory_gib} GiB of {total / 2**30:.0f}")
    model = build(args.layers)
    opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-4, fused=True)
    print(f"weights: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated")
    print(f"{'seq':>8} {'mode':<22} {'tokens/s':>10} {'peak GiB':>9}")
    for T in args.seq:
        for offload in (False, True):
            enable_checkpointing(model, "offload" if offload else "on")
            mode = "checkpoint+offload" if offload else "checkpoint"
            try:
                # warmup at the same length: kernels compiled, and the pinned host buffers of this size allocated
                # (cudaHostAlloc is slow and synchronous the first time; torch caches the buffers afterwards).
                # Measured 2026-11-28 with a 4096-token warmup instead: offload at 32k/48k read 1.6k tok/s
                # against 6.7k/5.6k for plain checkpointing, the first-time allocations included.
                step(model, opt, T)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.time()
                step(model, opt, T).item()
                dt = time.time() - t0
                print(f"{T:>8} {mode:<22} {T / dt:>10.0f} {torch.cuda.max_memory_allocated() / 2**30:>9.1f}",
                      flush=True)
            except torch.OutOfMemoryError:
                print(f"{T:>8} {mode:<22} {'OOM':>10}", flush=True)
                opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
