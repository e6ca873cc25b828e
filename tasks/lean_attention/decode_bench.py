"""Decode attention over context length: each schedule of our kernel and each SDPA backend, against the
device-to-device copy bandwidth measured in the same run.

A decode step takes microseconds, about as long as launching it from Python, so every provider is timed in
loops of back-to-back calls, each way of `decode.timing` (a row's `mode`): `graph`, replayed from CUDA graphs
as serving engines run decode (the kernels' time), and `eager`, issued from Python as transformers' `generate`
does (the launch cost included wherever it exceeds the kernels'). L2 is never flushed inside a loop, so each
call reads the next of several copies of the KV cache, together at least `decode.rotate_bytes`: no call
finds its K and V in L2. Peak memory therefore counts all the copies.

The rows of our kernel (fa2, split, lean) assume a prepared schedule: each point makes its schedule once
(`make_schedule`), untimed, and every call reuses it, as a model's layers can at one step's lengths. In
generation the lengths grow each step and a schedule made for other lengths is refused, so a step makes a new
one: what that costs (host work, and reading the lengths back from the device) is in no row, eager or graph.

`bandwidth_fraction` is a provider's KV bytes read per second over the copy's bytes read and written per second.
It can exceed 1: reading alone can go faster than a copy's mix of reads and writes (358 of the 960 rows of the
H200 record 20261205T223749 are above 1, up to 1.11), so it is a yardstick, not a ceiling."""
from __future__ import annotations

import itertools
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.nn.attention import sdpa_kernel

from effrepro_kernels import decode_attention, make_schedule
from effrepro_kernels.decode_attention import SCHEDULES
from repro import checks
from repro.bench import Call, Point, Provider, copy_bandwidth, rotating, run_benchmark
from repro.checks import as_list
from repro.context import ConfigError, RunContext
from repro.records import Row
from repro.timing import BACK_TO_BACK
from tasks.common.sdpa import SDPA_BACKENDS, first_call

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def grid(cfg: DictConfig, timing: str) -> list[Point]:
    spec = OmegaConf.to_container(cfg, resolve=True)
    points = []
    keys = ("context", "batch", "heads", "head_dim")
    for context, batch, heads, head_dim in itertools.product(*(as_list(spec[k]) for k in keys)):
        hq, hkv = (int(x) for x in str(heads).split("/"))
        kv_bytes = 2 * batch * hkv * context * head_dim * torch.finfo(DTYPES[spec["dtype"]]).bits // 8
        series = f"B={batch} H={hq}/{hkv}" + (f" d={head_dim}" if head_dim != 128 else "")  # d=128: the paper's
        extra = dict(batch=batch, heads=f"{hq}/{hkv}", head_dim=head_dim, dtype=spec["dtype"], mode=timing,
                     series=series)
        points.append(Point("context", context, extra, bytes=kv_bytes))
    return points


def make_inputs(point: Point, device: torch.device, seed: int, rotate_bytes: int):
    """Enough copies of (q, K cache, V cache) to hold `rotate_bytes` between them, and the lengths."""
    e = point.extra
    hq, hkv = (int(x) for x in e["heads"].split("/"))
    gen = torch.Generator(device=device).manual_seed(seed + point.x_value)
    dtype = DTYPES[e["dtype"]]
    copies = []
    for _ in range(max(1, math.ceil(rotate_bytes / point.bytes))):
        q = torch.randn(e["batch"], hq, e["head_dim"], device=device, dtype=dtype, generator=gen)
        k, v = (torch.randn(e["batch"], hkv, point.x_value, e["head_dim"], device=device, dtype=dtype,
                            generator=gen) for _ in range(2))
        copies.append((q, k, v))
    lengths = torch.full((e["batch"],), point.x_value, device=device, dtype=torch.int32)
    return copies, lengths


def ours(kind: str, ctx: RunContext, seed: int, rotate_bytes: int) -> Provider:
    def build(point: Point) -> Call:
        copies, lengths = make_inputs(point, ctx.device, seed, rotate_bytes)
        k = copies[0][1]
        schedule = make_schedule(kind, lengths, k.shape[1], head_dim=k.shape[3], dtype=k.dtype,
                                 device=ctx.device)  # once, not timed
        return rotating(copies, lambda q, k, v: decode_attention(q, k, v, schedule=schedule))
    return Provider(kind, build, baseline=(kind == "fa2"), needs_triton=True)


