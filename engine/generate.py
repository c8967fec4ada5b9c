"""Generation: KV cache, greedy and sampling (temperature -> top-k -> top-p, transformers' order), EOS and stop
strings, batched prompts with left padding, a streaming callback."""
from typing import Callable, Optional, Sequence

import torch

from ..models.decoder import KVCache


def _stop_ids(model, tokenizer, eos_token_ids):
    if eos_token_ids is not None:
        return set(eos_token_ids)
    ids = set(getattr(tokenizer, "eos_token_ids", None) or ())
    if not ids and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    eos = model.config.eos_token_id
    ids |= set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    return ids


def _pick(logits, temperature, top_k, top_p, generator):
    """Next token from last-position logits (batch, vocab), fp32."""
    if not temperature:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p (always at least one).
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, eos_token_ids=(), pad_token_id: int = 0,
                 seed: Optional[int] = None, on_token: Optional[Callable] = None, should_stop=None):
    """Token-level generation. prompts: lists of token ids (left-padded here). Returns the new token ids of each
    prompt, without the EOS token that ended it. on_token(step, rows) is called after each step with the new ids
    of every row so far; should_stop(row, new_ids) -> bool lets the caller end a row (stop strings)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.lm_head_weight.device
    dtype = model.lm_head_weight.dtype
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, P - len(p):] = True
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = KVCache(model.config, B, P + max_new_tokens, device, dtype)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = torch.tensor(sorted(eos_token_ids), dtype=torch.long, device=device)

    x = model.hidden_states(ids, positions, cache=cache, token_mask=mask)
    next_pos = positions[:, -1:] + 1
    out = [[] for _ in range(B)]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits = model.logits(x[:, -1]).float()
        tok = _pick(logits, temperature, top_k, top_p, generator)
        hit_eos = torch.isin(tok, eos) if eos.numel() else torch.zeros_like(finished)
        tok_cpu, eos_cpu, done_cpu = tok.tolist(), hit_eos.tolist(), finished.tolist()
        for i in range(B):
            if done_cpu[i]:
                continue
            if eos_cpu[i]:
                finished[i] = True
                continue
            out[i].append(tok_cpu[i])
            if should_stop is not None and should_stop(i, out[i]):
                finished[i] = True
        if on_token is not None:
            on_token(step, out)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        x = model.hidden_states(tok[:, None], next_pos, cache=cache)
        next_pos = next_pos + 1
    return out


def generate(model, tokenizer, prompts, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, stop: Sequence[str] = (), stream: Optional[Callable] = None, seed: Optional[int] = None,
             chat: bool = False, eos_token_ids=None):
    """Generate text continuations, one string per prompt.

    prompts: a string or a list of strings (with chat=True, each is sent as one user message through the
    tokenizer's chat template with the generation prompt). temperature 0 is greedy. Generation of a row stops at
    an EOS token or when its text contains one of `stop` (the stop string is cut off). stream(row, text_delta)
    receives text as it is produced."""
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    if chat:
        enc = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True) for p in prompts]
    else:
        enc = [tokenizer.encode(p) for p in prompts]
    stop = [s for s in stop if s]
    shown = [""] * len(prompts)

    def text_of(new_ids):
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        for s in stop:
            k = text.find(s)
            if k >= 0:
                text = text[:k]
        return text

    def should_stop(i, new_ids):
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        return any(s in text for s in stop)

    def on_token(step, rows):
        for i, r in enumerate(rows):
            text = text_of(r)
            if len(text) > len(shown[i]) and text.startswith(shown[i]):
                stream(i, text[len(shown[i]):])
                shown[i] = text

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = generate_ids(model, enc, max_new_tokens, temperature, top_k, top_p,
                          _stop_ids(model, tokenizer, eos_token_ids), pad, seed,
                          on_token=None if stream is None else on_token,
                          should_stop=should_stop if stop else None)
    texts = [text_of(r) for r in result]
    return texts[0] if single else texts
