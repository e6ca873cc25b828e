"""What each encoder variant costs: time, peak memory, FLOPs and parameters per sequence length, in inference and
in a training step (forward and backward), each point timed for every variant against the dense model (`base`)
in the same run. From those rows: where Linformer starts beating LRT (the crossover rows) and what LRT saves at
short sequences (the cost rows)."""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator

import torch
from torch import nn

from repro.bench import Call, Point, Provider, Unsupported, ratios, run_benchmark
from repro.models import count_parameters
from repro.records import Row

from .variants import Variant, count_flops, dense_model, factorised, on_meta, with_attention

BASELINE = "base"


@dataclass
class Models:
    """Each variant's model, its structure (dense or factorised) built once with random weights: time and
    memory do not depend on them, and every structure starts from the same dense weights, so that the dense
    variants compute the same function. `on_device` gives each provider its own copy, so that only the model
    being measured holds device memory; `counted` counts a variant on the meta device."""

    model: dict  # BertConfig fields and a name
    positions: int
    attention: str  # of variants that name none
    dtype: torch.dtype
    seed: int
    built: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def _copy(self, variant: Variant, meta: bool) -> nn.Module:
        key = (variant.rank, variant.last, meta)  # the attention and Linformer are added to each copy
        if key not in self.built:
            if meta:
                dense = on_meta(Variant(BASELINE), self.model, self.positions, self.positions)
            else:
                torch.manual_seed(self.seed)
                dense = dense_model(self.model, self.positions, self.attention)
            self.built[key] = factorised(dense, variant).to(self.dtype)
        return copy.deepcopy(self.built[key])

    def on_device(self, variant: Variant, seq_len: int, device: torch.device) -> nn.Module:
        return with_attention(self._copy(variant, meta=False), variant, seq_len).to(device)

    def counted(self, variant: Variant, batch: int, seq_len: int) -> tuple[dict[str, int], int]:
        """FLOPs of one call per mode, and encoder parameters, counted once per structure and shape: the
        attention implementation changes neither."""
        variant = replace(variant, name="", attention=None)
        key = (variant, batch, seq_len)
        if key not in self.counts:
            model = with_attention(self._copy(variant, meta=True), variant, seq_len)
            self.counts[key] = count_flops(model, batch, seq_len), count_parameters(model.bert)
        return self.counts[key]


