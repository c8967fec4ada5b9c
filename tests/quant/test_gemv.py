"""Fused 4-bit GEMV (interpreter on CPU) vs gemv_nf4_ref in fp64, tolerance from the ref in the input dtype.

The oracle dequantizes the weight to the input dtype (the kernel's definition: the 16-bit model's weight) and
sums in fp64; the control is the same reference summing in fp32 and rounding to the input dtype."""
import math

import pytest
import torch

from hare.quant import gemv_nf4, gemv_nf4_ref, quantize_nf4
from hare.quant.gemv import GEMV_CONFIGS, GemvConfig, gemv_config, launch_gemv
from tests.quant.bnb_oracle import DEVICE
from tests.tolerance import assert_close_to_ref

# triton 3.6's interpreter itself warns when a loop bound is a kernel argument (its scalars are 1-element arrays)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# aligned: K a multiple of the blocksize (every real model; K=1088 takes 3 steps of 512 bytes, the last ragged);
# general: K not a multiple (K=70), or odd (K=33: rows share bytes)
CASES = [((37, 128), 64), ((20, 1088), 64), ((9, 256), 128), ((13, 70), 64), ((5, 33), 64), ((3, 4096), 4096)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", CASES, ids=str)
def test_gemv_matches_ref(shape, blocksize, double_quant, dtype):
    gen = torch.Generator().manual_seed(0)
    n, k = shape
    w = quantize_nf4((torch.randn(shape, generator=gen) * 0.05).to(DEVICE), blocksize, double_quant)
    x = torch.randn(1, 1, k, generator=gen).to(dtype).to(DEVICE)
    y = gemv_nf4(x, w, backend="triton")
    assert y.shape == (1, 1, n) and y.dtype == dtype
    # the kernel sums K fp32 products in its own order (per-tile partial sums, then a tree), whose rounding
    # bound grows as log2(K) ulps of the result; cuBLAS (the GPU control) can sum more exactly than that, which
    # once failed the default 4-ulp floor at K=4096 in fp32 (err 7 ulps). The floor follows the bound.
    ulps = max(4, math.ceil(math.log2(k)))
    assert_close_to_ref(y, gemv_nf4_ref(x.double(), w, weight_dtype=dtype), gemv_nf4_ref(x, w), "y", ulps=ulps)


# Every code path, as tools/sweep_nf4.py launches them. Split-K: K = 320 is 40 words; 8-word steps in 3 chunks
# of 2 steps = 16, 16 and 8 words; K = 1088 is 136 words: 16-word steps, split 4 -> chunks of 3 steps = 48, 48, 40
# words (3 chunks: K is not a multiple of the split). N = 1 leaves most of a program's rows out of range;
# block_k 8 words on blocksize 128 is raised to one block (16 words); K = 70 takes the general path, which
# ignores split_k.
SPLIT_CASES = [((1, 320), 64, GemvConfig(2, 8, 2, split_k=3)),
               ((1, 320), 64, GemvConfig(1, 16, 1, split_k=8, lut="gather", fp_fusion=True)),
               ((37, 1088), 64, GemvConfig(4, 16, 2, split_k=4, lut="gather", num_stages=2)),
               ((37, 1088), 64, GemvConfig(16, 32, 4, split_k=2, fp_fusion=True)),
               ((9, 256), 128, GemvConfig(4, 8, 2, split_k=2, lut="gather")),
               ((5, 1088), 64, GemvConfig(2, 64, 4, lut="gather", num_stages=3, fp_fusion=True)),
               ((13, 70), 64, GemvConfig(2, 8, 2, split_k=3, lut="gather", fp_fusion=True))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,blocksize,config", SPLIT_CASES, ids=str)
def test_gemv_configs_match_ref(shape, blocksize, config, dtype):
    gen = torch.Generator().manual_seed(1)
    n, k = shape
    w = quantize_nf4((torch.randn(shape, generator=gen) * 0.05).to(DEVICE), blocksize)
    x = torch.randn(1, k, generator=gen).to(dtype).to(DEVICE)
    y = torch.full((1, n), float("nan"), dtype=dtype, device=DEVICE)
    launch_gemv(x, w, y, config)
    ulps = max(4, math.ceil(math.log2(k)))
    assert_close_to_ref(y, gemv_nf4_ref(x.double(), w, weight_dtype=dtype), gemv_nf4_ref(x, w), "y", ulps=ulps)


def test_config_table_and_preconditions():
    x, w = torch.randn(1, 64, device=DEVICE), quantize_nf4(torch.randn(2, 64, device=DEVICE))
    for _, _, config in GEMV_CONFIGS:  # a table edited after a sweep still holds valid configs
        y = torch.full((1, 2), float("nan"), device=DEVICE)
        launch_gemv(x, w, y, config)
        assert_close_to_ref(y, gemv_nf4_ref(x.double(), w, weight_dtype=x.dtype), gemv_nf4_ref(x, w), "y", ulps=6)
    assert gemv_config(2 ** 20, 2 ** 20) == GEMV_CONFIGS[-1][2]  # the last row bounds nothing
    w = quantize_nf4(torch.randn(2, 64, device=DEVICE))
    for bad, match in [(GemvConfig(3, 8, 2), "power of 2"), (GemvConfig(2, 8, 2, lut="select"), "lut"),
                       (GemvConfig(2, 8, 2, lut="pairs"), "'load' or 'gather'"),  # removed (quant/dequant.py)
                       (GemvConfig(2, 8, 2, split_k=0), "split_k"), ((2, 8, 2), "GemvConfig")]:
        with pytest.raises(ValueError, match=match):
            launch_gemv(torch.randn(1, 64, device=DEVICE), w, torch.empty(1, 2, device=DEVICE), bad)


def test_gemv_preconditions():
    w = quantize_nf4(torch.randn(8, 64, device=DEVICE))
    with pytest.raises(ValueError, match="one row"):
        gemv_nf4(torch.randn(2, 64, device=DEVICE), w)
    with pytest.raises(ValueError, match="in_features=64"):
        gemv_nf4(torch.randn(1, 32, device=DEVICE), w)
    with pytest.raises(ValueError, match="2-D"):
        gemv_nf4(torch.randn(64, device=DEVICE), quantize_nf4(torch.randn(2, 4, 64, device=DEVICE)))


def test_offline_sass_counts(tmp_path):
    """tools/sass_nf4.py compiles the kernels for sm_90a without a GPU (the ptxas in triton's wheel) and counts the
    SASS instructions of their loop per weight: it keeps working as the kernels' signatures change, the loop it
    finds holds the table lookups (one shared-memory load per weight for lut "gather", a global one for "load"),
    and "gather" issues fewer instructions per weight than "load" in both kernels, as their docstrings say. In a
    process of its own: this one runs Triton's interpreter, whose kernels cannot be compiled."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "sass.json"
    subprocess.run([sys.executable, "-m", "hare.tools.sass_nf4", "--gemv", "2,256,4,gather", "2,256,4,load",
                    "--dequant", "2048,2,gather", "2048,2,load", "--out", str(out)], env=env, check=True,
                   capture_output=True)
    rows = {(r["kernel"], r["config"]["lut"]): r for r in json.loads(out.read_text())}
    assert len(rows) == 4, rows.keys()
    for (kernel, lut), row in rows.items():
        assert row["registers"] > 0, (kernel, lut)
        assert row["opcodes_per_weight"].get("LDS" if lut == "gather" else "LDG", 0) >= 1, (kernel, lut, row)
    per_weight = {key: row["loop_per_weight"] for key, row in rows.items()}
    for kernel in ("gemv", "dequant"):
        assert per_weight[kernel, "gather"] < per_weight[kernel, "load"], per_weight
