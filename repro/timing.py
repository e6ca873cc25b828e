"""Timing and memory measurement: device events on a GPU, the wall clock on a CPU (marked as such)."""
from __future__ import annotations

import gc
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

CLOCK_GPU = "cuda_event"
CLOCK_GRAPH = "cuda_graph"
CLOCK_EAGER = "eager_loop"
BACK_TO_BACK = {"graph": CLOCK_GRAPH, "eager": CLOCK_EAGER}
CLOCK_CPU = "wall_clock"
# Fewest timed calls a median is taken over: do_bench fits its calls into `rep_ms`, which for a call longer
# than that is one call, and one call's noise (a training step of a large model, a long sequence).
MIN_CALLS = 5


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and 20th/80th percentiles over `n` timed calls."""

    p50: float
    p20: float
    p80: float
    n: int
    clock: str

    def rates(self, amount: float) -> tuple[float, float, float]:
        """`amount` (FLOPs, bytes, tokens) per call as a rate per second: median, 20th and 80th percentile (a
        faster call is a higher rate, so the 20th percentile of rate comes from the 80th of time)."""
        return tuple(amount / (ms * 1e-3) for ms in (self.p50, self.p80, self.p20))


def median_p20_p80(values: Sequence[float]) -> tuple[float, float, float]:
    """Median and 20th and 80th percentiles; all three the value itself where there is one."""
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=10, method="inclusive") if len(ordered) > 1 else ordered * 9
    return statistics.median(ordered), q[1], q[7]


def _summarise(times_ms: Sequence[float], clock: str) -> Timing:
    p50, p20, p80 = median_p20_p80(times_ms)
    return Timing(p50=p50, p20=p20, p80=p80, n=len(times_ms), clock=clock)


def joined(fn: Callable[[], object], streams: Sequence) -> Callable[[], object]:
    """`fn`, then the current stream waits for each of `streams` (side streams `fn` issued work on: a
    prefetch, a copy), so that an event recorded after it marks the end of all of that work."""
    if not streams:
        return fn

    def call():
        out = fn()
        current = torch.cuda.current_stream()
        for stream in streams:
            current.wait_stream(stream)
        return out
    return call


def measure(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    back_to_back: str | None = None,
    streams: Sequence = (),
    cycle: int = 1,
) -> Timing:
    """Time `fn`. On a GPU: `triton.testing.do_bench`, which warms up, flushes L2 before every call and
    times each call with CUDA events; or, with `back_to_back`, `_loop_times` (see there): "graph" replays
    calls from a CUDA graph (the kernels' own time), "eager" issues them from Python (what an eager loop sees,
    the host's launch cost included where it exceeds the kernels'); `cycle`: the calls after which `fn`'s inputs
    repeat, where it rotates through copies of them. Work `fn` issues on side `streams` is joined into each timed
    call. On a CPU: perf_counter around each call, after a warm-up (streams do not exist there)."""
    if back_to_back is not None and back_to_back not in BACK_TO_BACK:
        raise ValueError(f"back_to_back={back_to_back!r} is not one of {[None, *BACK_TO_BACK]}")
    if device.type == "cuda":
        fn = joined(fn, streams)
    if device.type == "cuda" and back_to_back:
        return _summarise(_loop_times(fn, warmup_ms, rep_ms, back_to_back == "graph", cycle),
                          BACK_TO_BACK[back_to_back])
    if device.type == "cuda":
        import triton.testing

        times = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                        return_mode="all")
        for _ in range(3):  # again, warm now, with room for MIN_CALLS calls (do_bench sizes a run by its estimate)
            if len(times) >= MIN_CALLS:
                break
            times = triton.testing.do_bench(fn, warmup=0, rep=1.5 * MIN_CALLS * statistics.median(times),
                                            grad_to_none=grad_to_none, return_mode="all")
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
    reps = max(MIN_CALLS, min(1000, int(rep_ms / max(first, 1e-3))))
    return _summarise([call() for _ in range(reps)], CLOCK_CPU)


def measure_steps_in_turn(sequences: Mapping[str, tuple[Callable[[int], object], Sequence]], steps: int,
                          device: torch.device, *, warmup: int = 2) -> dict[str, Timing]:
    """Time sequences of `steps` steps that each change state (a decode step that grows a cache, a layer that
    fetches the next one's weights), each step once, in order: step(i) for i in range(warmup + steps), the first
    `warmup` untimed. Repeating one step, as `measure` does, would not be the same work twice. Each sequence is
    (step, side streams); device events around each step on a GPU (the side streams joined), the wall clock on a
    CPU. The sequences take turns a step at a time: step i of every sequence, then step i + 1 of every one. A
    host whose speed drifts during a run (a shared machine, host-bound steps) then slows them all alike, and the
    ratios between them hold."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
    for i in range(warmup):
        for step, _ in sequences.values():
            step(i)
    if device.type != "cuda":
        times = {name: [] for name in sequences}
        for i in range(warmup, warmup + steps):
            for name, (step, _) in sequences.items():
                start = time.perf_counter()
                step(i)
                times[name].append((time.perf_counter() - start) * 1e3)
        return {name: _summarise(t, CLOCK_CPU) for name, t in times.items()}
    torch.cuda.synchronize(device)
    events = {name: [] for name in sequences}
    for i in range(warmup, warmup + steps):
        for name, (step, streams) in sequences.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            joined(lambda: step(i), streams)()  # noqa: B023 - called at once, in this iteration
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize(device)
    return {name: _summarise([a.elapsed_time(b) for a, b in pairs], CLOCK_GPU) for name, pairs in events.items()}


def calls_per_loop(per_call_ms: float, cycle: int, graph: bool) -> int:
    """About 1 ms of calls, 1 to 1,000; from a graph, a whole number of `cycle`s. A graph replays the calls its
    capture made, on the inputs they read: capturing fewer calls than the copies `fn` rotates through would read
    the same few copies in every replay, from L2 (issued from Python, the calls go on through the copies from one
    loop to the next)."""
    calls = max(1, min(1000, round(1.0 / per_call_ms)))
    return -(-calls // cycle) * cycle if graph else calls


def _loop_times(fn: Callable[[], object], warmup_ms: float, rep_ms: float, graph: bool, cycle: int) -> list[float]:
    """Milliseconds per call of `fn` in loops of back-to-back calls, about 1 ms of work each, one sample per
    loop: replayed from a CUDA graph (`graph`), or issued from Python.

    For calls of a few microseconds. From a graph, the kernels are timed and not the host's launch overhead (a
    decode step in a serving engine runs from a graph for the same reason); from Python, whichever of the two
    is longer. Nothing flushes L2 between the calls of a loop: a caller timing memory-bound work rotates
    through inputs that together exceed L2."""
    fn()  # compiles and autotunes outside any capture
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    per_call = max(start.elapsed_time(end) / 5, 1e-4)
    calls = calls_per_loop(per_call, cycle, graph)
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            for _ in range(calls):
                fn()
        loop = captured.replay
    else:
        def loop():
            for _ in range(calls):
                fn()
    replays = max(10, min(1000, round(rep_ms / (per_call * calls))))
    for _ in range(max(1, round(warmup_ms / (per_call * calls)))):
        loop()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for a, b in events:
        a.record()
        loop()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / calls for a, b in events]


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak device memory (MB, inputs included) while `fn` runs once; None where it cannot be measured."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


# Kernel families by name, first match wins: cuBLAS/CUTLASS matrix products, the attention kernels (ours, SDPA's,
# cuDNN's), what torch.compile generates (its names carry the ops it fused, so a fused LayerNorm still reads as
# layer_norm, and a fused cast reads as copy unless an earlier family claims it), and so on. A guide to where a
# step's time goes, not an exact accounting: the rows name each family's top kernels.
KERNEL_FAMILIES = (
    ("matmul", r"triton_tem_"),  # torch.compile's matmul templates (max-autotune), whatever epilogue they fused
    ("loss", r"cross_entropy|log_?softmax|nll_loss|loss_and_gradient"),
    ("attention", r"attn|attention|fmha|flash|sdpa|softmax"),
    ("layer_norm", r"layer_?norm"),
    ("gelu", r"gelu|tanh"),  # torch.compile's GELU kernels are named after the tanh of its formula
    ("optimizer", r"adam|multi_tensor|foreach|lpnorm"),
    ("matmul", r"gemm|matmul|cutlass|nvjet|xmma|wgmma|cublas|sm\d\d_"),
    ("copy", r"memcpy|memset|copy|cat_|index|gather|scatter|embedding"),
    ("elementwise", r"elementwise|vectorized|reduce|triton_"),
)


def kernel_family(name: str) -> str:
    lowered = name.lower()
    return next((family for family, pattern in KERNEL_FAMILIES if re.search(pattern, lowered)), "other")


def kernel_time_by_family(fn: Callable[[], object], device: torch.device, top: int = 3
                          ) -> tuple[object, dict[str, tuple[float, list]]]:
    """What `fn` returns, run once, and per kernel family (KERNEL_FAMILIES, and "all") the milliseconds of device
    kernel time it took with its `top` kernels as [name, ms], from torch.profiler; off CUDA, no families."""
    if device.type != "cuda":
        return fn(), {}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize(device)
    kernels = sorted(((e.self_device_time_total / 1e3, e.key) for e in prof.key_averages()
                      if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0), reverse=True)
    families: dict[str, tuple[float, list]] = {}
    for ms, name in kernels:
        family = kernel_family(name)
        total, named = families.get(family, (0.0, []))
        families[family] = (total + ms, named + [[name[:120], ms]] if len(named) < top else named)
    if kernels:
        families["all"] = (sum(ms for ms, _ in kernels), [[name[:120], ms] for ms, name in kernels[:top]])
    return result, families


def free_device_memory(device: torch.device, failed: bool) -> None:
    """Give a point's (or a trainee's) device memory back before the next one. An exception's traceback keeps
    tensors alive through reference cycles, which only a collection frees: on a GPU, where the next one needs that
    memory, collect now; on a CPU the interpreter's own collections suffice (one takes 0.15 s with torch loaded)."""
    if device.type == "cuda":
        if failed:
            gc.collect()
        torch.cuda.empty_cache()


# what a RuntimeError says where memory ran out: CUDA's and the CPU allocator's words, and the status of a CUDA library
# whose own allocation failed (CUBLAS_STATUS_ALLOC_FAILED, CUDNN_STATUS_ALLOC_FAILED, cuFFT's CUFFT_ALLOC_FAILED)
OUT_OF_MEMORY_WORDS = ("out of memory", "can't allocate memory", "ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` ran out of device or host memory, or was raised from such an error or while handling one (a
    task's own error around it), as its traceback shows them: `raise ... from None` hides what it was raised in."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or \
                isinstance(exc, RuntimeError) and any(words in str(exc) for words in OUT_OF_MEMORY_WORDS):
            return True
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return False


def host_link(device: torch.device, size_bytes: int = 1 << 28) -> dict:
    """For tasks that move weights between host and device: the PCIe link as the driver reports it, and the
    host-to-device copy bandwidth measured now from pinned and from pageable memory (random bytes, medians of
    event-timed copies). Empty off a GPU."""
    if device.type != "cuda":
        return {}
    import subprocess

    info: dict = {}
    fields = ("pcie.link.gen.current", "pcie.link.gen.max", "pcie.link.width.current", "pcie.link.width.max")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
                              "-i", str(device.index or 0)], capture_output=True, text=True, timeout=20)
        values = [v.strip() for v in out.stdout.strip().split(",")]
        if out.returncode == 0 and len(values) == len(fields):
            info.update({name.replace(".", "_"): value for name, value in zip(fields, values)})
    except (OSError, subprocess.TimeoutExpired):
        pass  # no nvidia-smi: the bandwidths below still say what the link delivers
    target = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    for kind, pinned in (("pinned", True), ("pageable", False)):
        source = torch.randint(0, 256, (size_bytes,), dtype=torch.uint8).pin_memory() if pinned else \
            torch.randint(0, 256, (size_bytes,), dtype=torch.uint8)
        t = measure(lambda: target.copy_(source, non_blocking=pinned), device, warmup_ms=5, rep_ms=50)
        info[f"h2d_{kind}_gb_s"] = round(size_bytes / (t.p50 * 1e-3) / 1e9, 2)
    return info


def host_memory() -> dict:
    """The process's peak resident memory and, on a GPU machine, the peak of pinned host memory held by
    PyTorch's pinned allocator (MB)."""
    import resource

    info = {"host_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        info["pinned_peak_mb"] = round(torch.cuda.host_memory_stats().get("allocated_bytes.peak", 0) / 2**20, 1)
    return info
