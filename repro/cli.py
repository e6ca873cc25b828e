"""`repro`: run one experiment (or a sweep) by config name, write its run record, compare it with the paper.

    repro task=flash_kernel                      # smoke scale, on the CPU
    repro task=flash_kernel scale=small          # one GPU; the record lands in results/runs/
    repro paper=flashattention                   # all of a paper's tasks, as one multirun
    repro -m task=flash_kernel kernel.seq_len=1024,4096
"""
from __future__ import annotations

import importlib
import re
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .claims import claims_for_task, load_published
from .context import (PROJECT_ROOT, ConfigError, RunContext, capture_environment, reset_device_memory,
                      resolve_device, seed_everything, utc_now, world)
from .records import Row, RunRecord, save_record
from .report import console_table, evaluate
from .timing import is_out_of_memory
from .wandb_logger import make_logger

CHECKPOINT_EVERY_S = 10.0

OmegaConf.register_new_resolver("repro_root", lambda: str(PROJECT_ROOT), replace=True)


def load_entry(spec: str) -> Callable[[DictConfig, RunContext], Iterable[Row]]:
    """`package.module:function`, the task's code as its config names it."""
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr or "run")
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"task.entry={spec!r} cannot be loaded: {exc}") from None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def record_paths(cfg: DictConfig, record: RunRecord, output_dir: Path, job_num: int | None) -> list[Path]:
    paths = [output_dir / "record.json"]
    if cfg.scale.commit_records:
        stamp = record.started.replace("-", "").replace(":", "").replace("+0000", "")[:15]
        name = f"{stamp}_{record.scale}_{_slug(record.gpu_name)}" + (f"_{job_num}" if job_num is not None else "")
        paths.append(Path(cfg.paths.records) / record.paper / record.task / f"{name}.json")
    return paths


def run_job(cfg: DictConfig) -> RunRecord:
    hc = HydraConfig.get()
    output_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    device = resolve_device(cfg.scale)
    entry = load_entry(cfg.task.entry)
    published = load_published(Path(cfg.paths.published))
    claims = claims_for_task(published, cfg.task.name)

    seed_everything(cfg.seed)
    reset_device_memory(device)
    ctx = RunContext(device=device, scale=cfg.scale.name, seed=cfg.seed, output_dir=output_dir,
                     env=capture_environment())
    record = RunRecord(task=cfg.task.name, paper=cfg.task.paper, scale=cfg.scale.name,
                       claim_ids=[c.id for c in claims], config=OmegaConf.to_container(cfg, resolve=True),
                       overrides=list(hc.overrides.task), env=ctx.env, started=utc_now())
    paths = record_paths(cfg, record, output_dir, hc.job.num if multirun else None)
    if world()[0] != 0:  # under torchrun, rank 0 alone writes records and logs
        paths, cfg = [], OmegaConf.merge(cfg, {"logger": {"name": "none"}})
    paper_choice = hc.runtime.choices.get("paper")
    logger = make_logger(
        cfg.logger, name=f"{cfg.task.name}-{cfg.scale.name}" + (f"-{hc.job.override_dirname}" if multirun else ""),
        group=f"{paper_choice or cfg.task.name}-{Path(hc.sweep.dir).name}" if multirun else None,
        job_type=cfg.scale.name, config=record.config, output_dir=output_dir)

    print(f"[repro] {cfg.task.name} at scale={cfg.scale.name} on {device} "
          f"({ctx.env['gpu_name'] or 'CPU'}); output: {output_dir}", flush=True)
    last_save = time.monotonic()
    try:
        for row in entry(cfg, ctx):
            record.rows.append(row)
            logger.log_rows([row])
            if paths and time.monotonic() - last_save > CHECKPOINT_EVERY_S:
                save_record(record, paths[0])
                last_save = time.monotonic()
        record.status = "ok"
    except ConfigError:
        record.status, paths = "error", paths[:1]  # bad input measured nothing: no record to commit
        raise
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see main): the rows so far are kept, marked as such
        record.status = "killed"
        raise
    except Exception as exc:
        record.status = "oom" if is_out_of_memory(exc) else "error"
        record.error = f"{type(exc).__name__}: {exc}"
        if record.status == "error":
            raise
    finally:
        record.finished = utc_now()
        for path in paths:
            save_record(record, path)
        try:
            logger.finish(record.status)
        except Exception as exc:  # noqa: BLE001 - W&B must never stop a run
            print(f"[repro] W&B did not finish cleanly: {exc}", file=sys.stderr)
        if paths:
            print(f"[repro] {record.status}: {len(record.rows)} rows -> " + ", ".join(map(str, paths)), flush=True)
    if claims and paths:
        print("\n" + console_table([evaluate(c, [(paths[-1], record)]) for c in claims]) + "\n", flush=True)
    elif paths:
        print(f"[repro] {cfg.task.name} has no published claims to compare with", flush=True)
    return record


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run_job(cfg)
    except ConfigError as exc:
        print(f"repro: error: {exc}", file=sys.stderr)
        sys.exit(2)


def unknown_key_error(args: list[str]) -> str | None:
    """Hydra rejects an unknown key without listing the known ones; name both before Hydra runs.
    Config-group choices (task=, scale=, ...) are left to Hydra, whose message already lists the options."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:  # noqa: BLE001 - a syntax error: Hydra's own message is the right one
        return None
    conf = PROJECT_ROOT / "conf"
    groups = [o.input_line for o in overrides if (conf / o.key_or_group).is_dir() or o.key_or_group.startswith("hydra")]
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
            cfg = compose("config", overrides=[g for g in groups if not g.startswith("hydra")])
    except Exception:  # noqa: BLE001 - an unknown group option: Hydra reports it with the valid ones
        return None
    for o in overrides:
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.input_line in groups:
            continue
        node, path = cfg, []
        for part in key.split("."):
            if not OmegaConf.is_dict(node) or part not in node:
                where = ".".join(path) or "the top level"
                known = ", ".join(map(str, node.keys())) if OmegaConf.is_dict(node) else "none (not a mapping)"
                return f"unknown config key {key!r}: {where} has no {part!r}; its keys are: {known}"
            node, path = node[part], path + [part]
    return None


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    # `timeout`, SLURM and torchrun stop a job with SIGTERM: turn it into an interrupt, so that the record is
    # written with what was measured instead of being left half-way.
    signal.signal(signal.SIGTERM, _interrupt)
    error = unknown_key_error(sys.argv[1:])
    if error:
        print(f"repro: error: {error}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
