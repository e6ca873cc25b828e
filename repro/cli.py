"""`repro`: run one experiment (or a sweep) by config name, write its run record, compare it with the paper.

    repro task=flash_kernel                      # smoke scale, on the CPU
    repro task=flash_kernel scale=small          # one GPU; the record lands in results/runs/
    repro paper=flashattention                   # all of a paper's tasks, as one multirun
    repro -m task=flash_kernel kernel.seq_len=1024,4096

Exit status: 0 when every job measured something; 2 for bad input (nothing is measured); 1 when a job failed
(a crash, every point it tried failed, or bad input found only after some points were measured); 128 + the signal
when stopped (130: Ctrl-C, 143: SIGTERM). A multirun runs every job whatever the others did, then lists them all
with their status and record.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import importlib
import itertools
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from . import checks
from .claims import claims_for_task, load_published
from .context import (PROJECT_ROOT, ConfigError, RunContext, capture_environment, check_device,
                      reset_device_memory, resolve_device, seed_everything, utc_now, world)
from .records import (FAILED_ROW_STATUSES, JOB_RECORD, RunRecord, committed_copy, load_record, save_new_record,
                      save_record, write_json_atomic)
from .report import console_table, evaluate
from .timing import is_out_of_memory
from .train import running_job, unread_training_keys
from .wandb_logger import WANDB_MODES, NullLogger, make_logger

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1

OmegaConf.register_new_resolver("repro_root", lambda: str(PROJECT_ROOT), replace=True)


class RunFailed(Exception):
    """A job ran but measured nothing: every point it tried failed."""


def load_task(spec: str) -> tuple[Callable, Callable | None, Callable | None]:
    """The task's `run` (`package.module:function`, as its config names it), and the module's `validate` and
    `unread_keys`, if it has them: checked before any work. `unread_keys(cfg)` gives the keys of `cfg` that the
    task, as `cfg` sets it up, never reads (dotted key -> why, and what to set instead)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr or "run"), getattr(module, "validate", None), getattr(module, "unread_keys", None)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"task.entry={spec!r} cannot be loaded: {exc}") from None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def record_paths(cfg, record: RunRecord, output_dir: Path, job_num: int | None) -> list[Path]:
    """The job folder's record, then, at scales whose records are committed, its copy under results/runs/."""
    paths = [output_dir / JOB_RECORD]
    if cfg["scale"]["commit_records"]:
        stamp = record.started.replace("-", "").replace(":", "").replace("+0000", "")[:15]
        name = f"{stamp}_{record.scale}_{_slug(record.gpu_name)}" + (f"_{job_num}" if job_num is not None else "")
        paths.append(Path(cfg["paths"]["records"]) / record.paper / record.task / f"{name}.json")
    return paths


def _outcome(record: RunRecord) -> None:
    """Set a finished run's status from its rows: a run that measured nothing, because every point failed,
    is a failure, not a success (a reference the points are read against, such as the copy bandwidth, is not a
    point)."""
    # (a row's `reference` may also name the provider it is compared with: only True marks a reference row)
    points = [r for r in record.rows if r.extra.get("reference") is not True]
    failed = [r for r in points if r.status in FAILED_ROW_STATUSES]
    if any(r.status == "ok" for r in points):
        record.status = "ok"
        return
    if not points:
        record.status, record.error = "error", "the task measured nothing (it yielded no rows)"
        return
    record.status = "oom" if failed and all(r.status == "oom" for r in failed) else "error"
    reasons = sorted({r.message.splitlines()[0][:120] for r in points if r.message})  # unsupported ones say why too
    record.error = (f"all {len(points)} points failed ({len(failed)} error or oom, "
                    f"{len(points) - len(failed)} unsupported)" + (f": {'; '.join(reasons[:3])}" if reasons else ""))


class _Saver:
    """Saves a running job's record at its first row (a job killed outright, out of host memory, keeps that
    much), then from a thread every `every_s` seconds in which rows came (at every row where `every_s` is 0): rows
    that came in a burst are on disk before a long stretch without any ends. What it saves is a copy taken as each
    row came, never the live record, which the task may be changing meanwhile (ctx.env, a row's extras)."""

    def __init__(self, path: Path, every_s: float):
        self.path, self.every_s = path, every_s
        self.rows: list[dict] = []  # only ever appended to: the thread reads the first n
        self.unsaved: tuple[dict, int] | None = None  # the record but its rows, and how many rows, at the last row
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="repro-record-saver", daemon=True)
        if every_s > 0:
            self.thread.start()

    def add(self, record: RunRecord) -> None:
        self.rows.append(dataclasses.asdict(record.rows[-1]))
        with self.lock:
            self.unsaved = dataclasses.replace(record, rows=[]).to_json(), len(self.rows)
            if len(self.rows) == 1 or self.every_s == 0:
                self._save()

    def close(self) -> None:
        """Stop the thread, waiting for a save under way: the final record, saved next (`_finish`), must not be
        replaced by an older copy."""
        with self.lock:  # no save begins after this, even where the join below is cut short (a signal)
            self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()

    def _save(self) -> None:
        head, n = self.unsaved
        write_json_atomic(self.path, {**head, "rows": self.rows[:n]})
        self.unsaved = None

    def _run(self) -> None:
        while not self.stopped.wait(self.every_s):
            with self.lock:
                if self.unsaved and not self.stopped.is_set():
                    try:
                        self._save()
                    except Exception as exc:  # noqa: BLE001 - tried again at the next tick; the final save,
                        # in the run's own thread, raises what still fails then
                        print(f"[repro] could not save the record of the run so far: {exc}", file=sys.stderr)


def _collect(entry, cfg, ctx, record: RunRecord, logger, checkpoint: Path | None, every_s: float) -> None:
    saver = _Saver(checkpoint, every_s) if checkpoint else None
    try:
        for row in entry(cfg, ctx):
            record.rows.append(row)
            logger.log_rows([row])
            if saver:
                saver.add(record)
    finally:
        if saver:
            saver.close()


def check_job(cfg: DictConfig, overrides: Sequence[str] = ()) -> Callable:
    """A job's own checks, the task's among them (a ConfigError naming the key), and of its `overrides` (the
    command line's), none of which may set a key the job never reads; returns the task's entry."""
    checks.number("record_every_s", cfg.record_every_s, integer=False, at_least=0, at_most=86400, finite=True)
    checks.number("seed", cfg.seed, at_least=0)
    checks.choice("logger.name", cfg.logger.name, ("wandb", "none"))
    if cfg.logger.name == "wandb":  # W&B failing never stops a run, but a mistyped setting is the user's to fix
        # logger.mode's default is WANDB_MODE's value, where that is set: a bad one is named as what the user set
        from_env = "oc.env:WANDB_MODE" in str(OmegaConf.to_container(cfg.logger)["mode"]) and "WANDB_MODE" in os.environ
        if from_env and cfg.logger.mode not in WANDB_MODES:
            raise ConfigError(f"WANDB_MODE={cfg.logger.mode!r} (in the environment, read as logger.mode) is not one of "
                              f"{list(WANDB_MODES)}: set it to one of those, or give logger.mode=<mode>")
        checks.choice("logger.mode", cfg.logger.mode, WANDB_MODES)
        checks.number("logger.init_timeout_s", cfg.logger.init_timeout_s, integer=False, at_least=1)
    entry, validate, task_unread_keys = load_task(cfg.task.entry)
    if validate is not None:
        validate(cfg)
    unread = {**unread_training_keys(cfg), **(task_unread_keys(cfg) if task_unread_keys else {})}
    refuse_unread(overrides, unread)
    return entry


