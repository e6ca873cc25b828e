"""Long Range Arena: each task's transformer trained with each attention (tasks lra_listops, lra_text,
lra_retrieval, lra_image, lra_pathfinder, lra (all five), pathx, path256), reporting validation and test
accuracy, step time, throughput, memory, the speedup over standard attention per task, and their geometric mean.

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

from effrepro_kernels.runtime import MAX_HEAD_DIM, MIN_HEAD_DIM
from repro import checks
from repro.bench import require_triton
from repro.checks import as_list
from repro.context import ConfigError, RunContext, fingerprint
from repro.records import Row
from repro.train import (Candidate, Stage, Trainee, TrainSpec, final_rows, model_flops_per_token,
                         step_generator, throughput_ratios, train_from_config)

from .data import (AAN_FILES, DATA_TASKS, HUB_SPLITS, LISTOPS_VOCAB, MAX_BYTES, SPLITS, check_hub_reachable,
                   encode_listops, generator_params, load_lra_hub, load_or_generate, tiny_fixture)
from .model import ATTENTIONS, LINFORMER_K, LRAClassifier, upsample_positions

# The LRA repository's base configs per task (dim / heads / layers / mlp). Pathfinder's qkv width is
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
    """Grey images as sequences of pixel values (the tokens), every one real (no mask), kept as bytes: Path-256's
    training split takes about 10 GB so, and would take 78 as int64 (the model takes either)."""
    columns = ds.with_format("numpy", dtype=np.uint8)[:]
    return {"input_ids": torch.from_numpy(columns["image"].reshape(len(ds), -1)),
            "labels": torch.from_numpy(columns["label"].astype(np.int64))}


def generated(name: str, spec) -> tuple[str, dict] | None:
    """The generator of task `name` (listops, pathfinder) and the parameters lra.* gives it; None for a task read
    from the hub or a fixture."""
    if name == "listops":
        return "listops", dict(min_length=spec.listops_min_length, max_length=spec.listops_max_length)
    if name in PATH_SIZES:
        return "pathfinder", dict(size=PATH_SIZES[name], difficulty=spec.difficulty)
    return None


def example_length(name: str, spec) -> int:
    """The tokens of an example of task `name` (of each document, for Retrieval)."""
    if name == "listops":
        return spec.listops_max_length
    if name in PATH_SIZES:
        return PATH_SIZES[name] ** 2
    if name == "image":
        return 1024
    return spec.max_bytes or MAX_BYTES[name]


def load_split(name: str, split: str, n: int, spec, cache: Path) -> tuple[dict[str, torch.Tensor], int, int]:
    """A split as tensors (input_ids, real, labels; and the second document's for Retrieval), with the
    vocabulary size and sequence length."""
    generator = generated(name, spec)
    if generator:
        ds = load_or_generate(generator[0], split, n, spec.seed, cache, **generator[1])
    elif spec.source == "hub":
        ds = load_lra_hub(name, split, data_dir=spec.data_dir)
    else:
        ds = tiny_fixture(name, n, seed=spec.seed + SPLITS.index(split))
    length = example_length(name, spec)
    if name == "listops":
        ids = _pad([encode_listops(s) for s in ds["source"]], length)
        return {"input_ids": ids, "real": ids != 0, "labels": torch.tensor(ds["label"])}, len(LISTOPS_VOCAB), length
    if name in PATH_SIZES or name == "image":
        return _images(ds), 256, length
    out = {"labels": torch.tensor(ds["label"])}
    for suffix in ("", "2") if name == "retrieval" else ("",):
        ids = _pad(ds[f"input_ids{suffix}"], length)
        out[f"input_ids{suffix}"], out[f"real{suffix}"] = ids, ids != 0
    return out, 257, length


def without_full_masks(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` (on the host) less its real-token masks (real, real2) that mark every token real: the model then
    takes its path without a mask, and no forward has to read a mask back from the device to find that out (a
    sync inside the timed step, one per document)."""
    return {key: value for key, value in batch.items() if not (key.startswith("real") and bool(value.all()))}


def data_source(name: str, spec) -> str:
    """Where a task's examples come from: `generated` (ListOps, Pathfinder: LRA's own generators), `hub`, or
    `fixture` (random examples with random labels, which test the mechanics and learn nothing)."""
    return "generated" if generated(name, spec) else spec.source


def evaluated_splits(name: str, spec) -> tuple[str, ...]:
    """The splits a run evaluates: val and test, or val alone where the data has no other test set (LRA Text
    validates on IMDb's test set). Only the final test accuracy is the paper's figure; nothing chooses by it."""
    hub = HUB_SPLITS.get(name) if spec.source == "hub" and not generated(name, spec) else None
    return ("val",) if hub and hub["val"] == hub["test"] else ("val", "test")


def model_config(spec: DictConfig, task: str) -> dict:
    """The LRA model of `task` (Pathfinder's for every Path size), with lra.model's changes."""
    return {**MODELS["pathfinder" if task in PATH_SIZES else task], **OmegaConf.to_container(spec.model)}


def _trainee(cfg: DictConfig, ctx: RunContext, name: str, attention: str, split: dict,
             pretrained: Trainee | None = None) -> Trainee:
    """The LRA model for task `name` with `attention`; with `pretrained`, started from that trained model, its
    position table grown to this task's image (the Path-X / Path-256 recipe)."""
    spec = cfg.lra
    train_set, vocab, seq_len = split["train"], split["vocab"], split["seq_len"]
    model_cfg = model_config(spec, name)
    classes = 10 if name in ("listops", "image") else 2  # digits 0-9, CIFAR-10; the rest are yes/no
    if getattr(ATTENTIONS[attention], "needs_triton", False):
        require_triton(attention, ctx.device)
    torch.manual_seed(cfg.seed)
    model = LRAClassifier(vocab=vocab, classes=classes, seq_len=seq_len, attention=attention,
                          pair=name == "retrieval", **model_cfg)
    if pretrained is not None:
        upsample_positions(pretrained.model, math.isqrt(seq_len))
        model.load_state_dict(pretrained.model.state_dict())
    n = len(train_set["labels"])
    micro = (spec.micro_batch or {}).get(name) or spec.batch  # validate(): it divides the step
    # evaluation's forwards no larger than training's, so that a micro-batch set for memory holds there too
    eval_batch = min(micro, spec.batch)

    def batches(step, rank, world):
        gen = step_generator(cfg.seed, step, rank)
        picks = torch.randint(0, n, (cfg.train.grad_accum * spec.batch,), generator=gen)
        return [without_full_masks({k: v[i] for k, v in train_set.items()}) for i in picks.split(micro)]

    def evaluate(model):
        rows = []
        for name_of_split, examples in split["evaluated"].items():
            hits = 0
            for start in range(0, len(examples["labels"]), eval_batch):
                batch = without_full_masks({k: v[start:start + eval_batch] for k, v in examples.items()})
                batch = {k: v.to(ctx.device) for k, v in batch.items()}
                hits += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
            rows.append(Row(attention, "step", 0, f"{name_of_split}_accuracy", "%",
                            100.0 * hits / len(examples["labels"]), n=1,
                            extra={"examples": len(examples["labels"])}))
        return rows

    flops = model_flops_per_token(model, model_cfg["depth"], model_cfg["dim"], seq_len)
    towers = 2 if name == "retrieval" else 1
    settings = dict(task=name, attention=attention, seq_len=seq_len, model=model_cfg, seed=cfg.seed,
                    lra=OmegaConf.to_container(spec), pretrained=pretrained and pretrained.fingerprint)
    extra = dict(lra_task=name, seq_len=seq_len, series=f"{name} N={seq_len}", data=data_source(name, spec))
    return Trainee(attention, model, batches, evaluate, cfg.train.grad_accum * spec.batch * seq_len * towers, flops,
                   extra, fingerprint(settings))


def candidates(cfg: DictConfig, ctx: RunContext, cache: Path) -> Iterator[Candidate]:
    """One candidate per (task, attention); with `lra.pretrain`, each first trains on the pre-training task,
    then goes on to its own from there."""
    spec = cfg.lra
    splits: dict[str, dict] = {}

    def split(name):
        if name not in splits:
            train_set, vocab, seq_len = load_split(name, "train", spec.n_train, spec, cache)
            # the test split is as large as the val split, as in LRA's generated tasks
            evaluated = {s: load_split(name, s, spec.n_val, spec, cache)[0] for s in evaluated_splits(name, spec)}
            splits[name] = dict(train=train_set, evaluated=evaluated, vocab=vocab, seq_len=seq_len)
        return splits[name]

    for name in as_list(spec.tasks):
        for attention in as_list(spec.attention):
            extra = dict(lra_task=name, seq_len=split(name)["seq_len"], series=f"{name} N={split(name)['seq_len']}")
            build = lambda name=name, attention=attention: (  # noqa: E731
                _trainee(cfg, ctx, name, attention, split(name)))
            if not spec.pretrain:
                yield Candidate(attention, extra, build)
                continue
            first = spec.pretrain.task
            yield Candidate(attention, extra,
                            lambda attention=attention: _trainee(cfg, ctx, first, attention, split(first)),
                            spec=pretrain_spec(cfg),
                            then=[Stage(lambda pre, name=name, attention=attention:
                                        _trainee(cfg, ctx, name, attention, split(name), pretrained=pre))])


def pretrain_spec(cfg: DictConfig) -> TrainSpec:
    """The pre-training stage's settings: the run's train block for lra.pretrain.steps steps."""
    try:
        return dataclasses.replace(TrainSpec.from_config(cfg.train), steps=cfg.lra.pretrain.steps)
    except ConfigError as exc:  # the message names train.steps, which the stage takes from lra.pretrain.steps
        raise ConfigError(f"lra.pretrain.steps={cfg.lra.pretrain.steps} (the pre-training stage's train.steps): "
                          f"{exc}") from None


def derived_rows(rows: list[Row], tasks: list[str]) -> Iterator[Row]:
    """Per task of `tasks` (the run's, not a pre-training stage's): each attention's throughput over standard
    attention's. Over those tasks: the geometric mean of those speedups (the paper's Table 3 figure) and the mean
    final accuracy (test, or val where a task has no other test set)."""
    rows = [r for r in rows if r.extra.get("lra_task") in tasks]
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
    accuracy = {**final_rows(rows, "val_accuracy", "lra_task"), **final_rows(rows, "test_accuracy", "lra_task")}
    for (attention, _), r in accuracy.items():
        by_attention.setdefault(attention, []).append(r.p50)
    fixtures = sorted({task for (_, task), r in accuracy.items() if r.extra.get("data") == "fixture"})
    for attention, values in by_attention.items():
        if len(values) == len(tasks) and len(tasks) > 1:
            # an average over random-label fixtures says nothing of the attention: the row names them
            yield Row(attention, "tasks", len(tasks), "accuracy_avg", "%", sum(values) / len(values), n=len(values),
                      extra={"tasks": ",".join(tasks), "fixture_tasks": ",".join(fixtures)})


# what lra.model may change (LRAClassifier's settings), and the numbers each takes
WHOLE = dict(at_least=1)
MODEL_KEYS = {"dim": WHOLE, "heads": WHOLE, "depth": WHOLE, "mlp_dim": WHOLE, "linformer_k": WHOLE, "block_size": WHOLE,
              "dropout": dict(integer=False, at_least=0, below=1)}


def _check_model(spec: DictConfig, task: str) -> dict:
    model = model_config(spec, task)
    unknown = sorted(set(model) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"lra.model.{unknown[0]} is not a setting of the LRA model; it takes {list(MODEL_KEYS)}")
    for key, bounds in MODEL_KEYS.items():
        if key in model:
            checks.number(f"lra.model.{key}", model[key], **bounds)
    block = model.get("block_size")
    if block is not None and (block < 16 or block & (block - 1)):
        raise ConfigError(f"lra.model.block_size={block} must be a power of two, at least 16 (the block-sparse "
                          f"kernel's blocks)")
    if model["dim"] % model["heads"]:
        raise ConfigError(f"lra.model: dim={model['dim']} is not a multiple of heads={model['heads']} ({task})")
    return model


def trained_tasks(spec: DictConfig) -> list[str]:
    """lra.tasks, and lra.pretrain's task where there is one: every task a run trains on."""
    return as_list(spec.tasks) + ([spec.pretrain.task] if spec.pretrain else [])


def validate(cfg: DictConfig) -> None:
    spec = cfg.lra
    tasks = checks.choices("lra.tasks", spec.tasks, LRA_TASKS)
    attentions = checks.choices("lra.attention", spec.attention, ATTENTIONS)
    if spec.pretrain is not None:  # its task is checked as lra.tasks' are; the rest of it below
        if not isinstance(spec.pretrain, DictConfig) or sorted(spec.pretrain) != ["steps", "task"]:
            raise ConfigError(f"lra.pretrain={spec.pretrain!r} must be null or a mapping of exactly task (one of "
                              f"{list(PATH_SIZES)}) and steps (an integer >= 1), e.g. {{task: path64, steps: 1000}}; "
                              "another key would be ignored")
    trained = trained_tasks(spec)
    if spec.max_bytes is not None:
        checks.number("lra.max_bytes", spec.max_bytes, at_least=1)
        for task in set(tasks) & set(MAX_BYTES):  # the documents are stored cut there
            if spec.max_bytes > MAX_BYTES[task]:
                raise ConfigError(f"lra.max_bytes={spec.max_bytes} is above the {MAX_BYTES[task]} bytes a {task} "
                                  f"document is kept with (tasks/lra/data.py MAX_BYTES); the rest would be padding")
    checks.number("lra.seed", spec.seed, at_least=0)
    for key in ("n_train", "n_val", "batch", "listops_min_length"):
        checks.number(f"lra.{key}", spec[key], at_least=1)
    checks.number("lra.listops_max_length", spec.listops_max_length, at_least=spec.listops_min_length)
    for task in trained:
        if generator := generated(task, spec):  # what the generator would refuse once the run has started
            try:
                generator_params(*generator)
            except ValueError as exc:
                raise ConfigError(f"lra (task {task}): {exc}") from None
    TrainSpec.from_config(cfg.train)
    step = spec.batch * cfg.train.grad_accum
    if spec.micro_batch is not None and not isinstance(spec.micro_batch, DictConfig):
        raise ConfigError(f"lra.micro_batch={spec.micro_batch!r} must be a mapping of task to micro-batch, or null")
    for task in trained:
        micro = (spec.micro_batch or {}).get(task)
        if micro is None:
            continue
        checks.number(f"lra.micro_batch.{task}", micro, at_least=1)
        if micro < step and step % micro:
            raise ConfigError(f"lra.micro_batch.{task}={micro} must be null or a positive divisor of the {step} "
                              "examples of a step (lra.batch x train.grad_accum; a larger value leaves the step "
                              "whole), so that every example weighs the same")
    if spec.source not in ("fixture", "hub"):
        raise ConfigError(f"lra.source={spec.source!r} is not one of: fixture, hub")
    if spec.source == "hub":
        for task in tasks:
            check_hub_reachable(task)
    if spec.source == "hub" and "retrieval" in tasks:
        if spec.data_dir is None:
            raise ConfigError("lra.source=hub with the retrieval task reads LRA's AAN files, which are not on the hub: "
                              "download lra_release (https://storage.googleapis.com/long-range-arena/"
                              "lra_release.gz) and set lra.data_dir=<its tsv_data folder>")
        missing = [AAN_FILES[s] for s in ("train", *evaluated_splits("retrieval", spec))
                   if not (Path(spec.data_dir) / AAN_FILES[s]).is_file()]
        if missing:
            raise ConfigError(f"lra.data_dir={spec.data_dir!r} lacks {missing} (LRA's tsv_data folder holds them)")
    ours = [a for a in attentions if getattr(ATTENTIONS[a], "needs_triton", False)]
    for task in tasks:
        model = _check_model(spec, task)
        linformer_k = model.get("linformer_k", LINFORMER_K)
        if "linformer" in attentions and linformer_k > example_length(task, spec):
            raise ConfigError(f"lra.model.linformer_k={linformer_k} is above the {example_length(task, spec)} "
                              f"tokens of a {task} example: Linformer projects the keys to at most that many")
        head = model["dim"] // model["heads"]
        if ours and not MIN_HEAD_DIM <= head <= MAX_HEAD_DIM:
            raise ConfigError(f"lra.model: heads of {head} dimensions ({task}: dim={model['dim']}, "
                              f"heads={model['heads']}); {ours} take {MIN_HEAD_DIM} to {MAX_HEAD_DIM}")
    if spec.pretrain is not None:
        first = spec.pretrain.task
        if first not in PATH_SIZES or any(t not in PATH_SIZES for t in tasks):
            raise ConfigError(f"lra.pretrain.task={first!r}: pre-training grows a Pathfinder "
                              f"model's position table, so it and lra.tasks must be among {list(PATH_SIZES)}")
        smaller = [t for t in tasks if PATH_SIZES[t] < PATH_SIZES[first]]
        if smaller:
            side = PATH_SIZES[first]
            raise ConfigError(f"lra.pretrain.task={first!r} ({side}x{side}) is larger than lra.tasks' "
                              + ", ".join(f"{t!r} ({PATH_SIZES[t]}x{PATH_SIZES[t]})" for t in smaller)
                              + ": pre-training grows the position table to the task's image; pre-train on one no "
                              "larger (path64 for Path-X and Path-256)")
        if "linformer" in attentions:
            raise ConfigError("lra.pretrain cannot carry Linformer's length-bound projections to another length")
        checks.number("lra.pretrain.steps", spec.pretrain.steps, at_least=1)
        pretrain_spec(cfg)
        if cfg.train.parallel == "fsdp":
            raise ConfigError("lra.pretrain hands the pre-trained model itself to the next stage, which "
                              "train.parallel=fsdp would have sharded; use train.parallel=ddp")


def unread_keys(cfg: DictConfig) -> dict[str, str]:
    """The lra.* settings that the tasks (and the pre-training task) and attentions chosen never read, each with
    why: `repro.cli` refuses them on the command line, where they would be accepted and change nothing."""
    spec = cfg.lra
    tasks = trained_tasks(spec)
    attentions = as_list(spec.attention)
    chosen = f"lra.tasks={as_list(spec.tasks)}" + (f" (and lra.pretrain.task={spec.pretrain.task})"
                                                   if spec.pretrain else "")
    read_by_tasks = {"lra.difficulty": PATH_SIZES, "lra.listops_min_length": ["listops"],
                     "lra.listops_max_length": ["listops"], "lra.max_bytes": MAX_BYTES, "lra.source": DATA_TASKS,
                     **{f"lra.micro_batch.{task}": [task] for task in LRA_TASKS}}
    read_by_attentions = {"lra.model.linformer_k": ["linformer"], "lra.model.block_size": ["effrepro_sparse"]}
    unread = {**checks.unread_unless_chosen(read_by_tasks, tasks, chosen),
              **checks.unread_unless_chosen(read_by_attentions, attentions, f"lra.attention={attentions}")}
    if "retrieval" not in tasks or spec.source != "hub":
        unread["lra.data_dir"] = f"only Retrieval with lra.source=hub reads it ({chosen}, lra.source={spec.source})"
    if all(data_source(task, spec) == "hub" for task in tasks):
        # a hub split is read whole, and needs no seed
        unread.update(dict.fromkeys(["lra.n_train", "lra.n_val", "lra.seed"], (
            f"{chosen} reads every example from the hub (lra.source=hub): only generated tasks (listops, "
            f"{', '.join(PATH_SIZES)}) and fixtures (lra.source=fixture) read it")))
    return unread


def run(cfg: DictConfig, ctx: RunContext) -> Iterator[Row]:
    yield from train_from_config(cfg, candidates(cfg, ctx, Path(cfg.paths.cache) / "lra"), ctx.device,
                                 lambda rows: derived_rows(rows, as_list(cfg.lra.tasks)))
