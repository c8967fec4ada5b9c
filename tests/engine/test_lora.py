"""LoRA on the decoder: the invariants (B = 0 is the base, a step leaves the base bytes alone, merge is
W + s B A), PEFT-format adapters both ways, and 20 optimizer steps against transformers + peft."""
import pytest
import torch

from hare import load_model
from hare.engine.checkpoint import load_adapter, save_adapter
from hare.engine.lora import LoRAConfig, LoRALinear, apply_lora, lora_modules, merge, trainable_parameters
from tests.engine.conftest import hf_model
from tests.interpreter import BACKENDS, needs_interpreter
from tests.tolerance import assert_close_to_ref

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _batch(seed, B=2, T=21, vocab=272):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt that is not a target
    labels[1, -3:] = -100  # and a padded tail
    return ids, labels


def _randomize_B(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def test_zero_B_is_the_base_exactly(tiny_llama):
    base = load_model(tiny_llama)
    model = apply_lora(load_model(tiny_llama), r=4, alpha=8, seed=0)
    ids, _ = _batch(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


@needs_interpreter
def test_zero_B_is_the_base_exactly_fused():
    """The fused functions with B = 0 give the bits of the plain projections (same activation kernel)."""
    from torch import nn

    from hare.kernels import lora as K
    from hare.kernels.swiglu import swiglu

    torch.manual_seed(0)
    attn, mlp = nn.Module(), nn.Module()
    for name, (i, o) in dict(q_proj=(32, 32), k_proj=(32, 16), v_proj=(32, 16)).items():
        setattr(attn, name, nn.Linear(i, o, bias=name == "k_proj"))
    for name, (i, o) in dict(gate_proj=(32, 40), up_proj=(32, 40), down_proj=(40, 32)).items():
        setattr(mlp, name, nn.Linear(i, o))
    mlp.act = "silu"
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        plain_qkv = K.qkv(attn, x)
        plain_mlp = mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x), backend="triton"))
        for parent in (attn, mlp):
            for name, m in list(parent.named_children()):
                setattr(parent, name, LoRALinear(m, r=3, scale=2.0, backend="triton"))
        for a, b in zip(K.qkv(attn, x), plain_qkv):
            assert torch.equal(a, b)
        assert torch.equal(K.mlp(mlp, x), plain_mlp)


