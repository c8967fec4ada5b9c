"""Loading: sharded checkpoints, export round trips, the hub path (offline cache), and bad input — each bad
input gives one hare error that names the file or key at fault."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from hare import (CheckpointError, ConfigError, UnsupportedModelError, load_model, save_model)

CFG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=50, hidden_size=16,
           intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
           max_position_embeddings=32, rms_norm_eps=1e-5, torch_dtype="float32")


def _random_state(cfg):
    torch.manual_seed(0)
    from hare.models import CausalLM, config_from_dict

    with torch.device("meta"):
        m = CausalLM(config_from_dict(cfg))
    return {n: torch.randn(p.shape) for n, p in m.named_parameters()}


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CFG))
    save_file(_random_state(CFG), str(d / "model.safetensors"))
    return d


def test_sharded_round_trip_is_byte_identical(ckpt, tmp_path):
    m = load_model(str(ckpt))
    out = tmp_path / "sharded"
    save_model(m, str(out), max_shard_bytes=4000)
    assert (out / "model.safetensors.index.json").exists()
    shards = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))
    assert len(shards) > 1
    m2 = load_model(str(out))
    for (n, a), (n2, b) in zip(m.named_parameters(), m2.named_parameters()):
        assert n == n2 and torch.equal(a, b)
    again = tmp_path / "again"
    save_model(m2, str(again))
    save_model(m, str(tmp_path / "single"))
    assert (again / "model.safetensors").read_bytes() == (tmp_path / "single" / "model.safetensors").read_bytes()
    ref = load_file(str(ckpt / "model.safetensors"))
    got = load_file(str(again / "model.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_dtype_and_frozen(ckpt):
    m = load_model(str(ckpt), dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in m.parameters())


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no-such-dir"):
        load_model(str(tmp_path / "no-such-dir"))


def test_missing_config(ckpt):
    os.remove(ckpt / "config.json")
    with pytest.raises(ConfigError, match="config.json"):
        load_model(str(ckpt))


def test_unknown_model_type(ckpt):
    (ckpt / "config.json").write_text(json.dumps(dict(CFG, model_type="mamba9")))
    with pytest.raises(UnsupportedModelError, match="mamba9"):
        load_model(str(ckpt))


def test_missing_extra_misshaped_listed_together(ckpt):
    sd = load_file(str(ckpt / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    sd["model.norm.weight"] = torch.zeros(17)
    save_file(sd, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_model(str(ckpt))
    msg = str(e.value)
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected (1): model.layers.0.self_attn.extra.weight" in msg
    assert "mis-shaped (1): model.norm.weight" in msg


def test_truncated_safetensors(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(str(ckpt))


def test_corrupt_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(str(ckpt))


def _shard(ckpt, names):
    sd = load_file(str(ckpt / "model.safetensors"))
    os.remove(ckpt / "model.safetensors")
    keys = sorted(sd)
    half = len(keys) // 2
    weight_map = {k: names[0] if i < half else names[1] for i, k in enumerate(keys)}
    return sd, keys, half, weight_map


def test_shard_named_in_index_but_absent(ckpt):
    sd, keys, half, wm = _shard(ckpt, ["a.safetensors", "b.safetensors"])
    save_file({k: sd[k] for k in keys[:half]}, str(ckpt / "a.safetensors"))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match="b.safetensors"):
        load_model(str(ckpt))


def test_index_naming_a_file_outside_is_refused(ckpt, tmp_path):
    sd, keys, half, wm = _shard(ckpt, ["a.safetensors", "../x.safetensors"])
    save_file({k: sd[k] for k in keys[:half]}, str(ckpt / "a.safetensors"))
    save_file({k: sd[k] for k in keys[half:]}, str(tmp_path / "x.safetensors"))  # loadable, must not be used
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match=r"outside the checkpoint directory refused: \['\.\./x\.safetensors'\]"):
        load_model(str(ckpt))


def test_pickle_only_checkpoint_refused(ckpt):
    os.remove(ckpt / "model.safetensors")
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(str(ckpt))


def test_hub_id_from_offline_cache_with_revision(ckpt, tmp_path):
    """A hub id resolves through huggingface_hub's cache with HF_HUB_OFFLINE=1 (no network), at a pinned
    revision; an id that is not cached gives a CheckpointError that says offline mode."""
    cache = tmp_path / "hub"
    repo = cache / "models--someorg--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    shutil.copytree(ckpt, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    code = ("import hare, sys\n"
            "m = hare.load_model('someorg/tiny', revision=sys.argv[1])\n"
            "print('ok', m.config.hidden_size)\n"
            "try:\n    hare.load_model('someorg/absent')\n"
            "except hare.CheckpointError as e:\n    print('err', 'offline' in str(e))\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"))
    for rev in ("main", commit):
        r = subprocess.run([sys.executable, "-c", code, rev], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["ok", "16", "err", "True"]
