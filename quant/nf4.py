"""NF4 quantization as QLoRA defines it, in bitsandbytes' byte layout, and the NF4Weight container.

Two quantization levels (QLoRA, Dettmers et al. 2023, arXiv:2305.14314, sections 3 and 4):

  1. The weight, flattened row-major, is cut into blocks of `blocksize` (64) values. Each block is scaled by
     its absolute maximum, and each scaled value in [-1, 1] becomes the index (4 bits) of the nearest of the 16
     NormalFloat values below. Two indices share a byte: element 2i in the HIGH nibble, element 2i+1 in the low
     one. A last partial block is scaled by the max over its own values; an odd count pads one index of 0.0.
  2. Double quantization: the fp32 absmax values lose their mean (`offset`), are cut into blocks of 256, and
     each is stored as the 8-bit index of the nearest value of the signed "dynamic" map (Dettmers 2015, 8-Bit
     Approximations for Parallelism in Deep Learning, arXiv:1511.04561) after scaling by its block's absmax,
     which stays fp32 (`nested_absmax`).

Dequantization undoes both, with the rounding of bitsandbytes (`functional.dequantize_4bit`):
  absmax_b = fp32(fp32(dynamic[code_b] * nested_absmax[b // 256]) + offset)
  w_i      = dtype(fp32(nf4[index_i] * absmax[i // blocksize]))

Rounding rules, chosen to give bitsandbytes' bytes (tests/quant/test_nf4.py checks them against it):
  - scaled value = x * fp32(1 / absmax) (bitsandbytes' CUDA kQuantizeBlockwise multiplies by the reciprocal);
    in an all-zero block that is 0 * inf = NaN, which the CUDA kernels map to index 0 (of both levels). So an
    all-zero 4-bit block is stored as 0x00 bytes (dequantized -1.0 * 0 = -0.0), as on CUDA; bitsandbytes'
    CPU path writes 0x77 there (0.0 * 0).
  - nearest value with fp32 midpoints m_j = fp32(c_j + c_{j+1}) * 0.5; a value exactly on a midpoint takes
    the lower index for NF4 (CUDA dQuantizeNF4: `x > m` goes up) and the EVEN index of the pair for the 8-bit
    map (the end state of CUDA dQuantize's binary search). bitsandbytes' CPU build (>= 0.49) quantizes the
    8-bit level through a 65536-entry lookup table instead, which misses the nearest value for ~0.2% of
    nested codes; we follow the CUDA kernel, which wrote the published -bnb-4bit checkpoints. (Seen on an
    H200: packed bytes, codes, offset and nested absmax equal bitsandbytes 0.50.2's CUDA output on 6 shapes,
    ragged ones included; tools/bench_nf4.py repeats that check.)
  - offset = absmax.mean() in torch, on the tensor's device, as bitsandbytes computes it.

Serialization (bitsandbytes QuantState.as_dict(packed=True), as transformers saves a 4-bit model):
  <prefix>weight                              uint8 (ceil(n/2), 1)   packed indices
  <prefix>weight.absmax                       uint8 (blocks,)        8-bit codes (fp32 without double quant)
  <prefix>weight.quant_map                    fp32 (16,)             the NF4 values
  <prefix>weight.nested_absmax                fp32 (ceil(blocks/256),)
  <prefix>weight.nested_quant_map             fp32 (256,)            the dynamic map
  <prefix>weight.quant_state.bitsandbytes__nf4  uint8 (k,)           UTF-8 JSON: quant_type, blocksize, dtype,
                                                                     shape, nested_blocksize, nested_dtype,
                                                                     nested_offset (python float)
"""
import json
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..models.errors import HareError
from .dequant import dequantize_nf4


class QuantFormatError(HareError, ValueError):
    """A 4-bit tensor set is malformed or in a format hare does not read (e.g. FP4). Names the key at fault."""


# The 16 NormalFloat (NF4) values, QLoRA (arXiv:2305.14314) appendix E. They are quantiles of N(0, 1) with
# equal probability mass per bin, 8 for the positive half and 7 for the negative half plus an exact zero,
# normalized to [-1, 1]: norm.ppf(linspace(0.9677083, 0.5, 9)[:-1]) and -norm.ppf(linspace(0.9677083, 0.5,
# 8)[:-1]), over norm.ppf(0.9677083). The fp32 values are those of bitsandbytes functional.get_4bit_type("nf4")
# (generated there by create_normal_map(offset=0.9677083, use_extra_value=True)); tests/quant/test_nf4.py
# regenerates them from the quantile formula.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes accepts these for 4-bit
NESTED_BLOCKSIZE = 256  # bitsandbytes quantize_4bit(compress_statistics=True) uses blocks of 256 absmax values
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Elements quantized per step: bounds the fp32 temporaries to ~100 MB whatever the tensor, so quantizing while
# loading stays within "final model + one 16-bit tensor" (a multiple of every blocksize).
_CHUNK = 1 << 24


