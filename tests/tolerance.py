"""Tolerances derived from a control, never hand-tuned.

The kernel under test is compared with the fp64 reference; the control is the same reference run in the
kernel's own (low) dtype. The kernel may be at most `factor` (2x) further from the truth than the control,
plus a floor of a few ulps of the dtype at the output's scale (so an fp32 control that happens to be exact does
not demand the impossible).
"""
import torch


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_ref(out, ref64, control, name="output", factor=2.0, ulps=4):
    """out: kernel result; ref64: reference in fp64; control: reference in the kernel's dtype."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = max_err(out, ref64)
    ctrl = max_err(control, ref64)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    floor = ulps * torch.finfo(out.dtype).eps * max(scale, 1.0) if out.is_floating_point() else 0.0
    bound = factor * ctrl + floor
    assert err <= bound, f"{name}: max err {err:.3e} > {factor}x control {ctrl:.3e} + floor {floor:.1e}"
    return err, ctrl