def tensor_peak_mb(fn, *tracked) -> float:
    """Peak memory (MB) of the tensors alive while `fn` runs once: `tracked` (a model, its inputs) and all `fn`
    allocates, followed by PyTorch's MemTracker. For a CPU, where the allocator keeps no peak statistics (the
    harness reads GPUs' from the CUDA allocator)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*tracked)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its module hooks warn of modules freed during the backward
        with tracker:
            fn()
    return sum(stats["Total"] for stats in tracker.get_tracker_snapshot("peak").values()) / 2**20


def provider(variant: Variant, models: Models, device: torch.device, seed: int, host_memory: dict) -> Provider:
    """`variant` timed at a point: a no-grad forward (inference), or the classification loss's forward and
    backward (fwd_bwd) on random tokens. The dense model under another attention is checked against base's
    logits. On a CPU its tensor peak goes into `host_memory`, by provider."""
    exact = variant.rank is None and variant.k is None

    def build(point: Point) -> Call:
        n, batch, mode = point.x_value, point.extra["batch"], point.extra["mode"]
        if variant.k is not None and variant.k > n:
            raise Unsupported(f"{variant.name}: k={variant.k} is longer than the sequence ({n} tokens); Linformer "
                              "projects the n keys and values down to k <= n rows")
        model = models.on_device(variant, n, device).train(mode == "fwd_bwd")
        gen = torch.Generator().manual_seed(seed + n)
        ids = torch.randint(model.config.vocab_size, (batch, n), generator=gen).to(device)
        labels = torch.randint(2, (batch,), generator=gen).to(device)

        def infer():
            with torch.no_grad():
                return model(input_ids=ids).logits

        def step():
            model(input_ids=ids, labels=labels).loss.backward()
        fn = infer if mode == "inference" else step
        if device.type == "cpu":
            host_memory[variant.name] = tensor_peak_mb(fn, model, ids, labels)
            model.zero_grad(set_to_none=True)
        return Call(fn, grad_to_none=tuple(model.parameters()) if mode == "fwd_bwd" else (),
                    result=infer if exact else None)

    return Provider(variant.name, build, baseline=variant.name == BASELINE,
                    needs_triton=variant.attention_of(models.attention) == "effrepro")


def host_memory_rows(point_rows: list[Row], host_memory: dict) -> list[Row]:
    """On a CPU: each variant's tensor peak as a peak_memory row, and its memory saving over base's."""
    rows = [Row(r.provider, r.x_name, r.x_value, "peak_memory", "MB", host_memory[r.provider], n=1,
                extra={**r.extra, "memory": "tensors (MemTracker)"})
            for r in point_rows if r.metric == "time" and r.status == "ok" and r.provider in host_memory]
    return rows + ratios(rows, BASELINE)


def count_rows(point: Point, variants: list[Variant], point_rows: list[Row], models: Models) -> list[Row]:
    """FLOPs (counted) and encoder parameters of each variant that could run at the point, and the parameter
    ratio base / variant."""
    ran = {r.provider for r in point_rows if r.metric == "time" and r.status != "unsupported"}
    rows, params = [], {}
    for variant in variants:
        if variant.name not in ran:
            continue
        flops, params[variant.name] = models.counted(variant, point.extra["batch"], point.x_value)
        rows += [Row(variant.name, point.x_name, point.x_value, "flops", "GFLOP", flops[point.extra["mode"]] / 1e9,
                     n=1, extra=dict(point.extra)),
                 Row(variant.name, point.x_name, point.x_value, "params", "count", params[variant.name], n=1,
                     extra=dict(point.extra))]
    base = params.get(BASELINE)
    return rows + [Row(name, point.x_name, point.x_value, "params_ratio", "x", base / p, n=1,
                       extra={**point.extra, "baseline": BASELINE}) for name, p in params.items() if base]


def measure_points(points: Iterable[Point], variants: list[Variant], models: Models, device: torch.device, *,
                   seed: int, warmup_ms: float, rep_ms: float, default_attention: str) -> Iterator[Row]:
    """Every variant at every point, point by point: the harness's rows (time, peak memory on a GPU, speedup and
    memory saving over base, failures), host memory on a CPU, then FLOPs and parameters; each row tagged with
    its variant's settings."""
    host_memory: dict[str, float] = {}
    providers = [provider(v, models, device, seed, host_memory) for v in variants]
    settings = {v.name: v.extra(default_attention) for v in variants}
    for point in points:
        rows = list(run_benchmark([point], providers, device, warmup_ms=warmup_ms, rep_ms=rep_ms))
        rows += host_memory_rows(rows, host_memory)
        host_memory.clear()
        rows += count_rows(point, variants, rows, models)
        for r in rows:
            r.extra.update(settings[r.provider])
        yield from rows


def _values(rows: list[Row], provider: str, metric: str, mode: str) -> dict[int, float]:
    """Per sequence length the provider was tried at: its `metric`, or infinity where it ran out of memory (which
    loses to anything that ran); an error or an unsupported point says nothing."""
    values = {}
    for r in rows:
        if r.provider != provider or r.extra.get("mode") != mode or r.extra.get("setting") != "sweep":
            continue
        if r.metric == "time" and r.status == "oom":
            values[r.x_value] = math.inf
        elif r.metric == metric and r.status == "ok":
            values[r.x_value] = r.p50
    return values


