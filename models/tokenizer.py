"""Tokenizers of Hugging Face checkpoints, and their chat templates.

`load_tokenizer(path_or_id)` reads a checkpoint directory the way `transformers.AutoTokenizer` does and returns
one `Tokenizer` over either backend:

- `tokenizer.json`, run by the `tokenizers` library (preferred when both files are present, as HF does);
- `tokenizer.model`, a sentencepiece model, run by `sentencepiece`.

Special tokens are gathered from, in order of precedence, `tokenizer_config.json` (`bos_token` etc., plain strings
or `{"content": ...}` dicts, and `added_tokens_decoder`), `special_tokens_map.json`, and `generation_config.json`
(ids only; its `eos_token_id` may be a list, and every id in it is a stop id). Rules that differ from a naive
reading are stated where they are applied:

- BOS/EOS insertion. tokenizer.json: its own post-processor decides; `add_bos_token` / `add_eos_token` in
  tokenizer_config.json are ignored, as transformers 5 ignores them when a tokenizer.json exists
  (tokenization_utils_base.py, `_from_pretrained`). sentencepiece: those two flags decide, defaulting to True and
  False (HF `LlamaTokenizer`'s and llama.cpp's defaults for a sentencepiece vocabulary).
- pad: `pad_token` when the checkpoint names one, else generation_config's `pad_token_id`, else the EOS id.
  `pad_token_is_eos_fallback` tells which; left-padded generation masks pads, so the value only has to be a
  valid id.
- decode never applies `clean_up_tokenization_spaces` (transformers 5 ignores it for BPE, which is lossy).

Chat templates render in jinja2's `ImmutableSandboxedEnvironment` with what HF's `apply_chat_template` provides
(transformers/utils/chat_template_utils.py): `trim_blocks`/`lstrip_blocks`, the loop-controls extension, a
`{% generation %}` block (rendered as its body), `raise_exception`, `strftime_now`, a `tojson` filter that does
not HTML-escape (`json.dumps(..., ensure_ascii=False)`), and the special tokens (`bos_token`, `eos_token`,
`unk_token`, `pad_token`) as variables. Stricter than jinja's default sandbox: *any* access to an unsafe
attribute (`''.__class__`, `cycler.__init__`) raises at once instead of yielding an undefined value, and every
template failure is one `TemplateError` naming the checkpoint.
"""
from __future__ import annotations

import json
import os
import re
from datetime import datetime
from typing import Callable, Iterable, Mapping

from .errors import TemplateError, TokenizerError

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"

# The named special tokens, as transformers' SPECIAL_TOKENS_ATTRIBUTES (tokenization_utils_base.py). The chat
# template sees each one that is defined as a variable of the same name.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# A hub id is "name" or "owner/name"; anything else that does not exist locally is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[\w.-]+)?$")


# ----------------------------------------------------------------------------------------------------- loading

def load_tokenizer(path_or_id, revision: str | None = None,
                   resolve: Callable[[str, str | None], str] | None = None) -> "Tokenizer":
    """The tokenizer of a checkpoint: a local directory, a `tokenizer.json` / `tokenizer.model` file inside one,
    or a Hugging Face Hub id.

    A hub id is turned into a local directory by `resolve(path_or_id, revision)`; by default that is
    `hare.models.weights.resolve_checkpoint` (download or cache lookup, offline mode respected).
    """
    path = os.path.expanduser(str(path_or_id))
    preferred = None
    if os.path.isfile(path):
        directory, preferred = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        if preferred not in (TOKENIZER_JSON, SENTENCEPIECE_MODEL):
            raise TokenizerError(f"{path}: not a tokenizer file; expected a checkpoint directory, "
                                 f"or a {TOKENIZER_JSON} or {SENTENCEPIECE_MODEL} file")
    elif os.path.isdir(path):
        directory = path
    elif _HUB_ID.match(str(path_or_id)) and not str(path_or_id).startswith("."):
        if resolve is None:
            from .weights import resolve_checkpoint as resolve
        directory = str(resolve(str(path_or_id), revision))
    else:
        raise TokenizerError(f"{path}: no such directory (looked for a checkpoint directory holding "
                             f"{TOKENIZER_JSON} or {SENTENCEPIECE_MODEL})")
    return _load_from_directory(directory, preferred)


