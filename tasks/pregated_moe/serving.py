"""The serving benchmark of Pre-gated MoE: each strategy of offload.py generating greedily from a Switch-shaped model
whose experts live in host memory, over model sizes, expert counts and batch sizes, in fp32 as the paper's artifact.

For each strategy, model and batch: MoE-block latency (the mean over a step's MoE blocks, as the artifact's
"BLK AVG", one value per step), generation throughput, peak device memory, bytes copied per token, the share of copy
time hidden behind compute (from the copy spans), how long the compute stream stalls in an MoE block, the cache's
hit rate, the experts a block uses, and the host-to-device bandwidth of the expert copies, also as a fraction of the
pinned bandwidth `repro.timing.host_link` measured at the start of the same run. Then the paper's ratios, between
rows of the same run: MoE-block speedup over on_demand, throughput and peak memory relative to gpu_only (%), memory
saving over gpu_only.

The model is decoder-only: it stands for the decoder of Switch's encoder-decoder, which is where the artifact
pre-gates (its encoder fetches on demand under every offloading strategy, and is not modelled here). Each sequence
starts from one random token, standing for a decoder's start token and for the encoder context that makes
sequences differ, and generates `new_tokens` more. One model is built per size and expert count and shared by every
strategy and batch: a pre-gated one, so that all strategies compute the same tokens with the same experts and
differ only in when those are copied. At each batch the strategies take turns a generation step at a time, as a
busy host's speed drifts over a run and the steps are host-bound at batch 1 (measured: the same MoE block took 0.26
ms in one strategy's turn and 0.53 ms in another's, seconds apart, when each generated all its tokens in one go);
prefetch_all takes its turns alone, after the others. gpu_only copies every expert into a device pool of its own;
under `memory_cap_gb` a model whose experts do not fit gives gpu_only rows of status oom, and the sweep goes on.
"""
from __future__ import annotations

import gc
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import torch

from repro import checks
from repro.bench import status_of
from repro.checks import as_list
from repro.context import ConfigError, RunContext
from repro.records import Row
from repro.timing import host_link, host_memory, measure_steps_in_turn, median_p20_p80

from .model import SIZES, MoEConfig, SwitchLM, load_switch_weights
from .offload import (CACHE_POLICIES, STRATEGIES, ExpertOffload, GreedyDecoder, min_slots, pinned_in_place,
                      place_all_but_experts)
from .weights import check_switch_config, random_switch, switch_config, switch_state_dict, weight_files

# The names the paper and results/published/pregated_moe.yaml give the strategies
PROVIDERS = {"gpu_only": "gpu_only", "on_demand": "moe_ondemand", "prefetch_all": "moe_prefetch",
             "pregated": "pregated"}
WEIGHTS = ("random", "hub")
# (measured metric, baseline provider, derived metric, unit, derived value from (provider's, baseline's))
RATIOS = (
    ("moe_block_latency", "moe_ondemand", "speedup", "x", lambda mine, base: base / mine),
    ("throughput", "gpu_only", "relative_throughput", "%", lambda mine, base: 100 * mine / base),
    ("throughput", "moe_ondemand", "throughput_speedup", "x", lambda mine, base: mine / base),
    ("peak_memory", "gpu_only", "relative_peak_memory", "%", lambda mine, base: 100 * mine / base),
    ("peak_memory", "gpu_only", "memory_saving", "x", lambda mine, base: base / mine),
)


def parse_model(name: str) -> tuple[str, int]:
    """'switch-base-8' -> ('switch-base', 8)."""
    size, _, experts = str(name).rpartition("-")
    if size not in SIZES or not experts.isdigit() or int(experts) < 1 or experts != str(int(experts)):
        raise ConfigError(f"moe.runs: model {name!r} is not '<size>-<experts>' with a size of {list(SIZES)} and a "
                          "positive expert count (e.g. switch-base-8)")
    return size, int(experts)


def plan(runs) -> dict[str, list[int]]:
    """Each model the runs name, in order of first mention, with the batches of every run that names it: a model is
    built once for all of them."""
    batches: dict[str, set[int]] = {}
    for run in runs:
        for name in as_list(run["models"]):
            batches.setdefault(name, set()).update(as_list(run["batch"]))
    return {name: sorted(sizes) for name, sizes in batches.items()}


def model_config(name: str, spec) -> MoEConfig:
    size, experts = parse_model(name)
    if not 1 <= spec.top_k <= experts:
        raise ConfigError(f"moe.top_k={spec.top_k} must be between 1 and the {experts} experts of {name}")
    return MoEConfig.of_size(size, n_experts=experts, top_k=spec.top_k, pregate=True,
                             max_len=1 + spec.warmup_tokens + spec.new_tokens)


