#!/bin/bash
# One device call per phase (each fits the 10-minute limit): run from the repo root on the GPU machine.
#   bash tools/gpu_suite.sh T   GPU tests: kernels, quant, engine GPU cases, bf16 model parity
#   bash tools/gpu_suite.sh K   kernel benchmarks: elementwise (+ torch.compile), cross-entropy, NF4, attention
#   bash tools/gpu_suite.sh E   end to end: hare vs Unsloth on 8B QLoRA (needs .anchors/ and .whl/site.tar.xz,
#                               see ../shared/bench-anchors/README.md), then the other workloads as budget allows
# Carry: .whl (bitsandbytes wheel or site.tar.xz) and .anchors when used. Results land in $OUT.
set -u
PHASE=${1:-T}
OUT=${OUT:-/tmp/hare_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# hare without installing: a folder holding a `hare` link to the repo
mkdir -p /tmp/hare_site && ln -sfn "$PWD" /tmp/hare_site/hare
export PYTHONPATH=/tmp/hare_site:${PYTHONPATH:-}
if ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/bnb .whl/bitsandbytes-*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/bnb
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
git log -1 --format='commit %h %ci' 2>/dev/null | tee -a "$OUT/env.txt"

case "$PHASE" in
T)
  timeout 560 python3 -m pytest -q -p no:cacheprovider -s tests/kernels tests/quant tests/engine/test_gpu.py \
    tests/models/test_gpu_parity.py 2>&1 | tee "$OUT/pytest.log" | tail -40 ;;
K)
  timeout 200 python3 -m hare.tools.bench_kernels --out "$OUT/bench_kernels.json" 2>&1 | tail -30
  timeout 120 python3 -m hare.tools.bench_cross_entropy --out "$OUT/bench_ce.json" 2>&1 | tail -15
  timeout 90 python3 -m hare.tools.bench_nf4 --out "$OUT/bench_nf4.json" 2>&1 | tail -25
  timeout 150 python3 -m hare.tools.bench_attention --out "$OUT/bench_attention.json" 2>&1 | tail -30 ;;
E)
  [ -f /tmp/ckpt_8b/config.json ] || timeout 200 python3 .anchors/make_ckpt.py 8b /tmp/ckpt_8b
  timeout 200 python3 -m hare.tools.bench_train --ckpt /tmp/ckpt_8b --quant 4bit --out "$OUT/results.jsonl" --tag E
  OUT=$OUT bash .anchors/run_anchors.sh X 250 unsloth_4bit 8b
  python3 .anchors/summarize.py "$OUT/results.jsonl" --md ;;
esac
