"""A small operator-benchmark harness in the manner of tritonbench: a task declares its providers (one of
them the baseline) and its points once; the harness times each provider at each point, checks its output
against the baseline's on the same inputs, measures memory, derives TFLOP/s, bandwidth and ratios to the
baseline, and records what could not run instead of stopping."""
from __future__ import annotations

import itertools
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .records import Row
from .timing import free_device_memory, is_out_of_memory, measure, peak_memory_mb

# the dtypes a benchmark's config may name, by torch's names (repro.models.DTYPES: a model config's short ones)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class Unsupported(Exception):
    """A provider cannot run this point (shape, dtype, mask, backend missing): recorded, never fatal."""


def failure(exc: BaseException) -> tuple[str, str] | None:
    """The row status and message of something that could not run (unsupported, out of memory), or None for
    a real error."""
    if isinstance(exc, Unsupported):
        return "unsupported", str(exc)
    if is_out_of_memory(exc):
        return "oom", str(exc).splitlines()[0][:300]
    return None


def status_of(exc: BaseException) -> tuple[str, str]:
    """The row status and message of any failure: `failure`'s, else an error naming the exception."""
    return failure(exc) or ("error", f"{type(exc).__name__}: {exc}"[:500])


def require_triton(name: str, device: torch.device) -> None:
    """A provider built on our Triton kernels is unsupported where they cannot run."""
    from effrepro_kernels.runtime import runs_on

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
    # what the provider computed at this point (an output, gradients), compared with the baseline's: every
    # provider of a point is built from the same inputs
    result: Callable[[], torch.Tensor] | None = None
    # what `result` must match where that is not the baseline's: a function of its own (a block-sparse kernel's
    # is standard attention under the same block mask)
    reference: Callable[[], torch.Tensor] | None = None
    # the share of the point's flops this provider does (a block-sparse kernel skips the blocks it masks out)
    flops_fraction: float = 1.0
    # entered once around the result, the timed calls and the peak memory: what a caller sets once, not per
    # call (SDPA's backend), so that no timed call pays for setting it
    context: AbstractContextManager = field(default_factory=nullcontext)
    # calls after which `fn`'s inputs repeat, where it rotates through copies of them (see `measure`)
    cycle: int = 1


def rotating(copies: Sequence[tuple], fn: Callable[..., Any], *, result: Any = ...,
             context: AbstractContextManager | None = None) -> Call:
    """A call that applies `fn` to the next of `copies` (argument tuples) each time, so that calls timed back to
    back find their inputs out of cache, with `cycle` set so a graph captures every copy. Its `result` is, unless
    given, `fn` on the first copy: every provider of a point draws the same copies, so the first is comparable
    with the baseline's; result=None leaves the provider unchecked."""
    turn = itertools.cycle(copies)
    if result is ...:
        def result():
            return fn(*copies[0])
    return Call(lambda: fn(*next(turn)), result=result, context=nullcontext() if context is None else context,
                cycle=len(copies))


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[Point], Call]  # raises Unsupported where it cannot run the point
    baseline: bool = False
    needs_triton: bool = False  # built on our Triton kernels: unsupported where they cannot run


def _relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    result, reference = result.detach().double(), reference.to(result.device).double()
    return float((result - reference).norm() / reference.norm().clamp_min(1e-30))


# Relative (Frobenius) error a provider may have against the baseline, by the point's `dtype`: the rounding of
# that dtype (float32 through tf32 matrix units) over a reduction as long as attention's
TOLERANCE = {"float32": 2e-3, "float16": 1e-2, "bfloat16": 3e-2}


def _own_reference(call: Call, device) -> torch.Tensor | None:
    """`call.reference`, computed; None where it runs out of memory (as a baseline may at a long length)."""
    try:
        return call.reference().detach()
    except Exception as exc:  # noqa: BLE001 - only running out of memory leaves a point unchecked
        if not is_out_of_memory(exc):
            raise
        free_device_memory(device, True)
        return None