class UnreadKey(ConfigError):
    """`refuse_unread`'s refusal: `given` (an override, as the command line gives it) sets `key`, which the job
    never reads."""

    def __init__(self, message: str, key: str, given: str):
        super().__init__(message)
        self.key, self.given = key, given


def refuse_unread(overrides: Sequence[str], unread: dict[str, str]) -> None:
    """Refuse an override that sets a key of `unread` (key -> why nothing reads it), or one inside it: the job
    would accept it and run as if it were not given. A null, or a key removed (`~key`), sets nothing: let be."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if o.is_delete():
            continue
        for key, value in _leaves(o.key_or_group, o.value()):
            hit = next((k for k in unread if key == k or key.startswith(k + ".")), None)
            if hit is not None and value is not None:
                raise UnreadKey(f"{key}={value!r} would have no effect: {unread[hit]}", key, o.input_line)


def _leaves(key: str, value: Any) -> list[tuple[str, Any]]:
    """The dotted keys an override's value sets, with their values (a mapping's each)."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(f"{key}.{k}", v)]
    return [(key, value)]


def _start(cfg: DictConfig, record: RunRecord, output_dir: Path):
    """Check the config and prepare the job, before any work: the task's code, its context and the logger."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    device = resolve_device(cfg.scale)
    entry = check_job(cfg, hc.overrides.task)
    # found unwritable at the end, the run's work would be lost with the error (the folder is made then)
    why = cfg.scale.commit_records and cannot_make(Path(cfg.paths.records).absolute())
    if why:
        raise ConfigError(f"paths.records={str(cfg.paths.records)!r} is not a folder this run can write its record "
                          f"in ({why})")
    # a training task's checkpoints (repro.train): found unwritable at the first save, the training so far is lost
    checkpoints = OmegaConf.select(cfg, "checkpoint.dir")
    why = checkpoints and cannot_make(Path(str(checkpoints)).absolute())
    if why:
        raise ConfigError(f"checkpoint.dir={str(checkpoints)!r} is not a folder this run can save its checkpoints "
                          f"in ({why}); checkpoint.dir=null saves none")
    record.claim_ids = [c.id for c in claims_for_task(load_published(Path(cfg.paths.published)), cfg.task.name)]
    seed_everything(cfg.seed)
    reset_device_memory(device)
    ctx = RunContext(device=device, scale=cfg.scale.name, seed=cfg.seed, output_dir=output_dir, env=record.env)
    logger = make_logger(
        cfg.logger, name=f"{cfg.task.name}-{cfg.scale.name}" + (f"-{hc.job.override_dirname}" if multirun else ""),
        group=f"{hc.runtime.choices.get('paper') or cfg.task.name}-{Path(hc.sweep.dir).name}" if multirun else None,
        job_type=cfg.scale.name, config=record.config, output_dir=output_dir)
    print(f"[repro] {cfg.task.name} at scale={cfg.scale.name} on {device} "
          f"({ctx.env['gpu_name'] or 'CPU'}); output: {output_dir}", flush=True)
    return entry, ctx, logger


def run_job(cfg: DictConfig) -> RunRecord:
    """One job: check the config, run the task, write its record (every few seconds while it runs, and at the
    end whatever happened), then print its claims table."""
    hc = HydraConfig.get()
    if os.environ.get("SUBMITIT_EXECUTOR"):
        tasks = int(os.environ.get("SUBMITIT_LOCAL_NTASKS") or os.environ.get("SLURM_NTASKS") or 1)
        if tasks > 1 and "RANK" not in os.environ:
            raise ConfigError(f"hydra.launcher.tasks_per_node={tasks} starts {tasks} copies of the job that do not "
                              "know of each other (each measuring alone and writing the same record); give each job "
                              "one task, and run torchrun inside it for several GPUs")
        stop_after_submitit_signal()
    output_dir = Path(hc.runtime.output_dir)
    record = RunRecord(task=cfg.task.name, paper=cfg.task.paper, scale=cfg.scale.name, claim_ids=[],
                       config=OmegaConf.to_container(cfg, resolve=True), overrides=list(hc.overrides.task),
                       env=capture_environment(on_gpu=cfg.scale.device != "cpu", records=Path(cfg.paths.records)),
                       started=utc_now())
    paths = record_paths(cfg, record, output_dir, hc.job.num if hc.mode == RunMode.MULTIRUN else None)
    if world()[0] != 0:  # under torchrun, rank 0 alone writes records and logs
        paths, cfg = [], OmegaConf.merge(cfg, {"logger": {"name": "none"}})
    if paths:
        claim_folder(output_dir, given=any(o.startswith(("hydra.run.dir=", "hydra.sweep.dir="))
                                           for o in hc.overrides.hydra))
    logger = NullLogger()
    try:
        entry, ctx, logger = _start(cfg, record, output_dir)
        # run again after a kill, the job (or a new one) reuses the training runs it finished (repro.train.Job)
        with running_job(output_dir, dirty=record.env.get("git_dirty")) as job:
            _collect(entry, cfg, ctx, record, logger, paths[0] if paths else None, cfg.record_every_s)
        _outcome(record)
    except ConfigError as exc:
        record.status, record.error = "error", str(exc)
        if record.rows:  # found after points were measured: a failed run, whose rows are kept and committed
            raise RunFailed(str(exc)) from None
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (see main): the rows so far are kept, marked as such
        record.status, record.error = "killed", str(exc) or CTRL_C
        if isinstance(exc, SubmititStop):  # once the record is written (finally), what submitit meant to happen
            raise exc.original from None
        raise
    except Exception as exc:
        record.status = "oom" if is_out_of_memory(exc) else "error"
        record.error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        _finish(record, paths, logger)
    if record.status != "ok":
        raise RunFailed(record.error)
    job.spend()  # completed, its record saved: a later run trains and measures afresh what this job used
    claims = claims_for_task(load_published(Path(cfg.paths.published)), cfg.task.name)
    if claims and paths:
        note = ("\n(a smoke run checks the mechanics at sizes no claim is stated at, so its claims mostly read\n"
                " 'not yet run'; repro-report judges them from the committed small and paper records)") \
            if record.scale == "smoke" else ""
        print("\n" + console_table([evaluate(c, [(paths[-1], record)]) for c in claims]) + note + "\n", flush=True)
    elif paths:
        print(f"[repro] {cfg.task.name} has no published claims to compare with", flush=True)
    return record


def cannot_make(folder: Path) -> str | None:
    """Why `folder` cannot be made, or written in where it exists; None if it can. The first missing part is made
    and removed: root passes os.access where the file system still refuses (/proc)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file"
    if existing == folder:
        return None if os.access(folder, os.W_OK | os.X_OK) else f"{folder} is not writable"
    probe = existing / folder.relative_to(existing).parts[0]
    try:
        probe.mkdir()
    except FileExistsError:  # another rank's probe, or Hydra making it now: it can be made
        return None
    except OSError as exc:
        return f"{probe} cannot be made: {exc.strerror}"
    with contextlib.suppress(OSError):  # another process may be writing in it already
        probe.rmdir()
    return None


