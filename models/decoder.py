"""The one generic decoder. Every family is this module tree with a few flags from ModelConfig.

One layer (flags in brackets; Llama has none of them):

    x ─┬─ input_layernorm ─ self_attn [q/k norm, window, softcap] ─ [post_attention_layernorm] ─(+)─┬─ ...
       └──────────────────────────────────────────────────────────────────────────────────────────┘ │
    ...┬─ post_attention_layernorm | [pre_feedforward_layernorm] ─ mlp ─ [post_feedforward_layernorm] ─(+)─ x'
       └──────────────────────────────────────────────────────────────────────────────────────────────┘

Module paths equal Hugging Face's (model.embed_tokens, model.layers.N.self_attn.q_proj, ..., lm_head), so a
checkpoint loads by identity and a PEFT adapter is a prefix. Tensors inside attention are (batch, seq, heads,
head_dim): the projection output needs no transpose for the kernels.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import kernels
from ..kernels import lora
from .config import ModelConfig
from .rope import rope_select, rope_static, rope_tables


@dataclass
class CausalLMOutput:
    loss: Optional[torch.Tensor] = None      # mean loss over target tokens (0 when there are none)
    logits: Optional[torch.Tensor] = None    # (batch, seq, vocab); None when labels were given (not built)
    loss_sum: Optional[torch.Tensor] = None  # fp32 sum over target tokens: for exact gradient accumulation
    n_tokens: Optional[torch.Tensor] = None  # number of target tokens (device tensor: no host sync)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, offset, casting):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) if offset == 0 else torch.zeros(dim))
        self.eps, self.offset, self.casting = eps, offset, casting

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps, self.offset, self.casting)

    def residual(self, x, residual, total=None):
        """(rms_norm(x + residual), x + residual) in one pass (the residual stream is not re-read to normalize);
        total: the sum's value when already known (kernels.rms_norm_residual)."""
        return kernels.rms_norm_residual(x, residual, self.weight, self.eps, self.offset, self.casting,
                                         total=total)


def _norm(cfg: ModelConfig, dim=None):
    return RMSNorm(dim or cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset, cfg.norm_casting)


class KVCache:
    """Keys and values of every layer for generation, with each slot's position (-1 = empty or padding).

    Slots are filled left to right; attention masks by position, so left-padded prompts and sliding windows
    need nothing else."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.pos = torch.full((batch, max_len), -1, dtype=torch.long, device=device)
        self.length = 0

    def begin(self, positions, token_mask=None):
        """Record the positions of the T new tokens (padding as -1) before the layers run."""
        T = positions.shape[1]
        pos = positions if token_mask is None else positions.masked_fill(~token_mask, -1)
        self.pos[:, self.length:self.length + T] = pos

    def store(self, layer: int, k, v):
        """Write one layer's new keys/values; return all keys/values and positions so far."""
        end = self.length + k.shape[1]
        self.k[layer][:, self.length:end] = k
        self.v[layer][:, self.length:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end], self.pos[:, :end]

    def advance(self, T: int):
        self.length += T