def test_paths_and_trainable(tiny_llama):
    model = load_model(tiny_llama)
    before = {n: p for n, p in model.named_parameters()}
    apply_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    names = dict(model.named_parameters())
    # the base keeps its paths (and its tensors); only adapters train
    assert all(n in names and names[n] is p for n, p in before.items())
    assert sorted(trainable_parameters(model)) == sorted(n for n in names if ".lora_" in n)
    assert "model.layers.1.self_attn.q_proj.lora_A.weight" in names
    assert names["model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    assert not isinstance(model.model.layers[0].self_attn.k_proj, LoRALinear)
    with pytest.raises(ValueError, match="already"):
        apply_lora(model)


def test_bad_targets_named(tiny_llama):
    with pytest.raises(ValueError, match="qkv_proj"):
        apply_lora(load_model(tiny_llama), targets=("qkv_proj",))
    with pytest.raises(ValueError, match="r must"):
        LoRAConfig(r=0)


def test_peft_init_distribution(tiny_llama):
    """A: kaiming_uniform(a=sqrt 5) = U(-1/sqrt(in), 1/sqrt(in)); B: zeros; a seed gives the same adapters in every
    call (and another seed others), and leaves torch's global generator where it was."""
    m1 = apply_lora(load_model(tiny_llama), r=8, seed=5)
    state = torch.get_rng_state()
    m2 = apply_lora(load_model(tiny_llama), r=8, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    m3 = apply_lora(load_model(tiny_llama), r=8, seed=6)
    assert len(lora_modules(m1)) == len(lora_modules(m2)) == 2 * 7
    for (p, a), (q, b), (_, c) in zip(lora_modules(m1), lora_modules(m2), lora_modules(m3)):
        assert p == q and torch.equal(a.lora_A.weight, b.lora_A.weight) and not torch.equal(a.lora_A.weight,
                                                                                             c.lora_A.weight)
        bound = a.in_features ** -0.5
        assert a.lora_A.weight.abs().max() <= bound and a.lora_A.weight.abs().max() > 0.8 * bound
        assert not a.lora_B.weight.any() and not b.lora_B.weight.any()


@pytest.fixture(scope="module")
def llama_i96(tmp_path_factory):
    """The tiny Llama (2 layers, hidden 64, 4 heads, 2 kv heads) with intermediate size 96."""
    from tests.engine.conftest import save_tiny_llama
    return str(save_tiny_llama(tmp_path_factory.mktemp("i96") / "llama", intermediate_size=96))


@pytest.mark.parametrize("base", ["float32", "bfloat16", "nf4"])
def test_init_draws_peft_numbers(llama_i96, base):
    """torch.manual_seed(s) then apply_lora, or apply_lora(seed=s), gives every lora_A the bits that
    torch.manual_seed(s) then get_peft_model gives (PEFT's discarded draws included, and on a bf16 base its
    rounding of A to bf16 before the upcast to fp32; nf4: bitsandbytes' 4-bit base with bf16 compute), B = 0;
    seed=None leaves the global generator where PEFT leaves it."""
    transformers = pytest.importorskip("transformers")
    dtype = torch.float32 if base == "float32" else torch.bfloat16
    kw = {}
    if base == "nf4":
        pytest.importorskip("bitsandbytes")
        kw = dict(device_map={"": "cpu"}, quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
    seed, prefix, suffix = 1234, "base_model.model.", ".lora_A.default.weight"
    hf = transformers.LlamaForCausalLM.from_pretrained(llama_i96, dtype=dtype, **kw)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(ALL)))
    peft_next = torch.rand(8)  # where PEFT left the global generator
    want = {n[len(prefix):-len(suffix)]: p.detach() for n, p in pm.named_parameters() if n.endswith(suffix)}
    assert len(want) == 2 * 7 and all(a.dtype == torch.float32 for a in want.values())
    if base != "float32":  # not vacuous: PEFT's A went through bf16
        assert all(torch.equal(a, a.bfloat16().float()) for a in want.values())

    def hare():
        return load_model(llama_i96, dtype=dtype, load_in_4bit=base == "nf4")

    global_model = hare()
    torch.manual_seed(seed)
    apply_lora(global_model, r=8, alpha=16)
    assert torch.equal(torch.rand(8), peft_next)
    for model in (global_model, apply_lora(hare(), r=8, alpha=16, seed=seed)):
        got = dict(lora_modules(model))
        assert sorted(got) == sorted(want)
        for path, m in got.items():
            assert m.lora_A.weight.dtype == torch.float32 and torch.equal(m.lora_A.weight, want[path]), path
            assert m.lora_B.weight.shape == (m.out_features, 8) and not m.lora_B.weight.any(), path


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_leaves_base_bytes_untouched(tiny_llama, backend):
    model = apply_lora(load_model(tiny_llama), r=4, alpha=8, seed=0, backend=backend, train_embeddings=False)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-2)
    ids, labels = _batch(1)
    for _ in range(2):  # the second step moves A too (B is no longer zero)
        model(ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
            assert p.grad is None, n
    assert all(m.lora_B.weight.any() for _, m in lora_modules(model))


def test_merge_equals_W_plus_sBA(tiny_llama):
    model = apply_lora(load_model(tiny_llama, dtype=torch.float64), r=4, alpha=12, seed=0, rslora=True)
    _randomize_B(model)
    with torch.no_grad():  # fp64 math on the (fp32) adapters
        want = {p: m.weight + m.scaling * (m.lora_B.weight.double() @ m.lora_A.weight.double())
                for p, m in lora_modules(model)}
    assert all(m.scaling == 12 / 2 for _, m in lora_modules(model))  # rsLoRA: alpha / sqrt(r)
    ids, _ = _batch(2)
    with torch.no_grad():
        adapted = model(ids).logits
    merge(model)
    assert not lora_modules(model) and not trainable_parameters(model)
    for p, w in want.items():
        assert torch.equal(model.get_submodule(p).weight, w)
    with torch.no_grad():
        merged = model(ids).logits
    assert (merged - adapted).abs().max() < 1e-12


def test_merged_checkpoint_loads_in_transformers(tiny_llama, tmp_path):
    from hare import save_model

    model = apply_lora(load_model(tiny_llama), r=4, alpha=8, seed=0)
    _randomize_B(model)
    ids, _ = _batch(3)
    with torch.no_grad():
        adapted = model(ids).logits
    save_model(merge(model), str(tmp_path / "merged"))
    ref = hf_model(str(tmp_path / "merged"))
    with torch.no_grad():
        assert (ref(ids).logits - adapted).abs().max() < 1e-5


def _peft_model(path, r, alpha, targets=ALL, dropout=0.0, **kw):
    return peft.get_peft_model(hf_model(path), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                               lora_dropout=dropout, **kw))