def _slurm_job() -> str | None:
    """The SLURM job (and array task) this process is, which a job folder it took names; None outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm job {job} {os.environ.get('SLURM_ARRAY_TASK_ID', '')}" if job else None


JOB_MARK = ".repro_job"  # in a job folder: which job took it (`claim_folder`)


def _own_mark(mark: Path) -> bool:
    """The job mark is this SLURM job's: requeued after a preemption, it takes its own folder back."""
    return mark.read_text() == _slurm_job()


def claim_folder(output_dir: Path, given: bool = False) -> None:
    """Take the job folder for this job alone, before anything is written there: folders are named by the second,
    so two runs (or sweeps) started in one second get one folder, and the second's record would overwrite the
    first's; a folder `given` on the command line (hydra.run.dir, hydra.sweep.dir) may hold an earlier run. A
    SLURM job requeued after a preemption (the same job id) takes its own folder back."""
    marker = output_dir / JOB_MARK
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        taken = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if _own_mark(marker):
            os.utime(marker)  # newer than the multirun's start, as a sweep's summary checks
            return
        if given:
            raise ConfigError(f"{output_dir} holds an earlier run, whose record is left as it is: give this one a "
                              "new folder (hydra.run.dir, hydra.sweep.dir for a sweep)") from None
        raise ConfigError(f"{output_dir} is another job's folder (another run started in the same second); start "
                          "this one again (a new folder), or give it one with hydra.run.dir (hydra.sweep.dir for a "
                          "sweep)") from None
    with os.fdopen(taken, "w") as f:
        f.write(_slurm_job() or f"{socket.gethostname()} pid {os.getpid()}")


def _finish(record: RunRecord, paths: list[Path], logger) -> None:
    """Save the record in the job's folder and, where it is committed and has rows, under results/runs/ in a name
    of its own (`paths[-1]` becomes the name it took)."""
    record.finished = utc_now()
    if paths:
        save_record(record, paths[0])
    if len(paths) > 1 and not record.rows:  # measured nothing (stopped or crashed first): no record to commit
        del paths[1:]
    if len(paths) > 1:
        paths[-1] = save_new_record(record, paths[-1])
    try:
        logger.finish(record.status)
    except Exception as exc:  # noqa: BLE001 - W&B must never stop a run
        print(f"[repro] W&B did not finish cleanly: {exc}", file=sys.stderr)
    if paths and (record.rows or record.status != "error"):
        _report_rows(record, paths)


def _report_rows(record: RunRecord, paths: list[Path]) -> None:
    failed = sum(r.status in FAILED_ROW_STATUSES for r in record.rows)
    unsupported = [r for r in record.rows if r.status == "unsupported"]  # never tried: the machine lacks something
    notes = [f"{failed} of {len(record.rows)} rows failed: error or oom"] if failed else []
    if unsupported:
        why = (unsupported[0].message.splitlines() or ["no reason given"])[0][:120]
        notes.append(f"{len(unsupported)} unsupported, e.g. {why}")
    note = f" ({'; '.join(notes)})" if notes else ""
    print(f"[repro] {record.status}: {len(record.rows)} rows{note} -> " + ", ".join(map(str, paths)), flush=True)


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    """A single run exits with the job's status. In a multirun a failed job is reported and the next one
    runs; `SweepSummary` lists them all at the end."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        run_job(cfg)
    except ConfigError as exc:
        print(f"repro: error: {exc}", file=sys.stderr)
        if not multirun:
            sys.exit(EXIT_BAD_INPUT)
    except RunFailed as exc:
        print(f"repro: failed: {exc}", file=sys.stderr)
        if not multirun:
            sys.exit(EXIT_FAILED)
    except Stopped as exc:
        # a submitit job is a process of its own, stopped alone (scancel, its time limit): it ends as a failed job
        # does, its record saying killed, and the launcher collects the other jobs' results
        if not (multirun and os.environ.get("SUBMITIT_EXECUTOR")):
            raise
        print(f"repro: {exc}; the record keeps the rows measured so far", file=sys.stderr)
    except Exception:  # noqa: BLE001 - the record holds the error; a sweep goes on
        if not multirun:
            raise
        traceback.print_exc()


class SweepSummary(Callback):
    """At the end of a multirun, under any launcher: each job with its status and records, read back from
    the job folders (jobs run by submitit print to their own logs, not to this console). Under torchrun, rank 0
    alone: it writes the records, and another rank could look before the last one is written."""

    failed = False
    running: DictConfig | None = None  # the multirun under way, for a summary of the jobs begun when it is stopped

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        SweepSummary.failed, SweepSummary.running = False, config

    def on_multirun_end(self, config: DictConfig, stopped: bool = False, **kwargs) -> None:
        SweepSummary.running = None
        if world()[0] != 0:
            return
        sweep = Path(config.hydra.sweep.dir)
        # Each job's folder holds Hydra's own account of it, whatever hydra.sweep.subdir names the folder, written
        # as the job starts: this multirun's jobs wrote theirs since it began (multirun.yaml), and the folders an
        # earlier multirun left in the sweep folder are not listed. File times are compared, not clocks: a job may
        # run on another machine (SLURM), and the files are on one file system.
        try:
            began = (sweep / "multirun.yaml").stat().st_mtime
        except FileNotFoundError:  # stopped before Hydra began the sweep
            began = math.inf
        accounts = {p.parent.parent: OmegaConf.load(p).hydra for p in sweep.glob("**/.hydra/hydra.yaml")
                    if p.stat().st_mtime >= began}
        jobs = sorted(accounts, key=lambda job: accounts[job].job.num)
        # the folders are numbered: each line names the settings its job does not share with every other
        given = {job: list(accounts[job].overrides.task) for job in jobs}
        shared = set.intersection(*map(set, given.values())) if jobs else set()
        swept = {job: " ".join(o for o in given[job] if o not in shared) for job in jobs}
        width = max((len(s) + 1 for s in swept.values() if s), default=0)
        lines, not_ok = [], 0
        for job in jobs:
            status, text = _job_outcome(job, accounts[job].job.num, began)
            not_ok += status != "ok"
            lines.append(f"  {job.relative_to(sweep).as_posix():28} {status:8} {swept[job]:{width}}{text}")
        SweepSummary.failed = not_ok > 0
        begun = f"stopped after {len(jobs)} jobs begun (those not begun are not listed)" if stopped else \
            f"multirun of {len(jobs)} jobs"
        print(f"\n[repro] {begun}, {not_ok} not ok ({_rel(sweep)}):\n" + "\n".join(lines) + "\n", flush=True)


def _job_outcome(job: Path, number: int, began: float) -> tuple[str, str]:
    """A sweep job's status, and the summary's words about it, from its folder; `began`: the time of the
    multirun's own file. A folder taken (`claim_folder`) before the multirun began is an earlier run's: this job
    was refused there. (Not the time of Hydra's account of the job: under torchrun every rank rewrites it, rank 0
    alone takes the folder.)"""
    marker = job / JOB_MARK
    if marker.exists() and marker.stat().st_mtime < began:
        return "refused", ("its folder was an earlier job's, whose record it left as it was: it ran nothing (give the "
                           "sweep a new hydra.sweep.dir)")
    try:
        record = load_record(job / JOB_RECORD)
    except (OSError, ValueError):
        return "missing", f"no record: it stopped before its run began (see {_rel(job)})"
    committed = committed_copy(record, record_paths(record.config, record, job, number)[-1])
    where = committed if record.status != "error" and committed else job / JOB_RECORD
    why = f"  ({record.error.splitlines()[0][:100]})" if record.error else \
        "  (saved while it ran: it was killed outright, or runs on)" if record.status == "running" else ""
    return record.status, f"{len(record.rows):5} rows  {_rel(where)}{why}"


def _rel(path: Path) -> str:
    """`path` as the user would type it here (relative to the current folder); report.py's `_rel` is relative to
    the project, as the report's links are."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _kind(value) -> str:
    return "a boolean" if isinstance(value, bool) else "a number" if isinstance(value, (int, float)) else \
        "a string" if isinstance(value, str) else type(value).__name__


