"""LoRA adapters on hare's decoder: LoRAConfig, LoRALinear, apply_lora, merge.

LoRA (Hu et al. 2021, arXiv:2106.09685): a frozen projection W gets a trainable low-rank update,
y = x W^T + b + s (x A^T) B^T with A (r x in), B (out x r), s = alpha / r, or alpha / sqrt(r) with rsLoRA
(Kalajdzievski 2023, arXiv:2312.03732). The math and the fused autograd functions live in kernels/lora.py; this
file only builds and removes the modules.

Paths and names are PEFT's, so an adapter is a prefix away from PEFT's file: the module at
`model.layers.0.self_attn.q_proj` becomes a LoRALinear at the same path whose base weight stays
`...q_proj.weight` (16-bit parameter, or the 4-bit base's tensors under the same names) and whose adapters are
`...q_proj.lora_A.weight` / `...q_proj.lora_B.weight` (PEFT: `base_model.model.<path>.lora_A.weight`).

Initialization is PEFT's default (init_lora_weights=True), number for number: A ~ kaiming_uniform_(a=sqrt(5))
(torch's nn.Linear default, U(-1/sqrt(in), 1/sqrt(in))), B = 0, so the adapted model starts equal to the base.
`torch.manual_seed(s); apply_lora(model)` (or `apply_lora(model, seed=s)`) gives the A that
`torch.manual_seed(s); get_peft_model(hf_model, LoraConfig(...))` gives, bit for bit: see `peft_lora_A`.
Adapters are kept in fp32 by default whatever the base dtype: they are the optimizer's master weights (PEFT's
autocast_adapter_dtype does the same); kernels/lora.py casts them to the compute dtype at use. On a 16-bit base A
starts on that dtype's grid (the fp32 draw rounded to bf16, then held in fp32), because PEFT's A does.
"""
import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import nn

from ..kernels import lora as lora_kernels
from ..quant.linear import Linear4bit

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def lora_scale(alpha, r, rslora=False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


@dataclass
class LoRAConfig:
    r: int = 16                      # rank of A and B
    alpha: float = 16.0              # scale numerator: s = alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0             # on the adapter's input only; > 0 takes the slower unfused path
    targets: tuple = ALL_PROJECTIONS  # last path component of the projections to adapt
    rslora: bool = False             # rank-stabilized scale alpha / sqrt(r)
    train_embeddings: bool = False   # also train model.embed_tokens fully (PEFT modules_to_save)
    train_lm_head: bool = False      # also train lm_head fully (untied models; with tied ones train embeddings)
    adapter_dtype: str = "float32"   # dtype of A and B (the optimizer's master weights)
    seed: Optional[int] = None       # A's init: None = torch's global CPU generator (as PEFT); s = a fresh
                                     # torch.Generator().manual_seed(s) (= torch.manual_seed(s) before PEFT)

    def __post_init__(self):
        self.targets = tuple([self.targets] if isinstance(self.targets, str) else self.targets)
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ValueError("targets is empty: name at least one projection (e.g. q_proj)")
        if self.adapter_dtype not in DTYPES:
            raise ValueError(f"adapter_dtype must be one of {sorted(DTYPES)}, got {self.adapter_dtype!r}")

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.r, self.rslora)


class LoRALinear(nn.Module):
    """A frozen 16-bit projection plus a trainable low-rank update.

    The base's `weight` and `bias` parameters are re-registered here under their own names, so their
    state-dict paths do not change; `lora_A` and `lora_B` are bias-free nn.Linear modules so that their weights
    sit at PEFT's `lora_A.weight` / `lora_B.weight`. forward is kernels.lora.linear."""

    def __init__(self, base: nn.Linear, r: int, scale: float, dropout: float = 0.0, dtype=torch.float32,
                 backend=None, generator=None):
        super().__init__()
        self.weight = base.weight.requires_grad_(False)  # the base's own Parameter objects, not copies
        self.bias = None if base.bias is None else base.bias.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self._init_lora(r, scale, dropout, dtype, backend, generator)

    def _init_lora(self, r, scale, dropout, dtype, backend, generator):
        # skip_init: the modules without nn.Linear's own init, which would draw from the generator of the base's
        # device; every number A gets comes from reset_lora_parameters' CPU draws
        device = self.weight.device
        self.lora_A = nn.utils.skip_init(nn.Linear, self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.utils.skip_init(nn.Linear, r, self.out_features, bias=False, device=device, dtype=dtype)
        self.r, self.scaling, self.dropout, self.backend = r, float(scale), float(dropout), backend
        self.reset_lora_parameters(generator)

    @torch.no_grad()
    def reset_lora_parameters(self, generator=None):
        """A = PEFT's A for this module (peft_lora_A: three CPU draws from `generator`, None = torch's global one),
        rounded to the base's dtype as PEFT moves it there, then stored in the adapter's dtype; B = 0."""
        A = peft_lora_A(self.in_features, self.r, self.out_features, generator)
        # PEFT casts the adapter to the base layer's dtype (a 16-bit base: bf16 rounds A) before its
        # autocast_adapter_dtype upcasts it to fp32. A 4-bit base counts as its weight's dtype here, where PEFT
        # takes bitsandbytes' compute_dtype: equal when bnb_4bit_compute_dtype is the model's dtype (the anchors:
        # bf16); transformers' default compute dtype is fp32, which does not round (see peft_lora_A)
        self.lora_A.weight.copy_(A.to(self.weight.dtype))
        self.lora_B.weight.zero_()

    def forward(self, x):
        return lora_kernels.linear(self, x)

    def dense_weight(self, dtype):
        """The base weight in `dtype` (a 4-bit base dequantized)."""
        return self.weight.to(dtype)

    def delta_weight(self, dtype=torch.float32):
        """s B A in `dtype` (the merge update)."""
        return self.scaling * (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype))

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scaling:g}, " \
               f"dropout={self.dropout:g}"