def _copy_adapters(model, pm):
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for path, m in lora_modules(model):
            params[f"base_model.model.{path}.lora_A.default.weight"].copy_(m.lora_A.weight)
            params[f"base_model.model.{path}.lora_B.default.weight"].copy_(m.lora_B.weight)


def test_saved_adapter_loads_in_peft(tiny_llama, tmp_path):
    model = apply_lora(load_model(tiny_llama), r=4, alpha=8, seed=0, targets=("q_proj", "v_proj", "up_proj"))
    _randomize_B(model)
    save_adapter(model, str(tmp_path / "adapter"))
    pm = peft.PeftModel.from_pretrained(hf_model(tiny_llama), str(tmp_path / "adapter")).eval()
    ids, _ = _batch(4)
    with torch.no_grad():
        got, want = model(ids).logits, pm(ids).logits
    assert (got - want).abs().max() <= 1e-5
    # and back into a fresh hare model
    again = load_adapter(load_model(tiny_llama), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, got)


def test_loads_adapter_written_by_peft(tiny_llama, tmp_path):
    pm = _peft_model(tiny_llama, r=6, alpha=3, targets=("k_proj", "o_proj", "gate_proj", "down_proj"),
                     init_lora_weights=False, use_rslora=True)  # random B: a non-trivial adapter
    pm.save_pretrained(str(tmp_path / "from_peft"))
    model = load_adapter(load_model(tiny_llama), str(tmp_path / "from_peft"))
    assert model.lora_config.r == 6 and model.lora_config.rslora
    ids, _ = _batch(5)
    with torch.no_grad():
        assert (model(ids).logits - pm.eval()(ids).logits).abs().max() <= 1e-5


