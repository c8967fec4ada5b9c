"""Causal attention with GQA, packed documents, sliding window and logit softcapping.

q: (B, T, Hq, D), k/v: (B, T, Hk, D) with Hq % Hk == 0. doc_ids: optional (B, T) integers; a query attends
only to keys of the same document. window: a key j is visible to query i iff i - window < j <= i (the
convention of transformers' sliding-window masks). softcap: s -> cap * tanh(s / cap) on the scaled logits.
"""
import torch

from ._dispatch import pick_backend


def attention_mask_ref(T, device, doc_ids=None, window=None):
    i = torch.arange(T, device=device)
    m = i[None, :] <= i[:, None]
    if window is not None:
        m = m & (i[None, :] > i[:, None] - window)
    m = m[None]
    if doc_ids is not None:
        m = m & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return m  # (1 or B, T, T)


def attention_ref(q, k, v, scale=None, doc_ids=None, window=None, softcap=None):
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    qf, kf, vf = (t.transpose(1, 2).float() for t in (q, k, v))
    kf = kf.repeat_interleave(Hq // Hk, dim=1)
    vf = vf.repeat_interleave(Hq // Hk, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    mask = attention_mask_ref(T, q.device, doc_ids, window)[:, None]
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p @ vf).transpose(1, 2).to(q.dtype)


def attention(q, k, v, scale=None, doc_ids=None, window=None, softcap=None, backend=None):
    if pick_backend(backend, q) == "ref":
        return attention_ref(q, k, v, scale, doc_ids, window, softcap)
    raise NotImplementedError("Triton attention: issue 7")
