"""A small operator-benchmark harness in the manner of tritonbench: a task declares its providers (one of
them the baseline) and its points once; the harness times each provider at each point, measures memory,
derives TFLOP/s, bandwidth and ratios to the baseline, and records what could not run instead of stopping."""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .records import Row
from .timing import is_out_of_memory, measure, peak_memory_mb


def sdpa_declined(exc: BaseException) -> bool:
    """PyTorch's SDPA refusing a shape under the chosen backend ("No available kernel" on CUDA, "No viable
    backend" on the CPU): a provider that cannot run the point, not a failure."""
    return isinstance(exc, RuntimeError) and ("No available kernel" in str(exc) or "No viable backend" in str(exc))


class Unsupported(Exception):
    """A provider cannot run this point (shape, dtype, mask, backend missing): recorded, never fatal."""


def require_triton(name: str, device: torch.device) -> None:
    """A provider built on our Triton kernels is unsupported where they cannot run."""
    from kernels.runtime import runs_on

    if not runs_on(device):
        raise Unsupported(f"{name} needs a CUDA GPU (or TRITON_INTERPRET=1, slowly, on the CPU)")


@dataclass
class Point:
    x_name: str
    x_value: Any
    extra: dict[str, Any]
    flops: float | None = None  # floating-point operations of one call, for TFLOP/s
    bytes: float | None = None  # bytes one call must move through device memory, for GB/s


@dataclass
class Call:
    fn: Callable[[], Any]
    grad_to_none: Sequence[torch.Tensor] = field(default_factory=tuple)


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[Point], Call]  # raises Unsupported where it cannot run the point
    baseline: bool = False


def _free(device: torch.device, failed: bool) -> None:
    if failed:  # an exception's traceback keeps tensors alive through reference cycles
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure_one(provider: Provider, point: Point, device, warmup_ms, rep_ms, cuda_graph) -> list[Row]:
    def row(metric, unit, p50=None, p20=None, p80=None, n=0, status="ok", message=""):
        return Row(provider.name, point.x_name, point.x_value, metric, unit, p50, p20, p80, n, status, message,
                   dict(point.extra))

    failed = False
    try:
        call = provider.build(point)
        timing = measure(call.fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms, grad_to_none=call.grad_to_none,
                         cuda_graph=cuda_graph)
        memory = peak_memory_mb(call.fn, device)
    except Unsupported as exc:
        return [row("time", "ms", status="unsupported", message=str(exc))]
    except Exception as exc:  # noqa: BLE001 - one broken point must not end the sweep
        failed = True
        if is_out_of_memory(exc):
            return [row("time", "ms", status="oom", message=str(exc).splitlines()[0][:300])]
        return [row("time", "ms", status="error", message=f"{type(exc).__name__}: {exc}"[:500])]
    finally:
        call = None
        _free(device, failed)

    rows = [row("time", "ms", timing.p50, timing.p20, timing.p80, timing.n)]
    rows[0].extra["clock"] = timing.clock
    if point.flops:
        # a faster call is a higher rate: the 20th percentile of time gives the 80th of throughput
        rate = lambda ms: point.flops / (ms * 1e-3) / 1e12  # noqa: E731
        rows.append(row("tflops", "TFLOP/s", rate(timing.p50), rate(timing.p80), rate(timing.p20), timing.n))
    if point.bytes:
        bw = lambda ms: point.bytes / (ms * 1e-3) / 1e9  # noqa: E731
        rows.append(row("bandwidth", "GB/s", bw(timing.p50), bw(timing.p80), bw(timing.p20), timing.n))
    if memory is not None:
        rows.append(row("peak_memory", "MB", memory, memory, memory, 1))
    return rows


def _ratios(point_rows: list[Row], baseline: str, compare_to: Sequence[str]) -> list[Row]:
    """Speedup (baseline time / provider time) and memory saving (baseline memory / provider memory); and
    `speedup_over_<name>` for each further reference provider named in `compare_to`."""
    def ok(metric):
        return {r.provider: r.p50 for r in point_rows if r.metric == metric and r.status == "ok"}

    pairs = [(baseline, "time", "speedup"), (baseline, "peak_memory", "memory_saving")]
    pairs += [(name, "time", f"speedup_over_{name}") for name in compare_to]
    out = []
    for reference, metric, derived in pairs:
        values = ok(metric)
        if reference not in values:
            continue
        for r in point_rows:
            if r.metric == metric and r.status == "ok":
                extra = {**r.extra, "baseline": reference}
                out.append(Row(r.provider, r.x_name, r.x_value, derived, "x", values[reference] / r.p50,
                               n=r.n, extra=extra))
    return out


def run_benchmark(points: Iterable[Point], providers: Sequence[Provider], device: torch.device, *,
                  warmup_ms: float = 25, rep_ms: float = 100, progress: bool = True,
                  compare_to: Sequence[str] = (), cuda_graph: bool = False) -> Iterator[Row]:
    """Yield the rows of each point as soon as it is measured, so that a killed run keeps what it did.
    `cuda_graph`: time every provider from CUDA graphs (see `repro.timing.measure`), for calls so short that
    the host's launch overhead would dominate."""
    baselines = [p.name for p in providers if p.baseline]
    if len(baselines) != 1:
        raise ValueError(f"exactly one provider must be the baseline, got {baselines or 'none'}")
    points = list(points)
    # disable=None: a bar on a terminal, none in a log file
    bar = tqdm(total=len(points) * len(providers), disable=None if progress else True, desc="benchmark", unit="call")
    for point in points:
        point_rows = []
        for provider in providers:
            bar.set_postfix_str(f"{point.x_name}={point.x_value} {provider.name}", refresh=False)
            point_rows += _measure_one(provider, point, device, warmup_ms, rep_ms, cuda_graph)
            bar.update()
        yield from point_rows + _ratios(point_rows, baselines[0], compare_to)
    bar.close()
