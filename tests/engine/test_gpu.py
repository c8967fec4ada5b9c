"""GPU checks of the training engine (skipped without CUDA): the fused LoRA functions in bf16 against the fp64
reference with the control tolerance, a QLoRA model (NF4 base) training with checkpoint offload giving the same
losses as without, and peak memory lower with offload."""
import pytest
import torch
from torch import nn

from hare.kernels import lora as K
from tests.tolerance import assert_close_to_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _leaves(projections, dtype):
    out = []
    for W, b, A, B, s in projections:
        out.append([W.to(dtype), None if b is None else b.to(dtype),
                    A.detach().clone().float().requires_grad_(), B.detach().clone().float().requires_grad_(), s])
    return out


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_fused_mlp_bf16_on_gpu(act):
    g = torch.Generator(device="cuda").manual_seed(0)
    H, I, r, T = 512, 1376, 16, 1000

    def proj(o, i):
        return [torch.randn(o, i, device="cuda", generator=g, dtype=torch.float64) / i ** 0.5, None,
                torch.randn(r, i, device="cuda", generator=g, dtype=torch.float64) / i ** 0.5,
                torch.randn(o, r, device="cuda", generator=g, dtype=torch.float64) / r ** 0.5, 2.0]

    ps = [proj(I, H), proj(I, H), proj(H, I)]
    x = torch.randn(2, T // 2, H, device="cuda", generator=g, dtype=torch.float64)
    dy = torch.randn(2, T // 2, H, device="cuda", generator=g, dtype=torch.float64)
    runs = []
    for dtype, backend in ((torch.bfloat16, "triton"), (torch.float64, "ref"), (torch.bfloat16, "ref")):
        leaves = _leaves(ps, dtype)
        if dtype == torch.float64:
            for p in leaves:
                p[2], p[3] = (t.detach().double().requires_grad_() for t in p[2:4])
        xs = x.detach().to(dtype).clone().requires_grad_()  # a leaf in every run (x itself is fp64)
        y = K.lora_mlp(xs, *leaves, act=act, backend=backend)
        y.backward(dy.to(dtype))
        runs.append([y, xs.grad] + [t.grad for p in leaves for t in p[2:4]])
    for i, (a, b, c) in enumerate(zip(*runs)):
        assert_close_to_ref(a, b, c, f"tensor {i}")


def _wide_llama(path, layers, kv_heads, max_positions):
    """A tiny-but-wide random Llama (hidden 1024, 8 heads, vocab 1000) saved by transformers at `path`; its
    config."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2816,
                                   num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=kv_heads,
                                   max_position_embeddings=max_positions)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return cfg


def test_qlora_offload_same_losses_less_memory(tmp_path):
    """A tiny-but-wide Llama with NF4 projections: checkpointing + offload gives the losses of plain
    checkpointing, with a lower peak; so do stashed blocks (every one, and the link planner's choice, which
    starts from the third step), which keep nothing on the device between forward and backward."""
    from hare import load_model
    from hare.engine.lora import apply_lora, trainable_parameters
    from hare.engine.offload import enable_checkpointing
    from hare.quant.linear import Linear4bit

    cfg = _wide_llama(tmp_path / "m", layers=8, kv_heads=4, max_positions=8192)
    ids = torch.randint(0, 1000, (1, 8192), device="cuda")
    # one document: hare's attention kernel (no atomics, so the two runs can be compared bit for bit; PyTorch's
    # flash backward is not deterministic)
    docs = torch.zeros_like(ids)
    results = []
    for mode, stash in (("on", "auto"), ("offload", "none"), ("offload", "all"), ("offload", "auto")):
        model = load_model(str(tmp_path / "m"), dtype=torch.bfloat16, device="cuda")
        for path, m in list(model.named_modules()):
            if isinstance(m, nn.Linear) and path.startswith("model.layers."):
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child, Linear4bit.from_linear(m))
        apply_lora(model, r=16, seed=0)
        hook = enable_checkpointing(model, mode, stash=stash)
        opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-3, fused=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        losses = []
        for step in range(4):
            loss = model(ids, labels=ids, doc_ids=docs).loss
            if step == 0:  # after the forward: what the graph holds (copies done, their buffers handed back)
                torch.cuda.synchronize()
                torch.empty(1, device="cuda")
                held = torch.cuda.memory_allocated()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        results.append((losses, torch.cuda.max_memory_allocated(), held))
        print(mode, stash, hook.report(), f"peak {results[-1][1] / 2**30:.2f} GiB, after forward {held / 2**30:.3f}")
        del model, opt, hook
        torch.cuda.empty_cache()
    (plain, peak_plain, _), (off, peak_off, held_off), (all_, _, held_all), (auto, _, _) = results
    assert plain == off == all_ == auto
    assert peak_off < peak_plain
    # stashed blocks keep nothing big on the device between forward and backward, their inputs included (q, k,
    # v and the MLP input: 48 MiB per layer here); saved tensors under Offloader.MIN_BYTES stay by reference
    # (x A^T products, log-sum-exp, adapter casts: ~2 MiB per layer)
    assert held_all <= held_off + cfg.num_hidden_layers * (4 << 20)


def test_stashed_attention_on_sdpa_matches_recomputation(tmp_path):
    """Plain causal rows take PyTorch's SDPA (cuDNN on the H200 in bf16): a stashed attention block (its saved
    tensors, output included, back from the host, its recorded backward replayed) gives a loss and adapter
    gradients no further from the fp32 model's than the recomputing bf16 run's are (2x, the project's control
    rule). The control is needed: the recorded forward runs SDPA with grad (log-sum-exp kept), the recomputing
    one without, and the backward may be nondeterministic, so bits need not match."""
    from hare import load_model
    from hare.engine.lora import apply_lora, trainable_parameters
    from hare.engine.offload import enable_checkpointing
    from tests.tolerance import assert_close_to_ref

    _wide_llama(tmp_path / "m", layers=4, kv_heads=2, max_positions=4096)
    ids = torch.randint(0, 1000, (2, 2048), device="cuda")
    runs = []
    for dtype, stash in ((torch.float32, "none"), (torch.bfloat16, "none"), (torch.bfloat16, "attention")):
        model = load_model(str(tmp_path / "m"), dtype=dtype, device="cuda")
        apply_lora(model, r=16, seed=0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # B != 0, so that every adapter gradient is non-trivial
            for name, p in trainable_parameters(model).items():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        hook = enable_checkpointing(model, "offload", stash=stash)
        loss = model(ids, labels=ids).loss
        loss.backward()
        runs.append([loss.detach().float()] + [p.grad.float() for p in trainable_parameters(model).values()])
        assert hook.report().endswith(stash)
    for i, (ref, control, out) in enumerate(zip(*runs)):
        assert_close_to_ref(out, ref, control, f"tensor {i} (0: loss)")


def test_deterministic_mode_trains_bit_reproducibly(tmp_path, monkeypatch):
    """Under torch.use_deterministic_algorithms(True) plain causal attention takes hare's kernel (no atomics)
    instead of cuDNN's SDPA (nondeterministic backward): two runs of the same steps, offload checkpointing with
    stashed attention included, give the same losses and adapter gradients bit for bit."""
    from hare import load_model
    from hare.engine.lora import apply_lora, trainable_parameters
    from hare.engine.offload import enable_checkpointing
    from hare.models import decoder

    _wide_llama(tmp_path / "m", layers=4, kv_heads=2, max_positions=4096)
    ids = torch.randint(0, 1000, (2, 2048), device="cuda")
    calls = []
    kernel = decoder.kernels.attention
    monkeypatch.setattr(decoder.kernels, "attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    # warn_only: cuBLAS asks for CUBLAS_WORKSPACE_CONFIG before its first use for a strict guarantee, too late in
    # a test process; its GEMMs on one stream are repeatable in practice, which the equality below checks
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = []
        for _ in range(2):
            model = load_model(str(tmp_path / "m"), dtype=torch.bfloat16, device="cuda")
            apply_lora(model, r=16, seed=0)
            enable_checkpointing(model, "offload", stash="attention")
            opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-3, fused=True)
            losses = []
            for step in range(3):
                loss = model(ids, labels=ids).loss
                loss.backward()
                grads = [p.grad.clone() for p in trainable_parameters(model).values()]
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            runs.append((losses, grads))
            del model, opt
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    assert calls, "plain causal attention did not take hare's kernel in deterministic mode"
    (l0, g0), (l1, g1) = runs
    assert l0 == l1
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_auto_checkpointing_mixes_kept_and_offloaded_layers(tmp_path):
    """Mode "auto" under a budget for about half of the layers (set from the per-layer cost that step 0 measured
    under no bound): the first keep their activations, the others are
    checkpointed with their inputs offloaded (and attention stashed where the link planner puts it, from the third
    step); the losses equal plain checkpointing's bit for bit (one document: hare's attention kernel, no atomics)."""
    from hare import load_model
    from hare.engine.lora import apply_lora, trainable_parameters
    from hare.engine.offload import enable_checkpointing

    _wide_llama(tmp_path / "m", layers=8, kv_heads=4, max_positions=8192)
    ids = torch.randint(0, 1000, (1, 8192), device="cuda")
    docs = torch.zeros_like(ids)
    results = []
    for mode in ("on", "auto"):
        model = load_model(str(tmp_path / "m"), dtype=torch.bfloat16, device="cuda")
        apply_lora(model, r=16, seed=0)
        # auto: step 0 under no real bound measures what a kept layer adds
        hook = enable_checkpointing(model, mode, budget_gib=1e6 if mode == "auto" else None)
        opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-3, fused=True)
        losses = []
        for step in range(4):
            if mode == "auto" and step == 1:
                # then a budget for about 4 of the 8: layer i keeps while allocated + a (itself) + a (the reserve)
                # + margin fits, and allocated grows by a per kept layer
                a = hook.measured[ids.numel()]
                hook.budget = torch.cuda.memory_allocated() + hook.margin + 6 * a
            loss = model(ids, labels=ids, doc_ids=docs).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        results.append(losses)
        if mode == "auto":
            print(hook.report())
            assert 0 < len(hook.plan["kept"]) < 8 and 0 in hook.plan["kept"]
            assert "offload their inputs" in hook.report()
        del model, opt, hook
        torch.cuda.empty_cache()
    assert results[0] == results[1]


@pytest.mark.parametrize("mode,quant", [(None, False), ("on", True), ("auto", True), ("auto_mixed", True),
                                       ("offload", True)])
def test_cuda_graph_step_trains_as_the_eager_step(tmp_path, mode, quant):
    """engine/graph.py: CUDAGraphStep's steps (3 eager, then a capture and replays) give the eager loop's losses,
    from the same init and batches, with no checkpointing, with 'on', with 'auto' under a budget that keeps every
    layer, with 'auto' under one that keeps about half (set after step 0 from its measured per-layer cost, as in
    the test above; the capture must hold both kinds of layer) and with 'offload' (persistent pinned buffers;
    attention stashed where the planner puts it), 16-bit and 4-bit bases; fp32 so that the only differences are
    GEMM algorithm choices (cuBLAS may pick others inside a capture): within 1e-5 relative. The graph must exist
    and replay from the fourth call; a changed shape is refused."""
    from hare import load_model
    from hare.engine.graph import CUDAGraphStep
    from hare.engine.lora import apply_lora, trainable_parameters
    from hare.engine.offload import enable_checkpointing

    _wide_llama(tmp_path / "m", layers=4, kv_heads=4, max_positions=1024)
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = torch.randint(0, 1000, (8, 2, 512), device="cuda", generator=g)
    docs = torch.zeros_like(batches[0])
    runs = []
    for graphed in (False, True):
        model = load_model(str(tmp_path / "m"), dtype=torch.float32, device="cuda", load_in_4bit=quant)
        apply_lora(model, r=16, seed=0)
        auto = mode is not None and mode.startswith("auto")
        hook = None
        if mode is not None:
            hook = enable_checkpointing(model, "auto" if auto else mode, **({"budget_gib": 1e6} if auto else {}))
        opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-3, fused=True, capturable=True)
        step = CUDAGraphStep(model, opt, warmup=3) if graphed else None
        losses = []
        for i, ids in enumerate(batches):
            if mode == "auto_mixed" and i == 1:  # about 2 of the 4 layers keep (see the test above)
                hook.budget = torch.cuda.memory_allocated() + hook.margin + 3 * hook.measured[ids.numel()]
            if graphed:
                losses.append(step(ids, labels=ids, doc_ids=docs).item())
            else:
                loss = model(ids, labels=ids, doc_ids=docs).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
        runs.append(losses)
        if mode == "auto_mixed":  # the plan of the latest forward the host ran: the capture's, when graphed
            assert 0 < len(hook.plan["kept"]) < 4, hook.report()
        if graphed:
            assert step.graph is not None and step.calls == len(batches)
            with pytest.raises(ValueError, match="captured for inputs"):
                step(batches[0][:, :256], labels=batches[0][:, :256], doc_ids=docs[:, :256])
        del model, opt, step, hook
        torch.cuda.empty_cache()
    eager, graphed = runs
    for i, (a, b) in enumerate(zip(eager, graphed)):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {i}: eager {a} vs graphed {b}"


def test_cuda_graph_step_clips_as_the_eager_step(tmp_path):
    """CUDAGraphStep(max_grad_norm=c): the eager loop with torch's clip_grad_norm_ before each AdamW step, the same
    losses and gradient norms before clipping (fp32, within 1e-5 relative, as above), step after step, so the
    graph computes each step's norm anew. c is well under every norm seen (asserted), so every step clips."""
    from hare import load_model
    from hare.engine.graph import CUDAGraphStep
    from hare.engine.lora import apply_lora, trainable_parameters

    _wide_llama(tmp_path / "m", layers=2, kv_heads=4, max_positions=512)
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = torch.randint(0, 1000, (7, 2, 256), device="cuda", generator=g)
    clip = 1e-4
    runs = []
    for graphed in (False, True):
        model = apply_lora(load_model(str(tmp_path / "m"), dtype=torch.float32, device="cuda"), r=8, seed=0)
        params = list(trainable_parameters(model).values())
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=True)
        step = CUDAGraphStep(model, opt, warmup=3, max_grad_norm=clip) if graphed else None
        out = []
        for ids in batches:
            if graphed:
                loss = step(ids, labels=ids).item()
                norm = step.grad_norm.item()
            else:
                opt.zero_grad(set_to_none=True)
                loss_t = model(ids, labels=ids).loss
                loss_t.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, clip).item()
                opt.step()
                loss = loss_t.item()
            out.append((loss, norm))
        runs.append(out)
        del model, opt, step
        torch.cuda.empty_cache()
    for i, ((la, na), (lb, nb)) in enumerate(zip(*runs)):
        assert na > 10 * clip, f"step {i}: norm {na} does not clip"
        assert abs(la - lb) <= 1e-5 * abs(la), f"step {i}: loss eager {la} vs graphed {lb}"
        assert abs(na - nb) <= 1e-5 * na, f"step {i}: norm eager {na} vs graphed {nb}"


