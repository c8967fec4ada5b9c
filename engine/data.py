"""Training data: records -> token ids with loss masks -> micro-batches (packed or padded).

Sources: a JSONL file (one JSON object per line) or any iterable of dicts (a list, a generator, a Hugging Face
`datasets.Dataset`: hare only iterates it, so `datasets` is not a dependency).

Record shapes, recognised by their keys:
  chat          {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  instruction   {"instruction": str, "input": str (optional), "output": str}
  text          {"text": str}
Chat records go through the tokenizer's own chat template; instruction records too (as one user turn and one
assistant turn) when the tokenizer has a template, else through the Alpaca prompt
("### Instruction:\\n...\\n\\n### Input:\\n...\\n\\n### Response:\\n") followed by the output and EOS.

Loss mask (labels = -100 where no loss): by default only the assistant turns / the response are targets, i.e.
each assistant turn's rendered text from the end of the generation prompt through the end-of-turn marker (so
the model learns to stop). loss_on="all" makes every token a target. A text record is all targets.

How the assistant spans are found: for the k-th message (an assistant turn) the template renders
messages[:k] with the generation prompt (P_k) and messages[:k+1] (F_k); the turn is the text between len(P_k)
and len(F_k) of the full conversation, which must start with F_k and P_k (true for templates that render a
conversation incrementally, as ChatML, Llama 3, Gemma, Mistral do). The text is then tokenized piece by piece
(prompt pieces and target pieces; add_special_tokens=False, the template writes BOS itself), so every token is
wholly prompt or wholly target; template pieces meet at special tokens, where piecewise and whole tokenization
agree, and each prompt piece is what generation would encode.

Bad data never stops a run halfway: every record is read and tokenized before the first step. A bad record
(malformed JSON line, missing or wrong-typed fields, unknown role, empty text, no target token) is a DataError
naming its line; on_error="raise" (default) refuses the dataset listing every bad line, on_error="skip" skips
and reports them. An example longer than max_seq_length is truncated (on_long="truncate", the default: its
tail is cut and it is counted), skipped ("skip") or refused ("raise").

Packing (padding-free): a packed micro-batch is ONE row holding whole examples back to back, up to
`max_tokens` tokens, with position_ids restarting at 0 for each example and doc_ids (the example's index in
the row) so that attention never crosses examples; the first label of each example is -100 so that no example
is asked to predict the next one's first token. Losses and gradients equal those of the examples run one by
one. Without packing, a micro-batch is `batch_size` examples right-padded to the longest (labels -100 on pads;
causal attention keeps real tokens from seeing the pads to their right).
"""
import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Union

import torch

from ..models.errors import HareError

IGNORE = -100
ROLES = ("system", "user", "assistant")


class DataError(HareError, ValueError):
    """A training record is malformed or cannot become a training example; the message names where."""


@dataclass
class Example:
    input_ids: list
    labels: list          # IGNORE where no loss
    where: str            # "file.jsonl:12" or "example 12"

    @property
    def n_targets(self) -> int:
        # labels[0] is never predicted (token t predicts labels[t + 1])
        return sum(1 for y in self.labels[1:] if y != IGNORE)


@dataclass
class Dataset:
    """Tokenized examples plus an account of what was dropped or changed on the way."""
    examples: list
    skipped: list = field(default_factory=list)    # (where, reason)
    truncated: list = field(default_factory=list)  # where
    n_records: int = 0

    def __len__(self):
        return len(self.examples)

    @property
    def n_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    def summary(self) -> str:
        s = f"{len(self.examples)} examples, {self.n_tokens} tokens from {self.n_records} records"
        if self.truncated:
            s += f"; {len(self.truncated)} truncated to max_seq_length"
        if self.skipped:
            s += f"; {len(self.skipped)} skipped"
        return s


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------

