import os

import torch

# Without a GPU, Triton kernels run through the interpreter. It must be chosen before any kernel is defined,
# i.e. before hare.kernels is imported; conftest runs first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
