"""Triton device functions shared by the kernels (host-side helpers live in _dispatch.py).

Rounding to bf16 under the interpreter. On the GPU `x.to(tl.bfloat16)` rounds fp32 to the nearest bf16, ties to
even (cvt.rn.bf16.f32). The Triton interpreter (TRITON_INTERPRET=1, how the CPU tests run the kernels) truncates
instead: triton 3.6 runtime/interpreter.py `cast_impl` converts fp32 <-> bf16 with `_convert_float(...,
rounding_mode=None)`, which drops the 16 low bits (its "rtne" mode is no better: it rounds halves up and ORs a
mantissa carry into the exponent field instead of adding it). `tl.store` of fp32 values through a bf16 pointer
takes the same path. A truncated value is up to 1 ulp off instead of 1/2, so interpreted kernels were up to 2x
less accurate than the same kernels on the GPU, and the tests' tolerances had to hide that.
fp16 is not affected: the interpreter casts with numpy's `astype(float16)`, which rounds to nearest even (checked
bit for bit against torch, both `.to()` and a store through an fp16 pointer, on 1e5 values of every magnitude,
ties, subnormals, overflow, inf and NaN).
Left as it is: the interpreter's bf16 -> fp32 conversion (loads of bf16 tensors) is exact except for bf16
subnormals (|x| < 1.2e-38), which it misreads; no test data holds them.

So kernels cast to their low-precision dtypes through `cast(x, dtype, INTERPRET)`, with INTERPRET a constexpr
that the launcher sets from `_dispatch.interpreting(tensor)`: False for CUDA tensors, where the `if` disappears
at compile time and the kernel is exactly `x.to(dtype)` (the same PTX as before this helper existed).
"""
import triton
import triton.language as tl


@triton.jit
def round_to_bf16_rtne(x):
    """fp32 x rounded to the nearest bf16 (ties to even), returned as fp32 (exact in bf16: its low 16 bits are 0).

    Standard bit trick on the fp32 pattern u: add 0x7FFF plus the lowest kept bit (bit 16), then clear the 16
    dropped bits. Below the halfway point the sum does not reach bit 16; above it, it carries one ulp into the
    kept bits; exactly at it, 0x8000 + 0x7FFF + b reaches bit 16 only when the kept value is odd (b = 1): ties
    to even. A carry out of the mantissa increments the exponent, as rounding up into the next binade should,
    and values past bf16's largest finite one round to inf, as on the GPU; inf stays inf (low bits 0). A NaN's
    payload could carry into the sign bit or be cleared to zero (which reads as inf), so NaNs pass through with
    their quiet bit set instead."""
    u = x.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, u | 0x00400000, rounded).to(tl.float32, bitcast=True)


@triton.jit
def cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x.to(dtype), rounded to nearest even on the interpreter as on the GPU. dtype: the target element type
    (e.g. `out_ptr.dtype.element_ty`); INTERPRET: `_dispatch.interpreting(...)` of the launch's tensors. Only
    bf16 needs the hand rounding; every other cast is `x.to(dtype)` on both backends. The rounded value's top
    16 bits are the bf16 pattern and are reinterpreted as such rather than cast again: the interpreter's
    fp32 -> bf16 conversion also mangles fp32 subnormals (it normalizes their significand and then drops the
    leading one), and truncation would turn a NaN with a low-bits-only payload into inf."""
    if INTERPRET and dtype == tl.bfloat16:
        u = round_to_bf16_rtne(x.to(tl.float32)).to(tl.uint32, bitcast=True)
        y = (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y
