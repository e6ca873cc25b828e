"""Task `greenformers`: the Low-Rank Transformer (LRT) against Linformer on a BERT-shaped encoder (Greenformers,
arXiv 2108.10808), in up to three parts (`greenformers.parts`):

- crossover: every variant (tasks/greenformers/variants.py) at every sequence length, inference and a training
  step, against the dense model; then the shortest length from which Linformer beats LRT (and base) in time
  and in peak memory, and what LRT saves at short sequences in measured time and counted FLOPs (cost_reduction);
- notebook: the author's greenformer notebook on BERT-base: parameter counts, and the partial model's speedups
  at its batch sizes;
- quality: the variants trained on a generated classification set, and the SVD-initialised LRT's error as the
  rank falls (tasks/greenformers/quality.py).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from effrepro_kernels.runtime import runs_on
from repro import checks
from repro.bench import DTYPES, Point
from repro.checks import as_list
from repro.context import ConfigError, RunContext, resolve_device
from repro.records import Row
from repro.train import TrainSpec

from .efficiency import BASELINE, Models, cost_rows, crossover_rows, measure_points
from .quality import run_quality
from .variants import ATTENTIONS, MODES, Variant, distinct_models, on_meta, parse_variant

PARTS = ("crossover", "notebook", "quality")
MODEL_KEYS = {"name", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"}
# the blocks of settings under greenformers, each a parent's before its children's
SECTIONS = ("model", "crossover", "notebook", "notebook.batch", "quality", "quality.model")


def _check_model(key: str, model: DictConfig) -> dict:
    model = OmegaConf.to_container(model)
    if set(model) != MODEL_KEYS:
        raise ConfigError(f"{key} has keys {sorted(model)}; it needs exactly {sorted(MODEL_KEYS)}")
    for field in MODEL_KEYS - {"name"}:
        checks.number(f"{key}.{field}", model[field], at_least=1)
    checks.number(f"{key}.num_attention_heads", model["num_attention_heads"], at_least=1, divides=model["hidden_size"])
    return model


def _check_variants(key: str, names: list, model: dict, seq_len: int, base_for: str = "") -> None:
    """Each variant parsed and built on the meta device (no memory, no work) for inputs of `seq_len` tokens:
    a rank or k that does not fit the model is an error here, before anything runs. Two names of one model
    (`lrt_r8+linformer_k16` and `linformer_k16+lrt_r8`) would measure it twice; `base+sdpa` beside `base` is
    allowed where `greenformers.attention` is sdpa, so that the default grid takes any default attention.
    `base_for` says what base is needed for, where it is."""
    seen: dict[Variant, str] = {}
    for name in map(str, names):
        try:
            variant = parse_variant(name)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        try:
            on_meta(variant, model, seq_len, seq_len)
        except ValueError as exc:
            raise ConfigError(f"{key}: variant {name!r} does not fit this model at {seq_len} tokens: {exc}") from None
        same = replace(variant, name="")
        if same in seen:
            also = "" if seen[same] == name else f" (as {seen[same]!r} and {name!r})"
            raise ConfigError(f"{key} names one model twice{also}: it would be measured twice")
        seen[same] = name
    if base_for and BASELINE not in seen.values():
        raise ConfigError(f"{key} must include {BASELINE!r}, {base_for}")


def validate(cfg: DictConfig) -> None:
    g = cfg.greenformers
    # a block set to null (or to one value) would fail at its first setting, with a traceback
    for key in SECTIONS:
        checks.mapping(f"greenformers.{key}", OmegaConf.select(g, key),
                       "settings, as the task's config (conf/task/greenformers.yaml) gives it")
    parts = checks.choices("greenformers.parts", g.parts, PARTS)
    checks.choice("greenformers.attention", g.attention, ATTENTIONS)
    if g.attention == "effrepro" and not runs_on(resolve_device(cfg.scale)):
        raise ConfigError("greenformers.attention=effrepro is our Triton kernel, which needs a CUDA GPU (or "
                          "TRITON_INTERPRET=1, slowly, on the CPU): base, the baseline of every ratio, could not "
                          "run; use sdpa or eager here")
    checks.choice("greenformers.dtype", g.dtype, DTYPES)
    for key in ("warmup_ms", "rep_ms"):
        checks.number(f"greenformers.{key}", g[key], integer=False, at_least=0)
    model = _check_model("greenformers.model", g.model)
    if "crossover" in parts:
        sweep = g.crossover
        lengths = checks.numbers("greenformers.crossover.seq_len", sweep.seq_len, at_least=1)
        checks.number("greenformers.crossover.tokens", sweep.tokens, at_least=1)
        checks.number("greenformers.crossover.cost_max_seq_len", sweep.cost_max_seq_len, at_least=1)
        checks.choices("greenformers.crossover.modes", sweep.modes, MODES)
        if sweep.cost_max_seq_len < min(lengths):
            raise ConfigError(f"greenformers.crossover.cost_max_seq_len={sweep.cost_max_seq_len} is below every "
                              f"length of greenformers.crossover.seq_len={lengths}: no cost row would be made")
        _check_variants("greenformers.crossover.variants", as_list(sweep.variants), model, max(lengths),
                        base_for="the dense model every ratio is taken against")
    if "notebook" in parts:
        book = g.notebook
        checks.choice("greenformers.notebook.dtype", book.dtype, DTYPES)
        checks.number("greenformers.notebook.seq_len", book.seq_len, at_least=1)
        checks.number("greenformers.notebook.positions", book.positions, at_least=book.seq_len)
        checks.choices("greenformers.notebook.batch", list(book.batch), MODES)
        for mode, batch in book.batch.items():
            checks.number(f"greenformers.notebook.batch.{mode}", batch, at_least=1)
        if BASELINE in as_list(book.variants):
            raise ConfigError(f"greenformers.notebook.variants names {BASELINE!r}, which is always measured (first): "
                              "leave it out")
        _check_variants("greenformers.notebook.variants", [BASELINE, *as_list(book.variants)], model, book.seq_len)
    if "quality" in parts:
        spec = g.quality
        small = _check_model("greenformers.quality.model", spec.model)
        for key in ("n_train", "n_val", "batch"):
            checks.number(f"greenformers.quality.{key}", spec[key], at_least=1)
        # the generated set needs room for [CLS] and the markers, and tokens besides them
        checks.number("greenformers.quality.seq_len", spec.seq_len, at_least=9)
        checks.number("greenformers.quality.model.vocab_size", small["vocab_size"], at_least=5)
        ranks = as_list(spec.svd_ranks)  # none: no factorised copies of the trained model
        # none would train nothing: refused
        variants = checks.axis("greenformers.quality.variants", spec.variants)
        _check_variants("greenformers.quality.variants", variants, small, spec.seq_len,
                        base_for="the model factorised at greenformers.quality.svd_ranks (or set those to [])"
                        if ranks else "")
        for rank in ranks:
            checks.number("greenformers.quality.svd_ranks", rank, at_least=1)
        _check_variants("greenformers.quality.svd_ranks", [f"lrt_r{r}" for r in ranks], small, spec.seq_len)
        TrainSpec.from_config(cfg.train)
        if ranks and cfg.train.parallel == "fsdp":
            raise ConfigError("greenformers.quality.svd_ranks factorise the trained base model itself, which "
                              "train.parallel=fsdp would have sharded; use train.parallel=ddp, or svd_ranks=[]")


# the settings only some parts read (greenformers.attention and the seed are every part's)
READ_BY_PARTS = {"greenformers.crossover": ["crossover"], "greenformers.notebook": ["notebook"],
                 "greenformers.dtype": ["crossover"],  # the notebook has its own, greenformers.notebook.dtype
                 "greenformers.model": ["crossover", "notebook"], "greenformers.warmup_ms": ["crossover", "notebook"],
                 "greenformers.rep_ms": ["crossover", "notebook"], "greenformers.quality": ["quality"],
                 "train": ["quality"]}


def unread_keys(cfg: DictConfig) -> dict[str, str]:
    parts = as_list(cfg.greenformers.parts)
    return checks.unread_unless_chosen(READ_BY_PARTS, parts, f"greenformers.parts={parts}")


def _point(ctx: RunContext, setting: str, seq_len: int, mode: str, batch: int, dtype: str, model: str) -> Point:
    device_name = ctx.env["gpu_name"] if ctx.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return Point("seq_len", seq_len, dict(setting=setting, mode=mode, batch=batch, dtype=dtype, model=model,
                                          device=ctx.device.type, device_name=device_name,
                                          series=f"{device_name} {setting}"))


def run(cfg: DictConfig, ctx: RunContext) -> Iterator[Row]:
    g = cfg.greenformers
    parts = as_list(g.parts)
    model = OmegaConf.to_container(g.model)
    ctx.env["torch_threads"] = torch.get_num_threads()

    def measure(variants: list[Variant], points: list[Point], positions: int, dtype: str) -> Iterator[Row]:
        models = Models(model, positions, g.attention, DTYPES[dtype], cfg.seed)
        yield from measure_points(points, variants, models, ctx.device, seed=cfg.seed, warmup_ms=g.warmup_ms,
                                  rep_ms=g.rep_ms, default_attention=g.attention)

    if "crossover" in parts:
        sweep = g.crossover
        lengths = sorted(as_list(sweep.seq_len))
        variants = distinct_models(as_list(sweep.variants), g.attention)
        points = [_point(ctx, "sweep", n, mode, max(1, sweep.tokens // n), g.dtype, g.model.name) for n in lengths
                  for mode in as_list(sweep.modes)]
        rows = []
        for row in measure(variants, points, max(lengths), g.dtype):
            rows.append(row)
            yield row
        # Linformer against LRT and against the dense model, each under every attention the grid gives it: with
        # a fused one (no n×n matrix in memory), like Linformer's own SDPA, the pair compares the methods alone
        lrt = [v for v in variants if v.rank is not None and v.k is None and v.last is None]
        linformer = [v.name for v in variants if v.k is not None and v.rank is None]
        dense = [v.name for v in variants if v.rank is None and v.k is None]
        yield from crossover_rows(rows, [(a, b) for a in linformer for b in [*(v.name for v in lrt), *dense]])
        # what the factorisation itself saves: LRT under the attention base has
        yield from cost_rows(rows, [v.name for v in lrt if not v.attention], sweep.cost_max_seq_len)
    if "notebook" in parts:
        book = g.notebook
        variants = distinct_models([BASELINE, *as_list(book.variants)], g.attention)
        points = [_point(ctx, "notebook", book.seq_len, mode, batch, book.dtype, g.model.name)
                  for mode, batch in book.batch.items()]
        yield from measure(variants, points, book.positions, book.dtype)
    if "quality" in parts:
        yield from run_quality(cfg, ctx)
