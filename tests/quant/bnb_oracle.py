"""bitsandbytes as the oracle of the quant tests (tests only: the library never imports it).

On a CUDA device bitsandbytes runs its CUDA kernels, which the layout of hare follows to the bit. On the CPU
(bitsandbytes >= 0.49) its 8-bit blockwise quantization (the nested absmax codes) goes through a 65536-entry
lookup table that misses the nearest code for ~0.2% of values; `assert_codes_match` accepts exactly those
misses there: hare's code strictly nearer to the value, theirs within the table's resolution of it.
"""
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional")


def bnb_quantize(w, blocksize=64, double_quant=True, quant_type="nf4"):
    """(packed uint8 (ceil(n/2), 1), QuantState) from bitsandbytes."""
    return bnb_functional().quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                          quant_type=quant_type)


def bnb_tensors(packed, state, prefix=""):
    """The tensors bitsandbytes' Linear4bit writes to a state dict (and transformers to safetensors)."""
    out = {prefix + "weight": packed}
    out.update({prefix + "weight." + k: v for k, v in state.as_dict(packed=True).items()})
    return out


def assert_codes_match(ours, theirs, values, code):
    """ours/theirs: uint8 codes of `values` (fp32, scaled into [-1, 1]) in the sorted map `code`."""
    if ours.device.type == "cuda" or torch.equal(ours, theirs):
        assert torch.equal(ours, theirs), f"{(ours != theirs).sum().item()} nested codes differ"
        return
    diff = (ours != theirs).nonzero().flatten()
    assert diff.numel() <= max(2, 0.01 * ours.numel()), f"{diff.numel()} of {ours.numel()} nested codes differ"
    o, t = ours[diff].long(), theirs[diff].long()
    v = values[diff].double()
    d_ours = (v - code[o].double()).abs()
    d_theirs = (v - code[t].double()).abs()
    assert (d_ours < d_theirs).all(), "a differing nested code of ours is not the strictly nearer one"
    # the table maps v to a grid point g of step 2/65535 (|g - v| <= 1/65535) and takes the code nearest g,
    # so its pick is at most 2 * 1/65535 farther from v than the nearest code
    assert (d_theirs <= d_ours + 2 / 65535).all(), "bitsandbytes' code is farther than its table explains"
