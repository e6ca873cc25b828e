"""Long Range Arena: each task's transformer trained with each attention (tasks lra_listops, lra_text,
lra_retrieval, lra_image, lra_pathfinder, lra (all five), pathx, path256), reporting validation accuracy,
step time, throughput, memory, the speedup over standard attention per task, and their geometric mean.

ListOps and Pathfinder are generated (tasks/lra/data.py); Text, Retrieval and Image read the real data with
`lra.source=hub` (network, or a filled cache) and otherwise run on small random fixtures of the same shape:
their speed is real, their accuracy is chance.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from repro.bench import as_list, require_triton
from repro.context import ConfigError, RunContext, fingerprint
from repro.records import Row
from repro.train import (Candidate, Trainee, TrainSpec, final_rows, model_flops_per_token, step_generator,
                         throughput_ratios, train_all)

from .data import (LISTOPS_VOCAB, MAX_BYTES, encode_listops, load_lra_hub, load_or_generate, tiny_fixture)
from .model import ATTENTIONS, LRAClassifier, upsample_positions

# The LRA repo's base configs (dim / heads / layers / mlp), moe_lowrank_lra.md §3.4. Pathfinder's qkv width is
# 32 rather than 16, so that its two heads have 16 dimensions, the least our kernel takes.
MODELS = {"listops": dict(dim=512, heads=8, depth=4, mlp_dim=1024),
          "text": dict(dim=256, heads=4, depth=4, mlp_dim=1024),
          "retrieval": dict(dim=128, heads=4, depth=4, mlp_dim=512),
          "image": dict(dim=32, heads=1, depth=1, mlp_dim=64),
          "pathfinder": dict(dim=32, heads=2, depth=1, mlp_dim=32)}
PATH_SIZES = {"pathfinder": 32, "path64": 64, "pathx": 128, "path256": 256}
LRA_TASKS = ("listops", "text", "retrieval", "image", *PATH_SIZES)


def _pad(rows: list[list[int]], length: int) -> torch.Tensor:
    out = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        r = r[:length]
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def _images(ds) -> dict[str, torch.Tensor]:
    """Grey images as sequences of pixel values (the tokens), all real."""
    columns = ds.with_format("numpy", dtype=np.uint8)[:]
    ids = torch.from_numpy(columns["image"].reshape(len(ds), -1).astype(np.int64))
    return {"input_ids": ids, "real": torch.ones_like(ids, dtype=torch.bool),
            "labels": torch.from_numpy(columns["label"].astype(np.int64))}


def load_split(name: str, split: str, n: int, spec, cache: Path) -> tuple[dict[str, torch.Tensor], int, int]:
    """A split as tensors (input_ids, real, labels; and the second document's for Retrieval), with the
    vocabulary size and sequence length."""
    if name == "listops":
        ds = load_or_generate("listops", split, n, spec.seed, cache, min_length=spec.listops_min_length,
                              max_length=spec.listops_max_length)
        ids = _pad([encode_listops(s) for s in ds["source"]], spec.listops_max_length)
        return {"input_ids": ids, "real": ids != 0, "labels": torch.tensor(ds["label"])}, len(LISTOPS_VOCAB), \
            spec.listops_max_length
    if name in PATH_SIZES:
        size = PATH_SIZES[name]
        ds = load_or_generate("pathfinder", split, n, spec.seed, cache, size=size, difficulty=spec.difficulty)
        return _images(ds), 256, size * size
    ds = load_lra_hub(name, split, data_dir=spec.data_dir) if spec.source == "hub" else \
        tiny_fixture(name, n, seed=spec.seed + (split == "val"))
    if name == "image":
        return _images(ds), 256, 1024
    length = MAX_BYTES[name]
    out = {"labels": torch.tensor(ds["label"])}
    for suffix in ("", "2") if name == "retrieval" else ("",):
        ids = _pad(ds[f"input_ids{suffix}"], length)
        out[f"input_ids{suffix}"], out[f"real{suffix}"] = ids, ids != 0
    return out, 257, length


def candidates(cfg: DictConfig, ctx: RunContext, cache: Path, tasks: list[str], keep: dict | None = None,
               start_from: dict | None = None) -> Iterator[Candidate]:
    """One candidate per (task, attention). `keep` collects each built model by attention (to pre-train it);
    `start_from` starts each model from the one kept for its attention, its position table grown to the
    task's image (the Path-X / Path-256 recipe)."""
    spec = cfg.lra
    for name in tasks:
        train_set, vocab, seq_len = load_split(name, "train", spec.n_train, spec, cache)
        val_set, _, _ = load_split(name, "val", spec.n_val, spec, cache)
        family = "pathfinder" if name in PATH_SIZES else name
        model_cfg = {**MODELS[family], **OmegaConf.to_container(spec.model)}
        classes = 10 if name in ("listops", "image") else 2  # digits 0-9, CIFAR-10; the rest are yes/no
        for attention in as_list(spec.attention):
            extra = dict(lra_task=name, seq_len=seq_len, series=f"{name} N={seq_len}")

            def build(name=name, attention=attention, train_set=train_set, val_set=val_set, vocab=vocab,
                      seq_len=seq_len, model_cfg=model_cfg, classes=classes, extra=extra) -> Trainee:
                if attention.startswith("flash"):
                    require_triton(attention, ctx.device)
                torch.manual_seed(cfg.seed)
                model = LRAClassifier(vocab=vocab, classes=classes, seq_len=seq_len, attention=attention,
                                      pair=name == "retrieval", **model_cfg)
                if start_from is not None:
                    pretrained = start_from[attention]
                    upsample_positions(pretrained, math.isqrt(seq_len))
                    model.load_state_dict(pretrained.state_dict())
                if keep is not None:
                    keep[attention] = model
                n = len(train_set["labels"])

                micro = spec.micro_batch.get(name) or spec.batch  # validate(): it divides the step

                def batches(step, rank, world):
                    gen = step_generator(cfg.seed, step, rank)
                    picks = torch.randint(0, n, (cfg.train.grad_accum * spec.batch,), generator=gen)
                    return [{k: v[i] for k, v in train_set.items()} for i in picks.split(micro)]

                def evaluate(model):
                    hits = 0
                    for start in range(0, len(val_set["labels"]), spec.batch):
                        batch = {k: v[start:start + spec.batch].to(ctx.device) for k, v in val_set.items()}
                        hits += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
                    return {"val_accuracy": 100.0 * hits / len(val_set["labels"])}

                flops = model_flops_per_token(model, model_cfg["depth"], model_cfg["dim"], seq_len)
                towers = 2 if name == "retrieval" else 1
                settings = dict(task=name, attention=attention, seq_len=seq_len, model=model_cfg, seed=cfg.seed,
                                lra=OmegaConf.to_container(spec), train=OmegaConf.to_container(cfg.train))
                return Trainee(attention, model, batches, evaluate,
                               cfg.train.grad_accum * spec.batch * seq_len * towers, flops, extra,
                               fingerprint(settings))
            yield Candidate(attention, extra, build)


def derived_rows(rows: list[Row]) -> Iterator[Row]:
    """Per task: each attention's throughput over standard attention's. Over the tasks this run trained: the
    geometric mean of those speedups (the paper's Table 3 figure) and the mean final accuracy."""
    speedups: dict[str, list[float]] = {}
    for r in throughput_ratios(rows, "lra_task", "standard", "speedup"):
        speedups.setdefault(r.provider, []).append(r.p50)
        yield r
    tasks = sorted({t for _, t in final_rows(rows, "tokens_per_s", "lra_task")})
    for attention, ratios in speedups.items():
        if len(ratios) == len(tasks) and len(tasks) > 1:
            yield Row(attention, "tasks", len(tasks), "speedup_geomean", "x", statistics.geometric_mean(ratios),
                      n=len(ratios),
                      extra={"tasks": ",".join(tasks), "baseline": "standard"})
    by_attention: dict[str, list[float]] = {}
    for (attention, _), r in final_rows(rows, "val_accuracy", "lra_task").items():
        by_attention.setdefault(attention, []).append(r.p50)
    for attention, values in by_attention.items():
        if len(values) == len(tasks) and len(tasks) > 1:
            yield Row(attention, "tasks", len(tasks), "accuracy_avg", "%", sum(values) / len(values), n=len(values),
                      extra={"tasks": ",".join(tasks)})


def validate(cfg: DictConfig) -> None:
    spec = cfg.lra
    unknown = [t for t in as_list(spec.tasks) if t not in LRA_TASKS]
    if unknown:
        raise ConfigError(f"lra.tasks={unknown} unknown; choose from {list(LRA_TASKS)}")
    unknown = [a for a in as_list(spec.attention) if a not in ATTENTIONS]
    if unknown:
        raise ConfigError(f"lra.attention={unknown} unknown; choose from {list(ATTENTIONS)}")
    step = spec.batch * cfg.train.grad_accum
    for task, micro in spec.micro_batch.items():
        if micro is not None and (micro < 1 or (micro < step and step % micro)):
            raise ConfigError(f"lra.micro_batch.{task}={micro} must be null or a positive divisor of the {step} "
                              "examples of a step (lra.batch x train.grad_accum; a larger value leaves the step "
                              "whole), so that every example weighs the same")
    if spec.source not in ("fixture", "hub"):
        raise ConfigError(f"lra.source={spec.source!r} is not one of: fixture, hub")
    if spec.pretrain:
        if spec.pretrain.task not in PATH_SIZES or any(t not in PATH_SIZES for t in as_list(spec.tasks)):
            raise ConfigError(f"lra.pretrain.task={spec.pretrain.task!r}: pre-training grows a Pathfinder "
                              f"model's position table, so it and lra.tasks must be among {list(PATH_SIZES)}")
        if "linformer" in as_list(spec.attention):
            raise ConfigError("lra.pretrain cannot carry Linformer's length-bound projections to another length")
        if cfg.train.parallel == "fsdp":
            raise ConfigError("lra.pretrain hands the pre-trained model itself to the next stage, which "
                              "train.parallel=fsdp would have sharded; use train.parallel=ddp")


def run(cfg: DictConfig, ctx: RunContext) -> Iterator[Row]:
    validate(cfg)
    cache = Path(cfg.paths.cache) / "lra"
    spec = TrainSpec.from_config(cfg.train)
    checkpoint_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
    tasks, pretrained = as_list(cfg.lra.tasks), None
    if cfg.lra.pretrain:  # the Path-X / Path-256 recipe: train on a smaller image first, then grow
        pretrained = {}
        stage = dataclasses.replace(spec, steps=cfg.lra.pretrain.steps)
        yield from train_all(candidates(cfg, ctx, cache, [cfg.lra.pretrain.task], keep=pretrained), stage,
                             ctx.device, checkpoint_dir, cfg.checkpoint.resume)
    rows = []
    for row in train_all(candidates(cfg, ctx, cache, tasks, start_from=pretrained), spec, ctx.device,
                         checkpoint_dir, cfg.checkpoint.resume):
        rows.append(row)
        yield row
    yield from derived_rows(rows)
