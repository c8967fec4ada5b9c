"""backend="triton" on CPU tensors runs Triton's interpreter, which tests/conftest.py turns on only where no GPU is
present. On a GPU machine the compiled kernels refuse CPU tensors, so the CPU-model tests that ask for "triton"
are skipped there; the GPU test files (tests/*/test_gpu*.py, the kernel tests on CUDA tensors) run those paths."""
import os

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="backend='triton' on CPU tensors needs Triton's "
                                       "interpreter, which tests/conftest.py enables only without a GPU")
# the backends of a test on CPU tensors: the reference always, the Triton path where it can run on the CPU
BACKENDS = ["ref", pytest.param("triton", marks=needs_interpreter)]
