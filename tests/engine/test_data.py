"""Data pipeline: record shapes, loss masks through the chat template, truncation, bad data, packing."""
import json

import pytest
import torch

from hare import load_model
from hare.engine.data import (IGNORE, DataError, epoch_batches, pack, packed_batch, padded_batch, prepare,
                              tokenize_record)
from hare.engine.lora import apply_lora, trainable_parameters
from hare.models.tokenizer import load_tokenizer
from tests.engine.conftest import save_tiny_tokenizer

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name?"},
                     {"role": "assistant", "content": "Hare."}]}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def _targets(tok, ids, labels):
    """The target tokens as text, one string per contiguous run."""
    runs, cur = [], []
    for i, y in zip(ids, labels):
        if y == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert y == i
            cur.append(i)
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def test_chat_loss_only_on_assistant_turns(tok):
    ids, labels = tokenize_record(CHAT, tok)
    assert ids == tok.apply_chat_template(CHAT["messages"], tokenize=True)
    assert _targets(tok, ids, labels) == ["Hello.<|im_end|>\n", "Hare.<|im_end|>\n"]
    # the prompt part of the first turn is exactly what generation would encode
    prompt = tok.apply_chat_template(CHAT["messages"][:2], add_generation_prompt=True, tokenize=True)
    assert ids[:len(prompt)] == prompt and all(y == IGNORE for y in labels[:len(prompt)])
    ids_all, labels_all = tokenize_record(CHAT, tok, loss_on="all")
    assert ids_all == ids and labels_all == ids


def test_instruction_and_text_records(tok, tmp_path):
    ids, labels = tokenize_record({"instruction": "Add.", "input": "2 3", "output": "5"}, tok)
    assert _targets(tok, ids, labels) == ["5<|im_end|>\n"]
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>user\nAdd.\n\n2 3<|im_end|>")
    ids, labels = tokenize_record({"text": "plain words"}, tok)
    assert labels == ids and ids[-1] == tok.eos_token_id
    # without a chat template an instruction takes the Alpaca prompt, the response ends with EOS
    plain = load_tokenizer(save_tiny_tokenizer(tmp_path / "plain", chat_template=False))
    ids, labels = tokenize_record({"instruction": "Add.", "output": "5"}, plain)
    assert plain.decode(ids, skip_special_tokens=False) == "### Instruction:\nAdd.\n\n### Response:\n5<|im_end|>"
    assert _targets(plain, ids, labels) == ["5<|im_end|>"]
    with pytest.raises(DataError, match="chat template"):
        tokenize_record(CHAT, plain, where="x")


def test_iterable_of_dicts_and_generators(tok):
    records = [CHAT, {"text": "abc"}]
    a = prepare(records, tok, max_seq_length=512)
    b = prepare((r for r in records), tok, max_seq_length=512)
    assert [e.input_ids for e in a.examples] == [e.input_ids for e in b.examples]
    assert [e.where for e in a.examples] == ["example 0", "example 1"]


def _write(tmp_path, lines):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return str(p)


BAD = [
    {"text": "fine"},                                                        # 1
    '{"text": "broken',                                                      # 2 malformed JSON
    {"instruction": "no output"},                                            # 3 missing field
    {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},  # 4 wrong role
    {"text": "   "},                                                         # 5 empty text
    {"messages": [{"role": "user", "content": "only a question"}]},          # 6 no assistant
    {"prompt": "x", "completion": "y"},                                      # 7 unknown shape
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]},  # 8 wrong type
    {"text": "x" * 100},                                                     # 9 too long (over 64 tokens)
]


def test_bad_data_refused_naming_every_line(tok, tmp_path):
    path = _write(tmp_path, BAD)
    with pytest.raises(DataError) as e:
        prepare(path, tok, max_seq_length=64, on_long="raise")
    msg = str(e.value)
    assert msg.startswith("8 bad records")
    reasons = {int(l.split(":")[1]): l for l in msg.splitlines()[1:]}
    for line, what in [(2, "malformed JSON"), (3, "missing field 'output'"), (4, "role 'bot'"), (5, "empty text"),
                       (6, "no assistant"), (7, "unknown record shape"), (8, "must be a string"),
                       (9, "longer than max_seq_length")]:
        assert what in reasons[line], (line, msg)
    assert sorted(reasons) == list(range(2, 10))


