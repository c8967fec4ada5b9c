"""Adapters in PEFT's format, and training checkpoints that a crash cannot corrupt.

PEFT adapter directory (what `peft.PeftModel.from_pretrained` reads and `save_pretrained` writes):
  adapter_config.json         {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout", "target_modules",
                               "use_rslora", "modules_to_save", "bias": "none", ...}
  adapter_model.safetensors   base_model.model.<module path>.lora_A.weight  (r, in)
                              base_model.model.<module path>.lora_B.weight  (out, r)
                              base_model.model.<module path>.weight        (modules_to_save: embeddings, head)
(peft/utils/save_and_load.py get_peft_model_state_dict drops the adapter name "default" from the keys, and
PeftModel adds the "base_model.model." prefix.) hare's module paths are Hugging Face's, so the keys are hare's
parameter names with that prefix.

Training checkpoint, one directory per step under <output_dir>/checkpoints/:
  step-000100/adapter_config.json, adapter_model.safetensors   the adapter (loadable by peft as it is)
  step-000100/optimizer.safetensors   "state.<i>.<key>": optimizer state of trainable parameter i
  step-000100/rng.safetensors         torch CPU (and CUDA) generator states
  step-000100/trainer_state.json      step, data position, parameter names, the config, anything json-able
  latest                              the name of the newest complete checkpoint
No pickle anywhere: tensors go to safetensors, the rest to JSON.

Atomicity: a checkpoint is written into a temporary directory (".step-000100.tmp-<pid>"), every file fsync'ed,
then renamed to its final name (a rename is atomic on POSIX), and only then is `latest` replaced (temp file +
os.replace). A process killed at any point leaves `latest` naming a complete checkpoint; the debris (temporary
directories) is ignored by readers and removed by the next save.
"""
import json
import os
import re
import shutil
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.errors import CheckpointError
from .lora import ALL_PROJECTIONS, LoRAConfig, apply_lora, lora_modules

PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LATEST = "latest"


# ---------------------------------------------------------------------------------------------------------------
# Small atomic writers
# ---------------------------------------------------------------------------------------------------------------