class LoRALinear4bit(LoRALinear, Linear4bit):
    """A frozen NF4 projection (quant/linear.py Linear4bit: same buffers, same `weight` property giving the
    NF4Weight, same bias path) plus the trainable low-rank update. The buffers are the base's own tensors."""

    def __init__(self, base: Linear4bit, r: int, scale: float, dropout: float = 0.0, dtype=torch.float32,
                 backend=None, generator=None):
        Linear4bit.__init__(self, base.weight, base.bias)
        self._init_lora(r, scale, dropout, dtype, backend, generator)

    def dense_weight(self, dtype):
        w = self.weight
        return w.dequantize(dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else
                            torch.float32).to(dtype)


def _kaiming_uniform_cpu(shape, generator):
    """nn.Linear's default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn in fp32 on the CPU."""
    return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.float32, device="cpu"), a=math.sqrt(5),
                                    generator=generator)


def peft_lora_A(in_features: int, r: int, out_features: int, generator=None) -> torch.Tensor:
    """The (r, in_features) fp32 CPU tensor PEFT's default init gives lora_A of one target module, drawn from
    `generator` (a CPU torch.Generator; None: torch's global CPU generator, advanced as PEFT advances it).

    PEFT's sequence (peft 0.21.2; read in peft/tuners/lora/layer.py and tuners_utils.py, not copied):
      - BaseTuner.inject_adapter (tuners_utils.py:879, 948-979) visits the targets in `model.named_modules()`
        order, which is hare's order too (hare's paths and registration order are HF's), one at a time;
      - LoraLayer.update_layer (layer.py:263-264) builds nn.Linear(in, r) and nn.Linear(r, out) on the CPU in
        torch's default dtype (fp32 unless set_default_dtype changed it; hare always draws fp32): each
        constructor runs nn.Linear.reset_parameters, kaiming_uniform_(a=sqrt 5), drawing r x in and then
        out x r numbers from the global CPU generator (no biases: lora_bias=False);
      - reset_lora_parameters (layer.py:312, 332-343) draws A again, kaiming_uniform_(a=sqrt 5), r x in, and
        zeros B: the first two draws are thrown away, but they advance the generator;
      - _move_adapter_to_device_of_base_layer (layer.py:314; tuners_utils.py:2149-2212) then moves the adapter
        to the base weight's device and casts it to the base's dtype (a bitsandbytes 4-bit base: its
        compute_dtype), and PeftModel.__init__ (peft_model.py:179) runs cast_adapter_dtype
        (tuners_utils.py:2705), which upcasts fp16/bf16 adapters to fp32: on a bf16 base, A is the fp32 draw
        rounded to bf16 (LoRALinear.reset_lora_parameters does the same rounding).
    Phi-3 (fused qkv_proj / gate_up_proj, which hare splits into q/k/v and gate/up) has no PEFT-equal init:
    PEFT's adapter there is one A of rank r shared by the parts, hare's are one A per part; each part draws this
    sequence with its own shape."""
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (PEFT draws on the CPU), got one on "
                         f"{generator.device}")
    _kaiming_uniform_cpu((r, in_features), generator)   # nn.Linear(in, r)'s own init: overwritten
    _kaiming_uniform_cpu((out_features, r), generator)  # nn.Linear(r, out)'s own init: B is zeroed
    return _kaiming_uniform_cpu((r, in_features), generator)  # reset_lora_parameters: A


def _is_projection(module) -> bool:
    return isinstance(module, (nn.Linear, Linear4bit))


