"""The training loop: `hare.train(model, tokenizer, data, TrainConfig(...))`.

It reads top to bottom (setup, then `while step < max_steps`) and uses nothing but the model's forward, so it
can be copied and changed. One optimizer step:

    micro-batches b_1..b_k (k = grad_accum), N = number of target tokens in all of them (known on the host)
    for each b_i:  (loss_sum(b_i) / N).backward()        -> the gradient of the mean loss over all N tokens
    clip the gradient norm, set the scheduled lr, AdamW step, zero the gradients

Dividing each micro-batch's summed loss by the token count of the whole step (not by its own count) makes the
accumulated gradient exactly that of one big batch, however unevenly the tokens fall into micro-batches
(torchtune recipes/lora_finetune_single_device.py normalizes the same way).

Precision (the one place this is decided): no torch.autocast. The base model computes in the dtype it was
loaded in (bf16 on the GPU, fp32 on the CPU); LoRA adapters are fp32 master weights cast to that dtype inside
kernels/lora.py, so their gradients and AdamW states are fp32; the loss (log-softmax) is computed in fp32 by
the fused cross-entropy. Fully trained embeddings / lm_head (LoRAConfig.train_embeddings / train_lm_head) stay in
the model's dtype.
"""
import dataclasses
import json
import math
import os
import resource
import sys
import time
import typing
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .checkpoint import check_peft_exportable, latest_checkpoint, load_checkpoint, save_adapter, save_checkpoint
from .data import DataError, Dataset, epoch_batches, n_targets, prepare, split
from .lora import LoRAConfig, apply_lora, trainable_parameters
from .offload import disable_checkpointing, enable_checkpointing


@dataclass
class TrainConfig:
    # -- data
    max_seq_length: int = 1024       # longer examples are truncated (on_long) and counted
    packing: bool = True             # padding-free rows of whole examples (see engine/data.py)
    batch_size: int = 4              # examples per micro-batch; packed: a row of batch_size * max_seq_length tokens
    grad_accum: int = 1              # micro-batches per optimizer step
    loss_on: str = "response"        # "response": assistant turns / outputs only; "all": every token
    on_error: str = "raise"          # bad records: "raise" (list them all, train nothing) or "skip"
    on_long: str = "truncate"        # over-long examples: "truncate", "skip" or "raise"
    eval_fraction: float = 0.0       # held-out share of the data for the eval loss (ignored with eval_data)
    eval_every: int = 0              # steps between eval losses; 0 = only at the end
    # -- optimization
    max_steps: int = 100             # optimizer steps (num_epochs, when set, decides instead)
    num_epochs: float = 0.0          # > 0: train this many passes over the data
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    schedule: str = "cosine"         # "cosine", "linear" or "constant", after the warmup
    warmup_steps: int = 0            # linear warmup: lr * (step + 1) / warmup_steps
    min_lr_ratio: float = 0.0        # floor of the decay, as a fraction of lr
    max_grad_norm: float = 1.0       # clip the global gradient norm; 0 = no clipping
    seed: int = 0                    # data order, adapter init (when train applies LoRA), dropout
    # -- memory
    checkpointing: str = "off"       # "off"; "on": recompute every decoder layer in backward; "offload": on, with
                                     # the layer inputs in pinned CPU memory (long context); "auto": recompute
                                     # only the layers whose activations do not fit checkpoint_budget_gib
    checkpoint_budget_gib: float = 0.0  # "auto" only; 0 = the device's memory minus 1 GiB
    # -- output
    output_dir: str = "hare-out"     # adapter/, checkpoints/, metrics.jsonl, loss_curve.png
    log_every: int = 1
    save_every: int = 0              # steps between resumable checkpoints; 0 = none
    keep_checkpoints: int = 2        # newest checkpoints kept (0 = all)
    resume: bool = False             # continue from the newest checkpoint in output_dir
    progress: bool = True            # tqdm bar
    # -- adapters, when the model has none yet
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig(**self.lora)
        self.betas = tuple(self.betas)
        checks = [("schedule", self.schedule in ("cosine", "linear", "constant"), "cosine, linear or constant"),
                  ("batch_size", self.batch_size >= 1, ">= 1"), ("grad_accum", self.grad_accum >= 1, ">= 1"),
                  ("max_steps", self.max_steps >= 1 or self.num_epochs > 0, ">= 1 (or num_epochs > 0)"),
                  ("lr", self.lr > 0, "> 0"), ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
                  ("checkpointing", self.checkpointing in ("off", "on", "offload", "auto"),
                   "off, on, offload or auto"),
                  ("checkpoint_budget_gib", self.checkpoint_budget_gib >= 0
                   and (self.checkpoint_budget_gib == 0 or self.checkpointing == "auto"), ">= 0, with 'auto' only")]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {want}, got {getattr(self, name)!r}")