def _read_json(path: str, required: bool = False):
    if not os.path.isfile(path):
        if required:
            raise TokenizerError(f"{path}: missing")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: unreadable JSON: {e}") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _token_content(value, where: str):
    """A special-token entry as a string: configs write either "<s>" or {"content": "<s>", ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where}: expected a string or a {{\"content\": ...}} object, found {value!r}")


def _ids(value, where: str) -> list:
    """generation_config ids: an int, a list of ints, or null."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerError(f"{where}: expected a token id or a list of ids, found {value!r}")
    return values


def _load_from_directory(directory: str, preferred: str | None) -> "Tokenizer":
    if preferred is None:
        preferred = TOKENIZER_JSON if os.path.isfile(os.path.join(directory, TOKENIZER_JSON)) else SENTENCEPIECE_MODEL
    if not os.path.isfile(os.path.join(directory, preferred)):
        raise TokenizerError(f"{directory}: no tokenizer found (looked for {TOKENIZER_JSON} and "
                             f"{SENTENCEPIECE_MODEL})")

    config_path = os.path.join(directory, TOKENIZER_CONFIG)
    config = _read_json(config_path)
    special_map = _read_json(os.path.join(directory, SPECIAL_TOKENS_MAP))
    generation = _read_json(os.path.join(directory, GENERATION_CONFIG))

    # Named special tokens: tokenizer_config.json first, special_tokens_map.json for what it leaves out.
    named = {}
    for key in NAMED_SPECIAL_TOKENS:
        value = config[key] if key in config else special_map.get(key)
        content = _token_content(value, f"{config_path if key in config else SPECIAL_TOKENS_MAP}: {key}")
        if content is not None:
            named[key] = content

    # Added tokens: id -> entry, as tokenizer_config.json lists them.
    added = []
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        if not (isinstance(entry, Mapping) and isinstance(entry.get("content"), str) and str(key).isdigit()):
            raise TokenizerError(f"{config_path}: added_tokens_decoder[{key!r}] is not {{\"content\": ...}}")
        added.append((int(key), entry))
    extra = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        values = config.get(key) or special_map.get(key) or []
        if isinstance(values, Mapping):  # transformers 5 also writes {"image_token": "<image>", ...}
            values = list(values.values())
        extra += [_token_content(v, f"{config_path}: {key}") for v in values]

    flags = {k: config[k] for k in ("add_bos_token", "add_eos_token") if k in config}
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise TokenizerError(f"{config_path}: {k} must be true or false, found {v!r}")

    if preferred == TOKENIZER_JSON:
        backend = _TokenizersBackend(os.path.join(directory, TOKENIZER_JSON), named, added, extra)
    else:
        backend = _SentencePieceBackend(os.path.join(directory, SENTENCEPIECE_MODEL), named, added, extra, flags)

    templates = _read_chat_templates(directory, config, config_path)
    return Tokenizer(backend, named, generation, templates, directory)


def _read_chat_templates(directory: str, config: dict, config_path: str) -> dict:
    """name -> template source. `chat_template.jinja` (the current HF save format) wins over the config entry,
    which is a string or a list of {"name", "template"}; `chat_template.json` is the processor-style fallback."""
    templates = {}
    value = config.get("chat_template")
    if value is None:
        value = _read_json(os.path.join(directory, CHAT_TEMPLATE_JSON)).get("chat_template")
    if isinstance(value, str):
        templates["default"] = value
    elif isinstance(value, list):
        for item in value:
            if not (isinstance(item, Mapping) and isinstance(item.get("name"), str)
                    and isinstance(item.get("template"), str)):
                raise TokenizerError(f"{config_path}: chat_template list entries must be {{\"name\", \"template\"}}")
            templates[item["name"]] = item["template"]
    elif value is not None:
        raise TokenizerError(f"{config_path}: chat_template must be a string or a list, found {type(value).__name__}")
    jinja_path = os.path.join(directory, CHAT_TEMPLATE_FILE)
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            templates["default"] = f.read()
    return templates


# ---------------------------------------------------------------------------------------------------- backends

