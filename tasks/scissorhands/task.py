"""Task scissorhands_kv: the experiments of Scissorhands (Liu et al., NeurIPS 2023), chosen by `kv.experiments`.

- table1: the paper's Table 1 and 2 arithmetic (KV cache of OPT-175B, LLaMA-65B, BLOOM; largest batches);
- persistence: §3.2's persistence of importance per layer, on the evaluation text;
- quality: perplexity against KV compression for every policy (the full cache, Scissorhands, H2O, StreamingLLM,
  TOVA, optionally the authors' released code), with and without a quantized cache;
- multiple_choice: accuracy against KV compression through lm-evaluation-harness, eviction applied during its
  forward passes;
- decode: memory and speed of a budget cache on model-shaped heads (bench.py).

A policy's budget is a compression of the text: B = ceil(length / compression) tokens per head, the length being
the perplexity chunk (`eval.seqlen`) or, in multiple choice, each batch of requests. `kv.mode` says how 16-bit
caches are evaluated: `simulate` (one masked forward pass, exact: simulate.py) or `generate` (real eviction,
token by token: generate.py). A quantized cache (`kv.bits` below 16) always runs in mode=generate: its groups are
re-formed as tokens leave it, which only the real cache reproduces. Its `kv_compression` counts both savings:
the eviction's, times the bytes a quantized value saves (codes, scales and zero-points: 3.2x at 4 bits in groups
of 32, 16-bit cache); rows keep both apart (`eviction_compression`, `bits_compression`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from effrepro_kernels.decode_attention import SCHEDULES
from effrepro_kernels.runtime import runs_on
from repro import checks
from repro.bench import Unsupported, status_of
from repro.context import ConfigError, RunContext
from repro.evaluation import context_length, eval_text, perplexity, perplexity_rows
from repro.models import load_model, require_model
from repro.records import Row, largest_x_within
from tasks.common.lm_eval import check_seqlen, check_tasks, stdlib_corpus, validate_texts

from . import bench
from .generate import KV_BITS, REFERENCE, decode_logits
from .hooks import check_replaceable
from .memory import bits_compression, check_quantized, table_rows
from .policies import (BUDGET_SCHEDULES, POLICIES, SCORES, THRESHOLDS, Full, Policy, check_config_parameters,
                       budgeted, policy_at_budget)
from .simulate import persistence_ratio, simulate

EXPERIMENTS = ("table1", "persistence", "quality", "multiple_choice", "decode")
MODEL_EXPERIMENTS = ("persistence", "quality", "multiple_choice")
TEXT_EXPERIMENTS = ("persistence", "quality")  # those that read the evaluation text, eval.*
SWEEPS = ("quality", "multiple_choice")  # those that run the policies of kv.* (mc.* takes kv.*'s by default)
# the settings only some experiments read (kv.experiments)
READ_BY_EXPERIMENTS = {
    "eval": TEXT_EXPERIMENTS, "mc": ["multiple_choice"], "decode": ["decode"], "kv.quality_tolerance": ["quality"],
    **dict.fromkeys(["kv.mode", "kv.policies", "kv.compressions", "kv.bits", "kv.quantized_policies",
                     "kv.scissorhands_released", "kv.h2o", "kv.streaming", "kv.tova"], SWEEPS),
    # the decode experiment's bookkeeping is Scissorhands', on its kernel
    **dict.fromkeys(["kv.scissorhands", "kv.group_size", "kv.schedule"], [*SWEEPS, "decode"])}
MODES = ("simulate", "generate")


def budget(length: int, compression: float) -> int:
    """Tokens a head may hold when a text of `length` tokens is compressed `compression` times."""
    return max(1, math.ceil(length / compression))


def params(kv: DictConfig, name: str) -> dict:
    """A policy's parameters as the config gives them (`kv.<policy>`; none for `full`)."""
    if name not in kv:
        return {}
    checks.mapping(f"kv.{name}", kv[name], "the policy's parameters, as the task's config gives it")
    return OmegaConf.to_container(kv[name])