def slots_for(spec, strategy: str, cfg: MoEConfig, batch: int) -> int:
    return spec.slots if spec.slots is not None else min_slots(strategy, cfg.n_experts, cfg.top_k, batch)


def validate(spec) -> None:
    checks.choices("moe.strategy", spec.strategy, STRATEGIES)
    checks.choice("moe.cache", spec.cache, CACHE_POLICIES)
    checks.choice("moe.weights", spec.weights, WEIGHTS)
    checks.number("moe.top_k", spec.top_k, at_least=1)
    checks.number("moe.new_tokens", spec.new_tokens, at_least=1)
    checks.number("moe.warmup_tokens", spec.warmup_tokens, at_least=1)  # a point's peak memory is a forward's
    if spec.slots is not None:
        checks.number("moe.slots", spec.slots, at_least=1)
    if spec.memory_cap_gb is not None:
        checks.number("moe.memory_cap_gb", spec.memory_cap_gb, integer=False, at_least=0.01)
    if set(as_list(spec.strategy)) == {"gpu_only"} and (spec.slots is not None or spec.cache != "none"):
        raise ConfigError(f"moe.slots={spec.slots} and moe.cache={spec.cache!r} set the device pool of the strategies "
                          "that offload experts; moe.strategy=[gpu_only] keeps every expert on the device, so they "
                          "would change nothing: leave them at null and none, or add one of "
                          f"{[s for s in STRATEGIES if s != 'gpu_only']}")
    if not as_list(spec.runs):
        raise ConfigError("moe.runs is empty: give at least one {models: [...], batch: [...]}")
    for run in as_list(spec.runs):
        if not isinstance(run, Mapping) or set(run) != {"models", "batch"}:
            raise ConfigError(f"moe.runs: each run is {{models: [...], batch: [...]}}, not {run}")
        checks.axis("moe.runs.models", run["models"])
        checks.numbers("moe.runs.batch", run["batch"], at_least=1)
    most = 0
    for name, batches in plan(spec.runs).items():
        cfg = model_config(name, spec)
        for strategy in as_list(spec.strategy):
            need = min_slots(strategy, cfg.n_experts, cfg.top_k, max(batches))
            most = max(most, need)
            if spec.slots is not None and spec.slots < need:
                raise ConfigError(f"moe.slots={spec.slots} is too few for {strategy} on {name} at batch "
                                  f"{max(batches)}: it must hold {need} experts at once")
        if spec.weights == "hub":
            validate_checkpoint(spec, name, cfg)
    if spec.cache != "none" and spec.slots is None and most:  # each its fewest: pregated's pool twice on_demand's
        raise ConfigError(f"moe.cache={spec.cache!r} needs moe.slots, so that every strategy caches in a pool of the "
                          f"same size (at least {most} here), not its own fewest; or moe.cache=none")


def checkpoint_path(spec, name: str) -> str:
    """`moe.checkpoint` for model `name`: a local folder (`~` expanded) or a Hub name."""
    path = spec.checkpoint.format(model=name)
    return str(Path(path).expanduser()) if path.startswith("~") else path


def validate_checkpoint(spec, name: str, cfg: MoEConfig) -> None:
    """A local checkpoint folder is checked here, before any work: its config and that it holds weight files; one
    on the Hub when the run reaches it (offline, the run uses random weights and says so)."""
    if not isinstance(spec.checkpoint, str):  # null passes the command line's check of the default's type
        raise ConfigError(f"moe.checkpoint={spec.checkpoint!r} must be a path or Hub name in which {{model}} stands "
                          "for the model's name, e.g. 'google/{model}': moe.weights=hub reads it")
    try:
        path = checkpoint_path(spec, name)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:  # {model.x}, {model[x]} too
        raise ConfigError(f"moe.checkpoint={spec.checkpoint!r} must be a path or Hub name in which {{model}} "
                          f"stands for the model's name ({exc!r})") from None
    if Path(path).is_dir():
        try:
            check_switch_config(switch_config(path), path, name, cfg)
            weight_files(Path(path))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"moe.checkpoint: {exc}") from None
    elif "/" not in path or checks.names_a_path(path):  # Switch checkpoints have no bare Hub names
        raise ConfigError(f"moe.checkpoint={spec.checkpoint!r}: {path} is no folder here (a local checkpoint must "
                          "exist; a Hub name is organisation/model, e.g. google/{model})")


