"""A training step captured as one CUDA graph and replayed: forward, backward and optimizer step in a single launch.

Why. A LoRA step launches ~120 kernels per decoder layer (the GEMMs, the adapters' thin GEMMs, norms, rope,
attention, SwiGLU, dequantization), each costing the host 5-40 us of Python and driver time. Where a layer's GPU
work is short, the host cannot keep up and the GPU idles between kernels: Llama-3.2-1B QLoRA at 8192 tokens spent
41 ms of a ~200 ms step in 338 idle gaps (BENCHMARKS.md, run S7-7), and the 8B "auto" step 21 ms of 499. Replaying
a graph costs the host one launch, so the step runs at the speed of its kernels.

How (PyTorch's whole-network capture, docs "CUDA Graphs"): the first `warmup` calls run eager steps on a side
stream (Triton compiles, cuBLAS and cuDNN pick their kernels, the allocator and the checkpointing planner settle);
the next call copies its batch into static input buffers and captures model(...).loss, loss.backward() and
optimizer.step() into a graph, with the gradients set to None first so that backward allocates them in the graph's
memory pool (each replay then writes them, not adds to them); it and every later call copy the batch in and replay.
The math is the eager step's, kernel for kernel: a replay runs the captured launches on new data.

What it needs, checked where it can be:
- inputs of the same shapes and dtypes on every call (a new shape is an error: capture another CUDAGraphStep);
- an optimizer whose step can be captured: torch's Adam/AdamW/SGD with capturable=True (its step count lives on
  the device), and a learning rate that is a device tensor if it is to change between steps (a Python float is
  baked into the graph);
- any checkpointing mode. With "offload" (and the layers "auto" recomputes) the offloader keeps its pinned host
  buffers and reuses them by their place in the step (Offloader.persistent), so that the graph's copies always
  target the same memory; the link planner must have finished timing before the capture (warmup >= 3: it times
  the first two forwards of a length and plans in the third);
- no randomness: adapter dropout reads and sets the RNG state around each recomputed layer (engine/offload.py).
The loss returned is a copy of the graph's output (the next replay overwrites the original). With max_grad_norm the
step clips the global gradient norm before the optimizer step, as hare.train does (torch's clip_grad_norm_, which
reads nothing back to the host), and `grad_norm` holds the norm before clipping (tests/engine/test_gpu.py
test_cuda_graph_step_clips_as_the_eager_step; passed on the H200 in run S9-1).

Measured (H200, BENCHMARKS.md session 8): tests/engine/test_gpu.py checks it against the eager step in every
checkpointing mode. Llama-3.2-1B QLoRA at 2048 x 4 with offload: 68.2-68.5k tok/s graphed (run S8-5), 44.5-49.9k
eager, at 2.09 GiB allocated and 2.37 reserved. A GPU-bound step gains little: 8B QLoRA offload 13,628-13,683
graphed against 13,691 eager; 8B "auto" 16,676-16,810 graphed against 16,412 eager (S7-5).
Memory: the warm-up's cached blocks are given back before the capture, and the offloader hands its device tensors
back in stream order (Offloader.persistent). Without that the 8B offload step reserved 25.8 GiB for 7.8 allocated.
"""
import torch

from ..kernels import lora
from .offload import AutoCheckpointing, LayerCheckpointing


class CUDAGraphStep:
    """step = CUDAGraphStep(model, optimizer); loss = step(input_ids, labels=..., doc_ids=..., position_ids=...):
    one training step (zero_grad, forward, backward, optimizer.step) per call, replayed from a CUDA graph after
    `warmup` eager calls. See the module docstring for what it needs."""

    def __init__(self, model, optimizer, warmup: int = 3, max_grad_norm: float = None):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the eager steps before the capture), got {warmup}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (or None: no clipping), got {max_grad_norm}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params or not all(p.is_cuda for p in params):
            raise ValueError("CUDAGraphStep needs a model whose trainable parameters are on a CUDA device")
        for group in optimizer.param_groups:
            if not group.get("capturable", False):
                raise ValueError(f"the optimizer must be created with capturable=True (its step count on the "
                                 f"device), e.g. torch.optim.AdamW(params, fused=True, capturable=True); "
                                 f"{type(optimizer).__name__} has capturable={group.get('capturable')}")
        hook = getattr(model.model, "run_layer", None)
        layers = hook.checkpointing if isinstance(hook, AutoCheckpointing) else hook
        offload = isinstance(layers, LayerCheckpointing) and layers.offload
        if offload and layers.planner is not None and warmup < 3:
            raise ValueError(f"checkpointing's link planner times the first two forwards and plans in the third, "
                             f"which a capture cannot hold: warmup must be >= 3, got {warmup}")
        if any(lora.has_dropout(m) for m in model.modules()):
            raise ValueError("adapter dropout draws random masks whose RNG state checkpointing reads on the host; "
                             "a CUDA graph step needs dropout=0")
        if offload:
            layers.stash.persistent = True  # the graph's host copies need fixed buffers
            if layers.planner is not None:  # plan the link for the graph's forward, which has no host gaps
                layers.planner.hold_gpu = True
        self.model, self.optimizer, self.warmup = model, optimizer, warmup
        self.params, self.max_grad_norm = params, max_grad_norm
        self.calls, self.graph, self.static, self.loss, self.norm = 0, None, None, None, None
        self.stream = torch.cuda.Stream(params[0].device)

    def _step(self, batch):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(**batch).loss
        loss.backward()
        norm = None
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        return loss, norm

    @property
    def grad_norm(self):
        """The latest step's gradient norm before clipping (with max_grad_norm; None without): a copy, since the
        next replay overwrites the graph's own."""
        return None if self.norm is None else self.norm.clone()

    @staticmethod
    def _signature(batch):
        return {k: (tuple(v.shape), v.dtype, v.device) for k, v in batch.items()}

    def __call__(self, input_ids, labels=None, doc_ids=None, position_ids=None):
        if labels is None:
            raise ValueError("labels are required: the graph captures a training step (loss, backward, step)")
        batch = {k: v for k, v in dict(input_ids=input_ids, labels=labels, doc_ids=doc_ids,
                                       position_ids=position_ids).items() if v is not None}
        self.calls += 1
        current = torch.cuda.current_stream()
        if self.calls <= self.warmup:  # eager, on a side stream, as PyTorch asks before a capture
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                loss, self.norm = self._step(batch)
            current.wait_stream(self.stream)
            return loss.detach()
        if self.graph is None:
            self.static = {k: v.clone() for k, v in batch.items()}
            self.optimizer.zero_grad(set_to_none=True)  # backward allocates the gradients in the graph's pool
            # the warm-up's cached blocks would sit unused beside the graph's own pool: give them back
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss, self.norm = self._step(self.static)
        else:
            want, got = self._signature(self.static), self._signature(batch)
            if got != want:
                raise ValueError(f"the graph was captured for inputs {want}; got {got} "
                                 f"(a new shape needs its own CUDAGraphStep)")
            for k, v in batch.items():
                self.static[k].copy_(v)
        self.graph.replay()  # the capture only recorded the step: the call that captured runs it here too
        return self.loss.detach().clone()