def test_bad_data_skipped_on_request(tok, tmp_path):
    data = prepare(_write(tmp_path, BAD), tok, max_seq_length=64, on_error="skip")
    assert [e.where for e in data.examples] == ["data.jsonl:1", "data.jsonl:9"]
    assert data.truncated == ["data.jsonl:9"] and len(data.examples[1].input_ids) == 64
    assert [w for w, _ in data.skipped] == [f"data.jsonl:{i}" for i in range(2, 9)]
    skip_long = prepare(_write(tmp_path, BAD), tok, max_seq_length=64, on_error="skip", on_long="skip")
    assert [e.where for e in skip_long.examples] == ["data.jsonl:1"]
    assert "truncated" not in skip_long.summary() and "8 skipped" in skip_long.summary()


def test_truncation_that_leaves_no_target_is_reported(tok):
    long_prompt = {"messages": [{"role": "user", "content": "q" * 80}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match="no target tokens left after truncation"):
        prepare([long_prompt], tok, max_seq_length=32)


def test_pack_is_greedy_and_in_order():
    assert pack([3, 4, 2, 5, 1], 7) == [[0, 1], [2, 3], [4]]
    assert pack([7, 7], 7) == [[0], [1]]


def _examples(tok, n=4):
    records = [{"messages": [{"role": "user", "content": "question %d " % i + "x" * (3 * i)},
                             {"role": "assistant", "content": "answer %d" % i + "y" * (5 - i)}]} for i in range(n)]
    return prepare(records, tok, max_seq_length=128).examples


def test_packed_batch_layout(tok):
    ex = _examples(tok, 3)
    b = packed_batch(ex)
    lens = [len(e.input_ids) for e in ex]
    assert b["input_ids"].shape == (1, sum(lens))  # no padding at all
    assert b["position_ids"][0].tolist() == [p for n in lens for p in range(n)]
    assert b["doc_ids"][0].tolist() == [d for d, n in enumerate(lens) for _ in range(n)]
    starts = [sum(lens[:d]) for d in range(3)]
    assert all(b["labels"][0, s].item() == IGNORE for s in starts)
    batches = epoch_batches(ex, epoch=0, seed=1, packing=True, batch_size=1, max_seq_length=10_000)
    assert len(batches) == 1 and sorted(batches[0]["input_ids"][0].tolist()) == sorted(b["input_ids"][0].tolist())


def test_packing_gives_per_example_losses_and_gradients(tiny_llama, tok):
    """A packed row (doc-masked attention, restarted positions) vs the examples one by one, in fp64."""
    model = apply_lora(load_model(tiny_llama, dtype=torch.float64), r=4, alpha=8, seed=0, adapter_dtype="float64")
    with torch.no_grad():
        for n, p in trainable_parameters(model).items():
            p.normal_(0, 0.05)  # B != 0: adapters take part in the forward and in every gradient
    params = list(trainable_parameters(model).values())
    ex = _examples(tok, 4)
    packed = packed_batch(ex)
    starts = [0]
    for e in ex:
        starts.append(starts[-1] + len(e.input_ids))
    alone_sum = 0
    for d, e in enumerate(ex):
        one = padded_batch([e], pad_id=0)
        loss_one = model(one["input_ids"], labels=one["labels"]).loss_sum
        # the packed row with only example d's labels
        labels = torch.full_like(packed["labels"], IGNORE)
        labels[0, starts[d]:starts[d + 1]] = packed["labels"][0, starts[d]:starts[d + 1]]
        loss_in_pack = model(packed["input_ids"], labels=labels, position_ids=packed["position_ids"],
                             doc_ids=packed["doc_ids"]).loss_sum
        assert abs(loss_in_pack.item() - loss_one.item()) <= 1e-10 * abs(loss_one.item()), d
        alone_sum = alone_sum + loss_one
    g_alone = torch.autograd.grad(alone_sum, params)
    loss_packed = model(packed["input_ids"], labels=packed["labels"], position_ids=packed["position_ids"],
                        doc_ids=packed["doc_ids"]).loss_sum
    g_packed = torch.autograd.grad(loss_packed, params)
    for a, b in zip(g_packed, g_alone):
        assert (a - b).abs().max() <= 1e-10 * max(b.abs().max().item(), 1.0)