def _fits(value, default) -> bool:
    """Whether an override `value` has the kind of the config's `default`: a number where a number is (the
    task's own checks say which numbers), a string where a string is. A key whose default is one value may take
    a list of them (a grid axis)."""
    if value is None or default is None or (isinstance(value, str) and value.startswith("${")):
        return True
    if isinstance(default, (list, tuple)):
        if isinstance(value, dict):  # not one value of the list: Hydra cannot merge a mapping into a list
            return False
        return not default or all(_fits(v, default[0]) for v in (value if isinstance(value, list) else [value]))
    if isinstance(value, list):
        return all(_fits(v, default) for v in value)
    if isinstance(default, dict):
        return isinstance(value, dict)
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


# Hydra's options that take the next argument as their value (`--cfg job`; `--info`'s is optional): not overrides
HYDRA_OPTIONS_WITH_VALUES = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                             "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}


# Hydra's options that print something instead of running the jobs: a GPU scale's config may be read anywhere
HYDRA_OPTIONS_THAT_RUN_NOTHING = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--resolve",
                                  "--shell-completion", "-sc"}


def check_overrides(args: list[str]) -> str | None:
    """Name a bad override before Hydra runs: an unknown config-group option (task=, scale=, ...) with the known
    ones, an unknown key (with the known ones, which Hydra does not list) or a value whose type differs from the
    key's default; then overrides on both sides of an option (`task=x --cfg job scale=small`)."""
    is_option = [arg.startswith("-") or (before in HYDRA_OPTIONS_WITH_VALUES and "=" not in arg)
                 for before, arg in zip([""] + args, args)]
    problem = _override_problem(args, is_option)
    at = [i for i, option in enumerate(is_option) if not option]
    split = next((i for i in range(at[0], at[-1]) if is_option[i]), None) if at else None
    if problem is not None or split is None:
        return problem
    # Hydra's argparse takes the overrides as one run of arguments, and stops at the rest with "unrecognized
    # arguments", naming no reason. Before the options, not after: --info's value is optional, and it would take
    # the first override for one ("invalid choice")
    later = next(i for i in at if i > split)
    grouped = [args[i] for i in at] + [arg for arg, option in zip(args, is_option) if option]
    return (f"{args[later]!r} comes after {args[split]}, which follows other overrides: give the overrides "
            f"together, before the options, e.g. repro {shlex.join(grouped)}")


