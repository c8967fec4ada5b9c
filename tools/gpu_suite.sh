#!/bin/bash
# GPU work in few device calls (each fits the 10-minute limit): run from the repo root on the GPU machine.
#   bash tools/gpu_suite.sh T [FILE...]   GPU tests (all, or the files given), one pytest process per file
#   bash tools/gpu_suite.sh K [ITEMS]   kernel sweeps and benchmarks: swiglu nf4sweep nf4 attention kernels ce (default all)
#   bash tools/gpu_suite.sh E [ITEMS]   end to end, hare and the anchors in the same call (needs .anchors/ and
#                               .whl/site.tar.xz, see ../shared/bench-anchors/README.md); items below
#   bash tools/gpu_suite.sh L SYSTEM   longest batch-1 sequence of hare or unsloth_4bit under a memory cap (as E)
# Carry: .anchors and .whl/site.tar.xz for E (the bitsandbytes wheel in .whl/ for T's bnb oracle, if wanted).
# Results land in $OUT. Budget: T ~5-7 min (the attention tests compile for ~4 min), K ~6 min, E ~4 min per pair of items, L ~9 min.
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
  # four lanes of pytest processes at once (the GPU has room; Triton compiles are CPU-bound), each file's
  # failures printed after all lanes end
  [ -f .bench/diag.py ] && timeout 200 python3 .bench/diag.py > "$OUT/diag.log" 2>&1 &
  lane() { for f in "$@"; do
      timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q -p no:cacheprovider --tb=short -rf ${PYTEST_K:+-k "$PYTEST_K"} "$f" \
        > "$OUT/pytest_$(basename $f .py).log" 2>&1
    done; }
  if [ $# -gt 1 ]; then  # `T FILE...`: those files, one process each
    for f in "${@:2}"; do lane "$f" & done
  else
    lane tests/models/test_gpu_families.py tests/kernels/test_rope.py &
    lane tests/kernels/test_attention.py &
    lane tests/models/test_gpu_parity.py tests/engine/test_gpu.py tests/kernels/test_rms_norm.py &
    lane tests/kernels/test_cross_entropy.py tests/kernels/test_lora.py tests/kernels/test_swiglu.py \
         tests/kernels/test_geglu.py tests/quant &
  fi
  wait
  [ -f "$OUT/diag.log" ] && tail -40 "$OUT/diag.log"
  for f in "$OUT"/pytest_*.log; do
    echo "=== $f"; grep -E "passed|failed|^FAILED|Error:|Timeout" "$f" | head -12
  done ;;
K)
  # the named items only (default: all), e.g. `K swiglu attention`
  ITEMS=${2:-swiglu nf4sweep nf4 attention kernels ce}
  for it in $ITEMS; do case $it in
  swiglu) timeout 120 python3 -m hare.tools.bench_kernels --sweep --only swiglu geglu --out "$OUT/sweep_glu.json" 2>&1 | tail -40 ;;
  nf4sweep) timeout 150 python3 -m hare.tools.sweep_nf4 --budget 130 --out "$OUT/sweep_nf4.json" 2>&1 | tail -40 ;;
  nf4) timeout 150 python3 -m hare.tools.bench_nf4 --out "$OUT/bench_nf4.json" 2>&1 | tail -45 ;;
  attention) timeout 150 python3 -m hare.tools.sweep_attention --out "$OUT/sweep_attention.json" 2>&1 | tail -40 ;;
  kernels) timeout 120 python3 -m hare.tools.bench_kernels --tokens 16384 --out "$OUT/bench_kernels.json" 2>&1 | tail -20 ;;
  ce) timeout 100 python3 -m hare.tools.bench_cross_entropy --out "$OUT/bench_ce.json" 2>&1 | tail -12 ;;
  esac; done ;;