def build(name: str, spec, device: torch.device, seed: int) -> tuple[SwitchLM, str]:
    """The model and where its weights come from: random, or (moe.weights=hub) a Switch checkpoint's decoder experts
    and routers with the rest random; random, and said so, when a checkpoint on the Hub cannot be read. A local
    folder that cannot be read is an error: validate checked it, and random weights would stand in for a model
    the run was given."""
    cfg = model_config(name, spec)
    if spec.weights == "random":
        return random_switch(cfg, seed, device), "random"
    path = checkpoint_path(spec, name)
    try:
        config, state = switch_config(path), switch_state_dict(path)
    except Exception as exc:  # noqa: BLE001 - offline, or no such checkpoint: measure with random weights
        if Path(path).is_dir():
            raise
        why = f"{path} could not be read ({type(exc).__name__}: {str(exc)[:200]})"
        print(f"[pregated_moe] {name}: {why}; measuring with random weights", flush=True)
        return random_switch(cfg, seed, device), f"random: {why}"
    check_switch_config(config, path, name, cfg)
    model = random_switch(cfg, seed, device, experts=False)  # the checkpoint's fill them
    load_switch_weights(model, state, "decoder")
    return model, f"{path} (decoder experts and routers; the rest random)"


def per_step(runtime: ExpertOffload, kind: str) -> list[float]:
    """Each forward's mean time in spans of `kind` ("moe": MoE blocks, "stall": their waits), ms (after
    `summary()` has synchronised the device): a median over steps then keeps one slow step from setting it.
    The "issue" spans, pregated's prefetches issued between blocks, count in the MoE blocks they serve: the host's
    work of issuing copies lies inside an MoE block's stall in the other strategies."""
    per_forward, issued = defaultdict(list), defaultdict(float)
    for s in runtime.stats.spans:
        if s.kind == kind:
            per_forward[s.forward].append(s.ms())
        elif s.kind == "issue":
            issued[s.forward] += s.ms()
    return [(sum(ms) + issued[forward]) / len(ms) for forward, ms in sorted(per_forward.items())]


def free(device: torch.device, failed: bool = False) -> None:
    """Return what the last point held to the device, and start the peak anew. After a failure, whose traceback
    holds tensors through reference cycles, collect them first."""
    if failed:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def start_point(model: SwitchLM, strategy: str, batch: int, spec, device: torch.device, seed: int,
                pin_warning: str | None = None):
    """A runtime and its decoder, after `warmup_tokens` untimed steps, with the runtime's counts started anew."""
    cfg = model.config
    runtime = ExpertOffload(model, strategy, device, slots=slots_for(spec, strategy, cfg, batch), cache=spec.cache,
                            pin_warning=pin_warning)
    prompt = torch.randint(cfg.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(seed))
    decoder = GreedyDecoder(runtime, prompt, spec.warmup_tokens + spec.new_tokens)
    for _ in range(spec.warmup_tokens):
        decoder.step()
    runtime.reset_stats()
    return runtime, decoder


def turns(strategies: list[str]) -> list[list[str]]:
    """The groups of strategies that take turns step by step: all but prefetch_all, then prefetch_all alone (its
    pool holds two blocks' experts; beside gpu_only's, that can exceed the memory cap)."""
    together = [s for s in strategies if s != "prefetch_all"]
    return [group for group in (together, [s for s in strategies if s == "prefetch_all"]) if group]


def measure_batch(model: SwitchLM, strategies: list[str], batch: int, spec, device: torch.device, seed: int,
                  pinned_gb_s: float | None, row_of, pin_warning: str | None = None) -> list[Row]:
    """Every strategy's point at one batch, a group of `turns` at a time. `row_of(strategy)(metric, unit, p50,
    p20=None, p80=None, n=1, **extra)` makes a row; `pin_warning`: why the experts could not be pinned."""
    place_all_but_experts(model, device)
    load_device_libraries(model, device)
    rows = [row for group in turns(strategies)
            for row in measure_group(model, group, batch, spec, device, seed, pinned_gb_s, row_of, pin_warning)]
    free(device)
    return rows


def load_device_libraries(model: SwitchLM, device: torch.device) -> None:
    """cuBLAS and cuBLASLt take their workspace (32 MiB on Hopper) at a stream's first matrix product and keep it.
    Taken inside the first point, it would count in that point's peak memory and in no other's: take it before."""
    if device.type == "cuda":
        weight = next(p for p in model.parameters() if p.device.type == "cuda" and p.dim() == 2)
        x = torch.randn(8, weight.shape[1], device=device, dtype=weight.dtype)
        for bias in (None, torch.randn(weight.shape[0], device=device, dtype=weight.dtype)):  # cuBLAS, cuBLASLt
            torch.nn.functional.linear(x, weight, bias)
        torch.cuda.synchronize(device)