def _override_problem(args: list[str], is_option: list[bool]) -> str | None:
    """`check_overrides`' checks of what the overrides say; `is_option`: which of `args` are Hydra's options or
    their values."""
    from hydra import initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import MissingConfigException

    parser, overrides = OverridesParser.create(), []
    for arg, option in zip(args, is_option):
        if option:
            continue
        try:
            overrides += parser.parse_overrides([arg])
        except Exception as exc:  # noqa: BLE001 - Hydra's grammar error, with the argument it is about
            reason = str(exc).strip().splitlines()[0]
            if "=" not in arg:
                return (f"cannot read {arg!r}: an override is key=value, e.g. task=flash_kernel or scale=small "
                        "(repro --help lists the groups)")
            return (f"cannot read the override {arg!r} ({reason}); quote a value with characters such as ~ or "
                    f"spaces in it, e.g. \"data.folder='~/my texts'\"")
    options = {arg.split("=")[0] for arg in args if arg.startswith("-")}  # `--cfg job` and `--cfg=job`
    multirun = _multirun(options, overrides)
    paper = next((o for o in overrides if o.key_or_group == "paper" and o.value() is not None), None)
    if paper is not None and not multirun:  # Hydra would run the paper's first task alone, as if it were the paper
        return (f"{paper.input_line!r} runs the paper's tasks as a sweep, and hydra.mode=RUN runs one job: drop "
                f"hydra.mode=RUN, or run one task with task=<name>")
    if not multirun:
        swept = next((o for o in overrides if o.is_sweep_override()), None)
        if swept is not None:  # Hydra's refusal would exit 1, as a failed run does
            return (f"{swept.input_line!r} sweeps {swept.key_or_group} over several values: add -m (repro -m ...) to "
                    f"run a job for each, or give a list in brackets where the key takes one, e.g. "
                    f"{swept.key_or_group}=[{','.join(map(str, swept.sweep_string_iterator()))}]")
    conf = PROJECT_ROOT / "conf"
    groups = [o for o in overrides if (conf / o.key_or_group).is_dir() or o.key_or_group.startswith("hydra")]
    for o in groups:
        if o.key_or_group == "paper" and o.is_sweep_override():  # Hydra ran the default task once per paper
            try:
                papers = "; ".join(f"repro paper={p} ..." for p in o.sweep_string_iterator())
            except Exception:  # noqa: BLE001 - glob(...) and range(...) need Hydra's loader, not run yet
                papers = "repro paper=<name> ..."
            return (f"{o.input_line!r}: a paper is a sweep of its own tasks, and papers are not swept; run one "
                    "paper= at a time: " + papers)
        # Hydra's would be a traceback (for a null: "Config group override must be a string or a list")
        if (o.is_delete() or o.value() is None) and not o.key_or_group.startswith("hydra"):
            names = sorted(p.stem for p in (conf / o.key_or_group).glob("*.yaml"))
            given, done = (f"~{o.key_or_group}", "removed") if o.is_delete() else (o.input_line, "set to null")
            return (f"{given}: a config group is not {done}; choose one with {o.key_or_group}=<name> "
                    f"({', '.join(names)}), or leave {o.key_or_group} out for its default")
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
            jobs = _jobs(conf, [o for o in groups if not o.key_or_group.startswith("hydra")])
            unused = _unused_model(conf, jobs)
    except MissingConfigException as exc:
        if exc.options and exc.missing_cfg_file:  # e.g. task/nosuch
            group, _, choice = exc.missing_cfg_file.rpartition("/")
            return f"{group}={choice!r} is not one of {sorted(exc.options)}"
        return None
    except Exception:  # noqa: BLE001 - anything else about the groups: Hydra's own message is the right one
        return None
    if unused:
        return unused
    for choices, cfg, _ in jobs:  # task= would quietly replace the paper's own tasks
        chosen = dict(c.split("=", 1) for c in choices if "=" in c)
        swept_tasks = OmegaConf.select(cfg, "hydra.sweeper.params.task")  # in the paper's own config alone
        paper_tasks = [t.strip() for t in str(swept_tasks).split(",")]
        if "paper" in chosen and "task" in chosen and swept_tasks and chosen["task"] not in paper_tasks:
            return (f"task={chosen['task']} is not a task of paper={chosen['paper']} (its tasks: "
                    f"{', '.join(paper_tasks)}): name one of those, or leave paper= out to run task={chosen['task']}")
    keys = [o for o in overrides if o not in groups and not (o.is_add() or o.is_force_add())]
    added = [o for o in overrides if (o.is_add() or o.is_force_add()) and o not in groups]
    for choices, cfg, swept in jobs:
        error = None if swept else _added_where_nothing_reads(cfg, added)  # a paper's own config: its jobs follow
        if error:
            return error + (f" (in the job of {' '.join(choices)})" if len(jobs) > 1 else "")
    for choices, cfg, swept in jobs:
        error = _bad_value(cfg, keys)
        if error and swept:  # Hydra applies the overrides to a paper's own config, before its sweep's jobs
            groups_named = {o.key_or_group.split(".")[0] for o in keys}
            tasks = ",".join(c.split("=", 1)[1] for ch, job, sw in jobs if not sw for c in ch
                             if c.startswith("task=") and groups_named <= set(job.keys())) \
                or ",".join(swept.get("task", []))
            sweep = " ".join(f"{k}={','.join(values)}" for k, values in swept.items())
            return (f"{error}. {' '.join(choices)} sweeps {sweep}, and "
                    "takes only keys every config has" + (f"; for a task's own keys: repro -m task={tasks} ..."
                                                          if tasks else ""))
        if error and any(c.startswith("paper=") for c in choices):  # a key some of the paper's tasks have
            takers = [c.split("=", 1)[1] for ch, job, sw in jobs if not sw for c in ch
                      if c.startswith("task=") and not _bad_value(job, keys)]
            return (f"{error} (in the job of {' '.join(choices)}; a paper gives every key to each of its tasks" +
                    (f": run the ones that take it alone, e.g. repro -m task={','.join(takers)} ...)" if takers
                     else ")"))
        if error:
            return error + (f" (in the job of {' '.join(choices)})" if len(jobs) > 1 else "")
    if multirun and options & {"--cfg", "-c"}:  # Hydra prints one config: a sweep's would be a traceback or wrong
        tasks = sorted({cfg.task.name for _, cfg, swept in jobs if not swept})
        return (f"--cfg prints one job's config, not a sweep's: give one job's overrides, one value a key and "
                f"no -m or paper=, e.g. repro task={tasks[0]} ... --cfg job (this sweep's tasks: "
                f"{', '.join(tasks)})")
    launcher = next((o.value() for o in groups if o.key_or_group == "hydra/launcher"), None)
    launchers = sorted({p.stem for p in (conf / "hydra" / "launcher").glob("*.yaml")} | installed_launchers())
    if launcher is not None and launcher not in launchers:
        return f"hydra/launcher={launcher!r} is not one of {launchers}"
    error = _unknown_hydra_key(jobs[0][0], groups)
    if error:
        return error
    # the jobs run on this machine (not on SLURM's nodes, whose devices a job's checks may ask for), and Hydra runs
    # them (not only prints the config)
    here = launcher in (None, "basic", "local") and not options & HYDRA_OPTIONS_THAT_RUN_NOTHING
    if launcher == "slurm" and not options & HYDRA_OPTIONS_THAT_RUN_NOTHING and shutil.which("srun") is None:
        return ("hydra/launcher=slurm submits the jobs through SLURM (srun, sbatch), which this machine lacks: "
                "launch from a SLURM login node, or run the jobs here with hydra/launcher=local")
    if here:
        scale_keys = {o.key_or_group.split(".", 1)[1]: o.value() for o in keys
                      if o.key_or_group.startswith("scale.")}
        for _, cfg, swept in jobs:
            if swept:  # a paper's own config: its jobs follow
                continue
            try:
                scale = OmegaConf.merge(cfg.scale, scale_keys)
            except Exception:  # noqa: BLE001 - a scale value Hydra refuses with its own message
                continue
            try:
                check_device(scale)
            except ConfigError as exc:
                return str(exc)
    if multirun and here:  # after the device: a job's own checks may ask for it
        error = _refused_job(jobs, [o for o in overrides if o not in groups])
        if error:
            return error
    if options & HYDRA_OPTIONS_THAT_RUN_NOTHING:
        return None
    return _folder_problem(jobs[0][0], overrides, "sweep" if multirun else "run")


def _multirun(options: set[str], overrides: list) -> bool:
    """Whether Hydra runs a multirun, as it decides: with -m, or where the config's hydra.mode is MULTIRUN (the last
    hydra.mode= given, else a paper's config, which sets it)."""
    if options & {"-m", "--multirun"}:
        return True
    modes = [str(o.value()).upper() for o in overrides if o.key_or_group == "hydra.mode"]
    if modes:
        return modes[-1] == "MULTIRUN"
    return any(o.key_or_group == "paper" and o.value() is not None for o in overrides)


def _unknown_hydra_key(choices: list[str], groups: list) -> str | None:
    """A hydra.* key given that Hydra's config, with the launcher and sweeper chosen, lacks (hydra.sweep.dirr): Hydra
    refuses it with exit status 1, a failed run's, in many lines that do not list the known keys."""
    from hydra import compose, initialize_config_dir

    keys = [o for o in groups if o.key_or_group.startswith("hydra.") and not (o.is_add() or o.is_force_add())]
    if not keys:
        return None
    chosen = [o.input_line for o in groups if o.key_or_group.startswith("hydra/")]
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
            cfg = compose("config", overrides=[*choices, *chosen], return_hydra_config=True)
    except Exception:  # noqa: BLE001 - a launcher or sweeper Hydra refuses with its own message
        return None
    for o in keys:
        try:
            node, path, lacking = _walk(cfg, o.key_or_group)
        except InterpolationResolutionError:  # a value there that resolves in a job alone (${hydra.job.num})
            continue
        if lacking is not None:
            return _unknown_key(o, node, path, lacking)
    return None


def _folder_problem(choices: list[str], overrides: list, mode: str) -> str | None:
    """A job (sweep) folder that cannot be made, or a folder given with hydra.run.dir (hydra.sweep.dir) that holds
    an earlier run (an earlier sweep's jobs): Hydra makes the folder, and writes its account of each job there
    (.hydra/, over the earlier job's), before any check of ours; it failed with a traceback where the folder could
    not be made."""
    from hydra import compose, initialize_config_dir

    key = f"hydra.{mode}.dir"
    given = [o for o in overrides if o.key_or_group == key or o.key_or_group.startswith("paths.")]
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
            cfg = compose("config", overrides=[*choices, *(o.input_line for o in given)], return_hydra_config=True)
        folder = Path(OmegaConf.select(cfg, key)).absolute()
    except Exception:  # noqa: BLE001 - a value Hydra refuses with its own message, or sweeps
        return None
    why = cannot_make(folder)
    named = key if any(o.key_or_group == key for o in given) else "paths.outputs"
    if why:
        return f"{named}={OmegaConf.select(cfg, named)!r} cannot hold this {mode}'s folder {folder} ({why})"
    # (a folder made from the time is another run's only if it began in the same second: claim_folder says so;
    # under torchrun, rank 0 may have taken the folder already)
    if named != key or world()[0] != 0:
        return None
    setting = f"{key}={OmegaConf.select(cfg, key)!r}"
    if mode == "run":
        return f"{setting} is the folder of an earlier run: give this one a new folder, to keep that one's as it is" \
            if _earlier_run(folder) else None
    # (the sweep's jobs, not its multirun.yaml: under torchrun another rank of this sweep may have written that
    # already, and where no job began there is no run to keep)
    earlier = next((job for mark in (JOB_MARK, JOB_RECORD) for job in sorted(p.parent for p in folder.rglob(mark))
                    if _earlier_run(job)), None)
    return None if earlier is None else (
        f"{setting} holds the jobs of an earlier sweep ({earlier}): give this one a new folder, to keep theirs as "
        "they are (a job run again after a kill reuses, in a new folder too, the trainings the killed one finished)")


