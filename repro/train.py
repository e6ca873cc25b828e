"""One training loop for every task that trains a model: mixed precision, gradient accumulation, a warm-up then
cosine learning rate, periodic evaluation, throughput, checkpoints that survive a kill, and under torchrun
either DDP or FSDP (`train.parallel`).

A task supplies the model, a function giving the micro-batches of a step (a pure function of the step, the
rank and the world size, so a resumed run sees exactly the data it would have seen), and an evaluation
function; the loop yields run-record rows as it goes.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .context import ConfigError, world
from .records import Row, replace_atomically
from .timing import is_out_of_memory

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
OPTIMIZERS = ("adamw", "lamb")
PARALLEL = ("ddp", "fsdp")


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020, MLPerf BERT's optimizer): Adam's step, weight decay included, rescaled for each
    tensor by the trust ratio ‖w‖ / ‖step‖, so that large batches can take large learning rates."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                m, v, t = state["m"], state["v"], state["step"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + group["eps"])
                update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.add_(update * trust, alpha=-group["lr"])


@dataclass
class TrainSpec:
    steps: int
    lr: float
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_accum: int = 1  # accumulation steps: tasks draw this many batches per step (and may split them)
    grad_clip: float = 1.0
    precision: str = "bf16"
    optimizer: str = "adamw"  # or "lamb"
    eval_every: int = 0  # 0: only at the end
    log_every: int = 10
    timing_skip_steps: int = 2  # compile and autotune steps, left out of the throughput
    checkpoint_every_s: float = 300.0
    parallel: str = "ddp"  # several processes: ddp (replicas) or fsdp (parameters, gradients, optimizer sharded)

    @classmethod
    def from_config(cls, cfg) -> "TrainSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ConfigError(f"unknown train keys {sorted(unknown)}; known: {sorted(known)}")
        spec = cls(**{k: (tuple(v) if k == "betas" else v) for k, v in cfg.items()})
        if spec.precision not in PRECISIONS:
            raise ConfigError(f"train.precision={spec.precision!r} is not one of {list(PRECISIONS)}")
        if spec.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer={spec.optimizer!r} is not one of {list(OPTIMIZERS)}")
        if spec.parallel not in PARALLEL:
            raise ConfigError(f"train.parallel={spec.parallel!r} is not one of {list(PARALLEL)}")
        return spec


@dataclass
class Trainee:
    """What a task hands to `train`: a named model and how to feed and judge it."""

    name: str  # the provider name on every row (e.g. the attention implementation)
    model: torch.nn.Module
    batches: Callable[[int, int, int], list[dict]]  # (step, rank, world) -> this rank's micro-batches
    evaluate: Callable[[torch.nn.Module], dict[str, float]]  # -> metric name: value (rank 0; all under FSDP)
    tokens_per_step: int  # on one rank, over all its micro-batches
    flops_per_token: float  # forward + backward, for model TFLOP/s
    extra: dict = dataclasses.field(default_factory=dict)  # copied onto every row (series, seq_len, ...)
    fingerprint: str = ""  # what a checkpoint must match to be resumed (model and data settings)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The random stream of one rank's batches at one step: what makes `Trainee.batches` a pure function of
    (step, rank), so that a resumed run draws the data the unbroken one would have."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + rank)


def final_rows(rows: Iterable[Row], metric: str, by: str) -> dict[tuple[str, object], Row]:
    """The good rows of `metric`, keyed by (provider, the `by` extra): one per trainee, the last if several."""
    return {(r.provider, r.extra[by]): r for r in rows if r.metric == metric and r.status == "ok"}


def throughput_ratios(rows: list[Row], by: str, baseline: str, metric: str) -> Iterator[Row]:
    """Per value of the `by` extra (a sequence length, a task): each trainee's tokens/s over `baseline`'s."""
    tps = final_rows(rows, "tokens_per_s", by)
    for (provider, key), r in tps.items():
        base = tps.get((baseline, key))
        if base:
            yield Row(provider, by, key, metric, "x", r.p50 / base.p50, n=1, extra={**r.extra, "baseline": baseline})


def model_flops_per_token(model: torch.nn.Module, layers: int, width: int, seq_len: int) -> float:
    """Training FLOPs per token, the usual model-FLOPs count (PaLM appendix B): 6 per weight outside the
    embeddings, plus attention's 12·layers·width·seq_len (what standard attention computes; no discount for
    causal masking). A model whose embeddings are not `torch.nn.Embedding` says its own count through a
    `non_embedding_params()` method."""
    if hasattr(model, "non_embedding_params"):
        weights = model.non_embedding_params()
    else:
        embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
        weights = sum(p.numel() for p in model.parameters()) - embedding
    return 6 * weights + 12 * layers * width * seq_len


def init_distributed(device: torch.device) -> None:
    """Under torchrun, join the process group (NCCL on GPUs, gloo on CPUs) once per process."""
    rank, size = world()
    if size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * cosine)


def _load_checkpoint(path: Path, fingerprint: str):
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise ConfigError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); delete it to start "
                          "afresh, or set checkpoint.resume=false") from None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        found = state.get("fingerprint") if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"checkpoint {path} is from another model or setting ({found!r}, this run is "
                          f"{fingerprint!r}); delete it, or set checkpoint.resume=false")
    return state


def _shard(model: torch.nn.Module) -> None:
    """FSDP2: each layer of every ModuleList (a transformer's blocks) becomes a unit of its own, then the rest
    of the model one more; inner modules first, as fully_shard wants."""
    from torch.distributed.fsdp import fully_shard

    for module in reversed(list(model.modules())):
        if isinstance(module, torch.nn.ModuleList):
            for layer in module:
                fully_shard(layer)
    fully_shard(model)


def _full_state_options(**more):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **more)


def _get_state(model, optimizer, sharded: bool) -> tuple[dict, dict]:
    """The whole model's and optimizer's state, as one process holds it. Sharded, it is gathered: every rank
    must call this, and rank 0 receives the state (the others an empty dict)."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _full_state_options()
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def _set_state(model, optimizer, model_state: dict, optimizer_state: dict, sharded: bool) -> None:
    """Sharded, rank 0 holds the whole state and scatters it; the other ranks pass empty dicts."""
    if not sharded:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    options = _full_state_options(broadcast_from_rank0=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def _read_checkpoint(path: Path | None, fingerprint: str, rank: int, sharded: bool) -> dict | None:
    """The checkpoint to resume from, or None. Sharded, only rank 0 reads it (the others need not see its
    filesystem): every rank gets its verdict and the step, rows and scaler; only rank 0 gets the weights."""
    if not sharded:
        return _load_checkpoint(path, fingerprint) if path is not None and path.exists() else None
    state, error = None, None
    if rank == 0 and path is not None and path.exists():
        try:
            state = _load_checkpoint(path, fingerprint)
        except ConfigError as exc:
            error = str(exc)  # raised on every rank below, so that none waits for the others
    head = [None if state is None else {k: state[k] for k in ("step", "rows", "scaler")}, error]
    dist.broadcast_object_list(head, src=0)
    if head[1]:
        raise ConfigError(head[1])
    if head[0] is None:
        return None
    return {"model": {}, "optimizer": {}, **head[0], **(state or {})}


def train(trainee: Trainee, spec: TrainSpec, device: torch.device, checkpoint: Path | None,
          resume: bool = True, progress: bool = True) -> Iterator[Row]:
    """Train `trainee.model` for `spec.steps` optimizer steps and yield rows: loss and learning rate every
    `log_every` steps, evaluation metrics every `eval_every` steps and at the end, then throughput (tokens/s,
    model TFLOP/s, median over steps after `timing_skip_steps`) and peak memory.

    With `checkpoint` set, the state is saved there every `checkpoint_every_s` seconds and at the end
    (atomically, by rank 0); a run that finds a matching checkpoint resumes from it and re-yields the rows it
    had produced, so a kill loses at most one interval."""
    rank, size = world()
    model = trainee.model.to(device)
    sharded = size > 1 and spec.parallel == "fsdp"
    if sharded:
        _shard(model)  # before the optimizer is built: it must hold the sharded parameters
    dtype = PRECISIONS[spec.precision]
    if dtype is not None and device.type == "cpu":
        dtype = None  # CPU autocast in half precision is slow and not what any paper timed
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if spec.optimizer == "lamb":
        optimizer = Lamb(groups, lr=spec.lr, betas=spec.betas)
    else:
        optimizer = torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start, past_rows = 0, []
    state = _read_checkpoint(checkpoint, trainee.fingerprint, rank, sharded) if resume else None
    if state is not None:
        _set_state(model, optimizer, state["model"], state["optimizer"], sharded)
        scaler.load_state_dict(state["scaler"])
        start, past_rows = state["step"], [Row(**r) for r in state["rows"]]
        print(f"[train] {trainee.name}: resumed at step {start} from {checkpoint}", flush=True)
    yield from past_rows
    rows_so_far = list(past_rows)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if size > 1 and not sharded else model

    def reduce_gradients(now: bool):
        """Gradients are reduced across ranks only on the last micro-batch of a step."""
        if sharded:
            model.set_requires_gradient_sync(now)
        return wrapped.no_sync() if size > 1 and not sharded and not now else nullcontext()

    def row(metric, unit, value, step, **more):
        r = Row(trainee.name, "step", step, metric, unit, value, value, value, 1,
                extra={**trainee.extra, **more})
        rows_so_far.append(r)
        return r

    def save(step):
        if checkpoint is None:
            return
        model_state, optimizer_state = _get_state(model, optimizer, sharded)  # a collective when sharded
        if rank == 0:
            state = {"fingerprint": trainee.fingerprint, "step": step, "model": model_state,
                     "optimizer": optimizer_state, "scaler": scaler.state_dict(),
                     "rows": [dataclasses.asdict(r) for r in rows_so_far]}
            replace_atomically(checkpoint, lambda tmp: torch.save(state, tmp))

    def save_due() -> bool:
        if checkpoint is None:
            return False
        due = time.monotonic() - last_save > spec.checkpoint_every_s
        if sharded:  # gathering the state is a collective: every rank follows rank 0's clock
            flag = torch.tensor([int(due)], device=device)
            dist.broadcast(flag, 0)
            due = bool(flag.item())
        return due

    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step_times: list[float] = []
    last_save = time.monotonic()
    bar = tqdm(range(start, spec.steps), initial=start, total=spec.steps, desc=trainee.name,
               disable=None if progress and rank == 0 else True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, spec)
        model.train()
        sync()
        t0 = time.perf_counter()
        micro = trainee.batches(step, rank, size)
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with reduce_gradients(i == len(micro) - 1), autocast():
                loss = wrapped(**batch).loss / len(micro)
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sync()
        step_times.append(time.perf_counter() - t0)
        if size > 1:
            dist.all_reduce(loss_sum)  # gloo has no AVG
            loss_sum /= size
        done = step + 1
        if done % spec.log_every == 0 or done == spec.steps or done == 1:
            loss_value = loss_sum.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"{trainee.name}: loss is {loss_value} at step {done}")
            bar.set_postfix(loss=f"{loss_value:.3f}")
            yield row("loss", "nats", loss_value, done)
            yield row("lr", "", optimizer.param_groups[0]["lr"], done)
        if (spec.eval_every and done % spec.eval_every == 0) or done == spec.steps:
            model.eval()
            with torch.no_grad(), autocast():
                # sharded, every rank runs the forward passes (they gather the parameters); rank 0 reports
                metrics = trainee.evaluate(model) if rank == 0 or sharded else {}
            metrics = metrics if rank == 0 else {}
            for name, value in metrics.items():
                yield row(name, "", value, done)
        if save_due():
            save(done)
            last_save = time.monotonic()
    bar.close()
    summary = []
    timed = sorted(step_times[spec.timing_skip_steps:] or step_times)
    if timed:  # empty when resumed from a finished run: its summary is among the rows already yielded
        median_s = timed[len(timed) // 2]
        tokens = trainee.tokens_per_step * size
        tps = tokens / median_s
        summary = [row("tokens_per_s", "tokens/s", tps, spec.steps, timed_steps=len(timed), world_size=size),
                   row("model_tflops", "TFLOP/s", tps * trainee.flops_per_token / 1e12 / size, spec.steps),
                   row("step_time", "ms", median_s * 1e3, spec.steps)]
        if device.type == "cuda":
            summary.append(row("peak_memory", "MB", torch.cuda.max_memory_allocated(device) / 2**20, spec.steps))
    save(spec.steps)  # with the summary rows, so that a rerun of a finished run reproduces its record
    yield from summary


@dataclass
class Candidate:
    """A trainee not yet built: built only when its turn comes, so one model at a time holds memory."""

    name: str
    extra: dict
    build: Callable[[], Trainee]  # raises bench.Unsupported where it cannot run


def train_all(candidates: Iterable[Candidate], spec: TrainSpec, device: torch.device, checkpoint_dir: Path | None,
              resume: bool = True) -> Iterator[Row]:
    """Train each candidate in turn. One that runs out of memory, or that declares itself unsupported, becomes
    a row and the next one runs."""
    from .bench import Unsupported

    for candidate in candidates:
        def failed(status, message):
            return Row(candidate.name, "step", 0, "loss", "nats", status=status, message=message,
                       extra=dict(candidate.extra))
        try:
            trainee = candidate.build()
            ckpt = checkpoint_dir / f"{trainee.name}-{trainee.fingerprint}.pt" if checkpoint_dir else None
            yield from train(trainee, spec, device, ckpt, resume)
        except Unsupported as exc:
            yield failed("unsupported", str(exc))
        except Exception as exc:  # noqa: BLE001
            if not is_out_of_memory(exc):
                raise
            yield failed("oom", str(exc).splitlines()[0][:300])
        finally:
            trainee = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