def measure_group(model: SwitchLM, group: list[str], batch: int, spec, device: torch.device, seed: int,
                  pinned_gb_s: float | None, row_of, pin_warning: str | None = None) -> list[Row]:
    """The group's strategies generate their `new_tokens` timed steps in turn, a step of each strategy after
    another, so that a host whose speed drifts (the steps are host-bound at batch 1) slows them alike. A point's
    peak memory is the model's resident weights plus what its runtime added while it started alone. The runtimes
    are let go on return: a group's pools must not count in the next group's peaks."""
    free(device)
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    rows: list[Row] = []
    points = {}
    for strategy in group:
        try:
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            free(device)
            runtime, decoder = start_point(model, strategy, batch, spec, device, seed, pin_warning)
            peak = torch.cuda.max_memory_allocated(device) - before + resident if device.type == "cuda" else None
            points[strategy] = runtime, decoder, peak
        except Exception as exc:  # noqa: BLE001 - one point that cannot run must not end the sweep
            rows.append(failed_row(row_of(strategy), exc))
        if strategy not in points:  # out of the except clause, whose exception holds the point's tensors
            free(device, failed=True)
    try:
        timings = measure_steps_in_turn(
            {s: (lambda i, decoder=decoder: decoder.step(), [r.copy_stream] if r.copy_stream else [])
             for s, (r, decoder, _) in points.items()}, spec.new_tokens, device, warmup=0) if points else {}
    except Exception as exc:  # noqa: BLE001 - a failure while they take turns fails the group's points
        return rows + [failed_row(row_of(s), exc) for s in points]
    for strategy, timing in timings.items():
        runtime, _, peak = points[strategy]
        rows += point_rows(runtime, timing, batch, peak, pinned_gb_s, row_of(strategy))
    return rows


def failed_row(row, exc: Exception) -> Row:
    status, message = status_of(exc)
    return row("throughput", "tokens/s", status=status, message=message)


def point_rows(runtime: ExpertOffload, timing, batch: int, peak_bytes: int | None, pinned_gb_s: float | None,
               row) -> list[Row]:
    """The rows of what one point measured."""
    s = runtime.summary()
    rate = lambda ms: batch * 1e3 / ms  # noqa: E731 - output tokens a second; a faster step is a higher rate
    latency, stall = per_step(runtime, "moe"), per_step(runtime, "stall")
    rows = [row("throughput", "tokens/s", rate(timing.p50), rate(timing.p80), rate(timing.p20), timing.n,
                clock=timing.clock),
            row("moe_block_latency", "ms", *median_p20_p80(latency), len(latency), clock=timing.clock),
            row("copied_per_token", "MB", s["bytes_per_token"] / 2**20),
            row("active_experts", "experts", s["mean_active_experts"], max_active=s["max_active_experts"])]
    if peak_bytes is not None:
        rows.append(row("peak_memory", "MB", peak_bytes / 2**20))
    if stall:  # the compute stream idle inside an MoE block: reading routing, copying
        rows.append(row("stall_per_moe_block", "ms", *median_p20_p80(stall), len(stall), clock=timing.clock))
    if s["prefetched_fraction"] is not None:  # a pregated prefetch whose ids came too late went out on demand
        rows.append(row("prefetched_fraction", "fraction", s["prefetched_fraction"]))
    if s["hit_rate"] is not None:
        rows.append(row("hit_rate", "fraction", s["hit_rate"], hits=s["cache_hits"], misses=s["cache_misses"]))
    if s["copy_ms"]:
        gb_s = s["bytes_copied"] / (s["copy_ms"] * 1e-3) / 1e9
        rows += [row("hidden_copy_fraction", "fraction", s["hidden_copy_fraction"], copy_ms=s["copy_ms"]),
                 row("copy_bandwidth", "GB/s", gb_s)]
        if pinned_gb_s:
            rows.append(row("copy_bandwidth_fraction", "fraction", gb_s / pinned_gb_s, pinned_gb_s=pinned_gb_s))
    for r in rows:
        r.extra.update(slots=s["slots"], host_memory=s["host_memory"])
        if s["pin_warning"]:
            r.extra["pin_warning"] = s["pin_warning"]
    return rows


