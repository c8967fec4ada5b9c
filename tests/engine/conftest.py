"""Fixtures of the engine tests: a tiny random Llama saved by transformers' own save_pretrained (fp32), and a
tiny tokenizer directory with a chat template (for the data pipeline and the trainer)."""
import json

import pytest
import torch

TINY = dict(vocab_size=272, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)


def save_tiny_llama(path, seed=0, **over):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**TINY, **over})
    ref = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random init leaves norms at one: give them values so that they are tested
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Path of a tiny Llama checkpoint (transformers' save_pretrained, fp32)."""
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama"))


def hf_model(path):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# A byte-level tokenizer in tokenizers' own JSON format (loaded by hare.load_tokenizer through the `tokenizers`
# library): ids 0..3 are <pad> <s> </s> <unk>, then the role markers, then bytes. The chat template is
# ChatML-like, as SmolLM2's.
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


def save_tiny_tokenizer(directory, chat_template=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>", "unk_token": "<unk>",
           "add_bos_token": False}
    if chat_template:
        cfg["chat_template"] = CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(directory)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "chatml")
