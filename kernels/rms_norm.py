"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * (offset + w).

Casting rules (`casting`), as the reference models do it:
  "llama": statistics in fp32, normalized x cast back to x.dtype, then multiplied by w in w's dtype
           (transformers LlamaRMSNorm: `weight * hidden.to(input_dtype)`).
  "gemma": everything in fp32, `(offset + w.float())`, cast to x.dtype at the end (GemmaRMSNorm).
"""
import torch

from ._dispatch import pick_backend


def rms_norm_ref(x, weight, eps, offset=0.0, casting="llama"):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "gemma":
        return (xf * (offset + weight.float())).to(x.dtype)
    if casting == "llama":
        w = weight + offset if offset else weight
        return w * xf.to(x.dtype)
    raise ValueError(f"casting must be 'llama' or 'gemma', got {casting!r}")


def rms_norm(x, weight, eps, offset=0.0, casting="llama", backend=None):
    if pick_backend(backend, x) == "ref":
        return rms_norm_ref(x, weight, eps, offset, casting)
    raise NotImplementedError("Triton rms_norm: issue 3")