def ratio_rows(rows: list[Row]) -> Iterator[Row]:
    """The paper's ratios at each point (model, batch) whose baseline row was measured in the same run."""
    ok = {(r.provider, r.extra["model"], r.extra["batch"], r.metric): r for r in rows
          if r.status == "ok" and r.p50 is not None}
    for (provider, model, batch, metric), r in ok.items():
        for measured, baseline, derived, unit, ratio in RATIOS:
            base = ok.get((baseline, model, batch, measured))
            if metric == measured and base is not None:
                yield Row(provider, r.x_name, r.x_value, derived, unit, ratio(r.p50, base.p50), n=r.n,
                          extra={**r.extra, "baseline": baseline})


class MemoryCap:
    """`torch.cuda.set_per_process_memory_fraction` for the block: allocations beyond `gb` (GB of 2^30 bytes, as
    the rows' MB are 2^20) fail as out of memory. Nothing off a GPU, or with no cap."""

    def __init__(self, gb: float | None, device: torch.device):
        self.gb, self.applied = gb, gb is not None and device.type == "cuda"
        # the cap's call wants a device index: `cuda` alone is the current device
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.applied and device.index is None \
            else device

    def __enter__(self):
        if self.applied:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.gb * 2**30 / total), self.device)
        return self

    def __exit__(self, *exc):
        if self.applied:
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)


def run(spec, ctx: RunContext, seed: int) -> Iterator[Row]:
    device = ctx.device
    try:
        link = host_link(device)
    except RuntimeError as exc:  # no pinned memory for its reference copy: the copies' fraction of it is left out
        link = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    ctx.env.update(host_link=link, memory_cap_gb=spec.memory_cap_gb if device.type == "cuda" else None, models={})
    with MemoryCap(spec.memory_cap_gb, device):
        for name, batches in plan(spec.runs).items():
            yield from serve_model(name, batches, spec, ctx, seed, link.get("h2d_pinned_gb_s"))
    ctx.env["host_memory"] = host_memory()


def serve_model(name: str, batches: list[int], spec, ctx: RunContext, seed: int,
                pinned_gb_s: float | None) -> Iterator[Row]:
    """Every strategy at every batch on one model, built once, each batch's rows followed by its ratios (a run
    killed at a later batch keeps them)."""
    device = ctx.device
    size, experts = parse_model(name)

    def maker(strategy: str, batch: int, weights: str):
        # an expert cache and the tokens generated change what a row measures: records must tell such runs apart
        base = dict(model=name, size=size, batch=batch, strategy=strategy, weights=weights, cache=spec.cache,
                    new_tokens=spec.new_tokens, series=f"{size} batch {batch}")

        def row(metric, unit, p50=None, p20=None, p80=None, n=1, status="ok", message="", **extra):
            return Row(PROVIDERS[strategy], "experts", experts, metric, unit, p50, p20, p80, n, status, message,
                       {**base, **extra})
        return row

    started = time.perf_counter()
    try:
        model, weights = build(name, spec, device, seed)
    except Exception as exc:  # noqa: BLE001 - host memory, a bad checkpoint: this model's rows say so
        failed = [failed_row(maker(strategy, batch, "none"), exc) for strategy in as_list(spec.strategy)
                  for batch in batches]
    else:
        failed = None
    if failed is not None:  # out of the except clause, whose traceback holds the part-built model
        free(device, failed=True)
        yield from failed
        return
    info = ctx.env["models"][name] = dict(weights=weights, build_s=round(time.perf_counter() - started, 1))
    started = time.perf_counter()
    host_experts = [t for ffn in model.moe_layers for t in (ffn.w_in.data, ffn.w_out.data)]
    with pinned_in_place(host_experts, device) as pin_warning:
        info.update(pin_s=round(time.perf_counter() - started, 1),
                    host_experts_gb=round(sum(t.nbytes for t in host_experts) / 2**30, 2))
        if pin_warning:
            ctx.env["pin_warning"] = pin_warning
        for batch in batches:
            measuring = time.perf_counter()
            rows = measure_batch(model, list(as_list(spec.strategy)), batch, spec, device, seed, pinned_gb_s,
                                 lambda strategy, batch=batch: maker(strategy, batch, weights), pin_warning)
            # the paper's grid takes hours and the rows go only to the record: say where the run is
            not_ok = sorted({f"{r.provider} {r.status}" for r in rows if r.status != "ok"})
            strategies = len(as_list(spec.strategy))
            print(f"[pregated_moe] {name} at batch {batch}: {strategies} strateg{'y' if strategies == 1 else 'ies'} "
                  f"({time.perf_counter() - measuring:.1f} s)" + "".join(f", {f}" for f in not_ok), flush=True)
            yield from rows
            yield from ratio_rows(rows)
        del model
    free(device)
    info["seconds"] = round(time.perf_counter() - started, 1)