def _measure_one(provider: Provider, point: Point, device, warmup_ms, rep_ms, back_to_back,
                 reference: dict) -> list[Row]:
    """The rows of one provider at one point. `reference` holds the baseline's result at this point, once
    measured, for the others to be checked against."""
    def row(metric, unit, p50=None, p20=None, p80=None, n=0, status="ok", message=""):
        return Row(provider.name, point.x_name, point.x_value, metric, unit, p50, p20, p80, n, status, message,
                   dict(point.extra))

    failed, error, unchecked, against = False, None, False, "the baseline's"
    try:
        if provider.needs_triton:
            require_triton(provider.name, device)
        call = provider.build(point)
        with call.context:
            if call.result is not None:
                result = call.result()
                if provider.baseline:
                    # in host memory, without its autograd graph (a forward's N x N scores): on the device it would
                    # count in the peak memory of every provider measured after it (three inputs' worth of
                    # gradients in a backward), the baseline's own included
                    reference["result"] = result.detach().cpu()
                else:
                    if call.reference is None:
                        expected = reference.get("result")
                    else:
                        expected, against = _own_reference(call, device), "its reference's"
                    if expected is None:  # out of memory at a long length: nothing to check against
                        unchecked = True
                    else:
                        error = _relative_error(result, expected)
                result = expected = None
            timing = measure(call.fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms, grad_to_none=call.grad_to_none,
                             back_to_back=back_to_back, cycle=call.cycle)
            for tensor in call.grad_to_none:  # a step's peak from no gradients, not on top of the last timed call's
                tensor.grad = None
            memory = peak_memory_mb(call.fn, device)
        fraction = call.flops_fraction
    except Exception as exc:  # noqa: BLE001 - one broken point must not end the sweep
        failed = True
        status, message = status_of(exc)
        return [row("time", "ms", status=status, message=message)]
    finally:
        call = None
        free_device_memory(device, failed)

    rows = [row("time", "ms", timing.p50, timing.p20, timing.p80, timing.n)]
    rows[0].extra["clock"] = timing.clock
    if point.flops:
        rows.append(row("tflops", "TFLOP/s", *timing.rates(point.flops * fraction / 1e12), timing.n))
        if fraction != 1:
            rows[-1].extra["flops_fraction"] = round(fraction, 6)
    if point.bytes:
        rows.append(row("bandwidth", "GB/s", *timing.rates(point.bytes / 1e9), timing.n))
    if memory is not None:
        rows.append(row("peak_memory", "MB", memory, memory, memory, 1))
    if error is not None or unchecked:
        accurate = None  # not checked
        if error is not None:
            tolerance = TOLERANCE.get(point.extra.get("dtype"), max(TOLERANCE.values()))
            accurate = error <= tolerance
            rows.append(row("rel_error", "", error, n=1, message="" if accurate else
                            f"output differs from {against} by {error:.2g} (tolerance {tolerance:g})"))
        for r in rows:
            r.extra["matches_baseline"] = accurate
    return rows


def ratios(point_rows: list[Row], baseline: str, compare_to: Sequence[str] = ()) -> list[Row]:
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
                  compare_to: Sequence[str] = (), back_to_back: str | None = None) -> Iterator[Row]:
    """Yield the rows of each point as soon as it is measured, so that a killed run keeps what it did.
    `back_to_back`: time every provider in loops of back-to-back calls ("graph" or "eager", see
    `repro.timing.measure`), for calls of a few microseconds."""
    baselines = [p.name for p in providers if p.baseline]
    if len(baselines) != 1:
        raise ValueError(f"exactly one provider must be the baseline, got {baselines or 'none'}")
    points = list(points)
    # disable=None: a bar on a terminal, none in a log file
    bar = tqdm(total=len(points) * len(providers), disable=None if progress else True, desc="benchmark", unit="call")
    ordered = sorted(providers, key=lambda p: not p.baseline)  # the baseline first: the others are checked against it
    for point in points:
        point_rows, reference = [], {}
        for provider in ordered:
            bar.set_postfix_str(f"{point.x_name}={point.x_value} {provider.name}", refresh=False)
            point_rows += _measure_one(provider, point, device, warmup_ms, rep_ms, back_to_back, reference)
            bar.update()
        reference.clear()
        yield from point_rows + ratios(point_rows, baselines[0], compare_to)
    bar.close()


def copy_bandwidth(device: torch.device, size_bytes: int, warmup_ms: float = 25, rep_ms: float = 100) -> Row:
    """A device-to-device copy of `size_bytes`, counting bytes read and written: the bandwidth a memory-bound
    kernel can hope for, measured in the same run as it. A copy that cannot run (out of memory beside what the
    device already holds) is a row of that status, its p50 None: the points are measured all the same."""
    try:
        src = torch.randn(size_bytes // 4, device=device)
        dst = torch.empty_like(src)
        t = measure(lambda: dst.copy_(src), device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    except Exception as exc:  # noqa: BLE001 - out of memory only: any other failure is a bug to stop at
        if not is_out_of_memory(exc):
            raise
        status, message = status_of(exc)
        return Row("device_copy", "bytes", size_bytes, "copy_bandwidth", "GB/s", status=status, message=message,
                   extra={"reference": True})
    return Row("device_copy", "bytes", size_bytes, "copy_bandwidth", "GB/s", *t.rates(2 * size_bytes / 1e9), t.n,
               extra={"clock": t.clock, "reference": True})
