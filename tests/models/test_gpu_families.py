"""Every family on CUDA (skipped without a GPU): bf16 parity with transformers + peft, and a 4-bit load and a short
QLoRA run, on the tiny configs of the CPU family tests (tests/models/test_family_lora.py FAMILIES: llama; mistral
with a window of 7; gemma: GeGLU, 1 + w norms, explicit head_dim, tied; gemma2: softcaps, query_pre_attn_scalar,
alternating windows, sandwich norms; gemma3: q/k norms, local/global layers and rope bases; qwen2: q/k/v biases,
window on the upper layers, tied; qwen3: q/k norms, explicit head_dim, biases, tied; phi3: longrope, fused
qkv / gate_up split on load).

bf16 parity, tests/models/test_gpu_parity.py's method: hare in bf16 against transformers + peft in fp32 (the
reference), with transformers + peft in bf16 as the control; hare's error may be at most 2x the control's plus a
tiny floor (tests/tolerance.py's, per element). The model is set up as LoRA training runs it on the GPU: adapters
on all seven projections (hare's fused LoRA functions), B random so that they take part in the forward and in
every gradient, plus the embeddings and lm_head trainable (LoRAConfig.train_embeddings / train_lm_head; the fused
cross-entropy's weight gradient, the embedding's). Compared: the logits, the loss of every target token, the
gradient of every lora_A, lora_B, embedding and lm_head. Adapters are bf16-exact (all three models hold the same
ones), s = 2 (exact in bf16), and peft keeps them in bf16 on the bf16 control (autocast_adapter_dtype=False), so
that its adapter branch runs in the precision hare's does (hare: fp32 master weights cast to bf16 at use).
Sequences of 64 tokens, longer than every window (6, 7) and than Phi-3's original context (16). The packed case:
rows of four documents (hare: doc_ids and restarted positions; transformers: the same position_ids and no
attention mask, from which it builds the block-diagonal mask, and no cache, with which it would not: masking_utils
find_packed_sequence_indices). Token ids avoid 0, the pad id: transformers' embedding (padding_idx) gives the pad
row no gradient, hare's does (it matters only when training embeddings on inputs that hold the pad id).

Where this departs from test_gpu_parity.py, measured on the CPU (hare's reference ops in bf16, whose roundings
mostly mirror transformers', so that hare and control should be alike) over the 16 cases x seeds (`seed`):
- Errors are L2 norms over each tensor, not max |.|: in these small bf16 models a gradient's elementwise errors
  are heavy-tailed (1-5% relative in L2, from roundings upstream). Seeds 0-3, 2344 comparisons: the ratio of the
  max |.| errors was above 1.5 in 2.5% of them and reached 2.6 (a Qwen2 lora_B: one element 3.5 bf16 ulps off
  where the control's worst was 1 ulp); the ratio of the L2 errors, seeds 0-5, never passed 1.42. The L2 bound
  still catches a 3% error in a single gradient tensor (one qwen3 dA scaled by 1.03) and a missing window or
  softcap at once (the logits).
- The loss is compared per target token (the mean, one number, is checked to be their mean): the ratio of two
  one-sample errors is no statistic (for independent normal errors it exceeds 2 in 30% of draws; measured on
  Gemma, packed: hare 1e-4, control 4e-6).
- Norm weights are not trained: hare never trains them, and their tensors (16 to 64 elements) are too small for
  a stable ratio (up to 2.9 in L2 in a run that trained them).

4-bit: `load_model(load_in_4bit=True)` on the GPU gives the same logits, bit for bit, as the 16-bit model holding
the dequantized weights (tests/models/test_load_4bit.py's check on the CPU), plain and packed; then LoRA on all
projections and 6 AdamW steps on one repeated packed batch: the loss is finite and falls at every step, and every
4-bit buffer and frozen parameter is unchanged. Those checkpoints have every projection's input width a multiple
of 64 (whole NF4 blocks per row, as in every released model).

The checks are functions of `device` (and the 4-bit one of `dtype`): they run on the CPU as well.
"""
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from hare import kernels, load_model
from hare.engine.checkpoint import save_adapter
from hare.engine.lora import apply_lora, lora_modules, trainable_parameters
from hare.quant.linear import Linear4bit
from tests.models.test_families import BASE, CASES, _lm_class, hf_attention
from tests.models.test_family_lora import FAMILIES, _block, _views
from tests.tolerance import error_floor

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]