def _earlier_run(folder: Path) -> bool:
    """Whether `folder` holds a run: its record, or the mark of the job that took it (`claim_folder`), but for
    this SLURM job's own (requeued, it takes its folder back)."""
    marker = folder / JOB_MARK
    if marker.exists():
        return not _own_mark(marker)
    return (folder / JOB_RECORD).exists()


def _forms(o) -> list[str]:
    """An override as the overrides of the jobs it makes: one, or one for each value it sweeps."""
    prefix = "++" if o.is_force_add() else "+" if o.is_add() else "~" if o.is_delete() else ""
    if not o.is_sweep_override():
        return [o.input_line]
    return [f"{prefix}{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]


def _jobs(conf: Path, groups: list) -> list[tuple[list[str], DictConfig, dict]]:
    """The config of each job the group choices make (`task=a,b` and a `paper=`'s sweep make several), with
    the choices that made it and the group values a paper sweeps; a paper's own config comes first (Hydra
    composes it before the jobs)."""
    from hydra import compose

    jobs = []
    for choices in itertools.product(*(_forms(o) for o in groups)):
        cfg = compose("config", overrides=list(choices), return_hydra_config=True)
        swept = {k: [v.strip() for v in str(values).split(",")] for k, values in
                 (cfg.hydra.sweeper.get("params") or {}).items()
                 if (conf / k).is_dir() and k not in {c.split("=")[0] for c in choices}}
        jobs.append((list(choices), cfg, swept))
        if swept:
            for more in itertools.product(*([f"{k}={v}" for v in values] for k, values in swept.items())):
                jobs.append(([*choices, *more], compose("config", overrides=[*choices, *more]), {}))
    return jobs


MAX_CONFIGS_CHECKED = 100  # compositions of a sweep checked up front (about 70 ms each)


def _refused_job(jobs: list, keys: list) -> str | None:
    """A job of a sweep that its own checks refuse (a value out of range, say), found before any job runs rather
    than after the others have: every value each key sweeps, with the other keys at their first value, for each
    task of the sweep (up to MAX_CONFIGS_CHECKED compositions; the rest check themselves when they run)."""
    from hydra import compose, initialize_config_dir

    try:
        axes = [_forms(o) for o in keys]
    except Exception:  # noqa: BLE001 - a sweep Hydra expands only itself (interval, glob): the jobs check it
        return None
    first = [axis[0] for axis in axes]
    variants = [first] + [first[:i] + [value] + first[i + 1:] for i, axis in enumerate(axes) for value in axis[1:]]
    configs = [(choices, [*choices, *more]) for choices, _, swept in jobs if not swept for more in variants]
    if len(configs) > MAX_CONFIGS_CHECKED:
        print(f"[repro] checking {MAX_CONFIGS_CHECKED} of this sweep's {len(configs)} settings before it starts; "
              "the others are checked as their jobs start", flush=True)
    checked = configs[:MAX_CONFIGS_CHECKED]
    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        for _, overrides in checked:
            try:
                check_job(compose("config", overrides=overrides), overrides)
            except ConfigError as exc:
                return f"{exc} (in the job {' '.join(overrides)}; no job was run)" + (
                    _readers_hint(exc, checked) if isinstance(exc, UnreadKey) else "")
            except Exception:  # noqa: BLE001 - what only the job itself can check (Hydra's runtime values)
                continue
    return None


def _readers_hint(refused: UnreadKey, checked: list[tuple[list[str], list[str]]]) -> str:
    """For a sweep refused for a key that some of its jobs read and others not (a task's own key, given to several
    tasks): which read it, to run on their own. The jobs are named by the group choices they differ in (task=...),
    from `checked` (each job's choices, and its overrides); nothing is said where those do not tell them apart."""
    from hydra import compose

    everywhere = set.intersection(*(set(choices) for choices, _ in checked))
    reads: dict[str, set] = {}  # a job's name -> whether its settings read the key (None: not known)
    for choices, overrides in checked:
        try:
            check_job(compose("config", overrides=overrides), [refused.given])
            read = True
        except UnreadKey as exc:
            read = None if exc.key != refused.key else False
        except Exception:  # noqa: BLE001 - refused for something else (said once this is fixed): not known
            read = None
        reads.setdefault(" ".join(c for c in choices if c not in everywhere), set()).add(read)
    readers = [name for name, read in reads.items() if read == {True}]
    others = [name for name, read in reads.items() if read == {False}]
    if "" in reads or not readers or len(readers) + len(others) < len(reads):
        return ""
    return (f". In this sweep, {refused.key} is read by {', '.join(readers)}, not by {', '.join(others)}: run "
            f"{', '.join(readers)} on {'its' if len(readers) == 1 else 'their'} own with {refused.given}")


def _unused_model(conf: Path, jobs: list) -> str | None:
    """model=<name> given to a task that loads no pretrained model (its own config chooses none), a paper's tasks
    included: the group would merge into a config it was not written for (the training tasks' own `model:`), or
    change nothing."""
    from hydra import compose

    def own_model(choices: list[str]) -> str | None:  # the model the job's task chooses for itself
        return compose("config", overrides=choices, return_hydra_config=True).hydra.runtime.choices.get("model")

    for choices, cfg, swept in jobs:
        given = [c for c in choices if c.split("=")[0] == "model"]
        if not given or swept:  # a paper's own config: its tasks' jobs follow
            continue
        if own_model([c for c in choices if c not in given]) is None:
            takers = [p.stem for p in sorted((conf / "task").glob("*.yaml")) if own_model([f"task={p.stem}"])]
            paper = next((c for c in choices if c.startswith("paper=")), None)
            return (f"task={cfg.task.name}{f' (of {paper})' if paper else ''} loads no pretrained model, so "
                    f"{given[0]} has nothing to choose; the tasks that take one: {', '.join(takers)}")
    return None


# The mappings of the config that take keys added with a '+' (patterns of their dotted paths, * for one part), each
# key there checked by name by the task that reads it, which refuses one it does not know: a training setting a
# task's `train` leaves out (repro.train.TrainSpec; a trained model's own too), the LRA model's optional settings,
# a KV-cache policy's parameters, the LRA pre-training stage (null by default), and the catalogs of named kernel
# grids and compression levels and their entries. (An empty mapping takes them too: it is there to be filled.) A
# key added anywhere else would be read by nothing.
OPEN_MAPPINGS = ("train", "model.train", "lra.model", "lra.pretrain", "kv.*", "kernel.settings", "kernel.settings.*",
                 "compression.catalog", "compression.catalog.*")

# The mappings of the config that may be null, which the task reads as "none": kernel.settings (the main grid
# alone), lra.micro_batch (each task's whole batch at once), lra.pretrain (no pre-training stage) and
# task.plot_lines (a colour per provider). Any other mapping set to null, or removed with `~`, leaves the job
# reading settings that are not there (a traceback), unless it is an entry of one of OPEN_MAPPINGS (a named kernel
# grid, a compression level), which the task that reads it checks by name.
NULLABLE_MAPPINGS = ("kernel.settings", "lra.micro_batch", "lra.pretrain", "task.plot_lines")

# The mappings whose entries may be removed (`~key`), each an addition to, or an override of, what the task falls
# back to: lra.model's of the LRA model's sizes, lra.micro_batch's of all of `batch`, kernel.settings' grids and
# their fields (of the main grid's), compression.catalog's levels and their fields. Any other setting removed leaves
# a key that the job reads missing.
REMOVABLE_SETTINGS = ("lra.model", "lra.micro_batch", "kernel.settings", "kernel.settings.*", "compression.catalog",
                      "compression.catalog.*")


def _added_where_nothing_reads(cfg: DictConfig, overrides: list) -> str | None:
    """A `+key=value` (or `++`) that would be ignored: added where no OPEN_MAPPINGS is; or a `+` on a key that is
    there already, which Hydra refuses with exit status 1."""
    for o in overrides:
        added_as = o.input_line.split("=", 1)[0]
        node, path, lacking = _walk(cfg, o.key_or_group)
        if lacking is None:
            if o.is_add() and node is not None:  # (node None: a `???` value, which Hydra lets a '+' set)
                return f"{added_as}: {o.key_or_group} is there already: set it without the '+', {o.input_line[1:]}"
            continue
        open_here = any(fnmatch.fnmatchcase(".".join(path), pattern) for pattern in OPEN_MAPPINGS)
        if path and (OmegaConf.is_dict(node) and (not node.keys() or open_here) or node is None and open_here):
            continue  # (node None: an open mapping that is null until given, lra.pretrain)
        where, known = _section(node, path)
        return (f"{added_as}: {where} has no {lacking!r}, and nothing reads a key added there; its keys are: "
                f"{known or 'none'}")
    return None


def _walk(cfg: DictConfig, key: str) -> tuple[Any, list[str], str | None]:
    """Follow the dotted `key` into `cfg`: the node reached, the path to it, and the first part of the key it
    lacks (None where it has them all). A `???` value (one the user must give) ends the walk with node None."""
    node, path = cfg, []
    for part in key.split("."):
        # `in` is False for a `???` value: ask the keys
        if not OmegaConf.is_dict(node) or part not in node.keys():
            return node, path, part
        if OmegaConf.is_missing(node, part):  # no default to take a type from
            return None, path, None
        node, path = node[part], path + [part]
    return node, path, None


def _section(node: Any, path: list[str]) -> tuple[str, str]:
    """Where a walk stopped, in words, and the keys there ("" for an empty mapping)."""
    known = ", ".join(str(k) for k in node.keys() if path or k != "hydra") if OmegaConf.is_dict(node) \
        else "none (not a mapping)"
    return ".".join(path) or "the top level", known


def _unknown_key(o, node: Any, path: list[str], lacking: str) -> str:
    """The refusal of the override `o`, whose key `_walk` found lacking `lacking` at `node`, reached by `path`."""
    where, known = _section(node, path)
    if not known:  # an empty mapping to add settings to, e.g. lra.model, hydra.job.env_set
        return f"{where} has no keys of its own, so {o.key_or_group} is added, with a '+': +{o.input_line}"
    return f"unknown config key {o.key_or_group!r}: {where} has no {lacking!r}; its keys are: {known}"


def _bad_value(cfg: DictConfig, overrides: list) -> str | None:
    """An override of `cfg` naming a key it lacks, or a value of another kind than the key's default."""
    for o in overrides:
        node, path, lacking = _walk(cfg, o.key_or_group)
        if lacking is not None:
            return _unknown_key(o, node, path, lacking)
        if o.is_delete():  # before the null check: a setting that is null by default is not removed either
            error = _removed_setting(cfg, o, None)
            if error:
                return error
        if node is None:
            continue
        default = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
        values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
        for value in values:
            error = _unresolved(cfg, o.key_or_group, value) or (not o.is_delete() and _removed_setting(cfg, o, value))
            if error:
                return error
            if not _fits(value, default):
                item = default[0] if isinstance(default, list) and default else default
                # where a list of mappings is, one mapping alone is refused too (see _fits)
                listed = isinstance(default, list) and isinstance(item, dict)
                expected = "a list of mappings, in brackets" if listed else _kind(item)
                return f"{o.key_or_group}={value!r} must be {expected}, like its default {default!r}"
            new_keys = sorted(set(value) - set(default)) if isinstance(value, dict) and isinstance(default, dict) \
                and OmegaConf.is_struct(node) else []
            if new_keys:  # Hydra would refuse it with "not in struct", naming neither the key nor the known ones
                return (f"unknown config key '{o.key_or_group}.{new_keys[0]}': {o.key_or_group} has no "
                        f"{new_keys[0]!r}; its keys are: {', '.join(map(str, default))}")
    return None


def _removed_setting(cfg: DictConfig, o, value) -> str | None:
    """What the override `o` takes away that the job reads: a setting removed (`~key`), where it is not one of
    REMOVABLE_SETTINGS, or a mapping (a block of settings) removed or set to null (`value`, or a null inside it):
    the task would fail at the first key it reads there, with a traceback. One of NULLABLE_MAPPINGS may be null
    (not removed: some tasks read it as a key that is there), and an entry of one of OPEN_MAPPINGS either: the task
    checks each entry it reads."""
    removed = [o.key_or_group] if o.is_delete() else [key for key, v in _leaves(o.key_or_group, value) if v is None]
    for key in removed:
        node, path, lacking = _walk(cfg, key)
        parent = ".".join(path[:-1])
        if lacking is None and o.is_delete() and not OmegaConf.is_dict(node):
            if not any(fnmatch.fnmatchcase(parent, pattern) for pattern in REMOVABLE_SETTINGS):
                default = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node
                shown = "null" if default is None else repr(default)
                return (f"~{key}: a setting is not removed; set it ({key}={shown} is its default), or leave it out "
                        "for its default")
            if node is None:  # Hydra would say it "does not exist"
                return f"~{key}: {key} is null, which is what removing it would give: leave it out"
        if lacking is not None or not OmegaConf.is_dict(node) or \
                any(fnmatch.fnmatchcase(parent, pattern) for pattern in OPEN_MAPPINGS):
            continue
        nullable = any(fnmatch.fnmatchcase(key, pattern) for pattern in NULLABLE_MAPPINGS)
        if nullable and not o.is_delete():
            continue
        given = f"~{key}" if o.is_delete() else f"{key}=null"
        if nullable:
            return f"{given}: {key} is not removed, but set to null: {key}=null"
        keys = list(map(str, node.keys()))
        if not keys:
            return f"{given}: {key} must be a mapping, as its default {{}} is: leave {key} out for its default"
        return (f"{given}: {key} must be a mapping, as its default is, of {', '.join(keys)}: set those one by one "
                f"({key}.{keys[0]}=...), or leave {key} out for its default")
    return None


CTRL_C = "stopped by SIGINT (Ctrl-C)"  # Python's own KeyboardInterrupt, which says nothing


class Stopped(KeyboardInterrupt):
    """A signal that stops the run as Ctrl-C does (see main), naming it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def installed_launchers() -> set[str]:
    """The launchers Hydra and its installed plugins offer (basic, submitit_local, submitit_slurm, ...)."""
    Plugins.instance()  # imports the plugins, which put their launchers' configs in the store
    return {name.removesuffix(".yaml") for name in ConfigStore.instance().list("hydra/launcher")}


def _unresolved(cfg: DictConfig, key: str, value) -> str | None:
    """An interpolation in `value` that names no key or resolver (Hydra's would be a traceback when the job reads
    it)."""
    if not (isinstance(value, str) and "${" in value) or "${hydra:" in value:  # hydra: resolves in the job only
        return None
    probe = cfg.copy()
    OmegaConf.update(probe, key, value)
    try:
        OmegaConf.select(probe, key, throw_on_resolution_failure=True)
    except InterpolationResolutionError as exc:  # a key or resolver that is not there, an unset ${oc.env:...}
        return f"{key}={value!r} cannot be resolved: {str(exc).splitlines()[0]}"
    return None


def _interrupt(signum, frame):
    raise Stopped(signum)


def stop_on_sigterm() -> None:
    """`timeout`, SLURM and torchrun stop a job with SIGTERM: turn it into an interrupt, so that the record is
    written with what was measured instead of being left half-way."""
    signal.signal(signal.SIGTERM, _interrupt)
    sys.unraisablehook = _stop_swallowed_by_a_finalizer


def _stop_swallowed_by_a_finalizer(unraisable) -> None:
    """A signal that comes while Python runs a finalizer (a `__del__`, a weakref's callback: the garbage
    collector's work, at any moment of a training step) raises Stopped there, where Python prints it and goes on,
    and the run went on (the SIGTERM test's run once trained on past its timeout, after printing that traceback).
    Send the signal again, to be raised in the code that runs a moment later."""
    if isinstance(unraisable.exc_value, Stopped):
        threading.Timer(0.05, os.kill, (os.getpid(), unraisable.exc_value.signum)).start()
    else:
        sys.__unraisablehook__(unraisable)


class SubmititStop(KeyboardInterrupt):
    """What submitit's signal handler raised (its exit after a requeue, or the error that ends a job it cannot
    requeue), carried as an interrupt past every per-point guard to `run_job`, which writes the record as killed
    and then raises the original: submitit's exit after a requeue (SystemExit) reaches submitit; an error it
    raised ends the job in Hydra's guard of it, the record already saying killed."""

    def __init__(self, original: BaseException):
        super().__init__(f"submitit's handler: {type(original).__name__}: {original}")
        self.original = original


# SLURM preempting a job sends SIGTERM a moment before the signal submitit requeues it on (0.2 s apart in
# submitit#1701's log): a SIGTERM stops a submitit job only where that signal has not followed within this time
SUBMITIT_SIGNAL_WAIT_S = 5


def stop_after_submitit_signal() -> None:
    """In a submitit job (SLURM), the signal that warns of the time limit or a preemption reaches submitit's
    handler, which requeues the job and exits, or raises an Exception: a sweep's guard of each point would take
    that for one failed point and go on until SLURM kills the job, record unwritten. Wrap that handler (once per
    process), so that what it raises reaches `run_job` (`SubmititStop`).
    submitit ignores SIGTERM (scancel, a time limit without that warning, a kill), which then stopped nothing until
    SIGKILL came: it stops the job as under `main`, with the record written as killed, unless submitit's signal
    follows it within SUBMITIT_SIGNAL_WAIT_S (a preemption, which requeues the job); after that signal it is
    ignored again (SLURM ends a job it requeued with one, while the record is being written)."""
    number = signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]
    submitits = signal.getsignal(number)
    if getattr(submitits, "wraps_submitit", False):
        return
    ignore_sigterm = signal.getsignal(signal.SIGTERM)  # submitit's, which logs it

    def handler(signum, frame):
        signal.alarm(0)  # a SIGTERM just before was this preemption's
        signal.signal(signal.SIGTERM, ignore_sigterm)
        try:
            if callable(submitits):
                submitits(signum, frame)  # returns only on ranks other than 0, which carry on
        except BaseException as exc:  # noqa: BLE001 - whatever submitit did (requeued and exited, or gave up)
            raise SubmititStop(exc) from exc
    handler.wraps_submitit = True

    def stop_unless_preempted(signum, frame):
        if callable(ignore_sigterm):
            ignore_sigterm(signum, frame)
        signal.signal(signal.SIGALRM, lambda _, later: _interrupt(signum, later))
        signal.alarm(SUBMITIT_SIGNAL_WAIT_S)
    signal.signal(number, handler)
    signal.signal(signal.SIGTERM, stop_unless_preempted)


def main() -> None:
    stop_on_sigterm()
    # an earlier multirun in this process (tests run several) says nothing of this one
    SweepSummary.failed, SweepSummary.running = False, None
    error = check_overrides(sys.argv[1:])
    if error:
        print(f"repro: error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    try:
        _hydra_main()
    except KeyboardInterrupt as exc:
        # Hydra's own end of the multirun never came; jobs submitted elsewhere (submitit, SLURM) run on, unlisted
        sweep = SweepSummary.running
        if sweep is not None and "submitit" not in OmegaConf.select(sweep, "hydra.launcher._target_", default=""):
            SweepSummary().on_multirun_end(sweep, stopped=True)
        print(f"repro: {str(exc) or CTRL_C}; the record keeps the rows measured so far", file=sys.stderr)
        sys.exit(128 + getattr(exc, "signum", signal.SIGINT))  # as a shell reports a process the signal ended
    except (SystemExit, Exception) as exc:
        # a sweep Hydra could not finish: an error it printed before its exit 1 (the error is the exit's context), or
        # let through (HYDRA_FULL_ERROR=1). Under submitit, a job that died outright (SIGKILL, out of host memory,
        # its node lost) leaves no result, and the launcher's collection of results ends there.
        sweep = SweepSummary.running
        if sweep is None:
            raise
        cause = exc.__context__ if isinstance(exc, SystemExit) else exc
        if type(cause).__name__ == "UncompletedJobError":  # submitit's, by name: the launcher's import is optional
            print(f"repro: a job of the sweep ended without finishing ({str(cause).splitlines()[0]}); each job's "
                  "record.json in the sweep folder keeps what it saved", file=sys.stderr)
        SweepSummary().on_multirun_end(sweep, stopped=True)
        raise
    if SweepSummary.failed:
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    # Hydra builds SweepSummary from `repro.cli`; run main from that same module, not from a `__main__` copy,
    # so that the sweep's verdict reaches it
    from repro.cli import main as repro_main
    repro_main()
