"""engine/graph.py on the CPU: what can be checked without a GPU (the capture itself is tested in test_gpu.py)."""
import pytest
import torch

import hare
from hare.engine.lora import trainable_parameters


def test_cuda_graph_step_needs_cuda_parameters(tiny_llama):
    model = hare.apply_lora(hare.load_model(tiny_llama), r=4, seed=0)
    opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-3)
    with pytest.raises(ValueError, match="CUDA device"):
        hare.CUDAGraphStep(model, opt)
    with pytest.raises(ValueError, match="warmup"):
        hare.CUDAGraphStep(model, opt, warmup=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        hare.CUDAGraphStep(model, opt, max_grad_norm=0.0)


def test_checkpointing_without_dropout_reads_no_rng_state(tiny_llama, monkeypatch):
    """A checkpointed layer without adapter dropout neither reads nor sets the RNG state (a CUDA graph cannot
    capture that), and its gradients equal plain autograd's; with dropout it does read it (the masks replay)."""
    ids = torch.randint(0, 272, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for mode in (None, "on"):
        model = hare.apply_lora(hare.load_model(tiny_llama), r=4, seed=0)
        if mode:
            hare.enable_checkpointing(model, mode)
        with monkeypatch.context() as m:
            m.setattr(torch, "get_rng_state", lambda: pytest.fail("get_rng_state read without dropout"))
            m.setattr(torch, "set_rng_state", lambda s: pytest.fail("set_rng_state without dropout"))
            model(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in trainable_parameters(model).values()])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))
    model = hare.apply_lora(hare.load_model(tiny_llama), r=4, seed=0, dropout=0.1)
    hare.enable_checkpointing(model, "on")
    reads = []
    real = torch.get_rng_state
    monkeypatch.setattr(torch, "get_rng_state", lambda: reads.append(1) or real())
    model(ids, labels=ids).loss.backward()
    assert len(reads) >= model.config.num_hidden_layers  # the forward saves it per layer (fork_rng reads it too)


def test_persistent_offload_buffers_are_reused_and_change_nothing(tiny_llama):
    """Offloader.persistent (what CUDAGraphStep sets): the n-th save of every forward writes the same buffer, and
    training is bit for bit what fresh buffers give (offload mode with attention and MLP stashed, 3 steps); the
    same buffers serve every step."""
    g = torch.Generator().manual_seed(0)
    batches = torch.randint(0, 272, (3, 2, 24), generator=g)
    runs = []
    for persistent in (False, True):
        model = hare.apply_lora(hare.load_model(tiny_llama), r=4, seed=0)
        hook = hare.enable_checkpointing(model, "offload", stash="all")
        hook.stash.persistent = persistent
        opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-2)
        losses, pools = [], []
        for ids in batches:
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            pools.append([t.data_ptr() for t in hook.stash.pool])
        runs.append((losses, [p.detach().clone() for p in trainable_parameters(model).values()]))
    (l0, p0), (l1, p1) = runs
    assert l0 == l1 and all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert pools[0] and pools[0] == pools[1] == pools[2]  # the persistent run's buffers, step after step