def shortest_win(challenger: dict[int, float], holder: dict[int, float]) -> tuple[int | None, list[int]]:
    """The shortest sequence length from which on `challenger` is below `holder` at every longer length both
    were tried at (lengths where both failed say nothing), and those lengths."""
    lengths = sorted(n for n in challenger.keys() & holder.keys()
                     if not math.isinf(challenger[n]) or not math.isinf(holder[n]))
    start = None
    for n in reversed(lengths):
        if not challenger[n] < holder[n]:
            break
        start = n
    return start, lengths


CROSSOVER_METRICS = {"time": "faster", "peak_memory": "smaller in peak memory"}
_CROSSOVER_EXTRA = ("setting", "model", "dtype", "device", "device_name", "variant", "rank", "k", "attention")


def crossover_rows(rows: list[Row], pairs: list[tuple[str, str]]) -> Iterator[Row]:
    """For each (challenger, holder) pair, mode and metric (time, peak memory): the shortest sequence length from
    which on the challenger (Linformer) beats the holder (LRT, or base), as a row the README can quote; p50 None
    when it does not beat it at the longest length measured."""
    modes = sorted({r.extra["mode"] for r in rows if r.extra.get("setting") == "sweep"})
    for challenger, holder in pairs:
        mine = [r for r in rows if r.provider == challenger and r.extra.get("setting") == "sweep"]
        if not mine:
            continue
        for metric, comparison in CROSSOVER_METRICS.items():
            for mode in modes:
                start, lengths = shortest_win(_values(rows, challenger, metric, mode),
                                              _values(rows, holder, metric, mode))
                if not lengths:
                    continue
                timed = [r for r in rows if r.metric == "time" and r.extra.get("mode") == mode and
                         r.extra.get("setting") == "sweep" and r.provider in (challenger, holder)]
                failed = sorted({r.x_value for r in timed if r.status == "error"})
                span = f"{mode}, measured at {lengths[0]}..{lengths[-1]} tokens" + \
                    (f"; no result at {failed}, an error" if failed else "")
                if start is None:
                    message = f"{challenger} is not {comparison} than {holder} at the longest length ({span})"
                else:
                    message = f"{challenger} is {comparison} than {holder} from {start} tokens on ({span})"
                    if any(r.provider == challenger and r.status == "unsupported" and r.x_value < start
                           for r in timed):
                        message += f"; {start} is the shortest length {challenger} runs at (n >= k)"
                    elif start == lengths[0]:
                        message += "; already at the shortest, so the crossover may lie below"
                yield Row(challenger, "mode", mode, f"crossover_{metric}", "tokens", start, n=len(lengths),
                          message=message,
                          extra={**{k: mine[0].extra.get(k) for k in _CROSSOVER_EXTRA}, "against": holder})


def cost_rows(rows: list[Row], providers: list[str], max_seq_len: int) -> Iterator[Row]:
    """What each of `providers` (LRT variants) saves over base at sequences of at most `max_seq_len` tokens:
    100·(1 − its cost / base's), the cost being the measured time per example (both run the same batch) or the
    counted FLOPs."""
    flops = {(r.provider, r.x_value, r.extra["mode"]): r.p50 for r in rows
             if r.metric == "flops" and r.extra.get("setting") == "sweep"}
    for r in rows:
        if r.provider not in providers or r.extra.get("setting") != "sweep" or r.x_name != "seq_len" or \
                r.x_value > max_seq_len:
            continue
        extra = {**r.extra, "baseline": BASELINE}
        if r.metric == "speedup" and r.status == "ok":
            yield Row(r.provider, r.x_name, r.x_value, "cost_reduction", "%", 100 * (1 - 1 / r.p50), n=r.n,
                      extra={**extra, "basis": "time"})
        base = flops.get((BASELINE, r.x_value, r.extra["mode"]))
        if r.metric == "flops" and base:
            yield Row(r.provider, r.x_name, r.x_value, "cost_reduction", "%", 100 * (1 - r.p50 / base), n=1,
                      extra={**extra, "basis": "flops"})