@dataclass(frozen=True)
class Setting:
    """One point of a sweep: a policy, the bits of its cache, its compression (None: the policy has no budget)."""

    policy: str
    bits: int
    compression: float | None

    @property
    def provider(self) -> str:
        return self.policy if self.bits == 16 else f"{self.policy}_{self.bits}bit"

    def generates(self, mode: str) -> bool:
        return self.bits < 16 or mode == "generate"

    def check_quantized(self, policy: Policy, length: int, n_layers: int, group_size: int, what: str) -> None:
        """Unsupported where its cache under `policy`, on a text of `length` tokens, holds no whole group to
        quantize in some layer (memory.check_quantized). Each layer's own budget counts, not B: budget_schedule=
        growing gives the first layers as little as B/2. `what`: the text, said after the setting."""
        held = [length if b is None else min(length, b) for b in policy.budgets(n_layers)]
        layer = held.index(min(held))
        at = "" if self.compression is None else f" at {self.compression:g}x"
        # where layers differ, the one that holds least is named, with the schedule that gave it so little
        which = "" if len(set(held)) == 1 else f", layer {layer} (budget_schedule={policy.budget_schedule!r})"
        check_quantized(held[layer], self.bits, group_size, f"{self.provider}{at} on {what}{which}")


def sweep(kv: DictConfig, policies, compressions, bits) -> list[Setting]:
    """Every policy at every compression and bits; below 16 bits only those also in `kv.quantized_policies`
    (null: all)."""
    quantized = checks.as_list(kv.quantized_policies) if kv.quantized_policies is not None else policies
    return [Setting(name, b, c) for b in bits for name in policies if b == 16 or name in quantized
            for c in (compressions if budgeted(name) else [None])]


# --- validation ---------------------------------------------------------------------------------------------------

def _check_compressions(key: str, values) -> None:
    for value in checks.numbers(key, values, integer=False, finite=True):
        if value <= 0:
            raise ConfigError(f"{key}={value!r} must be a number > 0: a budget is the text's length / compression")


def _check_params(kv: DictConfig) -> None:
    for name in POLICIES:  # every policy's block, used by this run or not: a misspelt key is never silently unused
        try:
            check_config_parameters(name, params(kv, name))
        except ValueError as exc:
            raise ConfigError(f"kv.{name}: {exc}") from None
    s = kv.scissorhands
    checks.number("kv.scissorhands.recent", s.recent, at_least=0)
    if not isinstance(s.window, int) or isinstance(s.window, bool) or s.window < 1:
        raise ConfigError(f"kv.scissorhands.window={s.window!r} (w, the history window) must be an integer >= 1")
    checks.number("kv.scissorhands.drop_fraction", s.drop_fraction, integer=False, finite=True)
    if not 0 < s.drop_fraction < 1:
        raise ConfigError(f"kv.scissorhands.drop_fraction={s.drop_fraction!r} must be in (0, 1): m = drop_fraction "
                          "· B tokens are dropped at a time, and m >= B would empty the cache (the paper: 0.5)")
    checks.choice("kv.scissorhands.threshold", s.threshold, THRESHOLDS)
    checks.choice("kv.scissorhands.budget_schedule", s.budget_schedule, BUDGET_SCHEDULES)
    checks.choice("kv.scissorhands.score", s.score, SCORES)
    r = kv.scissorhands_released
    checks.number("kv.scissorhands_released.recent", r.recent, at_least=0)
    checks.number("kv.scissorhands_released.window", r.window, at_least=1)
    checks.choice("kv.scissorhands_released.threshold", r.threshold, THRESHOLDS)
    checks.number("kv.scissorhands_released.start", r.start, at_least=0)
    band = checks.as_list(r.layers)
    if len(band) != 2 or not all(isinstance(x, (int, float)) for x in band) or not 0 <= band[0] <= band[1] <= 1:
        raise ConfigError(f"kv.scissorhands_released.layers={band!r} must be a band [lo, hi] of fractions of the "
                          "model's depth, 0 <= lo <= hi <= 1")
    checks.number("kv.h2o.recent_fraction", kv.h2o.recent_fraction, integer=False, finite=True, at_least=0, below=1)
    checks.number("kv.streaming.n_sink", kv.streaming.n_sink, at_least=0)


