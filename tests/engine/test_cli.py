"""`hare train` and `hare merge` end to end on the tiny model (CPU)."""
import json
import shutil

import pytest
import torch

from hare import load_model
from hare.engine.checkpoint import load_adapter
from hare.tools.cli import main
from tests.engine.conftest import hf_model

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.fixture(scope="module")
def model_dir(tiny_llama, tiny_tokenizer_dir, tmp_path_factory):
    """The tiny model with the tiny tokenizer beside it: a complete checkpoint directory."""
    d = tmp_path_factory.mktemp("cli") / "model"
    shutil.copytree(tiny_llama, d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny_tokenizer_dir}/{f}", d / f)
    return str(d)


def _data(tmp_path, lines):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(p)


RECORDS = [{"instruction": f"Double {i}.", "output": str(2 * i)} for i in range(12)]


def test_train_then_merge(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--model", model_dir, "--data", _data(tmp_path, RECORDS), "--max_steps", "3",
               "--lr=1e-2", f"--output_dir={out}", "--progress=false", "--lora.r=4", "--lora.targets=q_proj,v_proj",
               "--max-seq-length=64"])
    assert rc == 0
    assert "trained 3 steps" in capsys.readouterr().out
    adapter = out / "adapter"
    config = json.load(open(adapter / "adapter_config.json"))
    assert config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"]

    assert main(["merge", "--model", model_dir, "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    adapted = load_adapter(load_model(model_dir), str(adapter))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        want = adapted(ids).logits
        got = hf_model(str(tmp_path / "merged"))(ids).logits
    assert (got - want).abs().max() <= 1e-5
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_train_rejects_unknown_options_and_bad_data(model_dir, tmp_path, capsys):
    data = _data(tmp_path, RECORDS)
    assert main(["train", "--model", model_dir, "--data", data, "--learning_rate=1"]) == 2
    assert "unknown option --learning_rate" in capsys.readouterr().err
    assert main(["train", "--model", model_dir, "--data", data, "--max_steps=many"]) == 2
    assert "expected int" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n{oops\n")
    assert main(["train", "--model", model_dir, "--data", str(bad), f"--output_dir={tmp_path / 'o'}",
                 "--progress=false"]) == 2
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["merge", "--model", model_dir, "--adapter", "x", "--out", "y", "--lr=1"])


def test_qlora_train_then_generate_with_the_adapter(model_dir, tmp_path, capsys):
    out = tmp_path / "qrun"
    rc = main(["train", "--model", model_dir, "--data", _data(tmp_path, RECORDS), "--max_steps", "2",
               f"--output_dir={out}", "--progress=false", "--lora.r=4", "--max-seq-length=64", "--load-in-4bit"])
    assert rc == 0
    assert "trained 2 steps" in capsys.readouterr().out
    rc = main(["generate", "--model", model_dir, "--adapter", str(out / "adapter"), "--load-in-4bit",
               "--prompt", "Double 3.", "--max-new-tokens", "4", "--no-stream"])
    assert rc == 0
