"""bf16 parity on CUDA (runs only where there is a GPU): hare's bf16 error against transformers' fp32 model may be
at most 2x transformers' own bf16 error (the control), for logits, loss and the gradients of every weight."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from hare import load_model  # noqa: E402
from tests.tolerance import max_err  # noqa: E402

CONFIGS = {
    "gqa": dict(num_key_value_heads=2),
    "tied_llama3": dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_parity_with_control(tmp_path, name):
    kw = dict(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5)
    kw.update(CONFIGS[name])
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    ref.save_pretrained(tmp_path / name)
    ref32 = ref.cuda().float()
    ref16 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / name, dtype=torch.bfloat16).cuda()
    ours = load_model(str(tmp_path / name), dtype=torch.bfloat16, device="cuda")
    for p in ours.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, 1000, (2, 200), device="cuda", generator=torch.Generator("cuda").manual_seed(1))

    def run(m, hf):
        out = m(ids, labels=ids) if hf else m(ids, labels=ids, return_logits=True)
        out.loss.backward()
        grads = {n: p.grad.float() for n, p in m.named_parameters()}
        return out.logits.float(), out.loss.float(), grads

    l32, loss32, g32 = run(ref32, True)
    l16, loss16, g16 = run(ref16, True)
    lo, losso, go = run(ours, False)
    report = []
    for what, a, b, c in [("logits", lo, l16, l32), ("loss", losso, loss16, loss32)] + [
            (n, go[n], g16[n], g32[n]) for n in g32]:
        err, ctrl = max_err(a, c), max_err(b, c)
        report.append((what, err, ctrl))
        assert err <= 2 * ctrl + 1e-6, f"{what}: hare bf16 err {err:.3e} > 2x transformers bf16 err {ctrl:.3e}"
    worst = max(report, key=lambda r: r[1] / max(r[2], 1e-12))
    print(f"\n[{name}] logits err {report[0][1]:.3e} (control {report[0][2]:.3e}); loss err {report[1][1]:.3e} "
          f"(control {report[1][2]:.3e}); worst ratio {worst[0]} {worst[1] / max(worst[2], 1e-12):.2f}")
