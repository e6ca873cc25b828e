"""Expert offloading for inference: the four strategies the Pre-gated MoE paper compares, behind one runtime.

- `gpu_only`: every expert resident on the device (the paper's upper bound);
- `on_demand`: experts in pinned host memory; after a block's gate, its chosen experts are copied to the device,
  then computed (MoE-OnDemand);
- `prefetch_all`: while MoE block N runs, every expert of block N+1 is copied (MoE-Prefetch);
- `pregated`: block N's pre-gate has chosen block N+1's experts; they are copied on a second CUDA stream and
  block N+1 waits for them through CUDA events. The copies are issued at the first block start after the chosen
  ids reach the host (a read started when the pre-gate ran), so the host never waits for them. The first MoE
  block fetches on demand, the last prefetches nothing (as in the artifact).

A copy into a slot waits on the copy stream for the end of the MoE block that last read the slot (`released`),
not for all the compute queued: pregated's copies for block N+1, issued once block N's experts are queued, run
beside whatever of them the device has still to compute, then under block N+1's dense half and attention.
prefetch_all's, issued inside block N before its experts are queued, run under them all.

Every strategy reads a routing back to the host without waiting, as soon as it exists: the same pre-gated model
serves all of them, so a block's routing is known a block early whatever the strategy, and only when its experts are
copied differs. gpu_only reads none where a forward has one (token, choice), as at batch 1: it picks the expert on
the device, as FasterTransformer's GPU-only does, so that its host never waits for a gate. on_demand alone stands
for a model without pre-gates, whose gate decides inside the block: its host waits at each MoE block until the
device gets there, before it reads the routing and issues the copies.

Copies land in a fixed pool of device slots shared by all MoE blocks. By default (`cache="none"`, as the paper's
default runs) an expert is copied every time a block asks for it; with an lru or lfu policy the pool is also a
cache over (block, expert), and an expert still resident is not copied again (beyond the paper; its artifact has
LFU/LRU caches for Figure 15). A cache rewards the larger pool: compare strategies with one at equal `slots`.

Everything a run records is here: bytes and copies host-to-device, cache hits and misses, and a `Span` (two
`Marker`s: CUDA events on the stream where the work ran) for every transformer block, MoE block, stall of the
compute stream and batch of expert copies, from which `copy_time_hidden` tells how much copy time ran under compute.

`GreedyDecoder` generates through the runtime, one forward a step.

On a CPU the same logic runs: "device" and "host" are the same memory, copies are real tensor copies, there is
one stream, waits do nothing and markers read the wall clock. Every strategy gives gpu_only's outputs bit for bit.
"""
from __future__ import annotations

import time
import warnings
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .model import ExpertStack, KVCache, Routing, SwitchLM, active_experts

STRATEGIES = ("gpu_only", "on_demand", "prefetch_all", "pregated")
CACHE_POLICIES = ("none", "lru", "lfu")