def read_records(source: Union[str, os.PathLike, Iterable]):
    """Yields (where, record) pairs; a record that cannot be read is yielded as a DataError instead."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such data file")
        name = os.path.basename(path)
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{name}:{i}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})")
        return
    if isinstance(source, dict):
        raise DataError("data: expected a file path or an iterable of records, got one dict")
    for i, record in enumerate(source):
        yield f"example {i}", record


# ---------------------------------------------------------------------------------------------------------------
# Records -> (ids, labels)
# ---------------------------------------------------------------------------------------------------------------

def _text_field(record, key, where, required=True):
    value = record.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _messages(record, where):
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; expected one of {list(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}): 'content' must be a string")
        if not content.strip():
            raise DataError(f"{where}: message {i} ({role}) has empty content")
        out.append({"role": role, "content": content})
    if out[0]["role"] == "assistant":
        raise DataError(f"{where}: the conversation starts with an assistant message")
    if all(m["role"] != "assistant" for m in out):
        raise DataError(f"{where}: no assistant message (nothing to learn)")
    return out


def _chat_pieces(tokenizer, messages, where):
    """[(text, is_target)] covering the rendered conversation; targets are the assistant turns."""
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    pieces, pos = [], 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=False)
        upto = tokenizer.apply_chat_template(messages[:k + 1], add_generation_prompt=False, tokenize=False)
        if not (full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= pos):
            raise DataError(f"{where}: the tokenizer's chat template does not render this conversation "
                            f"incrementally, so the assistant turns cannot be located; use loss_on='all'")
        pieces += [(full[pos:len(prompt)], False), (full[len(prompt):len(upto)], True)]
        pos = len(upto)
    pieces.append((full[pos:], False))
    return [(t, target) for t, target in pieces if t]


def _alpaca_prompt(instruction, inp):
    prompt = f"### Instruction:\n{instruction}\n\n"
    if inp:
        prompt += f"### Input:\n{inp}\n\n"
    return prompt + "### Response:\n"


def instruction_messages(instruction, inp=""):
    """The user turn an instruction record becomes (also what the demo and evaluation send)."""
    return [{"role": "user", "content": f"{instruction}\n\n{inp}" if inp else instruction}]


def tokenize_record(record, tokenizer, loss_on="response", where="record"):
    """(input_ids, labels) of one record; raises DataError naming `where` for anything wrong."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    all_targets = loss_on == "all"
    if "messages" in record:
        if tokenizer.chat_template is None:
            raise DataError(f"{where}: a chat record needs a tokenizer with a chat template")
        pieces = _chat_pieces(tokenizer, _messages(record, where), where)
    elif "instruction" in record or "output" in record:
        instruction = _text_field(record, "instruction", where)
        inp = _text_field(record, "input", where, required=False)
        output = _text_field(record, "output", where)
        if not instruction.strip() or not output.strip():
            raise DataError(f"{where}: empty {'instruction' if not instruction.strip() else 'output'}")
        if tokenizer.chat_template is not None:
            messages = instruction_messages(instruction, inp) + [{"role": "assistant", "content": output}]
            pieces = _chat_pieces(tokenizer, messages, where)
        else:
            prompt = tokenizer.encode(_alpaca_prompt(instruction, inp), add_special_tokens=False)
            if tokenizer.add_bos_token:
                prompt = [tokenizer.bos_token_id] + prompt
            answer = tokenizer.encode(output, add_special_tokens=False)
            if tokenizer.eos_token_id is not None:
                answer.append(tokenizer.eos_token_id)
            return prompt + answer, (prompt if all_targets else [IGNORE] * len(prompt)) + answer
    elif "text" in record:
        text = _text_field(record, "text", where)
        if not text.strip():
            raise DataError(f"{where}: empty text")
        ids = tokenizer.encode(text, add_special_tokens=True)
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        return ids, list(ids)
    else:
        raise DataError(f"{where}: unknown record shape with keys {sorted(record)}; expected 'messages', "
                        f"'instruction'/'output' or 'text'")
    ids, labels = [], []
    for text, target in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if (target or all_targets) else [IGNORE] * len(piece)
    return ids, labels