def apply_lora(model: nn.Module, config: Optional[LoRAConfig] = None, backend=None, **overrides) -> nn.Module:
    """Replace the target projections of `model` by LoRALinear modules, in place; freeze everything else.

    apply_lora(model, r=16, alpha=16, targets=("q_proj", "v_proj")) or apply_lora(model, LoRAConfig(...)).
    backend: kernels/lora.py's choice for these modules (None: fused on CUDA, ref otherwise).
    Returns the model (its `lora_config` attribute records the config, for save_adapter)."""
    if config is None:
        config = LoRAConfig(**overrides)
    elif overrides:
        names = {f.name for f in fields(LoRAConfig)}
        config = LoRAConfig(**{**{n: getattr(config, n) for n in names}, **overrides})
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("the model already has LoRA adapters (merge them first, or load into a fresh model)")
    # Find every target first and refuse before touching the model: a failed call leaves it as it was.
    found = [(path, module) for path, module in model.named_modules()
             if path.rpartition(".")[2] in config.targets and _is_projection(module)
             and not isinstance(module, LoRALinear) and ".lora_" not in path]
    missing = [t for t in config.targets if not any(p.rpartition(".")[2] == t for p, _ in found)]
    if missing:
        names = sorted({p.rpartition(".")[2] for p, m in model.named_modules()
                        if _is_projection(m) and ".lora_" not in p} - {"lm_head"})
        fused = {f.rpartition(".")[2]: [p.rpartition(".")[2] for p in parts] for f, parts in _fused_groups(model)}
        hint = [f"{t} is split by this family into {', '.join(fused[t])}" for t in missing if t in fused]
        raise ValueError(f"targets {missing} match no projection of the model; projections are {names}"
                         + (f" ({'; '.join(hint)})" if hint else ""))
    if any(path == "lm_head" for path, _ in found):
        raise ValueError("lm_head cannot take a LoRA adapter here; use train_lm_head=True to train it fully")
    if config.train_lm_head and getattr(model.config, "tie_word_embeddings", False):
        raise ValueError("train_lm_head: this model ties lm_head to the embeddings; set train_embeddings")
    for p in model.parameters():
        p.requires_grad_(False)
    # A's numbers are PEFT's for the same seed (peft_lora_A); `found` is in named_modules() order, as PEFT's
    generator = None
    if config.seed is not None:
        generator = torch.Generator().manual_seed(config.seed)
    dtype = DTYPES[config.adapter_dtype]
    for path, module in found:
        cls = LoRALinear4bit if isinstance(module, Linear4bit) else LoRALinear
        lora = cls(module, config.r, config.scale, config.dropout, dtype, backend, generator)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lora)
    if config.train_embeddings:
        model.model.embed_tokens.weight.requires_grad_(True)
    if config.train_lm_head:
        model.lm_head.weight.requires_grad_(True)
    model.lora_config = config
    return model


def _fused_groups(model) -> list:
    """The family's SPLITS as module suffixes: [(fused, (part, ...))], e.g. ("self_attn.qkv_proj",
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")); [] for families without fused modules."""
    from ..models.registry import family_for

    cfg = getattr(model, "config", None)
    if cfg is None:
        return []

    def module(key):
        return key[:-len(".weight")] if key.endswith(".weight") else key

    return [(module(f), tuple(module(p) for p in parts)) for f, parts in family_for(cfg.model_type).SPLITS.items()]


def lora_modules(model: nn.Module):
    """(path, LoRALinear) pairs of the model."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]


def trainable_parameters(model: nn.Module) -> dict:
    """{name: parameter} of everything that trains (adapters, and embeddings / lm_head when asked)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def merge(model: nn.Module, dtype=None) -> nn.Module:
    """Fold every adapter into its base, in place: W' = W + s B A (computed in fp32, rounded once to `dtype`,
    default the base weight's dtype; a 4-bit base is dequantized first), and put a plain nn.Linear back. 4-bit
    projections without adapters are dequantized too, so the result is a 16-bit model throughout.
    Returns the model, now without adapters (save it with hare.save_model for a 16-bit HF checkpoint)."""
    for path, m in list(model.named_modules()):
        if not isinstance(m, (LoRALinear, Linear4bit)):
            continue
        out_dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or m.weight.dtype)
        acc = torch.promote_types(out_dtype, torch.float32)  # fp32, or fp64 for an fp64 model (tests)
        if isinstance(m, LoRALinear):
            w = m.dense_weight(acc) + m.delta_weight(acc)
        else:
            w = m.weight.dequantize(torch.float32).to(acc)
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=out_dtype)
        linear.weight = nn.Parameter(w.to(out_dtype), requires_grad=False)
        if m.bias is not None:
            linear.bias = nn.Parameter(m.bias.detach().to(out_dtype), requires_grad=False)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    for p in model.parameters():
        p.requires_grad_(False)
    model.lora_config = None
    return model