def _check_generate(kv: DictConfig, settings: list[Setting], where: str) -> None:
    for s in settings:
        if s.generates(kv.mode) and not POLICIES[s.policy].lockstep:
            why = "kv.mode=generate" if s.bits == 16 else f"a {s.bits}-bit cache (always mode=generate)"
            raise ConfigError(f"{where}: policy {s.policy!r} lets the heads of a layer hold different numbers of "
                              f"tokens, so it runs in kv.mode=simulate only, not with {why}; leave it out "
                              "(kv.quantized_policies lists the policies run below 16 bits)")


def check_budgets(cfg: DictConfig, n_layers: int | None) -> None:
    """Every policy of the quality sweep at each budget B = ceil(eval.seqlen / compression), and its budget per
    layer where the model's depth is known: a ConfigError naming the compression and what the policy needs."""
    kv, length = cfg.kv, cfg.eval.seqlen
    for s in sweep(kv, checks.as_list(kv.policies), checks.as_list(kv.compressions), [16]):
        b = None if s.compression is None else budget(length, s.compression)
        try:
            policy = policy_at_budget(s.policy, params(kv, s.policy), b)
            if n_layers is not None:
                policy.budgets(n_layers)
        except ValueError as exc:
            at = f"kv.compressions={s.compression:g} gives B = ceil(eval.seqlen={length} / {s.compression:g}) = {b}"
            raise ConfigError(f"{at if b is not None else f'kv.{s.policy}'}: {exc} (kv.{s.policy} sets the "
                              "policy's parameters)") from None