class _TokenizersBackend:
    """tokenizer.json through the `tokenizers` library."""

    kind = "tokenizers"

    def __init__(self, path, named, added, extra):
        from tokenizers import AddedToken, Tokenizer as RustTokenizer

        try:
            self.tok = RustTokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise TokenizerError(f"{path}: cannot be read by the tokenizers library: {e}") from None
        self.path = path
        tok = self.tok
        # Every token the config names or lists is matched whole in text, as HF registers them: a string already
        # in the vocabulary keeps its id; one that is not gets the next free id (HF does the same).
        registered = {t.content for t in tok.get_added_tokens_decoder().values()}
        for token_id, entry in sorted(added):
            if entry["content"] not in registered:
                new = AddedToken(entry["content"], special=bool(entry.get("special", False)),
                                 normalized=bool(entry.get("normalized", not entry.get("special", False))),
                                 lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                                 single_word=bool(entry.get("single_word", False)))
                (tok.add_special_tokens if new.special else tok.add_tokens)([new])
                registered.add(new.content)
            if tok.token_to_id(entry["content"]) != token_id:
                raise TokenizerError(f"{path}: added token {entry['content']!r} has id "
                                     f"{tok.token_to_id(entry['content'])}, but tokenizer_config.json says {token_id}")
        for content in list(named.values()) + extra:
            if content not in registered:
                tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
                registered.add(content)
        self.special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str):
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int):
        return self.tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool) -> list:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list, add_special_tokens: bool) -> list:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list, skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


class _SentencePieceBackend:
    """tokenizer.model through `sentencepiece`, with HF's added-token handling on top.

    Text is first cut at added tokens (every `added_tokens_decoder` entry and every named special token), longest
    first; each piece of plain text is then encoded by sentencepiece on its own. So the model's dummy-prefix
    space is added to every plain-text piece, also after a special token: the "legacy" behaviour of HF's Llama
    tokenizer, of Meta's reference code (which encodes each segment separately) and of llama.cpp
    (src/llama-vocab.cpp, `is_prev_special`).
    """

    kind = "sentencepiece"

    def __init__(self, path, named, added, extra, flags):
        import sentencepiece

        self.path = path
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except Exception as e:  # sentencepiece raises OSError or RuntimeError depending on the failure
            raise TokenizerError(f"{path}: cannot be read by sentencepiece: {e}") from None
        sp = self.sp
        n = sp.get_piece_size()
        self.added = {}          # content -> id, for every token matched whole in text
        self.added_flags = {}    # content -> entry (lstrip / rstrip / special)
        for token_id, entry in sorted(added):
            self.added[entry["content"]] = token_id
            self.added_flags[entry["content"]] = entry
        for content in list(named.values()) + extra:
            if content not in self.added:
                token_id = sp.piece_to_id(content)
                if token_id == sp.unk_id() and content != sp.id_to_piece(sp.unk_id()):
                    raise TokenizerError(f"{path}: special token {content!r} is not in the sentencepiece vocabulary "
                                         f"and not listed in added_tokens_decoder")
                self.added[content] = token_id
                self.added_flags[content] = {"content": content, "special": True}
        self.id_to_added = {i: c for c, i in self.added.items()}
        self.special_ids = {i for c, i in self.added.items() if self.added_flags[c].get("special", False)}
        self.special_ids |= {i for i in range(n) if sp.is_control(i)}
        self._size = max([n] + [i + 1 for i in self.added.values()])
        self.add_bos = flags.get("add_bos_token", True)
        self.add_eos = flags.get("add_eos_token", False)
        self.bos_id = self.added.get(named.get("bos_token"), sp.bos_id() if sp.bos_id() >= 0 else None)
        self.eos_id = self.added.get(named.get("eos_token"), sp.eos_id() if sp.eos_id() >= 0 else None)
        for flag, token_id in (("add_bos_token", self.bos_id), ("add_eos_token", self.eos_id)):
            if flags.get(flag) and token_id is None:
                raise TokenizerError(f"{os.path.dirname(path)}: {flag} is true but the tokenizer has no such token")
        # One alternation of all added tokens, longest first so "<|im_start|>" wins over "<|im".
        # lstrip / rstrip entries also swallow the whitespace on that side, as HF's AddedToken does.
        alternatives = []
        for content in sorted(self.added, key=len, reverse=True):
            entry = self.added_flags[content]
            alternatives.append((r"\s*" if entry.get("lstrip") else "") + re.escape(content)
                                + (r"\s*" if entry.get("rstrip") else ""))
        self.pattern = re.compile("(" + "|".join(alternatives) + ")") if alternatives else None

    def vocab_size(self) -> int:
        return self._size

    def token_to_id(self, token: str):
        if token in self.added:
            return self.added[token]
        token_id = self.sp.piece_to_id(token)
        return None if token_id == self.sp.unk_id() and token != self.sp.id_to_piece(token_id) else token_id

    def id_to_token(self, token_id: int):
        if token_id in self.id_to_added:
            return self.id_to_added[token_id]
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.sp.get_piece_size() else None

    def _added_id(self, matched: str):
        return self.added[matched.strip()] if matched not in self.added else self.added[matched]

    def encode(self, text: str, add_special_tokens: bool) -> list:
        ids = []
        pieces = self.pattern.split(text) if self.pattern is not None else [text]
        # re.split with one capturing group alternates plain text (even indices) and matched tokens (odd).
        for k, piece in enumerate(pieces):
            if k % 2:
                ids.append(self._added_id(piece))
            elif piece:
                ids.extend(self.sp.encode(piece))
        if add_special_tokens:
            ids = ([self.bos_id] if self.add_bos else []) + ids + ([self.eos_id] if self.add_eos else [])
        return ids

    def encode_batch(self, texts: list, add_special_tokens: bool) -> list:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids: list, skip_special_tokens: bool) -> str:
        # Runs of ordinary ids go through sentencepiece (byte fallback, "▁" -> " "); added and control tokens are
        # written as their text, or dropped. sentencepiece drops the dummy-prefix space of a run; a run that does
        # not start the text keeps it, since it separates the run from what precedes it.
        out, run = [], []

        def flush():
            if run:
                text = self.sp.decode(run)
                if out and self.sp.id_to_piece(run[0]).startswith("\u2581"):
                    text = " " + text
                out.append(text)
                run.clear()

        for token_id in ids:
            token_id = int(token_id)
            if token_id in self.special_ids or token_id in self.id_to_added:
                flush()
                if not (skip_special_tokens and token_id in self.special_ids):
                    out.append(self.id_to_token(token_id))
            else:
                run.append(token_id)
        flush()
        return "".join(out)


