"""LoRA on a 4-bit (NF4) base: the adapters' gradients equal those of the dense base holding the dequantized
weights, the packed bytes never change, merge dequantizes, training runs."""
import pytest
import torch
from torch import nn

from hare import load_model
from hare.engine.lora import LoRALinear4bit, apply_lora, lora_modules, merge, trainable_parameters
from hare.quant.linear import Linear4bit
from tests.interpreter import BACKENDS

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def quantize_layers(model):
    """Every projection of the decoder layers -> Linear4bit (the embeddings and head stay 16-bit)."""
    for path, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and path.startswith("model.layers."):
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, Linear4bit.from_linear(m))
    return model


def dequantized_twin(path):
    """A dense model whose projections hold exactly the dequantized NF4 weights."""
    dense = load_model(path)
    q = quantize_layers(load_model(path))
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, Linear4bit):
                dense.get_submodule(name).weight.copy_(m.weight.dequantize(torch.float32))
    return q, dense


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 272, (2, 19), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_4bit_gradients_equal_dense_dequantized(tiny_llama, backend):
    q, dense = dequantized_twin(tiny_llama)
    apply_lora(q, r=4, alpha=8, seed=0, backend=backend)
    apply_lora(dense, r=4, alpha=8, seed=0, backend=backend)
    assert all(isinstance(m, LoRALinear4bit) for _, m in lora_modules(q))
    with torch.no_grad():
        for (_, a), (_, b) in zip(lora_modules(q), lora_modules(dense)):
            a.lora_B.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(_)))
            b.lora_B.weight.copy_(a.lora_B.weight)
    ids, labels = _batch()
    lq, ld = q(ids, labels=labels).loss, dense(ids, labels=labels).loss
    lq.backward()
    ld.backward()
    assert lq.item() == ld.item()
    gq, gd = trainable_parameters(q), trainable_parameters(dense)
    assert sorted(gq) == sorted(gd)
    for n in gq:
        assert torch.equal(gq[n].grad, gd[n].grad), n


def test_4bit_step_keeps_packed_bytes_and_paths(tiny_llama):
    q = quantize_layers(load_model(tiny_llama))
    keys_before = set(q.state_dict())
    packed = {n: b.clone() for n, b in q.named_buffers()}
    base = q(torch.tensor([[1, 2, 3, 4]])).logits
    apply_lora(q, r=4, seed=0)
    assert set(q.state_dict()) - keys_before == {k for k in q.state_dict() if ".lora_" in k}
    assert {n for n, _ in q.named_buffers()} == set(packed)  # the 4-bit buffers at their own paths
    assert torch.equal(q(torch.tensor([[1, 2, 3, 4]])).logits, base)  # B = 0
    opt = torch.optim.AdamW(trainable_parameters(q).values(), lr=1e-2)
    for _ in range(2):
        ids, labels = _batch()
        q(ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, b in q.named_buffers():
        assert torch.equal(b, packed[n]), n


def test_4bit_merge_is_dequantized_plus_sBA(tiny_llama):
    q = quantize_layers(load_model(tiny_llama))
    apply_lora(q, r=4, alpha=8, seed=0, targets=("q_proj", "down_proj"))
    with torch.no_grad():
        for _, m in lora_modules(q):
            m.lora_B.weight.normal_(0, 0.05)
    want = {p: m.weight.dequantize(torch.float32) + m.scaling * (m.lora_B.weight @ m.lora_A.weight)
            for p, m in lora_modules(q)}
    ids, _ = _batch()
    with torch.no_grad():
        adapted = q(ids).logits
    merge(q)
    assert not any(isinstance(m, Linear4bit) for m in q.modules())  # un-adapted 4-bit layers dequantized too
    for p, w in want.items():
        assert torch.equal(q.get_submodule(p).weight, w)
    with torch.no_grad():
        assert (q(ids).logits - adapted).abs().max() < 1e-5


def test_batch1_decoding_through_the_gemv_matches_the_training_path(tiny_llama, monkeypatch):
    """One token at a time without autograd (generation), a 4-bit model with adapters runs its projections
    through the fused 4-bit GEMV (kernels/lora.py _decoding); its logits equal those of the batched path (the
    fused functions, dequantizing whole weights) up to the order of the fp32 sums."""
    q = apply_lora(quantize_layers(load_model(tiny_llama)), r=4, alpha=8, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(q):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
    ids = torch.randint(0, 272, (1, 1), generator=g)
    from hare.kernels import lora as K
    from hare.quant.linear import linear_nf4
    attn = q.model.layers[0].self_attn
    one_row = torch.zeros(1, 1, q.config.hidden_size)
    calls = []  # a spy on the 4-bit linear the decode path calls (not a change of behaviour)
    monkeypatch.setattr(K, "linear_nf4", lambda *a, **kw: calls.append(1) or linear_nf4(*a, **kw))
    with torch.no_grad():  # the dispatch takes the GEMV path for this input (and not with autograd on)
        assert K._decoding(one_row, (attn.q_proj, attn.k_proj, attn.v_proj))
        decoded = q(ids).logits
    assert len(calls) == 7 * len(q.model.layers)  # every projection of every layer went through it
    assert not K._decoding(one_row, (attn.q_proj,))
    with torch.enable_grad():
        batched = q(ids).logits.detach()
    assert len(calls) == 7 * len(q.model.layers)  # the batched path did not
    assert not torch.equal(decoded, torch.zeros_like(decoded))
    assert torch.allclose(decoded, batched, rtol=1e-5, atol=1e-5 * batched.abs().max().item())
