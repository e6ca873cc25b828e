"""The decode experiment: what a budget cache saves during generation, on model-shaped attention heads (no model
around them) at contexts of 4K to 128K tokens.

- memory: KV bytes per token of context and the largest batch whose caches fit `decode.memory_gb`, measured by
  allocating the stores mode=generate allocates (memory.py), next to the paper's Table 2 arithmetic;
- attention: one decode step's attention over the full cache and over Scissorhands' budget B = context /
  compression, 16-bit and quantized, timed in the same run, with the speedup over the full cache. Scissorhands'
  step also returns each key's score (stored by the kernel in its one pass over the keys) and the log-sum-exp,
  which its counts read;
- bookkeeping: what Scissorhands adds to a step at budget B (the policy and cache code of mode=generate, run on
  the device): counting pivotal tokens (one kernel on a GPU, effrepro_kernels/pivotal_counts.py), checking whether
  the cache is full (on the host: generate knows how many tokens its heads hold), choosing the m tokens to drop and
  compacting the cache, the last two once every m steps; its share of the layer's decode step: the layer's
  projections (q, k, v, o and the MLP, weights read once a step), that attention and itself;
- quantize: the bandwidth of the 4-bit quantize kernel against a device-to-device copy measured in the same run.

Attention is timed as lean_decode times it: from CUDA graphs of back-to-back calls over rotated copies of the
inputs (no call finds its cache in L2), so that microsecond kernels are not hidden behind launch overhead. The
step's other kernels are timed the same way (the step's attention and the counts each over rotated copies of what
they touch, a layer's keys and values, or its scores, counts and one byte-plane of the ring; the projections'
weights exceed L2 by themselves); the quantize kernel and the bookkeeping parts that wait on the
host (checking, choosing, compacting) are timed call by call (`repro.timing.measure`: device events, L2 flushed),
as a decode loop runs them, that wait included. Where our Triton kernels cannot run (a CPU without
TRITON_INTERPRET=1) their rows say so (`unsupported`).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from effrepro_kernels import decode_attention, decode_attention_quantized, make_schedule, quantize_kv
from effrepro_kernels.runtime import runs_on
from repro import checks
from repro.bench import (DTYPES, Call, Point, Provider, Unsupported, copy_bandwidth, rotating, run_benchmark,
                         status_of)
from repro.context import ConfigError, RunContext
from repro.records import Row
from repro.timing import measure

from .generate import KV_BITS, EvictingCache, LayerCache
from .memory import GIB, allocate_caches, cache_bytes, check_quantized, max_batch, measured_bytes
from .policies import policy_at_budget

WAIT_ON_HOST = ("checking", "choosing", "compacting")  # bookkeeping parts timed call by call
NO_KERNELS = "needs our Triton kernels: a CUDA GPU (or TRITON_INTERPRET=1 on the CPU, slowly)"


@dataclass(frozen=True)
class CacheKind:
    """A cache the experiment measures: the full one or Scissorhands' at `compression`, at `bits`."""

    compression: float
    bits: int

    @property
    def name(self) -> str:
        base = "full" if self.compression == 1 else f"scissorhands_{self.compression:g}x"
        return base if self.bits == 16 else f"{base}_{self.bits}bit"

    def budget(self, context: int) -> int:
        return math.ceil(context / self.compression)

    def slots(self, context: int, group_size: int) -> int:
        """Tokens a head holds at `context`: the budget, rounded up to whole groups when quantized (the attention
        measured here runs over quantized groups only)."""
        tokens = self.budget(context)
        return tokens if self.bits == 16 else -(-tokens // group_size) * group_size

    def check_quantized(self, context: int, group_size: int) -> None:
        """Unsupported where the budget at `context` holds no whole group to quantize (memory.check_quantized)."""
        check_quantized(self.budget(context), self.bits, group_size, f"{self.name} at context {context}")

    def extra(self) -> dict:
        return {"kv_compression": self.compression, "kv_bits": self.bits}


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    dtype: torch.dtype

    @classmethod
    def of(cls, spec: DictConfig) -> "Shape":
        heads, kv_heads = (int(x) for x in str(spec.heads).split("/"))
        return cls(spec.batch, heads, kv_heads, spec.head_dim, spec.layers, DTYPES[spec.dtype])

    def extra(self) -> dict:
        return {"batch": self.batch, "heads": f"{self.heads}/{self.kv_heads}", "head_dim": self.head_dim,
                "layers": self.layers, "dtype": str(self.dtype).removeprefix("torch."),
                "series": f"B={self.batch} H={self.heads}/{self.kv_heads}"}


def kinds(spec: DictConfig) -> list[CacheKind]:
    return [CacheKind(c, bits) for bits in checks.as_list(spec.bits) for c in [1, *checks.as_list(spec.compressions)]]


def validate(cfg: DictConfig) -> None:
    spec, kv = cfg.decode, cfg.kv
    heads = str(spec.heads).split("/")
    if len(heads) != 2 or not all(p.isdigit() and int(p) > 0 for p in heads) or int(heads[0]) % int(heads[1]):
        raise ConfigError(f"decode.heads={spec.heads!r} must be 'query heads/KV heads', two positive integers, the "
                          "first a multiple of the second (e.g. '32/8')")
    checks.number("decode.head_dim", spec.head_dim, at_least=16, at_most=256)
    for key in ("intermediate", "layers", "batch"):
        checks.number(f"decode.{key}", spec[key], at_least=1)
    for key in ("contexts", "bookkeeping_budgets"):
        checks.numbers(f"decode.{key}", spec[key], at_least=1)
    checks.choice("decode.dtype", spec.dtype, DTYPES)
    bits = checks.choices("decode.bits", spec.bits, KV_BITS)
    if 16 not in bits:
        raise ConfigError(f"decode.bits={bits} must include 16: the full 16-bit cache is the baseline of every "
                          "speedup")
    for c in checks.numbers("decode.compressions", spec.compressions, integer=False, finite=True):
        if c <= 1:
            raise ConfigError(f"decode.compressions={c!r} must be above 1 (the full cache, 1, is always measured)")
    checks.number("decode.memory_gb", spec.memory_gb, integer=False, finite=True, at_least=1e-6)
    for key in ("rotate_bytes", "copy_bytes"):
        checks.number(f"decode.{key}", spec[key], at_least=1024)
    for key in ("warmup_ms", "rep_ms"):
        checks.number(f"decode.{key}", spec[key], integer=False, finite=True, at_least=0)
    group = kv.group_size
    for bits in checks.as_list(spec.bits):
        if bits < 16 and spec.head_dim % group:
            raise ConfigError(f"kv.group_size={group} must divide decode.head_dim={spec.head_dim} for {bits}-bit "
                              "values (groups of a token's channels)")
        if bits < 16 and any(n % group for n in checks.as_list(spec.contexts)):
            raise ConfigError(f"decode.contexts={list(checks.as_list(spec.contexts))} must be multiples of "
                              f"kv.group_size={group} for {bits}-bit keys (groups of a channel's tokens)")
    for budget in checks.as_list(spec.bookkeeping_budgets):
        try:
            policy_at_budget("scissorhands", OmegaConf.to_container(kv.scissorhands), budget)
        except ValueError as exc:
            raise ConfigError(f"decode.bookkeeping_budgets={budget}: {exc} (kv.scissorhands)") from None


def unsupported(provider: str, x_name: str, x_value, metric: str, unit: str, why: str, extra=None) -> Row:
    return Row(provider, x_name, x_value, metric, unit, status="unsupported", message=why, extra=dict(extra or {}))


def guarded(rows: Iterator[Row], provider: str, x_name: str, metric: str, unit: str) -> Iterator[Row]:
    """`rows`; if making them fails, a row of `metric` saying how (out of memory, or the error), and the run goes on
    to its next part."""
    try:
        yield from rows
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - one part that fails must not end the run
        status, message = status_of(exc)
        yield Row(provider, x_name, None, metric, unit, status=status, message=message)


def memory_rows(spec: DictConfig, group_size: int, device: torch.device) -> Iterator[Row]:
    shape = Shape.of(spec)
    budget = int(spec.memory_gb * GIB)
    for context, kind in itertools.product(checks.as_list(spec.contexts), kinds(spec)):
        extra = {**shape.extra(), **kind.extra(), "memory_gb": spec.memory_gb}
        try:
            kind.check_quantized(context, group_size)
        except Unsupported as exc:
            for metric, unit in (("kv_bytes_per_token", "bytes"), ("max_batch_analytic", "sequences"),
                                 ("max_batch", "sequences")):
                yield unsupported(kind.name, "context", context, metric, unit, str(exc), extra)
            continue
        slots = kind.budget(context)
        args = (shape.layers, shape.kv_heads, shape.head_dim, slots, shape.dtype, device, kind.bits, group_size)
        one = measured_bytes(lambda: allocate_caches(1, *args), device)
        yield Row(kind.name, "context", context, "kv_bytes_per_token", "bytes", one / context, n=1, extra=extra)
        analytic = budget // cache_bytes(shape.layers, shape.kv_heads, shape.head_dim, slots, shape.dtype.itemsize,
                                         kind.bits, group_size)
        yield Row(kind.name, "context", context, "max_batch_analytic", "sequences", analytic, n=1, extra=extra)
        yield Row(kind.name, "context", context, "max_batch", "sequences", max_batch(budget, *args), n=1,
                  extra={**extra, "how": "allocated until the next sequence would not fit"})


