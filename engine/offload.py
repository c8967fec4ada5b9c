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

    forward:  stash x; y = layer(x) without recording; remember the RNG state (adapter dropout masks, if any)
    backward: x = unstash; y = layer(x) recorded, with the same RNG state; (dx, d params) = vjp(y, dy)

The recomputation asks the layer for the branches whose sum is y rather than y (DecoderLayer.recompute): y's
value is never needed, only its graph, so the layer skips the GEMM whose only use is y (down_proj's forward,
~27% of a Llama layer's recompute FLOPs) and the final residual add; the vjp of a sum hands dy to every branch.
With offload the mid residual h is stashed as well and o_proj's GEMM is skipped too (another ~8%).

Stashed blocks (offload only): the host link (~55 GB/s each way on the H200, measured) has room left while the
forward runs, so a layer may also send the tensors that attention's and the MLP's backward read (q, k, v, the
attention output and log-sum-exp; the MLP's input, gate and up) instead of rebuilding them: its recomputation
then skips the q/k/v and gate/up GEMMs and the attention forward. StashedBlocks records those blocks' graphs in the
forward with their saved tensors on the host, Replay runs them in the backward; _LinkPlanner picks how many
layers' attention fit (the MLP's block only when asked by name). Run S4-3 (BENCHMARKS.md): Llama-3.1-8B QLoRA at
2048 x 4, attention stashed in 29 of 32 layers, 13,966 tok/s against 13,441 without, 7.73 against 7.58 GiB.

The layer's trainable parameters are explicit inputs of the function, so their gradients flow back as its
outputs even when x itself needs no gradient (layer 0 under frozen embeddings).
"""
import torch

from ..kernels import lora


class _Keep:
    """No offload: the input stays where it is."""

    def begin_group(self):
        return None

    def save(self, x):
        return x

    def load(self, handle):
        return handle

    def release(self, group):
        pass


class Offloader:
    """Tensors in pinned host memory, copied on a side stream, in groups (one per checkpointed layer), with one
    group of prefetch in backward.

    Groups are numbered in forward order; the first load from group g brings back all of g and starts bringing
    back g - 1 (the previous layer's tensors, the next ones the backward needs). A fetched group stays on the
    device until `release(g)` (the end of that layer's backward): a saved tensor may be read more than once (a
    stashed block's output, see StashedBlocks). On CPU tensors there is nothing to offload to: they are kept as
    separate copies, so that the code path (save -> load -> recompute) is the GPU's."""

    MIN_BYTES = 1 << 20  # `pack` keeps smaller CUDA tensors by reference: not worth a transfer

    def __init__(self):
        self.saved = {}      # group -> [(host tensor, copy-done event or None, device)]
        self.fetched = {}    # group -> [device tensor (CPU), or (device tensor, arrival event) (CUDA)]
        self.group = -1
        self.stream = None
        # persistent (engine/graph.py sets it): the host buffers are kept and reused by their place in the step
        # (the n-th save of every forward writes the n-th buffer), so that a CUDA graph's copies always target
        # the same memory; it assumes each forward's backward runs before the next forward (a graph step).
        # Otherwise each save takes a fresh buffer from torch's caching host allocator.
        # Persistent saves also hand their device tensors back in stream order (_settle) instead of by
        # record_stream: during a CUDA graph capture the allocator cannot reuse a block that another stream used
        # until the capture ends, so every offloaded tensor would take new memory (run S8-2: an 8B offload step
        # captured that way reserved 25.8 GiB for 7.8 allocated).
        self.persistent = False
        self.pool, self.position = [], 0
        self.pending = []    # persistent saves' (group, device tensor, copy-done event), oldest first

    def _side_stream(self, device):
        if self.stream is None or self.stream.device != device:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    def begin_forward(self):
        """A forward starts: persistent buffers are handed out from the first again."""
        self.position = 0

    def end_forward(self):
        """The forward's last layer is launched: the device tensors of all but its last group go back now
        (before the loss's own temporaries), the rest when the backward fetches."""
        self._settle(self.group - 1)

    def begin_group(self):
        self.group += 1
        self.saved[self.group] = []
        # a group's copies ran while the next layer computed: its device tensors go back as the one after starts
        self._settle(self.group - 2)
        return self.group

    def _settle(self, last):
        """Persistent saves of groups <= last: the current stream waits for their copies to the host, then drops
        the device tensors, whose memory the allocator may then reuse in stream order (also within a capture)."""
        while self.pending and self.pending[0][0] <= last:
            _, x, done = self.pending.pop(0)
            torch.cuda.current_stream(x.device).wait_event(done)

    def _host(self, x):
        """A host tensor shaped like x (same strides: a transposed view, attention's saved output, copies as one
        dense block and comes back as the same view); pinned for a CUDA x."""
        def fresh():
            return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, pin_memory=x.is_cuda)
        if not self.persistent:
            return fresh()
        i, self.position = self.position, self.position + 1
        if i == len(self.pool):
            self.pool.append(fresh())
        elif (self.pool[i].size(), self.pool[i].stride(), self.pool[i].dtype) != (x.size(), x.stride(), x.dtype):
            self.pool[i] = fresh()  # another shape at this place (a warm-up step of another length)
        return self.pool[i]

    def save(self, x):
        """Send x to the host (CUDA) or keep a copy (CPU); returns its handle (group, index)."""
        slots = self.saved[self.group]
        if not x.is_cuda:
            slots.append((self._host(x).copy_(x.detach()), None, x.device))
        else:
            stream = self._side_stream(x.device)
            host = self._host(x)  # torch's caching host allocator reuses the fresh ones too
            stream.wait_stream(torch.cuda.current_stream(x.device))  # x is fully written before the copy reads it
            with torch.cuda.stream(stream):
                host.copy_(x, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            # the allocator must not hand x's memory out before the copy has read it
            if self.persistent:
                self.pending.append((self.group, x, done))
            else:
                x.record_stream(stream)
            slots.append((host, done, x.device))
        return self.group, len(slots) - 1

    def pack(self, t):
        """saved_tensors_hooks' pack: big CUDA tensors go to the host; the rest are kept as they are."""
        if t.is_cuda and t.numel() * t.element_size() < self.MIN_BYTES:
            return t
        return self.save(t)

    def unpack(self, handle):
        return handle if isinstance(handle, torch.Tensor) else self.load(handle)

    def _fetch(self, g):
        """Start bringing group g back. Its device tensors are allocated on the current stream, which the side
        stream waits for before writing them, and which waits for their arrival before using or freeing them
        (load, release): stream-ordered, no record_stream, so a graph capture can reuse their memory."""
        self._settle(self.group)
        if g in self.fetched or g not in self.saved:
            return
        out = []
        for host, done, device in self.saved.pop(g):
            if device.type != "cuda":
                out.append(host)
                continue
            current = torch.cuda.current_stream(device)
            x = torch.empty_strided(host.size(), host.stride(), dtype=host.dtype, device=device)
            stream = self._side_stream(device)
            stream.wait_stream(current)  # x's memory may have been freed by work still queued there
            with torch.cuda.stream(stream):
                stream.wait_event(done)
                x.copy_(host, non_blocking=True)
                arrived = torch.cuda.Event()
                arrived.record(stream)
            out.append((x, arrived))
        self.fetched[g] = out

    def load(self, handle):
        g, i = handle
        self._fetch(g)
        self._fetch(g - 1)  # the previous layer's tensors travel while this layer's backward runs
        ready = self.fetched[g][i]
        if isinstance(ready, torch.Tensor):
            return ready
        x, arrived = ready
        torch.cuda.current_stream(x.device).wait_event(arrived)
        return x

    def release(self, group):
        for ready in self.fetched.pop(group, ()):
            if not isinstance(ready, torch.Tensor):  # one never loaded must still land before its memory is freed
                torch.cuda.current_stream(ready[0].device).wait_event(ready[1])
        self.saved.pop(group, None)


class _Record:
    """One stashed block: the root of its recorded graph and the starts standing for its inputs (GradientEdges:
    nodes, not the tensors' memory), its trainable parameters, and how to rebuild its output's value."""

    def __init__(self, edge, starts, params, value, meta):
        self.edge, self.starts, self.params, self.value, self.meta = edge, starts, params, value, meta

    def output(self, stash):
        size, stride, offset, dtype, device = self.meta
        if self.value is None:  # the value is not needed: one element broadcast to the output's shape
            return torch.empty(1, dtype=dtype, device=device).expand(size)
        saved = stash.load(self.value)
        return saved.as_strided(size, stride, saved.storage_offset() + offset)


class _Source(torch.autograd.Function):
    """apply(anchor, x) -> x (a view) as the start of a recorded graph, without keeping x: a leaf x requiring
    grad would be held by its gradient accumulator for as long as the graph lives (all the forward, for every
    layer). Here only the tiny `anchor` leaf is; the gradient reaching x is read at this node's edge."""

    @staticmethod
    def forward(ctx, anchor, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return None, None


class Replay(torch.autograd.Function):
    """apply(record, *inputs, *params): in a recomputation, a stashed block (StashedBlocks) stands in for its
    forward: the output is the stashed value, and the backward is the vjp of the graph recorded in the forward,
    whose saved tensors come back from the host."""

    @staticmethod
    def forward(ctx, record, stash, *inputs):
        ctx.record = record
        return record.output(stash)

    @staticmethod
    def backward(ctx, grad):
        record, ctx.record = ctx.record, None
        wanted = record.starts + record.params
        grads = torch.autograd.grad([record.edge], wanted, [grad], allow_unused=True)
        return (None, None, *[g if need else None for g, need in zip(grads, ctx.needs_input_grad[2:])])


class StashedBlocks:
    """The decoder's `blocks` hook for one checkpointed layer: sub-blocks (by name: "self_attn" is attention from
    the projections' outputs to the heads' output, "mlp" the whole MLP) whose saved tensors go to the host in
    the forward instead of being recomputed in the backward.

    forward:    out = blocks(name, fn, inputs, params): fn(*inputs) runs recorded (from _Source nodes standing
                for the inputs) under saved_tensors_hooks that send every big saved tensor to the host (Offloader.pack),
                the graph's root is kept, not the output's memory; the output's value is kept only if wanted
                (attention's, which o_proj's backward reads), and then it is found among the tensors the graph
                saved (attention saves its output) rather than sent twice.
    recompute:  the same call returns Replay: the stashed value (or a placeholder), and the recorded vjp.
    The recomputation then skips what only fed the block: for attention, q/k/v's GEMMs (LoRALinearsFunction
    need_output=False), the rope and the attention forward; for the MLP, gate's and up's GEMMs. Same values, same
    math: the block's backward is the one the recomputation would have built, on the tensors its forward saved."""

    def __init__(self, stash, names):
        self.stash, self.names = stash, frozenset(names)
        self.records = {}
        self.replay = False

    def replaying(self, name) -> bool:
        return self.replay and name in self.records

    def __call__(self, name, fn, inputs, params=(), value=True, keep=()):
        """fn(*inputs) with trainable `params`; value=False: the output's value is never read in the backward;
        keep: tensors fn reads that stay alive anyway (the rope tables), saved by reference, not sent."""
        if name not in self.names:
            return fn(*inputs)
        if self.replay:
            return Replay.apply(self.records.pop(name), self.stash, *inputs, *params)
        anchor = torch.empty(0, device=inputs[0].device, requires_grad=True)
        # (tensor, handle) of what the graph saved, where the output's value is wanted: it is looked up among
        # them by storage. The tensors stay referenced until fn returns: a freed one's memory may be handed to a
        # later tensor (the output, say), and then an address would no longer name one tensor (seen on the CPU:
        # the output found at the address of a freed input of sin, wrong gradients). For attention they live
        # that long anyway (the block ends with the kernel that saves them); the MLP's value is not wanted.
        packed = []
        kept = {t.untyped_storage().data_ptr() for t in keep}

        def pack(t):
            if t.untyped_storage().data_ptr() in kept:
                return t
            h = self.stash.pack(t)
            if value and not isinstance(h, torch.Tensor):
                packed.append((t, h))
            return h

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, self.stash.unpack):
            starts = [_Source.apply(anchor, t) for t in inputs]
            out = fn(*starts)
        handle, offset = None, 0
        if value:
            ptr = out.untyped_storage().data_ptr()
            saved = ((h, t.storage_offset()) for t, h in packed if t.untyped_storage().data_ptr() == ptr)
            handle, base = next(saved, (None, 0))
            if handle is None:  # the graph does not keep its output: send it as well
                handle, base = self.stash.save(out), out.storage_offset()
            offset = out.storage_offset() - base
        packed.clear()  # the graph's saved variables hold the pack hook, and with it this list: empty it
        meta = (out.size(), out.stride(), offset, out.dtype, out.device)
        edge = torch.autograd.graph.get_gradient_edge
        self.records[name] = _Record(edge(out), [edge(t) for t in starts], list(params), handle, meta)
        return out.detach()


class _Group:
    """A layer's group in the stash, released at the end of its backward, or when its graph is dropped without
    one (a forward whose loss is discarded): the group lives in the function's context, so a discarded graph takes
    its host buffers with it."""

    def __init__(self, stash):
        self.stash, self.id = stash, stash.begin_group()

    def release(self):
        self.stash.release(self.id)

    def __del__(self):
        self.release()


class CheckpointFunction(torch.autograd.Function):
    """apply(layer_fns, stash, rng, x, *params) with layer_fns = (forward, recompute): forward(x) -> (y, mids) runs
    unrecorded, x and the tensors `mids` are stashed; in backward recompute(x, mids) gives the branches whose sum
    is y (a tuple), recorded, and their vjp with dy is the layer's. rng: the layer draws random numbers (adapter
    dropout), so the recomputation replays the forward's RNG state; without it no state is read or set (which
    also keeps the step capturable in a CUDA graph: engine/graph.py). See the module docstring."""

    @staticmethod
    def forward(ctx, layer_fns, stash, rng, x, *params):
        ctx.recompute, ctx.stash = layer_fns[1], stash
        ctx.cpu_rng = torch.get_rng_state() if rng else None
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if rng and x.is_cuda else None
        ctx.save_for_backward(*params)
        ctx.group = _Group(stash)  # stashed blocks of the forward join the same group
        with torch.no_grad():
            y, mids = layer_fns[0](x)
        ctx.handles = [stash.save(t) for t in (x, *mids)]
        return y

    @staticmethod
    def backward(ctx, dy):
        params = ctx.saved_tensors
        need_x, need_p = ctx.needs_input_grad[3], ctx.needs_input_grad[4:]
        x, *mids = [ctx.stash.load(h) for h in ctx.handles]
        x = x.detach().requires_grad_(need_x)
        rng = ctx.cpu_rng is not None
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else [], enabled=rng), torch.enable_grad():
            if rng:
                torch.set_rng_state(ctx.cpu_rng)  # the same dropout masks as in the forward
                if ctx.cuda_rng is not None:
                    torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            branches = ctx.recompute(x, mids)
        wanted = ([x] if need_x else []) + [p for p, need in zip(params, need_p) if need]
        grads = list(torch.autograd.grad(branches, wanted, [dy] * len(branches), allow_unused=True))
        ctx.group.release()
        dx = grads.pop(0) if need_x else None
        return (None, None, None, dx, *[grads.pop(0) if need else None for need in need_p])


def _host_available():
    """Bytes of host memory available now (Linux: /proc/meminfo MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _device_room(device, margin=1 << 30):
    """Device bytes above the peak so far that this process may still use (free, plus its cache), less a margin."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.max_memory_allocated(device) - margin


HOLD_CYCLES = 200_000_000


class _LinkPlanner:
    """Which layers stash attention ("auto"): as many as the host link carries while the forward runs.

    Per layer the forward may send link_rate x forward_time x 0.85 bytes; the layer input and mid residual take
    their share, and the rest goes to attention's saved tensors (q, k, v, output, log-sum-exp: at Llama-3.1-8B 20
    KiB per token; they save the q/k/v GEMMs, the rope and the attention forward of the recomputation, ~0.9 ms per
    layer at 8192 tokens on the H200, BENCHMARKS.md). Spare bytes carry over to the next layer, so when attention
    does not fit every layer it goes to an evenly spread share of them. The MLP's block is not planned: its tensors
    (input, gate, up: 72 KiB per token) save less time per byte (gate's and up's GEMMs, 2.4 ms per 0.5 GB at 8192
    tokens, against 0.9 ms per 0.17 GB), and the backward's prefetch would hold a whole one more on the device.
    The forward time per layer is measured in the first two forwards of a token count (CUDA events, read at the
    next forward); the plan, made once for that token count from the third forward on, uses the smaller (the first
    includes the kernels' compilation). Those forwards' time is what the GPU takes to run them as launched, which
    where the host cannot keep up (an eager step of a small model) includes its idle gaps; a step replayed from a
    CUDA graph has none, so CUDAGraphStep sets `hold_gpu`: the GPU then sleeps before each timed forward while the
    host queues it, and the events time its kernels back to back (Llama-3.2-1B at 8192 tokens, run S8-5: 2.0 ms
    per layer held against 2.6-4.5 eager; the graph step went from 64-67k to 68k tok/s). The link rate is
    measured once (a pinned 64 MiB copy). Memory bounds it too: the stash of one step takes at most half of the
    host memory available when the plan is made (pinned buffers at long sequences), and none is planned if the
    device's peak so far has not room for two layers' stash more (the backward's current and prefetched layer)."""

    HEADROOM = 0.85
    HOST_SHARE = 0.5  # of the host memory available when the plan is made

    def __init__(self, num_layers):
        self.num_layers = num_layers
        self.fwd_ms = {}      # tokens -> (minimum forward ms per layer, forwards measured)
        self.plans = {}       # tokens -> {layer index: block names}
        self.link = None      # bytes per ms, device to host
        self.events = None    # (tokens, start, end) of the forward in flight
        self.tokens = 0
        self.host = None      # host bytes available for the stash (tests); None = _host_available() at the plan
        self.room = None      # device bytes the stash may add to the peak (tests, AutoCheckpointing's budget); None =
        #                       _device_room() at the plan
        self.report = "stashed blocks: none planned yet"  # what the latest plan chose
        self.hold_gpu = False  # time the forwards' kernels without host gaps (engine/graph.py sets it)

    @staticmethod
    def _measure_link(device):
        n = 64 << 20
        src = torch.empty(n, dtype=torch.uint8, device=device)
        dst = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dst.copy_(src, non_blocking=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        return 3 * n / start.elapsed_time(end)

    def begin(self, x):
        """At layer 0 of a forward: read the previous forward's time; time this one while the plan for its token
        count is not made (two forwards: no events, no reads after that)."""
        if self.events is not None and self.events[2] is not None:
            tokens, start, end = self.events
            end.synchronize()  # long done: a backward and an optimizer step ran since
            ms = start.elapsed_time(end) / self.num_layers
            best, count = self.fwd_ms.get(tokens, (ms, 0))
            self.fwd_ms[tokens] = (min(best, ms), count + 1)
        self.events = None
        self.tokens = x.shape[:-1].numel()
        if self.tokens not in self.plans and self.fwd_ms.get(self.tokens, (0, 0))[1] < 2:
            if self.hold_gpu:  # ~0.1 s at the H200's 1.98 GHz: the host queues the forward meanwhile
                torch.cuda._sleep(HOLD_CYCLES)
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.events = (self.tokens, start, None)

    def end(self):
        if self.events is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events = (*self.events[:2], end)

    def blocks(self, layer, x):
        """The blocks layer `layer` stashes in this forward: none until two forwards of this token count are
        timed, then the plan made once from them."""
        if self.tokens not in self.plans:
            ms, count = self.fwd_ms.get(self.tokens, (0.0, 0))
            if count < 2:
                return ()
            self.plans[self.tokens] = self._plan(layer, x, ms)
        return self.plans[self.tokens].get(layer.self_attn.layer_idx, ())

    def _plan(self, layer, x, ms):
        if self.link is None:
            self.link = self._measure_link(x.device)
        attn, tokens, e = layer.self_attn, self.tokens, x.element_size()
        cost = tokens * (2 * (attn.heads + attn.kv_heads) * attn.head_dim * e + attn.heads * 4)
        spare = self.link * ms * self.HEADROOM - 2 * tokens * x.shape[-1] * e
        # host memory: a share of what is available now (the layer inputs' pinned buffers are already taken); a
        # stashed layer costs up to twice its bytes there (the caching host allocator rounds each buffer up to a
        # power of two). Fewer layers than the link allows: the same spreading, with less per layer.
        host = self.host if self.host is not None else _host_available()
        if host is not None:
            spare = min(spare, cost * min(self.num_layers, host * self.HOST_SHARE // (2 * cost)) / self.num_layers)
        # device memory: in the backward a stashed layer's tensors and the next one's (prefetch) are on the device
        # at once, beside what the recomputation allocated before; no stash if the peak so far has not that room
        room = self.room if self.room is not None else _device_room(x.device)
        if room < 2 * cost:
            spare = 0.0
        plan, credit = {}, 0.0
        for i in range(self.num_layers):
            credit += spare
            if credit >= cost:
                plan[i] = ("self_attn",)
                credit -= cost
        self.report = (f"attention stashed in {len(plan)} of {self.num_layers} layers (link {self.link / 1e6:.1f} "
                       f"GB/s, forward {ms:.2f} ms per layer at {tokens} tokens)")
        return plan


STASH = {"none": (), "all": ("self_attn", "mlp"), "attention": ("self_attn",), "mlp": ("mlp",)}


class LayerCheckpointing:
    """The decoder's `run_layer` hook: run_layer(layer, x, rope, doc_ids) -> the layer's output, checkpointed.

    With offload the layer's mid residual h (between attention and MLP) is stashed too: one more hidden-size
    tensor per layer on the PCIe link, and the recomputation skips o_proj's GEMM (DecoderLayer.recompute). And
    blocks of the layer may be stashed instead of recomputed (StashedBlocks): stash "auto" attention in as many
    layers as the link carries during the forward (_LinkPlanner; nothing on the CPU), or in every layer the blocks
    named by a key of STASH ("none", "all", "attention", "mlp"). On the device ("on") only x is kept, the smallest
    footprint. Layers with sandwich norms stash nothing (their recomputation runs the whole layer)."""

    def __init__(self, offload: bool = False, stash: str = "auto", num_layers: int = None):
        if stash != "auto" and stash not in STASH:
            raise ValueError(f"stash must be 'auto' or one of {sorted(STASH)}, got {stash!r}")
        if stash not in ("auto", "none") and not offload:
            raise ValueError(f"stash={stash!r} needs offload=True (stashed blocks go to the host)")
        if stash == "auto" and offload and num_layers is None:
            raise ValueError("stash='auto' needs num_layers")
        self.offload = offload
        self.stash = Offloader() if offload else _Keep()
        self.mode = stash if offload else "none"
        self.num_layers = num_layers
        self.planner = _LinkPlanner(num_layers) if self.mode == "auto" else None

    def begin_forward(self, x):
        """Layer 0 of a forward starts (the link planner times the first forwards of a token count; persistent
        host buffers start over). Called here when layer 0 is checkpointed, by AutoCheckpointing when it keeps
        it; end_forward likewise."""
        if self.offload:
            self.stash.begin_forward()
        if self.planner is not None and x.is_cuda:
            self.planner.begin(x)

    def end_forward(self, x):
        """The last layer of a forward has been launched."""
        if self.offload:
            self.stash.end_forward()
        if self.planner is not None and x.is_cuda:
            self.planner.end()

    def _blocks(self, layer, x):
        if layer.sandwich:
            return ()
        if self.mode != "auto":
            return STASH[self.mode]
        if not x.is_cuda:
            return ()
        return self.planner.blocks(layer, x)

    def __call__(self, layer, x, rope, doc_ids):
        i = layer.self_attn.layer_idx
        if i == 0:
            self.begin_forward(x)
        params = [p for p in layer.parameters() if p.requires_grad]
        save_mid = self.offload and not layer.sandwich
        names = self._blocks(layer, x)
        blocks = StashedBlocks(self.stash, names) if names else None

        def forward(inp):
            if save_mid:
                y, h = layer(inp, rope, doc_ids, keep_mid=True, blocks=blocks)
                return y, (h,)
            return layer(inp, rope, doc_ids), ()

        def recompute(inp, mids):
            if blocks is not None:
                blocks.replay = True
            return layer.recompute(inp, rope, doc_ids, *mids, blocks=blocks)

        rng = any(lora.has_dropout(m) for m in layer.modules())
        y = CheckpointFunction.apply((forward, recompute), self.stash, rng, x, *params)
        if i == self.num_layers - 1:
            self.end_forward(x)
        return y

    def report(self) -> str:
        if self.planner is None:
            return f"checkpointing {'offload' if self.offload else 'on'}, stashed blocks: {self.mode}"
        return f"checkpointing offload, {self.planner.report}"


class AutoCheckpointing:
    """Mode "auto": each decoder layer either keeps its activations (plain autograd: no recompute) or is
    checkpointed with offload, decided in every forward, layer by layer, against a memory budget.

    Layer i keeps its activations when, after it, everything still fits:
        allocated now + a + (layers after i) * x_bytes + reserve <= budget
    with a = the memory one kept layer adds at this token count (measured on the first kept layer of that
    size, an analytic upper bound until then), x_bytes = what one checkpointed layer leaves on the device (0 on
    the GPU, where its input and mid residual go to pinned host memory; on the CPU, the kept copies), and
    reserve = a + margin: the recomputation of one checkpointed layer in backward, plus the loss's and
    optimizer's temporaries. The first layers keep their activations and the later ones are checkpointed; the
    backward meets the checkpointed ones first, while the kept activations are all still alive, which the
    reserve covers. budget: bytes; None = what the device has (free + allocated by torch) when the first
    forward runs, minus the margin.

    The checkpointed layers are the "offload" mode's (LayerCheckpointing with offload and stash "auto"): their
    inputs travel to the host, and attention's saved tensors too in as many of them as the host link carries
    while the forward runs (_LinkPlanner, which times whole forwards, kept layers included), so that where the
    link has room a checkpointed layer's attention is fetched back instead of recomputed; the stash's device
    room is what the budget leaves above the peak so far. Offloading a kept layer's whole activations instead is
    not offered: at ~116 KiB per token per Llama-8B layer the PCIe round trip costs about what the layer's
    recomputation does.

    `plan` holds the latest forward's choice (kept and checkpointed layer indices); `report()` says it."""

    def __init__(self, num_layers: int, budget: int = None, margin: int = 1 << 30, layer_bytes: int = None,
                 allocated=None):
        self.num_layers, self.budget, self.margin = num_layers, budget, margin
        self.layer_bytes = layer_bytes  # fixed per-layer cost (tests); None = measure
        self.allocated = allocated      # () -> bytes in use (tests); None = torch.cuda.memory_allocated
        self.measured = {}              # tokens -> bytes a kept layer added
        self.checkpointing = LayerCheckpointing(offload=True, stash="auto", num_layers=num_layers)
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
            if x.is_cuda:  # the stash may add to the peak so far only what the budget leaves
                self.checkpointing.planner.room = self.budget - torch.cuda.max_memory_allocated(x.device)
        a = self._estimate(layer, x)
        later = self.num_layers - i - 1
        x_bytes = 0 if x.is_cuda else x.numel() * x.element_size()
        if allocated() + a + later * x_bytes + a + self.margin > self.budget:
            self.plan["checkpointed"].append(i)
            return self.checkpointing(layer, x, rope, doc_ids)  # it marks the forward's first and last layer
        if i == 0:
            self.checkpointing.begin_forward(x)
        before = allocated()
        y = layer(x, rope, doc_ids)
        if self.layer_bytes is None and (x.is_cuda or self.allocated is not None):  # the CPU has nothing to measure
            self.measured[self.tokens] = max(self.measured.get(self.tokens, 0), allocated() - before)
        self.plan["kept"].append(i)
        if later == 0:
            self.checkpointing.end_forward(x)
        return y

    def report(self) -> str:
        kept, ckpt = len(self.plan["kept"]), len(self.plan["checkpointed"])
        per = self.measured.get(self.tokens, self.layer_bytes)
        per = f"{per / 2**30:.2f} GiB per kept layer at {self.tokens} tokens" if per else "per-layer cost unmeasured"
        budget = f"{self.budget / 2**30:.1f} GiB" if self.budget is not None else "unset"
        out = (f"checkpointing auto: {kept} of {kept + ckpt} layers keep their activations, {ckpt} recomputed "
               f"({per}; budget {budget})")
        if ckpt:
            out += f"; recomputed layers offload their inputs, {self.checkpointing.planner.report}"
        return out


MODES = ("on", "offload", "auto")


def enable_checkpointing(model, mode: str = "on", budget_gib: float = None, stash: str = "auto"):
    """Checkpoint the decoder layers of `model`. mode "on": every layer, its input kept on the device;
    "offload": every layer, its input in pinned CPU memory; "auto": as many layers as `budget_gib` (default: the
    device's memory minus 1 GiB) allows keep their activations, the rest are checkpointed as with "offload"
    (AutoCheckpointing).
    stash ("offload" only): which blocks of a layer send their saved tensors to the host instead of being
    recomputed: "auto" attention in as many layers as the host link carries during the forward, or "all",
    "attention", "mlp", "none" in every layer (LayerCheckpointing, StashedBlocks).
    Returns the hook; `disable_checkpointing(model)` removes it."""
    if mode not in MODES:
        raise ValueError(f"checkpointing mode must be one of {MODES}, got {mode!r}")
    if budget_gib is not None and mode != "auto":
        raise ValueError("budget_gib applies to mode 'auto' only")
    if stash != "auto" and mode != "offload":
        raise ValueError("stash applies to mode 'offload' only")
    if mode == "auto":
        budget = None if budget_gib is None else int(budget_gib * 2**30)
        hook = AutoCheckpointing(len(model.model.layers), budget)
    else:
        hook = LayerCheckpointing(offload=mode == "offload", stash=stash, num_layers=len(model.model.layers))
    model.model.run_layer = hook
    return hook


def disable_checkpointing(model):
    model.model.run_layer = None
