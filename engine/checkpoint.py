"""Adapters in PEFT's format, and training checkpoints that a crash cannot corrupt.

PEFT adapter directory (what `peft.PeftModel.from_pretrained` reads and `save_pretrained` writes):
  adapter_config.json         {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout", "target_modules",
                               "use_rslora", "modules_to_save", "bias": "none", ...}
  adapter_model.safetensors   base_model.model.<module path>.lora_A.weight  (r, in)
                              base_model.model.<module path>.lora_B.weight  (out, r)
                              base_model.model.<module path>.weight        (modules_to_save: embeddings, head)
(peft/utils/save_and_load.py get_peft_model_state_dict drops the adapter name "default" from the keys, and
PeftModel adds the "base_model.model." prefix.) hare's module paths are Hugging Face's, so the keys are hare's
parameter names with that prefix, except on modules that the family's checkpoints fuse (Phi-3's qkv_proj,
gate_up_proj): there one fused adapter stands for the parts' (see "PEFT adapters" below).

Training checkpoint, one directory per step under <output_dir>/checkpoints/:
  step-000100/adapter_config.json, adapter_model.safetensors   the adapter (loadable by peft as it is)
  step-000100/optimizer.safetensors   "state.<i>.<key>": optimizer state of trainable parameter i
  step-000100/rng.safetensors         torch CPU (and CUDA) generator states
  step-000100/trainer_state.json      step, data position, parameter names, the config, anything json-able
  latest                              the name of the newest complete checkpoint
No pickle anywhere: tensors go to safetensors, the rest to JSON.

Atomicity: a checkpoint is written into a temporary directory (".step-000100.tmp-<pid>"), every file fsync'ed,
then renamed to its final name (a rename is atomic on POSIX), and only then is `latest` replaced (temp file
".tmp-<pid>-*" + os.replace). A process killed at any point leaves `latest` naming a complete checkpoint; the
debris (temporary directories and files) is ignored by readers and removed by the next save once its writer is
gone. Re-saving an existing step moves the old copy aside (".step-000100.old-<pid>") before the new one moves in;
a kill between the two renames leaves `latest` naming the aside copy's step, so readers fall back to the aside
copy, and the next save moves it back.
"""
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.errors import CheckpointError
from .lora import (ALL_PROJECTIONS, LoRAConfig, _fused_groups, apply_lora, lora_modules, lora_scale,
                   trainable_parameters)

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


def _temp_prefix():
    """Prefix of this process's temporary files: the pid tells a later save whether their writer is gone."""
    return f".tmp-{os.getpid()}-"