def prepare(source, tokenizer, max_seq_length: int, loss_on: str = "response", on_error: str = "raise",
            on_long: str = "truncate") -> Dataset:
    """Read and tokenize every record up front; see the module docstring for the policies."""
    if loss_on not in ("response", "all"):
        raise ValueError(f"loss_on must be 'response' or 'all', got {loss_on!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if on_long not in ("truncate", "skip", "raise"):
        raise ValueError(f"on_long must be 'truncate', 'skip' or 'raise', got {on_long!r}")
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2, got {max_seq_length}")
    data = Dataset(examples=[])
    errors = []
    for where, record in read_records(source):
        data.n_records += 1
        try:
            if isinstance(record, DataError):
                raise record
            ids, labels = tokenize_record(record, tokenizer, loss_on, where)
            if len(ids) > max_seq_length:
                if on_long == "raise":
                    raise DataError(f"{where}: {len(ids)} tokens, longer than max_seq_length={max_seq_length} "
                                    f"(on_long='truncate' or 'skip' to accept it)")
                if on_long == "skip":
                    data.skipped.append((where, f"{len(ids)} tokens > max_seq_length={max_seq_length}"))
                    continue
                ids, labels = ids[:max_seq_length], labels[:max_seq_length]
                data.truncated.append(where)
            example = Example(ids, labels, where)
            if example.n_targets == 0:
                raise DataError(f"{where}: no target tokens" + (" left after truncation" if where in data.truncated
                                                                else ""))
        except DataError as e:
            if on_error == "raise":
                errors.append(str(e))
            else:
                data.skipped.append((where, str(e)))
            continue
        data.examples.append(example)
    if errors:
        shown = "\n  ".join(errors[:20]) + ("\n  ..." if len(errors) > 20 else "")
        raise DataError(f"{len(errors)} bad records (on_error='skip' to skip them):\n  {shown}")
    if not data.examples:
        raise DataError("no usable training examples")
    return data


# ---------------------------------------------------------------------------------------------------------------
# Micro-batches
# ---------------------------------------------------------------------------------------------------------------

def pack(lengths, max_tokens: int):
    """Groups of consecutive example indices whose lengths sum to at most max_tokens (greedy, in order, so the
    shuffled order is kept). An example longer than max_tokens gets a row of its own."""
    rows, row, used = [], [], 0
    for i, n in enumerate(lengths):
        if row and used + n > max_tokens:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(row)
    return rows


def packed_batch(examples):
    """One padding-free row: input_ids, labels, position_ids, doc_ids, each (1, total)."""
    ids, labels, pos, docs = [], [], [], []
    for d, e in enumerate(examples):
        n = len(e.input_ids)
        ids += e.input_ids
        labels += [IGNORE] + e.labels[1:]  # no example predicts the next one's first token
        pos += range(n)
        docs += [d] * n
    t = lambda v: torch.tensor([v], dtype=torch.long)  # noqa: E731
    return {"input_ids": t(ids), "labels": t(labels), "position_ids": t(pos), "doc_ids": t(docs)}


def padded_batch(examples, pad_id: int):
    """Right-padded rows: input_ids and labels (B, longest); pads are never targets."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "labels": labels}


def n_targets(batch) -> int:
    """Target tokens of a batch, as the loss counts them (labels shifted: position 0 never counts)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def epoch_batches(examples, epoch: int, seed: int, packing: bool, batch_size: int, max_seq_length: int,
                  pad_id: int = 0, shuffle: bool = True):
    """The micro-batches of one epoch, in order: a deterministic function of (seed, epoch), so that a resumed
    run sees exactly the batches the interrupted one would have."""
    order = list(range(len(examples)))
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(examples), generator=g).tolist()
    if packing:
        rows = pack([len(examples[i].input_ids) for i in order], batch_size * max_seq_length)
        return [packed_batch([examples[order[j]] for j in row]) for row in rows]
    return [padded_batch([examples[i] for i in order[k:k + batch_size]], pad_id)
            for k in range(0, len(order), batch_size)]


def split(data: Dataset, eval_fraction: float, seed: int):
    """(train examples, eval examples): a seeded random eval_fraction held out (at least one example)."""
    n = len(data.examples)
    if not eval_fraction:
        return list(data.examples), []
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    k = max(1, round(n * eval_fraction))
    if k >= n:
        raise DataError(f"eval_fraction={eval_fraction} leaves no training examples out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:k])
    return ([e for i, e in enumerate(data.examples) if i not in held],
            [e for i, e in enumerate(data.examples) if i in held])
