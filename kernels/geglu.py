"""GeGLU: gelu(gate) * up, gelu tanh-approximate (Gemma's gelu_pytorch_tanh) or exact (erf)."""
import torch
import torch.nn.functional as F

from ._dispatch import pick_backend


def geglu_ref(gate, up, approximate="tanh"):
    return (F.gelu(gate.float(), approximate=approximate) * up.float()).to(gate.dtype)


def geglu(gate, up, approximate="tanh", backend=None):
    if pick_backend(backend, gate) == "ref":
        return geglu_ref(gate, up, approximate)
    raise NotImplementedError("Triton geglu: issue 3")