def nf4_map(device=None) -> torch.Tensor:
    """The 16 NF4 values, fp32, ascending."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def dynamic_map(device=None) -> torch.Tensor:
    """The signed 8-bit dynamic map (Dettmers 2015, arXiv:1511.04561), 256 fp32 values ascending.

    A value is a sign, a decimal exponent e in 0..6 (scale 10^(e-6)) and a linear fraction: level e holds 2^e
    fractions, the midpoints of linspace(0.1, 1, 2^e + 1). With 0 and 1.0 that is 2 * 127 + 2 = 256 values.
    Built in fp32 the way bitsandbytes functional.create_dynamic_map(signed=True, max_exponent_bits=7,
    total_bits=8) builds it (a fp32 linspace, an fp32 mean, an fp32 product by the power of ten), so the map
    is bit-identical to the one stored in its checkpoints.
    """
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        level = (10.0 ** (e - 6) * mids).tolist()
        values += level + [-v for v in level]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    # fp32, as the CUDA kernels compare against: (c_j + c_{j+1}) * 0.5 rounded once in the sum
    return (code[:-1] + code[1:]) * 0.5


def _nearest_nf4(scaled: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 value; on a midpoint the lower one (bucketize's right=False: x <= m stays).
    NaN (0 * 1/0 in an all-zero block) -> 0, where CUDA dQuantizeNF4's comparisons, all false, end."""
    return torch.bucketize(scaled, mids, out_int32=True).masked_fill_(scaled.isnan(), 0)


def _nearest_dynamic(scaled: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest dynamic-map value; on a midpoint the even index of the two (CUDA dQuantize).
    NaN (an all-zero nested block) -> 0, where CUDA dQuantize's binary search ends."""
    idx = torch.bucketize(scaled, mids, out_int32=True)  # mids[idx-1] < x <= mids[idx]
    on_mid = (idx < mids.numel()) & (scaled == mids[idx.clamp(max=mids.numel() - 1)])
    return (idx + (on_mid & (idx % 2 == 1)).to(torch.int32)).masked_fill_(scaled.isnan(), 0)


def _scale(blocks: torch.Tensor) -> tuple:
    """blocks (b, bs) fp32 -> (absmax (b,), blocks * fp32(1 / absmax)), in IEEE arithmetic as the CUDA kernel
    (an all-zero block gives 0 * inf = NaN)."""
    absmax = blocks.abs().amax(dim=1)
    return absmax, blocks * (1.0 / absmax)[:, None]


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """(ceil(n / blocksize), blocksize) fp32 view of `flat`, zero-padded (zeros change no absmax)."""
    pad = -flat.numel() % blocksize
    flat = flat.float()
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize)


