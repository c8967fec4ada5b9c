"""Generation features on the real SmolLM2-135M-Instruct: EOS, stop strings, streaming, sampling, batching."""
import pytest
import torch

pytest.importorskip("gguf")

import hare  # noqa: E402
from hare.models.gguf import convert_gguf, smollm2_gguf_path  # noqa: E402

Q = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    path = convert_gguf(smollm2_gguf_path(), str(tmp_path_factory.mktemp("gen") / "smol"))
    return hare.load_model(path, dtype=torch.float32), hare.load_tokenizer(path)


def test_eos_ends_generation_and_is_not_returned(smol):
    model, tok = smol
    prompt = tok.apply_chat_template([{"role": "user", "content": Q}], add_generation_prompt=True, tokenize=True)
    out = hare.generate_ids(model, [prompt], max_new_tokens=40, eos_token_ids=tok.eos_token_ids)[0]
    assert 0 < len(out) < 40
    assert not set(out) & set(tok.eos_token_ids)
    assert "Paris" in tok.decode(out)


def test_batched_left_padded_equals_one_by_one(smol):
    model, tok = smol
    prompts = [Q, "Name a color.", "Write the number seven in digits."]
    batched = hare.generate(model, tok, prompts, max_new_tokens=12, chat=True)
    single = [hare.generate(model, tok, p, max_new_tokens=12, chat=True) for p in prompts]
    assert batched == single


def test_stop_string_cuts_the_text(smol):
    model, tok = smol
    full = hare.generate(model, tok, Q, max_new_tokens=16, chat=True)
    assert "Paris" in full
    cut = hare.generate(model, tok, Q, max_new_tokens=16, chat=True, stop=["Paris"])
    assert cut == full[:full.index("Paris")]


def test_streaming_deltas_add_up_to_the_result(smol):
    model, tok = smol
    prompts = [Q, "Name a color."]
    pieces = {0: [], 1: []}
    out = hare.generate(model, tok, prompts, max_new_tokens=12, chat=True,
                        stream=lambda i, text: pieces[i].append(text))
    assert ["".join(pieces[0]), "".join(pieces[1])] == out
    assert len(pieces[0]) > 1


def test_sampling_is_seeded_and_top_k_1_is_greedy(smol):
    model, tok = smol
    greedy = hare.generate(model, tok, Q, max_new_tokens=10, chat=True)
    assert hare.generate(model, tok, Q, max_new_tokens=10, chat=True, temperature=0.8, top_k=1, seed=1) == greedy
    a = hare.generate(model, tok, "Tell me a story.", max_new_tokens=10, chat=True, temperature=1.0, top_p=0.9, seed=7)
    b = hare.generate(model, tok, "Tell me a story.", max_new_tokens=10, chat=True, temperature=1.0, top_p=0.9, seed=7)
    assert a == b


def test_top_p_keeps_the_smallest_set_reaching_p():
    from hare.engine.generate import _pick

    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    seen = set(_pick(logits, 1.0, 0, 0.8, g).tolist())
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8; the tail is cut
    seen = set(_pick(logits, 1.0, 3, 1.0, g).tolist())
    assert seen == {0, 1, 2}  # top-k 3
