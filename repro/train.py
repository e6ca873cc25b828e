"""One training loop for every task that trains a model: mixed precision, gradient accumulation, a warm-up then
cosine learning rate, periodic evaluation, throughput, checkpoints that survive a kill, and under torchrun
either DDP or FSDP (`train.parallel`).

A task supplies the model, a function giving the micro-batches of a step (a pure function of the step, the
rank and the world size, so a resumed run sees exactly the data it would have seen), and an evaluation
function; the loop yields run-record rows as it goes. Only parameters that require gradients are optimised and
checkpointed: a soft prompt on a frozen language model checkpoints the prompt, and names the frozen weights by
their hash.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from . import checks
from .context import ConfigError, code_version, fingerprint, world
from .records import Row, replace_atomically
from .timing import free_device_memory, kernel_time_by_family, median_p20_p80

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
OPTIMIZERS = ("adamw", "lamb")
PARALLEL = ("ddp", "fsdp")
SCHEDULES = ("cosine", "linear", "rsqrt")
CHECKPOINT_VERSION = 2


class Job:
    """A job of the command line (`running_job`), named by its folder. The checkpoint of each run it finishes
    names it, and any later job reuses that run, rows included, until this one completed (`spend`): a job run
    again after a kill or an error (a SLURM job requeued into its own folder, or the same command in a new one)
    does not train again the candidates it had finished, while a new run after a completed one measures afresh.
    `dirty`: whether the job runs from a tree that differs from its commit (the record's git_dirty; None: not
    known, as for a tree without git): a finished run's rows are reused only where neither it nor the job that
    finished it ran from one, since the run's identity names the commit alone."""

    def __init__(self, folder: str | Path, dirty: bool | None = None):
        self.name, self.dirty = str(folder), dirty
        self.used: dict[Path, str | None] = {}  # the finished runs it trained or reused: checkpoint -> its job

    def spend(self) -> None:
        """The job completed (its record saved, its status ok): mark each finished run it trained or reused as
        spent, beside its checkpoint, naming the job that finished it (a later job may have trained it afresh
        since). Rank 0 alone, which wrote the checkpoints."""
        if world()[0] != 0:
            return
        for path, finisher in self.used.items():
            # a checkpoint deleted since (a trained model's cache removes its checkpoint folder) has nothing to
            # mark: its folder is not made again
            if finisher is not None and path.exists():
                replace_atomically(_spent_mark(path), lambda tmp, text=finisher: tmp.write_text(text))


def _spent_mark(checkpoint: Path) -> Path:
    # beside the checkpoint, not in it: marking it would rewrite its weights and optimizer state
    return checkpoint.with_name(checkpoint.name + ".spent")


_JOB: ContextVar[Job | None] = ContextVar("repro_job", default=None)