def validate(cfg: DictConfig) -> None:
    require_model(cfg, "evaluates a language model")
    kv = cfg.kv
    experiments = checks.choices("kv.experiments", kv.experiments, EXPERIMENTS)
    checks.choice("kv.mode", kv.mode, MODES)
    policies = checks.choices("kv.policies", kv.policies, POLICIES)
    bits = checks.choices("kv.bits", kv.bits, KV_BITS)
    quantized = policies if kv.quantized_policies is None else checks.as_list(kv.quantized_policies)
    if quantized:  # [] keeps every setting at 16 bits, whatever kv.bits says
        checks.choices("kv.quantized_policies", quantized, POLICIES)
        if min(bits) < 16 and not set(quantized) & set(policies):
            raise ConfigError(f"kv.bits={bits} asks for a quantized cache, but kv.quantized_policies={quantized} "
                              f"names none of kv.policies={policies}, so no row would be: name some of them there, or "
                              "set kv.bits=[16] for 16-bit rows alone")
    _check_compressions("kv.compressions", kv.compressions)
    checks.number("kv.group_size", kv.group_size, at_least=1)
    checks.choice("kv.schedule", kv.schedule, SCHEDULES)
    checks.number("kv.quality_tolerance", kv.quality_tolerance, integer=False, finite=True, at_least=0)
    _check_params(kv)
    _check_generate(kv, sweep(kv, policies, checks.as_list(kv.compressions), checks.as_list(kv.bits)), "kv.policies")
    validate_texts(cfg.eval)
    # mc.* and eval.seqlen are checked only where read: a run without them could not set them right (unread_keys)
    if "multiple_choice" in experiments:
        validate_multiple_choice(cfg)
    if set(TEXT_EXPERIMENTS) & set(experiments):
        check_seqlen(cfg)
    arch = cfg.model.get("arch")  # the models built here say their shape; a Hub model's is checked once loaded
    if "quality" in experiments:
        check_budgets(cfg, arch.layers if arch is not None else None)
    if arch is not None:
        check_group_size(cfg, experiments, arch.hidden // arch.heads)
    if "decode" in experiments:
        bench.validate(cfg)


def validate_multiple_choice(cfg: DictConfig) -> None:
    kv, mc = cfg.kv, cfg.mc
    checks.choices("mc.policies", mc.policies, checks.as_list(kv.policies))
    _check_compressions("mc.compressions", mc.compressions)
    checks.choices("mc.bits", mc.bits, KV_BITS)
    checks.number("mc.num_fewshot", mc.num_fewshot, at_least=0)
    checks.number("mc.batch_size", mc.batch_size, at_least=1)
    if mc.limit is not None:
        checks.number("mc.limit", mc.limit, at_least=1)
    _check_generate(kv, sweep(kv, checks.as_list(mc.policies), checks.as_list(mc.compressions),
                              checks.as_list(mc.bits)), "mc.policies")
    check_tasks("mc.tasks", mc.tasks)


def unread_keys(cfg: DictConfig) -> dict[str, str]:
    experiments = checks.as_list(cfg.kv.experiments)
    return checks.unread_unless_chosen(READ_BY_EXPERIMENTS, experiments, f"kv.experiments={experiments}")


def check_group_size(cfg: DictConfig, experiments: list[str], head_dim: int) -> None:
    """A quantized cache's values are grouped along a token's channels: kv.group_size must divide the head_dim
    where an experiment on the model runs a quantized setting (kv.quantized_policies may leave none)."""
    bits = {s.bits for key, experiment in (("kv", "quality"), ("mc", "multiple_choice")) if experiment in experiments
            for s in sweep(cfg.kv, checks.as_list(cfg[key].policies), checks.as_list(cfg[key].compressions),
                           checks.as_list(cfg[key].bits)) if s.bits < 16}
    if bits and head_dim % cfg.kv.group_size:
        raise ConfigError(f"kv.group_size={cfg.kv.group_size} must divide the model's head_dim={head_dim} for a "
                          f"quantized cache (kv.bits / mc.bits {sorted(bits)}): values are grouped along a "
                          "token's channels")


# --- evaluation under a policy -----------------------------------------------------------------------------------

@dataclass
class KVForward:
    """`forward(model, ids) -> logits`, as perplexity() and EffreproLM take it, with the KV cache under the policy
    `policy_for(length)` gives for each batch: simulated, or generated token by token with `bits`-bit KV. Sums
    what the caches held, for the compression measured."""

    policy_for: Callable[[int], Policy]
    generate: bool
    bits: int = 16
    group_size: int = 32
    schedule: str = "lean"
    kept: float = 0.0
    causal: float = 0.0
    held_bytes: int = 0
    full_bytes: int = 0

    def __call__(self, model, ids: torch.Tensor) -> torch.Tensor:
        policy = self.policy_for(ids.shape[1])
        if self.generate:
            logits, cache = decode_logits(model, ids, policy, self.bits, self.group_size, self.schedule)
            self.kept += cache.kept
            self.causal += cache.causal
            self.held_bytes += cache.kv_bytes()
            self.full_bytes += cache.full_cache_bytes()
        else:
            logits, sim = simulate(model, ids, policy)
            self.kept += sum(sim.kept)
            self.causal += sum(sim.causal)
        return logits

    @property
    def compression(self) -> float:
        """The full cache's average size over the policy's, as measured (the inverse of the keep ratio)."""
        return self.causal / self.kept if self.kept else 1.0

    @property
    def bytes_compression(self) -> float | None:
        """mode=generate: a full cache's bytes over those the policy's stores took (codes, scales and the
        full-precision window, as allocated)."""
        return round(self.full_bytes / self.held_bytes, 4) if self.held_bytes else None


@dataclass
class FittedPolicy:
    """A multiple-choice setting's policy for each batch of requests of `length` tokens: at budget
    ceil(length / compression). A batch too short for that budget (the cache must keep the r newest tokens and
    drop m = B/2 of it) ends the setting as unsupported: a larger budget, or the full cache, would not be a result
    at its compression. So does one whose budget, in any layer, holds no whole group of a quantized cache. It
    counts the batches it served."""

    kv: DictConfig
    setting: Setting
    n_layers: int
    batches: int = 0

    def __call__(self, length: int) -> Policy:
        self.batches += 1
        policy = self.fitted(length)
        self.setting.check_quantized(policy, length, self.n_layers, self.kv.group_size,
                                     f"a batch of requests of {length} tokens")
        return policy

    def fitted(self, length: int) -> Policy:
        s = self.setting
        if s.compression is None:
            return policy_at_budget(s.policy, params(self.kv, s.policy))
        wanted = budget(length, s.compression)
        if wanted >= length:  # at most 1x: the full cache is what was asked
            return Full()
        try:
            policy = policy_at_budget(s.policy, params(self.kv, s.policy), wanted)
            policy.budgets(self.n_layers)
        except ValueError as exc:
            raise Unsupported(f"a batch of requests of {length} tokens is too short for {s.policy} at "
                              f"{s.compression:g}x (budget {wanted}) with kv.{s.policy}'s parameters: {exc}") from None
        return policy

    def counts(self) -> dict:
        return {"batches": self.batches}


@dataclass
class Model:
    """The model under test and what the rows say of it."""

    module: torch.nn.Module
    tokenizer: object
    label: str  # facebook/opt-6.7b -> opt-6.7b, as the claims name models
    n_layers: int


def kv_forward(kv: DictConfig, s: Setting, policy_for: Callable[[int], Policy], device) -> KVForward:
    """mode=generate on our decode kernel (kv.schedule), or on its PyTorch reference where the kernels cannot run."""
    schedule = kv.schedule if runs_on(device) else REFERENCE
    return KVForward(policy_for, s.generates(kv.mode), s.bits, kv.group_size, schedule)


def kv_compression(s: Setting, forward: KVForward, group_size: int) -> tuple[float | None, dict]:
    """A setting's x: the eviction's compression (as set, or as measured for a policy without a budget) times the
    quantization's; and the extras that break it down."""
    measured = round(forward.compression, 4) if forward.kept else None
    if s.compression is not None:
        eviction = s.compression
    else:
        eviction = 1.0 if s.policy == "full" else measured
    by_bits = bits_compression(s.bits, group_size)
    x = None if eviction is None else round(eviction * by_bits, 4)
    fitted = forward.policy_for.counts() if isinstance(forward.policy_for, FittedPolicy) else {}
    return x, {"policy": s.policy, "kv_bits": s.bits, "eviction_compression": eviction,
               "bits_compression": round(by_bits, 4), "measured_compression": measured,
               "bytes_compression": forward.bytes_compression, **fitted}


def sweep_rows(kv: DictConfig, ctx: RunContext, settings: list[Setting], policy_for, evaluate, to_rows, metric: str,
               unit: str, extra) -> Iterator[Row]:
    """Each setting, its cache under `policy_for(setting)(length)`, measured by `evaluate(forward)` and written by
    `to_rows(result, provider, x, extra)` with the extras `extra(setting)` and the compression's. A setting that
    cannot run here, or fails, is a row of `metric` saying so, and the sweep goes on."""
    for s in settings:
        forward = kv_forward(kv, s, policy_for(s), ctx.device)
        more = {**extra(s), "kv_mode": "generate" if forward.generate else "simulate"}
        if s.policy == "scissorhands":  # which reading of its importance made the row
            more["score"] = kv.scissorhands.score
        if forward.generate:
            more["attention"] = "reference" if forward.schedule == REFERENCE else "kernel"
        start = time.perf_counter()
        try:
            result = evaluate(forward)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - one setting that fails must not end the sweep
            status, message = status_of(exc)
            x, breakdown = kv_compression(s, forward, kv.group_size)
            yield Row(s.provider, "kv_compression", x, metric, unit, status=status, message=message,
                      extra={**more, **breakdown})
            continue
        x, breakdown = kv_compression(s, forward, kv.group_size)
        seconds = time.perf_counter() - start
        print(f"[scissorhands_kv] {metric}: {s.provider} at {x:g}x ({seconds:.1f} s)", flush=True)
        yield from to_rows(result, s.provider, x, {**more, **breakdown, "eval_seconds": round(seconds, 2)})


# --- the experiments on a model ------------------------------------------------------------------------------------

def persistence_rows(cfg: DictConfig, m: Model, text: str, chunks: torch.Tensor) -> Iterator[Row]:
    """Per layer, % of the first half's tokens pivotal for the second half that were pivotal for the first too,
    over every chunk, `eval.batch_size` at a time."""
    ratios = persistence_ratio(m.module, chunks, cfg.eval.batch_size)
    extra = {"model": m.label, "text": text, "chunks": len(chunks), "seqlen": chunks.shape[1], "threshold": "1/t",
             "series": text}
    for layer, ratio in enumerate(ratios):
        yield Row("full", "layer", layer, "persistence_ratio", "%", 100 * ratio, n=chunks.numel(), extra=extra)
    yield Row("full", "text", text, "mean_persistence_ratio", "%", 100 * sum(ratios) / len(ratios),
              n=len(ratios), extra={**extra, "layers": len(ratios)})


def min_fraction_rows(rows: list[Row], tolerance: float, extra: dict) -> Iterator[Row]:
    """Per provider: the smallest KV cache, in % of the full one, down to which the perplexity stays within
    `tolerance` (relative) of the full cache's at every compression (the paper's "maintained down to 75% of the
    KV cache"); 100 where no compression of the sweep keeps it, so that a claim on it is judged, not "not run"."""
    ppl = [r for r in rows if r.metric == "perplexity"]  # failed ones too: a compression that failed ends the run
    reference = [r.p50 for r in ppl if r.provider == "full" and r.status == "ok"]
    if not reference:
        return
    for provider in dict.fromkeys(r.provider for r in ppl if r.provider != "full" and r.status == "ok"):
        largest = largest_x_within([r for r in ppl if r.provider == provider], reference[0], tolerance,
                                   higher_is_better=False)
        yield Row(provider, "text", extra["text"], "min_kv_fraction_ppl_maintained", "%",
                  100 / largest if largest else 100.0, n=1,
                  extra={**extra, "tolerance": tolerance, "reference": "full"})


def quality_rows(cfg: DictConfig, ctx: RunContext, m: Model, text: str, chunks: torch.Tensor) -> Iterator[Row]:
    """Perplexity of every setting of the sweep on `chunks` (chunks, seqlen)."""
    kv, seqlen = cfg.kv, chunks.shape[1]
    base = {"model": m.label, "text": text, "seqlen": seqlen, "series": text}

    def budget_of(s):
        return None if s.compression is None else budget(seqlen, s.compression)

    def policy_for(s):
        def fitted(length):
            policy = policy_at_budget(s.policy, params(kv, s.policy), budget_of(s))
            s.check_quantized(policy, length, m.n_layers, kv.group_size, f"chunks of {length} tokens")
            return policy
        return fitted

    def evaluate(forward):
        return perplexity(m.module, chunks.flatten(), seqlen, batch_size=cfg.eval.batch_size, forward=forward,
                          progress=False)

    def to_rows(result, provider, x, extra):
        return perplexity_rows(result, provider, "kv_compression", x, extra)

    settings = sweep(kv, checks.as_list(kv.policies), checks.as_list(kv.compressions), checks.as_list(kv.bits))
    rows = []
    for row in sweep_rows(kv, ctx, settings, policy_for, evaluate, to_rows, "perplexity", "ppl",
                          lambda s: {**base, "budget": budget_of(s)}):
        rows.append(row)
        yield row
    yield from min_fraction_rows(rows, kv.quality_tolerance, base)


def multiple_choice_rows(cfg: DictConfig, ctx: RunContext, m: Model) -> Iterator[Row]:
    """Accuracy on `mc.tasks` of every setting, the policy fitted to each batch of requests."""
    from repro.lm_harness import EffreproLM, evaluate_multiple_choice
    from repro.lm_harness import multiple_choice_rows as score_rows

    kv, mc = cfg.kv, cfg.mc

    def evaluate(forward):
        lm = EffreproLM(m.module, m.tokenizer, score=forward, batch_size=mc.batch_size, equal_lengths=True)
        return evaluate_multiple_choice(lm, checks.as_list(mc.tasks), num_fewshot=mc.num_fewshot, limit=mc.limit)

    def to_rows(scores, provider, x, extra):
        rows = score_rows(scores, provider, "kv_compression", x, extra)
        for row in rows:
            row.extra["series"] = row.extra["benchmark"]
        return rows

    settings = sweep(kv, checks.as_list(mc.policies), checks.as_list(mc.compressions), checks.as_list(mc.bits))
    yield from sweep_rows(kv, ctx, settings, lambda s: FittedPolicy(kv, s, m.n_layers), evaluate,
                          to_rows, "accuracy", "fraction",
                          lambda s: {"model": m.label, "num_fewshot": mc.num_fewshot, "limit": mc.limit})


def evaluation_chunks(cfg: DictConfig, m: Model, name: str, device) -> torch.Tensor:
    """The first `eval.max_chunks` chunks of `eval.seqlen` tokens of the text `name`: (chunks, seqlen)."""
    data, cache = stdlib_corpus(cfg)
    ids = eval_text(name, m.tokenizer, data=data, cache=cache)
    seqlen = cfg.eval.seqlen
    count = min(len(ids) // seqlen, cfg.eval.max_chunks or len(ids))
    if count == 0:
        raise ConfigError(f"the evaluation text {name!r} has {len(ids)} tokens, fewer than one chunk of "
                          f"eval.seqlen={seqlen}; use a shorter eval.seqlen")
    return ids[:count * seqlen].view(count, seqlen).to(device)


def checked_model(cfg: DictConfig, ctx: RunContext, experiments: list[str]) -> Model:
    """The model, once it has passed the checks that need it (an attention we can replace, a context that holds
    a chunk, a group size that divides its heads, budgets its layers take)."""
    module, tokenizer = load_model(cfg.model, ctx.device)
    m = Model(module, tokenizer, str(cfg.model.name).split("/")[-1].lower(), module.config.num_hidden_layers)
    try:
        check_replaceable(module)
    except ValueError as exc:
        raise ConfigError(f"model={cfg.model.name}: {exc}") from None
    limit, seqlen = context_length(module), cfg.eval.seqlen
    if set(TEXT_EXPERIMENTS) & set(experiments) and limit is not None and seqlen > limit:
        raise ConfigError(f"eval.seqlen={seqlen} is longer than model={cfg.model.name}'s context of {limit} tokens; "
                          f"use eval.seqlen <= {limit}")
    config = module.config
    check_group_size(cfg, experiments, getattr(config, "head_dim", None) or
                     config.hidden_size // config.num_attention_heads)
    if "quality" in experiments:
        check_budgets(cfg, m.n_layers)
        beyond = [c for c in checks.as_list(cfg.kv.compressions) if limit is not None and budget(seqlen, c) > limit]
        if beyond:
            print(f"[scissorhands_kv] kv.compressions {beyond} give budgets beyond the model's context of {limit} "
                  "tokens: nothing is ever evicted, they are the full cache", flush=True)
    if "multiple_choice" in experiments:  # mc.* is checked (validate) and read only where multiple choice runs
        below_one = [c for c in checks.as_list(cfg.mc.compressions) if c < 1]
        if below_one:
            print(f"[scissorhands_kv] mc.compressions {below_one} give budgets beyond every request's length: "
                  "nothing is ever evicted, they are the full cache", flush=True)
    return m


def model_rows(cfg: DictConfig, ctx: RunContext, m: Model, experiments: list[str]) -> Iterator[Row]:
    # every text read before the first is measured: one that cannot be loaded fails the run before its work
    texts = checks.as_list(cfg.eval.texts) if set(TEXT_EXPERIMENTS) & set(experiments) else []
    for name, chunks in {name: evaluation_chunks(cfg, m, name, ctx.device) for name in texts}.items():
        if "persistence" in experiments:
            yield from bench.guarded(persistence_rows(cfg, m, name, chunks), "full", "text", "mean_persistence_ratio",
                                     "%")
        if "quality" in experiments:
            yield from quality_rows(cfg, ctx, m, name, chunks)
    if "multiple_choice" in experiments:
        yield from multiple_choice_rows(cfg, ctx, m)


def run(cfg: DictConfig, ctx: RunContext) -> Iterator[Row]:
    experiments = checks.as_list(cfg.kv.experiments)
    # a model refused (its attention cannot be replaced, its context is too short) is refused before any row
    m = checked_model(cfg, ctx, experiments) if set(MODEL_EXPERIMENTS) & set(experiments) else None
    if "table1" in experiments:
        yield from table_rows()
    if m is not None:
        yield from model_rows(cfg, ctx, m, experiments)
        del m  # the decode benchmark's largest batch is the memory it finds free
    if "decode" in experiments:
        yield from bench.rows(cfg, ctx)
