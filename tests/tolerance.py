"""Tolerances derived from a control, never hand-tuned.

The kernel under test is compared with the fp64 reference; the control is the same reference run in the
kernel's own (low) dtype. The kernel may be at most `factor` (2x) further from the truth than the control,
plus a floor:
  fp32 / fp64 outputs: `ulps` (4) ulps of the dtype at max(the output's scale, 1), because an fp32 control can
    be exact or nearly so where the kernel legitimately differs by a few roundings (another summation order,
    exp2 instead of exp).
  fp16 / bf16 outputs: negligible, 1e-3 ulp of the dtype at the output's scale. A 16-bit control carries its
    own final rounding (close to half an ulp somewhere in any random tensor), so 2x the control alone admits the
    kernel's final rounding; the floor adds nothing that would hide a cast that truncates instead of rounding
    (up to 1 ulp off). Where a 16-bit control is exact (an identically-zero truth that the reference reproduces
    by algebra), nothing is allowed beyond the floor: such a test must bound the kernel's fp32 residue itself.
The 16-bit floor can be this tight because the Triton interpreter now rounds fp32 -> bf16 to nearest even as
the GPU does (kernels/_triton.py: cast) instead of truncating, which made CPU results up to 1 ulp off and used to
be hidden by a 4-ulp floor for every dtype.
"""
import torch

# the 16-bit floor, in ulps of the dtype at the output's scale
LOW_PRECISION_FLOOR_ULPS = 1e-3


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def error_floor(dtype, scale, ulps=4):
    """The absolute error allowed on top of `factor` x the control's (see the module docstring)."""
    if not dtype.is_floating_point:
        return 0.0
    eps = torch.finfo(dtype).eps
    if dtype in (torch.float32, torch.float64):
        return ulps * eps * max(scale, 1.0)
    return LOW_PRECISION_FLOOR_ULPS * eps * scale


def assert_close_to_ref(out, ref64, control, name="output", factor=2.0, ulps=4):
    """out: kernel result; ref64: reference in fp64; control: reference in the kernel's dtype.
    `ulps` sets the floor of fp32/fp64 outputs only (16-bit outputs get the negligible floor)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = max_err(out, ref64)
    ctrl = max_err(control, ref64)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    floor = error_floor(out.dtype, scale, ulps)
    bound = factor * ctrl + floor
    assert err <= bound, f"{name}: max err {err:.3e} > {factor}x control {ctrl:.3e} + floor {floor:.1e}"
    return err, ctrl
