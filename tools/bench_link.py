"""GPU measurements behind checkpoint offload's stashed blocks (engine/offload.py, BENCHMARKS.md run S4-1):

    python -m hare.tools.bench_link

- the host link: pinned copies of 64 and 512 MiB device-to-host, host-to-device, and both at once;
- what SDPA saves for its backward (causal, 32 q / 8 kv heads x 128, bf16: the tensors a stashed attention block
  sends to the host), and its forward, forward + backward and backward times, at 4 x 2048 and 1 x 32768;
- the Llama-3.1-8B GEMMs a stashed block saves or leaves in the recomputation: q/k/v (x 4096 -> 6144) and gate
  (x 4096 -> 14336) at the same token counts.
Timed with CUDA events over 10 repeats after one warm-up; prints one line per figure.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def ms(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def link(mib):
    n = mib << 20
    dev, dev2 = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    host, host2 = torch.empty(n, dtype=torch.uint8, pin_memory=True), torch.empty(n, dtype=torch.uint8, pin_memory=True)
    d2h = ms(lambda: host.copy_(dev, non_blocking=True))
    h2d = ms(lambda: dev.copy_(host, non_blocking=True))
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def both():
        with torch.cuda.stream(s1):
            host.copy_(dev, non_blocking=True)
        with torch.cuda.stream(s2):
            dev2.copy_(host2, non_blocking=True)
        torch.cuda.current_stream().wait_stream(s1)
        torch.cuda.current_stream().wait_stream(s2)

    print(f"link {mib} MiB: device-to-host {n / d2h / 1e6:.1f} GB/s, host-to-device {n / h2d / 1e6:.1f} GB/s, "
          f"both at once {2 * n / ms(both) / 1e6:.1f} GB/s in all", flush=True)


def attention_and_gemms(B, T):
    q = torch.randn(B, 32, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, 8, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, 8, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    saved = []
    with sdpa_kernel(SDPA, set_priority=True):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t,
                                                      lambda t: t):
            o = sdpa()
        print(f"SDPA {B} x {T}: {type(o.grad_fn).__name__} saves {saved}", flush=True)
        do = torch.randn_like(o)
        fwd = ms(sdpa)
        fwd_bwd = ms(lambda: torch.autograd.grad(sdpa(), (q, k, v), do))
        bwd = ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
    print(f"SDPA {B} x {T}: forward {fwd:.3f} ms, forward + backward {fwd_bwd:.3f} ms, backward {bwd:.3f} ms")
    x = torch.randn(B * T, 4096, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    qkv = torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16)
    print(f"GEMM {B * T} tokens: gate (-> 14336) {ms(lambda: x @ gate.t()):.3f} ms, q/k/v (-> 6144) "
          f"{ms(lambda: x @ qkv.t()):.3f} ms", flush=True)


def main():
    for mib in (64, 512):
        link(mib)
    for B, T in ((4, 2048), (1, 32768)):
        attention_and_gemms(B, T)


if __name__ == "__main__":
    main()