T = 64
# Documents of each packed row: all longer than every window (6, 7), and in each row one longer than Phi-3's
# original context (16), so that both rows take longrope's long factors, as transformers does for the whole batch.
DOCS = [(17, 12, 19, 16), (9, 20, 19, 16)]
R, ALPHA = 16, 32  # s = 2
IGNORE = -100


def save_family(path, name, whole_blocks=False):
    """Saves the family's tiny config (BASE + its case's quirks) with transformers' save_pretrained; biases and
    norms are given values (random init leaves them at 0 / 1), as the CPU family tests do. whole_blocks: every
    projection's input width a multiple of 64 (intermediate 128; head_dim rounded up where heads x head_dim is
    not, e.g. 4 x 24 -> 4 x 32). Returns (path, transformers class, config dict)."""
    case = FAMILIES[name][0]
    arch, over = CASES[case][:2] if isinstance(case, str) else case
    cfg = dict(BASE, **over)
    if whole_blocks:
        cfg["intermediate_size"] = 128
        step = 64 // math.gcd(64, cfg["num_attention_heads"])
        if "head_dim" in cfg:
            cfg["head_dim"] = -(-cfg["head_dim"] // step) * step
        widths = (cfg["hidden_size"], cfg["intermediate_size"],
                  cfg["num_attention_heads"] * cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]))
        assert all(w % 64 == 0 for w in widths), widths
    torch.manual_seed(0)
    ref = _lm_class(arch)(getattr(transformers, arch + "Config")(**cfg))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(path)
    return str(path), _lm_class(arch), cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(name, whole_blocks) -> save_family's result; each built once per module."""
    root = tmp_path_factory.mktemp("gpu_families")
    built = {}

    def get(name, whole_blocks=False):
        if (name, whole_blocks) not in built:
            built[name, whole_blocks] = save_family(root / f"{name}{'_4bit' if whole_blocks else ''}", name,
                                                    whole_blocks)
        return built[name, whole_blocks]

    return get


def batch(vocab, packed, device, seed=0):
    """(ids, labels, position_ids, doc_ids) of 2 rows of T tokens; position_ids and doc_ids None unless packed."""
    ids = torch.randint(1, vocab, (len(DOCS), T), generator=torch.Generator().manual_seed(11 + seed))  # no pad id
    labels = ids.clone()
    labels[:, :3] = IGNORE  # a prompt that is not a target
    if not packed:
        return ids.to(device), labels.to(device), None, None
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in DOCS])
    docs = torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in DOCS])
    labels[pos == 0] = IGNORE  # no target across a document boundary
    return ids.to(device), labels.to(device), pos.to(device), docs.to(device)


def _peft_model(cls, path, adapter_dir, dtype, device):
    """transformers' model in `dtype` with the adapter read by peft, in `dtype` too (by default peft keeps it in
    fp32 on a bf16 model and runs the adapter branch in fp32: a more precise computation than the bf16 one under
    test, not its control); returns it and {name: parameter}."""
    with open(f"{path}/config.json") as f:
        kw = hf_attention(json.load(f))  # eager for Gemma 2's softcap (test_families.py)
    pm = peft.PeftModel.from_pretrained(cls.from_pretrained(path, dtype=dtype, **kw), adapter_dir, is_trainable=True,
                                        autocast_adapter_dtype=False)
    assert not kw or pm.config._attn_implementation == "eager"
    pm.to(device).train()
    params = dict(pm.named_parameters())
    assert all(p.dtype == dtype for n, p in params.items() if ".lora_" in n)
    return pm, params


def hare_token_losses(model, ids, labels, pos, docs):
    """The loss of each target token as hare's forward computes it: the fused linear cross-entropy of the final
    hidden states (shifted as CausalLM.forward shifts them), once per target with only that label kept, on all
    rows (the forward's GEMM and row kernel, so its loss_sum is the sum of these)."""
    x = model.hidden_states(ids, pos, docs).detach()  # with autograd on, as in the forward (same kernels)
    with torch.no_grad():
        h = x[:, :-1].reshape(-1, x.shape[-1])
        y = labels[:, 1:].reshape(-1)
        out = []
        for i in (y != IGNORE).nonzero()[:, 0].tolist():
            one = torch.full_like(y, IGNORE)
            one[i] = y[i]
            loss, n = kernels.linear_cross_entropy(h, model.lm_head_weight, one, softcap=model.config.final_softcap)
            assert n.item() == 1
            out.append(loss)
    return torch.stack(out)


