"""Checkpoint I/O: resolve a local directory or hub id, build the model on the meta device, fill it shard by
shard with strict key accounting, and export it back to Hugging Face format.

Peak host memory while loading is the model plus one tensor: safetensors files are memory-mapped and each
tensor is copied to its device and dtype on its own.
"""
import json
import os
import re
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import load_config
from .decoder import CausalLM
from .errors import CheckpointError
from .registry import family_for

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _looks_local(path: str) -> bool:
    return (path.startswith((".", "/", "~")) or path.count("/") != 1 or os.sep != "/" and os.sep in path)


def resolve_checkpoint(path_or_id: str, revision: str = None) -> str:
    """A local checkpoint directory as is; otherwise a Hugging Face Hub id, downloaded (or found in the cache:
    HF_HUB_OFFLINE=1 is honoured by huggingface_hub) at `revision` (a branch, tag or commit hash)."""
    path = os.path.expanduser(str(path_or_id))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        hint = " (a GGUF file: convert it first with `hare convert FILE OUT_DIR`)" if path.endswith(".gguf") else ""
        raise CheckpointError(f"{path}: expected a checkpoint directory, found a file{hint}")
    if _looks_local(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
    try:
        return snapshot_download(path, revision=revision, allow_patterns=patterns)
    except HFValidationError:
        raise CheckpointError(f"{path}: no such checkpoint directory, and not a valid hub id") from None
    except Exception as e:  # network, auth, offline-cache miss: one clear message, the cause attached
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "offline mode (HF_HUB_OFFLINE) and not in the local cache" if offline else "the hub could not be reached or refused"
        raise CheckpointError(f"{path}@{revision or 'main'}: cannot fetch from the Hugging Face Hub: {why}: "
                              f"{type(e).__name__}: {e}") from e


def checkpoint_files(directory: str) -> list:
    """The safetensors files of a checkpoint, each checked to exist inside the directory."""
    index = os.path.join(directory, INDEX)
    single = os.path.join(directory, SINGLE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None
        root = os.path.realpath(directory)
        bad = [n for n in names if not isinstance(n, str) or os.path.isabs(n) or os.path.basename(n) != n
               or os.path.dirname(os.path.realpath(os.path.join(root, n))) != root]
        if bad:  # refused before anything is opened
            raise CheckpointError(f"{index}: shard names outside the checkpoint directory refused: {bad}")
        paths = [os.path.join(directory, n) for n in names]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise CheckpointError(f"{index}: names shards that do not exist: {missing}")
        return paths
    if os.path.isfile(single):
        return [single]
    if any(n.endswith(".bin") for n in os.listdir(directory)):
        raise CheckpointError(f"{directory}: only pickle (.bin) weights found; hare reads safetensors only")
    raise CheckpointError(f"{directory}: no {SINGLE} or {INDEX}")


def resolve_dtype(dtype, cfg):
    if dtype is None:
        dtype = cfg.torch_dtype or "float32"
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    return dtype


def load_model(path_or_id, dtype=None, device=None, revision=None, load_in_4bit=False) -> CausalLM:
    """Load a Hugging Face checkpoint (local directory or hub id) into hare's decoder.

    dtype: torch dtype or name; None = the checkpoint's torch_dtype (float32 when it names none).
    device: where the weights go (default: CPU). Base weights are frozen (requires_grad=False).
    load_in_4bit: quantize every linear layer of the decoder blocks to NF4 (QLoRA's format, double quantization,
    blocks of 64) while the shards stream in; embeddings, norms and lm_head stay in `dtype`. A pre-quantized
    bitsandbytes 4-bit checkpoint (config.json `quantization_config`) loads in 4-bit whatever this flag says."""
    directory = resolve_checkpoint(path_or_id, revision)
    cfg = load_config(directory)
    dtype = resolve_dtype(dtype, cfg)
    device = torch.device(device or "cpu")
    prequantized = bnb_quantization(cfg.hf, os.path.join(directory, "config.json"))
    with torch.device("meta"):
        model = CausalLM(cfg)
    fill(model, directory, dtype, device, quantize=load_in_4bit or prequantized)
    return model


# The bitsandbytes 4-bit tensor suffixes that travel with `P.weight` (transformers' save format).
BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")


def bnb_quantization(hf: dict, where: str) -> bool:
    """True for a bitsandbytes NF4 checkpoint, False for a plain one; refuses every other quantization, so that
    packed bytes are never misread (FP4 codes look exactly like NF4 codes)."""
    q = hf.get("quantization_config")
    if not q:
        return False
    method = q.get("quant_method")
    if method != "bitsandbytes":
        raise CheckpointError(f"{where}: quantization_config.quant_method {method!r} is not supported "
                              f"(hare reads bitsandbytes NF4 4-bit checkpoints)")
    if q.get("load_in_8bit") or not q.get("load_in_4bit"):
        raise CheckpointError(f"{where}: bitsandbytes 8-bit checkpoints are not supported (only 4-bit NF4)")
    kind = q.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' default is fp4
    if kind != "nf4":
        raise CheckpointError(f"{where}: quantization_config.bnb_4bit_quant_type {kind!r} is not supported "
                              f"(only 'nf4'); refusing rather than misreading the packed weights")
    return True


def quantized_linears(model) -> set:
    """Names of the weights that 4-bit loading quantizes: every linear layer inside the decoder blocks."""
    return {f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("model.layers.")}


def fill(model: nn.Module, directory: str, dtype, device, quantize=False):
    """Fill every parameter of a meta-device model from the checkpoint's shards; strict accounting.
    quantize: 16-bit weights of the decoder's linear layers become NF4 as they arrive (one 16-bit tensor on the
    device at a time), and bitsandbytes 4-bit tensors (pre-quantized checkpoints) load as they are."""
    cfg = model.config
    family = family_for(cfg.model_type)
    ignored = [re.compile(p) for p in family.IGNORED_KEYS]
    if cfg.tie_word_embeddings:  # some tied checkpoints also store the head: it is the embedding, skip it
        ignored.append(re.compile(r"^lm_head\.weight$"))
    renames = [(re.compile(p), r) for p, r in family.RENAMES]
    targets = dict(model.named_parameters())
    to_quantize = quantized_linears(model) if quantize else set()
    bnb = {}  # "P.weight" -> {checkpoint key: tensor}: a pre-quantized weight, gathered across shards
    filled, seen, unexpected, misshaped, broken = set(), set(), [], [], []

    def put(name, t):
        if name in to_quantize:
            _quantize_into(model, name, t.to(device=device, dtype=dtype))
        else:
            _set(model, name, t.to(device=device, dtype=dtype))

    for path in checkpoint_files(directory):
        try:
            f = safe_open(path, framework="pt", device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        with f:
            for key in f.keys():
                name = renamed(key, renames)  # the module path this checkpoint key fills
                if any(p.search(key) or p.search(name) for p in ignored):
                    continue
                shown = key if name == key else f"{key} (as {name})"
                owner = _bnb_owner(name, to_quantize, f, key)
                if owner is not None:  # one tensor of a bitsandbytes 4-bit weight
                    bnb.setdefault(owner, {})[name] = f.get_tensor(key)
                    continue
                parts = split_parts(name, family.SPLITS) or [name]  # a fused tensor fills several modules
                _fill_parts(f, key, shown, parts, targets, filled, seen, unexpected, misshaped, broken,
                            os.path.basename(path), put)
    for name, tensors in bnb.items():
        _load_bnb(model, name, tensors, targets, device, filled, seen, misshaped, broken)
    missing = sorted(set(targets) - filled - seen)
    if missing or unexpected or misshaped or broken:
        parts = [f"{directory}: checkpoint does not match the {cfg.model_type} model built from config.json"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                             ("unreadable", broken)):
            if items:
                parts.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(parts))


def _bnb_owner(name, to_quantize, f, key):
    """The quantized weight ("P.weight") that checkpoint tensor `name` belongs to when it is part of a
    bitsandbytes 4-bit weight (the uint8 `P.weight` itself or one of its statistics), else None."""
    if not to_quantize:
        return None
    for suffix in BNB_SUFFIXES:
        if name.endswith(".weight" + suffix) and name[:-len(suffix)] in to_quantize:
            return name[:-len(suffix)]
    if name in to_quantize and f.get_slice(key).get_dtype() == "U8":
        return name
    return None


def _load_bnb(model, name, tensors, targets, device, filled, seen, misshaped, broken):
    from ..quant import NF4Weight, QuantFormatError

    prefix = name[:-len("weight")]
    try:
        w = NF4Weight.from_bnb(tensors, prefix)
    except (QuantFormatError, KeyError, ValueError) as e:
        broken.append(f"{name} (bitsandbytes 4-bit): {e}")
        seen.add(name)
        return
    if tuple(w.shape) != tuple(targets[name].shape):
        misshaped.append(f"{name}: 4-bit weight of shape {tuple(w.shape)} vs model {tuple(targets[name].shape)}")
        seen.add(name)
        return
    _replace_with_4bit(model, name, w.to(device))
    filled.add(name)


def _quantize_into(model, name, w):
    from ..quant import quantize_nf4

    _replace_with_4bit(model, name, quantize_nf4(w))


def _replace_with_4bit(model, name, weight):
    """Swap the nn.Linear owning `name` for a Linear4bit at the same path (its bias, loaded or not yet, kept)."""
    from ..quant import Linear4bit

    path = name[:-len(".weight")]
    parent_path, _, child = path.rpartition(".")
    old = model.get_submodule(path)
    setattr(model.get_submodule(parent_path), child, Linear4bit(weight, old.bias))


def renamed(key: str, renames) -> str:
    """A checkpoint key under the family's RENAMES (first matching prefix rule), else itself."""
    for pattern, replacement in renames:
        if pattern.search(key):
            return pattern.sub(replacement, key, count=1)
    return key


def split_parts(key: str, splits: dict):
    """The module tensors a fused checkpoint key loads into (a family's SPLITS: fused suffix -> part suffixes, in
    row order), or None when the key is not fused. `model.layers.0.self_attn.qkv_proj.weight` ->
    [`model.layers.0.self_attn.q_proj.weight`, ...]."""
    for fused, parts in splits.items():
        if key == fused or key.endswith("." + fused):
            prefix = key[:len(key) - len(fused)]
            return [prefix + p for p in parts]
    return None


def _fill_parts(f, key, shown, names, targets, filled, seen, unexpected, misshaped, broken, fname, put):
    """Load one checkpoint tensor into the model tensors `names`: itself, or a fused tensor split along dim 0 by
    the parts' row counts (from the model). Every failure is recorded, not raised, so that one error lists all."""
    fused = len(names) > 1
    absent = [n for n in names if n not in targets]
    if absent:
        unexpected.append(f"{shown} ({fname}; would fill {absent}, which the model does not have)" if fused
                          else f"{shown} ({fname})")
        return
    again = [n for n in names if n in filled or n in seen]
    if again:
        broken.append(f"{shown} stored twice (again in {fname}{f'; its parts {again}' if fused else ''})")
        return
    shape = tuple(f.get_slice(key).get_shape())
    rows = [targets[n].shape[0] for n in names]
    want = (sum(rows),) + tuple(targets[names[0]].shape[1:])
    if shape != want or any(tuple(targets[n].shape[1:]) != want[1:] for n in names):
        how = f" (= {' + '.join(map(str, rows))} rows of {', '.join(names)})" if fused else ""
        misshaped.append(f"{shown}: checkpoint {shape} vs model {want}{how}")
        seen.update(names)
        return
    try:
        t = f.get_tensor(key)
    except Exception as e:
        broken.append(f"{shown} in {fname}: {type(e).__name__}: {e}")
        seen.update(names)
        return
    if not fused:
        put(names[0], t)
    else:
        for name, piece in zip(names, t.split(rows, dim=0)):
            # clone: each part owns its storage (parts sharing one buffer could not be saved or freed alone)
            put(name, piece.clone())
    filled.update(names)


def fuse_splits(tensors: dict, splits: dict) -> dict:
    """Export: the inverse of split_parts. Concatenates each group of parts back into its fused checkpoint key
    (at the position of the group's first member met); other tensors pass through in order."""
    out, done = {}, set()
    for name, t in tensors.items():
        if name in done:
            continue
        group = None
        for fused, parts in splits.items():
            for p in parts:
                if name == p or name.endswith("." + p):
                    prefix = name[:len(name) - len(p)]
                    group = (prefix + fused, [prefix + q for q in parts])
        if group is None:
            out[name] = t
            continue
        fused_name, names = group
        absent = [n for n in names if n not in tensors]
        if absent:
            raise CheckpointError(f"cannot export {fused_name}: its parts {absent} are missing")
        out[fused_name] = torch.cat([tensors[n] for n in names], dim=0)
        done.update(names)
    return out


def _set(model: nn.Module, key: str, tensor: torch.Tensor):
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path)
    module._parameters[name] = nn.Parameter(tensor, requires_grad=False)


def save_model(model: CausalLM, out_dir: str, dtype=None, max_shard_bytes: int = 5 * 2**30):
    """Write a Hugging Face-format checkpoint (config.json + safetensors, sharded above max_shard_bytes).
    Files are written under temporary names and renamed, so a crash leaves no half-written checkpoint."""
    cfg = model.config
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for name, p in model.named_parameters():  # named_parameters yields a tied weight once
        if ".lora_" in name:
            continue
        tensors[name] = (p.detach() if dtype is None else p.detach().to(dtype)).contiguous().cpu()
    tensors = fuse_splits(tensors, family_for(cfg.model_type).SPLITS)
    out_dtype = model.model.embed_tokens.weight.dtype if dtype is None else dtype
    hf = dict(cfg.hf)
    hf["torch_dtype"] = str(out_dtype).replace("torch.", "")
    hf.pop("dtype", None)
    hf.pop("quantization_config", None)
    from ..quant import Linear4bit

    four_bit = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    for name, m in four_bit:  # bitsandbytes' layout, as transformers saves a 4-bit model
        tensors.update({k: v.contiguous().cpu() for k, v in m.weight.to_bnb(name + ".").items()})
    if four_bit:
        hf["quantization_config"] = {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": four_bit[0][1].weight.double_quant,
            "bnb_4bit_compute_dtype": str(out_dtype).replace("torch.", ""), "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False}
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += n
    shards.append(current)
    writes = []
    if len(shards) == 1:
        writes.append((SINGLE, shards[0]))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            writes.append((fname, shard))
            weight_map.update({k: fname for k in shard})
    for fname, shard in writes:
        tmp = os.path.join(out_dir, f".{fname}.tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(out_dir, fname))
    if len(shards) > 1:  # the index last: it never names a shard that is not complete
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _atomic_json(os.path.join(out_dir, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    _atomic_json(os.path.join(out_dir, "config.json"), hf)


def _atomic_json(path, obj):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