@dataclass
class TrainResult:
    steps: int
    losses: list                       # mean training loss of each step
    eval_losses: list                  # (step, eval loss)
    tokens: int                        # tokens processed (inputs, prompts included)
    seconds: float
    adapter_dir: str
    data_summary: str


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine / linear decay to
    min_lr_ratio * lr at max_steps, or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def _to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def micro_step(model, batch, n_total: int):
    """Forward + backward of one micro-batch, scaled so that gradients sum to those of the mean loss over the
    n_total target tokens of the whole optimizer step. Returns the (detached) summed loss."""
    out = model(batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"),
                doc_ids=batch.get("doc_ids"))
    (out.loss_sum / max(n_total, 1)).backward()
    return out.loss_sum.detach()


@torch.no_grad()
def evaluate(model, batches, device) -> float:
    """Mean loss over every target token of `batches`."""
    was_training = model.training
    model.eval()
    total = count = 0  # device tensors after the first batch: one host sync at the end, not two per batch
    for b in batches:
        b = _to(b, device)
        out = model(b["input_ids"], labels=b["labels"], position_ids=b.get("position_ids"), doc_ids=b.get("doc_ids"))
        total, count = total + out.loss_sum.double(), count + out.n_tokens
    model.train(was_training)
    if not batches:
        return 0.0
    return total.item() / max(count.item(), 1)


def _peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # the process' peak resident set (Linux reports KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _optimizer(params, cfg: TrainConfig, device):
    # torch's fused AdamW: one kernel for all parameters (CUDA; the CPU has a fused implementation too)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                             fused=device.type in ("cuda", "cpu"))