# ----------------------------------------------------------------------------------------------------- the class

class Tokenizer:
    """A checkpoint's tokenizer: encode/decode, special ids, and its chat template.

    `vocab_size` counts every id the tokenizer can produce (base vocabulary plus added tokens); a model's
    embedding may have more rows (padding to a multiple), never fewer.
    """

    def __init__(self, backend, named: dict, generation: dict, templates: dict, source: str):
        self._backend = backend
        self.name_or_path = source
        self.chat_templates = templates
        self._compiled = {}
        # The named special tokens the checkpoint's files define ("bos_token" -> "<s>"): the chat template sees
        # exactly these, as HF passes its special_tokens_map.
        self.named_special_tokens = dict(named)
        gen_path = os.path.join(source, GENERATION_CONFIG)

        def id_of(key, gen_key):
            if key in named:
                token_id = backend.token_to_id(named[key])
                if token_id is None:
                    raise TokenizerError(f"{source}: {key} {named[key]!r} is not in the vocabulary")
                return token_id
            ids = _ids(generation.get(gen_key), f"{gen_path}: {gen_key}")
            return ids[0] if ids else getattr(backend, key.replace("_token", "_id"), None)

        self.bos_token_id = id_of("bos_token", "bos_token_id")
        self.eos_token_id = id_of("eos_token", "eos_token_id")
        self.unk_token_id = id_of("unk_token", "unk_token_id")
        # Stop ids: the tokenizer's EOS and every id generation_config lists (Llama 3 lists several).
        self.eos_token_ids = set(_ids(generation.get("eos_token_id"), f"{gen_path}: eos_token_id"))
        if self.eos_token_id is not None:
            self.eos_token_ids.add(self.eos_token_id)
        pad = id_of("pad_token", "pad_token_id")
        self.pad_token_is_eos_fallback = pad is None
        self.pad_token_id = self.eos_token_id if pad is None else pad

    # -- token strings of the ids above
    def _token(self, token_id):
        return None if token_id is None else self._backend.id_to_token(token_id)

    @property
    def bos_token(self):
        return self._token(self.bos_token_id)

    @property
    def eos_token(self):
        return self._token(self.eos_token_id)

    @property
    def pad_token(self):
        return self._token(self.pad_token_id)

    @property
    def unk_token(self):
        return self._token(self.unk_token_id)

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def all_special_ids(self) -> set:
        return set(self._backend.special_ids)

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode(text)` (add_special_tokens=True) starts with BOS, whichever rule decided it."""
        if self.bos_token_id is None:
            return False
        ids = self._backend.encode("x", True)
        return bool(ids) and ids[0] == self.bos_token_id

    def token_to_id(self, token: str):
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int):
        return self._backend.id_to_token(int(token_id))

    # -- encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        """Token ids of `text`; with add_special_tokens, BOS/EOS as the checkpoint asks (see module doc)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return list(self._backend.encode(text, add_special_tokens))

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True) -> list:
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}] must be a str, got {type(t).__name__}")
        return [list(ids) for ids in self._backend.encode_batch(texts, add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        return self._backend.decode(ids, skip_special_tokens)

    def decode_batch(self, batch, skip_special_tokens: bool = True) -> list:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # -- chat template
    @property
    def chat_template(self):
        """The default chat template's source, or None."""
        return self.chat_templates.get("default")

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False,
                            chat_template: str | None = None, tools=None, documents=None, **kwargs):
        """Render `messages` (a list of {"role", "content", ...} dicts, or a list of such lists) with the
        checkpoint's own template. Returns the text, or with tokenize=True its ids (encoded without adding
        BOS/EOS: the template writes them, as in HF). `chat_template` picks a named template or is a template
        source itself; extra keyword arguments become template variables."""
        batched = isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[0], (list, tuple))
        conversations = list(messages) if batched else [messages]
        template = self._template(chat_template)
        variables = dict(self.named_special_tokens)
        variables.update(kwargs)
        rendered = []
        for conversation in conversations:
            chat = _plain_messages(conversation, self.name_or_path)
            try:
                rendered.append(template.render(messages=chat, tools=tools, documents=documents,
                                                add_generation_prompt=add_generation_prompt, **variables))
            except TemplateError:
                raise
            except Exception as e:
                raise _template_error(e, self.name_or_path) from None
        if tokenize:
            rendered = [self.encode(text, add_special_tokens=False) for text in rendered]
        return rendered if batched else rendered[0]

    def _template(self, chat_template):
        if chat_template is None:
            if not self.chat_templates:
                raise TemplateError(f"{self.name_or_path}: the tokenizer has no chat template (looked for "
                                    f"chat_template in {TOKENIZER_CONFIG} and {CHAT_TEMPLATE_FILE})")
            source = self.chat_templates.get("default")
            if source is None:
                raise TemplateError(f"{self.name_or_path}: no default chat template; pass chat_template= one of "
                                    f"{sorted(self.chat_templates)}")
        else:
            source = self.chat_templates.get(chat_template, chat_template)
        if source not in self._compiled:
            self._compiled[source] = compile_chat_template(source, self.name_or_path)
        return self._compiled[source]

    def __repr__(self):
        return (f"Tokenizer({self.name_or_path!r}, backend={self._backend.kind}, "
                f"vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})")


def _plain_messages(conversation, source):
    """Fresh dicts for the template, without keys whose value is None (HF drops them too, so a template's
    `message.tool_calls is defined` sees the same thing)."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise TemplateError(f"{source}: a conversation must be a non-empty list of messages")
    out = []
    for i, message in enumerate(conversation):
        if not isinstance(message, Mapping):
            raise TemplateError(f"{source}: message {i} must be a dict with 'role' and 'content', "
                                f"got {type(message).__name__}")
        out.append({k: v for k, v in message.items() if v is not None})
    return out


# ----------------------------------------------------------------------------------------------------- jinja

def _template_error(e: Exception, source: str) -> TemplateError:
    from jinja2.exceptions import SecurityError, TemplateSyntaxError

    if isinstance(e, SecurityError):
        return TemplateError(f"{source}: the chat template tried to reach Python internals and the sandbox "
                             f"refused it: {e}")
    if isinstance(e, TemplateSyntaxError):
        return TemplateError(f"{source}: chat template syntax error at line {e.lineno}: {e.message}")
    if isinstance(e, _RaisedByTemplate):
        return TemplateError(f"{source}: the chat template raised: {e}")
    return TemplateError(f"{source}: the chat template failed: {type(e).__name__}: {e}")


class _RaisedByTemplate(Exception):
    """raise_exception(message) called by a template: the template's own, deliberate error."""


def compile_chat_template(source: str, where: str = "<chat template>"):
    """Compile a chat template in the strict sandbox (see module doc). Raises TemplateError."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class StrictSandbox(ImmutableSandboxedEnvironment):
        # Jinja's sandbox answers an unsafe attribute with an Undefined that fails only when used further, so
        # `{{ ''.__class__ }}` renders as "" instead of failing. Refuse at the first touch.
        def unsafe_undefined(self, obj, attribute):
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    class GenerationBlock(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for HF's assistant-token masks;
        # rendering-wise it is its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise _RaisedByTemplate(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes (<, >, &, '), which would change the prompt the model was trained on.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = StrictSandbox(trim_blocks=True, lstrip_blocks=True,
                        extensions=[jinja2.ext.loopcontrols, GenerationBlock])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except Exception as e:
        raise _template_error(e, where) from None
