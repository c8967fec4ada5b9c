"""tools/bench_train.py runs end to end (CPU, tiny model) and writes the anchor harness's fields."""
import json

import pytest

from hare.tools.bench_train import main


@pytest.mark.parametrize("quant, gc", [("16bit", "on"), ("4bit", "offload")])
def test_bench_train_smoke(tiny_llama, tmp_path, quant, gc):
    out = tmp_path / "r.jsonl"
    assert main(["--ckpt", str(tiny_llama), "--model", "tiny", "--quant", quant, "--gc", gc, "--seq", "16",
                 "--bs", "2", "--warmup", "1", "--steps", "2", "--vocab", "50", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["status"] == "ok" and rec["system"] == f"hare_{quant}"
    assert len(rec["losses"]) == 3 and rec["tokens_per_s"] > 0 and rec["trainable_params"] > 0
