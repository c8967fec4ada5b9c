"""hare.models.tokenizer against its oracles: transformers' AutoTokenizer on a byte-level BPE built offline, the
sentencepiece library on a model trained offline, and the jinja sandbox on templates that try to escape.
(The real SmolLM2 tokenizer is compared in test_gguf.py, next to its conversion.)"""
import json
import os

import pytest

from hare.models.errors import TemplateError, TokenizerError
from hare.models.tokenizer import load_tokenizer

from .conftest import CORPUS, SP_TEXTS, TEXTS


# Exercises what HF's renderer provides: trim/lstrip blocks, loop controls, raise_exception, tojson (no HTML
# escaping, non-ASCII kept), the special tokens as variables, {% generation %}, extra keyword variables.
CHAT_TEMPLATE = """\
{%- if tools %}
{{ bos_token }}system
Tools: {{ tools | tojson(indent=2) }}{{ eos_token }}
{% endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {%- if loop.index0 >= 6 %}{% break %}{% endif %}
{{ bos_token }}{{ message['role'] }}
{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}{% endgeneration %}
{%- else %}{{ message['content'] | trim }}{% endif %}{{ eos_token }}
{% endfor %}
{%- if add_generation_prompt %}{{ bos_token }}assistant
{% if persona is defined %}({{ persona }}) {% endif %}{% endif %}"""

CONVERSATION = [
    {"role": "system", "content": "You answer in one word & <b>bold</b>."},
    {"role": "user", "content": "What is the capital of France? ünï"},
    {"role": "assistant", "content": " Paris \n"},
    {"role": "user", "content": "And of Italy?", "name": None},
]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Find a city's <country>",
                                           "parameters": {"city": {"type": "string", "enum": ["Zürich"]}}}}]


