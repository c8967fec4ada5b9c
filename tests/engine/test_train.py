"""The training loop: exactness against transformers + peft, gradient accumulation, checkpointing (also with
CPU offload), resume, atomic checkpoints, metrics, the typed config parser."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from hare import load_model
from hare.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from hare.engine.data import epoch_batches, padded_batch, prepare
from hare.engine.lora import apply_lora, lora_modules, trainable_parameters
from hare.engine.train import TrainConfig, config_from_args, lr_at, micro_step, parse_overrides, train
from hare.models.errors import CheckpointError
from hare.models.tokenizer import load_tokenizer
from tests.engine.conftest import hf_model

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _records(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        a, b = torch.randint(0, 50, (2,), generator=g).tolist()
        pad = "x" * int(torch.randint(0, 20, (1,), generator=g))
        out.append({"messages": [{"role": "user", "content": f"add {a} and {b} {pad}"},
                                 {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]})
    return out


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_seq_length=96, batch_size=2, grad_accum=2, max_steps=6,
                lr=3e-3, warmup_steps=2, progress=False, packing=True)
    base.update(kw)
    lora = base.pop("lora", dict(r=4, alpha=8, seed=0))
    return TrainConfig(**base, lora=lora)


def test_train_matches_transformers_peft(tiny_llama, tok, tmp_path):
    """hare.train (padded micro-batches, accumulation, clipping, warmup + cosine) vs the same recipe written
    with transformers + peft: per-step losses within 1e-4 relative; the saved adapter loads in peft."""
    peft = pytest.importorskip("peft")
    cfg = _cfg(tmp_path, packing=False, max_steps=20, grad_accum=2, batch_size=3, max_grad_norm=0.5,
               weight_decay=0.01)
    model = load_model(tiny_llama)
    apply_lora(model, cfg.lora)
    pm = peft.get_peft_model(hf_model(tiny_llama), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for path, m in lora_modules(model):
            params[f"base_model.model.{path}.lora_A.default.weight"].copy_(m.lora_A.weight)
            params[f"base_model.model.{path}.lora_B.default.weight"].copy_(m.lora_B.weight)
    records = _records(30)
    result = train(model, tok, records, cfg)

    # the reference: the same micro-batches (hare's data order), the same normalization, torch's AdamW
    examples = prepare(records, tok, cfg.max_seq_length).examples
    trainable = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    pm.train()
    plan, epoch, want = [], 0, []
    for step in range(cfg.max_steps):
        micro = []
        while len(micro) < cfg.grad_accum:
            if not plan:
                plan = epoch_batches(examples, epoch, cfg.seed, False, cfg.batch_size, cfg.max_seq_length,
                                     tok.pad_token_id)
                epoch += 1
            micro.append(plan.pop(0))
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        total = 0.0
        for b in micro:
            logits = pm(input_ids=b["input_ids"]).logits
            loss_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(),
                                       ignore_index=-100, reduction="sum")
            (loss_sum / n).backward()
            total += loss_sum.item()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, cfg.max_steps)
        opt.step()
        opt.zero_grad()
        want.append(total / n)
    assert result.steps == 20 and len(result.losses) == 20
    for step, (a, b) in enumerate(zip(result.losses, want)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: hare {a} vs reference {b}"
    assert want[-1] < want[0] - 0.2  # it learned

    loaded = peft.PeftModel.from_pretrained(hf_model(tiny_llama), result.adapter_dir).eval()
    ids = examples[0].input_ids
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits
        ref = loaded(torch.tensor([ids])).logits
    assert (got - ref).abs().max() <= 1e-5


def test_accumulation_of_uneven_micro_batches_equals_one_batch(tiny_llama, tok):
    """4 micro-batches of uneven lengths, each loss_sum / N_total: the gradient of one batch of all (fp64)."""
    model = apply_lora(load_model(tiny_llama, dtype=torch.float64), r=4, seed=0, adapter_dtype="float64")
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.normal_(0, 0.05)
    params = list(trainable_parameters(model).values())
    examples = prepare(_records(4, seed=3), tok, 128).examples
    assert len({len(e.input_ids) for e in examples}) == 4
    micro = [padded_batch([e], pad_id=0) for e in examples]
    n_total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    for b in micro:
        micro_step(model, b, n_total)
    accumulated = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    big = padded_batch(examples, pad_id=0)
    model(big["input_ids"], labels=big["labels"]).loss.backward()
    for a, b in zip(accumulated, params):
        assert (a - b.grad).abs().max() <= 1e-10 * b.grad.abs().max()


@pytest.mark.parametrize("mode", ["on", "offload", "auto"])
def test_gradient_checkpointing_changes_nothing(tiny_llama, tok, tmp_path, mode):
    """Recomputed layers (inputs kept, or offloaded and brought back; "auto" with a budget that fits no layer)
    give the very same run, dropout included."""
    records = _records(16)
    runs = []
    for ckpt in ("off", mode):
        budget = 1e-6 if ckpt == "auto" else 0.0
        cfg = _cfg(tmp_path / f"{ckpt}", checkpointing=ckpt, checkpoint_budget_gib=budget,
                   lora=dict(r=4, alpha=8, seed=0, dropout=0.1), max_steps=4)
        runs.append(train(load_model(tiny_llama), tok, records, cfg).losses)
    assert runs[0] == runs[1]


def test_resume_gives_the_same_losses(tiny_llama, tok, tmp_path):
    """Stop after the checkpoint of step 4 (a crash), resume: steps 5..9 equal the uninterrupted run's, with
    dropout (RNG state), packing, accumulation across an epoch boundary and a cosine schedule."""
    records = _records(12)
    kw = dict(max_steps=9, save_every=4, lora=dict(r=4, alpha=8, seed=0, dropout=0.1))
    full = train(load_model(tiny_llama), tok, records, _cfg(tmp_path / "full", **kw))

    class Crash(Exception):
        pass

    def crash_after_4(m):
        if m["step"] == 4:
            raise Crash

    with pytest.raises(Crash):
        train(load_model(tiny_llama), tok, records, _cfg(tmp_path / "cut", **kw), on_step=crash_after_4)
    resumed = train(load_model(tiny_llama), tok, records, _cfg(tmp_path / "cut", resume=True, **kw))
    assert len(full.losses) == 9 and resumed.losses == full.losses[4:]
    rows = [json.loads(l) for l in open(tmp_path / "cut" / "out" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 10))  # one row per step, the crashed run's step 4 kept once
    assert [r["loss"] for r in rows] == full.losses
    state = json.load(open(tmp_path / "cut" / "out" / "checkpoints" / "step-000008" / "trainer_state.json"))
    assert state["epoch"] >= 1  # the run did cross an epoch boundary
    # keep_checkpoints=2: only the two newest remain
    assert sorted(os.listdir(tmp_path / "cut" / "out" / "checkpoints")) == ["latest", "step-000004", "step-000008"]


def test_metrics_eval_and_outputs(tiny_llama, tok, tmp_path):
    cfg = _cfg(tmp_path, eval_fraction=0.25, eval_every=2, max_steps=4)
    result = train(load_model(tiny_llama), tok, _records(16), cfg)
    rows = [json.loads(l) for l in open(tmp_path / "out" / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("lr", "grad_norm", "tokens_per_s", "peak_mem_gb"):
        assert all(r[key] > 0 for r in steps), key
    assert [s for s, _ in result.eval_losses] == [2, 4]
    assert os.path.isfile(os.path.join(result.adapter_dir, "adapter_model.safetensors"))


def test_schedules():
    cfg = TrainConfig(lr=1.0, warmup_steps=2, max_steps=10, min_lr_ratio=0.1)
    assert [lr_at(s, cfg, 10) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, cfg, 10) == 1.0 and abs(lr_at(10, cfg, 10) - 0.1) < 1e-12
    assert abs(lr_at(6, cfg, 10) - (0.1 + 0.9 * 0.5)) < 1e-12  # cosine midpoint
    lin = TrainConfig(lr=1.0, schedule="linear", max_steps=10)
    assert abs(lr_at(5, lin, 10) - 0.5) < 1e-12


def test_typed_overrides():
    got = parse_overrides(["--lr=1e-4", "--max-steps", "7", "--packing=false", "--lora.r=8",
                           "--lora.targets=q_proj,v_proj", "--betas=0.9,0.95", "--lora.seed", "3"])
    assert got == {"lr": 1e-4, "max_steps": 7, "packing": False, "lora": {"r": 8, "targets": ("q_proj", "v_proj"),
                                                                            "seed": 3}, "betas": (0.9, 0.95)}
    cfg = config_from_args(["--lora.alpha=32", "--schedule=linear"])
    assert cfg.lora.alpha == 32.0 and cfg.schedule == "linear"
    for bad, msg in ((["--learning_rate=1"], "unknown option --learning_rate"), (["--max_steps=ten"], "expected int"),
                     (["--packing=maybe"], "true/false"), (["--lora.rank=4"], "unknown option --lora.rank"),
                     (["--lr"], "missing value"), (["lr=1"], "unexpected argument")):
        with pytest.raises(ValueError, match=msg):
            parse_overrides(bad)
    with pytest.raises(ValueError, match="schedule"):
        config_from_args(["--schedule=step"])


KILL_CHILD = r"""
import torch
from hare import load_model
from hare.engine.checkpoint import save_checkpoint
from hare.engine.lora import apply_lora, trainable_parameters
model = apply_lora(load_model({model!r}), r=64, seed=0)
opt = torch.optim.AdamW(trainable_parameters(model).values())
for p in trainable_parameters(model).values():
    p.grad = torch.ones_like(p)