def _write_json(path, obj):
    """Write JSON under a temporary name in the same directory, fsync, rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=_temp_prefix(), suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_tensors(path, tensors, metadata=None):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=_temp_prefix(), suffix=".safetensors")
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
#
# Fused checkpoint modules (a family's SPLITS, e.g. Phi-3: self_attn.qkv_proj -> q_proj, k_proj, v_proj and
# mlp.gate_up_proj -> gate_proj, up_proj, rows in that order). PEFT on the Hugging Face model puts one adapter on
# the fused module (A_f: R x in, B_f: out_f x R, scale alpha_f / R); hare has one per part. Both ways are exact:
# - export (hare -> PEFT): the parts' adapters, rank r each, become one of rank n r with A_f = cat(A_1 .. A_n)
#   (rows) and B_f = block-diagonal(B_1 .. B_n): B_f A_f x = cat(B_1 A_1 x, .., B_n A_n x), each part's rows get
#   its own update. rank_pattern {fused: n r} and alpha_pattern {fused: n alpha} (rsLoRA: alpha sqrt(n)) keep
#   PEFT's scale alpha_f / R (alpha_f / sqrt(R)) equal to hare's alpha / r (alpha / sqrt(r)). Only a whole group
#   exports: a partial one (q_proj alone) is refused (check_peft_exportable).
# - import (PEFT -> hare), per fused module, with hare's rank r:
#   block-diagonal form: R = n r and every off-diagonal block of B_f is zero: part i gets rows i r .. (i+1) r of
#     A_f and the diagonal block (its rows, those columns) of B_f (the inverse of the export, bit for bit);
#   shared-A form: R = r: every part gets a copy of A_f and its rows of B_f: B_f A_f x split by rows is exactly
#     (B_f rows of part i) A_f x. (Dropout > 0: PEFT draws one mask for the fused module's input, hare one per
#     part; the same in expectation, not mask for mask.)
# The scale is unchanged in both forms, so hare's alpha is the one giving the file's scale at rank r.

def _modules_to_save(cfg: LoRAConfig):
    names = (["embed_tokens"] if cfg.train_embeddings else []) + (["lm_head"] if cfg.train_lm_head else [])
    return names or None


def _short(suffix):
    return suffix.rpartition(".")[2]


def _fused_alpha(alpha, n, rslora):
    """alpha_f of an n-part fused adapter of rank n r with the scale of (r, alpha): n alpha / (n r) = alpha / r;
    rsLoRA: alpha sqrt(n) / sqrt(n r) = alpha / sqrt(r)."""
    return alpha * math.sqrt(n) if rslora else alpha * n


def check_peft_exportable(model, where):
    """Refuse part of a fused group as targets (e.g. Phi-3's q_proj without k_proj and v_proj): PEFT has one
    adapter on the fused module (qkv_proj), and hare exports a group only whole (see above)."""
    targets = set(_config_of(model).targets)
    partial = [(fused, parts) for fused, parts in _fused_groups(model)
               if 0 < len(targets & {_short(p) for p in parts}) < len(parts)]
    if partial:
        names = "; ".join(f"{', '.join(_short(p) for p in parts)} (fused {_short(fused)})" for fused, parts in partial)
        raise CheckpointError(
            f"{where}: targets {sorted(targets)} take part of a fused module: this family's checkpoints fuse {names}, "
            f"PEFT puts one adapter on the fused module, and hare exports only whole groups: target all of them or "
            f"none.")


def adapter_state_dict(model) -> dict:
    """{PEFT key: tensor} of the adapter: every LoRA A/B (parts of a fused module fused, see above), plus fully
    trained embeddings / lm_head. Unfused entries are the parameters themselves; fused ones are new tensors."""
    out = _own_state_dict(model)
    mods = dict(lora_modules(model))
    for fused, parts in _fused_groups(model):
        for path in sorted(p for p in mods if p.endswith("." + parts[0]) or p == parts[0]):
            prefix = path[:len(path) - len(parts[0])]
            members = [mods.get(prefix + p) for p in parts]
            if any(m is None for m in members):
                raise CheckpointError(f"{prefix}{fused}: adapters on only some of its parts {list(parts)}")
            for p in parts:
                del out[f"{PREFIX}{prefix}{p}.lora_A.weight"], out[f"{PREFIX}{prefix}{p}.lora_B.weight"]
            out[f"{PREFIX}{prefix}{fused}.lora_A.weight"] = torch.cat([m.lora_A.weight.detach() for m in members])
            out[f"{PREFIX}{prefix}{fused}.lora_B.weight"] = torch.block_diag(*[m.lora_B.weight.detach()
                                                                             for m in members])
    return out


def _own_state_dict(model) -> dict:
    """{PEFT-style key of hare's own modules: parameter} (no fusing): what an adapter file fills."""
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


def adapter_config_json(cfg: LoRAConfig, base_model_name_or_path=None, fused_groups=()) -> dict:
    """PEFT's LoraConfig fields for this adapter (the ones peft reads; the others keep peft's defaults).
    fused_groups: _fused_groups(model); each whole targeted group is named by its fused module, with its rank
    and alpha in rank_pattern / alpha_pattern (see above)."""
    targets, rank_pattern, alpha_pattern = set(cfg.targets), {}, {}
    for fused, parts in fused_groups:
        shorts = {_short(p) for p in parts}
        if shorts <= targets:
            targets = (targets - shorts) | {_short(fused)}
            rank_pattern[_short(fused)] = len(parts) * cfg.r
            alpha_pattern[_short(fused)] = _fused_alpha(cfg.alpha, len(parts), cfg.rslora)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(targets),
        "use_rslora": cfg.rslora,
        "modules_to_save": _modules_to_save(cfg),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }


def save_adapter(model, out_dir, base_model_name_or_path=None):
    """Write the model's adapter in PEFT format (adapter_config.json + adapter_model.safetensors), each file
    atomically. Adapters on the parts of a fused checkpoint module are written as one on the fused module
    (see above). Returns out_dir."""
    cfg = _config_of(model)
    check_peft_exportable(model, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _write_tensors(os.path.join(out_dir, ADAPTER_WEIGHTS), adapter_state_dict(model), metadata={"format": "pt"})
    _write_json(os.path.join(out_dir, ADAPTER_CONFIG),
                adapter_config_json(cfg, base_model_name_or_path, _fused_groups(model)))
    return out_dir


def read_adapter_config(adapter_dir) -> LoRAConfig:
    """LoRAConfig from a PEFT adapter_config.json, as the file names it (targets may be fused modules; their
    rank_pattern / alpha_pattern are applied by load_adapter); PEFT features hare does not implement are
    refused by name."""
    return _read_adapter_config(adapter_dir)[0]


def _read_adapter_config(adapter_dir):
    """(LoRAConfig, rank_pattern, alpha_pattern, path) of a PEFT adapter_config.json."""
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
               "layers_to_transform": (None, []),
               "use_qalora": (False, None), "target_parameters": (None, []), "trainable_token_indices": (None,),
               "layer_replication": (None,), "lora_bias": (False, None), "exclude_modules": (None, []),
               "alora_invocation_tokens": (None,), "use_bdlora": (None, False), "arrow_config": (None,),
               "kasa_config": (None,), "monteclora_config": (None,), "velora_config": (None,)}
    bad = [f"{k}={c[k]!r}" for k, ok in neutral.items() if k in c and c[k] not in ok]
    patterns = {}
    for k in ("rank_pattern", "alpha_pattern"):  # per-module rank / alpha: plain module names, numbers
        p = c.get(k) or {}
        if not isinstance(p, dict) or not all(re.fullmatch(r"\w+", str(n)) and isinstance(v, (int, float))
                                              and not isinstance(v, bool) for n, v in p.items()):
            bad.append(f"{k}={c[k]!r}")
        patterns[k] = p
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
        cfg = LoRAConfig(r=int(c["r"]), alpha=float(c.get("lora_alpha", 8)), dropout=float(c.get("lora_dropout", 0.0)),
                         targets=tuple(sorted(targets)), rslora=bool(c.get("use_rslora", False)),
                         train_embeddings="embed_tokens" in saved, train_lm_head="lm_head" in saved)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad LoRA settings ({type(e).__name__}: {e})") from None
    return cfg, patterns["rank_pattern"], patterns["alpha_pattern"], path


def _fused_instances(model, tensors):
    """[(fused suffix, parts, A key, B key, module prefix, row counts)] for every fused-module adapter in
    `tensors` (PEFT keys); row counts of the parts come from the model's modules."""
    out = []
    for fused, parts in _fused_groups(model):
        tail = f".{fused}.lora_A.weight"
        for key in sorted(k for k in tensors if k.endswith(tail)):
            base = key[:-len(".lora_A.weight")]
            prefix = base[len(PREFIX):len(base) - len(fused)]
            try:
                sizes = [model.get_submodule(prefix + p).out_features for p in parts]
            except AttributeError:
                continue  # no such module: the strict check names the key
            out.append((fused, parts, key, base + ".lora_B.weight", prefix, sizes))
    return out


def _block_diagonal(B, sizes, r):
    """Is B (sum(sizes) x n r) zero outside the blocks (rows of part i, columns i r .. (i+1) r)?"""
    if B.shape != (sum(sizes), len(sizes) * r):
        return False
    for i, rows in enumerate(torch.split(B, sizes)):
        for j in range(len(sizes)):
            if j != i and rows[:, j * r:(j + 1) * r].any():
                return False
    return True


def _unfuse(model, tensors, r, where):
    """`tensors` with each fused module's A/B replaced by its parts' of rank r (block-diagonal or shared-A
    form, see above); CheckpointError when neither fits."""
    out = dict(tensors)
    for fused, parts, ka, kb, prefix, sizes in _fused_instances(model, tensors):
        if kb not in tensors:
            continue  # the strict check names it
        A, B = tensors[ka], tensors[kb]
        n = len(parts)
        if A.shape[0] == n * r and _block_diagonal(B, sizes, r):
            pieces = [(A[i * r:(i + 1) * r], rows[:, i * r:(i + 1) * r])
                      for i, rows in enumerate(torch.split(B, sizes))]
        elif A.shape[0] == r and B.shape == (sum(sizes), r):
            pieces = [(A, rows) for rows in torch.split(B, sizes)]
        else:
            raise CheckpointError(
                f"{where}: {prefix}{fused}: adapter A {tuple(A.shape)}, B {tuple(B.shape)} fits neither rank {r} "
                f"on each of {', '.join(_short(p) for p in parts)} (rows {sizes}) shared-A, nor rank {n}x{r} "
                f"block-diagonal (zero off-diagonal blocks)")
        del out[ka], out[kb]
        for p, (a, b) in zip(parts, pieces):
            for ab, t in (("lora_A", a), ("lora_B", b)):
                key = f"{PREFIX}{prefix}{p}.{ab}.weight"
                if key in tensors:
                    raise CheckpointError(f"{where}: {key} and the fused {prefix}{fused} both given")
                out[key] = t.contiguous().clone()
    return out


def _check_patterns(model, cfg, rank_pattern, alpha_pattern, where):
    groups = {_short(f) for f, _ in _fused_groups(model)}
    for name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if set(pattern) - (groups & set(cfg.targets)):
            raise CheckpointError(
                f"{where}: {name}={pattern!r}: hare uses one rank and alpha for every module, and accepts "
                f"per-module values only on the fused modules it splits ({sorted(groups) or 'none here'}) "
                f"among the targets")


def _hare_config(model, cfg, rank_pattern, alpha_pattern, tensors, where) -> LoRAConfig:
    """hare's LoRAConfig for a PEFT adapter file's config on this model: fused targets replaced by their parts,
    one rank r for every module (the file's r when it fits), alpha giving the file's scale at r."""
    groups = {_short(f): (f, parts) for f, parts in _fused_groups(model)}
    fused = [t for t in cfg.targets if t in groups]
    if not fused:
        return cfg
    # every module must have the same scale: hare has one
    scales = {t: lora_scale(alpha_pattern.get(t, cfg.alpha), rank_pattern.get(t, cfg.r), cfg.rslora) for t in fused}
    if len(fused) < len(cfg.targets):
        scales = dict(scales, **{t: cfg.scale for t in cfg.targets if t not in groups})
    s = next(iter(scales.values()))
    if not all(math.isclose(v, s, rel_tol=1e-9) for v in scales.values()):
        raise CheckpointError(f"{where}: LoRA scales per module {scales}: hare uses one scale for every module")
    # the rank of the parts: the file's r, else (fused targets only) any rank every fused adapter fits
    options = None
    if len(fused) == len(cfg.targets):
        for f, parts, ka, kb, _, sizes in _fused_instances(model, tensors):
            if ka in tensors and kb in tensors:
                R, n = tensors[ka].shape[0], len(parts)
                mine = {R} | ({R // n} if R % n == 0 and _block_diagonal(tensors[kb], sizes, R // n) else set())
                options = mine if options is None else options & mine
    r = cfg.r if not options or cfg.r in options else min(options)
    alpha = cfg.alpha if math.isclose(cfg.scale, s, rel_tol=1e-9) and r == cfg.r else \
        (s * math.sqrt(r) if cfg.rslora else s * r)
    targets = sorted({p for t in cfg.targets for p in ([_short(q) for q in groups[t][1]] if t in groups else [t])})
    return dataclasses.replace(cfg, r=r, alpha=alpha, targets=tuple(targets))


def load_adapter(model, adapter_dir, backend=None):
    """Load a PEFT LoRA adapter (written by hare or by peft) into `model`, in place.

    A model without adapters gets them (apply_lora with the file's settings); a model that has them must have
    the same ones. An adapter on a fused checkpoint module (Phi-3's qkv_proj, gate_up_proj) becomes adapters on
    its parts (see above). Loading is strict: every tensor of the file fills one adapter parameter and every
    adapter parameter is filled, else CheckpointError lists the differences. Returns the model."""
    file_cfg, rank_pattern, alpha_pattern, where = _read_adapter_config(adapter_dir)
    _check_patterns(model, file_cfg, rank_pattern, alpha_pattern, where)
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    tensors = _read_adapter_tensors(path)
    cfg = _hare_config(model, file_cfg, rank_pattern, alpha_pattern, tensors, where)
    if getattr(model, "lora_config", None) is None:
        apply_lora(model, cfg, backend=backend)
    else:
        have = model.lora_config
        mine = (have.r, set(have.targets), have.train_embeddings, have.train_lm_head)
        theirs = (cfg.r, set(cfg.targets), cfg.train_embeddings, cfg.train_lm_head)
        if mine != theirs:
            raise CheckpointError(f"{adapter_dir}: adapter (r, targets, embeddings, lm_head) = {theirs} does not "
                                  f"match the model's adapters {mine}")
    _fill(model, _unfuse(model, tensors, model.lora_config.r, path), path)
    return model


def _read_adapter_tensors(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (PEFT adapters are read from safetensors only)")
    return _read_tensors(path)


def load_adapter_weights(model, path):
    """Fill the model's adapters from a PEFT adapter_model.safetensors (fused modules split, see above)."""
    tensors = _read_adapter_tensors(path)
    _fill(model, _unfuse(model, tensors, _config_of(model).r, path), path)


@torch.no_grad()
def _fill(model, tensors, path):
    targets = _own_state_dict(model)
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
    names = list(trainable_parameters(model))
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


# debris of a save: ".step-<n>.tmp-<pid>" / ".step-<n>.old-<pid>" directories, ".tmp-<pid>-*" files
_DEBRIS = re.compile(r"\.(step-\d+)\.(tmp|old)-(\d+)|\.tmp-(\d+)-.+")


def _writer_alive(pid):
    """Whether process `pid`, another one, may still be writing (this process saves one checkpoint at a time)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _remove_debris(root):
    """What a save killed midway left in `root`, once its process is gone (a live one may be saving now): temporary
    directories and files are removed; a copy moved aside for a re-save whose new copy never arrived is moved back
    (`latest` may name its step)."""
    for d in os.listdir(root):
        m = _DEBRIS.fullmatch(d)
        if m is None or _writer_alive(int(m.group(3) or m.group(4))):
            continue
        path = os.path.join(root, d)
        if m.group(2) == "old" and not os.path.exists(os.path.join(root, m.group(1))):
            os.rename(path, os.path.join(root, m.group(1)))
        elif os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


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
    if re.fullmatch(r"step-\d+", str(name)):
        if os.path.isdir(path):
            return path
        # a re-save of this step killed between moving the old copy aside and moving the new one in: the aside
        # copy is complete (save_checkpoint)
        aside = sorted(d for d in os.listdir(root) if (m := _DEBRIS.fullmatch(d)) and m.group(1, 2) == (name, "old"))
        if aside:
            return os.path.join(root, aside[-1])
    raise CheckpointError(f"{pointer}: names {name!r}, which is not a checkpoint directory")


def load_checkpoint(path, model, optimizer) -> dict:
    """Restore adapters, optimizer state and RNG states from a checkpoint directory; returns its trainer state
    (step, data position, ...). The model must already carry the same adapters (apply_lora)."""
    state = _read_json(os.path.join(path, "trainer_state.json"))
    names = list(trainable_parameters(model))
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