@dataclass(eq=False)
class NF4Weight:
    """A 4-bit weight: plain buffers plus the metadata to undo them. No tensor subclass, no hooks.

    packed            uint8 (ceil(n/2),)  two NF4 indices per byte, first element in the high nibble
    absmax            uint8 (blocks,) codes of the dynamic map when double-quantized, else fp32 (blocks,)
    quant_map         fp32 (16,) the NF4 values (as stored; bitsandbytes always stores NF4_VALUES)
    shape, dtype      the original weight's shape and dtype (dtype is recorded in the bnb metadata)
    blocksize         values per absmax (64)
    nested_absmax     fp32 (ceil(blocks/nested_blocksize),) or None without double quantization
    nested_quant_map  fp32 (256,) the dynamic map, or None
    offset            fp32 0-dim tensor: the mean subtracted from the absmax values, or None
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    quant_map: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: Optional[torch.Tensor] = None
    nested_quant_map: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        n = self.numel
        nblocks = -(-n // self.blocksize)
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")
        if self.dtype not in FLOAT_DTYPES.values():
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        _expect("packed", self.packed, torch.uint8, ((n + 1) // 2,))
        _expect("quant_map", self.quant_map, torch.float32, (16,))
        nested = (self.nested_absmax, self.nested_quant_map, self.offset)
        if any(t is None for t in nested) and not all(t is None for t in nested):
            raise ValueError("nested_absmax, nested_quant_map and offset come together (double quantization) "
                             "or not at all")
        if self.double_quant:
            if self.nested_blocksize < 1 or self.nested_blocksize & (self.nested_blocksize - 1):
                raise ValueError(f"nested_blocksize must be a power of two, got {self.nested_blocksize}")
            _expect("absmax", self.absmax, torch.uint8, (nblocks,))
            _expect("nested_absmax", self.nested_absmax, torch.float32, (-(-nblocks // self.nested_blocksize),))
            _expect("nested_quant_map", self.nested_quant_map, torch.float32, (256,))
            _expect("offset", self.offset, torch.float32, ())
        else:
            _expect("absmax", self.absmax, torch.float32, (nblocks,))
        devices = {t.device for t in self.tensors().values()}
        if len(devices) > 1:
            raise ValueError(f"NF4Weight buffers must share one device, got {sorted(map(str, devices))}")

    @classmethod
    def _trusted(cls, **fields) -> "NF4Weight":
        """Rebuilds a container from buffers that were validated when first wrapped (Linear4bit.weight, once per
        forward): skips __post_init__, which costs ~40 us -- 9 ms per decoded token over 224 layers."""
        obj = object.__new__(cls)
        obj.__dict__.update(fields)
        return obj

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> dict:
        """The buffers by field name (None fields left out)."""
        names = ("packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def dequantize(self, dtype=torch.bfloat16, backend=None) -> torch.Tensor:
        """The weight in `dtype`, shape `self.shape` (Triton on CUDA, the torch reference elsewhere)."""
        return dequantize_nf4(self, dtype, backend)

    def to(self, device, non_blocking=False) -> "NF4Weight":
        """A copy of the container with every buffer on `device` (the same object if already there)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            # "cuda" means the current device; torch.device("cuda") != torch.device("cuda:0") would copy every
            # buffer that is already there (seen on the H200: q.to("cuda") is not q)
            device = torch.device("cuda", torch.cuda.current_device())
        if all(t.device == device for t in self.tensors().values()):
            return self
        moved = {k: t.to(device, non_blocking=non_blocking) for k, t in self.tensors().items()}
        return NF4Weight(shape=self.shape, dtype=self.dtype, blocksize=self.blocksize,
                         nested_blocksize=self.nested_blocksize, **moved)

    # -- bitsandbytes / transformers serialization ------------------------------------------------------------

    def quant_state_json(self) -> dict:
        """The non-tensor fields bitsandbytes packs into `weight.quant_state.bitsandbytes__nf4`, in its order."""
        state = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                 "shape": list(self.shape)}
        if self.double_quant:
            state.update({"nested_blocksize": self.nested_blocksize, "nested_dtype": "float32",
                          "nested_offset": self.offset.item()})
        return state

    def to_bnb(self, prefix: str = "") -> dict:
        """{key: tensor} exactly as bitsandbytes' Linear4bit (and transformers' save_pretrained) store this
        weight under `prefix` (e.g. "model.layers.0.mlp.down_proj.")."""
        out = {prefix + "weight": self.packed.reshape(-1, 1),
               prefix + "weight.absmax": self.absmax,
               prefix + "weight.quant_map": self.quant_map}
        if self.double_quant:
            out[prefix + "weight.nested_absmax"] = self.nested_absmax
            # a copy: safetensors refuses tensors that share storage across keys
            out[prefix + "weight.nested_quant_map"] = self.nested_quant_map.clone()
        # json.dumps with its default separators, as bitsandbytes utils.pack_dict_to_tensor does
        blob = json.dumps(self.quant_state_json()).encode("utf-8")
        out[prefix + "weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_bnb(cls, tensors: dict, prefix: str = "") -> "NF4Weight":
        """Reads the keys `to_bnb` writes (bitsandbytes' packed quant state). Raises QuantFormatError naming
        the key for a missing tensor, FP4 data, or sizes that do not fit the recorded shape."""
        qs_key = prefix + "weight.quant_state.bitsandbytes__nf4"
        if qs_key not in tensors:
            fp4 = prefix + "weight.quant_state.bitsandbytes__fp4"
            if fp4 in tensors:
                raise QuantFormatError(f"{fp4}: FP4 4-bit weights are not supported (hare reads NF4 only); "
                                       f"re-quantize the model with bnb_4bit_quant_type='nf4'")
            raise QuantFormatError(f"{qs_key}: missing (not a bitsandbytes 4-bit weight, or saved without the "
                                   f"packed quant state)")
        try:
            state = json.loads(bytes(tensors[qs_key].cpu().to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise QuantFormatError(f"{qs_key}: not a UTF-8 JSON quant state ({e})") from None
        if state.get("quant_type") != "nf4":
            raise QuantFormatError(f"{qs_key}: quant_type {state.get('quant_type')!r} is not supported "
                                   f"(hare reads 'nf4' only)")
        for field in ("blocksize", "dtype", "shape"):
            if field not in state:
                raise QuantFormatError(f"{qs_key}: field {field!r} missing")
        if state["dtype"] not in FLOAT_DTYPES:
            raise QuantFormatError(f"{qs_key}: dtype {state['dtype']!r} is not float32/float16/bfloat16")

        def get(name):
            key = prefix + name
            if key not in tensors:
                raise QuantFormatError(f"{key}: missing")
            return key, tensors[key]

        wkey, packed = get("weight")
        # quant_storage other than uint8 (e.g. bf16 for FSDP) holds the same bytes: reinterpret, do not convert
        packed = packed.contiguous().reshape(-1)
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        fields = {"packed": (wkey, packed)}
        for name, field in (("weight.absmax", "absmax"), ("weight.quant_map", "quant_map")):
            fields[field] = get(name)
        nested = "nested_blocksize" in state or prefix + "weight.nested_absmax" in tensors
        if nested:
            for name, field in (("weight.nested_absmax", "nested_absmax"),
                                ("weight.nested_quant_map", "nested_quant_map")):
                fields[field] = get(name)
            for f in ("nested_blocksize", "nested_offset"):
                if f not in state:
                    raise QuantFormatError(f"{qs_key}: field {f!r} missing")
            if state.get("nested_dtype", "float32") != "float32":
                raise QuantFormatError(f"{qs_key}: nested_dtype {state['nested_dtype']!r} is not float32")
            device = packed.device
            fields["offset"] = (qs_key, torch.tensor(float(state["nested_offset"]), dtype=torch.float32,
                                                     device=device))
        try:
            return cls(shape=torch.Size(state["shape"]), dtype=FLOAT_DTYPES[state["dtype"]],
                       blocksize=int(state["blocksize"]),
                       nested_blocksize=int(state.get("nested_blocksize", NESTED_BLOCKSIZE)),
                       **{f: t for f, (_, t) in fields.items()})
        except ValueError as e:
            field = str(e).split(" ", 1)[0]
            key = fields[field][0] if field in fields else qs_key
            raise QuantFormatError(f"{key}: {e}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in FLOAT_DTYPES.items()}[dtype]


def _expect(name, t, dtype, shape):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be {dtype} of shape {tuple(shape)}, got {t.dtype} of shape "
                         f"{tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantizes `weight` (fp32/fp16/bf16, any shape) to NF4 on its own device, byte-identical to
    bitsandbytes quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    (see the module docstring for the rounding rules)."""
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES.values():
        raise ValueError(f"weight must be a float32/float16/bfloat16 tensor, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if weight.numel() == 0:
        raise ValueError("weight is empty")
    if not torch.isfinite(weight).all():
        raise ValueError("weight has non-finite values (inf/nan); NF4 cannot represent them")
    device = weight.device
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    mids4 = _midpoints(nf4_map(device))
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=device)
    for start in range(0, n, _CHUNK):  # _CHUNK is a multiple of blocksize: chunks hold whole blocks
        piece = flat[start:start + _CHUNK]
        amax, scaled = _scale(_blocks(piece, blocksize))
        absmax[start // blocksize:start // blocksize + amax.numel()] = amax
        # an odd total pads the last byte's low nibble with the code of a 0 scaled like its block (CUDA loads 0)
        scaled = scaled.view(-1)[:piece.numel() + piece.numel() % 2]
        idx = _nearest_nf4(scaled, mids4).to(torch.uint8)
        packed[start // 2:start // 2 + idx.numel() // 2] = (idx[0::2] << 4) | idx[1::2]
    quant_map = nf4_map(device)
    if not double_quant:
        return NF4Weight(packed=packed, absmax=absmax, quant_map=quant_map, shape=weight.shape,
                         dtype=weight.dtype, blocksize=blocksize)
    offset = absmax.mean()
    nested_absmax, scaled = _scale(_blocks(absmax - offset, NESTED_BLOCKSIZE))
    dyn = dynamic_map(device)
    codes = _nearest_dynamic(scaled.view(-1)[:absmax.numel()], _midpoints(dyn)).to(torch.uint8)
    return NF4Weight(packed=packed, absmax=codes, quant_map=quant_map, shape=weight.shape, dtype=weight.dtype,
                     blocksize=blocksize, nested_absmax=nested_absmax, nested_quant_map=dyn, offset=offset,
                     nested_blocksize=NESTED_BLOCKSIZE)