def train(model, tokenizer, data, config: Optional[TrainConfig] = None, eval_data=None,
          on_step: Optional[Callable[[dict], None]] = None, **overrides) -> TrainResult:
    """Train LoRA adapters of `model` on `data` (a JSONL path, an iterable of records, or a prepared Dataset).

    The model gets adapters from config.lora unless it has some already. eval_data: held-out records (else
    config.eval_fraction of data). on_step(metrics) is called after every optimizer step. Writes the adapter to
    <output_dir>/adapter (PEFT format) and metrics to <output_dir>/metrics.jsonl."""
    cfg = config or TrainConfig()
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)

    # ---- setup -------------------------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    if getattr(model, "lora_config", None) is None:
        lora = cfg.lora if cfg.lora.seed is not None else dataclasses.replace(cfg.lora, seed=cfg.seed)
        apply_lora(model, lora)
    check_peft_exportable(model, "train")  # the adapter is written in PEFT format (whole fused groups): refuse now
    device = next(model.parameters()).device
    os.makedirs(cfg.output_dir, exist_ok=True)

    def load(source):
        if isinstance(source, Dataset):
            return source
        return prepare(source, tokenizer, cfg.max_seq_length, cfg.loss_on, cfg.on_error, cfg.on_long)

    dataset = load(data)
    if eval_data is not None:
        held_out = load(eval_data)
        train_ex, eval_ex = dataset.examples, held_out.examples
        _report(held_out, "eval data")
    else:
        train_ex, eval_ex = split(dataset, cfg.eval_fraction, cfg.seed)
    _report(dataset, "data")
    vocab = getattr(model.config, "vocab_size", None)
    too_big = [e.where for e in train_ex + eval_ex if vocab is not None and max(e.input_ids) >= vocab]
    if too_big:  # found now rather than as a NaN loss (or a device assert) at some step
        raise DataError(f"token ids beyond the model's vocabulary ({vocab}) in {', '.join(too_big[:10])}: "
                        f"is this the model's own tokenizer?")
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0

    def batches_of(epoch):
        return epoch_batches(train_ex, epoch, cfg.seed, cfg.packing, cfg.batch_size, cfg.max_seq_length, pad_id)

    eval_batches = epoch_batches(eval_ex, 0, cfg.seed, cfg.packing, cfg.batch_size, cfg.max_seq_length, pad_id,
                                 shuffle=False) if eval_ex else []
    epoch_plan = batches_of(0)
    max_steps = cfg.max_steps
    if cfg.num_epochs > 0:
        max_steps = max(1, math.ceil(cfg.num_epochs * len(epoch_plan) / cfg.grad_accum))

    named = trainable_parameters(model)
    params = list(named.values())
    if not params:
        raise ValueError("nothing to train: the model has no trainable parameters")
    optimizer = _optimizer(params, cfg, device)
    hook = None
    if cfg.checkpointing != "off":
        hook = enable_checkpointing(model, cfg.checkpointing, cfg.checkpoint_budget_gib or None)

    step, epoch, position = 0, 0, 0  # position: index of the next micro-batch in this epoch's plan
    if cfg.resume:
        path = latest_checkpoint(cfg.output_dir)
        if path is None:
            print(f"hare train: no checkpoint in {cfg.output_dir}, starting from step 0", file=sys.stderr)
        else:
            state = load_checkpoint(path, model, optimizer)
            step, epoch, position = state["step"], state["epoch"], state["position"]
            if epoch != 0:
                epoch_plan = batches_of(epoch)
            print(f"hare train: resumed from {path} (step {step})", file=sys.stderr)

    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    _restart_metrics(metrics_path, step)
    losses, eval_losses = [], []
    tokens_seen, t_start = 0, time.time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_steps, initial=step, desc="train", dynamic_ncols=True)
    print(f"hare train: {dataset.summary()}; {len(train_ex)} train / {len(eval_ex)} eval examples; "
          f"{len(epoch_plan)} micro-batches per epoch; {max_steps} steps; "
          f"{sum(p.numel() for p in params):,} trainable parameters", file=sys.stderr)

    # ---- the loop ----------------------------------------------------------------------------------------------
    model.train()
    while step < max_steps:
        t0 = time.time()
        micro = []
        while len(micro) < cfg.grad_accum:  # the next grad_accum micro-batches, across epoch boundaries
            if position == len(epoch_plan):
                epoch, position = epoch + 1, 0
                epoch_plan = batches_of(epoch)
            micro.append(epoch_plan[position])
            position += 1
        n_total = sum(n_targets(b) for b in micro)
        loss_sum = torch.zeros((), device=device)
        for b in micro:
            loss_sum += micro_step(model, _to(b, device), n_total)
        if cfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params
                                                              if p.grad is not None]))
        lr = lr_at(step, cfg, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        loss_sum, grad_norm = torch.stack([loss_sum, grad_norm.float()]).tolist()  # the step's one host sync
        loss = loss_sum / max(n_total, 1)
        losses.append(loss)
        n_tok = sum(b["input_ids"].numel() for b in micro)
        tokens_seen += n_tok
        m = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
             "tokens": n_tok, "target_tokens": n_total, "tokens_per_s": n_tok / max(time.time() - t0, 1e-9),
             "peak_mem_gb": _peak_memory_gb(device)}
        if eval_batches and cfg.eval_every and step % cfg.eval_every == 0 and step < max_steps:
            m["eval_loss"] = evaluate(model, eval_batches, device)
            eval_losses.append((step, m["eval_loss"]))
        if step % cfg.log_every == 0 or step == max_steps or "eval_loss" in m:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(m) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{m['grad_norm']:.2f}",
                            tok_s=f"{m['tokens_per_s']:.0f}", mem=f"{m['peak_mem_gb']:.2f}G", refresh=False)
        if cfg.save_every and step % cfg.save_every == 0:
            save_checkpoint(cfg.output_dir, model, optimizer,
                            {"step": step, "epoch": epoch, "position": position, "config": _jsonable(cfg)},
                            keep=cfg.keep_checkpoints or None)
        if on_step is not None:
            on_step(m)

    # ---- the end -----------------------------------------------------------------------------------------------
    if bar is not None:
        bar.close()
    if eval_batches:
        final = evaluate(model, eval_batches, device)
        eval_losses.append((step, final))
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "eval_loss": final}) + "\n")
    if hook is not None:
        if hasattr(hook, "report"):
            print(f"hare train: {hook.report()}", file=sys.stderr)
        disable_checkpointing(model)
    model.eval()
    adapter_dir = save_adapter(model, os.path.join(cfg.output_dir, "adapter"),
                               getattr(model.config, "hf", {}).get("_name_or_path"))
    plot_losses(metrics_path, os.path.join(cfg.output_dir, "loss_curve.png"))
    return TrainResult(step, losses, eval_losses, tokens_seen, time.time() - t_start, adapter_dir, dataset.summary())