def test_cuda_graph_step_refuses_what_it_cannot_capture(tmp_path):
    """An optimizer without capturable=True, fewer than 3 warm-up steps under the link planner, adapter dropout:
    clear errors, before anything runs."""
    from hare import load_model
    from hare.engine.graph import CUDAGraphStep
    from hare.engine.lora import apply_lora, trainable_parameters
    from hare.engine.offload import enable_checkpointing

    _wide_llama(tmp_path / "m", layers=1, kv_heads=4, max_positions=256)
    model = apply_lora(load_model(str(tmp_path / "m"), dtype=torch.float32, device="cuda"), r=4, seed=0)
    params = list(trainable_parameters(model).values())
    with pytest.raises(ValueError, match="capturable=True"):
        CUDAGraphStep(model, torch.optim.AdamW(params, fused=True))
    opt = torch.optim.AdamW(params, fused=True, capturable=True)
    enable_checkpointing(model, "offload")
    with pytest.raises(ValueError, match="warmup must be >= 3"):
        CUDAGraphStep(model, opt, warmup=2)
    dropped = apply_lora(load_model(str(tmp_path / "m"), dtype=torch.float32, device="cuda"), r=4, seed=0,
                         dropout=0.1)
    with pytest.raises(ValueError, match="dropout"):
        CUDAGraphStep(dropped, torch.optim.AdamW(list(trainable_parameters(dropped).values()), fused=True,
                                                 capturable=True))