def hf_token_losses(logits, labels):
    """transformers' loss of each target token: its ForCausalLMLoss (fp32 cross-entropy of the shifted logits)
    without the reduction."""
    y = labels[:, 1:].reshape(-1)
    losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), y, reduction="none")
    return losses[y != IGNORE]


def parity_rows(path, cls, targets, device, packed, adapter_dir, seed=0):
    """[(what, hare bf16, transformers + peft fp32, transformers + peft bf16)]: the logits, the per-token losses,
    and the gradient of every adapter, of the embeddings and of lm_head."""
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
    others = [n for n in ("model.embed_tokens.weight", "lm_head.weight") if n in dict(ours.named_parameters())]
    ref, ref_params = _peft_model(cls, path, adapter_dir, torch.float32, device)
    ctl, ctl_params = _peft_model(cls, path, adapter_dir, bf16, device)
    for n in others:
        for p in (ours.get_parameter(n), ref_params["base_model.model." + n], ctl_params["base_model.model." + n]):
            p.requires_grad_(True)
    ours.train()

    ids, labels, pos, docs = batch(ours.config.vocab_size, packed, device, seed)
    out = ours(ids, labels=labels, position_ids=pos, doc_ids=docs, return_logits=True)
    out.loss.backward()
    hf_kw = dict(use_cache=False) if pos is None else dict(use_cache=False, position_ids=pos)
    outs = []
    for pm in (ref, ctl):
        o = pm(input_ids=ids, labels=labels, **hf_kw)
        o.loss.backward()
        outs.append(o)
    mine = hare_token_losses(ours, ids, labels, pos, docs)
    theirs = [hf_token_losses(o.logits, labels) for o in outs]
    for o, t in [(out, mine)] + list(zip(outs, theirs)):  # each side's loss is the mean of its token losses
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


def assert_l2_close(got, want, control, name, factor=2.0):
    """||got - want|| <= factor ||control - want|| + floor, L2 over the whole tensor; the floor is
    tests/tolerance.py's per-element floor for got's dtype at want's scale, times sqrt(numel)."""
    assert got is not None and got.shape == want.shape, f"{name}: {None if got is None else tuple(got.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert want.abs().max() > 0, f"{name}: the reference is zero"
    err = (got.double() - want.double()).norm().item()
    ctrl = (control.double() - want.double()).norm().item()
    floor = error_floor(got.dtype, want.abs().max().item()) * got.numel() ** 0.5
    assert err <= factor * ctrl + floor, f"{name}: L2 err {err:.3e} > {factor}x control {ctrl:.3e} + floor {floor:.1e}"
    return err, ctrl


def check_bf16_parity(path, cls, targets, device, packed, adapter_dir, label=""):
    report = [(what, *assert_l2_close(got, want, control, f"{label} {what}"))
              for what, got, want, control in parity_rows(path, cls, targets, device, packed, adapter_dir)]
    worst = max(report[2:], key=lambda r: r[1] / r[2])
    print(f"\n[{label}] L2 err (control): logits {report[0][1]:.2e} ({report[0][2]:.2e}), token losses "
          f"{report[1][1]:.2e} ({report[1][2]:.2e}); {len(report) - 2} gradients, worst ratio "
          f"{worst[1] / worst[2]:.2f} ({worst[0]})")
    return report


def check_4bit_load_and_train(path, n_layers, device, dtype, steps=6):
    """4-bit logits == the 16-bit model's on the dequantized weights; then LoRA steps: finite loss, falling at
    every step; every 4-bit buffer and frozen parameter unchanged. Returns the losses."""
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


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bf16_parity_with_control(checkpoint, name, packed, tmp_path):
    path, cls, _ = checkpoint(name)
    check_bf16_parity(path, cls, FAMILIES[name][1], "cuda", packed, str(tmp_path / "adapter"),
                      f"{name} {'packed' if packed else 'plain'}")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_4bit_load_and_short_training(checkpoint, name):
    path, _, cfg = checkpoint(name, whole_blocks=True)
    losses = check_4bit_load_and_train(path, cfg["num_hidden_layers"], "cuda", torch.bfloat16)
    print(f"\n[{name}] 4-bit LoRA losses {' '.join(f'{x:.4f}' for x in losses)}")
