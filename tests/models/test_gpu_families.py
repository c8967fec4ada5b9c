"""Every family on CUDA (skipped without a GPU): bf16 parity with transformers + peft, and a 4-bit load and a short
QLoRA run, on the tiny configs of the CPU family tests (tests/models/test_family_lora.py FAMILIES: llama; mistral
with a window of 7; gemma: GeGLU, 1 + w norms, explicit head_dim, tied; gemma2: softcaps, query_pre_attn_scalar,
alternating windows, sandwich norms; gemma3: q/k norms, local/global layers and rope bases; qwen2: q/k/v biases,
window on the upper layers, tied; qwen3: q/k norms, explicit head_dim, biases, tied; phi3: longrope, fused
qkv / gate_up split on load).

bf16 parity (tests/models/test_gpu_parity.py's method): hare in bf16 against transformers + peft in fp32 (the
reference), with transformers + peft in bf16 as the control: logits, loss and every gradient may be at most 2x
the control's distance from the reference plus a tiny floor (tests/tolerance.py). The model is trained as LoRA
trains it on the GPU: adapters on all seven projections (hare's fused LoRA functions), with B random so that
they take part in the forward and in every gradient; the norms, embeddings and lm_head are made trainable too, so
that every other kernel's backward (RMSNorm's weight gradient, the fused cross-entropy's weight gradient, the
embedding) is compared as well. Adapters are bf16-exact (so all three models hold the same ones) and s = 2 (a
power of two: exact in bf16). peft keeps them in fp32 on the bf16 model (autocast_adapter_dtype, its default)
as hare does. Sequences of 48 tokens, longer than every window (6 / 7) and than Phi-3's original context (16);
the packed case is one batch of rows of three documents each (hare: doc_ids and restarted positions;
transformers: the same position_ids without an attention mask, from which it builds the block-diagonal mask).

4-bit: `load_model(load_in_4bit=True)` on the GPU gives the same logits, bit for bit, as the 16-bit model holding
the dequantized weights (tests/models/test_load_4bit.py's check on the CPU); then LoRA on all projections and 6
AdamW steps on one repeated packed batch: the loss is finite and falls at every step, and every 4-bit buffer and
frozen parameter is unchanged. Those checkpoints have every projection's input width a multiple of 64 (whole NF4
blocks per row, as in every released model).

The checks are functions of `device` (and the 4-bit one of `dtype`), so that they can be run on the CPU too.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from hare import kernels, load_model
from hare.engine.checkpoint import save_adapter
from hare.engine.lora import apply_lora, lora_modules, trainable_parameters
from hare.quant.linear import Linear4bit
from tests.models.test_families import BASE, CASES, _lm_class
from tests.models.test_family_lora import FAMILIES, _block, _views
from tests.tolerance import assert_close_to_ref

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]

T = 48
# Three documents per packed row: each longer than every window (6, 7), and each row with one longer than Phi-3's
# original context (16), so that both rows take longrope's long factors, as transformers does for the whole batch.
DOCS = [(17, 12, 19), (9, 20, 19)]
R, ALPHA = 4, 8
TRAIN_OTHERS = True
# 4-bit checkpoints: every projection's input width a multiple of 64 (hidden 64, intermediate 128, and the
# attention width heads x head_dim 4 x 32 where a case sets head_dim 24)
WHOLE_BLOCKS = dict(intermediate_size=128)


def save_family(root, name, **extra):
    """Checkpoint dir of the family's tiny config (BASE + the case's quirks + `extra`), saved by transformers;
    biases and norms given values (random init leaves them at 0 / 1), as the CPU family tests do."""
    case = FAMILIES[name][0]
    arch, over = CASES[case][:2] if isinstance(case, str) else case
    cfg = dict(BASE, **over)
    cfg.update(extra)
    torch.manual_seed(0)
    ref = _lm_class(arch)(getattr(transformers, arch + "Config")(**cfg))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    path = root / name
    ref.save_pretrained(path)
    return str(path), _lm_class(arch), cfg


def batch(vocab, packed, device, seed=0):
    """(ids, labels, position_ids, doc_ids); without packing, position_ids and doc_ids are None."""
    ids = torch.randint(1, vocab, (2, T), generator=torch.Generator().manual_seed(11 + seed))  # 0 = pad: see above
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that is not a target
    if not packed:
        return ids.to(device), labels.to(device), None, None
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in DOCS])
    docs = torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in DOCS])
    labels[pos == 0] = -100  # no target across a document boundary
    return ids.to(device), labels.to(device), pos.to(device), docs.to(device)


def _peft_model(cls, path, adapter_dir, dtype, device):
    """transformers' model in `dtype` with the adapter read by peft, also in `dtype` (peft would keep it in fp32
    on a bf16 model by default: then its adapter branch would run in fp32, a more precise computation than the
    bf16 one under test, not its control); returns it and {name: parameter}."""
    pm = peft.PeftModel.from_pretrained(cls.from_pretrained(path, dtype=dtype), adapter_dir, is_trainable=True,
                                        autocast_adapter_dtype=False)
    pm.to(device).train()
    params = dict(pm.named_parameters())
    assert all(p.dtype == dtype for n, p in params.items() if ".lora_" in n)
    return pm, params


def hare_token_losses(model, ids, labels, pos, docs):
    """The loss of each target token as hare's forward computes it: the fused linear cross-entropy of its final
    hidden states (shifted as in CausalLM.forward), called once per target with that one label kept, on the
    whole batch (so the same GEMM and row kernel as the forward's, whose loss_sum is the sum of these)."""
    with torch.no_grad():
        x = model.hidden_states(ids, pos, docs)
        h = x[:, :-1].reshape(-1, x.shape[-1])
        y = labels[:, 1:].reshape(-1)
        out = []
        for i in (y != -100).nonzero()[:, 0].tolist():
            one = torch.full_like(y, -100)
            one[i] = y[i]
            loss, n = kernels.linear_cross_entropy(h, model.lm_head_weight, one, softcap=model.config.final_softcap)
            assert n.item() == 1
            out.append(loss)
    return torch.stack(out)


def hf_token_losses(logits, labels):
    """transformers' loss per target token: its ForCausalLMLoss (fp32 cross-entropy of the shifted logits)
    without the reduction."""
    y = labels[:, 1:].reshape(-1)
    losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), y, reduction="none")
    return losses[y != -100]