E)
  # end to end, hare and Unsloth in the same call, by items (default q4 b16; one call holds about two pairs):
  #   q4 / b16: 8B QLoRA / 16-bit LoRA, 2048 x 4, hare --gc offload (stash auto) then Unsloth
  #   long: 8B QLoRA 32768 x 1, both; 1b: 1B QLoRA, both; auto: hare --gc auto --budget-gib 36, then a profile
  #   g1b: 1B QLoRA graphed with a profile, then Unsloth and hare graphed alternating twice (Unsloth's 1B step is
  #        host-bound too: 38.6k and 54.9k tok/s in two calls of session 8)
  #   autou: hare 8B QLoRA auto graphed, Unsloth 8B QLoRA without checkpointing (the auto target's baseline),
  #          hare again
  #   q4none: hare 8B QLoRA offload without stashed blocks; profile: hare 8B QLoRA offload with --profile 12
  #   hf: hare 8B QLoRA offload, then HF+PEFT+bitsandbytes (the loss reference)
  #   det: hare 8B QLoRA offload twice with --deterministic (are the losses equal run to run, at what speed)
  #   hfseed: hare 8B QLoRA offload, again with --deterministic, then HF+PEFT+bitsandbytes from the same LoRA init
  #   graph: 1B QLoRA offload from a CUDA graph, Unsloth 1B, then hare eager and graphed again (the 1B step is
  #          host-bound eager), then 8B QLoRA offload eager and graphed, and auto graphed
  R=$OUT/results.jsonl
  H() { timeout 150 python3 -m hare.tools.bench_train --out "$R" --tag E "$@" 2>&1 | grep -E "RESULT|checkpointing|Error|profile:|idle gaps|^  "; }
  U() { OUT=$OUT bash .anchors/run_anchors.sh X 200 "$@" | grep -E "RESULT|rc="; }
  ck() { [ -f /tmp/ckpt_$1/tokenizer.json ] || timeout 150 python3 .anchors/make_ckpt.py $1 /tmp/ckpt_$1; }
  # the anchors' harness, unmodified, in a process whose global generator is seeded first (torch.manual_seed(0)):
  # PEFT's LoRA A then equals hare's (bench_train --seed 0, engine/lora.py peft_lora_A), the same weights for a
  # loss comparison (the harness itself seeds nothing before get_peft_model)
  S() { [ -f /tmp/site/.done ] || { mkdir -p /tmp/site && tar -C /tmp/site -xJf .whl/site.tar.xz && touch /tmp/site/.done; }
        PYTHONPATH=/tmp/site:$PYTHONPATH timeout 300 python3 -c "import runpy, sys, torch; torch.manual_seed(0); \
sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" "$PWD/.anchors/bench_lora.py" \
          --system $1 --model $2 --ckpt /tmp/ckpt_$2 --out "$R" --tag seeded 2>&1 | grep -E "RESULT|Error"; }
  Q="--quant 4bit --gc offload"
  G="--graph --warmup 4"  # from a CUDA graph: 3 eager warm-up steps (the link planner's), the capture in the 4th
  for it in ${2:-q4 b16}; do case $it in
  q4) ck 8b; H --ckpt /tmp/ckpt_8b $Q; U unsloth_4bit 8b ;;
  b16) ck 8b; H --ckpt /tmp/ckpt_8b --quant 16bit --gc offload; U unsloth_16bit 8b ;;
  long) ck 8b; H --ckpt /tmp/ckpt_8b $Q --seq 32768 --bs 1 --warmup 3 --steps 4
        U unsloth_4bit 8b --seq 32768 --bs 1 --warmup 2 --steps 4 ;;
  1b) ck 1b; H --ckpt /tmp/ckpt_1b --model 1b $Q; U unsloth_4bit 1b ;;
  auto) ck 8b; H --ckpt /tmp/ckpt_8b --quant 4bit --gc auto --budget-gib 36 --profile 40 ;;
  q4none) ck 8b; H --ckpt /tmp/ckpt_8b $Q --stash none ;;
  hf) ck 8b; H --ckpt /tmp/ckpt_8b $Q; U hf_bnb4 8b ;;
  det) ck 8b; H --ckpt /tmp/ckpt_8b $Q --deterministic; H --ckpt /tmp/ckpt_8b $Q --deterministic ;;
  hfseed) ck 8b; H --ckpt /tmp/ckpt_8b $Q; H --ckpt /tmp/ckpt_8b $Q --deterministic; S hf_bnb4 8b ;;
  graph) ck 1b; H --ckpt /tmp/ckpt_1b --model 1b $Q $G; U unsloth_4bit 1b
        for g in "" "$G"; do H --ckpt /tmp/ckpt_1b --model 1b $Q $g; done
        ck 8b; for g in "" "$G"; do H --ckpt /tmp/ckpt_8b $Q $g; done
        H --ckpt /tmp/ckpt_8b --quant 4bit --gc auto --budget-gib 36 $G --profile 40 ;;
  profile) ck 8b; H --ckpt /tmp/ckpt_8b $Q --profile 12 ;;
  autou) # the auto target's ratio in one call: hare auto graphed, Unsloth with no checkpointing (its fastest
         # setting, the target's baseline), hare again
         ck 8b; A="--ckpt /tmp/ckpt_8b --quant 4bit --gc auto --budget-gib 36 $G"
         H $A; U unsloth_4bit 8b --gc off; H $A ;;
  g1b) # 1B graphed with a profile, then Unsloth and hare graphed, alternating, twice
       ck 1b; H --ckpt /tmp/ckpt_1b --model 1b $Q $G --profile 30
       for i in 1 2; do U unsloth_4bit 1b; H --ckpt /tmp/ckpt_1b --model 1b $Q $G; done ;;
  esac; done
  python3 .anchors/summarize.py "$R" --md ;;
L)
  # longest 8B QLoRA sequence at batch 1 of one system (`L unsloth_4bit` or `L hare`: one call each, a probe of
  # Unsloth costs 60-100 s with its compile), each probe its own process, under a GPU memory cap of CAP GiB
  # (default 16, the same for both; CAP=none for the whole GPU, where steps at the limit take minutes).
  # Brackets (guesses: LO trains, HI does not; longest_seq moves a wrong one) around the CAP=16 results of runs
  # S6-2 / S6-4 (BENCHMARKS.md): Unsloth 40,960, hare 73,728; STEP 2048 resolves a ratio near 1.5x (4-5 probes).
  SYS=${2:-hare}; CAP=${CAP:-16}; CAPARG=$([ "$CAP" = none ] || echo "--cap-gib $CAP")
  if [ "$SYS" = hare ]; then LO=${LO:-65536}; HI=${HI:-81920}; else LO=${LO:-36864}; HI=${HI:-45056}; fi
  [ -f /tmp/ckpt_8b/tokenizer.json ] || timeout 120 python3 .anchors/make_ckpt.py 8b /tmp/ckpt_8b
  timeout 540 python3 -m hare.tools.longest_seq --system "$SYS" --ckpt /tmp/ckpt_8b --lo $LO --hi $HI \
    --step ${STEP:-2048} $CAPARG --probe-timeout 150 --out "$OUT/longest.jsonl" 2>&1 | grep -E "^\{|LONGEST|holding" ;;
esac
