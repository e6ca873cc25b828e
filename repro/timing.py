"""Timing and memory measurement: device events on a GPU, the wall clock on a CPU (marked as such)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

CLOCK_GPU = "cuda_event"
CLOCK_GRAPH = "cuda_graph"
CLOCK_CPU = "wall_clock"


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and 20th/80th percentiles over `n` timed calls."""

    p50: float
    p20: float
    p80: float
    n: int
    clock: str


def _summarise(times_ms: Sequence[float], clock: str) -> Timing:
    ordered = sorted(times_ms)
    q = statistics.quantiles(ordered, n=10, method="inclusive") if len(ordered) > 1 else ordered * 9
    return Timing(p50=statistics.median(ordered), p20=q[1], p80=q[7], n=len(ordered), clock=clock)


def measure(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    cuda_graph: bool = False,
) -> Timing:
    """Time `fn`. On a GPU: `triton.testing.do_bench`, which warms up, flushes L2 before every call and
    times each call with CUDA events; or, with `cuda_graph`, `_graph_times` (see there). On a CPU:
    perf_counter around each call, after a warm-up."""
    if device.type == "cuda" and cuda_graph:
        return _summarise(_graph_times(fn, warmup_ms, rep_ms), CLOCK_GRAPH)
    if device.type == "cuda":
        import triton.testing

        times = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                        return_mode="all")
        return _summarise(times, CLOCK_GPU)

    def call():
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    first = call()
    deadline = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < deadline:
        call()
    reps = max(3, min(1000, int(rep_ms / max(first, 1e-3))))
    return _summarise([call() for _ in range(reps)], CLOCK_CPU)


def _graph_times(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> list[float]:
    """Milliseconds per call of `fn` replayed from a CUDA graph of back-to-back calls, one sample per replay.

    For calls of a few microseconds, where the host's launch overhead would be timed instead of the kernels
    (a decode step in a serving engine runs from a graph for the same reason). Nothing flushes L2 between the
    calls of a graph: a caller timing memory-bound work rotates through inputs that together exceed L2."""
    fn()  # compiles and autotunes outside the capture
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    per_call = max(start.elapsed_time(end) / 5, 1e-4)
    calls = max(1, min(1000, round(1.0 / per_call)))  # about 1 ms of work per replay
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    replays = max(10, min(1000, round(rep_ms / (per_call * calls))))
    for _ in range(max(1, round(warmup_ms / (per_call * calls)))):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for a, b in events:
        a.record()
        graph.replay()
        b.record()
    torch.cuda.synchronize()
    times = [a.elapsed_time(b) / calls for a, b in events]
    del graph
    return times


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak device memory (MB, inputs included) while `fn` runs once; None where it cannot be measured."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(exc, MemoryError)
    )