def _inputs(shape: Shape, kind: CacheKind, tokens: int, device, seed: int, rotate_bytes: int, group_size: int):
    """Enough copies of (q, K cache, V cache) to hold `rotate_bytes` between them; quantized ones as QuantizedKV."""
    gen = torch.Generator(device=device).manual_seed(seed + tokens)
    per_copy = cache_bytes(1, shape.kv_heads, shape.head_dim, tokens, shape.dtype.itemsize, kind.bits,
                           group_size) * shape.batch
    copies = []
    for _ in range(max(1, math.ceil(rotate_bytes / per_copy))):
        q = torch.randn(shape.batch, shape.heads, shape.head_dim, device=device, dtype=shape.dtype, generator=gen)
        k, v = (torch.randn(shape.batch, shape.kv_heads, tokens, shape.head_dim, device=device, dtype=shape.dtype,
                            generator=gen) for _ in range(2))
        if kind.bits < 16:
            k, v = quantize_kv(k, kind.bits, group_size, "channel"), quantize_kv(v, kind.bits, group_size, "token")
        copies.append((q, k, v))
    return copies


def attention_provider(kind: CacheKind, shape: Shape, schedule_kind: str, ctx: RunContext, seed: int,
                       rotate_bytes: int, group_size: int) -> Provider:
    # Scissorhands counts pivotal tokens from each key's score and the log-sum-exp, as generate.py asks for them
    returns = dict(return_lse=True, return_scores=True) if kind.compression > 1 else {}

    def build(point: Point) -> Call:
        kind.check_quantized(point.x_value, group_size)
        tokens = kind.slots(point.x_value, group_size)
        copies = _inputs(shape, kind, tokens, ctx.device, seed, rotate_bytes, group_size)
        lengths = torch.full((shape.batch,), tokens, dtype=torch.int32)
        schedule = make_schedule(schedule_kind, lengths, shape.kv_heads, head_dim=shape.head_dim, dtype=shape.dtype,
                                 device=ctx.device, quantized=kind.bits < 16)  # once, not timed
        if kind.bits == 16:
            def attend(q, k, v):
                return decode_attention(q, k, v, schedule=schedule, **returns)
        else:
            def attend(q, k, v):
                return decode_attention_quantized(q, k, v, schedule=schedule, **returns)
        # unchecked: a compressed or quantized cache holds other tokens than the baseline's, so its output differs
        return rotating(copies, attend, result=None)
    return Provider(kind.name, build, baseline=kind == CacheKind(1, 16), needs_triton=True)