def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path, obj):
    """Write JSON under a temporary name in the same directory, fsync, rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_tensors(path, tensors, metadata=None):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    _fsync(tmp)
    os.replace(tmp, path)


def _read_tensors(path):
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------------------------
# PEFT adapters
# ---------------------------------------------------------------------------------------------------------------

def _modules_to_save(cfg: LoRAConfig):
    names = (["embed_tokens"] if cfg.train_embeddings else []) + (["lm_head"] if cfg.train_lm_head else [])
    return names or None


def adapter_state_dict(model) -> dict:
    """{PEFT key: tensor} of the adapter: every LoRA A/B, plus fully trained embeddings / lm_head."""
    cfg = _config_of(model)
    out = {}
    for path, m in lora_modules(model):
        out[f"{PREFIX}{path}.lora_A.weight"] = m.lora_A.weight
        out[f"{PREFIX}{path}.lora_B.weight"] = m.lora_B.weight
    if cfg.train_embeddings:
        out[f"{PREFIX}model.embed_tokens.weight"] = model.model.embed_tokens.weight
    if cfg.train_lm_head:
        out[f"{PREFIX}lm_head.weight"] = model.lm_head.weight
    return out


def _config_of(model) -> LoRAConfig:
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("the model has no LoRA adapters (call hare.apply_lora or hare.load_adapter first)")
    return cfg


def adapter_config_json(cfg: LoRAConfig, base_model_name_or_path=None) -> dict:
    """PEFT's LoraConfig fields for this adapter (the ones peft reads; the others keep peft's defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.targets),
        "use_rslora": cfg.rslora,
        "modules_to_save": _modules_to_save(cfg),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(model, out_dir, base_model_name_or_path=None):
    """Write the model's adapter in PEFT format (adapter_config.json + adapter_model.safetensors), each file
    atomically. Returns out_dir."""
    cfg = _config_of(model)
    check_peft_exportable(model, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _write_tensors(os.path.join(out_dir, ADAPTER_WEIGHTS), adapter_state_dict(model), metadata={"format": "pt"})
    _write_json(os.path.join(out_dir, ADAPTER_CONFIG), adapter_config_json(cfg, base_model_name_or_path))
    return out_dir


def check_peft_exportable(model, where):
    """Refuse adapters on modules that the family's checkpoints fuse (Phi-3's q/k/v -> qkv_proj, gate/up ->
    gate_up_proj): PEFT on the Hugging Face model would silently drop them."""
    from .lora import _fused_names

    split = {part: fused for fused, parts in _fused_names(model).items() for part in parts}
    lost = sorted(t for t in _config_of(model).targets if t in split)
    if lost:
        raise CheckpointError(
            f"{where}: adapters on {lost} cannot be written in PEFT format: this family's checkpoints fuse them "
            f"({', '.join(sorted({split[t] for t in lost}))}), and PEFT would silently drop them. Target the "
            f"other projections (e.g. o_proj, down_proj).")


def read_adapter_config(adapter_dir) -> LoRAConfig:
    """LoRAConfig from a PEFT adapter_config.json; PEFT features hare does not implement are refused by name."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise CheckpointError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    c = _read_json(path)
    if not isinstance(c, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if c.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {c.get('peft_type')!r}: hare reads LoRA adapters only")
    # PEFT options that change the math; each may be absent or at its neutral value(s)
    neutral = {"use_dora": (False, None), "fan_in_fan_out": (False, None), "bias": ("none", None),
               "layers_to_transform": (None, []), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
               "use_qalora": (False, None), "target_parameters": (None, []), "trainable_token_indices": (None,),
               "layer_replication": (None,), "lora_bias": (False, None), "exclude_modules": (None, []),
               "alora_invocation_tokens": (None,), "use_bdlora": (None, False), "arrow_config": (None,),
               "kasa_config": (None,), "monteclora_config": (None,), "velora_config": (None,)}
    bad = [f"{k}={c[k]!r}" for k, ok in neutral.items() if k in c and c[k] not in ok]
    if bad:
        raise CheckpointError(f"{path}: PEFT options hare does not implement: {', '.join(bad)}")
    targets = c.get("target_modules")
    if targets == "all-linear":
        targets = ALL_PROJECTIONS
    elif isinstance(targets, str):
        if not re.fullmatch(r"\w+", targets):
            raise CheckpointError(f"{path}: target_modules as a regular expression ({targets!r}) is not supported; "
                                  f"list the module names")
        targets = (targets,)
    if not targets:
        raise CheckpointError(f"{path}: target_modules is missing or empty")
    saved = c.get("modules_to_save") or []
    extra = sorted(set(saved) - {"embed_tokens", "lm_head"})
    if extra:
        raise CheckpointError(f"{path}: modules_to_save {extra}: hare trains only embed_tokens and lm_head fully")
    try:
        return LoRAConfig(r=int(c["r"]), alpha=float(c.get("lora_alpha", 8)), dropout=float(c.get("lora_dropout", 0.0)),
                          targets=tuple(sorted(targets)), rslora=bool(c.get("use_rslora", False)),
                          train_embeddings="embed_tokens" in saved, train_lm_head="lm_head" in saved)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad LoRA settings ({type(e).__name__}: {e})") from None


def load_adapter(model, adapter_dir, backend=None):
    """Load a PEFT LoRA adapter (written by hare or by peft) into `model`, in place.

    A model without adapters gets them (apply_lora with the file's settings); a model that has them must have
    the same ones. Loading is strict: every tensor of the file fills one adapter parameter and every adapter
    parameter is filled, else CheckpointError lists the differences. Returns the model."""
    cfg = read_adapter_config(adapter_dir)
    if getattr(model, "lora_config", None) is None:
        apply_lora(model, cfg, backend=backend)
    else:
        have = model.lora_config
        mine = (have.r, set(have.targets), have.train_embeddings, have.train_lm_head)
        theirs = (cfg.r, set(cfg.targets), cfg.train_embeddings, cfg.train_lm_head)
        if mine != theirs:
            raise CheckpointError(f"{adapter_dir}: adapter (r, targets, embeddings, lm_head) = {theirs} does not "
                                  f"match the model's adapters {mine}")
    load_adapter_weights(model, os.path.join(adapter_dir, ADAPTER_WEIGHTS))
    return model


@torch.no_grad()
def load_adapter_weights(model, path):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (PEFT adapters are read from safetensors only)")
    tensors = _read_tensors(path)
    targets = adapter_state_dict(model)
    unexpected = sorted(set(tensors) - set(targets))
    missing = sorted(set(targets) - set(tensors))
    misshaped = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(targets[k].shape)}"
                 for k in sorted(set(tensors) & set(targets)) if tensors[k].shape != targets[k].shape]
    if unexpected or missing or misshaped:
        parts = [f"{path}: adapter does not fit the model"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                parts.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(parts))
    for k, t in tensors.items():
        targets[k].copy_(t)


# ---------------------------------------------------------------------------------------------------------------
# Training checkpoints
# ---------------------------------------------------------------------------------------------------------------

def _rng_tensors():
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda.{i}"] = s
    return out


def _set_rng(tensors):
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("torch_cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v for _, v in cuda])


def _optimizer_tensors(optimizer):
    """Optimizer state as flat tensors "state.<i>.<key>" (i = the parameter's index in the optimizer, which
    the trainer fills in named_parameters order). Non-tensor entries become 0-dim tensors."""
    out = {}
    for i, (key, state) in enumerate(sorted(optimizer.state_dict()["state"].items())):
        for k, v in state.items():
            out[f"state.{key}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(output_dir, model, optimizer, state: dict, keep: int = None, base_model_name_or_path=None):
    """Write a resumable checkpoint of `state["step"]` atomically; returns its directory.

    state: json-able trainer state (step, data position, config, ...). keep: keep only the newest `keep`
    checkpoints (None: all)."""
    root = os.path.join(output_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    _remove_debris(root)
    name = checkpoint_name(state["step"])
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".{name}.tmp-{os.getpid()}")
    os.makedirs(tmp)
    save_adapter(model, tmp, base_model_name_or_path)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    _write_tensors(os.path.join(tmp, "optimizer.safetensors"), _optimizer_tensors(optimizer))
    _write_tensors(os.path.join(tmp, "rng.safetensors"), _rng_tensors())
    _write_json(os.path.join(tmp, "trainer_state.json"), {**state, "trainable_parameters": names})
    _fsync(tmp)
    if os.path.exists(final):  # re-saving the same step: move the old copy aside first (rename is atomic)
        old = os.path.join(root, f".{name}.old-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync(root)
    _write_json(os.path.join(root, LATEST), {"checkpoint": name})
    if keep is not None:
        done = sorted(d for d in os.listdir(root) if re.fullmatch(r"step-\d+", d))
        for d in done[:-keep]:
            if d != name:
                shutil.rmtree(os.path.join(root, d))
    return final


def _remove_debris(root):
    """Temporary directories left by a process killed mid-save (their own pid is gone or it is us)."""
    for d in os.listdir(root):
        if re.fullmatch(r"\.step-\d+\.(tmp|old)-\d+", d):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def latest_checkpoint(output_dir):
    """Directory of the newest complete checkpoint under output_dir (or output_dir itself if it is one), or
    None when there is none."""
    if os.path.isfile(os.path.join(output_dir, "trainer_state.json")):
        return output_dir
    root = os.path.join(output_dir, "checkpoints")
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    name = _read_json(pointer).get("checkpoint")
    path = os.path.join(root, str(name))
    if not re.fullmatch(r"step-\d+", str(name)) or not os.path.isdir(path):
        raise CheckpointError(f"{pointer}: names {name!r}, which is not a checkpoint directory")
    return path


def load_checkpoint(path, model, optimizer) -> dict:
    """Restore adapters, optimizer state and RNG states from a checkpoint directory; returns its trainer state
    (step, data position, ...). The model must already carry the same adapters (apply_lora)."""
    state = _read_json(os.path.join(path, "trainer_state.json"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if state.get("trainable_parameters") != names:
        raise CheckpointError(f"{path}: the checkpoint's trainable parameters differ from the model's "
                              f"({len(state.get('trainable_parameters') or [])} vs {len(names)})")
    load_adapter_weights(model, os.path.join(path, ADAPTER_WEIGHTS))
    flat = _read_tensors(os.path.join(path, "optimizer.safetensors"))
    per_param = {}
    for k, v in flat.items():
        _, i, key = k.split(".", 2)
        per_param.setdefault(int(i), {})[key] = v
    sd = optimizer.state_dict()
    n_params = sum(len(g["params"]) for g in sd["param_groups"])
    if any(i >= n_params for i in per_param):
        raise CheckpointError(f"{path}: optimizer state for {max(per_param) + 1} parameters, optimizer has {n_params}")
    sd["state"] = per_param
    optimizer.load_state_dict(sd)
    _set_rng(_read_tensors(os.path.join(path, "rng.safetensors")))
    return state