@contextmanager
def running_job(folder: str | Path, dirty: bool | None = None) -> Iterator[Job]:
    """Within it, training is `folder`'s job: the command line enters it for each job (a sweep runs its jobs in one
    process), and spends the job once it completed. Outside any (a library call), every run is a job of its own,
    completed when the run is."""
    job = Job(folder, dirty)
    token = _JOB.set(job)
    try:
        yield job
    finally:
        _JOB.reset(token)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020, MLPerf BERT's optimizer): Adam's step, weight decay included, rescaled for each
    tensor by the trust ratio ‖w‖ / ‖step‖, so that large batches can take large learning rates. The tensors of a
    group with trust_ratio=False take Adam's step as it is."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 trust_ratio: bool = True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      trust_ratio=trust_ratio))

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
                trust = 1.0
                if group["trust_ratio"]:
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
    # after the warm-up: cosine or linear down to min_lr_ratio · lr, or rsqrt: lr · sqrt(warmup / step) (LRA's)
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_accum: int = 1  # accumulation steps: tasks draw this many batches per step (and may split them)
    grad_clip: float = 1.0  # the largest norm of the gradients together; 0: no clipping
    precision: str = "bf16"
    optimizer: str = "adamw"  # or "lamb"
    eval_every: int = 0  # 0: only at the end
    log_every: int = 10
    timing_skip_steps: int = 2  # compile and autotune steps, left out of the throughput
    profile: bool = False  # on a GPU, the device time by kernel family of the last step left out of the timing
    checkpoint_every_s: float = 300.0
    parallel: str = "ddp"  # several processes: ddp (replicas) or fsdp (parameters, gradients, optimizer sharded)

    def __post_init__(self):
        # a spec made from another by dataclasses.replace (a candidate's or a stage's own steps) is checked too
        self.validate()

    @classmethod
    def from_config(cls, cfg) -> "TrainSpec":
        """The spec from a `train:` config block, every value checked before any work."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ConfigError(f"unknown train keys {sorted(unknown)}; known: {sorted(known)}")
        # a list of betas becomes the tuple torch takes; anything else stays as given, for validate to name
        return cls(**{k: (tuple(v) if k == "betas" and isinstance(v, Sequence) and not isinstance(v, str) else v)
                      for k, v in cfg.items()})

    def validate(self) -> None:
        for name in ("steps", "grad_accum", "log_every"):
            checks.number(f"train.{name}", getattr(self, name), at_least=1)
        for name in ("warmup_steps", "eval_every", "timing_skip_steps"):
            checks.number(f"train.{name}", getattr(self, name), at_least=0)
        # finite: an inf lr or weight decay would train on nan, an inf grad_clip never clip
        checks.number("train.lr", self.lr, integer=False, above=0, finite=True)
        for name in ("weight_decay", "grad_clip"):
            checks.number(f"train.{name}", getattr(self, name), integer=False, at_least=0, finite=True)
        # not finite: inf is allowed (no checkpoint but the last); number refuses nan, which would never save
        checks.number("train.checkpoint_every_s", self.checkpoint_every_s, integer=False, at_least=0)
        checks.number("train.min_lr_ratio", self.min_lr_ratio, integer=False, at_least=0, at_most=1, finite=True)
        checks.flag("train.profile", self.profile)
        pair = isinstance(self.betas, Sequence) and not isinstance(self.betas, str)
        if not pair or len(self.betas) != 2 or \
                not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            shown = list(self.betas) if pair else self.betas
            raise ConfigError(f"train.betas={shown!r} must be two numbers in [0, 1)")
        if self.profile and not 1 <= self.timing_skip_steps < self.steps:
            raise ConfigError(f"train.profile profiles the last untimed step, before the timed ones: "
                              f"train.timing_skip_steps={self.timing_skip_steps} must be between 1 and "
                              f"train.steps - 1 = {self.steps - 1}")
        for name, allowed in (("precision", PRECISIONS), ("optimizer", OPTIMIZERS), ("parallel", PARALLEL),
                              ("schedule", SCHEDULES)):
            checks.choice(f"train.{name}", getattr(self, name), allowed)


def unread_training_keys(cfg) -> dict[str, str]:
    """The settings of `cfg`'s training blocks (a task's `train`, a trained model's `model.train`) that its other
    settings leave unread, for `repro.cli.refuse_unread`."""
    unread = {}
    for block in ("train", "model.train"):
        schedule = OmegaConf.select(cfg, f"{block}.schedule")
        if schedule == "rsqrt":
            unread[f"{block}.min_lr_ratio"] = (
                f"{block}.schedule={schedule} decays the learning rate as lr·sqrt(warmup_steps / step), with no "
                "floor; min_lr_ratio is where the cosine and linear schedules end")
    return unread


@dataclass
class Trainee:
    """What a task hands to `train`: a named model and how to feed and judge it. After `train`, `model` holds
    the trained weights (what a next stage starts from)."""

    name: str  # the provider name on every row (e.g. the attention implementation)
    model: torch.nn.Module
    batches: Callable[[int, int, int], list[dict]]  # (step, rank, world) -> this rank's micro-batches
    evaluate: Callable[[torch.nn.Module], list[Row]]  # metric rows with units (their x is set to the step)
    tokens_per_step: int  # on one rank, over all its micro-batches
    flops_per_token: float  # forward + backward, for model TFLOP/s
    extra: dict = dataclasses.field(default_factory=dict)  # copied onto every row (series, seq_len, ...)
    fingerprint: str = ""  # the model and data settings; the loop adds the training settings, device and code


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The random stream of one rank's batches at one step: what makes `Trainee.batches` a pure function of
    (step, rank), so that a resumed run draws the data the unbroken one would have."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + rank)


def final_rows(rows: Iterable[Row], metric: str, by: str) -> dict[tuple[str, object], Row]:
    """The good rows of `metric`, keyed by (provider, the `by` extra): one per trainee, the last if several, and
    none of a trainee that failed (its `failure_row`): what it left, an evaluation before it ran out of memory or an
    earlier stage's throughput, is not its final model's."""
    rows = list(rows)
    failed = {(r.provider, r.extra.get(by)) for r in rows if r.status != "ok"}
    return {(r.provider, r.extra[by]): r for r in rows
            if r.metric == metric and r.status == "ok" and (r.provider, r.extra[by]) not in failed}


def throughput_ratios(rows: list[Row], by: str, baseline: str | Callable[[str], str | None], metric: str
                      ) -> Iterator[Row]:
    """Per value of the `by` extra (a sequence length, a task): each trainee's tokens/s over `baseline`'s (a
    trainee's name, or a function of each trainee's name giving its own baseline, or None for none)."""
    tps = final_rows(rows, "tokens_per_s", by)
    for (provider, key), r in tps.items():
        base_name = baseline(provider) if callable(baseline) else baseline
        base = tps.get((base_name, key))
        if base:
            yield Row(provider, by, key, metric, "x", r.p50 / base.p50, n=1, extra={**r.extra, "baseline": base_name})


def model_flops_per_token(model: torch.nn.Module, layers: int, width: int, seq_len: int, frozen: bool = False
                          ) -> float:
    """Training FLOPs per token, the usual model-FLOPs count (PaLM appendix B): 6 per weight outside the
    embeddings, plus attention's 12·layers·width·seq_len (what standard attention computes; no discount for
    causal masking). A token embedding tied to the output layer is that layer's weight too, a matrix product
    every token pays for: it counts (as nanoGPT's MFU counts it). A model this rule miscounts says its own count,
    the weights a token multiplies once each, through a `non_embedding_params()` method: where its embeddings
    are not `torch.nn.Embedding`, a token multiplies only top_k of its experts, a head runs once an example (it
    counts its share of the example's tokens) or attention's own count holds some parameters' products
    (Linformer's projections). One whose attention computes other than the seq_len² scores (Linformer's, a
    block-sparse one) says its own through `attention_flops_per_token(seq_len)`. `frozen`: the weights do not
    train (a prompt or adapters do), so a weight costs 4, its gradient never computed."""
    if hasattr(model, "non_embedding_params"):
        weights = model.non_embedding_params()
    else:
        multiplied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
        embedding = sum(m.weight.numel() for m in model.modules()
                        if isinstance(m, torch.nn.Embedding) and id(m.weight) not in multiplied)
        weights = sum(p.numel() for p in model.parameters()) - embedding
    attention = (model.attention_flops_per_token(seq_len) if hasattr(model, "attention_flops_per_token")
                 else 12 * layers * width * seq_len)
    return (4 if frozen else 6) * weights + attention


def _rng_state() -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def init_distributed(device: torch.device) -> None:
    """Under torchrun, join the process group (NCCL on GPUs, gloo on CPUs) once per process, on `device`: the
    rank's own GPU, which `resolve_device` chose and made current. `train_all` and `train` join it, so that every
    task that trains does."""
    rank, size = world()
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    if spec.schedule == "rsqrt":
        return spec.lr * math.sqrt(max(1, spec.warmup_steps) / max(1, step))
    progress = min(1.0, (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps))
    left = 0.5 * (1 + math.cos(math.pi * progress)) if spec.schedule == "cosine" else 1 - progress
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * left)


def _frozen_state(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The weights that do not train: parameters, and the saved buffers of modules none of whose own parameters
    train (a compressed layer holds its codes and scales as buffers)."""
    state = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
    for prefix, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        state += [(f"{prefix}.{name}".lstrip("."), b) for name, b in module.named_buffers(recurse=False)
                  if b is not None and name not in module._non_persistent_buffers_set]
    return state


def frozen_hash(model: torch.nn.Module) -> str:
    """A digest of the weights that do not train (a frozen base model), or "" when every weight trains."""
    digest = hashlib.sha256()
    frozen = _frozen_state(model)
    for name, p in frozen:
        digest.update(name.encode())
        digest.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12] if frozen else ""


def run_identity(trainee: Trainee, spec: TrainSpec, device: torch.device) -> str:
    """What a checkpoint must match to be resumed: everything that changes the numbers. The task's settings
    (model, data, seed), every training setting but the checkpoint interval, the frozen weights, the device and
    how many processes share the work, and the code's commit (edits not yet committed are not seen)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    settings = {k: v for k, v in dataclasses.asdict(spec).items() if k != "checkpoint_every_s"}
    return fingerprint(dict(version=CHECKPOINT_VERSION, task=trainee.fingerprint, train=settings,
                            frozen=frozen_hash(trainee.model), device=[device.type, gpu], world=world()[1],
                            code=code_version()))


def _shard(model: torch.nn.Module, device: torch.device) -> None:
    """FSDP2: each layer of every ModuleList (a transformer's blocks) becomes a unit of its own, then the rest
    of the model one more; inner modules first, as fully_shard wants."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # on the run's device: fully_shard's default mesh moves the shards to CUDA wherever CUDA exists, even for a
    # run on the CPU
    mesh = init_device_mesh(device.type, (world()[1],))
    for module in reversed(list(model.modules())):
        if isinstance(module, torch.nn.ModuleList):
            for layer in module:
                fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _state_options(**more):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **more)


class Checkpoint:
    """The saved state of one training run: its trainable weights, optimizer and scaler, the step, the rows
    so far, the run's identity and the job that ran it (`Job`). A finished run's checkpoint is marked so, and is
    reused, its rows as they were, until the job that finished it completed: then a rerun trains afresh and
    measures afresh (but for an earlier stage of a candidate, whose trained model is reused). Sharded (FSDP), the
    state is gathered to rank 0, which alone writes and reads the file and scatters what it read."""

    def __init__(self, path: Path | None, identity: str, job: Job | None, model, optimizer, scaler, sharded: bool):
        self.path, self.identity, self.job = path, identity, job
        self.model, self.optimizer, self.scaler, self.sharded = model, optimizer, scaler, sharded
        self.trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        self.partial = len(self.trainable) < sum(1 for _ in model.parameters())
        # whether any part of the run ran from a dirty tree: this job's, or a resumed one's (`resume`)
        self.dirty = bool(job and job.dirty)

    def _model_state(self) -> dict:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict
            state = get_model_state_dict(self.model, options=_state_options())
        else:
            state = self.model.state_dict()
        return {k: v for k, v in state.items() if k in self.trainable} if self.partial else state

    def _optimizer_state(self) -> dict:
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        return get_optimizer_state_dict(self.model, self.optimizer, options=_state_options())

    def save(self, step: int, rows: list[Row], finished: bool, timed: dict) -> None:
        if self.path is None:
            return
        model_state, optimizer_state = self._model_state(), self._optimizer_state()  # collectives when sharded
        if world()[0] == 0:
            job = self.job.name if self.job else None
            state = {"identity": self.identity, "job": job, "step": step, "finished": finished, "dirty": self.dirty,
                     "model": model_state, "optimizer": optimizer_state, "scaler": self.scaler.state_dict(),
                     "rows": [dataclasses.asdict(r) for r in rows], "timed": timed, "rng": _rng_state()}
            replace_atomically(self.path, lambda tmp: torch.save(state, tmp))
            if finished:
                # a marker left by an earlier job of the same name (a SLURM job requeued into its own folder) would
                # say this new run spent; removed after the write, so that a kill between them never leaves the old
                # run unmarked
                _spent_mark(self.path).unlink(missing_ok=True)
            if finished and self.job:
                self.job.used[self.path] = job

    def _read(self, finished: bool) -> dict | None:
        if self.path is None or not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            raise ConfigError(f"checkpoint {self.path} cannot be read ({type(exc).__name__}: {exc}); delete it to "
                              "start afresh, or set checkpoint.resume=false") from None
        if not isinstance(state, dict) or state.get("identity") != self.identity:
            found = state.get("identity") if isinstance(state, dict) else type(state).__name__
            raise ConfigError(f"checkpoint {self.path} is from another model, setting, device or code version "
                              f"({found!r}, this run is {self.identity!r}); delete it, or set checkpoint.resume=false")
        if state.get("finished") and (state.get("dirty") or self.dirty):
            print(f"[train] {self.path} is the checkpoint of a finished run: training afresh (it or this run is from "
                  "a tree with uncommitted edits, which its identity does not cover)", flush=True)
            return None
        if state.get("finished") and not finished and self._spent(state.get("job")):
            print(f"[train] {self.path} is the checkpoint of a finished run: training afresh (its job completed)",
                  flush=True)
            return None
        return state

    def _spent(self, job: str | None) -> bool:
        """Whether the job that finished the run completed (`Job.spend`); a run outside any job was a job of its
        own, completed with it."""
        if job is None:
            return True
        mark = _spent_mark(self.path)
        try:
            return mark.read_text() == job
        except FileNotFoundError:
            return False
        except (OSError, UnicodeDecodeError) as exc:
            # spent, rather than raised: read by rank 0 alone before its broadcast, an error would leave the other
            # ranks waiting; and training afresh never replays rows of a completed job
            print(f"[train] {mark} cannot be read ({type(exc).__name__}: {exc}): taken as spent", flush=True)
            return True

    def resume(self, finished: bool = False) -> tuple[int, list[Row], dict | None]:
        """Load the saved state into the model and optimizer; the step to go on from, the rows so far, and the
        times of the steps timed so far (`StepClock.timed`). A finished run's state only with `finished`, or
        where the job that finished it has not completed (`Job`)."""
        state, error = None, None
        if world()[0] == 0 or not self.sharded:
            try:
                state = self._read(finished)
            except ConfigError as exc:
                if not self.sharded:
                    raise
                error = str(exc)  # raised on every rank below, so that none waits for the others
        if self.sharded:
            head = [None if state is None else {k: state.get(k) for k in ("step", "rows", "scaler", "timed",
                                                                         "finished", "job", "dirty")}, error]
            dist.broadcast_object_list(head, src=0)
            if head[1]:
                raise ConfigError(head[1])
            if head[0] is None:
                return 0, [], None
            state = {"model": {}, "optimizer": {}, **head[0], **(state or {})}
        if state is None:
            return 0, [], None
        rows = [Row(**r) for r in state["rows"]]
        self.dirty = self.dirty or bool(state.get("dirty"))
        if state.get("finished"):
            if self.job:  # spent with this job
                self.job.used[self.path] = state.get("job")
            # the record shows which rows this job did not measure: those of the job that finished the run (a run
            # outside any job is named by its checkpoint)
            rows = [dataclasses.replace(r, extra={**r.extra, "reused_from": state.get("job") or str(self.path)})
                    for r in rows]
        self._load(state["model"], state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if world()[1] == 1 and state.get("rng"):
            # dropout goes on with the masks an unbroken run would draw. Several ranks each draw from a stream of
            # their own, which rank 0's checkpoint does not hold: `train` seeds theirs afresh from the step resumed
            # at, so a resumed run draws other masks than an unbroken one
            _set_rng_state(state["rng"])
        done = "reused the finished run" if state.get("finished") else f"resumed at step {state['step']}"
        print(f"[train] {done} from {self.path}", flush=True)
        return state["step"], rows, state["timed"]

    def _load(self, model_state: dict, optimizer_state: dict) -> None:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
            options = _state_options(broadcast_from_rank0=True, strict=not self.partial)
            set_model_state_dict(self.model, model_state, options=options)
            set_optimizer_state_dict(self.model, self.optimizer, optimizer_state, options=options)
            return
        missing, unexpected = self.model.load_state_dict(model_state, strict=False)
        if unexpected or (set(missing) & self.trainable) or (missing and not self.partial):
            raise ConfigError(f"checkpoint {self.path} does not fit the model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}; delete it, or set checkpoint.resume=false")
        self.optimizer.load_state_dict(optimizer_state)


def _optimizer(model: torch.nn.Module, spec: TrainSpec, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused on a GPU) or LAMB over the parameters that train; matrices decay, vectors do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no parameter that requires gradients: nothing to train")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": spec.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if spec.optimizer == "lamb":
        # MLPerf's BERT reference exempts biases and LayerNorm's weights from the trust ratio as from weight decay
        # (NVIDIA's FusedLAMB, every tensor that does not decay)
        groups[1]["trust_ratio"] = False
        return Lamb(groups, lr=spec.lr, betas=spec.betas)
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, fused=device.type == "cuda")


def _evaluation_rows(trainee: Trainee, model, step: int, sharded: bool, autocast) -> list[Row]:
    """The trainee's evaluation at `step`, as rows on the step axis. Sharded, every rank runs the forward
    passes (they gather the parameters); rank 0 alone reports."""
    rank = world()[0]
    model.eval()
    with torch.no_grad(), autocast():
        rows = trainee.evaluate(model) if rank == 0 or sharded else []
    return [dataclasses.replace(r, provider=trainee.name, x_name="step", x_value=step,
                                extra={**trainee.extra, **r.extra}) for r in rows] if rank == 0 else []


class StepClock:
    """The time of each step. On a GPU, from CUDA events around it and no synchronisation in between: the host
    runs ahead as in a training loop that is not timed, and a step in which the device waits for the host
    still counts the wait. Elsewhere, the wall clock. The host's own time per step (the wall clock from the
    step's first launch to its last) is kept too: where the step takes longer than its kernels (a profile's
    `kernel_time` rows) and the host's time equals it, the loop is bound by the host. (A device-bound loop can
    show equal times too, once the launch queue is full and the host waits in it.)

    The first `skip` steps of each process (compilation, autotuning) are not timed. A resumed run starts from
    the timed steps its checkpoint kept (`earlier`, what `timed()` returned when it was saved)."""

    def __init__(self, device: torch.device, skip: int, earlier: dict | None = None):
        self.cuda, self.skip = device.type == "cuda", skip
        self.pending: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self.device: list[float] = []
        self.host: list[float] = []
        self.earlier = earlier or {"step": [], "host": []}

    @contextmanager
    def step(self):
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if self.cuda else ()
        t0 = time.perf_counter()
        if events:
            events[0].record()
        yield
        if events:
            events[1].record()
            self.pending.append(events)
            self._settle(wait=False)
        self.host.append(time.perf_counter() - t0)

    def _settle(self, wait: bool):
        """Turn the steps the device has finished into seconds, so that events do not pile up over a long run."""
        while self.pending and (wait or self.pending[0][1].query()):
            start, end = self.pending.popleft()
            end.synchronize()
            self.device.append(start.elapsed_time(end) / 1e3)

    def timed(self) -> dict[str, list[float]]:
        """The seconds of the timed steps, the step's own (device events on a GPU, else the wall clock) and the
        host's."""
        if self.cuda:
            self._settle(wait=True)
        own = self.device if self.cuda else self.host
        return {"step": self.earlier["step"] + own[self.skip:], "host": self.earlier["host"] + self.host[self.skip:]}


def throughput_rows(trainee: Trainee, clock: StepClock, spec: TrainSpec, device: torch.device) -> list[Row]:
    """Tokens/s, model TFLOP/s and step time over the timed steps (median, with the 20th and 80th percentiles
    of the step times: a faster step is a higher rate), on a GPU the host's time per step, and the peak device
    memory. None where no step came after the untimed ones (`train.timing_skip_steps`): those times are
    compilation's, not the model's."""
    times = clock.timed()
    timed = times["step"]
    if not timed:
        print(f"[train] {trainee.name}: no throughput rows: no step ran after the {spec.timing_skip_steps} untimed "
              "ones (train.timing_skip_steps)", flush=True)
        return []
    p50, p20, p80 = median_p20_p80(timed)
    size = world()[1]
    tokens = trainee.tokens_per_step * size

    def rate(per_second: float, unit_scale: float = 1.0):
        return [per_second / s / unit_scale for s in (p50, p80, p20)]

    def row(metric, unit, values, **more):
        return Row(trainee.name, "step", spec.steps, metric, unit, *values, n=len(timed),
                   extra={**trainee.extra, **more})
    rows = [row("tokens_per_s", "tokens/s", rate(tokens), timed_steps=len(timed), world_size=size),
            row("model_tflops", "TFLOP/s", rate(tokens * trainee.flops_per_token / size, 1e12)),
            row("step_time", "ms", [s * 1e3 for s in (p50, p20, p80)])]
    if device.type == "cuda":
        host = median_p20_p80(times["host"])
        rows.append(row("host_time", "ms", [s * 1e3 for s in host]))
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        rows.append(Row(trainee.name, "step", spec.steps, "peak_memory", "MB", peak, n=1, extra=dict(trainee.extra)))
    return rows


class Parallel:
    """How the model is shared among the processes torchrun started: one process (nothing to share), DDP
    (replicas) or FSDP (shards). Built before the optimizer, which must hold the sharded parameters."""

    def __init__(self, model: torch.nn.Module, spec: TrainSpec, device: torch.device):
        self.model, self.device = model, device
        self.size = world()[1]
        self.sharded = self.size > 1 and spec.parallel == "fsdp"
        if self.sharded:
            _shard(model, device)
        self.replicated = self.size > 1 and not self.sharded

    def wrap(self) -> torch.nn.Module:
        """What the forward passes run through (DDP's wrapper reduces gradients in its backward)."""
        return torch.nn.parallel.DistributedDataParallel(self.model) if self.replicated else self.model

    def reduce_gradients(self, wrapped, now: bool):
        """Gradients are reduced across ranks only on the last micro-batch of a step."""
        if self.sharded:
            self.model.set_requires_gradient_sync(now)
        return wrapped.no_sync() if self.replicated and not now else nullcontext()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(value)  # gloo has no AVG
            value /= self.size
        return value

    def agree(self, flag: bool) -> bool:
        """Rank 0's verdict on every rank (a checkpoint gathered under FSDP is a collective: all must join)."""
        if not self.sharded:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(tensor, 0)
        return bool(tensor.item())


def _step(trainee: Trainee, step: int, parallel: Parallel, wrapped, optimizer, scaler, autocast, spec: TrainSpec):
    """One optimizer step over the trainee's micro-batches of `step`; the mean loss over ranks."""
    for group in optimizer.param_groups:
        group["lr"] = _lr_at(step, spec)
    micro = trainee.batches(step, world()[0], parallel.size)
    loss_sum = torch.zeros((), device=parallel.device)
    for i, batch in enumerate(micro):
        batch = {k: v.to(parallel.device, non_blocking=True) for k, v in batch.items()}
        with parallel.reduce_gradients(wrapped, i == len(micro) - 1), autocast():
            loss = wrapped(**batch).loss / len(micro)
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)
    if spec.grad_clip:  # clipping to 0 would zero every gradient: 0 means no clipping
        torch.nn.utils.clip_grad_norm_([p for p in parallel.model.parameters() if p.requires_grad], spec.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return parallel.mean(loss_sum)


def _finite_loss(name: str, loss: torch.Tensor, step: int) -> float:
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"{name}: loss is {value} at step {step}")
    return value