def _report(dataset, name):
    """Every skipped or truncated record, by line, on stderr (the run goes on: that was the policy asked for)."""
    for where, why in dataset.skipped[:20]:
        print(f"hare train: {name}: skipped {why if why.startswith(where) else f'{where}: {why}'}", file=sys.stderr)
    if len(dataset.skipped) > 20:
        print(f"hare train: {name}: ... {len(dataset.skipped) - 20} more skipped", file=sys.stderr)
    if dataset.truncated:
        shown = ", ".join(dataset.truncated[:20]) + (" ..." if len(dataset.truncated) > 20 else "")
        print(f"hare train: {name}: {len(dataset.truncated)} examples truncated to max_seq_length: {shown}",
              file=sys.stderr)


def _restart_metrics(path, step):
    """A fresh run starts an empty metrics file; a resumed one keeps the rows up to its checkpoint's step (rows
    the interrupted run wrote after it are replaced by the resumed run's)."""
    rows = []
    if step > 0 and os.path.isfile(path):
        rows = [line for line in open(path, encoding="utf-8") if json.loads(line).get("step", 0) <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(rows)


def _jsonable(cfg):
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def plot_losses(metrics_path, out_png) -> Optional[str]:
    """loss_curve.png from metrics.jsonl when matplotlib is installed (`pip install hare[plot]`)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("hare train: matplotlib is not installed, no loss_curve.png (pip install 'hare[plot]')",
              file=sys.stderr)
        return None
    rows = [json.loads(line) for line in open(metrics_path, encoding="utf-8")]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train")
    if eval_rows:
        ax.plot([r["step"] for r in eval_rows], [r["eval_loss"] for r in eval_rows], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


# ---------------------------------------------------------------------------------------------------------------
# Typed command-line overrides: --key=value / --key value, --lora.r=8; unknown keys are errors
# ---------------------------------------------------------------------------------------------------------------

def _convert(name, typ, default, text):
    if typ is bool or isinstance(default, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name}: expected true/false, got {text!r}")
    if isinstance(default, tuple):
        items = [t for t in text.split(",") if t]
        kind = type(default[0]) if default else str
        return tuple(_convert(name, kind, kind(), t) for t in items)
    if default is None:  # Optional[X]: "none", or the text as X
        if text.lower() == "none":
            return None
        kinds = [t for t in typing.get_args(typ) if t is not type(None)] or [str]
        typ, default = kinds[0], kinds[0]()
    try:
        return type(default)(text)
    except ValueError:
        raise ValueError(f"--{name}: expected {type(default).__name__}, got {text!r}") from None


def parse_overrides(args, cls=TrainConfig) -> dict:
    """['--lr=1e-4', '--max_steps', '50', '--lora.r=8'] -> {'lr': 1e-4, 'max_steps': 50, 'lora': {'r': 8}}.
    Dashes and underscores are interchangeable in names."""
    out = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r} (options are --key=value)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"--{key}: missing value")
            value = args[i + 1]
            i += 1
        i += 1
        key = key.replace("-", "_")
        target, owner, name = out, cls, key
        if "." in key:
            head, name = key.split(".", 1)
            sub = {f.name: f for f in dataclasses.fields(cls)}.get(head)
            if sub is None or not dataclasses.is_dataclass(sub.default_factory() if sub.default_factory
                                                           is not dataclasses.MISSING else None):
                raise ValueError(f"unknown option --{key}")
            owner = type(sub.default_factory())
            target = out.setdefault(head, {})
        fields_ = {f.name: f for f in dataclasses.fields(owner)}
        if name not in fields_ or dataclasses.is_dataclass(_default(fields_[name])):
            known = sorted(n for n, f in fields_.items() if not dataclasses.is_dataclass(_default(f)))
            raise ValueError(f"unknown option --{key}; known: {', '.join(known)}")
        f = fields_[name]
        target[name] = _convert(key, f.type, _default(f), value)
    return out


def _default(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def config_from_args(args) -> TrainConfig:
    values = parse_overrides(args)
    lora = values.pop("lora", {})
    return TrainConfig(**values, lora=LoRAConfig(**lora))