def _bpe_dir(tmp_path, name, config, special_map=None, generation=None, bos_in_post_processor=False):
    """A byte-level BPE trained offline with the tokenizers library, saved with the given config files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    if bos_in_post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A $B",
                                                           special_tokens=[("<|im_start|>", 1)])
    d = tmp_path / name
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (d / "special_tokens_map.json").write_text(json.dumps(special_map))
    if generation is not None:
        (d / "generation_config.json").write_text(json.dumps(generation))
    return str(d)


BPE_CASES = {
    # add_bos_token set explicitly; bos_token written as an AddedToken-style dict
    "explicit_bos": dict(config={"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True,
                                 "bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "special": True},
                                 "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                 "chat_template": CHAT_TEMPLATE}),
    # no flag: tokenizer.json's own post-processor adds BOS
    "post_processor_bos": dict(config={"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
                                       "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE},
                               bos_in_post_processor=True),
    # special tokens only in special_tokens_map.json; EOS appended
    "special_tokens_map": dict(config={"tokenizer_class": "PreTrainedTokenizerFast", "add_eos_token": True,
                                       "chat_template": CHAT_TEMPLATE},
                               special_map={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                            "unk_token": "<|endoftext|>"}),
}


@pytest.mark.parametrize("case", sorted(BPE_CASES))
def test_bpe_matches_transformers(tmp_path, case):
    from transformers import AutoTokenizer

    d = _bpe_dir(tmp_path, case, **BPE_CASES[case])
    ours, ref = load_tokenizer(d), AutoTokenizer.from_pretrained(d)
    assert ours.vocab_size == len(ref)
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    if ref.pad_token_id is not None:
        assert ours.pad_token_id == ref.pad_token_id
    for text in TEXTS:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == ref.encode(text, add_special_tokens=add), (text, add)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.encode_batch(TEXTS) == [ref.encode(t) for t in TEXTS]
    for gen in (False, True):
        kwargs = dict(add_generation_prompt=gen, tools=TOOLS, persona="terse")
        text = ours.apply_chat_template(CONVERSATION, **kwargs)
        assert text == ref.apply_chat_template(CONVERSATION, tokenize=False, **kwargs)
        assert ours.apply_chat_template(CONVERSATION, tokenize=True, **kwargs) == \
            ref.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False, **kwargs)
    # a batch of conversations renders each one
    both = ours.apply_chat_template([CONVERSATION[:2], CONVERSATION], add_generation_prompt=True)
    assert both == [ours.apply_chat_template(c, add_generation_prompt=True) for c in (CONVERSATION[:2], CONVERSATION)]


def test_bos_insertion_rules(tmp_path):
    """tokenizer.json's post-processor decides; config flags are ignored next to it (transformers 5's rule)."""
    from transformers import AutoTokenizer

    cases = {"flag_off_pp_on": ({"bos_token": "<|im_start|>", "add_bos_token": False}, True, True),
             "no_flag_pp_on": ({"bos_token": "<|im_start|>"}, True, True),
             "flag_on_pp_off": ({"bos_token": "<|im_start|>", "add_bos_token": True}, False, False)}
    for name, (config, post_processor, expected) in cases.items():
        d = _bpe_dir(tmp_path, name, config, bos_in_post_processor=post_processor)
        tok = load_tokenizer(d)
        assert tok.add_bos_token is expected, name
        assert tok.encode("Hello") == AutoTokenizer.from_pretrained(d).encode("Hello"), name


def test_special_ids_from_generation_config(tmp_path):
    d = _bpe_dir(tmp_path, "gen", {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
                 generation={"bos_token_id": 1, "eos_token_id": [2, 0]})
    tok = load_tokenizer(d)
    assert tok.eos_token_id == 2 and tok.eos_token_ids == {0, 2}
    # no pad token anywhere: EOS stands in, and says so
    assert tok.pad_token_id == 2 and tok.pad_token_is_eos_fallback and tok.pad_token == "<|im_end|>"
    d = _bpe_dir(tmp_path, "gen_only", {}, generation={"eos_token_id": 2, "pad_token_id": 0})
    tok = load_tokenizer(d)
    assert (tok.eos_token_id, tok.eos_token, tok.pad_token_id, tok.pad_token_is_eos_fallback) == \
        (2, "<|im_end|>", 0, False)
    assert tok.named_special_tokens == {}  # the template sees only tokens the files name


def test_chat_template_sources(tmp_path):
    named = [{"name": "default", "template": "D{{ messages[0]['content'] }}"},
             {"name": "tool_use", "template": "T{{ messages[0]['content'] }}"}]
    d = _bpe_dir(tmp_path, "named", {"chat_template": named})
    tok = load_tokenizer(d)
    msg = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msg) == "Dx"
    assert tok.apply_chat_template(msg, chat_template="tool_use") == "Tx"
    assert tok.apply_chat_template(msg, chat_template="raw {{ messages | length }}") == "raw 1"
    # chat_template.jinja wins over the config entry, as in HF's current save format
    (tmp_path / "named" / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}")
    assert load_tokenizer(d).apply_chat_template(msg) == "Jx"
    with pytest.raises(TemplateError, match="no chat template"):
        load_tokenizer(_bpe_dir(tmp_path, "none", {})).apply_chat_template(msg)


ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ ''.__class__ }}",                      # jinja's own sandbox would render this as '' silently
    "{{ raise_exception.__globals__ }}",
    "{{ messages.append({'role': 'x'}) }}",    # the immutable sandbox refuses to mutate inputs
    "{% set ns = namespace(a=1) %}{{ ns.__class__ }}",
    "{{ (messages | first).__class__.__subclasses__() }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_sandbox_refuses_python_internals(tmp_path, template):
    tok = load_tokenizer(_bpe_dir(tmp_path, "evil", {"chat_template": template}))
    with pytest.raises(TemplateError, match="sandbox refused") as info:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert str(tmp_path / "evil") in str(info.value)


def test_template_errors(tmp_path):
    tok = load_tokenizer(_bpe_dir(tmp_path, "t", {"chat_template": CHAT_TEMPLATE, "bos_token": "<|im_start|>"}))
    with pytest.raises(TemplateError, match="raised: Unknown role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    with pytest.raises(TemplateError, match="syntax error"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for m in messages %}")
    with pytest.raises(TemplateError, match="message 0 must be a dict"):
        tok.apply_chat_template(["not a message"])
    # strftime_now is a working global
    from datetime import datetime
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ strftime_now('%Y') }}") \
        == str(datetime.now().year)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(TokenizerError, match="no such directory"):
        load_tokenizer(str(tmp_path / "absent"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match=r"empty: no tokenizer found \(looked for tokenizer.json and "
                                             r"tokenizer.model\)"):
        load_tokenizer(str(empty))
    d = _bpe_dir(tmp_path, "badconfig", {})
    (tmp_path / "badconfig" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: unreadable JSON"):
        load_tokenizer(d)
    d = _bpe_dir(tmp_path, "badjson", {})
    (tmp_path / "badjson" / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot be read"):
        load_tokenizer(d)
    (tmp_path / "badsp").mkdir()
    (tmp_path / "badsp" / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerError, match="tokenizer.model: cannot be read by sentencepiece"):
        load_tokenizer(str(tmp_path / "badsp"))
    d = _bpe_dir(tmp_path, "badtoken", {"eos_token": {"contents": "typo"}})
    with pytest.raises(TokenizerError, match="eos_token"):
        load_tokenizer(d)


def test_hub_id_goes_through_resolve(tmp_path):
    d = _bpe_dir(tmp_path, "hub", {"eos_token": "<|im_end|>"})
    calls = []

    def resolve(repo_id, revision):
        calls.append((repo_id, revision))
        return d

    tok = load_tokenizer("someone/some-model", revision="0123abc", resolve=resolve)
    assert calls == [("someone/some-model", "0123abc")] and tok.eos_token == "<|im_end|>"
    # a file inside a checkpoint works too, and a local-looking missing path never reaches resolve
    assert load_tokenizer(os.path.join(d, "tokenizer.json"), resolve=resolve).vocab_size == tok.vocab_size
    with pytest.raises(TokenizerError):
        load_tokenizer("./nope/model", resolve=resolve)
    assert len(calls) == 1


# ----------------------------------------------------------------------------------------- sentencepiece

LLAMA2_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] "
                   "+ ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")


def _sp_dir(tmp_path, sp_model_path, name, config):
    import shutil

    d = tmp_path / name
    d.mkdir()
    shutil.copy(sp_model_path, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return str(d)


def test_sentencepiece_matches_sentencepiece(tmp_path, sp_model_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model_path)
    d = _sp_dir(tmp_path, sp_model_path, "sp", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                                "chat_template": LLAMA2_TEMPLATE})
    tok = load_tokenizer(d)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.vocab_size == sp.get_piece_size() and tok.add_bos_token
    for text in SP_TEXTS:
        assert tok.encode(text) == [1] + sp.encode(text)                    # BOS by default
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))   # special tokens skipped
    # special tokens in text are matched whole; the text around them is encoded piece by piece
    assert tok.encode("Hello</s>world<s>", add_special_tokens=False) == sp.encode("Hello") + [2] + sp.encode("world") + [1]
    # "▁" at the start of a piece is a space except at the very start of the text (HF's Llama decoder does the same)
    assert tok.decode(tok.encode("Hello</s>world"), skip_special_tokens=False) == "<s> Hello</s> world"
    assert tok.decode(tok.encode("Hello</s>world")) == "Hello world"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Paris"}]
    text = tok.apply_chat_template(msgs)
    assert text == "<s>[INST] hi [/INST] Paris </s>"
    assert tok.apply_chat_template(msgs, tokenize=True) == [1] + sp.encode("[INST] hi [/INST] Paris ") + [2]


def test_sentencepiece_flags_and_added_tokens(tmp_path, sp_model_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model_path)
    n = sp.get_piece_size()
    added = {str(n): {"content": "<|tool|>", "special": True}, str(n + 1): {"content": "<think>", "special": False}}
    d = _sp_dir(tmp_path, sp_model_path, "flags", {"add_bos_token": False, "add_eos_token": True,
                                                   "added_tokens_decoder": added})
    tok = load_tokenizer(d)
    assert tok.vocab_size == n + 2 and tok.pad_token_id == 2 and tok.pad_token_is_eos_fallback
    assert tok.encode("fox") == sp.encode("fox") + [2]
    ids = tok.encode("a<|tool|>b<think>c", add_special_tokens=False)
    assert ids == sp.encode("a") + [n] + sp.encode("b") + [n + 1] + sp.encode("c")
    assert tok.decode(ids) == "a b<think> c"          # the special one dropped, the plain added one kept
    assert tok.id_to_token(n + 1) == "<think>" and tok.token_to_id("<|tool|>") == n