def attention_rows(spec: DictConfig, kv: DictConfig, ctx: RunContext, seed: int) -> Iterator[Row]:
    shape = Shape.of(spec)
    cache_kinds = kinds(spec)
    points = [Point("context", n, shape.extra()) for n in checks.as_list(spec.contexts)]
    providers = [attention_provider(k, shape, kv.schedule, ctx, seed, int(spec.rotate_bytes), kv.group_size)
                 for k in cache_kinds]
    by_name = {k.name: k for k in cache_kinds}
    for row in run_benchmark(points, providers, ctx.device, warmup_ms=spec.warmup_ms, rep_ms=spec.rep_ms,
                             back_to_back="graph"):
        kind = by_name[row.provider]
        row.metric = "attention_time" if row.metric == "time" else row.metric
        row.extra.update(kind.extra(), tokens=kind.slots(row.x_value, kv.group_size))
        yield row


def full_layer(policy, budget: int, shape: Shape, kv: DictConfig, device, gen) -> LayerCache:
    """One layer of mode=generate's cache under `policy`, holding `budget` random tokens with random counts:
    full, so that the next token (at position `budget`) makes room first."""
    cache = EvictingCache(policy, 1, budget, 16, kv.group_size, kv.schedule)
    query = torch.empty(shape.batch, shape.heads, 1, shape.head_dim, device=device, dtype=shape.dtype)
    key = torch.empty(shape.batch, shape.kv_heads, 1, shape.head_dim, device=device, dtype=shape.dtype)
    layer = LayerCache(cache, 0, query, key)
    layer.store.keys.normal_(generator=gen)
    layer.store.values.normal_(generator=gen)
    layer.positions.copy_(torch.arange(budget, device=device))
    layer.stats["count"].random_(0, policy.window + 1, generator=gen)
    layer.n = budget
    return layer


