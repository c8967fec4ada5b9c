"""Gradient checkpointing per decoder layer, optionally with the layer inputs offloaded to pinned CPU memory.

Checkpointing keeps only each layer's input x and recomputes the layer in backward (Chen et al. 2016,
arXiv:1604.06174): activation memory drops from all of every layer's intermediates to one (batch, seq, hidden)
tensor per layer, plus one layer's intermediates at a time during backward. At long context even those
per-layer inputs add up (Llama-3.1-8B: 32 layers x seq x 4096 x 2 bytes = 256 KiB per token), so with
`offload=True` each input is copied to pinned host memory on a side CUDA stream during the forward (the GPU
copy is freed once the copy is done) and copied back for the recomputation; while layer i recomputes, the input
of layer i-1 is already on its way back (prefetch), so the transfers hide behind compute when PCIe keeps up.

The autograd function (reentrant style, written out rather than torch.utils.checkpoint so that the saved
input can be moved):

    forward:  stash x; y = layer(x) without recording; remember the RNG state (dropout masks)
    backward: x = unstash; y = layer(x) recorded, with the same RNG state; (dx, d params) = vjp(y, dy)

The recomputation asks the layer for the branches whose sum is y rather than y (DecoderLayer.recompute): y's
value is never needed, only its graph, so the layer skips the GEMM whose only use is y (down_proj's forward,
~27% of a Llama layer's recompute FLOPs) and the final residual add; the vjp of a sum hands dy to every branch.
With offload the mid residual h is stashed as well and o_proj's GEMM is skipped too (another ~8%).

The layer's trainable parameters are explicit inputs of the function, so their gradients flow back as its
outputs even when x itself needs no gradient (layer 0 under frozen embeddings).
"""
import torch


class _Keep:
    """No offload: the input stays where it is."""

    def save(self, x):
        return x

    def load(self, handle):
        return handle