class Marker:
    """A point on a stream: a CUDA event (what other streams wait on, and what times the work) on a GPU; the wall
    clock on a CPU, where there is one stream and nothing to wait for."""

    def __init__(self, device: torch.device, stream: torch.cuda.Stream | None = None, timed: bool = True):
        self.event = self.stream = self.time = None
        if device.type == "cuda":
            self.stream = stream if stream is not None else torch.cuda.current_stream(device)
            self.event = torch.cuda.Event(enable_timing=timed)
            self.event.record(self.stream)
        else:
            self.time = time.perf_counter()

    def wait(self) -> None:
        """Make the current stream wait until this point."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def reached(self) -> None:
        """Hold the host until the device has got to this point."""
        if self.event is not None:
            self.event.synchronize()

    def ms_since(self, origin: "Marker") -> float:
        """Milliseconds from `origin` to here (on a GPU, once both have run: synchronise first)."""
        if self.event is not None:
            return origin.event.elapsed_time(self.event)
        return (self.time - origin.time) * 1e3


@dataclass
class Span:
    """A stretch of work between two markers. Kinds: "block" (a transformer block), "moe" (an MoE feed-forward,
    gates to output: the paper's MoE-block latency), "stall" (inside an MoE block, the compute stream waiting for
    the routing to reach the host and for copies, and the host issuing them), "issue" (pregated's prefetch, issued
    at a block start, outside any MoE block: the host's work of issuing it, which the serving rows count in the
    MoE block it serves and in its stall, as the other strategies issue theirs inside an MoE block's stall),
    "copy" (the experts one request copies host to device, back to back on the copy stream)."""

    kind: str
    index: int  # the transformer block for "block"; otherwise the MoE block (0 is the first MoE block) it serves
    forward: int  # which forward call of the runtime (in a generation, the step)
    start: Marker
    end: Marker
    issued_during: int | None = None  # copies: the last MoE block begun when issued (pregated's: at a later block)

    def ms(self) -> float:
        return self.end.ms_since(self.start)


def _overlap_ms(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two sets of intervals, each set's intervals disjoint."""
    xs, ys = sorted(xs), sorted(ys)
    i = j = 0
    total = 0.0
    while i < len(xs) and j < len(ys):
        total += max(0.0, min(xs[i][1], ys[j][1]) - max(xs[i][0], ys[j][0]))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def copy_time_hidden(spans: list[Span]) -> tuple[float, float]:
    """(copy time, the part of it during which the compute stream computed), in ms. Computing = inside a block but
    not stalled; stalls lie inside blocks, and the spans of one kind never overlap (one stream each)."""
    if not spans:
        return 0.0, 0.0
    origin = spans[0].start

    def intervals(kind):
        return [(s.start.ms_since(origin), s.end.ms_since(origin)) for s in spans if s.kind == kind]

    copies = intervals("copy")
    hidden = _overlap_ms(copies, intervals("block")) - _overlap_ms(copies, intervals("stall"))
    return sum(b - a for a, b in copies), hidden


def min_slots(strategy: str, n_experts: int, top_k: int, tokens: int) -> int:
    """The fewest device slots a strategy can run with: the experts one MoE block can select for `tokens` tokens
    (every expert for prefetch_all), for one block at a time (on_demand) or for two, the running block and the next
    one being fetched (prefetch_all, pregated)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")
    if strategy == "gpu_only":
        return 0
    per_block = n_experts if strategy == "prefetch_all" else min(n_experts, tokens * top_k)
    return per_block * (1 if strategy == "on_demand" else 2)


class SlotCache:
    """Which (MoE block, expert) each device slot holds, and which to evict: a free slot if any, else among the
    slots not in use (needed or being fetched) the least recently used (lru) or the least often requested over the
    whole run, then least recently used (lfu). With policy "none" nothing is found resident: every request
    copies (into the slot the expert held, if it still holds it; else as lru evicts). The runtime asks once per
    block and forward, so that is a copy each time a block needs an expert. A linear scan: pools are at most a
    few hundred slots."""

    def __init__(self, n_slots: int, policy: str):
        if policy not in CACHE_POLICIES:
            raise ValueError(f"cache={policy!r} is not one of {CACHE_POLICIES}")
        self.policy = policy
        self.holder: list[tuple[int, int] | None] = [None] * n_slots
        self.slot_of: dict[tuple[int, int], int] = {}
        self.last_use = [0] * n_slots
        self.requests: Counter = Counter()
        self.clock = self.hits = self.misses = 0

    def request(self, key: tuple[int, int], in_use: set) -> tuple[int, bool]:
        """The slot for `key` and whether it was already there; on a miss the caller fills the slot."""
        self.clock += 1
        self.requests[key] += 1
        slot = self.slot_of.get(key)
        hit = slot is not None and self.policy != "none"  # no cache: a resident expert is copied again where it is
        if slot is None:
            slot = self._victim(in_use)
            self.slot_of.pop(self.holder[slot], None)
            self.holder[slot], self.slot_of[key] = key, slot
        self.hits += hit
        self.misses += not hit
        self.last_use[slot] = self.clock
        return slot, hit

    def _victim(self, in_use: set) -> int:
        if None in self.holder:
            return self.holder.index(None)
        free = [s for s, key in enumerate(self.holder) if key not in in_use]
        if not free:
            raise ValueError(f"all {len(self.holder)} slots hold experts in use; none can be evicted")
        if self.policy in ("lru", "none"):
            return min(free, key=lambda s: self.last_use[s])
        return min(free, key=lambda s: (self.requests[self.holder[s]], self.last_use[s]))


@dataclass
class Stats:
    tokens: int = 0  # tokens processed (batch × new positions, summed over forwards)
    forwards: int = 0
    copies: int = 0  # experts copied host to device
    bytes_copied: int = 0
    moe_blocks: int = 0  # MoE blocks run, summed over forwards
    active_experts: int = 0  # experts those blocks used, summed
    max_active_experts: int = 0  # the most one block used
    spans: list[Span] = field(default_factory=list)


def place_all_but_experts(model: SwitchLM, device) -> None:
    """Every weight of `model` but its experts onto `device` (each runtime does it first; a caller measuring the
    memory several runtimes add can do it before them)."""
    experts = {id(p) for f in model.moe_layers for p in (f.w_in, f.w_out)}
    for p in model.parameters():
        if id(p) not in experts:
            p.data = p.data.to(device)


class ExpertOffload:
    """Runs a `SwitchLM` for inference with its experts placed by `strategy`.

    It takes the model over: everything but the experts moves to `device`, and the experts move to pinned host
    memory (pageable, with a warning and `pin_warning` set, if pinning fails); experts already pinned
    (`pinned_in_place`) stay where they are, and where `pinned_in_place` failed (its warning given as
    `pin_warning`), they stay pageable rather than be copied into pinned memory beside the originals. `slots`: the
    device pool, by default the fewest a batch of one token needs (`min_slots`); a forward with more tokens than the
    pool allows is refused with a ValueError. gpu_only's pool holds every expert, copied in once here; as the
    model's own experts stay on the host, runtimes of every strategy can take turns on one model (an out-of-memory
    error here is gpu_only not fitting).
    """

    def __init__(self, model: SwitchLM, strategy: str, device, slots: int | None = None, cache: str = "none",
                 pin_warning: str | None = None):
        cfg = model.config
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")
        if strategy == "pregated" and not cfg.pregate:
            raise ValueError("strategy 'pregated' needs a model built with pregate=True (its blocks' pre-gates "
                             "choose the next block's experts)")
        self.model, self.strategy, self.device = model.eval(), strategy, torch.device(device)
        self.layers = model.moe_layers
        if strategy == "gpu_only":
            slots = len(self.layers) * cfg.n_experts
        elif slots is None:
            slots = min_slots(strategy, cfg.n_experts, cfg.top_k, tokens=1)
        self.n_slots = slots
        self.cache = SlotCache(self.n_slots, cache)
        self.stats = Stats()
        self.requested: dict[int, set[int]] = {}  # MoE block -> experts requested for it; in use until it has run
        self.upcoming: tuple[int, Routing] | None = None  # pregated: the next MoE block and its pre-gate's routing
        self.pin_warning = pin_warning
        self._check_slots(tokens=1)
        self.expert_bytes = self.layers[0].w_in[0].nbytes + self.layers[0].w_out[0].nbytes if self.layers else 0
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.ready: list[Marker | None] = [None] * self.n_slots  # where each slot's last copy ends
        self.reading: list[int] = []  # the slots the MoE block running now reads
        place_all_but_experts(model, self.device)
        for p in (p for f in self.layers for p in (f.w_in, f.w_out)):  # one at a time: pinning holds one extra
            p.data = self._host_copy(p.data)
        self.host_memory = "pinned" if self.device.type == "cuda" and self.pin_warning is None else "pageable"
        dtype = model.embed.weight.dtype
        self.slot_in = torch.empty((self.n_slots, cfg.d_ff, cfg.d_model), device=self.device, dtype=dtype)
        self.slot_out = torch.empty((self.n_slots, cfg.d_model, cfg.d_ff), device=self.device, dtype=dtype)
        # Where each slot's last reader, an MoE block, has computed on the compute stream: a copy into the slot
        # waits for that alone. At first, here: the pool's memory may have served tensors whose work is queued.
        self.released = [Marker(self.device, timed=False)] * self.n_slots
        n = cfg.n_experts  # gpu_only: block b's expert e in slot b·n + e
        self.resident = [ExpertStack(self.slot_in[b * n:(b + 1) * n], self.slot_out[b * n:(b + 1) * n])
                         for b in range(len(self.layers))] if strategy == "gpu_only" else []
        with torch.no_grad():  # values, not a graph: the experts are parameters
            for stack, ffn in zip(self.resident, self.layers):
                stack.w_in.copy_(ffn.w_in)
                stack.w_out.copy_(ffn.w_out)

    def _host_copy(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda" or self.pin_warning is not None:
            return t  # host and device are the same memory; or pinning failed already
        try:
            return t.pin_memory()
        except RuntimeError as err:
            if self.pin_warning is None:
                self.pin_warning = pinning_failed(str(err))
            return t

    def _check_slots(self, tokens: int) -> None:
        cfg = self.model.config
        need = min_slots(self.strategy, cfg.n_experts, cfg.top_k, tokens)
        if self.n_slots < need:
            raise ValueError(f"{self.n_slots} expert slots are too few for strategy {self.strategy!r} with {tokens} "
                             f"tokens per forward (top-{cfg.top_k} of {cfg.n_experts} experts): it needs {need}")

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits of every position of `input_ids` (batch, new positions), after `cache`'s positions if given."""
        tokens = input_ids.numel()
        self._check_slots(tokens)
        self.requested, self.upcoming = {}, None
        logits = self.model(input_ids.to(self.device), cache=cache, offload=self).logits
        self.stats.tokens += tokens
        self.stats.forwards += 1
        return logits

    def span(self, kind: str, index: int):
        """Called by the model around each transformer block ("block") and MoE feed-forward ("moe"). The start of
        a block is also where pregated issues the copies its last pre-gate chose, once their ids are on the host,
        in an "issue" span of the MoE block they serve."""
        if kind == "block" and self.upcoming is not None and self.upcoming[1].read_done():
            with self._span("issue", self.upcoming[0]):
                self._prefetch()
        return self._span(kind, index)

    @contextmanager
    def _span(self, kind: str, index: int):
        start = Marker(self.device)
        yield
        end = Marker(self.device)
        self.stats.spans.append(Span(kind, index, self.stats.forwards, start, end))
        if kind == "moe" and self.reading:  # its experts are queued: their slots may be rewritten once it is here
            # A marker of its own, that records no time: the copy stream waiting on timed events (the span's end)
            # halved switch-large-128's tokens/s for pregated and on_demand alike (H100, 2026-12-07: 44 against 82)
            released = Marker(self.device, timed=False)
            for slot in self.reading:
                self.released[slot] = released
            self.reading = []

    def fetch(self, layer: int, routing: Routing, next_routing: Routing | None):
        """Called by MoE block `layer` after its gates: make its experts available (copying those not resident),
        start the copies the strategy makes for the next block, and return where each expert's weights are."""
        if self.strategy == "gpu_only" and routing.experts.numel() == 1:
            # One (token, choice), as at batch 1: `mix_experts` picks the one expert on the device, and nothing is
            # read to the host or waited for, as FasterTransformer's GPU-only reads nothing
            self._count_active(1)
            return self.resident[layer]
        if next_routing is not None:
            next_routing.start_read()  # on its way to the host while this block computes
        stall = Marker(self.device)
        if self.strategy == "on_demand":
            # MoE-OnDemand's own gate runs here: its host can know the experts only once the device has got here
            # (the routing this pre-gated model carries is on the host already, and would let its copies go early)
            stall.reached()
        active = active_experts(routing)  # no wait when a pre-gate chose them a block ago
        self._count_active(len(active))
        if self.strategy == "gpu_only":
            weights_of = self.resident[layer]
        else:
            for done in [b for b in self.requested if b < layer]:
                del self.requested[done]  # no longer in use: those blocks have run
            self.upcoming = None  # a prefetch not issued yet is this request: on demand
            self._request(layer, active, issued_during=layer)
            if self.strategy == "prefetch_all" and layer + 1 < len(self.layers):
                self._request(layer + 1, list(range(self.model.config.n_experts)), issued_during=layer)
            if self.strategy == "pregated" and next_routing is not None:
                # Its ids are on their way to the host; the copies go out at the first block start after they
                # arrive, so that the host never waits for them while the device could compute.
                self.upcoming = (layer + 1, next_routing)
            slot_of = {e: self.cache.slot_of[layer, e] for e in active}
            self.reading = list(slot_of.values())
            for slot in self.reading:
                self.ready[slot].wait()

            def weights_of(e):
                return self.slot_in[slot_of[e]], self.slot_out[slot_of[e]]
        self.stats.spans.append(Span("stall", layer, self.stats.forwards, stall, Marker(self.device)))
        return weights_of

    def _count_active(self, active: int) -> None:
        self.stats.moe_blocks += 1
        self.stats.active_experts += active
        self.stats.max_active_experts = max(self.stats.max_active_experts, active)

    def _prefetch(self) -> None:
        layer, routing = self.upcoming
        self.upcoming = None
        self._request(layer, active_experts(routing), issued_during=layer - 1)

    def _request(self, layer: int, experts: list[int], issued_during: int) -> None:
        """Ask the cache for experts of `layer` not yet asked for in this forward; copy the misses in, back to back
        on the copy stream, once the MoE blocks that last read their slots have computed (not after all the
        compute queued: a prefetch issued after block N's experts were queued runs beside them). One span covers
        the copies, and its end marks every one ready (the block that needs them needs them all): a pair of
        events per request, not per expert, keeps the events' own cost off the host."""
        wanted = self.requested.setdefault(layer, set())
        new = [e for e in experts if e not in wanted]
        if not new:
            return
        wanted.update(new)
        in_use = {(b, e) for b, es in self.requested.items() for e in es}
        copied = []
        for e in new:
            slot, hit = self.cache.request((layer, e), in_use)
            if not hit:
                copied.append((e, slot))
        if not copied:
            return
        ffn = self.layers[layer]
        with torch.cuda.stream(self.copy_stream) if self.copy_stream is not None else nullcontext():
            for released in {id(m): m for m in (self.released[slot] for _, slot in copied)}.values():
                released.wait()  # once each: the slots one block read share its marker
            start = Marker(self.device, self.copy_stream)
            for e, slot in copied:
                self.slot_in[slot].copy_(ffn.w_in[e], non_blocking=True)
                self.slot_out[slot].copy_(ffn.w_out[e], non_blocking=True)
            end = Marker(self.device, self.copy_stream)
        for _, slot in copied:
            self.ready[slot] = end
        self.stats.copies += len(copied)
        self.stats.bytes_copied += len(copied) * self.expert_bytes
        self.stats.spans.append(Span("copy", layer, self.stats.forwards, start, end, issued_during=issued_during))

    def reset_stats(self) -> None:
        """Start counting afresh (after a warm-up, say); the resident experts and lfu's counts stay."""
        self.stats = Stats()
        self.cache.hits = self.cache.misses = 0

    def summary(self) -> dict:
        """What a run records, since the last `reset_stats` (this synchronises the device)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        s, cache = self.stats, self.cache
        copy_ms, hidden_ms = copy_time_hidden(s.spans)
        requests = cache.hits + cache.misses
        # copies of the blocks after the first (which always fetches on demand) issued before their block began
        later = [span for span in s.spans if span.kind == "copy" and span.index > 0]
        return dict(
            # the setting
            slots=self.n_slots, host_memory=self.host_memory, pin_warning=self.pin_warning,
            # traffic
            tokens=s.tokens, copies=s.copies, bytes_copied=s.bytes_copied,
            bytes_per_token=s.bytes_copied / max(s.tokens, 1), cache_hits=cache.hits, cache_misses=cache.misses,
            hit_rate=cache.hits / requests if requests else None, max_active_experts=s.max_active_experts,
            mean_active_experts=s.active_experts / s.moe_blocks if s.moe_blocks else None,
            # time
            copy_ms=copy_ms, hidden_copy_ms=hidden_ms, hidden_copy_fraction=hidden_ms / copy_ms if copy_ms else None,
            prefetched_fraction=sum(span.issued_during < span.index for span in later) / len(later) if later else None,
        )


def pinning_failed(reason: str) -> str:
    """Warn that the experts stay in pageable memory, and return the warning for the records."""
    warning = (f"pinning the experts failed ({reason}); they stay in pageable memory, from which copies are slower "
               "and block the host")
    warnings.warn(warning)
    return warning


@contextmanager
def pinned_in_place(tensors: list[torch.Tensor], device) -> Iterator[str | None]:
    """Page-lock host tensors where they lie (cudaHostRegister) while the block runs; yields None, or a warning
    saying why they stay pageable. `ExpertOffload` then takes them as they are, instead of copying them into
    PyTorch's pinned-memory allocator with `pin_memory()`, which rounds every allocation up to a power of two and
    keeps freed blocks cached: a switch-base block's 9·n MiB of experts would take 16·n, and a sweep over expert
    counts would keep each size it met. The tensors are held here until unregistered, so that none is freed while
    pinned. Off a GPU it does nothing."""
    if torch.device(device).type != "cuda":
        yield None
        return
    cudart, held, warning = torch.cuda.cudart(), [], None
    try:
        for t in tensors:
            if t.is_pinned():
                continue
            storage = t.untyped_storage()
            error = int(cudart.cudaHostRegister(storage.data_ptr(), storage.nbytes(), 0))
            if error:
                warning = pinning_failed(f"cudaHostRegister returned CUDA error {error}")
                try:  # a failed runtime call leaves its error for the next kernel launch to report: take it here
                    torch.zeros(1, device=device)
                except RuntimeError:
                    pass
                break
            held.append(t)
        yield warning
    finally:
        for t in held:
            cudart.cudaHostUnregister(t.untyped_storage().data_ptr())


class GreedyDecoder:
    """Greedy decoding with a KV cache, one forward of the runtime per `step()`: the first reads the whole prompt
    (so the runtime's slots must serve batch × length tokens, see `min_slots`), the others one token per sequence.

    No beam search: the paper's artifact passes `--beam_width 4`, but its script (`scripts/eval_all.py`) times
    FasterTransformer's sampling path (`--test_time 3`) with top-k 1, which sets the beam to 1: what it measured is
    greedy decoding, one sequence per request."""

    def __init__(self, runtime: ExpertOffload, prompt: torch.Tensor, max_new_tokens: int):
        batch, length = prompt.shape
        self.runtime = runtime
        self.cache = KVCache(runtime.model.config, batch, length + max_new_tokens, runtime.device,
                             runtime.model.embed.weight.dtype)
        self.tokens = self.next_input = prompt.to(runtime.device)

    def step(self) -> None:
        self.next_input = self.runtime(self.next_input, self.cache)[:, -1].argmax(-1, keepdim=True)
        self.tokens = torch.cat([self.tokens, self.next_input], 1)


def generate(runtime: ExpertOffload, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """`prompt` (batch, length) followed by `new_tokens` greedily decoded tokens."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens={new_tokens} must be at least 1")
    decoder = GreedyDecoder(runtime, prompt, new_tokens)
    for _ in range(new_tokens):
        decoder.step()
    return decoder.tokens
