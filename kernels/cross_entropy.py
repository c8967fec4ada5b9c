"""Fused linear + cross-entropy: loss from hidden states and the lm_head weight without the full logits."""
import torch
import torch.nn.functional as F

from ._dispatch import pick_backend


def linear_cross_entropy_ref(hidden, weight, labels, ignore_index=-100, softcap=None):
    """Returns (summed loss over target tokens in fp32, number of target tokens)."""
    logits = (hidden @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    labels = labels.reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, softcap=None, backend=None):
    if pick_backend(backend, hidden) == "ref":
        return linear_cross_entropy_ref(hidden, weight, labels, ignore_index, softcap)
    raise NotImplementedError("Triton linear_cross_entropy: issue 3")