def parity_rows(path, cls, targets, device, packed, adapter_dir, seed=0):
    """[(what, hare bf16, transformers + peft fp32, transformers + peft bf16)] for the logits, the per-token and
    mean losses, and every gradient."""
    bf16 = torch.bfloat16
    ours = apply_lora(load_model(path, dtype=bf16, device=device), r=R, alpha=ALPHA, seed=seed, targets=targets)
    mods = lora_modules(ours)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5 + seed)
        for _, m in mods:
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
            for w in (m.lora_A.weight, m.lora_B.weight):
                w.copy_(w.to(bf16).float())
    save_adapter(ours, adapter_dir)
    # everything but the projections' frozen base weights and biases trains too (norms, embeddings, lm_head)
    base = {f"{p}.{t}" for p, _ in mods for t in ("weight", "bias")}
    others = [n for n, p in ours.named_parameters() if not p.requires_grad and n not in base] if TRAIN_OTHERS else []
    for n in others:
        ours.get_parameter(n).requires_grad_(True)
    ref, ref_params = _peft_model(cls, path, adapter_dir, torch.float32, device)
    ctl, ctl_params = _peft_model(cls, path, adapter_dir, bf16, device)
    for params in (ref_params, ctl_params):
        for n in others:
            params["base_model.model." + n].requires_grad_(True)
    ours.train()

    ids, labels, pos, docs = batch(ours.config.vocab_size, packed, device, seed)
    out = ours(ids, labels=labels, position_ids=pos, doc_ids=docs, return_logits=True)
    out.loss.backward()
    # No attention mask and no cache: then transformers reads the packing from position_ids (masking_utils,
    # find_packed_sequence_indices; with a cache, which its models make by default, it would not).
    hf_kw = dict(use_cache=False) if pos is None else dict(use_cache=False, position_ids=pos)
    outs = []
    for pm in (ref, ctl):
        o = pm(input_ids=ids, labels=labels, **hf_kw)
        o.loss.backward()
        outs.append(o)
    # The mean loss is one number, and the ratio of two one-sample errors is no statistic (two independent
    # normal errors differ by more than 2x in 30% of draws; on the CPU, gemma packed: hare 1e-4, control 4e-6).
    # So the losses are compared token by token, and the means checked to be the sums of those.
    mine = hare_token_losses(ours, ids, labels, pos, docs)
    theirs = [hf_token_losses(o.logits, labels) for o in outs]
    assert abs(out.loss.item() - mine.mean().item()) <= 1e-6 * abs(out.loss.item())
    for o, t in zip(outs, theirs):
        assert abs(o.loss.item() - t.mean().item()) <= 1e-6 * abs(o.loss.item())

    views = _views(ours)
    rows = [("logits", out.logits, outs[0].logits, outs[1].logits), ("token losses", mine, *theirs)]
    for p, m in mods:
        for ab in ("lora_A", "lora_B"):
            (t_ref, idx), (t_ctl, _) = _block(ref_params, views[p], ab), _block(ctl_params, views[p], ab)
            rows.append((f"{p}.{ab}", getattr(m, ab).weight.grad, t_ref.grad[idx], t_ctl.grad[idx]))
    for n in others:
        key = "base_model.model." + n
        rows.append((n, ours.get_parameter(n).grad, ref_params[key].grad, ctl_params[key].grad))
    return rows


