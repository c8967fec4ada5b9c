"""Projections of the decoder: q/k/v from one input, and the gated MLP.

The decoder calls `qkv(attn, x)` and `mlp(module, x)`; these are the single place where plain, LoRA and 4-bit
linears are told apart, so that the fused LoRA autograd functions (issue 5) can take over whole groups of
projections without the decoder knowing. Until they land, these run the modules as they are."""
from .geglu import geglu
from .swiglu import swiglu


def qkv(attn, x):
    return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)


def mlp(module, x):
    gate, up = module.gate_proj(x), module.up_proj(x)
    if module.act == "silu":
        h = swiglu(gate, up)
    else:  # gelu_pytorch_tanh / gelu_new / gelu_fast are the tanh approximation; "gelu" is exact erf
        h = geglu(gate, up, approximate="none" if module.act == "gelu" else "tanh")
    return module.down_proj(h)