def test_link_planner_times_the_gpu_not_the_host_when_holding(tmp_path):
    """engine/offload.py _LinkPlanner.hold_gpu (what CUDAGraphStep sets): a forward of many small kernels is
    host-bound eager, so its event-timed per-layer time includes the host's launch gaps; held, the GPU sleeps while
    the host queues the forward and the events time the kernels back to back, which must take well under the
    eager figure (a graph replays them that way). 64 tokens through 4 layers: a few us of GPU work per launch
    against tens of us of host time."""
    from hare import load_model
    from hare.engine.lora import apply_lora
    from hare.engine.offload import enable_checkpointing

    _wide_llama(tmp_path / "m", layers=4, kv_heads=4, max_positions=256)
    ids = torch.randint(0, 1000, (1, 64), device="cuda")
    measured = []
    for hold in (False, True):
        model = apply_lora(load_model(str(tmp_path / "m"), dtype=torch.bfloat16, device="cuda"), r=8, seed=0)
        hook = enable_checkpointing(model, "offload")
        hook.planner.hold_gpu = hold
        for _ in range(3):  # two timed forwards, read at the next
            model(ids, labels=ids).loss.backward()
        ms, count = hook.planner.fwd_ms[64]
        assert count == 2
        measured.append(ms)
    eager, held = measured
    print(f"per-layer forward: eager {eager:.3f} ms, held {held:.3f} ms")
    assert held < 0.7 * eager