def counting_bytes(stats: dict[str, torch.Tensor], scores: torch.Tensor, lse: torch.Tensor) -> int:
    """Bytes one counting call moves: each key's score and count, the log-sum-exp, and the ring's one byte-plane
    that the step's bit goes in (not the rest of the ring, nor the cache's keys and values)."""
    history = stats["history"]
    return scores.nbytes + lse.nbytes + stats["count"].nbytes + history[..., 0].numel() * history.element_size()


def counting_copies(stats: dict[str, torch.Tensor], scores: torch.Tensor, lse: torch.Tensor,
                    rotate_bytes: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
    """(stats, scores, lse), and copies of them until the bytes counting touches over all of them reach
    `rotate_bytes`, so that counting timed back to back finds none of its inputs in L2."""
    n = max(1, math.ceil(rotate_bytes / counting_bytes(stats, scores, lse)))
    # clone keeps the ring's byte-plane layout (ring_history), whose strides the kernel's reads depend on
    return [(stats, scores, lse)] + [({k: v.clone() for k, v in stats.items()}, scores.clone(), lse.clone())
                                     for _ in range(n - 1)]


def bookkeeping_rows(spec: DictConfig, kv: DictConfig, ctx: RunContext, seed: int) -> Iterator[Row]:
    """Per budget B: the time of the layer's projections, of the step's attention (with each key's score)
    and of each part of Scissorhands' bookkeeping on a full cache, run by generate.py's own code; then the
    bookkeeping's share of the layer's step, the choosing and compacting spread over the m steps between
    evictions."""
    shape, device = Shape.of(spec), ctx.device
    gen = torch.Generator(device=device).manual_seed(seed)
    for budget in checks.as_list(spec.bookkeeping_budgets):
        policy = policy_at_budget("scissorhands", OmegaConf.to_container(kv.scissorhands), budget)
        m = policy.amount(budget)
        extra = {**shape.extra(), "policy": "scissorhands", "recent": policy.recent, "window": policy.window,
                 "drop": m, "score": policy.score, "kv_bits": 16}
        query = torch.randn(shape.batch, shape.heads, shape.head_dim, device=device, dtype=shape.dtype, generator=gen)

        def attend(layer):
            return layer.store.attend(query, budget, None, with_scores=True)

        layer = full_layer(policy, budget, shape, kv, device, gen)
        _, scores, lse = attend(layer)
        # attention and counting are timed back to back, so each takes turns over copies of what it touches that
        # together hold rotate_bytes (beyond L2), as a step's 32 layers would: attention reads a layer's keys and
        # values and writes the scores; counting touches far fewer bytes, so it rotates through more copies
        attended = layer.store.keys.nbytes + layer.store.values.nbytes + scores.nbytes + lse.nbytes
        layers = [layer] + [full_layer(policy, budget, shape, kv, device, gen)
                            for _ in range(math.ceil(spec.rotate_bytes / attended) - 1)]
        counted = counting_copies(layer.stats, scores, lse, int(spec.rotate_bytes))
        attention_turn, counting_turn = itertools.cycle(layers), itertools.cycle(counted)

        def counting():
            stats, copy_scores, copy_lse = next(counting_turn)
            policy.observe_scores(stats, copy_scores, copy_lse, budget, budget)

        hidden, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        x = torch.randn(shape.batch, max(hidden, spec.intermediate), device=device, dtype=shape.dtype, generator=gen)
        weights = [torch.randn(n_out, n_in, device=device, dtype=shape.dtype, generator=gen) / n_in ** 0.5
                   for n_in, n_out in ((hidden, hidden + 2 * kv_width), (hidden, hidden),  # q, k, v; o
                                       (hidden, 2 * spec.intermediate), (spec.intermediate, hidden))]  # MLP

        def projections():  # as nn.Linear computes them; the weights (436 MB for Llama-3-8B) exceed L2 alone
            for w in weights:
                torch.nn.functional.linear(x[:, :w.shape[1]], w)

        full = torch.ones_like(layer.positions, dtype=torch.bool)
        not_full = full.clone()
        not_full[..., -1] = False
        drop = policy.drops(layer.stats, full, layer.positions, budget, 0, 1, n_held=budget)

        def compacting():
            layer.n = budget
            layer._evict(drop, full)
        # and the bookkeeping as generate.py calls it, knowing how many tokens it holds
        parts = {"projections": projections, "attention": lambda: attend(next(attention_turn)),
                 "counting": counting,
                 "checking": lambda: policy.drops(layer.stats, not_full, layer.positions, budget, 0, 1,
                                                  n_held=budget - 1),
                 "choosing": lambda: policy.drops(layer.stats, full, layer.positions, budget, 0, 1, n_held=budget),
                 "compacting": compacting}
        cycles = {"attention": len(layers), "counting": len(counted)}  # a graph captures whole rounds of copies
        ms = {}
        for part, fn in parts.items():
            t = measure(fn, device, warmup_ms=spec.warmup_ms, rep_ms=spec.rep_ms,
                        back_to_back=None if part in WAIT_ON_HOST else "graph", cycle=cycles.get(part, 1))
            ms[part] = t.p50
            yield Row(part, "budget", budget, "step_part_time", "ms", t.p50, t.p20, t.p80, t.n,
                      extra={**extra, "clock": t.clock})
        per_step = ms["counting"] + ms["checking"] * (m - 1) / m + (ms["choosing"] + ms["compacting"]) / m
        yield Row("scissorhands", "budget", budget, "eviction_overhead", "fraction",
                  per_step / (ms["projections"] + ms["attention"] + per_step), n=1,
                  extra={**extra, "bookkeeping_ms": per_step, "attention_ms": ms["attention"],
                         "projections_ms": ms["projections"],
                         "share_of_attention_and_bookkeeping": per_step / (ms["attention"] + per_step)})


def quantize_rows(spec: DictConfig, kv: DictConfig, ctx: RunContext, seed: int) -> Iterator[Row]:
    """The quantize kernel over a whole (batch, KV heads, context, head_dim) cache tensor: bytes read plus bytes
    written per second, and that as a fraction of the copy bandwidth measured first."""
    copy = copy_bandwidth(ctx.device, int(spec.copy_bytes), spec.warmup_ms, spec.rep_ms)
    yield copy
    shape = Shape.of(spec)
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    for context, bits in itertools.product(checks.as_list(spec.contexts), checks.as_list(spec.bits)):
        if bits == 16:
            continue
        x = torch.randn(shape.batch, shape.kv_heads, context, shape.head_dim, device=ctx.device, dtype=shape.dtype,
                        generator=gen)
        for axis, provider in (("channel", "quantize_keys"), ("token", "quantize_values")):
            def quantize():
                return quantize_kv(x, bits, kv.group_size, axis)
            moved = x.nbytes + quantize().nbytes
            t = measure(quantize, ctx.device, warmup_ms=spec.warmup_ms, rep_ms=spec.rep_ms)
            extra = {**shape.extra(), "kv_bits": bits, "axis": axis, "group_size": kv.group_size, "clock": t.clock}
            bandwidth = t.rates(moved / 1e9)
            yield Row(provider, "context", context, "bandwidth", "GB/s", *bandwidth, t.n, extra=extra)
            if copy.status == "ok":
                yield Row(provider, "context", context, "bandwidth_fraction", "x", *(b / copy.p50 for b in bandwidth),
                          t.n, extra={**extra, "baseline": "device_copy"})


def rows(cfg: DictConfig, ctx: RunContext) -> Iterator[Row]:
    spec, kv = cfg.decode, cfg.kv
    yield from guarded(memory_rows(spec, kv.group_size, ctx.device), "full", "context", "max_batch", "sequences")
    if not runs_on(ctx.device):
        yield unsupported("full", "context", None, "attention_time", "ms", f"decode attention {NO_KERNELS}")
        yield unsupported("scissorhands", "budget", None, "eviction_overhead", "fraction",
                          f"the step's attention {NO_KERNELS}")
        yield unsupported("quantize_keys", "context", None, "bandwidth", "GB/s", f"the quantize kernel {NO_KERNELS}")
        return
    yield from attention_rows(spec, kv, ctx, cfg.seed)  # run_benchmark records each failure itself
    yield from guarded(bookkeeping_rows(spec, kv, ctx, cfg.seed), "scissorhands", "budget", "eviction_overhead",
                       "fraction")
    yield from guarded(quantize_rows(spec, kv, ctx, cfg.seed), "quantize_keys", "context", "bandwidth_fraction", "x")