opt.step()
save_checkpoint({out!r}, model, opt, {{"step": 1, "epoch": 0, "position": 1}})
print("saved", flush=True)
step = 2
while True:  # save after save: a kill lands in the middle of one
    save_checkpoint({out!r}, model, opt, {{"step": step, "epoch": 0, "position": step}})
    step += 1
"""


def test_checkpoint_killed_midway_leaves_the_previous_one_loadable(tiny_llama, tmp_path):
    out = str(tmp_path / "run")
    script = KILL_CHILD.format(model=tiny_llama, out=out)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    debris_seen = False
    for delay in (0.05, 0.2, 0.5):  # until a kill lands inside a save (a temporary directory is left behind)
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"saved"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        debris = [d for d in os.listdir(os.path.join(out, "checkpoints")) if ".tmp-" in d]
        path = latest_checkpoint(out)
        model = apply_lora(load_model(tiny_llama), r=64, seed=1)
        opt = torch.optim.AdamW(trainable_parameters(model).values())
        state = load_checkpoint(path, model, opt)  # complete, whatever moment the kill hit
        assert state["step"] >= 1 and os.path.basename(path) == f"step-{state['step']:06d}"
        assert all(m.lora_B.weight.abs().max() > 0 for _, m in lora_modules(model))  # the stepped adapters
        if debris:
            debris_seen = True
            break
    assert debris_seen, "no kill landed inside a save; the test did not test anything"
    # the next save clears the debris
    save_checkpoint(out, model, opt, {"step": 99, "epoch": 0, "position": 0})
    assert not [d for d in os.listdir(os.path.join(out, "checkpoints")) if ".tmp-" in d]


def _dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_debris_is_removed_once_its_writer_is_gone(tiny_llama, tmp_path):
    """A save removes what an earlier save killed midway left (a temporary checkpoint directory, or the temporary
    file of `latest`, which the test above can also hit), but not what a live process may be writing now."""
    model = apply_lora(load_model(tiny_llama), r=4, seed=0)
    opt = torch.optim.AdamW(trainable_parameters(model).values())
    out = str(tmp_path / "run")
    root = os.path.join(out, "checkpoints")
    os.makedirs(root)
    dead, live = _dead_pid(), os.getppid()
    for pid in (dead, live):
        os.makedirs(os.path.join(root, f".step-000005.tmp-{pid}"))
        open(os.path.join(root, f".tmp-{pid}-x1y2.json"), "w").close()
    save_checkpoint(out, model, opt, {"step": 6, "epoch": 0, "position": 0})
    assert sorted(os.listdir(root)) == sorted([".step-000005.tmp-%d" % live, ".tmp-%d-x1y2.json" % live, "latest",
                                               "step-000006"])


def test_resave_killed_between_its_renames_loses_nothing(tiny_llama, tmp_path):
    """Re-saving a step moves the old copy aside, then the new one in. Killed in between, `latest` names a step with
    no directory: readers take the aside copy, and the next save moves it back."""
    model = apply_lora(load_model(tiny_llama), r=4, seed=0)
    opt = torch.optim.AdamW(trainable_parameters(model).values())
    out = str(tmp_path / "run")
    root = os.path.join(out, "checkpoints")
    save_checkpoint(out, model, opt, {"step": 2, "epoch": 0, "position": 7})
    dead = _dead_pid()
    aside = os.path.join(root, f".step-000002.old-{dead}")
    os.rename(os.path.join(root, "step-000002"), aside)  # the state the kill left
    os.makedirs(os.path.join(root, f".step-000002.tmp-{dead}"))
    assert latest_checkpoint(out) == aside
    assert load_checkpoint(aside, model, opt)["position"] == 7
    save_checkpoint(out, model, opt, {"step": 3, "epoch": 0, "position": 8})
    assert sorted(os.listdir(root)) == ["latest", "step-000002", "step-000003"]
    assert load_checkpoint(os.path.join(root, "step-000002"), model, opt)["position"] == 7
    shutil.rmtree(os.path.join(root, "step-000003"))  # `latest` names a step that is gone, with no aside copy
    with pytest.raises(CheckpointError, match="step-000003"):
        latest_checkpoint(out)


def test_skipped_and_truncated_records_are_named(tiny_llama, tok, tmp_path, capsys):
    records = _records(6) + [{"text": ""}, {"messages": [{"role": "user", "content": "q" * 40},
                                                         {"role": "assistant", "content": "a" * 60}]}]
    train(load_model(tiny_llama), tok, records, _cfg(tmp_path, max_steps=1, on_error="skip", max_seq_length=80))
    err = capsys.readouterr().err
    assert "skipped example 6: empty text" in err
    assert "1 examples truncated to max_seq_length: example 7" in err


def test_token_ids_beyond_the_vocabulary_are_refused_before_training(tiny_llama, tmp_path):
    from hare.engine.data import DataError, Dataset, Example

    data = Dataset([Example([1, 2, 3], [1, 2, 3], "example 0"), Example([1, 500, 3], [1, 500, 3], "example 1")])
    with pytest.raises(DataError, match="beyond the model's vocabulary .272. in example 1"):
        train(load_model(tiny_llama), None, data, _cfg(tmp_path, max_steps=1))