def check_bf16_parity(path, cls, targets, device, packed, adapter_dir, label=""):
    report = []
    for what, got, want, control in parity_rows(path, cls, targets, device, packed, adapter_dir):
        assert got is not None and want.abs().max() > 0, f"{label} {what}: no gradient"
        err, ctrl = assert_close_to_ref(got, want, control, f"{label} {what}")
        report.append((what, err, ctrl))
    worst = max(report[2:], key=lambda r: r[1] / max(r[2], 1e-30))
    print(f"\n[{label}] logits err {report[0][1]:.2e} (control {report[0][2]:.2e}); token losses err "
          f"{report[1][1]:.2e} (control {report[1][2]:.2e}); {len(report) - 2} gradients, worst ratio {worst[0]} "
          f"{worst[1] / max(worst[2], 1e-30):.2f}")
    return report


def check_4bit_load_and_train(path, n_layers, device, dtype, steps=6):
    """4-bit logits == 16-bit model on the dequantized weights; LoRA steps: finite, falling loss, base unchanged.
    Returns the losses."""
    q = load_model(path, dtype=dtype, device=device, load_in_4bit=True)
    dense = load_model(path, dtype=dtype, device=device)
    quantized = {n: m for n, m in q.named_modules() if isinstance(m, Linear4bit)}
    assert len(quantized) == 7 * n_layers and all(n.startswith("model.layers.") for n in quantized)
    assert all(m.weight.packed.device.type == torch.device(device).type for m in quantized.values())
    with torch.no_grad():
        for n, m in quantized.items():
            dense.get_submodule(n).weight.copy_(m.weight.dequantize(dtype))
        for packed in (False, True):
            ids, _, pos, docs = batch(q.config.vocab_size, packed, device)
            assert torch.equal(q(ids, position_ids=pos, doc_ids=docs).logits,
                               dense(ids, position_ids=pos, doc_ids=docs).logits), f"packed={packed}"
    del dense

    frozen = {n: t.clone() for n, t in itertools.chain(q.named_buffers(), q.named_parameters())}
    apply_lora(q, r=8, alpha=16, seed=0)
    opt = torch.optim.AdamW(trainable_parameters(q).values(), lr=1e-2)
    ids, labels, pos, docs = batch(q.config.vocab_size, True, device)
    q.train()
    losses = []
    for _ in range(steps):
        loss = q(ids, labels=labels, position_ids=pos, doc_ids=docs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses), losses
    assert all(b < a for a, b in zip(losses, losses[1:])), f"the loss must fall at every step: {losses}"
    now = dict(itertools.chain(q.named_buffers(), q.named_parameters()))
    for n, t in frozen.items():
        assert torch.equal(now[n], t), f"{n} changed"
    return losses


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu_families")


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bf16_parity_with_control(root, name, packed, tmp_path):
    path, cls, _ = save_family(root / "bf16", name)
    check_bf16_parity(path, cls, FAMILIES[name][1], "cuda", packed, str(tmp_path / "adapter"),
                      f"{name} {'packed' if packed else 'plain'}")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_4bit_load_and_short_training(root, name):
    head_dim = dict(CASES[FAMILIES[name][0]][1]).get("head_dim") if isinstance(FAMILIES[name][0], str) else None
    extra = dict(WHOLE_BLOCKS, **({"head_dim": 32} if head_dim == 24 else {}))
    path, _, cfg = save_family(root / "4bit", name, **extra)
    losses = check_4bit_load_and_train(path, cfg["num_hidden_layers"], "cuda", torch.bfloat16)
    print(f"\n[{name}] 4-bit LoRA losses {' '.join(f'{x:.4f}' for x in losses)}")