def cached_attention(q, k, v, q_pos, k_pos, scale, window, softcap):
    """Attention of new queries over cached keys, masked by position (generation). fp32 softmax."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    allowed = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
    if window is not None:
        allowed &= q_pos[:, :, None] - k_pos[:, None, :] < window
    # A padding query (position -1 in the cache) may see everything: its output is never used, and a fully
    # masked row would turn into NaN and poison nothing else only by luck.
    allowed |= ~allowed.any(-1, keepdim=True)
    qf = q.transpose(1, 2).float()
    kf = k.transpose(1, 2).float().repeat_interleave(Hq // Hk, dim=1)
    vf = v.transpose(1, 2).float().repeat_interleave(Hq // Hk, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return (torch.softmax(s, -1) @ vf).transpose(1, 2).to(q.dtype)


# SDPA backends in order of preference on the GPU. Measured on the H200 (BENCHMARKS.md, attention: causal GQA
# 32/8 heads x 128, bf16): cuDNN 515 TFLOP/s fwd+bwd at 8k vs flash 313 and hare's Triton kernel 393, and the same
# order at 2k and 32k; later entries run where cuDNN cannot (other head dims or dtypes).
SDPA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]


def attend(q, k, v, scale, docs, window, softcap):
    """Training / prefill attention dispatch. The plain causal case goes to PyTorch's SDPA (flash / cuDNN on
    the GPU, a fused CPU kernel here); packed documents, windows and softcapping go to kernels.attention.
    Under torch.use_deterministic_algorithms(True) the plain causal case on the GPU goes to kernels.attention
    too: its backward has no atomics (bit-reproducible), while cuDNN's attention backward is nondeterministic by
    default and is excluded by PyTorch's strict deterministic mode (pytorch/pytorch#182551, the SDPA determinism
    table; karpathy/llm.c#652 saw cuDNN's backward differ between runs), which would leave flash, slower than
    hare's kernel on the H200 (BENCHMARKS.md, attention)."""
    if window is not None and window >= q.shape[1]:
        window = None  # i - window < 0 <= j: the window hides nothing (Phi-3.5's 262144, Mistral's 4096 on short rows)
    plain = docs is None and window is None and softcap is None
    if plain and not (q.is_cuda and torch.are_deterministic_algorithms_enabled()):
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        kw = dict(is_causal=True, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
        if not q.is_cuda:
            return F.scaled_dot_product_attention(*args, **kw).transpose(1, 2)
        with sdpa_kernel(SDPA_PRIORITY, set_priority=True):
            return F.scaled_dot_product_attention(*args, **kw).transpose(1, 2)
    doc_ids, doc_tables = docs if docs is not None else (None, None)
    return kernels.attention(q, k, v, scale=scale, doc_ids=doc_ids, window=window, softcap=softcap,
                             doc_tables=doc_tables)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        hq, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, hq * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, hk * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, hk * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(hq * d, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = _norm(cfg, d)
            self.k_norm = _norm(cfg, d)
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = hq, hk, d
        self.scale = cfg.attention_scale
        self.window = cfg.sliding_window if cfg.layer_is_sliding(layer_idx) else None
        self.softcap = cfg.attn_softcap
        # Gemma 3: layers listed as sliding take the local rope (even if sliding_window were null, as there)
        self.local_rope = (cfg.rope_local is not None and cfg.layer_types is not None
                           and cfg.layer_types[layer_idx] == "sliding_attention")
        self.rotary_dim = cfg.rotary_dim

    def forward(self, x, rope, docs=None, cache=None, positions=None, need_output=True, blocks=None):
        """need_output=False: the output's value is not needed, only its graph (checkpoint recomputation with
        the layer's mid residual saved): o_proj's GEMM is skipped. blocks: checkpointing's hook for the part
        from the projections' outputs to the heads' output ("self_attn", engine/offload.py StashedBlocks); when
        it replays that part, q/k/v's GEMMs are skipped too (their values are only that part's input)."""
        B, T, _ = x.shape
        replay = blocks is not None and blocks.replaying("self_attn")
        q, k, v = lora.qkv(self, x, need_output=not replay)
        tables = rope["local" if self.local_rope else "global"]

        def heads(q, k, v):
            return self._heads(q, k, v, tables, docs, cache, positions)

        if blocks is None:
            o = heads(q, k, v)
        else:  # the block's own parameters: the q/k norms' (the projections are outside it)
            norms = [p for n in ("q_norm", "k_norm") if hasattr(self, n) for p in getattr(self, n).parameters()]
            o = blocks("self_attn", heads, (q, k, v), [p for p in norms if p.requires_grad], keep=tables)
        o = o.reshape(B, T, self.heads * self.head_dim)
        # the module itself when the output is wanted (a 4-bit o_proj decodes one token through the fused GEMV)
        return self.o_proj(o) if need_output else lora.linear(self.o_proj, o, need_output=False)

    def _heads(self, q, k, v, tables, docs, cache, positions):
        """Projections' outputs (B, T, heads x head_dim) -> attention output (B, T, heads, head_dim); tables: this
        layer's rope (cos, sin, index)."""
        B, T, _ = q.shape
        q = q.view(B, T, self.heads, self.head_dim)
        k = k.view(B, T, self.kv_heads, self.head_dim)
        v = v.view(B, T, self.kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin, index = tables
        if self.rotary_dim == self.head_dim:
            q, k = kernels.apply_rope(q, k, cos, sin, index)
        else:  # partial rotary (Phi-4-mini): rotate the first rotary_dim channels, pass the rest through
            r = self.rotary_dim
            q_rot, k_rot = kernels.apply_rope(q[..., :r], k[..., :r], cos, sin, index)
            q, k = torch.cat([q_rot, q[..., r:]], -1), torch.cat([k_rot, k[..., r:]], -1)
        if cache is None:
            return attend(q, k, v, self.scale, docs, self.window, self.softcap)
        k_all, v_all, k_pos = cache.store(self.layer_idx, k, v)
        return cached_attention(q, k_all, v_all, positions, k_pos, self.scale, self.window, self.softcap)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = cfg.hidden_act

    def forward(self, x, need_output=True):
        return lora.mlp(self, x, need_output)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = _norm(cfg)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = _norm(cfg)
        self.mlp = MLP(cfg)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = _norm(cfg)
            self.post_feedforward_layernorm = _norm(cfg)

    def forward(self, x, rope, docs=None, cache=None, positions=None, keep_mid=False, blocks=None):
        """The layer's output x'; keep_mid=True: (x', h) with h the residual stream between attention and MLP
        (checkpointing may save it, see recompute). blocks: checkpointing's hook around attention's heads and the
        MLP (engine/offload.py StashedBlocks; not with sandwich norms)."""
        a = self.self_attn(self.input_layernorm(x), rope, docs, cache, positions, blocks=blocks)
        if self.sandwich:
            n, h = self.pre_feedforward_layernorm.residual(self.post_attention_layernorm(a), x)
            y = h + self.post_feedforward_layernorm(self.mlp(n))
        else:
            n, h = self.post_attention_layernorm.residual(a, x)
            y = h + self._mlp(n, blocks)
        return (y, h) if keep_mid else y

    def _mlp(self, n, blocks, need_output=True):
        if blocks is None:
            return self.mlp(n, need_output)
        # the MLP's output value is never needed when it is replayed (see recompute)
        return blocks("mlp", lambda n: self.mlp(n, need_output), (n,),
                      [p for p in self.mlp.parameters() if p.requires_grad], value=False)

    def recompute(self, x, rope, docs=None, h=None, blocks=None):
        """Checkpoint recomputation (engine/offload.py): the branches whose sum is x', as an autograd graph whose
        values are not all computed, since only the vjp is wanted and the vjp of a sum hands x's gradient to
        every branch unchanged. The MLP branch skips down_proj's GEMM (its value is never read); given the saved
        mid residual h, the attention branch skips o_proj's GEMM too, and the fused residual norm takes h as the
        known sum (its backward is the same). Blocks that `blocks` stashed in the forward are replayed, not
        recomputed. With sandwich norms the MLP output feeds a norm, whose backward needs its value: one branch,
        the full layer."""
        if self.sandwich:
            return (self(x, rope, docs),)
        a = self.self_attn(self.input_layernorm(x), rope, docs, need_output=h is None, blocks=blocks)
        n, h = self.post_attention_layernorm.residual(a, x, total=h)
        return h, self._mlp(n, blocks, need_output=False)


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = _norm(cfg)
        # Gradient checkpointing: None, or a callable run_layer(layer, x, rope, docs) -> x that wraps each layer
        # call (engine code sets it; the decoder only calls it while autograd records).
        self.run_layer = None


class CausalLM(nn.Module):
    """forward(input_ids, position_ids=None, labels=None, doc_ids=None) -> CausalLMOutput.

    labels: (batch, seq), -100 = ignored, shifted inside (token t predicts labels[t+1]) as in transformers.
    With labels the loss comes from the fused linear cross-entropy and full-vocabulary logits are not built
    (pass return_logits=True to get them anyway). doc_ids: (batch, seq) document index of each token of a
    packed row; attention never crosses documents (position_ids should restart at 0 per document)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Model(cfg)
        self._rope_static = {}  # (rope kind, device) -> models.rope.rope_static's tables, fp32, made on first use
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def lm_head_weight(self):
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def rope(self, positions, device):
        """cos/sin for the given positions: (cos, sin, index) per rope kind, as kernels.apply_rope takes them."""
        cfg = self.config
        B, T = positions.shape
        index = torch.arange(B * T, device=device).view(B, T)
        out = {}
        for name, spec in (("global", cfg.rope), ("local", cfg.rope_local)):
            if spec is None:
                continue
            key = (name, torch.device(device))
            if key not in self._rope_static:  # the position-independent frequencies, once per device
                self._rope_static[key] = rope_static(spec, cfg.head_dim, cfg.max_position_embeddings, device)
            tables, scaling = self._rope_static[key]
            inv_freq = rope_select(spec, tables, cfg.head_dim, cfg.max_position_embeddings, positions)
            cos, sin = rope_tables(inv_freq, scaling, positions)
            out[name] = (cos, sin, index)
        return out

    def logits(self, x):
        """Final hidden states -> logits (with Gemma 2's final softcapping)."""
        logits = F.linear(x, self.lm_head_weight)
        if self.config.final_softcap is not None:
            logits = torch.tanh(logits / self.config.final_softcap) * self.config.final_softcap
        return logits

    def forward(self, input_ids, position_ids=None, labels=None, doc_ids=None, cache=None, token_mask=None,
                return_logits=None):
        x = self.hidden_states(input_ids, position_ids, doc_ids, cache, token_mask)
        out = CausalLMOutput()
        if labels is not None:
            h = x[:, :-1].reshape(-1, x.shape[-1])
            y = labels[:, 1:].reshape(-1)
            out.loss_sum, out.n_tokens = kernels.linear_cross_entropy(h, self.lm_head_weight, y,
                                                                      softcap=self.config.final_softcap)
            out.loss = out.loss_sum / out.n_tokens.clamp(min=1)
        if return_logits or (return_logits is None and labels is None):
            out.logits = self.logits(x)
        return out

    def hidden_states(self, input_ids, position_ids=None, doc_ids=None, cache=None, token_mask=None):
        """The final-norm hidden states (batch, seq, hidden). With a cache, appends this step's keys/values."""
        cfg = self.config
        B, T = input_ids.shape
        device = input_ids.device
        if position_ids is None:
            start = 0 if cache is None else cache.length
            position_ids = torch.arange(start, start + T, device=device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        if cfg.embed_scale:
            # Gemma: the normalizer sqrt(hidden) is rounded to the activation dtype before the multiply, going
            # through fp32 as transformers' buffer does (a direct double -> bf16 rounding can differ).
            x = x * torch.tensor(cfg.hidden_size ** 0.5, dtype=torch.float32).to(x.dtype)
        rope = self.rope(position_ids, device)
        # Packed documents: the Triton attention's per-row document tables are built once per batch, not per layer.
        docs = None
        if doc_ids is not None:
            docs = (doc_ids, kernels.attention_doc_tables(doc_ids) if doc_ids.is_cuda else None)
        if cache is not None:
            cache.begin(position_ids, token_mask)
        run = self.model.run_layer if (self.model.run_layer is not None and torch.is_grad_enabled()) else None
        for layer in self.model.layers:
            if run is not None and cache is None:
                x = run(layer, x, rope, docs)
            else:
                x = layer(x, rope, docs, cache, position_ids)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x)
