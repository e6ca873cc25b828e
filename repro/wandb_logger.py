"""Weights & Biases, as a copy of what the run records hold: offline unless asked, never blocking a run."""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any

from .records import Row

WANDB_MODES = ("offline", "online", "disabled")
FINISH_TIMEOUT_S = 60  # a finish waiting on a lost connection: the job ends without it, its record written
# why W&B was given up in this process (it did not start, or a run did not finish): a sweep's later jobs do not
# wait for it again
_given_up: str | None = None


class NullLogger:
    def log_rows(self, rows: list[Row]) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


class WandbLogger(NullLogger):
    def __init__(self, cfg, *, name: str, group: str | None, job_type: str, config: dict[str, Any],
                 output_dir: Path):
        # Offline W&B still tries to report its own errors over the network; keep it quiet and local.
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self._wandb = wandb
        # create_new: a run an earlier job of the process left unfinished (its finish failed, or gave up waiting) is
        # left as it is; "finish_previous" would finish it here, in the job's own thread, with no time limit
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, mode=cfg.mode, name=name, group=group, job_type=job_type,
            config=config, dir=str(output_dir), reinit="create_new",
            settings=wandb.Settings(init_timeout=cfg.init_timeout_s),
        )
        self.failed = False

    def log_rows(self, rows: list[Row]) -> None:
        if self.failed:
            return
        try:
            for r in rows:
                if r.status != "ok" or r.p50 is None:
                    continue
                series = "/".join(f"{k}={v}" for k, v in sorted(r.extra.items()) if k not in ("clock", "baseline"))
                self.run.log({f"{r.metric}/{r.provider}/{series}": r.p50, r.x_name: r.x_value})
        except Exception as exc:  # noqa: BLE001 - W&B must never stop a run
            self.failed = True
            warnings.warn(f"W&B stopped logging ({type(exc).__name__}: {exc}); the run goes on, and its record "
                          "keeps every row", stacklevel=2)

    def finish(self, status: str) -> None:
        global _given_up

        def finish():
            self.run.summary["status"] = status
            self.run.finish(exit_code=0 if status == "ok" else 1)
        finishing = threading.Thread(target=finish, daemon=True)
        finishing.start()
        finishing.join(FINISH_TIMEOUT_S)
        if finishing.is_alive():
            _given_up = f"a run did not finish within {FINISH_TIMEOUT_S} s"
            warnings.warn(f"W&B did not finish within {FINISH_TIMEOUT_S} s; the run ends without it, and its record "
                          "keeps every row", stacklevel=2)


def make_logger(cfg, **kwargs) -> NullLogger:
    """The configured logger (`cli.check_job` has checked its settings); if W&B cannot start (no network for
    `online`, a broken install), or was given up earlier in the process, the run goes on without it and says so."""
    global _given_up
    if cfg.name == "none":
        return NullLogger()
    if _given_up is not None:
        warnings.warn(f"W&B was given up earlier in this process ({_given_up}); this run goes on without it",
                      stacklevel=2)
        return NullLogger()
    try:
        return WandbLogger(cfg, **kwargs)
    except Exception as exc:  # noqa: BLE001 - W&B must never stop a run
        why = f"{type(exc).__name__}: {exc}"
        _given_up = f"it did not start: {why}"
        warnings.warn(f"W&B did not start ({why}); the run goes on without it", stacklevel=2)
        return NullLogger()