def sdpa_provider(name: str, ctx: RunContext, seed: int, rotate_bytes: int) -> Provider:
    """SDPA as a model's decode step calls it: on queries already (batch, heads, 1, head_dim), under a backend set
    once for all calls (the harness enters `Call.context` around them), so that a timed call pays neither for
    reshaping q nor for setting the backend's flags, which no other provider does."""
    def build(point: Point) -> Call:
        copies, _ = make_inputs(point, ctx.device, seed, rotate_bytes)
        copies = [(q[:, :, None, :], k, v) for q, k, v in copies]
        gqa = copies[0][0].shape[1] != copies[0][1].shape[1]

        def run(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        with sdpa_kernel(SDPA_BACKENDS[name]):
            first_call(name, lambda: run(*copies[0]), f"heads={point.extra['heads']} on {ctx.device.type}")
        # (batch, heads, head_dim), the baseline's shape
        return rotating(copies, run, result=lambda: run(*copies[0])[:, :, 0],
                        context=sdpa_kernel(SDPA_BACKENDS[name]))
    return Provider(name, build)


def validate(cfg: DictConfig) -> None:
    spec = cfg.decode
    names = checks.choices("decode.providers", spec.providers, [*SCHEDULES, *SDPA_BACKENDS])
    if "fa2" not in names:
        raise ConfigError(f"decode.providers={names} must include 'fa2', the baseline of every speedup")
    checks.choice("decode.dtype", spec.dtype, DTYPES)
    for key in ("context", "batch"):
        checks.numbers(f"decode.{key}", spec[key], at_least=1)
    checks.numbers("decode.head_dim", spec.head_dim, at_least=16, at_most=256)
    for key in ("copy_bytes", "rotate_bytes"):
        checks.number(f"decode.{key}", spec[key], at_least=1024)
    for key in ("warmup_ms", "rep_ms"):
        checks.number(f"decode.{key}", spec[key], integer=False, at_least=1e-3, finite=True)
    timings = checks.choices("decode.timing", spec.timing, BACK_TO_BACK)
    if cfg.scale.device == "cpu":  # checked again in `run` on the device it got (validate may run on a login node)
        check_timing(timings, "cpu")
    pairs = []
    for heads in checks.axis("decode.heads", spec.heads):
        parts = str(heads).split("/")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts) or int(parts[0]) % int(parts[1]):
            raise ConfigError(f"decode.heads={heads!r} must be 'query heads/KV heads', two positive integers, the "
                              "first a multiple of the second (e.g. '32/8')")
        pairs.append(f"{int(parts[0])}/{int(parts[1])}")
    checks.axis("decode.heads", pairs)  # as numbers: '32/08' is '32/8'
    grid(spec, timings[0])


def check_timing(timings: list[str], device_type: str) -> None:
    """Graph timing needs CUDA graphs: elsewhere `measure` would time those calls from Python, labelled graph."""
    if "graph" in timings and device_type != "cuda":
        raise ConfigError(f"decode.timing={timings} names graph, replays of CUDA graphs, which the {device_type} "
                          "has none of: use decode.timing=[eager] there (as scale=smoke does)")


def run(cfg: DictConfig, ctx: RunContext) -> Iterator[Row]:
    spec = cfg.decode
    names = as_list(spec.providers)
    check_timing(as_list(spec.timing), ctx.device.type)
    copy = copy_bandwidth(ctx.device, int(spec.copy_bytes))
    yield copy
    rotate = int(spec.rotate_bytes)
    providers = [ours(n, ctx, cfg.seed, rotate) if n in SCHEDULES else sdpa_provider(n, ctx, cfg.seed, rotate)
                 for n in names]
    compare_to = [n for n in ("fa2", "split") if n in names]
    for timing in as_list(spec.timing):
        for row in run_benchmark(grid(spec, timing), providers, ctx.device, warmup_ms=spec.warmup_ms,
                                 rep_ms=spec.rep_ms, compare_to=compare_to, back_to_back=timing):
            yield row
            if row.metric == "bandwidth" and copy.status == "ok":
                fraction = lambda x: x / copy.p50  # noqa: E731
                yield Row(row.provider, row.x_name, row.x_value, "bandwidth_fraction", "x", fraction(row.p50),
                          fraction(row.p20), fraction(row.p80), row.n, extra=dict(row.extra))