def train(trainee: Trainee, spec: TrainSpec, device: torch.device, checkpoint_dir: Path | None,
          resume: bool = True, progress: bool = True, reuse_finished: bool = False) -> Generator[Row, None, int]:
    """Train the trainable parameters of `trainee.model` for `spec.steps` optimizer steps and yield rows: loss
    and learning rate every `log_every` steps, evaluation every `eval_every` steps and at the end, then
    throughput and peak memory; with `spec.profile`, on a GPU, the device time by kernel family of the last
    untimed step (`kernel_time` rows).

    With `checkpoint_dir` set, the state is saved there (`<name>-<run identity>.pt`) every
    `checkpoint_every_s` seconds (under FSDP, at the first logged step after them: `log_every`) and at the end
    (atomically, by rank 0); a run that finds an unfinished checkpoint of its own identity resumes from it and
    re-yields the rows it had produced, so a kill loses at most one interval (and `log_every` steps). A finished
    checkpoint is loaded and its rows re-yielded too until the job that finished it completed (`Job`: a job run
    again after a kill does not train again what it had finished), or with `reuse_finished` (an earlier stage of a
    candidate, which a rerun need not train again). Returns the step this call went on from (`spec.steps` for a
    finished run reused): a caller that times the training times only the steps after it."""
    init_distributed(device)  # for a task that calls train itself, not through train_all
    model = trainee.model.to(device)
    identity = run_identity(trainee, spec, device)
    parallel = Parallel(model, spec, device)
    dtype = PRECISIONS[spec.precision]
    if dtype is not None and device.type == "cpu":
        dtype = None  # CPU autocast in half precision is slow and not what any paper timed
        print(f"[train] {trainee.name}: train.precision={spec.precision} runs in fp32 on the CPU", flush=True)
    # the rows say what ran, on every device, not what train.precision asked
    trainee.extra = {**trainee.extra, "precision": spec.precision if dtype is not None else "fp32"}
    optimizer = _optimizer(model, spec, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    checkpoint = Checkpoint(Path(checkpoint_dir) / f"{trainee.name}-{identity}.pt" if checkpoint_dir else None,
                            identity, _JOB.get(), model, optimizer, scaler, parallel.sharded)
    start, rows, timed = checkpoint.resume(reuse_finished) if resume else (0, [], None)
    yield from rows
    if start == spec.steps:  # a finished run, reused
        return start
    shared_rng = None
    if parallel.size > 1:
        # Every rank was seeded alike, for the same initial weights; but each GPU of a real run draws dropout masks
        # of its own. Each rank's stream (CPU and CUDA) mixes the seed, the step training starts at and the rank as
        # the batches' do (`step_generator`), its steps counted down from -1, clear of theirs; the seed cut to 32
        # bits, for the mix to fit in 64. The shared state comes back after training, so that what is built next
        # (another candidate, a later stage, unsharded under FSDP) is built alike on every rank again.
        shared_rng = _rng_state()
        torch.manual_seed(step_generator(torch.initial_seed() % 2**32, -1 - start, world()[0]).initial_seed())
    wrapped = parallel.wrap()
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
    clock = StepClock(device, spec.timing_skip_steps, timed)
    last_save = time.monotonic()
    bar = tqdm(range(start, spec.steps), initial=start, total=spec.steps, desc=trainee.name,
               disable=None if progress and world()[0] == 0 else True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in bar:
        model.train()

        def run_step():
            return _step(trainee, step, parallel, wrapped, optimizer, scaler, autocast, spec)
        with clock.step():
            if spec.profile and step == start + spec.timing_skip_steps - 1:
                loss, by_family = kernel_time_by_family(run_step, device)
            else:
                loss, by_family = run_step(), {}
        done = step + 1
        if device.type == "cuda" and done == start + spec.timing_skip_steps:  # autotuning's scratch is not the model's
            torch.cuda.reset_peak_memory_stats(device)
        new = [Row(trainee.name, "kernel_family", family, "kernel_time", "ms", ms, n=1,
                   extra={**trainee.extra, "step": done, "top_kernels": top})
               for family, (ms, top) in by_family.items()]
        logged = done % spec.log_every == 0 or done == spec.steps or done == 1
        if logged:
            loss_value = _finite_loss(trainee.name, loss, done)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            new += [Row(trainee.name, "step", done, metric, unit, value, n=1, extra=dict(trainee.extra))
                    for metric, unit, value in (("loss", "nats", loss_value),
                                                ("lr", "", optimizer.param_groups[0]["lr"]))]
        if (spec.eval_every and done % spec.eval_every == 0) or done == spec.steps:
            new += _evaluation_rows(trainee, model, done, parallel.sharded, autocast)
        rows += new
        yield from new
        due = checkpoint.path is not None and time.monotonic() - last_save > spec.checkpoint_every_s
        # Sharded, agreeing is a broadcast whose result the host reads, waiting for the device: at every step the
        # host could never queue the next (timed) step ahead. A logged step's loss read has waited already, and
        # every rank knows which steps are logged: they agree there alone
        if done < spec.steps and (logged or not parallel.sharded) and parallel.agree(due):
            # weights a nan or inf loss went through must not replace the last good checkpoint (a resumed run could
            # never pass them); the loss is the ranks' mean, so all raise alike, and the save waits for it anyway
            _finite_loss(trainee.name, loss, done)
            checkpoint.save(done, rows, finished=False, timed=clock.timed())
            last_save = time.monotonic()
    bar.close()
    if shared_rng is not None:
        _set_rng_state(shared_rng)
    summary = throughput_rows(trainee, clock, spec, device)
    rows += summary
    checkpoint.save(spec.steps, rows, finished=True, timed=clock.timed())
    yield from summary
    return start


@dataclass
class Stage:
    """A further stage of a candidate: built from the trained trainee of the stage before (a model grown to a
    longer sequence, a prompt trained on a compressed model), trained with its own spec (None: the run's)."""

    build: Callable[[Trainee], Trainee]
    spec: TrainSpec | None = None


@dataclass
class Candidate:
    """A trainee not yet built: built only when its turn comes, so one model at a time holds memory. Its
    `then` stages run after it, each from the model the one before trained."""

    name: str
    extra: dict
    build: Callable[[], Trainee]  # raises bench.Unsupported where it cannot run
    spec: TrainSpec | None = None  # None: the run's spec
    then: Sequence[Stage] = ()


def failure_row(name: str, extra: dict, exc: BaseException) -> Row | None:
    """A row for a trainee that could not run (unsupported, out of memory), or None for a real error."""
    from .bench import failure

    found = failure(exc)
    return None if found is None else Row(name, "step", 0, "loss", "nats", status=found[0], message=found[1],
                                          extra=dict(extra))


def train_from_config(cfg, candidates: Iterable[Candidate], device: torch.device,
                      derived: Callable[[list[Row]], Iterable[Row]] = lambda rows: ()) -> Iterator[Row]:
    """What a training task's `run` ends with: its candidates trained under the `train:` and `checkpoint:`
    config blocks, then the rows `derived` computes from all of theirs (speedups, averages)."""
    spec = TrainSpec.from_config(cfg.train)
    rows = []
    for row in train_all(candidates, spec, device, Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None,
                         cfg.checkpoint.resume):
        rows.append(row)
        yield row
    yield from derived(rows)


def train_all(candidates: Iterable[Candidate], spec: TrainSpec, device: torch.device, checkpoint_dir: Path | None,
              resume: bool = True) -> Iterator[Row]:
    """Train each candidate, and its stages, in turn. One that runs out of memory, or that declares itself
    unsupported, becomes a row and the next one runs; under torchrun, only one that its build declares unsupported
    (a failure in training ends the job)."""
    init_distributed(device)  # before any candidate is built: megatron-core's model takes its groups from it
    several = world()[1] > 1
    for candidate in candidates:
        trainee, failed, training = None, True, False
        try:
            stages = [(lambda _: candidate.build(), candidate.spec), *((s.build, s.spec) for s in candidate.then)]
            for i, (build, stage_spec) in enumerate(stages):
                trainee, training = build(trainee), True
                # a rerun after a kill in a later stage goes on from the earlier stages' trained models
                yield from train(trainee, stage_spec or spec, device, checkpoint_dir, resume,
                                 reuse_finished=i < len(stages) - 1)
                training = False
            failed = False
        except Exception as exc:  # noqa: BLE001
            row = failure_row(candidate.name, candidate.extra, exc)
            # Under torchrun a failure in training may be one rank's alone (rank 0 alone evaluates under DDP, one GPU
            # runs out of memory): a rank that went on to the next candidate would leave the others waiting in this
            # one's collectives, and no collective to agree on it has a place every rank is sure to reach. Raised,
            # it ends this rank, and torchrun ends the others; the record keeps the rows so far. A build declares a
            # candidate unsupported on every rank alike (from the settings, device type and software they share),
            # before any collective of its own: that stays a row.
            if row is None or (several and (training or row.status != "unsupported")):
                raise
            yield row
        finally:
            trainee = None
            free_device_memory(device, failed)
