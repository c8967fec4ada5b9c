"""tools/bench_train.py runs end to end (CPU, tiny model) and writes the anchor harness's fields."""
import json

import pytest
import torch

from hare.tools.bench_train import main


@pytest.mark.parametrize("quant, gc", [("16bit", "on"), ("4bit", "offload")])
def test_bench_train_smoke(tiny_llama, tmp_path, quant, gc):
    out = tmp_path / "r.jsonl"
    assert main(["--ckpt", str(tiny_llama), "--model", "tiny", "--quant", quant, "--gc", gc, "--seq", "16",
                 "--bs", "2", "--warmup", "1", "--steps", "2", "--vocab", "50", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["status"] == "ok" and rec["system"] == f"hare_{quant}"
    assert len(rec["losses"]) == 3 and rec["tokens_per_s"] > 0 and rec["trainable_params"] > 0


def test_bench_train_deterministic(tiny_llama, tmp_path, monkeypatch):
    """--deterministic: the step runs under torch's deterministic mode (no op of it refuses) and says so, and two
    runs give the same losses whatever the global generator holds (the LoRA init comes from --seed); the
    process-wide settings it makes are undone here for the tests that follow."""
    import torch

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    out = tmp_path / "r.jsonl"
    try:
        for i in range(2):
            torch.manual_seed(i)  # the global generator differs: the adapters' init must not read it (--seed 0)
            assert main(["--ckpt", str(tiny_llama), "--model", "tiny", "--quant", "4bit", "--gc", "offload",
                         "--seq", "16", "--bs", "2", "--warmup", "1", "--steps", "1", "--vocab", "50",
                         "--out", str(out), "--deterministic"]) == 0
            assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["status"] == "ok" and r["deterministic"] and r["lora_seed"] == 0 for r in recs)
    assert recs[0]["losses"] == recs[1]["losses"]


def test_bench_train_graph_flags(tiny_llama, tmp_path):
    """--graph needs two warm-up steps (eager, then the capture), four with offload, and a CUDA model: on the CPU
    the run fails with CUDAGraphStep's error, recorded in the JSON line; with a GPU it trains from the graph."""
    out = tmp_path / "r.jsonl"
    args = ["--ckpt", str(tiny_llama), "--model", "tiny", "--quant", "16bit", "--gc", "on", "--seq", "16", "--bs",
            "2", "--steps", "1", "--vocab", "50", "--out", str(out), "--graph"]
    with pytest.raises(SystemExit):
        main(args + ["--warmup", "1"])
    with pytest.raises(SystemExit):  # offload's link planner: three eager forwards before the capture
        main([a if a != "on" else "offload" for a in args] + ["--warmup", "3"])
    cuda = torch.cuda.is_available()
    assert main(args + ["--warmup", "2"]) == (0 if cuda else 1)
    rec = json.loads(out.read_text().splitlines()[-1])
    if cuda:
        assert rec["status"] == "ok" and rec["graph"], rec
    else:
        assert rec["status"] == "error" and rec["graph"] and "CUDA device" in rec["error"]
