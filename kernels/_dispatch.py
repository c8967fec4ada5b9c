"""Backend choice shared by every op: explicit, no environment switches, no module state.

`backend=None` picks Triton for CUDA tensors and the pure-PyTorch `_ref` for everything else; a test may ask
for `"triton"` on CPU tensors, which then runs under the Triton interpreter (TRITON_INTERPRET=1, set by the test).
"""
import functools

import torch

BACKENDS = ("triton", "ref")


def pick_backend(backend, x: torch.Tensor) -> str:
    if backend is None:
        return "triton" if x.is_cuda else "ref"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'triton' or 'ref', got {backend!r}")
    return backend


def interpreting(x: torch.Tensor) -> bool:
    """True when a Triton launch on `x` goes through the interpreter (CPU tensors). The interpreter's `tl.dot`
    on bf16 inputs returns garbage (seen with triton 3.6 and 3.9), so dot kernels upcast to fp32 there."""
    return not x.is_cuda


def device_properties(device):
    """torch.cuda.get_device_properties of a CUDA device, asked once per device (launchers read it per call)."""
    device = torch.device(device)
    return _cuda_properties(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_properties(index):
    return torch.cuda.get_device_properties(index)


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device, for grids sized per SM; 1 elsewhere (the interpreter runs the
    programs one after another)."""
    return device_properties(device).multi_processor_count if torch.device(device).type == "cuda" else 1