def test_adapter_mismatch_is_refused(tiny_llama, tmp_path):
    from hare import CheckpointError

    model = apply_lora(load_model(tiny_llama), r=4, seed=0)
    save_adapter(model, str(tmp_path / "a"))
    other = apply_lora(load_model(tiny_llama), r=8, seed=0)
    with pytest.raises(CheckpointError, match="does not match"):
        load_adapter(other, str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_adapter(load_model(tiny_llama), str(tmp_path / "b"))
    # PEFT options that change the math and that hare does not implement are refused by name
    import json
    config = json.load(open(tmp_path / "a" / "adapter_config.json"))
    for key, value in (("use_dora", True), ("rank_pattern", {"q_proj": 8}), ("bias", "all")):
        (tmp_path / key).mkdir()
        json.dump({**config, key: value}, open(tmp_path / key / "adapter_config.json", "w"))
        with pytest.raises(CheckpointError, match=f"{key}="):
            load_adapter(load_model(tiny_llama), str(tmp_path / key))
    # a tensor missing from the file is named
    from safetensors.torch import load_file, save_file
    (tmp_path / "c").mkdir()
    json.dump(config, open(tmp_path / "c" / "adapter_config.json", "w"))
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    gone = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    del tensors[gone]
    save_file(tensors, str(tmp_path / "c" / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=f"missing .1.: {gone}"):
        load_adapter(load_model(tiny_llama), str(tmp_path / "c"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_20_steps_match_transformers_peft(tiny_llama, backend):
    """Identical initial adapters and batches, AdamW on both sides: per-step losses within 1e-4 relative."""
    model = apply_lora(load_model(tiny_llama), r=4, alpha=8, seed=0, backend=backend)
    pm = _peft_model(tiny_llama, r=4, alpha=8)
    _copy_adapters(model, pm)
    pm.train()
    opt_h = torch.optim.AdamW(trainable_parameters(model).values(), lr=5e-3, weight_decay=0.01)
    opt_p = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.01)
    assert len(opt_h.param_groups[0]["params"]) == len(opt_p.param_groups[0]["params"]) == 2 * 7 * 2
    losses = []
    for step in range(20):
        ids, labels = _batch(100 + step % 4)  # a few batches seen again: the loss must fall
        lh = model(ids, labels=labels).loss
        lp = pm(input_ids=ids, labels=labels).loss
        lh.backward()
        lp.backward()
        for opt in (opt_h, opt_p):
            opt.step()
            opt.zero_grad()
        losses.append((lh.item(), lp.item()))
    for step, (a, b) in enumerate(losses):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: hare {a} vs peft {b}"
    assert losses[-1][1] < losses[0][1] - 0.1  # the adapters did learn something
    # Stricter than the losses (a 0.1% error in the scale still gives losses within 1e-4, and trained adapters
    # 1e-3 apart): the trained adapters agree to 1e-5 in relative norm. (Per element, Adam's m / sqrt(v) turns
    # a rounding-level difference in a near-zero gradient into a visible one, so elements are not compared.)
    params = dict(pm.named_parameters())
    for path, m in lora_modules(model):
        for ab in ("lora_A", "lora_B"):
            want = params[f"base_model.model.{path}.{ab}.default.weight"].detach()
            got = getattr(m, ab).weight.detach()
            rel = ((got - want).norm() / want.norm()).item()
            assert rel <= 1e-5, f"{path}.{ab}: relative difference {rel:.2e}"


def test_dropout_matches_peft(tiny_llama):
    """Dropout > 0 (the slower path): the same masks from the same seed give the same loss and gradients."""
    model = apply_lora(load_model(tiny_llama), r=4, alpha=8, seed=0, dropout=0.25)
    _randomize_B(model)
    pm = _peft_model(tiny_llama, r=4, alpha=8, dropout=0.25)
    _copy_adapters(model, pm)
    model.train()
    pm.train()
    ids, labels = _batch(7)
    torch.manual_seed(11)
    model(ids, labels=labels).loss.backward()
    torch.manual_seed(11)
    pm(input_ids=ids, labels=labels).loss.backward()
    params = dict(pm.named_parameters())
    for path, m in lora_modules(model):
        for ab in ("lora_A", "lora_B"):
            want = params[f"base_model.model.{path}.{ab}.default.weight"].grad
            got = getattr(m, ab).weight.grad
            assert (got - want).abs().max() <= 1e-5 * max(want.abs().max(), 1e-3), f"{path}.{ab}"


def test_fully_trained_head_and_embeddings_round_trip_with_peft(tiny_llama, tmp_path):
    """train_lm_head / train_embeddings = PEFT's modules_to_save: saved under PEFT's keys, loaded by peft."""
    model = apply_lora(load_model(tiny_llama), r=4, alpha=8, seed=0, targets=("q_proj",), train_lm_head=True,
                       train_embeddings=True)
    names = sorted(trainable_parameters(model))
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    _randomize_B(model)
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
        model.model.embed_tokens.weight.mul_(1.5)
    save_adapter(model, str(tmp_path / "a"))
    pm = peft.PeftModel.from_pretrained(hf_model(tiny_llama), str(tmp_path / "a")).eval()
    ids, _ = _batch(8)
    with torch.no_grad():
        want = model(ids).logits
        assert (pm(ids).logits - want).abs().max() <= 1e-5
        again = load_adapter(load_model(tiny_llama), str(tmp_path / "a"))
        assert torch.equal(again(ids).logits, want)
    with pytest.raises(ValueError, match="ties"):
        from tests.engine.conftest import save_tiny_llama
        apply_lora(load_model(str(save_tiny_llama(tmp_path / "tied", tie_word_embeddings=True))), train_lm_head=True)


def test_apply_lora_refuses_before_changing_the_model(tiny_llama):
    from hare import apply_lora, load_model

    m = load_model(tiny_llama)
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no projection"):
        apply_lora(m, targets=("o_proj", "qkv_proj"))
    assert getattr(m, "lora_config", None) is None
    assert not any(".lora_" in n for n, _ in m.named_parameters())
    apply_lora(m, targets=("o_proj",))  # the retry works
    assert any(n.endswith("o_proj.lora_A.weight") for n, _ in m.named_parameters())


def _tiny_phi3(root):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                  pad_token_id=0, eos_token_id=1, bos_token_id=1)
    transformers.Phi3ForCausalLM(cfg).save_pretrained(root / "phi3")
    return str(root / "phi3")


def _phi3_hf(path):
    transformers = pytest.importorskip("transformers")
    return transformers.Phi3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_phi3_adapters_on_split_modules_export_fused_to_peft(tmp_path, rslora):
    """hare's adapters on Phi-3's q/k/v and gate/up (split from the checkpoint's qkv_proj / gate_up_proj) are
    written as one adapter per fused module, A = cat, B = block-diagonal, rank and alpha scaled by the number of
    parts: peft gives the same logits, and hare reads the file back bit for bit."""
    from safetensors.torch import load_file

    phi3 = _tiny_phi3(tmp_path)
    model = apply_lora(load_model(phi3, dtype=torch.float32), r=3, alpha=5, seed=0, rslora=rslora)
    _randomize_B(model)
    save_adapter(model, str(tmp_path / "a"))
    import json
    config = json.load(open(tmp_path / "a" / "adapter_config.json"))
    assert config["target_modules"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert config["rank_pattern"] == {"qkv_proj": 9, "gate_up_proj": 6}
    n = {"qkv_proj": 3, "gate_up_proj": 2}
    assert config["alpha_pattern"] == {k: 5 * (v ** 0.5 if rslora else v) for k, v in n.items()}
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    attn = dict(model.named_modules())["model.layers.1.self_attn"]
    B = tensors["base_model.model.model.layers.1.self_attn.qkv_proj.lora_B.weight"]
    assert torch.equal(B[32:48, 3:6], attn.k_proj.lora_B.weight) and not B[32:48, :3].any()
    pm = peft.PeftModel.from_pretrained(_phi3_hf(phi3), str(tmp_path / "a")).eval()
    ids, _ = _batch(4, vocab=64)
    with torch.no_grad():
        got = model(ids).logits
        assert (got - pm(ids).logits).abs().max() <= 1e-5
        with pm.disable_adapter():  # not vacuous: the adapters move the logits
            assert (got - pm(ids).logits).abs().max() > 1e-3
        again = load_adapter(load_model(phi3, dtype=torch.float32), str(tmp_path / "a"))
        a, b = again.lora_config, model.lora_config
        assert (a.r, a.alpha, a.rslora, set(a.targets)) == (b.r, b.alpha, b.rslora, set(b.targets))
        assert torch.equal(again(ids).logits, got)
        for (p, m), (q, n_) in zip(lora_modules(model), lora_modules(again)):
            assert p == q and torch.equal(m.lora_A.weight, n_.lora_A.weight)
            assert torch.equal(m.lora_B.weight, n_.lora_B.weight)


def test_phi3_loads_fused_adapter_written_by_peft(tmp_path):
    """peft's own adapter on qkv_proj / gate_up_proj (and o_proj), random B: each fused adapter becomes adapters
    on the parts with a copy of A and B split by rows (the shared-A form): the same logits."""
    phi3 = _tiny_phi3(tmp_path)
    pm = peft.get_peft_model(_phi3_hf(phi3), peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights=False,
                                                             target_modules=["qkv_proj", "gate_up_proj", "o_proj"]))
    pm.save_pretrained(str(tmp_path / "from_peft"))
    model = load_adapter(load_model(phi3, dtype=torch.float32), str(tmp_path / "from_peft"))
    cfg = model.lora_config
    assert (cfg.r, cfg.alpha, cfg.targets) == (4, 6.0, ("gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"))
    mods = dict(lora_modules(model))
    assert torch.equal(mods["model.layers.0.self_attn.q_proj"].lora_A.weight,
                       mods["model.layers.0.self_attn.v_proj"].lora_A.weight)
    ids, _ = _batch(5, vocab=64)
    with torch.no_grad():
        got = model(ids).logits
        assert (got - pm.eval()(ids).logits).abs().max() <= 1e-5
        with pm.disable_adapter():
            assert (got - pm(ids).logits).abs().max() > 1e-3


def test_phi3_fused_adapter_not_block_diagonal_falls_back_to_shared_A(tmp_path):
    """A rank_pattern adapter (as hare writes) whose qkv_proj B is non-zero off the diagonal blocks (say, trained
    further in peft) cannot be split per part: it needs the shared-A form at rank 3r for q/k/v while gate/up split
    at rank r, and hare has one rank: refused, naming the shapes. With qkv_proj alone it loads shared-A at rank
    3r, with peft's logits."""
    import json

    from safetensors.torch import load_file, save_file

    from hare import CheckpointError

    phi3 = _tiny_phi3(tmp_path)
    model = apply_lora(load_model(phi3, dtype=torch.float32), r=2, alpha=3, seed=0,
                       targets=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    _randomize_B(model)
    save_adapter(model, str(tmp_path / "a"))
    config = json.load(open(tmp_path / "a" / "adapter_config.json"))
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(9)
    for k in tensors:
        if "qkv_proj.lora_B" in k:
            tensors[k] = tensors[k] + 0.05 * torch.randn(tensors[k].shape, generator=g)  # off-diagonal too
    (tmp_path / "b").mkdir()
    json.dump(config, open(tmp_path / "b" / "adapter_config.json", "w"))
    save_file(tensors, str(tmp_path / "b" / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="qkv_proj: adapter A .* fits neither rank 2"):
        load_adapter(load_model(phi3, dtype=torch.float32), str(tmp_path / "b"))
    # qkv_proj alone: shared-A at rank 6, alpha giving the same scale (9 / 6 = 3 / 2)
    (tmp_path / "c").mkdir()
    json.dump({**config, "target_modules": ["qkv_proj"], "rank_pattern": {"qkv_proj": 6},
               "alpha_pattern": {"qkv_proj": 9.0}}, open(tmp_path / "c" / "adapter_config.json", "w"))
    save_file({k: v for k, v in tensors.items() if "qkv_proj" in k}, str(tmp_path / "c" / "adapter_model.safetensors"))
    loaded = load_adapter(load_model(phi3, dtype=torch.float32), str(tmp_path / "c"))
    assert (loaded.lora_config.r, loaded.lora_config.targets) == (6, ("k_proj", "q_proj", "v_proj"))
    pm = peft.PeftModel.from_pretrained(_phi3_hf(phi3), str(tmp_path / "c")).eval()
    ids, _ = _batch(6, vocab=64)
    with torch.no_grad():
        assert (loaded(ids).logits - pm(ids).logits).abs().max() <= 1e-5


def test_phi3_partial_fused_group_refused_in_peft_format(tmp_path):
    """Part of a fused group (q_proj without k_proj, v_proj) has no PEFT form here: refused, naming the group;
    a per-module rank on a module that is not fused is refused too; qkv_proj as a target has a hint."""
    import json

    from hare import CheckpointError

    phi3 = _tiny_phi3(tmp_path)
    m = apply_lora(load_model(phi3), targets=("q_proj", "o_proj"))
    with pytest.raises(CheckpointError, match=r"q_proj, k_proj, v_proj \(fused qkv_proj\).*all of them or none"):
        save_adapter(m, str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="qkv_proj is split by this family into q_proj, k_proj, v_proj"):
        apply_lora(load_model(phi3), targets=("qkv_proj",))
    save_adapter(apply_lora(load_model(phi3), targets=("o_proj", "down_proj")), str(tmp_path / "d"))
    config = json.load(open(tmp_path / "d" / "adapter_config.json"))
    json.dump({**config, "rank_pattern": {"o_proj": 8}}, open(tmp_path / "d" / "adapter_config.json", "w"))
    with pytest.raises(CheckpointError, match="rank_pattern=.*only on the fused modules"):
        load_adapter(load_model(phi3), str(tmp_path / "d"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offload", [False, True])
def test_checkpointing_gives_the_same_loss_and_gradients(tiny_llama, backend, offload, monkeypatch):
    """Per-layer checkpointing (with and without offload) recomputes each layer in backward, through the fused
    path without down_proj's forward (backend "triton", interpreter here): loss and every adapter gradient are
    bit-identical to the run that keeps activations."""
    from hare.engine.offload import enable_checkpointing
    from hare.kernels import lora as K
    need_output = []  # a spy on the MLP calls: the recomputation must ask for no output
    lora_mlp = K.lora_mlp
    monkeypatch.setattr(K, "lora_mlp", lambda *a, **kw: need_output.append(kw["need_output"]) or lora_mlp(*a, **kw))
    ids, labels = _batch(0)
    grads = []
    for checkpointing in (False, True):
        model = apply_lora(load_model(tiny_llama), r=4, alpha=8, seed=0, backend=backend)
        _randomize_B(model)
        if checkpointing:
            enable_checkpointing(model, "offload" if offload else "on")
        loss = model(ids, labels=labels).loss
        loss.backward()
        grads.append([loss.detach()] + [p.grad for p in trainable_parameters(model).values()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    n = len(model.model.layers)  # plain forward, checkpointed forward, then the recomputations
    assert need_output == [True] * (2 * n) + [False] * n


def test_auto_checkpointing_keeps_what_fits(tiny_llama):
    """Mode "auto" with a stand-in allocator (each kept layer adds `a` bytes) and a budget for one kept layer:
    layer 0 keeps its activations, layer 1 is recomputed, the report says so, and the loss and gradients equal
    the plain run's, adapter dropout included (the recomputed layer replays its masks)."""
    from hare.engine.offload import AutoCheckpointing
    ids, labels = _batch(0)
    grads, hooks = [], []
    for auto in (False, True):
        model = apply_lora(load_model(tiny_llama), r=4, alpha=8, seed=0, dropout=0.1)
        _randomize_B(model)
        torch.manual_seed(7)  # the same dropout masks in both runs
        n = len(model.model.layers)
        if auto:
            x_bytes = ids.numel() * model.config.hidden_size * 4
            a = 2 * x_bytes
            # layer 0: 0 + a + x_bytes (layer 1's saved input) + a (reserve) fits; layer 1: a + a + a does not
            hook = AutoCheckpointing(n, budget=2 * a + x_bytes, margin=0, layer_bytes=a,
                                     allocated=lambda: a * len(hooks[0].plan["kept"]))
            model.model.run_layer = hook
            hooks.append(hook)
        loss = model(ids, labels=labels).loss
        loss.backward()
        grads.append([loss.detach()] + [p.grad for p in trainable_parameters(model).values()])
    for x, y in zip(*grads):
        assert torch.equal(x, y)
    assert n == 2 and hooks[0].plan == {"kept": [0], "checkpointed": [1]}
    assert "1 of 2 layers keep their activations, 1 recomputed" in hooks[0].report()
    assert hooks[0].checkpointing.offload and "offload their inputs" in hooks[0].report()


def test_auto_checkpointing_on_the_cpu_keeps_its_plan(tiny_llama):
    """Without allocator statistics (CPU) the per-layer cost stays the analytic estimate: nothing is measured,
    so a second forward of the same size makes the same choice (a measured 0 would keep every layer)."""
    from hare.engine.offload import AutoCheckpointing
    ids, labels = _batch(0)
    model = apply_lora(load_model(tiny_llama), r=4, alpha=8, seed=0)
    layers = model.model.layers
    x_like = torch.empty(*ids.shape, model.config.hidden_size)
    a, x_bytes = AutoCheckpointing(len(layers))._estimate(layers[0], x_like), x_like.numel() * 4
    # on the CPU layer i needs 2 a + (layers after i) x_bytes + margin: this budget keeps layer 1 only
    hook = AutoCheckpointing(len(layers), budget=2 * a + x_bytes // 2, margin=0)
    model.model.run_layer = hook
    for _ in range(2):
        model(ids, labels=labels).loss.backward()
        assert hook.plan == {"kept": [1], "checkpointed": [0]} and hook.measured == {}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("stash", ["all", "attention", "mlp"])
def test_stashed_blocks_give_the_same_loss_and_gradients(tiny_llama, backend, dropout, stash, monkeypatch):
    """Offload with blocks stashed (attention's heads and/or the MLP send their saved tensors to the host in the
    forward and are replayed, not recomputed): loss and every adapter gradient are bit-identical to the run that
    keeps activations, adapter dropout included; the recomputation runs no stashed block, and an MLP it does run
    still skips down_proj (need_output=False)."""
    from hare.engine.offload import enable_checkpointing
    from hare.kernels import lora as K
    from hare.models import decoder as D
    calls = []  # spies: attention and MLP calls, in order (the MLP's with its need_output)
    attend, lora_mlp = D.attend, K.lora_mlp
    monkeypatch.setattr(D, "attend", lambda *a, **kw: calls.append("attend") or attend(*a, **kw))
    monkeypatch.setattr(K, "lora_mlp", lambda *a, **kw: calls.append(("mlp", kw["need_output"])) or lora_mlp(*a, **kw))
    ids, labels = _batch(0)
    grads = []
    for checkpointing in (False, True):
        model = apply_lora(load_model(tiny_llama), r=4, alpha=8, seed=0, backend=backend, dropout=dropout)
        _randomize_B(model)
        torch.manual_seed(7)  # the same dropout masks in both runs
        if checkpointing:
            hook = enable_checkpointing(model, "offload", stash=stash)
        calls.clear()
        loss = model(ids, labels=labels).loss
        forward_calls = list(calls)
        loss.backward()
        grads.append([loss.detach()] + [p.grad for p in trainable_parameters(model).values()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    n = len(model.model.layers)
    fused_mlp = dropout == 0  # with dropout the MLP is composed of single projections, not lora_mlp
    assert forward_calls == (["attend"] + [("mlp", True)] * fused_mlp) * n
    recomputed = (["attend"] * (stash == "mlp") + [("mlp", False)] * (fused_mlp and stash == "attention")) * n
    assert calls[len(forward_calls):] == recomputed
    assert hook.stash.saved == {} and hook.stash.fetched == {}  # every layer's group released after its backward


@pytest.mark.parametrize("n", [64, 1000, 100000])
def test_stashed_block_output_is_its_own_when_memory_is_reused(n):
    """A stashed block's output value is found among the tensors its graph saved (by storage). Here sin's input
    (x * 2) is saved and then freed before exp's output, which exp saves, is allocated: the allocator may give the
    output the freed memory (the former address match failed here at n = 100000, and at 1000 in a standalone run:
    the replay returned x * 2's copy, wrong gradients). The replayed value must be the output's, and no saved tensor may outlive the forward."""
    import weakref
    from hare.engine.offload import Offloader, StashedBlocks
    stash = Offloader()
    stash.begin_group()
    blocks = StashedBlocks(stash, ["b"])
    x = torch.randn(n, requires_grad=True)
    freed = []

    def fn(x):
        doubled = x * 2
        freed.append(weakref.ref(doubled))
        y = torch.sin(doubled)
        del doubled  # its memory is free before exp allocates
        return y.exp()

    out = blocks("b", fn, [x])
    assert freed[0]() is None
    blocks.replay = True
    replayed = blocks("b", fn, [x])
    assert torch.equal(replayed, out)
    replayed.backward(torch.ones(n))
    assert torch.equal(x.grad, (2 * torch.cos(2 * x) * out).detach())


def test_discarded_forward_releases_its_stash(tiny_llama):
    """A checkpointed forward whose loss is dropped without a backward (a skipped batch) leaves nothing in the
    offload stash: the host copies of its layers go with its graph."""
    from hare.engine.offload import enable_checkpointing
    model = apply_lora(load_model(tiny_llama), r=4, alpha=8, seed=0)
    hook = enable_checkpointing(model, "offload", stash="all")
    ids, labels = _batch(0)
    loss = model(ids, labels=labels).loss
    assert len(hook.stash.saved) == len(model.model.layers)
    del loss
    assert hook.stash.saved == {}
    model(ids, labels=labels).loss.backward()  # and the next step runs as usual
    assert hook.stash.saved == {} and hook.stash.fetched == {}


def test_link_planner_spreads_what_the_link_carries():
    """The "auto" plan: attention's saved tensors in as many layers as link x forward time (less the layer input
    and mid residual) allows, spare bytes carried over so that a share is spread evenly; no more than half of the
    host memory available holds; none without device room for two layers' stash."""
    from types import SimpleNamespace as NS
    from hare.engine.offload import _LinkPlanner
    tokens, hidden, heads, kv, d = 100, 64, 4, 2, 16
    layer = NS(self_attn=NS(heads=heads, kv_heads=kv, head_dim=d, layer_idx=0))
    x = torch.empty(tokens, hidden, dtype=torch.bfloat16)
    attn = tokens * (2 * (heads + kv) * d * 2 + heads * 4)
    base = 2 * tokens * hidden * 2
    planner = _LinkPlanner(num_layers=6)
    planner.tokens, planner.link, planner.host, planner.room = tokens, 1.0, 1e12, 1e12
    planner.fwd_ms[tokens] = (1e9, 1)
    assert planner.blocks(layer, x) == () and planner.plans == {}  # one timed forward (it compiled): no plan yet
    for spare, want in [(0, []), (attn // 2, [1, 3, 5]), (attn * 3 // 4, [1, 2, 3, 5]), (attn, range(6)),
                        (10 * attn, range(6))]:
        ms = (spare + base + 0.5) / _LinkPlanner.HEADROOM  # + 0.5: no rounding below
        assert planner._plan(layer, x, ms) == {i: ("self_attn",) for i in want}, spare
    assert "attention stashed in 6 of 6 layers" in planner.report
    # host memory for 3 layers (twice the bytes each, half of what is available): every other layer, not the first 3
    planner.host = 3 * 2 * attn / _LinkPlanner.HOST_SHARE + 1
    assert planner._plan(layer, x, ms) == {i: ("self_attn",) for i in (1, 3, 5)}
    planner.room = 2 * attn - 1  # the device peak has no room for two layers' stash: none
    assert planner._plan(layer, x, ms) == {}


@needs_interpreter
@pytest.mark.parametrize("mode", ["on", "offload"])
def test_checkpointed_mlp_in_row_blocks_matches_the_reference(tiny_llama, mode):
    """Checkpointing with the MLP in blocks of 5 of the batch's 42 tokens (the no-grad forward and the
    recomputation's deferred backward, through the decoder): loss and every adapter gradient against the fp64
    model, no further from it than the unblocked fp32 run (the control rule; the blocks sum the adapters'
    gradients in another order)."""
    from hare.engine.offload import enable_checkpointing
    ids, labels = _batch(0)
    runs = []
    for dtype, backend, rows in ((torch.float64, "ref", None), (torch.float32, "triton", None),
                                 (torch.float32, "triton", 5)):
        model = apply_lora(load_model(tiny_llama, dtype=dtype), r=4, alpha=8, seed=0, backend=backend)
        _randomize_B(model)
        if rows is not None:
            for layer in model.model.layers:
                layer.mlp.rows = rows
            enable_checkpointing(model, mode, stash="none" if mode == "offload" else "auto")
        loss = model(ids, labels=labels).loss
        loss.backward()
        runs.append([loss.detach()] + [p.grad for p in trainable_parameters(model).values()])
    for i, (ref, control, out) in enumerate(zip(*runs)):
        assert_close_to_ref(out, ref, control, f"tensor {i} (0: loss)")