class Offloader:
    """Layer inputs in pinned host memory, copied on a side stream, with one layer of prefetch in backward.

    Saved inputs are numbered in forward order; loading number i starts bringing back number i - 1 (the
    previous layer's input, the next one the backward needs). On CPU tensors there is nothing to offload to: the
    input is kept as a separate copy, so that the code path (save -> load -> recompute) is the GPU's."""

    def __init__(self):
        self.slots = {}      # number -> (host tensor, copy-done event or None, device)
        self.fetched = {}    # number -> device tensor (CPU) or (device tensor, arrival event) (CUDA)
        self.count = 0
        self.stream = None

    def _side_stream(self, device):
        if self.stream is None or self.stream.device != device:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    def save(self, x):
        n = self.count
        self.count += 1
        if not x.is_cuda:
            self.slots[n] = (x.detach().clone(), None, x.device)
            return n
        stream = self._side_stream(x.device)
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)  # torch's caching host allocator reuses these
        stream.wait_stream(torch.cuda.current_stream(x.device))  # x is fully written before the copy reads it
        with torch.cuda.stream(stream):
            host.copy_(x, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        x.record_stream(stream)  # the allocator must not hand x's memory out before the copy has read it
        self.slots[n] = (host, done, x.device)
        return n

    def _fetch(self, n):
        if n in self.fetched or n not in self.slots:
            return
        host, done, device = self.slots.pop(n)
        if device.type != "cuda":
            self.fetched[n] = host
            return
        stream = self._side_stream(device)
        with torch.cuda.stream(stream):
            stream.wait_event(done)
            x = host.to(device, non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record(stream)
        self.fetched[n] = (x, arrived)

    def load(self, n):
        self._fetch(n)
        self._fetch(n - 1)  # the previous layer's input travels while this layer recomputes
        ready = self.fetched.pop(n)
        if isinstance(ready, torch.Tensor):
            return ready
        x, arrived = ready
        current = torch.cuda.current_stream(x.device)
        current.wait_event(arrived)
        x.record_stream(current)
        return x


class CheckpointFunction(torch.autograd.Function):
    """apply(layer_fns, stash, x, *params) with layer_fns = (forward, recompute): forward(x) -> (y, mids) runs
    unrecorded, x and the tensors `mids` are stashed; in backward recompute(x, mids) gives the branches whose sum
    is y (a tuple), recorded, and their vjp with dy is the layer's. See the module docstring."""

    @staticmethod
    def forward(ctx, layer_fns, stash, x, *params):
        ctx.recompute, ctx.stash = layer_fns[1], stash
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(*params)
        with torch.no_grad():
            y, mids = layer_fns[0](x)
        ctx.handles = [stash.save(t) for t in (x, *mids)]
        return y

    @staticmethod
    def backward(ctx, dy):
        params = ctx.saved_tensors
        need_x, need_p = ctx.needs_input_grad[2], ctx.needs_input_grad[3:]
        # the last stashed first: with offload each load starts bringing back the one stashed before it
        x, *mids = reversed([ctx.stash.load(h) for h in reversed(ctx.handles)])
        x = x.detach().requires_grad_(need_x)
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)  # the same dropout masks as in the forward
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            branches = ctx.recompute(x, mids)
        wanted = ([x] if need_x else []) + [p for p, need in zip(params, need_p) if need]
        grads = list(torch.autograd.grad(branches, wanted, [dy] * len(branches), allow_unused=True))
        dx = grads.pop(0) if need_x else None
        return (None, None, dx, *[grads.pop(0) if need else None for need in need_p])


class LayerCheckpointing:
    """The decoder's `run_layer` hook: run_layer(layer, x, rope, doc_ids) -> the layer's output, checkpointed.

    With offload the layer's mid residual h (between attention and MLP) is stashed too: one more hidden-size
    tensor per layer on the PCIe link, and the recomputation skips o_proj's GEMM (DecoderLayer.recompute).
    On the device ("on") only x is kept, the smallest footprint."""

    def __init__(self, offload: bool = False):
        self.offload = offload
        self.stash = Offloader() if offload else _Keep()

    def __call__(self, layer, x, rope, doc_ids):
        params = [p for p in layer.parameters() if p.requires_grad]
        save_mid = self.offload and not layer.sandwich

        def forward(inp):
            if save_mid:
                y, h = layer(inp, rope, doc_ids, keep_mid=True)
                return y, (h,)
            return layer(inp, rope, doc_ids), ()

        def recompute(inp, mids):
            return layer.recompute(inp, rope, doc_ids, *mids)

        return CheckpointFunction.apply((forward, recompute), self.stash, x, *params)


class AutoCheckpointing:
    """Mode "auto": each decoder layer either keeps its activations (plain autograd: no recompute) or is
    checkpointed, decided in every forward, layer by layer, against a memory budget.

    Layer i keeps its activations when, after it, everything still fits:
        allocated now + a + (layers after i) * x_bytes + reserve <= budget
    with a = the memory one kept layer adds at this token count (measured on the first kept layer of that
    size, an analytic upper bound until then), x_bytes = one checkpointed layer's saved input, and reserve = a +
    margin: the recomputation of one checkpointed layer in backward, plus the loss's and optimizer's temporaries.
    The first layers keep their activations and the later ones are checkpointed; the backward meets the
    checkpointed ones first, while the kept activations are all still alive, which the reserve covers.
    budget: bytes; None = what the device has (free + allocated by torch) when the first forward runs, minus
    the margin. Offloading a kept layer's activations instead of recomputing it is not offered: at ~116 KiB
    per token per Llama-8B layer the PCIe round trip costs about what the layer's recomputation does.

    `plan` holds the latest forward's choice (kept and checkpointed layer indices); `report()` says it."""

    def __init__(self, num_layers: int, budget: int = None, margin: int = 1 << 30, layer_bytes: int = None,
                 allocated=None):
        self.num_layers, self.budget, self.margin = num_layers, budget, margin
        self.layer_bytes = layer_bytes  # fixed per-layer cost (tests); None = measure
        self.allocated = allocated      # () -> bytes in use (tests); None = torch.cuda.memory_allocated
        self.measured = {}              # tokens -> bytes a kept layer added
        self.checkpointing = LayerCheckpointing(offload=False)
        self.plan = {"kept": [], "checkpointed": []}
        self.tokens = 0

    def _estimate(self, layer, x):
        """Bytes a kept layer adds for x: measured, or an upper bound from the shapes (bf16 activations saved
        per token: the norms' inputs, q/k/v, attention output, the MLP's input, gate and up, the output)."""
        tokens = x.shape[:-1].numel()
        if self.layer_bytes is not None:
            return self.layer_bytes
        if tokens in self.measured:
            return self.measured[tokens]
        attn, mlp = layer.self_attn, layer.mlp
        hidden = x.shape[-1]
        inter = mlp.gate_proj.weight.shape[0]
        per_token = 6 * hidden + 2 * attn.heads * attn.head_dim + 2 * attn.kv_heads * attn.head_dim + 3 * inter
        return tokens * per_token * x.element_size()

    def __call__(self, layer, x, rope, doc_ids):
        i = layer.self_attn.layer_idx
        # no allocator statistics on the CPU: only the budget, the estimates and the saved inputs count there
        allocated = self.allocated or ((lambda: torch.cuda.memory_allocated(x.device)) if x.is_cuda else (lambda: 0))
        if i == 0:
            self.plan = {"kept": [], "checkpointed": []}
            self.tokens = x.shape[:-1].numel()
            if self.budget is None:
                if not x.is_cuda:
                    raise ValueError("checkpointing='auto' needs a budget on the CPU (no device memory to ask)")
                free, _ = torch.cuda.mem_get_info(x.device)
                self.budget = free + torch.cuda.memory_allocated(x.device) - self.margin
        a = self._estimate(layer, x)
        later = self.num_layers - i - 1
        need = allocated() + a + later * x.numel() * x.element_size() + a + self.margin
        if need > self.budget:
            self.plan["checkpointed"].append(i)
            return self.checkpointing(layer, x, rope, doc_ids)
        before = allocated()
        y = layer(x, rope, doc_ids)
        if self.layer_bytes is None and (x.is_cuda or self.allocated is not None):  # the CPU has nothing to measure
            self.measured[self.tokens] = max(self.measured.get(self.tokens, 0), allocated() - before)
        self.plan["kept"].append(i)
        return y

    def report(self) -> str:
        kept, ckpt = len(self.plan["kept"]), len(self.plan["checkpointed"])
        per = self.measured.get(self.tokens, self.layer_bytes)
        per = f"{per / 2**30:.2f} GiB per kept layer at {self.tokens} tokens" if per else "per-layer cost unmeasured"
        budget = f"{self.budget / 2**30:.1f} GiB" if self.budget is not None else "unset"
        return (f"checkpointing auto: {kept} of {kept + ckpt} layers keep their activations, {ckpt} recomputed "
                f"({per}; budget {budget})")


MODES = ("on", "offload", "auto")


def enable_checkpointing(model, mode: str = "on", budget_gib: float = None):
    """Checkpoint the decoder layers of `model`. mode "on": every layer, its input kept on the device;
    "offload": every layer, its input in pinned CPU memory; "auto": as many layers as `budget_gib` (default: the
    device's memory minus 1 GiB) allows keep their activations, the rest are checkpointed (AutoCheckpointing).
    Returns the hook; `disable_checkpointing(model)` removes it."""
    if mode not in MODES:
        raise ValueError(f"checkpointing mode must be one of {MODES}, got {mode!r}")
    if budget_gib is not None and mode != "auto":
        raise ValueError("budget_gib applies to mode 'auto' only")
    if mode == "auto":
        budget = None if budget_gib is None else int(budget_gib * 2**30)
        hook = AutoCheckpointing(len(model.model.layers), budget)
    else:
        hook = LayerCheckpointing(offload=mode == "offload")
    model.model.run_layer = hook
    return hook


def disable_checkpointing(model):
    model.model.run_layer = None
